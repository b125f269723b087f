"""Variants of the standard RoI head whose box branch the two-stage adapter explains with a
small change (see :mod:`.two_stage`).

- Double-Head R-CNN (``DoubleHeadRoIHead`` with ``DoubleConvFCBBoxHead``): the bbox head's
  forward takes two inputs, the RoI features for classification (pooled on the RoI) and for
  regression (pooled on the RoI enlarged by ``reg_roi_scale_factor``). The score reads only the
  classification branch (fully connected layers on the first input), so the level gradient of
  :class:`~.two_stage.RoIGradient` is that of the RoI's own pooled features, as for Faster
  R-CNN.
"""
import torch

from .base import ADAPTERS
from .two_stage import TwoStageAdapter


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
