"""The demo in one command: train a detector on the built-in shapes and watch its CAMs.

``python -m mmdet_cam_hook.demo`` generates the shapes dataset if needed
(:mod:`mmdet_cam_hook.demo.shapes`), trains one of the shipped demo configs (``--model``:
``yolox-nano``, the default, is ``mmdet_cam_hook::demo/yolox_nano_shapes_gradcam.py``;
``rtmdet-tiny`` is ``mmdet_cam_hook::demo/rtmdet_tiny_shapes_gradcam.py``; ``rtmdet-ins-tiny``,
an instance model trained on the shapes' exact masks, is
``mmdet_cam_hook::demo/rtmdet_ins_tiny_shapes_gradcam.py``; ``configs/demo/`` in a checkout) on
the CPU into ``work_dirs/demo/<timestamp>/`` with
:class:`~mmdet_cam_hook.DetCAMHook` logging per-detection CAMs of fixed validation images at
every validation, and prints where the panels and TensorBoard event files are, the
``tensorboard --logdir ...`` line to view them, and the bbox mAP50 and pointing-game numbers of
every validation (and segm mAP50 and the mask maps' energy in the mask for an instance
model), read back from the run's ``scalars.json``.

``--epochs`` and ``--num-train``/``--num-val`` shrink the run (the tests use them); the
learning-rate schedule and the family's stage switch (YOLOX's mode switch, RTMDet's pipeline
switch) are rescaled to the number of epochs.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from ..checks import check_choice, check_int, positive_int_arg
from ..configs import SCOPE, config_path, resolve_config
from .shapes import ShapesDataset, ensure_shapes

__all__ = [
    'DEFAULT_CONFIG', 'DEFAULT_MODEL', 'MODELS', 'DemoResult', 'demo_config', 'main',
    'read_scalars', 'run_demo', 'summary'
]

#: The demo models (``--model``): name -> shipped config (``mmdet_cam_hook/configs/demo/``).
MODELS = {
    'yolox-nano': 'demo/yolox_nano_shapes_gradcam.py',
    'rtmdet-tiny': 'demo/rtmdet_tiny_shapes_gradcam.py',
    # instance masks: class and mask maps per detection, its mask outline on its tiles
    'rtmdet-ins-tiny': 'demo/rtmdet_ins_tiny_shapes_gradcam.py',
}
#: The model the demo trains when none is named.
DEFAULT_MODEL = 'yolox-nano'
#: The default model's config.
DEFAULT_CONFIG = Path(config_path(MODELS[DEFAULT_MODEL]))
#: Hook types that are this package's CAM hook (the generic name and the YOLOX-era one).
_CAM_HOOKS = ('DetCAMHook', 'YOLOXGradCAMHook')

_MAP50_KEY = 'coco/bbox_mAP_50'
_SEGM_MAP50_KEY = 'coco/segm_mAP_50'
_WRAPPER_DATASETS = ('MultiImageMixDataset', 'ClassBalancedDataset', 'RepeatDataset')


@dataclass
class DemoResult:
    """What a demo run produced.

    Attributes:
        log_dir: The run's folder, ``<work_dir>/<timestamp>``.
        vis_dir: ``<log_dir>/vis_data``: TensorBoard event files and ``scalars.json``.
        images: The panels the local backend wrote (``vis_data/vis_image/*.png``), sorted.
        event_files: The TensorBoard event files of the run.
        map50: bbox mAP50 of each validation, ``{epoch: value}``.
        pointing_game: For each scalar tag with ``pointing`` in its name (one per CAM method),
            ``{epoch: hit rate}``.
        segm_map50: mask mAP50 of each validation of an instance model, ``{epoch: value}``;
            empty for a box-only one.
        mask_energy: For each scalar tag ending in ``mask_energy_in_mask`` (one per CAM method
            of an instance model), ``{epoch: share}``: how much of the mask maps' energy lies in
            the instance's own mask.
        seconds: Wall time of the training (data generation excluded).
        data: The dataset that was used.
    """

    log_dir: Path
    vis_dir: Path
    images: list[Path]
    event_files: list[Path]
    map50: dict[int, float]
    pointing_game: dict[str, dict[int, float]]
    seconds: float
    data: ShapesDataset
    scalars: list[dict] = field(default_factory=list, repr=False)
    segm_map50: dict[int, float] = field(default_factory=dict)
    mask_energy: dict[str, dict[int, float]] = field(default_factory=dict)


def _innermost_dataset(dataset_cfg):
    """The dataset config inside wrapper datasets such as ``MultiImageMixDataset``."""
    while dataset_cfg.get('type') in _WRAPPER_DATASETS:
        dataset_cfg = dataset_cfg['dataset']
    return dataset_cfg


def _num_last_epochs(max_epochs: int) -> int:
    """The last epochs of a short run that train without the strong augmentations (YOLOX's
    ``num_last_epochs``, RTMDet's ``stage2_num_epochs``): about a sixth, none below 4 epochs."""
    return max(1, round(max_epochs / 6)) if max_epochs >= 4 else 0


def _yolox_schedule(max_epochs: int, base_lr: float) -> tuple[list[dict], int]:
    """YOLOX's schedule shrunk to ``max_epochs``: warm-up, cosine, constant last epochs.

    Returns:
        tuple: The ``param_scheduler`` list and ``num_last_epochs`` (the epochs trained without
        the strong augmentations and with the L1 loss, as YOLOXModeSwitchHook counts them).
    """
    warmup = 1 if max_epochs >= 2 else 0
    num_last = _num_last_epochs(max_epochs)
    cosine_end = max_epochs - num_last
    schedulers = []
    if warmup:
        schedulers.append(dict(type='mmdet.QuadraticWarmupLR', by_epoch=True, begin=0,
                               end=warmup, convert_to_iter_based=True))
    if cosine_end > warmup:
        schedulers.append(dict(type='CosineAnnealingLR', eta_min=base_lr * 0.05, begin=warmup,
                               T_max=cosine_end - warmup, end=cosine_end, by_epoch=True,
                               convert_to_iter_based=True))
    if num_last:
        schedulers.append(dict(type='ConstantLR', by_epoch=True, factor=1, begin=cosine_end,
                               end=max_epochs))
    return schedulers, num_last


def _linear_cosine_schedule(max_epochs: int, base_lr: float) -> tuple[list[dict], int]:
    """RTMDet's schedule shrunk to ``max_epochs``: a linear warm-up over the first epoch, then
    cosine to the end (RTMDet's own warms up over 1000 iterations and is constant for half the
    run, both far too long here).

    Returns:
        tuple: The ``param_scheduler`` list and the number of last epochs trained on the
        second-stage pipeline (``PipelineSwitchHook``).
    """
    warmup = 1 if max_epochs >= 2 else 0
    schedulers = []
    if warmup:
        schedulers.append(dict(type='LinearLR', start_factor=1.0e-3, by_epoch=True, begin=0,
                               end=warmup, convert_to_iter_based=True))
    schedulers.append(dict(type='CosineAnnealingLR', eta_min=base_lr * 0.05, begin=warmup,
                           T_max=max_epochs - warmup, end=max_epochs, by_epoch=True,
                           convert_to_iter_based=True))
    return schedulers, _num_last_epochs(max_epochs)


#: How ``--epochs`` rescales a demo config, by the detector's type (``cfg.model.type``); any
#: other detector gets the linear warm-up and cosine.
_SCHEDULES = {'YOLOX': _yolox_schedule}


def _rescale(cfg, epochs: int) -> None:
    """Set ``max_epochs`` and rescale the LR schedule and the family's stage switch to it."""
    cfg.train_cfg.max_epochs = epochs
    schedule = _SCHEDULES.get(cfg.model.get('type'), _linear_cosine_schedule)
    schedulers, num_last = schedule(epochs, cfg.optim_wrapper.optimizer.lr)
    cfg.param_scheduler = schedulers
    for hook in cfg.custom_hooks:
        if hook['type'] == 'YOLOXModeSwitchHook':
            hook['num_last_epochs'] = num_last
        elif hook['type'] == 'PipelineSwitchHook':
            # Epochs 0..epochs-1 run; switching at `epochs` means never.
            hook['switch_epoch'] = epochs - num_last


def demo_config(data: ShapesDataset,
                work_dir: str | os.PathLike,
                config: str | os.PathLike = DEFAULT_CONFIG,
                epochs: int | None = None,
                val_interval: int | None = None,
                cfg_options: dict | None = None):
    """Load the demo config and point it at ``data`` and ``work_dir``.

    Args:
        data: The generated dataset (:func:`~mmdet_cam_hook.demo.shapes.ensure_shapes`).
        work_dir: The runner's work_dir; the run writes into ``<work_dir>/<timestamp>``.
        config: The config file, or ``mmdet_cam_hook::NAME`` for a shipped one. Defaults to
            :data:`DEFAULT_CONFIG`.
        epochs: Number of training epochs; the LR schedule and the family's stage switch
            (YOLOX's mode switch, RTMDet's pipeline switch) are rescaled to it. Defaults to None
            (the config's).
        val_interval: Validate every this many epochs (and always after the last one). Defaults
            to None (the config's).
        cfg_options: Overrides merged last, as mmdet's ``--cfg-options``. Defaults to None.

    Returns:
        mmengine.Config: The config to build the runner from.

    Raises:
        FileNotFoundError: If ``config`` does not exist.
        IsADirectoryError: If ``config`` is a directory.
        TypeError: If ``epochs`` or ``val_interval`` is not an int.
        ValueError: If ``epochs`` or ``val_interval`` is below 1, or ``config`` names no
            shipped config.
    """
    from mmengine.config import Config

    check_int(epochs, 'epochs', none_ok=True)
    check_int(val_interval, 'val_interval', none_ok=True)
    config = Path(resolve_config(os.fspath(config)))
    if config.is_dir():
        raise IsADirectoryError(f'demo config {str(config)!r} is a directory, not a config file')
    if not config.is_file():
        raise FileNotFoundError(f'demo config {str(config)!r} does not exist')
    cfg = Config.fromfile(str(config))
    cfg.work_dir = str(work_dir)

    root = str(data.root.resolve()) + os.sep
    for loader in ('train_dataloader', 'val_dataloader', 'test_dataloader'):
        split = 'train' if loader == 'train_dataloader' else 'val'
        dataset = _innermost_dataset(cfg[loader]['dataset'])
        dataset['data_root'] = root
        dataset['ann_file'] = str(data.ann_file(split).resolve())
        dataset['data_prefix'] = dict(img=str(data.img_dir(split).resolve()) + os.sep)
        dataset['metainfo'] = dict(dataset.get('metainfo') or {}, classes=data.classes)
    for evaluator in ('val_evaluator', 'test_evaluator'):
        cfg[evaluator]['ann_file'] = str(data.ann_file('val').resolve())
    # Probe images given by validation index: only those the (maybe smaller) val split has.
    num_val = data.params.get('num_val')
    for hook in cfg.custom_hooks:
        probes = hook.get('probe_images')
        if (hook['type'] in _CAM_HOOKS and num_val and isinstance(probes, list)
                and all(isinstance(i, int) for i in probes)):
            hook['probe_images'] = [i for i in probes if i < num_val] or [0]

    if epochs is not None:
        _rescale(cfg, epochs)
    if val_interval is not None:
        cfg.train_cfg.val_interval = val_interval
        cfg.default_hooks.checkpoint.interval = val_interval
    if cfg_options:
        cfg.merge_from_dict(cfg_options)
    return cfg


def read_scalars(path: str | os.PathLike) -> list[dict]:
    """Read a LocalVisBackend ``scalars.json`` (one JSON object per line).

    Args:
        path: The file.

    Returns:
        list[dict]: One dict per line, each with a ``step`` key.
    """
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _by_epoch(scalars: list[dict], key: str) -> dict[int, float]:
    return {int(row['step']): float(row[key]) for row in scalars if key in row}


def run_demo(work_dir: str | os.PathLike = 'work_dirs/demo',
             data_root: str | os.PathLike = 'data/shapes', num_train: int = 400,
             num_val: int = 100, seed: int = 0, epochs: int | None = None,
             val_interval: int | None = None, config: str | os.PathLike | None = None,
             cfg_options: dict | None = None, threads: int | None = None,
             model: str = DEFAULT_MODEL) -> DemoResult:
    """Generate the data if needed, train the demo config on the CPU and collect the results.

    Args:
        work_dir: The runner's work_dir. Defaults to 'work_dirs/demo'.
        data_root: Folder of the shapes dataset, generated there when missing or different.
            Defaults to 'data/shapes'.
        num_train: Number of training images. Defaults to 400.
        num_val: Number of validation images. Defaults to 100.
        seed: Seed of the dataset generator. Defaults to 0.
        epochs: Training epochs. Defaults to None (the config's).
        val_interval: Validate every this many epochs. Defaults to None (the config's).
        config: The config file, or ``mmdet_cam_hook::NAME``; it replaces ``model``'s config.
            Defaults to None (``model``'s).
        cfg_options: Config overrides merged last. Defaults to None.
        threads: Torch CPU threads for the training, restored afterwards. On a machine busy
            with other work, 1 can be several times faster than the default (one per core),
            whose threads then wait for each other. Defaults to None (torch's default).
        model: The demo model, a key of :data:`MODELS` (``'yolox-nano'``, ``'rtmdet-tiny'``,
            ``'rtmdet-ins-tiny'``). Defaults to :data:`DEFAULT_MODEL`.

    Returns:
        DemoResult: Where the results are and the numbers of every validation.

    Raises:
        FileNotFoundError: If ``config`` does not exist.
        FileExistsError: If ``data_root`` holds files the generator did not write.
        TypeError: If a count is not an int, or ``model`` is not a str.
        ValueError: If a count is out of range, or ``model`` is not a key of :data:`MODELS`.
    """
    import torch
    from mmengine.runner import Runner

    check_int(threads, 'threads', none_ok=True)
    check_choice(model, list(MODELS), 'model')
    if config is None:
        config = config_path(MODELS[model])
    data = ensure_shapes(data_root, num_train=num_train, num_val=num_val, seed=seed)
    cfg = demo_config(data, work_dir, config=config, epochs=epochs, val_interval=val_interval,
                      cfg_options=cfg_options)
    cfg.launcher = 'none'
    runner = Runner.from_cfg(cfg)
    old_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        start = time.perf_counter()
        runner.train()
        seconds = time.perf_counter() - start
    finally:
        torch.set_num_threads(old_threads)

    log_dir = Path(runner.log_dir)
    vis_dir = log_dir / 'vis_data'
    scalars_file = vis_dir / 'scalars.json'
    scalars = read_scalars(scalars_file) if scalars_file.is_file() else []
    tags = sorted({key for row in scalars for key in row if 'pointing' in key})
    mask_tags = sorted({key for row in scalars for key in row
                        if key.endswith('mask_energy_in_mask')})
    return DemoResult(
        log_dir=log_dir,
        vis_dir=vis_dir,
        images=sorted((vis_dir / 'vis_image').glob('*.png')),
        event_files=sorted(vis_dir.glob('events.out.tfevents.*')),
        map50=_by_epoch(scalars, _MAP50_KEY),
        pointing_game={tag: _by_epoch(scalars, tag) for tag in tags},
        seconds=seconds,
        data=data,
        scalars=scalars,
        segm_map50=_by_epoch(scalars, _SEGM_MAP50_KEY),
        mask_energy={tag: _by_epoch(scalars, tag) for tag in mask_tags},
    )


def _display(path: Path) -> str:
    """``path`` relative to the working directory when it is inside it."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def _tensorboard_command(logdir: Path) -> str:
    exe = Path(sys.executable).parent / 'tensorboard'
    exe_str = _display(exe) if exe.is_file() else 'tensorboard'
    return f'{exe_str} --logdir {_display(logdir)} --host 127.0.0.1 --port 6006'


def _series(values: dict[int, float]) -> str:
    return ', '.join(f'epoch {epoch}: {value:.3f}' for epoch, value in sorted(values.items()))


def summary(result: DemoResult) -> str:
    """The lines the command prints at the end: numbers, files, the TensorBoard command.

    Args:
        result: The run.

    Returns:
        str: The summary, several lines.
    """
    lines = [
        f'Demo run finished: {len(result.map50)} validations, training took '
        f'{result.seconds / 60:.1f} min.',
        f'  bbox mAP50:            {_series(result.map50) or "(not logged)"}',
    ]
    if result.segm_map50:
        lines.append(f'  segm mAP50:            {_series(result.segm_map50)}')
    if result.pointing_game:
        lines.append('  pointing game (probe images; share of matched detections whose CAM '
                     'peak is inside the ground-truth box):')
        width = max(len(tag) for tag in result.pointing_game)
        for tag, values in result.pointing_game.items():
            lines.append(f'    {tag:<{width}}  {_series(values)}')
    else:
        lines.append('  pointing game: not logged (no probe detection matched a ground-truth box '
                     'yet, or the hook has no ground truth)')
    if result.mask_energy:
        lines.append('  mask maps (share of each mask map\'s energy inside its own predicted '
                     'mask):')
        width = max(len(tag) for tag in result.mask_energy)
        for tag, values in result.mask_energy.items():
            lines.append(f'    {tag:<{width}}  {_series(values)}')
    vis_image = result.vis_dir / 'vis_image'
    lines += [
        f'  CAM panels (PNG):      {_display(vis_image)}/  ({len(result.images)} files)',
        f'  TensorBoard events:    {", ".join(_display(p) for p in result.event_files)}',
        f'  scalars (JSON lines):  {_display(result.vis_dir / "scalars.json")}',
        'View the maps epoch by epoch (Images tab; pointing game under Scalars):',
        f'  {_tensorboard_command(result.log_dir)}',
        '  then open http://127.0.0.1:6006/',
    ]
    return '\n'.join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse the command line of ``python -m mmdet_cam_hook.demo``."""
    from mmengine.config import DictAction

    parser = argparse.ArgumentParser(
        prog='python -m mmdet_cam_hook.demo',
        description='Train a small detector (YOLOX-nano, RTMDet-tiny, or the instance model '
        'RTMDet-Ins-tiny) on the built-in shapes dataset on the CPU with DetCAMHook, then print '
        'where the CAM panels and TensorBoard logs are.')
    parser.add_argument('--model', choices=list(MODELS), default=DEFAULT_MODEL,
                        help='the detector to train, with its shipped demo config '
                        '(default: %(default)s)')
    parser.add_argument('--work-dir', default='work_dirs/demo',
                        help='runner work_dir; the run goes to <work-dir>/<timestamp> '
                        '(default: %(default)s)')
    parser.add_argument('--data-root', default='data/shapes',
                        help='shapes dataset folder, generated when missing '
                        '(default: %(default)s)')
    parser.add_argument('--num-train', type=positive_int_arg, default=400,
                        help='training images (default: %(default)s)')
    parser.add_argument('--num-val', type=positive_int_arg, default=100,
                        help='validation images (default: %(default)s)')
    parser.add_argument('--seed', type=int, default=0,
                        help='seed of the dataset generator (default: %(default)s)')
    parser.add_argument('--epochs', type=positive_int_arg, default=None,
                        help="training epochs; rescales the LR schedule (default: the config's)")
    parser.add_argument('--val-interval', type=positive_int_arg, default=None,
                        help="validate every N epochs (default: the config's)")
    parser.add_argument('--threads', type=positive_int_arg, default=None,
                        help='torch CPU threads (default: one per core); 1 is faster when '
                        'other programs keep the cores busy')
    parser.add_argument('--config', default=None,
                        help='a demo config of your own instead of --model\'s: a file, or '
                        'mmdet_cam_hook::NAME for one shipped with the package (default: '
                        + ', '.join(f'{SCOPE}{c} for {m}' for m, c in MODELS.items()) + ')')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction, default=None,
                        help='config overrides, key=value, as in mmdet tools')
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry: ``python -m mmdet_cam_hook.demo``."""
    args = parse_args(argv)
    result = run_demo(work_dir=args.work_dir, data_root=args.data_root,
                      num_train=args.num_train, num_val=args.num_val, seed=args.seed,
                      epochs=args.epochs, val_interval=args.val_interval, config=args.config,
                      cfg_options=args.cfg_options, threads=args.threads, model=args.model)
    print(summary(result))
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
