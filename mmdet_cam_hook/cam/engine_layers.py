"""The target layers of :class:`~mmdet_cam_hook.cam.engine.CAMEngine`: which modules can be
target layers (one dummy forward at construction), the layers in use with their gradient routes,
and their activations captured in a forward pass.

:class:`EngineLayers` is a base of the engine, as :class:`~.prompts.PromptedEngine` is: it sets
and reads the engine's ``layers``, ``routes``, ``level_aware`` and ``local_grad``, and uses its
``model``, ``adapter`` and ``pipeline``. The layer names themselves are resolved and checked by
:mod:`.layers`.
"""
import contextlib
import dataclasses
from typing import Dict, Iterator, List, Optional, Sequence, Union

import numpy as np
import torch

from ..runtime.pipeline import preprocess
from ..runtime.state import capture_outputs, output_at, read_only, split_output_name
from .layers import LayerInfo, check_usable, probe_layers, resolve_layers, usable_hint
from .local import LocalGradient
from .routes import GradientRoutes, TargetLayer


class EngineLayers:
    """The target layers of :class:`~mmdet_cam_hook.cam.engine.CAMEngine` (its base; uses the
    engine's ``model``, ``adapter`` and ``pipeline``)."""

    def _build_layers(self, target_layers: Union[None, str, Sequence[str]]) -> None:
        """Resolve ``target_layers`` (None: the level-aware default) into :attr:`layers`, each a
        :class:`TargetLayer` with its route, after one dummy forward that decides which modules
        can be target layers.

        Raises:
            ValueError: On an unknown layer (with close matches) or one that cannot be
                explained (naming why and a usable layer of the model).
        """
        self.local_grad = self.adapter.level_gradient() or LocalGradient(self.adapter)
        self.level_aware = target_layers is None
        if self.level_aware:
            self._level_names = self.adapter.level_layers()
        else:
            self._level_names = self._level_layers_if_any()
        self.routes = GradientRoutes(self.adapter, self.local_grad, self._level_names)
        self._layer_info = self._probe_layers()
        names = self._level_names if self.level_aware else target_layers
        resolved = resolve_layers(self.model, names)
        if not self.level_aware:
            check_usable(self._layer_info, [name for name, _ in resolved], self._level_names)
        self.layers = [self.routes.target(name, module) for name, module in resolved]
        # every level map feeds every detection (DETR): the default is all of them, averaged
        self.level_aware = self.level_aware and not self.adapter.levels_shared

    def _probe_layers(self) -> Dict[str, LayerInfo]:
        """Every module's facts as a target layer, from one dummy forward at the test
        pipeline's size (:func:`~mmdet_cam_hook.cam.layers.probe_layers`)."""
        # A square image comes out of the test pipeline at the config's (square or short-side)
        # size, as a real image would.
        with read_only(self.model), torch.no_grad():
            inputs, meta = preprocess(self.model, self.pipeline,
                                      np.full((32, 32, 3), 114, np.uint8))
        self.probe_shape = tuple(inputs.shape)
        return probe_layers(
            self.model, inputs,
            lambda x: self.adapter.head_outputs(self.adapter.features(x), [meta]))

    def describe_layers(self) -> List[LayerInfo]:
        """Per module that runs in the engine's forward pass (backbone, neck, head; in the
        order their outputs are computed, at the test pipeline's input size), what
        ``mmdet-cam --list-layers`` prints: type, output shape, stride, the gradient route
        it would take as a target layer, and whether it can be one (and why not), as decided
        once when the engine was built. The dummy input's shape is :attr:`probe_shape`
        (``(1, 3, H_in, W_in)``).

        Returns:
            list[LayerInfo]: One row per module.
        """
        return [info if not info.usable else
                dataclasses.replace(info, route=self.target_layer(name).route)
                for name, info in self._layer_info.items()]

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
        return self.routes.target(canon, module)

    @property
    def layer_names(self) -> List[str]:
        return [layer.name for layer in self.layers]

    @property
    def pack_chain(self) -> bool:
        """Whether the chain route packs detections (:attr:`GradientRoutes.pack_chain`)."""
        return self.routes.pack_chain

    @pack_chain.setter
    def pack_chain(self, value: bool) -> None:
        self.routes.pack_chain = bool(value)

    @property
    def _batched(self) -> Dict[str, Optional[bool]]:
        return self.routes.batched

    @property
    def _reach(self) -> dict:
        return self.routes.reach

    def _layers_for(self, level: Optional[int]) -> List[TargetLayer]:
        if self.level_aware and level is not None:
            return [self.layers[level]]
        return self.layers

    @contextlib.contextmanager
    def _capture(self, acts: Dict[str, torch.Tensor]) -> Iterator[None]:
        """Inside the block, each target layer's output goes to ``acts`` under its name (one
        item of a tuple output for a ``path:i`` name); the forward hooks are removed on exit.

        Raises:
            ValueError: If a target layer outputs no tensor (naming a usable submodule).
        """

        def store(name, module, output):
            output = output_at(output, split_output_name(name)[1])  # ``path:i``: one item
            if not isinstance(output, torch.Tensor):
                hint = usable_hint(self._layer_info, name, self._level_names)
                raise ValueError(
                    f'target layer {name!r} outputs a {type(output).__name__}, not a tensor; '
                    f'choose one of its submodules (e.g. {hint!r} instead of {name!r})')
            acts[name] = output

        with capture_outputs([(layer.name, layer.module) for layer in self.layers], store):
            yield
