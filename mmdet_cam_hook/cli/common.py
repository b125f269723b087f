"""The skeleton ``mmdet-cam`` and ``mmdet-cam-eval`` share: console logging, exit codes, the
device and config arguments, loading the model and building the engine, each with the same
errors (:class:`~mmdet_cam_hook.checks.UserError`, exit code 1).

Exit codes of both tools (:func:`run_main`): 0 on success, 1 on a user error (one line on
stderr, no traceback), 2 on a command-line syntax error (argparse's own), 130 on Ctrl-C.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from contextlib import contextmanager
from typing import Callable, Iterator, Optional, Sequence, Union

from ..checks import UserError, fraction_arg, positive_int_arg
from .distributed import leave

__all__ = ['UserError', 'console', 'run_main', 'resolve_config', 'resolve_device',
           'load_config', 'add_model_args', 'load_model', 'add_engine_args', 'build_engine']

# Named, not __name__: under `python -m mmdet_cam_hook.cli[.eval]` (and torchrun's `-m`) the
# tool's module is __main__, outside the package's logger that console() shows.
logger = logging.getLogger('mmdet_cam_hook.cli')

# ---------------------------------------------------------------------------------------------
# Console and exit codes
class _Formatter(logging.Formatter):
    """``{prog}: message``, and ``{prog}: warning: message`` from WARNING up."""

    def __init__(self, prog: str):
        super().__init__()
        self.prog = prog

    def format(self, record: logging.LogRecord) -> str:
        level = record.levelname.lower()
        return f'{self.prog}: {level}: {record.getMessage()}' \
            if record.levelno >= logging.WARNING else f'{self.prog}: {record.getMessage()}'


@contextmanager
def console(prog: str) -> Iterator[None]:
    """Log this package's records (and Python warnings) to stderr, one line each prefixed with
    ``prog``, for the duration of the call; restored afterwards.

    Args:
        prog (str): The program name, e.g. ``mmdet-cam``.
    """
    pkg = logging.getLogger('mmdet_cam_hook')
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter(prog))
    old_level, old_propagate = pkg.level, pkg.propagate
    pkg.addHandler(handler)
    pkg.setLevel(logging.INFO)
    pkg.propagate = False

    def show(message, category, filename, lineno, file=None, line=None):
        logger.warning('%s', message)

    try:
        with warnings.catch_warnings():
            warnings.showwarning = show
            # Deprecation notices from torch / mmcv / mmdet internals are not for the user.
            for category in (DeprecationWarning, PendingDeprecationWarning, FutureWarning):
                warnings.filterwarnings('ignore', category=category)
            warnings.filterwarnings('ignore', message='torch.meshgrid')
            yield
    finally:
        pkg.removeHandler(handler)
        pkg.setLevel(old_level)
        pkg.propagate = old_propagate


def run_main(prog: str,
             parser: Union[argparse.ArgumentParser, Callable[[], argparse.ArgumentParser]],
             run: Callable[[argparse.Namespace], int],
             argv: Optional[Sequence[str]] = None) -> int:
    """Parse ``argv`` and ``run`` the tool under :func:`console`, mapping the outcome to the
    exit code; the torchrun process group (if joined) is left in every case.

    Args:
        prog (str): The program name for the log lines.
        parser (ArgumentParser | Callable[[], ArgumentParser]): The parser, or a function that
            builds it (called inside the console, so that its warnings are shown as the
            tool's).
        run (Callable[[Namespace], int]): The tool on parsed arguments; returns its exit code.
        argv (Sequence[str], optional): Arguments without the program name. Defaults to None
            (``sys.argv[1:]``).

    Returns:
        int: ``run``'s code; 1 on a :class:`UserError` (logged as one line); 130 on Ctrl-C.

    Raises:
        SystemExit: From argparse: code 2 on a command-line syntax error, 0 after ``--help``.
    """
    with console(prog):
        try:
            if not isinstance(parser, argparse.ArgumentParser):
                parser = parser()
            return run(parser.parse_args(argv))
        except UserError as exc:
            logger.error('%s', exc)
            return 1
        except KeyboardInterrupt:
            logger.error('interrupted')
            return 130
        finally:
            leave()


# ---------------------------------------------------------------------------------------------
# Arguments
def resolve_device(device: Optional[str], local_rank: Optional[int] = None) -> str:
    """The checked ``device``; for None, ``cuda`` if CUDA is available, else ``cpu``. ``cuda``
    without an index is ``cuda:0``, or ``cuda:{local_rank}`` under torchrun.

    Raises:
        UserError: If ``device`` is not ``cpu``/``cuda[:N]`` or names a missing CUDA device.
    """
    import torch

    if device is None:
        if not torch.cuda.is_available():
            return 'cpu'
        device = 'cuda'
    try:
        dev = torch.device(device)
    except RuntimeError:
        dev = None
    if dev is None or dev.type not in ('cpu', 'cuda'):
        raise UserError(f"--device must be 'cpu' or 'cuda[:N]', got {device!r}")
    if dev.type == 'cpu':
        return 'cpu'
    if not torch.cuda.is_available():
        raise UserError(f'--device {device!r}: CUDA is not available on this machine (torch '
                        f'{torch.__version__}, CUDA build {torch.version.cuda}); use --device cpu')
    index = dev.index if dev.index is not None else local_rank or 0
    if index >= torch.cuda.device_count():
        how = f' (LOCAL_RANK={local_rank})' if dev.index is None and local_rank else ''
        raise UserError(f'--device {device!r}{how}: this machine has {torch.cuda.device_count()} '
                        f'CUDA device(s), cuda:0 to cuda:{torch.cuda.device_count() - 1}')
    return f'cuda:{index}'


def _package_config(config: str) -> str:
    """The file of a package path ``scope::relative``, e.g. ``mmdet::yolox/x.py``: MMEngine's
    rule for a ``_base_`` (``<package>/.mim/configs/<relative>``), which ``Config.fromfile``
    does not apply to the file it is given.

    Raises:
        UserError: If ``scope`` is not one of MMEngine's packages, is not installed, or has no
            such config.
    """
    from mmengine.config.utils import MODULE2PACKAGE
    from mmengine.utils import get_installed_path

    scope, _, relative = config.partition('::')
    if scope not in MODULE2PACKAGE:
        raise UserError(f'config {config!r}: {scope!r} is not a package MMEngine reads configs '
                        f"from; use a file path, mmdet::..., or mmdet_cam_hook::... (MMEngine's "
                        f'packages: {", ".join(sorted(MODULE2PACKAGE))})')
    try:
        root = os.path.join(get_installed_path(MODULE2PACKAGE[scope]), '.mim', 'configs')
    except Exception as exc:  # pkg_resources.DistributionNotFound, RuntimeError
        raise UserError(f'config {config!r}: package {MODULE2PACKAGE[scope]!r} is not '
                        'installed') from exc
    path = os.path.join(root, relative)
    if not os.path.isfile(path):
        folder = os.path.join(root, os.path.dirname(relative))
        there = sorted(n for n in os.listdir(folder) if n.endswith('.py')) \
            if relative and os.path.isdir(folder) else []
        hint = (f'; {os.path.dirname(relative)}/ has {", ".join(there)}' if there else
                f'; the configs are under {root}')
        raise UserError(f'config {config!r}: {scope} has no config {relative!r}{hint}')
    return path


def resolve_config(config: str) -> str:
    """The config file to load: ``mmdet_cam_hook::NAME`` becomes the shipped config's path,
    ``mmdet::PATH`` (any of MMEngine's ``package::``) the package's ``.mim/configs/PATH``.

    Raises:
        UserError: If ``config`` is a folder, or names no shipped or package config.
    """
    from ..configs import SCOPE
    from ..configs import resolve_config as resolve

    if '::' in config and not config.startswith(SCOPE):
        config = _package_config(config)
    try:
        config = str(resolve(config))
    except ValueError as exc:
        raise UserError(str(exc)) from exc
    if os.path.isdir(config):
        raise UserError(f'config {config!r} is a directory, not a config file')
    return config


# ---------------------------------------------------------------------------------------------
# Model and engine
def load_config(config: str):
    """The ``mmengine.Config`` of a config file (from :func:`resolve_config`):
    :func:`~mmdet_cam_hook.runtime.model.load_config` with its errors as user errors.

    Raises:
        UserError: If the file does not exist or cannot be read (naming the error).
    """
    from ..runtime.model import load_config as load

    try:
        return load(config)
    except (OSError, ValueError) as exc:
        raise UserError(str(exc)) from exc


def add_model_args(parser: argparse.ArgumentParser, device_help: str) -> None:
    """The arguments :func:`load_model` reads beside the checkpoint: ``--device`` (its help,
    ``device_help``, says the tool's default) and ``--trust-checkpoint``."""
    parser.add_argument('--device', default=None, help=device_help)
    parser.add_argument('--trust-checkpoint', action='store_true',
                        help='Load a checkpoint that needs more than tensors and the allow-listed '
                        'MMEngine objects (weights_only=False). Unpickling it can run arbitrary '
                        'code: only for files from a source you trust')


def load_model(args: argparse.Namespace, config):
    """The detector of ``config`` (a file or a loaded ``mmengine.Config``) with the weights of
    ``args.checkpoint``, on ``args.device`` (``args.trust_checkpoint`` as given).

    Raises:
        UserError: If the config or checkpoint is missing, unreadable, unsafe or does not fit.
    """
    from ..runtime.checkpoint import CheckpointError
    from ..runtime.model import init_model

    try:
        return init_model(config, args.checkpoint, device=args.device,
                          trusted=args.trust_checkpoint)
    except (CheckpointError, OSError, ValueError) as exc:  # OSError: missing file, a folder
        raise UserError(str(exc)) from exc


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    """The arguments :func:`build_engine` reads: ``--target-layers``, ``--score-thr`` and
    ``--topk``."""
    parser.add_argument('--target-layers', nargs='+', default=None, metavar='LAYER',
                        help='Target layer names (space-separated), as named_modules() paths '
                        'such as neck.out_convs.2 or neck.out_convs[-1]; maps of several layers '
                        'are averaged. Defaults to each detection\'s own neck output (YOLOX: '
                        'neck.out_convs.0/1/2 for stride 8/16/32; FPN models: neck.fpn_convs.l). '
                        'mmdet-cam --list-layers lists them')
    parser.add_argument('--score-thr', type=fraction_arg, default=0.3,
                        help='Detection score threshold. Defaults to %(default)s')
    parser.add_argument('--topk', type=positive_int_arg, default=None,
                        help='Explain at most this many detections per image. Defaults to all')


def build_engine(model, args: argparse.Namespace, **options):
    """The :class:`~mmdet_cam_hook.cam.engine.CAMEngine` of the tools: ``args.target_layers``,
    ``args.score_thr``, ``args.topk`` and ``args.texts`` (where the tool has it), no
    input-resolution maps kept, and ``options``.

    Raises:
        UserError: If the engine refuses the model or the arguments (e.g. an unknown layer).
    """
    from ..cam.engine import CAMEngine

    if getattr(args, 'texts', None) is not None:
        options = dict(options, texts=args.texts)
    try:
        return CAMEngine(model, target_layers=args.target_layers, score_thr=args.score_thr,
                         topk=args.topk, keep_input_cams=False, **options)
    except (ValueError, TypeError) as exc:
        raise UserError(str(exc)) from exc
