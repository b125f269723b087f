"""Variants of the standard RoI head whose box branch the two-stage adapter explains with a
small change (see :mod:`.two_stage`).

- Double-Head R-CNN (``DoubleHeadRoIHead`` with ``DoubleConvFCBBoxHead``): the bbox head's
  forward takes two inputs, the RoI features for classification (pooled on the RoI) and for
  regression (pooled on the RoI enlarged by ``reg_roi_scale_factor``). The score reads only the
  classification branch (fully connected layers on the first input), so the level gradient of
  :class:`~.two_stage.RoIGradient` is that of the RoI's own pooled features, as for Faster
  R-CNN.
- HTC (``HybridTaskCascadeRoIHead``): Cascade R-CNN's box stages, with the semantic head's
  feature fused into the RoI features (``semantic_fusion``), computed on the live level maps;
  SCNet (``SCNetRoIHead``) the same with its global context feature too.
"""
from typing import Sequence

import torch
from torch import nn

from .base import ADAPTERS
from .two_stage import (
    _ROI_BOX_RELIES_ON,
    CascadeRCNNAdapter,
    TwoStageAdapter,
    _overrides,
    cascade_stages_standard,
    roi_head_standard,
)


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
    relies_on_parts = {'rpn_head': TwoStageAdapter.relies_on_parts['rpn_head'],
                       'roi_head': (('DoubleHeadRoIHead', ), _ROI_BOX_RELIES_ON)}
    excluded_types = ()
    detectors = 'Double-Head R-CNN'
    doc_score = 'softmax(cls[i])[c] of the fc (classification) branch on the kept RoI i'
    doc_route = ("one backward through the classification branch for all detections, then "
                 "RoIAlign's own backward per detection (exact)")

    def _pooled_logits(self, pooled: torch.Tensor) -> torch.Tensor:
        """The classification branch's logits; the regression input is a constant (the score
        does not read it)."""
        return self.roi_head.bbox_head(pooled, pooled.detach())[0]


@ADAPTERS.register_module()
class HTCAdapter(CascadeRCNNAdapter):
    """``HybridTaskCascadeRoIHead`` (HTC's box branch) and ``SCNetRoIHead`` (SCNet's):
    Cascade R-CNN's stages, whose RoI features may be summed with the RoI-pooled semantic
    feature of ``semantic_head`` (which reads every FPN level; HTC: when ``'bbox'`` is in
    ``semantic_fusion``) and, in SCNet, fused with the global context head's feature.

    Score of a detection (RoI i, class c), as Cascade R-CNN's::

        softmax(mean_s cls_score_s(roi_s[i]))[c]

    with the semantic feature computed on the live level maps.
    """

    head_types = ('HybridTaskCascadeRoIHead', 'SCNetRoIHead')
    excluded_types = ()
    detectors = 'HTC, SCNet (their box branch)'
    doc_score = ('softmax(mean over stages of cls_s[i])[c], each stage on its own refined RoI '
                 '(semantic and global context features fused)')
    doc_route = 'exact (stages and the semantic/context heads read several levels)'

    @classmethod
    def accepts(cls, model: nn.Module) -> bool:
        from mmdet.models.roi_heads import HybridTaskCascadeRoIHead, SCNetRoIHead

        roi_head = model.roi_head
        base = SCNetRoIHead if isinstance(roi_head, SCNetRoIHead) else HybridTaskCascadeRoIHead
        return (getattr(model, 'rpn_head', None) is not None
                and not _overrides(type(roi_head), base,
                                   ('predict', 'predict_bbox', '_refine_roi', '_bbox_forward'))
                and cascade_stages_standard(roi_head))

    def _stage_kwargs(self, feats: Sequence[torch.Tensor]) -> dict:
        """``semantic_feat`` (``semantic_head``'s feature; None without one) and, in SCNet,
        ``glbctx_feat`` (``glbctx_head``'s), as the RoI head's ``predict`` computes them."""
        roi_head = self.roi_head
        kwargs = {'semantic_feat': roi_head.semantic_head(tuple(feats))[1]
                  if roi_head.with_semantic else None}
        if hasattr(roi_head, 'with_glbctx'):
            kwargs['glbctx_feat'] = (roi_head.glbctx_head(tuple(feats))[1]
                                     if roi_head.with_glbctx else None)
        return kwargs


@ADAPTERS.register_module()
class GridRCNNAdapter(TwoStageAdapter):
    """``GridRoIHead`` (Grid R-CNN): the RoI bbox head classifies the proposals (its boxes are
    the proposals: ``with_reg=False`` in mmdet's configs), NMS keeps some, then the grid head
    moves each kept box (heat maps of 9 grid points pooled on the box), as
    ``GridRoIHead.predict_bbox`` does.

    "The score" is the one ``model.predict`` reports: the RoI classifier's, which the grid head
    does not change::

        softmax(cls[i])[c] of the kept proposal i

    so the level-aware default, the RoI route and the score are Faster R-CNN's; the grid head
    only moves the box (decoding runs it on the kept boxes, without gradients).
    """

    head_types = ('GridRoIHead', )
    relies_on = _ROI_BOX_RELIES_ON
    relies_on_parts = {'rpn_head': TwoStageAdapter.relies_on_parts['rpn_head']}
    excluded_types = ()
    head_path = 'roi_head'
    detectors = 'Grid R-CNN'
    doc_score = ("softmax(cls[i])[c] of the kept RoI i (the grid head moves the box, not the "
                 'score)')

    @classmethod
    def accepts(cls, model: nn.Module) -> bool:
        from mmdet.models.roi_heads import GridRoIHead

        return roi_head_standard(model, GridRoIHead, ('predict', 'predict_bbox'))

    def decode(self, outs, metainfo: dict, score_thr: float):
        """Faster R-CNN's decoding on the network input's scale, then the grid head on the
        kept boxes (rescaled to the original image by its own ``_predict_by_feat_single``)."""
        dets = super().decode(outs, {**metainfo, 'scale_factor': (1.0, 1.0)}, score_thr)
        if len(dets) > 0:
            dets.bboxes = self._grid_boxes(outs.feats, dets.bboxes, metainfo)
        return dets

    def _grid_boxes(self, feats: Sequence[torch.Tensor], bboxes: torch.Tensor,
                    metainfo: dict) -> torch.Tensor:
        from mmdet.structures.bbox import bbox2roi

        roi_head = self.roi_head
        extractor, grid_head = roi_head.grid_roi_extractor, roi_head.grid_head
        had, mode = hasattr(grid_head, 'test_mode'), getattr(grid_head, 'test_mode', None)
        try:
            with torch.no_grad():
                x = extractor(tuple(f.detach() for f in feats)[:len(extractor.featmap_strides)],
                              bbox2roi([bboxes]))
                if roi_head.with_shared_head:
                    x = roi_head.shared_head(x)
                grid_head.test_mode = True
                fused = grid_head(x)['fused']
                return grid_head._predict_by_feat_single(fused, bboxes, metainfo, rescale=True)
        finally:  # the model as found (mmdet's own predict sets the flag for good)
            if had:
                grid_head.test_mode = mode
            else:
                del grid_head.test_mode


@ADAPTERS.register_module()
class MaskScoringRCNNAdapter(TwoStageAdapter):
    """``MaskScoringRoIHead`` (Mask Scoring R-CNN): ``model.predict`` reports the RoI
    classifier's probability times the mask IoU the ``mask_iou_head`` predicts for the kept box
    and class (``MaskIoUHead.predict_by_feat``), and that product is the score explained::

        softmax(cls[i])[c] * iou_c(mask_roi_align(box))

    ``box`` being the kept (refined) box on the network input, pooled by the mask RoI
    extractor, whose level may differ from the RoI's: every level layer then feeds every
    detection and maps take the exact route. ``Detections.rois`` holds the RoI and the box
    (S = 2).
    """

    head_types = ('MaskScoringRoIHead', )
    relies_on = ('predict', 'predict_bbox', 'predict_mask', '_mask_forward')
    relies_on_parts = {'rpn_head': TwoStageAdapter.relies_on_parts['rpn_head']}
    excluded_types = ()
    head_path = 'roi_head'
    detectors = 'Mask Scoring R-CNN (its box score, with the mask IoU)'
    doc_score = 'softmax(cls[i])[c] · mask IoU of the kept box (as `model.predict` reports it)'
    doc_route = 'exact (the mask IoU pools the box, maybe from another level)'

    @classmethod
    def accepts(cls, model: nn.Module) -> bool:
        from mmdet.models.roi_heads import MaskScoringRoIHead

        return roi_head_standard(model, MaskScoringRoIHead, (
            'predict', 'predict_bbox', 'predict_mask', '_mask_forward'))

    def decode(self, outs, metainfo: dict, score_thr: float):
        """Faster R-CNN's decoding on the network input's scale, the mask IoU of each kept box
        multiplied in, then the boxes rescaled as ``FCNMaskHead.predict_by_feat`` does."""
        dets = super().decode(outs, {**metainfo, 'scale_factor': (1.0, 1.0)}, score_thr)
        with torch.no_grad():
            iou = self._mask_iou(tuple(f.detach() for f in outs.feats), dets.bboxes,
                                 dets.labels)
        dets.scores = dets.scores * iou
        dets.rois = torch.cat([dets.rois, dets.bboxes[:, None]], 1)
        dets.bboxes = dets.bboxes / dets.bboxes.new_tensor(metainfo['scale_factor']).repeat(
            (1, 2))
        dets = dets.select(dets.scores >= score_thr)
        return dets.select(dets.scores.argsort(descending=True, stable=True))

    def _mask_iou(self, feats: Sequence[torch.Tensor], boxes: torch.Tensor,
                  labels: torch.Tensor) -> torch.Tensor:
        """(K,) mask IoU predicted for each box (network input) and class."""
        from mmdet.structures.bbox import bbox2roi

        if len(boxes) == 0:
            return boxes.new_zeros((0, ))
        roi_head = self.roi_head
        res = roi_head._mask_forward(tuple(feats), bbox2roi([boxes]))
        k = torch.arange(len(labels), device=labels.device)
        iou = roi_head.mask_iou_head(res['mask_feats'], res['mask_preds'][k, labels])
        return iou[k, labels]

    def scores(self, outs, dets) -> torch.Tensor:
        """(K,) class probability of the RoI times the mask IoU of the box, live."""
        if len(dets) == 0:
            return outs.feats[0].new_zeros((0, ))
        probs = super().scores(outs, dets)
        return probs * self._mask_iou(outs.feats, dets.rois[:, -1].to(outs.feats[0]),
                                      dets.labels.long())

    def level_of_layer(self, name: str):
        """None: the box may be pooled from another level than the RoI."""
        return None

    def level_gradient(self) -> None:
        return None


@ADAPTERS.register_module()
class TridentAdapter(TwoStageAdapter):
    """``TridentRoIHead`` (TridentNet) testing one branch (``test_branch_idx >= 0``, as in
    mmdet's configs: the backbone runs that branch's dilation only). ``model.predict`` then is
    Faster R-CNN's (C4: the RoI head's shared ``res5`` on one stride-16 map), followed by
    ``merge_trident_bboxes``: NMS over the (one) branch's detections again and
    ``max_per_img``, which decoding repeats. With all branches at test
    (``test_branch_idx=-1``) the model is refused.
    """

    head_types = ('TridentRoIHead', )
    relies_on = _ROI_BOX_RELIES_ON
    relies_on_parts = {'rpn_head': TwoStageAdapter.relies_on_parts['rpn_head']}
    excluded_types = ()
    head_path = 'roi_head'
    detectors = 'TridentNet (one test branch)'
    doc_score = "softmax(cls[i])[c] of the kept RoI i (the test branch's)"
    doc_layers = 'the backbone output the RoI is pooled from (`backbone.layer3`, stride 16)'

    @classmethod
    def accepts(cls, model: nn.Module) -> bool:
        from mmdet.models.roi_heads import TridentRoIHead

        return (roi_head_standard(model, TridentRoIHead,
                                  ('predict', 'predict_bbox', 'merge_trident_bboxes'))
                and model.roi_head.test_branch_idx != -1)

    def decode(self, outs, metainfo: dict, score_thr: float):
        """Faster R-CNN's decoding, then ``merge_trident_bboxes``' NMS and ``max_per_img``."""
        from mmcv.ops import batched_nms

        dets = super().decode(outs, metainfo, score_thr)
        if len(dets) > 0:
            cfg = self.roi_head.test_cfg
            _, keep = batched_nms(dets.bboxes, dets.scores, dets.labels, cfg['nms'])
            dets = dets.select(keep[:cfg['max_per_img']] if cfg['max_per_img'] > 0 else keep)
        return dets
