"""CAM maths on the network-input grid, batched over detections in torch on the model's device.

One implementation per gradient-family method (the ``raw`` of its entry in
:data:`~mmdet_cam_hook.cam.methods.METHODS`, which references these functions), written to give what
pytorch-grad-cam's class gives (``compute_cam_per_layer`` then ``aggregate_multi_layers`` after
one backward per detection), for K detections at once: the channel weights or element-wise
products, the sum over channels, ReLU, min-max scaling (``scale_cam_image``: ``m - min`` then
``/ (1e-7 + max)``) and the bilinear resize to the input grid (``cv2.resize``'s ``INTER_LINEAR``
is ``F.interpolate(mode='bilinear', align_corners=False)``). The tests check every method
against grad-cam's own class, detection by detection.

Only the first principal component of the Eigen methods leaves the device: its sign is arbitrary,
and grad-cam takes the one numpy's LAPACK returns, so the singular vectors are computed with
numpy as grad-cam does (but with the reduced SVD, which has the same first singular vector and
sign as grad-cam's ``full_matrices=True`` and costs O(hw C^2) instead of O(hw^2 C): 0.15 s
against 15.6 s on a 12288 x 256 map). Eigen-CAM reads no gradient, so its map is computed once
per layer and shared by every detection.
"""
import functools
from typing import Callable, List, Optional, Tuple, Union

import numpy as np
import torch

from .geometry import Letterbox, resize_matrix
from .geometry import resize_maps as resize
from .local import WindowGradients

#: grad-cam's epsilons (``scale_cam_image``, ``GradCAMPlusPlus``, ``XGradCAM``).
_SCALE_EPS = 1e-7
_PLUSPLUS_EPS = 1e-6
_XGRAD_EPS = 1e-7


Grads = Union[torch.Tensor, WindowGradients]
#: A method's maths: (activation (1, C, h, w), gradients (K, C, h, w), as windows, or None) ->
#: raw maps (K or 1, h, w), before ReLU and scaling.
RawMaps = Callable[[torch.Tensor, Optional[Grads]], torch.Tensor]


def _spatial_sum(t: torch.Tensor) -> torch.Tensor:
    return t.sum(dim=(2, 3))


def _weighted(weights: torch.Tensor, acts: torch.Tensor) -> torch.Tensor:
    """sum_c weights[k, c] * A[c] -> (K, h, w)."""
    return torch.einsum('kc,chw->khw', weights, acts[0])


def _parts(acts: torch.Tensor, grads: Grads) -> Tuple[torch.Tensor, torch.Tensor, Callable]:
    """``(G, A, to_map)``: the gradients, the activations at the same positions, and what turns
    a (K, ., .) map on those positions into a (K, h, w) map. For window gradients the positions
    are the windows' (the gradients are zero elsewhere, so every sum over positions is the
    window's); for full gradients, the whole map."""
    if isinstance(grads, WindowGradients):
        return grads.values, grads.gather(acts), lambda m: grads.scatter(m[:, None])[:, 0]
    return grads, acts, lambda m: m


def gradcam(acts: torch.Tensor, grads: Grads) -> torch.Tensor:
    g, _, _ = _parts(acts, grads)
    return _weighted(_spatial_sum(g) / (acts.shape[-2] * acts.shape[-1]), acts)


def gradcam_plusplus(acts: torch.Tensor, grads: Grads) -> torch.Tensor:
    g, _, _ = _parts(acts, grads)
    g2 = g * g
    g3 = g2 * g
    sum_acts = _spatial_sum(acts)[:, :, None, None]
    aij = g2 / (2 * g2 + sum_acts * g3 + _PLUSPLUS_EPS)
    aij = torch.where(g != 0, aij, torch.zeros((), dtype=aij.dtype, device=aij.device))
    return _weighted(_spatial_sum(g.clamp(min=0) * aij), acts)


def xgradcam(acts: torch.Tensor, grads: Grads) -> torch.Tensor:
    g, a, _ = _parts(acts, grads)
    sum_acts = _spatial_sum(acts)[:, :, None, None]
    return _weighted(_spatial_sum(g * a / (sum_acts + _XGRAD_EPS)), acts)


def layercam(acts: torch.Tensor, grads: Grads) -> torch.Tensor:
    g, a, to_map = _parts(acts, grads)
    return to_map((g.clamp(min=0) * a).sum(dim=1))


def hirescam(acts: torch.Tensor, grads: Grads) -> torch.Tensor:
    g, a, to_map = _parts(acts, grads)
    return to_map((g * a).sum(dim=1))


def first_component_projection(maps: torch.Tensor) -> torch.Tensor:
    """Projection of each (C, h, w) map's positions on their first principal component, as
    grad-cam's ``get_2d_projection`` computes it (NaN set to 0, positions centred, numpy's SVD,
    so the same sign).

    Args:
        maps (torch.Tensor): (K, C, h, w).

    Returns:
        torch.Tensor: (K, h, w) float32 on ``maps``' device.
    """
    k, c, h, w = maps.shape
    x = maps.detach().float().cpu().numpy().copy()
    x[np.isnan(x)] = 0
    out = np.empty((k, h * w), np.float32)
    for i in range(k):
        flat = x[i].reshape(c, -1).T
        flat = flat - flat.mean(axis=0)
        _, _, vt = np.linalg.svd(flat, full_matrices=False)
        out[i] = flat @ vt[0]
    return torch.from_numpy(out.reshape(k, h, w)).to(maps.device)


def eigencam(acts: torch.Tensor, grads: Optional[torch.Tensor]) -> torch.Tensor:
    return first_component_projection(acts)  # (1, h, w): the same for every detection


def eigengradcam(acts: torch.Tensor, grads: Grads) -> torch.Tensor:
    dense = grads.dense() if isinstance(grads, WindowGradients) else grads
    return first_component_projection(dense * acts)


def scale_maps(maps: torch.Tensor, size: Optional[Tuple[int, int]] = None) -> torch.Tensor:
    """grad-cam's ``scale_cam_image`` on a (K, h, w) batch: each map minus its minimum, divided
    by ``1e-7 +`` its maximum, then resized bilinearly to ``size`` (H, W) if given."""
    low, high = torch.aminmax(maps.flatten(1), dim=1)
    maps = (maps - low[:, None, None]) / (_SCALE_EPS + (high - low))[:, None, None]
    return resize(maps, size) if size is not None else maps


@functools.lru_cache(maxsize=64)
def _extreme_samples(n_in: int, n_out: int, device: torch.device) -> torch.Tensor:
    """(n_keep, n_in) float32 rows of the bilinear resize matrix from ``n_in`` to ``n_out``
    points (:func:`~mmdet_cam_hook.cam.geometry.resize_matrix`): only the first and the last output
    point inside each source cell, where a bilinear map's extremes over the cell are. Built
    once per pair of sizes and device."""
    full = resize_matrix(n_in, n_out)
    cell = (full > 0).to(torch.uint8).argmax(dim=1)  # the first source point each output reads
    edge = torch.ones(n_out, dtype=torch.bool)
    edge[1:-1] = (cell[1:-1] != cell[:-2]) | (cell[1:-1] != cell[2:])
    return full[edge].float().to(device)


def resized_extremes(maps: torch.Tensor, size: Tuple[int, int]) -> Tuple[torch.Tensor,
                                                                         torch.Tensor]:
    """The minimum and maximum of each map after :func:`resize` to ``size``, without resizing.

    Inside one source cell a bilinear resize is a bilinear function of the two sampling
    fractions, so its extremes over the sampled points lie on the cell's first or last sampled
    row and column: only those (about 2h x 2w points) are computed.

    Returns:
        tuple[torch.Tensor, torch.Tensor]: (K,) minima and (K,) maxima.
    """
    rows = _extreme_samples(maps.shape[-2], int(size[0]), maps.device)
    cols = _extreme_samples(maps.shape[-1], int(size[1]), maps.device)
    corners = rows @ maps @ cols.T  # (K, ~2h, ~2w)
    return torch.aminmax(corners.flatten(1), dim=1)


def cam_maps(raw: RawMaps, activation: torch.Tensor, grads: Optional[Grads],
             num: int) -> torch.Tensor:
    """Maps of ``num`` detections on one layer's own grid, after grad-cam's ReLU and min-max
    scaling (what ``compute_cam_per_layer`` resizes to the input grid).

    Args:
        raw (RawMaps): The method's maths (its ``GradientMethod.raw``, one of this module's
            functions such as :func:`gradcam`).
        activation (torch.Tensor): (1, C, h, w) layer output for the image.
        grads (torch.Tensor | WindowGradients | None): (num, C, h, w) gradient of each
            detection's score with respect to ``activation``, or the same kept as windows
            (the local route's); None for gradient-free methods.
        num (int): Number of detections.

    Returns:
        torch.Tensor: (num, h, w) float32 on ``activation``'s device, each map in [0, 1].
    """
    acts = activation.detach().float()
    if isinstance(grads, torch.Tensor):
        grads = grads.detach().float()
    maps = scale_maps(raw(acts, grads).clamp(min=0))
    return maps.expand(num, *maps.shape[1:]) if len(maps) != num else maps


def input_maps(per_layer: List[torch.Tensor], input_hw: Tuple[int, int]) -> torch.Tensor:
    """grad-cam's resize of each layer's maps (:func:`cam_maps`) to the input grid and its
    ``aggregate_multi_layers`` (clip at 0, average over layers, min-max scale again).

    With one layer, clipping and averaging change nothing, and the final scaling is affine, so
    it commutes with the resize: it is applied on the layer's grid with the extremes the resized
    maps would have (:func:`resized_extremes`), and the input-sized maps are written once.

    Args:
        per_layer (list[torch.Tensor]): (K, h_i, w_i) maps of each layer.
        input_hw (tuple[int, int]): (H_in, W_in) of the network input.

    Returns:
        torch.Tensor: (K, H_in, W_in) float32 maps in [0, 1].
    """
    if len(per_layer) == 1:
        return resize(_scaled_before_resize(per_layer[0], input_hw), input_hw)
    resized = torch.stack([resize(m, input_hw) for m in per_layer])
    return scale_maps(resized.clamp(min=0).mean(dim=0))


def image_maps(per_layer: List[torch.Tensor], letterbox: Letterbox,
               out_hw: Tuple[int, int]) -> torch.Tensor:
    """:func:`input_maps` taken on to the image (``letterbox.to_original``), without the maps on
    the input grid when there is one layer: its scaled maps go from the layer's grid straight to
    the image (:meth:`~mmdet_cam_hook.cam.geometry.Letterbox.grid_to_original`; at K = 100 on a
    312x416 image from a 52x52 layer, 20 ms against 40 ms on a CPU).

    Returns:
        torch.Tensor: (K, H, W) float32 maps in [0, 1], ``out_hw`` = (H, W).
    """
    if len(per_layer) == 1:
        scaled = _scaled_before_resize(per_layer[0], letterbox.input_shape)
        return letterbox.grid_to_original(scaled, out_hw).clamp_(0.0, 1.0)
    return letterbox.to_original(input_maps(per_layer, letterbox.input_shape),
                                 out_hw).clamp_(0.0, 1.0)


def _scaled_before_resize(maps: torch.Tensor, input_hw: Tuple[int, int]) -> torch.Tensor:
    """One layer's maps with grad-cam's final min-max scaling applied on the layer's grid, with
    the extremes the maps resized to ``input_hw`` would have (the scaling is affine, so it
    commutes with the resize)."""
    low, high = resized_extremes(maps, input_hw)
    scale = 1.0 / (_SCALE_EPS + (high - low))
    return (maps - low[:, None, None]) * scale[:, None, None]


def pixelwise_max(maps: torch.Tensor) -> torch.Tensor:
    """The pixel-wise maximum of (K, H, W) maps, K >= 1, accumulated map by map into one new
    (H, W) map: each step reads one contiguous map and allocates nothing (a reduction over the
    leading dimension reads the maps with a stride and was measured 5-17x slower on a CPU at
    K = 100; no host synchronisation on any device)."""
    out = maps[0].clone()
    for m in maps[1:]:
        torch.maximum(out, m, out=out)
    return out
