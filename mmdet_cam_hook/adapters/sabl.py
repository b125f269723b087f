"""Side-Aware Boundary Localization (SABL, Wang et al., ECCV 2020): boxes found by bucketing.

Each side of a box is first put in one of ``side_num`` buckets (a softmax over them), then
moved by a fine offset; the bucketing's confidence (the top bucket's probability, plus the
second's when it is the neighbour, averaged over the four sides, ``bucket2bbox`` of
``BucketingBBoxCoder``) rescales the class score: mmdet multiplies it in before NMS
(``score_factors``), so it is part of the score ``model.predict`` reports, and of the score
explained.

- ``SABLRetinaHead`` (SABL RetinaNet): one square anchor per location; the class branch
  (``cls_convs``, ``retina_cls``) and the bucketing branch (``reg_convs``, ``retina_bbox_cls``)
  each read an 11x11 window of the level's map (4 + 1 convolutions 3x3, no norm in
  ``sabl-retinanet_r50_fpn_1x_coco.py``; the GroupNorm configs take the exact route).
- ``SABLHead`` (SABL Faster / Cascade R-CNN): the RoI bbox head; a detection is (RoI, class),
  the bucketing confidence is the RoI's (the box is class-agnostic).
"""
from typing import List, Optional, Sequence, Tuple

import torch
from mmengine.structures import InstanceData
from torch import nn

from .base import ADAPTERS, Detections
from .candidates import Candidates, dense_candidates, record_post_process, rescaled
from .dense import DenseAdapter
from .two_stage import (
    _ROI_BOX_RELIES_ON,
    _RPN_RELIES_ON,
    CascadeRCNNAdapter,
    RoIGradient,
    TwoStageAdapter,
    _overrides,
)


@ADAPTERS.register_module()
class SABLRetinaAdapter(DenseAdapter):
    """``SABLRetinaHead``: its own ``_predict_by_feat_single`` re-run with the square anchor
    of each candidate carried through ``_bbox_post_process``.

    Score of the detection with label ``c`` at square anchor ``(l, y, x)``::

        sigmoid(cls_scores[l][0, c, y, x]) * confidence(bbox_cls_preds[l][0, :, y, x])

    ``confidence`` being ``BucketingBBoxCoder``'s bucketing confidence of the four sides (the
    head's own coder computes it, as in decoding).
    """

    head_types = ('SABLRetinaHead', )
    relies_on = ('forward', 'forward_single', 'predict', 'predict_by_feat',
                 '_predict_by_feat_single', '_bbox_post_process', 'get_anchors')
    family = 'SABL'
    detectors = 'SABL RetinaNet'
    doc_score = 'σ(cls[c]) · bucketing confidence of the 4 sides (as `model.predict` reports)'
    doc_layers = '`neck.fpn_convs.{0..4}` (P3-P7, strides 8-128)'
    doc_route = ('local, 11x11 window (radius 5; GN configs: exact); P6 (`fpn_convs.3`) also '
                 'feeds P7: chain')

    @property
    def num_base_priors(self) -> int:
        """One square anchor per location."""
        return int(self.head.square_anchor_generator.num_base_priors[0])

    def strides(self) -> List[int]:
        return [int(s[0]) if isinstance(s, (tuple, list)) else int(s)
                for s in self.head.square_anchor_generator.strides]

    def _squares(self, sizes: Sequence[Tuple[int, int]], like: torch.Tensor) -> List[torch.Tensor]:
        """The square anchors of each level, as ``get_anchors`` makes them."""
        return self.head.square_anchor_generator.grid_priors(sizes, device=like.device)

    def head_outputs(self, feats: Sequence[torch.Tensor],
                     metainfo: Optional[Sequence[dict]] = None) -> tuple:
        """``(cls_scores, bucket_cls_preds, bucket_offset_preds)``, one tensor per level each
        (the head's forward returns the two bucket predictions as one pair per level)."""
        cls_scores, bbox_preds = self.head(tuple(feats))
        return cls_scores, [b[0] for b in bbox_preds], [b[1] for b in bbox_preds]

    def _split(self, outs: tuple):
        """(cls_scores, bucket class preds, bucket offset preds) per level."""
        return outs[0], outs[1], outs[2]

    # ------------------------------------------------------------------ (a) decoding
    def decode(self, outs: tuple, metainfo: dict, score_thr: float) -> Detections:
        """``SABLRetinaHead._predict_by_feat_single`` on image 0 with each candidate's flat
        anchor index as ``prior_idx``, then the head's own ``_bbox_post_process`` (the
        bucketing confidence multiplied in as ``score_factors``, NMS)."""
        from mmdet.models.utils import filter_scores_and_topk

        head = self.head
        cls_scores, bucket_cls, bucket_reg = self._split(outs)
        sizes = [tuple(c.shape[-2:]) for c in cls_scores]
        squares = self._squares(sizes, cls_scores[0])
        cfg = self._pre_cfg(score_thr)
        nms_pre = cfg.get('nms_pre', -1)
        side4 = head.side_num * 4
        boxes, scores_all, confids, labels_all, prior_idx = [], [], [], [], []
        start = 0
        for cls_score, b_cls, b_reg, anchors in zip(cls_scores, bucket_cls, bucket_reg,
                                                    squares):
            cls_score = cls_score[0].detach().permute(1, 2, 0).reshape(-1, head.cls_out_channels)
            scores = cls_score.sigmoid() if head.use_sigmoid_cls else \
                cls_score.softmax(-1)[:, :-1]
            b_cls = b_cls[0].detach().permute(1, 2, 0).reshape(-1, side4)
            b_reg = b_reg[0].detach().permute(1, 2, 0).reshape(-1, side4)
            scores, labels, keep, filtered = filter_scores_and_topk(
                scores, cfg.score_thr, nms_pre,
                dict(anchors=anchors, bbox_cls_pred=b_cls, bbox_reg_pred=b_reg))
            bboxes, confid = head.bbox_coder.decode(
                filtered['anchors'].contiguous(),
                [filtered['bbox_cls_pred'].contiguous(), filtered['bbox_reg_pred'].contiguous()],
                max_shape=metainfo['img_shape'])
            boxes.append(bboxes)
            scores_all.append(scores)
            confids.append(confid)
            labels_all.append(labels)
            prior_idx.append(keep + start)
            start += len(anchors)
        results = InstanceData(bboxes=torch.cat(boxes), scores=torch.cat(scores_all),
                               score_factors=torch.cat(confids), labels=torch.cat(labels_all),
                               prior_idx=torch.cat(prior_idx))
        results = head._bbox_post_process(results=results, cfg=cfg, rescale=True,
                                          with_nms=True, img_meta=metainfo)
        return self._locate(results, score_thr, sizes)

    # ------------------------------------------------------------------ (b) score
    def _confidence(self, bucket_cls: torch.Tensor) -> torch.Tensor:
        """(K,) the bucketing confidence of (K, 4 * side_num) bucket logits, by the head's
        coder (its boxes, from dummy anchors, are not used)."""
        anchors = bucket_cls.new_zeros((len(bucket_cls), 4))
        anchors[:, 2:] = 1.0
        bucket_cls = bucket_cls.contiguous()
        _, confid = self.head.bbox_coder.decode(anchors, [bucket_cls, torch.zeros_like(
            bucket_cls)])
        return confid

    def scores(self, outs: tuple, dets: Detections) -> torch.Tensor:
        """(K,) differentiable scores of ``dets`` read from the live head outputs."""
        cls_scores, bucket_cls, _ = self._split(outs)

        def read(level, d):
            logits = cls_scores[level][0][:, d.ys, d.xs].t()
            buckets = bucket_cls[level][0][:, d.ys, d.xs].t()
            return self._prob(logits, d.labels) * self._confidence(buckets)

        return self._per_level(dets, cls_scores[0], read)

    # ------------------------------------------------------------------ (d) local window
    def _score_branches(self, level: int) -> Optional[List[List[nn.Module]]]:
        head = self.head
        return [[*head.cls_convs, head.retina_cls], [*head.reg_convs, head.retina_bbox_cls]]

    def _read_window(self, outs: List[torch.Tensor], dets: Detections) -> torch.Tensor:
        """The class logits and the bucket logits at the window centres."""
        return self._prob(outs[0], dets.labels) * self._confidence(outs[1])

    # ------------------------------------------------------------------ (e) candidates
    def candidates(self, outs: tuple, metainfo: dict, score_thr: float,
                   detections: Optional[Detections] = None) -> Candidates:
        """Every square anchor before the score threshold and NMS: its box decoded by the
        bucketing coder (rescaled by ``_bbox_post_process``), its per-class scores
        ``sigmoid(cls) * confidence`` (the post-process multiplies the confidence in), and
        the pairs that went into NMS, recorded from :meth:`decode`."""
        head = self.head
        with record_post_process(head) as seen:
            dets = self.decode(outs, metainfo, score_thr)
        cls_scores, bucket_cls, bucket_reg = self._split(outs)
        sizes = [tuple(c.shape[-2:]) for c in cls_scores]
        side4 = head.side_num * 4

        def flat(maps, dim):
            return torch.cat([m[0].detach().permute(1, 2, 0).reshape(-1, dim) for m in maps])

        with torch.no_grad():
            squares = torch.cat(self._squares(sizes, cls_scores[0]))
            boxes, confid = head.bbox_coder.decode(
                squares, [flat(bucket_cls, side4), flat(bucket_reg, side4)],
                max_shape=metainfo['img_shape'])
            cls = flat(cls_scores, head.cls_out_channels)
            probs = cls.sigmoid() if head.use_sigmoid_cls else cls.softmax(-1)[:, :-1]
            boxes = rescaled(head, boxes, metainfo)
        return dense_candidates(boxes, probs * confid[:, None], seen,
                                dets if detections is None else detections, sizes,
                                self.num_base_priors, self._pre_cfg(score_thr).score_thr,
                                head.test_cfg)


def _bucket_confidence(head: nn.Module, rois: torch.Tensor, bbox_pred) -> torch.Tensor:
    """(K,) the bucketing confidence of K RoIs (x1y1x2y2) and ``SABLHead``'s
    ``(bucket_cls, bucket_offset)`` predictions for them, by the head's own coder."""
    _, confid = head.bbox_coder.decode(rois, bbox_pred)
    return confid


class _SABLRoIScores:
    """What the SABL RoI adapters share: decoding by ``SABLHead._predict_by_feat_single``
    (bucketing coder, ``multiclass_nms`` with the confidence as ``score_factors``) with each
    kept box's RoI, and the score ``softmax(cls)[c] * confidence``."""

    def _predict_single(self, roi: torch.Tensor, cls_score: torch.Tensor, bbox_pred,
                        metainfo: dict, cfg) -> InstanceData:
        """``SABLHead._predict_by_feat_single`` with ``multiclass_nms(return_inds=True)``:
        each kept box's RoI as ``roi_idx`` (the box is class-agnostic: one per RoI)."""
        from mmdet.models.layers import multiclass_nms

        head = self._last_bbox_head
        rescale_after = bool(getattr(self.roi_head, 'with_mask', False))
        scores = torch.softmax(cls_score, dim=1)
        bboxes, confid = head.bbox_coder.decode(roi[:, 1:], bbox_pred, metainfo['img_shape'])
        if not rescale_after and bboxes.size(0) > 0:
            scale = bboxes.new_tensor(metainfo['scale_factor']).repeat((1, 2))
            bboxes = (bboxes.view(bboxes.size(0), -1, 4) / scale).view(bboxes.size()[0], -1)
        dets, labels, inds = multiclass_nms(bboxes, scores, cfg.score_thr, cfg.nms,
                                            cfg.max_per_img, score_factors=confid,
                                            return_inds=True)
        out = InstanceData(bboxes=dets[:, :4], scores=dets[:, -1], labels=labels,
                           roi_idx=torch.div(inds, head.num_classes, rounding_mode='floor'))
        if rescale_after and len(out) > 0:
            out.bboxes = out.bboxes / out.bboxes.new_tensor(metainfo['scale_factor']).repeat(
                (1, 2))
        return out

    def _sabl_candidates(self, outs, metainfo: dict, score_thr: float,
                         detections: Optional[Detections]) -> Candidates:
        """The two-stage candidates (every RoI's per-class boxes and class probabilities, the
        pairs whose probability passed the pre-NMS filter: ``multiclass_nms`` filters before
        it multiplies the score factors in), their scores times each RoI's bucketing
        confidence (the last stage's)."""
        from mmdet.structures.bbox import bbox2roi

        cands = TwoStageAdapter.candidates(self, outs, metainfo, score_thr, detections)
        with torch.no_grad():
            rois = bbox2roi([self.proposals(outs, metainfo)])
            if len(rois):
                stage_rois, _, bbox_pred = self._stage_forward(
                    tuple(f.detach() for f in outs.feats), rois, metainfo)
                cands.scores = cands.scores * _bucket_confidence(
                    self._last_bbox_head, stage_rois[-1][:, 1:], bbox_pred)[:, None]
        return cands

    def _rescore(self, cls_score: torch.Tensor, bbox_pred, rois: torch.Tensor,
                 labels: torch.Tensor) -> torch.Tensor:
        """(K,) ``softmax(cls_score)[label] * confidence`` of K RoIs (x1y1x2y2)."""
        prob = torch.softmax(cls_score, dim=1).gather(1, labels[:, None].long())[:, 0]
        return prob * _bucket_confidence(self._last_bbox_head, rois, bbox_pred)


@ADAPTERS.register_module()
class SABLFasterRCNNAdapter(_SABLRoIScores, TwoStageAdapter):
    """``SABLHead`` under ``StandardRoIHead`` (SABL Faster R-CNN).

    Score of a detection (RoI i, class c)::

        softmax(cls[i])[c] * confidence(bucket_cls[i])

    Both branches of ``SABLHead`` read only the RoI's own pooled features, so the RoI route
    (one backward through the bbox head for all detections, then RoIAlign's own backward per
    detection) is exact.
    """

    head_types = ('SABLHead', )
    relies_on = ('forward', 'cls_forward', 'reg_forward', 'predict_by_feat',
                 '_predict_by_feat_single', 'regress_by_class')
    relies_on_parts = {'rpn_head': (('RPNHead', ), _RPN_RELIES_ON),
                       'roi_head': (('StandardRoIHead', ), _ROI_BOX_RELIES_ON)}
    excluded_types = ()
    detectors = 'SABL Faster R-CNN'
    doc_score = 'softmax(cls[i])[c] · bucketing confidence of RoI i (as `model.predict` reports)'

    @classmethod
    def accepts(cls, model: nn.Module) -> bool:
        from mmdet.models.roi_heads import StandardRoIHead

        return (getattr(model, 'rpn_head', None) is not None
                and isinstance(getattr(model, 'roi_head', None), StandardRoIHead))

    def scores(self, outs, dets: Detections) -> torch.Tensor:
        """(K,) ``softmax(cls)[c] * confidence`` of ``dets`` from the RoI head re-run on the
        live level maps for their own RoIs only."""
        if len(dets) == 0:
            return outs.feats[0].new_zeros((0, ))
        boxes = dets.rois[:, 0].to(outs.feats[0])
        roi = torch.cat([boxes.new_zeros((len(boxes), 1)), boxes], 1)
        res = self.roi_head._bbox_forward(tuple(outs.feats), roi)
        return self._rescore(res['cls_score'], res['bbox_pred'], boxes, dets.labels)

    def level_gradient(self) -> 'SABLRoIGradient':
        return SABLRoIGradient(self)

    def candidates(self, outs, metainfo: dict, score_thr: float,
                   detections: Optional[Detections] = None) -> Candidates:
        """Every RoI before the score threshold and NMS (see :meth:`_sabl_candidates`)."""
        return self._sabl_candidates(outs, metainfo, score_thr, detections)


class SABLRoIGradient(RoIGradient):
    """:class:`~.two_stage.RoIGradient` with SABL's score: one backward through ``SABLHead``
    (both branches) for all detections, then RoIAlign's own backward per detection."""

    def __call__(self, feat: torch.Tensor, level: int, dets: Detections) -> torch.Tensor:
        adapter = self.adapter
        layer = adapter.extractor.roi_layers[level]
        base = feat.detach()
        boxes = dets.rois[:, -1].to(base)
        rois = torch.cat([base.new_zeros((len(dets), 1)), boxes], 1)
        with torch.enable_grad():
            pooled = layer(base, rois).detach().requires_grad_(True)
            roi_head = adapter.roi_head
            x = roi_head.shared_head(pooled) if roi_head.with_shared_head else pooled
            cls_score, bbox_pred = roi_head.bbox_head(x)
            score = adapter._rescore(cls_score, bbox_pred, boxes, dets.labels)
            (grad, ) = torch.autograd.grad(score.sum(), pooled)
            leaf = base.clone().requires_grad_(True)
            out = [torch.autograd.grad(layer(leaf, rois[k:k + 1]), leaf, grad[k:k + 1])[0][0]
                   for k in range(len(dets))]
        return torch.stack(out) if out else base.new_zeros((0, *base.shape[1:]))


@ADAPTERS.register_module()
class SABLCascadeRCNNAdapter(_SABLRoIScores, CascadeRCNNAdapter):
    """``CascadeRoIHead`` with a ``SABLHead`` at every stage (SABL Cascade R-CNN).

    Score of a detection (RoI i, class c)::

        softmax(mean_s cls_score_s(roi_s[i]))[c] * confidence_S(roi_S[i])

    ``roi_s`` being stage s's RoIs (refined by the stages before with the bucketing coder),
    the confidence the last stage's, as ``CascadeRoIHead.predict_bbox`` and
    ``SABLHead._predict_by_feat_single`` compute them. Stages may pool one detection from
    several levels: maps take the engine's exact route.
    """

    head_types = ('CascadeRoIHead', )
    excluded_types = ('HybridTaskCascadeRoIHead', 'SCNetRoIHead')
    detectors = 'SABL Cascade R-CNN'
    doc_score = ('softmax(mean over stages of cls_s[i])[c] · the last stage\'s bucketing '
                 'confidence')

    #: What the adapter runs of every stage's ``SABLHead``.
    stage_relies_on = SABLFasterRCNNAdapter.relies_on

    @classmethod
    def accepts(cls, model: nn.Module) -> bool:
        from mmdet.models.roi_heads import CascadeRoIHead
        from mmdet.models.roi_heads.bbox_heads import SABLHead

        roi_head = model.roi_head
        extractors = roi_head.bbox_roi_extractor
        return (getattr(model, 'rpn_head', None) is not None
                and not _overrides(type(roi_head), CascadeRoIHead,
                                   ('predict', 'predict_bbox', '_refine_roi', '_bbox_forward'))
                and all(isinstance(h, SABLHead)
                        and not _overrides(type(h), SABLHead, cls.stage_relies_on)
                        for h in roi_head.bbox_head)
                and all(type(e) is type(extractors[0])
                        and e.featmap_strides == extractors[0].featmap_strides
                        for e in extractors))

    def scores(self, outs, dets: Detections) -> torch.Tensor:
        """(K,) the mean of the stages' logits, each on its own RoI, through the softmax,
        times the last stage's bucketing confidence on the last RoI."""
        if len(dets) == 0:
            return outs.feats[0].new_zeros((0, ))
        feats = tuple(outs.feats)
        logits, bbox_pred = [], None
        for stage in range(self.roi_head.num_stages):
            boxes = dets.rois[:, stage].to(feats[0])
            roi = torch.cat([boxes.new_zeros((len(boxes), 1)), boxes], 1)
            res = self.roi_head._bbox_forward(stage, feats, roi)
            logits.append(res['cls_score'])
            bbox_pred = res['bbox_pred']
        return self._rescore(sum(logits) / float(len(logits)), bbox_pred,
                             dets.rois[:, -1].to(feats[0]), dets.labels)

    def candidates(self, outs, metainfo: dict, score_thr: float,
                   detections: Optional[Detections] = None) -> Candidates:
        """Every RoI before the score threshold and NMS (see :meth:`_sabl_candidates`)."""
        return self._sabl_candidates(outs, metainfo, score_thr, detections)
