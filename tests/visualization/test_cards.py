"""issue 24: the cards the image backends get: their size, slot names, palette, labels kept off
small boxes' insides, and delivery (the full panel local, the cards to TensorBoard)."""
import cv2
import numpy as np
import pytest
from mmengine.visualization import Visualizer

from mmdet_cam_hook import CAMResult
from mmdet_cam_hook.visualization.cards import (
    CARD_FONT_SCALE,
    CARD_FONT_THICKNESS,
    CARD_LABEL_PX,
    CARD_WIDTH,
    OVERVIEW_SLOT,
    detection_slots,
    draw_box,
    render_cards,
    tag_box,
)
from mmdet_cam_hook.visualization.delivery import Delivery
from mmdet_cam_hook.visualization.render import PALETTE, overlay_cam, render_panel

BOXES = ((8, 8, 40, 40), (60, 30, 120, 90), (0, 0, 20, 20))
GT = np.array([[10, 10, 40, 40], [2, 60, 30, 90]], np.float64)


def make_result(h=96, w=128, boxes=BOXES, value=80):
    """A CAMResult whose k-th map is 1 inside the k-th box (flat grey image)."""
    k = len(boxes)
    cams = np.zeros((k, h, w), np.float32)
    for i, (x1, y1, x2, y2) in enumerate(boxes):
        cams[i, y1:y2, x1:x2] = 1.0
    return CAMResult(
        bboxes=np.array(boxes, np.float32).reshape(-1, 4), labels=np.arange(k) % 2,
        scores=np.linspace(0.9, 0.5, k).astype(np.float32), levels=np.zeros(k, np.int64),
        cams=cams, combined=cams.max(0) if k else np.zeros((h, w), np.float32),
        method='gradcam', layers=[['l']] * k, image=np.full((h, w, 3), value, np.uint8),
        input_cams=cams, letterbox=None)


def bar_height():
    (_, th), descent = cv2.getTextSize('Hg', cv2.FONT_HERSHEY_SIMPLEX, CARD_FONT_SCALE,
                                       CARD_FONT_THICKNESS)
    return th + descent + 8


@pytest.mark.parametrize('h, w', [(96, 128), (600, 1000), (300, 100)])
def test_cards_are_card_wide_with_one_per_detection(h, w):
    result = make_result(h, w, boxes=((2, 2, 50, 40), (10, 20, 60, 90), (0, 0, 20, 20)))
    cards = render_cards(result, max_detections=2)
    assert list(cards) == [OVERVIEW_SLOT, 'det_0', 'det_1']
    for card in cards.values():
        assert card.dtype == np.uint8 and card.shape[1] == CARD_WIDTH
        assert card.shape[0] == round(h * CARD_WIDTH / w) + bar_height()
    assert list(render_cards(result, max_detections=0)) == [OVERVIEW_SLOT]
    assert len(render_cards(result, max_detections=10)) == 4


def test_max_size_bounds_every_card():
    cards = render_cards(make_result(300, 100), max_detections=1, max_size=200)
    assert all(max(c.shape[:2]) == 200 for c in cards.values())


def test_detection_card_shows_its_own_map_and_nothing_inside_its_box():
    """Card k is the JET overlay of map k at the card's scale; inside box k, 2 px clear of its
    line, the pixels are exactly that overlay: no label drawn there."""
    result = make_result()
    cards = render_cards(result, max_detections=3)
    scale = CARD_WIDTH / 128
    size = (CARD_WIDTH, round(96 * scale))
    base = cv2.resize(result.image, size, interpolation=cv2.INTER_LINEAR)
    top = bar_height()
    for k, box in enumerate(BOXES):
        expected = overlay_cam(base, cv2.resize(result.cams[k], size))
        x1, y1, x2, y2 = (int(round(v * scale)) for v in box)
        inside = (slice(top + max(y1, 0) + 3, top + y2 - 3), slice(max(x1, 0) + 3, x2 - 3))
        card = cards[f'det_{k}']
        np.testing.assert_array_equal(card[inside], expected[inside[0].start - top:
                                                             inside[0].stop - top, inside[1]])
        # the box's line in the detection colour at its top edge
        assert (card[top + y1, (x1 + x2) // 2] == PALETTE['detection']['color']).all()


def test_overview_tags_stay_outside_small_boxes():
    """Each numbered tag is next to its box, not on it or its line; inside every box (2 px
    clear of its line) the overview is exactly the combined map's overlay."""
    boxes = ((8, 30, 30, 50), (60, 40, 90, 70), (100, 0, 120, 20))  # the last at the top edge
    result = make_result(boxes=boxes)
    overview = render_cards(result, max_detections=3)[OVERVIEW_SLOT]
    scale = CARD_WIDTH / 128
    size = (CARD_WIDTH, round(96 * scale))
    base = cv2.resize(result.image, size, interpolation=cv2.INTER_LINEAR)
    expected = overlay_cam(base, cv2.resize(result.combined, size))
    image = overview[bar_height():]
    for k, box in enumerate(boxes):
        b = [v * scale for v in box]
        x1, y1, x2, y2 = tag_box(b, str(k), size[::-1])
        assert x2 <= b[0] - 2 or x1 >= b[2] + 2 or y2 <= b[1] - 2 or y1 >= b[3] + 2, (k, b)
        tag = image[y1:y2, x1:x2]  # drawn: mostly the box's colour
        assert (tag == PALETTE['detection']['color']).all(axis=2).mean() > 0.5
        inside = (slice(int(b[1]) + 3, int(b[3]) - 3), slice(int(b[0]) + 3, int(b[2]) - 3))
        np.testing.assert_array_equal(image[inside], expected[inside])


def test_tag_goes_below_a_box_at_the_top_and_inside_only_a_full_height_box():
    below = tag_box([100, 0, 120, 20], '0', (320, 320))
    assert below[1] >= 20 + 2
    full = tag_box([10, 0, 300, 320], '0', (320, 320))
    assert full[1] == 0  # no room above or below: inside, at the top of a box this tall


def test_slots_follow_ground_truth_objects():
    assert detection_slots(3) == ['det_0', 'det_1', 'det_2']
    assert detection_slots(4, [1, -1, 0, -1, 2]) == ['gt_1', 'fp_0', 'gt_0', 'fp_1']
    # the same object keeps its slot when its rank changes between validations
    assert detection_slots(2, [-1, 1])[1] == detection_slots(2, [1, -1])[0] == 'gt_1'
    with pytest.raises(ValueError, match='1 entries for 2 detections'):
        detection_slots(2, [0])


def test_palette_tells_true_and_false_positives_ground_truth_and_misses_apart():
    """Detection 0 matches GT 0 (green, with its white GT box), detections 1 and 2 are false
    positives (magenta); GT 1 is missed: dashed white on the overview."""
    result = make_result()
    match = np.array([0, -1, -1])
    cards = render_cards(result, gt_bboxes=GT, match=match, class_names=['a', 'b'])
    assert list(cards) == [OVERVIEW_SLOT, 'gt_0', 'fp_0', 'fp_1']
    scale, top = CARD_WIDTH / 128, bar_height()

    def edge(card, box):  # pixels along the top edge of a box
        x1, y1, x2, _ = (int(round(v * scale)) for v in box)
        return card[top + y1, x1 + 4:x2 - 4]

    colours = {name: np.array(s['color'], np.uint8) for name, s in PALETTE.items()}
    # miss: the GT colour, dashed; the mask outline its own (cyan)
    assert len({tuple(c) for c in colours.values()}) == 4
    assert (edge(cards['gt_0'], BOXES[0]) == colours['detection']).all()
    assert (edge(cards['fp_0'], BOXES[1]) == colours['false_positive']).all()
    assert (edge(cards['gt_0'], GT[0]) == colours['ground_truth']).all(1).any()
    missed = edge(cards[OVERVIEW_SLOT], GT[1])
    white = (missed == colours['miss']).all(1)
    assert 0.3 < white.mean() < 0.9  # dashed
    with pytest.raises(ValueError, match='needs `gt_bboxes`'):
        render_cards(result, match=match)
    with pytest.raises(ValueError, match=r'one index in \[-1, 2\)'):
        render_cards(result, gt_bboxes=GT, match=[0, 2, -1])


def test_caption_letters_are_card_label_px_tall():
    """The capital letters of a caption span CARD_LABEL_PX rows (what the browser test
    scales by the displayed width)."""
    result = make_result(boxes=((8, 8, 40, 40), ))
    card = render_cards(result, class_names=['HHHH'])['det_0']
    bar = card[:bar_height(), 40:]  # right of the colour swatch and the '#0'
    dark_rows = np.flatnonzero((bar.max(axis=2) < 128).any(axis=1))
    assert dark_rows[-1] - dark_rows[0] + 1 == pytest.approx(CARD_LABEL_PX, abs=1)
    assert CARD_LABEL_PX >= 12  # >= 9 px down to a 240 px display


def test_delivery_sends_the_panel_local_and_the_cards_to_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    visualizer = Visualizer(name='cards', save_dir=str(tmp_path), vis_backends=[
        dict(type='LocalVisBackend'), dict(type='TensorboardVisBackend')])
    result = make_result()
    panel = render_panel(result)
    cards = render_cards(result, max_detections=2)
    log = Delivery(visualizer, strict=True)
    log.add_views('cam_val_gradcam_x', panel, cards, step=3)
    visualizer.close()
    vis_data = tmp_path / 'vis_data'
    local = cv2.imread(str(vis_data / 'vis_image' / 'cam_val_gradcam_x_3.png'))
    np.testing.assert_array_equal(local, panel)
    assert sorted(p.name for p in (vis_data / 'vis_image').iterdir()) == [
        'cam_val_gradcam_x_3.png']
    events = EventAccumulator(str(vis_data), size_guidance={'images': 0})
    events.Reload()
    assert sorted(events.Tags()['images']) == [f'cam_val_gradcam_x/{s}' for s in sorted(cards)]
    for slot, card in cards.items():
        (event, ) = events.Images(f'cam_val_gradcam_x/{slot}')
        decoded = cv2.imdecode(np.frombuffer(event.encoded_image_string, np.uint8),
                               cv2.IMREAD_COLOR)
        assert event.step == 3
        np.testing.assert_array_equal(decoded, card)
    assert log.delivered() == 'LocalVisBackend 1/1, TensorboardVisBackend 1/1'
    assert log.needs_panel and log.needs_cards
    local_only = Visualizer(name='local', save_dir=str(tmp_path / 'local'),
                            vis_backends=[dict(type='LocalVisBackend')])
    assert Delivery(local_only).needs_panel and not Delivery(local_only).needs_cards


def test_draw_box_outlines_in_black():
    image = np.full((40, 40, 3), 80, np.uint8)
    draw_box(image, [10, 10, 30, 30], PALETTE['detection'])
    column = image[6:14, 20]
    # 1 px black, 3 px of colour centred on the edge row 10, 1 px black
    np.testing.assert_array_equal(column[:, 1], [80, 80, 0, 255, 255, 255, 0, 80])
    assert (image[13:27, 13:27] == 80).all()
