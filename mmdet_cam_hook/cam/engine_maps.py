"""How :class:`~mmdet_cam_hook.cam.engine.CAMEngine` turns one forward pass into each image's
results: the detections (decoded, given, or with the misses' candidates as more rows), the maps
of every method, and the :class:`~.result.CAMResult` of each.

Methods are the objects of :data:`~mmdet_cam_hook.cam.methods.METHODS`: each gradient method
gets a layer's activations and gradients (from :class:`~.routes.GradientRoutes`), and each
perturbation method's ``explain`` is called with the detector, without knowing their names.

:class:`EngineMaps` is a base of the engine, as :class:`~.prompts.PromptedEngine` is: it uses
the engine's ``model``, ``adapter``, ``pipeline``, ``detector``, target layers
(:class:`~.engine_layers.EngineLayers`), ``score_thr``, ``chunk_size``, ``keep_input_cams``,
``mask_branch``, ``batchable`` and ``_decode``.
"""
from dataclasses import fields
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch

from ..adapters import Detections
from ..runtime.detector import image_outputs
from ..runtime.pipeline import preprocess_batch
from ..runtime.state import read_only
from . import maths, targets
from .geometry import Letterbox, shrink_image
from .methods import CAMMethod, GradientMethod
from .misses import cat_detections, explain_misses, results_with_misses
from .result import CAMResult
from .routes import Forward, TargetLayer
from .targets import Contrast


class EngineMaps:
    """From one forward pass to each image's results, for
    :class:`~mmdet_cam_hook.cam.engine.CAMEngine` (its base)."""

    def _explain(self, imgs: List[np.ndarray], methods: List[CAMMethod], renormalize: bool,
                 max_size: Optional[int],
                 given: Optional[Detections] = None,
                 gt: Optional[tuple] = None,
                 contrast: Contrast = None) -> List[Dict[str, CAMResult]]:
        """One forward pass for ``imgs`` (one image unless every layer is ``local``), then
        each image's detections and maps."""
        model, adapter = self.model, self.adapter
        with read_only(model):
            inputs, metas = preprocess_batch(model, self.pipeline, imgs)
            need_grad = any(m.uses_gradients for m in methods)
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
                forwards = [Forward(tuple(feats), outs, acts, input_hw)]
            else:
                forwards = [Forward(tuple(f[i:i + 1] for f in feats), image_outputs(outs, i),
                                     {name: a[i:i + 1] for name, a in acts.items()}, input_hw)
                            for i in range(len(imgs))]
            del feats, outs, acts
            return [self._explain_one(img, meta, forwards.pop(0), methods, renormalize,
                                      max_size, given, gt, contrast)
                    for img, meta in zip(imgs, metas)]

    def _explain_one(self, img: np.ndarray, metainfo: dict, fwd: Forward,
                     methods: List[CAMMethod], renormalize: bool, max_size: Optional[int],
                     given: Optional[Detections],
                     gt: Optional[tuple] = None,
                     contrast: Contrast = None) -> Dict[str, CAMResult]:
        """One image's detections and maps, from its part of the forward pass; with ``gt``
        (boxes, labels, miss IoU), the misses' candidates are mapped as more rows (with the
        same target: contrast included; masks are the detections' only)."""
        letterbox = Letterbox.from_metainfo(metainfo)
        gradient = [m for m in methods if isinstance(m, GradientMethod)]
        need_grad = any(m.uses_gradients for m in gradient)
        device = fwd.feats[0].device
        if given is not None:
            dets = Detections(*(None if getattr(given, f.name) is None else
                                getattr(given, f.name).to(device)
                                for f in fields(Detections)))
        else:
            dets = self._decode(fwd.outs, metainfo)
        report, num = None, len(dets)
        if gt is not None:
            with torch.no_grad():
                cands = self.adapter.candidates(fwd.outs, metainfo, self.score_thr, dets)
            report = explain_misses(cands, gt[0], gt[1], self.score_thr, gt[2])
            dets = cat_detections(dets, report.rows)
        labels_b = None if contrast is None else targets.contrast_labels(
            self.adapter, fwd.outs, dets, contrast, targets.num_classes(self.adapter))
        scale, shown = shrink_image(img, max_size)
        out_hw = shown.shape[:2]
        with torch.enable_grad():
            maps, used = self._maps(gradient, dets, fwd, need_grad, letterbox, out_hw,
                                    labels_b)
            masks, mask_maps = (None, None) if self.mask_branch is None else \
                targets.mask_maps(self, gradient, dets.select(slice(0, num)), fwd, metainfo,
                                  letterbox, out_hw)
        del fwd
        bboxes, labels = dets.bboxes.detach().cpu().numpy(), dets.labels.cpu().numpy()
        for m in methods:  # perturbation methods: the detector on perturbed images
            if m not in gradient:
                on_input = torch.from_numpy(
                    m.explain(self.detector, img, bboxes, labels, letterbox)).to(device)
                maps[m.name] = (letterbox.to_original(on_input, out_hw).clamp_(0.0, 1.0),
                                on_input if self.keep_input_cams else None)
        def extra(name: str) -> dict:  # the detections' rows of the contrast and the masks
            return dict(contrast_labels=None if labels_b is None else labels_b[:num],
                        masks=masks,
                        mask_cams=None if mask_maps is None else mask_maps.get(name))

        if report is None:
            return {
                m.name: CAMResult.from_tensors(m.name, shown, scale, dets, *maps[m.name],
                                     used if m in gradient else [[] for _ in used], letterbox,
                                     renormalize, **extra(m.name))
                for m in methods
            }
        return results_with_misses([(m.name, m in gradient) for m in methods], shown, scale,
                                   dets, maps, used, letterbox, renormalize, report, num,
                                   extra=extra)

    def _maps(self, methods, dets: Detections, fwd: Forward, need_grad: bool,
              letterbox: Letterbox, out_hw: Tuple[int, int],
              labels_b: Optional[torch.Tensor] = None
              ) -> Tuple[Dict[str, Tuple[torch.Tensor, Optional[torch.Tensor]]], List[List[str]]]:
        """Per method, the (K, H, W) maps on the returned image (``out_hw``) and, with
        ``keep_input_cams``, the (K, H_in, W_in) maps on the input grid, both on the model's
        device; and each detection's layers.

        Detections are taken level by level in chunks of ``chunk_size``: the gradients held at
        once are at most ``chunk_size`` x C x h x w per layer, and each chunk's maps go from the
        input grid to the returned image before the next chunk. A gradient-free method's map is
        computed once per layer and shared by every detection. With ``labels_b`` (the
        contrast's class B of each detection) the gradients are those of ``score[label] -
        score[B]`` (:func:`.targets.subtract`)."""
        num = len(dets)
        device = fwd.feats[0].device

        def new(hw):  # every row is written below
            return torch.empty((num, *hw), dtype=torch.float32, device=device)

        maps = {m.name: (new(out_hw), new(fwd.input_hw) if self.keep_input_cams else None)
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
                grads = self.routes.grads(layers, sub, fwd, no_path, level) if need_grad else {}
                if need_grad and labels_b is not None:
                    sub_b = targets.relabel(sub, labels_b[idx])
                    grads = targets.subtract(grads, self.routes.grads(layers, sub_b, fwd, {},
                                                                      level))
                idx = idx.to(device)
                for m in methods:
                    per_layer = [self._layer_maps(m, layer, fwd, grads, len(sub), shared)
                                 for layer in layers]
                    shown, kept = maps[m.name]
                    if kept is None:
                        shown[idx] = maths.image_maps(per_layer, letterbox, out_hw)
                        continue
                    on_input = maths.input_maps(per_layer, fwd.input_hw)
                    shown[idx] = letterbox.to_original(on_input, out_hw).clamp_(0.0, 1.0)
                    kept[idx] = on_input
        if no_path and need_grad:
            self.routes.warn_no_path(no_path, self._level_layers_if_any())
        return maps, used

    @staticmethod
    def _layer_maps(method: GradientMethod, layer: TargetLayer, fwd: Forward,
                    grads: Dict[str, torch.Tensor], num: int,
                    shared: Dict[Tuple[str, str], torch.Tensor]) -> torch.Tensor:
        """The chunk's maps on ``layer``'s own grid (:meth:`GradientMethod.layer_maps`)."""
        act = fwd.acts[layer.name]
        if method.uses_gradients:
            return method.layer_maps(act, grads[layer.name], num)
        if (method.name, layer.name) not in shared:
            shared[method.name, layer.name] = method.layer_maps(act, None, 1)
        return shared[method.name, layer.name].expand(num, *act.shape[-2:])
