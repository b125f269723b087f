"""Candidates: every prior / RoI / query of one image *before* the score threshold and NMS.

A kept detection is one of the candidates that survived; the others are why an object was
missed. :class:`Candidates` holds, for every prior (dense heads), RoI (two-stage) or query
(DETR) of one image: its decoded box in original-image pixels, its per-class scores with the
adapter's own formula (the score a kept detection of that class would report), where it sits
(level, y, x, anchor; RoI or query index), and for each (candidate, class) pair whether it went
into NMS (it passed the pre-NMS score filter and the ``nms_pre`` top-k) and which kept detection
it became, if any. :meth:`DetectorAdapter.candidates
<mmdet_cam_hook.adapters.base.DetectorAdapter.candidates>` makes one; the engine's miss
explanation (:mod:`mmdet_cam_hook.cam.misses`) reads it.

Dense heads find which pairs went into NMS from the head's own decoding: the input of its
``_bbox_post_process`` (the candidates after ``filter_scores_and_topk``, with their
``prior_idx``) is recorded by :func:`record_post_process` while the adapter decodes.
"""
import contextlib
import copy
from dataclasses import dataclass
from typing import Iterator, List, Optional, Sequence, Tuple

import torch
from mmengine.structures import InstanceData
from torch import nn

from .base import Detections, DetectorAdapter, locate_priors

__all__ = ['Candidates', 'check_candidates', 'dense_candidates', 'flat_prior_index',
           'nms_threshold', 'pair_table', 'record_post_process', 'rescaled']


@dataclass
class Candidates:
    """Every candidate of one image before the score threshold and NMS (N candidates, C
    classes).

    Attributes:
        bboxes (torch.Tensor): (N, 4), or (N, C, 4) for heads that regress a box per class
            (two-stage), x1y1x2y2 in original-image pixels.
        scores (torch.Tensor): (N, C) the score a detection of each class at this candidate
            would report (the adapter's own formula: e.g. ``sigmoid(cls) * sigmoid(obj)``).
        entered (torch.Tensor): (N, C) bool, the pair went into NMS (it passed the pre-NMS
            score filter and the ``nms_pre`` top-k; DETR: the ``max_per_img`` top-k).
        kept (torch.Tensor): (N, C) int64, the index in :attr:`detections` of the kept
            detection this pair became, -1 for none.
        levels, ys, xs, anchors (torch.Tensor): (N,) where each candidate sits (as in
            :class:`~mmdet_cam_hook.adapters.base.Detections`).
        detections (Detections): The kept detections (what the engine explains).
        pre_thr (float): The pre-NMS score filter that was applied.
        index (torch.Tensor | None): (N,) RoI or query index; None for dense heads.
        rois (torch.Tensor | None): (N, S, 4) the RoIs each stage pooled from (two-stage).
        class_agnostic (bool): NMS compared boxes of all classes (not only of one class).
        nms_iou (float | None): NMS's IoU threshold (a box overlapping a higher-scoring kept
            one by more is suppressed); None without NMS (DETR).
    """

    bboxes: torch.Tensor
    scores: torch.Tensor
    entered: torch.Tensor
    kept: torch.Tensor
    levels: torch.Tensor
    ys: torch.Tensor
    xs: torch.Tensor
    anchors: torch.Tensor
    detections: Detections
    pre_thr: float
    index: Optional[torch.Tensor] = None
    rois: Optional[torch.Tensor] = None
    class_agnostic: bool = False
    nms_iou: Optional[float] = None

    def __len__(self) -> int:
        return len(self.scores)

    @property
    def num_classes(self) -> int:
        return int(self.scores.shape[1])

    def boxes(self, label: int) -> torch.Tensor:
        """(N, 4) every candidate's box for class ``label``."""
        return self.bboxes[:, label] if self.bboxes.dim() == 3 else self.bboxes

    def rows(self, rows: Sequence[int], labels: Sequence[int]) -> Detections:
        """The pairs ``(rows[i], labels[i])`` as detections (box, score, label, prior, RoI or
        query), so that the engine computes their maps like a kept detection's."""
        device = self.scores.device
        r = torch.as_tensor(list(rows), dtype=torch.long, device=device)
        c = torch.as_tensor(list(labels), dtype=torch.long, device=device)
        boxes = self.bboxes[r, c] if self.bboxes.dim() == 3 else self.bboxes[r]
        return Detections(boxes.reshape(-1, 4), self.scores[r, c], c, self.levels[r],
                          self.ys[r], self.xs[r], self.anchors[r],
                          index=None if self.index is None else self.index[r],
                          rois=None if self.rois is None else self.rois[r])


def pair_table(num: int, num_classes: int, rows: torch.Tensor, labels: torch.Tensor,
               values: Optional[torch.Tensor] = None, fill=-1) -> torch.Tensor:
    """(num, num_classes) table with ``values`` (default: True) at the pairs ``(rows,
    labels)`` and ``fill`` (default: -1; False when ``values`` is None) elsewhere."""
    device = rows.device
    if values is None:
        table = torch.zeros((num, num_classes), dtype=torch.bool, device=device)
        table[rows.long(), labels.long()] = True
        return table
    table = torch.full((num, num_classes), fill, dtype=values.dtype, device=device)
    table[rows.long(), labels.long()] = values
    return table


@contextlib.contextmanager
def record_post_process(head: nn.Module) -> Iterator[List[InstanceData]]:
    """Record the ``results`` each call of ``head._bbox_post_process`` receives (the
    candidates after the pre-NMS filter and top-k, with the adapter's ``prior_idx``), while the
    adapter decodes. The instance attribute that wraps the method is removed on exit."""
    seen: List[InstanceData] = []
    original = head._bbox_post_process

    def recording(results, *args, **kwargs):
        seen.append(InstanceData(prior_idx=results.prior_idx.clone(),
                                 labels=results.labels.clone()))
        return original(results, *args, **kwargs)

    head._bbox_post_process = recording
    try:
        yield seen
    finally:
        del head._bbox_post_process


def rescaled(head: nn.Module, bboxes: torch.Tensor, metainfo: dict) -> torch.Tensor:
    """Boxes on the network input mapped to original-image pixels by the head's own
    ``_bbox_post_process`` (rescale only: no score factors, size filter or NMS)."""
    cfg = copy.deepcopy(head.test_cfg)
    cfg.min_bbox_size = -1
    results = InstanceData(bboxes=bboxes.clone(), scores=bboxes.new_zeros(len(bboxes)),
                           labels=bboxes.new_zeros(len(bboxes), dtype=torch.long))
    return head._bbox_post_process(results, cfg, rescale=True, with_nms=False,
                                   img_meta=metainfo).bboxes


def flat_prior_index(dets: Detections, sizes: Sequence[Tuple[int, int]],
                     num_base_priors: int = 1) -> torch.Tensor:
    """The flat prior index over all levels of each detection (the inverse of
    :func:`~mmdet_cam_hook.adapters.base.locate_priors`)."""
    counts = [0] + [int(h) * int(w) * num_base_priors for h, w in sizes]
    starts = torch.tensor(counts, device=dets.levels.device).cumsum(0)
    widths = torch.tensor([int(w) for _, w in sizes], device=dets.levels.device)
    cell = dets.ys * widths[dets.levels] + dets.xs
    return starts[dets.levels] + cell * num_base_priors + dets.anchors


def dense_candidates(bboxes: torch.Tensor, scores: torch.Tensor, seen: List[InstanceData],
                     dets: Detections, sizes: Sequence[Tuple[int, int]], num_base_priors: int,
                     pre_thr: float, test_cfg) -> Candidates:
    """:class:`Candidates` of a dense head: one per prior (flat over all levels, mmdet's
    order), the pairs that went into NMS from the recorded post-process input ``seen``, less
    those the post-process's ``min_bbox_size`` filter drops.

    Args:
        bboxes (torch.Tensor): (N, 4) every prior's box in original-image pixels.
        scores (torch.Tensor): (N, C) every prior's per-class scores.
        seen (list[InstanceData]): What :func:`record_post_process` recorded (one call).
        dets (Detections): The kept detections.
        sizes (Sequence[tuple[int, int]]): (h, w) of each level's grid.
        num_base_priors (int): Priors per location.
        pre_thr (float): The pre-NMS score filter applied.
        test_cfg (dict): The head's ``test_cfg`` (its ``min_bbox_size`` and ``nms``).

    Returns:
        Candidates: The image's candidates.
    """
    num, num_classes = scores.shape
    device = scores.device
    rows = torch.arange(num, device=device)
    entered = torch.zeros((num, num_classes), dtype=torch.bool, device=device)
    for results in seen:
        entered |= pair_table(num, num_classes, results.prior_idx.to(device),
                              results.labels.to(device))
    min_size = test_cfg.get('min_bbox_size', -1)
    if min_size >= 0:
        wh = bboxes[:, 2:] - bboxes[:, :2]
        entered &= ((wh[:, 0] > min_size) & (wh[:, 1] > min_size))[:, None]
    prior = flat_prior_index(dets, sizes, num_base_priors)
    kept = pair_table(num, num_classes, prior, dets.labels,
                      torch.arange(len(dets), device=device))
    levels, ys, xs, anchors = locate_priors(rows, sizes, num_base_priors)
    nms = test_cfg.get('nms') or {}
    return Candidates(bboxes, scores, entered, kept, levels, ys, xs, anchors, dets,
                      float(pre_thr), class_agnostic=bool(nms.get('class_agnostic')),
                      nms_iou=nms_threshold(nms))


def nms_threshold(nms_cfg) -> Optional[float]:
    """The IoU threshold of an mmdet ``nms`` config (``iou_threshold``, or ``iou_thr`` in
    older configs); None without one."""
    value = (nms_cfg or {}).get('iou_threshold', (nms_cfg or {}).get('iou_thr'))
    return None if value is None else float(value)


#: What an adapter's ``candidates`` relies on: a subclass that changes any of these after the
#: class that wrote ``candidates`` decodes or scores differently, so its candidates are not
#: verified (each adapter lists its own, with a test against its head's decoding).
CANDIDATES_RELY_ON = ('decode', '_level_results', 'scores', '_read', '_prob', '_split',
                      'head_outputs', '_locate')


#: The methods that make an adapter's candidates: the class that last defines one of them is
#: the one whose decoding they were written (and tested) for.
CANDIDATE_PARTS = ('candidates', '_prior_boxes', '_prior_scores')


def check_candidates(adapter: DetectorAdapter) -> None:
    """Refuse, early, an adapter that cannot list its candidates (misses need them): one that
    has no ``candidates``, or inherits one written for a base class while changing how it
    decodes or scores (:data:`CANDIDATES_RELY_ON`).

    Raises:
        ValueError: Naming the adapter, its head and (for an inherited one) what it changes.
    """
    mro = type(adapter).__mro__
    owner = next(c for c in mro if any(part in c.__dict__ for part in CANDIDATE_PARTS))
    changed = sorted({name for c in mro[:mro.index(owner)] for name in CANDIDATES_RELY_ON
                      if name in c.__dict__})
    if owner is DetectorAdapter or changed:
        why = ('does not list them' if owner is DetectorAdapter else
               f'inherits them from {owner.__name__} but changes {changed}, so they are not '
               'verified for it')
        raise ValueError(f'`explain_misses` needs the candidates before NMS; '
                         f'{type(adapter).__name__} (head {type(adapter.head).__name__}) {why}; '
                         'set explain_misses=False')
