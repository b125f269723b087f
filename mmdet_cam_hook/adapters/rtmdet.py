"""RTMDet (``RTMDetHead``, ``RTMDetSepBNHead``): score ``sigmoid(cls[label])`` at one prior.

Decoding is :class:`~.dense.DenseAdapter`'s (``BaseDenseHead._predict_by_feat_single``, which
RTMDet does not override, re-run with the prior index carried through ``filter_scores_and_topk``
and the head's own ``_bbox_post_process``); only the level modules and the window are RTMDet's.

With ``with_objectness`` the head's cls output is already
``inverse_sigmoid(sigmoid_geometric_mean(cls, obj))``, so ``sigmoid`` of the output is still the
reported score; the window then covers the reg branch and ``rtm_obj`` too.
"""
from typing import List, Optional

import torch
from torch import nn

from .base import ADAPTERS, Detections
from .dense import DenseAdapter


@ADAPTERS.register_module()
class RTMDetAdapter(DenseAdapter):
    """``RTMDetHead`` (convs shared by levels) and ``RTMDetSepBNHead`` (per-level convs, or
    convs shared with per-level BatchNorm): outputs ``(cls_scores, bbox_preds)`` per level.
    The window is 5x5 in mmdet's configs (two 3x3 convs, 1x1 predictor)."""

    head_types = ('RTMDetHead', 'RTMDetSepBNHead')
    required_hooks = ('PipelineSwitchHook', 'EMAHook')
    excluded_types = ('RTMDetInsHead', )
    family = 'RTMDet'
    detectors = 'RTMDet'
    doc_score = 'σ(cls[c])'
    doc_layers = '`neck.out_convs.{0,1,2}` (strides 8, 16, 32)'
    doc_route = 'local, 5x5 window (radius 2)'

    @property
    def _sep(self) -> bool:
        return isinstance(self.head.rtm_cls, nn.ModuleList)

    def level_roots(self, level: int) -> List[str]:
        roots = super().level_roots(level)
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

    def _score_branches(self, level: int) -> Optional[List[List[nn.Module]]]:
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
