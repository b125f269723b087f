"""SOLO, decoupled SOLO (and its light head) and SOLOv2 on random-init models from mmdet's own
configs at 128 px: decoding equal to ``model.predict`` (labels, scores, masks, boxes), the
class score and the mask target equal to an independent re-reading of the head outputs with
plain autograd, and the class maps and mask maps of Grad-CAM, HiResCAM and LayerCAM equal to
grad-cam's class run once per instance (atol 1e-4).

The models use ResNet-18, a 32-channel FPN and head (2 stacked convs, GroupNorm of 8 groups),
3 classes and the config's own test cfg with ``score_thr`` 0; the head's convolutions are
spread (deterministic Gaussian weights) so that the random head scores cells differently and
predicts masks of varied sizes on several levels. Torch runs at one thread.
"""
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mmdet_cam_hook import CAMEngine
from mmdet_cam_hook.adapters.solo import (
    DecoupledSOLOAdapter,
    SOLOAdapter,
    SOLOMaskBranch,
    SOLOV2Adapter,
)
from mmdet_cam_hook.testing import build_model, decoded, offline_config, synthetic_image
from mmdet_cam_hook.testing.reference import on_original, reference_cams

pytestmark = pytest.mark.usefixtures('one_thread')

GN = dict(type='GN', num_groups=8, requires_grad=True)
SMALL = {'model.backbone.depth': 18, 'model.neck.in_channels': [64, 128, 256, 512],
         'model.neck.out_channels': 32, 'model.mask_head.in_channels': 32,
         'model.mask_head.feat_channels': 32, 'model.mask_head.stacked_convs': 2,
         'model.mask_head.num_classes': 3, 'model.mask_head.norm_cfg': GN,
         'model.test_cfg.score_thr': 0.0}
MASK_FEAT = {'model.mask_head.mask_feature_head.feat_channels': 16,
             'model.mask_head.mask_feature_head.out_channels': 32,
             'model.mask_head.mask_feature_head.norm_cfg': GN}
#: name: (mmdet config, adapter, whether the head has SOLOv2's unified mask feature)
MODELS = {
    'solo': ('solo/solo_r50_fpn_1x_coco.py', SOLOAdapter, False),
    'decoupled-solo': ('solo/decoupled-solo_r50_fpn_1x_coco.py', DecoupledSOLOAdapter, False),
    'decoupled-solo-light': ('solo/decoupled-solo-light_r50_fpn_3x_coco.py',
                             DecoupledSOLOAdapter, False),
    'solov2': ('solov2/solov2_r50_fpn_1x_coco.py', SOLOV2Adapter, True),
    'solov2-light': ('solov2/solov2-light_r50_fpn_ms-3x_coco.py', SOLOV2Adapter, True),
}
LEVEL_LAYERS = [f'neck.fpn_convs.{i}' for i in range(4)]
METHODS = ('gradcam', 'hirescam', 'layercam')
_BUILT = {}


@pytest.fixture(params=list(MODELS))
def name(request):
    return request.param


def _build(name: str, seed: int = 0) -> torch.nn.Module:
    """mmdet's config shrunk (``SMALL``), built offline (no ``Pretrained`` init), the test
    pipeline at 128 px, the head's convolutions spread. ``testing.build_detector`` knows
    ``bbox_head`` and RoI heads only; SOLO has a ``mask_head`` alone."""
    config, _, mask_feat = MODELS[name]
    cfg = offline_config(config, 128, {**SMALL, **(MASK_FEAT if mask_feat else {})})
    model = build_model(cfg, seed, ('a', 'b', 'c'))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, param in model.mask_head.named_parameters():
            if key.endswith('weight') and param.dim() == 4:  # convolutions, not GroupNorm
                std = 0.3 if 'conv_mask' in key or 'conv_kernel' in key else 0.1
                param.copy_(torch.randn(param.shape, generator=gen) * std)
            elif key.endswith('bias') and 'conv_cls' in key:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.5)
    return model


def _model(name):
    if name not in _BUILT:
        _BUILT[name] = _build(name)
    return _BUILT[name]


def _image():
    return synthetic_image(96, 160, seed=4)  # resized to 77 x 128: scale_factor != 1


def _spread(dets, most: int = 3):
    """Up to ``most`` instances: the best one of each level, best levels first."""
    levels = dets.levels.tolist()
    idx = [levels.index(lv) for lv in sorted(set(levels), key=levels.index)]
    return idx[:most]


# --------------------------------------------------------------------------- support
def test_adapter_branch_and_routes(name):
    """Chosen from the head class; the level maps are P2-P5 (the top level is P5 pooled),
    on the exact route; SOLOv2's maps 0-3 feed every level (the unified mask feature)."""
    model = _model(name)
    engine = CAMEngine(model, score_thr=0.0)
    assert type(engine.adapter) is MODELS[name][1]
    assert type(engine.mask_branch) is SOLOMaskBranch and engine.mask_branch.route == 'exact'
    assert engine.layer_names == LEVEL_LAYERS and engine.adapter.strides() == [4, 8, 16, 32]
    assert [layer.route for layer in engine.layers] == ['exact'] * 4
    expected = [None] * 4 if MODELS[name][2] else [0, 1, 2, 3]
    assert [layer.level for layer in engine.layers] == expected


def test_a_head_overriding_the_decoding_is_refused():
    from mmdet.models.dense_heads import SOLOHead

    class OtherSOLOHead(SOLOHead):
        def _predict_by_feat_single(self, *args, **kwargs):
            return super()._predict_by_feat_single(*args, **kwargs)

    model = _model('solo')
    model.mask_head.__class__ = OtherSOLOHead
    try:
        with pytest.raises(ValueError, match='OtherSOLOHead.*overrides _predict_by_feat_single'):
            CAMEngine(model, score_thr=0.0)
    finally:
        model.mask_head.__class__ = SOLOHead


def test_a_detector_with_a_bbox_head_is_not_taken():
    assert not SOLOAdapter.accepts(type('Model', (), {'bbox_head': torch.nn.Identity()})())


# --------------------------------------------------------------------------- decoding
def test_decoding_equals_model_predict(name):
    """Labels, scores, boxes (mmdet's: zeros) and masks (original size, bool) equal
    ``model.predict``'s, in its order; the instances lie on several levels, their masks vary;
    the class targets re-read on the live outputs equal the scores."""
    from mmdet.structures import DetDataSample

    model = _model(name)
    engine = CAMEngine(model, score_thr=0.0)
    image = _image()
    inputs, meta, _, dets = decoded(engine, image)
    with torch.no_grad():
        pred = model.predict(inputs, [DetDataSample(metainfo=meta)])[0].pred_instances
    res = engine.explain(image, methods='hirescam')['hirescam']
    assert len(res) == len(pred) >= 8
    np.testing.assert_array_equal(res.scores, pred.scores.numpy())
    np.testing.assert_array_equal(res.labels, pred.labels.numpy())
    np.testing.assert_array_equal(res.bboxes, pred.bboxes.numpy())
    assert res.masks.dtype == bool and res.masks.shape == (len(pred), *image.shape[:2])
    np.testing.assert_array_equal(res.masks, pred.masks.numpy())
    areas = res.masks.sum(axis=(1, 2))
    assert len(set(areas.tolist())) > 4, areas
    assert len(set(dets.levels.tolist())) >= 2
    outs = engine.adapter.head_outputs(engine.adapter.features(inputs))
    scores = engine.adapter.scores(outs, dets)
    assert scores.requires_grad
    torch.testing.assert_close(scores, dets.scores, rtol=1e-6, atol=0)
    target = engine.mask_branch.scores(outs, dets, meta)
    assert target.requires_grad and bool(((target > 0.5) & (target <= 1)).all())


def test_decoding_keeps_the_config_pre_filter():
    """A score_thr above the config's filters model.predict's detections only."""
    engine = CAMEngine(_model('solo'), score_thr=0.0)
    _, meta, _, dets = decoded(engine, _image())
    thr = float(dets.scores[3])
    engine = CAMEngine(_model('solo'), score_thr=thr)
    _, _, _, high = decoded(engine, _image())
    torch.testing.assert_close(high.scores, dets.scores[dets.scores >= thr], rtol=0, atol=0)


# --------------------------------------------------------------------------- the targets
def _plain_targets(name, outs, dets, k):
    """Class score and mask target of detection k read from the raw head outputs by hand
    (head level, cell, the head's mask), Matrix NMS's decay the ratio of the reported score
    to the undecayed product."""
    head_level = int(dets.levels[k] + dets.anchors[k])
    y, x, label = int(dets.ys[k]), int(dets.xs[k]), int(dets.labels[k])
    grid = int(_model(name).mask_head.num_grids[head_level])
    if name == 'solo':
        prob = outs[1][head_level][0, label, y, x]
        probs = outs[0][head_level][0, y * grid + x]
    elif name.startswith('decoupled'):
        prob = outs[2][head_level][0, label, y, x]
        probs = outs[0][head_level][0, x] * outs[1][head_level][0, y]
    else:  # the cell is a local maximum of its class (kept by the point NMS)
        prob = outs[1][head_level][0, label, y, x].sigmoid()
        kernel = outs[0][head_level][0, :, y, x]
        probs = F.conv2d(outs[2][:1], kernel[None, :, None, None])[0, 0].sigmoid()
    binary = (probs.detach() > 0.5).float()
    maskness = (probs * binary).sum() / binary.sum()
    decay = dets.scores[k] / (prob * maskness).detach()
    assert 0 < float(decay) <= 1 + 1e-6
    return decay * prob * maskness, maskness


def test_targets_equal_a_plain_backward(name):
    """d score / d level map and d mask target / d level map of each instance equal plain
    autograd through the hand-read targets (every level map: SOLOv2's maskness reads all)."""
    engine = CAMEngine(_model(name), score_thr=0.0)
    inputs, meta, _, dets = decoded(engine, _image())
    adapter, branch = engine.adapter, engine.mask_branch
    with torch.no_grad():
        feats = adapter.features(inputs)
    feats = tuple(f.detach().requires_grad_(True) for f in feats)
    outs = adapter.head_outputs(feats)
    idx = _spread(dets)
    sub = dets.select(torch.tensor(idx))
    scores, targets = adapter.scores(outs, sub), branch.scores(outs, sub, meta)
    for j, k in enumerate(idx):
        score, mask = _plain_targets(name, outs, dets, k)
        torch.testing.assert_close(score, dets.scores[k], rtol=1e-6, atol=0)
        for ours, plain in ((scores[j], score), (targets[j], mask)):
            got = torch.autograd.grad(ours, feats, retain_graph=True, allow_unused=True)
            want = torch.autograd.grad(plain, feats, retain_graph=True, allow_unused=True)
            for g, w, f in zip(got, want, feats):
                torch.testing.assert_close(torch.zeros_like(f) if g is None else g,
                                           torch.zeros_like(f) if w is None else w,
                                           rtol=1e-4, atol=1e-8)
            assert got[int(dets.levels[k])].abs().max() > 0


# --------------------------------------------------------------------------- the maps
def test_class_maps_equal_grad_cam(name):
    """Level-aware default: each instance's class map on its own level map equals grad-cam's
    class run once per instance with the adapter's score as the target."""
    model = _model(name)
    engine = CAMEngine(model, score_thr=0.0)
    image = _image()
    inputs, meta, _, dets = decoded(engine, image)
    idx = _spread(dets)
    results = engine.explain(image, methods=METHODS)
    for method, res in results.items():
        assert [res.layers[i] for i in idx] == [[LEVEL_LAYERS[int(dets.levels[i])]]
                                                for i in idx]
        ref = reference_cams(model, inputs, method, [res.layers[i] for i in idx],
                             dets.select(torch.tensor(idx)), metainfo=meta)
        np.testing.assert_allclose(res.input_cams[idx], ref, atol=1e-4, err_msg=method)
        assert (ref.reshape(len(idx), -1).max(1) > 0).all(), method


def test_mask_maps_equal_grad_cam(name):
    """Each instance's mask map (the exact route: its mask target backpropagated to every
    target layer) equals grad-cam's class run once per instance with the mask target, on the
    original image; mask maps differ from the class maps. The reference runs on the layers
    the mask target reaches (grad-cam has no gradient for the others): every level map in
    SOLOv2, the instance's own in SOLO, where the engine's other layers give zero maps."""
    model = _model(name)
    engine = CAMEngine(model, score_thr=0.0)
    image = _image()
    inputs, meta, _, dets = decoded(engine, image)
    idx = _spread(dets)
    results = engine.explain(image, methods=METHODS)
    for method, res in results.items():
        assert res.mask_cams.shape == res.cams.shape and res.mask_cams.dtype == np.float32
        layers = [engine.layer_names if MODELS[name][2] else
                  [LEVEL_LAYERS[int(dets.levels[i])]] for i in idx]
        ref = reference_cams(model, inputs, method, layers, dets.select(torch.tensor(idx)),
                             metainfo=meta, mask_branch=engine.mask_branch)
        np.testing.assert_allclose(res.mask_cams[idx], on_original(res, ref, image),
                                   atol=1e-4, err_msg=method)
        assert res.mask_cams[idx].max() > 0, method  # Grad-CAM may blank one (ReLU)
        assert not np.allclose(res.mask_cams, res.cams, atol=1e-2), method


def test_contrast_maps_equal_grad_cam():
    """``contrast='runner_up'``: class B is the cell's second class (no Matrix NMS decay: the
    pair was never kept), the map equals grad-cam's with ``score[A] - score[B]``."""
    model = _model('solov2')
    engine = CAMEngine(model, score_thr=0.0)
    image = _image()
    inputs, meta, _, dets = decoded(engine, image)
    idx = _spread(dets, 2)
    res = engine.explain(image, methods='hirescam', contrast='runner_up')['hirescam']
    labels_b = res.contrast_labels[idx]
    assert (labels_b != res.labels[idx]).all()
    ref = reference_cams(model, inputs, 'hirescam', [res.layers[i] for i in idx],
                         dets.select(torch.tensor(idx)), metainfo=meta,
                         contrast_labels=labels_b.tolist())
    np.testing.assert_allclose(res.input_cams[idx], ref, atol=1e-4)


def test_level_maps_feed_only_their_levels_in_solo():
    """SOLO's P2 map reads no detection of another level (blank maps, with the warning);
    SOLOv2's P2 feeds every detection's maskness through the unified mask feature."""
    image = _image()
    for name, blank in (('solo', True), ('solov2', False)):
        engine = CAMEngine(_model(name), score_thr=0.0, target_layers=['neck.fpn_convs.0'])
        _, _, _, dets = decoded(engine, image)
        other = dets.select(dets.levels != 0)
        assert len(other)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter('always')
            res = engine.explain(image, methods='hirescam', detections=other)['hirescam']
        flat = res.input_cams.reshape(len(other), -1).max(1)
        assert bool((flat == 0).all()) is blank, (name, flat)
        assert any('no gradient path' in str(w.message) for w in caught) is blank
