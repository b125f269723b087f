"""The mask numbers (energy and pointing game in the instance's own mask) against hand-computed
values on constructed maps, the one accumulator behind the hook and ``mmdet-cam-eval``, and
renormalising inside the instance's mask (``renormalize='mask'``), by hand and on a real
random-init Mask R-CNN (mmdet's config, ResNet-18, 128 px)."""
import numpy as np
import pytest
import torch

from mmdet_cam_hook.cam.result import check_renormalize, renormalize_in_masks
from mmdet_cam_hook.evaluation.metrics import (
    MASK_KEYS,
    MapScores,
    detection_scores,
    energy_in_mask,
    mask_scores,
    match_to_ground_truth,
    peak_in_mask,
)


def diagonal_cam():
    """4x4 map with 1, 2, 3, 4 on the diagonal (total 10)."""
    return np.diag([1.0, 2.0, 3.0, 4.0])[None]


def mask_of(*pixels, size=4):
    mask = np.zeros((1, size, size), bool)
    for y, x in pixels:
        mask[0, y, x] = True
    return mask


@pytest.mark.parametrize('pixels, expected', [
    ([(1, 1), (3, 3)], 0.6),  # 2 + 4 of 10
    ([(0, 0), (0, 1), (1, 0)], 0.1),  # only (0, 0) = 1 lies on the diagonal
    ([(0, 3), (3, 0)], 0.0),
    ([(y, x) for y in range(4) for x in range(4)], 1.0),
])
def test_energy_in_mask_golden(pixels, expected):
    np.testing.assert_allclose(energy_in_mask(diagonal_cam(), mask_of(*pixels)), [expected])


def test_peak_in_mask_golden():
    """The peak is the first maximum in row-major order (as the box pointing game takes it):
    on a tie between (0, 3) and (2, 0), a mask holding only (2, 0) misses; a blank map scores
    NaN; an empty mask misses."""
    tie = np.zeros((1, 4, 4))
    tie[0, 0, 3] = tie[0, 2, 0] = 1.0
    cams = np.concatenate([diagonal_cam(), diagonal_cam(), tie, tie, np.zeros((1, 4, 4)),
                           diagonal_cam()])
    masks = np.concatenate([mask_of((3, 3)), mask_of((2, 2), (1, 1)), mask_of((2, 0)),
                            mask_of((0, 3)), mask_of((0, 0)), mask_of()])
    out = peak_in_mask(cams, masks)
    np.testing.assert_array_equal(out[[0, 1, 2, 3, 5]], [1.0, 0.0, 0.0, 1.0, 0.0])
    assert np.isnan(out[4])
    assert np.isnan(energy_in_mask(cams, masks)[4])
    assert peak_in_mask(np.zeros((0, 4, 4)), np.zeros((0, 4, 4), bool)).shape == (0, )


@pytest.mark.parametrize('fn', [energy_in_mask, peak_in_mask])
def test_mask_metrics_bad_input(fn):
    with pytest.raises(ValueError, match=r'`masks` must have the shape of `cams` \(1, 4, 4\)'):
        fn(diagonal_cam(), np.ones((1, 4, 3), bool))
    with pytest.raises(ValueError, match='non-negative'):
        fn(-diagonal_cam(), mask_of((0, 0)))


def test_mask_scores_of_class_and_mask_maps():
    """Class map: its peak (3, 3) and 4 of its 10 in the mask; mask map: a peak (0, 0) in the
    mask holding all of its energy."""
    mask_cam = np.zeros((1, 4, 4))
    mask_cam[0, 3, 3], mask_cam[0, 0, 0] = 0.5, 1.0
    scores = mask_scores(diagonal_cam(), mask_of((3, 3), (0, 0)), mask_cam)
    assert set(scores) == set(MASK_KEYS)
    assert scores['energy_in_mask'] == [pytest.approx(0.5)]
    assert scores['pointing_in_mask'] == [1.0]
    assert scores['mask_energy_in_mask'] == [1.0] and scores['mask_pointing_in_mask'] == [1.0]
    assert set(mask_scores(diagonal_cam(), mask_of((3, 3)))) == {'energy_in_mask',
                                                                   'pointing_in_mask'}


def test_mask_numbers_in_hook_and_eval_are_means_over_instances():
    """Two images (1 and 2 instances, one blank map) through the hook's path
    (``MapScores.update``) and the evaluation's (records -> ``summarize``): the mask numbers
    are means over the non-blank instances, the same in both, beside the box numbers."""
    from mmdet_cam_hook.evaluation.evaluate import EvalSettings, markdown_table, summarize

    blank = np.zeros((1, 4, 4))
    peak_out = np.zeros((1, 4, 4))
    peak_out[0, 0, 3] = 1.0
    images = [
        # EiM 0.6, PGiM 1 (peak (3, 3)); the mask map: all in the mask, peak in it
        (diagonal_cam(), mask_of((1, 1), (3, 3)), diagonal_cam()),
        # a blank map (left out), and a map whose peak is outside its mask (EiM 0, PGiM 0)
        (np.concatenate([blank, peak_out]), np.concatenate([mask_of((0, 0)), mask_of((1, 1))]),
         np.concatenate([blank, diagonal_cam()])),
    ]
    boxes = [[0, 0, 4, 4]]
    hook = MapScores()
    records = []
    settings = EvalSettings(methods=['gradcam'], protocols=['prior'])
    for cams, masks, mask_cams in images:
        k = len(cams)
        hook.update(cams, boxes * k, [0] * k, boxes, [0], masks=masks, mask_cams=mask_cams)
        match = match_to_ground_truth(boxes * k, [0] * k, boxes, [0])
        record = dict(seconds=0.0, num_detections=k,
                      **detection_scores(cams, boxes * k, match, boxes, masks, mask_cams),
                      deletion_auc=dict(prior=[0.0] * k), insertion_auc=dict(prior=[0.0] * k))
        records.append({m: record for m in settings.all_methods})
    ours, ev = hook.summary(), summarize(records, settings)['gradcam']
    expected = dict(energy_in_mask=0.3, pointing_game_in_mask=0.5,
                    mask_energy_in_mask=(0.6 + 0.2) / 2, mask_pointing_game_in_mask=0.5)
    for name, value in expected.items():
        assert ours[name] == pytest.approx(value) and ev[name] == pytest.approx(value), name
    assert ours['blank_share'] == ev['blank_share'] == pytest.approx(1 / 3)
    assert ev['energy_in_box'] == pytest.approx(1.0) and ev['pointing_game'] == 1.0
    table = markdown_table(summarize(records, settings), ['prior'])
    assert 'EiM ↑ | PGiM ↑ | mask EiM ↑ | mask PGiM ↑' in table
    assert '| gradcam | 1.000 | 1.000 | 0.000 | 0.333 | 0.300 | 0.500 | 0.400 | 0.500 |' in table


def test_box_only_records_have_no_mask_numbers():
    from mmdet_cam_hook.evaluation.evaluate import EvalSettings, markdown_table, summarize

    settings = EvalSettings(methods=['gradcam'], protocols=['prior'])
    record = dict(seconds=0.0, num_detections=1, **detection_scores(diagonal_cam(),
                                                                    [[0, 0, 4, 4]]),
                  deletion_auc=dict(prior=[0.0]), insertion_auc=dict(prior=[0.0]))
    summary = summarize([{m: record for m in settings.all_methods}], settings)
    assert not set(summary['gradcam']) & {'energy_in_mask', 'pointing_game_in_mask'}
    assert 'EiM' not in markdown_table(summary, ['prior'])
    assert 'energy_in_mask' not in MapScores().summary()


# --------------------------------------------------------------------------- renormalize
def test_renormalize_in_masks_golden():
    """grad-cam's min-max over the mask's pixels only: (v - 0.2) / (0.6 + 1e-7) inside,
    0 outside; an empty mask gives a zero map."""
    cams = np.array([[[0.2, 0.4], [0.6, 0.8]], [[0.5, 0.1], [0.3, 0.9]]], np.float32)
    masks = np.array([[[1, 0], [1, 1]], [[0, 0], [0, 0]]], bool)
    out = renormalize_in_masks(cams, masks)
    np.testing.assert_allclose(out[0], [[0.0, 0.0], [0.4 / 0.6, 1.0]], atol=1e-6)
    assert not out[1].any() and cams[0, 0, 1] == np.float32(0.4)  # a new array
    renormalize_in_masks(cams, masks, out=cams)
    np.testing.assert_allclose(cams, out)
    with pytest.raises(ValueError, match=r'`masks` must have the shape of `cams`'):
        renormalize_in_masks(cams, masks[:, :1])


@pytest.mark.parametrize('value, expected', [
    (False, None), (None, None), (True, 'box'), ('box', 'box'), ('mask', 'mask')])
def test_check_renormalize(value, expected):
    assert check_renormalize(value) == expected


@pytest.mark.parametrize('value', ['msk', 1, 'Mask', ''])
def test_check_renormalize_names_the_choices(value):
    with pytest.raises(ValueError, match=r"`renormalize` must be one of \[False, True, 'box', "
                       r"'mask'\], got " + repr(value).replace('(', r'\(')):
        check_renormalize(value)


MASK_RCNN = {'model.backbone.depth': 18, 'model.neck.in_channels': [64, 128, 256, 512],
             'model.test_cfg.rpn.max_per_img': 100, 'model.test_cfg.rcnn.max_per_img': 20,
             'model.roi_head.mask_head.conv_out_channels': 32,
             'model.roi_head.bbox_roi_extractor.finest_scale': 8,
             'model.roi_head.mask_roi_extractor.finest_scale': 8}
#: As tests/adapters/test_masks.py perturbs it: masks of varied sizes.
MASK_PERTURB = dict(weights={'rpn_reg': 0.2, 'fc_cls': 0.05, 'fc_reg': 0.01, 'conv_logits': 0.3},
                    biases={'fc_cls': (0.0, 0.5), 'conv_logits': (0.0, 0.3)})


@pytest.fixture(scope='module')
def mask_rcnn():
    from mmdet_cam_hook.testing import build_detector

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield build_detector('mask_rcnn/mask-rcnn_r50_fpn_1x_coco.py', perturb=MASK_PERTURB,
                             cfg_options=MASK_RCNN)
    finally:
        torch.set_num_threads(threads)


def test_explain_renormalizes_in_the_masks(mask_rcnn):
    """``explain(renormalize='mask')`` on a real Mask R-CNN: each class map min-maxed over
    its own predicted mask, zero outside, ``combined`` their pixel-wise max; the mask maps
    stay raw; the box renormalisation differs from it; a bad value names the choices."""
    from mmdet_cam_hook import CAMEngine
    from mmdet_cam_hook.testing import synthetic_image

    engine = CAMEngine(mask_rcnn, score_thr=0.0, topk=4)
    image = synthetic_image(96, 160, seed=4)
    raw = engine.explain(image, methods='hirescam')['hirescam']
    res = engine.explain(image, methods='hirescam', renormalize='mask')['hirescam']
    assert res.masks.any(axis=(1, 2)).all() and not res.masks.all(axis=(1, 2)).any()
    np.testing.assert_allclose(res.cams, renormalize_in_masks(raw.cams, raw.masks), atol=1e-6)
    assert not res.cams[~res.masks].any()
    assert np.isclose(res.cams.reshape(4, -1).max(1), 1.0, atol=1e-5).all()
    np.testing.assert_allclose(res.combined, res.cams.max(axis=0), atol=1e-6)
    np.testing.assert_allclose(res.mask_cams, raw.mask_cams, atol=1e-6)
    boxed = engine.explain(image, methods='hirescam', renormalize=True)['hirescam']
    assert not np.allclose(boxed.cams, res.cams, atol=1e-3)
    np.testing.assert_allclose(raw.renormalized(within='mask').cams, res.cams, atol=1e-6)
    with pytest.raises(ValueError, match=r"`renormalize` must be one of \[False, True, 'box', "
                       r"'mask'\], got 'masks'"):
        engine.explain(image, methods='hirescam', renormalize='masks')


def test_renormalize_in_masks_needs_masks():
    from mmdet_cam_hook import CAMEngine
    from mmdet_cam_hook.testing import build_detector, synthetic_image

    model = build_detector('yolox/yolox_nano_8xb8-300e_coco.py',
                           perturb=dict(biases={'multi_level_conv_cls': (0.0, 0.5),
                                                'multi_level_conv_obj': (0.0, 0.5)}))
    engine = CAMEngine(model, score_thr=0.0, topk=2)
    calls = []
    handle = model.backbone.register_forward_pre_hook(lambda *args: calls.append(args))
    try:  # refused before any forward
        with pytest.raises(ValueError, match="`renormalize='mask'` needs instance masks"):
            engine.explain(synthetic_image(96, 160, seed=4), methods='hirescam',
                           renormalize='mask')
        with pytest.raises(ValueError, match=r"must be one of \[False, True, 'box', 'mask'\]"):
            engine.explain_batch([synthetic_image(96, 160, seed=4)], renormalize='masks')
    finally:
        handle.remove()
    assert calls == []
