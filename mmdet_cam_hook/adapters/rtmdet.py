"""RTMDet (``RTMDetHead``, ``RTMDetSepBNHead``): score ``sigmoid(cls[label])`` at one prior.

Decoding is ``BaseDenseHead._predict_by_feat_single`` (RTMDet does not override it) re-run for
one image with the flat prior index of each candidate carried through
``filter_scores_and_topk`` (its keep indices) and the head's own ``_bbox_post_process``.

TODO(merge): this per-level loop is the generic BaseDenseHead decode that
``adapters/dense.py`` (``DenseAdapter``) provides; when it lands, subclass it and keep only the
window and level modules here.

With ``with_objectness`` the head's cls output is already
``inverse_sigmoid(sigmoid_geometric_mean(cls, obj))``, so ``sigmoid`` of the output is still the
reported score; the window then covers the reg branch and ``rtm_obj`` too.
"""
import copy
from typing import List, Optional

import torch
from mmengine.structures import InstanceData
from torch import nn

from .base import ADAPTERS, Detections, DetectorAdapter
from .yolox import sort_and_locate


@ADAPTERS.register_module()
class RTMDetAdapter(DetectorAdapter):
    """``RTMDetHead`` (convs shared by levels) and ``RTMDetSepBNHead`` (per-level convs, or
    convs shared with per-level BatchNorm): outputs ``(cls_scores, bbox_preds)`` per level."""

    head_types = ('RTMDetHead', 'RTMDetSepBNHead')
    excluded_types = ('RTMDetInsHead', )

    @property
    def _sep(self) -> bool:
        return isinstance(self.head.rtm_cls, nn.ModuleList)

    def decode(self, outs: tuple, metainfo: dict, score_thr: float) -> Detections:
        from mmdet.models.utils import filter_scores_and_topk
        from mmdet.structures.bbox import cat_boxes

        head = self.head
        cls_scores, bbox_preds = (tuple(t[0].detach() for t in o) for o in outs[:2])
        cfg = copy.deepcopy(head.test_cfg)
        pre_thr = min(float(cfg.get('score_thr', 0.0)), float(score_thr))
        nms_pre = cfg.get('nms_pre', -1)
        sizes = [tuple(c.shape[-2:]) for c in cls_scores]
        mlvl_priors = head.prior_generator.grid_priors(
            sizes, dtype=cls_scores[0].dtype, device=cls_scores[0].device)
        preds, priors_out, scores_out, labels_out, idx_out = [], [], [], [], []
        start = 0
        for cls_score, bbox_pred, priors in zip(cls_scores, bbox_preds, mlvl_priors):
            bbox_pred = bbox_pred.permute(1, 2, 0).reshape(-1, head.bbox_coder.encode_size)
            scores = cls_score.permute(1, 2, 0).reshape(-1, head.cls_out_channels).sigmoid()
            prior_idx = torch.arange(start, start + len(priors), device=scores.device)
            start += len(priors)
            scores, labels, _, kept = filter_scores_and_topk(
                scores, pre_thr, nms_pre,
                dict(bbox_pred=bbox_pred, priors=priors, prior_idx=prior_idx))
            preds.append(kept['bbox_pred'])
            priors_out.append(kept['priors'])
            idx_out.append(kept['prior_idx'])
            scores_out.append(scores)
            labels_out.append(labels)
        bboxes = head.bbox_coder.decode(cat_boxes(priors_out), torch.cat(preds),
                                        max_shape=metainfo['img_shape'])
        results = InstanceData(bboxes=bboxes, scores=torch.cat(scores_out),
                               labels=torch.cat(labels_out), prior_idx=torch.cat(idx_out))
        results = head._bbox_post_process(results, cfg, rescale=True, with_nms=True,
                                          img_meta=metainfo)
        return sort_and_locate(results, score_thr, sizes, head.num_base_priors)

    def scores(self, outs: tuple, dets: Detections) -> torch.Tensor:
        cls_scores = outs[0]
        if len(dets) == 0:
            return cls_scores[0].new_zeros((0, ))
        num = self.head.cls_out_channels
        return torch.stack([
            cls_scores[l][0, a * num + c, y, x].sigmoid()
            for l, c, y, x, a in zip(dets.levels.tolist(), dets.labels.tolist(),
                                     dets.ys.tolist(), dets.xs.tolist(), dets.anchors.tolist())
        ])

    def level_roots(self, level: int) -> List[str]:
        roots = [self.level_layers()[level]]
        if self._sep:
            names = ['cls_convs', 'reg_convs', 'rtm_cls', 'rtm_reg']
            names += ['rtm_obj'] if self.head.with_objectness else []
            roots += [f'bbox_head.{n}.{level}' for n in names]
        return roots

    def _branch_modules(self, level: int):
        head = self.head
        if self._sep:
            cls = [*head.cls_convs[level], head.rtm_cls[level]]
            obj = [*head.reg_convs[level], head.rtm_obj[level]] if head.with_objectness else None
        else:
            cls = [*head.cls_convs, head.rtm_cls]
            obj = [*head.reg_convs, head.rtm_obj] if head.with_objectness else None
        return cls, obj

    def window_branches(self, level: int) -> Optional[List[List[nn.Module]]]:
        cls, obj = self._branch_modules(level)
        return [cls] if obj is None else [cls, obj]

    def window_scores(self, level: int, windows: torch.Tensor, dets: Detections) -> torch.Tensor:
        from mmdet.models.layers.transformer import inverse_sigmoid
        from mmdet.models.utils import sigmoid_geometric_mean

        cls_branch, obj_branch = self._branch_modules(level)
        cls = windows
        for module in cls_branch:
            cls = module(cls)
        if obj_branch is not None:
            obj = windows
            for module in obj_branch:
                obj = module(obj)
            cls = inverse_sigmoid(sigmoid_geometric_mean(cls, obj))
        c = cls.shape[-1] // 2
        idx = torch.arange(len(dets), device=windows.device)
        channel = dets.anchors * self.head.cls_out_channels + dets.labels
        return cls[idx, channel, c, c].sigmoid()
