"""Target-layer usability, decided once when the engine is built (one dummy forward): an
unusable ``target_layers`` is refused at construction naming why and a usable layer of the
model at hand; ``describe_layers`` gives what ``mmdet-cam --list-layers`` prints. Random-init
models from mmdet's own configs, shrunk as in tests/adapters."""
import numpy as np
import pytest
import torch

from mmdet_cam_hook import CAMEngine
from mmdet_cam_hook.cam.routes import ROUTES
from mmdet_cam_hook.testing import build_detector, synthetic_image

TWO_STAGE = {'model.backbone.depth': 18, 'model.neck.in_channels': [64, 128, 256, 512],
             'model.test_cfg.rpn.max_per_img': 100}
DINO = {'model.backbone.depth': 18, 'model.backbone.base_channels': 16,
        'model.num_queries': 30, 'model.test_cfg.max_per_img': 30,
        'model.encoder.num_layers': 2, 'model.decoder.num_layers': 2,
        'model.neck.in_channels': [32, 64, 128]}
_BUILT = {}


def _model(name):
    if name not in _BUILT:
        torch.set_num_threads(1)
        if name == 'faster-rcnn':
            _BUILT[name] = build_detector('faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py',
                                          cfg_options=TWO_STAGE)
        elif name == 'dino':
            _BUILT[name] = build_detector('dino/dino-4scale_r50_8xb2-12e_coco.py',
                                          cfg_options=DINO)
        else:
            from mmdet_cam_hook.testing import build_yolox
            _BUILT[name] = build_yolox('nano', input_size=64)
    return _BUILT[name]


@pytest.mark.parametrize('name, layer, reason', [
    ('faster-rcnn', 'rpn_head.rpn_conv', "the detections' scores do not depend on"),
    ('faster-rcnn', 'rpn_head', 'outputs a tuple, not a tensor'),
    ('faster-rcnn', 'roi_head.bbox_head.shared_fcs.1', 'does not run in the forward pass'),
    ('faster-rcnn', 'roi_head.bbox_roi_extractor', 'does not run in the forward pass'),
    ('dino', 'encoder.layers.0', r'outputs a 3-D tensor of shape \(1, \d+, \d+\), not a'),
    ('dino', 'decoder.layers.1', r'outputs a 3-D tensor of shape \(1, 30, 256\)'),
    ('dino', 'bbox_head.cls_branches.0', r'outputs a 3-D tensor of shape \(1, 30, 3\)'),
    ('yolox', 'bbox_head.multi_level_conv_cls.0.weight', None),  # not a module: unknown layer
])
def test_unusable_layers_are_refused_at_construction(name, layer, reason):
    model = _model(name)
    if reason is None:
        with pytest.raises(ValueError, match='unknown target layer'):
            CAMEngine(model, target_layers=layer)
        return
    usable = {row.name for row in CAMEngine(model).describe_layers() if row.usable}
    with pytest.raises(ValueError, match=reason) as info:
        CAMEngine(model, target_layers=['neck.convs.0' if name == 'dino' else
                                        'neck.fpn_convs.0', layer])
    message = str(info.value)
    assert f'target layer {layer!r}' in message and 'cannot be explained' in message
    hint = message.split('layer of this model: ')[-1].split("'")[1]
    assert hint in usable  # a layer of this model that the engine accepts
    CAMEngine(model, target_layers=hint)


@pytest.mark.parametrize('name, inside', [('faster-rcnn', 'neck.'), ('dino', 'neck.'),
                                          ('yolox', 'neck.')])
def test_tuple_output_hint_names_a_submodule_of_this_model(name, inside):
    model = _model(name)
    with pytest.raises(ValueError, match="'neck' outputs a tuple") as info:
        CAMEngine(model, target_layers='neck')
    hint = str(info.value).split('submodules, e.g. ')[-1].split("'")[1]
    assert hint.startswith(inside)
    assert hint in dict(model.named_modules())
    assert CAMEngine(model, target_layers=hint).layer_names == [hint]
    levels = CAMEngine(model).layer_names
    assert hint in levels  # the first level map inside the module


@pytest.mark.parametrize('name', ['yolox', 'faster-rcnn', 'dino'])
def test_describe_layers(name):
    model = _model(name)
    flags = [m.training for m in model.modules()]
    engine = CAMEngine(model)
    rows = engine.describe_layers()
    assert [m.training for m in model.modules()] == flags
    assert all(not m._forward_hooks for m in model.modules())
    assert all(p.grad is None for p in model.parameters())
    by_name = {row.name: row for row in rows}
    modules = {n for n, _ in model.named_modules() if n}
    assert {n.rsplit(':', 1)[0] for n in by_name} <= modules
    for name in by_name:  # ``path:i``: a map of the tuple module ``path`` outputs, listed after it
        if ':' in name:
            path, index = name.rsplit(':', 1)
            assert by_name[path].output.startswith('(') and by_name[name].usable
            assert by_name[name].output == by_name[path].output[1:-1].split(', ')[int(index)]
    for row in rows:
        assert row.usable == (row.reason == '') == (row.route in ROUTES), row
        if row.usable:
            assert row.route == engine.target_layer(row.name).route
            assert len(row.output.split('x')) == 4 and row.stride != '-'
    for layer in engine.layers:  # the default layers are usable, with the engine's route
        assert by_name[layer.name].usable and by_name[layer.name].route == layer.route
    assert by_name['neck'].output.startswith('(') and not by_name['neck'].usable
    if name == 'faster-rcnn':
        assert not by_name['rpn_head.rpn_conv'].usable
        assert 'roi_head.bbox_roi_extractor' not in by_name  # runs only when decoding
    if name == 'yolox':
        assert by_name['neck.out_convs.0'].route == 'local'
        assert by_name['neck.out_convs.0'].stride == '8'
        assert by_name['bbox_head.multi_level_conv_cls.0'].route == 'exact'


@pytest.mark.parametrize('name, cls', [('yolox', 'LocalGradient'), ('faster-rcnn', 'RoIGradient')])
def test_level_gradients_meet_the_protocol(name, cls):
    """The engine's local window and the two-stage RoI gradient are one contract."""
    from mmdet_cam_hook.adapters.base import LevelGradient

    engine = CAMEngine(_model(name))
    assert type(engine.local_grad).__name__ == cls
    assert isinstance(engine.local_grad, LevelGradient)
    assert engine.routes.local_grad is engine.local_grad
    assert not isinstance(object(), LevelGradient)
    engine.pack_chain = False  # the engine's switches are the routes' state
    assert engine.routes.pack_chain is False and engine._batched is engine.routes.batched


def test_a_map_of_a_tuple_output_is_a_target_layer():
    """``neck:i`` is the i-th map of the tuple the neck outputs: the same maps as the level
    layer that computes it (``neck.fpn_convs.i``); a bad index is a clear error."""
    model = _model('faster-rcnn')
    image = synthetic_image(96, 128, seed=1)
    for level in (0, 2):
        by_tuple = CAMEngine(model, score_thr=0.0, topk=3, target_layers=f'neck:{level}')
        by_module = CAMEngine(model, score_thr=0.0, topk=3,
                              target_layers=f'neck.fpn_convs.{level}')
        assert by_tuple.layer_names == [f'neck:{level}']
        got = by_tuple.explain(image, methods='hirescam')['hirescam']
        want = by_module.explain(image, methods='hirescam')['hirescam']
        np.testing.assert_allclose(got.cams, want.cams, atol=1e-6)
    with pytest.raises(ValueError, match='index of a tensor'):
        CAMEngine(model, target_layers='neck:first')
    with pytest.raises(ValueError, match="target layer 'neck:9'"):
        CAMEngine(model, target_layers='neck:9')
