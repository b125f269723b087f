"""The local-window gradient: d score / d level feature map without a backward through the head.

A dense head's score at prior (y, x) of level l reads that level's feature map only through the
head's branches (:meth:`DetectorAdapter.window_branches`). When every module there is a stride-1
'same' zero-padded convolution or a per-position operation, the score depends on a
(2r+1) x (2r+1) window of the map around (y, x), r being the largest sum of
``(k - 1) // 2 * dilation`` over a branch. The window is cut out (zero outside the map, as the
convolutions pad), the branches run on the K windows as one batch with the off-map positions
zeroed before every spatial convolution (a forward pre-hook, so that border windows see the same
zero padding as the full map), and one ``autograd.grad`` gives every detection's gradient. It
equals the full backward exactly.

Anything this module does not know to be per-position (GroupNorm, LayerNorm, pooling, attention,
deformable convolution, BatchNorm without running statistics, an unknown module) reads beyond
the window, and the engine then takes the exact route instead: there is no approximate shortcut.
"""
import contextlib
from typing import Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..adapters import Detections, DetectorAdapter


def _per_position_types() -> Tuple[type, ...]:
    from mmcv.cnn import Scale
    from mmcv.cnn.bricks.activation import Clamp
    from mmcv.cnn.bricks.hsigmoid import HSigmoid
    from mmcv.cnn.bricks.hswish import HSwish
    from mmcv.cnn.bricks.swish import Swish

    return (nn.Identity, nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU,
            nn.GELU, nn.SiLU, nn.Mish, nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardsigmoid,
            nn.Hardtanh, nn.Softplus, nn.Dropout, nn.Dropout2d, Swish, HSwish, HSigmoid, Clamp,
            Scale)


def _container_types() -> Tuple[type, ...]:
    from mmcv.cnn import ConvModule, DepthwiseSeparableConvModule

    return (nn.Sequential, nn.ModuleList, ConvModule, DepthwiseSeparableConvModule)


def _conv_forwards() -> Tuple:
    from mmcv.cnn.bricks.wrappers import Conv2d as MMCVConv2d

    return (nn.Conv2d.forward, MMCVConv2d.forward)


def _conv_radius(conv: nn.Conv2d) -> Optional[Tuple[int, int]]:
    """(rows, cols) radius of a stride-1 'same' zero-padded conv, None for any other conv."""
    if type(conv).forward not in _conv_forwards():
        return None  # a subclass with its own forward (adaptive padding, deformable, ...)
    ks, ds = conv.kernel_size, conv.dilation
    if any(k % 2 == 0 for k in ks) or set(conv.stride) != {1} or conv.padding_mode != 'zeros':
        return None
    same = tuple((k - 1) // 2 * d for k, d in zip(ks, ds))
    if conv.padding != 'same' and tuple(conv.padding) != same:
        return None
    return same


def _module_radius(module: nn.Module, assume_eval: bool) -> Optional[Tuple[int, int]]:
    """Receptive radius of one module run in series, None if it is not window-exact."""
    if isinstance(module, nn.Conv2d):
        return _conv_radius(module)
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        # normalises with running statistics only in eval mode, and only if it keeps them
        ok = module.running_mean is not None and (assume_eval or not module.training)
        return (0, 0) if ok else None
    if isinstance(module, _per_position_types()):
        if isinstance(module, (nn.Dropout, nn.Dropout2d)) and module.training and not assume_eval:
            return None
        return (0, 0)
    if type(module) in _container_types():
        if getattr(module, 'with_explicit_padding', False):
            return None  # ConvModule padding with a reflect/replicate layer
        total = (0, 0)
        for child in module.children():
            r = _module_radius(child, assume_eval)
            if r is None:
                return None
            total = (total[0] + r[0], total[1] + r[1])
        return total
    return None


def window_radius(branches: Optional[Sequence[Sequence[nn.Module]]],
                  assume_eval: bool = True) -> Optional[int]:
    """Radius of the window a score reads, or None if the branches are not window-exact.

    Args:
        branches (Sequence[Sequence[nn.Module]] | None): From
            :meth:`DetectorAdapter.window_branches`.
        assume_eval (bool): Judge BatchNorm and Dropout as the engine runs them (eval mode)
            rather than by their current ``training`` flag. Defaults to True.

    Returns:
        int | None: max over branches of the sum of ``(k - 1) // 2 * dilation``.
    """
    if not branches:
        return None
    radius = 0
    for branch in branches:
        rows = cols = 0
        for module in branch:
            r = _module_radius(module, assume_eval)
            if r is None:
                return None
            rows, cols = rows + r[0], cols + r[1]
        radius = max(radius, rows, cols)
    return radius


def _spatial_convs(branches: Sequence[Sequence[nn.Module]]) -> List[nn.Conv2d]:
    seen, out = set(), []
    for branch in branches:
        for module in branch:
            for m in module.modules():
                if isinstance(m, nn.Conv2d) and max(m.kernel_size) > 1 and id(m) not in seen:
                    seen.add(id(m))
                    out.append(m)
    return out


@contextlib.contextmanager
def _zero_off_map(convs: Sequence[nn.Conv2d], mask: torch.Tensor) -> Iterator[None]:
    """Multiply the input of every spatial conv by ``mask`` (1 inside the map, 0 outside)."""

    def pre_hook(module, args):
        return (args[0] * mask, *args[1:])

    handles = []
    try:
        for conv in convs:
            handles.append(conv.register_forward_pre_hook(pre_hook))
        yield
    finally:
        for handle in handles:
            handle.remove()


class LocalGradient:
    """Gradients of detection scores w.r.t. the feature map of their own level, per window.

    Args:
        adapter (DetectorAdapter): The detector's adapter.
    """

    def __init__(self, adapter: DetectorAdapter) -> None:
        self.adapter = adapter
        self.branches = {}
        self.radii = {}
        for level in range(len(adapter.strides())):
            branches = adapter.window_branches(level)
            self.branches[level] = branches
            self.radii[level] = window_radius(branches)

    @property
    def available(self) -> bool:
        """True when every level has an exact window."""
        return bool(self.radii) and all(r is not None for r in self.radii.values())

    def __call__(self, feat: torch.Tensor, level: int, dets: Detections) -> torch.Tensor:
        """Gradients of ``dets``' scores (all on ``level``) w.r.t. ``feat`` (1, C, h, w).

        Returns:
            torch.Tensor: (K, C, h, w), zero outside each detection's window.
        """
        return self.windows(feat, level, dets).dense()

    def windows(self, feat: torch.Tensor, level: int, dets: Detections) -> 'WindowGradients':
        """:meth:`__call__`'s gradients kept as their windows (what the maths of most methods
        reads; :meth:`WindowGradients.dense` gives the full maps)."""
        r = self.radii[level]
        if r is None:
            raise ValueError(f'level {level} has no exact local window')
        _, c, h, w = feat.shape
        size = 2 * r + 1
        # rows and columns of each detection's window in the map padded by r: (K, size, 1)
        # and (K, 1, size); one gather and one scatter for all K (no per-detection indexing)
        offsets = torch.arange(size, device=feat.device)
        rows = (dets.ys.to(feat.device).long()[:, None] + offsets)[:, :, None]
        cols = (dets.xs.to(feat.device).long()[:, None] + offsets)[:, None, :]
        patches = _gather(feat.detach(), rows, cols, r)  # (K, C, size, size), zero off the map
        patches.requires_grad_(True)
        mask = _gather(torch.ones((1, 1, h, w), dtype=feat.dtype, device=feat.device), rows,
                       cols, r)
        with torch.enable_grad(), _zero_off_map(_spatial_convs(self.branches[level]), mask):
            scores = self.adapter.window_scores(level, patches, dets)
            (grad, ) = torch.autograd.grad(scores.sum(), patches)
        return WindowGradients(grad, rows, cols, r, (h, w))


class WindowGradients:
    """K gradients w.r.t. a (1, C, h, w) map that are zero outside a (2r+1) x (2r+1) window
    each, kept as the windows.

    Args:
        values (torch.Tensor): (K, C, s, s) the gradients inside the windows (zero off the map).
        rows (torch.Tensor): (K, s, 1) each window's rows in the map zero-padded by ``radius``.
        cols (torch.Tensor): (K, 1, s) its columns there.
        radius (int): r.
        shape (tuple[int, int]): (h, w) of the map.
    """

    def __init__(self, values: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor,
                 radius: int, shape: Tuple[int, int]) -> None:
        self.values, self.rows, self.cols = values, rows, cols
        self.radius, self.shape = radius, (int(shape[0]), int(shape[1]))

    def __len__(self) -> int:
        return len(self.values)

    def gather(self, maps: torch.Tensor) -> torch.Tensor:
        """(1, C', h, w) maps -> (K, C', s, s): their values at each window's positions, zero
        off the map."""
        return _gather(maps, self.rows, self.cols, self.radius)

    def scatter(self, values: torch.Tensor) -> torch.Tensor:
        """(K, C', s, s) values at the windows' positions -> (K, C', h, w) maps, zero
        elsewhere."""
        (h, w), r = self.shape, self.radius
        full = values.new_zeros((len(values), values.shape[1], h + 2 * r, w + 2 * r))
        k = torch.arange(len(values), device=values.device)[:, None, None]
        full.permute(0, 2, 3, 1)[k, self.rows, self.cols] = values.permute(0, 2, 3, 1)
        return full[:, :, r:r + h, r:r + w]

    def dense(self) -> torch.Tensor:
        """(K, C, h, w): the gradients on the whole map."""
        return self.scatter(self.values)


def _gather(maps: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor,
            radius: int) -> torch.Tensor:
    """(1, C', h, w) maps -> (K, C', s, s), their values at the windows ``rows`` (K, s, 1) x
    ``cols`` (K, 1, s) of the map zero-padded by ``radius``."""
    padded = F.pad(maps, (radius, radius, radius, radius))[0]
    return padded[:, rows, cols].permute(1, 0, 2, 3)
