"""Deletion / insertion curves on a toy detector whose score is a known function of the pixels:
closed-form curves and AUCs, the baselines, determinism, bad input."""
import numpy as np
import pytest

from mmdet_cam_hook.evaluation.faithfulness import (
    FILLS,
    auc,
    box_maps,
    deletion_insertion,
    fill_image,
    random_maps,
    saliency_order,
)

GREY = 128 / 255


def toy():
    """10x10 black image with a white 2x5 object at the top left (10 pixels). The toy
    detector's score is the mean brightness of those 10 pixels: 1 on the image."""
    image = np.zeros((10, 10, 3), np.uint8)
    image[:2, :5] = 255
    calls = []

    def score_fn(images, detections):
        calls.append(len(images))
        assert images.dtype == np.uint8 and images.shape[1:] == (10, 10, 3)
        return images[:, :2, :5, 0].reshape(len(images), -1).mean(1) / 255

    return image, score_fn, calls


def test_true_dependence_map_golden_curves():
    image, score_fn, calls = toy()
    truth = np.zeros((1, 10, 10), np.float32)
    truth[0, :2, :5] = 1.0
    curves = deletion_insertion(image, truth, score_fn, steps=10, fill='grey', batch_size=7)
    np.testing.assert_allclose(curves.fractions, np.arange(11) / 10)
    np.testing.assert_allclose(curves.deletion[0], [1.0] + [GREY] * 10)
    np.testing.assert_allclose(curves.insertion[0], [GREY] + [1.0] * 10)
    np.testing.assert_allclose(curves.deletion_auc, [0.05 + 0.05 * GREY + 0.9 * GREY])
    np.testing.assert_allclose(curves.insertion_auc, [0.05 * GREY + 0.05 + 0.9])
    assert sum(calls) == 2 * 11 and max(calls) == 7


def test_random_baseline_is_near_its_expected_auc_and_loses_to_the_truth():
    """A random order removes the object's pixels at a uniform rate: the expected deletion
    curve is 1 - f * (1 - grey), AUC 1 - (1 - grey) / 2."""
    image, score_fn, _ = toy()
    maps = random_maps(40, (10, 10), seed=1)
    curves = deletion_insertion(image, maps, score_fn, steps=10, fill='grey', batch_size=64)
    assert curves.deletion_auc.mean() == pytest.approx(1 - (1 - GREY) / 2, abs=0.02)
    assert curves.insertion_auc.mean() == pytest.approx(GREY + (1 - GREY) / 2, abs=0.02)
    truth = box_maps([[0, 0, 5, 2]], (10, 10))
    best = deletion_insertion(image, truth, score_fn, steps=10, fill='grey')
    assert best.deletion_auc[0] < curves.deletion_auc.min()
    assert best.insertion_auc[0] > curves.insertion_auc.max()


def test_blank_map_is_a_random_order_not_a_sweep():
    """Ties are broken at random: a blank map must not sweep rows from the top, which would
    hit the object first and look faithful."""
    image, score_fn, _ = toy()
    blank = np.zeros((1, 10, 10), np.float32)
    curves = deletion_insertion(image, blank, score_fn, steps=10, fill='grey')
    truth = deletion_insertion(image, box_maps([[0, 0, 5, 2]], (10, 10)), score_fn, steps=10,
                               fill='grey')
    assert curves.deletion_auc[0] > truth.deletion_auc[0] + 0.2


@pytest.mark.parametrize('fill', FILLS)
def test_deterministic_for_a_seed(fill):
    image, score_fn, _ = toy()
    maps = random_maps(2, (10, 10), seed=0)
    a = deletion_insertion(image, maps, score_fn, steps=5, fill=fill, seed=3)
    b = deletion_insertion(image, maps, score_fn, steps=5, fill=fill, seed=3)
    np.testing.assert_array_equal(a.deletion, b.deletion)
    np.testing.assert_array_equal(a.insertion, b.insertion)
    # removing everything leaves the fill; inserting everything gives the image back
    np.testing.assert_allclose(a.deletion[:, 0], 1.0)
    np.testing.assert_allclose(a.insertion[:, -1], 1.0)
    filled = fill_image(image, fill, seed=3)[:2, :5, 0].mean() / 255
    np.testing.assert_allclose(a.deletion[:, -1], filled)
    np.testing.assert_allclose(a.insertion[:, 0], filled)


def test_saliency_order_and_auc():
    cam = np.array([[0.1, 0.9], [0.5, 0.9]])
    order = saliency_order(cam, seed=0)
    assert set(order[:2].tolist()) == {1, 3} and order[2:].tolist() == [2, 0]
    np.testing.assert_allclose(auc([0, 0.5, 1], [[1, 1, 1], [0, 1, 0]]), [1.0, 0.5])


def test_box_maps_use_pixel_centres():
    maps = box_maps([[0.6, 0.6, 2.4, 2.4], [0, 0, 4, 1]], (3, 4))
    assert maps[0].sum() == 1 and maps[0, 1, 1] == 1
    assert maps[1].sum() == 4 and maps[1, 0].sum() == 4


@pytest.mark.parametrize('kwargs, error, match', [
    (dict(steps=0), ValueError, '`steps` must be a positive int, got 0'),
    (dict(batch_size=True), TypeError, '`batch_size` must be a positive int, got True'),
    (dict(fill='black'), ValueError,
     r"`fill` must be one of \['blur', 'grey', 'noise'\], got 'black'"),
    (dict(cams=np.zeros((1, 5, 5))), ValueError, r'`cams` must have shape \(K, 10, 10\)'),
])
def test_bad_arguments(kwargs, error, match):
    image, score_fn, _ = toy()
    cams = kwargs.pop('cams', np.zeros((1, 10, 10)))
    with pytest.raises(error, match=match):
        deletion_insertion(image, cams, score_fn, **kwargs)


def test_score_fn_must_return_one_score_per_image():
    image, _, _ = toy()
    with pytest.raises(ValueError, match=r'return \(4,\) scores'):
        deletion_insertion(image, np.zeros((1, 10, 10)), lambda im, d: np.zeros(1), steps=3,
                           batch_size=4)
