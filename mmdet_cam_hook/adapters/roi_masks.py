"""Mask branches of the RoI-head variants: Mask Scoring R-CNN, HTC, SCNet and PointRend (see
:mod:`.masks` for what a mask branch gives and what the mask target is).

- :class:`MaskScoringMaskBranch`: Mask Scoring R-CNN (``MaskScoringRoIHead``). The mask is
  Mask R-CNN's (``FCNMaskHead`` on the kept box, the same target); the mask IoU head only
  rescales the class score, which :class:`~.roi_variants.MaskScoringRCNNAdapter` already
  explains (its ``Detections.rois[:, -1]`` is the box on the network input, the mask RoI).
- :class:`HTCMaskBranch`: HTC (``HybridTaskCascadeRoIHead``). ``predict_mask`` pools the final
  box once (the last stage's mask RoI extractor), adds the RoI-pooled semantic feature
  (``semantic_fusion`` holding ``'mask'``), runs every stage's mask head on it with the mask
  information flow (each head gets the previous one's feature) and averages the sigmoids
  (``merge_aug_masks``). The semantic head reads every FPN level, so the target mixes levels:
  the ``exact`` route.
- :class:`SCNetMaskBranch`: SCNet (``SCNetRoIHead``). One mask head on the final box, its RoI
  features summed with the semantic feature, fused with the global context feature and
  summed with the relayed feature (the last box stage's shared feature on the same box,
  through ``feat_relay_head``), as ``SCNetRoIHead.predict_mask`` does: the ``exact`` route.
- :class:`PointRendMaskBranch`: PointRend (``PointRendRoIHead``). The target is on the refined
  mask logits ``predict`` thresholds: the coarse head's 7 x 7 logits upsampled
  ``subdivision_steps`` times, each time the ``subdivision_num_points`` most uncertain points
  (a constant selection, as mmdet's top-k makes it) replaced by the point head's prediction
  from fine-grained features point-sampled on the level maps and the coarse logits. With
  mmdet's configs (``featmap_strides=[4]``) everything reads level 0: the ``level`` route.
"""
from typing import Sequence

import torch

from .base import Detections, DetectorAdapter
from .masks import CascadeRoIMaskBranch, RoIMaskBranch, mask_target, register_mask_branch
from .roi_variants import HTCAdapter, MaskScoringRCNNAdapter
from .two_stage import TwoStageAdapter, _overrides

__all__ = ['MaskScoringMaskBranch', 'HTCMaskBranch', 'SCNetMaskBranch', 'PointRendMaskBranch']


@register_mask_branch
class MaskScoringMaskBranch(RoIMaskBranch):
    """Mask Scoring R-CNN: Mask R-CNN's mask on the kept box (see the module docstring)."""

    route = 'level'
    doc_target = ("mean of σ(mask logits of its label) over its own 28x28 binary mask, in the "
                  'RoI of its final box (the mask IoU rescales the class score only)')

    adapter_type = MaskScoringRCNNAdapter

    @classmethod
    def accepts(cls, adapter: DetectorAdapter) -> bool:
        from mmdet.models.roi_heads import MaskScoringRoIHead

        return cls._takes(adapter, MaskScoringRoIHead, subclasses=True)

    def rois(self, dets: Detections, metainfo: dict) -> torch.Tensor:
        """(K, 5) the kept boxes on the network input, as the adapter carries them (not
        re-derived from the rescaled boxes: mmdet pools exactly these)."""
        boxes = dets.rois[:, -1].detach()
        return torch.cat([boxes.new_zeros((len(boxes), 1)), boxes], 1)


class _NoLevelMap:
    """RoI branches whose mask target reads several level maps (route ``'exact'``): no one
    level map, so no :meth:`~.masks.MaskBranch.levels` or level ``gradient``."""

    #: The family, for the error.
    family: str = ''

    def levels(self, dets, metainfo):
        raise NotImplementedError(f'{self.family} masks take the exact route (no one level map)')

    def gradient(self, feat, level, dets, metainfo):
        raise NotImplementedError(f'{self.family} masks take the exact route (no one level map)')


@register_mask_branch
class HTCMaskBranch(_NoLevelMap, CascadeRoIMaskBranch):
    """HTC: every stage's mask head on the final box with the semantic feature fused and the
    mask information flow, sigmoids averaged (see the module docstring)."""

    route = 'exact'
    family = 'HTC'
    doc_target = ('mean over the 3 stages of σ(mask logits) (semantic feature fused, mask '
                  'information flow), averaged over its own 28x28 binary mask (as '
                  '`HybridTaskCascadeRoIHead.predict_mask` merges them)')

    adapter_type = HTCAdapter

    @classmethod
    def accepts(cls, adapter: DetectorAdapter) -> bool:
        from mmdet.models.roi_heads import HybridTaskCascadeRoIHead

        return cls._takes(adapter, HybridTaskCascadeRoIHead)

    def _stage_logits(self, feats: Sequence[torch.Tensor], rois: torch.Tensor) -> list:
        """Every stage's mask logits (K, C, 28, 28) on ``rois``, by the RoI head's own test-time
        ``_mask_forward`` (semantic fusion and information flow included)."""
        roi_head = self.roi_head
        semantic = roi_head.semantic_head(tuple(feats))[1] if roi_head.with_semantic else None
        return roi_head._mask_forward(stage=-1, x=tuple(feats), rois=rois,
                                      semantic_feat=semantic, training=False)['mask_preds']

    def scores(self, outs, dets: Detections, metainfo: dict) -> torch.Tensor:
        if len(dets) == 0:
            return outs.feats[0].new_zeros((0, ))
        rois = self.rois(dets, metainfo).to(outs.feats[0])
        k = torch.arange(len(dets), device=rois.device)
        probs = []
        for head, logits in zip(self.roi_head.mask_head, self._stage_logits(outs.feats, rois)):
            channel = torch.zeros_like(dets.labels) if head.class_agnostic else dets.labels
            probs.append(logits[k, channel.long()].sigmoid())
        return mask_target(sum(probs) / float(len(probs)), self._thr)

    def _mask_preds(self, feats, rois, dets, metainfo):
        """The stages' sigmoids merged by mmdet's ``merge_aug_masks`` (already activated), for
        the last mask head's ``predict_by_feat``, as ``HybridTaskCascadeRoIHead.predict_mask``
        does."""
        from mmdet.models.test_time_augs import merge_aug_masks

        return merge_aug_masks([p.sigmoid() for p in self._stage_logits(feats, rois)],
                               metainfo), True


@register_mask_branch
class SCNetMaskBranch(_NoLevelMap, RoIMaskBranch):
    """SCNet: the mask head on the final box with the semantic, global context and relayed
    features fused (see the module docstring)."""

    route = 'exact'
    family = 'SCNet'
    doc_target = ('mean of σ(mask logits of its label) over its own 28x28 binary mask, in the '
                  'RoI of its final box (semantic, global context and relayed box features '
                  'fused, as `SCNetRoIHead.predict_mask` does)')

    adapter_type = HTCAdapter

    @classmethod
    def accepts(cls, adapter: DetectorAdapter) -> bool:
        from mmdet.models.roi_heads import SCNetRoIHead

        # predict_mask runs feat_relay_head unconditionally: a model without one fails there
        return cls._takes(adapter, SCNetRoIHead) and adapter.roi_head.with_feat_relay

    def _logits(self, feats: Sequence[torch.Tensor], rois: torch.Tensor) -> torch.Tensor:
        """(K, C, 28, 28) the mask logits on ``rois``, by the RoI head's own forwards."""
        roi_head, feats = self.roi_head, tuple(feats)
        fused = self.adapter._stage_kwargs(feats)  # semantic_feat, glbctx_feat
        relayed = roi_head._bbox_forward(stage=-1, x=feats, rois=rois, **fused)['relayed_feat']
        return roi_head._mask_forward(x=feats, rois=rois, relayed_feat=roi_head.feat_relay_head(
            relayed), **fused)['mask_preds']

    def scores(self, outs, dets: Detections, metainfo: dict) -> torch.Tensor:
        if len(dets) == 0:
            return outs.feats[0].new_zeros((0, ))
        logits = self._logits(outs.feats, self.rois(dets, metainfo).to(outs.feats[0]))
        channel = (torch.zeros_like(dets.labels) if self.roi_head.mask_head.class_agnostic
                   else dets.labels)
        k = torch.arange(len(dets), device=logits.device)
        return mask_target(logits[k, channel.long()].sigmoid(), self._thr)

    def _mask_preds(self, feats, rois, dets, metainfo):
        return self._logits(feats, rois), False



@register_mask_branch
class PointRendMaskBranch(RoIMaskBranch):
    """PointRend: the refined mask logits (see the module docstring)."""

    route = 'level'  # 'exact' for an instance whose extractor reads several levels
    doc_target = ('mean of σ(refined mask logits of its label) over its own binary mask at the '
                  "refined resolution (224x224: the coarse 7x7 head's logits, 5 subdivision "
                  'steps of the point head), in the RoI of its final box')

    def __init__(self, adapter: TwoStageAdapter) -> None:
        super().__init__(adapter)
        # mmdet's configs sample the fine-grained features from one level (stride 4): its map
        # is all the target reads; with several levels the target mixes them
        self.route = 'level' if self.roi_head.mask_roi_extractor.num_inputs == 1 else 'exact'

    @classmethod
    def accepts(cls, adapter: DetectorAdapter) -> bool:
        from mmdet.models.roi_heads import PointRendRoIHead
        from mmdet.models.roi_heads.mask_heads import CoarseMaskHead, MaskPointHead
        from mmdet.models.roi_heads.roi_extractors import GenericRoIExtractor

        roi_head = getattr(adapter, 'roi_head', None)
        return (type(adapter) is cls.adapter_type and isinstance(roi_head, PointRendRoIHead)
                and not _overrides(type(roi_head), PointRendRoIHead,
                                   ('predict_mask', '_mask_forward', '_mask_point_forward_test',
                                    '_get_fine_grained_point_feats'))
                and isinstance(roi_head.mask_head, CoarseMaskHead)
                and not _overrides(type(roi_head.mask_head), CoarseMaskHead,
                                   ('predict_by_feat', '_predict_by_feat_single'))
                and type(roi_head.point_head) is MaskPointHead
                and type(roi_head.mask_roi_extractor) is GenericRoIExtractor)

    def levels(self, dets: Detections, metainfo: dict) -> torch.Tensor:
        """Level 0 for every instance (the one level the target reads, on the level route)."""
        return torch.zeros(len(dets), dtype=torch.long, device=dets.labels.device)

    def _refined(self, feats: Sequence[torch.Tensor], dets: Detections,
                 metainfo: dict) -> torch.Tensor:
        """(K, C, S, S) the refined mask logits, by the RoI head's own ``_mask_forward`` and
        ``_mask_point_forward_test`` on ``feats``."""
        roi_head = self.roi_head
        rois = self.rois(dets, metainfo).to(feats[0])
        coarse = roi_head._mask_forward(tuple(feats), rois)['mask_preds']
        return roi_head._mask_point_forward_test(tuple(feats), rois, dets.labels, coarse)

    def _target(self, feats, dets: Detections, metainfo: dict) -> torch.Tensor:
        refined = self._refined(feats, dets, metainfo)
        head = self.roi_head.mask_head
        channel = torch.zeros_like(dets.labels) if head.class_agnostic else dets.labels
        k = torch.arange(len(dets), device=refined.device)
        return mask_target(refined[k, channel.long()].sigmoid(), self._thr)

    def scores(self, outs, dets: Detections, metainfo: dict) -> torch.Tensor:
        if len(dets) == 0:
            return outs.feats[0].new_zeros((0, ))
        return self._target(outs.feats, dets, metainfo)

    def _mask_preds(self, feats, rois, dets, metainfo):
        """The refined logits (not activated: ``predict`` hands them so)."""
        return self._refined(feats, dets, metainfo), False

    def gradient(self, feat: torch.Tensor, level: int, dets: Detections,
                 metainfo: dict) -> torch.Tensor:
        """One forward of the refinement for all K instances on ``feat`` (the only level map
        it reads), then one backward per instance: the point selection differs per instance,
        so there is no shared pooled input to pull back from."""
        base = feat.detach()
        if len(dets) == 0:
            return base.new_zeros((0, *base.shape[1:]))
        with torch.enable_grad():
            leaf = base.clone().requires_grad_(True)
            target = self._target((leaf, ), dets, metainfo)  # level 0, the one it reads
            out = [torch.autograd.grad(target[k], leaf, retain_graph=k + 1 < len(dets))[0][0]
                   for k in range(len(dets))]
        return torch.stack(out)

