"""The three gradient routes of the engine and their packing state: how each target layer gets
the K per-detection gradients of the detections' scores, from one forward pass.

- ``local``: the layer *is* a level's feature map, only that level reads it, and the head's
  window there is exact: the window shortcut (:class:`~mmdet_cam_hook.cam.local.LocalGradient`),
  no backward through the head.
- ``chain``: the layer is upstream of the level maps (backbone, neck; also a level map that
  other levels read) and every level has an exact window: the local gradient is pulled back
  with vector-Jacobian products: one per group of detections whose regions of the layer do
  not meet (:mod:`mmdet_cam_hook.cam.packing`), else one per detection (batched with
  ``is_grads_batched`` on request).
- ``exact``: anything else (layers inside the head, heads without an exact window such as the
  GroupNorm heads): per-detection gradients of the scores through the full graph of the one
  forward pass, only for the detections a per-level layer can influence.

:class:`GradientRoutes` holds what the routes learn while they run: which routes batch their
vector-Jacobian products (``batched``), whether the chain route packs detections
(``pack_chain``) and the regions it probed per layer (``reach``).
"""
import warnings
from dataclasses import dataclass, field
from typing import Dict, List, NamedTuple, Optional, Tuple, Union

import torch
from torch import nn

from ..adapters import Detections, DetectorAdapter
from ..adapters.base import LevelGradient
from ..runtime.state import split_output_name
from . import packing
from .local import WindowGradients

#: How a target layer gets its per-detection gradients (see the module docstring).
ROUTES = ('local', 'chain', 'exact')


@dataclass(frozen=True)
class TargetLayer:
    """A target layer resolved once, with its gradient route.

    Attributes:
        name (str): ``named_modules()`` path.
        module (nn.Module): The module whose output is explained.
        route (str): One of :data:`ROUTES`.
        level (int | None): The only level whose scores the layer reads (for ``local``: the
            level whose feature map it is); None if it feeds every level.
    """

    name: str
    module: nn.Module = field(repr=False)
    route: str
    level: Optional[int]


class Forward(NamedTuple):
    """What one forward pass leaves for the gradient work."""

    feats: Tuple[torch.Tensor, ...]  # level feature maps (the adapter's ``features``)
    outs: tuple  # head outputs (the adapter's ``head_outputs``)
    acts: Dict[str, torch.Tensor]  # target-layer outputs
    input_hw: Tuple[int, int]


class GradientRoutes:
    """Per-detection gradients of the scores w.r.t. target layers, by route.

    Args:
        adapter (DetectorAdapter): The detector's adapter (scores, features, strides).
        local_grad (LevelGradient): The level gradient (the ``local`` route's window, the
            ``chain`` route's cotangents).
        level_names (list[str]): The modules outputting the level maps ([] if none does).

    Attributes:
        batched (dict[str, bool]): Per route (``chain``, ``exact``), whether its VJPs run
            batched with ``is_grads_batched``. Batched VJPs (vmap over the backward) are exact
            but measured slower on CPU than one ``autograd.grad`` per detection (YOLOX-s@320,
            K=32, 1 thread: chain 0.92 s vs 0.54 s, exact 0.81 s vs 0.71 s), so the loop is the
            default; set a route to True to batch it (falls back to the loop if vmap cannot
            handle an op).
        pack_chain (bool): Whether the chain route packs detections whose regions of the
            layer do not meet into one VJP (:mod:`mmdet_cam_hook.cam.packing`). Defaults to True.
        reach (dict): Per layer, per level, the probed :class:`~.packing.Reach` (None: not
            packable there).
    """

    def __init__(self, adapter: DetectorAdapter, local_grad: LevelGradient,
                 level_names: List[str]) -> None:
        self.adapter = adapter
        self.local_grad = local_grad
        self._level_names = list(level_names)
        self._head_modules = {id(m) for m in adapter.head.modules()}
        self.batched = {'chain': False, 'exact': False}
        self.pack_chain = True
        self.reach: Dict[str, Dict[int, Optional[packing.Reach]]] = {}

    def target(self, name: str, module: nn.Module) -> TargetLayer:
        """The :class:`TargetLayer` of the module at ``name``, with its route (see the module
        docstring)."""
        level_names = self._level_names
        level = self.adapter.level_of_layer(name)
        if name in level_names and level == level_names.index(name) \
                and self.local_grad.radii.get(level) is not None:
            return TargetLayer(name, module, 'local', level)
        # A level map that other levels read too (an FPN's P5 under 'on_output' extra convs,
        # YOLOv3's detect blocks) is upstream of those levels' maps: chain or exact.
        if id(module) not in self._head_modules and self.local_grad.available:
            return TargetLayer(name, module, 'chain', level)
        return TargetLayer(name, module, 'exact', level)

    def grads(self, layers: List[TargetLayer], sub: Detections, fwd: 'Forward',
               no_path: Dict[str, List[int]],
               level: Optional[int] = None) -> Dict[str, Union[torch.Tensor, WindowGradients]]:
        """Gradient of each detection's score w.r.t. each layer, (K, C, h, w) per layer; kept
        as windows (:class:`~mmdet_cam_hook.cam.local.WindowGradients`) when ``sub`` is all on
        ``level`` and the one layer is that level's map on the local route (the level-aware
        default)."""
        if (level is not None and len(layers) == 1 and layers[0].route == 'local'
                and layers[0].level == level and hasattr(self.local_grad, 'windows')):
            return {layers[0].name: self.local_grad.windows(fwd.feats[level], level, sub)}
        cache: Dict[int, torch.Tensor] = {}

        def local_at(level: int) -> torch.Tensor:
            # d score / d feature map of ``level``, for ``sub``'s detections on that level
            if level not in cache:
                on = (sub.levels == level).nonzero()[:, 0]
                cache[level] = self.local_grad(fwd.feats[level], level, sub.select(on))
            return cache[level]

        levels = sub.levels.tolist()
        rows: Dict[str, List[Optional[torch.Tensor]]] = {
            layer.name: [None] * len(sub) for layer in layers}
        by_route = {r: [layer for layer in layers if layer.route == r] for r in ROUTES}
        for layer in by_route['local']:
            self._local_route(layer, levels, local_at, rows[layer.name])
        if by_route['chain']:
            self._chain_route(by_route['chain'], levels, local_at, fwd, rows)
        if by_route['exact']:
            self._exact_route(by_route['exact'], sub, fwd, rows)
        grads = {}
        for layer in layers:
            act = fwd.acts[layer.name]
            out = rows[layer.name]
            for k, row in enumerate(out):
                if row is None:
                    no_path.setdefault(layer.name, []).append(levels[k])
                    out[k] = act.new_zeros(act.shape[1:])
            grads[layer.name] = torch.stack(out)
        return grads

    @staticmethod
    def _local_route(layer: TargetLayer, levels: List[int], local_at, out: list) -> None:
        """The layer is the feature map of ``layer.level``: the window gradient itself; other
        levels' detections have no path to it."""
        on = [k for k, lv in enumerate(levels) if lv == layer.level]
        for k, g in zip(on, local_at(layer.level) if on else []):
            out[k] = g

    def _chain_route(self, layers: List[TargetLayer], levels: List[int], local_at,
                     fwd: 'Forward', rows: Dict[str, list]) -> None:
        """Pull the local gradient at each level's map back to the layers with
        vector-Jacobian products, level by level (no backward through the head): one per
        group of detections whose regions of the layers do not meet
        (:mod:`mmdet_cam_hook.cam.packing`), one per detection where they cannot be packed."""
        for level in sorted(set(levels)):
            on = [k for k, lv in enumerate(levels) if lv == level]
            wanted = [layer for layer in layers if layer.level in (None, level)]
            if not wanted:
                continue
            v = local_at(level)  # (K_l, C, h, w): one cotangent per detection
            inputs = [fwd.acts[layer.name] for layer in wanted]
            boxes = self._chain_boxes(wanted, level, v, fwd)
            groups = packing.pack(boxes) if boxes is not None else [[j] for j in range(len(on))]
            for group in groups:
                split = None
                if boxes is not None:
                    cot = v[group].sum(dim=0)[None, None]  # (1, 1, C, h, w): the group's sum
                    grads = self._vjp('chain', [fwd.feats[level]], inputs, [cot])
                    split = self._split_group(grads, group, boxes, wanted, level)
                    if split is None:  # not exact: one VJP per detection from now on
                        boxes = None
                if split is None:
                    grads = self._vjp('chain', [fwd.feats[level]], inputs, [v[group][:, None]])
                    split = [[None if g is None else g[j, 0] for j in range(len(group))]
                             for g in grads]
                for layer, per_det in zip(wanted, split):
                    for j, g in zip(group, per_det):
                        if g is not None:
                            rows[layer.name][on[j]] = g

    def _chain_boxes(self, layers: List[TargetLayer], level: int, v: torch.Tensor,
                     fwd: 'Forward') -> Optional[List[List[Tuple[int, int, int, int]]]]:
        """Per detection, per layer, the box of the layer's positions its window depends on;
        None when some layer cannot be packed on this level (or packing is off)."""
        if not self.pack_chain or len(v) < 2:
            return None
        reaches = []
        for layer in layers:
            if layer.name not in self.reach:
                self.reach[layer.name] = packing.probe_reach(
                    self.adapter.features, layer.module, (1, 3, *fwd.input_hw),
                    fwd.feats[0].device, split_output_name(layer.name)[1])
            reach = self.reach[layer.name].get(level)
            if reach is None:
                return None
            reaches.append((reach, tuple(fwd.acts[layer.name].shape[-2:])))
        support = v.abs().sum(dim=1) != 0  # (K_l, h, w): where each cotangent is nonzero
        extents = torch.stack([_first_last(support.any(dim=2)), _first_last(support.any(dim=1))],
                              dim=1).flatten(1).tolist()  # one host read: (K_l, 4) y0 y1 x0 x1
        return [[(0, -1, 0, -1)] * len(reaches) if y1 < y0 else  # zero cotangent: meets nothing
                [reach.box(y0, y1, x0, x1, shape) for reach, shape in reaches]
                for y0, y1, x0, x1 in extents]

    def _split_group(self, grads: List[Optional[torch.Tensor]], group: List[int],
                     boxes: Optional[list], layers: List[TargetLayer],
                     level: int) -> Optional[List[List[Optional[torch.Tensor]]]]:
        """Each member's gradient from its group's one VJP: the part inside its box. None if
        the VJP is not exactly zero outside the members' boxes (then the layer is not packed
        on this level again)."""
        if len(group) == 1:
            return [[None if g is None else g[0, 0]] for g in grads]
        split = []
        for i, (layer, g) in enumerate(zip(layers, grads)):
            if g is None:
                split.append([None] * len(group))
                continue
            g = g[0, 0]
            parts, covered = [], torch.zeros(g.shape[-2:], dtype=torch.bool, device=g.device)
            for j in group:
                y0, y1, x0, x1 = boxes[j][i]
                part = torch.zeros_like(g)
                part[:, y0:y1 + 1, x0:x1 + 1] = g[:, y0:y1 + 1, x0:x1 + 1]
                covered[y0:y1 + 1, x0:x1 + 1] = True
                parts.append(part)
            if bool((g[:, ~covered] != 0).any()):
                self.reach[layer.name][level] = None
                warnings.warn(
                    f'the gradients at {layer.name!r} reach beyond the regions the NaN probes '
                    f'gave for level {level}; its detections there are pulled back one at a '
                    'time from now on', UserWarning, stacklevel=2)
                return None
            split.append(parts)
        return split

    def _exact_route(self, layers: List[TargetLayer], sub: Detections, fwd: 'Forward',
                     rows: Dict[str, list]) -> None:
        """Gradients of the scores through the full graph, for the detections a layer can
        influence (a per-level layer only its own level's)."""
        levels = sub.levels.tolist()
        groups: Dict[Optional[int], List[TargetLayer]] = {}
        for layer in layers:
            groups.setdefault(layer.level, []).append(layer)
        for level, group in groups.items():
            on = [k for k, lv in enumerate(levels) if level is None or lv == level]
            if not on:
                continue
            scores = self.adapter.scores(fwd.outs, sub.select(torch.tensor(on)))
            eye = torch.eye(len(on), dtype=scores.dtype, device=scores.device)
            grads = self._vjp('exact', [scores], [fwd.acts[layer.name] for layer in group],
                              [eye])
            for layer, g in zip(group, grads):
                if g is not None:
                    for j, k in enumerate(on):
                        rows[layer.name][k] = g[j, 0]

    def _vjp(self, route: str, outputs: List[torch.Tensor], inputs: List[torch.Tensor],
             cotangents: List[torch.Tensor]) -> List[Optional[torch.Tensor]]:
        """Vector-Jacobian products for a batch of cotangents (leading dim K): batched with
        ``is_grads_batched`` (vmap over the backward) or, if vmap cannot handle an op of this
        model, one ``autograd.grad`` per row (remembered per route).

        Returns:
            list[torch.Tensor | None]: Per input, (K, *input.shape), or None if the outputs do
            not depend on it.
        """
        if self.batched[route]:
            try:
                return list(torch.autograd.grad(outputs, inputs, grad_outputs=cotangents,
                                                retain_graph=True, allow_unused=True,
                                                is_grads_batched=True))
            except RuntimeError as exc:
                if 'vmap' not in str(exc) and 'batch' not in str(exc).lower():
                    raise
                self.batched[route] = False
        per_row = [
            torch.autograd.grad(outputs, inputs, grad_outputs=[c[k] for c in cotangents],
                                retain_graph=True, allow_unused=True)
            for k in range(len(cotangents[0]))
        ]
        return [None if per_row[0][i] is None else torch.stack([r[i] for r in per_row])
                for i in range(len(inputs))]

    def warn_no_path(self, no_path: Dict[str, List[int]], level_names: List[str]) -> None:
        """Warn once per layer and level about detections whose maps from the layer are blank
        (no gradient path from their scores to it), naming the layer to use instead."""
        strides = self.adapter.strides()
        for name, levels in no_path.items():
            own = self.adapter.level_of_layer(name)
            feeds = f' (it feeds only level {own})' if own is not None else ''
            for level in sorted(set(levels)):
                use = (f'Use {level_names[level]!r} for them, or target_layers=None'
                       if level < len(level_names) else 'Use target_layers=None')
                warnings.warn(
                    f'target layer {name!r} has no gradient path to {levels.count(level)} '
                    f'detection(s) on FPN level {level} (stride {strides[level]}){feeds}: '
                    f'their maps from this layer are blank. {use} to explain each detection '
                    'on its own level.',
                    UserWarning, stacklevel=4)


def _first_last(mask: torch.Tensor) -> torch.Tensor:
    """(K, 2) first and last True index of each row of a (K, n) boolean mask; (0, -1) for a
    row with none."""
    n = mask.shape[1]
    index = torch.arange(n, device=mask.device)
    first = torch.where(mask, index, n).amin(dim=1)
    last = torch.where(mask, index, -1).amax(dim=1)
    return torch.stack([torch.where(last >= 0, first, 0), last], dim=1)
