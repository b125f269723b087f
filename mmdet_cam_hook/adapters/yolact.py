"""YOLACT (``YOLACTHead`` + ``YOLACTProtonet``): a light RetinaNet (3 anchors per location,
one shared conv, softmax classification over ``C + 1`` logits in mmdet's config) whose every
anchor also predicts ``num_protos`` mask coefficients; Fast NMS.

Boxes. ``YOLACTHead._predict_by_feat_single`` keeps, per level, the ``nms_pre`` priors of
highest foreground score, decodes them and hands boxes, scores and coefficients to its own
``_bbox_post_process``, which runs mmdet's ``fast_nms`` (no index comes out). The adapter
re-runs the per-level loop and appends each candidate's flat prior index to its coefficients
as one more column: ``fast_nms`` only gathers coefficient rows, so the index rides through the
head's own post-processing unchanged (float32 holds integers exactly up to 2^24). As in
``SingleStageInstanceSegmentor.predict``, the box head runs with ``rescale=False`` and the
protonet's ``_predict_by_feat_single`` divides the boxes by ``scale_factor``.

Masks (:class:`YOLACTMaskBranch`). Instance i's mask is ``sigmoid(prototypes @ coeffs_i)``
(the protonet's prototypes, at stride 4 of P3, times its prior's coefficients), zeroed outside
its box as ``YOLACTProtonet.crop_single`` crops (the box on the network input, widened by one
prototype pixel); mmdet then resizes it to the original image, ``> mask_thr``. The mask target
is the mean of the cropped probabilities over the instance's own binary mask
(``>= mask_thr``) at the prototypes' resolution. It reads P3 (the prototypes) and the prior's
own level (the coefficients): route ``'exact'``.
"""
from typing import List, Optional, Sequence

import torch
from mmengine.structures import InstanceData
from torch import nn

from .base import ADAPTERS, Detections
from .candidates import flat_prior_index
from .condinst import _detached, _plain_instance_segmentor, rescale_like_mask_head
from .dense import DenseAdapter
from .masks import MaskBranch, mask_target, register_mask_branch

#: What the adapter and the mask branch run of ``YOLACTProtonet``: the protonet, the crop and
#: mmdet's mask post-processing (which also rescales the boxes).
_PROTONET_METHODS = ('forward', 'predict', 'predict_by_feat', '_predict_by_feat_single',
                     'crop_mask_preds', 'crop_single', 'sanitize_coordinates')


@ADAPTERS.register_module()
class YOLACTAdapter(DenseAdapter):
    """``YOLACTHead`` under ``YOLACT``.

    Score of the detection with label ``c`` at prior ``(l, y, x, a)`` (softmax over the
    anchor's ``C + 1`` logits with mmdet's ``use_sigmoid=False`` config, else the sigmoid)::

        softmax(cls_scores[l][0, a*(C+1):(a+1)*(C+1), y, x])[c]

    The class branch (``head_convs``: one 3x3 ConvModule without norm in mmdet's config, then
    ``conv_cls`` 3x3) reads a 5x5 window of its level's map (radius 2): the local route. The
    FPN's P6 (``fpn_convs.3``, from C5 ``on_input``) also feeds P7: chain there.

    Head outputs: ``(cls_scores, bbox_preds, coeff_preds, feats)``, the level maps last, from
    which the mask branch runs the protonet on the same forward pass.
    """

    head_types = ('YOLACTHead', )
    relies_on = DenseAdapter.relies_on
    relies_on_parts = {'mask_head': (('YOLACTProtonet', ), _PROTONET_METHODS)}
    family = 'YOLACT'
    detectors = 'YOLACT'
    doc_score = 'softmax(cls[a])[c], one of 3 anchors'
    doc_layers = '`neck.fpn_convs.{0..4}` (P3-P7)'
    doc_route = 'local, 5x5 window (radius 2); P6 (`fpn_convs.3`) also feeds P7: chain'

    @classmethod
    def accepts(cls, model) -> bool:
        return _plain_instance_segmentor(model)

    def head_outputs(self, feats: Sequence[torch.Tensor], metainfo=None) -> tuple:
        feats = tuple(feats)
        return (*self.head(feats), feats)

    def _split(self, outs: tuple):
        """(cls_scores, bbox_preds, None): YOLACT has no score factor (its third output is
        the coefficients)."""
        return outs[0], outs[1], None

    def strides(self) -> List[int]:
        """Stride of each level, rounded (mmdet's config has ``550 / 69`` ...)."""
        return [int(round(float(s[0]))) for s in self.head.prior_generator.strides]

    # ------------------------------------------------------------------ (a) decoding
    def decode(self, outs: tuple, metainfo: dict, score_thr: float) -> Detections:
        """Detections of image 0 equal to ``model.predict``'s boxes, labels and scores (those
        ``>= score_thr``; Fast NMS's own ``score_thr`` is ``min(test_cfg.score_thr,
        score_thr)``), the prior index carried through the head's ``_bbox_post_process``."""
        head = self.head
        cls_scores, bbox_preds, coeff_preds = outs[0], outs[1], outs[2]
        sizes = [tuple(c.shape[-2:]) for c in cls_scores]
        priors = head.prior_generator.grid_priors(sizes, device=cls_scores[0].device)
        cfg = self._pre_cfg(score_thr)
        nms_pre = cfg.get('nms_pre', -1)
        boxes, anchors, scores, coeffs = [], [], [], []
        start = 0
        for cls_score, bbox_pred, coeff_pred, prior in zip(cls_scores, bbox_preds, coeff_preds,
                                                            priors):
            cls_score = cls_score[0].detach().permute(1, 2, 0).reshape(-1, head.cls_out_channels)
            score = cls_score.sigmoid() if head.use_sigmoid_cls else cls_score.softmax(-1)
            bbox_pred = bbox_pred[0].detach().permute(1, 2, 0).reshape(-1, 4)
            coeff = coeff_pred[0].detach().permute(1, 2, 0).reshape(-1, head.num_protos)
            index = torch.arange(start, start + len(prior), device=prior.device)
            start += len(prior)
            if 0 < nms_pre < score.shape[0]:
                fg = score if head.use_sigmoid_cls else score[:, :-1]
                _, topk = fg.max(dim=1)[0].topk(nms_pre)
                prior, bbox_pred, score, coeff, index = (
                    prior[topk, :], bbox_pred[topk, :], score[topk, :], coeff[topk, :],
                    index[topk])
            boxes.append(bbox_pred)
            anchors.append(prior)
            scores.append(score)
            coeffs.append(torch.cat([coeff, index[:, None].to(coeff.dtype)], dim=1))
        multi_bboxes = head.bbox_coder.decode(torch.cat(anchors), torch.cat(boxes),
                                              max_shape=metainfo['img_shape'])
        results = head._bbox_post_process(
            multi_bboxes=multi_bboxes, multi_scores=torch.cat(scores),
            multi_coeffs=torch.cat(coeffs), cfg=cfg, rescale=False, img_meta=metainfo)
        results.prior_idx = results.coeffs[:, -1].round().long()
        results.coeffs = results.coeffs[:, :-1]
        if len(results):  # the protonet rescales only non-empty results
            results.bboxes = rescale_like_mask_head(results.bboxes, metainfo)
        return self._locate(results, score_thr, sizes)

    # ------------------------------------------------------------------ (d) local window
    def _score_branches(self, level: int) -> Optional[List[List[nn.Module]]]:
        return [[*self.head.head_convs, self.head.conv_cls]]


@register_mask_branch
class YOLACTMaskBranch(MaskBranch):
    """YOLACT's prototypes and coefficients (see the module docstring)."""

    route = 'exact'
    doc_target = ('mean of σ(prototypes · its prior\'s coefficients), cropped to its box as '
                  'mmdet crops, over its own binary mask, at the prototypes\' stride 4')

    adapter_type = YOLACTAdapter
    mask_head_path = 'model.mask_head'
    thr_key = 'mask_thr'

    def _probs(self, outs: tuple, dets: Detections) -> torch.Tensor:
        """(h, w, K) uncropped mask probabilities: ``sigmoid(prototypes @ coeffs.T)`` with the
        protonet run on the live P3 and each detection's coefficients read at its prior (the
        same ops as ``YOLACTProtonet.forward``)."""
        cls_scores, _, coeff_preds, feats = outs
        head = self.adapter.head
        sizes = [tuple(c.shape[-2:]) for c in cls_scores]
        flat = flat_prior_index(dets, sizes, self.adapter.num_base_priors)
        coeffs = torch.cat([c[0].permute(1, 2, 0).reshape(-1, head.num_protos)
                            for c in coeff_preds])[flat.to(coeff_preds[0].device)]
        prototypes = self.mask_head.protonet(feats[0]).permute(0, 2, 3, 1).contiguous()[0]
        return torch.sigmoid(prototypes @ coeffs.t())

    @staticmethod
    def _input_boxes(dets: Detections, metainfo: dict) -> torch.Tensor:
        """The boxes on the network input (what mmdet crops with, before it rescales them)."""
        return dets.bboxes.detach() * dets.bboxes.new_tensor(
            metainfo['scale_factor']).repeat((1, 2))

    def scores(self, outs, dets: Detections, metainfo: dict) -> torch.Tensor:
        if len(dets) == 0:
            return outs[0][0].new_zeros((0, ))
        results = InstanceData(bboxes=self._input_boxes(dets, metainfo))
        (cropped, ) = self.mask_head.crop_mask_preds([self._probs(outs, dets)], [metainfo],
                                                     [results])
        return mask_target(cropped, self._thr)

    @torch.no_grad()
    def masks(self, outs, dets: Detections, metainfo: dict) -> torch.Tensor:
        h, w = metainfo['ori_shape'][:2]
        if len(dets) == 0:
            return torch.zeros((0, h, w), dtype=torch.bool, device=dets.bboxes.device)
        outs = _detached(outs)
        results = InstanceData(bboxes=self._input_boxes(dets, metainfo), labels=dets.labels,
                               scores=dets.scores.detach())
        (results, ) = self.mask_head.predict_by_feat(
            [self._probs(outs, dets)], None, [results], [metainfo], rescale=True)
        return results.masks.bool()


__all__ = ['YOLACTAdapter', 'YOLACTMaskBranch']
