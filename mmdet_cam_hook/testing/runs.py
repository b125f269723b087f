"""Tiny MMEngine runs for the hook tests: mmdet's configs shrunk to a generated data set, the CAM
hook's config, and what a finished run left (its hooks, its log folder and text)."""
import os
from typing import Dict, Optional

import torch
from mmengine.config import Config

from .models import _drop_pretrained, _set_num_classes, mmdet_config

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


def tiny_shapes(root):
    """The data set :func:`tiny_cfg` runs train on: 4 training and 2 validation images of the
    shapes (some non-square, exact instance masks) at :data:`TINY_SIZE`, seed 0, in COCO format
    under ``root / 'shapes'``."""
    from ..demo.shapes import generate_shapes

    return generate_shapes(root / 'shapes', num_train=4, num_val=2, image_size=TINY_SIZE, seed=0)


def _tiny_base(detector: str) -> Config:
    """mmdet's config for ``detector``, parsed once per process (:func:`tiny_cfg` copies it)."""
    if detector not in _TINY_BASES:
        _TINY_BASES[detector] = Config.fromfile(mmdet_config(TINY_CONFIGS[detector]))
    return _TINY_BASES[detector]


def coco_dataset(data, split: str, pipeline: list) -> dict:
    """The ``CocoDataset`` config of ``data``'s ``split`` (``'train'`` or ``'val'``, the latter
    in test mode) through ``pipeline``, its images kept when they hold no object."""
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
            dataset=coco_dataset(data, 'train', load), pipeline=augment)
        # No warm-up in so short a run, so a lower LR: at YOLOX's 0.01 two steps make the
        # eval-mode model diverge (boxes at 1e5 px and beyond).
        cfg.optim_wrapper.optimizer.lr = 0.001
    else:
        train_set = coco_dataset(data, 'train', load + augment)
        cfg.train_cfg.pop('dynamic_intervals', None)
        if detector in ('faster-rcnn', 'mask-rcnn'):
            cfg.optim_wrapper.optimizer.lr = 0.005  # no warm-up in so short a run
    cfg.train_dataloader = dict(batch_size=2, num_workers=0, persistent_workers=False,
                                sampler=dict(type='DefaultSampler', shuffle=True),
                                dataset=train_set)
    cfg.val_dataloader = dict(batch_size=2, num_workers=0, persistent_workers=False,
                              drop_last=False, sampler=dict(type='DefaultSampler', shuffle=False),
                              dataset=coco_dataset(data, 'val', test_pipeline))
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
