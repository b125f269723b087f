"""torchrun for the command-line tools: this process's place in the job (from torchrun's
environment, checked), the process group (gloo on the CPU, NCCL on CUDA) and one gather of
small results at the end.

The ranks wait for each other only in :func:`gather`, so the group's timeout is long: one rank
may have hours more work than another. A rank that fails makes torchrun stop the others.
"""
from __future__ import annotations

import os
from datetime import timedelta
from typing import Any, Optional

from ..checks import UserError

__all__ = ['distributed_env', 'join', 'gather', 'leave']

#: How long a rank waits for the others in :func:`gather`.
TIMEOUT = timedelta(days=1)


def _env_int(environ, name: str, low: int, high: Optional[int] = None,
             default: Optional[int] = None) -> int:
    """The integer in environment variable ``name``, in ``[low, high]``."""
    text = environ.get(name, '').strip()
    if not text and default is not None:
        return default
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or value < low or (high is not None and value > high):
        accepted = f'an integer >= {low}' if high is None else f'an integer from {low} to {high}'
        got = f'got {text!r}' if text else 'it is not set'
        raise UserError(f'environment variable {name} must be {accepted} (torchrun sets RANK, '
                        f'WORLD_SIZE and LOCAL_RANK), {got}')
    return value


def distributed_env(environ=None) -> tuple[int, int, int]:
    """This process's place in a torchrun job, from ``RANK``, ``WORLD_SIZE`` and
    ``LOCAL_RANK``.

    Args:
        environ (Mapping[str, str], optional): The environment. Defaults to None
            (``os.environ``).

    Returns:
        tuple[int, int, int]: ``(rank, world_size, local_rank)``; ``(0, 1, 0)`` when
        ``WORLD_SIZE`` is unset or 1.

    Raises:
        UserError: If ``WORLD_SIZE`` is not an integer >= 1, or, when it is > 1, ``RANK`` is not
            in ``[0, WORLD_SIZE)`` or ``LOCAL_RANK`` (default 0) is not an integer >= 0.
    """
    environ = os.environ if environ is None else environ
    world = _env_int(environ, 'WORLD_SIZE', 1, default=1)
    if world == 1:
        return 0, 1, 0
    return (_env_int(environ, 'RANK', 0, world - 1), world,
            _env_int(environ, 'LOCAL_RANK', 0, default=0))


def join(device: str) -> None:
    """Join torchrun's process group: NCCL when ``device`` is CUDA (after selecting it), else
    gloo.

    Args:
        device (str): This rank's device, e.g. ``cpu`` or ``cuda:1``.

    Raises:
        UserError: If torchrun's rendezvous variables (``MASTER_ADDR``, ``MASTER_PORT``) are
            missing or the group cannot be formed.
    """
    import torch
    import torch.distributed as dist

    cuda = device.startswith('cuda')
    if cuda:
        torch.cuda.set_device(device)
    try:
        dist.init_process_group(backend='nccl' if cuda else 'gloo', timeout=TIMEOUT)
    except (ValueError, RuntimeError) as exc:
        raise UserError(f'could not join the torchrun job (start it with torchrun, which sets '
                        f'MASTER_ADDR and MASTER_PORT): {exc}') from exc


def gather(obj: Any) -> list:
    """Every rank's ``obj`` (picklable), in rank order, on every rank; ``[obj]`` outside a
    process group."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def leave() -> None:
    """Leave the process group, if this process joined one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
