"""Guided Anchoring on random-init models from mmdet's own configs: GA RetinaNet
(``GARetinaHead``), GA Faster R-CNN (``GARPNHead`` as the RPN) and GA-RPN alone.

mmcv 2.1.0's ``MaskedConv2d`` (the class and box convolutions, run at the kept locations only)
has no CPU kernel, so mmdet's own ``predict`` cannot run here in eval mode once a location is
kept (the first test shows it). The oracle is mmdet's ``predict`` with that one kernel written
in torch (:func:`_torch_masked_conv2d`: the convolution at the masked locations, zeros
elsewhere, what mmcv's CUDA kernel computes); everything else (the location mask, the guided
anchors, the filtering, the top-k, NMS) is mmdet's. Checked: the adapters' head outputs equal
mmdet's forward, decoding equals ``model.predict``, the live scores equal the decoded ones,
Grad-CAM / HiResCAM / LayerCAM maps on the level-aware default (the exact route: the
deformable convolution's offsets depend on the features) equal grad-cam's class run once per
detection (atol 1e-4) and are non-blank on every level, and a subclass overriding what the
adapter relies on is refused.

Narrow ResNet-18 (caffe style, as the configs) and 32-channel neck and heads; 256 px for the
RetinaNet (P7 2x2, smaller than the deformable 3x3 kernel: mmcv pads it), 128 px for the
R-CNN. The location branch is perturbed so that it keeps some locations and drops others.
"""
from unittest import mock

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mmdet_cam_hook import CAMEngine
from mmdet_cam_hook.adapters import build_adapter
from mmdet_cam_hook.adapters.guided_anchoring import (
    GAFasterRCNNAdapter,
    GARetinaAdapter,
    GARPNAdapter,
)
from mmdet_cam_hook.runtime.pipeline import preprocess
from mmdet_cam_hook.testing import (
    build_detector,
    build_model,
    calibrate_bn,
    decoded,
    offline_config,
    perturb_head,
    predicted,
    synthetic_image,
)
from mmdet_cam_hook.testing.reference import reference_cams

pytestmark = pytest.mark.usefixtures('one_thread')

METHODS = ['gradcam', 'hirescam', 'layercam']
LIGHT_FPN = {'model.backbone.depth': 18, 'model.backbone.base_channels': 16,
             'model.neck.in_channels': [16, 32, 64, 128], 'model.neck.out_channels': 32}
RETINA = {**LIGHT_FPN, 'model.bbox_head.in_channels': 32, 'model.bbox_head.feat_channels': 32,
          'model.test_cfg.nms_pre': 4, 'model.test_cfg.nms.iou_threshold': 1.0}
GA_RETINA = dict(calibrate=True,
                 weights={'conv.weight': 0.08, 'conv_loc': 0.1, 'conv_adaption': 0.05,
                          'retina_cls': 0.05, 'retina_reg': 0.003},
                 biases={'conv_loc': (-4.4, 0.), 'retina_cls': (0., 0.5)})
RPN = {**LIGHT_FPN, 'model.rpn_head.in_channels': 32, 'model.rpn_head.feat_channels': 32}
GA_RPN = dict(calibrate=True,
              weights={'conv_loc': 0.5, 'conv_adaption': 0.05, 'conv_cls': 0.05,
                       'conv_reg': 0.05},
              biases={'conv_loc': (-4.6, 0.), 'conv_cls': (0., 0.5)})
GA_FASTER = dict(weights={'conv_loc': 0.1, 'conv_adaption': 0.05, 'conv_cls': 0.05,
                          'conv_reg': 0.05, 'fc_cls': 0.002},
                 biases={'conv_loc': (-5.0, 0.), 'conv_cls': (0., 0.5), 'fc_cls': (0., 0.5)})
FASTER = {**RPN, 'model.test_cfg.rpn.max_per_img': 60, 'model.test_cfg.rpn.nms_pre': 12,
          'model.rpn_head.approx_anchor_generator.octave_base_scale': 4,
          'model.rpn_head.square_anchor_generator.scales': [4],
          'model.roi_head.bbox_roi_extractor.out_channels': 32,
          'model.roi_head.bbox_roi_extractor.finest_scale': 8,
          'model.roi_head.bbox_head.in_channels': 32,
          'model.roi_head.bbox_head.fc_out_channels': 128}
CONFIGS = {'retina': ('guided_anchoring/ga-retinanet_r50-caffe_fpn_1x_coco.py', 256, RETINA,
                      GA_RETINA),
           'faster': ('guided_anchoring/ga-faster-rcnn_r50-caffe_fpn_1x_coco.py', 128, FASTER,
                      GA_FASTER),
           'rpn': ('guided_anchoring/ga-rpn_r50-caffe_fpn_1x_coco.py', 256,
                   {**RPN, 'model.test_cfg.rpn.max_per_img': 60}, GA_RPN)}
_BUILT = {}


def _torch_masked_conv2d(features, mask, weight, bias, padding=0, stride=1):
    """mmcv's masked convolution in torch: the convolution (weights and bias) at the
    locations of ``mask`` (1, H, W), zeros elsewhere."""
    out = F.conv2d(features, weight, bias, stride=stride, padding=padding)
    return out * mask[None].to(out.dtype)


@pytest.fixture
def masked_kernel(monkeypatch):
    """mmcv's ``MaskedConv2d`` computed by :func:`_torch_masked_conv2d` (CPU)."""
    import mmcv.ops.masked_conv as masked

    monkeypatch.setattr(masked, 'masked_conv2d', _torch_masked_conv2d)


def _model(name):
    """The model; built with the torch kernel (the BatchNorm calibration runs the head)."""
    import mmcv.ops.masked_conv as masked

    if name not in _BUILT:
        config, size, options, perturb = CONFIGS[name]
        with mock.patch.object(masked, 'masked_conv2d', _torch_masked_conv2d):
            _BUILT[name] = (_build_rpn(config, size, options, perturb) if name == 'rpn' else
                            build_detector(config, size, perturb=perturb, cfg_options=options))
    return _BUILT[name]


def _build_rpn(config, size, options, perturb):
    """The RPN detector (mmdet's builder has no ``bbox_head.num_classes`` to set: one class),
    as ``build_detector`` builds the others."""
    model = build_model(offline_config(config, size, options), classes=('object', ))
    perturb = dict(perturb)
    if perturb.pop('calibrate', False):
        calibrate_bn(model)
    perturb_head(model, **perturb)
    return model


def _ga_head(model):
    return model.rpn_head if hasattr(model, 'roi_head') else model.bbox_head


def test_mmcv_masked_conv_has_no_cpu_kernel():
    """Why the adapters compute the masked convolutions themselves: mmdet's own predict fails
    on CPU as soon as a location is kept."""
    model = _model('retina')
    engine = CAMEngine(model, score_thr=0.0)
    inputs, meta = preprocess(model, engine.pipeline, synthetic_image(96, 160, seed=1))
    with pytest.raises(Exception, match='masked_im2col'):
        predicted(model, inputs, meta)


@pytest.mark.parametrize('name', ['retina', 'faster', 'rpn'])
def test_head_outputs_equal_mmdet_forward(name, masked_kernel):
    """The adapters' head outputs (``forward`` in eval mode) equal mmdet's own forward; the
    location mask keeps some locations and drops others."""
    model = _model(name)
    adapter = build_adapter(model)
    inputs, _ = preprocess(model, CAMEngine(model, score_thr=0.0).pipeline,
                           synthetic_image(96, 160, seed=1))
    with torch.no_grad():
        feats = adapter.model.extract_feat(inputs)
        theirs = _ga_head(model)(feats)
        ours = adapter.head_outputs(adapter.features(inputs))
    ours = ours.rpn if name == 'faster' else ours
    for mine, own in zip(ours, theirs):
        assert len(mine) == len(own) == len(feats)
        for a, b in zip(mine, own):
            assert torch.equal(a, b)
    head = _ga_head(model)
    kept = torch.cat([(loc.sigmoid() >= head.loc_filter_thr).flatten() for loc in theirs[3]])
    assert 0.05 < kept.float().mean() < 0.95, kept.float().mean()


@pytest.mark.parametrize('name, adapter, routes', [
    ('retina', GARetinaAdapter, ['exact'] * 5),
    ('faster', GAFasterRCNNAdapter, ['local'] * 4),
    ('rpn', GARPNAdapter, ['exact'] * 4),
])
def test_decoding_scores_and_maps(name, adapter, routes, masked_kernel):
    """Decoding equals ``model.predict``; every detection sits at a kept location; the live
    score equals the decoded one; every level has detections; maps equal grad-cam's (one
    detection per level) and are non-blank on every level."""
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
    if name != 'faster':
        head = model.bbox_head
        cls_scores, _, _, loc_preds = outs
        top = len(loc_preds) - 1  # GA-RPN: a pooled P6's proposals are read on P5
        for lv, y, x, a in zip(dets.levels, dets.ys, dets.xs, dets.anchors):
            lv, y, x = (int(lv) + 1, int(y) // 2, int(x) // 2) if a > 0 and lv == top - 1 \
                else (int(lv), int(y), int(x))
            assert loc_preds[lv][0, 0, y, x].sigmoid() >= head.loc_filter_thr
    live = engine.adapter.head_outputs(engine.adapter.features(inputs))
    scores = engine.adapter.scores(live, dets)
    assert scores.requires_grad
    torch.testing.assert_close(scores, dets.scores, rtol=0, atol=1e-6)

    results = engine.explain(image, methods=METHODS if name != 'rpn' else ['hirescam'])
    for method, res in results.items():
        np.testing.assert_array_equal(res.scores, dets.scores.numpy())
        levels = sorted(set(res.levels.tolist()))
        idx = [int(np.flatnonzero(res.levels == lv)[0]) for lv in levels]
        ref = reference_cams(model, inputs, method, [res.layers[i] for i in idx],
                             dets.select(torch.tensor(idx)))
        np.testing.assert_allclose(res.input_cams[idx], ref, atol=1e-4, err_msg=method)
        if method == 'hirescam':
            for level in levels:
                on = res.levels == level
                assert (res.cams[on].reshape(on.sum(), -1).max(1) > 0).any(), level


@pytest.mark.parametrize('name, path', [('retina', 'bbox_head'), ('faster', 'rpn_head'),
                                        ('rpn', 'bbox_head')])
def test_a_subclass_overriding_the_forward_is_refused(name, path):
    from mmdet_cam_hook.adapters.base import module_at

    model = _model(name)
    head = module_at(model, path)
    base = type(head)
    head.__class__ = type(f'My{base.__name__}', (base, ), {
        'forward_single': lambda self, x: base.forward_single(self, x)})
    try:
        with pytest.raises(ValueError, match=f'My{base.__name__}.*forward_single'):
            build_adapter(model)
    finally:
        head.__class__ = base
    assert build_adapter(model) is not None


def test_head_outputs_of_a_batch_are_each_images_own():
    """Each image of a batch is masked with its own locations (mmdet's forward takes one
    image: a batch would be masked with image 0's): the outputs equal the image's alone."""
    model = _model('retina')
    adapter = build_adapter(model)
    pipeline = CAMEngine(model, score_thr=0.0).pipeline
    inputs = torch.cat([preprocess(model, pipeline, synthetic_image(96, 160, seed=s))[0]
                        for s in (1, 2)])
    with torch.no_grad():
        both = adapter.head_outputs(adapter.features(inputs))
        kept = both[3][0].sigmoid() >= model.bbox_head.loc_filter_thr
        assert not torch.equal(kept[0], kept[1])
        for i in range(2):
            alone = adapter.head_outputs(adapter.features(inputs[i:i + 1]))
            for mine, own in zip(both, alone):
                for a, b in zip(mine, own):
                    torch.testing.assert_close(a[i:i + 1], b, rtol=1e-5, atol=1e-6)
