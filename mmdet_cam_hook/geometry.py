"""Letterbox geometry: map a map on the network-input grid back onto the original image.

YOLOX's test pipeline resizes with ``keep_ratio`` and pads at the bottom and right to a square
(mmcv's ``Pad`` then overwrites ``img_shape`` with the padded size), so the unpadded part of the
network input is ``round(ori_h * sy) x round(ori_w * sx)`` at the top left.
"""
from dataclasses import dataclass
from typing import Optional, Tuple, TypeVar

import numpy as np
import torch
import torch.nn.functional as F

#: Maps as a tensor (on any device) or a numpy array; the geometry keeps the type.
MapsT = TypeVar('MapsT', torch.Tensor, np.ndarray)


@dataclass(frozen=True)
class Letterbox:
    """Where the original image sits inside the network input.

    Args:
        ori_shape (tuple[int, int]): Original (H, W).
        input_shape (tuple[int, int]): Network input (H, W), padding included.
        scale_factor (tuple[float, float]): (sx, sy) of the resize, as mmcv stores it.
    """

    ori_shape: Tuple[int, int]
    input_shape: Tuple[int, int]
    scale_factor: Tuple[float, float]

    @classmethod
    def from_metainfo(cls, metainfo: dict) -> 'Letterbox':
        """Build from a ``DetDataSample.metainfo`` produced by the test pipeline and the data
        preprocessor (``ori_shape``, ``batch_input_shape`` and ``scale_factor``)."""
        sx, sy = metainfo.get('scale_factor', (1.0, 1.0))
        input_shape = metainfo.get('batch_input_shape', metainfo.get('img_shape'))
        return cls(tuple(int(v) for v in metainfo['ori_shape'][:2]),
                   tuple(int(v) for v in input_shape[:2]), (float(sx), float(sy)))

    @property
    def resized_shape(self) -> Tuple[int, int]:
        """(H, W) of the resized image inside the padded network input."""
        h, w = self.ori_shape
        sx, sy = self.scale_factor
        return (min(int(round(h * sy)), self.input_shape[0]),
                min(int(round(w * sx)), self.input_shape[1]))

    def to_original(self, maps: MapsT, out_shape: Optional[Tuple[int, int]] = None) -> MapsT:
        """Crop the padding off maps on the network-input grid and resize them bilinearly (as
        ``cv2.resize``'s ``INTER_LINEAR``, without antialiasing) to the original image size (or
        to ``out_shape``, the original image scaled), all K at once, on the maps' device.

        Args:
            maps (torch.Tensor | np.ndarray): (K, H_in, W_in) float maps on the network-input
                grid.
            out_shape (tuple[int, int], optional): (H, W) to resize to. Defaults to None (the
                original size).

        Returns:
            torch.Tensor | np.ndarray: (K, H, W) float32 maps aligned with the original image,
            of the type ``maps`` has (new memory, also when no resize is needed).
        """
        as_numpy = isinstance(maps, np.ndarray)
        t = torch.from_numpy(np.asarray(maps, np.float32)) if as_numpy else maps.float()
        h_r, w_r = self.resized_shape
        h, w = self.ori_shape if out_shape is None else out_shape
        t = t[:, :h_r, :w_r]
        if not len(t):
            out = t.new_zeros((0, h, w))
        else:
            out = t.clone() if (h, w) == (h_r, w_r) else resize_maps(t, (h, w))
        return out.numpy() if as_numpy else out

    def point_to_input(self, x: float, y: float) -> Tuple[float, float]:
        """Map a point in original pixel coordinates to network-input coordinates."""
        h_r, w_r = self.resized_shape
        h, w = self.ori_shape
        return x * w_r / w, y * h_r / h


def resize_maps(maps: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    """(K, h, w) maps -> (K, H, W), bilinear without antialiasing, as ``cv2.resize``'s
    ``INTER_LINEAR`` (pixel centres aligned, ``align_corners=False``), on the maps' device; the
    maps themselves when they already have that size. The one resize of maps: grad-cam's (input
    grid) and the letterbox's (original image)."""
    size = (int(size[0]), int(size[1]))
    if tuple(maps.shape[-2:]) == size:
        return maps
    return F.interpolate(maps[:, None], size=size, mode='bilinear', align_corners=False)[:, 0]
