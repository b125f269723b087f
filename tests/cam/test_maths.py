"""The torch maths of every CAM method against pytorch-grad-cam's own classes, on random
activations and gradients (several layers, sizes and detections), without any detector: what
grad-cam computes after one backward per detection, K detections at once."""
import numpy as np
import pytest
import torch

from mmdet_cam_hook.cam import maths as cam_math
from mmdet_cam_hook.cam.methods import CAM_METHODS, METHODS


def grad_cam_maps(method, acts_per_layer, grads_per_layer, input_hw):
    """grad-cam's ``compute_cam_per_layer`` + ``aggregate_multi_layers`` on given tensors.

    grad-cam's classes hook a model at construction: give them a private one-layer module."""
    holder = torch.nn.Module()
    holder.anchor = torch.nn.Linear(1, 1)
    cam = METHODS[method].cam_class(model=holder, target_layers=[holder.anchor])
    num = len(grads_per_layer[0])
    cam.activations_and_grads.activations = [a.expand(num, *a.shape[1:]) for a in acts_per_layer]
    cam.activations_and_grads.gradients = list(grads_per_layer) \
        if METHODS[method].uses_gradients else []
    cam.target_layers = [None] * len(acts_per_layer)
    size_only = torch.zeros((1, 1, *input_hw))
    per_layer = cam.compute_cam_per_layer(size_only, None, eigen_smooth=False)
    return cam.aggregate_multi_layers(per_layer)


def _layer(rng, c, h, w, num, sparse):
    acts = torch.from_numpy(rng.standard_normal((1, c, h, w)).astype(np.float32)).relu()
    grads = rng.standard_normal((num, c, h, w)).astype(np.float32)
    if sparse:  # a local-route gradient: zero outside a window per detection
        mask = np.zeros((num, 1, h, w), np.float32)
        for k in range(num):
            y, x = rng.integers(0, h), rng.integers(0, w)
            mask[k, :, max(0, y - 1):y + 2, max(0, x - 1):x + 2] = 1
        grads *= mask
    return acts, torch.from_numpy(grads)


@pytest.mark.parametrize('method', CAM_METHODS)
@pytest.mark.parametrize('shapes,input_hw,sparse', [
    ([(8, 5, 7)], (40, 56), False),  # one layer, upsampled
    ([(16, 10, 10), (8, 5, 5)], (80, 80), True),  # two layers averaged, window gradients
    ([(4, 12, 9)], (12, 9), False),  # no resize
    ([(6, 7, 9)], (50, 61), True),  # one layer, a non-integer factor, window gradients
    ([(6, 13, 17)], (10, 12), False),  # one layer, downsampled
])
def test_every_method_equals_grad_cam(method, shapes, input_hw, sparse):
    rng = np.random.default_rng(len(shapes) + int(sparse))
    num = 5
    layers = [_layer(rng, c, h, w, num, sparse) for c, h, w in shapes]
    ours = cam_math.input_maps([
        METHODS[method].layer_maps(acts, grads if METHODS[method].uses_gradients else None, num)
        for acts, grads in layers], input_hw)
    ref = grad_cam_maps(method, [a for a, _ in layers], [g for _, g in layers], input_hw)
    assert ours.shape == (num, *input_hw) and ref.shape == (num, *input_hw)
    assert ours.dtype == torch.float32
    np.testing.assert_allclose(ours.numpy(), ref, atol=1e-5)
    assert ref.max() > 0.5  # the maps are not blank: the comparison means something


def test_eigencam_is_computed_once_and_shared():
    """Gradient-free: one map for the layer, the same for every detection."""
    rng = np.random.default_rng(0)
    acts, _ = _layer(rng, 6, 8, 8, 1, False)
    maps = METHODS['eigencam'].layer_maps(acts, None, 4)
    assert maps.shape == (4, 8, 8)
    assert all(torch.equal(maps[0], m) for m in maps)


def test_scale_maps_keeps_a_flat_map_at_zero():
    """grad-cam's ``scale_cam_image`` on a constant map gives 0 (not NaN)."""
    out = cam_math.scale_maps(torch.full((2, 3, 3), 4.0), (6, 6))
    assert torch.equal(out, torch.zeros((2, 6, 6)))


@pytest.mark.parametrize('size', [(40, 56), (50, 61), (10, 12), (7, 9), (1, 3)])
def test_resized_extremes_equal_those_of_the_resized_maps(size):
    """The extremes read on the cells' first and last samples are those of the whole resize,
    also for isolated minima and maxima that the resize does not sample."""
    rng = np.random.default_rng(size[0])
    maps = torch.from_numpy(rng.random((6, 7, 9)).astype(np.float32))
    maps[0] = 0.5
    maps[0, 3, 4] = 0.0  # an isolated minimum between samples
    maps[1, 0, 8] = 2.0  # an extreme in a corner
    low, high = cam_math.resized_extremes(maps, size)
    full = cam_math.resize(maps, size).flatten(1)
    np.testing.assert_allclose(low.numpy(), full.min(1).values.numpy(), atol=1e-6)
    np.testing.assert_allclose(high.numpy(), full.max(1).values.numpy(), atol=1e-6)
    if size[0] > 7:  # upsampled: the isolated zero falls between samples
        assert 0 < low[0] < 0.5


@pytest.mark.parametrize('num', [1, 2, 5, 8, 100])
def test_pixelwise_max(num):
    maps = torch.rand((num, 6, 7), generator=torch.Generator().manual_seed(num))
    assert torch.equal(cam_math.pixelwise_max(maps), maps.amax(dim=0))


@pytest.mark.parametrize('method', [m for m in CAM_METHODS if METHODS[m].uses_gradients])
def test_window_gradients_equal_full_gradients(method):
    """The local route's gradients kept as windows (also at the map's borders) give the maps
    of the same gradients on the whole map."""
    from mmdet_cam_hook.cam.local import WindowGradients

    rng = np.random.default_rng(1)
    h, w, r, num = 9, 11, 2, 6
    acts = torch.from_numpy(rng.standard_normal((1, 5, h, w)).astype(np.float32)).relu()
    ys = torch.tensor([0, 8, 4, 0, 8, 3])  # corners, edges and the middle
    xs = torch.tensor([0, 10, 5, 10, 0, 2])
    offsets = torch.arange(2 * r + 1)
    rows, cols = (ys[:, None] + offsets)[:, :, None], (xs[:, None] + offsets)[:, None, :]
    inside = WindowGradients(torch.zeros((num, 0, 5, 5)), rows, cols, r, (h, w)).gather(
        torch.ones((1, 1, h, w)))
    values = torch.from_numpy(rng.standard_normal((num, 5, 5, 5)).astype(np.float32)) * inside
    grads = WindowGradients(values, rows, cols, r, (h, w))
    dense = grads.dense()
    assert dense.shape == (num, 5, h, w) and float(dense[0, :, 3:, :].abs().sum()) == 0
    np.testing.assert_allclose(grads.gather(dense[:1])[0].numpy(), values[0].numpy())
    np.testing.assert_allclose(METHODS[method].layer_maps(acts, grads, num).numpy(),
                               METHODS[method].layer_maps(acts, dense, num).numpy(), atol=1e-5)
