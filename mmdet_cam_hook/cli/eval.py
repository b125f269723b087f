"""``mmdet-cam-eval``: are the maps faithful? Every method on the images of a config's dataset.

For each image of the config's ``val`` (or ``test``) split, the detections of the checkpoint
(``--score-thr``, ``--topk``) are explained by every method of ``--methods`` and by the
baselines ``random`` and ``box``, and each map is scored (:mod:`mmdet_cam_hook.evaluation`):
pointing game, energy-based pointing game and off-target share against the dataset's ground
truth, the share of blank maps, deletion and insertion AUC under the ``prior`` and/or
``matched`` protocol, and with ``--randomization`` the model-randomisation check
(:mod:`..evaluation.sanity`). A markdown table goes to stdout, the numbers (and the settings)
to ``--out`` as JSON.

Scale out with torchrun: ``torchrun --nproc_per_node N mmdet-cam-eval ...`` (or
``python -m torch.distributed.run ... -m mmdet_cam_hook.cli.eval ...``) splits the images
across the processes (gloo on CPU, NCCL on CUDA: :mod:`mmdet_cam_hook.cli.distributed`); rank 0
gathers the per-detection numbers and writes. Every number in the JSON equals a one-process
run's except the timings (``seconds_per_image``).

Errors are reported as ``mmdet-cam``'s are: one line on stderr, exit code 1 (argparse's own
errors: 2), Ctrl-C 130.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from ..checks import UserError, fraction_arg, nonnegative_int_arg, positive_int_arg
from ..runtime.io import write_atomically
from .common import resolve_config, resolve_device
from .distributed import distributed_env, gather, join, leave

PROG = 'mmdet-cam-eval'

logger = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (method choices from :data:`~mmdet_cam_hook.METHODS`)."""
    from ..cam.methods import METHODS
    from ..evaluation.evaluate import PROTOCOLS
    from ..evaluation.faithfulness import FILLS

    parser = argparse.ArgumentParser(
        prog=PROG,
        description='Faithfulness and localisation of per-detection maps over the images of a '
        "config's dataset: pointing game, energy-based pointing game, off-target share, blank "
        'maps, deletion/insertion AUC (protocols prior and matched) and the model-randomisation '
        'check, for each method and the baselines random and box.',
        epilog='Cost per detection and protocol: 2 x (steps + 1) images through the network per '
        'method; drise adds --drise-masks images per image. Scale out with torchrun '
        '--nproc_per_node N.')
    parser.add_argument('config', help='Model config with the dataset (a file, mmdet::... or '
                        'mmdet_cam_hook::...)')
    parser.add_argument('checkpoint', help='Path or http(s) URL to the checkpoint')
    parser.add_argument('--split', choices=('val', 'test'), default='val',
                        help="The config's dataloader whose dataset is used. Defaults to "
                        '%(default)s')
    parser.add_argument('--num-images', type=positive_int_arg, default=None,
                        help='Evaluate the first N images only. Defaults to all')
    parser.add_argument('--methods', nargs='+', choices=list(METHODS),
                        default=['gradcam', 'hirescam', 'layercam', 'drise'], metavar='METHOD',
                        help=f'Methods, of {list(METHODS)}; the baselines random and box are '
                        'always added. Defaults to gradcam hirescam layercam drise')
    parser.add_argument('--protocol', choices=(*PROTOCOLS, 'both'), default='both',
                        help='Score tracked by the deletion/insertion curves: prior (the '
                        "detection's own prior and label) or matched (D-RISE similarity to the "
                        "perturbed image's best detection). Defaults to %(default)s")
    parser.add_argument('--steps', type=positive_int_arg, default=20,
                        help='Points on each curve after the first. Defaults to %(default)s')
    parser.add_argument('--fill', choices=FILLS, default='blur',
                        help='What removed pixels become. Defaults to %(default)s')
    parser.add_argument('--batch-size', type=positive_int_arg, default=16,
                        help='Perturbed (or masked) images per forward pass. Defaults to '
                        '%(default)s')
    parser.add_argument('--seed', type=nonnegative_int_arg, default=0,
                        help='Seed of the baselines, tie-breaks, noise fill, drise masks and '
                        'randomisation. Defaults to %(default)s')
    parser.add_argument('--randomization', action='store_true',
                        help='Also run the cascading model-randomisation check (head, neck, '
                        'backbone) and report the rank correlation of the maps')
    parser.add_argument('--score-thr', type=fraction_arg, default=0.3,
                        help='Detection score threshold. Defaults to %(default)s')
    parser.add_argument('--topk', type=positive_int_arg, default=None,
                        help='Explain at most this many detections per image. Defaults to all')
    parser.add_argument('--target-layers', nargs='+', default=None, metavar='LAYER',
                        help="Target layers of the CAM methods. Defaults to each detection's "
                        'own level')
    parser.add_argument('--drise-masks', type=positive_int_arg, default=1000,
                        help='Random masks per image for drise. Defaults to %(default)s')
    parser.add_argument('--out', default='results.json',
                        help='JSON file to write (rank 0). Defaults to %(default)s')
    parser.add_argument('--device', default=None,
                        help='cuda:0, cpu, ... Defaults to cuda:LOCAL_RANK when CUDA is '
                        'available, else cpu')
    parser.add_argument('--trust-checkpoint', action='store_true',
                        help='Load a checkpoint that needs more than tensors and the '
                        'allow-listed MMEngine objects (runs code from the file: only for '
                        'files you trust)')
    return parser


# ---------------------------------------------------------------------------------------------
# The dataset
def ground_truth_dataset(cfg, split: str):
    """The split's dataset from the config (annotations loaded, no pipeline run).

    Raises:
        UserError: If the config has no such dataloader or the dataset cannot be built.
    """
    from mmdet.registry import DATASETS
    from mmengine.registry import DefaultScope

    loader = cfg.get(f'{split}_dataloader')
    if not loader or 'dataset' not in loader:
        raise UserError(f'the config has no `{split}_dataloader.dataset`; use --split '
                        f'{"val" if split == "test" else "test"} or add it to the config')
    try:
        with DefaultScope.overwrite_default_scope(cfg.get('default_scope', 'mmdet')):
            dataset = DATASETS.build(loader['dataset'])
            dataset.full_init()
    except (FileNotFoundError, KeyError, ValueError, TypeError, AssertionError) as exc:
        raise UserError(f'the {split} dataset of the config could not be built: '
                        f'{type(exc).__name__}: {exc}') from exc
    if not hasattr(dataset, 'get_data_info'):
        raise UserError(f'the {split} dataset ({type(dataset).__name__}) has no get_data_info')
    return dataset


def sample(dataset, index: int) -> tuple[str, np.ndarray, np.ndarray]:
    """``(image path, gt_bboxes (G, 4), gt_labels (G,))`` of one image, ignored boxes left
    out."""
    info = dataset.get_data_info(index)
    boxes, labels = [], []
    for inst in info.get('instances', []):
        if not inst.get('ignore_flag', 0):
            boxes.append(inst['bbox'])
            labels.append(inst['bbox_label'])
    return (info['img_path'], np.asarray(boxes, np.float64).reshape(-1, 4),
            np.asarray(labels, np.int64))


def run(args: argparse.Namespace) -> int:
    """Run the evaluation on parsed arguments (see the module docstring).

    Returns:
        int: 0.

    Raises:
        UserError: On a user error.
    """
    import torch
    from mmengine.config import Config

    from ..cam.engine import CAMEngine
    from ..evaluation.evaluate import EvalSettings, evaluate_image, markdown_table, summarize
    from ..runtime.model import CheckpointError, init_model

    rank, world, local_rank = distributed_env()
    args.device = resolve_device(args.device, local_rank)
    if world > 1:
        join(args.device)
    config = resolve_config(args.config)
    out = Path(args.out)
    if out.is_dir():
        raise UserError(f'--out {args.out!r} is a folder; give a file name such as '
                        'results.json')
    if not out.parent.is_dir():
        raise UserError(f'--out {args.out!r}: folder {str(out.parent)!r} does not exist')
    if '::' not in config and not os.path.isfile(config):
        raise UserError(f'config {config!r} does not exist')
    try:
        cfg = Config.fromfile(config)
    except (SyntaxError, NameError, KeyError, AttributeError, TypeError, ValueError,
            ImportError, OSError) as exc:
        raise UserError(f'config {config!r} could not be read: {type(exc).__name__}: '
                        f'{exc}') from exc
    dataset = ground_truth_dataset(cfg, args.split)
    try:
        model = init_model(cfg, args.checkpoint, device=args.device,
                           trusted=args.trust_checkpoint)
    except (CheckpointError, OSError, ValueError) as exc:
        raise UserError(str(exc)) from exc
    total = len(dataset) if args.num_images is None else min(args.num_images, len(dataset))
    if total == 0:
        raise UserError(f'the {args.split} dataset has no images')
    try:
        settings = EvalSettings(methods=args.methods, protocols=args.protocol,
                                steps=args.steps, fill=args.fill, batch_size=args.batch_size,
                                seed=args.seed)
        engine = CAMEngine(model, target_layers=args.target_layers, score_thr=args.score_thr,
                           topk=args.topk, drise_masks=args.drise_masks,
                           drise_batch_size=args.batch_size, drise_seed=args.seed,
                           keep_input_cams=False)
    except (ValueError, TypeError) as exc:
        raise UserError(str(exc)) from exc
    randomized = None
    if args.randomization:
        from ..evaluation.sanity import randomized_engines

        randomized = randomized_engines(engine, seed=args.seed)

    from tqdm import tqdm

    mine = list(range(rank, total, world))
    records = []
    for index in tqdm(mine, unit='img', file=sys.stderr, disable=rank != 0,
                      desc=PROG if world == 1 else f'{PROG} (rank 0 of {world})'):
        path, gt_bboxes, gt_labels = sample(dataset, index)
        try:
            record = evaluate_image(engine, path, gt_bboxes, gt_labels, settings, index=index,
                                    randomized=randomized)
        except torch.OutOfMemoryError as exc:
            raise UserError(f'CUDA out of memory on {args.device} at {path}; try a smaller '
                            '--batch-size or --device cpu') from exc
        except (OSError, ValueError) as exc:
            raise UserError(f'{path}: {exc}') from exc
        records.append((index, record))
    records = [r for part in gather(records) for r in part]
    if rank != 0:
        return 0
    records = [r for _, r in sorted(records, key=lambda item: item[0])]
    summary = summarize(records, settings)
    result = dict(
        settings=dict(config=str(args.config), checkpoint=str(args.checkpoint),
                      split=args.split, num_images=total, methods=settings.all_methods,
                      protocols=settings.protocols, steps=settings.steps, fill=settings.fill,
                      batch_size=settings.batch_size, seed=settings.seed,
                      score_thr=args.score_thr, topk=args.topk,
                      target_layers=args.target_layers, drise_masks=args.drise_masks,
                      randomization=bool(args.randomization)),
        methods=summary)
    text = json.dumps(result, indent=2) + '\n'

    def write(tmp: Path) -> None:
        tmp.write_text(text)

    try:
        write_atomically(out, write)
    except OSError as exc:
        raise UserError(f'could not write {out}: {exc.strerror or exc}') from exc
    num = summary[settings.all_methods[0]]['num_detections']
    sys.stdout.write(f'{total} images, {num} detections; protocols '
                     f'{", ".join(settings.protocols)}, {settings.steps} steps, fill '
                     f'{settings.fill}\n\n')
    sys.stdout.write(markdown_table(summary, settings.protocols))
    sys.stderr.write(f'{PROG}: wrote {out}\n')
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``mmdet-cam-eval``.

    Returns:
        int: Exit code: 0 on success, 1 on a user error, 2 on a command-line syntax error,
        130 on Ctrl-C.
    """
    try:
        args = build_parser().parse_args(argv)
        return run(args)
    except UserError as exc:
        sys.stderr.write(f'{PROG}: error: {exc}\n')
        return 1
    except KeyboardInterrupt:
        sys.stderr.write(f'{PROG}: error: interrupted\n')
        return 130
    finally:
        leave()


if __name__ == '__main__':
    sys.exit(main())
