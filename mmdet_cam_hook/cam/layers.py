"""Target layers: names as ``named_modules()`` paths, resolved without ``eval``, and which of
them can be explained (:func:`probe_layers`, decided once per engine).

``neck.out_convs.2`` and ``neck.out_convs[2]`` / ``neck.out_convs[-1]`` all name a module; a name
that does not exist raises a ``ValueError`` listing close matches. Which layer is which level's
feature map is the adapter's business (:meth:`DetectorAdapter.level_layers`).
"""
import difflib
import re
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ..runtime.state import OUTPUT_SEP, capture_outputs, read_only, split_output_name

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
        path, index = split_output_name(name) if isinstance(name, str) else (name, None)
        canon = canonical_name(model, path)
        if canon not in modules or canon == '':
            close = difflib.get_close_matches(canon, [n for n in modules if n], n=6, cutoff=0.6)
            hint = (f'; close matches: {close}' if close else
                    f'; top-level modules: {[n for n, _ in model.named_children()]}')
            raise ValueError(f'unknown target layer {name!r} in `{arg}`{hint}. '
                             '`mmdet-cam CONFIG CKPT IMG --list-layers` prints every layer name')
        full = canon if index is None else f'{canon}{OUTPUT_SEP}{index}'
        resolved.setdefault(full, modules[canon])
    return list(resolved.items())


@dataclass(frozen=True)
class LayerInfo:
    """What one module of the model is as a target layer (``mmdet-cam --list-layers``).

    Attributes:
        name (str): ``named_modules()`` path.
        type (str): The module's class name.
        output (str): Its output in the dummy forward: a shape such as ``1x96x16x16``, a tuple
            of them ``(1x96x16x16, ...)`` or a type name.
        stride (str): Input height over output height (``'-'`` when not a 4-D map).
        route (str): The engine's gradient route for it, ``'-'`` when not usable.
        usable (bool): Whether ``target_layers`` accepts it.
        reason (str): Why not, '' when usable.
    """

    name: str
    type: str
    output: str
    stride: str
    route: str
    usable: bool
    reason: str


def _describe(output: Any) -> str:
    if isinstance(output, torch.Tensor):
        return 'x'.join(map(str, output.shape))
    if isinstance(output, (tuple, list)) and output:
        return '(' + ', '.join(_describe(o) for o in output) + ')'
    return type(output).__name__


def _graph_nodes(outputs: Any) -> Dict[int, Any]:
    """Every autograd node the tensors in ``outputs`` (nested tuples, lists, dicts, objects
    with tensors as attributes) depend on, by id. The nodes are kept in the dict: a node's
    Python object (and so its id) only lasts while something holds it."""
    stack, seen, nodes = [outputs], set(), []
    while stack:
        obj = stack.pop()
        if isinstance(obj, torch.Tensor):
            if obj.grad_fn is not None:
                nodes.append(obj.grad_fn)
        elif isinstance(obj, (tuple, list)):
            stack.extend(obj)
        elif isinstance(obj, dict):
            stack.extend(obj.values())
        elif (hasattr(obj, '__dict__') and not isinstance(obj, nn.Module)
              and id(obj) not in seen):
            seen.add(id(obj))
            stack.extend(vars(obj).values())
    reached: Dict[int, Any] = {}
    while nodes:
        node = nodes.pop()
        if node is None or id(node) in reached:
            continue
        reached[id(node)] = node
        nodes.extend(n for n, _ in node.next_functions)
    return reached


def _why_not(output: Any, batch: int, reached: Dict[int, Any]) -> str:
    """Why a module's output cannot be a target layer ('' if it can)."""
    if not isinstance(output, torch.Tensor):
        return f'outputs a {type(output).__name__}, not a tensor'
    if output.dim() != 4 or output.shape[0] != batch or min(output.shape[2:]) < 1:
        return (f'outputs a {output.dim()}-D tensor of shape {tuple(output.shape)}, not a '
                f'({batch}, C, h, w) spatial feature map of the image')
    if output.grad_fn is None or id(output.grad_fn) not in reached:
        return ("outputs a map the detections' scores do not depend on (no gradient path: "
                'computed without gradients or detached)')
    return ''


def probe_layers(model: nn.Module, inputs: torch.Tensor,
                 forward: Callable[[torch.Tensor], Any]) -> Dict[str, LayerInfo]:
    """Every module of ``model`` that runs in ``forward(inputs)`` (the engine's backbone, neck
    and head), with its output and whether it can be a target layer: a 4-D ``(B, C, h, w)``
    tensor the head's outputs depend on through autograd. One forward with gradients (the
    input requiring them, as the engine's), forward hooks removed and ``training`` flags
    restored afterwards (:func:`~mmdet_cam_hook.runtime.state.read_only`).

    Args:
        model (nn.Module): The detector.
        inputs (torch.Tensor): (B, 3, H, W) preprocessed input.
        forward (Callable): ``forward(inputs) -> head outputs``.

    Returns:
        dict[str, LayerInfo]: In the order the outputs are computed; ``route`` is ``'-'``
        (the engine's to decide).
    """
    outputs: Dict[str, Tuple[nn.Module, Any]] = {}

    def store(name, module, output):
        outputs.setdefault(name, (module, output))

    with read_only(model), torch.inference_mode(False), torch.enable_grad():
        inputs = inputs.detach().clone().requires_grad_(True)
        with capture_outputs([(n, m) for n, m in model.named_modules() if n], store):
            reached = _graph_nodes(forward(inputs))
    rows = {}
    for name, (module, output) in outputs.items():
        reason = _why_not(output, inputs.shape[0], reached)
        stride = _stride(inputs, output)
        rows[name] = LayerInfo(name, type(module).__name__, _describe(output), stride, '-',
                               not reason, reason)
        if isinstance(output, (tuple, list)):  # its maps, as ``name:i`` (split_output_name)
            for i, item in enumerate(output):
                if isinstance(item, torch.Tensor) and not _why_not(item, inputs.shape[0],
                                                                   reached):
                    rows[f'{name}{OUTPUT_SEP}{i}'] = LayerInfo(
                        f'{name}{OUTPUT_SEP}{i}', type(module).__name__, _describe(item),
                        _stride(inputs, item), '-', True, '')
    return rows


def _stride(inputs: torch.Tensor, output: Any) -> str:
    """Input height over output height of a 4-D map (``'-'`` for anything else)."""
    if isinstance(output, torch.Tensor) and output.dim() == 4 and output.shape[2] > 0:
        ratio = inputs.shape[2] / output.shape[2]
        return str(int(ratio)) if ratio == int(ratio) else f'{ratio:.2f}'
    return '-'


def usable_hint(rows: Dict[str, LayerInfo], name: str, preferred: Sequence[str] = ()) -> str:
    """A usable layer to suggest instead of ``name``: its first usable submodule, else the
    first usable of ``preferred`` (the level maps), else the first usable layer."""
    usable = [n for n, row in rows.items() if row.usable]
    inside = [n for n in usable if n.startswith(name + '.')]
    levels = [n for n in preferred if n in usable]
    for candidates in ([n for n in levels if n in inside], inside, levels, usable):
        if candidates:
            return candidates[0]
    return ''


def check_usable(rows: Dict[str, LayerInfo], names: Sequence[str],
                 preferred: Sequence[str] = ()) -> None:
    """Refuse a target layer that :func:`probe_layers` found unusable (or did not see run).

    Raises:
        ValueError: Naming the layer, why, and a usable layer of this model to use instead
            (:func:`usable_hint`).
    """
    for name in names:
        info = rows.get(name)
        if info is not None and info.usable:
            continue
        reason = info.reason if info is not None else (
            'does not run in the forward pass of the backbone, neck and head')
        hint = usable_hint(rows, name, preferred)
        use = (f'; choose one of its submodules, e.g. {hint!r}' if hint.startswith(name + '.')
               else f'; a usable layer of this model: {hint!r}' if hint else '')
        raise ValueError(
            f'target layer {name!r} {reason}, so it cannot be explained{use} '
            '(`mmdet-cam CONFIG CKPT IMG --list-layers` lists every layer and its route)')


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
