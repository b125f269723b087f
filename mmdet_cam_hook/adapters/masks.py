"""Mask branches: each instance's predicted mask and the differentiable mask target.

A *mask branch* sits beside a detector's adapter (:func:`build_mask_branch`): the adapter
decodes the instances and scores their class, the branch gives, for the same instances,

- ``masks``: (K, H, W) bool at the original image size, mmdet's own post-processing
  (``FCNMaskHead.predict_by_feat``), so equal to ``model.predict``'s masks;
- the **mask target** of instance i: the mean of its mask probabilities (sigmoid of the mask
  logits of its label) over the pixels of its own predicted binary mask (probability
  ``>= test_cfg.mask_thr_binary``), at the resolution the head predicts them (28 x 28 in the
  RoI for Mask R-CNN), on the live level maps of the same forward pass; the mean over the RoI
  when no pixel passes. The binary mask is a constant of the target (it selects pixels);
- the exact gradient of that target w.r.t. the level map its mask RoI was pooled from
  (:meth:`RoIMaskBranch.gradient`): one backward through the mask head for all K RoIs, then
  RoIAlign's own backward per instance, as the box branch's ``RoIGradient`` does.

Families:

- :class:`RoIMaskBranch`: Mask R-CNN (``StandardRoIHead`` + ``FCNMaskHead``). The mask RoI is
  the instance's final box on the network input (mmdet pools the mask from the kept box, not
  from the proposal), on the level the mask RoI extractor maps it to.
- :class:`CascadeRoIMaskBranch`: Cascade Mask R-CNN: the probability is the mean over stages of
  each stage's sigmoid (``CascadeRoIHead.predict_mask`` merges them so), every stage on the same
  mask RoI.
"""
import functools
from typing import List, Optional, Sequence, Tuple

import torch
from mmengine.structures import InstanceData
from torch import nn

from .base import Detections, DetectorAdapter
from .two_stage import CascadeRCNNAdapter, TwoStageAdapter, _overrides

__all__ = ['MASK_ROUTES', 'MaskBranch', 'RoIMaskBranch', 'CascadeRoIMaskBranch',
           'build_mask_branch', 'mask_target', 'register_mask_branch']

#: How the engine gets a mask target's gradient (:attr:`MaskBranch.route`).
MASK_ROUTES = ('level', 'exact')


def mask_target(probs: torch.Tensor, thr: float) -> torch.Tensor:
    """(K,) the mean of each (K, h, w) probability map over its own binary mask
    (``probs >= thr``, a constant), or over the whole map where no pixel passes."""
    binary = (probs.detach() >= thr).to(probs.dtype)
    count = binary.sum(dim=(1, 2))
    inside = (probs * binary).sum(dim=(1, 2)) / count.clamp(min=1)
    return torch.where(count > 0, inside, probs.mean(dim=(1, 2)))


def _as_list(modules) -> list:
    return list(modules) if isinstance(modules, nn.ModuleList) else [modules]


class MaskBranch:
    """What the engine needs of an instance-segmentation head, beside its adapter.

    Args:
        adapter (DetectorAdapter): The detector's adapter (decoding and class scores).
    """

    #: The README's mask target of the family (tests/adapters/test_masks.py checks it is there).
    doc_target: str = ''

    #: How the engine gets the gradient of the mask target (one of :data:`MASK_ROUTES`):
    #:
    #: - ``'level'``: every instance's mask is computed from one level map (an RoI head's
    #:   pooled RoI), and :meth:`gradient` gives the exact gradient on that map, without a
    #:   backward through the detector (the branch implements :meth:`levels` and
    #:   :meth:`gradient`);
    #: - ``'exact'``: the mask target mixes levels (a mask feature fused from every level, a
    #:   pixel decoder): the engine backpropagates :meth:`scores`, computed on the live head
    #:   outputs of the one forward pass, through its full graph to each of its target layers,
    #:   one vector-Jacobian product per instance (the branch implements :meth:`scores` and
    #:   :meth:`masks` only).
    route: str = 'level'

    #: The adapter class whose models' masks the branch explains: the default
    #: :meth:`accepts` is an ``isinstance`` on it (the RoI branches ask for this very class,
    #: see :meth:`RoIMaskBranch._takes`).
    adapter_type: Optional[type] = None
    #: Dotted attribute path, from the adapter, of the mask head the branch keeps as
    #: ``self.mask_head`` (``'model.mask_head'``; ``'head'``: the adapter's head); '': none.
    mask_head_path: str = ''
    #: The key of the mask head's ``test_cfg`` (:meth:`_test_cfg`) holding the threshold of
    #: the binary mask (:attr:`_thr`): ``'mask_thr'``, ``'mask_thr_binary'``.
    thr_key: str = ''

    def __init__(self, adapter: DetectorAdapter) -> None:
        self.adapter = adapter
        if self.mask_head_path:
            self.mask_head = functools.reduce(getattr, self.mask_head_path.split('.'), adapter)

    @classmethod
    def accepts(cls, adapter: DetectorAdapter) -> bool:
        """Whether this branch explains ``adapter``'s model's masks (default: ``adapter`` is
        an :attr:`adapter_type`)."""
        if cls.adapter_type is None:
            raise NotImplementedError(f'{cls.__name__} sets no adapter_type and no accepts')
        return isinstance(adapter, cls.adapter_type)

    def _test_cfg(self):
        """The ``test_cfg`` holding :attr:`thr_key`: the mask head's."""
        return self.mask_head.test_cfg

    @property
    def _thr(self) -> float:
        """The binary mask's threshold (``test_cfg[thr_key]``)."""
        return float(getattr(self._test_cfg(), self.thr_key))

    def levels(self, dets: Detections, metainfo: dict) -> torch.Tensor:
        """(K,) the level map each instance's mask is computed from."""
        raise NotImplementedError

    def scores(self, outs, dets: Detections, metainfo: dict) -> torch.Tensor:
        """(K,) the differentiable mask target of each instance on the live head outputs."""
        raise NotImplementedError

    def masks(self, outs, dets: Detections, metainfo: dict) -> torch.Tensor:
        """(K, H, W) bool masks at the original image size, as ``model.predict`` gives them."""
        raise NotImplementedError

    def gradient(self, feat: torch.Tensor, level: int, dets: Detections,
                 metainfo: dict) -> torch.Tensor:
        """(K, C, h, w) exact d mask target / d ``feat`` (the level map of ``level``) for
        instances whose masks are all computed from that level."""
        raise NotImplementedError


class RoIMaskBranch(MaskBranch):
    """Mask R-CNN's ``FCNMaskHead`` under a ``StandardRoIHead`` (see the module docstring)."""

    doc_target = ('mean of σ(mask logits of its label) over its own 28x28 binary mask, in the '
                  'RoI of its final box')

    adapter_type = TwoStageAdapter
    thr_key = 'mask_thr_binary'

    def __init__(self, adapter: TwoStageAdapter) -> None:
        super().__init__(adapter)
        self.roi_head = adapter.roi_head

    @classmethod
    def accepts(cls, adapter: DetectorAdapter) -> bool:
        from mmdet.models.roi_heads import StandardRoIHead

        return (cls._takes(adapter, StandardRoIHead, subclasses=True)
                and not _overrides(type(adapter.roi_head), StandardRoIHead,
                                   ('predict_mask', '_mask_forward')))

    @classmethod
    def _takes(cls, adapter: DetectorAdapter, roi_head_type: type,
               subclasses: bool = False) -> bool:
        """The RoI branches' common condition: ``adapter`` is exactly :attr:`adapter_type`
        (a subclass has its own branch), its ``roi_head`` is a ``roi_head_type`` (exactly; or
        a subclass with ``subclasses``) with a mask, and its mask heads and extractors are
        plain (:meth:`_plain_heads`)."""
        roi_head = getattr(adapter, 'roi_head', None)
        typed = (isinstance(roi_head, roi_head_type) if subclasses
                 else type(roi_head) is roi_head_type)
        return (type(adapter) is cls.adapter_type and typed
                and bool(getattr(roi_head, 'with_mask', False))
                and cls._plain_heads(roi_head.mask_roi_extractor, roi_head.mask_head))

    def _test_cfg(self):
        """The RoI head's ``test_cfg`` (its ``rcnn`` test config)."""
        return self.roi_head.test_cfg

    @staticmethod
    def _plain_heads(extractors, heads) -> bool:
        """FCN mask heads decoding as ``FCNMaskHead`` does, single-level RoI extractors
        without RoI rescaling."""
        from mmdet.models.roi_heads.mask_heads import FCNMaskHead
        from mmdet.models.roi_heads.roi_extractors import SingleRoIExtractor

        return (all(isinstance(h, FCNMaskHead) and not _overrides(
                    type(h), FCNMaskHead, ('predict_by_feat', '_predict_by_feat_single'))
                    for h in _as_list(heads))
                and all(type(e) is SingleRoIExtractor for e in _as_list(extractors)))

    # ------------------------------------------------------------------ stages
    def _stages(self) -> List[Tuple[nn.Module, nn.Module]]:
        """``(mask RoI extractor, mask head)`` of each stage whose probabilities are
        averaged."""
        return [(self.roi_head.mask_roi_extractor, self.roi_head.mask_head)]

    def _head(self, stage: int, pooled: torch.Tensor) -> torch.Tensor:
        """Mask logits (K, C, h, w) of ``stage`` on its pooled RoI features."""
        if stage == 0 and getattr(self.roi_head, 'with_shared_head', False):
            pooled = self.roi_head.shared_head(pooled)
        return self._stages()[stage][1](pooled)

    def rois(self, dets: Detections, metainfo: dict) -> torch.Tensor:
        """(K, 5) mask RoIs: the final boxes on the network input (``bboxes * scale_factor``,
        the inverse of the adapter's rescaling)."""
        scale = dets.bboxes.new_tensor(metainfo['scale_factor']).repeat(2)
        boxes = dets.bboxes.detach() * scale
        return torch.cat([boxes.new_zeros((len(boxes), 1)), boxes], 1)

    def levels(self, dets: Detections, metainfo: dict) -> torch.Tensor:
        extractor = self._stages()[-1][0]
        rois = self.rois(dets, metainfo)
        if extractor.num_inputs == 1:
            return torch.zeros(len(rois), dtype=torch.long, device=rois.device)
        return extractor.map_roi_levels(rois, extractor.num_inputs)

    def _probs(self, pooled: Sequence[torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
        """(K, h, w) the label's mask probability, the mean over stages, from each stage's
        pooled RoI features."""
        probs = []
        for stage, x in enumerate(pooled):
            logits = self._head(stage, x)
            head = self._stages()[stage][1]
            channel = torch.zeros_like(labels) if head.class_agnostic else labels.long()
            probs.append(logits[torch.arange(len(labels), device=logits.device),
                                channel].sigmoid())
        return sum(probs) / float(len(probs))

    def scores(self, outs, dets: Detections, metainfo: dict) -> torch.Tensor:
        if len(dets) == 0:
            return outs.feats[0].new_zeros((0, ))
        rois = self.rois(dets, metainfo).to(outs.feats[0])
        pooled = [ext(tuple(outs.feats[:ext.num_inputs]), rois) for ext, _ in self._stages()]
        return mask_target(self._probs(pooled, dets.labels), self._thr)

    @torch.no_grad()
    def masks(self, outs, dets: Detections, metainfo: dict) -> torch.Tensor:
        h, w = metainfo['ori_shape'][:2]
        if len(dets) == 0:
            return torch.zeros((0, h, w), dtype=torch.bool, device=dets.bboxes.device)
        feats = tuple(f.detach() for f in outs.feats)
        rois = self.rois(dets, metainfo).to(feats[0])
        preds, activate = self._mask_preds(feats, rois, dets, metainfo)
        results = InstanceData(bboxes=rois[:, 1:].clone(), labels=dets.labels,
                               scores=dets.scores.detach())
        last_head = self._stages()[-1][1]
        (results, ) = last_head.predict_by_feat(
            mask_preds=(preds, ), results_list=[results], batch_img_metas=[metainfo],
            rcnn_test_cfg=self.roi_head.test_cfg, rescale=True, activate_map=activate)
        return results.masks.bool()

    def _mask_preds(self, feats, rois: torch.Tensor, dets: Detections,
                    metainfo: dict) -> Tuple[torch.Tensor, bool]:
        """What mmdet's ``predict_mask`` hands the last mask head's ``predict_by_feat`` for
        the mask RoIs ``rois`` of ``dets`` (on the detached ``feats``): the logits (False: not
        activated yet)."""
        return self.roi_head._mask_forward(feats, rois)['mask_preds'], False

    def gradient(self, feat: torch.Tensor, level: int, dets: Detections,
                 metainfo: dict) -> torch.Tensor:
        base = feat.detach()
        rois = self.rois(dets, metainfo).to(base)
        layers = [ext.roi_layers[level] for ext, _ in self._stages()]
        with torch.enable_grad():
            pooled = [layer(base, rois).detach().requires_grad_(True) for layer in layers]
            target = mask_target(self._probs(pooled, dets.labels), self._thr)
            grads = torch.autograd.grad(target.sum(), pooled)
            leaf = base.clone().requires_grad_(True)
            out = []
            for k in range(len(dets)):
                pulled = sum(layer(leaf, rois[k:k + 1]) * g[k:k + 1].detach()
                             for layer, g in zip(layers, grads))
                out.append(torch.autograd.grad(pulled.sum(), leaf)[0][0])
        return torch.stack(out) if out else base.new_zeros((0, *base.shape[1:]))


class CascadeRoIMaskBranch(RoIMaskBranch):
    """Cascade Mask R-CNN: every stage's mask head on the final box, sigmoids averaged."""

    doc_target = ('mean over the 3 stages of σ(mask logits), averaged over its own 28x28 '
                  'binary mask (as `CascadeRoIHead.predict_mask` merges them)')

    adapter_type = CascadeRCNNAdapter

    @classmethod
    def accepts(cls, adapter: DetectorAdapter) -> bool:
        from mmdet.models.roi_heads import CascadeRoIHead

        return cls._takes(adapter, CascadeRoIHead)

    def _stages(self):
        return list(zip(self.roi_head.mask_roi_extractor, self.roi_head.mask_head))

    def _head(self, stage: int, pooled: torch.Tensor) -> torch.Tensor:
        return self._stages()[stage][1](pooled)

    def _mask_preds(self, feats, rois, dets, metainfo):
        """The mean over stages of the sigmoids (already activated), as
        ``CascadeRoIHead.predict_mask`` merges them."""
        probs = [self.roi_head._mask_forward(s, feats, rois)['mask_preds'].sigmoid()
                 for s in range(self.roi_head.num_stages)]
        return torch.stack(probs).mean(dim=0), True


#: The mask branches, tried in registration order (:func:`register_mask_branch`).
MASK_BRANCHES: List[type] = []


def register_mask_branch(cls: type) -> type:
    """Class decorator: add a :class:`MaskBranch` subclass to :data:`MASK_BRANCHES` (its
    ``route`` checked to be one of :data:`MASK_ROUTES`)."""
    if not (isinstance(cls, type) and issubclass(cls, MaskBranch)):
        raise TypeError(f'register_mask_branch takes a MaskBranch subclass, not {cls!r}')
    if cls.route not in MASK_ROUTES:
        raise ValueError(f'{cls.__name__}.route is {cls.route!r}; valid: {list(MASK_ROUTES)}')
    if cls not in MASK_BRANCHES:
        MASK_BRANCHES.append(cls)
    return cls


register_mask_branch(RoIMaskBranch)
register_mask_branch(CascadeRoIMaskBranch)


def build_mask_branch(adapter: DetectorAdapter) -> Optional[MaskBranch]:
    """The mask branch of ``adapter``'s model, or None for a box-only detector (or an
    instance head no branch supports yet: its boxes are still explained). A wrapper's
    (:mod:`~.wrappers`: a tracking model's detector) is its inner detector's."""
    adapter = getattr(adapter, 'inner', adapter)
    for cls in MASK_BRANCHES:
        if cls.accepts(adapter):
            return cls(adapter)
    return None
