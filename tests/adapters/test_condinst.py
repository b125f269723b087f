"""CondInst and BoxInst (issues 19 and 20) on random-init models from mmdet's own configs at
128 px: the adapter chosen from the model, boxes, labels, scores and masks equal to
``model.predict``'s, every method's class maps equal grad-cam's class run once per detection
(atol 1e-4) on every level, the mask target differentiable through the full graph (it mixes
the levels) and its maps equal grad-cam's run once per instance, the candidates before NMS
equal to the head's own decoding without filter and NMS (misses), and heads that change what
the adapter relies on refused when the engine is built.

The models use a narrow ResNet-18 (16 base channels), a 32-channel FPN and box head and a
16-channel mask feature module; the box head's predictors are spread as in
tests/adapters/test_adapters.py's FCOS row and the controller's so that the dynamic mask heads
predict masks of varied sizes. Torch runs at one thread.
"""
import numpy as np
import pytest
import torch

from mmdet_cam_hook import CAMEngine
from mmdet_cam_hook.adapters import build_adapter
from mmdet_cam_hook.adapters.condinst import CondInstAdapter, CondInstMaskBranch
from mmdet_cam_hook.testing import (
    build_detector,
    decoded,
    kept_pairs,
    own_test_cfg,
    predicted,
    synthetic_image,
)
from mmdet_cam_hook.testing.reference import on_original, reference_cams

pytestmark = pytest.mark.usefixtures('one_thread')

LIGHT = {'model.backbone.depth': 18, 'model.backbone.base_channels': 16,
         'model.neck.in_channels': [16, 32, 64, 128], 'model.neck.out_channels': 32,
         'model.bbox_head.in_channels': 32, 'model.bbox_head.feat_channels': 32,
         # GroupNorm of 4 channels a group: P7 is 1x1 at 128 px
         'model.bbox_head.norm_cfg': dict(type='GN', num_groups=8, requires_grad=True),
         'model.mask_head.mask_feature_head.in_channels': 32,
         'model.mask_head.mask_feature_head.feat_channels': 16,
         # 8 candidates a level, no suppression between distinct boxes: every level detects
         'model.test_cfg.nms_pre': 8, 'model.test_cfg.nms.iou_threshold': 1.0}
PERTURB = dict(weights={'conv.weight': 0.03, 'conv_cls': 0.03, 'conv_centerness': 0.03,
                        'conv_reg': 0.03, 'controller': 0.1},
               biases={'conv_cls': (0., 0.5), 'conv_centerness': (0., 0.5),
                       'conv_reg': (2.5, 0.3), 'controller': (0., 0.5)})
MODELS = {
    'condinst': 'condinst/condinst_r50_fpn_ms-poly-90k_coco_instance.py',
    'boxinst': 'boxinst/boxinst_r50_fpn_ms-90k_coco.py',
}
FPN_LAYERS = [f'neck.fpn_convs.{i}' for i in range(5)]
METHODS = ('gradcam', 'hirescam', 'layercam')
_BUILT = {}


@pytest.fixture(params=list(MODELS))
def name(request):
    return request.param


def _model(name):
    if name not in _BUILT:
        model = build_detector(MODELS[name], perturb=PERTURB, cfg_options=LIGHT)
        # The mask feature module's random-init convolutions (std 0.01) make its output
        # ~1e-6, and the masks then depend on the relative coordinates only: give them unit
        # gain (He), so that the masks read the image.
        gen = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for module in model.mask_head.mask_feature_head.modules():
                if isinstance(module, torch.nn.Conv2d):
                    fan_in = module.weight[0].numel()
                    module.weight.copy_(torch.randn(module.weight.shape, generator=gen)
                                        * (2.0 / fan_in) ** 0.5)
        _BUILT[name] = model
    return _BUILT[name]


def _image():
    return synthetic_image(96, 160, seed=4)  # resized to 77 x 128 and padded: both matter


def _per_level(dets, levels=None):
    """The first (highest-scoring) detection of each level present."""
    levels = dets.levels.numpy() if levels is None else levels
    return [int(np.flatnonzero(levels == lv)[0]) for lv in sorted(set(levels.tolist()))]


def test_adapter_layers_and_routes(name):
    """The box head is taken by the CondInst adapter (BoxInst's subclasses only its
    construction), the level-aware default is the FPN outputs, GroupNorm makes every level
    exact, and P5 feeds P6/P7 (``on_output``)."""
    model = _model(name)
    engine = CAMEngine(model, score_thr=0.0)
    assert type(engine.adapter) is CondInstAdapter
    assert engine.layer_names == FPN_LAYERS
    assert [layer.route for layer in engine.layers] == ['exact'] * 5
    assert [engine.adapter.level_of_layer(n) for n in FPN_LAYERS] == [0, 1, None, None, 4]


def test_decode_and_masks_equal_model_predict(name):
    """Boxes, labels, scores (bit-equal) and masks equal ``model.predict``'s, in score order;
    the scores are the product of the two sigmoids read at each prior; masks vary."""
    model = _model(name)
    engine = CAMEngine(model, score_thr=0.0)
    image = _image()
    inputs, meta, outs, dets = decoded(engine, image)
    pred = predicted(model, inputs, meta)
    assert len(dets) == len(pred) > 20
    assert torch.equal(dets.bboxes, pred.bboxes) and torch.equal(dets.labels, pred.labels)
    assert torch.equal(dets.scores, pred.scores)
    assert len(dets.scores.unique()) == len(dets) and set(dets.levels.tolist()) == set(range(5))
    torch.testing.assert_close(engine.adapter.scores(outs, dets), dets.scores, rtol=0,
                               atol=1e-6)
    res = engine.explain(image, methods='hirescam')['hirescam']
    np.testing.assert_array_equal(res.bboxes, pred.bboxes.numpy())
    masks = engine.mask_branch.masks(outs, dets, meta)
    assert masks.dtype == torch.bool and masks.shape == (len(pred), *image.shape[:2])
    assert torch.equal(masks, pred.masks)
    areas = masks.sum(dim=(1, 2))
    assert len(areas.unique()) > len(dets) // 2 and (areas > 0).sum() > len(dets) // 2, areas


def test_decode_equals_model_predict_at_the_configs_own_test_cfg(name):
    """With the config's own ``test_cfg`` (1000 candidates a level, NMS at IoU 0.6), at its
    threshold 0.05 and above: the kept boxes, labels and scores are ``model.predict``'s."""
    model = _model(name)
    engine = CAMEngine(model, score_thr=0.0)
    inputs, meta, outs, _ = decoded(engine, _image())
    with own_test_cfg(model, MODELS[name]) as own:
        pred = predicted(model, inputs, meta)
        for thr in (float(own.score_thr), 0.3):
            with torch.no_grad():
                dets = engine.adapter.decode(outs, meta, thr)
            keep = pred.scores >= thr
            assert 0 < len(dets) == int(keep.sum()), thr
            assert torch.equal(dets.bboxes, pred.bboxes[keep])
            assert torch.equal(dets.scores, pred.scores[keep])
            assert torch.equal(dets.labels, pred.labels[keep])


def test_class_maps_equal_grad_cam(name):
    """Level-aware default, one detection per level: each method's map equals grad-cam's
    class run once per detection with the detection's score (network-input grid)."""
    model = _model(name)
    engine = CAMEngine(model, score_thr=0.0, topk=40)
    image = _image()
    inputs, _, _, dets = decoded(engine, image)
    idx = _per_level(dets.select(slice(0, 40)))
    assert len(idx) == 5
    for method, res in engine.explain(image, methods=METHODS).items():
        ref = reference_cams(model, inputs, method, [res.layers[i] for i in idx],
                             dets.select(torch.tensor(idx)))
        np.testing.assert_allclose(res.input_cams[idx], ref, atol=1e-4, err_msg=method)
        assert (res.input_cams[idx].reshape(len(idx), -1).max(1) > 0).any(), method


def test_mask_target_mixes_levels(name):
    """The mask target (mean of the instance's probabilities over its own binary mask) is in
    (0, 1] and differentiable; its gradient (plain autograd, instance by instance) reaches the
    levels of the mask feature module (P3-P5) and the prior's own level (its controller
    parameters), so no single level map explains it: the branch takes the exact route."""
    model = _model(name)
    engine = CAMEngine(model, score_thr=0.0, topk=40)
    branch = engine.mask_branch
    assert type(branch) is CondInstMaskBranch and branch.route == 'exact'
    assert not engine.batchable  # the mask targets are pulled back through the graph
    inputs, meta, _, dets = decoded(engine, _image())
    sub = dets.select(torch.tensor(_per_level(dets.select(slice(0, 40)))))
    adapter = engine.adapter
    feats = tuple(f.detach().requires_grad_(True) for f in adapter.features(inputs))
    target = branch.scores(adapter.head_outputs(feats), sub, meta)
    assert target.requires_grad and bool(((target > 0) & (target <= 1)).all()), target
    for k, level in enumerate(sub.levels.tolist()):
        grads = torch.autograd.grad(target[k], feats, retain_graph=True, allow_unused=True)
        reached = {lv for lv, g in enumerate(grads) if g is not None and bool(g.abs().sum() > 0)}
        assert {0, 1, 2, level} <= reached, (level, reached)


@pytest.mark.parametrize('layers', [None, 'backbone.layer3'])
def test_engine_masks_and_mask_maps_equal_model_predict_and_grad_cam(name, layers):
    """``CAMResult.masks`` equal ``model.predict``'s; every method's mask maps (the level-aware
    default: all five level maps, as the target mixes them; or a backbone layer) equal
    grad-cam's class run once per instance with the mask target, on the original image; they
    are not blank and differ from the class maps."""
    model = _model(name)
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
def _swap_class(module, name, **methods):
    """Give ``module`` a subclass of its class named ``name`` with ``methods``; returns the
    class to restore."""
    original = type(module)
    module.__class__ = type(name, (original, ), methods)
    return original


@pytest.mark.parametrize('part, method', [('bbox_head', '_predict_by_feat_single'),
                                          ('bbox_head', 'forward_single'),
                                          ('mask_head', 'forward_single'),
                                          ('mask_head', '_predict_by_feat_single')])
def test_subclass_changing_what_the_adapter_relies_on_is_refused(part, method):
    model = _model('condinst')
    module = getattr(model, part)
    original = _swap_class(module, 'TweakedHead', **{method: lambda self, *a, **k: None})
    try:
        with pytest.raises(ValueError, match=f'TweakedHead.*{method}'):
            CAMEngine(model, score_thr=0.0)
    finally:
        module.__class__ = original
    assert type(build_adapter(model)) is CondInstAdapter


def test_detector_predicting_otherwise_is_refused():
    model = _model('condinst')
    original = _swap_class(model, 'TweakedCondInst', predict=lambda self, *a, **k: None)
    try:
        with pytest.raises(ValueError, match='CondInstBboxHead.*accept'):
            CAMEngine(model, score_thr=0.0)
    finally:
        model.__class__ = original


def test_candidates_equal_predict_by_feat_single():
    """Every (prior, class) pair before the threshold and NMS equals what
    ``CondInstBboxHead._predict_by_feat_single`` computes without filter, top-k and NMS (boxes
    rescaled as the mask head rescales them); the pairs that entered NMS are those its own
    filter and top-k pass; each kept detection is its candidate pair; misses are explained."""
    import copy

    model = _model('condinst')
    engine = CAMEngine(model, score_thr=0.05)
    image = _image()
    _, meta, outs, _ = decoded(engine, image)
    adapter, head = engine.adapter, model.bbox_head
    with torch.no_grad():
        cands = adapter.candidates(outs, meta, 0.05)
    cls, reg, ctr, params = ([t[0] for t in o] for o in outs[:4])
    sizes = [c.shape[-2:] for c in cls]
    points = head.prior_generator.grid_priors(sizes, dtype=reg[0].dtype, device=reg[0].device,
                                              with_stride=True)

    def predict(cfg):
        with torch.no_grad():
            res = head._predict_by_feat_single(cls, reg, ctr, params, [p[:, :2] for p in points],
                                               [p[:, 2] for p in points], meta, cfg,
                                               rescale=False, with_nms=False)
        res.bboxes = res.bboxes / res.bboxes.new_tensor(meta['scale_factor']).repeat((1, 2))
        return res

    every = copy.deepcopy(head.test_cfg)
    every.update(score_thr=-1.0, nms_pre=10**9, min_bbox_size=-1)
    ref = predict(every)
    num, num_classes = cands.scores.shape
    everything = torch.ones_like(cands.entered).nonzero(as_tuple=True)
    assert len(everything[0]) == len(ref) == num * num_classes
    ours = torch.cat([cands.scores[everything][:, None], everything[1][:, None].float(),
                      cands.rows(*[t.tolist() for t in everything]).bboxes], 1)
    theirs = torch.cat([ref.scores[:, None], ref.labels[:, None].float(), ref.bboxes], 1)

    def order(t):
        return t[np.lexsort(t.numpy().T[::-1])]

    torch.testing.assert_close(order(ours), order(theirs))
    cfg = copy.deepcopy(head.test_cfg)
    cfg.score_thr = 0.05
    rows, labels = cands.entered.nonzero(as_tuple=True)
    assert 0 < len(rows) == len(predict(cfg)) < num * num_classes
    _, _, same = kept_pairs(cands)
    assert torch.equal(same.bboxes, cands.detections.bboxes)
    torch.testing.assert_close(same.scores, cands.detections.scores, rtol=1e-6, atol=1e-7)
    res = engine.explain(image, methods='hirescam', gt_bboxes=[[100, 10, 150, 60]],
                         gt_labels=[1])['hirescam']
    assert res.false_positive is not None and len(res.misses) <= 1
