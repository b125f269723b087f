"""The example configs: each inherits mmdet's own config of a supported detector, keeps that
config's own custom hooks, adds the CAM hook and a TensorBoard backend, and builds into a runner
whose hook accepts the real model (its head is supported by ``build_adapter``). They ship inside
the package (:mod:`mmdet_cam_hook.configs`); ``configs/`` in the repository is a link to them."""
from pathlib import Path

import pytest
from mmengine.config import Config
from mmengine.runner import Runner

from mmdet_cam_hook.adapters import build_adapter
from mmdet_cam_hook.configs import CONFIG_DIR, config_path, list_configs, resolve_config
from mmdet_cam_hook.configs.__main__ import main as configs_main
from mmdet_cam_hook.hooks.cam_hook import DetCAMHook
from mmdet_cam_hook.testing import mmdet_config

pytestmark = pytest.mark.usefixtures('one_thread')

REPO = Path(__file__).resolve().parents[2]
SIZES = ('nano', 'tiny', 's', 'm', 'l', 'x')

#: Each shipped config, the mmdet config it inherits, and its adapter.
CONFIGS = {
    **{f'yolox_{size}_gradcam.py': (f'yolox/yolox_{size}_8xb8-300e_coco.py', 'YOLOXAdapter')
       for size in SIZES},
    'rtmdet_tiny_gradcam.py': ('rtmdet/rtmdet_tiny_8xb32-300e_coco.py', 'RTMDetAdapter'),
    'rtmdet_s_gradcam.py': ('rtmdet/rtmdet_s_8xb32-300e_coco.py', 'RTMDetAdapter'),
    'retinanet_r50_fpn_gradcam.py': ('retinanet/retinanet_r50_fpn_1x_coco.py',
                                     'RetinaNetAdapter'),
    'fcos_r50_gradcam.py': ('fcos/fcos_r50-caffe_fpn_gn-head_1x_coco.py', 'FCOSAdapter'),
    'atss_r50_gradcam.py': ('atss/atss_r50_fpn_1x_coco.py', 'ATSSAdapter'),
    'gfl_r50_gradcam.py': ('gfl/gfl_r50_fpn_1x_coco.py', 'GFLAdapter'),
    'yolov3_d53_gradcam.py': ('yolo/yolov3_d53_8xb8-ms-608-273e_coco.py', 'YOLOv3Adapter'),
    'yolov3_mobilenetv2_gradcam.py': ('yolo/yolov3_mobilenetv2_8xb24-ms-416-300e_coco.py',
                                      'YOLOv3Adapter'),
    'faster-rcnn_r50_fpn_gradcam.py': ('faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py',
                                       'TwoStageAdapter'),
    'mask-rcnn_r50_fpn_gradcam.py': ('mask_rcnn/mask-rcnn_r50_fpn_1x_coco.py',
                                     'TwoStageAdapter'),
    'cascade-rcnn_r50_fpn_gradcam.py': ('cascade_rcnn/cascade-rcnn_r50_fpn_1x_coco.py',
                                        'CascadeRCNNAdapter'),
    'dino-4scale_r50_gradcam.py': ('dino/dino-4scale_r50_8xb2-12e_coco.py', 'DETRAdapter'),
}


def _unscoped(hook: dict) -> dict:
    """The hook config without the ``_scope_`` MMEngine adds to ``mmdet::`` bases' entries."""
    return {k: v for k, v in hook.items() if k != '_scope_'}


@pytest.mark.parametrize('name', sorted(CONFIGS))
def test_config_keeps_base_hooks_and_builds_its_hook(name, tmp_path):
    # Config.fromfile runs `custom_imports`, which is what registers the hook.
    cfg = Config.fromfile(config_path(name))
    base = Config.fromfile(mmdet_config(CONFIGS[name][0]))
    assert Path(cfg.filename).name == name
    assert cfg.model.type == base.model.type
    # The base's own hooks (YOLOX: mode switch, SyncNorm, EMA; RTMDet: EMA, pipeline switch;
    # the others: none) are kept, in order; the CAM hook comes last.
    assert [_unscoped(h) for h in cfg.custom_hooks[:-1]] == base.get('custom_hooks', [])
    assert cfg.custom_hooks[-1]['type'] == 'DetCAMHook'
    assert [b['type'] for b in cfg.visualizer.vis_backends] == [
        'LocalVisBackend', 'TensorboardVisBackend'
    ]

    cfg.work_dir = str(tmp_path)
    # No download, no BatchNorm sync: the runner only builds the model and every hook.
    cfg.model.backbone.init_cfg = None
    cfg.load_from = None
    runner = Runner.from_cfg(cfg)
    names = [type(h).__name__ for h in runner.hooks]
    if 'EMAHook' in names:
        assert names.index('DetCAMHook') < names.index('EMAHook')  # sees the EMA weights
    (hook, ) = [h for h in runner.hooks if isinstance(h, DetCAMHook)]
    assert type(build_adapter(runner.model)).__name__ == CONFIGS[name][1]
    hook.before_run(runner)  # head, level layers and test pipeline checked on the real model
    assert hook.methods == ['gradcam', 'hirescam']
    assert hook._pipeline[0]['type'] == 'mmdet.LoadImageFromNDArray'


def test_shipped_configs_are_listed_and_found():
    shipped = list_configs()
    assert {'_base_/gradcam_hook.py', 'demo/yolox_nano_shapes_gradcam.py',
            'demo/rtmdet_tiny_shapes_gradcam.py', *CONFIGS} <= set(shipped)
    assert shipped == sorted(shipped)
    path = config_path('yolox_s_gradcam.py')
    assert Path(path) == CONFIG_DIR / 'yolox_s_gradcam.py' and Path(path).is_file()
    assert config_path('mmdet_cam_hook::demo/yolox_nano_shapes_gradcam.py') == str(
        CONFIG_DIR / 'demo' / 'yolox_nano_shapes_gradcam.py')
    assert resolve_config('mmdet_cam_hook::yolox_s_gradcam.py') == path
    for other in ('mmdet::yolox/yolox_s_8xb8-300e_coco.py', 'my_config.py'):
        assert resolve_config(other) == other
    with pytest.raises(ValueError, match=r"no config 'yolox_S_gradcam.py'.*'yolox_s_gradcam.py'"):
        config_path('yolox_S_gradcam.py')
    with pytest.raises(TypeError, match='`name` must be a str'):
        config_path(Path('yolox_s_gradcam.py'))


def test_repository_configs_link_to_the_package():
    """README commands use `configs/...` in a checkout: the same files as the package's."""
    assert (REPO / 'configs').is_symlink()
    assert (REPO / 'configs').resolve() == (REPO / 'mmdet_cam_hook' / 'configs').resolve()


def test_configs_module_prints_the_paths(capsys):
    assert configs_main() == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line for line in lines if not line.startswith('#')] == [
        config_path(name) for name in list_configs()
    ]
    assert f"#   _base_ = '{config_path('yolox_s_gradcam.py')}'" in lines


def test_user_config_inherits_a_shipped_config(tmp_path):
    """The README's recipe: `_base_` is the shipped config's absolute path."""
    user = tmp_path / 'my_yolox_s.py'
    user.write_text(f'_base_ = {config_path("yolox_s_gradcam.py")!r}\n'
                    'custom_hooks = [*_base_.custom_hooks[:-1],\n'
                    "                dict(_base_.custom_hooks[-1], interval=5)]\n")
    cfg = Config.fromfile(str(user))
    assert cfg.model.type == 'YOLOX'
    assert [h['type'] for h in cfg.custom_hooks][-2:] == ['EMAHook', 'DetCAMHook']
    assert cfg.custom_hooks[-1]['interval'] == 5
    assert cfg.custom_hooks[-1]['methods'] == ['gradcam', 'hirescam']
