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
batched forward passes, each followed by one decoding (NMS) per masked image. Measured on a
2-core CPU shared with other jobs, 1 thread, YOLOX-nano at 256 px: ~45 ms per masked image, so
``N = 1000`` is ~45 s per image, against ~0.05 s for the gradient methods' maps.

Through the engine (``CAMEngine.explain(methods=['drise'])``, :func:`drise_input_maps`), the
masks are drawn at the size the network sees the image, on the image resized to it: cost and
memory do not grow with the original image's size, and the map lands on the network-input grid
like the CAM methods' maps.
"""
from __future__ import annotations

import logging
import numbers
import time
from typing import Callable, List, Optional, Tuple

import cv2
import numpy as np

from ..checks import check_int
from ..runtime.detector import BatchedDetector, model_score_thr
from .geometry import box_iou

logger = logging.getLogger(__name__)
#: Seconds between two progress lines of a D-RISE run (:func:`drise_maps`).
PROGRESS_EVERY = 10.0

#: ``detect_fn(images) -> [(bboxes (M, 4), labels (M,), scores (M,)), ...]``, one tuple per
#: image of the (B, H, W, 3) uint8 batch, boxes in the image's pixels.
DetectFn = Callable[[np.ndarray], List[Tuple[np.ndarray, np.ndarray, np.ndarray]]]


class MaskSampler:
    """RISE's random smooth masks, drawn once (the small binary grids and shifts) and rendered at
    the image size on demand, a batch at a time, so that memory stays at one batch of masks.

    Args:
        num (int): Number of masks.
        shape (tuple[int, int]): (H, W) of the image.
        grid (int): Cells per side of the binary grid. Defaults to 16.
        p (float): Probability that a cell is kept. Defaults to 0.5.
        seed (int): Seed. Defaults to 0.
    """

    def __init__(self, num: int, shape: Tuple[int, int], grid: int = 16, p: float = 0.5,
                 seed: int = 0) -> None:
        self.num, grid = check_int(num, 'num'), check_int(grid, 'grid')
        if isinstance(p, bool) or not isinstance(p, numbers.Real) or not 0 < p < 1:
            raise ValueError(f'`p` must be a number in (0, 1), got {p!r}')
        self.shape = (int(shape[0]), int(shape[1]))
        h, w = self.shape
        rng = np.random.default_rng(seed)
        self.cell = (int(np.ceil(h / grid)), int(np.ceil(w / grid)))
        self.up = ((grid + 1) * self.cell[0], (grid + 1) * self.cell[1])
        self.cells = (rng.random((self.num, grid, grid)) < p).astype(np.float32)
        self.shifts = rng.integers(0, self.cell, size=(self.num, 2))

    def masks(self, start: int, stop: int) -> np.ndarray:
        """Masks ``start .. stop - 1`` as a (n, H, W) float32 array in [0, 1]."""
        h, w = self.shape
        idx = range(start, min(stop, self.num))
        out = np.empty((len(idx), h, w), np.float32)
        for j, i in enumerate(idx):
            up = cv2.resize(self.cells[i], (self.up[1], self.up[0]),
                            interpolation=cv2.INTER_LINEAR)
            y, x = self.shifts[i]
            out[j] = up[y:y + h, x:x + w]
        return out


def rise_masks(num: int, shape: Tuple[int, int], grid: int = 16, p: float = 0.5,
               seed: int = 0) -> np.ndarray:
    """RISE's random smooth masks, all at once (arguments as :class:`MaskSampler`'s).

    Returns:
        np.ndarray: (num, H, W) float32 in [0, 1].
    """
    sampler = MaskSampler(num, shape, grid=grid, p=p, seed=seed)
    return sampler.masks(0, sampler.num)


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
            out[k] = (box_iou(box, det_bboxes[same]) * det_scores[same]).max()
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
    batch_size = check_int(batch_size, 'batch_size')
    sampler = MaskSampler(num_masks, image.shape[:2], grid=grid, p=p, seed=seed)
    bboxes = np.asarray(bboxes, np.float64).reshape(-1, 4)
    labels = np.asarray(labels).reshape(-1)
    sal = np.zeros((len(bboxes), *image.shape[:2]), np.float64)
    progress = _Progress(sampler.num)
    for start in range(0, sampler.num, batch_size):
        progress.update(start)
        chunk = sampler.masks(start, start + batch_size)
        masked = (image[None].astype(np.float32) * chunk[..., None]).round().astype(np.uint8)
        detections = detect_fn(masked)
        if len(detections) != len(chunk):
            raise ValueError(f'`detect_fn` must return one result per image: {len(chunk)} '
                             f'images, {len(detections)} results')
        for mask, (det_bboxes, det_labels, det_scores) in zip(chunk, detections):
            weights = similarity(bboxes, labels, det_bboxes, det_labels, det_scores)
            sal += weights[:, None, None] * mask[None]
    sal /= sampler.num
    low = sal.reshape(len(sal), -1).min(1, initial=np.inf)[:, None, None] if len(sal) else 0
    high = sal.reshape(len(sal), -1).max(1, initial=-np.inf)[:, None, None] if len(sal) else 1
    span = np.where(high > low, high - low, 1.0)
    return np.where(high > low, (sal - low) / span, 0.0).astype(np.float32)


class _Progress:
    """One log line every ``every`` seconds while D-RISE runs (a 1000-mask image can take
    half a minute on a CPU): ``drise: 320/1000 masked images``."""

    def __init__(self, total: int) -> None:
        self.total, self.every = total, PROGRESS_EVERY
        self.start = self.last = time.monotonic()

    def update(self, done: int) -> None:
        now = time.monotonic()
        if now - self.last >= self.every:
            self.last = now
            logger.info('drise: %d/%d masked images (%.0f s)', done, self.total, now - self.start)


def drise_input_maps(detector: BatchedDetector, image: np.ndarray, bboxes: np.ndarray,
                     labels: np.ndarray, resized_shape: Tuple[int, int],
                     input_shape: Tuple[int, int], *, num_masks: int = 1000,
                     batch_size: int = 16, seed: int = 0,
                     score_thr: Optional[float] = None) -> np.ndarray:
    """D-RISE maps of K detections on the network-input grid, for the engine.

    The masks are drawn at the size the network sees the image (``resized_shape``, the
    letterbox's unpadded part), on the image resized to it, so that the cost and memory do not
    grow with the original image's size; the test pipeline then leaves that size unchanged.
    The padding of the network input gets 0.

    Args:
        detector (BatchedDetector): The detector on batches.
        image (np.ndarray): (H, W, 3) uint8 BGR original image.
        bboxes (np.ndarray): (K, 4) detections in original pixels.
        labels (np.ndarray): (K,) their classes.
        resized_shape (tuple[int, int]): (h, w) of the image inside the network input.
        input_shape (tuple[int, int]): (H_in, W_in) of the network input.
        num_masks (int): Number of masks. Defaults to 1000.
        batch_size (int): Masked images per forward pass. Defaults to 16.
        seed (int): Seed of the masks. Defaults to 0.
        score_thr (float, optional): Detections of a masked image kept for the similarity.
            Defaults to None (the head's ``test_cfg.score_thr``, :func:`model_score_thr`).

    Returns:
        np.ndarray: (K, H_in, W_in) float32 in [0, 1].
    """
    h, w = image.shape[:2]
    h_r, w_r = int(resized_shape[0]), int(resized_shape[1])
    view = image if (h, w) == (h_r, w_r) else cv2.resize(image, (w_r, h_r),
                                                          interpolation=cv2.INTER_LINEAR)
    boxes = np.asarray(bboxes, np.float64).reshape(-1, 4) * np.array([w_r / w, h_r / h] * 2)
    thr = model_score_thr(detector.adapter) if score_thr is None else float(score_thr)
    maps = drise_maps(view, boxes, labels, lambda images: detector.detect(images, thr),
                      num_masks=num_masks, batch_size=batch_size, seed=seed)
    out = np.zeros((len(maps), int(input_shape[0]), int(input_shape[1])), np.float32)
    out[:, :h_r, :w_r] = maps[:, :input_shape[0], :input_shape[1]]
    return out
