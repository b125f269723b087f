"""CAM-quality numbers: how much of a detection's map lies in its box, and the pointing game.

Pixel convention (the same as :mod:`mmdet_cam_hook.render`): pixel ``(row y, column x)`` covers
``[x, x + 1) x [y, y + 1)``; it is inside a box ``x1, y1, x2, y2`` when its centre
``(x + 0.5, y + 0.5)`` is, i.e. ``x1 <= x + 0.5 <= x2`` and ``y1 <= y + 0.5 <= y2``. For integer
boxes that is the slice ``cam[y1:y2, x1:x2]``.
"""
from __future__ import annotations

import numbers

import numpy as np


def _check_cams(cams) -> np.ndarray:
    cams = np.asarray(cams, dtype=np.float64)
    if cams.ndim != 3:
        raise ValueError(f'`cams` must have shape (K, H, W), got {cams.shape}')
    if np.isnan(cams).any() or (cams < 0).any():
        raise ValueError('`cams` must be non-negative and free of NaN (maps are in [0, 1])')
    return cams


def _check_boxes(bboxes, arg: str) -> np.ndarray:
    bboxes = np.asarray(bboxes, dtype=np.float64)
    if bboxes.size == 0:
        return bboxes.reshape(0, 4)
    if bboxes.ndim != 2 or bboxes.shape[1] != 4:
        raise ValueError(f'`{arg}` must have shape (K, 4) (x1, y1, x2, y2), got {bboxes.shape}')
    return bboxes


def _box_mask(box: np.ndarray, height: int, width: int) -> np.ndarray:
    xs = np.arange(width) + 0.5
    ys = np.arange(height) + 0.5
    inside_x = (xs >= box[0]) & (xs <= box[2])
    inside_y = (ys >= box[1]) & (ys <= box[3])
    return inside_y[:, None] & inside_x[None, :]


def energy_in_box(cams, bboxes) -> np.ndarray:
    """Share of each map's energy that lies inside its own box.

    ``energy_k = sum(cam_k[pixels inside box_k]) / sum(cam_k)``, in ``[0, 1]``; a blank map
    (sum 0) explains nothing and scores 0.

    Args:
        cams (array-like): ``(K, H, W)`` non-negative maps, one per detection.
        bboxes (array-like): ``(K, 4)`` boxes ``x1, y1, x2, y2`` in the maps' pixels.

    Returns:
        np.ndarray: ``(K,)`` float64 shares.

    Raises:
        ValueError: If the shapes disagree or a map has negative or NaN values.
    """
    cams = _check_cams(cams)
    bboxes = _check_boxes(bboxes, 'bboxes')
    if len(cams) != len(bboxes):
        raise ValueError(f'`cams` and `bboxes` must have the same length, got {len(cams)} and '
                         f'{len(bboxes)}')
    height, width = cams.shape[1:]
    shares = np.zeros(len(cams), dtype=np.float64)
    for k, (cam, box) in enumerate(zip(cams, bboxes)):
        total = cam.sum()
        if total > 0:
            shares[k] = cam[_box_mask(box, height, width)].sum() / total
    return shares


def _iou(box: np.ndarray, others: np.ndarray) -> np.ndarray:
    x1 = np.maximum(box[0], others[:, 0])
    y1 = np.maximum(box[1], others[:, 1])
    x2 = np.minimum(box[2], others[:, 2])
    y2 = np.minimum(box[3], others[:, 3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    area = (box[2] - box[0]) * (box[3] - box[1])
    areas = (others[:, 2] - others[:, 0]) * (others[:, 3] - others[:, 1])
    union = area + areas - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def pointing_game(cams, bboxes, labels, gt_bboxes, gt_labels,
                  iou_thr: float = 0.5) -> tuple[int, int]:
    """Pointing game (Zhang et al., ECCV 2016) for per-detection maps against ground truth.

    Detections are taken in the given order, which must be by descending score (as in
    :class:`~mmdet_cam_hook.CAMResult`). Each is matched greedily to the unmatched ground-truth
    box of the same class with the highest IoU, if that IoU is at least ``iou_thr``; every GT box
    is matched at most once. A matched detection is a hit when the peak of its map (the first
    maximum in row-major order) lies inside its GT box; a blank map is a miss. Unmatched
    detections are not counted. Unlike the original, there is no pixel tolerance around the box.

    Args:
        cams (array-like): ``(K, H, W)`` non-negative maps, one per detection.
        bboxes (array-like): ``(K, 4)`` detection boxes ``x1, y1, x2, y2``.
        labels (array-like): ``(K,)`` detection class indices.
        gt_bboxes (array-like): ``(G, 4)`` ground-truth boxes.
        gt_labels (array-like): ``(G,)`` ground-truth class indices.
        iou_thr (float): Minimum IoU for a match, in ``(0, 1]``. Defaults to 0.5.

    Returns:
        tuple[int, int]: ``(hits, total)``, ``total`` being the number of matched detections.

    Raises:
        ValueError: If the shapes disagree, a map has negative or NaN values, or ``iou_thr`` is
            outside ``(0, 1]``.
    """
    if isinstance(iou_thr, bool) or not isinstance(iou_thr, numbers.Real) \
            or not 0 < iou_thr <= 1:
        raise ValueError(f'`iou_thr` must be a number in (0, 1], got {iou_thr!r}')
    cams = _check_cams(cams)
    bboxes = _check_boxes(bboxes, 'bboxes')
    gt_bboxes = _check_boxes(gt_bboxes, 'gt_bboxes')
    labels = np.asarray(labels).reshape(-1)
    gt_labels = np.asarray(gt_labels).reshape(-1)
    if not len(cams) == len(bboxes) == len(labels):
        raise ValueError(f'`cams`, `bboxes` and `labels` must have the same length, got '
                         f'{len(cams)}, {len(bboxes)} and {len(labels)}')
    if len(gt_bboxes) != len(gt_labels):
        raise ValueError(f'`gt_bboxes` and `gt_labels` must have the same length, got '
                         f'{len(gt_bboxes)} and {len(gt_labels)}')
    width = cams.shape[2]
    taken = np.zeros(len(gt_bboxes), dtype=bool)
    hits = total = 0
    for cam, box, label in zip(cams, bboxes, labels):
        candidates = ~taken & (gt_labels == label)
        if not candidates.any():
            continue
        ious = np.where(candidates, _iou(box, gt_bboxes), -1.0)
        best = int(np.argmax(ious))
        if ious[best] < iou_thr:
            continue
        taken[best] = True
        total += 1
        if cam.max() <= 0:
            continue
        y, x = divmod(int(np.argmax(cam)), width)
        gx1, gy1, gx2, gy2 = gt_bboxes[best]
        if gx1 <= x + 0.5 <= gx2 and gy1 <= y + 0.5 <= gy2:
            hits += 1
    return hits, total
