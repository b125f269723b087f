"""YOLOv3 (``YOLOV3Head``): three anchors per location, sigmoid class times sigmoid
objectness, decoded by the head's own ``predict_by_feat`` (all levels flattened together, an
objectness ``conf_thr`` pre-filter, one global top-k)."""
from typing import List, Optional

import torch
from mmengine.structures import InstanceData
from torch import nn

from .base import ADAPTERS, Detections
from .candidates import Candidates, dense_candidates, record_post_process, rescaled
from .dense import DenseAdapter


@ADAPTERS.register_module()
class YOLOv3Adapter(DenseAdapter):
    """``YOLOV3Head``: one prediction map per level with ``A * (5 + C)`` channels
    (per anchor: x, y, w, h, objectness, C class logits). Levels follow the head's order:
    level 0 is the coarsest (stride 32 in mmdet's configs).

    Score of the detection with label ``c`` at prior ``(l, y, x, a)``, ``n = 5 + C``::

        sigmoid(pred_maps[l][0, a*n + 5 + c, y, x]) * sigmoid(pred_maps[l][0, a*n + 4, y, x])

    The head is ``convs_bridge[l]`` (3x3 conv, BN, LeakyReLU) then ``convs_pred[l]`` (1x1), per
    level: with BN in eval the score reads a 3x3 window (radius 1) of the level's map, exactly.
    """

    head_types = ('YOLOV3Head', )
    family = 'YOLOv3'
    detectors = 'YOLOv3'
    doc_score = 'σ(cls[a, c]) · σ(obj[a]), one of 3 anchors'
    doc_layers = '`neck.detect{1,2,3}` (strides 32, 16, 8)'
    doc_route = ('`detect3`: local, 3x3 window (radius 1); `detect1`, `detect2` also feed finer '
                 'levels: chain')

    def _num_levels(self) -> int:
        return self.head.num_levels

    def decode(self, outs: tuple, metainfo: dict, score_thr: float) -> Detections:
        """``YOLOV3Head.predict_by_feat`` for image 0 with the prior index carried: the flat
        index (all levels) of a kept box is ``conf_inds.nonzero()[keep_idxs]``.

        Both the objectness pre-filter ``conf_thr`` (if set) and the class-score filter are
        lowered to ``score_thr`` when it is smaller (a score ``sigmoid(cls)*sigmoid(obj)``
        never exceeds its objectness).
        """
        from mmdet.models.utils import filter_scores_and_topk

        head = self.head
        (pred_maps, ) = outs
        cfg = self._pre_cfg(score_thr)
        if cfg.get('conf_thr', -1) > 0:
            cfg.conf_thr = min(float(cfg.conf_thr), float(score_thr))
        featmap_sizes = [p.shape[-2:] for p in pred_maps]
        mlvl_anchors = head.prior_generator.grid_priors(featmap_sizes,
                                                        device=pred_maps[0].device)
        flatten_preds, flatten_strides = [], []
        for pred, stride in zip(pred_maps, head.featmap_strides):
            # a copy: mmdet sigmoids x, y in place (on a view of the map when it is 1x1)
            pred = pred[0:1].detach().clone().permute(0, 2, 3, 1).reshape(1, -1, head.num_attrib)
            pred[..., :2].sigmoid_()
            flatten_preds.append(pred)
            flatten_strides.append(pred.new_tensor(stride).expand(pred.size(1)))
        flatten_preds = torch.cat(flatten_preds, dim=1)
        flatten_bbox_preds = flatten_preds[..., :4]
        flatten_objectness = flatten_preds[..., 4].sigmoid()
        flatten_cls_scores = flatten_preds[..., 5:].sigmoid()
        flatten_anchors = torch.cat(mlvl_anchors)
        flatten_strides = torch.cat(flatten_strides)
        bboxes = head.bbox_coder.decode(flatten_anchors, flatten_bbox_preds,
                                        flatten_strides.unsqueeze(-1))[0]
        scores, objectness = flatten_cls_scores[0], flatten_objectness[0]
        prior_idx = torch.arange(len(scores), device=scores.device)
        conf_thr = cfg.get('conf_thr', -1)
        if conf_thr > 0:
            conf_inds = objectness >= conf_thr
            bboxes, scores = bboxes[conf_inds, :], scores[conf_inds, :]
            objectness, prior_idx = objectness[conf_inds], prior_idx[conf_inds]
        scores, labels, keep_idxs, _ = filter_scores_and_topk(
            scores, cfg.get('score_thr', 0), cfg.get('nms_pre', -1))
        results = InstanceData(scores=scores, labels=labels, bboxes=bboxes[keep_idxs],
                               score_factors=objectness[keep_idxs],
                               prior_idx=prior_idx[keep_idxs])
        results = head._bbox_post_process(results=results, cfg=cfg, rescale=True,
                                          with_nms=True, img_meta=metainfo)
        return self._locate(results, score_thr, [tuple(s) for s in featmap_sizes])

    def scores(self, outs: tuple, dets: Detections) -> torch.Tensor:
        """(K,) differentiable ``sigmoid(cls) * sigmoid(obj)`` from the live prediction maps."""
        (pred_maps, ) = outs

        def read(level: int, d: Detections) -> torch.Tensor:
            pred = pred_maps[level][0]
            attrs = pred.reshape(-1, self.head.num_attrib, *pred.shape[-2:])
            return self._attr_score(attrs[d.anchors, :, d.ys, d.xs], d.labels)

        return self._per_level(dets, pred_maps[0], read)

    @staticmethod
    def _attr_score(attrs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """``sigmoid(cls[label]) * sigmoid(obj)`` from (K, 5 + C) per-anchor attributes."""
        return attrs[:, 5:].gather(1, labels[:, None])[:, 0].sigmoid() * attrs[:, 4].sigmoid()

    def _score_branches(self, level: int) -> Optional[List[List[nn.Module]]]:
        return [[self.head.convs_bridge[level], self.head.convs_pred[level]]]

    def _read_window(self, outs: List[torch.Tensor], dets: Detections) -> torch.Tensor:
        k = torch.arange(len(dets), device=outs[0].device)
        attrs = outs[0].reshape(len(dets), -1, self.head.num_attrib)[k, dets.anchors]
        return self._attr_score(attrs, dets.labels)

    def candidates(self, outs: tuple, metainfo: dict, score_thr: float,
                   detections: Optional[Detections] = None) -> Candidates:
        """Every anchor before the thresholds and NMS: the box :meth:`decode` decodes (rescaled
        by the head's post-process), ``sigmoid(cls[c]) * sigmoid(obj)`` for every class, and
        the pairs that went into NMS (past ``conf_thr``, the class filter and the global
        top-k), recorded from :meth:`decode`."""
        head = self.head
        with record_post_process(head) as seen:
            dets = self.decode(outs, metainfo, score_thr)
        (pred_maps, ) = outs
        sizes = [tuple(p.shape[-2:]) for p in pred_maps]
        with torch.no_grad():
            anchors = torch.cat(head.prior_generator.grid_priors(sizes,
                                                                 device=pred_maps[0].device))
            preds, strides = [], []
            for pred, stride in zip(pred_maps, head.featmap_strides):
                pred = pred[0].detach().permute(1, 2, 0).reshape(-1, head.num_attrib).clone()
                pred[:, :2] = pred[:, :2].sigmoid()
                preds.append(pred)
                strides.append(pred.new_tensor(stride).expand(len(pred)))
            preds = torch.cat(preds)
            boxes = head.bbox_coder.decode(anchors, preds[:, :4], torch.cat(strides)[:, None])
            scores = preds[:, 5:].sigmoid() * preds[:, 4:5].sigmoid()
            boxes = rescaled(head, boxes, metainfo)
        return dense_candidates(boxes, scores, seen, dets if detections is None else detections,
                                sizes, self.num_base_priors, self._pre_cfg(score_thr).score_thr,
                                head.test_cfg)
