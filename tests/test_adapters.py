"""Every supported head, one table: exact maps vs grad-cam, decoding vs ``model.predict``,
level-aware default, geometry on non-square images, the local window's safety rule.

Adding a head is one row of ``HEADS``: mmdet's config (under ``mmdet/.mim/configs``) and how to
perturb the random-init head (:func:`mmdet_cam_hook.testing.build_detector`'s ``perturb``) so
that scores do not tie and boxes have a size. Optional keys: ``input_size`` (default 128),
``upstream`` (a backbone/neck layer upstream of the level maps, default ``backbone.stage4``),
``shortcut`` (whether the level maps take the exact local window, default True),
``num_classes`` (default 3; fewer keeps every level under ``max_per_img``) and ``cfg_options``.
"""
import numpy as np
import pytest
import torch
from torch import nn

from mmdet_cam_hook import METHODS, CAMEngine
from mmdet_cam_hook.adapters import Detections, build_adapter, locate_priors, supported_heads
from mmdet_cam_hook.geometry import Letterbox
from mmdet_cam_hook.local import LocalGradient, window_radius
from mmdet_cam_hook.pipeline import preprocess
from mmdet_cam_hook.reference import reference_input_cams
from mmdet_cam_hook.testing import build_detector, synthetic_image

YOLOX = dict(calibrate=True, weights={'multi_level_conv_': 0.02},
             biases={'multi_level_conv_cls': (0.0, 0.5), 'multi_level_conv_obj': (0.0, 0.5)})
RTMDET = dict(calibrate=True, weights={'rtm_cls': 0.02, 'rtm_reg': 0.02},
              biases={'rtm_cls': (0.0, 0.5), 'rtm_reg': (2.0, 0.3)})

HEADS = [
    dict(name='yolox-nano', config='yolox/yolox_nano_8xb8-300e_coco.py',
         perturb=YOLOX),
    dict(name='rtmdet-tiny', config='rtmdet/rtmdet_tiny_8xb32-300e_coco.py', perturb=RTMDET,
         num_classes=1),
    dict(name='yolox-nano-gn', config='yolox/yolox_nano_8xb8-300e_coco.py',
         perturb=YOLOX, shortcut=False,
         cfg_options={'model.bbox_head.norm_cfg': dict(_delete_=True, type='GN', num_groups=8)}),
]
ALL_METHODS = sorted(METHODS)
_MODELS = {}


def _model(row):
    """One model per row for the whole module (building one costs more than a test)."""
    if row['name'] not in _MODELS:
        _MODELS[row['name']] = build_detector(row['config'], row.get('input_size', 128),
                                              num_classes=row.get('num_classes', 3),
                                              perturb=row.get('perturb'),
                                              cfg_options=row.get('cfg_options'))
    return _MODELS[row['name']]


def _decoded(model, engine, image):
    inputs, meta = preprocess(model, engine.pipeline, image)
    adapter = engine.adapter
    with torch.no_grad():
        dets = adapter.decode(adapter.head_outputs(adapter.features(inputs)), meta,
                              engine.score_thr)
    return inputs, meta, dets


def _reference(model, engine, image, res, idx):
    inputs, _, dets = _decoded(model, engine, image)
    np.testing.assert_allclose(dets.scores[:len(res)].numpy(), res.scores, rtol=1e-6)
    sub = dets.select(torch.tensor(idx, dtype=torch.long))
    try:
        return reference_input_cams(model, inputs, res.method, [res.layers[i] for i in idx], sub)
    finally:
        model.zero_grad(set_to_none=True)


def _one_per_level(levels, per_level=1):
    return [i for lv in sorted(set(levels.tolist()))
            for i in np.flatnonzero(levels == lv)[:per_level]]


@pytest.fixture(params=HEADS, ids=[row['name'] for row in HEADS])
def row(request):
    return request.param


def test_maps_equal_grad_cam(row):
    """Each method, level-aware default: the engine's K maps from one forward equal grad-cam's
    class run once per detection (input grid, atol 1e-4), for detections on every level; the
    routes are the expected ones (local window only where exact)."""
    model = _model(row)
    image = synthetic_image(96, 160, seed=1)
    engine = CAMEngine(model, score_thr=0.0)
    num_levels = len(engine.adapter.strides())
    expected = 'local' if row.get('shortcut', True) else 'exact'
    assert [layer.route for layer in engine.layers] == [expected] * num_levels
    results = engine.explain(image, methods=ALL_METHODS)
    for method, res in results.items():
        assert set(res.levels.tolist()) == set(range(num_levels)), method
        idx = _one_per_level(res.levels)
        np.testing.assert_allclose(res.input_cams[idx], _reference(model, engine, image, res, idx),
                                   atol=1e-4, err_msg=method)


def test_upstream_layer_equals_grad_cam(row):
    """A layer upstream of the level maps (chain route where the window is exact)."""
    model = _model(row)
    image = synthetic_image(128, 96, seed=2)
    engine = CAMEngine(model, target_layers=row.get('upstream', 'backbone.stage4'),
                       score_thr=0.0)
    assert engine.layers[0].route == ('chain' if row.get('shortcut', True) else 'exact')
    res = engine.explain(image, methods='hirescam')['hirescam']
    idx = _one_per_level(res.levels)
    np.testing.assert_allclose(res.input_cams[idx], _reference(model, engine, image, res, idx),
                               atol=1e-4)


def test_detections_equal_model_predict(row):
    from mmdet.structures import DetDataSample

    model = _model(row)
    image = synthetic_image(100, 140, seed=3)
    engine = CAMEngine(model, score_thr=0.0)
    res = engine.explain(image, methods='eigencam')['eigencam']
    inputs, meta = preprocess(model, engine.pipeline, image)
    with torch.no_grad():
        pred = model.predict(inputs, [DetDataSample(metainfo=meta)])[0].pred_instances
    order = pred.scores.argsort(descending=True, stable=True)
    assert len(res) == len(pred) > 0
    np.testing.assert_array_equal(res.bboxes, pred.bboxes[order].numpy())
    np.testing.assert_array_equal(res.scores, pred.scores[order].numpy())
    np.testing.assert_array_equal(res.labels, pred.labels[order].numpy())
    assert len(np.unique(res.scores)) == len(res.scores), 'perturb the head: scores tie'
    wh = res.bboxes[:, 2:] - res.bboxes[:, :2]
    assert (wh >= 0).all() and np.median(wh) > 4, 'perturb the head: degenerate boxes'


def test_level_aware_default_is_non_blank_on_every_level(row):
    model = _model(row)
    engine = CAMEngine(model, score_thr=0.0)
    res = engine.explain(synthetic_image(128, 128, seed=4), methods='gradcam')['gradcam']
    levels = engine.adapter.level_layers()
    assert set(res.levels.tolist()) == set(range(len(levels)))
    for level in range(len(levels)):
        on = res.cams[res.levels == level]
        assert (on.reshape(len(on), -1).max(1) > 0).any(), level
    for lv, names in zip(res.levels, res.layers):
        assert names == [levels[lv]]


@pytest.mark.parametrize('hw', [(60, 200), (200, 60)])
def test_geometry_on_non_square_images(row, hw):
    """The unpadded part of the network input is where the Letterbox says; maps and boxes come
    back in original-image pixels."""
    model = _model(row)
    engine = CAMEngine(model, score_thr=0.0, topk=3)
    image = synthetic_image(*hw, seed=5)
    inputs, meta = preprocess(model, engine.pipeline, image)
    box = Letterbox.from_metainfo(meta)
    h_r, w_r = box.resized_shape
    assert (h_r < inputs.shape[2]) != (w_r < inputs.shape[3])  # padded on one side only
    x = inputs[0]
    pad = x[:, h_r:, :] if h_r < x.shape[1] else x[:, :, w_r:]
    edge = x[:, h_r - 1, :w_r] if h_r < x.shape[1] else x[:, :h_r, w_r - 1]
    assert torch.all(pad == pad[:, :1, :1])  # constant padding ...
    assert not torch.all(edge == pad[:, :1, 0])  # ... that starts right after the image
    res = engine.explain(image, methods='gradcam')['gradcam']
    assert res.cams.shape == (3, *hw)
    # boxes are in original pixels: within the network input mapped back (mmdet clips them to
    # the padded input, not to the image)
    sx, sy = box.scale_factor
    assert (res.bboxes[:, [0, 2]] <= inputs.shape[3] / sx + 1e-3).all()
    assert (res.bboxes[:, [1, 3]] <= inputs.shape[2] / sy + 1e-3).all()


def test_level_layers_are_found_from_the_model(row):
    adapter = build_adapter(_model(row))
    names = adapter.level_layers()
    assert names == [f'neck.out_convs.{i}' for i in range(len(names))]
    assert adapter.level_of_layer('neck.out_convs.1.conv') == 1
    assert adapter.level_of_layer('backbone.stem') is None


def test_window_shifted_by_one_column_is_caught(monkeypatch):
    """Mutation check of the equivalence test: a local window one column off gives maps
    that differ from grad-cam's."""
    row = HEADS[1]
    model = _model(row)
    image = synthetic_image(96, 160, seed=1)
    engine = CAMEngine(model, score_thr=0.0)
    good = engine.explain(image, methods='hirescam')['hirescam']
    call = LocalGradient.__call__

    def shifted(self, feat, level, dets):
        moved = Detections(**{**dets.__dict__, 'xs': (dets.xs + 1).clamp(max=feat.shape[-1] - 1)})
        return call(self, feat, level, moved)

    monkeypatch.setattr(LocalGradient, '__call__', shifted)
    bad = engine.explain(image, methods='hirescam')['hirescam']
    idx = _one_per_level(good.levels, 3)
    ref = _reference(model, engine, image, good, idx)
    np.testing.assert_allclose(good.input_cams[idx], ref, atol=1e-4)
    assert np.abs(bad.input_cams[idx] - ref).max() > 1e-2


def _conv(k=3, d=1, s=1, p=None, mode='zeros'):
    p = (k - 1) // 2 * d if p is None else p
    return nn.Conv2d(4, 4, k, stride=s, padding=p, dilation=d, padding_mode=mode)


def test_window_rule_accepts_only_exact_modules():
    from mmcv.cnn import ConvModule, DepthwiseSeparableConvModule

    bn = dict(type='BN')
    assert window_radius([[ConvModule(4, 4, 3, padding=1, norm_cfg=bn), _conv(1)],
                          [_conv(3, d=2), nn.BatchNorm2d(4).eval(), nn.SiLU()]]) == 2
    assert window_radius([[DepthwiseSeparableConvModule(4, 4, 5, padding=2, norm_cfg=bn)]]) == 2
    assert window_radius([[_conv(3), _conv(3), _conv(3, d=3)]]) == 5
    rejected = [
        [ConvModule(4, 4, 3, padding=1, norm_cfg=dict(type='GN', num_groups=2))],
        [_conv(3), nn.GroupNorm(2, 4)],
        [nn.LayerNorm(4)],
        [nn.InstanceNorm2d(4)],
        [nn.AdaptiveAvgPool2d(1)],
        [nn.MaxPool2d(3, 1, 1)],
        [_conv(3, s=2)],
        [_conv(3, p=0)],
        [_conv(3, mode='reflect')],
        [_conv(2, p=1)],
        [nn.BatchNorm2d(4, track_running_stats=False)],
        [nn.MultiheadAttention(4, 1)],
    ]
    for branch in rejected:
        assert window_radius([branch]) is None, branch
    assert window_radius([[nn.BatchNorm2d(4).train()]], assume_eval=False) is None
    assert window_radius(None) is None


def test_unsupported_head_is_a_clear_error():

    class FooHead(nn.Module):
        pass

    class Detector(nn.Module):

        def __init__(self):
            super().__init__()
            self.bbox_head = FooHead()

    with pytest.raises(ValueError, match=r'no adapter for the head FooHead; supported heads: '
                                         r"\[.*'RTMDetHead'.*'YOLOXHead'.*\]"):
        CAMEngine(Detector())
    assert {'YOLOXHead', 'RTMDetHead', 'RTMDetSepBNHead'} <= set(supported_heads())


def test_locate_priors_follows_mmdet_order():
    sizes, anchors = [(4, 6), (2, 3)], 3
    flat = torch.arange(4 * 6 * 3 + 2 * 3 * 3)
    levels, ys, xs, a = locate_priors(flat, sizes, anchors)
    back = torch.where(levels == 0, (ys * 6 + xs) * 3 + a, 72 + (ys * 3 + xs) * 3 + a)
    assert torch.equal(back, flat)
    assert levels.tolist().count(1) == 18 and int(ys.max()) == 3 and int(a.max()) == 2
