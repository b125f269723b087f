"""The slow reference: pytorch-grad-cam's own class, called once per detection.

This is what the seed tool and mmyolo's Box AM effectively do (one forward and one full backward
per detection). The engine must give the same maps; tests check that, and the benchmarks measure
how much faster the engine is. Generic over heads: the model is wrapped so that grad-cam sees
the head's raw outputs, and the target is the adapter's own score of one detection. Not used by
the hook or the CLI.
"""
import contextlib
import dataclasses
from typing import Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from ..adapters import Detections, DetectorAdapter, build_adapter
from ..cam.layers import resolve_layers
from ..cam.methods import METHODS
from ..runtime.state import output_at, split_output_name


class HeadOutputs(nn.Module):
    """Wraps a detector so that grad-cam can call it: input tensor -> a one-element list (one
    image) holding the head's raw outputs."""

    def __init__(self, adapter: DetectorAdapter, metainfo: Optional[dict] = None) -> None:
        super().__init__()
        self.detector = adapter.model
        self.adapter = adapter
        self.metainfo = metainfo

    def forward(self, inputs: torch.Tensor):
        if inputs.shape[0] != 1:
            raise ValueError(f'the reference explains one image at a time, got {inputs.shape[0]}')
        metainfo = None if self.metainfo is None else [self.metainfo]
        return [self.adapter.head_outputs(self.adapter.features(inputs), metainfo)]


class DetectionScoreTarget:
    """grad-cam target: the adapter's score of one detection (its prior, label and anchor)."""

    def __init__(self, adapter: DetectorAdapter, det: Detections) -> None:
        self.adapter, self.det = adapter, det

    def __call__(self, outs) -> torch.Tensor:
        return self.adapter.scores(outs, self.det)[0]


class ContrastTarget(DetectionScoreTarget):
    """grad-cam target: the adapter's score of one detection minus the score its own prior
    (RoI, query) gives class ``label_b`` (the contrastive target, computed the plain way)."""

    def __init__(self, adapter: DetectorAdapter, det: Detections, label_b: int) -> None:
        super().__init__(adapter, det)
        self.other = dataclasses.replace(det, labels=torch.full_like(det.labels, int(label_b)))

    def __call__(self, outs) -> torch.Tensor:
        return super().__call__(outs) - self.adapter.scores(outs, self.other)[0]


class MaskScoreTarget(DetectionScoreTarget):
    """grad-cam target: the mask target of one instance (its mask branch's ``scores``, on the
    live level maps of grad-cam's own forward pass)."""

    def __init__(self, adapter: DetectorAdapter, det: Detections, branch, metainfo: dict) -> None:
        super().__init__(adapter, det)
        self.branch, self.metainfo = branch, metainfo

    def __call__(self, outs) -> torch.Tensor:
        return self.branch.scores(outs, self.det, self.metainfo)[0]


def reference_input_cams(model: nn.Module, inputs: torch.Tensor, method: str,
                         layers_per_det: List[List[str]], dets: Detections,
                         metainfo: Optional[dict] = None, texts=None,
                         contrast_labels: Optional[Sequence[int]] = None,
                         mask_branch=None) -> np.ndarray:
    """One grad-cam call per detection; maps on the network-input grid, (K, H_in, W_in).

    The caller owns the model's state (grad-cam puts it in eval mode and leaves ``.grad`` on its
    parameters); the tests and benchmarks restore it.

    Args:
        model (nn.Module): The detector.
        inputs (torch.Tensor): (1, 3, H_in, W_in) preprocessed input.
        method (str): A key of :data:`METHODS`.
        layers_per_det (list[list[str]]): The target layers of each detection.
        dets (Detections): The detections (the engine's decoding).
        metainfo (dict, optional): The image's metainfo, for heads whose forward needs it
            (DETR's padding masks). Defaults to None.
        texts (str | Sequence[str], optional): The prompt of a text-prompted detector.
            Defaults to None (the model's classes).
        contrast_labels (Sequence[int], optional): Class B of each detection: the target is
            then ``score[A] - score[B]`` (:class:`ContrastTarget`). Defaults to None.
        mask_branch (MaskBranch, optional): Explain each instance's mask target instead
            (:class:`MaskScoreTarget`; needs ``metainfo``). Defaults to None.
    """
    adapter = build_adapter(model)
    if texts is not None:
        adapter.set_prompt(texts)
    wrapper = HeadOutputs(adapter, metainfo)
    out = []
    for k, names in enumerate(layers_per_det):
        det = dets.select(slice(k, k + 1))
        with _tapped(resolve_layers(model, names)) as modules, \
                METHODS[method].cam_class(model=wrapper, target_layers=modules) as cam:
            if mask_branch is not None:
                target = MaskScoreTarget(adapter, det, mask_branch, metainfo)
            elif contrast_labels is not None:
                target = ContrastTarget(adapter, det, contrast_labels[k])
            else:
                target = DetectionScoreTarget(adapter, det)
            out.append(cam(inputs, [target])[0])
    return np.stack(out) if out else np.zeros((0, *inputs.shape[-2:]), np.float32)


@contextlib.contextmanager
def _tapped(resolved: List[Tuple[str, nn.Module]]) -> Iterator[List[nn.Module]]:
    """The modules grad-cam hooks for resolved target layers: the module itself, or for a
    ``path:i`` layer (one tensor of a tuple output) an ``nn.Identity`` tap that a forward
    hook on the module calls on that tensor (grad-cam then sees the very tensor the rest of
    the network reads), removed on exit."""
    modules, handles = [], []
    try:
        for name, module in resolved:
            index = split_output_name(name)[1]
            if index is None:
                modules.append(module)
                continue
            tap = nn.Identity()

            def hook(_, args, output, tap=tap, index=index):
                tap(output_at(output, index))

            handles.append(module.register_forward_hook(hook))
            modules.append(tap)
        yield modules
    finally:
        for handle in handles:
            handle.remove()


def reference_cams(model: nn.Module, *args, **kwargs) -> np.ndarray:
    """:func:`reference_input_cams` (same arguments), then the ``.grad`` grad-cam left on the
    model's parameters cleared, also when it raised."""
    try:
        return reference_input_cams(model, *args, **kwargs)
    finally:
        model.zero_grad(set_to_none=True)


def on_original(result, maps: np.ndarray, image: np.ndarray) -> np.ndarray:
    """Maps on the network-input grid (K, H_in, W_in, e.g. :func:`reference_cams`') taken to
    ``image``'s grid by ``result``'s letterbox and clipped to [0, 1], as a ``CAMResult``'s maps
    are."""
    on_image = result.letterbox.to_original(torch.from_numpy(maps), image.shape[:2])
    return on_image.clamp(0, 1).numpy()
