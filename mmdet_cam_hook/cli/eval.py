"""``mmdet-cam-eval``: are the maps faithful? Every method on the images of a config's dataset.

For each image of the config's ``val`` (or ``test``) split, the detections of the checkpoint
(``--score-thr``, ``--topk``) are explained by every method of ``--methods`` and by the
baselines ``random`` and ``box``, and each map is scored (:mod:`mmdet_cam_hook.evaluation`):
pointing game, energy-based pointing game and off-target share against the dataset's ground
truth, the share of blank maps, deletion and insertion AUC under the ``prior`` and/or
``matched`` protocol, and with ``--randomization`` the model-randomisation check
(:mod:`..evaluation.sanity`). For a model with masks, beside these box numbers, the mask
numbers: each map's energy and pointing game in the instance's own predicted mask
(``energy_in_mask``, ``pointing_game_in_mask``) and, for gradient methods, its mask map's
(``mask_energy_in_mask``, ``mask_pointing_game_in_mask``). A markdown table goes to stdout,
the numbers (and the settings) to ``--out`` as JSON; with ``--report [DIR]`` also
``report.html`` and ``manifest.json``
(the curves as plots, every method's map of each detection:
:mod:`mmdet_cam_hook.cli.reporting`).

Scale out with torchrun, which takes a module (not the ``mmdet-cam-eval`` script):
``torchrun --standalone --nproc_per_node N -m mmdet_cam_hook.cli.eval ...`` splits the images
across the processes (gloo on CPU, NCCL on CUDA: :mod:`mmdet_cam_hook.cli.distributed`); rank 0
gathers the per-detection numbers and writes. Every number in the JSON equals a one-process
run's except the timings (``seconds_per_image``).

An image that cannot be read (missing, 0-byte, corrupt) is skipped with one line on stderr and
counted in the JSON (``unreadable_images``, ``unreadable_paths``); the table and the JSON are
still written, and the exit code is 1. Errors are reported as ``mmdet-cam``'s are
(:func:`~mmdet_cam_hook.cli.common.run_main`): one line on stderr, exit code 1 (argparse's own
errors: 2), Ctrl-C 130.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import NamedTuple, Optional, Sequence

from ..checks import UserError, nonnegative_int_arg, positive_int_arg
from ..runtime.data import ground_truth
from ..runtime.io import write_atomically
from .common import (
    add_engine_args,
    add_model_args,
    build_engine,
    load_config,
    load_model,
    resolve_config,
    resolve_device,
    run_main,
)
from .distributed import distributed_env, gather, join
from .reporting import EvalReport, check_report_dir

PROG = 'mmdet-cam-eval'

# Named, not __name__: under `torchrun -m mmdet_cam_hook.cli.eval` this module is __main__.
logger = logging.getLogger('mmdet_cam_hook.cli.eval')


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
        'check, for each method and the baselines random and box; for a model with masks also '
        "energy and pointing game in each instance's mask, of its map and its mask map.",
        epilog='Cost per detection and protocol: 2 x (steps + 1) images through the network per '
        'method; drise adds --drise-masks images per image. Scale out with torchrun '
        '--standalone --nproc_per_node N -m mmdet_cam_hook.cli.eval ARGS.')
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
                        help='Also run the cascading model-randomisation check (the model\'s '
                        'stages from the head back, as its adapter names them: head, neck, '
                        'backbone for dense heads; roi_head, rpn_head, ... for two-stage ones) '
                        'and report the rank correlation of the maps')
    add_engine_args(parser)
    parser.add_argument('--drise-masks', type=positive_int_arg, default=1000,
                        help='Random masks per image for drise. Defaults to %(default)s')
    parser.add_argument('--explain-misses', action='store_true',
                        help='Also explain each ground-truth box no detection matched (same '
                        'class, IoU >= 0.5) by its best candidate before the threshold and NMS: '
                        'the JSON gets a list "misses" of records (gt_index, gt_box, gt_label, '
                        'reason, candidate_box, candidate_label, candidate_score, '
                        'suppressed_by, image) and "miss_summary" (misses, false_positives, '
                        'miss_candidate_score, miss_share_<reason>, counts per reason). One '
                        'more forward pass per image')
    parser.add_argument('--out', default='results.json',
                        help='JSON file to write (rank 0). Defaults to %(default)s')
    parser.add_argument('--report', nargs='?', const='', default=None, metavar='DIR',
                        help='Also write report.html (to open from disk: the curves as plots, '
                        'the summary, every detection\'s map for each method, a sortable '
                        'table) and manifest.json into DIR, with their images in '
                        'DIR/report_files. Defaults to the folder of --out')
    add_model_args(parser, device_help='cuda:0, cpu, ... Defaults to cuda:LOCAL_RANK when '
                   'CUDA is available, else cpu')
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


class _Setup(NamedTuple):
    """What the evaluation loop needs, built and checked before it starts."""

    dataset: object
    engine: object
    settings: object
    randomized: Optional[list]
    total: int  # images evaluated


def _check_out(out: str) -> Path:
    """``--out`` as a path, checked before anything is loaded.

    Raises:
        UserError: If it is a folder, or its folder does not exist.
    """
    path = Path(out)
    if path.is_dir():
        raise UserError(f'--out {out!r} is a folder; give a file name such as results.json')
    if not path.parent.is_dir():
        raise UserError(f'--out {out!r}: folder {str(path.parent)!r} does not exist')
    return path


def _setup(args: argparse.Namespace) -> _Setup:
    """The dataset, the model, the settings and the engines (and the randomised ones).

    Raises:
        UserError: On a bad config, checkpoint, dataset or setting.
    """
    from ..evaluation.evaluate import EvalSettings

    cfg = load_config(resolve_config(args.config))
    dataset = ground_truth_dataset(cfg, args.split)
    model = load_model(args, cfg)
    total = len(dataset) if args.num_images is None else min(args.num_images, len(dataset))
    if total == 0:
        raise UserError(f'the {args.split} dataset has no images')
    try:
        settings = EvalSettings(methods=args.methods, protocols=args.protocol,
                                steps=args.steps, fill=args.fill, batch_size=args.batch_size,
                                seed=args.seed)
    except (ValueError, TypeError) as exc:
        raise UserError(str(exc)) from exc
    engine = build_engine(model, args, drise_masks=args.drise_masks,
                          drise_batch_size=args.batch_size, drise_seed=args.seed)
    if getattr(args, 'explain_misses', False):
        from ..adapters.candidates import check_candidates

        try:
            check_candidates(engine.adapter)
        except ValueError as exc:
            raise UserError(str(exc)) from exc
    randomized = None
    if args.randomization:
        from ..evaluation.sanity import randomized_engines

        randomized = randomized_engines(engine, seed=args.seed)
    return _Setup(dataset, engine, settings, randomized, total)


def _evaluate(setup: _Setup, args: argparse.Namespace, rank: int,
              world: int, report: Optional[EvalReport] = None) -> tuple[list, list[str]]:
    """This rank's images (every ``world``-th from ``rank``), each evaluated; an image that
    cannot be read is skipped with one log line.

    Returns:
        tuple[list, list[str]]: ``(index, record)`` of each image evaluated, and the paths of
        those that could not be read.

    Raises:
        UserError: On CUDA out of memory, or when the engine refuses an image.
    """
    import torch
    from tqdm import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    from ..evaluation.evaluate import evaluate_image
    from ..runtime.io import load_image

    records, unreadable = [], []
    with logging_redirect_tqdm(loggers=[logging.getLogger('mmdet_cam_hook')]):
        for index in tqdm(range(rank, setup.total, world), unit='img', file=sys.stderr,
                          disable=rank != 0,
                          desc=PROG if world == 1 else f'{PROG} (rank 0 of {world})'):
            path, gt_bboxes, gt_labels = ground_truth(setup.dataset, index)
            try:
                image = load_image(path)
            except (OSError, ValueError) as exc:  # missing, 0-byte, corrupt
                logger.error('skipping %s: %s', path, exc)
                unreadable.append(str(path))
                if report is not None:
                    report.add(index, path, None, None, None)
                continue
            keep = None if report is None else {}
            try:
                record = evaluate_image(setup.engine, image, gt_bboxes, gt_labels,
                                        setup.settings, index=index,
                                        randomized=setup.randomized, keep=keep)
            except torch.OutOfMemoryError as exc:
                raise UserError(f'CUDA out of memory on {args.device} at {path}; try a smaller '
                                '--batch-size or --device cpu') from exc
            except (OSError, ValueError) as exc:
                raise UserError(f'{path}: {exc}') from exc
            if getattr(args, 'explain_misses', False):
                record = dict(record, **{_MISSES: _miss_rows(setup.engine, image, path,
                                                             gt_bboxes, gt_labels)})
            records.append((index, record))
            if report is not None:
                report.add(index, path, image, keep, record)
    return records, unreadable


#: The key of an image's misses in its record while the ranks gather them (never a method).
_MISSES = '(misses)'


def _miss_rows(engine, image, path, gt_bboxes, gt_labels) -> dict:
    """One image's miss records (without maps, each with its ``image``) and false-positive
    flags, for the JSON (:meth:`~mmdet_cam_hook.cam.engine.CAMEngine.misses`)."""
    report = engine.misses(image, gt_bboxes, gt_labels)
    return dict(misses=report.misses, false_positive=report.false_positive, image=str(path))


def _misses_json(records: list) -> dict:
    """``misses`` (the records, each with its ``image``) and ``miss_summary``
    (:class:`~mmdet_cam_hook.evaluation.misses.MissCounts`), from the records' miss rows
    (which are removed from them)."""
    from ..evaluation.misses import MissCounts

    counts, rows = MissCounts(), []
    for record in records:
        part = record.pop(_MISSES)
        counts.update(part['misses'], part['false_positive'])
        rows += [dict(m.to_dict(), image=part['image']) for m in part['misses']]
    summary = {name: (None if value != value else value)  # NaN is not JSON
               for name, value in counts.summary().items()}
    return dict(misses=rows, miss_summary=dict(summary, counts=counts.counts(),
                                               images=counts.images))


def _write_results(args: argparse.Namespace, out: Path, setup: _Setup, records: list,
                   unreadable: list[str]) -> None:
    """The JSON to ``out``, the table to stdout.

    Raises:
        UserError: If ``out`` cannot be written.
    """
    from ..evaluation.evaluate import markdown_table, summarize

    settings = setup.settings
    misses = _misses_json(records) if getattr(args, 'explain_misses', False) else {}
    summary = summarize(records, settings)
    result = dict(
        settings=dict(config=str(args.config), checkpoint=str(args.checkpoint),
                      split=args.split, num_images=setup.total, methods=settings.all_methods,
                      protocols=settings.protocols, steps=settings.steps, fill=settings.fill,
                      batch_size=settings.batch_size, seed=settings.seed,
                      score_thr=args.score_thr, topk=args.topk,
                      target_layers=args.target_layers, drise_masks=args.drise_masks,
                      randomization=bool(args.randomization)),
        unreadable_images=len(unreadable), unreadable_paths=unreadable,
        methods=summary, **misses)
    text = json.dumps(result, indent=2) + '\n'

    def write(tmp: Path) -> None:
        tmp.write_text(text)

    try:
        write_atomically(out, write)
    except OSError as exc:
        raise UserError(f'could not write {out}: {exc.strerror or exc}') from exc
    num = summary[settings.all_methods[0]]['num_detections']
    skipped = f' ({len(unreadable)} unreadable, skipped)' if unreadable else ''
    sys.stdout.write(f'{setup.total} images{skipped}, {num} detections; protocols '
                     f'{", ".join(settings.protocols)}, {settings.steps} steps, fill '
                     f'{settings.fill}\n\n')
    sys.stdout.write(markdown_table(summary, settings.protocols))
    logger.info('wrote %s', out)


def run(args: argparse.Namespace) -> int:
    """Run the evaluation on parsed arguments (see the module docstring).

    Returns:
        int: 0; 1 (on rank 0) if an image could not be read (it is skipped, and counted in
        the JSON as ``unreadable_images``).

    Raises:
        UserError: On a user error, or when no image could be read.
    """
    rank, world, local_rank = distributed_env()
    args.device = resolve_device(args.device, local_rank)
    if world > 1:
        join(args.device)
    out = _check_out(args.out)
    check_report_dir(args.report)
    setup = _setup(args)
    report = None if args.report is None else EvalReport(
        args, setup.engine, setup.settings, setup.dataset.metainfo.get('classes'))
    records, unreadable = _evaluate(setup, args, rank, world, report)
    parts = gather((records, unreadable))
    records = [r for _, r in sorted((r for part in parts for r in part[0]),
                                    key=lambda item: item[0])]
    if report is not None:  # every rank: the report gathers the image records too
        report.finish(records)
    if rank != 0:  # a rank that exits with an error makes torchrun stop rank 0's writing
        return 0
    unreadable = sorted(path for part in parts for path in part[1])
    if not records:
        raise UserError(f'none of the {setup.total} images could be read')
    _write_results(args, out, setup, records, unreadable)
    if unreadable:
        logger.error('%d of %d images could not be read', len(unreadable), setup.total)
    return 1 if unreadable else 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``mmdet-cam-eval``.

    Args:
        argv (Sequence[str], optional): Arguments without the program name. Defaults to None
            (``sys.argv[1:]``).

    Returns:
        int: Exit code: 0 on success, 1 on a user error (or an unreadable image), 130 on
        Ctrl-C (:func:`~mmdet_cam_hook.cli.common.run_main`).

    Raises:
        SystemExit: On a command-line syntax error (code 2) and after ``--help`` (code 0).
    """
    return run_main(PROG, build_parser, run, argv)


if __name__ == '__main__':
    sys.exit(main())
