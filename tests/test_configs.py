"""The example configs: each inherits mmdet's YOLOX config, keeps YOLOX's own hooks, adds the CAM
hook and a TensorBoard backend, and builds into a runner whose hook accepts the real model. They
ship inside the package (:mod:`mmdet_cam_hook.configs`); ``configs/`` in the repository is a
link to them."""
from pathlib import Path

import pytest
from mmengine.config import Config
from mmengine.runner import Runner

from mmdet_cam_hook.configs import CONFIG_DIR, config_path, list_configs, resolve_config
from mmdet_cam_hook.configs.__main__ import main as configs_main

REPO = Path(__file__).resolve().parents[1]
SIZES = ('nano', 'tiny', 's', 'm', 'l', 'x')


@pytest.mark.parametrize('size', SIZES)
def test_config_builds_its_hook(size, tmp_path):
    # Config.fromfile runs `custom_imports`, which is what registers the hook.
    cfg = Config.fromfile(config_path(f'yolox_{size}_gradcam.py'))
    assert Path(cfg.filename).name == f'yolox_{size}_gradcam.py'
    assert [h['type'] for h in cfg.custom_hooks] == [
        'YOLOXModeSwitchHook', 'SyncNormHook', 'EMAHook', 'YOLOXGradCAMHook'
    ]
    assert [b['type'] for b in cfg.visualizer.vis_backends] == [
        'LocalVisBackend', 'TensorboardVisBackend'
    ]

    cfg.work_dir = str(tmp_path)
    runner = Runner.from_cfg(cfg)  # builds the model and every hook, no data needed
    names = [type(h).__name__ for h in runner.hooks]
    assert names.index('YOLOXGradCAMHook') < names.index('EMAHook')  # sees the EMA weights
    (hook, ) = [h for h in runner.hooks if type(h).__name__ == 'YOLOXGradCAMHook']
    hook.before_run(runner)  # target layers and test pipeline checked against the real model
    assert hook.methods == ['gradcam', 'hirescam']
    assert hook._pipeline[0]['type'] == 'mmdet.LoadImageFromNDArray'


def test_shipped_configs_are_listed_and_found():
    assert list_configs() == [
        '_base_/gradcam_hook.py', 'demo/yolox_nano_shapes_gradcam.py',
        *sorted(f'yolox_{size}_gradcam.py' for size in SIZES)
    ]
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
    assert [h['type'] for h in cfg.custom_hooks][-2:] == ['EMAHook', 'YOLOXGradCAMHook']
    assert cfg.custom_hooks[-1]['interval'] == 5
    assert cfg.custom_hooks[-1]['methods'] == ['gradcam', 'hirescam']
