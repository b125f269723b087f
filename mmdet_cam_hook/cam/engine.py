"""The CAM engine: per-detection maps for any supported detector, on the original image.

One forward pass per image serves every detection and every method. Everything about the
detector comes from its adapter (:mod:`mmdet_cam_hook.adapters`): decoding with the prior of
each kept box, the score of one detection, the level feature maps, the local window. Gradients
come from ``torch.autograd.grad`` on activations only, so the model's parameters never receive
``.grad``; the model's ``training`` flags, grad mode and forward hooks are restored after every
call, also one that raised.

Each target layer is resolved once, at construction, into a :class:`TargetLayer` with its
route (how its K per-detection gradients are computed):

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
"""
import contextlib
import warnings
from dataclasses import dataclass, field, fields
from typing import Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple, Union

import cv2
import numpy as np
import torch
from torch import nn

from ..adapters import Detections, DetectorAdapter, build_adapter
from ..checks import check_int, check_max_size, check_score_thr, check_topk
from ..runtime.detector import BatchedDetector, image_outputs
from ..runtime.io import ImageLike, load_image
from ..runtime.pipeline import build_pipeline, preprocess_batch, test_pipeline_cfg
from ..runtime.state import capture_outputs, read_only
from . import maths, packing
from .drise import drise_input_maps
from .geometry import Letterbox
from .layers import resolve_layers
from .local import LocalGradient, WindowGradients
from .methods import METHODS, check_method, check_methods
from .result import CAMResult, combined_map

# Detections whose maps are computed together; bounds memory at K x C x h x w per layer.
_CHUNK = 16


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


class CAMEngine:
    """Computes per-detection CAMs of a one-stage detector (see :func:`supported_heads`).

    Args:
        model (nn.Module): An mmdet detector with a supported ``bbox_head``, unwrapped, with
            ``.cfg`` (as ``mmdet.apis.init_detector`` sets it) unless ``test_pipeline`` is given.
        target_layers (Sequence[str] | str | None): ``named_modules()`` paths
            (``neck.out_convs.2`` or ``neck.out_convs[-1]``); maps of several layers are averaged.
            None (default) is level-aware: each detection is explained on the feature map of its
            own FPN level (the adapter's ``level_layers``). Defaults to None.
        score_thr (float): Keep detections scoring at least this. Defaults to 0.3.
        topk (int, optional): Keep at most this many detections (highest scores). Defaults to
            None (all).
        test_pipeline (Sequence[dict], optional): Test pipeline to use instead of the one in
            ``model.cfg``. Defaults to None.
        drise_masks (int): Random masks per image for ``drise`` (each one masked image
            through the network). Defaults to 1000.
        drise_batch_size (int): Masked images per forward pass for ``drise``. Defaults to 16.
        drise_seed (int): Seed of ``drise``'s masks. Defaults to 0.
        keep_input_cams (bool): Also return each detection's map on the network-input grid
            (``CAMResult.input_cams``, where the maps equal grad-cam's output): K more maps of
            the input's size in memory and in time. False (what the hook and the CLI use)
            leaves ``input_cams`` None. Defaults to True.
        chunk_size (int): Detections whose gradients are held at once (``chunk_size`` x C x h
            x w per target layer): bounds the memory at large K; larger chunks batch more work
            per call. Defaults to 16.

    Raises:
        ValueError: On a head no adapter supports (naming it and the supported heads), an
            unknown layer (with close matches), a bad ``score_thr``, ``topk`` or ``drise_*``
            argument, or a model without a test pipeline.
        TypeError: On a ``score_thr`` or ``topk`` of the wrong type (e.g. ``topk='3'``); the
            checks are :mod:`mmdet_cam_hook.checks`, shared with the hook and the CLI.
    """

    def __init__(self,
                 model: nn.Module,
                 target_layers: Union[None, str, Sequence[str]] = None,
                 score_thr: float = 0.3,
                 topk: Optional[int] = None,
                 test_pipeline: Optional[Sequence[dict]] = None,
                 drise_masks: int = 1000,
                 drise_batch_size: int = 16,
                 drise_seed: int = 0,
                 keep_input_cams: bool = True,
                 chunk_size: int = _CHUNK) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f'`model` must be an mmdet detector nn.Module, '
                            f'got {type(model).__name__}')
        self.model = model
        self.score_thr = check_score_thr(score_thr)
        self.topk = check_topk(topk)
        self.adapter: DetectorAdapter = build_adapter(model)
        self.level_aware = target_layers is None
        self.local_grad = self.adapter.level_gradient() or LocalGradient(self.adapter)
        if self.level_aware:
            self._level_names = self.adapter.level_layers()
        else:
            self._level_names = self._level_layers_if_any()
        self._head_modules = {id(m) for m in self.adapter.head.modules()}
        resolved = resolve_layers(model, self._level_names if self.level_aware else target_layers)
        self.layers = [self._resolve(name, module) for name, module in resolved]
        # every level map feeds every detection (DETR): the default is all of them, averaged
        self.level_aware = self.level_aware and not self.adapter.levels_shared
        if test_pipeline is None:
            if getattr(model, 'cfg', None) is None:
                raise ValueError('`model` has no `.cfg` to take the test pipeline from; build it '
                                 'with mmdet.apis.init_detector or pass `test_pipeline`')
            test_pipeline = test_pipeline_cfg(model.cfg)
        self.pipeline = build_pipeline(test_pipeline)
        check_int(drise_masks, 'drise_masks')
        check_int(drise_batch_size, 'drise_batch_size')
        check_int(drise_seed, 'drise_seed', low=0)
        self.chunk_size = check_int(chunk_size, 'chunk_size')
        self.keep_input_cams = bool(keep_input_cams)
        self.drise = dict(num_masks=drise_masks, batch_size=drise_batch_size, seed=drise_seed)
        self.detector = BatchedDetector(model, self.adapter, self.pipeline)
        # Batched VJPs (``is_grads_batched``, vmap over the backward) are exact but measured
        # slower on CPU than one ``autograd.grad`` per detection (YOLOX-s@320, K=32, 1 thread:
        # chain 0.92 s vs 0.54 s, exact 0.81 s vs 0.71 s), so the loop is the default; set a
        # route to True to batch it (falls back to the loop if vmap cannot handle an op).
        self._batched = {'chain': False, 'exact': False}
        # The chain route packs detections whose regions of the layer do not meet into one VJP
        # (mmdet_cam_hook/packing.py); the regions are probed once per layer.
        self.pack_chain = True
        self._reach: Dict[str, Dict[int, Optional[packing.Reach]]] = {}

    def _level_layers_if_any(self) -> List[str]:
        """The level maps' layers, or [] when no module outputs them (no ``local`` route)."""
        try:
            return self.adapter.level_layers()
        except ValueError:
            return []

    def target_layer(self, name: str) -> TargetLayer:
        """Resolve one layer name (as ``target_layers`` takes it) into the
        :class:`TargetLayer` this engine would use for it: its module, route and level (e.g.
        for ``mmdet-cam --list-layers``).

        Raises:
            ValueError: If the layer does not exist (with close matches).
        """
        ((canon, module), ) = resolve_layers(self.model, [name])
        return self._resolve(canon, module)

    def _resolve(self, name: str, module: nn.Module) -> TargetLayer:
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

    @property
    def layer_names(self) -> List[str]:
        return [layer.name for layer in self.layers]

    def explain(self,
                image: ImageLike,
                methods: Union[str, Sequence[str]] = ('gradcam', ),
                renormalize: bool = False,
                max_size: Optional[int] = None,
                detections: Optional[Detections] = None) -> Dict[str, CAMResult]:
        """Per-detection CAMs of one image for one or more methods, from one forward pass.

        Works inside ``torch.no_grad()`` and ``torch.inference_mode()`` blocks too: gradients
        are enabled (and inference mode left) for the call only.

        Args:
            image (str | PathLike | np.ndarray): A path or an HxWx3 uint8 BGR array.
            methods (str | Sequence[str]): Keys of :data:`METHODS`. Defaults to ('gradcam',).
            renormalize (bool): Min-max each map inside its own box and zero it outside (the
                seed tool's ``--renormalize``). Defaults to False.
            max_size (int, optional): Longer side, in pixels, of the returned image and maps.
                A larger image is still fed to the network whole (the detections do not
                change), but its maps are resized straight from the network-input grid to the
                smaller size, so a 6000x4000 image costs K maps of at most ``max_size`` pixels
                a side instead of K full-size ones. ``bboxes`` are then in the returned image's
                pixels and ``CAMResult.scale`` says by how much it was shrunk. None keeps the
                original size. Defaults to None.
            detections (Detections, optional): Explain these detections (boxes in original
                pixels, and the prior and label of each) instead of decoding the image: the
                maps are those of the score of each given prior and label on *this* model, and
                the results report the given boxes, labels and scores. For comparing two models
                on the same detections (the randomisation check, :mod:`..evaluation.sanity`).
                ``score_thr`` and ``topk`` are not applied. Defaults to None (decode).

        Returns:
            dict[str, CAMResult]: One result per method.

        Raises:
            ValueError: On an unknown method, a bad ``max_size``, an image that cannot be read
                or one the test pipeline cannot resize (e.g. 4000x2 pixels).
        """
        methods = check_methods(methods)
        max_size = check_max_size(max_size)
        img = load_image(image)
        if detections is not None and not isinstance(detections, Detections):
            raise TypeError(f'`detections` must be None or a Detections, '
                            f'got {type(detections).__name__}')
        with torch.inference_mode(False):
            return self._explain([img], methods, renormalize, max_size, detections)[0]

    def detect(self, image: ImageLike) -> Detections:
        """The detections :meth:`explain` would explain for ``image``: the adapter's decoding
        (each kept box with its prior, RoI or query), the engine's ``score_thr`` and ``topk``;
        one forward pass without gradients.

        Args:
            image (str | PathLike | np.ndarray): A path or an HxWx3 uint8 BGR array.

        Returns:
            Detections: Boxes in original-image pixels, sorted by score.
        """
        outs, metas = self.detector.outputs([load_image(image)])
        return self._decode(outs, metas[0])

    def _decode(self, outs, metainfo: dict) -> Detections:
        """The one decoding rule of the engine: the adapter's, then ``topk``."""
        with torch.no_grad():
            dets = self.adapter.decode(outs, metainfo, self.score_thr)
        return dets if self.topk is None else dets.select(slice(0, self.topk))

    @property
    def batchable(self) -> bool:
        """Whether :meth:`explain_batch` runs several images through the network at once: when
        every target layer takes the ``local`` route. The ``chain`` and ``exact`` routes pull
        each detection's gradient back through the graph of the forward pass, and through a
        batch's graph that costs as many images as the batch holds, so their images go one at
        a time."""
        return all(layer.route == 'local' for layer in self.layers)

    def explain_batch(self,
                      images: Sequence[ImageLike],
                      methods: Union[str, Sequence[str]] = ('gradcam', ),
                      renormalize: bool = False,
                      max_size: Optional[int] = None) -> List[Dict[str, CAMResult]]:
        """:meth:`explain` for several images, through the network as one batch when the
        engine is :attr:`batchable` (one at a time otherwise).

        The batch goes through the model's data preprocessor as ``model.predict`` batches do,
        padded to its largest image: with a test pipeline that pads every image to one size
        (YOLOX, RTMDet) the results equal :meth:`explain`'s; with keep-ratio pipelines padded
        only to a multiple of 32 (the FPN detectors) images of other shapes get the extra
        padding a batched ``model.predict`` gives them too.

        Args:
            images (Sequence[str | PathLike | np.ndarray]): Paths or HxWx3 uint8 BGR arrays.
            methods, renormalize, max_size: As for :meth:`explain`.

        Returns:
            list[dict[str, CAMResult]]: One :meth:`explain` result per image, in order.

        Raises:
            ValueError: As :meth:`explain`, for the first image that cannot be read or
                resized (its index in ``images`` is in the message).
        """
        methods = check_methods(methods)
        max_size = check_max_size(max_size)
        imgs = []
        for i, image in enumerate(images):
            try:
                imgs.append(load_image(image))
            except ValueError as exc:
                raise ValueError(f'image {i} of the batch: {exc}') from exc
        groups = [imgs] if self.batchable else [[img] for img in imgs]
        with torch.inference_mode(False):
            return [res for group in groups if group
                    for res in self._explain(group, methods, renormalize, max_size)]

    def _explain(self, imgs: List[np.ndarray], methods: List[str], renormalize: bool,
                 max_size: Optional[int],
                 given: Optional[Detections] = None) -> List[Dict[str, CAMResult]]:
        """One forward pass for ``imgs`` (one image unless every layer is ``local``), then
        each image's detections and maps."""
        model, adapter = self.model, self.adapter
        with read_only(model):
            inputs, metas = preprocess_batch(model, self.pipeline, imgs)
            need_grad = any(METHODS[m].uses_gradients for m in methods)
            graph = need_grad and not self.batchable
            assert not graph or len(imgs) == 1, 'a graph is pulled back one image at a time'
            acts: Dict[str, torch.Tensor] = {}
            with self._capture(acts), torch.set_grad_enabled(graph):
                if graph:
                    inputs = inputs.detach().requires_grad_(True)
                feats = adapter.features(inputs)
                outs = adapter.head_outputs(feats, metas)
            missing = [layer.name for layer in self.layers if layer.name not in acts]
            if missing:
                raise ValueError(f'target layer(s) {missing} did not run in the forward pass of '
                                 'the backbone, neck and head; choose layers that do '
                                 '(`mmdet-cam CONFIG CKPT IMG --list-layers` lists them)')
            input_hw = tuple(inputs.shape[-2:])
            if len(imgs) == 1:  # as they are: the chain and exact routes pull back through them
                forwards = [_Forward(tuple(feats), outs, acts, input_hw)]
            else:
                forwards = [_Forward(tuple(f[i:i + 1] for f in feats), image_outputs(outs, i),
                                     {name: a[i:i + 1] for name, a in acts.items()}, input_hw)
                            for i in range(len(imgs))]
            del feats, outs, acts
            return [self._explain_one(img, meta, forwards.pop(0), methods, renormalize,
                                      max_size, given) for img, meta in zip(imgs, metas)]

    def _explain_one(self, img: np.ndarray, metainfo: dict, fwd: '_Forward', methods: List[str],
                     renormalize: bool, max_size: Optional[int],
                     given: Optional[Detections]) -> Dict[str, CAMResult]:
        """One image's detections and maps, from its part of the forward pass."""
        letterbox = Letterbox.from_metainfo(metainfo)
        black_box = [m for m in methods if METHODS[m].black_box]
        need_grad = any(METHODS[m].uses_gradients for m in methods)
        device = fwd.feats[0].device
        if given is not None:
            dets = Detections(*(None if getattr(given, f.name) is None else
                                getattr(given, f.name).to(device)
                                for f in fields(Detections)))
        else:
            dets = self._decode(fwd.outs, metainfo)
        scale, shown = _shrink(img, max_size)
        out_hw = shown.shape[:2]
        with torch.enable_grad():
            maps, used = self._maps([m for m in methods if m not in black_box], dets, fwd,
                                    need_grad, letterbox, out_hw)
        del fwd
        for m in black_box:  # drise: the detector on masked images, no gradients
            on_input = torch.from_numpy(drise_input_maps(
                self.detector, img, dets.bboxes.detach().cpu().numpy(),
                dets.labels.cpu().numpy(), letterbox.resized_shape, letterbox.input_shape,
                **self.drise)).to(device)
            maps[m] = (letterbox.to_original(on_input, out_hw).clamp_(0.0, 1.0),
                       on_input if self.keep_input_cams else None)
        return {
            m: self._result(m, shown, scale, dets, *maps[m],
                            [[] for _ in used] if m in black_box else used, letterbox,
                            renormalize)
            for m in methods
        }

    # ----------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _capture(self, acts: Dict[str, torch.Tensor]) -> Iterator[None]:

        def store(name, module, output):
            if not isinstance(output, torch.Tensor):
                raise ValueError(
                    f'target layer {name!r} outputs a {type(output).__name__}, not a tensor; '
                    'choose one of its submodules (e.g. neck.out_convs.0 instead of neck)')
            acts[name] = output

        with capture_outputs([(layer.name, layer.module) for layer in self.layers], store):
            yield

    def _layers_for(self, level: Optional[int]) -> List[TargetLayer]:
        if self.level_aware and level is not None:
            return [self.layers[level]]
        return self.layers

    def _maps(self, methods, dets: Detections, fwd: '_Forward', need_grad: bool,
              letterbox: Letterbox, out_hw: Tuple[int, int]
              ) -> Tuple[Dict[str, Tuple[torch.Tensor, Optional[torch.Tensor]]], List[List[str]]]:
        """Per method, the (K, H, W) maps on the returned image (``out_hw``) and, with
        ``keep_input_cams``, the (K, H_in, W_in) maps on the input grid, both on the model's
        device; and each detection's layers.

        Detections are taken level by level in chunks of ``chunk_size``: the gradients held at
        once are at most ``chunk_size`` x C x h x w per layer, and each chunk's maps go from the
        input grid to the returned image before the next chunk. A gradient-free method's map is
        computed once per layer and shared by every detection."""
        num = len(dets)
        device = fwd.feats[0].device

        def new(hw):  # every row is written below
            return torch.empty((num, *hw), dtype=torch.float32, device=device)

        maps = {m: (new(out_hw), new(fwd.input_hw) if self.keep_input_cams else None)
                for m in methods}
        levels = dets.levels.tolist()  # the one host read of the detections' levels
        used = [[layer.name for layer in self._layers_for(lv)] for lv in levels]
        if num == 0:
            return maps, used
        groups = sorted(set(levels)) if self.level_aware else [None]
        no_path: Dict[str, List[int]] = {}
        shared: Dict[Tuple[str, str], torch.Tensor] = {}  # (method, layer): gradient-free maps
        for level in groups:
            idx_all = [k for k, lv in enumerate(levels) if level is None or lv == level]
            layers = self._layers_for(level)
            for start in range(0, len(idx_all), self.chunk_size):
                idx = torch.tensor(idx_all[start:start + self.chunk_size],
                                   device=dets.levels.device)
                sub = dets.select(idx)
                grads = self._grads(layers, sub, fwd, no_path, level) if need_grad else {}
                idx = idx.to(device)
                for m in methods:
                    per_layer = [self._layer_maps(m, layer, fwd, grads, len(sub), shared)
                                 for layer in layers]
                    shown, kept = maps[m]
                    if kept is None:
                        shown[idx] = maths.image_maps(per_layer, letterbox, out_hw)
                        continue
                    on_input = maths.input_maps(per_layer, fwd.input_hw)
                    shown[idx] = letterbox.to_original(on_input, out_hw).clamp_(0.0, 1.0)
                    kept[idx] = on_input
        if no_path and need_grad:
            self._warn_no_path(no_path)
        return maps, used

    @staticmethod
    def _layer_maps(method: str, layer: 'TargetLayer', fwd: '_Forward',
                    grads: Dict[str, torch.Tensor], num: int,
                    shared: Dict[Tuple[str, str], torch.Tensor]) -> torch.Tensor:
        """The chunk's maps on ``layer``'s own grid (:func:`maths.cam_maps`)."""
        act = fwd.acts[layer.name]
        if METHODS[method].uses_gradients:
            return maths.cam_maps(method, act, grads[layer.name], num)
        if (method, layer.name) not in shared:
            shared[method, layer.name] = maths.cam_maps(method, act, None, 1)
        return shared[method, layer.name].expand(num, *act.shape[-2:])

    def _grads(self, layers: List[TargetLayer], sub: Detections, fwd: '_Forward',
               no_path: Dict[str, List[int]],
               level: Optional[int] = None) -> Dict[str, Union[torch.Tensor, WindowGradients]]:
        """Gradient of each detection's score w.r.t. each layer, (K, C, h, w) per layer; kept
        as windows (:class:`~mmdet_cam_hook.cam.local.WindowGradients`) when ``sub`` is all on
        ``level`` and the one layer is that level's map on the local route (the level-aware
        default)."""
        if (level is not None and len(layers) == 1 and layers[0].route == 'local'
                and layers[0].level == level and isinstance(self.local_grad, LocalGradient)):
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
                     fwd: '_Forward', rows: Dict[str, list]) -> None:
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
                     fwd: '_Forward') -> Optional[List[List[Tuple[int, int, int, int]]]]:
        """Per detection, per layer, the box of the layer's positions its window depends on;
        None when some layer cannot be packed on this level (or packing is off)."""
        if not self.pack_chain or len(v) < 2:
            return None
        reaches = []
        for layer in layers:
            if layer.name not in self._reach:
                self._reach[layer.name] = packing.probe_reach(
                    self.adapter.features, layer.module, (1, 3, *fwd.input_hw),
                    fwd.feats[0].device)
            reach = self._reach[layer.name].get(level)
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
                self._reach[layer.name][level] = None
                warnings.warn(
                    f'the gradients at {layer.name!r} reach beyond the regions the NaN probes '
                    f'gave for level {level}; its detections there are pulled back one at a '
                    'time from now on', UserWarning, stacklevel=2)
                return None
            split.append(parts)
        return split

    def _exact_route(self, layers: List[TargetLayer], sub: Detections, fwd: '_Forward',
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
        if self._batched[route]:
            try:
                return list(torch.autograd.grad(outputs, inputs, grad_outputs=cotangents,
                                                retain_graph=True, allow_unused=True,
                                                is_grads_batched=True))
            except RuntimeError as exc:
                if 'vmap' not in str(exc) and 'batch' not in str(exc).lower():
                    raise
                self._batched[route] = False
        per_row = [
            torch.autograd.grad(outputs, inputs, grad_outputs=[c[k] for c in cotangents],
                                retain_graph=True, allow_unused=True)
            for k in range(len(cotangents[0]))
        ]
        return [None if per_row[0][i] is None else torch.stack([r[i] for r in per_row])
                for i in range(len(inputs))]

    def _warn_no_path(self, no_path: Dict[str, List[int]]) -> None:
        strides = self.adapter.strides()
        level_names = self._level_layers_if_any()
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

    def _result(self, method: str, img: np.ndarray, scale: float, dets: Detections,
                cams: torch.Tensor, input_maps: Optional[torch.Tensor], used: List[List[str]],
                letterbox: Letterbox, renormalize: bool) -> CAMResult:
        """The result of one method: only the finished maps leave the device."""
        combined = combined_map(cams, img.shape[:2])  # on the device, as the maps
        bboxes = dets.bboxes.detach().cpu().numpy().astype(np.float32) * np.float32(scale)
        result = CAMResult(
            bboxes=bboxes,
            labels=dets.labels.cpu().numpy().astype(np.int64),
            scores=dets.scores.detach().cpu().numpy().astype(np.float32),
            levels=dets.levels.cpu().numpy().astype(np.int64),
            cams=cams.cpu().numpy(),
            combined=combined.cpu().numpy(),
            method=method,
            layers=used,
            image=img,
            input_cams=None if input_maps is None else input_maps.cpu().numpy(),
            letterbox=letterbox,
            scale=scale)
        return result.renormalized(copy=False) if renormalize else result


def _first_last(mask: torch.Tensor) -> torch.Tensor:
    """(K, 2) first and last True index of each row of a (K, n) boolean mask; (0, -1) for a
    row with none."""
    n = mask.shape[1]
    index = torch.arange(n, device=mask.device)
    first = torch.where(mask, index, n).amin(dim=1)
    last = torch.where(mask, index, -1).amax(dim=1)
    return torch.stack([torch.where(last >= 0, first, 0), last], dim=1)


def _shrink(img: np.ndarray, max_size: Optional[int]) -> Tuple[float, np.ndarray]:
    """``(scale, image)``: the image downscaled so that its longer side is at most
    ``max_size`` (unchanged, scale 1.0, when it already is or ``max_size`` is None)."""
    h, w = img.shape[:2]
    if max_size is None or max(h, w) <= max_size:
        return 1.0, img
    scale = max_size / max(h, w)
    size = (max(1, int(round(w * scale))), max(1, int(round(h * scale))))
    return scale, cv2.resize(img, size, interpolation=cv2.INTER_AREA)


class _Forward(NamedTuple):
    """What one forward pass leaves for the gradient work."""

    feats: Tuple[torch.Tensor, ...]  # level feature maps (the adapter's ``features``)
    outs: tuple  # head outputs (the adapter's ``head_outputs``)
    acts: Dict[str, torch.Tensor]  # target-layer outputs
    input_hw: Tuple[int, int]


def compute_cams(model: nn.Module,
                 image: ImageLike,
                 *,
                 method: str = 'gradcam',
                 target_layers: Union[None, str, Sequence[str]] = None,
                 score_thr: float = 0.3,
                 topk: Optional[int] = None,
                 renormalize: bool = False,
                 max_size: Optional[int] = None) -> CAMResult:
    """Per-detection CAMs of one image (see :class:`CAMEngine` and
    :meth:`CAMEngine.explain` for the arguments).

    Example:
        >>> from mmdet.apis import init_detector
        >>> model = init_detector('yolox_s_8xb8-300e_coco.py', 'yolox_s.pth', device='cpu')
        >>> res = compute_cams(model, 'demo.jpg', method='hirescam', topk=5)
        >>> res.cams.shape  # (K, H, W), one map per detection

    Returns:
        CAMResult: Detections and their maps, on the original image.
    """
    check_method(method)
    engine = CAMEngine(model, target_layers=target_layers, score_thr=score_thr, topk=topk)
    return engine.explain(image, methods=[method], renormalize=renormalize,
                          max_size=max_size)[method]
