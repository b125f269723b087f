"""What a map explains: the target of each detection's gradient.

- ``score`` (default): the detection's own score, the adapter's
  :meth:`~mmdet_cam_hook.adapters.DetectorAdapter.scores` with its label.
- ``contrast``: "class A rather than class B", ``score[A] - score[B]`` of the same prior, RoI
  or query, both with the adapter's own ``scores()`` (the same formula, the other label). B is
  given by the user (a class index or name) or, with ``'runner_up'``, is the class that
  prior/RoI/query scores highest after A. Every gradient route is linear in the target, so the
  contrastive gradient is the difference of the two labels' gradients, each computed by the
  route the layer already takes (:func:`subtract`): exact wherever the score's route is, at
  twice its gradient work.

- ``mask``: an instance's mask target (:mod:`..adapters.masks`: the mean of its mask
  probabilities over its own predicted binary mask), for models with a mask branch: the
  results' ``mask_cams`` (:func:`mask_maps`), beside the class maps: on one level map by the
  branch's own gradient (``route == 'level'``, RoI heads), or by the engine's exact route
  through the whole graph (``route == 'exact'``, masks that mix levels).

Gradient-free methods (EigenCAM) and perturbation methods (D-RISE) have no target: their maps
do not change with ``contrast``, and the engine says so once.
"""
import dataclasses
import difflib
import warnings
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch

from ..adapters import Detections, DetectorAdapter
from ..checks import is_int
from . import maths
from .local import WindowGradients

__all__ = ['RUNNER_UP', 'Contrast', 'check_contrast', 'resolve_contrast', 'num_classes',
           'class_scores', 'contrast_labels', 'relabel', 'subtract', 'mask_layers', 'mask_maps']

#: ``contrast='runner_up'``: class B is the prior's own second-best class.
RUNNER_UP = 'runner_up'
#: What ``contrast=`` takes: None (the score itself), ``'runner_up'``, a class index or name.
Contrast = Union[None, str, int]


def check_contrast(contrast: Contrast, arg: str = 'contrast') -> Contrast:
    """The type check of ``contrast`` that needs no model (the hook's and the CLI's, at
    construction); :func:`resolve_contrast` checks the value against the model's classes.

    Args:
        contrast (None | str | int): None, ``'runner_up'``, a class index (int >= 0) or a class
            name.
        arg (str): The argument's name in the error. Defaults to ``'contrast'``.

    Returns:
        None | str | int: ``contrast`` (an int as a python int).

    Raises:
        TypeError: On another type (e.g. a float or a bool).
        ValueError: On a negative index or an empty name.
    """
    if contrast is None:
        return None
    if is_int(contrast):
        if int(contrast) < 0:
            raise ValueError(f'`{arg}` must be None, {RUNNER_UP!r}, a class index >= 0 or a '
                             f'class name, got {contrast!r}')
        return int(contrast)
    if isinstance(contrast, str) and contrast.strip():
        return contrast
    if isinstance(contrast, str):
        raise ValueError(f'`{arg}` must be None, {RUNNER_UP!r}, a class index or a class '
                         f'name, got an empty string')
    raise TypeError(f'`{arg}` must be None, {RUNNER_UP!r}, a class index (int) or a class name '
                    f'(str), got {type(contrast).__name__} {contrast!r}')


def resolve_contrast(contrast: Contrast, classes: Optional[Sequence[str]],
                     num: int, arg: str = 'contrast') -> Contrast:
    """``contrast`` checked against the model: None, ``'runner_up'`` or a class index in
    ``[0, num)``; a class name becomes its index.

    Args:
        contrast (None | str | int): As :func:`check_contrast` takes it.
        classes (Sequence[str] | None): The model's class names (``dataset_meta['classes']``).
        num (int): The head's number of classes.
        arg (str): The argument's name in the error. Defaults to ``'contrast'``.

    Returns:
        None | str | int: None, ``'runner_up'`` or a class index.

    Raises:
        ValueError: On an index out of range or an unknown class name (with the valid choices
            and close matches); TypeError as :func:`check_contrast`.
    """
    contrast = check_contrast(contrast, arg)
    if contrast is None or contrast == RUNNER_UP:
        return contrast
    if isinstance(contrast, int):
        if contrast >= num:
            raise ValueError(f'`{arg}` must be {RUNNER_UP!r}, a class index in [0, {num - 1}] '
                             f'or a class name, got {contrast}')
        return contrast
    names = list(classes or [])
    if contrast in names and names.index(contrast) < num:
        return names.index(contrast)
    close = difflib.get_close_matches(contrast, names, n=3)
    hint = f'; close matches: {close}' if close else ''
    shown = names if len(names) <= 20 else names[:20] + ['...']
    raise ValueError(f'`{arg}` must be {RUNNER_UP!r}, a class index in [0, {num - 1}] or one '
                     f'of the class names {shown}, got {contrast!r}{hint}')


def num_classes(adapter: DetectorAdapter) -> int:
    """The number of object classes the adapter's head scores (no background): the head's
    ``num_classes``, or its RoI head's last bbox head's (two-stage).

    Raises:
        ValueError: If the head says nothing of its classes.
    """
    for head in (adapter.head, getattr(adapter.head, 'bbox_head', None)):
        if isinstance(head, torch.nn.ModuleList):
            head = head[-1]
        num = getattr(head, 'num_classes', None)
        if is_int(num):
            return int(num)
    raise ValueError(f'cannot tell the number of classes of {type(adapter.head).__name__} '
                     '(no `num_classes`): `contrast` needs it')


def relabel(dets: Detections, labels: torch.Tensor) -> Detections:
    """The same detections (priors, RoIs, queries) with other labels."""
    return dataclasses.replace(dets, labels=labels.to(dets.labels))


@torch.no_grad()
def class_scores(adapter: DetectorAdapter, outs, dets: Detections, num: int) -> torch.Tensor:
    """(K, C) the score each detection's prior/RoI/query gives every class, with the adapter's
    own ``scores()`` (one call for all K x C pairs)."""
    k = len(dets)
    if k == 0:
        return dets.scores.new_zeros((0, num))
    rep = dets.select(torch.arange(k, device=dets.labels.device).repeat_interleave(num))
    labels = torch.arange(num, device=dets.labels.device).repeat(k)
    return adapter.scores(outs, relabel(rep, labels)).detach().reshape(k, num)


def contrast_labels(adapter: DetectorAdapter, outs, dets: Detections, contrast: Contrast,
                    num: int) -> torch.Tensor:
    """(K,) class B of each detection: the given index, or with ``'runner_up'`` the class its
    own prior/RoI/query scores highest after its label (ties: the lowest index).

    Args:
        adapter (DetectorAdapter): The detector's adapter.
        outs: The head outputs of the image (the adapter's ``head_outputs``).
        dets (Detections): The detections.
        contrast (str | int): ``'runner_up'`` or a class index (:func:`resolve_contrast`).
        num (int): The number of classes (:func:`num_classes`).

    Returns:
        torch.Tensor: (K,) int64 on the detections' device.
    """
    if contrast != RUNNER_UP:
        return torch.full_like(dets.labels, int(contrast)).long()
    if num < 2:
        raise ValueError(f"`contrast={RUNNER_UP!r}` needs a head with at least 2 classes; "
                         f'this one has {num}')
    scores = class_scores(adapter, outs, dets, num)
    own = torch.nn.functional.one_hot(dets.labels.long(), num).bool()
    return scores.masked_fill(own, float('-inf')).argmax(dim=1).to(dets.labels.device)


Grads = Union[torch.Tensor, WindowGradients]


def subtract(grads_a: Dict[str, Grads], grads_b: Dict[str, Grads]) -> Dict[str, Grads]:
    """Per layer, the gradient of ``score[A] - score[B]``: the first minus the second. Window
    gradients of the same priors (the same windows) stay windows."""
    out: Dict[str, Grads] = {}
    for name, a in grads_a.items():
        b = grads_b[name]
        if isinstance(a, WindowGradients) and isinstance(b, WindowGradients):
            out[name] = WindowGradients(a.values - b.values, a.rows, a.cols, a.radius, a.shape)
        else:
            dense = [g.dense() if isinstance(g, WindowGradients) else g for g in (a, b)]
            out[name] = dense[0] - dense[1]
    return out


# --------------------------------------------------------------------------- mask target
def mask_layers(layers: Sequence, level_names: Sequence[str], level_aware: bool,
                level: int) -> Optional[List]:
    """The target layers of the mask maps of instances whose masks come from ``level``: the
    level's own layer (level-aware default), else the engine's layers when every one of them
    is a level map; None when some is not (the mask branch's gradient is on level maps)."""
    if level_aware:
        return [layers[level]]
    if all(layer.name in level_names for layer in layers):
        return list(layers)
    return None


def mask_maps(engine, methods, dets: Detections, fwd, metainfo: dict, letterbox,
              out_hw: Tuple[int, int]) -> Tuple[torch.Tensor, Optional[Dict[str, torch.Tensor]]]:
    """The instances' masks and, per method, their mask maps (the mask target of
    :mod:`..adapters.masks`), on the returned image.

    Args:
        engine (CAMEngine): The engine (its mask branch, layers and chunk size).
        methods (list[GradientMethod]): The gradient-family methods.
        dets (Detections): The instances.
        fwd (Forward): The image's forward pass.
        metainfo (dict): The image's metainfo.
        letterbox (Letterbox): Where the image sits in the network input.
        out_hw (tuple[int, int]): Size of the returned image.

    Returns:
        tuple: ``masks`` (K, H, W) bool on the returned image (nearest-resized when
        ``max_size`` shrank it), and ``{method: (K, H, W) maps}``, or None when the engine's
        target layers are not level maps (then a warning says so, once per engine).
    """
    branch = engine.mask_branch
    masks = branch.masks(fwd.outs, dets, metainfo)
    if tuple(masks.shape[-2:]) != tuple(out_hw) and len(masks):
        masks = torch.nn.functional.interpolate(masks[:, None].float(), size=out_hw,
                                                mode='nearest')[:, 0] > 0.5
    device = fwd.feats[0].device
    maps = {m.name: torch.zeros((len(dets), *out_hw), device=device) for m in methods}
    shared: dict = {}
    if branch.route == 'exact':
        _exact_mask_maps(engine, methods, dets, fwd, metainfo, letterbox, out_hw, maps, shared)
        return masks, maps
    level_names = engine._level_names
    levels = branch.levels(dets, metainfo).tolist()
    for level in sorted(set(levels)):
        layers = mask_layers(engine.layers, level_names, engine.level_aware, level)
        if layers is None:
            if not getattr(engine, '_warned_mask_layers', False):
                engine._warned_mask_layers = True
                warnings.warn(f'mask maps need level-map target layers ({level_names}); '
                              f'{engine.layer_names} are not all level maps, so '
                              '`mask_cams` is None', UserWarning, stacklevel=4)
            return masks, None
        idx_all = [k for k, lv in enumerate(levels) if lv == level]
        for start in range(0, len(idx_all), engine.chunk_size):
            idx = torch.tensor(idx_all[start:start + engine.chunk_size], device=device)
            sub = dets.select(idx.to(dets.labels.device))
            grads = {}
            for layer in layers:
                act = fwd.acts[layer.name]
                grads[layer.name] = (branch.gradient(act, level, sub, metainfo)
                                     if level_names.index(layer.name) == level else
                                     act.new_zeros((len(sub), *act.shape[1:])))
            for m in methods:
                per_layer = [engine._layer_maps(m, layer, fwd, grads, len(sub), shared)
                             for layer in layers]
                maps[m.name][idx] = maths.image_maps(per_layer, letterbox, out_hw)
    return masks, maps


def _exact_mask_maps(engine, methods, dets: Detections, fwd, metainfo: dict, letterbox,
                     out_hw: Tuple[int, int], maps: Dict[str, torch.Tensor],
                     shared: dict) -> None:
    """Mask maps of a branch whose target mixes levels (``route == 'exact'``): the mask
    target, computed on the live head outputs of the one forward pass, backpropagated through
    its full graph to every one of the engine's target layers (one vector-Jacobian product
    per instance, by the engine's ``exact`` route), the layers' maps combined as for several
    target layers. A layer the targets do not depend on gives zero gradients (its map is
    what the method makes of them)."""
    layers = list(engine.layers)
    for start in range(0, len(dets), engine.chunk_size):
        idx = torch.arange(start, min(start + engine.chunk_size, len(dets)),
                           device=fwd.feats[0].device)
        sub = dets.select(idx.to(dets.labels.device))
        target = engine.mask_branch.scores(fwd.outs, sub, metainfo)
        eye = torch.eye(len(sub), dtype=target.dtype, device=target.device)
        acts = [fwd.acts[layer.name] for layer in layers]
        vjps = engine.routes._vjp('exact', [target], acts, [eye])
        grads = {layer.name: (act.new_zeros((len(sub), *act.shape[1:])) if g is None
                              else g[:, 0])
                 for layer, act, g in zip(layers, acts, vjps)}
        for m in methods:
            per_layer = [engine._layer_maps(m, layer, fwd, grads, len(sub), shared)
                         for layer in layers]
            maps[m.name][idx] = maths.image_maps(per_layer, letterbox, out_hw)
