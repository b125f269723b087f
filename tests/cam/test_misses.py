"""Misses and false positives (``engine.explain(..., gt_bboxes=..., gt_labels=...)``).

Golden tests on a toy YOLOX-nano whose head is set by hand: the last 1x1 convs have zero
weights, so every prior of a level has the same scores and a 32x32 box centred on it (the
levels' grids are 8, 16 and 32 px: the boxes of level 1 and 2 lie on a 16 px grid, level 0's on
an 8 px grid), class 0 scores sigmoid(-1), sigmoid(0), sigmoid(2) on levels 0, 1, 2 (class 1:
sigmoid(-4)), objectness ~1; NMS at IoU 0.3. At ``score_thr=0.4`` NMS keeps the 16 level-2
boxes and the 16 level-1 boxes at odd cells (the others overlap a level-2 box by 1/3 or all);
so each ground-truth box below has its reason by construction.

Exactness: on a random-init YOLOX-nano, a miss's candidate score equals the raw per-prior score
read from the head outputs, and its map equals grad-cam's class run on that prior's score.
"""
import math

import numpy as np
import pytest
import torch

from mmdet_cam_hook import CAMEngine
from mmdet_cam_hook.cam.geometry import Letterbox
from mmdet_cam_hook.runtime.pipeline import preprocess
from mmdet_cam_hook.testing import build_yolox, synthetic_image
from mmdet_cam_hook.testing.reference import reference_input_cams

pytestmark = pytest.mark.usefixtures('one_thread')

S0, S1, S2 = (1 / (1 + math.exp(-v)) / (1 + math.exp(-10.0)) for v in (-1.0, 0.0, 2.0))


@pytest.fixture(scope='module')
def toy():
    model = build_yolox('nano', 128, num_classes=2, confident=False)
    head = model.bbox_head
    head.test_cfg.nms.iou_threshold = 0.3
    with torch.no_grad():
        for level, (logit, size) in enumerate(((-1.0, 4.0), (0.0, 2.0), (2.0, 1.0))):
            cls, obj = head.multi_level_conv_cls[level], head.multi_level_conv_obj[level]
            reg = head.multi_level_conv_reg[level]
            for conv in (cls, obj, reg):
                conv.weight.zero_()
            cls.bias.copy_(torch.tensor([logit, -4.0]))
            obj.bias.fill_(10.0)
            reg.bias.copy_(torch.tensor([0.0, 0.0, math.log(size), math.log(size)]))
    return model


def _box(cx, cy, side=32):
    return [cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2]


def _centres(boxes):
    return [((b[0] + b[2]) / 2, (b[1] + b[3]) / 2) for b in np.asarray(boxes)]


IMAGE = synthetic_image(128, 128, seed=0)  # the input size: no resize, no padding
GT = np.array([_box(32, 32), _box(64, 64), _box(48, 32), _box(40, 40), [100, 4, 104, 8]])
GT_LABELS = np.array([0, 1, 0, 0, 0])


def test_each_reason_by_construction(toy):
    engine = CAMEngine(toy, score_thr=0.4)
    res = engine.explain(IMAGE, methods=('gradcam', 'eigencam'), gt_bboxes=GT,
                         gt_labels=GT_LABELS)
    cam = res['gradcam']
    assert len(cam) == 32 and set(cam.labels.tolist()) == {0}
    np.testing.assert_allclose(sorted(set(np.round(cam.scores, 5))), [round(S1, 5),
                                                                      round(S2, 5)])
    misses = {m.gt_index: m for m in cam.misses}
    assert sorted(misses) == [1, 2, 3, 4]  # GT 0 is a level-2 box: matched
    assert res['eigencam'].misses is cam.misses
    # GT 1 (class 1) lies on a kept class-0 box
    wrong = misses[1]
    assert (wrong.reason, wrong.candidate_label) == ('wrong_class', 0)
    assert wrong.candidate_score == pytest.approx(S2, abs=1e-6)
    assert _centres([wrong.candidate_box]) == [(64, 64)]
    # GT 2: its level-1 prior (x 3, y 2) went into NMS and a level-2 box took it (IoU 1/3)
    sup = misses[2]
    assert sup.reason == 'suppressed' and sup.candidate_score == pytest.approx(S1, abs=1e-6)
    assert _centres([sup.candidate_box]) == [(48, 32)]
    assert _centres([cam.bboxes[sup.suppressed_by]])[0] in [(32, 32), (64, 32)]
    assert cam.scores[sup.suppressed_by] == pytest.approx(S2, abs=1e-6)
    # GT 3: only a level-0 prior covers it (IoU >= 0.5), at sigmoid(-1) < 0.4
    low = misses[3]
    assert low.reason == 'below_threshold' and low.candidate_label == 0
    assert low.candidate_score == pytest.approx(S0, abs=1e-6)
    assert _centres([low.candidate_box]) == [(40, 40)]
    assert low.caption() == f'missed: {S0:.2f} < 0.40'
    # GT 4: a 4 px box no 32 px candidate overlaps by half
    none = misses[4]
    assert none.reason == 'no_candidate' and none.candidate_box is None
    assert none.candidate_score is None and none.cams == {}
    for miss in (wrong, sup, low):
        assert set(miss.cams) == {'gradcam', 'eigencam'}
        assert miss.cams['gradcam'].shape == IMAGE.shape[:2]
    # every detection but the one on GT 0 is a false positive
    assert cam.false_positive.sum() == 31
    assert _centres(cam.bboxes[~cam.false_positive]) == [(32, 32)]
    assert [m.to_dict()['reason'] for m in cam.misses] == [
        'wrong_class', 'suppressed', 'below_threshold', 'no_candidate']


def test_topk_cut_and_no_ground_truth(toy):
    """The engine's ``topk`` keeps the 16 level-2 boxes: a level-1 box that NMS kept is then
    cut (``topk``), with no suppressor; without ground truth nothing changes."""
    engine = CAMEngine(toy, score_thr=0.4, topk=16)
    res = engine.explain(IMAGE, methods='gradcam', gt_bboxes=[_box(48, 48)], gt_labels=[0])
    cam = res['gradcam']
    assert len(cam) == 16
    (miss, ) = cam.misses
    assert (miss.reason, miss.suppressed_by) == ('topk', None)
    assert _centres([miss.candidate_box]) == [(48, 48)]
    plain = engine.explain(IMAGE, methods='gradcam')['gradcam']
    assert plain.misses is None and plain.false_positive is None
    np.testing.assert_array_equal(plain.cams, cam.cams)


def test_bad_ground_truth_is_refused(toy):
    engine = CAMEngine(toy, score_thr=0.4)
    with pytest.raises(ValueError, match='pass both or neither'):
        engine.explain(IMAGE, gt_bboxes=GT)
    with pytest.raises(ValueError, match='same length'):
        engine.explain(IMAGE, gt_bboxes=GT, gt_labels=[0])
    with pytest.raises(ValueError, match=r'`miss_iou` must be a number in \(0, 1\], got 1.5'):
        engine.explain(IMAGE, gt_bboxes=GT, gt_labels=GT_LABELS, miss_iou=1.5)


def test_miss_maps_equal_grad_cam_and_raw_scores():
    """Random-init YOLOX-nano, nothing kept at 0.99: each miss's candidate score is the raw
    ``sigmoid(cls) * sigmoid(obj)`` at its prior and its map is grad-cam's class on that score
    (on its own level's layer), taken to the original image."""
    model = build_yolox('nano', 128, num_classes=3, seed=1)
    engine = CAMEngine(model, score_thr=0.99)
    image = synthetic_image(96, 128, seed=5)  # letterboxed: scale and padding
    inputs, meta = preprocess(model, engine.pipeline, image)
    adapter = engine.adapter
    with torch.no_grad():
        outs = adapter.head_outputs(adapter.features(inputs))
        cands = adapter.candidates(outs, meta, engine.score_thr)
    top = cands.scores.max(1).values
    # the best prior of each level, as ground truth of its best class
    starts = [0, 256, 320, 336]
    rows = [int(top[a:b].argmax()) + a for a, b in zip(starts, starts[1:])]
    labels = [int(cands.scores[r].argmax()) for r in rows]
    gt = torch.stack([cands.boxes(c)[r] for r, c in zip(rows, labels)]).numpy()
    res = engine.explain(image, methods='gradcam', gt_bboxes=gt, gt_labels=labels)['gradcam']
    assert len(res) == 0 and len(res.misses) == 3
    letterbox = Letterbox.from_metainfo(meta)
    cls, _, obj = outs
    for miss in res.misses:
        assert miss.reason == 'below_threshold'
        row = cands.rows([miss.candidate], [miss.candidate_label])
        level, y, x = int(row.levels), int(row.ys), int(row.xs)
        raw = cls[level][0, miss.candidate_label, y, x].sigmoid() * obj[level][0, 0, y, x].sigmoid()
        assert miss.candidate_score == pytest.approx(float(raw), rel=1e-6)
        ref = reference_input_cams(model, inputs, 'gradcam', [[engine.layers[level].name]], row)
        model.zero_grad(set_to_none=True)
        ref = letterbox.to_original(torch.from_numpy(ref), image.shape[:2]).clamp(0, 1)
        np.testing.assert_allclose(miss.cams['gradcam'], ref[0].numpy(), atol=1e-4)
        assert miss.cams['gradcam'].max() > 0
