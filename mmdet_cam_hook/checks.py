"""Argument checks shared by the engine, the hook, the command-line tools, the demo, the shapes
generator and the drawing code: one wording and one choice of exception for each kind of value.

Python-level checks raise ``TypeError`` for a value of the wrong type and ``ValueError`` for a
value of the right type out of range; both quote the argument's name, the bad value and what
is accepted, e.g. ``"`topk` must be None or a positive int, got 0"``. ``bool`` is never taken
for an int or a number. The ``*_arg`` functions are ``argparse`` ``type=`` callables: they parse
the text and raise ``argparse.ArgumentTypeError``, which argparse prints with the option's name.
"""
from __future__ import annotations

import argparse
import numbers
from typing import Any, Callable, Optional, Sequence

__all__ = [
    'is_int', 'check_int', 'check_bool', 'check_fraction', 'check_choice', 'check_score_thr',
    'check_topk', 'check_max_size', 'positive_int_arg', 'nonnegative_int_arg', 'fraction_arg',
    'UserError'
]


class UserError(Exception):
    """A problem with a command line or its inputs, which the command-line tools report in one
    line (exit code 1)."""


def is_int(value: Any) -> bool:
    """Whether ``value`` is an integer (python or numpy), ``bool`` excluded.

    Args:
        value (Any): The value.

    Returns:
        bool: True for ``3`` or ``np.int64(3)``, False for ``True``, ``3.0`` or ``'3'``.
    """
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _int_kind(low: int, none_ok: bool) -> str:
    kind = 'a positive int' if low == 1 else f'an int >= {low}'
    return f'None or {kind}' if none_ok else kind


def check_int(value: Any, arg: str, low: int = 1, none_ok: bool = False) -> Optional[int]:
    """An int ``>= low`` (or None when ``none_ok``).

    Args:
        value (Any): The value to check.
        arg (str): The argument's name, quoted in the error.
        low (int): The smallest accepted value. Defaults to 1.
        none_ok (bool): Accept None (returned as is). Defaults to False.

    Returns:
        int | None: ``value`` as a python int, or None.

    Raises:
        TypeError: If ``value`` is not an int (``bool`` included), nor an accepted None.
        ValueError: If ``value`` is below ``low``.
    """
    if value is None and none_ok:
        return None
    if not is_int(value):
        raise TypeError(f'`{arg}` must be {_int_kind(low, none_ok)}, got {value!r}')
    if value < low:
        raise ValueError(f'`{arg}` must be {_int_kind(low, none_ok)}, got {value!r}')
    return int(value)


def check_bool(value: Any, arg: str) -> bool:
    """``True`` or ``False`` (not 0/1, not a string).

    Args:
        value (Any): The value to check.
        arg (str): The argument's name, quoted in the error.

    Returns:
        bool: ``value``.

    Raises:
        TypeError: If ``value`` is not a bool.
    """
    if not isinstance(value, bool):
        raise TypeError(f'`{arg}` must be True or False, got {value!r}')
    return value


def check_fraction(value: Any, arg: str) -> float:
    """A real number in ``[0, 1]`` (a score threshold, a blending weight, ...).

    Args:
        value (Any): The value to check.
        arg (str): The argument's name, quoted in the error.

    Returns:
        float: ``value`` as a python float.

    Raises:
        TypeError: If ``value`` is not a real number (``bool`` included).
        ValueError: If it lies outside ``[0, 1]`` (NaN included).
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f'`{arg}` must be a number in [0, 1], got {value!r}')
    if not 0.0 <= value <= 1.0:
        raise ValueError(f'`{arg}` must be a number in [0, 1], got {value!r}')
    return float(value)


def check_choice(value: Any, choices: Sequence[str], arg: str) -> str:
    """One of ``choices``.

    Args:
        value (Any): The value to check.
        choices (Sequence[str]): The accepted values, listed in the error.
        arg (str): The argument's name, quoted in the error.

    Returns:
        str: ``value``.

    Raises:
        TypeError: If ``value`` is not a str.
        ValueError: If it is not one of ``choices``.
    """
    if not isinstance(value, str):
        raise TypeError(f'`{arg}` must be one of {list(choices)}, got {value!r}')
    if value not in choices:
        raise ValueError(f'`{arg}` must be one of {list(choices)}, got {value!r}')
    return value


def check_score_thr(score_thr: Any, arg: str = 'score_thr') -> float:
    """A detection score threshold: a number in ``[0, 1]`` (see :func:`check_fraction`)."""
    return check_fraction(score_thr, arg)


def check_topk(topk: Any, arg: str = 'topk') -> Optional[int]:
    """At most this many detections: None (all) or a positive int (see :func:`check_int`)."""
    return check_int(topk, arg, low=1, none_ok=True)


def check_max_size(max_size: Any, arg: str = 'max_size') -> Optional[int]:
    """A longer side in pixels: None (full size) or a positive int (see :func:`check_int`)."""
    return check_int(max_size, arg, low=1, none_ok=True)


def _arg_type(convert: Callable[[str], Any], ok: Callable[[Any], bool],
              expected: str) -> Callable[[str], Any]:
    """An ``argparse`` type: ``convert(text)`` when it succeeds and ``ok`` accepts it, else an
    ``ArgumentTypeError`` saying ``must be {expected}, got {text!r}``."""

    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            value = None
        if value is None or not ok(value):
            raise argparse.ArgumentTypeError(f'must be {expected}, got {text!r}')
        return value

    return parse


#: ``argparse`` type: an integer >= 1 (``--topk``, ``--batch-size``, ...).
positive_int_arg = _arg_type(int, lambda v: v >= 1, 'an integer >= 1')
#: ``argparse`` type: an integer >= 0 (``--seed``).
nonnegative_int_arg = _arg_type(int, lambda v: v >= 0, 'an integer >= 0')
#: ``argparse`` type: a number in ``[0, 1]`` (a score threshold).
fraction_arg = _arg_type(float, lambda v: 0.0 <= v <= 1.0, 'a number in [0, 1]')
