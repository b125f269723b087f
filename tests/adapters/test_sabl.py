"""SABL (side-aware boundary localization) on random-init models from mmdet's own configs: the
GroupNorm RetinaNet (``SABLRetinaHead``; the plain one is a row of ``test_adapters.HEADS``),
SABL Faster R-CNN and SABL Cascade R-CNN (``SABLHead`` as the RoI bbox head).

Each: decoding equals ``model.predict`` (boxes, labels, scores: the class score times the
bucketing confidence, which mmdet multiplies in before NMS), the score re-read on the live
outputs equals the decoded one, Grad-CAM / HiResCAM / LayerCAM maps on the level-aware default
equal grad-cam's class run once per detection (atol 1e-4), non-blank on every level; a subclass
that overrides what the adapter relies on is refused when the adapter is built.

Narrow ResNet-18 backbones and 32-channel necks and heads (the adapters read the heads'
structure, not their widths), 256 px for the RetinaNet (P7 2x2); 128 px for the R-CNNs, whose
RPN keeps its 12 best anchors of each level (half-size anchors) and 60 proposals, with a small
``finest_scale`` so that RoIs land on all four levels. One thread.
"""
import numpy as np
import pytest
import torch

from mmdet_cam_hook import CAMEngine
from mmdet_cam_hook.adapters import build_adapter
from mmdet_cam_hook.adapters.candidates import check_candidates
from mmdet_cam_hook.adapters.sabl import (
    SABLCascadeRCNNAdapter,
    SABLFasterRCNNAdapter,
    SABLRetinaAdapter,
    SABLRoIGradient,
)
from mmdet_cam_hook.testing import (
    build_detector,
    decoded,
    kept_pairs,
    live_outputs,
    predicted,
    synthetic_image,
)
from mmdet_cam_hook.testing.reference import reference_cams

pytestmark = pytest.mark.usefixtures('one_thread')

METHODS = ['gradcam', 'hirescam', 'layercam']
LIGHT_FPN = {'model.backbone.depth': 18, 'model.backbone.base_channels': 16,
             'model.neck.in_channels': [16, 32, 64, 128], 'model.neck.out_channels': 32}
RETINA_GN = {**LIGHT_FPN, 'model.bbox_head.in_channels': 32, 'model.bbox_head.feat_channels': 32,
             'model.test_cfg.nms_pre': 4, 'model.test_cfg.nms.iou_threshold': 1.0}
SABL_RETINA = dict(weights={'conv.weight': 0.03, 'retina_cls': 0.03, 'retina_bbox_cls': 0.05,
                            'retina_bbox_reg': 0.003}, biases={'retina_cls': (0., 0.5)})
RCNN = {**LIGHT_FPN, 'model.rpn_head.in_channels': 32, 'model.rpn_head.feat_channels': 32,
        'model.test_cfg.rpn.max_per_img': 60, 'model.test_cfg.rpn.nms_pre': 12,
        'model.rpn_head.anchor_generator.scales': [4]}
#: one RoI extractor and bbox head (Faster) or three (Cascade): 32 channels, 128-wide fcs
RCNN_HEAD = {'out_channels': 32}
SABL_HEAD = {'cls_in_channels': 32, 'reg_in_channels': 32, 'cls_out_channels': 128,
             'reg_offset_out_channels': 32, 'reg_cls_out_channels': 32}
SABL_RCNN = dict(weights={'rpn_reg': 0.6, 'fc_cls': 0.05, 'fc_reg_cls': 0.05,
                          'fc_reg_offset': 0.01}, biases={'fc_cls': (0., 0.5)})
#: the RoI extractor's finest_scale that puts this random model's RoIs on all four levels
FINEST = {'faster': 8, 'cascade': 4}
CONFIGS = {'retina-gn': 'sabl/sabl-retinanet_r50-gn_fpn_1x_coco.py',
           'faster': 'sabl/sabl-faster-rcnn_r50_fpn_1x_coco.py',
           'cascade': 'sabl/sabl-cascade-rcnn_r50_fpn_1x_coco.py'}
_BUILT = {}


def _options(name):
    if name == 'retina-gn':
        return RETINA_GN
    options = {**RCNN, 'model.roi_head.bbox_roi_extractor.out_channels': 32,
               'model.roi_head.bbox_roi_extractor.finest_scale': FINEST[name]}
    if name == 'faster':
        options.update({f'model.roi_head.bbox_head.{k}': v for k, v in SABL_HEAD.items()})
    return options


def _model(name):
    if name not in _BUILT:
        if name == 'retina-gn':
            model = build_detector(CONFIGS[name], 256, perturb=SABL_RETINA,
                                   cfg_options=_options(name))
        else:
            from mmengine.config import Config

            from mmdet_cam_hook.testing import mmdet_config

            options = _options(name)
            if name == 'cascade':  # the stages' bbox heads are a list: set each
                roi = Config.fromfile(mmdet_config(CONFIGS[name])).model.roi_head
                options['model.roi_head.bbox_head'] = [dict(h, **SABL_HEAD)
                                                       for h in roi.bbox_head]
            model = build_detector(CONFIGS[name], 128, perturb=SABL_RCNN, cfg_options=options)
        _BUILT[name] = model
    return _BUILT[name]


def _per_level(levels, per_level=1):
    return [int(i) for lv in sorted(set(levels.tolist()))
            for i in np.flatnonzero(levels == lv)[:per_level]]


@pytest.mark.parametrize('name, adapter, routes', [
    ('retina-gn', SABLRetinaAdapter, ['exact'] * 5),
    ('faster', SABLFasterRCNNAdapter, ['local'] * 4),
    ('cascade', SABLCascadeRCNNAdapter, ['exact'] * 4),
])
def test_decoding_scores_and_maps(name, adapter, routes):
    """Decoding equals ``model.predict``; the live score equals the decoded one and includes
    the bucketing confidence; every level has detections; maps equal grad-cam's, one detection
    per level, and are non-blank on every level."""
    model = _model(name)
    image = synthetic_image(96, 160, seed=1)
    engine = CAMEngine(model, score_thr=0.0)
    assert type(engine.adapter) is adapter
    assert [layer.route for layer in engine.layers] == routes
    inputs, meta, outs, dets = decoded(engine, image)
    pred = predicted(model, inputs, meta)
    assert len(dets) == len(pred) > 0
    assert torch.equal(dets.bboxes, pred.bboxes)
    assert torch.equal(dets.scores, pred.scores)
    assert torch.equal(dets.labels, pred.labels)
    assert len(dets.scores.unique()) == len(dets), 'scores tie: perturb the head'
    assert sorted(dets.levels.unique().tolist()) == list(range(len(routes)))
    live = engine.adapter.head_outputs(engine.adapter.features(inputs))
    scores = engine.adapter.scores(live, dets)
    assert scores.requires_grad
    torch.testing.assert_close(scores, dets.scores, rtol=0, atol=1e-6)

    results = engine.explain(image, methods=METHODS)
    for method, res in results.items():
        np.testing.assert_array_equal(res.scores, dets.scores.numpy())
        idx = _per_level(res.levels)
        ref = reference_cams(model, inputs, method, [res.layers[i] for i in idx],
                             dets.select(torch.tensor(idx)))
        np.testing.assert_allclose(res.input_cams[idx], ref, atol=1e-4, err_msg=method)
        for level, layer in enumerate(engine.layer_names):
            on = res.levels == level
            assert all(names == [layer] for names in np.array(res.layers, object)[on])
            if method == 'hirescam':
                assert (res.cams[on].reshape(on.sum(), -1).max(1) > 0).any(), level


def test_retina_score_is_class_times_bucketing_confidence():
    """The score ``model.predict`` reports is ``sigmoid(cls)`` times the bucketing confidence
    (top bucket plus its neighbour, averaged over the 4 sides), not the class score alone."""
    model = _model('retina-gn')
    engine = CAMEngine(model, score_thr=0.0, topk=6)
    _, _, outs, dets = decoded(engine, synthetic_image(96, 160, seed=1))
    cls_scores, bucket_cls, _ = outs
    side = model.bbox_head.side_num
    for k in range(len(dets)):
        lv, y, x, c = (int(t[k]) for t in (dets.levels, dets.ys, dets.xs, dets.labels))
        prob = cls_scores[lv][0, c, y, x].sigmoid()
        buckets = bucket_cls[lv][0, :, y, x].view(4, side).softmax(-1)
        top, order = buckets.topk(2, dim=1)
        confid = (top[:, 0] + top[:, 1] * ((order[:, 0] - order[:, 1]).abs() == 1)).mean()
        torch.testing.assert_close(dets.scores[k], prob * confid, rtol=1e-5, atol=1e-7)
        assert confid < 0.99


@pytest.mark.parametrize('name', ['retina-gn', 'faster', 'cascade'])
def test_candidates_hold_the_kept_detections(name):
    """Candidates: every kept detection is one (anchor or RoI, class) pair with its box,
    score (the bucketing confidence in) and location; a pair that became a detection went
    into NMS."""
    model = _model(name)
    engine = CAMEngine(model, score_thr=0.0)
    check_candidates(engine.adapter)
    _, meta, outs, dets = decoded(engine, synthetic_image(96, 160, seed=1))
    cands = engine.adapter.candidates(outs, meta, 0.0)
    rows, labels, same = kept_pairs(cands)
    assert len(rows) == len(dets) > 0
    torch.testing.assert_close(same.scores, dets.scores, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(same.bboxes, dets.bboxes, rtol=1e-6, atol=1e-4)
    for field in ('labels', 'levels', 'ys', 'xs', 'anchors'):
        assert torch.equal(getattr(same, field), getattr(dets, field)), field
    assert cands.entered[rows, labels].all()
    assert cands.scores.shape == (len(cands), 3)


def test_roi_gradient_equals_the_full_backward():
    """SABL Faster R-CNN's RoI route: the gradient at a level map equals autograd through the
    RoI extractor and both branches of ``SABLHead``, detection by detection."""
    model = _model('faster')
    engine = CAMEngine(model, score_thr=0.0, topk=12)
    assert isinstance(engine.local_grad, SABLRoIGradient)
    inputs, meta, _, dets = decoded(engine, synthetic_image(96, 160, seed=1))
    adapter = engine.adapter
    feats, outs = live_outputs(adapter, inputs, meta)
    for level in range(4):
        on = dets.select(dets.levels == level)
        grads = engine.local_grad(feats[level], level, on)
        scores = adapter.scores(outs, on)
        for k in range(min(len(on), 2)):
            (expected, ) = torch.autograd.grad(scores[k], feats[level], retain_graph=True)
            assert expected.abs().max() > 0
            torch.testing.assert_close(grads[k:k + 1], expected, rtol=1e-4, atol=1e-7)


def _subclass(obj, method):
    """A subclass of ``obj``'s class overriding ``method`` (calling the original)."""
    base = type(obj)
    original = getattr(base, method)
    return type(f'My{base.__name__}', (base, ), {method: lambda self, *a, **k: original(
        self, *a, **k)})


@pytest.mark.parametrize('name, path, method', [
    ('retina-gn', 'bbox_head', '_predict_by_feat_single'),
    ('faster', 'roi_head.bbox_head', 'reg_forward'),
    ('cascade', 'roi_head.bbox_head.1', '_predict_by_feat_single'),
])
def test_a_subclass_overriding_a_relied_upon_method_is_refused(name, path, method):
    from mmdet_cam_hook.adapters.base import module_at

    model = _model(name)
    head = module_at(model, path)
    base = type(head)
    head.__class__ = _subclass(head, method)
    try:
        with pytest.raises(ValueError, match='no adapter for the head') as info:
            build_adapter(model)
        if name != 'cascade':  # the dense head or the RoI bbox head: named by the rule
            assert f'My{base.__name__}' in str(info.value)
            assert method in str(info.value)
    finally:
        head.__class__ = base
    assert build_adapter(model) is not None
