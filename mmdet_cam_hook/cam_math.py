"""CAM maths on the network-input grid, through pytorch-grad-cam's own classes.

For a batch of K detections and one target layer, grad-cam's ``compute_cam_per_layer`` is run on
the layer's activation (the same for every detection of an image) and the K per-detection
gradients, exactly as grad-cam's ``BaseCAM.forward`` would after one backward per detection. The
per-layer maps are then averaged by grad-cam's ``aggregate_multi_layers``.
"""
from typing import Dict, List, Optional

import numpy as np
import torch

from .methods import new_cam_object


class CAMMath:
    """Per-method grad-cam objects, created once and reused (they hold no model)."""

    def __init__(self) -> None:
        self._objects: Dict[str, object] = {}

    def _get(self, method: str):
        if method not in self._objects:
            self._objects[method] = new_cam_object(method)
        return self._objects[method]

    def layer_maps(self, method: str, activation: torch.Tensor, grads: Optional[torch.Tensor],
                   input_hw: tuple, num: int) -> np.ndarray:
        """Maps of ``num`` detections on one layer, min-max scaled and resized to the input grid.

        Args:
            method (str): A key of :data:`~mmdet_cam_hook.methods.METHODS`.
            activation (torch.Tensor): (1, C, h, w) layer output for the image.
            grads (torch.Tensor | None): (num, C, h, w) gradient of each detection's score with
                respect to ``activation``; None for gradient-free methods.
            input_hw (tuple[int, int]): (H_in, W_in) of the network input.
            num (int): Number of detections.

        Returns:
            np.ndarray: (num, H_in, W_in) float32, each map in [0, 1].
        """
        cam = self._get(method)
        acts = activation.detach().float().expand(num, *activation.shape[1:])
        cam.activations_and_grads.activations = [acts]
        cam.activations_and_grads.gradients = [] if grads is None else [grads.detach().float()]
        cam.target_layers = [None]
        try:
            per_layer = cam.compute_cam_per_layer(
                _SizeOnly(input_hw), None, eigen_smooth=False)
        finally:
            cam.activations_and_grads.activations = []
            cam.activations_and_grads.gradients = []
        return per_layer[0][:, 0]

    def aggregate(self, method: str, per_layer: List[np.ndarray]) -> np.ndarray:
        """Average per-layer maps (each (K, H_in, W_in)) with grad-cam's aggregation."""
        return self._get(method).aggregate_multi_layers([m[:, None] for m in per_layer])


class _SizeOnly:
    """Stands in for the input tensor: grad-cam's maths only reads its spatial size."""

    def __init__(self, hw: tuple) -> None:
        self.shape = (1, 1, int(hw[0]), int(hw[1]))

    def size(self, dim: int) -> int:
        return self.shape[dim]
