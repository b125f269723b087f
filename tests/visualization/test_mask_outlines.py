"""Instance mask outlines on the panels and cards: detection ``k``'s tile (panel) and card hold
instance ``k``'s outline and no other instance's; the detections and combined tiles and the
overview card hold every instance's; the original tile none; a box-only result none.

The image is flat grey and the maps are 0 or 1, so no pixel of the JET blend is the outline's
cyan (:data:`MASK_COLOR`): every cyan pixel is an outline. The masks (a disc, a ring with a hole,
a triangle) lie well inside their boxes, so no box line covers an outline.
"""
import dataclasses

import cv2
import numpy as np
import pytest

from mmdet_cam_hook import CAMResult
from mmdet_cam_hook.hooks.views import mask_view
from mmdet_cam_hook.visualization.cards import CARD_WIDTH, OVERVIEW_SLOT, render_cards
from mmdet_cam_hook.visualization.outlines import resize_masks
from mmdet_cam_hook.visualization.render import (
    MASK_COLOR,
    MIN_TILE_SIZE,
    PANEL_COLUMNS,
    draw_mask_outlines,
    render_panel,
)

H, W = 96, 128
BOXES = ((4, 4, 44, 44), (50, 10, 110, 70), (10, 50, 50, 92))


def _masks():
    masks = np.zeros((3, H, W), np.uint8)
    cv2.circle(masks[0], (24, 24), 12, 1, thickness=-1)
    cv2.circle(masks[1], (80, 40), 20, 1, thickness=-1)
    cv2.circle(masks[1], (80, 40), 8, 0, thickness=-1)  # a hole: its inner border is drawn too
    cv2.fillPoly(masks[2], [np.array([[30, 56], [16, 84], [44, 84]], np.int32)], 1)
    return masks.astype(bool)


def make_result(masks=True):
    """Three detections; map ``k`` is 1 inside box ``k``; the masks of :func:`_masks`."""
    cams = np.zeros((3, H, W), np.float32)
    for k, (x1, y1, x2, y2) in enumerate(BOXES):
        cams[k, y1:y2, x1:x2] = 1.0
    m = _masks()
    return CAMResult(
        bboxes=np.array(BOXES, np.float32), labels=np.array([0, 1, 2]),
        scores=np.array([0.9, 0.8, 0.7], np.float32), levels=np.zeros(3, np.int64), cams=cams,
        combined=cams.max(0), method='gradcam', layers=[['l']] * 3,
        image=np.full((H, W, 3), 80, np.uint8), input_cams=cams, letterbox=None,
        masks=m if masks else None, mask_cams=m.astype(np.float32) if masks else None)


def _cyan(image):
    return (image == np.array(MASK_COLOR, np.uint8)).all(axis=2)


def _border(mask):
    """The mask's own pixels with a 4-neighbour outside it (outer and inner borders)."""
    mask = mask.astype(np.uint8)
    cross = cv2.getStructuringElement(cv2.MORPH_CROSS, (3, 3))
    return (mask - cv2.erode(mask, cross, borderValue=0)) > 0


def _near(mask, pixels):
    """``mask``'s border, widened by ``pixels`` on both sides."""
    kernel = np.ones((2 * pixels + 1, 2 * pixels + 1), np.uint8)
    return cv2.dilate(_border(mask).astype(np.uint8), kernel) > 0


def assert_outlines(image, masks, shown, line=3):
    """Exactly the instances in ``shown`` are outlined on ``image`` (a tile or a card's image):
    at least 90% of each one's border pixels are cyan, and no cyan pixel lies farther than
    ``line`` px from a shown instance's border."""
    cyan = _cyan(image)
    for k, mask in enumerate(masks):
        border = _border(mask)
        share = cyan[border].mean()
        if k in shown:
            assert share > 0.9, (k, share)
        else:
            far = ~np.any([_near(masks[j], line) for j in shown], axis=0) if shown else True
            assert not (cyan & _near(mask, 1) & far).any(), k
    if shown:
        assert not (cyan & ~np.any([_near(masks[j], line) for j in shown], axis=0)).any()
    else:
        assert not cyan.any()


def panel_tiles(panel, count, tile_shape):
    """The tiles of a :func:`render_panel` panel (without their caption bars), in order."""
    rows = -(-count // PANEL_COLUMNS)
    gap = 4
    cell_h = (panel.shape[0] - (rows - 1) * gap) // rows
    tile_h, tile_w = tile_shape
    bar = cell_h - tile_h
    tiles = []
    for i in range(count):
        r, c = divmod(i, PANEL_COLUMNS)
        y, x = r * (cell_h + gap) + bar, c * (tile_w + gap)
        tiles.append(panel[y:y + tile_h, x:x + tile_w])
    return tiles


@pytest.mark.parametrize('view', ['class', 'mask'])
def test_panel_tile_k_holds_instance_k_outline_only(view):
    result = make_result()
    if view == 'mask':
        result = mask_view(result)  # the mask maps' panel, as the hook draws it
    panel = render_panel(result, max_detections=3)
    scale = MIN_TILE_SIZE / max(H, W)  # the 96x128 image is upscaled to 192x256 tiles
    shape = (round(H * scale), round(W * scale))
    masks = resize_masks(result.masks, shape[::-1])
    original, dets, combined, *per_detection = panel_tiles(panel, 6, shape)
    assert_outlines(original, masks, shown=())
    assert_outlines(dets, masks, shown=(0, 1, 2))
    assert_outlines(combined, masks, shown=(0, 1, 2))
    assert len(per_detection) == 3
    for k, tile in enumerate(per_detection):
        assert_outlines(tile, masks, shown=(k, ))
    # the ring's inner border (around its hole, radius 8 at (80, 40)) is outlined too
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    inner = _border(masks[1]) & ((xx - 80 * scale) ** 2 + (yy - 40 * scale) ** 2
                                 < (12 * scale) ** 2)
    assert inner.sum() > 50 and _cyan(per_detection[1])[inner].mean() > 0.9


@pytest.mark.parametrize('view', ['class', 'mask'])
def test_card_k_holds_instance_k_outline_only(view):
    result = make_result()
    if view == 'mask':
        result = mask_view(result)
    cards = render_cards(result, max_detections=3)
    assert list(cards) == [OVERVIEW_SLOT, 'det_0', 'det_1', 'det_2']
    shape = (round(H * CARD_WIDTH / W), CARD_WIDTH)
    masks = resize_masks(result.masks, shape[::-1])
    images = {slot: card[card.shape[0] - shape[0]:] for slot, card in cards.items()}
    assert_outlines(images[OVERVIEW_SLOT], masks, shown=(0, 1, 2), line=4)
    for k in range(3):
        card = images[f'det_{k}']
        assert_outlines(card, masks, shown=(k, ), line=4)
        # the cards' outline has a black halo, as their boxes do
        halo = (card.sum(axis=2) == 0) & _near(masks[k], 3)
        assert halo.sum() > 0.5 * _border(masks[k]).sum(), k


def test_no_detections_no_outlines():
    """A model with masks that detected nothing: panels and cards are drawn, outline-free."""
    full = make_result()
    result = dataclasses.replace(
        full, bboxes=full.bboxes[:0], labels=full.labels[:0], scores=full.scores[:0],
        levels=full.levels[:0], cams=full.cams[:0], input_cams=full.cams[:0], layers=[],
        masks=full.masks[:0], mask_cams=full.mask_cams[:0], combined=np.zeros((H, W), np.float32))
    assert resize_masks(result.masks, (10, 20)).shape == (0, 20, 10)
    assert not _cyan(render_panel(result)).any()
    assert not any(_cyan(card).any() for card in render_cards(result).values())


def test_box_only_results_have_no_outlines():
    result = make_result(masks=False)
    assert not _cyan(render_panel(result, max_detections=3)).any()
    assert not any(_cyan(card).any() for card in render_cards(result, max_detections=3).values())


def test_mask_view_leaves_the_image_alone():
    """The outlines are drawn per tile, not baked into the image: the original stays clean."""
    result = make_result()
    view = mask_view(result)
    np.testing.assert_array_equal(view.image, result.image)
    np.testing.assert_array_equal(view.cams, result.mask_cams)


def test_masks_of_the_wrong_shape_are_refused():
    result = make_result()
    bad = dataclasses.replace(result, masks=result.masks[:2])
    with pytest.raises(ValueError, match=r'`result.masks` must have shape \(3, 96, 128\)'):
        render_panel(bad)
    with pytest.raises(ValueError, match=r'`result.masks` must have shape \(3, 96, 128\)'):
        render_cards(bad)


def test_draw_mask_outlines_thickness_and_halo():
    image = np.full((40, 50, 3), 80, np.uint8)
    masks = np.zeros((1, 40, 50), bool)
    masks[0, 10:30, 10:30] = True
    thin = _cyan(draw_mask_outlines(image, masks))
    thick = _cyan(draw_mask_outlines(image, masks, thickness=3))
    assert thin.sum() < thick.sum() and (thin <= thick).all()
    halo = draw_mask_outlines(image, masks, thickness=1, halo=True)
    np.testing.assert_array_equal(_cyan(halo), thin)
    assert (halo[9, 12:28] == 0).all() and (halo[11, 12:28] == 0).all()  # black either side
    assert (image == 80).all()
