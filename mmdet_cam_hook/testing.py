"""Helpers for tests and benchmarks: randomly initialised YOLOX models from mmdet's own configs.

No weights can be downloaded here, so tests and benchmarks run on random-init models at small
input sizes. Not imported by the package itself.
"""
import os

import numpy as np
import torch
from mmengine.config import Config

SIZES = ('nano', 'tiny', 's', 'm', 'l', 'x')


def mmdet_config(name: str) -> str:
    """Path of one of mmdet's own configs as shipped in its wheel (``mmdet/.mim/configs``)."""
    import mmdet

    return os.path.join(os.path.dirname(mmdet.__file__), '.mim', 'configs', name)


def yolox_config(size: str = 'nano', input_size: int = 128, num_classes: int = 3) -> Config:
    """mmdet's own YOLOX config with the test pipeline at ``input_size`` and no pre-NMS filter."""
    if size not in SIZES:
        raise ValueError(f'`size` must be one of {list(SIZES)}, got {size!r}')
    cfg = Config.fromfile(mmdet_config(f'yolox/yolox_{size}_8xb8-300e_coco.py'))
    cfg.model.bbox_head.num_classes = num_classes
    cfg.model.test_cfg.score_thr = 0.0
    for key in ('test_dataloader', 'val_dataloader'):
        for t in cfg[key].dataset.pipeline:
            if t.type == 'Resize':
                t.scale = (input_size, input_size)
    return cfg


def build_yolox(size: str = 'nano', input_size: int = 128, num_classes: int = 3, seed: int = 0,
                confident: bool = True) -> torch.nn.Module:
    """A random-init YOLOX with ``.cfg`` and ``dataset_meta``, in eval mode.

    With ``confident=True`` the cls/obj biases are raised so that a random model scores priors
    around 0.1-0.9 (a stock random init scores ~1e-4 everywhere and detects nothing).
    """
    from mmdet.registry import MODELS
    from mmengine.registry import DefaultScope

    cfg = yolox_config(size, input_size, num_classes)
    torch.manual_seed(seed)
    with DefaultScope.overwrite_default_scope('mmdet'):
        model = MODELS.build(cfg.model)
    _quiet_init_weights(model)
    if confident:
        gen = torch.Generator().manual_seed(seed)
        for conv in (*model.bbox_head.multi_level_conv_cls, *model.bbox_head.multi_level_conv_obj):
            with torch.no_grad():
                conv.bias.copy_(torch.randn(conv.bias.shape, generator=gen) * 0.5 + 1.0)
    model.cfg = cfg
    model.dataset_meta = dict(classes=tuple(f'class{i}' for i in range(num_classes)))
    return model.eval()


def _quiet_init_weights(model: torch.nn.Module) -> None:
    """``init_weights`` without MMEngine's per-parameter INFO log (thousands of lines)."""
    import logging

    from mmengine.logging import MMLogger

    logger = MMLogger.get_current_instance()
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        model.init_weights()
    finally:
        logger.setLevel(level)


def synthetic_image(h: int = 96, w: int = 160, seed: int = 0) -> np.ndarray:
    """A BGR uint8 image with a few coloured rectangles on noise."""
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 60, (h, w, 3), dtype=np.uint8)
    for _ in range(3):
        x0, y0 = int(rng.integers(0, max(w - 20, 1))), int(rng.integers(0, max(h - 20, 1)))
        x1, y1 = x0 + int(rng.integers(10, 40)), y0 + int(rng.integers(10, 40))
        img[y0:y1, x0:x1] = rng.integers(100, 255, 3, dtype=np.uint8)
    return img
