"""Letterbox geometry: map a map on the network-input grid back onto the original image.

YOLOX's test pipeline resizes with ``keep_ratio`` and pads at the bottom and right to a square
(mmcv's ``Pad`` then overwrites ``img_shape`` with the padded size), so the unpadded part of the
network input is ``round(ori_h * sy) x round(ori_w * sx)`` at the top left.
"""
from dataclasses import dataclass
from typing import Optional, Tuple

import cv2
import numpy as np


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

    def to_original(self, maps: np.ndarray,
                    out_shape: Optional[Tuple[int, int]] = None) -> np.ndarray:
        """Crop the padding off maps on the network-input grid and resize them to the original
        image size (or to ``out_shape``, the original image scaled).

        Args:
            maps (np.ndarray): (K, H_in, W_in) float maps on the network-input grid.
            out_shape (tuple[int, int], optional): (H, W) to resize to. Defaults to None (the
                original size).

        Returns:
            np.ndarray: (K, H, W) float32 maps aligned with the original image.
        """
        h_r, w_r = self.resized_shape
        h, w = self.ori_shape if out_shape is None else out_shape
        out = np.empty((len(maps), h, w), np.float32)
        for k, m in enumerate(maps):
            out[k] = cv2.resize(np.ascontiguousarray(m[:h_r, :w_r], np.float32), (w, h),
                                interpolation=cv2.INTER_LINEAR)
        return out

    def point_to_input(self, x: float, y: float) -> Tuple[float, float]:
        """Map a point in original pixel coordinates to network-input coordinates."""
        h_r, w_r = self.resized_shape
        h, w = self.ori_shape
        return x * w_r / w, y * h_r / h
