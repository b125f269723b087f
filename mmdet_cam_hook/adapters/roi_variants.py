"""Variants of the standard RoI head whose box branch the two-stage adapter explains with a
small change (see :mod:`.two_stage`).

- Double-Head R-CNN (``DoubleHeadRoIHead`` with ``DoubleConvFCBBoxHead``): the bbox head's
  forward takes two inputs, the RoI features for classification (pooled on the RoI) and for
  regression (pooled on the RoI enlarged by ``reg_roi_scale_factor``). The score reads only the
  classification branch (fully connected layers on the first input), so the level gradient of
  :class:`~.two_stage.RoIGradient` is that of the RoI's own pooled features, as for Faster
  R-CNN.
- HTC (``HybridTaskCascadeRoIHead``): Cascade R-CNN's box stages, with the semantic head's
  feature fused into the RoI features (``semantic_fusion``), computed on the live level maps.
"""
from typing import Sequence

import torch
from torch import nn

from .base import ADAPTERS
from .two_stage import CascadeRCNNAdapter, TwoStageAdapter, _overrides, cascade_stages_standard


@ADAPTERS.register_module()
class DoubleHeadAdapter(TwoStageAdapter):
    """``DoubleConvFCBBoxHead`` under ``DoubleHeadRoIHead`` (Double-Head R-CNN).

    Score of a detection (RoI i, class c)::

        softmax(fc_cls(fcs(roi_align(i))))[c]

    the classification branch's; the regression branch (convolutions on the RoI enlarged by
    ``reg_roi_scale_factor``) only moves the box. Decoding and the score go through the RoI
    head's own ``_bbox_forward``, so they equal ``model.predict``'s.
    """

    head_types = ('DoubleConvFCBBoxHead', )
    family = 'two-stage'
    detectors = 'Double-Head R-CNN'
    doc_score = 'softmax(cls[i])[c] of the fc (classification) branch on the kept RoI i'
    doc_layers = 'the FPN output the RoI was pooled from, `neck.fpn_convs.{0..3}` (strides 4-32)'
    doc_route = ("one backward through the classification branch for all detections, then "
                 "RoIAlign's own backward per detection (exact)")

    def _pooled_logits(self, pooled: torch.Tensor) -> torch.Tensor:
        """The classification branch's logits; the regression input is a constant (the score
        does not read it)."""
        return self.roi_head.bbox_head(pooled, pooled.detach())[0]


@ADAPTERS.register_module()
class HTCAdapter(CascadeRCNNAdapter):
    """``HybridTaskCascadeRoIHead`` (HTC's box branch): Cascade R-CNN's stages, whose RoI
    features may be summed with the RoI-pooled semantic feature of ``semantic_head`` (which
    reads every FPN level) when ``'bbox'`` is in ``semantic_fusion``.

    Score of a detection (RoI i, class c), as Cascade R-CNN's::

        softmax(mean_s cls_score_s(roi_s[i]))[c]

    with the semantic feature computed on the live level maps.
    """

    head_types = ('HybridTaskCascadeRoIHead', )
    excluded_types = ()
    family = 'two-stage'
    detectors = 'HTC (its box branch)'
    doc_score = ('softmax(mean over stages of cls_s[i])[c], each stage on its own refined RoI '
                 '(semantic feature fused)')
    doc_layers = "the FPN output the last stage's RoI was pooled from, `neck.fpn_convs.{0..3}`"
    doc_route = 'exact (stages and the semantic head read several levels)'

    @classmethod
    def accepts(cls, model: nn.Module) -> bool:
        from mmdet.models.roi_heads import HybridTaskCascadeRoIHead

        return (getattr(model, 'rpn_head', None) is not None
                and not _overrides(type(model.roi_head), HybridTaskCascadeRoIHead,
                                   ('predict', 'predict_bbox', '_refine_roi', '_bbox_forward'))
                and cascade_stages_standard(model.roi_head))

    def _stage_kwargs(self, feats: Sequence[torch.Tensor]) -> dict:
        """``semantic_feat``: ``semantic_head``'s feature, as ``HybridTaskCascadeRoIHead.
        predict`` computes it (None without a semantic head)."""
        roi_head = self.roi_head
        return {'semantic_feat': roi_head.semantic_head(tuple(feats))[1]
                if roi_head.with_semantic else None}
