"""Faithfulness of a per-detection map: deletion and insertion curves (Petsiuk et al., RISE,
BMVC 2018; D-RISE, CVPR 2021) and the baseline maps every evaluation is compared with.

Deletion removes the image's pixels in the map's order, most salient first, and tracks the
detection's score; a faithful map makes it fall fast (low AUC). Insertion starts from the image
with every pixel removed and puts pixels back in the same order; a faithful map makes the score
rise fast (high AUC). "Removed" means replaced by the ``fill`` image:

- ``blur``: a Gaussian blur of the image (kernel a quarter of the shorter side, odd), as in
  ODExAI / D-CLOSE insertion; keeps colours and coarse layout, removes detail;
- ``grey``: mid grey (128, 128, 128);
- ``noise``: uniform random pixels, seeded.

Step ``i`` of ``steps`` removes (or inserts) the ``round(i / steps * H * W)`` most salient pixels;
ties in the map are broken by a seeded random order, so a blank or constant map behaves as a
random one rather than as a top-to-bottom sweep. Curves are sampled at ``i / steps`` of the
pixels, ``i = 0 .. steps``, and the AUC is the trapezoid rule over that fraction, so it lies in
the range of the scores. Which score is tracked (the same prior's, or the best-matching
detection's) is the caller's ``score_fn``; this module only perturbs and integrates.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import cv2
import numpy as np

from ..cam.geometry import box_slices
from ..checks import check_int

#: The fills, by name: what a removed pixel becomes.
FILLS = ('blur', 'grey', 'noise')

#: ``score_fn(images, detections) -> scores``: ``images`` (B, H, W, 3) uint8 BGR perturbed
#: copies of the original image, ``detections`` (B,) the index of the detection whose score to
#: return for each image; returns (B,) float scores.
ScoreFn = Callable[[np.ndarray, np.ndarray], np.ndarray]


@dataclass
class Curves:
    """Deletion and insertion curves of K detections.

    Attributes:
        fractions (np.ndarray): (steps + 1,) share of the pixels removed / inserted.
        deletion (np.ndarray): (K, steps + 1) score after removing that share.
        insertion (np.ndarray): (K, steps + 1) score after inserting that share.
    """

    fractions: np.ndarray
    deletion: np.ndarray
    insertion: np.ndarray

    @property
    def deletion_auc(self) -> np.ndarray:
        """(K,) area under each deletion curve (lower is more faithful)."""
        return auc(self.fractions, self.deletion)

    @property
    def insertion_auc(self) -> np.ndarray:
        """(K,) area under each insertion curve (higher is more faithful)."""
        return auc(self.fractions, self.insertion)


def auc(fractions: np.ndarray, curves: np.ndarray) -> np.ndarray:
    """Trapezoid-rule area under each curve over ``fractions`` (which span [0, 1]).

    Args:
        fractions (np.ndarray): (S,) increasing x values.
        curves (np.ndarray): (K, S) y values.

    Returns:
        np.ndarray: (K,) float64.
    """
    curves = np.asarray(curves, np.float64)
    x = np.asarray(fractions, np.float64)
    return ((curves[:, 1:] + curves[:, :-1]) * np.diff(x)[None]).sum(1) / 2


def check_fill(fill: str) -> str:
    if fill not in FILLS:
        raise ValueError(f'`fill` must be one of {list(FILLS)}, got {fill!r}')
    return fill


def fill_image(image: np.ndarray, fill: str, seed: int = 0) -> np.ndarray:
    """The image every pixel is replaced by when removed (see the module docstring).

    Args:
        image (np.ndarray): (H, W, 3) uint8.
        fill (str): One of :data:`FILLS`.
        seed (int): Seed of the ``noise`` fill. Defaults to 0.

    Returns:
        np.ndarray: (H, W, 3) uint8.
    """
    check_fill(fill)
    if fill == 'grey':
        return np.full_like(image, 128)
    if fill == 'noise':
        return np.random.default_rng(seed).integers(0, 256, image.shape, dtype=np.uint8)
    k = max(3, min(image.shape[:2]) // 4) | 1
    return cv2.GaussianBlur(image, (k, k), 0)


def saliency_order(cam: np.ndarray, seed: int = 0) -> np.ndarray:
    """Flat pixel indices of ``cam`` from most to least salient; ties in a seeded random order.

    Args:
        cam (np.ndarray): (H, W) map.
        seed (int): Seed of the tie-break. Defaults to 0.

    Returns:
        np.ndarray: (H * W,) int64.
    """
    flat = np.asarray(cam, np.float64).ravel()
    tie_break = np.random.default_rng(seed).permutation(flat.size)
    return np.lexsort((tie_break, -flat)).astype(np.int64)


def deletion_insertion(image: np.ndarray, cams: np.ndarray, score_fn: ScoreFn, *,
                       steps: int = 20, fill: str = 'blur', batch_size: int = 16,
                       seed: int = 0) -> Curves:
    """Deletion and insertion curves of each detection's map.

    Every perturbed image goes through ``score_fn`` in batches of ``batch_size``; the whole
    evaluation costs ``2 * K * (steps + 1)`` images through the network. Deterministic for a
    ``seed``.

    Args:
        image (np.ndarray): (H, W, 3) uint8 BGR original image.
        cams (np.ndarray): (K, H, W) one map per detection, on the original image.
        score_fn (ScoreFn): Scores of the perturbed images (see :data:`ScoreFn`).
        steps (int): Points on each curve after the first. Defaults to 20.
        fill (str): What removed pixels become, one of :data:`FILLS`. Defaults to 'blur'.
        batch_size (int): Images per call of ``score_fn``. Defaults to 16.
        seed (int): Seed of the tie-break and of the ``noise`` fill. Defaults to 0.

    Returns:
        Curves: The curves and their AUCs.

    Raises:
        ValueError: On a bad ``steps``, ``fill`` or ``batch_size``, or maps whose size is not
            the image's.
    """
    steps = check_int(steps, 'steps')
    batch_size = check_int(batch_size, 'batch_size')
    check_fill(fill)
    image = np.asarray(image)
    cams = np.asarray(cams)
    if image.ndim != 3 or image.dtype != np.uint8:
        raise ValueError(f'`image` must be an HxWx3 uint8 array, got {image.dtype} '
                         f'{image.shape}')
    if cams.ndim != 3 or cams.shape[1:] != image.shape[:2]:
        raise ValueError(f'`cams` must have shape (K, {image.shape[0]}, {image.shape[1]}) '
                         f'(the image size), got {cams.shape}')
    h, w = image.shape[:2]
    fractions = np.arange(steps + 1) / steps
    counts = np.round(fractions * h * w).astype(np.int64)
    removed = fill_image(image, fill, seed)
    flat_image, flat_removed = image.reshape(-1, 3), removed.reshape(-1, 3)

    jobs = []  # (detection, step, deletion?) in a fixed order
    orders = [saliency_order(cam, seed) for cam in cams]
    for k in range(len(cams)):
        for i in range(steps + 1):
            jobs += [(k, i, True), (k, i, False)]

    def perturbed(k: int, i: int, deletion: bool) -> np.ndarray:
        top = orders[k][:counts[i]]
        if deletion:
            out = flat_image.copy()
            out[top] = flat_removed[top]
        else:
            out = flat_removed.copy()
            out[top] = flat_image[top]
        return out.reshape(h, w, 3)

    deletion = np.zeros((len(cams), steps + 1))
    insertion = np.zeros((len(cams), steps + 1))
    for start in range(0, len(jobs), batch_size):
        batch = jobs[start:start + batch_size]
        images = np.stack([perturbed(*job) for job in batch])
        scores = np.asarray(score_fn(images, np.array([k for k, _, _ in batch])), np.float64)
        if scores.shape != (len(batch), ):
            raise ValueError(f'`score_fn` must return ({len(batch)},) scores for a batch of '
                             f'{len(batch)} images, got shape {scores.shape}')
        for (k, i, is_deletion), score in zip(batch, scores):
            (deletion if is_deletion else insertion)[k, i] = score
    return Curves(fractions, deletion, insertion)


# ------------------------------------------------------------------ baseline maps
def random_maps(num: int, shape: tuple, seed: int = 0) -> np.ndarray:
    """``random``: one uniform random map per detection, seeded. A method that does not beat it
    on deletion and insertion is not faithful for that model.

    Returns:
        np.ndarray: (num, H, W) float32 in [0, 1).
    """
    return np.random.default_rng(seed).random((num, *shape), dtype=np.float32)


def box_maps(bboxes: np.ndarray, shape: tuple) -> np.ndarray:
    """``box``: each detection's own box as its map (1 inside, 0 outside; pixel centres inside
    the box: :func:`~mmdet_cam_hook.cam.geometry.box_slices`).

    Returns:
        np.ndarray: (K, H, W) float32.
    """
    h, w = shape
    out = np.zeros((len(bboxes), h, w), np.float32)
    for k, box in enumerate(np.asarray(bboxes, np.float64).reshape(-1, 4)):
        out[k][box_slices(box, h, w)] = 1.0
    return out
