"""Target layers: names as ``named_modules()`` paths, resolved without ``eval``.

``neck.out_convs.2`` and ``neck.out_convs[2]`` / ``neck.out_convs[-1]`` all name a module; a name
that does not exist raises a ``ValueError`` listing close matches. Which layer is which level's
feature map is the adapter's business (:meth:`DetectorAdapter.level_layers`).
"""
import difflib
import re
from typing import Dict, List, Optional, Sequence, Tuple

from torch import nn

_INDEX = re.compile(r'\[\s*(-?\d+)\s*\]')


def canonical_name(model: nn.Module, name: str) -> str:
    """Turn ``a.b[-1]`` / ``a.b[2]`` into the ``named_modules()`` path ``a.b.2``.

    Args:
        model (nn.Module): The model the name refers to.
        name (str): A dotted path, optionally with ``[i]`` indices (negative allowed).

    Returns:
        str: The canonical dotted path (not yet checked to exist).

    Raises:
        TypeError: If ``name`` is not a string.
        ValueError: If an index is out of range or applied to a module without children.
    """
    if not isinstance(name, str):
        raise TypeError(f'a target layer must be a str such as "neck.out_convs.0", got {name!r}')
    path: List[str] = []
    module: Optional[nn.Module] = model
    for part in re.split(r'\.(?![^\[]*\])', name.strip()):
        if not part:
            raise ValueError(f'target layer {name!r} has an empty path component')
        head, *indices = _INDEX.split(part)
        tokens = ([head] if head else []) + [i for i in indices if i]
        for tok in tokens:
            if re.fullmatch(r'-?\d+', tok) and int(tok) < 0:
                children = list(module.named_children()) if module is not None else []
                idx = int(tok) + len(children)
                if not 0 <= idx < len(children):
                    where = '.'.join(path) or 'the model'
                    raise ValueError(f'target layer {name!r}: index {tok} is out of range for '
                                     f'{where!r}, which has {len(children)} children')
                tok = children[idx][0]
            path.append(tok)
            module = dict(module.named_children()).get(tok) if module is not None else None
    return '.'.join(path)


def resolve_layers(model: nn.Module,
                   names: Sequence[str],
                   arg: str = 'target_layers') -> List[Tuple[str, nn.Module]]:
    """Resolve layer names to ``(canonical_name, module)`` pairs.

    Args:
        model (nn.Module): The unwrapped detector.
        names (Sequence[str]): Layer names (a single str is accepted too).
        arg (str): The argument name to quote in errors. Defaults to 'target_layers'.

    Returns:
        list[tuple[str, nn.Module]]: One pair per distinct name, in the given order.

    Raises:
        TypeError: If ``names`` is not a str or a sequence of str.
        ValueError: If it is empty or a name does not exist (the message lists close matches).
    """
    if isinstance(names, str):
        names = [names]
    if not isinstance(names, (list, tuple)):
        raise TypeError(f'`{arg}` must be None, a layer name or a list of them '
                        f'(e.g. ["neck.out_convs.0"]), got {names!r}')
    if not names:
        raise ValueError(f'`{arg}` must name at least one layer, or be None for the '
                         'level-aware default, got []')
    modules: Dict[str, nn.Module] = dict(model.named_modules())
    resolved: Dict[str, nn.Module] = {}
    for name in names:
        canon = canonical_name(model, name)
        if canon not in modules or canon == '':
            close = difflib.get_close_matches(canon, [n for n in modules if n], n=6, cutoff=0.6)
            hint = (f'; close matches: {close}' if close else
                    f'; top-level modules: {[n for n, _ in model.named_children()]}')
            raise ValueError(f'unknown target layer {name!r} in `{arg}`{hint}. '
                             '`mmdet-cam CONFIG CKPT IMG --list-layers` prints every layer name')
        resolved.setdefault(canon, modules[canon])
    return list(resolved.items())


def neck_output_layers(model: nn.Module) -> List[str]:
    """Names of the modules whose outputs are the level feature maps, one per FPN level (the
    level-aware default; ``neck.out_convs.l`` in YOLOX and RTMDet).

    Kept for callers of the first API; it is ``build_adapter(model).level_layers()``.

    Raises:
        ValueError: If no adapter supports the model's head (naming it and the supported
            heads), or no module outputs some level's map (then pass ``target_layers``).
    """
    from ..adapters import build_adapter

    return build_adapter(model).level_layers()
