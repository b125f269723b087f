"""The example configs: each inherits mmdet's YOLOX config, keeps YOLOX's own hooks, adds the CAM
hook and a TensorBoard backend, and builds into a runner whose hook accepts the real model."""
from pathlib import Path

import pytest
from mmengine.config import Config
from mmengine.runner import Runner

CONFIGS = Path(__file__).resolve().parents[1] / 'configs'
SIZES = ('nano', 'tiny', 's', 'm', 'l', 'x')


@pytest.mark.parametrize('size', SIZES)
def test_config_builds_its_hook(size, tmp_path):
    # Config.fromfile runs `custom_imports`, which is what registers the hook.
    cfg = Config.fromfile(str(CONFIGS / f'yolox_{size}_gradcam.py'))
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
