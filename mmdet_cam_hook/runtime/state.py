"""Leave the model as found: the one home of STYLE rule 4.

Every part of the package that runs the detector (the engine, the batched detector, the
adapters' tracing, ``--list-layers``, the hook) does it inside these context managers, so that
after the call every module's ``training`` flag, the forward hooks, grad mode and the RNG states
are as before, also when the call raised.
"""
from __future__ import annotations

import contextlib
import random
from typing import Any, Callable, Iterator, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

__all__ = ['read_only', 'capture_outputs', 'preserved_rng', 'OUTPUT_SEP', 'split_output_name',
           'output_at']


@contextlib.contextmanager
def read_only(model: nn.Module) -> Iterator[None]:
    """Put ``model`` in eval mode, fp32, for the duration; restore every module's ``training``
    flag afterwards, also after an exception. Grad mode is restored by the caller's own
    ``torch.enable_grad`` / ``no_grad`` blocks."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    device = next(model.parameters()).device
    try:
        with torch.autocast(device_type=device.type, enabled=False):
            yield
    finally:
        for module, flag in flags:
            module.training = flag


@contextlib.contextmanager
def capture_outputs(modules: Sequence[Tuple[str, nn.Module]],
                    store: Callable[[str, nn.Module, Any], None]) -> Iterator[None]:
    """Call ``store(name, module, output)`` after each forward of each ``(name, module)``, for
    the duration; the forward hooks are removed on exit, also after an exception (the engine's
    target layers; every layer for ``mmdet-cam --list-layers``)."""
    handles = []

    def make_hook(name):

        def hook(module, args, output):
            store(name, module, output)

        return hook

    try:
        for name, module in modules:
            handles.append(module.register_forward_hook(make_hook(name)))
        yield
    finally:
        for handle in handles:
            handle.remove()


#: ``path:i`` names the i-th tensor of the tuple or list the module at ``path`` outputs (the
#: level maps of a neck that computes them without a module of their own: DyHead, NAS-FCOS).
OUTPUT_SEP = ':'


def split_output_name(name: str) -> Tuple[str, Optional[int]]:
    """``'neck:2'`` -> ``('neck', 2)``; a plain module path -> ``(path, None)``.

    Raises:
        ValueError: If what follows the last ``:`` is not a non-negative integer.
    """
    path, sep, index = name.rpartition(OUTPUT_SEP)
    if not sep:
        return name, None
    if not index.isdigit() or not path:
        raise ValueError(f'target layer {name!r}: after {OUTPUT_SEP!r} comes the index of a '
                         f'tensor in the module\'s tuple output, such as "neck{OUTPUT_SEP}0"')
    return path, int(index)


def output_at(output: Any, index: Optional[int]) -> Any:
    """The part of a module's ``output`` a target-layer name selects: all of it (``index``
    None), else its ``index``-th element if it is a tuple or list that long, else None."""
    if index is None:
        return output
    if isinstance(output, (tuple, list)) and 0 <= index < len(output):
        return output[index]
    return None


@contextlib.contextmanager
def preserved_rng(device: torch.device) -> Iterator[None]:
    """Restore the python, numpy and torch (CPU and the model's CUDA device) RNG states, so that
    the data augmentation of the following training epochs is unchanged."""
    py_state, np_state = random.getstate(), np.random.get_state()
    devices = [device] if device.type == 'cuda' else []
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)
