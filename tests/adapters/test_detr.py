"""The DETR family (DINO, Deformable DETR, DETR, Conditional DETR, DAB-DETR) on random-init
models from mmdet's own configs at 128 px: adapter selection from the head, decoding equal to
``model.predict``, every level map on the exact route, maps equal grad-cam's class run once per
detection.

The models are shrunk (the adapter reads the head's outputs, not the widths): ResNet-18 with 16
base channels, 30 queries, 2 encoder and 2 decoder layers. Torch runs at one thread.
"""
import numpy as np
import pytest
import torch

from mmdet_cam_hook import METHODS, CAMEngine
from mmdet_cam_hook.adapters import build_adapter
from mmdet_cam_hook.adapters.detr import DETRAdapter
from mmdet_cam_hook.cam.routes import Forward
from mmdet_cam_hook.runtime.pipeline import preprocess
from mmdet_cam_hook.testing import build_detector, synthetic_image
from mmdet_cam_hook.testing.reference import reference_input_cams

SMALL = {'model.backbone.depth': 18, 'model.backbone.base_channels': 16,
         'model.num_queries': 30, 'model.test_cfg.max_per_img': 30,
         'model.encoder.num_layers': 2, 'model.decoder.num_layers': 2}
FOUR_LEVELS = ['neck.convs.0', 'neck.convs.1', 'neck.convs.2', 'neck.extra_convs.0']
#: name: (mmdet config, neck input channels, level layers, strides)
MODELS = {
    'dino': ('dino/dino-4scale_r50_8xb2-12e_coco.py', [32, 64, 128], FOUR_LEVELS,
             [8, 16, 32, 64]),
    'deformable-detr': ('deformable_detr/deformable-detr_r50_16xb2-50e_coco.py', [32, 64, 128],
                        FOUR_LEVELS, [8, 16, 32, 64]),
    'detr': ('detr/detr_r50_8xb2-150e_coco.py', [128], ['neck.convs.0'], [32]),
    'conditional-detr': ('conditional_detr/conditional-detr_r50_8xb2-50e_coco.py', [128],
                         ['neck.convs.0'], [32]),
    'dab-detr': ('dab_detr/dab-detr_r50_8xb2-50e_coco.py', [128], ['neck.convs.0'], [32]),
}
CAM_METHODS = [m for m in sorted(METHODS) if not getattr(METHODS[m], 'black_box', False)]
_BUILT = {}


def _model(name):
    if name not in _BUILT:
        torch.set_num_threads(1)
        config, channels, _, _ = MODELS[name]
        _BUILT[name] = build_detector(config,
                                      cfg_options={**SMALL, 'model.neck.in_channels': channels})
    return _BUILT[name]


@pytest.fixture(params=list(MODELS))
def name(request):
    return request.param


def _image():
    return synthetic_image(100, 140, seed=3)  # resized to 91 x 128: scale_factor != 1


def _decoded(model, engine, image):
    inputs, meta = preprocess(model, engine.pipeline, image)
    adapter = engine.adapter
    with torch.no_grad():
        dets = adapter.decode(adapter.head_outputs(adapter.features(inputs), [meta]), meta,
                              engine.score_thr)
    return inputs, meta, dets


def test_adapter_is_chosen_from_the_head(name):
    model = _model(name)
    adapter = build_adapter(model)
    assert type(adapter) is DETRAdapter
    _, _, layers, strides = MODELS[name]
    assert adapter.level_layers() == layers
    assert adapter.strides() == strides
    assert [adapter.level_of_layer(n) for n in layers] == [None] * len(layers)
    engine = CAMEngine(model, score_thr=0.0)
    assert not engine.level_aware  # the default: every level map for every detection
    assert [(layer.name, layer.route) for layer in engine.layers] == \
        [(n, 'exact') for n in layers]


def test_detections_equal_model_predict(name):
    """Boxes, scores, labels and order equal ``model.predict`` (all ``max_per_img`` of them);
    each score re-read on the live outputs for its (query, class) equals the decoded one."""
    from mmdet.structures import DetDataSample

    model = _model(name)
    engine = CAMEngine(model, score_thr=0.0)
    inputs, meta, dets = _decoded(model, engine, _image())
    assert meta['scale_factor'] != (1.0, 1.0)
    with torch.no_grad():
        pred = model.predict(inputs, [DetDataSample(metainfo=meta)])[0].pred_instances
    assert len(dets) == len(pred) == 30
    assert torch.equal(dets.bboxes, pred.bboxes)
    assert torch.equal(dets.scores, pred.scores)
    assert torch.equal(dets.labels, pred.labels)
    assert len(dets.scores.unique()) == len(dets), 'scores tie'
    adapter = engine.adapter
    outs = adapter.head_outputs(adapter.features(inputs), [meta])
    scores = adapter.scores(outs, dets)
    assert scores.requires_grad
    torch.testing.assert_close(scores, dets.scores, rtol=0, atol=1e-6)
    # an unpadded input: the masks without metainfo are the same
    with torch.no_grad():
        again = adapter.decode(adapter.head_outputs(adapter.features(inputs)), meta, 0.0)
    assert torch.equal(again.scores, dets.scores)


def test_maps_equal_grad_cam(name):
    """Default layers (all neck outputs, averaged), exact route: maps equal grad-cam's class
    run once per detection for two detections (every CAM method on DINO, two on the others),
    and are not blank."""
    model = _model(name)
    image = _image()
    engine = CAMEngine(model, score_thr=0.0, topk=2)
    methods = CAM_METHODS if name == 'dino' else ['gradcam', 'hirescam']
    results = engine.explain(image, methods=methods)
    inputs, meta, dets = _decoded(model, engine, image)
    for method, res in results.items():
        assert len(res) == 2
        assert res.layers == [MODELS[name][2]] * 2
        np.testing.assert_array_equal(dets.scores[:2].numpy(), res.scores)
        try:
            ref = reference_input_cams(model, inputs, method, res.layers, dets.select(slice(0, 2)),
                                       meta)
        finally:
            model.zero_grad(set_to_none=True)
        np.testing.assert_allclose(res.input_cams, ref, atol=1e-4, err_msg=method)
        assert (res.cams.reshape(2, -1).max(1) > 0).all(), method


def _grounding_dino(tmp_path):
    pytest.importorskip('transformers', reason='the multimodal extra (transformers) is missing')
    from mmdet_cam_hook.testing.text import build_grounding_dino, tiny_bert

    torch.set_num_threads(1)
    return build_grounding_dino(tiny_bert(tmp_path / 'bert'))


@pytest.mark.parametrize('family', ['dino', 'grounding-dino'])
def test_batched_exact_route_equals_the_loop(family, tmp_path):
    """The exact route's three ways (one backward per detection, the default; one batched VJP
    per chunk with ``is_grads_batched``; the timed probe that picks one of them on the first
    chunk and remembers it) give the loop's gradients (to 1e-5 of their largest) and Grad-CAM
    maps (to 1e-4), on DINO and Grounding DINO. (HiResCAM's maps of the random Grounding DINO
    cancel to ~1e-8 from terms of ~1e-3: there float rounding shows, so they are not
    compared.)"""
    model = _model('dino') if family == 'dino' else _grounding_dino(tmp_path)
    image = _image()
    engine = CAMEngine(model, score_thr=0.0, topk=7)
    assert [layer.route for layer in engine.layers] == ['exact'] * 4
    assert engine.routes.batched['exact'] is False  # the loop unless asked
    inputs, meta = preprocess(model, engine.pipeline, image)
    adapter = engine.adapter
    grads, maps = {}, {}
    for mode in (False, True, None):
        engine.routes.batched['exact'] = mode
        maps[mode] = engine.explain(image, methods='gradcam')['gradcam']
        engine.routes.batched['exact'] = mode
        acts = {}
        with engine._capture(acts), torch.enable_grad():
            feats = adapter.features(inputs.detach().requires_grad_(True))
            outs = adapter.head_outputs(feats, [meta])
        fwd = Forward(tuple(feats), outs, acts, tuple(inputs.shape[-2:]))
        dets = adapter.decode(outs, meta, 0.0).select(slice(0, 7))
        grads[mode] = engine.routes.grads(engine.layers, dets, fwd, {})
    # 7 detections: 2 looped and 2 batched (timed), then 3 the faster way
    assert isinstance(engine.routes.batched['exact'], bool)
    for mode in (True, None):
        for name, loop in grads[False].items():
            assert loop.shape[0] == 7 and loop.abs().amax() > 0
            torch.testing.assert_close(grads[mode][name], loop, rtol=0,
                                       atol=1e-5 * float(loop.abs().amax()))
        np.testing.assert_array_equal(maps[mode].scores, maps[False].scores)
        np.testing.assert_allclose(maps[mode].input_cams, maps[False].input_cams, atol=1e-4)
        np.testing.assert_allclose(maps[mode].cams, maps[False].cams, atol=1e-4)


def test_exact_route_stops_at_the_target_layers():
    """The exact route's backward passes never reach past the target layers (the neck
    outputs): the backbone's outputs, upstream of them, receive no gradient while the maps are
    computed (``autograd.grad`` with the layers as inputs runs only the graph between)."""
    model = _model('dino')
    reached = []

    def watch(module, args, outputs):
        for out in outputs:
            out.register_hook(lambda grad: reached.append(grad.shape))

    engine = CAMEngine(model, score_thr=0.0, topk=3)
    handle = model.backbone.register_forward_hook(watch)
    try:
        res = engine.explain(_image(), methods='hirescam')['hirescam']
    finally:
        handle.remove()
    assert len(res) == 3 and (res.cams.reshape(3, -1).max(1) > 0).all()
    assert reached == []
    # the watch sees a gradient that does go there: the score's w.r.t. the image
    inputs, meta, dets = _decoded(model, engine, _image())
    adapter = engine.adapter
    handle = model.backbone.register_forward_hook(watch)
    try:
        inputs.requires_grad_(True)
        score = adapter.scores(adapter.head_outputs(adapter.features(inputs), [meta]), dets)[0]
        torch.autograd.grad(score, inputs)
    finally:
        handle.remove()
    assert reached
