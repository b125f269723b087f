"""Every supported head, one table: exact maps vs grad-cam, decoding vs ``model.predict``,
scores at each prior, level layers, the local window, geometry on non-square images.

Adding a head is one row of ``HEADS``: mmdet's config (under ``mmdet/.mim/configs``), how to
perturb the random-init head (:func:`mmdet_cam_hook.testing.build_detector`'s ``perturb``) so
that scores do not tie and boxes have a size, and the facts the tests check:

- ``level_layers``: the module whose output is each level's map (found from the model);
- ``level_of``: the level each of them feeds alone (None: it feeds several, e.g. an FPN's P5
  under ``on_output`` extra convs or YOLOv3's detect blocks);
- ``routes``: the engine's route for each level layer (``local`` where the window is exact);
- ``radius``: the exact window's radius (None: a norm over positions, no window);
- ``anchors``: priors per location; ``upstream``: a backbone layer (and its ``upstream_route``).

Optional: ``input_size`` (default 128), ``num_classes`` (default 3) and ``cfg_options``. The FPN
rows run mmdet's configs at 256 px (the stride-128 level is then 2x2, not 1x1) with a narrow
ResNet-18 and 32-channel neck and head (``LIGHT_FPN``: the adapters read the head's structure,
not its width or the backbone; ResNet-50 rows cost 15-19 s each against grad-cam) and keep the
top 4 candidates per level with no suppression between distinct boxes (``EVERY_LEVEL``), so
that every level has detections; the decoding test also runs each config's own ``test_cfg``.

Torch runs at one thread in this module: the random-init numbers (BatchNorm calibration, the
scores, which priors survive the top-k) are then the same whatever tests ran before.
"""
import warnings

import numpy as np
import pytest
import torch
from mmengine.config import Config, ConfigDict
from torch import nn

from mmdet_cam_hook import CAMEngine
from mmdet_cam_hook.adapters import Detections, build_adapter, locate_priors, supported_heads
from mmdet_cam_hook.cam.geometry import Letterbox
from mmdet_cam_hook.cam.local import LocalGradient, window_radius
from mmdet_cam_hook.cam.methods import CAM_METHODS
from mmdet_cam_hook.runtime.pipeline import preprocess
from mmdet_cam_hook.runtime.state import output_at, split_output_name
from mmdet_cam_hook.testing import build_detector, mmdet_config, synthetic_image
from mmdet_cam_hook.testing.reference import reference_input_cams

pytestmark = pytest.mark.usefixtures('one_thread')

YOLOX = dict(calibrate=True, weights={'multi_level_conv_': 0.02},
             biases={'multi_level_conv_cls': (0.0, 0.5), 'multi_level_conv_obj': (0.0, 0.5)})
RTMDET = dict(calibrate=True, weights={'rtm_cls': 0.02, 'rtm_reg': 0.02},
              biases={'rtm_cls': (0.0, 0.5), 'rtm_reg': (2.0, 0.3)})
# FPN heads: towers by 'conv.weight' (GroupNorm weights untouched), predictors set; FCOS's
# regression is exp(x) pixels, so its bias gives boxes of ~10 pixels a side. RetinaNet's towers
# have no norm: calibrated backbone BatchNorms and towers of unit gain make the scores vary from
# prior to prior more than from anchor to anchor (else two anchors take every detection).
RETINANET = dict(calibrate=True,
                 weights={'conv.weight': 0.08, 'retina_cls': 0.05, 'retina_reg': 0.003},
                 biases={'retina_cls': (0., 0.5)})
FCOS = dict(weights={'conv.weight': 0.03, 'conv_cls': 0.03, 'conv_centerness': 0.03,
                     'conv_reg': 0.03},
            biases={'conv_cls': (0., 0.5), 'conv_centerness': (0., 0.5), 'conv_reg': (2.5, 0.3)})
ATSS = dict(weights={'conv.weight': 0.03, 'atss_cls': 0.03, 'atss_centerness': 0.03,
                     'atss_reg': 0.003},
            biases={'atss_cls': (0., 0.5), 'atss_centerness': (0., 0.5)})
GFL = dict(weights={'conv.weight': 0.03, 'gfl_cls': 0.03, 'gfl_reg': 0.03},
           biases={'gfl_cls': (0., 0.5)})
YOLOV3 = dict(calibrate=True, weights={'convs_pred': 0.05}, biases={'convs_pred': (0., 0.5)})

LIGHT_FPN = {'model.backbone.depth': 18, 'model.backbone.base_channels': 16,
             'model.neck.in_channels': [16, 32, 64, 128], 'model.neck.out_channels': 32,
             'model.bbox_head.in_channels': 32, 'model.bbox_head.feat_channels': 32}
EVERY_LEVEL = {'model.test_cfg.nms_pre': 4, 'model.test_cfg.nms.iou_threshold': 1.0}
FPN_LAYERS = [f'neck.fpn_convs.{i}' for i in range(5)]
YOLO_LAYERS = [f'neck.out_convs.{i}' for i in range(3)]


def _fpn(name, config, perturb, routes, level_of, radius=None, anchors=1):
    return dict(name=name, config=config, perturb=perturb, input_size=256,
                cfg_options={**LIGHT_FPN, **EVERY_LEVEL}, level_layers=FPN_LAYERS,
                level_of=level_of, routes=routes, radius=radius, anchors=anchors,
                upstream='backbone.layer4', upstream_route='chain' if radius else 'exact')


HEADS = [
    dict(name='yolox-nano', config='yolox/yolox_nano_8xb8-300e_coco.py', perturb=YOLOX,
         level_layers=YOLO_LAYERS, level_of=[0, 1, 2], routes=['local'] * 3, radius=2,
         anchors=1, upstream='backbone.stage4', upstream_route='chain'),
    dict(name='rtmdet-tiny', config='rtmdet/rtmdet_tiny_8xb32-300e_coco.py', perturb=RTMDET,
         num_classes=1, level_layers=YOLO_LAYERS, level_of=[0, 1, 2], routes=['local'] * 3,
         radius=2, anchors=1, upstream='backbone.stage4', upstream_route='chain'),
    # A YOLOX head built with GroupNorm: its window reads the whole map, so no shortcut.
    dict(name='yolox-nano-gn', config='yolox/yolox_nano_8xb8-300e_coco.py', perturb=YOLOX,
         cfg_options={'model.bbox_head.norm_cfg': dict(_delete_=True, type='GN', num_groups=8)},
         level_layers=YOLO_LAYERS, level_of=[0, 1, 2], routes=['exact'] * 3, radius=None,
         anchors=1, upstream='backbone.stage4', upstream_route='exact'),
    _fpn('retinanet', 'retinanet/retinanet_r50_fpn_1x_coco.py', RETINANET, radius=5, anchors=9,
         routes=['local', 'local', 'local', 'chain', 'local'], level_of=[0, 1, 2, None, 4]),
    _fpn('fcos', 'fcos/fcos_r50-caffe_fpn_gn-head_1x_coco.py', FCOS,
         routes=['exact'] * 5, level_of=[0, 1, None, None, 4]),
    _fpn('atss', 'atss/atss_r50_fpn_1x_coco.py', ATSS,
         routes=['exact'] * 5, level_of=[0, 1, None, None, 4]),
    _fpn('gfl', 'gfl/gfl_r50_fpn_1x_coco.py', GFL,
         routes=['exact'] * 5, level_of=[0, 1, None, None, 4]),
    # Level 0 is the coarsest (stride 32); each detect block feeds the finer levels.
    dict(name='yolov3-mobilenetv2', config='yolo/yolov3_mobilenetv2_8xb24-320-300e_coco.py',
         perturb=YOLOV3, level_layers=['neck.detect1', 'neck.detect2', 'neck.detect3'],
         level_of=[None, None, 2], routes=['chain', 'chain', 'local'], radius=1, anchors=3,
         upstream='backbone.layer7', upstream_route='chain'),
]
# Issue 19: mmdet's other dense heads (RetinaNet's relatives, the ATSS family, anchor-free heads,
# SSD). Predictors named per head; FPG's neck stacked 4 times (9 in the config: the head does not
# change), its head's BatchNorms calibrated.
RETINA_VARIANT = dict(RETINANET)
PAA = ATSS
TOOD = dict(weights={'conv.weight': 0.03, 'tood_cls': 0.03, 'tood_reg': 0.003},
            biases={'tood_cls': (0., 0.5), 'cls_prob_module': (2., 0.5)})
VFNET = dict(weights={'conv.weight': 0.03, 'vfnet_cls': 0.03, 'vfnet_reg': 0.003,
                      'vfnet_reg_refine': 0.003}, biases={'vfnet_cls': (0., 0.5)})
FOVEA = dict(weights={'conv.weight': 0.03, 'conv_cls': 0.03, 'conv_reg': 0.03},
             biases={'conv_cls': (0., 0.5), 'conv_reg': (0., 0.3)})
AUTOASSIGN = dict(calibrate=True, weights={'conv.weight': 0.05, 'conv_cls': 0.03,
                                           'conv_centerness': 0.03, 'conv_reg': 0.03},
                  biases={'conv_cls': (0., 0.5), 'conv_centerness': (0., 0.5),
                          'conv_reg': (2.5, 0.3)})
CENTERNET_UPDATE = dict(weights={'conv.weight': 0.03, 'conv_cls': 0.03, 'conv_reg': 0.03},
                        biases={'conv_cls': (0., 0.5), 'conv_reg': (2.5, 0.3)})
FPG = dict(calibrate=True, weights={'retina_cls': 0.05, 'retina_reg': 0.003},
           biases={'retina_cls': (0., 0.5)})
FPG_LIGHT = {'model.neck.inter_channels': 32, 'model.neck.stack_times': 4,
             'model.neck.paths': ['bu'] * 4}
# RepPoints' boxes are the spread of its points: biases spread them over a few strides.
REPPOINTS = dict(weights={'conv.weight': 0.03, 'reppoints_cls_out': 0.03,
                          'reppoints_pts_init_out': 0.01, 'reppoints_pts_refine_out': 0.01},
                 biases={'reppoints_cls_out': (0., 0.5), 'reppoints_pts_init_out': (0., 2.),
                         'reppoints_pts_refine_out': (0., 1.)})
YOLOF = dict(calibrate=True, weights={'cls_score': 0.05, 'object_pred': 0.05, 'bbox_pred': 0.003},
             biases={'cls_score': (0., 0.5), 'object_pred': (2., 0.5)})
YOLOF_LIGHT = {'model.backbone.depth': 18, 'model.backbone.base_channels': 16,
               'model.neck.in_channels': 128, 'model.neck.out_channels': 32,
               'model.neck.block_mid_channels': 16, 'model.bbox_head.in_channels': 32,
               'model.test_cfg.nms_pre': 30, 'model.test_cfg.nms.iou_threshold': 1.0}
SSD = dict(calibrate=True, weights={'cls_convs': 0.05}, biases={'cls_convs': (0., 0.5)})


def _ssd_loss_cls(model):
    """mmdet 3.3's ``SSDHead`` never builds the ``loss_cls`` its inherited decoding reads, so
    ``model.predict`` (the oracle) fails; give it the softmax cross-entropy SSD trains with
    (no custom channels: the decoding's softmax branch)."""
    from mmdet.models.losses import CrossEntropyLoss

    model.bbox_head.loss_cls = CrossEntropyLoss(use_sigmoid=False)


HEADS += [
    _fpn('fsaf', 'fsaf/fsaf_r50_fpn_1x_coco.py', RETINA_VARIANT, radius=5, anchors=1,
         routes=['local', 'local', 'local', 'chain', 'local'], level_of=[0, 1, 2, None, 4]),
    {**_fpn('fpg-retinanet', 'fpg/retinanet_r50_fpg_crop640_50e_coco.py', FPG, radius=5,
            anchors=9, routes=['local'] * 5, level_of=[0, 1, 2, 3, 4]),
     'cfg_options': {**LIGHT_FPN, **EVERY_LEVEL, **FPG_LIGHT},
     'level_layers': [f'neck.output_transition.{i}' for i in range(5)], 'probe_size': 256,
     'upstream': 'backbone.layer2'},
    _fpn('paa', 'paa/paa_r50_fpn_1x_coco.py', PAA, routes=['exact'] * 5,
         level_of=[0, 1, None, None, 4]),
    _fpn('tood', 'tood/tood_r50_fpn_1x_coco.py', TOOD, routes=['exact'] * 5,
         level_of=[0, 1, None, None, 4]),
    _fpn('vfnet', 'vfnet/vfnet_r50_fpn_1x_coco.py', VFNET, routes=['exact'] * 5,
         level_of=[0, 1, None, None, 4]),
    _fpn('foveabox', 'foveabox/fovea_r50_fpn_4xb4-1x_coco.py', FOVEA, radius=5,
         routes=['local', 'local', 'local', 'chain', 'local'], level_of=[0, 1, 2, None, 4]),
    _fpn('autoassign', 'autoassign/autoassign_r50-caffe_fpn_1x_coco.py', AUTOASSIGN,
         routes=['exact'] * 5, level_of=[0, 1, 2, None, 4]),
    _fpn('centernet-update', 'centernet/centernet-update_r50-caffe_fpn_ms-1x_coco.py',
         CENTERNET_UPDATE, routes=['exact'] * 5, level_of=[0, 1, None, None, 4]),
    {**_fpn('reppoints', 'reppoints/reppoints-moment_r50_fpn_1x_coco.py', REPPOINTS,
            routes=['exact'] * 5, level_of=[0, 1, 2, None, 4]),
     'cfg_options': {**LIGHT_FPN, **EVERY_LEVEL, 'model.test_cfg.nms_pre': 8}},
    # One level (stride 32) after the dilated encoder, 5 anchors per location.
    dict(name='yolof', config='yolof/yolof_r50-c5_8xb8-1x_coco.py', perturb=YOLOF,
         input_size=256, cfg_options=YOLOF_LIGHT, level_layers=['neck.dilated_encoder_blocks'],
         level_of=[0], routes=['local'], radius=5, anchors=5, upstream='backbone.layer4',
         upstream_route='chain'),
]
# Necks whose level maps no module outputs alone: DyHead runs one module once per level,
# NAS-FCOS resizes with F.interpolate. Their level layers are ``neck:i``, the i-th map of the
# neck's tuple output (NAS-FCOS's level 2 also feeds its extra levels 3 and 4).
DYHEAD_LIGHT = {'model.backbone.depth': 18, 'model.backbone.base_channels': 16,
                'model.neck.0.in_channels': [16, 32, 64, 128], 'model.neck.0.out_channels': 32,
                'model.neck.1.in_channels': 32, 'model.neck.1.out_channels': 32,
                'model.neck.1.num_blocks': 2, 'model.bbox_head.in_channels': 32,
                'model.bbox_head.feat_channels': 32}
NECK_OUTPUTS = [f'neck:{i}' for i in range(5)]
HEADS += [
    {**_fpn('atss-dyhead', 'dyhead/atss_r50_fpn_dyhead_1x_coco.py', ATSS, radius=1,
            routes=['local'] * 5, level_of=[0, 1, 2, 3, 4]),
     'cfg_options': {**DYHEAD_LIGHT, **EVERY_LEVEL}, 'level_layers': NECK_OUTPUTS},
    {**_fpn('nas-fcos', 'nas_fcos/nas-fcos_r50-caffe_fpn_nashead-gn-head_4xb4-1x_coco.py', FCOS,
            routes=['exact'] * 5, level_of=[0, 1, None, None, 4]),
     'level_layers': NECK_OUTPUTS[:3] + ['neck.extra_downsamples.0',
                                         'neck.extra_downsamples.1']},
]
# RTMDet-Ins: RTMDet's boxes and window on the first two of its four outputs (its masks are
# tests/adapters/test_rtmdet_ins.py's).
RTMDET_INS = dict(calibrate=True, weights={'rtm_cls': 0.1, 'rtm_reg': 0.02},
                  biases={'rtm_cls': (0.0, 0.5), 'rtm_reg': (2.0, 0.3)})
HEADS.append(dict(name='rtmdet-ins-tiny', config='rtmdet/rtmdet-ins_tiny_8xb32-300e_coco.py',
                  perturb=RTMDET_INS, level_layers=YOLO_LAYERS, level_of=[0, 1, 2],
                  routes=['local'] * 3, radius=2, anchors=1, upstream='backbone.stage4',
                  upstream_route='chain'))
# SABL RetinaNet: square anchors, the bucketing confidence (its own branch) in the score.
SABL_RETINA = dict(calibrate=True, weights={'conv.weight': 0.08, 'retina_cls': 0.05,
                                            'retina_bbox_cls': 0.05, 'retina_bbox_reg': 0.003},
                   biases={'retina_cls': (0., 0.5)})
HEADS.append(_fpn('sabl-retinanet', 'sabl/sabl-retinanet_r50_fpn_1x_coco.py', SABL_RETINA,
                  radius=5, routes=['local', 'local', 'local', 'chain', 'local'],
                  level_of=[0, 1, 2, None, 4]))
ROWS = {row['name']: row for row in HEADS}
ALL_METHODS = sorted(CAM_METHODS)  # the gradient and activation methods (not D-RISE)
_MODELS = {}


@pytest.fixture(params=HEADS, ids=[row['name'] for row in HEADS])
def row(request):
    return request.param


def _model(row):
    """One model per row for the whole module (building one costs more than a test)."""
    if row['name'] not in _MODELS:
        _MODELS[row['name']] = build_detector(row['config'], row.get('input_size', 128),
                                              num_classes=row.get('num_classes', 3),
                                              perturb=row.get('perturb'),
                                              cfg_options=row.get('cfg_options'))
        if row.get('setup') is not None:
            row['setup'](_MODELS[row['name']])
    return _MODELS[row['name']]


def _decoded(model, engine, image, score_thr=None):
    """(inputs, metainfo, head outputs, detections) of ``image``, without gradients."""
    inputs, meta = preprocess(model, engine.pipeline, image)
    adapter = engine.adapter
    with torch.no_grad():
        outs = adapter.head_outputs(adapter.features(inputs))
        dets = adapter.decode(outs, meta, engine.score_thr if score_thr is None else score_thr)
    return inputs, meta, outs, dets


def _reference(model, inputs, res, dets, idx):
    """grad-cam's own class once per detection in ``idx``; the model's ``.grad`` cleared."""
    try:
        return reference_input_cams(model, inputs, res.method, [res.layers[i] for i in idx],
                                    dets.select(torch.tensor(idx, dtype=torch.long)))
    finally:
        model.zero_grad(set_to_none=True)


def _pick(dets, per_level=1, anchors=1):
    """``per_level`` detections of each level (highest scores first), then more until at least
    3 distinct anchors (or all the head has) are covered."""
    levels = dets.levels.numpy()
    idx = [int(i) for lv in sorted(set(levels.tolist()))
           for i in np.flatnonzero(levels == lv)[:per_level]]
    seen = set(dets.anchors[idx].tolist())
    for i, a in enumerate(dets.anchors.tolist()):
        if len(seen) >= min(anchors, 3):
            break
        if a not in seen:
            idx.append(i)
            seen.add(a)
    assert len(seen) >= min(anchors, 3), 'too few anchors among the detections'
    return idx


def test_maps_equal_grad_cam(row):
    """Every method, level-aware default: the engine's K maps from one forward equal grad-cam's
    class run once per detection (network-input grid, atol 1e-4), for a detection on every level
    and, for anchor heads, on several anchors; each level layer takes the expected route."""
    model = _model(row)
    image = synthetic_image(96, 160, seed=1)
    engine = CAMEngine(model, score_thr=0.0)
    assert engine.layer_names == row['level_layers']
    assert [layer.route for layer in engine.layers] == row['routes']
    inputs, _, _, dets = _decoded(model, engine, image)
    assert set(dets.levels.tolist()) == set(range(len(row['routes'])))
    idx = _pick(dets, anchors=row['anchors'])
    results = engine.explain(image, methods=ALL_METHODS)
    for method, res in results.items():
        np.testing.assert_array_equal(res.scores, dets.scores.numpy())
        np.testing.assert_allclose(res.input_cams[idx], _reference(model, inputs, res, dets, idx),
                                   atol=1e-4, err_msg=method)


def test_upstream_layer_equals_grad_cam(row):
    """A backbone layer feeding every level (chain route where every window is exact)."""
    model = _model(row)
    image = synthetic_image(128, 96, seed=2)
    engine = CAMEngine(model, target_layers=row['upstream'], score_thr=0.0)
    assert [layer.route for layer in engine.layers] == [row['upstream_route']]
    inputs, _, _, dets = _decoded(model, engine, image)
    res = engine.explain(image, methods='hirescam')['hirescam']
    idx = _pick(dets)
    np.testing.assert_allclose(res.input_cams[idx], _reference(model, inputs, res, dets, idx),
                               atol=1e-4)


def _predict(model, inputs, meta):
    from mmdet.structures import DetDataSample

    with torch.no_grad():
        pred = model.predict(inputs, [DetDataSample(metainfo=meta)])[0].pred_instances
    order = pred.scores.argsort(descending=True, stable=True)
    return pred[order]


def test_decode_equals_model_predict(row):
    """Boxes, scores, labels and order equal ``model.predict``'s exactly: the engine at the
    row's test_cfg; the decoding at the config's own test_cfg (its NMS), at its threshold and
    above. The live head outputs are not modified."""
    model = _model(row)
    image = synthetic_image(100, 140, seed=3)
    engine = CAMEngine(model, score_thr=0.0)
    res = engine.explain(image, methods='eigencam')['eigencam']
    inputs, meta = preprocess(model, engine.pipeline, image)
    pred = _predict(model, inputs, meta)
    assert len(res) == len(pred) > 0
    np.testing.assert_array_equal(res.bboxes, pred.bboxes.numpy())
    np.testing.assert_array_equal(res.scores, pred.scores.numpy())
    np.testing.assert_array_equal(res.labels, pred.labels.numpy())
    assert len(np.unique(res.scores)) == len(res.scores), 'perturb the head: scores tie'
    wh = res.bboxes[:, 2:] - res.bboxes[:, :2]
    assert (wh >= 0).all() and np.median(wh) > 4, 'perturb the head: degenerate boxes'

    own = Config.fromfile(mmdet_config(row['config'])).model.test_cfg
    head = model.bbox_head
    saved = head.test_cfg
    head.test_cfg = ConfigDict(own)
    try:
        pred = _predict(model, inputs, meta)
        _, _, outs, _ = _decoded(model, engine, image)
        before = [t.clone() for level in outs for t in level]
        for thr in sorted({float(own.score_thr), 0.3}):
            with torch.no_grad():
                dets = engine.adapter.decode(outs, meta, thr)
            keep = pred.scores >= thr
            assert len(dets) > 0 and len(dets) == int(keep.sum()), thr
            assert torch.equal(dets.bboxes, pred.bboxes[keep])
            assert torch.equal(dets.scores, pred.scores[keep])
            assert torch.equal(dets.labels, pred.labels[keep])
        assert all(torch.equal(a, b) for a, b in zip(before, [t for lv in outs for t in lv]))
    finally:
        head.test_cfg = saved


def test_scores_on_every_level_and_anchor(row):
    """The differentiable score of each detection, read from the live outputs at its prior,
    equals the decoded score; detections cover every level (and several anchors)."""
    model = _model(row)
    engine = CAMEngine(model, score_thr=0.0)
    inputs, meta = preprocess(model, engine.pipeline, synthetic_image(96, 160, seed=1))
    adapter = engine.adapter
    outs = adapter.head_outputs(adapter.features(inputs))
    dets = adapter.decode(outs, meta, 0.0)
    assert sorted(dets.levels.unique().tolist()) == list(range(len(row['routes'])))
    assert getattr(adapter, 'num_base_priors', 1) == row['anchors']
    assert len(dets.anchors.unique()) >= min(row['anchors'], 3)
    scores = adapter.scores(outs, dets)
    assert scores.requires_grad
    torch.testing.assert_close(scores, dets.scores, rtol=0, atol=1e-6)
    assert len(adapter.scores(outs, dets.select(slice(0, 0)))) == 0


def test_level_aware_default_is_non_blank_on_every_level(row):
    """Each detection is explained on its own level's map, which has a gradient path to it (no
    'no gradient path' warning); every level has non-blank Grad-CAM maps. (Grad-CAM of one
    random-init detection can be blank, ReLU of a map that is negative everywhere: the test
    asks for several detections per level and a non-blank map among them.)"""
    model = _model(row)
    engine = CAMEngine(model, score_thr=0.0)
    image = synthetic_image(128, 128, seed=4)
    with warnings.catch_warnings():
        warnings.filterwarnings('error', message='.*gradient path')
        res = engine.explain(image, methods='gradcam')['gradcam']
    levels = row['level_layers']
    counts = np.bincount(res.levels, minlength=len(levels))
    assert (counts >= 3).all(), counts
    for level in range(len(levels)):
        on = res.cams[res.levels == level]
        assert (on.reshape(len(on), -1).max(1) > 0).any(), level
    for lv, names in zip(res.levels, res.layers):
        assert names == [levels[lv]]
    assert res.combined.shape == image.shape[:2]
    np.testing.assert_array_equal(res.combined, res.cams.max(0))


@pytest.mark.parametrize('hw', [(60, 200), (200, 60)])
def test_geometry_on_non_square_images(row, hw):
    """Letterbox to a square (YOLOX, RTMDet) or keep-ratio resize plus pad to a size divisor
    (the FPN heads, YOLOv3): the unpadded part of the network input is where the Letterbox
    says; a map peaking at an original pixel's input location comes back peaking there; boxes
    are ``model.predict``'s, in original pixels; maps have the original size."""
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
    size_h, size_w = inputs.shape[2:]
    yy, xx = np.mgrid[0:size_h, 0:size_w] + 0.5
    tol = 1.0 / min(box.scale_factor)  # one network-input pixel, in original pixels
    for y0, x0 in [(hw[0] - 1, hw[1] - 1), (hw[0] // 3, hw[1] // 5)]:
        xi, yi = box.point_to_input(x0 + 0.5, y0 + 0.5)
        peak = np.exp(-((xx - xi)**2 + (yy - yi)**2) / 2.0)[None].astype(np.float32)
        back = box.to_original(peak)[0]
        assert back.shape == hw
        py, px = np.unravel_index(np.argmax(back), back.shape)
        assert abs(px - x0) <= tol and abs(py - y0) <= tol, (x0, y0, px, py)
    res = engine.explain(image, methods='gradcam')['gradcam']
    assert res.cams.shape == (3, *hw)
    np.testing.assert_array_equal(res.bboxes, _predict(model, inputs, meta).bboxes[:3].numpy())


def test_level_layers_output_the_level_maps(row):
    """Forward hooks on ``level_layers()`` see exactly the maps the head reads; a layer that
    feeds other levels too has no level; an upstream layer has none either."""
    model = _model(row)
    adapter = build_adapter(model)
    names = adapter.level_layers()
    assert names == row['level_layers']
    modules = dict(model.named_modules())
    seen = {}
    split = [split_output_name(n) for n in names]  # ``neck:i``: the i-th map of a tuple output
    handles = [modules[path].register_forward_hook(
                   lambda m, a, out, n=n, i=i: seen.__setitem__(n, output_at(out, i)))
               for n, (path, i) in zip(names, split)]
    size = row.get('probe_size', 64)  # FPG's neck needs its top level 2x2 or larger
    inputs = torch.zeros((1, 3, size, size))
    try:
        with torch.no_grad():
            feats = adapter.features(inputs)
    finally:
        for handle in handles:
            handle.remove()
    assert all(seen[name] is feat for name, feat in zip(names, feats))
    with torch.inference_mode():  # as an engine built under inference mode asks
        assert [adapter.level_of_layer(n) for n in names] == row['level_of']
    path, index = split[-1]
    inner = [n for n in modules if n.startswith(path + '.')][0]
    # inside the level layer's module; inside a neck that outputs every level: upstream
    assert adapter.level_of_layer(inner) == (row['level_of'][-1] if index is None else None)
    assert adapter.level_of_layer(row['upstream']) is None


def _cut(feat, dets, r):
    """(K, C, 2r+1, 2r+1) windows centred on the priors, zero outside the map, and the
    (K, 1, 2r+1, 2r+1) on-map mask."""
    size = 2 * r + 1
    padded = torch.nn.functional.pad(feat, (r, r, r, r))
    inside = torch.nn.functional.pad(torch.ones_like(feat[:, :1]), (r, r, r, r))
    ys, xs = dets.ys.tolist(), dets.xs.tolist()
    return (torch.stack([padded[0, :, y:y + size, x:x + size] for y, x in zip(ys, xs)]),
            torch.stack([inside[0, :, y:y + size, x:x + size] for y, x in zip(ys, xs)]))


def test_local_window(row):
    """Heads without a norm over positions: the score computed on a window cut around each
    detection (off-map positions zeroed before every spatial conv, as the engine does) equals
    the full-map score, border detections included, and the engine's local gradient equals the
    full backward. GroupNorm heads: no window on any level (the engine's exact route)."""
    model = _model(row)
    adapter = build_adapter(model)
    local = LocalGradient(adapter)
    radius = row['radius']
    assert set(local.radii.values()) == {radius}
    if radius is None:
        return
    engine = CAMEngine(model, score_thr=0.0)
    inputs, meta = preprocess(model, engine.pipeline, synthetic_image(96, 160, seed=1))
    with torch.no_grad():
        feats = adapter.features(inputs)
    feats = [f.detach().requires_grad_(True) for f in feats]
    outs = adapter.head_outputs(feats)
    dets = adapter.decode(outs, meta, 0.0)
    border = 0
    for level in range(len(feats)):
        branches = adapter.window_branches(level)
        d = dets.select(dets.levels == level)
        h, w = feats[level].shape[-2:]
        r = radius
        border += int(((d.ys < r) | (d.xs < r) | (d.ys >= h - r) | (d.xs >= w - r)).sum())
        windows, mask = _cut(feats[level].detach(), d, r)
        convs = {id(m): m for b in branches for mod in b for m in mod.modules()
                 if isinstance(m, nn.Conv2d) and max(m.kernel_size) > 1}
        handles = [m.register_forward_pre_hook(lambda m, a, mask=mask: (a[0] * mask, ))
                   for m in convs.values()]
        try:
            with torch.no_grad():
                window_scores = adapter.window_scores(level, windows, d)
        finally:
            for handle in handles:
                handle.remove()
        torch.testing.assert_close(window_scores, d.scores, rtol=0, atol=1e-6)
        grads = local(feats[level], level, d)
        full = adapter.scores(outs, d)
        for k in range(min(len(d), 3)):
            (expected, ) = torch.autograd.grad(full[k], feats[level], retain_graph=True)
            torch.testing.assert_close(grads[k:k + 1], expected, rtol=1e-4, atol=1e-7)
    assert border > 0


def test_level_layer_feeding_finer_levels_equals_grad_cam():
    """A level layer whose output also feeds other levels (YOLOv3's ``neck.detect1``) explains
    their detections too: their maps equal grad-cam's, not blank."""
    row = ROWS['yolov3-mobilenetv2']
    model = _model(row)
    image = synthetic_image(96, 160, seed=1)
    engine = CAMEngine(model, target_layers=['neck.detect1'], score_thr=0.0)
    inputs, _, _, dets = _decoded(model, engine, image)
    idx = [int((dets.levels == lv).nonzero()[0, 0]) for lv in (1, 2)]
    res = engine.explain(image, methods='hirescam')['hirescam']
    ref = _reference(model, inputs, res, dets, idx)
    assert (ref.reshape(len(idx), -1).max(1) > 0).all()
    np.testing.assert_allclose(res.input_cams[idx], ref, atol=1e-4)


def test_window_shifted_by_one_column_is_caught(monkeypatch):
    """Mutation check of the equivalence test: a local window one column off gives maps
    that differ from grad-cam's."""
    model = _model(ROWS['rtmdet-tiny'])
    image = synthetic_image(96, 160, seed=1)
    engine = CAMEngine(model, score_thr=0.0)
    inputs, _, _, dets = _decoded(model, engine, image)
    good = engine.explain(image, methods='hirescam')['hirescam']
    windows = LocalGradient.windows  # what the local route (and __call__) computes

    def shifted(self, feat, level, dets):
        moved = Detections(**{**dets.__dict__, 'xs': (dets.xs + 1).clamp(max=feat.shape[-1] - 1)})
        return windows(self, feat, level, moved)

    monkeypatch.setattr(LocalGradient, 'windows', shifted)
    bad = engine.explain(image, methods='hirescam')['hirescam']
    idx = _pick(dets, per_level=3)
    ref = _reference(model, inputs, good, dets, idx)
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
    assert {'YOLOXHead', 'RTMDetHead', 'RTMDetSepBNHead', 'RetinaHead', 'FCOSHead', 'ATSSHead',
            'GFLHead', 'YOLOV3Head'} <= set(supported_heads())


def test_locate_priors_follows_mmdet_order():
    sizes, anchors = [(4, 6), (2, 3)], 3
    flat = torch.arange(4 * 6 * 3 + 2 * 3 * 3)
    levels, ys, xs, a = locate_priors(flat, sizes, anchors)
    back = torch.where(levels == 0, (ys * 6 + xs) * 3 + a, 72 + (ys * 3 + xs) * 3 + a)
    assert torch.equal(back, flat)
    assert levels.tolist().count(1) == 18 and int(ys.max()) == 3 and int(a.max()) == 2


# SSD (issue 19): softmax over C + 1, 4 or 6 anchors depending on the level, levels down to 1x1
# (Grad-CAM is constant, so blank, there) and a stretching resize: the table's checks that apply,
# at the cost of one row. SSDLite (6 anchors on every level) at 256 px with SSD300's aspect
# ratios (4, 6, 6, 6, 4, 4 anchors).
SSDLITE = dict(name='ssdlite', config='ssd/ssdlite_mobilenetv2-scratch_8xb24-600e_coco.py',
               perturb=SSD, input_size=256, setup=_ssd_loss_cls,
               cfg_options={**EVERY_LEVEL, 'model.bbox_head.anchor_generator.ratios':
                            [[2], [2, 3], [2, 3], [2, 3], [2], [2]]})
SSD_LAYERS = ['backbone.layer5', 'backbone.conv2'] + [f'neck.extra_layers.{i}' for i in range(4)]


def test_ssd_softmax_head_with_per_level_anchors():
    """Decoding equals ``model.predict`` (the row's and the config's own test_cfg); the softmax
    score read at each prior equals the decoded one, with the level's own anchor count (a
    prior located with 6 anchors on a 4-anchor level would read another score); level layers
    and routes (only the last level map feeds one level alone); HiResCAM equals grad-cam on two
    chain levels (8x8 and 2x2); the window's gradient on the last level equals the full
    backward."""
    model = _model(SSDLITE)
    image = synthetic_image(96, 160, seed=1)
    engine = CAMEngine(model, score_thr=0.0)
    assert engine.layer_names == SSD_LAYERS
    assert [layer.route for layer in engine.layers] == ['chain'] * 5 + ['local']
    inputs, meta, outs, dets = _decoded(model, engine, image)
    pred = _predict(model, inputs, meta)
    assert len(dets) == len(pred) and torch.equal(dets.bboxes, pred.bboxes)
    assert torch.equal(dets.scores, pred.scores) and torch.equal(dets.labels, pred.labels)
    assert sorted(dets.levels.unique().tolist()) == list(range(6))
    per_level = torch.tensor(model.bbox_head.prior_generator.num_base_priors)
    assert len(per_level.unique()) == 2 and (dets.anchors < per_level[dets.levels]).all()
    torch.testing.assert_close(engine.adapter.scores(outs, dets), dets.scores, rtol=0, atol=1e-6)

    head, saved = model.bbox_head, model.bbox_head.test_cfg
    head.test_cfg = ConfigDict(Config.fromfile(mmdet_config(SSDLITE['config'])).model.test_cfg)
    try:
        own = _predict(model, inputs, meta)
        with torch.no_grad():
            mine = engine.adapter.decode(outs, meta, float(head.test_cfg.score_thr))
        assert len(mine) > 0 and torch.equal(mine.bboxes, own.bboxes)
        assert torch.equal(mine.scores, own.scores) and torch.equal(mine.labels, own.labels)
    finally:
        head.test_cfg = saved

    res = engine.explain(image, methods='hirescam')['hirescam']
    idx = [int((dets.levels == lv).nonzero()[0, 0]) for lv in (1, 3)]  # 8x8, 2x2 maps
    ref = _reference(model, inputs, res, dets, idx)
    assert (ref.reshape(len(idx), -1).max(1) > 0).all()
    np.testing.assert_allclose(res.input_cams[idx], ref, atol=1e-4)
    adapter = engine.adapter
    with torch.no_grad():
        feats = adapter.features(inputs)
    feats = [f.detach().requires_grad_(True) for f in feats]
    live = adapter.head_outputs(feats)
    last = dets.select(dets.levels == 5)
    grads = LocalGradient(adapter)(feats[5], 5, last)
    (full, ) = torch.autograd.grad(adapter.scores(live, last)[0], feats[5])
    assert full.abs().max() > 0
    torch.testing.assert_close(grads[:1], full, rtol=1e-4, atol=1e-7)


def test_ld_student_is_explained():
    """LD (knowledge distillation): the GFL student alone predicts (the teacher feeds only the
    training loss). The distillation detector is built as a user's config builds it, with the
    teacher a light GFL (mmdet's config names a teacher file relative to mmdet's source tree and
    a checkpoint to download); its ``eval()`` returns None, so ``build_detector`` cannot be
    used. Decoding equals ``model.predict``, the score at each prior equals the decoded one,
    HiResCAM on the default layer equals grad-cam; the randomisation stages are the student's
    (mmdet keeps the teacher out of ``parameters()``)."""
    from mmdet.registry import MODELS
    from mmengine.registry import DefaultScope

    from mmdet_cam_hook.testing import detector_config, perturb_head

    teacher = Config.fromfile(mmdet_config('gfl/gfl_r50_fpn_1x_coco.py'))
    teacher.merge_from_dict(LIGHT_FPN)
    cfg = detector_config('ld/ld_r18-gflv1-r101_fpn_1x_coco.py', 256, cfg_options={
        **LIGHT_FPN, **EVERY_LEVEL, 'model.teacher_ckpt': None,
        'model.teacher_config': dict(_delete_=True, model=teacher.model.to_dict())})
    torch.manual_seed(0)
    with DefaultScope.overwrite_default_scope('mmdet'):
        model = MODELS.build(cfg.model)
    model.cfg, model.dataset_meta = cfg, dict(classes=('a', 'b', 'c'))
    perturb_head(model, 0, **GFL)
    model.eval()
    engine = CAMEngine(model, score_thr=0.0)
    assert type(engine.adapter).__name__ == 'LDAdapter' and engine.layer_names == FPN_LAYERS
    image = synthetic_image(96, 160, seed=1)
    inputs, meta, outs, dets = _decoded(model, engine, image)
    pred = _predict(model, inputs, meta)
    assert len(dets) == len(pred) > 0 and torch.equal(dets.bboxes, pred.bboxes)
    assert torch.equal(dets.scores, pred.scores) and torch.equal(dets.labels, pred.labels)
    torch.testing.assert_close(engine.adapter.scores(outs, dets), dets.scores, rtol=0, atol=1e-6)
    res = engine.explain(image, methods='hirescam')['hirescam']
    idx = [0, int((dets.levels == 4).nonzero()[0, 0])]
    np.testing.assert_allclose(res.input_cams[idx], _reference(model, inputs, res, dets, idx),
                               atol=1e-4)
    assert list(engine.adapter.stages()) == ['head', 'neck', 'backbone']  # the student's


#: Heads an adapter lists without a row of their own: (head, the head of its row or test).
SAME_INFERENCE = [('FreeAnchorRetinaHead', 'RetinaHead'), ('PISARetinaHead', 'RetinaHead'),
                  ('FSAFHead', 'RetinaHead'), ('PISASSDHead', 'SSDHead'),
                  ('LADHead', 'PAAHead'), ('LDHead', 'GFLHead')]
INFERENCE = ('_init_layers', 'forward', 'forward_single', 'predict', 'predict_by_feat',
             '_predict_by_feat_single', '_bbox_post_process', 'score_voting', 'get_anchors')


@pytest.mark.parametrize('head,like', SAME_INFERENCE)
def test_listed_heads_share_the_tested_inference(head, like):
    """A head an adapter takes without a row (FreeAnchor, PISA, LAD: new losses only) runs the
    inference code of the head that has one: the same functions, not overrides (FSAF
    overrides only ``forward_single``, a ReLU on the box branch, and has its own row)."""
    from mmdet.registry import MODELS

    cls, base = MODELS.get(head), MODELS.get(like)
    assert issubclass(cls, base) and head in supported_heads()
    differ = [m for m in INFERENCE if getattr(cls, m, None) is not getattr(base, m, None)]
    assert differ == (['forward_single'] if head == 'FSAFHead' else [])

# ---------------------------------------------------------------------------------------------
# Randomisation stages (issue 18 #5): every parameter in exactly one stage, head first.
R18_FPN = {'model.backbone.depth': 18, 'model.neck.in_channels': [64, 128, 256, 512]}
DETR_SMALL = {'model.backbone.depth': 18, 'model.backbone.base_channels': 16,
              'model.num_queries': 30, 'model.test_cfg.max_per_img': 30,
              'model.encoder.num_layers': 2, 'model.decoder.num_layers': 2,
              'model.neck.in_channels': [32, 64, 128]}
#: name: (mmdet config, cfg_options, the adapter's stages in order)
STAGED = {
    'yolox-nano': ('yolox/yolox_nano_8xb8-300e_coco.py', None, ['head', 'neck', 'backbone']),
    'retinanet': ('retinanet/retinanet_r50_fpn_1x_coco.py', LIGHT_FPN,
                  ['head', 'neck', 'backbone']),
    'faster-rcnn': ('faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py', R18_FPN,
                    ['roi_head', 'rpn_head', 'neck', 'backbone']),
    'cascade-rcnn': ('cascade_rcnn/cascade-rcnn_r50_fpn_1x_coco.py', R18_FPN,
                     ['roi_head', 'rpn_head', 'neck', 'backbone']),
    'dino': ('dino/dino-4scale_r50_8xb2-12e_coco.py', DETR_SMALL,
             ['head', 'decoder', 'encoder', 'neck', 'backbone']),
}


def stage_params(model, stages):
    """{stage: [id of each parameter]} of ``stages``' module and parameter paths."""
    modules, params = dict(model.named_modules()), dict(model.named_parameters())
    out = {}
    for stage, paths in stages.items():
        out[stage] = [id(p) for path in paths
                      for p in ([params[path]] if path in params else
                                modules[path].parameters())]
    return out


@pytest.mark.parametrize('name', list(STAGED))
def test_stages_cover_every_parameter_once(name):
    config, options, expected = STAGED[name]
    model = build_detector(config, 320, cfg_options=options)
    stages = build_adapter(model).stages()
    assert list(stages) == expected
    owned = [i for ids in stage_params(model, stages).values() for i in ids]
    everything = [id(p) for p in model.parameters()]
    assert sorted(owned) == sorted(everything), 'a parameter is in no stage or in two'
    if name == 'dino':  # the transformer's own parts, not only head, neck and backbone
        flat = {p for paths in stages.values() for p in paths}
        assert {'encoder', 'decoder', 'query_embedding', 'level_embed', 'memory_trans_fc',
                'memory_trans_norm', 'dn_query_generator'} <= flat
        assert stages['encoder'] == ['encoder', 'level_embed']


def test_parts_no_stage_names_go_to_the_rest_stage():
    from mmdet_cam_hook.adapters.base import complete_stages

    class Detector(nn.Module):

        def __init__(self):
            super().__init__()
            self.backbone = nn.Conv2d(3, 4, 1)
            self.extra = nn.Linear(2, 2)
            self.mixed = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
            self.bbox_head = nn.Linear(4, 2)
            self.scale = nn.Parameter(torch.ones(3))

    model = Detector()
    stages = complete_stages(model, {'head': ['bbox_head', 'missing'], 'mid': ['mixed.0'],
                                     'neck': ['neck'], 'backbone': ['backbone']}, rest='head')
    assert stages == {'head': ['bbox_head', 'scale', 'extra', 'mixed.1.weight', 'mixed.1.bias'],
                      'mid': ['mixed.0'], 'backbone': ['backbone']}
    owned = sorted(i for ids in stage_params(model, stages).values() for i in ids)
    assert owned == sorted(id(p) for p in model.parameters())
