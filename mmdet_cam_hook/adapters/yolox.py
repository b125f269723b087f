"""YOLOX: score ``sigmoid(cls[label]) * sigmoid(obj)`` at one prior, per-level head modules.

``YOLOXHead.predict_by_feat`` is re-run for one image with the flat prior index of each
candidate riding in the ``InstanceData`` through the head's own ``_bbox_post_process`` (NMS
keeps extra fields), so each kept box knows its exact prior (no IoU matching).
"""
import copy
from typing import List, Optional

import torch
from mmengine.structures import InstanceData
from torch import nn

from .base import ADAPTERS, Detections, DetectorAdapter, locate_priors
from .candidates import Candidates, dense_candidates, record_post_process, rescaled


def sort_and_locate(results: InstanceData, score_thr: float, sizes,
                    num_base_priors: int = 1) -> Detections:
    """Final filter at ``score_thr``, stable sort by score (descending), and the prior of each
    kept box from its ``prior_idx`` field."""
    results = results[results.scores >= score_thr]
    results = results[results.scores.argsort(descending=True, stable=True)]
    levels, ys, xs, anchors = locate_priors(results.prior_idx, sizes, num_base_priors)
    return Detections(results.bboxes, results.scores, results.labels, levels, ys, xs, anchors)


@ADAPTERS.register_module()
class YOLOXAdapter(DetectorAdapter):
    """``YOLOXHead``: outputs ``(cls_scores, bbox_preds, objectnesses)`` per level."""

    head_types = ('YOLOXHead', )
    family = 'YOLOX'
    detectors = 'YOLOX'
    doc_score = 'σ(cls[c]) · σ(obj)'
    doc_layers = '`neck.out_convs.{0,1,2}` (strides 8, 16, 32)'
    doc_route = 'local, 5x5 window (radius 2)'
    required_hooks = ('YOLOXModeSwitchHook', 'EMAHook')

    def decode(self, outs: tuple, metainfo: dict, score_thr: float) -> Detections:
        head = self.head
        cls_scores, bbox_preds, objectnesses = (tuple(t.detach() for t in o) for o in outs)
        cfg = copy.deepcopy(head.test_cfg)
        pre_thr = min(float(cfg.get('score_thr', 0.0)), float(score_thr))
        sizes = [tuple(c.shape[2:]) for c in cls_scores]
        priors = torch.cat(head.prior_generator.grid_priors(
            sizes, dtype=cls_scores[0].dtype, device=cls_scores[0].device, with_stride=True))
        cls = torch.cat([c[0].permute(1, 2, 0).reshape(-1, c.shape[1])
                         for c in cls_scores]).sigmoid()
        reg = torch.cat([b[0].permute(1, 2, 0).reshape(-1, 4) for b in bbox_preds])
        obj = torch.cat([o[0].permute(1, 2, 0).reshape(-1) for o in objectnesses]).sigmoid()
        bboxes = head._bbox_decode(priors, reg[None])[0]
        max_scores, labels = cls.max(1)
        valid = obj * max_scores >= pre_thr
        results = InstanceData(bboxes=bboxes[valid], scores=(max_scores * obj)[valid],
                               labels=labels[valid], prior_idx=valid.nonzero()[:, 0])
        results = head._bbox_post_process(results, cfg, rescale=True, with_nms=True,
                                          img_meta=metainfo)
        return sort_and_locate(results, score_thr, sizes)

    def scores(self, outs: tuple, dets: Detections) -> torch.Tensor:
        cls_scores, _, objectnesses = outs
        if len(dets) == 0:
            return cls_scores[0].new_zeros((0, ))
        return torch.stack([
            cls_scores[l][0, c, y, x].sigmoid() * objectnesses[l][0, 0, y, x].sigmoid()
            for l, c, y, x in zip(dets.levels.tolist(), dets.labels.tolist(), dets.ys.tolist(),
                                  dets.xs.tolist())
        ])

    def level_roots(self, level: int) -> List[str]:
        names = ('multi_level_cls_convs', 'multi_level_reg_convs', 'multi_level_conv_cls',
                 'multi_level_conv_reg', 'multi_level_conv_obj')
        return [self.level_layers()[level]] + [f'bbox_head.{n}.{level}' for n in names]

    def window_branches(self, level: int) -> Optional[List[List[nn.Module]]]:
        head = self.head
        return [[*head.multi_level_cls_convs[level], head.multi_level_conv_cls[level]],
                [*head.multi_level_reg_convs[level], head.multi_level_conv_obj[level]]]

    def window_scores(self, level: int, windows: torch.Tensor, dets: Detections) -> torch.Tensor:
        cls_branch, obj_branch = self.window_branches(level)
        cls, obj = windows, windows
        for module in cls_branch:
            cls = module(cls)
        for module in obj_branch:
            obj = module(obj)
        c = cls.shape[-1] // 2
        idx = torch.arange(len(dets), device=windows.device)
        return cls[idx, dets.labels, c, c].sigmoid() * obj[:, 0, c, c].sigmoid()

    # ------------------------------------------------------------------ (e) candidates
    def candidates(self, outs: tuple, metainfo: dict, score_thr: float,
                   detections: Optional[Detections] = None) -> Candidates:
        """Every prior before the score threshold and NMS: the box :meth:`decode` decodes
        (``_bbox_decode``, rescaled by the head's post-process), ``sigmoid(cls[c]) *
        sigmoid(obj)`` for every class (only the best class of a prior goes into NMS), and the
        pairs that did, recorded from :meth:`decode` (see :meth:`DetectorAdapter.candidates`).
        """
        head = self.head
        with record_post_process(head) as seen:
            dets = self.decode(outs, metainfo, score_thr)
        cls_scores, bbox_preds, objectnesses = (tuple(t.detach() for t in o) for o in outs)
        sizes = [tuple(c.shape[2:]) for c in cls_scores]
        with torch.no_grad():
            priors = torch.cat(head.prior_generator.grid_priors(
                sizes, dtype=cls_scores[0].dtype, device=cls_scores[0].device,
                with_stride=True))
            cls = torch.cat([c[0].permute(1, 2, 0).reshape(-1, c.shape[1])
                             for c in cls_scores]).sigmoid()
            reg = torch.cat([b[0].permute(1, 2, 0).reshape(-1, 4) for b in bbox_preds])
            obj = torch.cat([o[0].permute(1, 2, 0).reshape(-1) for o in objectnesses]).sigmoid()
            boxes = rescaled(head, head._bbox_decode(priors, reg[None])[0], metainfo)
        pre_thr = min(float(head.test_cfg.get('score_thr', 0.0)), float(score_thr))
        return dense_candidates(boxes, cls * obj[:, None], seen,
                                dets if detections is None else detections, sizes, 1, pre_thr,
                                head.test_cfg)
