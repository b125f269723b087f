"""D-RISE (Petsiuk et al., "Black-box Explanation of Object Detectors via Saliency Maps",
CVPR 2021): a black-box, per-detection saliency map.

``N`` random masks are drawn as in RISE: a ``grid x grid`` binary grid (each cell kept with
probability ``p``) is upsampled bilinearly to ``(grid + 1) x`` the cell size and cropped at a
random shift, giving smooth masks of the image size. Each masked image (``image * mask``, the
rest black) goes through the detector. For target detection ``t`` the mask's weight is its best
similarity to the masked image's detections,

    ``w_t(M) = max_j IoU(box_t, box_j) * [label_j == label_t] * score_j``,

the D-RISE similarity with one-hot class vectors (the cosine of two one-hot vectors is 1 for the
same class, 0 otherwise) and the detection's score in the place of the objectness. The map is
``S_t = sum_M w_t(M) * M / N``, min-max scaled to [0, 1]. It needs no gradients, so it is the
reference that gradient methods are compared with; its cost is ``N`` images through the network
per image (for all of its detections at once), e.g. ``N = 1000`` at batch 16 is about 60
batched forward passes.
"""
from __future__ import annotations

import numbers
from typing import Callable, List, Tuple

import cv2
import numpy as np

#: ``detect_fn(images) -> [(bboxes (M, 4), labels (M,), scores (M,)), ...]``, one tuple per
#: image of the (B, H, W, 3) uint8 batch, boxes in the image's pixels.
DetectFn = Callable[[np.ndarray], List[Tuple[np.ndarray, np.ndarray, np.ndarray]]]


def _positive_int(arg: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f'`{arg}` must be a positive int, got {value!r}')
    return int(value)


def rise_masks(num: int, shape: Tuple[int, int], grid: int = 16, p: float = 0.5,
               seed: int = 0) -> np.ndarray:
    """RISE's random smooth masks.

    Args:
        num (int): Number of masks.
        shape (tuple[int, int]): (H, W) of the image.
        grid (int): Cells per side of the binary grid. Defaults to 16.
        p (float): Probability that a cell is kept. Defaults to 0.5.
        seed (int): Seed. Defaults to 0.

    Returns:
        np.ndarray: (num, H, W) float32 in [0, 1].
    """
    num, grid = _positive_int('num', num), _positive_int('grid', grid)
    if isinstance(p, bool) or not isinstance(p, numbers.Real) or not 0 < p < 1:
        raise ValueError(f'`p` must be a number in (0, 1), got {p!r}')
    h, w = shape
    rng = np.random.default_rng(seed)
    cell_h, cell_w = int(np.ceil(h / grid)), int(np.ceil(w / grid))
    up_h, up_w = (grid + 1) * cell_h, (grid + 1) * cell_w
    cells = (rng.random((num, grid, grid)) < p).astype(np.float32)
    shifts = rng.integers(0, [cell_h, cell_w], size=(num, 2))
    masks = np.empty((num, h, w), np.float32)
    for i in range(num):
        up = cv2.resize(cells[i], (up_w, up_h), interpolation=cv2.INTER_LINEAR)
        y, x = shifts[i]
        masks[i] = up[y:y + h, x:x + w]
    return masks


def _iou(box: np.ndarray, others: np.ndarray) -> np.ndarray:
    x1 = np.maximum(box[0], others[:, 0])
    y1 = np.maximum(box[1], others[:, 1])
    x2 = np.minimum(box[2], others[:, 2])
    y2 = np.minimum(box[3], others[:, 3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    union = ((box[2] - box[0]) * (box[3] - box[1])
             + (others[:, 2] - others[:, 0]) * (others[:, 3] - others[:, 1]) - inter)
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def similarity(bboxes: np.ndarray, labels: np.ndarray, det_bboxes: np.ndarray,
               det_labels: np.ndarray, det_scores: np.ndarray) -> np.ndarray:
    """D-RISE weight of one masked image for each target: ``max_j IoU * [same class] * score_j``.

    Returns:
        np.ndarray: (K,) float64, 0 where the masked image has no detection of the class.
    """
    out = np.zeros(len(bboxes))
    det_bboxes = np.asarray(det_bboxes, np.float64).reshape(-1, 4)
    if not len(det_bboxes):
        return out
    det_labels = np.asarray(det_labels).reshape(-1)
    det_scores = np.asarray(det_scores, np.float64).reshape(-1)
    for k, (box, label) in enumerate(zip(np.asarray(bboxes, np.float64), labels)):
        same = det_labels == label
        if same.any():
            out[k] = (_iou(box, det_bboxes[same]) * det_scores[same]).max()
    return out


def drise_maps(image: np.ndarray, bboxes: np.ndarray, labels: np.ndarray,
               detect_fn: DetectFn, *, num_masks: int = 1000, batch_size: int = 16,
               grid: int = 16, p: float = 0.5, seed: int = 0) -> np.ndarray:
    """D-RISE maps of K detections of one image (see the module docstring).

    Args:
        image (np.ndarray): (H, W, 3) uint8 BGR.
        bboxes (np.ndarray): (K, 4) the detections to explain, in the image's pixels.
        labels (np.ndarray): (K,) their classes.
        detect_fn (DetectFn): The detector on a batch of masked images.
        num_masks (int): Number of random masks. Defaults to 1000.
        batch_size (int): Masked images per call of ``detect_fn``. Defaults to 16.
        grid (int): Cells per side of a mask's grid. Defaults to 16.
        p (float): Probability that a cell is kept. Defaults to 0.5.
        seed (int): Seed of the masks. Defaults to 0.

    Returns:
        np.ndarray: (K, H, W) float32 in [0, 1]; all zero for a detection that no masked image
        reproduced.
    """
    batch_size = _positive_int('batch_size', batch_size)
    masks = rise_masks(num_masks, image.shape[:2], grid=grid, p=p, seed=seed)
    bboxes = np.asarray(bboxes, np.float64).reshape(-1, 4)
    labels = np.asarray(labels).reshape(-1)
    sal = np.zeros((len(bboxes), *image.shape[:2]), np.float64)
    for start in range(0, len(masks), batch_size):
        chunk = masks[start:start + batch_size]
        masked = (image[None].astype(np.float32) * chunk[..., None]).round().astype(np.uint8)
        detections = detect_fn(masked)
        if len(detections) != len(chunk):
            raise ValueError(f'`detect_fn` must return one result per image: {len(chunk)} '
                             f'images, {len(detections)} results')
        for mask, (det_bboxes, det_labels, det_scores) in zip(chunk, detections):
            weights = similarity(bboxes, labels, det_bboxes, det_labels, det_scores)
            sal += weights[:, None, None] * mask[None]
    sal /= len(masks)
    low = sal.reshape(len(sal), -1).min(1, initial=np.inf)[:, None, None] if len(sal) else 0
    high = sal.reshape(len(sal), -1).max(1, initial=-np.inf)[:, None, None] if len(sal) else 1
    span = np.where(high > low, high - low, 1.0)
    return np.where(high > low, (sal - low) / span, 0.0).astype(np.float32)
