"""Which heads are supported: one rule, applied when the engine, the hook or a CLI is built.

A head class is supported only if it is *listed* in an adapter's ``head_types``, or subclasses a
listed class without overriding any method the adapter relies on (its ``relies_on``, compared
in ``cls.__dict__`` along the MRO up to the listed class), and the adapter
:meth:`~.base.DetectorAdapter.accepts` the rest of the model. Anything else is refused by
:func:`build_adapter` with one ``ValueError`` naming the head, the supported class it
subclasses and the methods it overrides (or why the adapter refuses the model:
:meth:`~.base.DetectorAdapter.refusal_reason`), before any forward. :func:`head_matches` is
the static half of the rule (classes only, nothing built): the registry test and the README's
table use it.
"""
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

from torch import nn

from .base import ADAPTERS, DetectorAdapter, module_at


@dataclass(frozen=True)
class HeadMatch:
    """How one adapter would take a head class (:func:`head_matches`).

    Attributes:
        adapter (type): The adapter class.
        listed (str): The nearest class of the head's MRO in the adapter's ``head_types``.
        rank (int): Its position in the head's MRO (0: the head class itself is listed).
        overrides (tuple[str, ...]): The adapter's ``relies_on`` methods that the head class
            or a base before ``listed`` in its MRO defines; not empty: refused.
    """

    adapter: type
    listed: str
    rank: int
    overrides: Tuple[str, ...]


def head_matches(head_cls: type, head_path: Optional[str] = None) -> List[HeadMatch]:
    """Every registered adapter whose ``head_types`` holds a class of ``head_cls``'s MRO (none
    of it in the adapter's ``excluded_types``), nearest first (ties: registration order), with
    the relied-upon methods the head overrides. Static: nothing is built.

    Args:
        head_cls (type): A head class (e.g. ``mmdet.models.dense_heads.PAAHead``).
        head_path (str, optional): Only adapters whose ``head_path`` is this. Defaults to None
            (every adapter).

    Returns:
        list[HeadMatch]: The matches; one with empty ``overrides`` is supported by the rule.
    """
    mro = head_cls.__mro__
    names = [cls.__name__ for cls in mro]
    matches = []
    for adapter_cls in ADAPTERS.module_dict.values():
        if head_path is not None and adapter_cls.head_path != head_path:
            continue
        if set(adapter_cls.excluded_types) & set(names):
            continue
        rank = next((i for i, n in enumerate(names) if n in adapter_cls.head_types), None)
        if rank is None:
            continue
        _, overrides = _overridden(head_cls, names[rank:rank + 1], adapter_cls.relies_on)
        matches.append(HeadMatch(adapter_cls, names[rank], rank, overrides))
    return sorted(matches, key=lambda m: m.rank)


def _overridden(cls: type, listed: Sequence[str], methods: Sequence[str]
                ) -> Tuple[Optional[str], Tuple[str, ...]]:
    """The nearest class of ``cls``'s MRO named in ``listed`` (None if none is) and the
    ``methods`` that ``cls`` or a base before it defines."""
    names = [c.__name__ for c in cls.__mro__]
    rank = next((i for i, n in enumerate(names) if n in listed), None)
    if rank is None:
        return None, ()
    return names[rank], tuple(sorted({m for c in cls.__mro__[:rank] for m in methods
                                      if m in c.__dict__}))


def part_refusal(adapter_cls: type, model: nn.Module) -> Optional[str]:
    """Why a part of ``model`` that ``adapter_cls`` runs itself (its ``relies_on_parts``) is
    not what it supports, by the head's rule; None when every part is.

    Args:
        adapter_cls (type): The adapter class.
        model (nn.Module): The detector.

    Returns:
        str | None: The reason, naming the part, its class and the methods it overrides.
    """
    for path, (listed, methods) in adapter_cls.relies_on_parts.items():
        part = module_at(model, path)
        if part is None:
            return f'{adapter_cls.__name__} needs a `{path}`, the model has none'
        base, overrides = _overridden(type(part), listed, methods)
        if base is None:
            return (f'its {path} {type(part).__name__} is none of {list(listed)} that '
                    f'{adapter_cls.__name__} runs')
        if overrides:
            return (f'its {path} {type(part).__name__} subclasses {base} but overrides '
                    f'{", ".join(overrides)}, which {adapter_cls.__name__} relies on')
    return None


def refusal(head_cls: type, matches: Sequence[HeadMatch],
            parts: Optional[dict] = None) -> str:
    """Why ``head_cls`` is not supported, for the error :func:`build_adapter` raises: each
    supported class it subclasses and the relied-upon methods it overrides (or that the
    adapter's ``accepts`` refused the rest of the model), and the supported heads.

    Args:
        head_cls (type): The head class.
        matches (Sequence[HeadMatch]): Its matches (:func:`head_matches`), possibly empty.
        parts (dict, optional): ``{adapter class: reason}`` from :func:`part_refusal`, for
            matches refused by a part of the model. Defaults to None.

    Returns:
        str: The message (naming the head, pointing at docs/DESIGN.md).
    """
    why = []
    for m in matches:
        adapter = m.adapter.__name__
        if m.overrides:
            why.append(f'it subclasses {m.listed} ({adapter}) but overrides '
                       f'{", ".join(m.overrides)}, which {adapter} relies on')
        elif (parts or {}).get(m.adapter):
            why.append(f'{adapter} takes {m.listed}, but {parts[m.adapter]}')
        else:
            why.append(f'{adapter} takes {m.listed} but does not accept this model '
                       f'(see {adapter}.accepts)')
    reason = f' ({"; ".join(why)})' if why else ''
    return (f'mmdet-cam-hook has no adapter for the head {head_cls.__name__}{reason}; '
            f'supported heads: {supported_heads()}. See docs/DESIGN.md ("Adding a head")')


def build_adapter(model: nn.Module) -> DetectorAdapter:
    """The adapter for ``model``'s head class, by one rule (:func:`head_matches`).

    Each adapter looks at the module at its ``head_path`` (``bbox_head``, or
    ``roi_head.bbox_head`` for two-stage detectors). A head is supported when its class is
    listed in an adapter's ``head_types``, or subclasses a listed class without overriding any
    method of the adapter's ``relies_on`` (compared along the MRO up to the listed class), and
    the adapter :meth:`~DetectorAdapter.accepts` the model; the nearest listed class wins, ties
    go to the first registered. Anything else is refused here, before any forward.

    Raises:
        ValueError: If no adapter supports the head, naming it, the supported classes it
            subclasses and the methods it overrides, and the supported heads.
    """
    matches = []
    for adapter_cls in ADAPTERS.module_dict.values():
        head = module_at(model, adapter_cls.head_path)
        if head is not None:
            matches += [m for m in head_matches(type(head), adapter_cls.head_path)
                        if m.adapter is adapter_cls]
    matches.sort(key=lambda m: m.rank)
    parts = {}
    for m in matches:
        if m.overrides:
            continue
        parts[m.adapter] = part_refusal(m.adapter, model)
        if parts[m.adapter] is None and m.adapter.accepts(model):
            return m.adapter(model)
        if parts[m.adapter] is None:
            parts[m.adapter] = m.adapter.refusal_reason(model)  # why accepts said no
    if matches:
        head = module_at(model, matches[0].adapter.head_path)
        raise ValueError(refusal(type(head), matches, parts))
    paths = sorted({cls.head_path for cls in ADAPTERS.module_dict.values()})
    found = [type(m).__name__ + ('' if p == 'bbox_head' else f' ({p})') for p in paths
             for m in [module_at(model, p)] if m is not None]
    name = ', '.join(found) if found else f'{type(model).__name__} (no bbox_head)'
    raise ValueError(f'mmdet-cam-hook has no adapter for the head {name}; supported heads: '
                     f'{supported_heads()}. See docs/DESIGN.md ("Adding a head")')


def supported_heads() -> List[str]:
    """Every head class name some adapter supports, sorted."""
    return sorted({t for cls in ADAPTERS.module_dict.values() for t in cls.head_types})
