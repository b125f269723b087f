"""Random-init detectors from mmdet's own configs, made for offline tests and benchmarks.

No weights can be downloaded here, so tests and benchmarks run on random-init models at small
input sizes, with the head perturbed deterministically so that scores do not tie and boxes are
not degenerate.
"""
import os
from typing import Dict, Optional, Sequence, Tuple, Union

import torch
from mmengine.config import Config

from .images import synthetic_image

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
            if t.type in ('Resize', 'FixScaleResize'):
                t.scale = (input_size, input_size)
    return cfg


def build_yolox(size: str = 'nano', input_size: int = 128, num_classes: int = 3, seed: int = 0,
                confident: bool = True) -> torch.nn.Module:
    """A random-init YOLOX with ``.cfg`` and ``dataset_meta``, in eval mode.

    With ``confident=True`` its scores are raised (:func:`raise_yolox_scores`).
    """
    model = build_model(yolox_config(size, input_size, num_classes), seed, num_classes)
    if confident:
        raise_yolox_scores(model, seed)
    return model


def raise_yolox_scores(model: torch.nn.Module, seed: int = 0) -> None:
    """Set a YOLOX's cls/obj biases to Gaussian values (mean 1, std 0.5, from a generator
    seeded ``seed``), so that a random model scores priors around 0.1-0.9 (a stock random
    init scores ~1e-4 everywhere and detects nothing)."""
    gen = torch.Generator().manual_seed(seed)
    for conv in (*model.bbox_head.multi_level_conv_cls, *model.bbox_head.multi_level_conv_obj):
        with torch.no_grad():
            conv.bias.copy_(torch.randn(conv.bias.shape, generator=gen) * 0.5 + 1.0)


def offline_config(config: str, input_size: int = 128,
                   cfg_options: Optional[dict] = None) -> Config:
    """One of mmdet's own configs (a path under ``mmdet/.mim/configs``) made for offline tests,
    whatever its model: ``cfg_options`` (``Config.merge_from_dict`` keys) merged, no
    ``Pretrained`` initialisation (nothing is downloaded), and the test pipeline's ``Resize``
    (and a fixed-size ``Pad``) at ``input_size``, also inside a step's ``transforms`` (a video
    pipeline's per-frame steps)."""
    cfg = Config.fromfile(mmdet_config(config))
    if cfg_options:
        cfg.merge_from_dict(cfg_options)
    _drop_pretrained(cfg.model)
    for key in ('test_dataloader', 'val_dataloader'):
        for step in cfg[key].dataset.pipeline:
            for t in step.get('transforms', [step]):
                if t.type in ('Resize', 'FixScaleResize'):
                    t.scale = (input_size, input_size)
                elif t.type == 'Pad' and t.get('size') is not None:
                    t.size = (input_size, input_size)
    return cfg


def detector_config(config: str, input_size: int = 128, num_classes: int = 3,
                    cfg_options: Optional[dict] = None) -> Config:
    """One of mmdet's own configs (a path under ``mmdet/.mim/configs``, e.g.
    ``'rtmdet/rtmdet_tiny_8xb32-300e_coco.py'``) made for offline tests
    (:func:`offline_config`): ``num_classes`` classes and no pre-NMS score filter.
    ``cfg_options`` (``Config.merge_from_dict`` keys, e.g.
    ``{'model.bbox_head.norm_cfg': dict(type='GN', num_groups=8)}``) are merged first."""
    cfg = offline_config(config, input_size, cfg_options)
    _set_num_classes(cfg.model, num_classes)
    test_cfg = cfg.model.test_cfg
    (test_cfg.rcnn if 'rcnn' in test_cfg else test_cfg).score_thr = 0.0
    return cfg


def _set_num_classes(model_cfg, num_classes: int) -> None:
    """``num_classes`` of the model's ``bbox_head``, or of a two-stage model's RoI heads
    (every Cascade stage's, and the mask head's)."""
    if 'roi_head' not in model_cfg:
        model_cfg.bbox_head.num_classes = num_classes
        return
    for key in ('bbox_head', 'mask_head'):
        heads = model_cfg.roi_head.get(key)
        for head in (heads if isinstance(heads, list) else [heads] if heads else []):
            head.num_classes = num_classes


def _drop_pretrained(node) -> None:
    if isinstance(node, dict):
        init_cfg = node.get('init_cfg')
        if isinstance(init_cfg, dict) and init_cfg.get('type') == 'Pretrained':
            node.pop('init_cfg')
        for value in node.values():
            _drop_pretrained(value)
    elif isinstance(node, (list, tuple)):
        for value in node:
            _drop_pretrained(value)


def perturb_head(model: torch.nn.Module, seed: int = 0, noise: float = 0.0,
                 weights: Optional[Dict[str, float]] = None,
                 biases: Optional[Dict[str, Tuple[float, float]]] = None) -> None:
    """Deterministic changes to ``model.bbox_head``'s parameters (a two-stage model's
    ``rpn_head``'s, then its ``roi_head``'s), in ``named_parameters`` order.

    Args:
        model (nn.Module): The detector.
        seed (int): Seed of the generator. Defaults to 0.
        noise (float): Std of Gaussian noise added to every head parameter. Defaults to 0.
        weights (dict[str, float], optional): ``{name part: std}``: weights whose name
            contains the part are set to Gaussian values of that std (e.g. the predictors, so
            that scores and boxes vary from prior to prior without saturating).
            Defaults to None.
        biases (dict[str, tuple[float, float]], optional): ``{name part: (mean, std)}``:
            biases whose name contains the part are set to Gaussian values (e.g. raise the cls
            bias so that scores are 0.1-0.9; give RTMDet's regression a positive distance so
            that its boxes have a size). Defaults to None.
    """
    gen = torch.Generator().manual_seed(seed)
    heads = [model.bbox_head] if hasattr(model, 'bbox_head') else [model.rpn_head, model.roi_head]
    params = [p for head in heads for p in head.named_parameters()]
    with torch.no_grad():
        for name, param in params:
            if noise:
                param.add_(torch.randn(param.shape, generator=gen) * noise)
            for part, std in (weights or {}).items():
                if part in name and name.endswith('weight'):
                    param.copy_(torch.randn(param.shape, generator=gen) * std)
            for part, (mean, std) in (biases or {}).items():
                if part in name and name.endswith('bias'):
                    param.copy_(torch.randn(param.shape, generator=gen) * std + mean)


def build_model(cfg: Config, seed: int = 0,
                classes: Union[int, Sequence[str]] = 3) -> torch.nn.Module:
    """A random-init model from any ``cfg.model`` (e.g. :func:`offline_config`'s: SOLO,
    MaskFormer, an RPN, a tracker, which :func:`build_detector` cannot set up), built in mmdet's
    scope after ``torch.manual_seed(seed)``, with ``.cfg`` and ``dataset_meta`` (``classes``:
    the class names, or how many ``class{i}``), in eval mode."""
    from mmdet.registry import MODELS
    from mmengine.registry import DefaultScope

    torch.manual_seed(seed)
    with DefaultScope.overwrite_default_scope('mmdet'):
        model = MODELS.build(cfg.model)
    _quiet_init_weights(model)
    model.cfg = cfg
    if isinstance(classes, int):
        classes = [f'class{i}' for i in range(classes)]
    model.dataset_meta = dict(classes=tuple(classes))
    return model.eval()


def build_detector(config: str, input_size: int = 128, num_classes: int = 3, seed: int = 0,
                   perturb: Optional[dict] = None,
                   cfg_options: Optional[dict] = None) -> torch.nn.Module:
    """A random-init detector from mmdet's ``config`` (see :func:`detector_config`), with
    ``.cfg`` and ``dataset_meta``, in eval mode, its head changed by
    ``perturb_head(model, seed, **perturb)``.

    ``perturb`` may also hold ``calibrate=True``: before the head is perturbed, every
    BatchNorm's running statistics are set from synthetic images (:func:`calibrate_bn`), so
    that features do not vanish through a deep random-init backbone (RTMDet's do: its neck
    outputs are ~1e-8 and every prior of a level then scores the same)."""
    model = build_model(detector_config(config, input_size, num_classes, cfg_options), seed,
                        num_classes)
    perturb = dict(perturb or {})
    if perturb.pop('calibrate', False):
        calibrate_bn(model, seed)
    if perturb:
        perturb_head(model, seed, **perturb)
    return model


def calibrate_bn(model: torch.nn.Module, seed: int = 0, num_images: int = 8) -> None:
    """Set every BatchNorm's running statistics to the statistics of its input on
    ``num_images`` synthetic images (one eval-mode forward, each BatchNorm set just before it
    runs, so that later layers see already-calibrated earlier ones), so that a random-init
    network's features keep unit scale. ``training`` flags are restored."""
    from ..runtime.pipeline import build_pipeline, preprocess, test_pipeline_cfg

    pipeline = build_pipeline(test_pipeline_cfg(model.cfg))

    def pre_hook(bn, args):
        x = args[0].transpose(0, 1).reshape(args[0].shape[1], -1)
        bn.running_mean.copy_(x.mean(1))
        bn.running_var.copy_(x.var(1, unbiased=False))

    flags = [(m, m.training) for m in model.modules()]
    handles = [m.register_forward_pre_hook(pre_hook) for m in model.modules()
               if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
               and m.running_mean is not None]
    try:
        model.eval()
        inputs = torch.cat([
            preprocess(model, pipeline, synthetic_image(96, 160, seed=seed + i))[0]
            for i in range(num_images)])
        with torch.no_grad():
            model.bbox_head(model.extract_feat(inputs))
    finally:
        for handle in handles:
            handle.remove()
        for module, flag in flags:
            module.training = flag


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
