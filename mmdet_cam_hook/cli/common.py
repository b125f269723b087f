"""What ``mmdet-cam`` and ``mmdet-cam-eval`` share: the device and config arguments, resolved
with the same errors (:class:`~mmdet_cam_hook.checks.UserError`, exit code 1)."""
from __future__ import annotations

import os
from typing import Optional

from ..checks import UserError

__all__ = ['UserError', 'resolve_config', 'resolve_device']


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


def resolve_config(config: str) -> str:
    """The config file to load: ``mmdet_cam_hook::NAME`` becomes the shipped config's path.

    Raises:
        UserError: If ``config`` is a folder, or names no shipped config.
    """
    from ..configs import resolve_config as resolve

    try:
        config = str(resolve(config))
    except ValueError as exc:
        raise UserError(str(exc)) from exc
    if os.path.isdir(config):
        raise UserError(f'config {config!r} is a directory, not a config file')
    return config
