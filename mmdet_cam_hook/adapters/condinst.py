"""CondInst and BoxInst (``CondInstBboxHead``, ``BoxInstBboxHead``; ``CondInstMaskHead``):
FCOS boxes whose every prior also predicts the parameters of a small dynamic mask head.

Boxes. ``CondInstBboxHead`` is an ``FCOSHead`` whose ``forward_single`` adds the controller's
parameter map and whose ``_predict_by_feat_single`` carries the parameters, points and strides
of each candidate through ``_bbox_post_process``. The scores and boxes are FCOS's (the
parameters ride along, they change nothing), so :class:`CondInstAdapter` re-runs FCOS's
per-level loop with the prior index riding through the head's own ``_bbox_post_process``
(NMS). ``SingleStageInstanceSegmentor.predict`` runs the box head with ``rescale=False`` and
lets the mask head rescale the boxes (``bboxes /= scale_factor``, in
``CondInstMaskHead._predict_by_feat_single``), which is what :meth:`CondInstAdapter.decode`
does too: a division, not ``_bbox_post_process``'s multiplication by ``1 / scale_factor``, so
the boxes are bit-equal to ``model.predict``'s.

Masks (:class:`CondInstMaskBranch`). Instance i's mask logits are the dynamic convolution
(``CondInstMaskHead.forward_single``: its prior's controller parameters, 1x1 convs with
ReLU, on the mask feature map concatenated with the relative coordinates of the prior's
point) at stride ``mask_out_stride`` (4); mmdet then takes the sigmoid, upsamples by 4, crops
to the image and resizes to the original size, ``> mask_thr``. The mask target is the mean of
the sigmoid over the instance's own binary mask (``>= mask_thr``) at stride 4, on the
unpadded part of the map. It reads the mask feature map, which mixes FPN levels 0-2, and the
prior's parameters on the prior's own level: route ``'exact'``.
"""
import math
from typing import List, Optional, Sequence

import torch
from mmengine.structures import InstanceData

from .base import ADAPTERS, Detections
from .candidates import Candidates, dense_candidates, flat_prior_index, record_post_process
from .dense import DenseAdapter
from .fcos import FCOSAdapter
from .masks import MaskBranch, mask_target, register_mask_branch

#: What the adapter and the mask branch run of ``CondInstMaskHead``: the mask feature module
#: (``forward``), the dynamic convolution and mmdet's mask post-processing (which also
#: rescales the boxes).
_MASK_HEAD_METHODS = ('forward', 'forward_single', 'predict', 'predict_by_feat',
                      '_predict_by_feat_single', 'parse_dynamic_params', 'dynamic_conv_forward')


def _plain_instance_segmentor(model) -> bool:
    """The detector predicts as ``SingleStageInstanceSegmentor`` does (box head with
    ``rescale=False``, then the mask head), with a mask head."""
    from mmdet.models.detectors.single_stage_instance_seg import SingleStageInstanceSegmentor

    return (isinstance(model, SingleStageInstanceSegmentor)
            and all(getattr(type(model), n) is getattr(SingleStageInstanceSegmentor, n)
                    for n in ('predict', 'extract_feat'))
            and bool(getattr(model, 'with_mask', False)))


def rescale_like_mask_head(bboxes: torch.Tensor, metainfo: dict) -> torch.Tensor:
    """Boxes on the network input to original-image pixels as mmdet's single-stage mask heads
    do it (``bboxes /= bboxes.new_tensor(scale_factor).repeat((1, 2))``)."""
    return bboxes / bboxes.new_tensor(metainfo['scale_factor']).repeat((1, 2))


@ADAPTERS.register_module()
class CondInstAdapter(FCOSAdapter):
    """``CondInstBboxHead`` (and ``BoxInstBboxHead``, which changes only its construction)
    under ``CondInst`` / ``BoxInst``.

    Score of the detection with label ``c`` at ``(l, y, x)``, as FCOS (mmdet multiplies the two
    sigmoids, its ``_bbox_post_process`` takes no square root)::

        sigmoid(cls_scores[l][0, c, y, x]) * sigmoid(centernesses[l][0, 0, y, x])

    Head outputs: the box head's four lists (classes, boxes, centerness, controller
    parameters) and the level maps themselves, from which the mask branch runs the mask
    feature module on the same forward pass. GroupNorm in mmdet's towers: no local window,
    the exact route; without norm, FCOS's exact 11x11 window.
    """

    head_types = ('CondInstBboxHead', )
    relies_on = DenseAdapter.relies_on
    relies_on_parts = {'mask_head': (('CondInstMaskHead', ), _MASK_HEAD_METHODS)}
    family = 'CondInst'
    detectors = 'CondInst, BoxInst'
    doc_score = 'σ(cls[c]) · σ(centerness)'
    doc_layers = '`neck.fpn_convs.{0..4}`'
    doc_route = 'exact (GroupNorm head)'

    @classmethod
    def accepts(cls, model) -> bool:
        return _plain_instance_segmentor(model)

    def head_outputs(self, feats: Sequence[torch.Tensor], metainfo=None) -> tuple:
        """``(cls_scores, bbox_preds, centernesses, param_preds, feats)``: the box head's
        outputs and the level maps (for the mask branch)."""
        feats = tuple(feats)
        return (*self.head(feats), feats)

    def decode(self, outs: tuple, metainfo: dict, score_thr: float) -> Detections:
        """Detections of image 0, equal to ``model.predict``'s boxes, labels and scores:
        FCOS's per-level loop with the prior index, the head's ``_bbox_post_process`` without
        rescaling (as ``SingleStageInstanceSegmentor.predict`` calls the box head), then the
        mask head's division by ``scale_factor``."""
        cls_scores, bbox_preds, score_factors = self._split(outs)
        sizes = [tuple(c.shape[-2:]) for c in cls_scores]
        priors = self.head.prior_generator.grid_priors(
            sizes, dtype=bbox_preds[0].dtype, device=bbox_preds[0].device)
        cfg = self._pre_cfg(score_thr)
        results = self._level_results([c[0].detach() for c in cls_scores],
                                      [b[0].detach() for b in bbox_preds],
                                      [s[0].detach() for s in score_factors], priors,
                                      metainfo, cfg)
        results = self.head._bbox_post_process(results=results, cfg=cfg, rescale=False,
                                               with_nms=True, img_meta=metainfo)
        if len(results):  # the mask head rescales only non-empty results
            results.bboxes = rescale_like_mask_head(results.bboxes, metainfo)
        return self._locate(results, score_thr, sizes)

    def candidates(self, outs: tuple, metainfo: dict, score_thr: float,
                   detections: Optional[Detections] = None) -> Candidates:
        """Every prior of image 0 before the score threshold and NMS, as
        :meth:`DenseAdapter.candidates` lists them (FCOS's boxes and scores, the pairs that
        went into NMS recorded from :meth:`decode`), the boxes rescaled as the mask head
        rescales the kept ones."""
        cls_scores, bbox_preds, score_factors = self._split(outs)
        with record_post_process(self.head) as seen:
            dets = self.decode(outs, metainfo, score_thr)
        sizes = [tuple(c.shape[-2:]) for c in cls_scores]
        priors = self.head.prior_generator.grid_priors(
            sizes, dtype=bbox_preds[0].dtype, device=bbox_preds[0].device)
        with torch.no_grad():
            boxes = self._prior_boxes([b[0].detach() for b in bbox_preds], priors,
                                      metainfo['img_shape'])
            scores = self._prior_scores([c[0].detach() for c in cls_scores],
                                        [s[0].detach() for s in score_factors])
        return dense_candidates(rescale_like_mask_head(boxes, metainfo), scores, seen,
                                dets if detections is None else detections, sizes, 1,
                                self._pre_cfg(score_thr).score_thr, self.head.test_cfg)


@register_mask_branch
class CondInstMaskBranch(MaskBranch):
    """CondInst's / BoxInst's dynamic mask head (see the module docstring)."""

    route = 'exact'
    doc_target = ('mean of σ(dynamic conv of its prior\'s controller parameters on the mask '
                  'features + relative coordinates) over its own binary mask, at stride 4')

    adapter_type = CondInstAdapter
    mask_head_path = 'model.mask_head'
    thr_key = 'mask_thr'

    def _logits(self, outs: tuple, dets: Detections) -> torch.Tensor:
        """(K, h, w) mask logits at stride ``mask_out_stride``: ``CondInstMaskHead``'s
        ``forward_single`` with each detection's parameters, point and stride (read at its
        prior, as ``_predict_by_feat_single`` carries them), on the live outputs."""
        cls_scores, bbox_preds, _, param_preds, feats = outs
        head = self.adapter.head
        sizes = [tuple(c.shape[-2:]) for c in cls_scores]
        flat = flat_prior_index(dets, sizes).to(bbox_preds[0].device)
        points = torch.cat(head.prior_generator.grid_priors(
            sizes, dtype=bbox_preds[0].dtype, device=bbox_preds[0].device,
            with_stride=True))[flat]
        params = torch.cat([p[0].permute(1, 2, 0).reshape(-1, head.num_params)
                            for p in param_preds])[flat]
        mask_feat = self.mask_head.mask_feature_head(tuple(feats))[0]
        info = InstanceData(param_preds=params, points=points[:, :2], strides=points[:, 2])
        return self.mask_head.forward_single(mask_feat, info)[0]

    def _unpadded(self, probs: torch.Tensor, metainfo: dict) -> torch.Tensor:
        """The part of stride-4 maps that covers the image (not the batch padding)."""
        stride = self.mask_head.mask_out_stride
        h, w = metainfo['img_shape'][:2]
        return probs[:, :math.ceil(h / stride), :math.ceil(w / stride)]

    def scores(self, outs, dets: Detections, metainfo: dict) -> torch.Tensor:
        if len(dets) == 0:
            return outs[0][0].new_zeros((0, ))
        probs = self._unpadded(self._logits(outs, dets).sigmoid(), metainfo)
        return mask_target(probs, self._thr)

    @torch.no_grad()
    def masks(self, outs, dets: Detections, metainfo: dict) -> torch.Tensor:
        h, w = metainfo['ori_shape'][:2]
        if len(dets) == 0:
            return torch.zeros((0, h, w), dtype=torch.bool, device=dets.bboxes.device)
        outs = _detached(outs)
        results = InstanceData(bboxes=dets.bboxes.detach().clone(), labels=dets.labels,
                               scores=dets.scores.detach())
        (results, ) = self.mask_head.predict_by_feat(
            [self._logits(outs, dets)], [results], [metainfo], rescale=True)
        return results.masks.bool()


def _detached(outs):
    """The head outputs with every tensor detached (nested tuples and lists kept)."""
    if isinstance(outs, torch.Tensor):
        return outs.detach()
    if isinstance(outs, (tuple, list)):
        return type(outs)(_detached(o) for o in outs)
    return outs


__all__: List[str] = ['CondInstAdapter', 'CondInstMaskBranch', 'rescale_like_mask_head']
