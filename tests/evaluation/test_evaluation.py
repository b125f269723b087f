"""Faithfulness protocols, drise through the engine, the randomisation check and the hook's
probe, on a real (random-init, perturbed) YOLOX-nano at 96 px."""
import numpy as np
import pytest
import torch

from mmdet_cam_hook import CAMEngine
from mmdet_cam_hook.cam.methods import CAM_METHODS, METHODS
from mmdet_cam_hook.evaluation.evaluate import (
    BASELINES,
    EvalSettings,
    check_protocols,
    evaluate_image,
    markdown_table,
    matched_score_fn,
    prior_score_fn,
    probe_faithfulness,
    protocol_curves,
    summarize,
)
from mmdet_cam_hook.evaluation.faithfulness import random_maps
from mmdet_cam_hook.evaluation.sanity import (
    randomization_check,
    randomized_models,
    rank_correlations,
)
from mmdet_cam_hook.testing import build_detector, synthetic_image

#: Scores 0.3-0.5 that depend on the pixels, boxes with a size, non-blank maps.
PERTURB = dict(calibrate=True, weights={'multi_level_conv_': 0.002},
               biases={'multi_level_conv_cls': (0.0, 0.5), 'multi_level_conv_obj': (0.0, 0.5)})


@pytest.fixture(scope='module')
def model():
    torch.manual_seed(0)
    return build_detector('yolox/yolox_nano_8xb8-300e_coco.py', input_size=96, perturb=PERTURB)


@pytest.fixture(scope='module')
def image():
    return synthetic_image(72, 96, seed=1)


@pytest.fixture
def engine(model):
    return CAMEngine(model, score_thr=0.0, topk=3, drise_masks=32, drise_batch_size=16)


def test_prior_protocol_starts_at_the_detection_score(engine, image):
    """Step 0 of deletion (and the last step of insertion) is the unperturbed image: the
    tracked score is the detection's own; deleting everything changes it."""
    dets = engine.detect(image)
    assert len(dets) == 3
    scores = dets.scores.numpy()
    cams = random_maps(3, image.shape[:2], seed=0)
    curves = protocol_curves(engine.detector, image, cams, dets, 'prior', steps=2, fill='grey',
                             batch_size=5)
    np.testing.assert_allclose(curves.deletion[:, 0], scores, rtol=1e-5)
    np.testing.assert_allclose(curves.insertion[:, -1], scores, rtol=1e-5)
    assert (np.abs(curves.deletion[:, -1] - scores) > 1e-3).all()
    np.testing.assert_allclose(curves.insertion[:, 0], curves.deletion[:, -1], rtol=1e-5)
    # deterministic, and the batch size does not change the numbers
    again = protocol_curves(engine.detector, image, cams, dets, 'prior', steps=2, fill='grey',
                            batch_size=64)
    np.testing.assert_allclose(again.deletion, curves.deletion, rtol=1e-5)
    np.testing.assert_allclose(again.insertion, curves.insertion, rtol=1e-5)


def test_prior_score_fn_reads_each_image_of_the_batch(engine, image):
    dets = engine.detect(image)
    fn = prior_score_fn(engine.detector, dets)
    black = np.zeros_like(image)
    out = fn(np.stack([image, black, image, black]), np.array([0, 0, 2, 2]))
    np.testing.assert_allclose(out[[0, 2]], dets.scores.numpy()[[0, 2]], rtol=1e-5)
    assert abs(out[1] - out[0]) > 1e-3 and abs(out[3] - out[2]) > 1e-3


def test_matched_finds_the_detection_itself(engine, image):
    """On the unperturbed image, each detection matches itself: IoU 1 x same class x its
    score (a neighbour with a higher score and overlap can only raise it)."""
    dets = engine.detect(image)
    scores = dets.scores.numpy()
    fn = matched_score_fn(engine.detector, dets.bboxes.numpy(), dets.labels.numpy())
    out = fn(np.stack([image] * 3), np.arange(3))
    np.testing.assert_allclose(out[0], scores[0], rtol=1e-5)
    assert (out >= scores * (1 - 1e-5)).all()
    assert fn(np.zeros((1, *image.shape), np.uint8), np.array([0]))[0] < scores[0]


def test_drise_through_the_engine(engine, model, image):
    """drise is a method name like any other: maps of the right shape, no layers, seeded."""
    assert METHODS['drise'].black_box and 'drise' not in CAM_METHODS
    res = engine.explain(image, methods=['hirescam', 'drise'])
    d, h = res['drise'], res['hirescam']
    assert d.cams.shape == h.cams.shape == (3, 72, 96)
    assert d.input_cams.shape == h.input_cams.shape == (3, 96, 96)
    assert d.layers == [[], [], []] and h.layers[0]
    np.testing.assert_array_equal(d.bboxes, h.bboxes)
    assert d.cams.min() >= 0 and d.cams.max() <= 1 and d.cams.reshape(3, -1).max(1).min() > 0
    assert not d.input_cams[:, 72:].any()  # the letterbox padding
    again = CAMEngine(model, score_thr=0.0, topk=3, drise_masks=32).explain(image, 'drise')
    np.testing.assert_array_equal(again['drise'].cams, d.cams)
    other = CAMEngine(model, score_thr=0.0, topk=3, drise_masks=32, drise_seed=1)
    assert not np.array_equal(other.explain(image, 'drise')['drise'].cams, d.cams)


def test_explain_given_detections(engine, image):
    """explain(detections=...) explains exactly those: the same maps as decoding."""
    decoded = engine.explain(image, methods=['hirescam', 'gradcam'])
    dets = engine.detect(image)
    given = engine.explain(image, methods=['hirescam', 'gradcam'], detections=dets.select([2, 0]))
    for m in ('hirescam', 'gradcam'):
        np.testing.assert_array_equal(given[m].bboxes, decoded[m].bboxes[[2, 0]])
        np.testing.assert_allclose(given[m].cams, decoded[m].cams[[2, 0]], atol=1e-6)
    with pytest.raises(TypeError, match='`detections` must be None or a Detections'):
        engine.explain(image, detections=[1, 2])


def test_randomization_check(engine, model, image):
    """A 'randomisation' that changes nothing keeps every map (correlation 1); the real one
    lowers it, and never touches the user's model."""
    before = {k: v.clone() for k, v in model.state_dict().items()}
    same = randomization_check(engine, image, ['hirescam'], randomize=lambda module, gen: None)
    assert list(same['hirescam']) == ['head', 'head+neck', 'head+neck+backbone']
    for corr in same['hirescam'].values():
        np.testing.assert_allclose(corr, 1.0, atol=1e-6)
    real = randomization_check(engine, image, ['hirescam'], seed=0)
    assert np.nanmean(real['hirescam']['head+neck+backbone']) < 0.8
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    stages = randomized_models(model, seed=0)
    head = dict(stages)['head']
    assert not torch.equal(head.bbox_head.multi_level_conv_cls[0].weight,
                           model.bbox_head.multi_level_conv_cls[0].weight)
    assert torch.equal(head.backbone.stem.conv.conv.weight, model.backbone.stem.conv.conv.weight)


def test_randomization_stages_of_a_two_stage_detector():
    """Faster R-CNN: the RoI head, then the RPN, then the neck and the backbone are randomised
    (the RPN and RoI head hold half the parameters), each named in the report."""
    model = build_detector('faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py', input_size=96,
                           cfg_options={'model.backbone.depth': 18,
                                        'model.neck.in_channels': [64, 128, 256, 512],
                                        'model.test_cfg.rpn.max_per_img': 50})
    names = ['roi_head', 'roi_head+rpn_head', 'roi_head+rpn_head+neck',
             'roi_head+rpn_head+neck+backbone']
    copies = randomized_models(model, seed=0)
    assert [name for name, _ in copies] == names

    def changed(copy, part):
        """Per parameter of ``part`` that a permutation can change (not all one value)."""
        return [not torch.equal(p, q) for p, q in zip(getattr(copy, part).parameters(),
                                                      getattr(model, part).parameters())
                if q.min() < q.max()]

    for (name, copy), done in zip(copies, range(1, 5)):
        for k, part in enumerate(['roi_head', 'rpn_head', 'neck', 'backbone']):
            assert all(changed(copy, part)) if k < done else not any(changed(copy, part)), \
                (name, part)
    engine = CAMEngine(model, score_thr=0.0, topk=2)
    same = randomization_check(engine, synthetic_image(72, 96, seed=1), ['gradcam'],
                               randomize=lambda module, gen: None)
    assert list(same['gradcam']) == names
    for corr in same['gradcam'].values():
        assert len(corr) == 2
        np.testing.assert_allclose(corr, 1.0, atol=1e-5)


def test_rank_correlations():
    a = np.arange(12, dtype=np.float32).reshape(1, 3, 4)
    np.testing.assert_allclose(rank_correlations(a, a ** 2), [1.0])
    np.testing.assert_allclose(rank_correlations(a, -a), [-1.0])
    np.testing.assert_allclose(rank_correlations(a, np.zeros_like(a)), [0.0])
    assert np.isnan(rank_correlations(np.zeros_like(a), np.zeros_like(a)))[0]


def test_evaluate_image_and_summary(engine, image):
    settings = EvalSettings(methods=['hirescam', 'drise'], protocols='both', steps=2,
                            batch_size=32)
    dets = engine.detect(image)
    gt = dets.bboxes.numpy()[:1].astype(np.float64)
    records = [evaluate_image(engine, image, gt, dets.labels.numpy()[:1], settings, index=i)
               for i in range(2)]
    summary = summarize(records, settings)
    assert list(summary) == ['hirescam', 'drise', *BASELINES]
    for numbers in summary.values():
        assert numbers['num_detections'] == 6 and numbers['num_matched'] == 2
        assert set(numbers['deletion_auc']) == {'prior', 'matched'}
        assert 0 <= numbers['blank_share'] <= 1
        assert numbers['energy_pointing_game'] is None or 0 <= numbers['energy_pointing_game'] <= 1
    assert summary['box']['energy_pointing_game'] == pytest.approx(1.0)
    # the baselines' seeds differ per image but not per run
    again = evaluate_image(engine, image, gt, dets.labels.numpy()[:1], settings, index=1)
    assert again['random']['deletion_auc'] == records[1]['random']['deletion_auc']
    assert records[0]['random']['deletion_auc'] != records[1]['random']['deletion_auc']
    table = markdown_table(summary, settings.protocols)
    assert '| hirescam |' in table and '| random |' in table and 'del matched' in table


def test_probe_faithfulness(engine, image):
    results = engine.explain(image, methods=['hirescam', 'gradcam'])
    scalars = probe_faithfulness(engine, image, results, steps=2)
    assert set(scalars) == {f'{m}_{c}_auc_prior' for m in ('hirescam', 'gradcam')
                            for c in ('deletion', 'insertion')}
    dets = engine.detect(image)
    curves = protocol_curves(engine.detector, image, results['hirescam'].cams, dets, 'prior',
                             steps=2)
    assert scalars['hirescam_deletion_auc_prior'] == pytest.approx(curves.deletion_auc.mean())
    assert probe_faithfulness(engine, image, {}, steps=2) == {}


@pytest.mark.parametrize('call, error, match', [
    (lambda: check_protocols('prio'), ValueError,
     r"`protocols` must be one of \['prior', 'matched', 'both'\].*got 'prio'"),
    (lambda: EvalSettings(methods=['hirescam'], protocols='prior', steps=0), ValueError,
     '`steps` must be a positive int, got 0'),
    (lambda: EvalSettings(methods=['grad'], protocols='prior'), ValueError,
     r"`methods` must be one of \[.*'drise'.*\], got 'grad'"),
    (lambda: EvalSettings(methods=['drise'], protocols='prior', fill='black'), ValueError,
     '`fill` must be one of'),
])
def test_bad_arguments(call, error, match):
    with pytest.raises(error, match=match):
        call()


@pytest.mark.parametrize('kwargs, error, match', [
    (dict(drise_masks=0), ValueError, '`drise_masks` must be a positive int, got 0'),
    (dict(drise_batch_size=1.5), TypeError, '`drise_batch_size` must be a positive int, got 1.5'),
    (dict(drise_seed='0'), TypeError, "`drise_seed` must be an int >= 0, got '0'"),
])
def test_bad_engine_drise_arguments(model, kwargs, error, match):
    with pytest.raises(error, match=match):
        CAMEngine(model, **kwargs)
