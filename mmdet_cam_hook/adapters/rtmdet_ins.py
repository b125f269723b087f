"""RTMDet-Ins (``RTMDetInsHead``, ``RTMDetInsSepBNHead``): RTMDet's boxes plus a mask from
dynamic convolutions on a shared prototype map.

The head's forward returns ``(cls_scores, bbox_preds, kernel_preds, mask_feat)``: per level the
class logits, the box distances and each prior's dynamic-conv parameters; and one prototype map
``mask_feat`` at the finest stride (8), fused from every level by ``MaskFeatModule``.

Boxes: ``RTMDetInsHead._predict_by_feat_single`` runs ``BaseDenseHead``'s per-level filter
(``filter_scores_and_topk``, with the kernels carried along) and its
``_bbox_mask_post_process`` is ``BaseDenseHead._bbox_post_process`` (rescale, score factors,
minimum size, NMS, ``max_per_img``) followed by the masks. So :class:`~.dense.DenseAdapter`'s
decoding, on the first two outputs, gives the same boxes, labels, scores and order, with each
box's prior carried through NMS; tests check it against ``model.predict``. The class score is
RTMDet's, ``σ(cls[c])`` at the prior, and its window is RTMDet's too (the class branch of the
prior's own level: the mask and kernel branches do not reach it), so :class:`RTMDetInsAdapter`
is :class:`~.rtmdet.RTMDetAdapter` with the outputs split differently.

Masks (:class:`RTMDetInsMaskBranch`): the prior's kernel (``kernel_preds[l][0, :, y, x]``) as
three 1x1 convs on ``[relative coordinates, mask_feat]`` (the head's own
``_mask_predict_by_feat_single``) gives the mask logits on ``mask_feat``'s grid; mmdet then
upsamples them by the stride, resizes to the original image and thresholds the sigmoid. The
mask target lives on ``mask_feat``'s grid, before that upsampling: the mask logits mix every
level (``mask_feat``) with the prior's own level (the kernel), so the branch's route is
``exact`` (one full backward per instance).
"""
import math
from typing import List

import torch
import torch.nn.functional as F

from .base import ADAPTERS, Detections
from .dense import DenseAdapter
from .masks import MaskBranch, mask_target, register_mask_branch
from .rtmdet import RTMDetAdapter

__all__ = ['RTMDetInsAdapter', 'RTMDetInsMaskBranch']

#: The head methods both the adapter and the mask branch re-run or mirror.
_INS_METHODS = ('forward', 'forward_single', 'predict', 'predict_by_feat',
                '_predict_by_feat_single', '_bbox_post_process', '_bbox_mask_post_process',
                '_mask_predict_by_feat_single', 'parse_dynamic_params')


@ADAPTERS.register_module()
class RTMDetInsAdapter(RTMDetAdapter):
    """``RTMDetInsHead`` (convs shared by levels) and ``RTMDetInsSepBNHead`` (per-level convs,
    or convs shared with per-level BatchNorm): RTMDet's class score and window on the first
    two of the head's four outputs (see the module docstring)."""

    head_types = ('RTMDetInsHead', 'RTMDetInsSepBNHead')
    excluded_types = ()
    relies_on = _INS_METHODS
    family = 'RTMDet-Ins'
    detectors = 'RTMDet-Ins'

    def _split(self, outs: tuple):
        """(cls_scores, bbox_preds, None): the kernels and ``mask_feat`` are the masks'."""
        return outs[0], outs[1], None

    def level_roots(self, level: int) -> List[str]:
        roots = super().level_roots(level)
        if self._sep:
            roots += [f'bbox_head.{n}.{level}' for n in ('kernel_convs', 'rtm_kernel')]
        return roots


@register_mask_branch
class RTMDetInsMaskBranch(MaskBranch):
    """The masks of :class:`RTMDetInsAdapter`'s instances (see the module docstring).

    Mask target of instance i: ``mask_target(σ(m_i), mask_thr_binary)`` with ``m_i`` the
    (h, w) mask logits on ``mask_feat``'s grid (stride 8, before mmdet's upsampling), from the
    live ``mask_feat`` and the live kernel of the instance's own prior.
    """

    #: Mixes every level (``mask_feat``) with the prior's level (its kernel): full backward.
    route = 'exact'
    doc_target = ('mean of σ(mask logits) over its own binary mask (σ ≥ `mask_thr_binary`) on '
                  "`mask_feat`'s stride-8 grid (before mmdet's upsampling), the logits from "
                  "its own prior's dynamic kernel")

    adapter_type = RTMDetInsAdapter
    #: The head predicts the masks too (``bbox_head``, an ``RTMDetInsHead``).
    mask_head_path = 'head'
    thr_key = 'mask_thr_binary'

    def _kernels_and_priors(self, outs, dets: Detections):
        """(K, num_gen_params) the kernel at each instance's prior (differentiable) and
        (K, 4) its prior ``(x, y, stride_w, stride_h)``, as ``_predict_by_feat_single`` hands
        them to ``_mask_predict_by_feat_single``."""
        head = self.mask_head
        kernel_preds = outs[2]
        sizes = [tuple(k.shape[-2:]) for k in kernel_preds]
        priors = head.prior_generator.grid_priors(sizes, dtype=kernel_preds[0].dtype,
                                                  device=kernel_preds[0].device,
                                                  with_stride=True)
        kernels = DenseAdapter._per_level(
            dets, kernel_preds[0], lambda lv, d: kernel_preds[lv][0][:, d.ys, d.xs].t())
        points = DenseAdapter._per_level(
            dets, priors[0], lambda lv, d: priors[lv][d.ys * sizes[lv][1] + d.xs])
        return kernels, points

    def logits(self, outs, dets: Detections) -> torch.Tensor:
        """(K, h, w) mask logits on ``mask_feat``'s grid, with the head's own dynamic convs."""
        mask_feat = outs[3][0]
        if len(dets) == 0:
            return mask_feat.new_zeros((0, *mask_feat.shape[-2:]))
        kernels, priors = self._kernels_and_priors(outs, dets)
        return self.mask_head._mask_predict_by_feat_single(mask_feat, kernels, priors)

    def scores(self, outs, dets: Detections, metainfo: dict) -> torch.Tensor:
        return mask_target(self.logits(outs, dets).sigmoid(), self._thr)

    @torch.no_grad()
    def masks(self, outs, dets: Detections, metainfo: dict) -> torch.Tensor:
        """(K, H, W) bool: the mask steps of ``_bbox_mask_post_process`` (``rescale=True``, as
        ``model.predict`` runs it) on the instances' logits."""
        ori_h, ori_w = metainfo['ori_shape'][:2]
        if len(dets) == 0:
            return torch.zeros((0, ori_h, ori_w), dtype=torch.bool, device=dets.bboxes.device)
        outs = (outs[0], outs[1], [k.detach() for k in outs[2]], outs[3].detach())
        stride = self.mask_head.prior_generator.strides[0][0]
        logits = F.interpolate(self.logits(outs, dets).unsqueeze(0), scale_factor=stride,
                               mode='bilinear')
        # mmdet's own (inverse) scale factor, the width's applied to the height as it does
        scale = [1 / s for s in metainfo['scale_factor']]
        logits = F.interpolate(logits, size=[math.ceil(logits.shape[-2] * scale[0]),
                                             math.ceil(logits.shape[-1] * scale[1])],
                               mode='bilinear', align_corners=False)[..., :ori_h, :ori_w]
        return logits.sigmoid().squeeze(0) > self._thr

