"""Guided Anchoring (Wang et al., CVPR 2019): anchors predicted per location.

A location branch (``conv_loc``) says where objects may be: only locations whose
``sigmoid(loc) >= loc_filter_thr`` get an anchor and are decoded. A shape branch
(``conv_shape``) predicts that anchor's width and height; ``FeatureAdaption`` (a deformable
convolution whose offsets come from the *detached* shape prediction) adapts the features to
it; the class and box convolutions (mmcv's ``MaskedConv2d``) run at the kept locations only.

Two facts decide how the adapters run the head themselves (:func:`masked_conv`):

- mmcv 2.1.0's masked convolution has no CPU kernel (``masked_im2col_forward_impl``): the
  head's own forward fails on CPU in eval mode as soon as a location is kept;
- its backward returns no gradient (``(None, ) * 5``), so on CUDA the score of a detection
  would have none; and it takes one image at a time (mmdet's forward masks a batch with
  image 0's locations).

At a kept location ``MaskedConv2d`` *is* the convolution (weights and bias; zeros elsewhere,
where nothing is read), so the adapters compute it as the plain convolution times the mask:
on CUDA the values are mmcv's masked kernel's (the plain convolution only carries the
gradient), on CPU the plain convolution's. The location mask is a threshold: it has no
gradient, as in mmdet. The deformable convolution's offsets depend on the features, so no
fixed window holds a score: maps take the engine's exact route.
"""
import copy
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from mmengine.structures import InstanceData
from torch import nn

from .base import ADAPTERS, Detections
from .dense import DenseAdapter
from .rpn import RPNAdapter
from .two_stage import RoIOutputs, TwoStageAdapter


def masked_conv(conv: nn.Module, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """mmcv's ``MaskedConv2d`` at the locations of ``mask`` (N, 1, H, W) bool (each image its
    own), zero elsewhere, differentiable: the plain convolution carries the gradient; on CUDA
    the values are mmcv's masked kernel's (``conv(x, mask)``, one image at a time as it
    asserts), on CPU (no kernel) the plain convolution's."""
    dense = conv(x, None)  # MaskedConv2d without a mask: nn.Conv2d's forward
    if x.is_cuda:
        with torch.no_grad():
            value = torch.cat([conv(x[i:i + 1], mask[i]) for i in range(len(x))])
        return value + (dense - dense.detach())
    return dense * mask.to(dense.dtype)


def _loc_mask(head: nn.Module, loc_pred: torch.Tensor) -> torch.Tensor:
    """(N, 1, H, W): the location mask ``forward_single`` computes in eval mode
    (``loc_pred.sigmoid()[0] >= loc_filter_thr``, for one image), for each image."""
    return loc_pred.sigmoid() >= head.loc_filter_thr


def _strides(head: nn.Module) -> List[int]:
    return [int(s[0]) if isinstance(s, (tuple, list)) else int(s)
            for s in head.square_anchor_generator.strides]


#: What the adapters run of a Guided Anchoring head themselves.
GA_RELIES_ON = ('forward', 'forward_single', 'predict', 'predict_by_feat',
                '_predict_by_feat_single', 'get_anchors', '_get_guided_anchors_single')


@ADAPTERS.register_module()
class GARetinaAdapter(DenseAdapter):
    """``GARetinaHead`` (Guided Anchoring RetinaNet): one guided anchor per kept location.

    Score of the detection with label ``c`` at location ``(l, y, x)``::

        sigmoid(cls_scores[l][0, c, y, x])

    ``cls_scores`` = ``retina_cls(FeatureAdaption(cls_convs(x), shape_pred))``, read only where
    the location mask holds (decoding drops the other locations first, as mmdet's does).
    """

    head_types = ('GARetinaHead', )
    relies_on = GA_RELIES_ON
    family = 'Guided Anchoring'
    detectors = 'GA RetinaNet'
    doc_score = 'σ(cls[c]) at a location the location branch keeps (one guided anchor)'
    doc_layers = '`neck.fpn_convs.{0..4}` (P3-P7, strides 8-128)'
    doc_route = 'exact (deformable convolution with predicted offsets)'

    @property
    def num_base_priors(self) -> int:
        return int(self.head.num_base_priors)

    def strides(self) -> List[int]:
        return _strides(self.head)

    def _split(self, outs: tuple):
        """(cls_scores, bbox_preds, no score factor): the shape and location predictions
        only place the anchors."""
        return outs[0], outs[1], None

    # ------------------------------------------------------------------ forward
    def _forward_single(self, x: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        """``GARetinaHead.forward_single`` in eval mode, the masked convolutions computed by
        :func:`masked_conv`."""
        head = self.head
        cls_feat, reg_feat = x, x
        for conv in head.cls_convs:
            cls_feat = conv(cls_feat)
        for conv in head.reg_convs:
            reg_feat = conv(reg_feat)
        loc_pred = head.conv_loc(cls_feat)
        shape_pred = head.conv_shape(reg_feat)
        cls_feat = head.feature_adaption_cls(cls_feat, shape_pred)
        reg_feat = head.feature_adaption_reg(reg_feat, shape_pred)
        mask = _loc_mask(head, loc_pred)
        return (masked_conv(head.retina_cls, cls_feat, mask),
                masked_conv(head.retina_reg, reg_feat, mask), shape_pred, loc_pred)

    def head_outputs(self, feats: Sequence[torch.Tensor],
                     metainfo: Optional[Sequence[dict]] = None) -> tuple:
        """``(cls_scores, bbox_preds, shape_preds, loc_preds)``, one per level, as the head's
        forward in eval mode (see :func:`masked_conv`)."""
        return tuple(map(list, zip(*[self._forward_single(f) for f in feats])))

    # ------------------------------------------------------------------ (a) decoding
    def decode(self, outs: tuple, metainfo: dict, score_thr: float) -> Detections:
        """``GuidedAnchorHead.predict_by_feat`` on image 0 with each candidate's location
        carried through ``multiclass_nms(return_inds=True)``: the guided anchors and location
        masks by the head's own ``get_anchors``, the kept locations' scores, the ``nms_pre``
        top-k, the box decoding and NMS as ``_predict_by_feat_single``."""
        from mmdet.models.layers import multiclass_nms

        head = self.head
        cls_scores, bbox_preds, shape_preds, loc_preds = [[t.detach() for t in o] for o in outs]
        sizes = [tuple(c.shape[-2:]) for c in cls_scores]
        _, guided, masks = head.get_anchors(sizes, shape_preds, loc_preds, [metainfo],
                                            use_loc_filter=True, device=cls_scores[0].device)
        cfg = self._pre_cfg(score_thr)
        nms_pre = cfg.get('nms_pre', -1)
        preds, valid_anchors, scores_all, prior_idx = [], [], [], []
        start = 0
        for cls_score, bbox_pred, anchors, mask in zip(cls_scores, bbox_preds, guided[0],
                                                       masks[0]):
            num = mask.numel()
            if mask.sum() == 0:
                start += num
                continue
            cls_score = cls_score[0].permute(1, 2, 0).reshape(-1, head.cls_out_channels)
            scores = cls_score.sigmoid() if head.use_sigmoid_cls else cls_score.softmax(-1)
            bbox_pred = bbox_pred[0].permute(1, 2, 0).reshape(-1, 4)
            idx = mask.nonzero()[:, 0]
            scores, bbox_pred = scores[mask, :], bbox_pred[mask, :]
            if 0 < nms_pre < scores.shape[0]:
                fg = scores if head.use_sigmoid_cls else scores[:, :-1]
                _, topk = fg.max(dim=1)[0].topk(nms_pre)
                anchors, bbox_pred, scores, idx = (anchors[topk, :], bbox_pred[topk, :],
                                                   scores[topk, :], idx[topk])
            preds.append(bbox_pred)
            valid_anchors.append(anchors)
            scores_all.append(scores)
            prior_idx.append(idx + start)
            start += num
        if not preds:
            none = torch.zeros((0, ), dtype=torch.long, device=cls_scores[0].device)
            return Detections(cls_scores[0].new_zeros((0, 4)), cls_scores[0].new_zeros((0, )),
                              none, none, none, none, none)
        bboxes = head.bbox_coder.decode(torch.cat(valid_anchors), torch.cat(preds),
                                        max_shape=metainfo['img_shape'])
        bboxes /= bboxes.new_tensor(metainfo['scale_factor']).repeat((1, 2))
        scores = torch.cat(scores_all)
        if head.use_sigmoid_cls:  # the dummy background column mmdet adds
            scores = torch.cat([scores, scores.new_zeros(scores.shape[0], 1)], dim=1)
        dets, labels, inds = multiclass_nms(bboxes, scores, cfg.score_thr, cfg.nms,
                                            cfg.max_per_img, return_inds=True)
        num_classes = scores.shape[1] - 1
        results = InstanceData(bboxes=dets[:, :4], scores=dets[:, -1], labels=labels,
                               prior_idx=torch.cat(prior_idx)[inds // num_classes])
        return self._locate(results, score_thr, sizes)


def ga_forward_single(head: nn.Module, x: torch.Tensor) -> Tuple[torch.Tensor, ...]:
    """``GuidedAnchorHead.forward_single`` in eval mode (``GARPNHead``'s after its
    ``rpn_conv`` and ReLU), the masked convolutions computed by :func:`masked_conv`."""
    loc_pred = head.conv_loc(x)
    shape_pred = head.conv_shape(x)
    x = head.feature_adaption(x, shape_pred)
    mask = _loc_mask(head, loc_pred)
    return (masked_conv(head.conv_cls, x, mask), masked_conv(head.conv_reg, x, mask),
            shape_pred, loc_pred)


def garpn_outputs(head: nn.Module, feats: Sequence[torch.Tensor]) -> tuple:
    """``GARPNHead.forward`` in eval mode: ``(cls_scores, bbox_preds, shape_preds,
    loc_preds)``, one per level."""
    outs = [ga_forward_single(head, F.relu(head.rpn_conv(f))) for f in feats]
    return tuple(map(list, zip(*outs)))


@ADAPTERS.register_module()
class GAFasterRCNNAdapter(TwoStageAdapter):
    """Faster R-CNN with a ``GARPNHead`` (Guided Anchoring Faster R-CNN): the RoI head is
    Faster R-CNN's, the proposals are the guided-anchoring RPN's own (``predict_by_feat`` on
    its outputs, computed as in eval mode with :func:`masked_conv`), constants as in mmdet.

    Score of a detection (RoI i, class c)::

        softmax(cls[i])[c]
    """

    relies_on_parts = {'rpn_head': (('GARPNHead', ), GA_RELIES_ON),
                       'roi_head': TwoStageAdapter.relies_on_parts['roi_head']}
    family = 'two-stage'
    detectors = 'Guided Anchoring Faster R-CNN'
    doc_score = "softmax(cls[i])[c] of the kept RoI i (proposals from guided anchors)"
    doc_layers = 'the FPN output the RoI was pooled from, `neck.fpn_convs.{0..3}` (strides 4-32)'
    doc_route = ("one backward through the RoI head for all detections, then RoIAlign's own "
                 'backward per detection (exact)')

    def head_outputs(self, feats: Sequence[torch.Tensor],
                     metainfo: Optional[Sequence[dict]] = None) -> RoIOutputs:
        """The live level maps and the guided-anchoring RPN's outputs (without gradients)."""
        with torch.no_grad():
            rpn = garpn_outputs(self.model.rpn_head, [f.detach() for f in feats])
        return RoIOutputs(tuple(feats), rpn)


@ADAPTERS.register_module()
class GARPNAdapter(RPNAdapter):
    """``GARPNHead`` as the detector's own head (the ``RPN`` detector, GA-RPN): proposals are
    its detections, class-agnostic (label 0).

    Score of the proposal at location ``(l, y, x)``::

        sigmoid(conv_cls[l][0, 0, y, x])

    ``GARPNHead._predict_by_feat_single`` re-run with each proposal's location carried
    through its per-level NMS and the final top-k. As for ``RPNHead``
    (:class:`~.rpn.RPNAdapter`), a top level that is the FPN's max-pooled P5 is read on P5.
    """

    head_types = ('GARPNHead', )
    relies_on = GA_RELIES_ON
    family = 'Guided Anchoring'
    detectors = 'GA-RPN (proposals as detections)'
    doc_score = 'σ(cls) at a location the location branch keeps; class-agnostic (label 0)'
    doc_layers = '`neck.fpn_convs.{0..3}` (strides 4-32)'
    doc_route = 'exact (deformable convolution with predicted offsets)'

    @property
    def num_base_priors(self) -> int:
        return int(self.head.num_base_priors)

    def strides(self) -> List[int]:
        strides = _strides(self.head)
        return strides[:-1] if self.pooled_top else strides

    def _split(self, outs: tuple):
        return outs[0], outs[1], None

    def head_outputs(self, feats: Sequence[torch.Tensor],
                     metainfo: Optional[Sequence[dict]] = None) -> tuple:
        """``GARPNHead.forward`` in eval mode, a pooled top level made as the FPN does."""
        feats = tuple(feats)
        if self.pooled_top:
            feats = feats + (F.max_pool2d(feats[-1], 1, stride=2), )
        return garpn_outputs(self.head, feats)

    def _score_branches(self, level: int) -> None:
        return None

    def decode(self, outs: tuple, metainfo: dict, score_thr: float) -> Detections:
        """``GARPNHead._predict_by_feat_single`` on image 0, each proposal's flat location
        index carried through the per-level ``nms`` and the final top-k; proposals scoring
        ``>= score_thr``."""
        from mmcv.ops import nms

        head = self.head
        cls_scores, bbox_preds, shape_preds, loc_preds = [[t.detach() for t in o] for o in outs]
        sizes = [tuple(c.shape[-2:]) for c in cls_scores]
        _, guided, masks = head.get_anchors(sizes, shape_preds, loc_preds, [metainfo],
                                            use_loc_filter=True, device=cls_scores[0].device)
        cfg = copy.deepcopy(head.test_cfg)
        levels, start = [], 0
        for cls_score, bbox_pred, anchors, mask in zip(cls_scores, bbox_preds, guided[0],
                                                       masks[0]):
            num = mask.numel()
            if mask.sum() > 0:
                cls_score = cls_score[0].permute(1, 2, 0)
                if head.use_sigmoid_cls:
                    scores = cls_score.reshape(-1).sigmoid()
                else:
                    scores = cls_score.reshape(-1, 2).softmax(dim=1)[:, :-1]
                idx = mask.nonzero()[:, 0] + start
                scores = scores[mask]
                bbox_pred = bbox_pred[0].permute(1, 2, 0).reshape(-1, 4)[mask, :]
                if cfg.nms_pre > 0 and scores.shape[0] > cfg.nms_pre:
                    _, topk = scores.topk(cfg.nms_pre)
                    bbox_pred, anchors, scores, idx = (bbox_pred[topk, :], anchors[topk, :],
                                                       scores[topk], idx[topk])
                proposals = head.bbox_coder.decode(anchors, bbox_pred,
                                                   max_shape=metainfo['img_shape'])
                if cfg.min_bbox_size >= 0:
                    w = proposals[:, 2] - proposals[:, 0]
                    h = proposals[:, 3] - proposals[:, 1]
                    valid = (w > cfg.min_bbox_size) & (h > cfg.min_bbox_size)
                    if not valid.all():
                        proposals, scores, idx = proposals[valid], scores[valid], idx[valid]
                proposals, keep = nms(proposals, scores, cfg.nms.iou_threshold)
                levels.append((proposals[:cfg.nms_post, :], idx[keep][:cfg.nms_post]))
            start += num
        if not levels:
            none = torch.zeros((0, ), dtype=torch.long, device=cls_scores[0].device)
            return Detections(cls_scores[0].new_zeros((0, 4)), cls_scores[0].new_zeros((0, )),
                              none, none, none, none, none)
        proposals = torch.cat([p for p, _ in levels], 0)
        idx = torch.cat([i for _, i in levels], 0)
        if cfg.get('nms_across_levels', False):
            proposals, keep = nms(proposals[:, :4], proposals[:, -1], cfg.nms.iou_threshold)
            proposals, idx = proposals[:cfg.max_per_img, :], idx[keep][:cfg.max_per_img]
        else:
            _, topk = proposals[:, 4].topk(min(cfg.max_per_img, proposals.shape[0]))
            proposals, idx = proposals[topk, :], idx[topk]
        bboxes = proposals[:, :-1] / proposals.new_tensor(
            metainfo['scale_factor']).repeat((1, 2))
        results = InstanceData(bboxes=bboxes, scores=proposals[:, -1], prior_idx=idx,
                               labels=idx.new_zeros(len(idx)))
        return self._locate(results, score_thr, sizes)
