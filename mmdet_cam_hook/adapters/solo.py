"""SOLO, decoupled SOLO (and its light head) and SOLOv2: a detection is (level, grid cell,
class), its score the number ``model.predict`` reports, its mask the head's own.

These detectors (``SOLO``, ``SOLOv2``: a ``SingleStageInstanceSegmentor`` without a
``bbox_head``) predict with their ``mask_head`` alone. Head level ``l`` divides the image into
an ``S_l x S_l`` grid (``num_grids``); cell ``(y, x)`` predicts a class probability per class
(sigmoid, kept only where it is a 2x2 local maximum: the "point NMS" of ``forward`` /
``predict_by_feat``) and one instance mask:

- ``SOLOHead``: channel ``y * S_l + x`` of level ``l``'s mask map (sigmoid, at stride 4);
- ``DecoupledSOLOHead`` / ``DecoupledSOLOLightHead``: ``x``-branch channel ``x`` times
  ``y``-branch channel ``y`` of level ``l``;
- ``SOLOV2Head``: the cell's dynamic kernel (``kernel_preds``) convolved with the unified mask
  feature (``mask_feats``, from levels ``start_level..end_level``), then sigmoid.

``_predict_by_feat_single`` keeps the (cell, class) pairs whose probability passes
``score_thr``, drops masks whose area (pixels over ``mask_thr``) is not above the level's
``strides`` entry, rescales each probability by its *maskness* (the mean mask probability inside
its own binary mask) and runs Matrix NMS (``mask_matrix_nms``: scores decayed by the mask IoU
with higher-scored masks of the class, ``filter_thr``, ``max_per_img``). :class:`SOLOAdapter`
re-runs exactly these ops on one image with each pair's flat cell index carried through them
(mmdet's own ``mask_matrix_nms`` returns the kept pairs' indices), so labels, scores, masks and
boxes equal ``model.predict``'s; the boxes are mmdet's: all zero (SOLO predicts no box).

The score of detection k, differentiable on the live head outputs::

    score_k = decay_k * p[label](cell) * maskness(cell)

``decay_k`` is Matrix NMS's decay, a constant (it depends on binary masks and ranks only), read
from mmdet's own ``mask_matrix_nms`` re-run on the same outputs; 1 for a (cell, class) pair that
never reached Matrix NMS (another label of the same cell, for the contrast). The binary mask
that selects maskness' pixels is a constant too.

``Detections`` fields: ``levels`` is the neck level map the cell's head level reads (the head
level itself, except under a pooled top level, below), ``ys, xs`` the cell on its level's
``S x S`` grid (not a position of the level map), ``index`` the flat cell index over all head
levels (mmdet's order), ``anchors`` the head level minus ``levels`` (1 for a pooled top level).

mmdet's SOLO configs build the FPN with ``add_extra_convs=False``: its top level is
``F.max_pool2d(P5, 1, stride=2)``, which no module outputs. As for the RPN
(:mod:`.rpn`), the level maps are then P2-P5, :meth:`SOLOAdapter.head_outputs` pools the top
level from P5 as the FPN does, and a detection of the top head level has ``levels`` 3 and
``anchors`` 1: its maps are taken on ``neck.fpn_convs.3``.

Gradient routes: every head uses GroupNorm and resizes the level map to the grid (bilinear
interpolation), so no local window is exact: each level map takes the ``exact`` route (one
backward per detection through the graph of the one forward pass). In SOLO and decoupled SOLO a
level map feeds only its own head level(s), so the level-aware default is exact and complete;
in SOLOv2 the unified mask feature reads levels ``start_level..end_level``, so those maps feed
every detection's maskness (:meth:`SOLOV2Adapter.level_roots`): the level-aware default is the
exact gradient on the detection's own level map, the map its class and kernel are read from.
"""
import weakref
from typing import Dict, List, NamedTuple, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .base import (
    ADAPTERS,
    Detections,
    DetectorAdapter,
    complete_stages,
    locate_priors,
    trace_strides,
)
from .masks import MaskBranch, register_mask_branch
from .rpn import PooledTopLevel

__all__ = ['SOLOAdapter', 'DecoupledSOLOAdapter', 'SOLOV2Adapter', 'SOLOMaskBranch', 'maskness']


def maskness(probs: torch.Tensor, binary: torch.Tensor) -> torch.Tensor:
    """(K,) the mean of each (K, h, w) probability map over its (K, h, w) binary mask (a
    constant), or over the whole map where the mask is empty (a pair decoding never keeps)."""
    binary = binary.to(probs.dtype)
    count = binary.sum((1, 2))
    inside = (probs * binary).sum((1, 2)) / count.clamp(min=1)
    return torch.where(count > 0, inside, probs.mean((1, 2)))


class _Table(NamedTuple):
    """One image's decoding (constants, from the detached head outputs)."""

    key: torch.Tensor  # (P,) cell * C + label of each pair that went into Matrix NMS (sorted)
    raw: torch.Tensor  # (P,) its probability times maskness, the score Matrix NMS decays
    decayed: torch.Tensor  # (P,) its decayed score (Matrix NMS without filter_thr / max_num)
    kept: torch.Tensor  # (M,) rows of ``key`` that model.predict keeps, in its order
    scores: torch.Tensor  # (M,) their scores, as model.predict reports them
    probs: torch.Tensor  # (M, h, w) their mask probabilities at the head's mask resolution


@ADAPTERS.register_module()
class SOLOAdapter(PooledTopLevel, DetectorAdapter):
    """``SOLOHead``: SOLO (see the module docstring)."""

    head_types = ('SOLOHead', )
    head_path = 'mask_head'
    relies_on = ('forward', 'predict', 'predict_by_feat', '_predict_by_feat_single',
                 'resize_feats')
    family = 'SOLO'
    detectors = 'SOLO'
    doc_score = ('Matrix-NMS decay × σ(cls) at its grid cell (2x2 local max) × maskness (mean '
                 'mask probability inside its own binary mask)')
    doc_layers = ('`neck.fpn_convs.{0..3}` (strides 4-32); the top head level (max-pool of P5) '
                  'is read on `fpn_convs.3`')
    doc_route = 'exact (GroupNorm head, level map resized to the grid)'

    @classmethod
    def accepts(cls, model: nn.Module) -> bool:
        """SOLO's detectors predict with the mask head alone (no ``bbox_head``)."""
        return getattr(model, 'bbox_head', None) is None

    # ------------------------------------------------------------------ forward
    # features and head_outputs: PooledTopLevel's (see the module docstring)
    def strides(self) -> List[int]:
        """Strides of the maps :meth:`features` returns (the head's ``strides`` are the area
        filter's, not its maps'), found once from a 256 px zero input."""
        if getattr(self, '_strides', None) is None:
            self._strides = trace_strides(self.model, self.features, 256)
        return list(self._strides)

    def stages(self) -> Dict[str, List[str]]:
        return complete_stages(self.model, {'head': ['mask_head'], 'neck': ['neck'],
                                            'backbone': ['backbone']}, rest='head')

    # ------------------------------------------------------------------ per head
    def _cls(self, outs: tuple) -> torch.Tensor:
        """(N, C) image 0's class probabilities of every cell, flat over head levels as
        ``predict_by_feat`` flattens them (SOLO's ``forward`` has applied the point NMS)."""
        c = self.head.cls_out_channels
        return torch.cat([s[0].permute(1, 2, 0).reshape(-1, c) for s in outs[-1]])

    def _probs(self, outs: tuple, cells: torch.Tensor) -> torch.Tensor:
        """(K, h, w) the mask probabilities of flat ``cells`` (the same values, by the same
        ops, as ``_predict_by_feat_single``'s)."""
        return self._per_level(cells, lambda level, local, _y, _x: outs[0][level][0, local])

    def _mask_size(self, outs: tuple) -> Tuple[int, int]:
        """(h, w) of the mask probabilities times the head's upsampling to the input."""
        h, w = outs[0][0].shape[-2:]
        return int(h) * 4, int(w) * 4

    # ------------------------------------------------------------------ cells
    @property
    def _grids(self) -> List[int]:
        return [int(g) for g in self.head.num_grids]

    def _per_level(self, cells: torch.Tensor, read) -> torch.Tensor:
        """``read(level, local cells, ys, xs)`` for each head level present, in ``cells``'
        order."""
        levels, ys, xs, _ = locate_priors(cells, [(g, g) for g in self._grids])
        starts = [0]
        for g in self._grids:
            starts.append(starts[-1] + g * g)
        parts, order = [], []
        for level in levels.unique().tolist():
            on = (levels == level).nonzero()[:, 0]
            parts.append(read(level, cells[on] - starts[level], ys[on], xs[on]))
            order.append(on)
        return torch.cat(parts)[torch.cat(order).argsort()]

    def _cell_strides(self, cells: torch.Tensor) -> torch.Tensor:
        """The area filter's threshold of each cell (its head level's ``strides`` entry)."""
        per_level = [torch.full((g * g, ), float(s), device=cells.device)
                     for g, s in zip(self._grids, self.head.strides)]
        return torch.cat(per_level)[cells]

    # ------------------------------------------------------------------ (a) decoding
    def _table(self, outs: tuple) -> _Table:
        """``_predict_by_feat_single``'s ops on image 0 with each pair's cell carried, and
        Matrix NMS run a second time without its filters for every pair's decay; cached for
        the outputs' live tensors (scores() re-reads it once per chunk of detections)."""
        first = _ref(outs)
        cached = getattr(self, '_cache', None)
        if cached is not None and cached[0]() is first and cached[1] == first._version:
            return cached[2]
        with torch.no_grad():
            table = self._decode_table(tuple(_detached(o) for o in outs))
        self._cache = (weakref.ref(first), first._version, table)
        return table

    def _decode_table(self, outs: tuple) -> _Table:
        from mmdet.models.layers import mask_matrix_nms

        cfg = self.head.test_cfg
        cls = self._cls(outs)
        num_classes = cls.shape[1]
        score_mask = cls > cfg.score_thr
        cand = cls[score_mask]
        inds = score_mask.nonzero()
        cells, labels = inds[:, 0], inds[:, 1]
        none = cls.new_zeros(0, dtype=torch.long)
        empty = _Table(none, cls.new_zeros(0), cls.new_zeros(0), none, cls.new_zeros(0),
                       cls.new_zeros((0, 1, 1)))
        if len(cand) == 0:
            return empty
        probs = self._probs(outs, cells)
        masks = probs > cfg.mask_thr
        sum_masks = masks.sum((1, 2)).float()
        keep = sum_masks > self._cell_strides(cells)
        if keep.sum() == 0:
            return empty
        masks, probs, sum_masks = masks[keep], probs[keep], sum_masks[keep]
        cand, cells, labels = cand[keep], cells[keep], labels[keep]
        raw = cand * ((probs * masks).sum((1, 2)) / sum_masks)  # maskness, as mmdet computes it
        common = dict(mask_area=sum_masks, nms_pre=cfg.nms_pre, kernel=cfg.kernel,
                      sigma=cfg.sigma)
        scores, _, _, kept = mask_matrix_nms(masks, labels, raw, max_num=cfg.max_per_img,
                                             filter_thr=cfg.filter_thr, **common)
        every, _, _, rows = mask_matrix_nms(masks, labels, raw, max_num=-1, filter_thr=-1,
                                            **common)
        decayed = raw.clone()  # pairs beyond nms_pre never reach the decay
        decayed[rows] = every
        return _Table(cells * num_classes + labels, raw, decayed, kept, scores, probs[kept])

    def decode(self, outs: tuple, metainfo: dict, score_thr: float) -> Detections:
        """Detections of image 0 of ``outs``: ``model.predict``'s, in its order, restricted to
        scores ``>= score_thr``.

        The pre-filter stays the config's ``test_cfg.score_thr`` whatever ``score_thr``: a
        lower one would add pairs to Matrix NMS, which would decay every kept score
        differently from ``model.predict`` (set ``model.test_cfg.score_thr`` to see more).
        """
        table = self._table(outs)
        num_classes = self.head.cls_out_channels
        keep = (table.scores >= score_thr).nonzero()[:, 0]
        key = table.key[table.kept[keep]]
        cells, labels = key // num_classes, key % num_classes
        head_levels, ys, xs, _ = locate_priors(cells, [(g, g) for g in self._grids])
        levels = head_levels.clamp(max=len(self.strides()) - 1)
        scores = table.scores[keep]
        return Detections(scores.new_zeros((len(keep), 4)), scores, labels, levels, ys, xs,
                          head_levels - levels, index=cells)

    # ------------------------------------------------------------------ (b) score
    def _lookup(self, table: _Table, dets: Detections) -> Tuple[torch.Tensor, torch.Tensor]:
        """(K,) the row of each detection's (cell, label) pair in ``table.key`` (-1 if the
        pair is no candidate: under the score or area filter) and (K,) its row among the kept
        ones (-1 if not kept)."""
        key = dets.index.to(table.key) * self.head.cls_out_channels + dets.labels.to(table.key)
        if len(table.key) == 0:
            return torch.full_like(key, -1), torch.full_like(key, -1)
        match = key[:, None] == table.key[None]
        row = torch.where(match.any(1), match.long().argmax(1), -1)
        kept = row[:, None] == table.kept[None]
        return row, torch.where(kept.any(1), kept.long().argmax(1), -1)

    def _live_maskness(self, outs: tuple, dets: Detections,
                       table: _Table) -> torch.Tensor:
        """(K,) maskness on the live outputs, over the binary mask decoding selected (the
        detection's own, from the decoding's probabilities: a constant)."""
        probs = self._probs(outs, dets.index.to(_ref(outs).device))
        _, kept = self._lookup(table, dets)
        binary = probs.detach() > self.head.test_cfg.mask_thr
        found = kept >= 0
        if bool(found.any()):
            binary[found] = table.probs[kept[found]] > self.head.test_cfg.mask_thr
        return maskness(probs, binary)

    def scores(self, outs: tuple, dets: Detections) -> torch.Tensor:
        """(K,) ``decay * p[label] * maskness`` of each detection on the live outputs; its
        value is ``model.predict``'s score, its gradient ``decay`` times that of the
        product."""
        if len(dets) == 0:
            return _ref(outs).new_zeros((0, ))
        table = self._table(outs)
        cells = dets.index.to(_ref(outs).device)
        prob = self._cls(outs)[cells, dets.labels.to(cells)]
        raw = prob * self._live_maskness(outs, dets, table)
        row, _ = self._lookup(table, dets)
        seen = row >= 0
        decayed = torch.where(seen, table.decayed[row.clamp(min=0)], raw.detach())
        decay = torch.where(seen, decayed / table.raw[row.clamp(min=0)], torch.ones_like(raw))
        # the value is exactly the decayed score; the gradient is decay * d raw
        return decayed + decay * (raw - raw.detach())

    # ------------------------------------------------------------------ masks
    def mask_scores(self, outs: tuple, dets: Detections) -> torch.Tensor:
        """(K,) the mask target: maskness on the live outputs (see :class:`SOLOMaskBranch`)."""
        if len(dets) == 0:
            return _ref(outs).new_zeros((0, ))
        return self._live_maskness(outs, dets, self._table(outs))

    @torch.no_grad()
    def masks(self, outs: tuple, dets: Detections, metainfo: dict) -> torch.Tensor:
        """(K, H, W) bool masks at the original image size, as ``_predict_by_feat_single``
        resizes and thresholds them."""
        ori = tuple(metainfo['ori_shape'][:2])
        if len(dets) == 0:
            return torch.zeros((0, *ori), dtype=torch.bool, device=_ref(outs).device)
        table = self._table(outs)
        _, kept = self._lookup(table, dets)
        probs = self._probs(tuple(_detached(o) for o in outs),
                            dets.index.to(_ref(outs).device))
        found = kept >= 0
        probs[found] = table.probs[kept[found]]
        h, w = metainfo['img_shape'][:2]
        probs = F.interpolate(probs.unsqueeze(0), size=self._mask_size(outs),
                              mode='bilinear', align_corners=False)[:, :, :h, :w]
        probs = F.interpolate(probs, size=ori, mode='bilinear', align_corners=False).squeeze(0)
        return probs > self.head.test_cfg.mask_thr


def _ref(outs: tuple) -> torch.Tensor:
    """One tensor of the head outputs (the level-0 class map in SOLO and SOLOv2, the level-0
    ``y``-branch mask map in decoupled SOLO): their device, and the key of the cache."""
    return outs[1][0]


def _detached(value):
    """A head output (a tensor or a list of tensors) without its graph."""
    if isinstance(value, torch.Tensor):
        return value.detach()
    return [v.detach() for v in value]


@ADAPTERS.register_module()
class DecoupledSOLOAdapter(SOLOAdapter):
    """``DecoupledSOLOHead`` and ``DecoupledSOLOLightHead`` (its ``forward`` returns the same
    three outputs): the mask of cell ``(y, x)`` is ``x``-branch channel ``x`` times
    ``y``-branch channel ``y``."""

    head_types = ('DecoupledSOLOHead', 'DecoupledSOLOLightHead')
    family = 'Decoupled SOLO'
    detectors = 'Decoupled SOLO, Decoupled SOLO-Light'
    doc_score = SOLOAdapter.doc_score

    def _probs(self, outs: tuple, cells: torch.Tensor) -> torch.Tensor:
        return self._per_level(cells, lambda level, _c, ys, xs:
                               outs[0][level][0, xs] * outs[1][level][0, ys])


@ADAPTERS.register_module()
class SOLOV2Adapter(SOLOAdapter):
    """``SOLOV2Head``: the cell's dynamic kernel convolved with the unified mask feature; the
    point NMS runs in ``predict_by_feat`` (here in :meth:`_cls`)."""

    head_types = ('SOLOV2Head', )
    family = 'SOLOv2'
    detectors = 'SOLOv2, SOLOv2-Light'
    doc_route = ('exact (GroupNorm head, level map resized to the grid; levels 0-3 also feed '
                 'every maskness through the unified mask feature)')

    def _cls(self, outs: tuple) -> torch.Tensor:
        c = self.head.cls_out_channels
        flat = []
        for logits in outs[1]:
            prob = logits[:1].sigmoid()
            local_max = F.max_pool2d(prob, 2, stride=1, padding=1)
            prob = prob * (local_max[:, :, :-1, :-1] == prob)
            flat.append(prob[0].permute(1, 2, 0).reshape(-1, c))
        return torch.cat(flat)

    def _probs(self, outs: tuple, cells: torch.Tensor) -> torch.Tensor:
        head = self.head
        kernels = torch.cat([k[0].permute(1, 2, 0).reshape(-1, head.kernel_out_channels)
                             for k in outs[0]])[cells]
        kernels = kernels.view(len(cells), -1, head.dynamic_conv_size, head.dynamic_conv_size)
        return F.conv2d(outs[2][:1], kernels, stride=1).squeeze(0).sigmoid()

    def _mask_size(self, outs: tuple) -> Tuple[int, int]:
        h, w = outs[2].shape[-2:]
        return int(h) * self.head.mask_stride, int(w) * self.head.mask_stride

    def level_roots(self, level: int) -> List[str]:
        """The level's own map and every map the unified mask feature reads (they feed every
        detection's maskness)."""
        layers = self.level_layers()
        feat = self.head.mask_feature_head
        mixed = [layers[j] for j in range(feat.start_level, min(feat.end_level + 1, len(layers)))]
        return [layers[level]] + [n for n in mixed if n != layers[level]]


@register_mask_branch
class SOLOMaskBranch(MaskBranch):
    """The masks of SOLO, decoupled SOLO and SOLOv2 (:class:`SOLOAdapter` and its subclasses).

    The mask target of an instance is its maskness: the mean of its mask probabilities over its
    own binary mask (``> test_cfg.mask_thr``, a constant), at the head's mask resolution
    (stride 4): SOLO's channel of its level's mask map, decoupled SOLO's product of the two
    branches, SOLOv2's dynamic kernel applied to the unified mask feature. It is the factor
    the class score is rescored by. SOLOv2's unified feature mixes levels, and SOLO's
    detections of a pooled top level read it from the level below, so the branch takes the
    engine's ``exact`` route (one backward per instance through the one forward pass).
    """

    route = 'exact'
    doc_target = ('maskness: mean of its mask probabilities over its own binary mask '
                  '(> mask_thr) at stride 4 (SOLO: its level\'s mask map; decoupled: x × y '
                  'branches; SOLOv2: its cell\'s dynamic kernel on the unified mask feature)')

    adapter_type = SOLOAdapter

    def scores(self, outs, dets: Detections, metainfo: dict) -> torch.Tensor:
        return self.adapter.mask_scores(outs, dets)

    def masks(self, outs, dets: Detections, metainfo: dict) -> torch.Tensor:
        return self.adapter.masks(outs, dets, metainfo)
