"""Text-prompted detectors: Grounding DINO and GLIP from mmdet's own configs with a tiny BERT
built and saved here with ``transformers`` (nothing downloaded), at 128 px (GLIP: a 1-1-1-1
Swin of 16 channels and 4 DyHead blocks, enough for every level to reach every detection).

For two prompts (a caption and a list of phrases): the adapter is chosen from the head, the
decoding equals ``model.predict`` with the same ``text`` (boxes, phrase labels, scores, order),
each score re-read on the live outputs equals the decoded one, and every method's maps equal
grad-cam's class run once per detection on that detection's score. Torch runs at one thread.
"""
import numpy as np
import pytest
import torch

from mmdet_cam_hook import METHODS, CAMEngine
from mmdet_cam_hook.adapters import build_adapter
from mmdet_cam_hook.adapters.grounding import GLIPAdapter, GroundingDINOAdapter, phrases_of
from mmdet_cam_hook.cam.layers import resolve_layers
from mmdet_cam_hook.runtime.pipeline import preprocess
from mmdet_cam_hook.testing import build_yolox, synthetic_image
from mmdet_cam_hook.testing.reference import reference_input_cams

pytest.importorskip('transformers', reason='the multimodal extra (transformers) is missing')

from mmdet_cam_hook.testing.text import (  # noqa: E402
    MM_GROUNDING_DINO,
    build_glip,
    build_grounding_dino,
    tiny_bert,
)

LEVELS = ['neck.convs.0', 'neck.convs.1', 'neck.convs.2', 'neck.extra_convs.0']
#: family: (builder, adapter, default layers, stages)
FAMILIES = {
    'grounding-dino': (build_grounding_dino, GroundingDINOAdapter, LEVELS,
                       ['head', 'language', 'decoder', 'encoder', 'neck', 'backbone']),
    'mm-grounding-dino': (lambda bert: build_grounding_dino(bert, config=MM_GROUNDING_DINO),
                          GroundingDINOAdapter, LEVELS,
                          ['head', 'language', 'decoder', 'encoder', 'neck', 'backbone']),
    'glip': (build_glip, GLIPAdapter, [f'neck.fpn_convs.{i}' for i in range(5)],
             ['head', 'language', 'neck', 'backbone']),
}
CAM_METHODS = [m for m in sorted(METHODS) if not getattr(METHODS[m], 'black_box', False)]
PROMPTS = ['red car . person', ['blue circle', 'dog', 'person', 'small thing']]


@pytest.fixture(scope='module')
def bert(tmp_path_factory):
    return tiny_bert(tmp_path_factory.mktemp('bert'))


_BUILT = {}


@pytest.fixture(params=list(FAMILIES))
def family(request):
    return request.param


@pytest.fixture
def model(family, bert):
    if family not in _BUILT:
        torch.set_num_threads(1)
        _BUILT[family] = FAMILIES[family][0](bert)
    return _BUILT[family]


def _image():
    return synthetic_image(100, 140, seed=3)  # resized to 91 x 128: scale_factor != 1


def _predict(model, inputs, meta, texts):
    from mmdet.structures import DetDataSample

    text = texts if isinstance(texts, str) else ' . '.join(texts)
    sample = DetDataSample(metainfo=dict(meta, text=text, custom_entities=True))
    with torch.no_grad():
        return model.predict(inputs, [sample])[0].pred_instances


def test_adapter_and_prompt(model, family):
    _, adapter_cls, layers, stages = FAMILIES[family]
    adapter = build_adapter(model)
    assert type(adapter) is adapter_cls
    assert adapter.level_layers() == layers
    assert [adapter.level_of_layer(n) for n in layers] == [None] * len(layers)
    assert adapter.prompt == ['red car', 'person', 'dog']  # the model's classes by default
    engine = CAMEngine(model, score_thr=0.0, texts='red car . person')
    assert engine.phrases == ['red car', 'person']
    assert not engine.level_aware  # every level map for every detection
    assert [(layer.name, layer.route) for layer in engine.layers] == \
        [(n, 'exact') for n in layers]
    engine.explain(_image(), texts=['dog'], methods=['gradcam'])
    assert engine.phrases == ['red car', 'person'], 'a call\'s prompt is restored after it'
    assert list(adapter.stages()) == stages
    assert adapter.stages()['language'][0] == 'language_model'


@pytest.mark.parametrize('texts', [3, ['red', 4], ' . . ', []])
def test_bad_prompts_are_refused(texts):
    with pytest.raises((TypeError, ValueError), match='texts'):
        phrases_of(texts)


def test_texts_refused_for_a_detector_without_prompt():
    with pytest.raises(ValueError, match='`texts` is for text-prompted detectors.*YOLOXHead'):
        CAMEngine(build_yolox(), texts='a car')


@pytest.mark.parametrize('family', ['grounding-dino'])
def test_a_prompt_is_required(model):
    meta = model.dataset_meta
    model.dataset_meta = {}
    try:
        with pytest.raises(ValueError, match='text-prompted detector and has no prompt'):
            CAMEngine(model)
    finally:
        model.dataset_meta = meta


@pytest.mark.parametrize('texts', PROMPTS, ids=['caption', 'phrases'])
def test_detections_equal_model_predict(model, family, texts):
    engine = CAMEngine(model, score_thr=0.0, texts=texts)
    image = _image()
    dets = engine.detect(image)
    inputs, meta = preprocess(model, engine.pipeline, image)
    pred = _predict(model, inputs, meta, texts)
    assert len(dets) == len(pred) >= 30
    assert torch.equal(dets.bboxes, pred.bboxes)
    assert torch.equal(dets.scores, pred.scores)
    assert torch.equal(dets.labels, pred.labels)
    assert set(dets.labels.tolist()) <= set(range(len(phrases_of(texts))))
    adapter = engine.adapter
    outs = adapter.head_outputs(adapter.features(inputs), [meta])
    scores = adapter.scores(outs, dets)
    assert scores.requires_grad
    torch.testing.assert_close(scores, dets.scores, rtol=0, atol=1e-6)


@pytest.mark.parametrize('family,texts', [
    ('grounding-dino', PROMPTS[0]), ('grounding-dino', PROMPTS[1]), ('glip', PROMPTS[0]),
    ('glip', PROMPTS[1]), ('mm-grounding-dino', PROMPTS[0]), ('mm-grounding-dino', PROMPTS[1])],
    ids=['grounding-dino-caption', 'grounding-dino-phrases', 'glip-caption', 'glip-phrases',
         'mm-grounding-dino-caption', 'mm-grounding-dino-phrases'])
def test_maps_equal_grad_cam(model, family, texts):
    """Default layers (all neck outputs, averaged), exact route: each map equals grad-cam's
    class run on that detection's (query, phrase) score, for the two top detections, every
    CAM method but HiResCAM: on this random-init model its map, sum over channels of gradient
    x activation, is ~1e-8 where the terms are ~0.07 (they cancel to 1.5e-7 of their size,
    below float32's precision), so two float32 computations of it differ by up to 0.1 after
    min-max scaling; measured, not a property of trained models."""
    engine = CAMEngine(model, score_thr=0.0, topk=2, texts=texts)
    image = _image()
    every = [m for m in CAM_METHODS if m != 'hirescam']
    methods = every if family == 'grounding-dino' and isinstance(texts, str) else \
        ['gradcam', 'layercam']  # every method once; two for the other rows (time)
    results = engine.explain(image, methods=methods)
    layers = FAMILIES[family][2]
    inputs, meta = preprocess(model, engine.pipeline, image)
    dets = engine.detect(image)
    for method, res in results.items():
        assert res.layers == [layers] * 2
        np.testing.assert_array_equal(dets.scores[:2].numpy(), res.scores)
        try:
            ref = reference_input_cams(model, inputs, method, res.layers,
                                       dets.select(slice(0, 2)), meta, texts=texts)
        finally:
            model.zero_grad(set_to_none=True)
        np.testing.assert_allclose(res.input_cams, ref, atol=1e-4, err_msg=method)
        assert (res.cams.reshape(2, -1).max(1) > 0).all(), method


@pytest.mark.parametrize('family', ['grounding-dino', 'glip'])
def test_per_token_maps(model, family):
    """One map per token of each detection's phrase; each equals grad-cam's class run on that
    token's probability at the detection's query / prior, written here independently of the
    adapter's scores (the sigmoid of the head's logit at that token)."""
    from pytorch_grad_cam import GradCAM

    from mmdet_cam_hook.testing.reference import HeadOutputs

    texts = 'red car . person'
    engine = CAMEngine(model, score_thr=0.0, topk=2, texts=texts)
    image = _image()
    maps = engine.explain_tokens(image)['gradcam']
    dets = engine.detect(image)
    phrase_tokens = {0: ['red', 'car'], 1: ['person']}
    assert maps.tokens == [t for label in dets.labels[:2].tolist() for t in phrase_tokens[label]]
    assert maps.phrases == [engine.phrases[int(dets.labels[k])] for k in maps.detection]
    np.testing.assert_array_equal(maps.result.bboxes, dets.bboxes[maps.detection].numpy())
    inputs, meta = preprocess(model, engine.pipeline, image)
    adapter = build_adapter(model)
    adapter.set_prompt(texts)
    layers = [m for _, m in resolve_layers(model, FAMILIES[family][2])]
    positive = adapter.positive_map()
    tokens = [t for label in dets.labels[:2].tolist() for t in positive[label + 1]]
    for row, (k, token) in enumerate(zip(maps.detection, tokens)):
        det = dets.select(slice(int(k), int(k) + 1))

        def target(outs, det=det, token=token):
            if family == 'glip':
                width = outs.bbox_preds[int(det.levels)].shape[-1]
                logits = outs.cls_logits[int(det.levels)][0, det.ys * width + det.xs]
            else:
                logits = outs.cls_scores[0][det.index]
            return logits[0, token].sigmoid()

        try:
            with GradCAM(model=HeadOutputs(adapter, meta), target_layers=layers) as cam:
                ref = cam(inputs, [target])[0]
        finally:
            model.zero_grad(set_to_none=True)
        assert float(maps.result.scores[row]) == pytest.approx(float(target(
            adapter.head_outputs(adapter.features(inputs), [meta]))), abs=1e-6)
        assert maps.result.input_cams is not None
        np.testing.assert_allclose(maps.result.input_cams[row], ref, atol=1e-4)
