"""What the engine returns: :class:`CAMResult`, one method's per-detection maps of one image,
and the rules on finished maps (the combined map, renormalising inside boxes or instance
masks)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import List, NamedTuple, Optional, Tuple, Union

import numpy as np
import torch

from ..adapters import Detections
from . import maths
from .geometry import Letterbox, box_slices

__all__ = ['CAMResult', 'CAMTensors', 'RENORMALIZE', 'check_renormalize', 'renormalize_in_boxes',
           'renormalize_in_masks', 'combined_map']

#: What ``renormalize=`` takes: False/None (raw maps), True or ``'box'`` (inside each
#: detection's box), ``'mask'`` (inside each instance's predicted mask, for models with masks).
RENORMALIZE = (False, True, 'box', 'mask')
Renormalize = Union[None, bool, str]


def check_renormalize(renormalize: Renormalize, arg: str = 'renormalize') -> Optional[str]:
    """``renormalize`` as None (raw maps), ``'box'`` or ``'mask'``.

    Args:
        renormalize (None | bool | str): One of :data:`RENORMALIZE` (None as False).
        arg (str): The argument's name in the error. Defaults to ``'renormalize'``.

    Returns:
        str | None: ``'box'`` (for True too), ``'mask'``, or None.

    Raises:
        ValueError: On another value, naming the choices.
    """
    if renormalize is None or renormalize is False:
        return None
    if renormalize is True:
        return 'box'
    if isinstance(renormalize, str) and renormalize in ('box', 'mask'):
        return renormalize
    raise ValueError(f'`{arg}` must be one of {list(RENORMALIZE)}, got {renormalize!r}')


@dataclass
class CAMResult:
    """Per-detection CAMs of one image for one method (K detections, sorted by score).

    Attributes:
        bboxes (np.ndarray): (K, 4) float32 x1y1x2y2 in original-image pixels.
        labels (np.ndarray): (K,) int64 class indices.
        scores (np.ndarray): (K,) float32, the scores ``model.predict`` reports (the head's own
            formula, e.g. ``sigmoid(cls) * sigmoid(obj)`` for YOLOX).
        levels (np.ndarray): (K,) int64 level of each detection, in the head's own order (0 is
            the finest for YOLOX, RTMDet and FPN heads; YOLOv3 puts stride 32 first).
        cams (np.ndarray): (K, H, W) float32 in [0, 1], one map per detection, original size.
        combined (np.ndarray): (H, W) float32 in [0, 1], the pixel-wise maximum of ``cams``.
        method (str): The CAM method.
        layers (list[list[str]]): The target layers used for each detection.
        image (np.ndarray): (H, W, 3) uint8 BGR, the original image.
        input_cams (np.ndarray | None): (K, H_in, W_in) the maps on the network-input grid,
            before the letterbox is undone (the grid on which they equal grad-cam's own
            output); None from an engine built with ``keep_input_cams=False``.
        letterbox (Letterbox): Where the image sits inside the network input.
        scale (float): Size of ``image`` (and ``cams``, ``combined``, ``bboxes``) relative to the
            original image: 1.0 unless ``explain(max_size=...)`` downscaled them.
        detections (Detections | None): The adapter's detections the maps explain (boxes in
            original pixels, with each one's prior, label and level; RoIs or queries), on the
            model's device, for re-scoring them (the faithfulness probe) without decoding the
            image again. None for a result not made by the engine.
        misses (list[Miss] | None): With ground truth (``explain(gt_bboxes=..., gt_labels=...)``):
            one :class:`~mmdet_cam_hook.cam.misses.Miss` per ground-truth box no detection
            matched, with its best candidate, the reason and the candidate's map per method
            (the same list in every method's result). None without ground truth.
        false_positive (np.ndarray | None): (K,) bool with ground truth: the detection matches
            no ground-truth box (same class, IoU >= 0.5). None without ground truth.
        contrast_labels (np.ndarray | None): (K,) int64 class B of each detection when the
            maps are contrastive (``explain(..., contrast=...)``: ``cams`` explain ``score[A] -
            score[B]``, A being ``labels``); None otherwise.
        masks (np.ndarray | None): (K, H, W) bool, each instance's predicted mask on
            ``image`` (equal to ``model.predict``'s masks at the original size); None for a
            box-only detector.
        mask_cams (np.ndarray | None): (K, H, W) float32 in [0, 1], each instance's mask map:
            the evidence for its own predicted mask (the mask target of
            :mod:`~mmdet_cam_hook.adapters.masks`), for gradient-family methods of a model
            with masks; None otherwise. ``renormalize`` (box or mask) leaves them raw.
    """

    bboxes: np.ndarray
    labels: np.ndarray
    scores: np.ndarray
    levels: np.ndarray
    cams: np.ndarray
    combined: np.ndarray
    method: str
    layers: List[List[str]]
    image: np.ndarray = field(repr=False)
    input_cams: Optional[np.ndarray] = field(repr=False)
    letterbox: Letterbox = field(repr=False)
    scale: float = 1.0
    detections: Optional[Detections] = field(default=None, repr=False)
    misses: Optional[List[Miss]] = field(default=None, repr=False)  # noqa: F821
    false_positive: Optional[np.ndarray] = field(default=None, repr=False)
    contrast_labels: Optional[np.ndarray] = None
    masks: Optional[np.ndarray] = field(default=None, repr=False)
    mask_cams: Optional[np.ndarray] = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.scores)

    @property
    def ori_shape(self) -> Tuple[int, int]:
        return self.image.shape[:2]

    @classmethod
    def from_tensors(cls, method: str, img: np.ndarray, scale: float, dets: Detections,
                     cams: torch.Tensor, input_maps: Optional[torch.Tensor],
                     used: List[List[str]], letterbox: Letterbox,
                     renormalize: Renormalize,
                     contrast_labels: Optional[torch.Tensor] = None,
                     masks: Optional[torch.Tensor] = None,
                     mask_cams: Optional[torch.Tensor] = None) -> CAMResult:
        """The engine's result of one method from its maps on the device: only the finished
        maps leave it (``combined`` is computed there); ``renormalize`` (one of
        :data:`RENORMALIZE`) and ``contrast_labels`` (class B of each detection) as in
        ``explain``; ``masks`` and ``mask_cams`` of an instance-segmentation model."""
        within = check_renormalize(renormalize)
        combined = combined_map(cams, img.shape[:2])
        bboxes = dets.bboxes.detach().cpu().numpy().astype(np.float32) * np.float32(scale)
        result = cls(
            bboxes=bboxes,
            labels=dets.labels.cpu().numpy().astype(np.int64),
            scores=dets.scores.detach().cpu().numpy().astype(np.float32),
            levels=dets.levels.cpu().numpy().astype(np.int64),
            cams=cams.cpu().numpy(),
            combined=combined.cpu().numpy(),
            method=method,
            layers=used,
            image=img,
            input_cams=None if input_maps is None else input_maps.cpu().numpy(),
            letterbox=letterbox,
            scale=scale,
            detections=dets,
            contrast_labels=None if contrast_labels is None else
            contrast_labels.cpu().numpy().astype(np.int64),
            masks=None if masks is None else masks.cpu().numpy().astype(bool),
            mask_cams=None if mask_cams is None else mask_cams.clamp(0.0, 1.0).cpu().numpy())
        return result.renormalized(copy=False, within=within) if within else result

    def tensors(self, device: Optional[torch.device] = None) -> CAMTensors:
        """The maps as torch tensors, for GPU users (numpy stays the default form).

        Args:
            device (torch.device, optional): Where to put them. Defaults to None: the model's
                device (that of :attr:`detections`; the CPU for a result without them).

        Returns:
            CAMTensors: ``cams`` (K, H, W), ``combined`` (H, W) and ``input_cams`` (or None),
            float32.
        """
        if device is None:
            device = self.detections.bboxes.device if self.detections is not None else 'cpu'
        return CAMTensors(
            torch.from_numpy(self.cams).to(device),
            torch.from_numpy(self.combined).to(device),
            None if self.input_cams is None else torch.from_numpy(self.input_cams).to(device))

    def renormalized(self, copy: bool = True, within: str = 'box') -> CAMResult:
        """This result with each map min-max scaled inside its own box (or instance mask) and
        zeroed outside (:func:`renormalize_in_boxes`, :func:`renormalize_in_masks`) and
        ``combined`` recomputed: what ``explain(..., renormalize=True)`` (or
        ``renormalize='mask'``) returns. ``input_cams`` and ``mask_cams`` keep the raw maps.

        Args:
            copy (bool): Leave this result's maps as they are (a new result with new maps).
                False rescales ``cams`` in place and updates this result. Defaults to True.
            within (str): ``'box'``: each detection's box; ``'mask'``: each instance's
                predicted mask (:attr:`masks`). Defaults to 'box'.

        Returns:
            CAMResult: The renormalised result (``self`` when ``copy=False``).

        Raises:
            ValueError: On another ``within``, or ``'mask'`` for a result without masks (a
                box-only detector).
        """
        if within not in ('box', 'mask'):
            raise ValueError(f"`within` must be one of ['box', 'mask'], got {within!r}")
        if within == 'mask' and self.masks is None:
            raise ValueError("`renormalize='mask'` needs instance masks, and this result has "
                             "none (a box-only detector); use renormalize=True (in the boxes)")
        res = dataclasses.replace(self) if copy else self
        out = None if copy else self.cams
        res.cams = (renormalize_in_masks(self.cams, self.masks, out=out) if within == 'mask'
                    else renormalize_in_boxes(self.cams, self.bboxes, out=out))
        res.combined = combined_map(torch.from_numpy(res.cams), self.combined.shape).numpy()
        return res


class CAMTensors(NamedTuple):
    """:meth:`CAMResult.tensors`: a result's maps as torch tensors."""

    cams: torch.Tensor
    combined: torch.Tensor
    input_cams: Optional[torch.Tensor]


def combined_map(cams: torch.Tensor, shape: Tuple[int, int]) -> torch.Tensor:
    """The pixel-wise maximum of the (K, H, W) float32 maps (:func:`.maths.pixelwise_max`), on
    their device; zeros of ``shape`` if K = 0: the one rule for ``CAMResult.combined``."""
    return maths.pixelwise_max(cams) if len(cams) else cams.new_zeros(shape)


def renormalize_in_boxes(cams: np.ndarray, bboxes: np.ndarray,
                         out: Optional[np.ndarray] = None) -> np.ndarray:
    """Min-max each map inside its own box and zero it outside (grad-cam's
    ``renormalize_cam_in_bounding_boxes``, applied per detection). The one implementation of
    ``renormalize``: :meth:`CAMResult.renormalized` (and so ``explain(renormalize=True)``)
    uses it.

    Args:
        cams (np.ndarray): (K, H, W) maps.
        bboxes (np.ndarray): (K, 4) x1y1x2y2 boxes in the maps' pixels.
        out (np.ndarray, optional): Where to write the result; may be ``cams`` itself (in
            place). Defaults to None (a new array).

    Returns:
        np.ndarray: (K, H, W) renormalised maps (``out`` if given).
    """
    out = np.empty_like(cams) if out is None else out
    h, w = cams.shape[1:]
    for k, (cam, box) in enumerate(zip(cams, bboxes)):
        rows, cols = box_slices(box, h, w)
        inside = cam[None, rows, cols].astype(np.float32)
        inside = maths.scale_maps(torch.from_numpy(inside))[0].numpy() if inside.size else None
        out[k] = 0.0
        if inside is not None:
            out[k, rows, cols] = inside
    return out


def renormalize_in_masks(cams: np.ndarray, masks: np.ndarray,
                         out: Optional[np.ndarray] = None) -> np.ndarray:
    """Min-max each map over the pixels of its own instance mask (grad-cam's scaling, as
    :func:`renormalize_in_boxes` does in the box) and zero it outside; a map whose mask is
    empty becomes all zero. ``CAMResult.renormalized(within='mask')`` (and so
    ``explain(renormalize='mask')``) uses it.

    Args:
        cams (np.ndarray): (K, H, W) maps.
        masks (np.ndarray): (K, H, W) bool instance masks on the maps' pixels.
        out (np.ndarray, optional): Where to write the result; may be ``cams`` itself (in
            place). Defaults to None (a new array).

    Returns:
        np.ndarray: (K, H, W) renormalised maps (``out`` if given).

    Raises:
        ValueError: If ``masks`` does not have the maps' shape.
    """
    masks = np.asarray(masks, dtype=bool)
    if masks.shape != cams.shape:
        raise ValueError(f'`masks` must have the shape of `cams` {cams.shape}, got {masks.shape}')
    out = np.empty_like(cams) if out is None else out
    for k, (cam, mask) in enumerate(zip(cams, masks)):
        inside = cam[mask].astype(np.float32)
        out[k] = 0.0
        if inside.size:
            out[k][mask] = maths.scale_maps(torch.from_numpy(inside)[None, None])[0, 0].numpy()
    return out
