"""Iterative query heads (Sparse R-CNN; QueryInst's box branch) on random-init models from
mmdet's own configs at 160 px: adapter selection from the RoI head, decoding equal to
``model.predict`` (QueryInst: to its RoI head's ``predict_bbox``, since pasting a random-init
model's masks fails inside mmdet on degenerate boxes), maps on the exact route equal grad-cam's
class run once per detection.

Narrow ResNet-18, 30 proposals. Torch runs at one thread.
"""
import numpy as np
import pytest
import torch

from mmdet_cam_hook import CAMEngine
from mmdet_cam_hook.adapters import build_adapter
from mmdet_cam_hook.adapters.query import SparseRCNNAdapter
from mmdet_cam_hook.runtime.pipeline import preprocess
from mmdet_cam_hook.testing import build_detector, synthetic_image
from mmdet_cam_hook.testing.reference import reference_input_cams

pytestmark = pytest.mark.usefixtures('one_thread')

LIGHT = {'model.backbone.depth': 18, 'model.backbone.base_channels': 16,
         'model.neck.in_channels': [16, 32, 64, 128], 'model.rpn_head.num_proposals': 30,
         'model.test_cfg.rcnn.max_per_img': 30}
MODELS = {'sparse-rcnn': 'sparse_rcnn/sparse-rcnn_r50_fpn_1x_coco.py',
          'queryinst': 'queryinst/queryinst_r50_fpn_1x_coco.py'}
LAYERS = [f'neck.fpn_convs.{i}' for i in range(4)]
_BUILT = {}


def _model(name):
    if name not in _BUILT:
        _BUILT[name] = build_detector(MODELS[name], input_size=160, cfg_options=LIGHT)
    return _BUILT[name]


def _decoded(model, engine, image):
    inputs, meta = preprocess(model, engine.pipeline, image)
    adapter = engine.adapter
    with torch.no_grad():
        dets = adapter.decode(adapter.head_outputs(adapter.features(inputs), [meta]), meta, 0.0)
    return inputs, meta, dets


def _image():
    return synthetic_image(100, 140, seed=3)  # scale_factor != 1


@pytest.mark.parametrize('name', list(MODELS))
def test_detections_equal_model_predict(name):
    """Boxes, scores, labels (all ``max_per_img`` pairs) equal mmdet's; each score re-read on
    the live outputs for its (proposal, class) equals the decoded one; layers and routes."""
    from mmdet.structures import DetDataSample

    model = _model(name)
    engine = CAMEngine(model, score_thr=0.0)
    assert type(engine.adapter) is SparseRCNNAdapter
    assert engine.layer_names == LAYERS
    assert [layer.route for layer in engine.layers] == ['exact'] * 4
    inputs, meta, dets = _decoded(model, engine, _image())
    assert meta['scale_factor'] != (1.0, 1.0)
    with torch.no_grad():
        if name == 'sparse-rcnn':
            pred = model.predict(inputs, [DetDataSample(metainfo=meta)])[0].pred_instances
        else:
            feats = model.extract_feat(inputs)
            proposals = model.rpn_head.predict(feats, [DetDataSample(metainfo=meta)])
            pred = model.roi_head.predict_bbox(feats, [meta], proposals, model.roi_head.test_cfg,
                                               rescale=True)[0]
    order = pred.scores.argsort(descending=True, stable=True)
    assert len(dets) == len(pred) == 30
    assert torch.equal(dets.bboxes, pred.bboxes[order])
    assert torch.equal(dets.scores, pred.scores[order])
    assert torch.equal(dets.labels, pred.labels[order])
    assert len(dets.scores.unique()) == len(dets), 'scores tie'
    assert dets.rois.shape == (30, model.roi_head.num_stages, 4)
    adapter = engine.adapter
    scores = adapter.scores(adapter.head_outputs(adapter.features(inputs), [meta]), dets)
    assert scores.requires_grad
    torch.testing.assert_close(scores, dets.scores, rtol=0, atol=1e-6)


def test_maps_equal_grad_cam():
    """Level-aware default (the last stage's RoI level), exact route: maps equal grad-cam's
    class run once per detection for two detections, and are not blank."""
    model = _model('sparse-rcnn')
    image = _image()
    engine = CAMEngine(model, score_thr=0.0, topk=2)
    inputs, meta, dets = _decoded(model, engine, image)
    for method, res in engine.explain(image, methods=['gradcam', 'hirescam']).items():
        np.testing.assert_array_equal(res.scores, dets.scores[:2].numpy())
        assert res.layers == [[LAYERS[int(lv)]] for lv in dets.levels[:2]]
        try:
            ref = reference_input_cams(model, inputs, method, res.layers,
                                       dets.select(slice(0, 2)), meta)
        finally:
            model.zero_grad(set_to_none=True)
        np.testing.assert_allclose(res.input_cams, ref, atol=1e-4, err_msg=method)
        assert (res.cams.reshape(2, -1).max(1) > 0).all(), method


def test_stages_cover_every_parameter_once():
    model = _model('sparse-rcnn')
    stages = build_adapter(model).stages()
    assert list(stages) == ['roi_head', 'rpn_head', 'neck', 'backbone']
    params = dict(model.named_parameters())
    modules = dict(model.named_modules())
    owned = [id(p) for paths in stages.values() for path in paths
             for p in ([params[path]] if path in params else modules[path].parameters())]
    assert sorted(owned) == sorted(id(p) for p in model.parameters())
