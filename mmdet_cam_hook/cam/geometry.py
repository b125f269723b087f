"""Letterbox geometry: map a map on the network-input grid back onto the original image.

YOLOX's test pipeline resizes with ``keep_ratio`` and pads at the bottom and right to a square
(mmcv's ``Pad`` then overwrites ``img_shape`` with the padded size), so the unpadded part of the
network input is ``round(ori_h * sy) x round(ori_w * sx)`` at the top left.
"""
import functools
import numbers
from dataclasses import dataclass
from typing import Optional, Tuple, TypeVar

import cv2
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

    def grid_to_original(self, maps: torch.Tensor,
                         out_shape: Optional[Tuple[int, int]] = None) -> torch.Tensor:
        """Maps on a coarser grid that spans the network input (a layer's h x w) straight to the
        original image: what :func:`resize_maps` to the input grid followed by
        :meth:`to_original` gives (to float rounding), without writing the input-sized maps.

        Each of the three steps (resize, crop, resize) is linear and acts on rows and columns
        separately, so together they are one (H, h) matrix on the rows and one (W, w) on the
        columns, built once per set of sizes; each map costs two small matrix products.

        Args:
            maps (torch.Tensor): (K, h, w) float maps.
            out_shape (tuple[int, int], optional): (H, W) to resize to. Defaults to None (the
                original size).

        Returns:
            torch.Tensor: (K, H, W) float32 maps on ``maps``' device (new memory).
        """
        h, w = self.ori_shape if out_shape is None else out_shape
        (h_r, w_r), (h_in, w_in) = self.resized_shape, self.input_shape
        rows = _resample_matrix(maps.shape[-2], h_in, h_r, int(h), maps.device)
        cols = _resample_matrix(maps.shape[-1], w_in, w_r, int(w), maps.device)
        return torch.matmul(torch.matmul(rows, maps.float()), cols.T)

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


@functools.lru_cache(maxsize=256)
def resize_matrix(n_in: int, n_out: int) -> torch.Tensor:
    """(n_out, n_in) float64 weights of :func:`resize_maps` along one axis (it is separable),
    on the CPU, computed once per pair of sizes: the one statement of the bilinear weights
    wherever a resize is written as a matrix."""
    eye = torch.eye(n_in, dtype=torch.float64)[None]
    return F.interpolate(eye, size=n_out, mode='linear', align_corners=False)[0].T


@functools.lru_cache(maxsize=64)
def _resample_matrix(n_map: int, n_input: int, n_kept: int, n_out: int,
                     device: torch.device) -> torch.Tensor:
    """(n_out, n_map) float32 on ``device``: resize ``n_map`` points to the input's
    ``n_input``, keep the first ``n_kept`` (the letterbox's crop), resize those to ``n_out``;
    built once per set of sizes and device."""
    both = resize_matrix(n_kept, n_out) @ resize_matrix(n_map, n_input)[:n_kept]
    return both.float().to(device)


# ------------------------------------------------------------------ boxes on a pixel grid
def box_slices(box, height: int, width: int) -> Tuple[slice, slice]:
    """The pixels inside a box: THE rule of the package (metrics, renormalising, the ``box``
    baseline of the faithfulness protocols all use it).

    Pixel ``(row y, column x)`` covers ``[x, x + 1) x [y, y + 1)``; it is inside the box
    ``x1, y1, x2, y2`` when its centre ``(x + 0.5, y + 0.5)`` is, i.e. ``x1 <= x + 0.5 <= x2`` and
    ``y1 <= y + 0.5 <= y2``. For integer boxes that is ``cam[y1:y2, x1:x2]``.

    Args:
        box (array-like): ``x1, y1, x2, y2`` in the grid's pixels.
        height (int): Rows of the grid.
        width (int): Columns of the grid.

    Returns:
        tuple[slice, slice]: ``(rows, columns)``; empty slices when no centre is inside.
    """
    x1, y1, x2, y2 = (float(v) for v in box[:4])

    def span(lo: float, hi: float, n: int) -> slice:
        start = max(int(np.ceil(lo - 0.5)), 0)
        stop = min(int(np.floor(hi - 0.5)) + 1, n)
        return slice(start, max(stop, start))

    return span(y1, y2, height), span(x1, x2, width)


def box_mask(box, height: int, width: int) -> np.ndarray:
    """``(height, width)`` bool: the pixels inside ``box`` (:func:`box_slices`)."""
    mask = np.zeros((height, width), dtype=bool)
    mask[box_slices(box, height, width)] = True
    return mask


def box_iou(box: np.ndarray, others: np.ndarray) -> np.ndarray:
    """IoU of one box ``x1, y1, x2, y2`` with each of ``others`` (N, 4); 0 for an empty union."""
    x1 = np.maximum(box[0], others[:, 0])
    y1 = np.maximum(box[1], others[:, 1])
    x2 = np.minimum(box[2], others[:, 2])
    y2 = np.minimum(box[3], others[:, 3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    area = (box[2] - box[0]) * (box[3] - box[1])
    areas = (others[:, 2] - others[:, 0]) * (others[:, 3] - others[:, 1])
    union = area + areas - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def check_boxes(bboxes, arg: str) -> np.ndarray:
    """``bboxes`` as a (K, 4) float64 array; ValueError naming ``arg`` otherwise."""
    bboxes = np.asarray(bboxes, dtype=np.float64)
    if bboxes.size == 0:
        return bboxes.reshape(0, 4)
    if bboxes.ndim != 2 or bboxes.shape[1] != 4:
        raise ValueError(f'`{arg}` must have shape (K, 4) (x1, y1, x2, y2), got {bboxes.shape}')
    return bboxes


def match_to_ground_truth(bboxes, labels, gt_bboxes, gt_labels,
                          iou_thr: float = 0.5) -> np.ndarray:
    """Match detections to ground truth, greedily in the given (score-descending) order.

    Each detection takes the unmatched ground-truth box of its class with the highest IoU if
    that IoU is at least ``iou_thr``; every ground-truth box is taken at most once.

    Args:
        bboxes (array-like): ``(K, 4)`` detection boxes ``x1, y1, x2, y2``.
        labels (array-like): ``(K,)`` detection class indices.
        gt_bboxes (array-like): ``(G, 4)`` ground-truth boxes.
        gt_labels (array-like): ``(G,)`` ground-truth class indices.
        iou_thr (float): Minimum IoU for a match, in ``(0, 1]``. Defaults to 0.5.

    Returns:
        np.ndarray: ``(K,)`` int64, the matched ground-truth index or -1.

    Raises:
        ValueError: If the shapes disagree or ``iou_thr`` is outside ``(0, 1]``.
    """
    if isinstance(iou_thr, bool) or not isinstance(iou_thr, numbers.Real) \
            or not 0 < iou_thr <= 1:
        raise ValueError(f'`iou_thr` must be a number in (0, 1], got {iou_thr!r}')
    bboxes = check_boxes(bboxes, 'bboxes')
    gt_bboxes = check_boxes(gt_bboxes, 'gt_bboxes')
    labels = np.asarray(labels).reshape(-1)
    gt_labels = np.asarray(gt_labels).reshape(-1)
    if len(bboxes) != len(labels):
        raise ValueError(f'`bboxes` and `labels` must have the same length, got {len(bboxes)} '
                         f'and {len(labels)}')
    if len(gt_bboxes) != len(gt_labels):
        raise ValueError(f'`gt_bboxes` and `gt_labels` must have the same length, got '
                         f'{len(gt_bboxes)} and {len(gt_labels)}')
    taken = np.zeros(len(gt_bboxes), dtype=bool)
    match = np.full(len(bboxes), -1, dtype=np.int64)
    for k, (box, label) in enumerate(zip(bboxes, labels)):
        candidates = ~taken & (gt_labels == label)
        if not candidates.any():
            continue
        ious = np.where(candidates, box_iou(box, gt_bboxes), -1.0)
        best = int(np.argmax(ious))
        if ious[best] >= iou_thr:
            taken[best] = True
            match[k] = best
    return match


def shrink_image(img: np.ndarray, max_size: Optional[int]) -> Tuple[float, np.ndarray]:
    """``(scale, image)``: the image downscaled so that its longer side is at most
    ``max_size`` (unchanged, scale 1.0, when it already is or ``max_size`` is None)."""
    h, w = img.shape[:2]
    if max_size is None or max(h, w) <= max_size:
        return 1.0, img
    scale = max_size / max(h, w)
    size = (max(1, int(round(w * scale))), max(1, int(round(h * scale))))
    return scale, cv2.resize(img, size, interpolation=cv2.INTER_AREA)
