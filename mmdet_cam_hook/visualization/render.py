"""Drawing: JET heat-map overlays, detection boxes and the one-image panel.

All images here are BGR ``uint8`` arrays of shape ``(H, W, 3)``, as OpenCV reads and writes them.
Maps are ``float`` arrays of shape ``(H, W)`` with values in ``[0, 1]`` on the same pixel grid as
the image (the engine's :class:`~mmdet_cam_hook.CAMResult` already holds them that way).

Boxes are ``x1, y1, x2, y2`` in pixels: pixel column ``x`` covers ``[x, x + 1)``.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import cv2
import numpy as np

from ..checks import check_fraction, check_int, check_max_size
from .outlines import MASK_COLOR as MASK_COLOR  # re-exported: the panels' outline colour
from .outlines import draw_mask_outlines as draw_mask_outlines
from .outlines import line_thickness, resize_masks

#: Box colour of detections (BGR green).
DET_COLOR = (0, 255, 0)
#: Box colour of ground-truth boxes on the panel (BGR orange-blue, distinct from green and JET
#: red).
GT_COLOR = (255, 128, 0)
#: How each kind of box is drawn on the cards the image backends get
#: (:mod:`.cards`): BGR ``color``, line ``thickness`` at the card's natural width, ``dashed``.
#: Every line also gets a 1 px black outline, so it stands out on any colour of the JET map.
#: Chosen for a ~330 px display: green and magenta do not occur in JET, white is its only
#: colour-less line. ``false_positive`` is a detection that matches no ground-truth box of its
#: class (IoU >= 0.5, the pointing game's match); ``miss`` a ground-truth box no detection
#: matched; ``candidate`` a miss's best candidate before the threshold and NMS (a detection
#: the model dropped: the detection's colour, dashed); ``mask`` an instance's mask outline.
PALETTE = {
    'detection': dict(color=(0, 255, 0), thickness=2, dashed=False),
    'false_positive': dict(color=(255, 0, 255), thickness=2, dashed=False),
    'ground_truth': dict(color=(255, 255, 255), thickness=2, dashed=False),
    'miss': dict(color=(255, 255, 255), thickness=2, dashed=True),
    'candidate': dict(color=(0, 255, 0), thickness=2, dashed=True),
    'mask': dict(color=MASK_COLOR, thickness=2, dashed=False),
}
#: Small images are upscaled on the panel so that their longer side has at least this many
#: pixels: text drawn on a 128 px tile is not readable.
MIN_TILE_SIZE = 256
#: Panel tiles per row.
PANEL_COLUMNS = 4

_FONT = cv2.FONT_HERSHEY_SIMPLEX
#: White, in every channel: numpy fills an array with a scalar about 100x faster than with a
#: per-channel tuple.
_BACKGROUND = 255
_TEXT_COLOR = (0, 0, 0)
_GAP = 4
_MIN_FONT_SCALE = 0.35


def _check_image(image: np.ndarray, arg: str = 'image') -> None:
    if not isinstance(image, np.ndarray):
        raise TypeError(f'`{arg}` must be a numpy array, got {type(image).__name__}')
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f'`{arg}` must be an HxWx3 uint8 BGR array, got shape '
                         f'{image.shape} and dtype {image.dtype}')


def _check_boxes(bboxes, n_name: str = 'bboxes') -> np.ndarray:
    bboxes = np.asarray(bboxes, dtype=np.float64)
    if bboxes.size == 0:
        return bboxes.reshape(0, 4)
    if bboxes.ndim != 2 or bboxes.shape[1] != 4:
        raise ValueError(f'`{n_name}` must have shape (K, 4) (x1, y1, x2, y2), got '
                         f'{bboxes.shape}')
    return bboxes


def overlay_cam(image: np.ndarray, cam: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Blend a JET heat map of ``cam`` onto ``image``.

    The map is quantised to ``round(255 * cam)``, coloured with ``cv2.COLORMAP_JET`` (0 is dark
    blue, 1 is dark red) and blended as ``(1 - alpha) * image + alpha * heat`` (rounded,
    ``cv2.addWeighted``). Unlike grad-cam's ``show_cam_on_image`` the result is not rescaled by
    its maximum, so the image keeps its brightness.

    Args:
        image (np.ndarray): ``(H, W, 3)`` uint8 BGR image.
        cam (np.ndarray): ``(H, W)`` map with values in ``[0, 1]`` (values outside are clipped,
            NaN counts as 0).
        alpha (float): Weight of the heat map, in ``[0, 1]``. Defaults to 0.5.

    Returns:
        np.ndarray: ``(H, W, 3)`` uint8 BGR image.

    Raises:
        TypeError: If ``image`` or ``cam`` is not a numpy array, or ``alpha`` not a number.
        ValueError: If the shapes do not match or ``alpha`` is outside ``[0, 1]``.
    """
    _check_image(image)
    if not isinstance(cam, np.ndarray):
        raise TypeError(f'`cam` must be a numpy array, got {type(cam).__name__}')
    if cam.shape != image.shape[:2]:
        raise ValueError(f'`cam` must have the image size {image.shape[:2]}, got {cam.shape}')
    alpha = check_fraction(alpha, 'alpha')
    cam = np.clip(np.nan_to_num(cam.astype(np.float32), nan=0.0), 0.0, 1.0)
    heat = cv2.applyColorMap(np.round(cam * 255).astype(np.uint8), cv2.COLORMAP_JET)
    return cv2.addWeighted(image, 1.0 - float(alpha), heat, float(alpha), 0.0)


_line_thickness = line_thickness


def _font_scale(shape: Sequence[int]) -> float:
    # 0.4 on a 256 px image, growing with the image so labels stay in proportion.
    return max(_MIN_FONT_SCALE, min(shape[:2]) / 640)


def _on_canvas(bboxes: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """Boxes clipped to just outside the image, so that the wild (even infinite) boxes of a
    model early in training can still be drawn."""
    h, w = shape[:2]
    bboxes = np.nan_to_num(np.asarray(bboxes, np.float64), nan=0.0, posinf=1e9, neginf=-1e9)
    return np.clip(bboxes, -1.0, [w + 1.0, h + 1.0, w + 1.0, h + 1.0])


def _draw_boxes(image: np.ndarray, bboxes: np.ndarray, color, thickness: int) -> None:
    for x1, y1, x2, y2 in _on_canvas(bboxes, image.shape):
        cv2.rectangle(image, (int(round(x1)), int(round(y1))),
                      (int(round(x2)) - 1, int(round(y2)) - 1), color, thickness,
                      cv2.LINE_8)


def _put_label(image: np.ndarray, text: str, x: float, y: float, color, scale: float) -> None:
    """Draws ``text`` on a filled ``color`` box whose bottom-left is at the box corner."""
    height, width = image.shape[:2]
    thickness = 1 if scale < 0.8 else 2
    pad = 2
    text = _shorten(text, width - 2 * pad, scale, thickness)
    (tw, th), base = cv2.getTextSize(text, _FONT, scale, thickness)
    box_h = th + base + 2 * pad
    left = int(min(max(0, round(x)), max(0, width - tw - 2 * pad)))
    top = int(round(y)) - box_h
    if top < 0:  # no room above the box: put the label inside it, at its top
        top = max(0, int(round(y)))
    top = min(top, max(0, height - box_h))
    cv2.rectangle(image, (left, top), (left + tw + 2 * pad, top + box_h), color, cv2.FILLED)
    cv2.putText(image, text, (left + pad, top + pad + th), _FONT, scale, _TEXT_COLOR, thickness,
                cv2.LINE_AA)


def _shorten(text: str, width: int, scale: float, thickness: int = 1) -> str:
    """``text`` cut from the end, with ``~`` for the cut part, until it fits ``width`` pixels
    (at worst the single character ``~``). A ``class: score`` label loses letters of the class
    name first, so that the score stays readable."""
    def fits(t: str) -> bool:
        return cv2.getTextSize(t, _FONT, scale, thickness)[0][0] <= width

    if fits(text):
        return text
    name, sep, tail = text.rpartition(': ')
    if sep and name:
        tail = sep + tail
        for end in range(len(name) - 1, 0, -1):
            if fits(name[:end] + '~' + tail):
                return name[:end] + '~' + tail
    while len(text) > 1 and not fits(text):
        text = text[:-2] + '~'
    return text


def _class_name(label: int, class_names: Optional[Sequence[str]]) -> str:
    if class_names is None:
        return str(label)
    if not 0 <= label < len(class_names):
        raise ValueError(f'label {label} has no entry in `class_names` (it has '
                         f'{len(class_names)} names): the checkpoint and the class names do not '
                         'match')
    return str(class_names[label])


def _label_text(label: int, score: float, class_names: Optional[Sequence[str]]) -> str:
    return f'{_class_name(label, class_names)}: {score:.2f}'


def draw_detections(image: np.ndarray,
                    bboxes,
                    labels,
                    scores,
                    class_names: Optional[Sequence[str]] = None,
                    color=DET_COLOR) -> np.ndarray:
    """Draw boxes with ``class: score`` labels.

    Line width and text size follow the image size (1 px and the smallest readable font on
    images up to about 300 px). A label goes above its box, or inside it at the top when the box
    touches the image's top edge.

    Args:
        image (np.ndarray): ``(H, W, 3)`` uint8 BGR image (not modified).
        bboxes (array-like): ``(K, 4)`` boxes, ``x1, y1, x2, y2`` in pixels.
        labels (array-like): ``(K,)`` integer class indices.
        scores (array-like): ``(K,)`` scores, printed with two decimals.
        class_names (Sequence[str], optional): Names indexed by label. Defaults to None (the
            label number is printed).
        color (tuple[int, int, int]): BGR colour of boxes and label backgrounds. Defaults to
            green ``(0, 255, 0)``.

    Returns:
        np.ndarray: A new ``(H, W, 3)`` uint8 BGR image.

    Raises:
        ValueError: If the array shapes disagree or a label has no class name.
    """
    _check_image(image)
    bboxes = _check_boxes(bboxes)
    labels = np.asarray(labels).reshape(-1)
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    if not len(bboxes) == len(labels) == len(scores):
        raise ValueError(f'`bboxes`, `labels` and `scores` must have the same length, got '
                         f'{len(bboxes)}, {len(labels)} and {len(scores)}')
    out = image.copy()
    _draw_boxes(out, bboxes, color, _line_thickness(out.shape))
    scale = _font_scale(out.shape)
    for box, label, score in zip(_on_canvas(bboxes, out.shape), labels, scores):
        _put_label(out, _label_text(int(label), float(score), class_names), box[0], box[1],
                   color, scale)
    return out


def _caption_scale(captions: Sequence[str], width: int, height: int) -> float:
    """One font scale for every caption of a panel: in proportion to the tile (``width / 600``,
    but no more than ``height / 100`` so that a wide strip's caption does not dwarf it, and at
    least 0.45), shrunk down to :data:`_MIN_FONT_SCALE` until the longest caption fits."""
    scale = max(0.45, min(width / 600, height / 100))
    longest = max((cv2.getTextSize(c, _FONT, scale, 1)[0][0] for c in captions), default=0)
    while scale > _MIN_FONT_SCALE and longest > width - 4:
        scale = max(_MIN_FONT_SCALE, scale - 0.05)
        longest = max(cv2.getTextSize(c, _FONT, scale, 1)[0][0] for c in captions)
    return scale


def _captioned_tiles(tiles: Sequence[np.ndarray], captions: Sequence[str]) -> list[np.ndarray]:
    """Each tile under a caption bar; all bars have one height and one font scale (the bar's
    height follows the font alone, never the text), so tiles of one size stay one size.
    Captions that do not fit even at the smallest font are shortened with ``~``."""
    height, width = tiles[0].shape[:2]
    scale = _caption_scale(captions, width, height)
    (_, th), base = cv2.getTextSize('Hg', _FONT, scale, 1)
    out = []
    for tile, caption in zip(tiles, captions):
        bar = np.full((th + base + 8, tile.shape[1], 3), _BACKGROUND, dtype=np.uint8)
        cv2.putText(bar, _shorten(caption, tile.shape[1] - 4, scale), (2, 4 + th), _FONT, scale,
                    _TEXT_COLOR, 1, cv2.LINE_AA)
        out.append(np.concatenate([bar, tile], axis=0))
    return out


def _grid(tiles: Sequence[np.ndarray], columns: int) -> np.ndarray:
    """Tiles in rows of ``columns``, each at the top-left of a cell as large as the largest tile
    (so tiles of different sizes can never break the layout)."""
    tile_h = max(t.shape[0] for t in tiles)
    tile_w = max(t.shape[1] for t in tiles)
    rows = math.ceil(len(tiles) / columns)
    columns = min(columns, len(tiles))
    panel = np.full((rows * tile_h + (rows - 1) * _GAP, columns * tile_w + (columns - 1) * _GAP,
                     3), _BACKGROUND, dtype=np.uint8)
    for i, tile in enumerate(tiles):
        r, c = divmod(i, columns)
        y, x = r * (tile_h + _GAP), c * (tile_w + _GAP)
        panel[y:y + tile.shape[0], x:x + tile.shape[1]] = tile
    return panel


def _tile_masks(result, count: int, size: Sequence[int]) -> Optional[np.ndarray]:
    """``result.masks`` (a model with masks) resized to the tiles' ``size`` (width, height),
    or None for a box-only result."""
    masks = getattr(result, 'masks', None)
    if masks is None:
        return None
    masks = np.asarray(masks)
    if masks.shape != (count, *result.image.shape[:2]):
        raise ValueError(f'`result.masks` must have shape {(count, *result.image.shape[:2])}, '
                         f'got {masks.shape}')
    return resize_masks(masks, size)


def render_panel(result,
                 class_names: Optional[Sequence[str]] = None,
                 max_detections: int = 4,
                 max_size: Optional[int] = None,
                 gt_bboxes=None) -> np.ndarray:
    """Render one image that explains all detections of a result.

    Tiles, left to right and then in rows of :data:`PANEL_COLUMNS`, each with a caption above
    it: the original image; the detections (green boxes, ``class: score``, and ``gt_bboxes`` in
    :data:`GT_COLOR` if given); the combined map of all detections with their boxes; then one
    overlay per detection for the ``max_detections`` highest-scoring ones, captioned
    ``#k class score`` with ``k`` the detection's index in ``result``. For a model with masks
    (``result.masks``), every instance's outline (:data:`MASK_COLOR`) is on the detections and
    combined tiles and detection ``k``'s alone on its tile. Images whose longer side is below
    :data:`MIN_TILE_SIZE` are upscaled first so that text stays readable.

    Args:
        result (CAMResult): The engine's result (``image``, ``bboxes``, ``labels``, ``scores``,
            ``cams``, ``combined``, ``method`` and, if there, ``masks`` are used).
        class_names (Sequence[str], optional): Names indexed by label. Defaults to None (label
            numbers).
        max_detections (int): Number of per-detection tiles, at least 0. Defaults to 4.
        max_size (int, optional): If given, the whole panel is downscaled so that its longer
            side is at most this many pixels. Defaults to None (no limit).
        gt_bboxes (array-like, optional): ``(G, 4)`` ground-truth boxes in original-image
            pixels. Defaults to None.

    Returns:
        np.ndarray: The panel, a uint8 BGR image.

    Raises:
        TypeError: If ``max_detections`` or ``max_size`` is not an int.
        ValueError: If ``max_detections`` or ``max_size`` is out of range, or the result's arrays
            disagree in shape.
    """
    max_detections = check_int(max_detections, 'max_detections', low=0)
    max_size = check_max_size(max_size)
    image = result.image
    _check_image(image, 'result.image')
    height, width = image.shape[:2]
    bboxes = _check_boxes(result.bboxes, 'result.bboxes')
    cams = np.asarray(result.cams)
    if cams.shape != (len(bboxes), height, width):
        raise ValueError(f'`result.cams` must have shape {(len(bboxes), height, width)}, got '
                         f'{cams.shape}')
    gt = None if gt_bboxes is None else _check_boxes(gt_bboxes, 'gt_bboxes')

    scale = max(1.0, MIN_TILE_SIZE / max(height, width))
    size = (int(round(width * scale)), int(round(height * scale)))

    def grow(array: np.ndarray) -> np.ndarray:
        if scale == 1.0:
            return array
        return cv2.resize(array, size, interpolation=cv2.INTER_LINEAR)

    base = grow(image)
    boxes = bboxes * scale
    thickness = _line_thickness(base.shape)
    dets = draw_detections(base, boxes, result.labels, result.scores, class_names)
    det_caption = f'detections: {len(bboxes)}'
    if gt is not None:
        _draw_boxes(dets, gt * scale, GT_COLOR, thickness)
        det_caption += f' (GT: {len(gt)})'
    combined = overlay_cam(base, grow(np.asarray(result.combined, dtype=np.float32)))
    _draw_boxes(combined, boxes, DET_COLOR, thickness)
    masks = _tile_masks(result, len(bboxes), size)
    if masks is not None:  # every outline where every box is, each one on its own tile
        dets, combined = (draw_mask_outlines(t, masks, thickness=thickness)
                          for t in (dets, combined))
    tiles = [base, dets, combined]
    captions = ['original', det_caption, f'{result.method}: combined']
    for k in range(min(int(max_detections), len(bboxes))):
        tile = overlay_cam(base, grow(cams[k].astype(np.float32)))
        if masks is not None:
            tile = draw_mask_outlines(tile, masks[k:k + 1], thickness=thickness)
        _draw_boxes(tile, boxes[k:k + 1], DET_COLOR, thickness)
        tiles.append(tile)
        name = _class_name(int(result.labels[k]), class_names)
        captions.append(f'#{k} {name} {float(result.scores[k]):.2f}')
    panel = _grid(_captioned_tiles(tiles, captions), PANEL_COLUMNS)
    if max_size is not None and max(panel.shape[:2]) > max_size:
        factor = max_size / max(panel.shape[:2])
        panel = cv2.resize(panel, (max(1, round(panel.shape[1] * factor)),
                                   max(1, round(panel.shape[0] * factor))),
                           interpolation=cv2.INTER_AREA)
    return panel


#: Box colour of a miss's best candidate (BGR magenta), next to its ground-truth box in
#: :data:`GT_COLOR`.
MISS_COLOR = (255, 0, 255)
#: Box colour of a false positive (a kept detection that matches no ground truth; BGR red).
FP_COLOR = (0, 0, 255)


def render_misses_row(result, class_names: Optional[Sequence[str]] = None,
                      max_misses: int = 3) -> Optional[np.ndarray]:
    """The misses row of a panel, for a result with ground truth (``result.misses``).

    Tiles, each captioned: the detections with false positives in :data:`FP_COLOR` (the
    others in :data:`DET_COLOR`), then, for the first ``max_misses`` misses, the candidate's map
    (the image alone for ``no_candidate``) with the ground-truth box in :data:`GT_COLOR` and
    the candidate's box in :data:`MISS_COLOR`, captioned with the reason
    (:meth:`~mmdet_cam_hook.cam.misses.Miss.caption`, e.g. ``missed: 0.12 < 0.30``).

    Args:
        result (CAMResult): A result with ``misses`` and ``false_positive`` (the records' boxes
            in original-image pixels; the row is drawn at ``result.scale``).
        class_names (Sequence[str], optional): Names indexed by label. Defaults to None.
        max_misses (int): Miss tiles at most, at least 0. Defaults to 3.

    Returns:
        np.ndarray | None: The row (uint8 BGR), or None for a result without ground truth.
    """
    max_misses = check_int(max_misses, 'max_misses', low=0)
    if result.misses is None:
        return None
    image = result.image
    _check_image(image, 'result.image')
    height, width = image.shape[:2]
    scale = max(1.0, MIN_TILE_SIZE / max(height, width))
    size = (int(round(width * scale)), int(round(height * scale)))

    def grow(array: np.ndarray) -> np.ndarray:
        return array if scale == 1.0 else cv2.resize(array, size, interpolation=cv2.INTER_LINEAR)

    base = grow(image)
    thickness = _line_thickness(base.shape)
    boxes = _check_boxes(result.bboxes, 'result.bboxes') * scale
    fp = np.asarray(result.false_positive, dtype=bool).reshape(-1)
    dets = draw_detections(base, boxes[~fp], result.labels[~fp], result.scores[~fp],
                           class_names)
    _draw_boxes(dets, boxes[fp], FP_COLOR, thickness)
    tiles = [dets]
    captions = [f'false positives: {int(fp.sum())}/{len(fp)}, misses: {len(result.misses)}']
    shown = scale * result.scale  # records are in original-image pixels
    for miss in result.misses[:max_misses]:
        cam = miss.cams.get(result.method)
        tile = base.copy() if cam is None else overlay_cam(base, grow(cam.astype(np.float32)))
        _draw_boxes(tile, np.asarray([miss.gt_box]) * shown, GT_COLOR, thickness)
        if miss.candidate_box is not None:
            _draw_boxes(tile, np.asarray([miss.candidate_box]) * shown, MISS_COLOR, thickness)
        tiles.append(tile)
        captions.append(f'GT {miss.gt_index} {_class_name(miss.gt_label, class_names)}: '
                        f'{miss.caption(class_names)}')
    return _grid(_captioned_tiles(tiles, captions), PANEL_COLUMNS)


def stack_rows(panel: np.ndarray, row: Optional[np.ndarray]) -> np.ndarray:
    """``panel`` with ``row`` below it (shrunk to the panel's width if wider, the narrower one
    padded on the right); ``panel`` itself when ``row`` is None."""
    if row is None:
        return panel
    if row.shape[1] > panel.shape[1]:
        factor = panel.shape[1] / row.shape[1]
        row = cv2.resize(row, (panel.shape[1], max(1, round(row.shape[0] * factor))),
                         interpolation=cv2.INTER_AREA)
    width = max(panel.shape[1], row.shape[1])
    out = np.full((panel.shape[0] + _GAP + row.shape[0], width, 3), _BACKGROUND, np.uint8)
    out[:panel.shape[0], :panel.shape[1]] = panel
    out[panel.shape[0] + _GAP:, :row.shape[1]] = row
    return out


def draw_miss(result, miss, class_names: Optional[Sequence[str]] = None) -> np.ndarray:
    """One miss on the image (at ``result.scale``): its candidate's map for ``result.method``
    (the image alone without one), the ground-truth box in :data:`GT_COLOR`, the candidate's
    in :data:`MISS_COLOR` labelled with the reason (e.g. ``missed: 0.12 < 0.30``)."""
    image = result.image
    cam = miss.cams.get(result.method)
    tile = image.copy() if cam is None else overlay_cam(image, cam.astype(np.float32))
    thickness = _line_thickness(tile.shape)
    _draw_boxes(tile, np.asarray([miss.gt_box]) * result.scale, GT_COLOR, thickness)
    if miss.candidate_box is None:
        x1, y1 = np.asarray(miss.gt_box[:2]) * result.scale
    else:
        box = np.asarray([miss.candidate_box]) * result.scale
        _draw_boxes(tile, box, MISS_COLOR, thickness)
        x1, y1 = _on_canvas(box, tile.shape)[0, :2]
    _put_label(tile, miss.caption(class_names), x1, y1, MISS_COLOR, _font_scale(tile.shape))
    return tile
