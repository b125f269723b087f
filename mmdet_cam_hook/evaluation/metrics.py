"""Localisation numbers for per-detection maps: energy in the own box, the pointing game (peak,
as a count or per detection, and energy-based) against ground truth, the share on *other*
objects, and blank maps.

A blank map (all zero: the layer has no gradient path to the detection) explains nothing and
points nowhere. The one rule, wherever a number below is reported (the hook's scalars and
``mmdet-cam-eval``'s table both come from :class:`MapScores`): a blank map is left out of
``energy_in_box``, ``pointing_game``, ``energy_pointing_game`` and ``off_target_share`` (it
scores NaN per detection, never 0, and is not counted as a miss) and is reported as its own
number, ``blank_share``; its deletion/insertion AUCs count (with the pixels in random order,
which is what a blank map is worth).

Which pixels lie inside a box is :func:`~mmdet_cam_hook.cam.geometry.box_slices` (pixel centres
inside the box), the one rule that renormalising, the ``box`` baseline and these numbers share.
"""
from __future__ import annotations

import math
from typing import Dict, List, Mapping, Optional, Sequence

import numpy as np

from ..cam.geometry import box_mask, match_to_ground_truth
from ..cam.geometry import check_boxes as _check_boxes


def _check_cams(cams) -> np.ndarray:
    cams = np.asarray(cams, dtype=np.float64)
    if cams.ndim != 3:
        raise ValueError(f'`cams` must have shape (K, H, W), got {cams.shape}')
    if np.isnan(cams).any() or (cams < 0).any():
        raise ValueError('`cams` must be non-negative and free of NaN (maps are in [0, 1])')
    return cams


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
            shares[k] = cam[box_mask(box, height, width)].sum() / total
    return shares


def _check_masks(cams, masks) -> tuple:
    cams = _check_cams(cams)
    masks = np.asarray(masks)
    if masks.shape != cams.shape:
        raise ValueError(f'`masks` must have the shape of `cams` {cams.shape}, got {masks.shape}')
    return cams, masks.astype(bool)


def energy_in_mask(cams, masks) -> np.ndarray:
    """Share of each map's energy that lies inside its own instance mask (the mask
    counterpart of :func:`energy_in_box`); a blank map explains nothing and scores NaN (left
    out of means, as :class:`MapScores` leaves blank maps out of its localisation numbers).

    Args:
        cams (array-like): ``(K, H, W)`` non-negative maps (``CAMResult.mask_cams`` or
            ``cams``).
        masks (array-like): ``(K, H, W)`` bool instance masks (``CAMResult.masks``).

    Returns:
        np.ndarray: ``(K,)`` float64 shares (NaN for a blank map).

    Raises:
        ValueError: If the shapes disagree or a map has negative or NaN values.
    """
    cams, masks = _check_masks(cams, masks)
    totals = cams.sum(axis=(1, 2), dtype=np.float64)
    inside = (cams * masks).sum(axis=(1, 2), dtype=np.float64)
    return np.divide(inside, totals, out=np.full_like(totals, np.nan), where=totals > 0)


def peak_in_mask(cams, masks) -> np.ndarray:
    """Pointing game in the mask, per instance: 1.0 when the peak of its map (the first
    maximum in row-major order, as :func:`peak_in_box` takes it) is a pixel of its own
    predicted mask, else 0.0; NaN for a blank map. The instance's own mask, as
    :func:`energy_in_mask` and :func:`energy_in_box` take their own region: no ground truth
    is read, so it needs no match.

    Args:
        cams (array-like): ``(K, H, W)`` non-negative maps.
        masks (array-like): ``(K, H, W)`` bool instance masks.

    Returns:
        np.ndarray: ``(K,)`` float64 in ``{0, 1}`` or NaN.

    Raises:
        ValueError: If the shapes disagree or a map has negative or NaN values.
    """
    cams, masks = _check_masks(cams, masks)
    if not cams.size:
        return np.full(len(cams), np.nan)
    flat = cams.reshape(len(cams), -1)
    peaks = flat.argmax(axis=1)
    hits = masks.reshape(len(masks), -1)[np.arange(len(cams)), peaks].astype(np.float64)
    return np.where(flat.max(axis=1) > 0, hits, np.nan)


def pointing_game(cams, bboxes, labels, gt_bboxes, gt_labels,
                  iou_thr: float = 0.5) -> tuple[int, int]:
    """Pointing game (Zhang et al., ECCV 2016) for per-detection maps against ground truth.

    Detections are taken in the given order, which must be by descending score (as in
    :class:`~mmdet_cam_hook.CAMResult`). Each is matched greedily to the unmatched ground-truth
    box of the same class with the highest IoU, if that IoU is at least ``iou_thr``; every GT box
    is matched at most once. A matched detection is a hit when the peak of its map (the first
    maximum in row-major order) lies inside its GT box. Unmatched detections and blank maps
    (they point nowhere: counted in ``blank_share``, see the module docstring) are not counted.
    Unlike the original, there is no pixel tolerance around the box.

    Args:
        cams (array-like): ``(K, H, W)`` non-negative maps, one per detection.
        bboxes (array-like): ``(K, 4)`` detection boxes ``x1, y1, x2, y2``.
        labels (array-like): ``(K,)`` detection class indices.
        gt_bboxes (array-like): ``(G, 4)`` ground-truth boxes.
        gt_labels (array-like): ``(G,)`` ground-truth class indices.
        iou_thr (float): Minimum IoU for a match, in ``(0, 1]``. Defaults to 0.5.

    Returns:
        tuple[int, int]: ``(hits, total)``, ``total`` being the number of matched detections
        with a non-blank map.

    Raises:
        ValueError: If the shapes disagree, a map has negative or NaN values, or ``iou_thr`` is
            outside ``(0, 1]``.
    """
    cams = _check_cams(cams)
    match = match_to_ground_truth(bboxes, labels, gt_bboxes, gt_labels, iou_thr)
    if len(cams) != len(match):
        raise ValueError(f'`cams`, `bboxes` and `labels` must have the same length, got '
                         f'{len(cams)}, {len(match)} and {len(np.asarray(labels).reshape(-1))}')
    points = peak_in_box(cams, match, gt_bboxes)
    counted = ~np.isnan(points)
    return int(points[counted].sum()), int(counted.sum())


def is_blank(cams) -> np.ndarray:
    """``(K,)`` bool: which maps are all zero.

    Args:
        cams (array-like): ``(K, H, W)`` non-negative maps.

    Returns:
        np.ndarray: ``(K,)`` bool.
    """
    cams = _check_cams(cams)
    return cams.reshape(len(cams), cams.shape[1] * cams.shape[2]).max(1, initial=0.0) <= 0


def peak_in_box(cams, match, gt_bboxes) -> np.ndarray:
    """Pointing game per detection (Zhang et al., ECCV 2016): 1.0 when the peak of the map (the
    first maximum in row-major order) lies inside the ground-truth box its detection matched,
    else 0.0; NaN for an unmatched detection (``match_k == -1``) and for a blank map, so that
    ``np.nanmean`` is the hit rate over the maps that point somewhere.

    Args:
        cams (array-like): ``(K, H, W)`` non-negative maps.
        match (array-like): ``(K,)`` ground-truth index per detection, -1 for none.
        gt_bboxes (array-like): ``(G, 4)`` ground-truth boxes in the maps' pixels.

    Returns:
        np.ndarray: ``(K,)`` float64 in ``{0, 1}`` or NaN.
    """
    cams, match, gt_bboxes = _check_matched(cams, match, gt_bboxes)
    width = cams.shape[2]
    out = np.full(len(cams), np.nan)
    for k, (cam, g) in enumerate(zip(cams, match)):
        if g < 0 or cam.max() <= 0:
            continue
        y, x = divmod(int(np.argmax(cam)), width)
        gx1, gy1, gx2, gy2 = gt_bboxes[g]
        out[k] = float(gx1 <= x + 0.5 <= gx2 and gy1 <= y + 0.5 <= gy2)
    return out


def energy_pointing_game(cams, match, gt_bboxes) -> np.ndarray:
    """Energy-based pointing game (Wang et al., Score-CAM, CVPRW 2020): the share of each map's
    energy inside the ground-truth box its detection matched.

    ``epg_k = sum(cam_k[inside gt_box[match_k]]) / sum(cam_k)``; NaN for a detection without
    a match (``match_k == -1``) and for a blank map.

    Args:
        cams (array-like): ``(K, H, W)`` non-negative maps.
        match (array-like): ``(K,)`` ground-truth index per detection, -1 for none (as
            :func:`match_to_ground_truth` returns).
        gt_bboxes (array-like): ``(G, 4)`` ground-truth boxes in the maps' pixels.

    Returns:
        np.ndarray: ``(K,)`` float64 in ``[0, 1]`` or NaN.
    """
    cams, match, gt_bboxes = _check_matched(cams, match, gt_bboxes)
    height, width = cams.shape[1:]
    out = np.full(len(cams), np.nan)
    for k, (cam, g) in enumerate(zip(cams, match)):
        total = cam.sum()
        if g >= 0 and total > 0:
            out[k] = cam[box_mask(gt_bboxes[g], height, width)].sum() / total
    return out


def off_target_share(cams, match, gt_bboxes) -> np.ndarray:
    """Share of each map's energy on *other* ground-truth objects (after ODAM's object
    discrimination index, Zhao et al., ICLR 2023): the energy in the union of all other
    ground-truth boxes, outside the detection's own matched box, over the map's total energy.

    An instance-level map scores near 0; a class-level map that also lights up the other
    objects scores high. NaN for an unmatched detection and for a blank map.

    Args:
        cams (array-like): ``(K, H, W)`` non-negative maps.
        match (array-like): ``(K,)`` ground-truth index per detection, -1 for none.
        gt_bboxes (array-like): ``(G, 4)`` ground-truth boxes in the maps' pixels.

    Returns:
        np.ndarray: ``(K,)`` float64 in ``[0, 1]`` or NaN.
    """
    cams, match, gt_bboxes = _check_matched(cams, match, gt_bboxes)
    height, width = cams.shape[1:]
    masks = [box_mask(b, height, width) for b in gt_bboxes]
    out = np.full(len(cams), np.nan)
    for k, (cam, g) in enumerate(zip(cams, match)):
        total = cam.sum()
        if g < 0 or total <= 0:
            continue
        others = np.zeros((height, width), dtype=bool)
        for j, mask in enumerate(masks):
            if j != g:
                others |= mask
        out[k] = cam[others & ~masks[g]].sum() / total
    return out


def _check_matched(cams, match, gt_bboxes):
    cams = _check_cams(cams)
    gt_bboxes = _check_boxes(gt_bboxes, 'gt_bboxes')
    match = np.asarray(match, dtype=np.int64).reshape(-1)
    if len(match) != len(cams):
        raise ValueError(f'`cams` and `match` must have the same length, got {len(cams)} and '
                         f'{len(match)}')
    if ((match < -1) | (match >= len(gt_bboxes))).any():
        raise ValueError(f'`match` holds indices outside [-1, {len(gt_bboxes) - 1}]: '
                         f'{sorted(set(match[(match < -1) | (match >= len(gt_bboxes))]))}')
    return cams, match, gt_bboxes


# ---------------------------------------------------------------------------------------------
# One accumulator for every report
#: Per-detection lists of :func:`detection_scores` (the keys of ``mmdet-cam-eval``'s records).
SCORE_KEYS = ('blank', 'matched', 'energy_in_box', 'pointing', 'epg', 'off_target')
#: The per-detection lists of a model with masks (:func:`mask_scores`): the class map and the
#: mask map (``CAMResult.mask_cams``, ``mask_`` keys) each in the instance's own mask.
MASK_KEYS = ('energy_in_mask', 'pointing_in_mask', 'mask_energy_in_mask', 'mask_pointing_in_mask')
#: The summary name of each of :data:`MASK_KEYS` (:meth:`MapScores.summary`).
MASK_NAMES = dict(energy_in_mask='energy_in_mask', pointing_in_mask='pointing_game_in_mask',
                  mask_energy_in_mask='mask_energy_in_mask',
                  mask_pointing_in_mask='mask_pointing_game_in_mask')


def mask_scores(cams, masks, mask_cams=None) -> Dict[str, list]:
    """The mask numbers of K instances, per instance: :func:`energy_in_mask` and
    :func:`peak_in_mask` of the class maps ``cams`` and, when given, of the mask maps
    ``mask_cams`` (``mask_`` keys), NaN for a blank map.

    Args:
        cams (array-like): ``(K, H, W)`` the class maps (``CAMResult.cams``).
        masks (array-like): ``(K, H, W)`` bool instance masks (``CAMResult.masks``).
        mask_cams (array-like, optional): ``(K, H, W)`` the mask maps
            (``CAMResult.mask_cams``). Defaults to None (no ``mask_`` keys).

    Returns:
        dict[str, list]: Lists of K floats under the keys of :data:`MASK_KEYS` (the first two
        only without ``mask_cams``).
    """
    out = dict(energy_in_mask=energy_in_mask(cams, masks).tolist(),
               pointing_in_mask=peak_in_mask(cams, masks).tolist())
    if mask_cams is not None:
        out.update(mask_energy_in_mask=energy_in_mask(mask_cams, masks).tolist(),
                   mask_pointing_in_mask=peak_in_mask(mask_cams, masks).tolist())
    return out


def detection_scores(cams, bboxes, match=None, gt_bboxes=None, masks=None,
                     mask_cams=None) -> Dict[str, list]:
    """The localisation numbers of K maps, per detection.

    Args:
        cams (array-like): ``(K, H, W)`` non-negative maps, one per detection.
        bboxes (array-like): ``(K, 4)`` detection boxes in the maps' pixels.
        match (array-like, optional): ``(K,)`` matched ground-truth index per detection, -1
            for none (:func:`match_to_ground_truth`). Defaults to None (no ground truth).
        gt_bboxes (array-like, optional): ``(G, 4)`` ground-truth boxes in the maps' pixels.
            Defaults to None (no ground truth).
        masks (array-like, optional): ``(K, H, W)`` bool instance masks of a model with masks:
            adds :func:`mask_scores`. Defaults to None.
        mask_cams (array-like, optional): ``(K, H, W)`` the instances' mask maps (with
            ``masks``). Defaults to None.

    Returns:
        dict[str, list]: For each key of :data:`SCORE_KEYS` a list of K values: ``blank`` and
        ``matched`` (bool), ``energy_in_box`` (NaN for a blank map), ``pointing``
        (:func:`peak_in_box`), ``epg`` (:func:`energy_pointing_game`) and ``off_target``
        (:func:`off_target_share`), NaN where undefined (no ground truth, no match, blank);
        with ``masks`` also those of :data:`MASK_KEYS` (:func:`mask_scores`).
    """
    cams = _check_cams(cams)
    extra = {} if masks is None else mask_scores(cams, masks, mask_cams)
    if len(cams) == 0:
        return {key: [] for key in (*SCORE_KEYS, *extra)}
    blank = is_blank(cams)
    energy = np.where(blank, np.nan, energy_in_box(cams, bboxes))
    if match is None or gt_bboxes is None:
        none = [math.nan] * len(cams)
        return dict(blank=blank.tolist(), matched=[False] * len(cams),
                    energy_in_box=energy.tolist(), pointing=none, epg=none, off_target=none,
                    **extra)
    match = np.asarray(match, np.int64).reshape(-1)
    return dict(blank=blank.tolist(), matched=(match >= 0).tolist(),
                energy_in_box=energy.tolist(),
                pointing=peak_in_box(cams, match, gt_bboxes).tolist(),
                epg=energy_pointing_game(cams, match, gt_bboxes).tolist(),
                off_target=off_target_share(cams, match, gt_bboxes).tolist(), **extra)


def _finite_mean(values: Sequence[float]) -> Optional[float]:
    finite = [v for v in values if v is not None and not math.isnan(v)]
    return float(np.mean(finite)) if finite else None


class MapScores:
    """Accumulates the per-detection numbers of many images' maps and summarises them: the one
    definition behind the hook's scalars and ``mmdet-cam-eval``'s table (torchcam's
    ``update`` / ``summary`` pattern).

    Every number is a mean over detections (not over images), with blank maps left out of the
    localisation numbers and reported as ``blank_share`` (see the module docstring):

    - ``energy_in_box``: mean share of a map's energy in its own detection box;
    - ``pointing_game``: share of the detections matched to ground truth (IoU >= 0.5, same
      class) with a non-blank map whose peak lies in the matched box;
    - ``energy_pointing_game``: mean share of the map's energy in that box;
    - ``off_target_share``: mean share of the map's energy on the other ground-truth objects;
    - ``blank_share``: share of all detections whose map is all zero;
    - for a model with masks (``update(masks=...)``): ``energy_in_mask`` and
      ``pointing_game_in_mask`` (share of the maps whose peak is in the instance's own
      predicted mask) of the class maps, and ``mask_energy_in_mask`` and
      ``mask_pointing_game_in_mask`` of the mask maps (``mask_cams``), blank maps left out;
    - each AUC passed to :meth:`update` (e.g. ``deletion_auc_prior``): its mean.

    Example:
        >>> scores = MapScores()
        >>> scores.update(result.cams, result.bboxes, result.labels, gt_bboxes, gt_labels)
        >>> scores.summary()  # {'energy_in_box': 0.61, 'pointing_game': 0.5, ...}

    Attributes:
        num_detections (int): Detections seen.
        num_matched (int): Detections matched to ground truth.
    """

    def __init__(self) -> None:
        self._values: Dict[str, List[float]] = {key: [] for key in (*SCORE_KEYS, *MASK_KEYS)}
        self._aucs: Dict[str, List[float]] = {}

    @property
    def num_detections(self) -> int:
        return len(self._values['blank'])

    @property
    def num_matched(self) -> int:
        return int(sum(self._values['matched']))

    def update(self, cams, bboxes, labels=None, gt_bboxes=None, gt_labels=None,
               aucs: Optional[Mapping[str, Sequence[float]]] = None, masks=None,
               mask_cams=None) -> Dict[str, list]:
        """Score one image's maps and add them.

        Args:
            cams (array-like): ``(K, H, W)`` non-negative maps, one per detection, in
                descending score order.
            bboxes (array-like): ``(K, 4)`` detection boxes in the maps' pixels.
            labels (array-like, optional): ``(K,)`` detection classes (needed with ground
                truth). Defaults to None.
            gt_bboxes (array-like, optional): ``(G, 4)`` ground truth in the maps' pixels; None
                when the image has none (then only ``energy_in_box`` and ``blank_share``).
                Defaults to None.
            gt_labels (array-like, optional): ``(G,)`` their classes. Defaults to None.
            aucs (Mapping[str, Sequence[float]], optional): Per-detection curve numbers by name,
                K values each. Defaults to None.
            masks (array-like, optional): ``(K, H, W)`` bool instance masks (a model with
                masks: the mask numbers). Defaults to None.
            mask_cams (array-like, optional): ``(K, H, W)`` their mask maps. Defaults to None.

        Returns:
            dict[str, list]: The image's :func:`detection_scores`.

        Raises:
            ValueError: On shapes that disagree or maps with negative or NaN values.
        """
        match = None
        if gt_bboxes is not None and gt_labels is not None:
            match = match_to_ground_truth(bboxes, labels, gt_bboxes, gt_labels)
        scores = detection_scores(cams, bboxes, match, gt_bboxes, masks, mask_cams)
        self.add(scores, aucs)
        return scores

    def add(self, scores: Mapping[str, Sequence], aucs: Optional[Mapping[str, Sequence[float]]]
            = None) -> None:
        """Add numbers already scored: one image's :func:`detection_scores` (as
        ``mmdet-cam-eval``'s records hold them, e.g. gathered from other processes).

        Args:
            scores (Mapping[str, Sequence]): Per-detection lists, the keys of
                :data:`SCORE_KEYS` and any of :data:`MASK_KEYS`, K values each.
            aucs (Mapping[str, Sequence[float]], optional): Per-detection curve numbers by
                name, K values each. Defaults to None.

        Raises:
            ValueError: If a list does not hold K values.
        """
        count = len(scores['blank'])
        keys = [*SCORE_KEYS, *(k for k in MASK_KEYS if scores.get(k) is not None)]
        for name, values in [*((k, scores[k]) for k in keys), *(aucs or {}).items()]:
            if len(values) != count:
                raise ValueError(f'`{name}` holds {len(values)} values for {count} detections')
        for key in keys:
            self._values[key].extend(scores[key])
        for name, values in (aucs or {}).items():
            self._aucs.setdefault(name, []).extend(float(v) for v in values)

    def summary(self) -> Dict[str, float]:
        """The numbers that have data (see the class docstring).

        Returns:
            dict[str, float]: ``{name: value}``; a number without data (no detection, no match,
            every map blank) is left out, never reported as 0.
        """
        values = self._values
        out = dict(energy_in_box=_finite_mean(values['energy_in_box']),
                   pointing_game=_finite_mean(values['pointing']),
                   energy_pointing_game=_finite_mean(values['epg']),
                   off_target_share=_finite_mean(values['off_target']),
                   blank_share=float(np.mean(values['blank'])) if values['blank'] else None,
                   **{name: _finite_mean(values[key]) for key, name in MASK_NAMES.items()})
        out.update({name: _finite_mean(v) for name, v in self._aucs.items()})
        return {name: value for name, value in out.items() if value is not None}
