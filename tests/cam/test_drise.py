"""D-RISE on toy detectors whose detections depend on known pixels."""
from typing import NamedTuple

import numpy as np
import pytest

from mmdet_cam_hook.cam.drise import drise_maps, rise_masks, similarity


def toy_detector(calls=None):
    """Detects class 0 at box (4, 4, 12, 12) with score = mean brightness of the pixels
    [6:10, 6:10] (its evidence), and class 1 at (20, 20, 28, 28) from pixels [22:26, 22:26]."""

    def detect(images):
        if calls is not None:
            calls.append(len(images))
        out = []
        for img in images:
            s0 = img[6:10, 6:10].mean() / 255
            s1 = img[22:26, 22:26].mean() / 255
            out.append((np.array([[4, 4, 12, 12], [20, 20, 28, 28]], np.float32),
                        np.array([0, 1]), np.array([s0, s1])))
        return out

    return detect


def test_map_peaks_where_the_score_depends():
    image = np.full((32, 32, 3), 200, np.uint8)
    calls = []
    maps = drise_maps(image, np.array([[4, 4, 12, 12], [20, 20, 28, 28]]), np.array([0, 1]),
                      toy_detector(calls), num_masks=300, batch_size=32, grid=8, seed=0)
    assert maps.shape == (2, 32, 32) and maps.dtype == np.float32
    assert maps.min() >= 0 and maps.max() <= 1
    for k, (y0, x0) in enumerate([(6, 6), (22, 22)]):
        evidence = maps[k, y0:y0 + 4, x0:x0 + 4].mean()
        elsewhere = np.delete(maps[k].ravel(), [y * 32 + x for y in range(y0, y0 + 4)
                                                for x in range(x0, x0 + 4)]).mean()
        assert evidence > elsewhere + 0.3, (k, evidence, elsewhere)
        peak = np.unravel_index(maps[k].argmax(), maps[k].shape)
        assert y0 - 2 <= peak[0] < y0 + 6 and x0 - 2 <= peak[1] < x0 + 6
    assert sum(calls) == 300 and max(calls) == 32


def test_seeded_and_masks_are_smooth():
    image = np.full((32, 32, 3), 200, np.uint8)
    args = (image, np.array([[4, 4, 12, 12]]), np.array([0]), toy_detector())
    a = drise_maps(*args, num_masks=50, seed=1)
    np.testing.assert_array_equal(a, drise_maps(*args, num_masks=50, seed=1))
    assert not np.array_equal(a, drise_maps(*args, num_masks=50, seed=2))
    masks = rise_masks(20, (30, 50), grid=4, p=0.5, seed=0)
    assert masks.shape == (20, 30, 50) and 0 <= masks.min() and masks.max() <= 1
    assert 0.3 < masks.mean() < 0.7
    assert len(np.unique(masks)) > 10  # bilinear, not binary


def test_similarity_needs_same_class_and_overlap():
    boxes = np.array([[0, 0, 10, 10], [0, 0, 10, 10]])
    sim = similarity(boxes, np.array([0, 1]), np.array([[0, 0, 10, 5]]), np.array([0]),
                     np.array([0.8]))
    np.testing.assert_allclose(sim, [0.5 * 0.8, 0.0])
    np.testing.assert_allclose(similarity(boxes, np.array([0, 1]), np.zeros((0, 4)), [], []),
                               [0, 0])


@pytest.mark.parametrize('kwargs, match', [
    (dict(num_masks=0), '`num` must be a positive int, got 0'),
    (dict(p=1.0), r'`p` must be a number in \(0, 1\), got 1.0'),
    (dict(batch_size=-1), '`batch_size` must be a positive int, got -1'),
])
def test_bad_arguments(kwargs, match):
    image = np.zeros((8, 8, 3), np.uint8)
    with pytest.raises(ValueError, match=match):
        drise_maps(image, np.zeros((1, 4)), np.zeros(1), toy_detector(), **kwargs)


def test_masks_rendered_a_batch_at_a_time_equal_all_at_once():
    """drise_maps renders masks per batch (memory of one batch); they are rise_masks'."""
    from mmdet_cam_hook.cam.drise import MaskSampler

    sampler = MaskSampler(10, (20, 30), grid=4, seed=3)
    np.testing.assert_array_equal(np.concatenate([sampler.masks(0, 4), sampler.masks(4, 8),
                                                  sampler.masks(8, 12)]),
                                  rise_masks(10, (20, 30), grid=4, seed=3))


def test_image_outputs_slices_every_tensor():
    import torch

    from mmdet_cam_hook.runtime.detector import image_outputs

    outs = ([torch.arange(6).reshape(3, 2)], (torch.zeros(3, 1), [torch.ones(3)]), None)
    one = image_outputs(outs, 1)
    assert one[0][0].tolist() == [[2, 3]] and one[1][0].shape == (1, 1)
    assert one[1][1][0].shape == (1, ) and one[2] is None and isinstance(one[1], tuple)

    class Outs(NamedTuple):  # a two-stage adapter's outputs
        feats: tuple
        rpn: tuple

    named = image_outputs(Outs((torch.zeros(3, 2), ), ([torch.zeros(3, 4)], )), 2)
    assert isinstance(named, Outs) and named.rpn[0][0].shape == (1, 4)
