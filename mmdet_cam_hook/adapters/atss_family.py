"""Heads built on ATSS's (``ATSSHead`` subclasses) with their own quality scores: PAA (score
voting; LAD's student), TOOD (task-aligned probabilities), VFNet (IoU-aware classification on
star-deformable features)."""
from typing import List

import torch
from mmengine.structures import InstanceData

from .base import ADAPTERS, Detections
from .dense import DenseAdapter
from .fcos import ATSSAdapter


@ADAPTERS.register_module()
class PAAAdapter(ATSSAdapter):
    """``PAAHead``: the head's own ``_predict_by_feat_single`` (top-k on
    ``sqrt(σ(cls) · σ(iou))``) and ``_bbox_post_process`` (NMS on that score, then score
    voting).

    Score of the detection with label ``c`` at prior ``(l, y, x, a)``::

        sqrt(sigmoid(cls_scores[l][0, a*C + c, y, x]) * sigmoid(iou_preds[l][0, a, y, x]))

    Score voting replaces each kept box by an IoU- and score-weighted mean of the candidate
    boxes of its class, and keeps the kept box's score: the score is still one prior's, the
    prior that won NMS (carried with ``multiclass_nms(..., return_inds=True)``). GroupNorm in
    mmdet's configs: no window (exact route). ``LADHead`` (label assignment distillation) is a
    PAA student that changes only the training.
    """

    head_types = ('PAAHead', 'LADHead')
    family = 'PAA'
    detectors = 'PAA, LAD (the PAA student)'
    doc_score = '√(σ(cls[a, c]) · σ(iou[a])), box by score voting'
    doc_layers = '`neck.fpn_convs.{0..4}`'
    doc_route = 'exact (GroupNorm head)'

    def _level_results(self, cls_score_list, bbox_pred_list, score_factor_list, mlvl_priors,
                       img_meta: dict, cfg) -> InstanceData:
        """``PAAHead._predict_by_feat_single`` up to ``_bbox_post_process``: per level the
        ``nms_pre`` priors with the highest ``sqrt(σ(cls) · σ(iou))``, with ``prior_idx``."""
        head = self.head
        nms_pre = cfg.get('nms_pre', -1)
        bboxes, scores, factors, prior_idx = [], [], [], []
        start = 0
        for cls_score, bbox_pred, factor, priors in zip(cls_score_list, bbox_pred_list,
                                                        score_factor_list, mlvl_priors):
            prob = cls_score.permute(1, 2, 0).reshape(-1, head.cls_out_channels).sigmoid()
            bbox_pred = bbox_pred.permute(1, 2, 0).reshape(-1, 4)
            factor = factor.permute(1, 2, 0).reshape(-1).sigmoid()
            idx = torch.arange(len(prob), device=prob.device)
            if 0 < nms_pre < prob.shape[0]:
                _, idx = (prob * factor[:, None]).sqrt().max(dim=1)[0].topk(nms_pre)
            bboxes.append(head.bbox_coder.decode(priors[idx], bbox_pred[idx],
                                                 max_shape=img_meta['img_shape']))
            scores.append(prob[idx])
            factors.append(factor[idx])
            prior_idx.append(idx + start)
            start += len(priors)
        return InstanceData(bboxes=torch.cat(bboxes), scores=torch.cat(scores),
                            score_factors=torch.cat(factors), prior_idx=torch.cat(prior_idx))

    def decode(self, outs: tuple, metainfo: dict, score_thr: float) -> Detections:
        """``PAAHead``'s decoding, with the prior of each kept box through NMS and voting."""
        from mmdet.models.layers import multiclass_nms

        head = self.head
        cls_scores, bbox_preds, factors = self._split(outs)
        sizes = [tuple(c.shape[-2:]) for c in cls_scores]
        priors = head.prior_generator.grid_priors(sizes, dtype=cls_scores[0].dtype,
                                                  device=cls_scores[0].device)
        cfg = self._pre_cfg(score_thr)
        res = self._level_results([c[0].detach() for c in cls_scores],
                                  [b[0].detach() for b in bbox_preds],
                                  [f[0].detach() for f in factors], priors, metainfo, cfg)
        # PAAHead._bbox_post_process, with return_inds
        bboxes = res.bboxes / res.bboxes.new_tensor(metainfo['scale_factor']).repeat((1, 2))
        padded = torch.cat([res.scores, res.scores.new_zeros(len(res.scores), 1)], dim=1)
        nms_scores = (padded * res.score_factors[:, None]).sqrt()
        dets, labels, inds = multiclass_nms(bboxes, nms_scores, cfg.score_thr, cfg.nms,
                                            cfg.max_per_img, return_inds=True)
        prior_idx = res.prior_idx[inds // head.cls_out_channels]
        if head.with_score_voting and len(dets) > 0:
            # score_voting returns the kept boxes class by class, each class in NMS order
            order = torch.cat([(labels == c).nonzero()[:, 0]
                               for c in range(head.cls_out_channels)])
            dets, labels = head.score_voting(dets, labels, bboxes, nms_scores, cfg.score_thr)
            prior_idx = prior_idx[order]
        results = InstanceData(bboxes=dets[:, :-1], scores=dets[:, -1], labels=labels,
                               prior_idx=prior_idx)
        return self._locate(results, score_thr, sizes)

    def _read(self, cls_map, factor_map, dets: Detections) -> torch.Tensor:
        return super()._read(cls_map, factor_map, dets).sqrt()

    def _read_window(self, outs: List[torch.Tensor], dets: Detections) -> torch.Tensor:
        return super()._read_window(outs, dets).sqrt()


@ADAPTERS.register_module()
class TOODAdapter(DenseAdapter):
    """``TOODHead`` (anchor-free or anchor-based): its cls output is already a probability,
    ``sqrt(σ(cls_logits) · σ(cls_prob))`` (``sigmoid_geometric_mean``), and its box output is
    already decoded (in stride units, refined by deformable sampling).

    Score of the detection with label ``c`` at prior ``(l, y, x, a)``::

        cls_scores[l][0, a*C + c, y, x]

    The task decomposition averages each level's map over all positions: no window (exact).
    """

    head_types = ('TOODHead', )
    family = 'TOOD'
    detectors = 'TOOD'
    doc_score = 'cls[a, c] = √(σ(cls) · σ(prob)) (task-aligned)'
    doc_layers = '`neck.fpn_convs.{0..4}`'
    doc_route = 'exact (global pooling, GroupNorm, deformable sampling)'

    def _level_results(self, cls_score_list, bbox_pred_list, score_factor_list, mlvl_priors,
                       img_meta: dict, cfg) -> InstanceData:
        """``TOODHead._predict_by_feat_single`` up to ``_bbox_post_process`` (boxes are the
        head's, times the stride), with ``prior_idx``."""
        from mmdet.models.utils import filter_scores_and_topk

        head = self.head
        nms_pre = cfg.get('nms_pre', -1)
        bboxes, scores, labels, prior_idx = [], [], [], []
        start = 0
        for cls_score, bbox_pred, priors, stride in zip(
                cls_score_list, bbox_pred_list, mlvl_priors, head.prior_generator.strides):
            bbox_pred = bbox_pred.permute(1, 2, 0).reshape(-1, 4) * stride[0]
            prob = cls_score.permute(1, 2, 0).reshape(-1, head.cls_out_channels)
            prob, label, keep, filtered = filter_scores_and_topk(
                prob, cfg.score_thr, nms_pre, dict(bbox_pred=bbox_pred, priors=priors))
            bboxes.append(filtered['bbox_pred'])
            scores.append(prob)
            labels.append(label)
            prior_idx.append(keep + start)
            start += len(priors)
        return InstanceData(bboxes=torch.cat(bboxes), scores=torch.cat(scores),
                            labels=torch.cat(labels), prior_idx=torch.cat(prior_idx))

    def _prob(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return logits.gather(1, labels[:, None])[:, 0]


@ADAPTERS.register_module()
class VFNetAdapter(DenseAdapter):
    """``VFNetHead``: ``BaseDenseHead``'s decoding of the IoU-aware classification score (the
    varifocal target is the IoU) and the refined boxes; no score factor.

    Score of the detection with label ``c`` at ``(l, y, x)``::

        sigmoid(cls_scores[l][0, c, y, x])

    The class map is read from a star-shaped deformable conv whose offsets come from the first
    box prediction (the regression tower): no window (exact route).
    """

    head_types = ('VFNetHead', )
    family = 'VFNet'
    detectors = 'VarifocalNet'
    doc_score = 'σ(cls[c]), IoU-aware (varifocal)'
    doc_layers = '`neck.fpn_convs.{0..4}`'
    doc_route = 'exact (deformable conv, GroupNorm)'
