"""The slow reference: pytorch-grad-cam's own class, called once per detection.

This is what the seed tool and mmyolo's Box AM effectively do (one forward and one full backward
per detection). The engine must give the same maps; tests check that, and the benchmarks measure
how much faster the engine is. Not used by the hook or the CLI.
"""
from typing import List

import numpy as np
import torch
from torch import nn

from .layers import resolve_layers
from .methods import METHODS


class YOLOXOutputs(nn.Module):
    """Wraps a YOLOX so that grad-cam can call it: input tensor -> per-image list of the raw
    (cls, obj) logit maps of every level."""

    def __init__(self, detector: nn.Module) -> None:
        super().__init__()
        self.detector = detector

    def forward(self, inputs: torch.Tensor):
        cls_scores, _, objectnesses = self.detector.bbox_head(self.detector.extract_feat(inputs))
        return [[(c[i], o[i]) for c, o in zip(cls_scores, objectnesses)]
                for i in range(inputs.shape[0])]


class DetectionScoreTarget:
    """grad-cam target: ``sigmoid(cls[label]) * sigmoid(obj)`` at one prior (level, y, x)."""

    def __init__(self, level: int, label: int, y: int, x: int) -> None:
        self.level, self.label, self.y, self.x = level, label, y, x

    def __call__(self, per_level) -> torch.Tensor:
        cls, obj = per_level[self.level]
        return cls[self.label, self.y, self.x].sigmoid() * obj[0, self.y, self.x].sigmoid()


def reference_input_cams(model: nn.Module, inputs: torch.Tensor, method: str,
                         layers_per_det: List[List[str]], levels, labels, ys, xs) -> np.ndarray:
    """One grad-cam call per detection; maps on the network-input grid, (K, H_in, W_in).

    The caller owns the model's state (grad-cam puts it in eval mode and leaves ``.grad`` on its
    parameters); the tests and benchmarks restore it.
    """
    wrapper = YOLOXOutputs(model)
    out = []
    for names, level, label, y, x in zip(layers_per_det, levels, labels, ys, xs):
        modules = [m for _, m in resolve_layers(model, names)]
        with METHODS[method].cam_class(model=wrapper, target_layers=modules) as cam:
            out.append(cam(inputs, [DetectionScoreTarget(int(level), int(label), int(y),
                                                         int(x))])[0])
    return np.stack(out) if out else np.zeros((0, *inputs.shape[-2:]), np.float32)
