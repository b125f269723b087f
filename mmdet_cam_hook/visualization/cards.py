"""Cards: the images the hook sends to image backends (TensorBoard, W&B, MLflow), drawn for the
~330 px-wide card those tools fit an image into by default.

Per probe and method: one overview (the combined map with every detection's box, numbered,
and the ground truth) and one card per detection (its own map, its box and, if it matched one,
its ground-truth box), each :data:`CARD_WIDTH` pixels wide with a caption bar whose capital
letters are :data:`CARD_LABEL_PX` pixels tall, so that they stay at least 9 px tall when the
card is shown 220 px wide or more. Labels are in the caption bar or next to a box, never over
its inside (a box as tall as the image, which has no room above or below, is the exception).
Colours and line widths are :data:`.render.PALETTE`'s. For a model with masks, the overview
shows every instance's mask outline and a detection's card its own only.

Each card has a slot name that stays meaningful when the detections change between
validations (:func:`detection_slots`), so that the step slider of one card walks through
training for one object.

Images are BGR ``uint8``; boxes ``x1, y1, x2, y2`` in the result's pixels.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import cv2
import numpy as np

from ..checks import check_int, check_max_size
from .render import (
    _BACKGROUND,
    _FONT,
    _TEXT_COLOR,
    PALETTE,
    _check_boxes,
    _check_image,
    _class_name,
    _on_canvas,
    _shorten,
    _tile_masks,
    draw_mask_outlines,
    overlay_cam,
)

#: Natural width of every card, in pixels (TensorBoard's default card shows ~325 px).
CARD_WIDTH = 320
#: OpenCV font scale and thickness of captions and box tags at :data:`CARD_WIDTH`.
CARD_FONT_SCALE = 0.6
CARD_FONT_THICKNESS = 1
#: Height, in pixels at :data:`CARD_WIDTH`, of a capital letter of the captions and tags (the
#: drawn text's cap height, which is about 0.7 of a CSS font size).
CARD_LABEL_PX = cv2.getTextSize('H', _FONT, CARD_FONT_SCALE, CARD_FONT_THICKNESS)[0][1]
#: Slot name of the overview card (sorts before the detection slots).
OVERVIEW_SLOT = 'all'
_PAD = 4
_DASH = (6, 6)  # dash and gap lengths of a dashed line


def detection_slots(count: int, match=None) -> List[str]:
    """Stable names of the first ``count`` detections' cards (in the result's, score-descending,
    order).

    Without ground truth (``match`` None) a slot is the detection's rank: ``det_0`` is the
    highest-scoring detection of that validation. With ground truth, a detection that matched
    ground-truth box ``j`` is ``gt_j``, whatever its rank, so that card follows one object
    through training; the others are false positives, ``fp_0``, ``fp_1``, ... by rank among them.

    Args:
        count (int): Number of detections with a card.
        match (array-like, optional): ``(K,)`` ground-truth index per detection, -1 for none
            (:func:`~mmdet_cam_hook.evaluation.metrics.match_to_ground_truth`), ``K >= count``.
            Defaults to None.

    Returns:
        list[str]: ``count`` distinct names.

    Raises:
        ValueError: If ``match`` has fewer than ``count`` entries.
    """
    if match is None:
        return [f'det_{k}' for k in range(count)]
    match = np.asarray(match, dtype=np.int64).reshape(-1)
    if len(match) < count:
        raise ValueError(f'`match` has {len(match)} entries for {count} detections')
    slots, false_positives = [], 0
    for j in match[:count]:
        if j >= 0:
            slots.append(f'gt_{int(j)}')
        else:
            slots.append(f'fp_{false_positives}')
            false_positives += 1
    return slots


def render_cards(result,
                 class_names: Optional[Sequence[str]] = None,
                 max_detections: int = 4,
                 max_size: Optional[int] = None,
                 gt_bboxes=None,
                 match=None) -> Dict[str, np.ndarray]:
    """The overview and one card per detection for the ``max_detections`` highest-scoring
    detections, by slot name (:func:`detection_slots`; the overview is :data:`OVERVIEW_SLOT`),
    and, for a result with misses (``explain(gt_bboxes=...)``), one card per miss (at most
    ``max_detections``), slot ``miss_{gt_index}``.

    Args:
        result (CAMResult): The engine's result (``image``, ``bboxes``, ``labels``, ``scores``,
            ``cams``, ``combined``, ``method`` and, if there, ``masks`` are used).
        class_names (Sequence[str], optional): Names indexed by label. Defaults to None.
        max_detections (int): Number of detection cards, at least 0. Defaults to 4.
        max_size (int, optional): If given, a card whose longer side is above this many pixels
            is downscaled to it. Defaults to None.
        gt_bboxes (array-like, optional): ``(G, 4)`` ground-truth boxes in the result's pixels.
            Defaults to None.
        match (array-like, optional): ``(K,)`` ground-truth index per detection, -1 for none;
            only with ``gt_bboxes``. Detections without a match are drawn as false positives and
            ground-truth boxes no detection matched as misses. Defaults to None.

    Returns:
        dict[str, np.ndarray]: The cards, uint8 BGR, :data:`CARD_WIDTH` wide (less if
        ``max_size`` is smaller), the overview first.

    Raises:
        TypeError: If ``max_detections`` or ``max_size`` is not an int.
        ValueError: If an argument is out of range or the result's arrays disagree in shape.
    """
    max_detections = check_int(max_detections, 'max_detections', low=0)
    max_size = check_max_size(max_size)
    _check_image(result.image, 'result.image')
    bboxes = _check_boxes(result.bboxes, 'result.bboxes')
    height, width = result.image.shape[:2]
    cams = np.asarray(result.cams)
    if cams.shape != (len(bboxes), height, width):
        raise ValueError(f'`result.cams` must have shape {(len(bboxes), height, width)}, got '
                         f'{cams.shape}')
    gt = None if gt_bboxes is None else _check_boxes(gt_bboxes, 'gt_bboxes')
    if match is not None:
        if gt is None:
            raise ValueError('`match` needs `gt_bboxes`')
        match = np.asarray(match, dtype=np.int64).reshape(-1)
        if len(match) != len(bboxes) or (match >= len(gt)).any():
            raise ValueError(f'`match` must hold one index in [-1, {len(gt)}) per detection '
                             f'({len(bboxes)}), got {match.tolist()}')
    scale = CARD_WIDTH / width
    size = (CARD_WIDTH, max(1, int(round(height * scale))))
    base = cv2.resize(result.image, size, interpolation=_interpolation(scale))
    boxes = bboxes * scale
    gt = None if gt is None else gt * scale
    count = min(max_detections, len(bboxes))
    masks = _tile_masks(result, len(bboxes), size)
    cards = {OVERVIEW_SLOT: _overview(result, base, boxes, gt, match, count, masks)}
    for k, slot in enumerate(detection_slots(count, match)):
        cards[slot] = _detection_card(result, k, base, boxes, gt, match, class_names,
                                      None if masks is None else masks[k:k + 1])
    for miss in (getattr(result, 'misses', None) or [])[:max_detections]:
        cards[f'miss_{miss.gt_index}'] = _miss_card(result, miss, base, scale, class_names)
    return {slot: _fit(card, max_size) for slot, card in cards.items()}


def _interpolation(scale: float) -> int:
    return cv2.INTER_LINEAR if scale >= 1 else cv2.INTER_AREA


def _overlay(base: np.ndarray, cam: np.ndarray) -> np.ndarray:
    cam = np.asarray(cam, dtype=np.float32)
    scale = base.shape[1] / cam.shape[1]
    return overlay_cam(base, cv2.resize(cam, base.shape[1::-1],
                                        interpolation=_interpolation(scale)))


def _style(match, k: int) -> dict:
    return PALETTE['false_positive' if match is not None and match[k] < 0 else 'detection']


def _outlined(image: np.ndarray, masks: Optional[np.ndarray]) -> np.ndarray:
    """``image`` with the outlines of ``masks`` (on the card's grid) in the palette's mask
    style, or ``image`` itself without masks."""
    if masks is None:
        return image
    style = PALETTE['mask']
    return draw_mask_outlines(image, masks, style['color'], style['thickness'], halo=True)


def _overview(result, base, boxes, gt, match, count: int, masks=None) -> np.ndarray:
    """The combined map, every instance's mask outline (``masks``), the ground truth (misses
    dashed), every detection's box and the numbers ``0 .. count-1`` of the detections that have
    a card, next to their boxes."""
    image = _outlined(_overlay(base, result.combined), masks)
    if gt is not None:
        found = set() if match is None else set(match[match >= 0].tolist())
        for j, box in enumerate(gt):
            # without `match` nothing is known about misses: every box drawn as ground truth
            missed = match is not None and j not in found
            draw_box(image, box, PALETTE['miss' if missed else 'ground_truth'])
    for k in range(len(boxes) - 1, -1, -1):  # the highest score drawn last, on top
        draw_box(image, boxes[k], _style(match, k))
    for k in range(count):
        put_tag(image, str(k), boxes[k], _style(match, k)['color'])
    caption = f'{result.method}, {len(boxes)} det'
    if gt is not None:
        caption += f', {len(gt)} GT'
        if match is not None:
            caption += f', {int((match < 0).sum())} FP'
    return _with_caption(image, caption, None)


def _detection_card(result, k: int, base, boxes, gt, match, class_names,
                    masks=None) -> np.ndarray:
    """Detection ``k``'s map, its mask outline (``masks``: its own mask alone), its
    ground-truth box (if it matched one) and its box."""
    image = _outlined(_overlay(base, result.cams[k]), masks)
    if match is not None and match[k] >= 0:
        draw_box(image, gt[match[k]], PALETTE['ground_truth'])
    style = _style(match, k)
    draw_box(image, boxes[k], style)
    caption = (f'#{k} {_class_name(int(result.labels[k]), class_names)} '
               f'{float(result.scores[k]):.2f}')
    if match is not None:
        caption += f' GT {int(match[k])}' if match[k] >= 0 else ' false pos.'
    return _with_caption(image, caption, style['color'])


def _miss_card(result, miss, base, scale: float, class_names) -> np.ndarray:
    """A miss (``result.misses``, issue 21): its best candidate's map for ``result.method``
    (the image alone without one), the ground-truth box dashed, the candidate's box dashed in
    the detection colour, the reason in the caption. Slot ``miss_{gt_index}``: one card per
    ground-truth object across validations."""
    cam = miss.cams.get(result.method)
    image = base.copy() if cam is None else _overlay(base, cam)
    shown = scale * result.scale  # the records are in original-image pixels
    draw_box(image, np.asarray(miss.gt_box, dtype=np.float64) * shown, PALETTE['miss'])
    if miss.candidate_box is not None:
        draw_box(image, np.asarray(miss.candidate_box, dtype=np.float64) * shown,
                 PALETTE['candidate'])
    caption = (f'GT {miss.gt_index} {_class_name(int(miss.gt_label), class_names)}: '
               f'{miss.caption(class_names)}')
    return _with_caption(image, caption, PALETTE['candidate']['color'])


def _text_size(text: str) -> tuple:
    (w, h), base = cv2.getTextSize(text, _FONT, CARD_FONT_SCALE, CARD_FONT_THICKNESS)
    return w, h, base


def _with_caption(image: np.ndarray, caption: str, swatch) -> np.ndarray:
    """``image`` under a white bar with ``caption`` (shortened with ``~`` to fit), after a
    square of the box's colour ``swatch`` if given."""
    _, th, descent = _text_size('Hg')
    bar = np.full((th + descent + 2 * _PAD, image.shape[1], 3), _BACKGROUND, np.uint8)
    x = _PAD
    if swatch is not None:
        cv2.rectangle(bar, (x, _PAD), (x + th, _PAD + th), (0, 0, 0), cv2.FILLED)
        cv2.rectangle(bar, (x + 1, _PAD + 1), (x + th - 1, _PAD + th - 1), swatch, cv2.FILLED)
        x += th + _PAD
    text = _shorten(caption, image.shape[1] - x - _PAD, CARD_FONT_SCALE, CARD_FONT_THICKNESS)
    cv2.putText(bar, text, (x, _PAD + th), _FONT, CARD_FONT_SCALE, _TEXT_COLOR,
                CARD_FONT_THICKNESS, cv2.LINE_AA)
    return np.concatenate([bar, image], axis=0)


def draw_box(image: np.ndarray, box, style: dict) -> None:
    """Draw one box in place, in a :data:`.render.PALETTE` style, over a 1 px black outline.

    Args:
        image (np.ndarray): ``(H, W, 3)`` uint8 BGR, modified.
        box (array-like): ``x1, y1, x2, y2`` (clipped to just outside the image).
        style (dict): ``color``, ``thickness`` and ``dashed``.
    """
    x1, y1, x2, y2 = (int(round(v)) for v in _on_canvas(np.asarray([box]), image.shape)[0])
    corners = [(x1, y1), (x2 - 1, y1), (x2 - 1, y2 - 1), (x1, y2 - 1)]
    thickness = int(style['thickness'])
    for color, width in (((0, 0, 0), thickness + 2), (style['color'], thickness)):
        for a, b in zip(corners, corners[1:] + corners[:1]):
            if style.get('dashed'):
                _dashed_line(image, a, b, color, width)
            else:
                cv2.line(image, a, b, color, width, cv2.LINE_8)


def _dashed_line(image, a, b, color, width: int) -> None:
    length = max(abs(b[0] - a[0]), abs(b[1] - a[1]))
    dash, gap = _DASH
    for start in range(0, length + 1, dash + gap):
        end = min(length, start + dash)
        p = [int(round(a[i] + (b[i] - a[i]) * start / max(length, 1))) for i in (0, 1)]
        q = [int(round(a[i] + (b[i] - a[i]) * end / max(length, 1))) for i in (0, 1)]
        cv2.line(image, tuple(p), tuple(q), color, width, cv2.LINE_8)


def tag_box(box, text: str, shape: Sequence[int]) -> tuple:
    """Where :func:`put_tag` puts ``text`` for ``box`` on an image of ``shape``: above the box
    if there is room, else below it, else (a box as tall as the image) inside at its top.

    Returns:
        tuple[int, int, int, int]: The tag's ``x1, y1, x2, y2`` (exclusive ends).
    """
    height, width = shape[:2]
    tw, th, descent = _text_size(text)
    tag_w, tag_h = tw + 2 * _PAD, th + descent + 2 * _PAD
    x1, y1, x2, y2 = _on_canvas(np.asarray([box]), shape)[0]
    # the box's outline reaches thickness // 2 + 1 beyond its edge; keep clear of it
    clear = max(style['thickness'] for style in PALETTE.values()) // 2 + 2
    if y1 - clear - tag_h >= 0:
        top = int(round(y1)) - clear - tag_h
    elif y2 + clear + tag_h <= height:
        top = int(round(y2)) + clear
    else:
        top = max(0, int(round(y1)))
    left = int(min(max(0, round(x1)), max(0, width - tag_w)))
    return left, top, left + tag_w, top + tag_h


def put_tag(image: np.ndarray, text: str, box, color) -> None:
    """Draw ``text`` on a filled ``color`` tag next to ``box`` (:func:`tag_box`), in place."""
    left, top, right, bottom = tag_box(box, text, image.shape)
    _, th, _ = _text_size(text)
    cv2.rectangle(image, (left, top), (right - 1, bottom - 1), color, cv2.FILLED)
    cv2.putText(image, text, (left + _PAD, top + _PAD + th), _FONT, CARD_FONT_SCALE,
                _TEXT_COLOR, CARD_FONT_THICKNESS, cv2.LINE_AA)


def _fit(card: np.ndarray, max_size: Optional[int]) -> np.ndarray:
    if max_size is None or max(card.shape[:2]) <= max_size:
        return card
    factor = max_size / max(card.shape[:2])
    return cv2.resize(card, (max(1, round(card.shape[1] * factor)),
                             max(1, round(card.shape[0] * factor))),
                      interpolation=cv2.INTER_AREA)
