"""The seam between the engine and a detector family.

The engine, the maths, the geometry, the rendering, the metrics, the hook and the CLI know no
head. Everything a detector family decides lives in one adapter, chosen from the model's head
class through :data:`ADAPTERS` (an MMEngine ``Registry``), never from a config file name:

(a) decoding that carries the source prior (level, y, x, anchor) of each kept box through NMS,
    equal to ``model.predict`` (:meth:`DetectorAdapter.decode`);
(b) the differentiable score of one detection, with the head's own formula
    (:meth:`DetectorAdapter.scores`);
(c) the module whose output is the feature map of each level, for the level-aware default
    (:meth:`DetectorAdapter.level_layers`);
(d) what the local-window gradient shortcut needs, only where it is exact
    (:meth:`DetectorAdapter.window_branches`, :meth:`DetectorAdapter.window_scores`).

Adding a head: subclass the closest adapter, set ``head_types`` (and ``relies_on``) and
register it with ``@ADAPTERS.register_module()``; add one row to the tests' table of heads.
Which heads an adapter takes is one rule, :mod:`.support` (:func:`~.support.build_adapter`).

Interface changes since the first commit (all backward compatible):
- ``excluded_types``: head classes an adapter must not take although they subclass one of its
  ``head_types`` (e.g. ``RTMDetInsHead`` under ``RTMDetHead``).
- :func:`locate_priors`: flat prior index (mmdet's ``(level, y, x, anchor)`` order) to
  ``levels, ys, xs, anchors``; use it in ``decode``.
- ``level_layers`` has a default: the shortest ``named_modules()`` path whose output *is* the
  level's feature map, found once by tracing ``features()`` on a small dummy input. Override it
  only where no module outputs a level's map.
- ``level_roots(level)``: the modules that belong to one level only (default: the level layer);
  ``level_of_layer`` is now generic over them and returns None for a module shared by levels
  (e.g. RTMDet's shared convs).
- ``window_branches`` contract made precise (see its docstring): the engine checks the modules,
  derives the radius and zeroes the off-map positions before every spatial convolution itself
  (forward pre-hooks), so ``window_scores`` just runs the branches.
- Detectors whose selecting head is not ``model.bbox_head`` (two-stage: ``roi_head.bbox_head``):
  ``head_path`` says where an adapter's head sits and :meth:`DetectorAdapter.accepts` adds
  conditions on the rest of the model; :func:`build_adapter` picks, over all adapters, the one
  whose ``head_types`` holds the nearest class in the MRO of the module at its ``head_path``
  (ties: registration order), which for one-stage heads is the old rule.
- ``Detections.index`` (the RoI or query behind each detection) and ``Detections.rois`` (the
  boxes it was pooled from, per stage), None for dense heads.
- :meth:`DetectorAdapter.level_gradient`: an adapter may supply its own exact d score / d level
  map (two-stage: one backward through the RoI head, then RoIAlign's own backward per
  detection) in place of the engine's local window.
- ``head_outputs(feats, metainfo=None)``: the images' metainfo (one dict each) for heads whose
  forward needs it (DETR's padding masks); ``levels_shared``: every level map feeds every
  detection (DETR), so the level-aware default uses all level layers together.
- :meth:`DetectorAdapter.refusal_reason`: why ``accepts`` refuses a model, for the build-time
  error (default None); :func:`eval_mode` and :func:`trace_strides` for the traces on a dummy
  input.
"""
from contextlib import contextmanager
from dataclasses import dataclass, fields
from typing import Dict, Iterator, List, Optional, Protocol, Sequence, Tuple, runtime_checkable

import torch
from mmengine.registry import Registry
from torch import nn

from ..runtime.state import OUTPUT_SEP, split_output_name

#: Adapters by class name; :func:`~.support.build_adapter` looks the head's class (and its
#: bases) up in each adapter's ``head_types``.
ADAPTERS = Registry('CAM adapter', scope='mmdet_cam_hook')


@runtime_checkable
class LevelGradient(Protocol):
    """The level-gradient contract: exact d score / d level map for many detections at once,
    without a backward through the whole graph. Met by the engine's local window
    (:class:`~mmdet_cam_hook.cam.local.LocalGradient`) and the two-stage
    :class:`~mmdet_cam_hook.adapters.two_stage.RoIGradient`; an adapter supplies its own through
    :meth:`DetectorAdapter.level_gradient`.

    Attributes:
        radii (dict[int, int | None]): Per level, the window's radius in positions (not None
            where the gradient applies on that level; the ``local`` route needs it).

    An implementation may also have ``windows(feat, level, dets)`` returning the gradients as
    windows (:class:`~mmdet_cam_hook.cam.local.WindowGradients`); the engine uses it when
    present.
    """

    radii: Dict[int, Optional[int]]

    @property
    def available(self) -> bool:
        """Whether the gradient applies on every level (the ``chain`` route needs it)."""

    def __call__(self, feat: torch.Tensor, level: int, dets: 'Detections') -> torch.Tensor:
        """(K, C, h, w): the gradient of each detection's score w.r.t. ``feat``, the feature
        map of ``level`` (every detection of ``dets`` on that level)."""


@dataclass
class Detections:
    """Kept detections with the prior behind each box (K detections, sorted by score).

    Attributes:
        bboxes (torch.Tensor): (K, 4) x1y1x2y2 in original-image pixels.
        scores (torch.Tensor): (K,) the scores ``model.predict`` reports.
        labels (torch.Tensor): (K,) class indices.
        levels (torch.Tensor): (K,) level of the prior, in the head's own order of its maps
            (0 is the finest for most heads; YOLOv3 puts stride 32 first).
        ys (torch.Tensor): (K,) row of the prior on its level's grid.
        xs (torch.Tensor): (K,) column of the prior on its level's grid.
        anchors (torch.Tensor): (K,) index of the prior among the priors at that location
            (0 for anchor-free heads).
        index (torch.Tensor | None): (K,) the RoI (two-stage) or query (DETR) behind each
            detection; None for dense heads.
        rois (torch.Tensor | None): (K, S, 4) x1y1x2y2 on the network input: the box each of the
            S RoI stages pooled the detection's features from (two-stage; S = 1 except for
            cascades); None otherwise.
    """

    bboxes: torch.Tensor
    scores: torch.Tensor
    labels: torch.Tensor
    levels: torch.Tensor
    ys: torch.Tensor
    xs: torch.Tensor
    anchors: torch.Tensor
    index: Optional[torch.Tensor] = None
    rois: Optional[torch.Tensor] = None

    def __len__(self) -> int:
        return len(self.scores)

    def select(self, idx) -> 'Detections':
        """The detections at ``idx`` (an index tensor, a slice or a boolean mask)."""
        return Detections(*(None if getattr(self, f.name) is None else getattr(self, f.name)[idx]
                            for f in fields(self)))


class DetectorAdapter:
    """What the engine needs to know about one detector family.

    Args:
        model (nn.Module): The unwrapped detector.
    """

    #: Names of the head classes this adapter explains (subclasses of them too).
    head_types: Tuple[str, ...] = ()
    #: Subclasses of ``head_types`` this adapter must not take (they decode differently).
    excluded_types: Tuple[str, ...] = ()
    #: Methods of the head (the module at ``head_path``) this adapter re-runs or mirrors: a
    #: subclass of a listed class that overrides one of them (in its own ``__dict__`` or a
    #: base's, along the MRO up to the listed class) is refused by :func:`build_adapter`.
    relies_on: Tuple[str, ...] = ('forward', 'predict', 'predict_by_feat',
                                  '_predict_by_feat_single', '_bbox_post_process')
    #: Other parts of the model the adapter runs itself, by the same rule:
    #: ``{path: (head_types, relies_on)}`` (e.g. a two-stage adapter's ``rpn_head``).
    relies_on_parts: Dict[str, Tuple[Tuple[str, ...], Tuple[str, ...]]] = {}
    #: True when every level map feeds every detection (DETR's encoder mixes the levels): the
    #: level-aware default then averages the maps of all level layers for each detection.
    levels_shared: bool = False
    #: ``named_modules()`` path of the module whose class is matched against ``head_types``
    #: (``roi_head.bbox_head`` for two-stage detectors); it becomes ``self.head``.
    head_path: str = 'bbox_head'
    #: Hooks mmdet's own configs of this family register in ``custom_hooks``.
    required_hooks: Tuple[str, ...] = ()

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.head = module_at(model, self.head_path)

    # ------------------------------------------------------------------ saying no
    # The one place where an adapter refuses a model its head matched: :meth:`accepts` says
    # whether, :meth:`refusal_reason` why (both read by :func:`~.support.build_adapter`).
    @classmethod
    def accepts(cls, model: nn.Module) -> bool:
        """Conditions on the rest of ``model`` once its head matched ``head_types`` (e.g. a
        two-stage adapter checks that the RoI head predicts the standard way). Defaults to
        True."""
        return True

    @classmethod
    def refusal_reason(cls, model: nn.Module) -> Optional[str]:
        """Why :meth:`accepts` refuses ``model``, for the build-time error; asked only when it
        does. Override it where the user can do something about it (MaskFormer's
        panoptic-only config).

        Returns:
            str | None: The reason, or None (default): the error then points at
            :meth:`accepts`.
        """
        return None

    # ------------------------------------------------------------------ forward
    def features(self, inputs: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        """The per-level feature maps the head reads (the neck outputs)."""
        return tuple(self.model.extract_feat(inputs))

    def head_outputs(self, feats: Sequence[torch.Tensor],
                     metainfo: Optional[Sequence[dict]] = None) -> tuple:
        """The head's raw outputs for all levels (``bbox_head.forward``). ``metainfo`` (one
        dict per image, optional) is for heads whose forward needs it (DETR's padding masks);
        ignored here."""
        return self.head(tuple(feats))

    # ------------------------------------------------------------------ (a) decoding
    def decode(self, outs: tuple, metainfo: dict, score_thr: float) -> Detections:
        """Detections of one image with the prior behind each kept box.

        Boxes, labels and scores equal ``model.predict``'s for the same image when
        ``score_thr`` is at least the config's ``test_cfg.score_thr``; a lower ``score_thr``
        lowers the pre-NMS filter too, so that a random-init model can be explained.
        """
        raise NotImplementedError

    # ------------------------------------------------------------------ (b) score
    def scores(self, outs: tuple, dets: Detections) -> torch.Tensor:
        """(K,) differentiable score of each detection on the live head outputs, with the
        head's own formula (e.g. ``sigmoid(cls) * sigmoid(obj)`` for YOLOX)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ (c) layers
    def level_layers(self) -> List[str]:
        """``named_modules()`` path of the module whose output is ``features()[l]``, per level.

        Default: traced once (cached) by running :meth:`features` without gradients, in eval
        mode, on a zero input twice the head's largest stride a side, and taking for each level
        the shortest path of a module whose output is that very tensor (``neck.out_convs.l``
        in YOLOX and RTMDet, ``neck.fpn_convs.l`` in FPN models).

        Raises:
            ValueError: If no module outputs some level's map (then ``target_layers`` must be
                given, or the adapter overrides this).
        """
        if getattr(self, '_level_layers', None) is None:
            self._level_layers = trace_level_layers(self.model, self.features,
                                                    2 * max(self.strides()))
        return list(self._level_layers)

    def _level_layers_or_none(self) -> Optional[List[str]]:
        try:
            return self.level_layers()
        except ValueError:
            return None

    def strides(self) -> List[int]:
        """Stride of each level (``bbox_head.prior_generator.strides``)."""
        return [int(s[0]) if isinstance(s, (tuple, list)) else int(s)
                for s in self.head.prior_generator.strides]

    def level_roots(self, level: int) -> List[str]:
        """``named_modules()`` paths of modules that serve level ``level`` only: the level layer
        and, in heads with per-level modules, those (e.g. ``bbox_head.multi_level_cls_convs.l``).
        """
        return [self.level_layers()[level]]

    def level_of_layer(self, name: str) -> Optional[int]:
        """The level whose head alone the layer ``name`` feeds, or None if it feeds several
        (a module reachable from the roots of two levels, such as a shared conv, feeds all)."""
        if getattr(self, '_module_levels', None) is None:
            modules = dict(self.model.named_modules())
            levels: Dict[int, set] = {}
            for level in range(len(self.strides())):
                for root in self.level_roots(level):
                    if root in modules:
                        for m in modules[root].modules():
                            levels.setdefault(id(m), set()).add(level)
            self._module_levels = levels
        if split_output_name(name)[1] is not None:  # one tensor of a module's tuple output
            layers = self._level_layers_or_none()
            if not layers or name not in layers:
                return None
            if getattr(self, '_level_readers', None) is None:
                self._level_readers = trace_level_readers(self.model, self.features,
                                                          2 * max(self.strides()))
            level = layers.index(name)
            return level if self._level_readers[level] == [level] else None
        module = dict(self.model.named_modules()).get(name)
        own = self._module_levels.get(id(module), set()) if module is not None else set()
        return next(iter(own)) if len(own) == 1 else None

    # ------------------------------------------------------------------ (d) local window
    def level_gradient(self) -> Optional[LevelGradient]:
        """An exact gradient of many detections' scores w.r.t. their own level's feature map
        without a backward through the whole graph, for families where the window shortcut
        does not apply (two-stage: one backward through the RoI head for all detections, then
        RoIAlign's own backward per detection).

        Returns:
            LevelGradient | None: One meeting :class:`LevelGradient`. None (default): the
            engine's local window from :meth:`window_branches`.
        """
        return None

    def window_branches(self, level: int) -> Optional[List[List[nn.Module]]]:
        """The head's modules between ``features()[level]`` and the score, one list per branch
        in the order they run (e.g. YOLOX: cls convs + cls predictor; reg convs + obj
        predictor); every module the score reads must be in one of them.

        The engine (:mod:`mmdet_cam_hook.cam.local`) checks them: only stride-1, 'same'
        zero-padded convolutions (any dilation, any groups) and per-position modules (BatchNorm
        in eval mode with running statistics, activations, Identity, Dropout in eval, Scale)
        inside the containers it knows (Sequential, ConvModule, DepthwiseSeparableConvModule).
        Anything else (GroupNorm, LayerNorm, pooling, deformable conv, BatchNorm in training
        mode, an unknown module type) means no shortcut. The window radius is the largest sum
        of ``(k - 1) // 2 * dilation`` over a branch. None: no shortcut for this head (the
        engine takes the exact full route)."""
        return None

    def window_scores(self, level: int, windows: torch.Tensor, dets: Detections) -> torch.Tensor:
        """(K,) scores of ``dets`` (all on ``level``) computed by the level's head on
        ``windows`` (K, C, S, S): window k is centred on detection k's prior, and its score is
        read at the centre ``(S // 2, S // 2)``, with detection k's label and anchor."""
        raise NotImplementedError

    # ------------------------------------------------------------------ randomisation stages
    def stages(self) -> Dict[str, List[str]]:
        """The detector's parts for the cascading randomisation check, in the order it
        randomises them, from the head back to the input: ``{stage: [paths]}``, each path a
        ``named_modules()`` or ``named_parameters()`` name. Every parameter of the model belongs
        to exactly one stage.

        Default: ``head`` (``bbox_head``), ``neck``, ``backbone``; any other top-level part
        with parameters goes with the head (:func:`complete_stages`).
        """
        return complete_stages(self.model, {'head': ['bbox_head'], 'neck': ['neck'],
                                            'backbone': ['backbone']}, rest='head')

    # ------------------------------------------------------------------ documentation
    #: For the generated table of supported detectors (:mod:`mmdet_cam_hook.adapters.table`):
    #: the family, its detectors, the score of one detection, the level-aware default layers
    #: and the gradient route on them (Markdown).
    family: str = ''
    detectors: str = ''
    doc_score: str = ''
    doc_layers: str = ''
    doc_route: str = ''

    # ------------------------------------------------------------------ (e) candidates
    def candidates(self, outs: tuple, metainfo: dict, score_thr: float,
                   detections: Optional[Detections] = None) -> 'Candidates':  # noqa: F821
        """Every prior / RoI / query of image 0 before the score threshold and NMS, with its
        box in original-image pixels, its per-class scores (the formula of :meth:`scores`),
        which pairs went into NMS and which kept detection each became
        (:class:`~mmdet_cam_hook.adapters.candidates.Candidates`): what explains a miss.

        Args:
            outs (tuple): The head's outputs (:meth:`head_outputs`).
            metainfo (dict): The image's metainfo.
            score_thr (float): The engine's score threshold, as for :meth:`decode`.
            detections (Detections, optional): The kept detections (e.g. after the engine's
                ``topk``). Defaults to None: :meth:`decode`'s.

        Raises:
            NotImplementedError: For an adapter that cannot list its candidates.
        """
        raise NotImplementedError(f'{type(self).__name__} ({type(self.head).__name__}) cannot '
                                  'list its candidates before NMS, so misses cannot be '
                                  'explained for this head')


def module_at(model: nn.Module, path: str) -> Optional[nn.Module]:
    """The submodule at the dotted attribute ``path`` (``roi_head.bbox_head``), or None."""
    module = model
    for part in path.split('.'):
        module = getattr(module, part, None)
        if not isinstance(module, nn.Module):
            return None
    return module


def complete_stages(model: nn.Module, stages: Dict[str, Sequence[str]],
                    rest: str) -> Dict[str, List[str]]:
    """``stages`` restricted to the paths ``model`` has and that hold parameters (stages left
    empty are dropped), plus, in the stage ``rest``, every parameter no stage holds (as its
    top-level module when no stage holds any of that module's parameters), so that no parameter
    escapes the randomisation.

    Args:
        model (nn.Module): The detector.
        stages (dict[str, Sequence[str]]): ``{stage: [module or parameter paths]}``, in
            randomisation order.
        rest (str): The stage (a key of ``stages``) that takes the parts no stage names.

    Returns:
        dict[str, list[str]]: The stages, in the same order.
    """
    modules = dict(model.named_modules())
    params = dict(model.named_parameters())

    def own(path: str) -> List[nn.Parameter]:
        if path in params:
            return [params[path]]
        return list(modules[path].parameters()) if path in modules else []

    out = {name: [p for p in paths if own(p)] for name, paths in stages.items()}
    taken = {id(p) for paths in out.values() for path in paths for p in own(path)}
    for name, param in params.items():
        if id(param) in taken:
            continue
        top = name.split('.')[0]
        path = top if not any(id(p) in taken for p in own(top)) else name
        out[rest].append(path)
        taken.update(id(p) for p in own(path))
    return {name: paths for name, paths in out.items() if paths}


def locate_priors(prior_idx: torch.Tensor, sizes: Sequence[Tuple[int, int]],
                  num_base_priors: int = 1) -> Tuple[torch.Tensor, ...]:
    """Split flat prior indices over all levels into ``(levels, ys, xs, anchors)``.

    mmdet orders priors level by level, each level row-major over ``(y, x)`` with the
    ``num_base_priors`` anchors of a location consecutive (``grid_priors`` and the heads'
    ``permute(1, 2, 0).reshape(-1, C)``).

    Args:
        prior_idx (torch.Tensor): (K,) int64 flat indices.
        sizes (Sequence[tuple[int, int]]): (h, w) of each level's grid.
        num_base_priors (int): Anchors per location. Defaults to 1.

    Returns:
        tuple[torch.Tensor, ...]: ``levels, ys, xs, anchors``, each (K,) int64.
    """
    device = prior_idx.device
    counts = torch.tensor([0] + [int(h) * int(w) * num_base_priors for h, w in sizes],
                          device=device)
    starts = counts.cumsum(0)
    levels = torch.bucketize(prior_idx, starts[1:], right=True)
    local = prior_idx - starts[levels]
    widths = torch.tensor([int(w) for _, w in sizes], device=device)[levels]
    cell, anchors = local // num_base_priors, local % num_base_priors
    return levels, cell // widths, cell % widths, anchors


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` in eval mode inside the ``with`` block, every module's ``training`` flag
    restored after (also when the block raises): how the traces on a dummy input leave the
    model as they found it."""
    flags = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        yield model
    finally:
        for module, flag in flags:
            module.training = flag


def trace_strides(model: nn.Module, features, size: int) -> List[int]:
    """The stride of each feature map ``features`` returns (``size`` over its width), from one
    forward without gradients on a (1, 3, size, size) zero input, in eval mode
    (:func:`eval_mode`): for adapters whose head has no prior generator to read them from.

    Args:
        model (nn.Module): The detector.
        features (Callable): ``inputs -> tuple of level maps`` (the adapter's ``features``).
        size (int): Side of the dummy input (a multiple of the largest stride).

    Returns:
        list[int]: The strides, in the order of the maps.
    """
    param = next(model.parameters())
    with eval_mode(model), torch.no_grad():
        feats = features(torch.zeros((1, 3, size, size), dtype=param.dtype,
                                     device=param.device))
    return [size // int(f.shape[-1]) for f in feats]


def trace_level_readers(model: nn.Module, features, size: int) -> List[List[int]]:
    """Per level l, the levels whose feature maps ``features`` computes from level l's map
    (l itself included): one forward with gradients on a (1, 3, size, size) zero input, in
    eval mode (``training`` flags restored), following each map's autograd graph. What
    :meth:`DetectorAdapter.level_of_layer` needs for a ``path:i`` level layer, which no
    module's submodules tell (NAS-FCOS's extra levels are computed from its level 2)."""
    param = next(model.parameters())
    with eval_mode(model), torch.inference_mode(False), torch.enable_grad():
        x = torch.zeros((1, 3, size, size), dtype=param.dtype, device=param.device,
                        requires_grad=True)
        feats = features(x)
        heads = [f.grad_fn for f in feats]
        reached = []
        for node in heads:
            # the nodes are kept, not only their ids: a node's Python object (and so its id)
            # only lasts while something holds it
            seen: Dict[int, object] = {}
            stack = [node]
            while stack:
                node = stack.pop()
                if node is not None and id(node) not in seen:
                    seen[id(node)] = node
                    stack.extend(n for n, _ in node.next_functions)
            reached.append(seen)
        readers = [[j for j, seen in enumerate(reached) if id(head) in seen]
                   for head in heads]
    return readers


def trace_level_layers(model: nn.Module, features, size: int) -> List[str]:
    """The shortest ``named_modules()`` path whose output is each feature map ``features``
    returns, from one forward without gradients on a (1, 3, size, size) zero input, in eval
    mode (every module's ``training`` flag restored after). Where no module outputs a level's
    map alone (NAS-FCOS's neck resizes it with ``F.interpolate``; DyHead runs one module once
    per level), the shortest ``path:i`` whose module outputs it as the i-th item of a tuple
    or list (``neck:0``: :func:`~mmdet_cam_hook.runtime.state.split_output_name`).

    Raises:
        ValueError: If no module outputs some level's map.
    """
    param = next(model.parameters())
    outputs: Dict[int, str] = {}
    elements: Dict[int, str] = {}  # tensors of tuple / list outputs, as ``path:i``
    keep = []

    def note(names: Dict[int, str], tensor: torch.Tensor, name: str) -> None:
        keep.append(tensor)
        best = names.get(id(tensor))
        if best is None or len(name) < len(best):
            names[id(tensor)] = name

    def make_hook(name):

        def hook(module, args, output):
            if isinstance(output, torch.Tensor):
                note(outputs, output, name)
            elif isinstance(output, (tuple, list)):
                for i, item in enumerate(output):
                    if isinstance(item, torch.Tensor):
                        note(elements, item, f'{name}{OUTPUT_SEP}{i}')

        return hook

    handles = [m.register_forward_hook(make_hook(n)) for n, m in model.named_modules() if n]
    try:
        with eval_mode(model), torch.no_grad():
            feats = features(torch.zeros((1, 3, size, size), dtype=param.dtype,
                                         device=param.device))
    finally:
        for handle in handles:
            handle.remove()
    alone = [outputs.get(id(f)) for f in feats]
    # One module run once per level (DyHead's blocks) outputs the last call's map only.
    shared = {n: [lv for lv, m in enumerate(alone) if m == n] for n in alone if n is not None}
    shared = {n: levels for n, levels in shared.items() if len(levels) > 1}
    names = [n if n is not None and n not in shared else elements.get(id(f))
             for n, f in zip(alone, feats)]
    missing = [level for level, n in enumerate(names) if n is None]
    if missing:
        why = next((f': {n!r} runs once for each of the levels {levels}'
                    for n, levels in shared.items() if set(levels) & set(missing)), '')
        raise ValueError(f'no module of {type(model).__name__} outputs the feature map of '
                         f'level(s) {missing} alone or in a tuple{why}; pass `target_layers` '
                         'explicitly')
    return names
