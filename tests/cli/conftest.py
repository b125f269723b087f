"""What both tools' tests share: the torchrun commands as README.md documents them."""
import shlex
import sys
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parents[2] / 'README.md'
#: torchrun's own console script, beside this Python.
TORCHRUN = Path(sys.executable).parent / 'torchrun'


def readme_torchrun_lines():
    """The commands in README's code blocks that start with torchrun."""
    lines, code = [], False
    for line in README.read_text().splitlines():
        if line.startswith('```'):
            code = not code
        elif code and line.startswith('torchrun '):
            lines.append(line)
    return lines


@pytest.fixture
def readme_torchrun():
    """``launcher(module)``: README's torchrun command for ``module`` up to ``-m module``, with
    the real ``torchrun`` script and 2 processes (for :func:`~mmdet_cam_hook.testing.
    torchrun_beside`'s ``launcher``); ``launcher.lines()``: every torchrun line of README."""
    def launcher(module):
        lines = [line for line in readme_torchrun_lines() if f' -m {module} ' in line]
        assert len(lines) == 1, (module, readme_torchrun_lines())
        head = shlex.split(lines[0].split(f' -m {module} ')[0])
        assert head[0] == 'torchrun' and '--nproc_per_node' in head, head
        head[head.index('--nproc_per_node') + 1] = '2'
        return [str(TORCHRUN), *head[1:]]

    launcher.lines = readme_torchrun_lines
    return launcher


#: The perturbation of the tiny YOLOX-nano of :func:`tiny_coco_model` (scores that vary).
TINY_PERTURB = dict(calibrate=True, weights={'multi_level_conv_': 0.002},
                    biases={'multi_level_conv_cls': (0.0, 0.5),
                            'multi_level_conv_obj': (0.0, 0.5)})


def tiny_coco_model(root, num_val: int, perturb=TINY_PERTURB):
    """The set-up the eval, misses and report CLI tests share: a ``num_val``-image val split of
    the shapes at 64 px (COCO json), a YOLOX-nano config testing at 96 px on it, and a
    checkpoint of a perturbed random-init YOLOX-nano.

    Returns:
        tuple: ``(data, cfg, config path, checkpoint path, model)``.
    """
    from mmengine.config import Config

    from mmdet_cam_hook.demo.shapes import generate_shapes
    from mmdet_cam_hook.testing import build_detector, coco_dataset, mmdet_config

    data = generate_shapes(root / 'shapes', num_train=1, num_val=num_val, image_size=64, seed=0)
    cfg = Config.fromfile(mmdet_config('yolox/yolox_nano_8xb8-300e_coco.py'))
    cfg.model.bbox_head.num_classes = len(data.classes)
    cfg.model.data_preprocessor.batch_augments = None
    pipeline = [dict(type='LoadImageFromFile'),
                dict(type='Resize', scale=(96, 96), keep_ratio=True),
                dict(type='Pad', pad_to_square=True, pad_val=dict(img=(114.0, 114.0, 114.0))),
                dict(type='LoadAnnotations', with_bbox=True), dict(type='PackDetInputs')]
    cfg.val_dataloader = cfg.test_dataloader = dict(
        batch_size=1, num_workers=0, dataset=coco_dataset(data, 'val', pipeline))
    cfg.train_dataloader = None
    cfg.custom_hooks = []
    config = root / 'tiny.py'
    cfg.dump(str(config))
    torch.manual_seed(0)
    model = build_detector('yolox/yolox_nano_8xb8-300e_coco.py', input_size=96,
                           num_classes=len(data.classes), perturb=perturb)
    checkpoint = root / 'tiny.pth'
    torch.save({'state_dict': model.state_dict(), 'meta': {}}, checkpoint)
    return data, cfg, config, checkpoint, model


@pytest.fixture(scope='session')
def make_tiny_coco():
    """Factory fixture: :func:`tiny_coco_model`."""
    return tiny_coco_model
