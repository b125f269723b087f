"""YOLACT (issues 19 and 20) on a random-init model from mmdet's own config at 128 px: the
adapter chosen from the model, boxes, labels, scores and masks equal to ``model.predict``'s
(the prior index carried through mmdet's own Fast NMS), softmax scores at the prior and
anchor, every method's class maps equal grad-cam's class run once per detection (atol 1e-4)
on every level and route (the 5x5 window where it is exact, the chain route on P6), the mask
target (prototypes times the prior's coefficients, cropped as mmdet crops) differentiable
through the full graph and its maps equal grad-cam's run once per instance, and heads that
change what the adapter relies on refused when the engine is built.

The model uses a narrow ResNet-18 (16 base channels, BatchNorms calibrated), a 32-channel FPN,
box head and protonet; the classifier, regression and coefficient predictors are spread so
that scores differ and masks vary. Torch runs at one thread.
"""
import numpy as np
import pytest
import torch

from mmdet_cam_hook import CAMEngine
from mmdet_cam_hook.adapters import build_adapter
from mmdet_cam_hook.adapters.yolact import YOLACTAdapter, YOLACTMaskBranch
from mmdet_cam_hook.testing import (
    build_detector,
    decoded,
    own_test_cfg,
    predicted,
    synthetic_image,
)
from mmdet_cam_hook.testing.reference import on_original, reference_cams

pytestmark = pytest.mark.usefixtures('one_thread')

CONFIG = 'yolact/yolact_r50_1xb8-55e_coco.py'
LIGHT = {'model.backbone.depth': 18, 'model.backbone.base_channels': 16,
         'model.neck.in_channels': [16, 32, 64, 128], 'model.neck.out_channels': 32,
         'model.bbox_head.in_channels': 32, 'model.bbox_head.feat_channels': 32,
         'model.mask_head.in_channels': 32,
         'model.mask_head.proto_channels': (32, 32, 32, None, 32, 32),
         # 8 candidates a level, no suppression between distinct boxes: every level detects
         'model.test_cfg.nms_pre': 8, 'model.test_cfg.iou_thr': 1.0}
PERTURB = dict(calibrate=True,
               weights={'conv_cls': 0.05, 'conv_reg': 0.003, 'conv_coeff': 0.1},
               biases={'conv_cls': (0., 0.5), 'conv_coeff': (0.3, 0.5)})
FPN_LAYERS = [f'neck.fpn_convs.{i}' for i in range(5)]
METHODS = ('gradcam', 'hirescam', 'layercam')
_BUILT = {}


def _model():
    if 'yolact' not in _BUILT:
        _BUILT['yolact'] = build_detector(CONFIG, perturb=PERTURB, cfg_options=LIGHT)
    return _BUILT['yolact']


def _image():
    return synthetic_image(96, 160, seed=4)  # resized to 128 x 128 (no keep-ratio)


def _pick(dets, num=40):
    """The first (highest-scoring) detection of each level among the top ``num``, then more
    until three anchors are covered."""
    levels = dets.levels[:num].numpy()
    idx = [int(np.flatnonzero(levels == lv)[0]) for lv in sorted(set(levels.tolist()))]
    seen = set(dets.anchors[idx].tolist())
    for i, a in enumerate(dets.anchors[:num].tolist()):
        if len(seen) == 3:
            break
        if a not in seen:
            idx.append(i)
            seen.add(a)
    assert len(seen) == 3
    return idx


def test_adapter_layers_and_routes():
    """The level-aware default is the FPN outputs; each level's class branch reads a 5x5
    window (local route) except P6, which also feeds P7 (``on_input`` extra convs): chain."""
    engine = CAMEngine(_model(), score_thr=0.0)
    assert type(engine.adapter) is YOLACTAdapter
    assert engine.adapter.num_base_priors == 3
    assert engine.layer_names == FPN_LAYERS
    assert [layer.route for layer in engine.layers] == ['local'] * 3 + ['chain', 'local']
    assert engine.local_grad.radii == {level: 2 for level in range(5)}
    assert [engine.adapter.level_of_layer(n) for n in FPN_LAYERS] == [0, 1, 2, None, 4]


def test_decode_and_masks_equal_model_predict():
    """Boxes, labels, scores (bit-equal) and masks equal ``model.predict``'s, in score order,
    at the test threshold and at the config's own 0.05; the differentiable score at each
    prior and anchor is the softmax that Fast NMS kept; masks vary."""
    model = _model()
    engine = CAMEngine(model, score_thr=0.0)
    image = _image()
    inputs, meta, outs, dets = decoded(engine, image)
    pred = predicted(model, inputs, meta)
    assert len(dets) == len(pred) > 20
    assert torch.equal(dets.bboxes, pred.bboxes) and torch.equal(dets.labels, pred.labels)
    assert torch.equal(dets.scores, pred.scores)
    assert len(dets.scores.unique()) == len(dets) and len(dets.anchors.unique()) == 3
    assert len(dets.levels.unique()) == 5
    torch.testing.assert_close(engine.adapter.scores(outs, dets), dets.scores, rtol=0,
                               atol=1e-6)
    masks = engine.mask_branch.masks(outs, dets, meta)
    assert masks.dtype == torch.bool and masks.shape == (len(pred), *image.shape[:2])
    assert torch.equal(masks, pred.masks)
    areas = masks.sum(dim=(1, 2))  # one mask per prior (its classes share coefficients)
    priors = {(lv, y, x, a) for lv, y, x, a in zip(dets.levels.tolist(), dets.ys.tolist(),
                                                   dets.xs.tolist(), dets.anchors.tolist())}
    assert len(areas.unique()) > len(priors) // 2 and (areas > 0).sum() > len(dets) // 2, areas


def test_decode_equals_model_predict_at_the_configs_own_test_cfg():
    """With the config's own ``test_cfg`` (1000 candidates a level, Fast NMS at IoU 0.5, top
    200 a class), at its threshold 0.05 and above: the kept boxes, labels and scores are
    ``model.predict``'s."""
    model = _model()
    engine = CAMEngine(model, score_thr=0.0)
    inputs, meta, outs, _ = decoded(engine, _image())
    with own_test_cfg(model, CONFIG) as own:
        pred = predicted(model, inputs, meta)
        for thr in (float(own.score_thr), 0.3):
            with torch.no_grad():
                dets = engine.adapter.decode(outs, meta, thr)
            keep = pred.scores >= thr
            assert 0 < len(dets) == int(keep.sum()), thr
            assert torch.equal(dets.bboxes, pred.bboxes[keep])
            assert torch.equal(dets.scores, pred.scores[keep])
            assert torch.equal(dets.labels, pred.labels[keep])


def test_class_maps_equal_grad_cam():
    """Level-aware default (local window on P3-P5 and P7, chain on P6), a detection per level
    and on each anchor: each method's map equals grad-cam's class run once per detection."""
    model = _model()
    engine = CAMEngine(model, score_thr=0.0, topk=40)
    image = _image()
    inputs, _, _, dets = decoded(engine, image)
    idx = _pick(dets)
    assert len(set(dets.levels[idx].tolist())) >= 4
    for method, res in engine.explain(image, methods=METHODS).items():
        ref = reference_cams(model, inputs, method, [res.layers[i] for i in idx],
                             dets.select(torch.tensor(idx)))
        np.testing.assert_allclose(res.input_cams[idx], ref, atol=1e-4, err_msg=method)


def test_mask_target_mixes_levels():
    """The mask target is in (0, 1] and differentiable; its gradient (plain autograd, instance
    by instance) reaches exactly P3 (the prototypes) and the prior's own level (the
    coefficients), so no single level map explains it: the branch takes the exact route."""
    engine = CAMEngine(_model(), score_thr=0.0, topk=40)
    branch = engine.mask_branch
    assert type(branch) is YOLACTMaskBranch and branch.route == 'exact'
    assert not engine.batchable  # local class maps, but the mask targets need the graph
    inputs, meta, _, dets = decoded(engine, _image())
    sub = dets.select(torch.tensor(_pick(dets)))
    adapter = engine.adapter
    feats = tuple(f.detach().requires_grad_(True) for f in adapter.features(inputs))
    target = branch.scores(adapter.head_outputs(feats), sub, meta)
    assert target.requires_grad and bool(((target > 0) & (target <= 1)).all()), target
    for k, level in enumerate(sub.levels.tolist()):
        grads = torch.autograd.grad(target[k], feats, retain_graph=True, allow_unused=True)
        reached = {lv for lv, g in enumerate(grads) if g is not None and bool(g.abs().sum() > 0)}
        assert reached == {0, level}, (level, reached)


@pytest.mark.parametrize('layers', [None, 'backbone.layer3'])
def test_engine_masks_and_mask_maps_equal_model_predict_and_grad_cam(layers):
    """``CAMResult.masks`` equal ``model.predict``'s; every method's mask maps (the level-aware
    default: all five level maps, as the target mixes them; or a backbone layer) equal
    grad-cam's class run once per instance with the mask target, on the original image; they
    are not blank and differ from the class maps."""
    model = _model()
    engine = CAMEngine(model, score_thr=0.0, topk=12, target_layers=layers)
    image = _image()
    inputs, meta, _, dets = decoded(engine, image)
    dets = dets.select(slice(0, 12))
    pred = predicted(model, inputs, meta)
    results = engine.explain(image, methods=METHODS)
    names = engine.layer_names
    assert names == (FPN_LAYERS if layers is None else [layers])
    for method, res in results.items():
        assert torch.equal(torch.from_numpy(res.masks), pred.masks[:12])
        ref = reference_cams(model, inputs, method, [names] * len(dets), dets, metainfo=meta,
                             mask_branch=engine.mask_branch)
        np.testing.assert_allclose(res.mask_cams, on_original(res, ref, image), atol=1e-4,
                                   err_msg=method)
        assert (res.mask_cams.reshape(len(dets), -1).max(1) > 0).sum() > len(dets) // 2
        assert not np.allclose(res.mask_cams, res.cams, atol=1e-2), method


# --------------------------------------------------------------------------- refusals
@pytest.mark.parametrize('part, method', [('bbox_head', 'forward_single'),
                                          ('bbox_head', '_bbox_post_process'),
                                          ('mask_head', 'crop_single'),
                                          ('mask_head', '_predict_by_feat_single')])
def test_subclass_changing_what_the_adapter_relies_on_is_refused(part, method):
    model = _model()
    module = getattr(model, part)
    original = type(module)
    module.__class__ = type('TweakedHead', (original, ), {method: lambda self, *a, **k: None})
    try:
        with pytest.raises(ValueError, match=f'TweakedHead.*{method}'):
            CAMEngine(model, score_thr=0.0)
    finally:
        module.__class__ = original
    assert type(build_adapter(model)) is YOLACTAdapter


def test_misses_are_refused_clearly():
    """The candidates before Fast NMS are not listed for YOLACT: asking for misses is refused
    up front."""
    engine = CAMEngine(_model(), score_thr=0.0)
    with pytest.raises(ValueError, match='YOLACTAdapter.*YOLACTHead.*explain_misses'):
        engine.explain(_image(), methods='hirescam', gt_bboxes=[[0, 0, 10, 10]], gt_labels=[0])
