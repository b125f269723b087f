"""Mask2Former and MaskFormer in instance mode on random-init models from mmdet's own configs at
128 px: the adapter chosen from the head, decoding (labels, scores, boxes, masks) equal to
``model.predict``, the score and the mask target differentiable on the live head outputs,
every backbone level feeding every detection (the default layers), class maps and mask maps
equal to grad-cam's class run once per detection / instance (atol 1e-4), and the variants the
adapter cannot explain refused when the engine is built.

The models are shrunk (the adapter reads the head's outputs, not the widths): ResNet-18, 3 thing
classes, 20 queries, 3 decoder layers (Mask2Former: one per attended level, the same code path
as 9) and 1 pixel-decoder encoder layer. MaskFormer's zoo config is panoptic only: it is built
in instance mode as mmdet's Mask2Former instance config sets it (``panoptic_on=False``,
``instance_on=True``). Torch runs at one thread.
"""
import dataclasses

import numpy as np
import pytest
import torch

from mmdet_cam_hook import CAMEngine
from mmdet_cam_hook.adapters import build_adapter
from mmdet_cam_hook.adapters.mask2former import (
    MaskFormerAdapter,
    MaskFormerMaskBranch,
    MaskFormerOutputs,
    image_shapes,
)
from mmdet_cam_hook.testing import (
    build_model,
    decoded,
    offline_config,
    predicted,
    synthetic_image,
)
from mmdet_cam_hook.testing.reference import on_original, reference_cams

pytestmark = pytest.mark.usefixtures('one_thread')

NUM_CLASSES = 3
INSTANCE = {'model.test_cfg.panoptic_on': False, 'model.test_cfg.semantic_on': False,
            'model.test_cfg.instance_on': True}


def _options(things=NUM_CLASSES, stuff=0):
    return {'model.backbone.depth': 18, 'model.panoptic_head.in_channels': [64, 128, 256, 512],
            'model.panoptic_head.num_queries': 20,
            'model.panoptic_head.transformer_decoder.num_layers': 3,
            'model.panoptic_head.pixel_decoder.encoder.num_layers': 1,
            'model.panoptic_head.num_things_classes': things,
            'model.panoptic_head.num_stuff_classes': stuff,
            'model.panoptic_head.loss_cls.class_weight': [1.0] * (things + stuff) + [0.1],
            'model.panoptic_fusion_head.num_things_classes': things,
            'model.panoptic_fusion_head.num_stuff_classes': stuff,
            'model.test_cfg.max_per_image': 20}


#: name: (mmdet config, cfg options)
MODELS = {
    'mask2former': ('mask2former/mask2former_r50_8xb2-lsj-50e_coco.py', _options()),
    'maskformer': ('maskformer/maskformer_r50_ms-16xb1-75e_coco.py', {**_options(), **INSTANCE}),
}
METHODS = ('gradcam', 'hirescam', 'layercam')
LEVELS = ['backbone.layer1', 'backbone.layer2', 'backbone.layer3', 'backbone.layer4']
_BUILT = {}


@pytest.fixture(params=list(MODELS))
def name(request):
    return request.param


def build(config, options, seed=0):
    """A random-init MaskFormer-family model from mmdet's ``config`` with ``options``, the test
    pipeline at 128 px, no ``Pretrained`` init; the class and mask embeddings' last layers
    spread so that scores do not tie and masks vary in size."""
    cfg = offline_config(config, 128, options)
    things = cfg.model.panoptic_head.num_things_classes
    stuff = cfg.model.panoptic_head.num_stuff_classes
    model = build_model(cfg, seed, things + stuff)
    gen = torch.Generator().manual_seed(seed)
    head = model.panoptic_head
    with torch.no_grad():
        head.cls_embed.weight.copy_(torch.randn(head.cls_embed.weight.shape, generator=gen) * 0.3)
        last = head.mask_embed[-1]
        last.weight.copy_(torch.randn(last.weight.shape, generator=gen) * 0.1)
        last.bias.copy_(torch.randn(last.bias.shape, generator=gen) * 0.3)
    return model


def _model(name):
    if name not in _BUILT:
        _BUILT[name] = build(*MODELS[name])
    return _BUILT[name]


def _image():
    return synthetic_image(96, 160, seed=4)  # resized to 77 x 128, padded: scale_factor != 1


def test_adapter_and_mask_branch_are_chosen_from_the_model(name):
    model = _model(name)
    engine = CAMEngine(model, score_thr=0.0)
    assert type(engine.adapter) is MaskFormerAdapter
    assert engine.adapter.level_layers() == LEVELS and engine.layer_names == LEVELS
    assert engine.adapter.strides() == [4, 8, 16, 32]
    assert {layer.route for layer in engine.layers} == {'exact'}
    assert type(engine.mask_branch) is MaskFormerMaskBranch
    assert engine.mask_branch.route == 'exact'


def test_stages_cover_every_parameter_once(name):
    model = _model(name)
    stages = build_adapter(model).stages()
    assert list(stages) == ['head', 'pixel_decoder', 'backbone']
    assert stages['pixel_decoder'] == ['panoptic_head.pixel_decoder']
    params = dict(model.named_parameters())
    modules = dict(model.named_modules())
    owned = [id(p) for paths in stages.values() for path in paths
             for p in ([params[path]] if path in params else modules[path].parameters())]
    assert sorted(owned) == sorted(id(p) for p in model.parameters())


def test_decoding_equals_model_predict(name):
    """Labels, scores, boxes and masks (original size) equal ``model.predict``'s, in score
    order; the scores do not tie, the masks vary; re-read on the live head outputs the scores
    are the same numbers, differentiable."""
    model = _model(name)
    engine = CAMEngine(model, score_thr=0.0)
    image = _image()
    inputs, meta, _, dets = decoded(engine, image)
    assert meta['img_shape'] != meta['ori_shape']
    pred = predicted(model, inputs, meta)
    assert len(dets) == len(pred) == 20
    torch.testing.assert_close(dets.scores, pred.scores, rtol=0, atol=0)
    torch.testing.assert_close(dets.labels, pred.labels, rtol=0, atol=0)
    torch.testing.assert_close(dets.bboxes, pred.bboxes, rtol=0, atol=0)
    assert len(set(dets.scores.tolist())) == len(dets)
    adapter = engine.adapter
    outs = adapter.head_outputs(adapter.features(inputs), [meta])
    masks = MaskFormerMaskBranch(adapter).masks(outs, dets, meta)
    assert masks.dtype == torch.bool and masks.shape == (20, *image.shape[:2])
    assert torch.equal(masks, pred.masks)
    areas = masks.sum(dim=(1, 2))
    assert len(set(areas.tolist())) > 10 and (areas > 0).all(), areas
    live = adapter.scores(outs, dets)
    assert live.requires_grad
    torch.testing.assert_close(live, dets.scores, rtol=0, atol=1e-7)


def test_candidates_are_every_query_and_the_pairs_of_the_top_k(name):
    """Misses' candidates: every query with its per-class scores (the score's formula) and
    box; the ``max_per_image`` pairs of the top-k entered, the kept ones are the detections
    (here those above a threshold that drops some)."""
    model = _model(name)
    engine = CAMEngine(model, score_thr=0.0)
    inputs, meta, _, all_dets = decoded(engine, _image())
    thr = float(all_dets.scores[5])
    adapter = engine.adapter
    with torch.no_grad():
        outs = adapter.head_outputs(adapter.features(inputs), [meta])
        dets = adapter.decode(outs, meta, thr)
        cands = adapter.candidates(outs, meta, thr)
    assert len(dets) == 6 and len(cands) == 20 and cands.scores.shape == (20, NUM_CLASSES)
    assert torch.equal(cands.kept[dets.index, dets.labels], torch.arange(6))
    assert int((cands.kept >= 0).sum()) == 6 and int(cands.entered.sum()) == 20
    assert bool(cands.entered[all_dets.index, all_dets.labels].all())
    torch.testing.assert_close(cands.scores[dets.index, dets.labels], dets.scores)
    torch.testing.assert_close(cands.bboxes[dets.index], dets.bboxes)


def test_every_default_layer_feeds_every_detection_and_mask(name):
    """The default layers are the maps the head reads (``features()``, the backbone's
    outputs) and each of them carries a gradient of every detection's score and of every
    mask target (none of the averaged maps is blank for anyone): the pixel decoder and the
    queries mix every level."""
    model = _model(name)
    engine = CAMEngine(model, score_thr=0.0, topk=4)
    inputs, meta, _, dets = decoded(engine, _image())
    dets = dets.select(slice(0, 4))
    adapter = engine.adapter
    feats = tuple(f.detach().requires_grad_(True) for f in adapter.features(inputs))
    outs = adapter.head_outputs(feats, [meta])
    branch = MaskFormerMaskBranch(adapter)
    for target in (adapter.scores(outs, dets), branch.scores(outs, dets, meta)):
        for k in range(len(dets)):
            grads = torch.autograd.grad(target[k], feats, retain_graph=True)
            assert all(g.abs().amax() > 0 for g in grads), [float(g.abs().amax()) for g in grads]


def test_mask_target_is_the_mean_over_its_binary_mask_inside_the_image():
    """On the mask features' grid (4 x 4 of a 16 x 16 padded input), the image 8 x 12 covers
    2 x 3 cells; the target is the mean of sigmoid over the cells whose logit is > 0 there,
    the padding ignored, or the mean over the image's cells when none is."""
    logits = torch.full((1, 2, 4, 4), 5.0)  # the padding's cells: large, must not count
    logits[0, 0, :2, :3] = torch.tensor([[1.0, -1.0, 2.0], [0.5, -3.0, -0.5]])
    logits[0, 1, :2, :3] = -1.0
    shapes = image_shapes([dict(batch_input_shape=(16, 16), img_shape=(8, 12),
                                ori_shape=(8, 12))])
    outs = MaskFormerOutputs(torch.zeros((1, 2, 4)), logits, shapes)
    dets = dataclasses.replace(_dummy_dets(2), index=torch.tensor([0, 1]))
    target = MaskFormerMaskBranch(None).scores(outs, dets, {})
    expected = torch.stack([torch.tensor([1.0, 2.0, 0.5]).sigmoid().mean(),
                            torch.tensor(-1.0).sigmoid()])
    torch.testing.assert_close(target, expected)


def _dummy_dets(k):
    from mmdet_cam_hook.adapters import Detections

    zeros = torch.zeros(k, dtype=torch.long)
    return Detections(torch.zeros((k, 4)), torch.zeros(k), zeros, zeros, zeros, zeros, zeros)


def test_class_maps_equal_grad_cam(name):
    """Default layers (all backbone outputs, maps averaged): each detection's map equals
    grad-cam's class run once per detection with its score (on the original image: the
    reference's input maps through the same letterbox inverse)."""
    model = _model(name)
    engine = CAMEngine(model, score_thr=0.0, topk=2, masks=False)
    image = _image()
    inputs, meta, _, dets = decoded(engine, image)
    results = engine.explain(image, methods=METHODS)
    for method, res in results.items():
        ref = reference_cams(model, inputs, method, [LEVELS] * 2, dets.select(slice(0, 2)),
                             metainfo=meta)
        np.testing.assert_allclose(res.input_cams, ref, atol=1e-4, err_msg=method)
        np.testing.assert_allclose(res.cams, on_original(res, ref, image), atol=1e-4,
                                   err_msg=method)
        assert (res.cams.reshape(2, -1).max(1) > 0).all(), method


def test_mask_gradient_equals_a_full_backward_per_instance(name):
    """The mask target's gradient w.r.t. every default layer, taken from one forward pass
    (one vector-Jacobian product per instance, as the engine's exact route does), equals a
    plain forward and full backward per instance, each on a fresh graph."""
    model = _model(name)
    engine = CAMEngine(model, score_thr=0.0, topk=3)
    inputs, meta, _, dets = decoded(engine, _image())
    adapter, branch = engine.adapter, MaskFormerMaskBranch(engine.adapter)
    feats = tuple(f.detach().requires_grad_(True) for f in adapter.features(inputs))
    target = branch.scores(adapter.head_outputs(feats, [meta]), dets.select(slice(0, 3)), meta)
    for k in range(3):
        shared = torch.autograd.grad(target[k], feats, retain_graph=True)
        fresh = tuple(f.detach().requires_grad_(True) for f in adapter.features(inputs))
        alone = branch.scores(adapter.head_outputs(fresh, [meta]), dets.select(slice(k, k + 1)),
                              meta)
        alone[0].backward()
        for a, b in zip(shared, fresh):
            torch.testing.assert_close(a, b.grad, rtol=1e-4, atol=1e-7)


def test_mask_maps_equal_grad_cam(name):
    """Each instance's mask map (default layers) equals grad-cam's class run once per instance
    with the mask target (on the original image); the engine's masks are ``model.predict``'s;
    mask maps differ from the class maps."""
    model = _model(name)
    engine = CAMEngine(model, score_thr=0.0, topk=2)
    image = _image()
    inputs, meta, _, dets = decoded(engine, image)
    results = engine.explain(image, methods=METHODS)
    pred = predicted(model, inputs, meta)
    for method, res in results.items():
        assert res.mask_cams.shape == res.cams.shape == (2, *image.shape[:2])
        np.testing.assert_array_equal(res.masks, pred.masks[:2].numpy())
        ref = reference_cams(model, inputs, method, [LEVELS] * 2, dets.select(slice(0, 2)),
                             metainfo=meta, mask_branch=engine.mask_branch)
        np.testing.assert_allclose(res.mask_cams, on_original(res, ref, image), atol=1e-4,
                                   err_msg=method)
        assert (res.mask_cams.reshape(2, -1).max(1) > 0).all(), method
        assert not np.allclose(res.mask_cams, res.cams, atol=1e-2), method


SWIN = {**{k: v for k, v in _options().items() if k != 'model.backbone.depth'},
        'model.backbone.embed_dims': 24, 'model.backbone.depths': [1, 1, 1, 1],
        'model.backbone.num_heads': [1, 1, 2, 2],
        'model.panoptic_head.in_channels': [24, 48, 96, 192]}
READERS = [f'backbone:{i}' for i in range(4)]  # the maps of the backbone's tuple output


def test_a_swin_backbone_defaults_to_the_maps_of_its_tuple_output():
    """Swin's outputs are reshaped norm outputs (no module outputs them alone): the default
    layers are the maps of the backbone's tuple output (``backbone:i``, finest first);
    decoding equals ``model.predict``, class and mask maps equal grad-cam's."""
    model = build('mask2former/mask2former_swin-t-p4-w7-224_8xb2-lsj-50e_coco.py', SWIN)
    engine = CAMEngine(model, score_thr=0.0, topk=2)
    assert engine.layer_names == READERS and engine.adapter.strides() == [4, 8, 16, 32]
    image = _image()
    inputs, meta, _, dets = decoded(engine, image)
    pred = predicted(model, inputs, meta)
    torch.testing.assert_close(dets.scores, pred.scores, rtol=0, atol=0)
    torch.testing.assert_close(dets.bboxes, pred.bboxes, rtol=0, atol=0)
    res = engine.explain(image, methods='hirescam')['hirescam']
    for branch, maps in ((None, res.cams), (engine.mask_branch, res.mask_cams)):
        ref = reference_cams(model, inputs, 'hirescam', [READERS] * 2, dets.select(slice(0, 2)),
                             metainfo=meta, mask_branch=branch)
        np.testing.assert_allclose(maps, on_original(res, ref, image), atol=1e-4)
        assert (maps.reshape(2, -1).max(1) > 0).all()


def test_panoptic_model_reports_its_thing_instances():
    """mmdet's Mask2Former panoptic config also reports instances (``instance_on=True``):
    supported, stuff classes never decoded, decoding equal to ``model.predict``'s."""
    options = {**_options(things=2, stuff=1), 'model.test_cfg.max_per_image': 30}
    model = build('mask2former/mask2former_r50_8xb2-lsj-50e_coco-panoptic.py', options)
    engine = CAMEngine(model, score_thr=0.0)
    assert type(engine.adapter) is MaskFormerAdapter
    inputs, meta, _, dets = decoded(engine, _image())
    pred = predicted(model, inputs, meta)
    assert 0 < len(dets) < 30 and (dets.labels < 2).all()
    torch.testing.assert_close(dets.scores, pred.scores, rtol=0, atol=0)
    torch.testing.assert_close(dets.labels, pred.labels, rtol=0, atol=0)
    torch.testing.assert_close(dets.bboxes, pred.bboxes, rtol=0, atol=0)


def test_variants_it_cannot_explain_are_refused_at_build():
    """MaskFormer's zoo config in its own panoptic-only mode reports no instance: refused when
    the engine is built, naming the head and the adapter's condition; a fusion head that
    decodes instances its own way is refused by the rule on the parts the adapter runs."""
    from mmdet.models.seg_heads.panoptic_fusion_heads import MaskFormerFusionHead

    config, options = MODELS['maskformer']
    model = build(config, {k: v for k, v in options.items() if k not in INSTANCE})
    assert not model.panoptic_fusion_head.test_cfg.instance_on
    calls = []
    model.register_forward_pre_hook(lambda *args: calls.append(args))
    with pytest.raises(ValueError, match=r'no adapter for the head MaskFormerHead \('
                                         r'MaskFormerAdapter takes MaskFormerHead, but its '
                                         r'panoptic_fusion_head reports no instances \('
                                         r'test_cfg.instance_on=False.*set '
                                         r'model.test_cfg.instance_on=True'):
        CAMEngine(model, score_thr=0.0)
    assert calls == []

    class OwnInstances(MaskFormerFusionHead):
        def instance_postprocess(self, mask_cls, mask_pred):
            return super().instance_postprocess(mask_cls, mask_pred)

    instance = _model('maskformer')
    fusion = instance.panoptic_fusion_head
    try:
        instance.panoptic_fusion_head = OwnInstances(
            num_things_classes=NUM_CLASSES, num_stuff_classes=0, test_cfg=fusion.test_cfg)
        with pytest.raises(ValueError, match=r'panoptic_fusion_head OwnInstances subclasses '
                                             r'MaskFormerFusionHead but overrides '
                                             r'instance_postprocess'):
            build_adapter(instance)
    finally:
        instance.panoptic_fusion_head = fusion
