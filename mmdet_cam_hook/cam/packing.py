"""Packing the chain route's vector-Jacobian products: one backward for several detections.

On the chain route each detection's gradient at a target layer T upstream of the level maps is
``J^T v``: its local gradient ``v`` (zero outside the detection's window on its level map)
pulled back through the network between T and that map. That pullback reaches only the
positions of T the window depends on. When those regions of several detections do not meet,
one backward of the sum of their ``v`` gives every one of them: the part of the result inside a
detection's region is its own gradient, since the others' are exactly zero there.

The regions come from where the network's forward pass carries a NaN: NaN set at one position
of T becomes NaN at every position of a level map that depends on it (arithmetic, convolution
with any weight, pooling, normalisation and interpolation all keep it). One probe per phase of
the stride ratio, in a batch, on a blank input of the size explained, gives for each level the
offsets of the dependent window around ``p * stride_T / stride_level``; the union over phases
and one position of margin make the regions used supersets of the true ones. A layer whose NaN
reaches the whole level map (attention, a global pool, GroupNorm), or reaches it only up to its
border, is not packed on that level.

Each packed backward is checked: the result must be exactly zero outside the union of the
packed regions (a detection's true region always spills over its margin if it is larger than
assumed). If it is not, that group and every later one on that layer and level are pulled back
one detection at a time, and a warning says so. Tests check the packed maps against grad-cam's
class run once per detection.
"""
import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ..runtime.state import output_at

#: Positions of margin around each region (see the module docstring).
MARGIN = 1


@dataclass(frozen=True)
class Reach:
    """For one target layer and one level: T position ``p`` reaches level positions
    ``p * ratio + low .. p * ratio + high`` (per axis), so a window ``q0 .. q1`` of the level map
    depends on T positions ``ceil((q0 - high) / ratio) .. floor((q1 - low) / ratio)``, taken
    with :data:`MARGIN` more on each side and clipped to T.

    The offsets hold away from the borders whatever the input size (the network is made of
    shift-equivariant parts), so one probe serves every input size.

    Attributes:
        ratio (tuple[float, float]): stride of T / stride of the level, per axis.
        low (tuple[int, int]): smallest offset of a dependent level position from
            ``p * ratio``, over the probes, per axis.
        high (tuple[int, int]): largest such offset, per axis.
    """

    ratio: Tuple[float, float]
    low: Tuple[int, int]
    high: Tuple[int, int]

    def box(self, y0: int, y1: int, x0: int, x1: int, shape: Tuple[int, int]) -> 'Box':
        """The (inclusive) box of T positions (T of size ``shape``) that a level window rows
        y0..y1, columns x0..x1 depends on, margin included."""
        out = []
        for axis, (q0, q1) in enumerate(((y0, y1), (x0, x1))):
            r = self.ratio[axis]
            first = math.ceil((q0 - self.high[axis]) / r) - MARGIN
            last = math.floor((q1 - self.low[axis]) / r) + MARGIN
            out += [max(first, 0), min(last, shape[axis] - 1)]
        return out[0], out[1], out[2], out[3]


def probe_reach(features, module: nn.Module, inputs_shape: Sequence[int],
                device: torch.device, index: Optional[int] = None
                ) -> Dict[int, Optional[Reach]]:
    """:class:`Reach` of ``module``'s output on every level, from NaN probes (module docstring),
    on the smallest of the input size / 4, / 2 and itself (multiples of 32 pixels) where the
    probes stay off every map's border.

    Args:
        features (Callable): ``inputs -> level maps`` (the adapter's ``features``).
        module (nn.Module): The target layer.
        inputs_shape (Sequence[int]): (1, 3, H_in, W_in) of the network input.
        device (torch.device): Where the model is.
        index (int, optional): The target layer is the ``index``-th map of the tuple the
            module outputs (a ``path:i`` layer). Defaults to None (its whole output).

    Returns:
        dict[int, Reach | None]: Per level, its reach; None where the probes say not to pack
        (the NaN covers the map, touches its border at the full size, or never arrives).
    """
    h_in, w_in = int(inputs_shape[-2]), int(inputs_shape[-1])
    sizes = [(h_in // d, w_in // d) for d in (4, 2) if h_in % (32 * d) == 0
             and w_in % (32 * d) == 0 and min(h_in, w_in) // d >= 128]
    reach: Dict[int, Optional[Reach]] = {}
    for size in [*sizes, (h_in, w_in)]:
        reach = _probe_at(features, module, size, device, index)
        if reach and all(r is not None for r in reach.values()):
            break
    return reach


def _hooked(features, inputs: torch.Tensor, module: nn.Module, hook) -> tuple:
    """``features(inputs)`` without gradients, with ``hook`` as a forward hook of ``module``
    for the call."""
    handle = module.register_forward_hook(hook)
    try:
        with torch.no_grad():
            return features(inputs)
    finally:
        handle.remove()


def _probe_at(features, module: nn.Module, size: Tuple[int, int],
              device: torch.device, index: Optional[int] = None
              ) -> Dict[int, Optional[Reach]]:
    """:func:`probe_reach` at one input size."""
    shape_t: List[Tuple[int, int]] = []

    def measure(mod, args, output):
        shape_t.append(tuple(output_at(output, index).shape[-2:]))

    inputs = torch.zeros((1, 3, *size), device=device)
    plain = _hooked(features, inputs, module, measure)
    if not shape_t:
        return {}
    h_t, w_t = shape_t[0]
    in_h, in_w = size
    stride_t = (in_h / h_t, in_w / w_t)
    # phases: every residue of the stride ratio where T is finer than a level, and two anyway
    steps = [max(2, max(int(round(in_h / f.shape[-2] / stride_t[0])) for f in plain)),
             max(2, max(int(round(in_w / f.shape[-1] / stride_t[1])) for f in plain))]
    centre = (h_t // 2, w_t // 2)
    probes = [(centre[0] + i, centre[1] + j) for i in range(steps[0]) for j in range(steps[1])]
    if any(py >= h_t or px >= w_t for py, px in probes):
        return {level: None for level in range(len(plain))}

    def inject(mod, args, output):
        out = output_at(output, index).clone()
        for b, (py, px) in enumerate(probes):
            out[b, :, py, px] = float('nan')
        if index is None:
            return out
        items = list(output)
        items[index] = out
        return type(output)(items)

    maps = _hooked(features, inputs.expand(len(probes), *inputs.shape[1:]).contiguous(),
                   module, inject)
    reach: Dict[int, Optional[Reach]] = {}
    for level, fmap in enumerate(maps):
        h, w = fmap.shape[-2:]
        ratio = (stride_t[0] / (in_h / h), stride_t[1] / (in_w / w))
        low, high, ok = [math.inf, math.inf], [-math.inf, -math.inf], True
        for b, (py, px) in enumerate(probes):
            hit = torch.isnan(fmap[b]).any(dim=0)
            if not bool(hit.any()):
                ok = False
                break
            rows, cols = hit.any(dim=1).nonzero()[:, 0], hit.any(dim=0).nonzero()[:, 0]
            r0, r1, c0, c1 = int(rows[0]), int(rows[-1]), int(cols[0]), int(cols[-1])
            if r0 == 0 or c0 == 0 or r1 == h - 1 or c1 == w - 1:
                ok = False  # reaches the border: the whole map, or a reach cut by it
                break
            for axis, (q0, q1, p) in enumerate(((r0, r1, py), (c0, c1, px))):
                low[axis] = min(low[axis], math.floor(q0 - p * ratio[axis]))
                high[axis] = max(high[axis], math.ceil(q1 - p * ratio[axis]))
        reach[level] = Reach(ratio, (int(low[0]), int(low[1])),
                             (int(high[0]), int(high[1]))) if ok else None
    return reach


Box = Tuple[int, int, int, int]


def _meet(a: Box, b: Box) -> bool:
    return not (a[1] < b[0] or b[1] < a[0] or a[3] < b[2] or b[3] < a[2])


def pack(boxes: Sequence[Sequence[Box]]) -> List[List[int]]:
    """Groups of members whose boxes do not meet, greedily in order: each member joins the first
    group none of whose members' boxes meet its own, on any layer.

    Args:
        boxes (Sequence[Sequence[Box]]): Per member, one inclusive ``(y0, y1, x0, x1)`` box per
            layer.

    Returns:
        list[list[int]]: The groups, as indices into ``boxes``.
    """
    groups: List[List[int]] = []
    for k, mine in enumerate(boxes):
        for group in groups:
            if not any(_meet(a, b) for j in group for a, b in zip(mine, boxes[j])):
                group.append(k)
                break
        else:
            groups.append([k])
    return groups
