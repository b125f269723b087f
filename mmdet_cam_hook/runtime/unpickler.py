"""The allow-list of a safe checkpoint load, and a private unpickler that enforces it.

``torch.load(..., weights_only=True)`` takes extra classes only from torch's process-wide
allow-list (``torch.serialization.add_safe_globals``; its ``safe_globals`` context manager adds
on enter and removes on exit, also entries another library had added, and other threads see the
widened list meanwhile). So a safe load here never touches that list: this module is the
``pickle_module`` given to ``torch.load`` (which reads the zip or legacy container and the
tensor storages as always). Its :class:`Unpickler` resolves a global only from torch's own
weights-only allow-list plus :func:`safe_globals`, and, like torch's weights-only unpickler,
calls, instantiates and ``__setstate__``-s only what that allow-list holds.
"""
from __future__ import annotations

import _compat_pickle
import functools
import io
import pickle
import pickletools
import re
from collections import OrderedDict
from typing import Any

import numpy as np
import torch

UnpicklingError = pickle.UnpicklingError


def _history_buffer():
    from mmengine.logging import HistoryBuffer

    return HistoryBuffer


def _restricted_getattr(obj: Any, name: str) -> Any:
    """Stands in for ``builtins.getattr`` while unpickling.

    A pickled :class:`~mmengine.logging.HistoryBuffer` holds its statistics methods as
    ``getattr(HistoryBuffer, 'mean')``; that, and nothing else, is allowed.
    """
    history_buffer = _history_buffer()
    if obj is history_buffer and isinstance(name, str) and not name.startswith('_') \
            and callable(getattr(history_buffer, name, None)):
        return getattr(history_buffer, name)
    raise pickle.UnpicklingError(
        f'checkpoint calls getattr({obj!r}, {name!r}); only public HistoryBuffer methods are '
        'allowed')


def safe_globals() -> list:
    """What an MMEngine checkpoint needs beyond torch's own weights-only allow-list, in the form
    ``torch.serialization.safe_globals`` takes.

    Entries are the classes and functions themselves, or ``(object, 'pickled.name')`` pairs for
    names that differ between library versions (numpy 2 pickles ``numpy._core``) and for
    ``builtins.getattr``, which maps to :func:`_restricted_getattr`.

    Returns:
        list: Objects and ``(object, name)`` pairs.
    """
    reconstruct = np.core.multiarray._reconstruct
    scalar = np.core.multiarray.scalar
    entries: list = [
        _history_buffer(),
        np.ndarray,
        np.dtype,
        reconstruct,
        scalar,
        (reconstruct, 'numpy._core.multiarray._reconstruct'),
        (scalar, 'numpy._core.multiarray.scalar'),
        (_restricted_getattr, 'builtins.getattr'),
    ]
    dtypes = getattr(np, 'dtypes', None)
    if dtypes is not None:
        entries += [getattr(dtypes, n) for n in dir(dtypes) if n.endswith('DType')]
    return entries


@functools.cache
def allowed_globals() -> dict:
    """``{'module.name': object}`` of every global a safe load resolves: torch's own
    weights-only allow-list (tensors, storages, ``OrderedDict``, ...) and :func:`safe_globals`.
    Never what others added to torch's process-wide list."""
    from torch._weights_only_unpickler import _get_allowed_globals

    allowed = dict(_get_allowed_globals())
    for entry in safe_globals():
        if isinstance(entry, tuple):
            allowed[entry[1]] = entry[0]
        else:
            allowed[f'{entry.__module__}.{entry.__qualname__}'] = entry
    return allowed


class Unpickler(pickle._Unpickler):  # the Python unpickler: its opcodes can be overridden
    """A pickle unpickler that resolves globals from :func:`allowed_globals` only, and calls,
    instantiates (``REDUCE``, ``NEWOBJ``, ``INST``, ``OBJ``) and builds (``BUILD``) only the
    allowed classes and functions, as torch's weights-only unpickler does; ``APPEND(S)`` and
    ``ADDITEMS`` only extend lists and sets."""

    dispatch = dict(pickle._Unpickler.dispatch)

    def __init__(self, file, **kwargs) -> None:
        super().__init__(file, **kwargs)
        self._allowed = allowed_globals()
        self._allowed_ids = {id(v) for v in self._allowed.values()}

    def load(self) -> Any:
        try:
            return super().load()
        except KeyError as exc:  # the Python unpickler's way of saying "unknown opcode"
            if exc.args and isinstance(exc.args[0], int) and 0 <= exc.args[0] < 256:
                raise pickle.UnpicklingError(
                    f'invalid load key, {bytes([exc.args[0]])!r} (not a pickle)') from exc
            raise

    def _check(self, obj: Any, what: str) -> None:
        if id(obj) not in self._allowed_ids:
            raise pickle.UnpicklingError(f'checkpoint tries to {what} {obj!r}, which is not in '
                                         'the allow-list')

    def find_class(self, module: str, name: str) -> Any:
        if self.proto < 3 and self.fix_imports:  # Python 2 names, as pickle maps them
            if (module, name) in _compat_pickle.NAME_MAPPING:
                module, name = _compat_pickle.NAME_MAPPING[(module, name)]
            elif module in _compat_pickle.IMPORT_MAPPING:
                module = _compat_pickle.IMPORT_MAPPING[module]
        full = f'{module}.{name}'
        if full not in self._allowed:
            raise pickle.UnpicklingError(
                f'Unsupported global: GLOBAL {full} was not an allowed global')
        return self._allowed[full]

    def load_reduce(self) -> None:
        self._check(self.stack[-2], 'call')
        super().load_reduce()

    def load_newobj(self) -> None:
        self._check(self.stack[-2], 'instantiate')
        super().load_newobj()

    def load_newobj_ex(self) -> None:
        self._check(self.stack[-3], 'instantiate')
        super().load_newobj_ex()

    def _instantiate(self, klass, args) -> None:
        self._check(klass, 'instantiate')
        super()._instantiate(klass, args)

    def load_build(self) -> None:
        inst = self.stack[-2]
        if type(inst) not in (torch.Tensor, torch.nn.Parameter, OrderedDict):
            self._check(type(inst), 'set the state of an instance of')
        super().load_build()

    def load_append(self) -> None:
        self._only(self.stack[-2], list)
        super().load_append()

    def load_appends(self) -> None:
        self._only(self.metastack[-1][-1] if self.metastack else None, list)
        super().load_appends()

    def load_additems(self) -> None:
        self._only(self.metastack[-1][-1] if self.metastack else None, set)
        super().load_additems()

    @staticmethod
    def _only(obj: Any, kind: type) -> None:
        if type(obj) is not kind:
            raise pickle.UnpicklingError(
                f'checkpoint extends a {type(obj).__name__}; only a {kind.__name__} may be')


for _op, _method in ((pickle.REDUCE, Unpickler.load_reduce),
                     (pickle.NEWOBJ, Unpickler.load_newobj),
                     (pickle.NEWOBJ_EX, Unpickler.load_newobj_ex),
                     (pickle.BUILD, Unpickler.load_build),
                     (pickle.APPEND, Unpickler.load_append),
                     (pickle.APPENDS, Unpickler.load_appends),
                     (pickle.ADDITEMS, Unpickler.load_additems)):
    Unpickler.dispatch[_op[0]] = _method


def load(file, **kwargs) -> Any:
    """``pickle.load`` through :class:`Unpickler` (``torch.load`` reads a legacy file's
    header pickles with it)."""
    return Unpickler(file, **kwargs).load()


# ---------------------------------------------------------------------------------------------
# Naming what a refused file needs (for the error message)
_STRING_OPS = {'STRING', 'BINSTRING', 'SHORT_BINSTRING', 'UNICODE', 'BINUNICODE',
               'SHORT_BINUNICODE', 'BINUNICODE8'}


def pickle_globals(stream: io.BufferedIOBase, limit: int = 8) -> list[str]:
    """The ``module.name`` of every global the pickles at the start of ``stream`` import,
    found by reading the opcodes (nothing is unpickled). Covers every protocol: ``GLOBAL`` and
    ``INST`` (protocols 0-3) and ``STACK_GLOBAL`` (4-5, with its two strings possibly memoised).
    A legacy torch file is several pickles in a row; reading stops at data that is no pickle."""
    names: list[str] = []
    for _ in range(limit):
        memo: dict = {}
        pushed: list = []
        try:
            for op, arg, _pos in pickletools.genops(stream):
                if op.name in ('GLOBAL', 'INST'):
                    names.append(arg.replace(' ', '.'))
                    pushed.append(None)
                elif op.name == 'STACK_GLOBAL':
                    if len(pushed) >= 2 and all(isinstance(v, str) for v in pushed[-2:]):
                        names.append(f'{pushed[-2]}.{pushed[-1]}')
                    pushed.append(None)
                elif op.name in _STRING_OPS:
                    pushed.append(arg if isinstance(arg, str) else
                                  arg.decode('latin-1') if isinstance(arg, bytes) else None)
                elif op.name == 'MEMOIZE':
                    memo[len(memo)] = pushed[-1] if pushed else None
                elif op.name in ('PUT', 'BINPUT', 'LONG_BINPUT'):
                    memo[arg] = pushed[-1] if pushed else None
                elif op.name in ('GET', 'BINGET', 'LONG_BINGET'):
                    pushed.append(memo.get(arg))
                elif op.name == 'STOP':
                    break
                else:
                    pushed.append(None)
        except (ValueError, EOFError, pickle.UnpicklingError, UnicodeDecodeError):
            break  # the raw tensor data of a legacy file, or the end of the file
        if not pushed:
            break
    return names


def unsafe_names(names: list[str], exc: Exception) -> list[str]:
    """Of the globals a file names, those outside the allow-list (sorted), with a refused
    ``getattr`` call and, failing both, the global the unpickler's error ``exc`` names."""
    allowed = set(allowed_globals())
    unsafe = [n for n in names if n not in allowed and not n.startswith('torch.')]
    call = re.search(r'checkpoint calls (getattr\(.*?\));', str(exc))
    if call:
        unsafe.append(f'builtins.getattr, as {call.group(1)}')
    if not unsafe:
        unsafe = re.findall(r'GLOBAL (\S+) was not an allowed', str(exc))
    return sorted(set(unsafe))
