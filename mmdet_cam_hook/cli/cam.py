"""``mmdet-cam``: per-detection CAMs of a detector checkpoint (any head with an adapter:
:func:`~mmdet_cam_hook.adapters.supported_detectors`) for an image, a folder or a glob.

The arguments are the seed tool's (``config checkpoint img``, ``--out-dir``, ``--method``,
``--target-layers``, ``--score-thr``, ``--topk``, ``--device``, ``--renormalize``,
``--save-all``) with its defaults, plus ``--list-layers``, ``--save-raw``, ``--batch-size`` and
``--trust-checkpoint``. ``tools/analysis_tools/demo_yolox_gradcam.py`` calls :func:`main`.

Many images (reading, writing and each rank's share are :mod:`mmdet_cam_hook.cli.folder`'s, the
process group :mod:`mmdet_cam_hook.cli.distributed`'s):
``--batch-size N`` explains N images per forward pass
(:meth:`~mmdet_cam_hook.cam.engine.CAMEngine.explain_batch`; one at a time inside it unless every
target layer takes the ``local`` route). Whatever N, one background thread reads and decodes
the next batch while the current one is explained, and another writes the previous batch's
outputs. Several processes: ``torchrun --nproc_per_node P -m mmdet_cam_hook.cli ...`` gives
each rank (``RANK`` of ``WORLD_SIZE``) its share of the images, whole groups of one file stem
round-robin in sorted order, so no file is written by two ranks. The ranks join a process
group (gloo on the CPU, NCCL on CUDA) and wait for each other once, at the end: each reports
its own share, rank 0 the job's total (and an error if a file was written by two ranks), and
when no image of the whole job had a detection every rank exits with that error. ``--device
cuda`` (or the default with CUDA) means ``cuda:LOCAL_RANK``.

Outputs (names and rules: :mod:`mmdet_cam_hook.cli.outputs`), for each image ``{stem}.*``
with at least one detection: ``{stem}_gradcam.jpg`` (all maps, whatever --method),
``{stem}_det{k}_{method}.jpg`` per detection, with ``--save-all`` the original, the detections
and the panel, with ``--save-raw`` ``{stem}_{method}.npz``; with ``--report`` also
``report.html``, ``manifest.json`` and the thumbnails in ``report_files/`` for the whole job
(:mod:`mmdet_cam_hook.cli.reporting`). Inputs whose outputs would share a
name, an ``--out-dir`` that is the input folder, and an output name that is an input are
refused before the model is loaded.

User errors (bad arguments, missing files, unsafe checkpoint, unknown layer, no detections, no
CUDA, CUDA out of memory) print one line on stderr and exit with 1
(argparse's own errors with 2: :func:`mmdet_cam_hook.cli.common.run_main`). With several
images, one that cannot be read or explained (a 0-byte or corrupt file, a 2000x1 strip) is
skipped with one line, the others are processed, and the exit code is 1. Ctrl-C exits with 130.

Every output is written to a hidden temporary name in the output folder and renamed into place
when complete, so an interrupted run never leaves a truncated file under a final name. Existing
files of the same name are replaced, nothing else in the output folder is touched.

``config`` may be ``mmdet::yolox/yolox_s_8xb8-300e_coco.py`` (a config of mmdet's) or
``mmdet_cam_hook::yolox_s_gradcam.py``: a config shipped with the package
(:mod:`mmdet_cam_hook.configs`).
"""
from __future__ import annotations

import argparse
import logging
import sys
from collections import Counter
from functools import partial
from pathlib import Path
from typing import NamedTuple, Optional, Sequence

from ..adapters import supported_detectors
from ..checks import UserError, positive_int_arg
from .common import (
    add_engine_args,
    add_model_args,
    build_engine,
    load_model,
    resolve_config,
    resolve_device,
    run_main,
)
from .distributed import distributed_env, gather, join
from .explaining import Tally, explain_batch, result_of
from .folder import Overlap, collect_images, rank_share
from .misses import check_misses_args
from .outputs import check_out_dir, save_outputs
from .reporting import CamReport

# Named, not __name__: under `python -m mmdet_cam_hook.cli` (and torchrun's `-m`) this module
# is __main__, outside the package's logger that common.console() shows.
logger = logging.getLogger('mmdet_cam_hook.cli')

PROG = 'mmdet-cam'


class _Parser(argparse.ArgumentParser):
    """``checkpoint`` and ``img`` are required unless ``--list-layers``."""

    def parse_args(self, args=None, namespace=None):
        parsed = super().parse_args(args, namespace)
        if not parsed.list_layers and (parsed.checkpoint is None or parsed.img is None):
            missing = [n for n in ('checkpoint', 'img') if getattr(parsed, n) is None]
            self.error(f'the following arguments are required: {", ".join(missing)}')
        return parsed


def build_parser(methods: Sequence[str]) -> argparse.ArgumentParser:
    """The argument parser (``checkpoint`` and ``img`` are checked as required unless
    ``--list-layers``).

    Args:
        methods (Sequence[str]): The ``--method`` choices (the keys of ``METHODS``).

    Returns:
        argparse.ArgumentParser: The parser.
    """
    parser = _Parser(
        prog=PROG,
        usage=f'{PROG} [options] config checkpoint img\n       {PROG} config [checkpoint] '
        '--list-layers',
        description='Per-detection class-activation maps (Grad-CAM and friends) for an '
        f'MMDetection checkpoint of a supported detector ({", ".join(supported_detectors())}). '
        'Each detection is explained by its own score, with its head\'s '
        'formula (e.g. sigmoid(cls) * sigmoid(obj) for YOLOX); by default on the neck output '
        'of its own FPN level.',
        epilog='Outputs per image: {stem}_gradcam.jpg (all maps, whatever --method), '
        '{stem}_det{k}_{method}.jpg per detection (k = 0, 1, ... by score); --save-all adds '
        '{stem}_original.jpg, {stem}_detection.jpg and {stem}_panel.jpg; --save-raw adds '
        '{stem}_{method}.npz. Grad-CAM averages gradients over the whole map, so it may also '
        'light up other objects of the same class; hirescam and layercam stay on the instance. '
        'Several processes: torchrun --nproc_per_node P -m mmdet_cam_hook.cli ARGS splits the '
        'images between P processes (whole groups of one file stem each, so no file is written '
        'twice; they meet once, at the end, to report the job\'s total); with --device cuda, '
        'each takes cuda:LOCAL_RANK.')
    parser.add_argument('config', help='Path to model config file (or a package path such as '
                        'mmdet::yolox/yolox_s_8xb8-300e_coco.py, or a config shipped with this '
                        'package such as mmdet_cam_hook::yolox_s_gradcam.py)')
    parser.add_argument('checkpoint', nargs='?',
                        help='Path or http(s) URL to checkpoint file (required unless '
                        '--list-layers)')
    parser.add_argument('img', nargs='?',
                        help='Path to input image, a folder of images or a quoted glob such as '
                        '"data/*.jpg" (required unless --list-layers)')
    parser.add_argument('--out-dir', default='outputs/gradcam',
                        help='Output directory for visualizations (created if missing; existing '
                        'files of the same name are overwritten). Defaults to %(default)s')
    parser.add_argument('--method', default='gradcam', choices=list(methods),
                        help='CAM method. Defaults to %(default)s')
    add_engine_args(parser)
    add_model_args(parser, device_help='Device for inference (cuda:0, cpu). Defaults to cuda:0 '
                   'when CUDA is available, else cpu')
    parser.add_argument('--contrast', type=contrast_arg, default=None, metavar='B',
                        help='Explain "class A rather than class B": each map is that of the '
                        "detection's score for its class A minus its own prior's (RoI's, "
                        "query's) score for B: runner_up (the prior's second-best class), a "
                        'class index or a class name. --save-raw stores B as contrast_labels. '
                        'Defaults to the score itself')
    parser.add_argument('--renormalize', action='store_true',
                        help='Renormalize CAM within bounding boxes (and zero it outside)')
    parser.add_argument('--save-all', action='store_true',
                        help='Save all intermediate results (original, detections, panel)')
    parser.add_argument('--save-raw', action='store_true',
                        help='Also save detections and per-detection maps to '
                        '{stem}_{method}.npz')
    parser.add_argument('--drise-masks', type=positive_int_arg, default=1000, metavar='N',
                        help='Random masks per image for --method drise: N masked images '
                        'through the network per image (1000: about 30 s for a 256-px image '
                        'on 2 CPU cores; progress is logged). Defaults to %(default)s')
    parser.add_argument('--batch-size', type=positive_int_arg, default=1, metavar='N',
                        help='Images per forward pass, when every target layer takes the local '
                        'route (the default layers of YOLOX, RTMDet, RetinaNet, ...; see '
                        '--list-layers); else they still go one at a time. Meant for GPUs: on a '
                        'CPU, batches were no faster than 1 (benchmarks/bench_folder.py). '
                        'Reading the next images and writing outputs overlap with the '
                        'computation whatever N. Defaults to %(default)s')
    parser.add_argument('--report', action='store_true',
                        help='Also write report.html (a page to open from disk: thumbnails, '
                        'each detection\'s map, a sortable table) and manifest.json (the '
                        'run\'s records for scripts) into --out-dir, with the thumbnails in '
                        '--out-dir/report_files')
    parser.add_argument('--ann-file', default=None, metavar='COCO.json',
                        help='COCO annotations of the images (matched by file name), for '
                        '--explain-misses')
    parser.add_argument('--explain-misses', action='store_true',
                        help='With --ann-file: for each ground-truth box no detection matched '
                        '(same class, IoU >= 0.5), the map of its best candidate before the '
                        'threshold and NMS, next to the detection maps: '
                        '{stem}_miss{g}_{method}.jpg (g: the box\'s index in the image\'s '
                        'annotations; the ground truth in orange, the candidate in magenta, '
                        'the reason in its label), and the false positives in red in '
                        '{stem}_misses.jpg')
    parser.add_argument('--list-layers', action='store_true',
                        help='Print the layer names with output shape, stride and the gradient '
                        "route the engine takes for each, at the config's test input size, "
                        'then exit')
    parser.add_argument('--texts', default=None, metavar='PROMPT',
                        help='The prompt of a text-prompted detector (Grounding DINO), phrases '
                        'separated by " . ", e.g. "red car . person"; each detection is labelled '
                        'with its phrase. Defaults to the classes in the checkpoint\'s meta')
    return parser


def contrast_arg(text: str):
    """``--contrast``: ``runner_up``, a class index (digits) or a class name."""
    return int(text) if text.isdigit() else text


def _resolve_contrast(engine, contrast, class_names):
    """``--contrast`` checked against the model's classes, before any image is explained.

    Raises:
        UserError: On a class the model does not have (naming the valid choices).
    """
    from ..cam.targets import num_classes, resolve_contrast

    try:
        return resolve_contrast(contrast, class_names, num_classes(engine.adapter),
                                arg='--contrast')
    except (ValueError, TypeError) as exc:
        raise UserError(str(exc)) from exc


# ---------------------------------------------------------------------------------------------
# --list-layers
def layer_table(model) -> str:
    """The text of ``--list-layers``: one line per module that runs in the engine's forward
    pass (backbone, neck, head) at the config's test input size, with the facts the engine
    decided when it was built (:meth:`~mmdet_cam_hook.cam.engine.CAMEngine.describe_layers`):
    name, type, output shape, stride (input height / output height), the route it takes as a
    target layer (``local`` window, ``chain`` of vector-Jacobian products, ``exact`` backward
    per detection), and for a module that cannot be one, ``-`` and why. Header lines: the
    input, and the level-aware default layers; for a head no adapter supports, the reason
    (naming the supported heads) and no rows.
    """
    from ..cam.engine import CAMEngine

    try:
        engine = CAMEngine(model, score_thr=0.0)
    except ValueError as exc:  # no adapter for the head, or no level maps to trace
        return f'# no routes: {exc}\n'
    rows = {info.name: (info.type, info.output, info.stride, info.route,
                        '' if info.usable else f'(not usable: {info.reason})')
            for info in engine.describe_layers()}
    header = ('layer', 'type', 'output shape', 'stride', 'route')
    widths = [max(len(header[i]), *(len(r[i - 1]) for r in rows.values())) for i in (1, 2, 3, 4)]
    widths.insert(0, max(len(header[0]), *(len(n) for n in rows)))
    widths[2] = min(widths[2], 24)  # a head's tuple of outputs overflows its column
    lines = [f'# input {"x".join(map(str, engine.probe_shape))} at the test pipeline size; '
             'layers in the order their outputs are computed']
    default = ', '.join(f'{layer.name} (level {level}, {layer.route})'
                        for level, layer in enumerate(engine.layers))
    how = ('every detection on all of them, maps averaged: each reads every level'
           if engine.adapter.levels_shared else 'each detection on its own level')
    lines.append(f'# default layers ({how}): {default}')
    lines.append('# route: how --target-layers LAYER gets its per-detection gradients: local '
                 '(window, fastest), chain (pulled back from the level maps), exact (one '
                 'backward per detection); - : not usable as a target layer (why, at the end)')
    fmt = ''.join(f'{{:<{w}}}  ' for w in widths) + '{}'
    lines.append(fmt.format(*header, '').rstrip())
    lines += [fmt.format(name, *row).rstrip() for name, row in rows.items()]
    return '\n'.join(lines) + '\n'



# ---------------------------------------------------------------------------------------------
# Running (each image: :mod:`.explaining`)
class _Job(NamedTuple):
    """This process's part of the run."""

    rank: int
    world: int
    every: list  # the job's images (every rank's), sorted
    images: list  # this rank's
    where: str  # 'rank R/W: ' under torchrun, else ''


def _prepare(args: argparse.Namespace) -> tuple[str, _Job]:
    """What is checked before the model is loaded: torchrun's environment, the device, the
    config, the images and the output folder; then this rank's share and the process group.

    Returns:
        tuple[str, _Job]: The config file, and this process's part of the run.

    Raises:
        UserError: On a bad argument (see the module docstring).
    """
    rank, world, local_rank = distributed_env()
    args.device = resolve_device(args.device, local_rank)
    config = resolve_config(args.config)
    every = [] if args.list_layers else collect_images(args.img, args.method)
    images, where = every, f'rank {rank}/{world}: ' if world > 1 else ''
    if not args.list_layers:
        check_out_dir(every, args.img, Path(args.out_dir), args.method, args.save_all,
                      args.save_raw)
        if world > 1:
            images = rank_share(every, rank, world)
            logger.info('%s%d of %d images', where, len(images), len(every))
            join(args.device)
    return config, _Job(rank, world, every, images, where)


def _explain_all(engine, job: _Job, args: argparse.Namespace, class_names,
                 tally: Tally, report: Optional[CamReport] = None) -> list[Path]:
    """Explain this rank's images batch by batch, reading ahead and writing behind.

    Returns:
        list[Path]: The files written.

    Raises:
        UserError: When an image's problem is the run's (see :class:`Tally`), on CUDA out of
            memory, or when an output cannot be written.
    """
    from tqdm import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    out_dir, size, images = Path(args.out_dir), args.batch_size, job.images
    batches = [images[i:i + size] for i in range(0, len(images), size)]
    with logging_redirect_tqdm(loggers=[logging.getLogger('mmdet_cam_hook')]), \
            Overlap(batches) as overlap, \
            tqdm(total=len(images), unit='img', file=sys.stderr, disable=len(job.every) < 2,
                 dynamic_ncols=True, desc=job.where.rstrip(': ') or None) as progress:
        for loaded in overlap.read():
            batch = explain_batch(engine, loaded, args)
            for item in loaded:
                result = result_of(engine, item, batch, args, tally)
                if result is not None:
                    overlap.write(partial(save_outputs, result, item.path.stem, out_dir,
                                          class_names, args.save_all, args.save_raw, item.path,
                                          args.renormalize))
                if report is not None:
                    overlap.write(report.add(item, result, tally))
                progress.update()
        return overlap.finish()


def _report(job: _Job, args: argparse.Namespace, tally: Tally, written: list[Path]) -> int:
    """Log this rank's (and on rank 0 the job's) totals; under torchrun the one time the ranks
    wait for each other.

    Returns:
        int: 0, or 1 if an image could not be read or explained or a file was written twice.

    Raises:
        UserError: If no image of the whole job had a detection.
    """
    done, where, out_dir = len(tally.done), job.where, args.out_dir
    parts = gather((done, len(tally.empty), [str(p) for p in written]))
    job_done, job_empty = sum(part[0] for part in parts), sum(part[1] for part in parts)
    if job_done == 0 and job_empty:
        what = repr(str(job.every[0])) if len(job.every) == 1 else \
            f'any of the {job_empty} images'
        hint = (f'; try a lower --score-thr, e.g. --score-thr {min(0.1, args.score_thr / 3):.2g}'
                if args.score_thr > 0 else '')
        raise UserError(f'no detections with score >= {args.score_thr:g} in {what}{hint}')
    logger.info('%s%s: %d file(s) for %d image(s) in %s', where, args.method, len(written), done,
                out_dir)
    twice = []
    if job.world > 1 and job.rank == 0:
        files = Counter(path for part in parts for path in part[2])
        logger.info('all %d ranks: %s: %d file(s) for %d image(s) in %s', job.world,
                    args.method, len(files), job_done, out_dir)
        twice = sorted(path for path, n in files.items() if n > 1)
        if twice:  # collect_images and rank_share exist so that this never happens
            logger.error('%d file(s) written by more than one rank, e.g. %s', len(twice),
                         twice[0])
    for what, paths in (('read', tally.unreadable), ('explained', tally.failed)):
        if paths:
            logger.error('%s%d of %d images could not be %s', where, len(paths),
                         len(job.images), what)
    return 1 if tally.unreadable or tally.failed or twice else 0


def run(args: argparse.Namespace) -> int:
    """Run the tool on parsed arguments.

    Returns:
        int: Exit code: 0 when at least one image had a detection and every image could be
        read and explained, else 1.

    Raises:
        UserError: On a user error (see the module docstring).
    """
    config, job = _prepare(args)
    model = load_model(args, config)
    if args.list_layers:
        if job.rank == 0:  # one table for the job, not one per rank
            sys.stdout.write(layer_table(model))
        return 0
    engine = build_engine(model, args, drise_masks=args.drise_masks)
    class_names = engine.phrases or (getattr(model, 'dataset_meta', None) or {}).get('classes')
    check_misses_args(args, engine, class_names)
    args.contrast = _resolve_contrast(engine, args.contrast, class_names)
    tally = Tally(single=len(job.every) == 1)
    report = CamReport(args, engine, class_names, job.every) if args.report else None
    written = _explain_all(engine, job, args, class_names, tally, report)
    code = _report(job, args, tally, written)
    if report is not None:
        report.finish()
    return code


def _parser() -> argparse.ArgumentParser:
    from ..cam.methods import METHODS

    return build_parser(list(METHODS))


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``mmdet-cam`` and ``tools/analysis_tools/demo_yolox_gradcam.py``.

    Args:
        argv (Sequence[str], optional): Arguments without the program name. Defaults to None
            (``sys.argv[1:]``).

    Returns:
        int: Exit code: 0 on success, 1 on a user error, 130 on Ctrl-C
        (:func:`~mmdet_cam_hook.cli.common.run_main`).

    Raises:
        SystemExit: On a command-line syntax error (code 2) and after ``--help`` (code 0).
    """
    return run_main(PROG, _parser, run, argv)


if __name__ == '__main__':
    sys.exit(main())
