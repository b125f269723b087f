"""The contrastive target ``explain(..., contrast=...)``: "class A rather than class B".

Each map must equal grad-cam's own class run once per detection with the target
``score[A] - score[B]`` of the detection's prior/RoI/query (the adapter's ``scores()`` called
twice, the plain full backward of the difference), on a dense head (YOLOX: the local window
route, and a backbone layer: the chain route), a two-stage head (Mask R-CNN's box branch: the
RoI route) and a DETR head (the exact route); class B is the prior's runner-up class by default,
read independently from the head's per-class scores. Torch runs at one thread.
"""
import warnings

import numpy as np
import pytest
import torch

from mmdet_cam_hook import CAMEngine
from mmdet_cam_hook.cam.targets import check_contrast
from mmdet_cam_hook.runtime.pipeline import preprocess
from mmdet_cam_hook.testing import build_detector, synthetic_image
from mmdet_cam_hook.testing.reference import reference_input_cams

pytestmark = pytest.mark.usefixtures('one_thread')

YOLOX = dict(calibrate=True, weights={'multi_level_conv_': 0.02},
             biases={'multi_level_conv_cls': (0.0, 0.5), 'multi_level_conv_obj': (0.0, 0.5)})
#: Mask R-CNN with ResNet-18, 100 proposals, RoIs on several levels; RoI classifier and RPN
#: regression perturbed (as tests/adapters/test_two_stage.py does).
MASK_RCNN_OPTIONS = {'model.backbone.depth': 18, 'model.neck.in_channels': [64, 128, 256, 512],
                     'model.test_cfg.rpn.max_per_img': 100,
                     'model.roi_head.bbox_roi_extractor.finest_scale': 8}
TWO_STAGE = dict(weights={'rpn_reg': 0.2, 'fc_cls': 0.05, 'fc_reg': 0.01},
                 biases={'fc_cls': (0.0, 0.5)})
DETR_OPTIONS = {'model.backbone.depth': 18, 'model.backbone.base_channels': 16,
                'model.num_queries': 30, 'model.test_cfg.max_per_img': 30,
                'model.encoder.num_layers': 2, 'model.decoder.num_layers': 2,
                'model.neck.in_channels': [128]}
#: name: (mmdet config, build options, target layers or None, expected route, image size)
ROWS = {
    'yolox-local': ('yolox/yolox_nano_8xb8-300e_coco.py', dict(perturb=YOLOX), None, 'local'),
    'yolox-chain': ('yolox/yolox_nano_8xb8-300e_coco.py', dict(perturb=YOLOX),
                    'backbone.stage4', 'chain'),
    'mask-rcnn': ('mask_rcnn/mask-rcnn_r50_fpn_1x_coco.py',
                  dict(perturb=TWO_STAGE, cfg_options=MASK_RCNN_OPTIONS), None, 'local'),
    'detr': ('detr/detr_r50_8xb2-150e_coco.py', dict(cfg_options=DETR_OPTIONS), None, 'exact'),
}
METHODS = ('gradcam', 'hirescam')
_BUILT = {}


def _model(config, options):
    if config not in _BUILT:
        _BUILT[config] = build_detector(config, **options)
    return _BUILT[config]


def _per_class_scores(engine, image):
    """(K, C) the score every class gets at each detection's prior, one class at a time."""
    adapter = engine.adapter
    inputs, meta = preprocess(engine.model, engine.pipeline, image)
    with torch.no_grad():
        outs = adapter.head_outputs(adapter.features(inputs), [meta])
        dets = adapter.decode(outs, meta, engine.score_thr)
        per_class = []
        for c in range(3):
            other = dets.select(slice(None))
            other.labels = torch.full_like(dets.labels, c)
            per_class.append(adapter.scores(outs, other))
    return inputs, meta, dets, torch.stack(per_class, 1).numpy()


@pytest.mark.parametrize('name', list(ROWS))
def test_contrastive_maps_equal_full_backward_of_the_difference(name):
    """Runner-up by default: ``contrast_labels`` is each prior's second-best class, and every
    method's maps equal grad-cam's class with target ``score[A] - score[B]`` (atol 1e-4)."""
    config, options, layers, route = ROWS[name]
    model = _model(config, options)
    image = synthetic_image(96, 128, seed=4)
    engine = CAMEngine(model, target_layers=layers, score_thr=0.0, topk=6)
    assert {layer.route for layer in engine.layers} == {route}
    inputs, meta, dets, per_class = _per_class_scores(engine, image)
    results = engine.explain(image, methods=METHODS, contrast='runner_up')
    first = results[METHODS[0]]
    k = len(first)
    assert k >= 3
    labels = first.labels
    np.testing.assert_array_equal(per_class[np.arange(len(labels)), labels][:k], first.scores)
    ranked = np.where(np.eye(3, dtype=bool)[labels], -np.inf, per_class[:k]).argmax(1)
    np.testing.assert_array_equal(first.contrast_labels, ranked)
    assert (first.contrast_labels != first.labels).all()
    plain = engine.explain(image, methods=METHODS[:1])[METHODS[0]]
    assert plain.contrast_labels is None
    assert not np.allclose(plain.input_cams, first.input_cams, atol=1e-3)
    idx = list(range(min(k, 4)))
    for method, res in results.items():
        try:
            ref = reference_input_cams(model, inputs, method, [res.layers[i] for i in idx],
                                       dets.select(torch.tensor(idx)), metainfo=meta,
                                       contrast_labels=res.contrast_labels[idx].tolist())
        finally:
            model.zero_grad(set_to_none=True)
        np.testing.assert_allclose(res.input_cams[idx], ref, atol=1e-4, err_msg=method)


def test_contrast_by_index_and_by_name_are_the_same_target():
    """``contrast=1`` and ``contrast='class1'`` give the same maps, B = 1 for every detection;
    a detection whose own label is B has the zero target: a blank map."""
    config, options, _, _ = ROWS['yolox-local']
    engine = CAMEngine(_model(config, options), score_thr=0.0, topk=6)
    image = synthetic_image(96, 128, seed=4)
    by_index = engine.explain(image, methods='hirescam', contrast=1)['hirescam']
    by_name = engine.explain(image, methods='hirescam', contrast='class1')['hirescam']
    np.testing.assert_array_equal(by_index.contrast_labels, np.full(len(by_index), 1))
    np.testing.assert_array_equal(by_index.cams, by_name.cams)
    same = by_index.labels == 1
    assert 0 < same.sum() < len(same)
    assert (by_index.input_cams[same] == 0).all()
    assert (by_index.input_cams[~same].max(axis=(1, 2)) > 0).all()


def test_bad_contrast_is_refused_before_the_image_is_read():
    config, options, _, _ = ROWS['yolox-local']
    engine = CAMEngine(_model(config, options), score_thr=0.0)
    missing = '/nonexistent/image.jpg'
    with pytest.raises(ValueError, match=r"`contrast` must be 'runner_up', a class index in "
                                         r"\[0, 2\] or one of the class names .*'clas1'.*"
                                         r"close matches: \['class1'"):
        engine.explain(missing, contrast='clas1')
    with pytest.raises(ValueError, match=r'class index in \[0, 2\].* got 3'):
        engine.explain(missing, contrast=3)
    with pytest.raises(TypeError, match=r'`contrast` must be .* got float 1.5'):
        engine.explain(missing, contrast=1.5)
    with pytest.raises(TypeError, match='got bool'):
        check_contrast(True)
    with pytest.raises(ValueError, match='got -1'):
        check_contrast(-1)


def test_methods_without_a_target_say_so_once():
    config, options, _, _ = ROWS['yolox-local']
    engine = CAMEngine(_model(config, options), score_thr=0.0, topk=2)
    image = synthetic_image(96, 128, seed=4)
    with pytest.warns(UserWarning, match=r"\['eigencam'\] read no gradient"):
        res = engine.explain(image, methods=['eigencam'], contrast='runner_up')['eigencam']
    plain = engine.explain(image, methods=['eigencam'])['eigencam']
    np.testing.assert_array_equal(res.cams, plain.cams)
    with warnings.catch_warnings():
        warnings.simplefilter('error', UserWarning)
        engine.explain(image, methods=['eigencam'], contrast='runner_up')


# --------------------------------------------------------------------------- hook and CLI
CLI_CONFIG = """_base_ = 'mmdet::yolox/yolox_nano_8xb8-300e_coco.py'
img_scale = (128, 128)
model = dict(bbox_head=dict(num_classes=3), test_cfg=dict(score_thr=0.0))
test_pipeline = [
    dict(type='LoadImageFromFile', backend_args=None),
    dict(type='Resize', scale=img_scale, keep_ratio=True),
    dict(type='Pad', pad_to_square=True, pad_val=dict(img=(114.0, 114.0, 114.0))),
    dict(type='PackDetInputs',
         meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape', 'scale_factor')),
]
val_dataloader = dict(dataset=dict(pipeline=test_pipeline))
test_dataloader = val_dataloader
"""


@pytest.fixture(scope='module')
def cli_files(tmp_path_factory):
    """A YOLOX-nano config, a perturbed random-init checkpoint with class names, an image."""
    import cv2

    from mmdet_cam_hook.runtime.model import init_model
    from mmdet_cam_hook.testing import perturb_head

    root = tmp_path_factory.mktemp('contrast_cli')
    (root / 'yolox.py').write_text(CLI_CONFIG)
    model = init_model(str(root / 'yolox.py'))
    perturb_head(model, **{k: v for k, v in YOLOX.items() if k != 'calibrate'})
    torch.save(dict(state_dict=model.state_dict(),
                    meta=dict(dataset_meta=dict(classes=('cat', 'dog', 'bird')))),
               root / 'yolox.pth')
    cv2.imwrite(str(root / 'street.jpg'), synthetic_image(96, 128, seed=4))
    return root


def _cli(root, *extra):
    from mmdet_cam_hook.cli.cam import main

    return main([str(root / 'yolox.py'), str(root / 'yolox.pth'), str(root / 'street.jpg'),
                 '--device', 'cpu', '--score-thr', '0', '--topk', '3', '--method', 'hirescam',
                 *map(str, extra)])


def test_cli_contrast_writes_contrast_labels(cli_files, capsys):
    out = cli_files / 'out'
    assert _cli(cli_files, '--out-dir', out, '--save-raw', '--contrast', 'dog') == 0
    raw = np.load(out / 'street_hirescam.npz')
    np.testing.assert_array_equal(raw['contrast_labels'], [1, 1, 1])
    assert _cli(cli_files, '--out-dir', out, '--save-raw', '--contrast', 'runner_up') == 0
    raw = np.load(out / 'street_hirescam.npz')
    assert (raw['contrast_labels'] != raw['labels']).all()
    assert _cli(cli_files, '--out-dir', cli_files / 'plain', '--save-raw') == 0
    assert 'contrast_labels' not in np.load(cli_files / 'plain' / 'street_hirescam.npz')
    capsys.readouterr()
    assert _cli(cli_files, '--out-dir', out, '--contrast', 'dgo') == 1
    err = capsys.readouterr().err
    assert "`--contrast` must be 'runner_up', a class index in [0, 2] or one of the class " \
        "names ['cat', 'dog', 'bird'], got 'dgo'; close matches: ['dog']" in err


def test_hook_contrast_is_checked_when_built_and_before_training(tmp_path):
    from mmengine.runner import Runner

    from mmdet_cam_hook.demo.shapes import generate_shapes
    from mmdet_cam_hook.hooks.cam_hook import DetCAMHook
    from mmdet_cam_hook.testing import TINY_SIZE, cam_hook, tiny_cfg

    with pytest.raises(TypeError, match=r'`contrast` must be .* got float 0.5'):
        DetCAMHook(contrast=0.5)
    data = generate_shapes(tmp_path / 'shapes', num_train=2, num_val=1, image_size=TINY_SIZE,
                           seed=0)
    runner = Runner.from_cfg(tiny_cfg(data, tmp_path / 'bad', hooks=[cam_hook(contrast=9)]))
    with pytest.raises(ValueError, match=r'class index in \[0, \d\].* got 9'):
        runner.train()
    assert runner.iter == 0
