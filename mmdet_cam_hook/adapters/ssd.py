"""SSD (``SSDHead``, ``PISASSDHead``; SSDLite's depthwise head too): softmax classification
over ``C + 1`` logits (the last is background), a different number of anchors on each level,
one conv branch per level, decoded by ``BaseDenseHead._predict_by_feat_single``.

mmdet 3.3's own ``SSDHead.predict`` fails (``_predict_by_feat_single`` reads
``self.loss_cls``, which ``SSDHead`` never builds: it computes its loss inline); the decoding
here is that method's with the softmax branch it would take (``use_sigmoid_cls`` is False),
so a model that mmdet cannot run is still explained.
"""
from typing import List, Optional, Sequence, Tuple

import torch
from mmengine.structures import InstanceData
from torch import nn

from .base import ADAPTERS, Detections
from .dense import DenseAdapter


def locate_priors_per_level(prior_idx: torch.Tensor, sizes: Sequence[Tuple[int, int]],
                            anchors: Sequence[int]) -> Tuple[torch.Tensor, ...]:
    """:func:`~.base.locate_priors` with ``anchors[l]`` priors per location on level ``l``.

    Args:
        prior_idx (torch.Tensor): (K,) int64 flat indices over all levels.
        sizes (Sequence[tuple[int, int]]): (h, w) of each level's grid.
        anchors (Sequence[int]): Priors per location of each level.

    Returns:
        tuple[torch.Tensor, ...]: ``levels, ys, xs, anchors``, each (K,) int64.
    """
    device = prior_idx.device
    counts = torch.tensor([0] + [int(h) * int(w) * int(a) for (h, w), a in zip(sizes, anchors)],
                          device=device)
    starts = counts.cumsum(0)
    levels = torch.bucketize(prior_idx, starts[1:], right=True)
    local = prior_idx - starts[levels]
    per = torch.tensor([int(a) for a in anchors], device=device)[levels]
    widths = torch.tensor([int(w) for _, w in sizes], device=device)[levels]
    cell = local // per
    return levels, cell // widths, cell % widths, local % per


@ADAPTERS.register_module()
class SSDAdapter(DenseAdapter):
    """``SSDHead`` and ``PISASSDHead`` (same forward and decoding; PISA changes the loss).

    Score of the detection with label ``c`` at prior ``(l, y, x, a)``::

        softmax(cls_scores[l][0, a*(C+1) : (a+1)*(C+1), y, x])[c]

    Each level has its own class branch (``cls_convs[l]``: a 3x3 conv; SSDLite: a depthwise
    3x3 with BatchNorm and ReLU6, then a 1x1): with BatchNorm in eval mode the window is exact
    (3x3, radius 1).
    """

    head_types = ('SSDHead', 'PISASSDHead')
    family = 'SSD'
    detectors = 'SSD, SSDLite, PISA SSD'
    doc_score = 'softmax(cls[a])[c] over C + 1 (background last)'
    doc_layers = 'the neck\'s level outputs (SSD300: 6 levels, strides 8-300)'
    doc_route = 'local, 3x3 window (radius 1); a level feeding the next: chain'

    @property
    def num_base_priors(self) -> int:
        """The largest number of priors per location (SSD's levels differ: 4 or 6)."""
        return int(max(self.head.prior_generator.num_base_priors))

    def _locate(self, results: InstanceData, score_thr: float,
                sizes: Sequence[Tuple[int, int]]) -> Detections:
        results = results[results.scores >= score_thr]
        results = results[results.scores.argsort(descending=True, stable=True)]
        levels, ys, xs, anchors = locate_priors_per_level(
            results.prior_idx.long(), sizes, self.head.prior_generator.num_base_priors)
        return Detections(results.bboxes, results.scores, results.labels, levels, ys, xs,
                          anchors)

    def level_roots(self, level: int) -> List[str]:
        return super().level_roots(level) + [f'bbox_head.cls_convs.{level}',
                                             f'bbox_head.reg_convs.{level}']

    def _score_branches(self, level: int) -> Optional[List[List[nn.Module]]]:
        return [[*self.head.cls_convs[level]]]
