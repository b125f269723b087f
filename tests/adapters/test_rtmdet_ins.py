"""RTMDet-Ins (``RTMDetInsSepBNHead``, mmdet's rtmdet-ins_tiny config) on a random-init model
at 128 px with 3 classes: the adapter chosen by the support rule, decoding (boxes, labels,
scores, masks) equal to ``model.predict``, each detection's prior carried through NMS (its class
score and its mask re-read there), the local window exact on every level, every method's class
maps equal to grad-cam's class run once per detection, the contrastive maps equal to the full
backward of the difference, the mask target equal to an independent computation on
``mask_feat``'s grid, and the mask maps equal to grad-cam's class run once per instance with the
mask target (atol 1e-4). A head overriding a method the adapter relies on is refused at build.

The head's BatchNorms are calibrated on synthetic images, its class and box predictors spread
(as tests/adapters/test_adapters.py does for RTMDet) and its kernel predictor spread so that the
random dynamic convs predict masks of varied sizes. Torch runs at one thread.
"""
import numpy as np
import pytest
import torch
from mmengine.config import Config
from torch import nn

from mmdet_cam_hook import CAMEngine
from mmdet_cam_hook.adapters import build_adapter
from mmdet_cam_hook.adapters.rtmdet_ins import RTMDetInsAdapter, RTMDetInsMaskBranch
from mmdet_cam_hook.cam.local import LocalGradient
from mmdet_cam_hook.runtime.pipeline import preprocess
from mmdet_cam_hook.testing import (
    build_detector,
    decoded,
    kept_pairs,
    live_outputs,
    mmdet_config,
    own_test_cfg,
    predicted,
    synthetic_image,
)
from mmdet_cam_hook.testing.reference import on_original, reference_cams

pytestmark = pytest.mark.usefixtures('one_thread')

CONFIG = 'rtmdet/rtmdet-ins_tiny_8xb32-300e_coco.py'
PERTURB = dict(calibrate=True, weights={'rtm_cls': 0.1, 'rtm_reg': 0.02, 'rtm_kernel': 0.02},
               biases={'rtm_cls': (0.0, 0.5), 'rtm_reg': (2.0, 0.3)})
LAYERS = [f'neck.out_convs.{i}' for i in range(3)]
METHODS = ('gradcam', 'hirescam', 'layercam')
_BUILT = {}


def kernel_bias(head, slope: float = 4.0, size: float = 1.5) -> torch.Tensor:
    """Dynamic-conv parameters (the kernel predictor's bias) whose mask is a diamond around
    the prior, ``slope * (|dx| + |dy|) < size`` in relative coordinates: layer 0 takes
    ``±slope * dx``, ``±slope * dy`` (ReLU: their absolute values), layer 1 sums them, layer 2
    is ``size`` minus the sum. The predictor's weights (spread) vary it from prior to prior and
    mix the prototypes in, so that masks vary in size and depend on ``mask_feat``."""
    n0, n1 = head.dyconv_channels, head.num_prototypes + 2
    w0 = torch.zeros(n0, n1)
    w0[0, 0], w0[1, 0], w0[2, 1], w0[3, 1] = slope, -slope, slope, -slope
    w1 = torch.zeros(n0, n0)
    w1[0, :4] = 1.0
    w2 = torch.zeros(1, n0)
    w2[0, 0] = -1.0
    biases = [torch.zeros(n) for n in head.bias_nums]
    biases[-1][0] = size
    return torch.cat([w0.flatten(), w1.flatten(), w2.flatten(), *biases])


def _model(plain: bool = False):
    """The config's ``RTMDetInsSepBNHead``, or (``plain``) the same head's arguments on an
    ``RTMDetInsHead`` (convs and BatchNorms shared by levels, a ``Scale`` per level; no mmdet
    config uses it)."""
    name = 'plain' if plain else 'sep'
    if name not in _BUILT:
        options = None
        if plain:
            head = Config.fromfile(mmdet_config(CONFIG)).model.bbox_head.to_dict()
            head.pop('share_conv')
            options = {'model.bbox_head': {**head, 'type': 'RTMDetInsHead', '_delete_': True}}
        model = build_detector(CONFIG, perturb=PERTURB, cfg_options=options)
        with torch.no_grad():
            for conv in model.bbox_head.rtm_kernel.modules():
                if isinstance(conv, nn.Conv2d):
                    conv.bias.copy_(kernel_bias(model.bbox_head))
        _BUILT[name] = model
    return _BUILT[name]


def _image(seed=1):
    return synthetic_image(96, 160, seed=seed)  # resized to 77 x 128: scale_factor != 1


def _per_level(dets, n=1):
    """The indices of the ``n`` best detections of each level."""
    levels = dets.levels.numpy()
    return [int(i) for lv in sorted(set(levels.tolist())) for i in np.flatnonzero(levels == lv)[:n]]


def test_engine_builds_with_the_adapter_and_mask_branch():
    engine = CAMEngine(_model())
    assert type(engine.adapter) is RTMDetInsAdapter
    assert type(engine.mask_branch) is RTMDetInsMaskBranch
    assert engine.layer_names == LAYERS
    assert [layer.route for layer in engine.layers] == ['local'] * 3
    assert engine.adapter.level_of_layer('neck.out_convs.1') == 1
    # the convs are shared by levels (named once, under level 0), the BatchNorms are not
    assert 'bbox_head.cls_convs.0.0.conv' in dict(engine.model.named_modules())
    assert engine.adapter.level_of_layer('bbox_head.cls_convs.0.0.conv') is None
    assert engine.adapter.level_of_layer('bbox_head.cls_convs.1.0.bn') == 1


def test_decode_equals_model_predict():
    """Boxes, labels, scores, order and masks equal ``model.predict``'s, at the engine's
    threshold and at the config's own test_cfg; the scores do not tie and the masks vary in
    size; each detection's class score re-read at its prior is its reported score."""
    model = _model()
    engine = CAMEngine(model, score_thr=0.0)
    image = _image(3)
    inputs, meta, outs, dets = decoded(engine, image)
    pred = predicted(model, inputs, meta)
    assert len(dets) == len(pred) > 20
    assert torch.equal(dets.bboxes, pred.bboxes) and torch.equal(dets.labels, pred.labels)
    assert torch.equal(dets.scores, pred.scores)
    assert len(dets.scores.unique()) == len(dets)
    assert set(dets.levels.tolist()) == {0, 1, 2}
    branch = RTMDetInsMaskBranch(engine.adapter)
    masks = branch.masks(outs, dets, meta)
    assert masks.dtype == torch.bool and masks.shape == (len(dets), *image.shape[:2])
    assert torch.equal(masks, pred.masks)
    areas = masks.sum(dim=(1, 2))
    assert len(areas.unique()) > len(dets) // 2 and (areas > 0).float().mean() > 0.8, areas
    assert (areas < masks[0].numel() // 2).float().mean() > 0.5, areas
    torch.testing.assert_close(engine.adapter.scores(outs, dets), dets.scores, rtol=0, atol=1e-6)

    with own_test_cfg(model, CONFIG) as test_cfg:
        pred = predicted(model, inputs, meta)
        for thr in sorted({float(test_cfg.score_thr), 0.7}):
            with torch.no_grad():
                own = engine.adapter.decode(outs, meta, thr)
            keep = pred.scores >= thr
            assert 0 < len(own) == int(keep.sum()), thr
            assert torch.equal(own.bboxes, pred.bboxes[keep])
            assert torch.equal(own.scores, pred.scores[keep])
            assert torch.equal(own.labels, pred.labels[keep])
            assert torch.equal(branch.masks(outs, own, meta), pred.masks[keep])
        assert len(own) < len(pred)

    res = CAMEngine(model, score_thr=0.0, topk=12).explain(image, methods='hirescam')['hirescam']
    np.testing.assert_array_equal(res.bboxes, dets.bboxes[:12].numpy())
    np.testing.assert_array_equal(res.masks, masks[:12].numpy())


def _dynamic_logits(head, outs, dets):
    """(K, h, w) mask logits computed here, not by the head: the instance's kernel read at its
    prior, split into three 1x1 convs over [relative x, relative y, mask_feat] (ReLU between),
    as RTMDet-Ins defines them."""
    mask_feat = outs[3][0]
    h, w = mask_feat.shape[-2:]
    stride0 = head.prior_generator.strides[0][0]
    gy, gx = torch.meshgrid(torch.arange(h) * stride0, torch.arange(w) * stride0, indexing='ij')
    out = []
    for k in range(len(dets)):
        level, y, x = int(dets.levels[k]), int(dets.ys[k]), int(dets.xs[k])
        stride = head.prior_generator.strides[level][0]
        params = outs[2][level][0, :, y, x]
        rel = torch.stack([(x * stride - gx) / (stride * 8.), (y * stride - gy) / (stride * 8.)])
        feat = torch.cat([rel.to(mask_feat), mask_feat]).reshape(-1, h * w)
        sizes = head.weight_nums + head.bias_nums
        parts = torch.split(params, sizes)
        weights, biases = parts[:head.num_dyconvs], parts[head.num_dyconvs:]
        for i, (wt, b) in enumerate(zip(weights, biases)):
            feat = wt.reshape(len(b), -1) @ feat + b[:, None]
            if i < head.num_dyconvs - 1:
                feat = feat.relu()
        out.append(feat.reshape(h, w))
    return torch.stack(out)


def test_mask_target_is_the_mean_over_the_own_binary_mask():
    """On ``mask_feat``'s grid: the branch's logits equal the independent dynamic convs of each
    instance's own prior; the target is the mean of their sigmoid over the pixels where it is
    >= mask_thr_binary; thresholded at that grid and upsampled by mmdet, the masks are
    predict's (checked above). Differentiable on the live outputs."""
    model = _model()
    engine = CAMEngine(model, score_thr=0.0)
    inputs, meta, _, dets = decoded(engine, _image(3))
    adapter, branch = engine.adapter, RTMDetInsMaskBranch(engine.adapter)
    outs = adapter.head_outputs(adapter.features(inputs))
    sub = dets.select(torch.tensor(_per_level(dets, 4)))
    logits = branch.logits(outs, sub)
    assert logits.shape == (len(sub), *outs[3].shape[-2:]) == (len(sub), 16, 16)
    torch.testing.assert_close(logits, _dynamic_logits(model.bbox_head, outs, sub),
                               rtol=1e-5, atol=1e-5)
    probs = logits.sigmoid().detach()
    thr = model.bbox_head.test_cfg.mask_thr_binary
    expected = torch.stack([p[p >= thr].mean() for p in probs])
    target = branch.scores(outs, sub, meta)
    assert target.requires_grad
    torch.testing.assert_close(target.detach(), expected)
    (grad, ) = torch.autograd.grad(target[0], outs[3])
    assert grad.abs().sum() > 0


def test_local_window_is_exact_on_every_level():
    """The class score on each level reads a 5x5 window of its own level's map (shared convs,
    per-level BatchNorm): the engine's local gradient equals the full backward through the
    head (kernel and mask branches included), detections at the border too."""
    model = _model()
    adapter = build_adapter(model)
    local = LocalGradient(adapter)
    assert set(local.radii.values()) == {2}
    engine = CAMEngine(model, score_thr=0.0)
    inputs, meta = preprocess(model, engine.pipeline, _image(1))
    feats, outs = live_outputs(adapter, inputs, meta)
    dets = adapter.decode(outs, meta, 0.0)
    border = 0
    for level in range(3):
        d = dets.select(dets.levels == level)
        h, w = feats[level].shape[-2:]
        border += int(((d.ys < 2) | (d.xs < 2) | (d.ys >= h - 2) | (d.xs >= w - 2)).sum())
        grads = local(feats[level], level, d)
        full = adapter.scores(outs, d)
        for k in range(min(len(d), 3)):
            expected = torch.autograd.grad(full[k], feats, retain_graph=True, allow_unused=True)
            torch.testing.assert_close(grads[k:k + 1], expected[level], rtol=1e-4, atol=1e-7)
            assert all(g is None or not g.any() for j, g in enumerate(expected) if j != level)
    assert border > 0


def _reference(model, inputs, meta, res, dets, idx, layers=None, **kwargs):
    """grad-cam's own class once per detection in ``idx`` (on its class map's layers unless
    ``layers`` are given); the model's ``.grad`` cleared."""
    layers = [res.layers[i] for i in idx] if layers is None else layers
    return reference_cams(model, inputs, res.method, layers, dets.select(torch.tensor(idx)),
                          metainfo=meta, **kwargs)


def test_class_maps_equal_grad_cam():
    """Level-aware default, every method: each detection's class map (one forward for all)
    equals grad-cam's class run once per detection with its score, a detection on every
    level."""
    model = _model()
    engine = CAMEngine(model, score_thr=0.0, topk=40)
    image = _image(1)
    inputs, meta, _, dets = decoded(engine, image)
    idx = _per_level(dets.select(slice(0, 40)))
    assert len(idx) == 3
    for method, res in engine.explain(image, methods=METHODS).items():
        assert [res.layers[i] for i in idx] == [[LAYERS[lv]] for lv in res.levels[idx]]
        np.testing.assert_allclose(res.input_cams[idx],
                                   _reference(model, inputs, meta, res, dets, idx),
                                   atol=1e-4, err_msg=method)


def test_contrastive_maps_equal_the_full_backward_of_the_difference():
    model = _model()
    engine = CAMEngine(model, score_thr=0.0, topk=40)
    image = _image(1)
    inputs, meta, _, dets = decoded(engine, image)
    idx = _per_level(dets.select(slice(0, 40)))
    for method, res in engine.explain(image, methods=METHODS[:2],
                                      contrast='runner_up').items():
        assert (res.contrast_labels != res.labels).all()
        ref = _reference(model, inputs, meta, res, dets, idx,
                         contrast_labels=res.contrast_labels[idx].tolist())
        np.testing.assert_allclose(res.input_cams[idx], ref, atol=1e-4, err_msg=method)


def test_mask_maps_equal_grad_cam():
    """Every method: each instance's mask map equals grad-cam's class run once per instance
    with the mask target (a full backward through the mask branch, which mixes the levels), on
    all three level maps (the exact route's level-aware default: the mask target reads every
    level); mask maps differ from the class maps."""
    model = _model()
    engine = CAMEngine(model, score_thr=0.0, topk=40)
    image = _image(1)
    inputs, meta, _, dets = decoded(engine, image)
    idx = _per_level(dets.select(slice(0, 40)), 2)
    assert len(idx) >= 4 and set(dets.levels[idx].tolist()) == {0, 1, 2}
    for method, res in engine.explain(image, methods=METHODS).items():
        assert res.mask_cams.shape == res.cams.shape and res.mask_cams.dtype == np.float32
        ref = _reference(model, inputs, meta, res, dets, idx, layers=[LAYERS] * len(idx),
                         mask_branch=engine.mask_branch)
        np.testing.assert_allclose(res.mask_cams[idx], on_original(res, ref, image),
                                   atol=1e-4, err_msg=method)
        assert (res.mask_cams[idx].reshape(len(idx), -1).max(1) > 0).any(), method
        assert not np.allclose(res.mask_cams, res.cams, atol=1e-2), method


def test_a_head_overriding_what_the_adapter_relies_on_is_refused():
    """A subclass that changes the mask logits (or the decoding) is refused when the engine is
    built, naming the head and the method; RTMDet's box adapter never takes an Ins head."""
    from mmdet.models.dense_heads import RTMDetInsSepBNHead

    from mmdet_cam_hook.adapters.rtmdet import RTMDetAdapter
    from mmdet_cam_hook.adapters.support import head_matches

    class SharperMasksHead(RTMDetInsSepBNHead):

        def _mask_predict_by_feat_single(self, mask_feat, kernels, priors):
            return 2 * super()._mask_predict_by_feat_single(mask_feat, kernels, priors)

    model = _model()
    head = model.bbox_head
    head.__class__ = SharperMasksHead
    try:
        with pytest.raises(ValueError, match=r'SharperMasksHead .*subclasses RTMDetInsSepBNHead '
                                             r'\(RTMDetInsAdapter\) but overrides '
                                             r'_mask_predict_by_feat_single'):
            CAMEngine(model)
    finally:
        head.__class__ = RTMDetInsSepBNHead
    assert all(m.adapter is not RTMDetAdapter for m in head_matches(RTMDetInsSepBNHead))
    assert type(CAMEngine(model).adapter) is RTMDetInsAdapter


def test_plain_head_shares_convs_and_norms_by_levels():
    """``RTMDetInsHead``: decoding and masks equal ``model.predict``; its convs (BatchNorms
    included) feed every level, so they have no level; the window is still the prior's own
    level's; class maps and mask maps equal grad-cam's per detection."""
    model = _model(plain=True)
    engine = CAMEngine(model, score_thr=0.0, topk=40)
    assert type(engine.adapter) is RTMDetInsAdapter and not engine.adapter._sep
    assert [layer.route for layer in engine.layers] == ['local'] * 3
    assert {'bbox_head.cls_convs.0.bn', 'bbox_head.scales.1'} <= set(dict(model.named_modules()))
    assert engine.adapter.level_of_layer('bbox_head.cls_convs.0.bn') is None
    image = _image(1)
    inputs, meta, outs, dets = decoded(engine, image)
    pred = predicted(model, inputs, meta)
    assert torch.equal(dets.bboxes, pred.bboxes) and torch.equal(dets.scores, pred.scores)
    assert torch.equal(dets.labels, pred.labels)
    masks = engine.mask_branch.masks(outs, dets, meta)
    assert torch.equal(masks, pred.masks) and len(masks.sum(dim=(1, 2)).unique()) > 20
    idx = _per_level(dets.select(slice(0, 40)))
    assert len(idx) >= 2
    res = engine.explain(image, methods='hirescam')['hirescam']
    np.testing.assert_allclose(res.input_cams[idx],
                               _reference(model, inputs, meta, res, dets, idx), atol=1e-4)
    ref = _reference(model, inputs, meta, res, dets, idx, layers=[LAYERS] * len(idx),
                     mask_branch=engine.mask_branch)
    np.testing.assert_allclose(res.mask_cams[idx], on_original(res, ref, image), atol=1e-4)


def test_candidates_hold_every_prior_and_each_kept_detection():
    """What explains a miss: every prior of the three levels with its per-class scores; each
    kept detection is one candidate pair, with its box, score and prior."""
    model = _model()
    engine = CAMEngine(model, score_thr=0.0)
    _, meta, outs, _ = decoded(engine, _image(3))
    adapter = engine.adapter
    with torch.no_grad():
        cands = adapter.candidates(outs, meta, 0.3)
    assert cands.scores.shape == (16 * 16 + 8 * 8 + 4 * 4, 3)
    dets = cands.detections
    rows, labels, same = kept_pairs(cands)
    assert len(rows) == len(dets) > 0 and cands.entered[rows, labels].all()
    torch.testing.assert_close(same.scores, dets.scores, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(same.bboxes, dets.bboxes, rtol=1e-6, atol=1e-4)
    for name in ('labels', 'levels', 'ys', 'xs'):
        assert torch.equal(getattr(same, name), getattr(dets, name)), name
    torch.testing.assert_close(adapter.scores(outs, same), dets.scores, rtol=0, atol=1e-6)
