"""Instance masks (Mask R-CNN, Cascade Mask R-CNN, Mask Scoring R-CNN, PointRend, HTC, SCNet) on
random-init models from mmdet's own configs at 128 px: the mask branch chosen from the model,
``CAMResult.masks`` (and the scores) equal to ``model.predict``'s, the mask target's RoI
gradient equal to autograd through the mask head, and every method's mask maps equal grad-cam's
class run once per instance with the mask target (atol 1e-4): on every level the masks come
from (the ``level`` route), or on all the level maps at once (HTC, SCNet: the ``exact`` route).

The models use ResNet-18, 100 proposals, 20 instances, 32-channel mask heads and RoI
extractors with a small ``finest_scale`` so that 128 px RoIs land on several levels (HTC: a
32-channel neck, as its semantic feature is added to the RoI features); the mask logits are
spread so that the random mask heads predict masks of varied sizes. Torch runs at one thread.
"""
import numpy as np
import pytest
import torch

from mmdet_cam_hook import CAMEngine
from mmdet_cam_hook.adapters.masks import CascadeRoIMaskBranch, RoIMaskBranch, mask_target
from mmdet_cam_hook.adapters.roi_masks import (
    HTCMaskBranch,
    MaskScoringMaskBranch,
    PointRendMaskBranch,
    SCNetMaskBranch,
)
from mmdet_cam_hook.testing import build_detector, decoded, predicted, synthetic_image
from mmdet_cam_hook.testing.reference import on_original, reference_cams

pytestmark = pytest.mark.usefixtures('one_thread')

SMALL = {'model.backbone.depth': 18, 'model.neck.in_channels': [64, 128, 256, 512],
         'model.test_cfg.rpn.max_per_img': 100, 'model.test_cfg.rcnn.max_per_img': 20,
         'model.roi_head.bbox_roi_extractor.finest_scale': 8}
MASK_32 = {'model.roi_head.mask_head.conv_out_channels': 32}
#: HTC at 32 channels throughout (its semantic feature is added to the box and mask RoI
#: features, and each mask head's feature to the next one's input: one width for all)
HTC_32 = {
    'model.neck.out_channels': 32, 'model.rpn_head.in_channels': 32,
    'model.rpn_head.feat_channels': 32, 'model.roi_head.bbox_roi_extractor.out_channels': 32,
    'model.roi_head.mask_roi_extractor.out_channels': 32,
    'model.roi_head.semantic_roi_extractor.out_channels': 32,
    'model.roi_head.semantic_head.in_channels': 32,
    'model.roi_head.semantic_head.conv_out_channels': 32,
    **{f'model.roi_head.mask_head.{i}.{key}': 32 for i in range(3)
       for key in ('in_channels', 'conv_out_channels')},
    **{f'model.roi_head.bbox_head.{i}.{key}': value for i in range(3)
       for key, value in (('in_channels', 32), ('fc_out_channels', 128))}}


def _perturb(logit_bias, logits=('conv_logits', )):
    """RPN regression and RoI classifier as in tests/adapters/test_two_stage.py; the mask
    logits' weights spread and their bias at ``logit_bias`` (the random mask heads then predict
    masks covering 30-85% of their RoIs). ``logits``: the name of the mask logits' layers."""
    return dict(weights={'rpn_reg': 0.2, 'fc_cls': 0.05, 'fc_reg': 0.01,
                         **{name: 0.3 for name in logits}},
                biases={'fc_cls': (0.0, 0.5), **{name: (logit_bias, 0.3) for name in logits}})


#: name: (mmdet config, mask branch, mask extractor's finest_scale (None: it has none), mask
#: logits' bias), the last two chosen so that the top instances' masks come from two levels
MODELS = {
    'mask-rcnn': ('mask_rcnn/mask-rcnn_r50_fpn_1x_coco.py', RoIMaskBranch, 8, 0.0),
    'cascade-mask-rcnn': ('cascade_rcnn/cascade-mask-rcnn_r50_fpn_1x_coco.py',
                          CascadeRoIMaskBranch, 4, 0.2),
    'ms-rcnn': ('ms_rcnn/ms-rcnn_r50_fpn_1x_coco.py', MaskScoringMaskBranch, 8, 0.0),
    # the fine-grained features are sampled from level 0 only (mmdet's config): one level
    'point-rend': ('point_rend/point-rend_r50-caffe_fpn_ms-1x_coco.py', PointRendMaskBranch,
                   None, 0.0),
    'htc': ('htc/htc_r50_fpn_1x_coco.py', HTCMaskBranch, 8, 0.5),
    'scnet': ('scnet/scnet_r50_fpn_1x_coco.py', SCNetMaskBranch, 8, 0.0),
}
#: The rows whose mask target mixes levels (the semantic / global context heads read them all)
EXACT = ('htc', 'scnet')
#: More options per row: ``(cfg_options, mask logits' layer names)``.
ROWS = {
    'ms-rcnn': ({**MASK_32, **{f'model.roi_head.mask_iou_head.{key}': value for key, value in (
        ('conv_out_channels', 32), ('fc_out_channels', 128), ('num_classes', 3))}},
        ('conv_logits', )),
    # the caffe config feeds unnormalised pixels (std 1), which a random-init ResNet turns
    # into degenerate proposals: the std of the pytorch configs instead
    'point-rend': ({'model.roi_head.mask_head.conv_out_channels': 32,
                    'model.roi_head.mask_head.fc_out_channels': 128,
                    'model.roi_head.point_head.fc_channels': 32,
                    'model.roi_head.point_head.num_classes': 3,
                    'model.data_preprocessor.std': [57.375, 57.12, 58.395]}, ('fc_logits', )),
    'htc': (HTC_32, ('conv_logits', )),
    # SCNet's residual mask convs keep their width (a narrower one needs a norm to project)
    'scnet': ({}, ('conv_logits', )),
}
METHODS = ('gradcam', 'hirescam', 'layercam')
_BUILT = {}


@pytest.fixture(params=list(MODELS))
def name(request):
    return request.param


def _model(name):
    if name not in _BUILT:
        config, _, finest, bias = MODELS[name]
        options, logits = ROWS.get(name, (MASK_32, ('conv_logits', )))
        if finest is not None:
            options = {**options, 'model.roi_head.mask_roi_extractor.finest_scale': finest}
        _BUILT[name] = build_detector(config, perturb=_perturb(bias, logits),
                                      cfg_options={**SMALL, **options})
    return _BUILT[name]


def _image():
    return synthetic_image(96, 160, seed=4)  # resized to 77 x 128: scale_factor != 1


def test_mask_branch_is_chosen_from_the_model(name):
    assert type(CAMEngine(_model(name), score_thr=0.0).mask_branch) is MODELS[name][1]
    if name == 'mask-rcnn':  # masks=False: the class maps only
        engine = CAMEngine(_model(name), score_thr=0.0, topk=2, masks=False)
        res = engine.explain(_image(), methods='hirescam')['hirescam']
        assert engine.mask_branch is None and res.masks is None and res.mask_cams is None
        with pytest.raises(TypeError, match='`masks`'):
            CAMEngine(_model(name), masks='yes')


def test_box_only_detector_has_no_masks():
    model = build_detector('yolox/yolox_nano_8xb8-300e_coco.py',
                           perturb=dict(biases={'multi_level_conv_cls': (0.0, 0.5),
                                                'multi_level_conv_obj': (0.0, 0.5)}))
    engine = CAMEngine(model, score_thr=0.0, topk=2)
    res = engine.explain(_image(), methods='hirescam')['hirescam']
    assert engine.mask_branch is None and res.masks is None and res.mask_cams is None


def test_masks_equal_model_predict(name):
    """Boxes, labels, scores and masks (original size, bool) equal ``model.predict``'s, in
    score order; the masks vary in size; each mask target re-read on the live maps is in
    (0, 1], differentiable, and is the mean over its binary mask."""
    model = _model(name)
    engine = CAMEngine(model, score_thr=0.0, topk=12)
    image = _image()
    inputs, meta, _, dets = decoded(engine, image)
    pred = predicted(model, inputs, meta)
    # Mask Scoring R-CNN: the random mask IoU head predicts some negative IoUs (scores < 0)
    pred = pred[pred.scores >= engine.score_thr][:12]
    res = engine.explain(image, methods='hirescam')['hirescam']
    assert len(res) == 12
    np.testing.assert_array_equal(res.bboxes, pred.bboxes.numpy())
    np.testing.assert_array_equal(res.labels, pred.labels.numpy())
    np.testing.assert_array_equal(res.scores, pred.scores.numpy())
    assert res.masks.dtype == bool and res.masks.shape == (12, *image.shape[:2])
    np.testing.assert_array_equal(res.masks, pred.masks.numpy())
    areas = res.masks.sum(axis=(1, 2))
    assert len(set(areas.tolist())) > 6 and (areas > 0).all(), areas
    branch = engine.mask_branch
    outs = engine.adapter.head_outputs(engine.adapter.features(inputs))
    target = branch.scores(outs, dets.select(slice(0, 12)), meta)
    assert target.requires_grad and bool(((target > 0) & (target <= 1)).all())


def test_mask_target_is_the_mean_over_the_binary_mask():
    probs = torch.tensor([[[0.9, 0.2], [0.6, 0.4]], [[0.1, 0.3], [0.2, 0.4]]])
    torch.testing.assert_close(mask_target(probs, 0.5), torch.tensor([0.75, 0.25]))


@pytest.mark.parametrize('row', ['mask-rcnn', 'ms-rcnn', 'point-rend'])
def test_mask_gradient_equals_the_full_backward(row):
    """The level route's d mask target / d level map (the RoI shortcut; PointRend: one
    backward per instance on level 0) equals autograd through the mask RoI extractor and mask
    head, instance by instance (raw gradients)."""
    engine = CAMEngine(_model(row), score_thr=0.0, topk=16)
    inputs, meta, _, dets = decoded(engine, _image())
    adapter, branch = engine.adapter, engine.mask_branch
    with torch.no_grad():
        feats = adapter.features(inputs)
    feats = tuple(f.detach().requires_grad_(True) for f in feats)
    outs = adapter.head_outputs(feats)
    levels = branch.levels(dets, meta)
    assert len(levels.unique()) >= (1 if row == 'point-rend' else 2)
    for level in levels.unique().tolist():
        on = dets.select(levels == level)
        grads = branch.gradient(feats[level], level, on, meta)
        target = branch.scores(outs, on, meta)
        for k in range(min(len(on), 3)):
            (expected, ) = torch.autograd.grad(target[k], feats[level], retain_graph=True)
            torch.testing.assert_close(grads[k:k + 1], expected, rtol=1e-4, atol=1e-7)


def test_mask_maps_equal_grad_cam(name):
    """Level-aware default: each instance's mask map is on the level its mask RoI was pooled
    from (``level`` route; PointRend: level 0, the one it samples) or on every level map
    (HTC, SCNet: ``exact`` route, the semantic feature reads them all) and equals grad-cam's
    class run once per instance with the mask target on those layers (on the original image:
    the reference's input maps through the same letterbox inverse); mask maps differ from the
    class maps."""
    model = _model(name)
    engine = CAMEngine(model, score_thr=0.0, topk=16)
    image = _image()
    inputs, meta, _, dets = decoded(engine, image)
    branch = engine.mask_branch
    assert branch.route == ('exact' if name in EXACT else 'level')
    if branch.route == 'exact':
        idx = [0, 5]
        layers = [list(engine.layer_names)] * len(idx)
    else:
        levels = branch.levels(dets, meta)[:16].numpy()
        idx = [int(np.flatnonzero(levels == lv)[0]) for lv in sorted(set(levels.tolist()))]
        assert len(idx) >= (1 if name == 'point-rend' else 2)
        if name == 'point-rend':  # two instances whose LayerCAM mask maps are not blank
            idx = [1, 5]
        layers = [[engine.layer_names[levels[i]]] for i in idx]
    results = engine.explain(image, methods=METHODS)
    for method, res in results.items():
        assert res.mask_cams.shape == res.cams.shape and res.mask_cams.dtype == np.float32
        ref = reference_cams(model, inputs, method, layers, dets.select(torch.tensor(idx)),
                             metainfo=meta, mask_branch=engine.mask_branch)
        np.testing.assert_allclose(res.mask_cams[idx], on_original(res, ref, image),
                                   atol=1e-4, err_msg=method)
        assert (res.mask_cams[idx].reshape(len(idx), -1).max(1) > 0).all(), method
        assert not np.allclose(res.mask_cams, res.cams, atol=1e-2), method


# --------------------------------------------------------------------------- outputs
CLI_CONFIG = """_base_ = 'mmdet::mask_rcnn/mask-rcnn_r50_fpn_1x_coco.py'
model = dict(
    backbone=dict(depth=18, init_cfg=None), neck=dict(in_channels=[64, 128, 256, 512]),
    roi_head=dict(bbox_roi_extractor=dict(finest_scale=8), bbox_head=dict(num_classes=3),
                  mask_roi_extractor=dict(finest_scale=8),
                  mask_head=dict(num_classes=3, conv_out_channels=32)),
    test_cfg=dict(rpn=dict(max_per_img=100), rcnn=dict(score_thr=0.0, max_per_img=20)))
test_pipeline = [
    dict(type='LoadImageFromFile', backend_args=None),
    dict(type='Resize', scale=(128, 128), keep_ratio=True),
    dict(type='PackDetInputs',
         meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape', 'scale_factor')),
]
val_dataloader = dict(dataset=dict(pipeline=test_pipeline))
test_dataloader = val_dataloader
"""


def test_cli_writes_mask_maps_and_raw_masks(tmp_path):
    """``mmdet-cam`` on a Mask R-CNN checkpoint: ``{stem}_mask_det{k}_{method}.jpg`` per
    instance, and ``masks``/``mask_cams`` in ``--save-raw`` equal to the engine's."""
    import cv2

    from mmdet_cam_hook.cli.cam import main

    model = _model('mask-rcnn')
    (tmp_path / 'mask_rcnn.py').write_text(CLI_CONFIG)
    torch.save(dict(state_dict=model.state_dict(),
                    meta=dict(dataset_meta=dict(classes=('a', 'b', 'c')))),
               tmp_path / 'mask_rcnn.pth')
    image = _image()
    cv2.imwrite(str(tmp_path / 'street.png'), image)
    out = tmp_path / 'out'
    assert main([str(tmp_path / 'mask_rcnn.py'), str(tmp_path / 'mask_rcnn.pth'),
                 str(tmp_path / 'street.png'), '--out-dir', str(out), '--device', 'cpu',
                 '--score-thr', '0', '--topk', '3', '--method', 'hirescam', '--save-raw']) == 0
    names = {p.name for p in out.iterdir()}
    assert {f'street_mask_det{k}_hirescam.jpg' for k in range(3)} <= names
    raw = np.load(out / 'street_hirescam.npz')
    res = CAMEngine(model, score_thr=0.0, topk=3).explain(image, methods='hirescam')['hirescam']
    np.testing.assert_array_equal(raw['masks'], res.masks)
    np.testing.assert_allclose(raw['mask_cams'], res.mask_cams, atol=1e-5)
    np.testing.assert_allclose(raw['cams'], res.cams, atol=1e-5)


def test_mask_outlines_are_drawn_on_the_border_only():
    from mmdet_cam_hook.visualization.render import MASK_COLOR, draw_mask_outlines

    image = np.zeros((40, 50, 3), np.uint8)
    masks = np.zeros((1, 40, 50), bool)
    masks[0, 10:30, 5:25] = True
    out = draw_mask_outlines(image, masks)
    drawn = (out == MASK_COLOR).all(axis=2)
    assert drawn[10, 5:25].all() and drawn[29, 5:25].all() and drawn[10:30, 5].all()
    assert not drawn[12:28, 7:23].any() and not drawn[:9].any() and not image.any()
    with pytest.raises(ValueError, match=r'`masks` must be \(K, 40, 50\)'):
        draw_mask_outlines(image, masks[:, :20])


def test_inputs_whose_mask_maps_would_collide_are_refused(tmp_path):
    from pathlib import Path

    from mmdet_cam_hook.checks import UserError
    from mmdet_cam_hook.cli.outputs import check_inputs

    with pytest.raises(UserError, match='a_mask_det0_hirescam.jpg'):
        check_inputs([Path('x/a.jpg'), Path('y/a_mask.jpg')], 'hirescam')
    check_inputs([Path('x/a.jpg'), Path('y/b_mask.jpg')], 'hirescam')


def test_readme_states_each_mask_target():
    from pathlib import Path

    from mmdet_cam_hook.adapters.masks import MASK_BRANCHES

    text = (Path(__file__).resolve().parents[2] / 'README.md').read_text(encoding='utf-8')
    for branch in MASK_BRANCHES:
        assert f'| {branch.doc_target} |' in text, branch.__name__


def test_hook_logs_mask_panels_and_mask_energy(tmp_path):
    """DetCAMHook on a (random-init, test-only) Mask R-CNN run, read back from TensorBoard:
    a mask-map panel beside each class-map panel, and the mask-energy scalar in [0, 1]."""
    from mmengine.runner import Runner
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from mmdet_cam_hook.demo.shapes import generate_shapes
    from mmdet_cam_hook.testing import TINY_SIZE, cam_hook, run_log_dir, run_log_text, tiny_cfg

    data = generate_shapes(tmp_path / 'shapes', num_train=2, num_val=1, image_size=TINY_SIZE,
                           seed=0)
    methods = ['hirescam']
    cfg = tiny_cfg(data, tmp_path / 'run', detector='mask-rcnn',
                   hooks=[cam_hook(methods=methods, probe_images=1)],
                   backends=('TensorboardVisBackend', ))
    runner = Runner.from_cfg(cfg)
    runner.test()
    events = EventAccumulator(str(run_log_dir(runner) / 'vis_data'),
                              size_guidance={'images': 0, 'scalars': 0})
    events.Reload()
    images = set(events.Tags()['images'])
    for method in methods:
        ours = [tag for tag in images if tag.startswith(f'cam_test_{method}_')]
        masks = [tag for tag in ours if tag.startswith(f'cam_test_{method}_mask_')]
        assert masks and len(masks) < len(ours), images
    for name in ('mask_energy_in_mask', 'mask_pointing_game_in_mask', 'energy_in_mask',
                 'pointing_game_in_mask'):  # the class and the mask maps, in each mask
        (value, ) = events.Scalars(f'cam_test/hirescam_{name}')
        assert 0.0 <= value.value <= 1.0, name
    assert 'failed after' not in run_log_text(runner)
