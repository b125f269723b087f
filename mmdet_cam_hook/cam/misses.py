"""Why was it missed: misses and false positives of one image, explained by the candidates.

Given the kept detections, the candidates before the threshold and NMS
(:class:`~mmdet_cam_hook.adapters.candidates.Candidates`) and the ground truth:

- a kept detection that matches no ground-truth box (same class, IoU >= ``match_iou``, greedy in
  score order: :func:`~.geometry.match_to_ground_truth`) is a **false positive**;
- a ground-truth box no kept detection matched is a **miss**, explained by its *best
  candidate*. If a kept detection of another class covers it (IoU >= ``miss_iou``), the reason
  is ``wrong_class`` ("seen as class B, 0.61") and that detection is the candidate. Otherwise
  the best candidate is the dropped (not kept) pair of the GT's class whose box overlaps the GT
  at IoU >= ``miss_iou`` with the highest score (equal scores: the larger IoU), and the reason
  is the first that applies:
  ``below_threshold`` (its score is under the engine's ``score_thr``), ``topk`` (it did not go
  into NMS: cut by the pre-NMS top-k ``nms_pre``, or by DETR's ``max_per_img``), ``suppressed``
  (NMS removed it: ``suppressed_by`` is the kept detection of its class, or of any class under
  class-agnostic NMS, whose box overlaps it most) or, when it went into NMS and no kept
  detection overlaps it, ``topk`` again (the ``max_per_img`` cap or the engine's ``topk``). A
  GT with no overlapping candidate of its class but one of another class (heads that regress a
  box per class) is ``wrong_class`` with that candidate; with none at all, ``no_candidate``.

The candidate of each miss becomes one more row of the engine's map computation, so its maps
come from the same forward pass as the detections' (every route and method).
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass, field, fields
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch

from ..adapters import Detections
from ..adapters.candidates import Candidates
from .geometry import box_iou, check_boxes, match_to_ground_truth
from .result import CAMResult, renormalize_in_boxes

__all__ = ['REASONS', 'Miss', 'MissReport', 'attach_misses', 'cat_detections', 'check_miss_iou',
           'explain_misses']

#: Why a ground-truth box was missed, in the order they are checked (see the module docstring).
REASONS = ('wrong_class', 'below_threshold', 'topk', 'suppressed', 'no_candidate')


@dataclass
class Miss:
    """One ground-truth box that no kept detection matched, and its best candidate.

    Attributes:
        gt_index (int): Index of the box in the ground truth given.
        gt_box (np.ndarray): (4,) x1, y1, x2, y2 in original-image pixels.
        gt_label (int): Its class.
        reason (str): One of :data:`REASONS`.
        candidate_box (np.ndarray | None): (4,) the candidate's box, original-image pixels;
            None for ``no_candidate``.
        candidate_label (int | None): The candidate's class (the GT's, except for
            ``wrong_class``).
        candidate_score (float | None): The candidate's score (the adapter's formula, the score
            a kept detection there would have reported).
        suppressed_by (int | None): For ``suppressed``: index of the kept detection whose box
            overlaps the candidate most (the one NMS kept in its place).
        score_thr (float): The engine's score threshold (for the caption).
        candidate (int | None): The candidate's prior, RoI or query row in the
            :class:`Candidates`.
        cams (dict[str, np.ndarray]): The candidate's map per method, (H, W) float32 on the
            returned image (like a detection's); empty for ``no_candidate``.
    """

    gt_index: int
    gt_box: np.ndarray
    gt_label: int
    reason: str
    candidate_box: Optional[np.ndarray] = None
    candidate_label: Optional[int] = None
    candidate_score: Optional[float] = None
    suppressed_by: Optional[int] = None
    score_thr: float = 0.0
    candidate: Optional[int] = None
    cams: Dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    def caption(self, class_names: Optional[Sequence[str]] = None) -> str:
        """A short label for a panel: ``missed: 0.12 < 0.30``, ``suppressed by #2: 0.45``,
        ``top-k cut: 0.45``, ``seen as dog: 0.61``, ``no candidate``."""

        def name(label):
            if class_names is not None and 0 <= label < len(class_names):
                return str(class_names[label])
            return str(label)

        score = self.candidate_score
        if self.reason == 'below_threshold':
            return f'missed: {score:.2f} < {self.score_thr:.2f}'
        if self.reason == 'suppressed':
            return f'suppressed by #{self.suppressed_by}: {score:.2f}'
        if self.reason == 'topk':
            return f'top-k cut: {score:.2f}'
        if self.reason == 'wrong_class':
            return f'seen as {name(self.candidate_label)}: {score:.2f}'
        return 'no candidate'

    def to_dict(self) -> dict:
        """The record without its maps, JSON-ready (lists, ints, floats, None)."""

        def box(b):
            return None if b is None else [float(v) for v in b]

        return dict(gt_index=int(self.gt_index), gt_box=box(self.gt_box),
                    gt_label=int(self.gt_label), reason=self.reason,
                    candidate_box=box(self.candidate_box),
                    candidate_label=None if self.candidate_label is None
                    else int(self.candidate_label),
                    candidate_score=None if self.candidate_score is None
                    else float(self.candidate_score),
                    suppressed_by=None if self.suppressed_by is None
                    else int(self.suppressed_by))


@dataclass
class MissReport:
    """:func:`explain_misses`' answer for one image.

    Attributes:
        misses (list[Miss]): One per unmatched ground-truth box, in ground-truth order.
        false_positive (np.ndarray): (K,) bool, per kept detection: it matches no GT.
        match (np.ndarray): (K,) int64, the GT each kept detection matched, -1 for none.
        rows (Detections): The misses' candidates as detections (one row per miss that has
            a candidate, in order), for the engine's map computation.
        with_row (list[int]): Indices in :attr:`misses` of the misses that have a row.
    """

    misses: List[Miss]
    false_positive: np.ndarray
    match: np.ndarray
    rows: Detections
    with_row: List[int]


def check_miss_iou(value, name: str = 'miss_iou') -> float:
    """``value`` as a float in (0, 1]; ValueError / TypeError naming ``name`` otherwise."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f'`{name}` must be a number in (0, 1], got {value!r}')
    if not 0 < float(value) <= 1:
        raise ValueError(f'`{name}` must be a number in (0, 1], got {value!r}')
    return float(value)


def explain_misses(cands: Candidates, gt_bboxes, gt_labels, score_thr: float,
                   miss_iou: float = 0.5, match_iou: float = 0.5) -> MissReport:
    """Misses and false positives of one image (see the module docstring for the rules).

    Args:
        cands (Candidates): The image's candidates, with its kept detections.
        gt_bboxes (array-like): (G, 4) ground-truth boxes, original-image pixels.
        gt_labels (array-like): (G,) their classes.
        score_thr (float): The engine's score threshold.
        miss_iou (float): Minimum IoU between a candidate's box and the GT. Defaults to 0.5.
        match_iou (float): Minimum IoU of a kept detection matching a GT. Defaults to 0.5.

    Returns:
        MissReport: The misses, the false-positive flags and the candidates to map.

    Raises:
        ValueError: On ground truth of the wrong shape or a bad ``miss_iou``.
    """
    miss_iou = check_miss_iou(miss_iou)
    gt_bboxes = check_boxes(gt_bboxes, 'gt_bboxes')
    gt_labels = np.asarray(gt_labels, dtype=np.int64).reshape(-1)
    dets = cands.detections
    det_boxes = dets.bboxes.detach().cpu().numpy().astype(np.float64)
    det_labels = dets.labels.cpu().numpy()
    match = match_to_ground_truth(det_boxes, det_labels, gt_bboxes, gt_labels, match_iou)
    matched = set(match[match >= 0].tolist())
    misses, rows, labels = [], [], []
    scores = cands.scores.detach().cpu().numpy()
    kept = cands.kept.cpu().numpy()
    for g, (gt_box, gt_label) in enumerate(zip(gt_bboxes, gt_labels)):
        if g in matched:
            continue
        miss = _explain_one(cands, scores, kept, det_boxes, det_labels, gt_box, int(gt_label),
                            miss_iou, score_thr)
        miss.gt_index, miss.score_thr = g, float(score_thr)
        if miss.candidate is not None:
            rows.append(miss.candidate)
            labels.append(miss.candidate_label)
        misses.append(miss)
    with_row = [i for i, m in enumerate(misses) if m.candidate is not None]
    return MissReport(misses, match < 0, match, cands.rows(rows, labels), with_row)


def _explain_one(cands: Candidates, scores: np.ndarray, kept: np.ndarray,
                 det_boxes: np.ndarray, det_labels: np.ndarray, gt_box: np.ndarray,
                 gt_label: int, miss_iou: float, score_thr: float) -> Miss:
    """One unmatched GT's record (``gt_index`` and ``score_thr`` set by the caller)."""
    miss = Miss(-1, gt_box.astype(np.float64), gt_label, 'no_candidate')
    other = np.flatnonzero((det_labels != gt_label)
                           & (box_iou(gt_box, det_boxes) >= miss_iou)) if len(det_boxes) else []
    if len(other):  # a kept detection of another class covers it
        k = int(other[0])  # detections are sorted by score
        row, label = np.argwhere(kept == k)[0]
        return _with_candidate(miss, cands, scores, int(row), int(label), 'wrong_class')
    row = _best(cands, scores, kept, gt_box, [gt_label], miss_iou)
    if row is None:  # heads with a box per class: another class's candidate may cover it
        others = [c for c in range(cands.num_classes) if c != gt_label]
        best = _best(cands, scores, kept, gt_box, others, miss_iou)
        return miss if best is None else _with_candidate(miss, cands, scores, *best,
                                                         'wrong_class')
    row, label = row
    score = float(scores[row, label])
    if score < score_thr:
        return _with_candidate(miss, cands, scores, row, label, 'below_threshold')
    if not bool(cands.entered[row, label]):
        return _with_candidate(miss, cands, scores, row, label, 'topk')
    suppressor = _suppressor(cands, det_boxes, det_labels, row, label, score)
    if suppressor is not None:
        miss = _with_candidate(miss, cands, scores, row, label, 'suppressed')
        miss.suppressed_by = suppressor
        return miss
    return _with_candidate(miss, cands, scores, row, label, 'topk')


def _suppressor(cands: Candidates, det_boxes: np.ndarray, det_labels: np.ndarray, row: int,
                label: int, score: float) -> Optional[int]:
    """The kept detection that suppressed the pair ``(row, label)`` in greedy NMS: the first
    (highest-scoring) kept detection of its class (any class under class-agnostic NMS)
    scoring at least as high whose box overlaps it by more than NMS's threshold (by any amount
    when the threshold is unknown); None if there is none."""
    if not len(det_boxes):
        return None
    box = cands.boxes(label)[row].detach().cpu().numpy().astype(np.float64)
    det_scores = cands.detections.scores.detach().cpu().numpy()
    same = np.ones(len(det_labels), dtype=bool) if cands.class_agnostic \
        else det_labels == label
    thr = 0.0 if cands.nms_iou is None else cands.nms_iou
    hits = np.flatnonzero(same & (det_scores >= score) & (box_iou(box, det_boxes) > thr))
    return int(hits[0]) if len(hits) else None


def _best(cands: Candidates, scores: np.ndarray, kept: np.ndarray, gt_box: np.ndarray,
          labels: Sequence[int], miss_iou: float):
    """``(row, label)`` of the highest-scoring dropped pair of one of ``labels`` whose box
    overlaps ``gt_box`` at IoU >= ``miss_iou`` (equal scores: the larger IoU, then the first
    row); None if there is none."""
    best, best_key = None, None
    for label in labels:
        boxes = cands.boxes(label).detach().cpu().numpy().astype(np.float64)
        ious = box_iou(gt_box, boxes)
        ok = np.flatnonzero((ious >= miss_iou) & (kept[:, label] < 0))
        if len(ok):
            row = int(ok[np.lexsort((-ious[ok], -scores[ok, label]))[0]])
            key = (scores[row, label], ious[row])
            if best is None or key > best_key:
                best, best_key = (row, int(label)), key
    return best


def _with_candidate(miss: Miss, cands: Candidates, scores: np.ndarray, row: int, label: int,
                    reason: str) -> Miss:
    miss.reason, miss.candidate, miss.candidate_label = reason, row, label
    miss.candidate_score = float(scores[row, label])
    miss.candidate_box = cands.boxes(label)[row].detach().cpu().numpy().astype(np.float64)
    return miss


def cat_detections(first: Detections, second: Detections) -> Detections:
    """The rows of ``first`` then ``second`` (fields None in either are None)."""
    out = []
    for f in fields(Detections):
        a, b = getattr(first, f.name), getattr(second, f.name)
        out.append(None if a is None or b is None else torch.cat([a, b.to(a.device)]))
    return Detections(*out)


def attach_misses(results: Dict[str, CAMResult], report: MissReport,
                  maps: Dict[str, np.ndarray], scale: float, renormalize: bool) -> None:
    """Give each method's result the misses (one list of records, shared) and the
    false-positive flags; ``maps[method]`` holds the (R, H, W) maps of ``report.rows``, which
    become each record's ``cams[method]`` (renormalised inside the candidate's box, shown at
    ``scale``, with ``renormalize``)."""
    boxes = np.array([report.misses[i].candidate_box for i in report.with_row],
                     dtype=np.float32).reshape(-1, 4) * np.float32(scale)
    for method, cams in maps.items():
        if renormalize and len(cams):
            cams = renormalize_in_boxes(cams, boxes)
        for j, i in enumerate(report.with_row):
            report.misses[i].cams[method] = cams[j]
    for res in results.values():
        res.misses = report.misses
        res.false_positive = report.false_positive


def ground_truth_args(gt_bboxes, gt_labels, miss_iou) -> Optional[tuple]:
    """``explain``'s ground-truth arguments checked: ``(boxes, labels, miss_iou)``, or None
    without ground truth.

    Raises:
        ValueError: If only one of them is given, their lengths differ, the boxes are not
            (G, 4) or ``miss_iou`` is not in (0, 1].
    """
    if gt_bboxes is None and gt_labels is None:
        return None
    if gt_bboxes is None or gt_labels is None:
        raise ValueError('`gt_bboxes` and `gt_labels` go together: pass both or neither')
    boxes = check_boxes(gt_bboxes, 'gt_bboxes')
    labels = np.asarray(gt_labels).reshape(-1)
    if len(labels) != len(boxes):
        raise ValueError(f'`gt_bboxes` and `gt_labels` must have the same length, got '
                         f'{len(boxes)} and {len(labels)}')
    return boxes, labels.astype(np.int64), check_miss_iou(miss_iou)


def results_with_misses(methods: Sequence[tuple], shown: np.ndarray, scale: float,
                        rows: Detections, maps: dict, used: List[List[str]], letterbox,
                        renormalize: bool, report: MissReport, num: int,
                        extra: Optional[Callable[[str], dict]] = None) -> Dict[str, CAMResult]:
    """The engine's results of the first ``num`` rows (the detections), with the misses'
    candidates (the other rows) attached as records (:func:`attach_misses`).

    Args:
        methods (Sequence[tuple]): ``(name, has_layers)`` per method.
        shown, scale, letterbox, renormalize: As for ``CAMResult.from_tensors``.
        rows (Detections): The detections, then the misses' candidates.
        maps (dict): Per method, ``(maps on the image, maps on the input or None)`` of the rows.
        used (list[list[str]]): Each row's layers.
        report (MissReport): The misses.
        num (int): How many rows are detections.
        extra (Callable[[str], dict], optional): More ``CAMResult.from_tensors`` keywords per
            method name (the contrast's labels, the masks and mask maps of the detections).
    """
    dets = rows.select(slice(0, num))
    results = {
        name: CAMResult.from_tensors(
            name, shown, scale, dets, maps[name][0][:num],
            None if maps[name][1] is None else maps[name][1][:num],
            (used if layered else [[] for _ in used])[:num], letterbox, renormalize,
            **(extra(name) if extra is not None else {}))
        for name, layered in methods
    }
    attach_misses(results, report, {name: maps[name][0][num:].cpu().numpy()
                                    for name, _ in methods}, scale, renormalize)
    return results
