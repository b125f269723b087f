"""Helpers for tests and benchmarks: randomly initialised detectors from mmdet's own configs.

No weights can be downloaded here, so tests and benchmarks run on random-init models at small
input sizes, with the head perturbed deterministically so that scores do not tie and boxes are
not degenerate. Not imported by the package itself.
"""
import os
from typing import Dict, Optional, Tuple

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
            if t.type in ('Resize', 'FixScaleResize'):
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


def detector_config(config: str, input_size: int = 128, num_classes: int = 3,
                    cfg_options: Optional[dict] = None) -> Config:
    """One of mmdet's own configs (a path under ``mmdet/.mim/configs``, e.g.
    ``'rtmdet/rtmdet_tiny_8xb32-300e_coco.py'``) made for offline tests: ``num_classes``
    classes, no pre-NMS score filter, the test pipeline's ``Resize`` (and a fixed-size ``Pad``)
    at ``input_size``, and no ``Pretrained`` initialisation (nothing is downloaded).
    ``cfg_options`` (``Config.merge_from_dict`` keys, e.g.
    ``{'model.bbox_head.norm_cfg': dict(type='GN', num_groups=8)}``) are merged first."""
    cfg = Config.fromfile(mmdet_config(config))
    if cfg_options:
        cfg.merge_from_dict(cfg_options)
    _set_num_classes(cfg.model, num_classes)
    test_cfg = cfg.model.test_cfg
    (test_cfg.rcnn if 'rcnn' in test_cfg else test_cfg).score_thr = 0.0
    _drop_pretrained(cfg.model)
    for key in ('test_dataloader', 'val_dataloader'):
        for t in cfg[key].dataset.pipeline:
            if t.type in ('Resize', 'FixScaleResize'):
                t.scale = (input_size, input_size)
            elif t.type == 'Pad' and t.get('size') is not None:
                t.size = (input_size, input_size)
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
    from mmdet.registry import MODELS
    from mmengine.registry import DefaultScope

    cfg = detector_config(config, input_size, num_classes, cfg_options)
    torch.manual_seed(seed)
    with DefaultScope.overwrite_default_scope('mmdet'):
        model = MODELS.build(cfg.model)
    _quiet_init_weights(model)
    model.cfg = cfg
    perturb = dict(perturb or {})
    if perturb.pop('calibrate', False):
        calibrate_bn(model, seed)
    if perturb:
        perturb_head(model, seed, **perturb)
    model.dataset_meta = dict(classes=tuple(f'class{i}' for i in range(num_classes)))
    return model.eval()


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


def synthetic_image(h: int = 96, w: int = 160, seed: int = 0) -> np.ndarray:
    """A BGR uint8 image with a few coloured rectangles on noise."""
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 60, (h, w, 3), dtype=np.uint8)
    for _ in range(3):
        x0, y0 = int(rng.integers(0, max(w - 20, 1))), int(rng.integers(0, max(h - 20, 1)))
        x1, y1 = x0 + int(rng.integers(10, 40)), y0 + int(rng.integers(10, 40))
        img[y0:y1, x0:x1] = rng.integers(100, 255, 3, dtype=np.uint8)
    return img


# ------------------------------------------------------------------ tiny MMEngine runs (hook tests)

#: Network input and longest image side of :func:`tiny_cfg` runs.
TINY_SIZE = 96
#: The CAM methods :func:`cam_hook` asks for.
TINY_METHODS = ('gradcam', 'hirescam')
#: mmdet's configs :func:`tiny_cfg` starts from, by ``detector``.
TINY_CONFIGS = {
    'yolox': 'yolox/yolox_nano_8xb8-300e_coco.py',
    'rtmdet': 'rtmdet/rtmdet_tiny_8xb32-300e_coco.py',
    'faster-rcnn': 'faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py',
    # shrunk as Faster R-CNN; for val/test-only runs (the shapes json has no masks to train on)
    'mask-rcnn': 'mask_rcnn/mask-rcnn_r50_fpn_1x_coco.py',
    'grounding-dino': 'grounding_dino/grounding_dino_r50_scratch_8xb2_1x_coco.py',
}
#: How :func:`tiny_cfg` shrinks Faster R-CNN (as tests/test_two_stage.py does): ResNet-18, few
#: proposals and sampled RoIs.
TINY_FASTER_RCNN = {
    'model.backbone.depth': 18,
    'model.neck.in_channels': [64, 128, 256, 512],
    'model.train_cfg.rpn.sampler.num': 64,
    'model.train_cfg.rpn_proposal.nms_pre': 200,
    'model.train_cfg.rpn_proposal.max_per_img': 50,
    'model.train_cfg.rcnn.sampler.num': 64,
    'model.test_cfg.rpn.nms_pre': 200,
    'model.test_cfg.rpn.max_per_img': 50,
}


_TINY_BASES: Dict[str, Config] = {}


def _tiny_base(detector: str) -> Config:
    """mmdet's config for ``detector``, parsed once per process (:func:`tiny_cfg` copies it)."""
    if detector not in _TINY_BASES:
        _TINY_BASES[detector] = Config.fromfile(mmdet_config(TINY_CONFIGS[detector]))
    return _TINY_BASES[detector]


def _tiny_dataset(data, split: str, pipeline: list) -> dict:
    return dict(type='CocoDataset', data_root=str(data.root), ann_file=str(data.ann_file(split)),
                data_prefix=dict(img=str(data.img_dir(split)) + os.sep),
                metainfo=dict(classes=data.classes), filter_cfg=dict(filter_empty_gt=False),
                test_mode=split == 'val', pipeline=pipeline)


def tiny_cfg(data, work_dir, *, hooks=(), backends=('LocalVisBackend', ), max_epochs: int = 2,
             max_iters: Optional[int] = None, detector: str = 'yolox') -> Config:
    """mmdet's YOLOX-nano (or RTMDet-tiny, or Faster R-CNN shrunk by
    :data:`TINY_FASTER_RCNN`) config, with its own custom hooks (YOLOX: mode switch, SyncNorm,
    EMA; RTMDet: EMA, pipeline switch; Faster R-CNN: none), shrunk to a :data:`TINY_SIZE` input,
    the dataset's classes, batches of 2, no data workers, and a validation after every epoch (or
    every iteration with ``max_iters``). The training pipeline flips at random, so anything that
    consumed the global numpy RNG would change the trained weights.

    Args:
        data (ShapesDataset): A generated dataset (:func:`..demo.shapes.generate_shapes`).
        work_dir (str | PathLike): The runner's work_dir.
        hooks (Sequence[dict]): Hook configs added after the config's own custom hooks.
            Defaults to ().
        backends (Sequence[str]): Visualizer backend types. Defaults to ('LocalVisBackend',).
        max_epochs (int): Epochs of an epoch-based run. Defaults to 2.
        max_iters (int, optional): Iterations of an iteration-based run instead. Defaults to
            None.
        detector (str): ``'yolox'``, ``'rtmdet'`` or ``'faster-rcnn'`` (a key of
            :data:`TINY_CONFIGS`). Defaults to 'yolox'.

    Returns:
        Config: The config for ``Runner.from_cfg``; its experiment name is unique (it names
        MMEngine's visualizer and logger singletons, which outlive a runner).

    Raises:
        ValueError: If ``detector`` is not a key of :data:`TINY_CONFIGS`.
    """
    import copy
    import uuid

    if detector not in TINY_CONFIGS:
        raise ValueError(f'`detector` must be one of {list(TINY_CONFIGS)}, got {detector!r}')
    cfg = copy.deepcopy(_tiny_base(detector))
    _drop_pretrained(cfg.model)
    cfg.work_dir = str(work_dir)
    cfg.experiment_name = f'tiny_{uuid.uuid4().hex[:8]}'
    if detector in ('faster-rcnn', 'mask-rcnn'):
        cfg.merge_from_dict(TINY_FASTER_RCNN)
    _set_num_classes(cfg.model, len(data.classes))
    cfg.model.data_preprocessor.batch_augments = None
    size = (TINY_SIZE, TINY_SIZE)
    if detector == 'yolox':
        pad = dict(type='Pad', pad_to_square=True, pad_val=dict(img=(114.0, 114.0, 114.0)))
    else:
        pad = dict(type='Pad', size=size, pad_val=dict(img=(114, 114, 114)))
    test_pipeline = [
        dict(type='LoadImageFromFile'),
        dict(type='Resize', scale=size, keep_ratio=True), pad,
        dict(type='LoadAnnotations', with_bbox=True),
        dict(type='PackDetInputs',
             meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape', 'scale_factor'))
    ]
    load = [dict(type='LoadImageFromFile'), dict(type='LoadAnnotations', with_bbox=True)]
    augment = [dict(type='RandomFlip', prob=0.5), dict(type='Resize', scale=size, keep_ratio=True),
               pad, dict(type='PackDetInputs')]
    if detector == 'yolox':
        train_set = dict(
            type='MultiImageMixDataset',  # as in YOLOX: YOLOXModeSwitchHook calls into it
            dataset=_tiny_dataset(data, 'train', load), pipeline=augment)
        # No warm-up in so short a run, so a lower LR: at YOLOX's 0.01 two steps make the
        # eval-mode model diverge (boxes at 1e5 px and beyond).
        cfg.optim_wrapper.optimizer.lr = 0.001
    else:
        train_set = _tiny_dataset(data, 'train', load + augment)
        cfg.train_cfg.pop('dynamic_intervals', None)
        if detector in ('faster-rcnn', 'mask-rcnn'):
            cfg.optim_wrapper.optimizer.lr = 0.005  # no warm-up in so short a run
    cfg.train_dataloader = dict(batch_size=2, num_workers=0, persistent_workers=False,
                                sampler=dict(type='DefaultSampler', shuffle=True),
                                dataset=train_set)
    cfg.val_dataloader = dict(batch_size=2, num_workers=0, persistent_workers=False,
                              drop_last=False, sampler=dict(type='DefaultSampler', shuffle=False),
                              dataset=_tiny_dataset(data, 'val', test_pipeline))
    cfg.test_dataloader = cfg.val_dataloader
    cfg.val_evaluator = dict(type='CocoMetric', ann_file=str(data.ann_file('val')), metric='bbox')
    cfg.test_evaluator = cfg.val_evaluator
    if max_iters is None:
        cfg.train_cfg = dict(type='EpochBasedTrainLoop', max_epochs=max_epochs, val_interval=1)
    else:
        cfg.train_cfg = dict(type='IterBasedTrainLoop', max_iters=max_iters, val_interval=1)
        cfg.log_processor = dict(by_epoch=False)
    cfg.param_scheduler = None
    cfg.default_hooks.logger = dict(type='LoggerHook', interval=1)
    cfg.default_hooks.checkpoint = dict(type='CheckpointHook', interval=1000, save_last=False)
    cfg.custom_hooks = [*(cfg.get('custom_hooks') or []), *hooks]
    cfg.visualizer = dict(type='DetLocalVisualizer',
                          vis_backends=[dict(type=b) for b in backends])
    cfg.randomness = dict(seed=0)
    return cfg


def cam_hook(**kwargs) -> dict:
    """The CAM hook's config (``type='DetCAMHook'``) with settings that make a random-init or
    briefly trained model explain something (every score, the top 3, two probes, the
    :data:`TINY_METHODS`); ``kwargs`` override them."""
    return dict(dict(type='DetCAMHook', probe_images=2, methods=list(TINY_METHODS),
                     score_thr=0.0, topk=3), **kwargs)


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside an MMEngine model wrapper (DDP), or ``model`` itself."""
    from mmengine.model import is_model_wrapper

    return model.module if is_model_wrapper(model) else model


def hooks_of(runner, cls) -> list:
    """The runner's hooks that are instances of ``cls``."""
    return [h for h in runner.hooks if isinstance(h, cls)]


def run_log_dir(runner):
    """The run's folder, ``<work_dir>/<timestamp>`` (``vis_data/`` and the log are in it)."""
    from pathlib import Path

    return Path(runner.log_dir)


def run_log_text(runner) -> str:
    """The text of the run's log file, ``<work_dir>/<timestamp>/<timestamp>.log``."""
    return (run_log_dir(runner) / f'{runner.timestamp}.log').read_text()


def peak_memory(fn, *args, device: Optional[torch.device] = None, **kwargs) -> Tuple[object, int]:
    """Run ``fn(*args, **kwargs)``; return its result and the peak memory it added, in bytes.

    On a CUDA device: ``torch.cuda.max_memory_allocated`` above the level before the call. On
    the CPU: the process's peak resident set size (Linux's ``VmHWM``, reset through
    ``/proc/self/clear_refs`` before the call) above the resident size before it, after glibc's
    ``malloc_trim`` has returned the heap's free memory, so numpy's and torch's allocations both
    count.

    Raises:
        RuntimeError: On a CPU outside Linux (no resettable peak to read).
    """
    device = torch.device('cpu') if device is None else torch.device(device)
    if device.type == 'cuda':
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        out = fn(*args, **kwargs)
        torch.cuda.synchronize(device)
        return out, torch.cuda.max_memory_allocated(device) - before
    if not os.path.exists('/proc/self/clear_refs'):
        raise RuntimeError('peak CPU memory is read from /proc/self (Linux only)')

    def status(key: str) -> int:
        with open('/proc/self/status') as f:
            for line in f:
                if line.startswith(key + ':'):
                    return int(line.split()[1]) * 1024
        raise RuntimeError(f'/proc/self/status has no {key}')

    import ctypes
    import gc
    gc.collect()
    try:  # hand the heap's free memory back, so that the peak counts what ``fn`` allocates
        ctypes.CDLL('libc.so.6').malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the reading may then be lower
        pass
    with open('/proc/self/clear_refs', 'w') as f:
        f.write('5')  # reset the peak resident set size to the current one
    before = status('VmRSS')
    out = fn(*args, **kwargs)
    return out, status('VmHWM') - before


def torchrun_beside(module: str, args: list, in_process, nproc: int = 2, cwd=None,
                    timeout: float = 300.0, launcher=None):
    """Run ``python -m torch.distributed.run --standalone --nproc_per_node nproc -m module
    *args`` on the CPU (``OMP_NUM_THREADS=1``, no CUDA) while ``in_process()`` runs here with
    one torch thread, as torchrun's workers have (the same numerics), in ``cwd`` if given.
    ``launcher`` (a list) replaces everything before ``-m module``, e.g. ``[.../torchrun,
    '--standalone', '--nproc_per_node', '2']``.

    Returns:
        tuple: ``(in_process(), returncode, stdout, stderr)`` of the torchrun job.
    """
    import subprocess
    import sys

    env = dict(os.environ, CUDA_VISIBLE_DEVICES='', OMP_NUM_THREADS='1')
    if launcher is None:
        launcher = [sys.executable, '-m', 'torch.distributed.run', '--standalone',
                    '--nproc_per_node', str(nproc)]
    proc = subprocess.Popen(
        [*map(str, launcher), '-m', module, *map(str, args)],
        cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    threads, here = torch.get_num_threads(), os.getcwd()
    torch.set_num_threads(1)
    try:
        if cwd is not None:
            os.chdir(cwd)
        out = in_process()
        stdout, stderr = proc.communicate(timeout=timeout)
    finally:
        proc.kill()
        torch.set_num_threads(threads)
        os.chdir(here)
    return out, proc.returncode, stdout, stderr
