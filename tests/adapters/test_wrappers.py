"""Wrapped detectors: SoftTeacher (``SemiBaseDetector``) from mmdet's own config, its teacher
and student two random-init narrow Faster R-CNNs (different weights) at 128 px: the teacher is
explained by default and the student with ``semi_test_cfg.predict_on='student'`` (mmdet's own
switch, which ``model.predict`` follows), decoding equal to ``model.predict``, maps equal
grad-cam's class run once per detection, prefixed layer names, a bad ``predict_on`` refused.
"""
import copy

import numpy as np
import pytest
import torch
from mmengine.config import Config
from test_two_stage import NARROW, SMALL, build_two_stage  # the two-stage tests' builder

from mmdet_cam_hook import CAMEngine
from mmdet_cam_hook.adapters import build_adapter
from mmdet_cam_hook.adapters.two_stage import RoIGradient
from mmdet_cam_hook.adapters.wrappers import SemiSupervisedAdapter
from mmdet_cam_hook.runtime.pipeline import preprocess
from mmdet_cam_hook.testing import mmdet_config, synthetic_image
from mmdet_cam_hook.testing.reference import reference_input_cams

FASTER = 'faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py'
SOFT_TEACHER = 'soft_teacher/soft-teacher_faster-rcnn_r50-caffe_fpn_180k_semi-0.1-coco.py'
LAYERS = [f'neck.fpn_convs.{i}' for i in range(4)]


@pytest.fixture(scope='module')
def model():
    """SoftTeacher around mmdet's Faster R-CNN config (narrowed as the two-stage tests do);
    teacher and student get the weights of two differently seeded perturbed models."""
    from mmdet.registry import MODELS
    from mmengine.registry import DefaultScope

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    options = {**SMALL, **NARROW, 'model.roi_head.bbox_roi_extractor.finest_scale': 8}
    teacher, student = (build_two_stage(FASTER, seed=seed, cfg_options=options)
                        for seed in (0, 1))
    cfg = Config.fromfile(mmdet_config(SOFT_TEACHER))
    cfg.model.detector = copy.deepcopy(teacher.cfg.model)
    cfg.model.data_preprocessor.data_preprocessor = teacher.cfg.model.data_preprocessor
    cfg.test_dataloader = teacher.cfg.test_dataloader
    with DefaultScope.overwrite_default_scope('mmdet'):
        semi = MODELS.build(cfg.model)
    semi.teacher.load_state_dict(teacher.state_dict())
    semi.student.load_state_dict(student.state_dict())
    semi.cfg = cfg
    semi.dataset_meta = teacher.dataset_meta
    yield semi.eval()
    torch.set_num_threads(threads)


@pytest.fixture(params=['teacher', 'student'])
def branch(request, model):
    model.semi_test_cfg['predict_on'] = request.param
    yield request.param
    model.semi_test_cfg['predict_on'] = 'teacher'


def test_the_branch_model_predict_runs_is_explained(model, branch):
    """Detections equal ``model.predict``'s (which runs the branch), the other branch's
    differ; layers, routes and stages carry the branch's prefix."""
    from mmdet.structures import DetDataSample

    engine = CAMEngine(model, score_thr=0.0)
    adapter = engine.adapter
    assert type(adapter) is SemiSupervisedAdapter and adapter.branch == branch
    assert adapter.inner.model is getattr(model, branch)
    assert engine.layer_names == [f'{branch}.{n}' for n in LAYERS]
    assert [layer.route for layer in engine.layers] == ['local'] * 4
    assert isinstance(engine.local_grad, RoIGradient)
    stages = adapter.stages()
    assert list(stages) == ['roi_head', 'rpn_head', 'neck', 'backbone']
    other = 'student' if branch == 'teacher' else 'teacher'
    assert stages['roi_head'] == [f'{branch}.roi_head', other]
    inputs, meta = preprocess(model, engine.pipeline, synthetic_image(96, 160, seed=4))
    with torch.no_grad():
        dets = adapter.decode(adapter.head_outputs(adapter.features(inputs)), meta, 0.0)
        pred = model.predict(inputs, [DetDataSample(metainfo=meta)])[0].pred_instances
        alt = getattr(model, other).predict(inputs, [DetDataSample(metainfo=meta)])
    order = pred.scores.argsort(descending=True, stable=True)
    assert len(dets) == len(pred) > 0
    assert torch.equal(dets.bboxes, pred.bboxes[order])
    assert torch.equal(dets.scores, pred.scores[order])
    assert not torch.equal(alt[0].pred_instances.scores.sort().values, dets.scores.sort().values)


def test_maps_equal_grad_cam(model, branch):
    """HiResCAM on the default layers (the branch's own), one detection per level, equals
    grad-cam's class run once per detection; the engine needs no parameter gradients (the
    teacher is frozen)."""
    image = synthetic_image(96, 160, seed=4)
    engine = CAMEngine(model, score_thr=0.0, topk=8)
    adapter = engine.adapter
    inputs, meta = preprocess(model, engine.pipeline, image)
    with torch.no_grad():
        dets = adapter.decode(adapter.head_outputs(adapter.features(inputs)), meta, 0.0)
    res = engine.explain(image, methods='hirescam')['hirescam']
    idx = [int(np.flatnonzero(res.levels == lv)[0]) for lv in sorted(set(res.levels.tolist()))]
    # SoftTeacher freezes the teacher: grad-cam (not the engine) needs parameters that want
    # gradients to get any at the layers
    frozen = [p for p in model.parameters() if not p.requires_grad]
    try:
        for p in frozen:
            p.requires_grad_(True)
        ref = reference_input_cams(model, inputs, 'hirescam', [res.layers[i] for i in idx],
                                   dets.select(torch.tensor(idx)))
    finally:
        for p in frozen:
            p.requires_grad_(False)
        model.zero_grad(set_to_none=True)
    np.testing.assert_allclose(res.input_cams[idx], ref, atol=1e-4)
    assert all(layer[0].startswith(f'{branch}.') for layer in res.layers)


def test_bad_predict_on_is_refused(model):
    model.semi_test_cfg['predict_on'] = 'teachr'
    try:
        with pytest.raises(ValueError, match=r"`semi_test_cfg.predict_on` of SoftTeacher must "
                                             r"be one of \['teacher', 'student'\], got 'teachr'"):
            build_adapter(model)
    finally:
        model.semi_test_cfg['predict_on'] = 'teacher'
