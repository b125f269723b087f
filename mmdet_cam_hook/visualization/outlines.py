"""Instance mask outlines: the border of each predicted mask, drawn on the tiles and cards of
the panels (:mod:`.render`, :mod:`.cards`).

A panel of a model with masks shows every instance's outline on the detections and combined
tiles (as it shows every box there) and, on the tile or card of detection ``k``, instance
``k``'s outline only, so that each map is read against its own mask.

Images are BGR ``uint8`` ``(H, W, 3)``; masks ``(K, H, W)`` bool on the same pixel grid.
"""
from __future__ import annotations

from typing import Optional, Sequence

import cv2
import numpy as np

#: Outline colour of instance masks (BGR cyan: distinct from the green boxes, the magenta miss
#: candidates and JET).
MASK_COLOR = (255, 255, 0)


def line_thickness(shape: Sequence[int]) -> int:
    """Line width of boxes and outlines on an image of ``shape``: 1 px up to ~480 px, growing
    with the image."""
    return max(1, int(round(min(shape[:2]) / 320)))


def resize_masks(masks: np.ndarray, size: Sequence[int]) -> np.ndarray:
    """``(K, H, W)`` masks resized to ``size`` = ``(width, height)`` with nearest neighbour, so
    that a mask drawn on an upscaled or downscaled tile keeps its hard border.

    Args:
        masks (np.ndarray): ``(K, H, W)`` bool masks.
        size (Sequence[int]): ``(width, height)`` of the tile.

    Returns:
        np.ndarray: ``(K, height, width)`` bool.
    """
    masks = np.asarray(masks, dtype=bool)
    width, height = int(size[0]), int(size[1])
    if masks.shape[1:] == (height, width):
        return masks
    if len(masks) == 0:
        return np.zeros((0, height, width), bool)
    return np.stack([cv2.resize(m.astype(np.uint8), (width, height),
                                interpolation=cv2.INTER_NEAREST) > 0 for m in masks]
                    ).reshape(len(masks), height, width)


def draw_mask_outlines(image: np.ndarray, masks: np.ndarray, color=MASK_COLOR,
                       thickness: Optional[int] = None, halo: bool = False) -> np.ndarray:
    """Draw the outline of each instance mask (its outer and inner borders), as thick as the
    boxes :func:`.render.draw_detections` draws unless ``thickness`` is given.

    Args:
        image (np.ndarray): ``(H, W, 3)`` uint8 BGR image (not modified).
        masks (np.ndarray): ``(K, H, W)`` bool masks on the image (``CAMResult.masks``).
        color (tuple[int, int, int]): BGR colour of the outlines. Defaults to cyan.
        thickness (int, optional): Line width in pixels. Defaults to None
            (:func:`line_thickness` of the image).
        halo (bool): Draw a black line 2 px wider under each outline first, as the cards
            outline their boxes, so that it stands out on any colour of the JET map. Defaults
            to False.

    Returns:
        np.ndarray: A new ``(H, W, 3)`` uint8 BGR image.

    Raises:
        TypeError: If ``image`` is not a numpy array.
        ValueError: If ``image`` is not ``(H, W, 3)`` uint8, or the masks are not
            ``(K, H, W)`` of the image's size.
    """
    if not isinstance(image, np.ndarray):
        raise TypeError(f'`image` must be a numpy array, got {type(image).__name__}')
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f'`image` must be an HxWx3 uint8 BGR array, got shape {image.shape} '
                         f'and dtype {image.dtype}')
    masks = np.asarray(masks)
    if masks.ndim != 3 or masks.shape[1:] != image.shape[:2]:
        raise ValueError(f'`masks` must be (K, {image.shape[0]}, {image.shape[1]}) like the '
                         f'image, got {masks.shape}')
    out = image.copy()
    width = line_thickness(image.shape) if thickness is None else int(thickness)
    contours = [c for mask in masks for c in cv2.findContours(
        mask.astype(np.uint8), cv2.RETR_CCOMP, cv2.CHAIN_APPROX_NONE)[0]]
    if halo:
        cv2.drawContours(out, contours, -1, (0, 0, 0), width + 2, cv2.LINE_8)
    cv2.drawContours(out, contours, -1, color, width, cv2.LINE_8)
    return out
