"""Drawing: exact JET blend values, boxes on the right pixels, the panel's layout."""
import numpy as np
import pytest

from mmdet_cam_hook import CAMResult
from mmdet_cam_hook.visualization.render import (
    DET_COLOR,
    GT_COLOR,
    MIN_TILE_SIZE,
    draw_detections,
    overlay_cam,
    render_panel,
)

GREEN = np.array(DET_COLOR, np.uint8)


def gray(h, w, value=80):
    return np.full((h, w, 3), value, np.uint8)


# ---------------------------------------------------------------------------------------------
# overlay_cam
def test_overlay_cam_golden():
    # cv2 JET (BGR): 0 -> (128, 0, 0), round(0.25 * 255) = 64 -> (255, 128, 0),
    # 255 -> (0, 0, 128).
    # Blend 0.75 * 80 + 0.25 * heat.
    out = overlay_cam(gray(1, 3), np.array([[0.0, 0.25, 1.0]]), alpha=0.25)
    np.testing.assert_array_equal(out[0], [[92, 60, 60], [124, 92, 60], [60, 60, 92]])
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(
        overlay_cam(gray(1, 3), np.array([[0.0, 0.25, 1.0]], np.float32), np.float32(0.25)), out)


def test_overlay_cam_alpha_extremes_and_clipping():
    img = gray(2, 2, 37)
    np.testing.assert_array_equal(overlay_cam(img, np.full((2, 2), 0.3), alpha=0.0), img)
    heat = overlay_cam(img, np.array([[1.0, 7.0], [0.0, np.nan]]), alpha=1.0)
    np.testing.assert_array_equal(heat[0, 0], [0, 0, 128])
    np.testing.assert_array_equal(heat[0, 1], [0, 0, 128])  # clipped to 1
    np.testing.assert_array_equal(heat[1, 0], [128, 0, 0])
    np.testing.assert_array_equal(heat[1, 1], [128, 0, 0])  # NaN counts as 0


def test_overlay_cam_does_not_modify_inputs():
    img, cam = gray(4, 4), np.full((4, 4), 0.5, np.float32)
    overlay_cam(img, cam)
    assert (img == 80).all() and (cam == 0.5).all()


@pytest.mark.parametrize('image, cam, alpha, error, match', [
    (gray(4, 4), np.zeros((4, 5)), 0.5, ValueError, 'image size'),
    (gray(4, 4), np.zeros((4, 4)), 1.5, ValueError, 'alpha'),
    (gray(4, 4).astype(np.float32), np.zeros((4, 4)), 0.5, ValueError, 'uint8'),
    (np.zeros((4, 4), np.uint8), np.zeros((4, 4)), 0.5, ValueError, 'HxWx3'),
    (gray(4, 4), [[0.0]], 0.5, TypeError, 'numpy array'),
])
def test_overlay_cam_bad_input(image, cam, alpha, error, match):
    with pytest.raises(error, match=match):
        overlay_cam(image, cam, alpha)


# ---------------------------------------------------------------------------------------------
# draw_detections
def test_draw_detections_box_pixels():
    img = gray(64, 64, 0)
    out = draw_detections(img, [[10, 20, 30, 40]], [0], [0.5])
    assert (img == 0).all(), 'the input must not be drawn on'
    # 1 px box on a small image: edges on columns 10 and 29, rows 20 and 39.
    for y, x in [(30, 10), (30, 29), (39, 20), (25, 10)]:
        np.testing.assert_array_equal(out[y, x], GREEN)
    assert (out[25:35, 12:28] == 0).all(), 'inside the box must stay untouched'
    assert (out[30, 31:] == 0).all() and (out[41:, :] == 0).all()
    # The label sits above the box: a green background with dark text.
    labelled = draw_detections(gray(64, 64, 200), [[10, 20, 30, 40]], [0], [0.5])[:20, 10:]
    assert (labelled == GREEN).all(axis=2).sum() > 50
    assert (labelled.astype(int).sum(axis=2) < 100).sum() > 10


def test_draw_detections_label_uses_class_name():
    img = gray(64, 128, 0)
    short = draw_detections(img, [[10, 30, 60, 60]], [1], [0.9], class_names=['x', 'y'])
    long = draw_detections(img, [[10, 30, 60, 60]], [1], [0.9],
                           class_names=['x', 'a_much_longer_name'])
    green = lambda im: (im[:30] == GREEN).all(axis=2).sum()  # noqa: E731
    assert green(long) > green(short)


def test_draw_detections_label_inside_box_at_top_edge():
    img = gray(64, 64, 0)
    out = draw_detections(img, [[5, 0, 60, 60]], [0], [0.5])
    assert (out[1:8, 6:20] == GREEN).all(axis=2).any(), 'label drawn inside the box'


def test_draw_detections_custom_color_and_empty():
    img = gray(40, 40, 0)
    out = draw_detections(img, [[2, 2, 30, 30]], [0], [0.5], color=(255, 0, 0))
    np.testing.assert_array_equal(out[25, 2], [255, 0, 0])
    np.testing.assert_array_equal(draw_detections(img, np.zeros((0, 4)), [], []), img)


@pytest.mark.parametrize('bboxes, labels, scores, names, match', [
    ([[0, 0, 5, 5]], [0, 1], [0.5], None, 'same length'),
    ([[0, 0, 5]], [0], [0.5], None, r'\(K, 4\)'),
    ([[0, 0, 5, 5]], [3], [0.5], ['a', 'b'], 'label 3'),
])
def test_draw_detections_bad_input(bboxes, labels, scores, names, match):
    with pytest.raises(ValueError, match=match):
        draw_detections(gray(16, 16), bboxes, labels, scores, class_names=names)


# ---------------------------------------------------------------------------------------------
# render_panel
def make_result(h=96, w=128, boxes=((8, 8, 40, 40), (60, 30, 120, 90), (0, 0, 20, 20))):
    """A CAMResult whose k-th map peaks at the centre of the k-th box."""
    k = len(boxes)
    cams = np.zeros((k, h, w), np.float32)
    for i, (x1, y1, x2, y2) in enumerate(boxes):
        cams[i, (y1 + y2) // 2, (x1 + x2) // 2] = 1.0
    bboxes = np.array(boxes, np.float32).reshape(-1, 4)
    return CAMResult(
        bboxes=bboxes, labels=np.arange(k, dtype=np.int64) % 2,
        scores=np.linspace(0.9, 0.5, k).astype(np.float32), levels=np.zeros(k, np.int64),
        cams=cams, combined=cams.max(0) if k else np.zeros((h, w), np.float32),
        method='gradcam', layers=[['neck.out_convs.0']] * k, image=gray(h, w),
        input_cams=cams, letterbox=None)


def tile_geometry(panel, result, ncols):
    """(tile width, tile height including caption) from the panel size."""
    h, w = result.image.shape[:2]
    scale = max(1.0, MIN_TILE_SIZE / max(h, w))
    tile_w = int(round(w * scale))
    assert panel.shape[1] == ncols * tile_w + (ncols - 1) * 4
    return tile_w, scale


def test_render_panel_layout_and_content():
    res = make_result()
    panel = render_panel(res, class_names=['cat', 'dog'])
    assert panel.dtype == np.uint8 and panel.ndim == 3
    # 3 summary tiles + 3 detections = 6 tiles: 4 columns, 2 rows.
    tile_w, scale = tile_geometry(panel, res, 4)
    assert scale == 2.0
    tile_h = (panel.shape[0] - 4) // 2
    caption_h = tile_h - int(round(96 * scale))
    assert 8 < caption_h < 40
    # Tile 0 is the (upscaled) original under its caption.
    assert (panel[caption_h:tile_h, :tile_w] == 80).all()
    # Tile 1 (detections) has green boxes.
    det = panel[caption_h:tile_h, tile_w + 4:2 * tile_w + 4]
    assert (det == GREEN).all(axis=2).any()
    # Tile 4 (second row, first column) is detection 1: its map is hot at the box centre
    # (90, 60) in original pixels, cold (JET blue) far away.
    y0 = tile_h + 4 + caption_h
    tile = panel[y0:y0 + int(round(96 * scale)), :tile_w].astype(int)
    hot = tile[int(60 * scale), int(90 * scale)]
    cold = tile[int(10 * scale), int(10 * scale)]
    assert hot[2] > hot[0] + 30, f'expected red at the peak, got {hot}'
    assert cold[0] > cold[2] + 30, f'expected blue away from the peak, got {cold}'
    # Remaining cells of the second row: detection 2, then blank background.
    assert (panel[tile_h + 4:, 3 * (tile_w + 4):] == 255).all()


def test_render_panel_no_detections_and_max_detections():
    empty = render_panel(make_result(boxes=()))
    tile_geometry(empty, make_result(boxes=()), 3)
    one_row = render_panel(make_result(), max_detections=1)
    tile_geometry(one_row, make_result(), 4)
    assert one_row.shape[0] == empty.shape[0]
    none = render_panel(make_result(), max_detections=0)
    assert none.shape == empty.shape
    np.testing.assert_array_equal(render_panel(make_result(), max_detections=np.int64(1)),
                                  one_row)


def test_render_panel_max_size_and_large_image():
    res = make_result()
    assert max(render_panel(res, max_size=300).shape[:2]) == 300
    big = make_result(h=400, w=600, boxes=((100, 100, 300, 300), ))
    panel = render_panel(big, max_detections=1)
    tile_geometry(panel, big, 4)  # no upscaling: tiles at the original 600 px width
    assert max(render_panel(big, max_size=1000).shape[:2]) == 1000


def test_render_panel_gt_boxes():
    res = make_result()
    with_gt = render_panel(res, gt_bboxes=[[70, 5, 110, 25]])
    without = render_panel(res)
    gt_color = np.array(GT_COLOR, np.uint8)
    assert (with_gt == gt_color).all(axis=2).sum() > (without == gt_color).all(axis=2).sum()


@pytest.mark.parametrize('kwargs, match', [
    (dict(max_detections=-1), 'max_detections'),
    (dict(max_size=0), 'max_size'),
    (dict(gt_bboxes=[[1, 2, 3]]), 'gt_bboxes'),
    (dict(class_names=['only_one']), 'label 1'),
])
def test_render_panel_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        render_panel(make_result(), **kwargs)


def test_wild_boxes_of_an_untrained_model_are_drawn():
    """A YOLOX early in training can give infinite or huge boxes; drawing must not fail."""
    from mmdet_cam_hook.visualization.render import draw_detections

    img = np.zeros((40, 60, 3), np.uint8)
    boxes = np.array([[-np.inf, 5, np.inf, 30], [1e12, -1e12, 2e12, 1e12], [5, 5, 20, np.nan]])
    out = draw_detections(img, boxes, [0, 1, 0], [0.9, 0.5, 0.4], ['a', 'b'])
    assert out.shape == img.shape and out.any()


# ---------------------------------------------------------------------------------------------
# Narrow, tiny and strip images (issue 18 #1): every tile of a panel has one caption height.
LONG_NAMES = ['a_class_name_much_wider_than_any_narrow_tile', 'another_very_long_class_name']


def strip_result(h, w):
    """Four detections on an ``h x w`` image, boxes covering its quarters and the whole."""
    boxes = [(0, 0, max(1, w // 2), max(1, h // 2)), (w // 2, h // 2, w, h), (0, 0, w, h),
             (0, h // 2, max(1, w // 2), h)]
    cams = np.random.default_rng(0).random((4, h, w)).astype(np.float32)
    return CAMResult(
        bboxes=np.array(boxes, np.float32), labels=np.array([0, 1, 0, 1]),
        scores=np.array([0.9, 0.8, 0.7, 0.6], np.float32), levels=np.zeros(4, np.int64),
        cams=cams, combined=cams.max(0), method='gradcam', layers=[['neck.out_convs.0']] * 4,
        image=gray(h, w), input_cams=cams, letterbox=None)


@pytest.mark.parametrize('h, w', [(400, 100), (600, 150), (1, 1), (20, 4000), (4000, 20)])
def test_render_panel_narrow_and_strip_images(h, w):
    res = strip_result(h, w)
    panel = render_panel(res, class_names=LONG_NAMES, gt_bboxes=[[0, 0, w, h]])
    # 3 summary tiles + 4 detections: 4 columns, 2 rows of equal cells, no gap lost.
    scale = max(1.0, MIN_TILE_SIZE / max(h, w))
    tile_w, tile_img_h = int(round(w * scale)), int(round(h * scale))
    assert panel.shape[1] == 4 * tile_w + 3 * 4
    cell_h = (panel.shape[0] - 4) // 2
    assert panel.shape[0] == 2 * cell_h + 4
    caption_h = cell_h - tile_img_h
    assert 8 < caption_h < 60, caption_h
    # Every tile's image starts right under one common caption bar: the original tile is the
    # gray image, the others are drawn on it; the bars above are white with dark text.
    assert (panel[caption_h:cell_h, :tile_w] == 80).all()
    for r in range(2):
        for c in range(4 if r == 0 else 3):
            y, x = r * (cell_h + 4), c * (tile_w + 4)
            bar = panel[y:y + caption_h, x:x + tile_w]
            assert (bar == 255).mean() > 0.3 and (bar < 128).any(), (r, c)
            assert not (panel[y + caption_h:y + cell_h, x:x + tile_w] == 255).all(axis=2).all()
    # The last cell of the second row stays background.
    assert (panel[cell_h + 4:, 3 * (tile_w + 4):] == 255).all()
    assert max(render_panel(res, class_names=LONG_NAMES, max_size=200).shape[:2]) == 200


def test_caption_of_a_wide_strip_stays_small():
    """A 4000 x 20 strip: the caption's font follows the tile's height, not only its width."""
    panel = render_panel(strip_result(20, 4000), max_detections=0)
    assert panel.shape[0] - 20 < 40


@pytest.mark.parametrize('h, w', [(400, 100), (600, 150), (1, 1), (20, 4000), (4000, 20)])
def test_draw_detections_long_names_on_narrow_images(h, w):
    res = strip_result(h, w)
    img = gray(h, w)
    out = draw_detections(img, res.bboxes, res.labels, res.scores, LONG_NAMES)
    assert out.shape == img.shape and out.dtype == np.uint8
    assert (img == 80).all()  # input untouched
    if min(h, w) >= 20:
        assert (out == GREEN).all(axis=2).any()


def test_long_label_is_shortened_but_keeps_its_score():
    import cv2

    from mmdet_cam_hook.visualization.render import _shorten

    text = f'{LONG_NAMES[0]}: 0.93'
    short = _shorten(text, 100, 0.35)
    assert short.endswith('~: 0.93') and short.startswith('a_c')
    assert cv2.getTextSize(short, cv2.FONT_HERSHEY_SIMPLEX, 0.35, 1)[0][0] <= 100
    assert _shorten('fits', 100, 0.35) == 'fits'
    assert _shorten(text, 1, 0.35) == '~'


def test_grid_never_fails_on_tile_sizes():
    from mmdet_cam_hook.visualization.render import _grid

    tiles = [np.full((5, 3, 3), 10, np.uint8), np.full((2, 7, 3), 20, np.uint8),
             np.full((9, 1, 3), 30, np.uint8)]
    panel = _grid(tiles, 2)
    assert panel.shape == (2 * 9 + 4, 2 * 7 + 4, 3)
    assert (panel[:5, :3] == 10).all() and (panel[:2, 11:18] == 20).all()
    assert (panel[13:22, :1] == 30).all() and (panel[5:9, :3] == 255).all()
