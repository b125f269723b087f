"""The RPN on its own (mmdet's ``rpn/rpn_r50_fpn_1x_coco.py``, ``RPN`` detector) on a
random-init model at 256 px: adapter selection, proposals equal to ``model.predict``, the
pooled top level (P6 = max-pool of P5) read on P5, maps equal grad-cam's class run once per
detection (the P6 proposals included), the local window on P2-P4.

Narrow ResNet-18 and 32-channel neck and head (the adapter reads the head's structure, not its
width), 50 anchors per level before NMS, 100 proposals. Torch runs at one thread.
"""
import numpy as np
import pytest
import torch
from mmengine.config import Config

from mmdet_cam_hook import CAMEngine
from mmdet_cam_hook.adapters import build_adapter
from mmdet_cam_hook.adapters.rpn import RPNAdapter
from mmdet_cam_hook.runtime.pipeline import preprocess
from mmdet_cam_hook.testing import (
    _drop_pretrained,
    _quiet_init_weights,
    calibrate_bn,
    mmdet_config,
    perturb_head,
    synthetic_image,
)
from mmdet_cam_hook.testing.reference import reference_input_cams

LIGHT = {'model.backbone.depth': 18, 'model.backbone.base_channels': 16,
         'model.neck.in_channels': [16, 32, 64, 128], 'model.neck.out_channels': 32,
         'model.rpn_head.in_channels': 32, 'model.rpn_head.feat_channels': 32,
         'model.test_cfg.rpn.max_per_img': 100, 'model.test_cfg.rpn.nms_pre': 50}
LAYERS = [f'neck.fpn_convs.{i}' for i in range(4)]


@pytest.fixture(scope='module')
def model():
    """A random-init RPN (mmdet's builder has no ``bbox_head.num_classes`` to set: the RPN
    has one class), BatchNorms calibrated, objectness and regression perturbed."""
    from mmdet.registry import MODELS
    from mmengine.registry import DefaultScope

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    cfg = Config.fromfile(mmdet_config('rpn/rpn_r50_fpn_1x_coco.py'))
    cfg.merge_from_dict(LIGHT)
    _drop_pretrained(cfg.model)
    for t in cfg.test_dataloader.dataset.pipeline:
        if t.type == 'Resize':
            t.scale = (256, 256)
    torch.manual_seed(0)
    with DefaultScope.overwrite_default_scope('mmdet'):
        rpn = MODELS.build(cfg.model)
    _quiet_init_weights(rpn)
    rpn.cfg = cfg
    calibrate_bn(rpn)
    perturb_head(rpn, weights={'rpn_cls': 0.05, 'rpn_reg': 0.05}, biases={'rpn_cls': (0., 0.5)})
    rpn.dataset_meta = dict(classes=('object', ))
    yield rpn.eval()
    torch.set_num_threads(threads)


def _decoded(model, engine, image):
    inputs, meta = preprocess(model, engine.pipeline, image)
    adapter = engine.adapter
    with torch.no_grad():
        dets = adapter.decode(adapter.head_outputs(adapter.features(inputs)), meta, 0.0)
    return inputs, meta, dets


def test_adapter_layers_and_routes(model):
    adapter = build_adapter(model)
    assert type(adapter) is RPNAdapter and adapter.pooled_top
    assert adapter.level_layers() == LAYERS
    assert adapter.strides() == [4, 8, 16, 32]
    engine = CAMEngine(model, score_thr=0.0)
    assert [layer.route for layer in engine.layers] == ['local'] * 3 + ['exact']
    assert adapter.stages()['head'] == ['bbox_head']


def test_proposals_equal_model_predict(model):
    """Boxes, scores, order and labels (all 0) equal ``model.predict``'s; proposals come from
    every level, P6's among them (anchor index >= 3 on P5); each score re-read on the live
    outputs equals the decoded one."""
    from mmdet.structures import DetDataSample

    engine = CAMEngine(model, score_thr=0.0)
    inputs, meta, dets = _decoded(model, engine, synthetic_image(96, 160, seed=1))
    with torch.no_grad():
        pred = model.predict(inputs, [DetDataSample(metainfo=meta)])[0].pred_instances
    order = pred.scores.argsort(descending=True, stable=True)
    assert len(dets) == len(pred) > 20
    assert torch.equal(dets.bboxes, pred.bboxes[order])
    assert torch.equal(dets.scores, pred.scores[order])
    assert torch.equal(dets.labels, pred.labels[order]) and not dets.labels.any()
    assert sorted(dets.levels.unique().tolist()) == [0, 1, 2, 3]
    assert (dets.anchors >= 3).any() and (dets.anchors < 3).any()
    adapter = engine.adapter
    scores = adapter.scores(adapter.head_outputs(adapter.features(inputs)), dets)
    assert scores.requires_grad
    torch.testing.assert_close(scores, dets.scores, rtol=0, atol=1e-6)


def test_maps_equal_grad_cam(model):
    """Level-aware default: maps equal grad-cam's class run once per detection for one
    proposal of each level and one of P6 (local route on P2-P4, exact on P5)."""
    image = synthetic_image(96, 160, seed=1)
    engine = CAMEngine(model, score_thr=0.0)
    inputs, _, dets = _decoded(model, engine, image)
    levels, anchors = dets.levels.numpy(), dets.anchors.numpy()
    idx = [int(np.flatnonzero(levels == lv)[0]) for lv in range(4)]
    idx.append(int(np.flatnonzero(anchors >= 3)[0]))
    for method, res in engine.explain(image, methods=['gradcam', 'hirescam']).items():
        np.testing.assert_array_equal(res.scores, dets.scores.numpy())
        try:
            ref = reference_input_cams(model, inputs, method, [res.layers[i] for i in idx],
                                       dets.select(torch.tensor(idx)))
        finally:
            model.zero_grad(set_to_none=True)
        np.testing.assert_allclose(res.input_cams[idx], ref, atol=1e-4, err_msg=method)
        assert (res.cams[idx].reshape(len(idx), -1).max(1) > 0).all(), method
