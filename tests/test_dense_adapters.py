"""Adapters of mmdet's dense heads (RetinaNet, FCOS, ATSS, GFL, YOLOv3) on random-init models
from mmdet's own configs: decoding equals ``model.test_step``, scores equal the decoded ones on
every level and several anchors, level layers output the neck's maps, local windows are exact.
"""
import functools

import pytest
import torch

from mmdet_cam_hook import pipeline as mmdet_pipeline
from mmdet_cam_hook.adapters import build_adapter
from mmdet_cam_hook.local import LocalGradient, window_radius
from mmdet_cam_hook.testing import build_detector, synthetic_image

#: name: (mmdet config, perturb_head arguments, facts: levels, anchors per location, window
#: radius (None: GroupNorm, exact full route), level_of_layer of each level layer)
HEADS = {
    'retinanet': ('retinanet/retinanet_r50_fpn_1x_coco.py',
                  dict(weights={'conv.weight': 0.03, 'retina_cls': 0.03, 'retina_reg': 0.003},
                       biases={'retina_cls': (0., 0.5)}),
                  dict(levels=5, anchors=9, radius=5, level_of=[0, 1, 2, None, 4])),
    'fcos': ('fcos/fcos_r50-caffe_fpn_gn-head_1x_coco.py',
             dict(weights={'conv.weight': 0.03, 'conv_cls': 0.03, 'conv_centerness': 0.03,
                           'conv_reg': 0.03},
                  biases={'conv_cls': (0., 0.5), 'conv_centerness': (0., 0.5)}),
             dict(levels=5, anchors=1, radius=None, level_of=[0, 1, None, None, 4])),
    'atss': ('atss/atss_r50_fpn_1x_coco.py',
             dict(weights={'conv.weight': 0.03, 'atss_cls': 0.03, 'atss_centerness': 0.03,
                           'atss_reg': 0.003},
                  biases={'atss_cls': (0., 0.5), 'atss_centerness': (0., 0.5)}),
             dict(levels=5, anchors=1, radius=None, level_of=[0, 1, None, None, 4])),
    'gfl': ('gfl/gfl_r50_fpn_1x_coco.py',
            dict(weights={'conv.weight': 0.03, 'gfl_cls': 0.03, 'gfl_reg': 0.03},
                 biases={'gfl_cls': (0., 0.5)}),
            dict(levels=5, anchors=1, radius=None, level_of=[0, 1, None, None, 4])),
    'yolov3': ('yolo/yolov3_mobilenetv2_8xb24-320-300e_coco.py',
               dict(calibrate=True, weights={'convs_pred': 0.05},
                    biases={'convs_pred': (0., 0.5)}),
               dict(levels=3, anchors=3, radius=1, level_of=[None, None, 2])),
}
#: test_cfg that keeps detections on every level: the top 8 per level (YOLOv3: one global
#: top-k) and no suppression between distinct boxes (FPN levels 3-4 clip to the whole image)
EVERY_LEVEL = dict(score_thr=0.05, nms_pre=8, nms=dict(type='nms', iou_threshold=1.0),
                   max_per_img=100)
EVERY_LEVEL_YOLOV3 = dict(score_thr=0.05, conf_thr=0.005, nms_pre=1000,
                          nms=dict(type='nms', iou_threshold=0.45), max_per_img=100)


@functools.cache
def _model(name):
    config, perturb, _ = HEADS[name]
    torch.set_num_threads(1)
    return build_detector(config, input_size=128, perturb=perturb)


def _setup(name, test_cfg=None):
    """(model, adapter, inputs, metainfo, data) with the head's test_cfg set (every level by
    default)."""
    from mmengine.config import ConfigDict

    model = _model(name)
    if test_cfg is None:
        test_cfg = EVERY_LEVEL_YOLOV3 if name == 'yolov3' else EVERY_LEVEL
    model.bbox_head.test_cfg = ConfigDict(test_cfg)
    pipeline = mmdet_pipeline.build_pipeline(mmdet_pipeline.test_pipeline_cfg(model.cfg))
    image = synthetic_image(96, 160)
    inputs, metainfo = mmdet_pipeline.preprocess(model, pipeline, image)
    data = pipeline(dict(img=image, img_id=0))
    return model, build_adapter(model), inputs, metainfo, data


@pytest.mark.parametrize('name', list(HEADS))
@pytest.mark.parametrize('variant', ['default', 'every_level'])
def test_decode_equals_test_step(name, variant):
    """Boxes, scores, labels and order equal ``model.test_step``'s, at the config's threshold
    and above it; the live head outputs are not modified."""
    test_cfg = None
    if variant == 'default':
        test_cfg = dict(_model(name).cfg.model.test_cfg)
        test_cfg['score_thr'] = 0.05
    model, adapter, inputs, metainfo, data = _setup(name, test_cfg)
    with torch.no_grad():
        pred = model.test_step(dict(inputs=[data['inputs']],
                                    data_samples=[data['data_samples']]))[0].pred_instances
        outs = adapter.head_outputs(adapter.features(inputs))
        before = [t.clone() for level_outs in outs for t in level_outs]
        for thr in (0.05, 0.3):
            dets = adapter.decode(outs, metainfo, thr)
            keep = pred.scores >= thr
            assert len(dets) > 0 and len(dets) == int(keep.sum())
            assert torch.equal(dets.bboxes, pred.bboxes[keep])
            assert torch.equal(dets.scores, pred.scores[keep])
            assert torch.equal(dets.labels, pred.labels[keep])
        after = [t for level_outs in outs for t in level_outs]
    assert all(torch.equal(a, b) for a, b in zip(before, after))


@pytest.mark.parametrize('name', list(HEADS))
def test_scores_on_every_level_and_anchor(name):
    """The differentiable score of each detection, read from the live outputs at its prior,
    equals the decoded score; detections cover every level (and several anchors)."""
    facts = HEADS[name][2]
    model, adapter, inputs, metainfo, _ = _setup(name)
    outs = adapter.head_outputs(adapter.features(inputs))
    dets = adapter.decode(outs, metainfo, 0.05)
    assert sorted(dets.levels.unique().tolist()) == list(range(facts['levels']))
    assert adapter.num_base_priors == facts['anchors']
    assert len(dets.anchors.unique()) >= min(facts['anchors'], 3)
    scores = adapter.scores(outs, dets)
    assert scores.requires_grad
    torch.testing.assert_close(scores, dets.scores, rtol=0, atol=1e-6)
    assert len(adapter.scores(outs, dets.select(slice(0, 0)))) == 0


@pytest.mark.parametrize('name', list(HEADS))
def test_level_layers_output_the_neck_maps(name):
    """Forward hooks on ``level_layers()`` see exactly the neck's outputs; a layer feeding
    other levels too (FPN ``on_output`` P5, extra levels, YOLOv3 detect blocks) has no level."""
    facts = HEADS[name][2]
    model, adapter, inputs, _, _ = _setup(name)
    layers = adapter.level_layers()
    assert len(layers) == facts['levels']
    modules = dict(model.named_modules())
    seen = {}
    handles = [modules[n].register_forward_hook(
        lambda m, a, out, n=n: seen.__setitem__(n, out)) for n in layers]
    try:
        with torch.no_grad():
            feats = adapter.features(inputs)
    finally:
        for handle in handles:
            handle.remove()
    for layer, feat in zip(layers, feats):
        assert seen[layer] is feat
    with torch.inference_mode():  # as an engine built under inference mode asks
        assert [adapter.level_of_layer(n) for n in layers] == facts['level_of']
    inner = [n for n in modules if n.startswith(layers[-1] + '.')][0]
    assert adapter.level_of_layer(inner) == facts['level_of'][-1]


def _cut(feat, dets, r):
    """(K, C, 2r+1, 2r+1) windows centred on the priors, zero outside the map, and the
    (K, 1, 2r+1, 2r+1) on-map mask."""
    size = 2 * r + 1
    padded = torch.nn.functional.pad(feat, (r, r, r, r))
    inside = torch.nn.functional.pad(torch.ones_like(feat[:, :1]), (r, r, r, r))
    ys, xs = dets.ys.tolist(), dets.xs.tolist()
    return (torch.stack([padded[0, :, y:y + size, x:x + size] for y, x in zip(ys, xs)]),
            torch.stack([inside[0, :, y:y + size, x:x + size] for y, x in zip(ys, xs)]))


@pytest.mark.parametrize('name', list(HEADS))
def test_local_window(name):
    """BN/no-norm heads: the score computed on a window cut around each detection (off-map
    positions zeroed before every spatial conv, as the engine does) equals the full-map score,
    border detections included, and the engine's local gradient equals the full backward.
    GroupNorm heads: no window (exact full route)."""
    facts = HEADS[name][2]
    model, adapter, inputs, metainfo, _ = _setup(name)
    if facts['radius'] is None:
        assert all(adapter.window_branches(level) is None for level in range(facts['levels']))
        return
    with torch.no_grad():
        feats = adapter.features(inputs)
    feats = [f.detach().requires_grad_(True) for f in feats]
    outs = adapter.head_outputs(feats)
    dets = adapter.decode(outs, metainfo, 0.05)
    local = LocalGradient(adapter)
    border = 0
    for level in range(facts['levels']):
        branches = adapter.window_branches(level)
        r = window_radius(branches)
        assert r == facts['radius']
        d = dets.select(dets.levels == level)
        h, w = feats[level].shape[-2:]
        border += int(((d.ys < r) | (d.xs < r) | (d.ys >= h - r) | (d.xs >= w - r)).sum())
        windows, mask = _cut(feats[level].detach(), d, r)
        convs = {id(m): m for b in branches for mod in b for m in mod.modules()
                 if isinstance(m, torch.nn.Conv2d) and max(m.kernel_size) > 1}
        handles = [m.register_forward_pre_hook(lambda m, a, mask=mask: (a[0] * mask, )) for m in
                   convs.values()]
        try:
            with torch.no_grad():
                window_scores = adapter.window_scores(level, windows, d)
        finally:
            for handle in handles:
                handle.remove()
        torch.testing.assert_close(window_scores, d.scores, rtol=0, atol=1e-6)
        grads = local(feats[level], level, d)
        full = adapter.scores(outs, d)
        for k in range(min(len(d), 4)):
            (expected, ) = torch.autograd.grad(full[k], feats[level], retain_graph=True)
            torch.testing.assert_close(grads[k:k + 1], expected, rtol=1e-4, atol=1e-7)
    assert border > 0


@pytest.mark.parametrize('name', list(HEADS))
def test_engine_maps_equal_grad_cam(name):
    """Level-aware default: the engine's maps (local window for RetinaNet/YOLOv3, exact route
    for the GroupNorm heads) equal grad-cam's class run once per detection, two detections per
    level (network-input grid, atol 1e-4)."""
    from mmdet_cam_hook import CAMEngine
    from mmdet_cam_hook.reference import reference_input_cams

    model, adapter, inputs, metainfo, _ = _setup(name)
    engine = CAMEngine(model, score_thr=0.05)
    with torch.no_grad():
        dets = adapter.decode(adapter.head_outputs(adapter.features(inputs)), metainfo, 0.05)
    levels = dets.levels
    idx = [i for lv in levels.unique().tolist() for i in (levels == lv).nonzero()[:2, 0].tolist()]
    for method in ('gradcam', 'hirescam'):
        res = engine.explain(synthetic_image(96, 160), methods=method)[method]
        assert torch.equal(torch.as_tensor(res.levels), levels)
        try:
            ref = reference_input_cams(model, inputs, method, [res.layers[i] for i in idx],
                                       dets.select(torch.tensor(idx)))
        finally:
            model.zero_grad(set_to_none=True)
        torch.testing.assert_close(torch.as_tensor(res.input_cams[idx]), torch.as_tensor(ref),
                                   rtol=0, atol=1e-4)


def test_level_layer_feeding_finer_levels_equals_grad_cam():
    """A level layer whose output also feeds other levels (YOLOv3's ``neck.detect1``) explains
    their detections too: their maps equal grad-cam's, not blank."""
    from mmdet_cam_hook import CAMEngine
    from mmdet_cam_hook.reference import reference_input_cams

    model, adapter, inputs, metainfo, _ = _setup('yolov3')
    engine = CAMEngine(model, target_layers=['neck.detect1'], score_thr=0.05)
    with torch.no_grad():
        dets = adapter.decode(adapter.head_outputs(adapter.features(inputs)), metainfo, 0.05)
    idx = [int((dets.levels == lv).nonzero()[0, 0]) for lv in (1, 2)]
    res = engine.explain(synthetic_image(96, 160), methods='hirescam')['hirescam']
    try:
        ref = reference_input_cams(model, inputs, 'hirescam', [res.layers[i] for i in idx],
                                   dets.select(torch.tensor(idx)))
    finally:
        model.zero_grad(set_to_none=True)
    torch.testing.assert_close(torch.as_tensor(res.input_cams[idx]), torch.as_tensor(ref),
                               rtol=0, atol=1e-4)
