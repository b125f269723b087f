"""CAM-quality metrics against hand-computed values."""
import numpy as np
import pytest

from mmdet_cam_hook.evaluation.metrics import (
    energy_in_box,
    energy_pointing_game,
    is_blank,
    match_to_ground_truth,
    off_target_share,
    pointing_game,
)


def diagonal_cam():
    """4x4 map with 1, 2, 3, 4 on the diagonal (total 10)."""
    return np.diag([1.0, 2.0, 3.0, 4.0])[None]


@pytest.mark.parametrize('box, expected', [
    ([1, 1, 3, 3], 0.5),  # pixels (1,1)=2 and (2,2)=3
    ([0, 0, 4, 4], 1.0),
    ([0.6, 0.6, 2.4, 2.4], 0.2),  # only the centre (1.5, 1.5) is inside: pixel (1,1)=2
    ([0, 0, 0.5, 0.5], 0.1),  # a centre on the edge counts: pixel (0,0)=1
    ([2, 0, 4, 2], 0.0),  # off the diagonal
    ([3, 3, 10, 10], 0.4),  # clipped by the image: pixel (3,3)=4
])
def test_energy_in_box_golden(box, expected):
    np.testing.assert_allclose(energy_in_box(diagonal_cam(), [box]), [expected])


def test_energy_in_box_per_detection_and_blank():
    cams = np.concatenate([diagonal_cam(), np.zeros((1, 4, 4)), diagonal_cam()])
    boxes = [[1, 1, 3, 3], [0, 0, 4, 4], [3, 3, 4, 4]]
    np.testing.assert_allclose(energy_in_box(cams, boxes), [0.5, 0.0, 0.4])
    assert energy_in_box(np.zeros((0, 5, 5)), np.zeros((0, 4))).shape == (0,)


@pytest.mark.parametrize('cams, boxes, match', [
    (np.ones((2, 4, 4)), [[0, 0, 1, 1]], 'same length'),
    (np.ones((4, 4)), [[0, 0, 1, 1]], r'\(K, H, W\)'),
    (np.ones((1, 4, 4)), [[0, 0, 1]], r'\(K, 4\)'),
    (-np.ones((1, 4, 4)), [[0, 0, 1, 1]], 'non-negative'),
    (np.full((1, 4, 4), np.nan), [[0, 0, 1, 1]], 'NaN'),
])
def test_energy_in_box_bad_input(cams, boxes, match):
    with pytest.raises(ValueError, match=match):
        energy_in_box(cams, boxes)


def peak_cam(y, x, size=8):
    cam = np.zeros((size, size))
    cam[y, x] = 1.0
    return cam


def pointing_case():
    """Three GT boxes and five detections (in score order) whose outcome is worked out by hand.

    - D0 class 0 on G0 (IoU 1), peak (1, 1) inside G0: hit.
    - D1 class 0, duplicate of D0: G0 is taken, G1 does not overlap: not counted.
    - D2 class 0 on G1 (IoU 12/16 = 0.75), peak (0, 0) outside G1: miss.
    - D3 class 1 on G2 (IoU 1), blank map: not counted (it points nowhere; ``blank_share``).
    - D4 class 1 with no overlapping GT of its class: not counted.
    """
    gt_bboxes = [[0, 0, 4, 4], [4, 4, 8, 8], [0, 4, 4, 8]]
    gt_labels = [0, 0, 1]
    bboxes = [[0, 0, 4, 4], [0, 0, 4, 4], [4, 4, 8, 7], [0, 4, 4, 8], [4, 0, 8, 4]]
    labels = [0, 0, 0, 1, 1]
    cams = np.stack([peak_cam(1, 1), peak_cam(1, 1), peak_cam(0, 0), np.zeros((8, 8)),
                     peak_cam(2, 6)])
    return cams, bboxes, labels, gt_bboxes, gt_labels


def test_pointing_game_golden():
    assert pointing_game(*pointing_case()) == (1, 2)


def test_pointing_game_iou_threshold():
    # D2's IoU of 0.75 no longer matches; exactly at the threshold still does.
    assert pointing_game(*pointing_case(), iou_thr=0.8) == (1, 1)
    assert pointing_game(*pointing_case(), iou_thr=0.75) == (1, 2)


def test_pointing_game_class_must_match():
    cams, bboxes, _, gt_bboxes, gt_labels = pointing_case()
    # All detections as class 2: no GT of that class, nothing counted.
    assert pointing_game(cams, bboxes, [2] * 5, gt_bboxes, gt_labels) == (0, 0)


def test_pointing_game_greedy_in_given_order():
    # Two detections on one GT: only the first (highest score) is matched.
    gt = [[0, 0, 4, 4]]
    cams = np.stack([peak_cam(7, 7), peak_cam(1, 1)])
    boxes = [[0, 0, 4, 4], [0, 0, 4, 4]]
    assert pointing_game(cams, boxes, [0, 0], gt, [0]) == (0, 1)
    assert pointing_game(cams[::-1], boxes, [0, 0], gt, [0]) == (1, 1)


def test_pointing_game_peak_on_box_edge():
    # Pixel (3, 3) has its centre (3.5, 3.5) inside [0, 3.5]; pixel (3, 4) does not.
    gt = [[0, 0, 3.5, 3.5]]
    assert pointing_game(peak_cam(3, 3)[None], gt, [0], gt, [0]) == (1, 1)
    assert pointing_game(peak_cam(3, 4)[None], gt, [0], gt, [0]) == (0, 1)


def test_pointing_game_empty_inputs():
    assert pointing_game(np.zeros((0, 4, 4)), np.zeros((0, 4)), [], [[0, 0, 1, 1]], [0]) == (0, 0)
    assert pointing_game(peak_cam(0, 0)[None], [[0, 0, 1, 1]], [0], np.zeros((0, 4)), []) \
        == (0, 0)


@pytest.mark.parametrize('kwargs, match', [
    (dict(iou_thr=0), 'iou_thr'),
    (dict(iou_thr=1.5), 'iou_thr'),
    (dict(labels=[0, 0]), 'same length'),
    (dict(gt_labels=[0]), 'same length'),
])
def test_pointing_game_bad_input(kwargs, match):
    args = dict(cams=[peak_cam(0, 0)], bboxes=[[0, 0, 1, 1]], labels=[0],
                gt_bboxes=[[0, 0, 1, 1], [1, 1, 2, 2]], gt_labels=[0, 0])
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        pointing_game(**args)


# ------------------------------------------------------------------ ground-truth based numbers
def _two_objects():
    """8x8 maps; GT 0 covers the top-left 4x4 quadrant, GT 1 the bottom-right one."""
    gt = np.array([[0, 0, 4, 4], [4, 4, 8, 8]], np.float64)
    instance = np.zeros((8, 8))
    instance[1:3, 1:3] = 1.0  # all on GT 0
    classwide = np.zeros((8, 8))
    classwide[1:3, 1:3] = 1.0
    classwide[5:7, 5:7] = 3.0  # 3/4 of the energy on the other object
    background = np.zeros((8, 8))
    background[0, 7] = 2.0  # top-right: on no object
    return gt, np.stack([instance, classwide, background, np.zeros((8, 8))])


def test_match_to_ground_truth_is_greedy_by_order_and_class():
    gt = [[0, 0, 4, 4], [4, 4, 8, 8]]
    boxes = [[0, 0, 4, 4], [0.5, 0, 4, 4], [4, 4, 8, 8], [4, 4, 8, 8]]
    np.testing.assert_array_equal(
        match_to_ground_truth(boxes, [0, 0, 1, 0], gt, [0, 1]), [0, -1, 1, -1])
    with pytest.raises(ValueError, match=r'`iou_thr` must be a number in \(0, 1\], got 0'):
        match_to_ground_truth(boxes, [0, 0, 1, 0], gt, [0, 1], iou_thr=0)


def test_energy_pointing_game_and_off_target_share_golden():
    gt, cams = _two_objects()
    match = np.array([0, 0, 0, 0])
    np.testing.assert_allclose(energy_pointing_game(cams, match, gt),
                               [1.0, 0.25, 0.0, np.nan])
    np.testing.assert_allclose(off_target_share(cams, match, gt), [0.0, 0.75, 0.0, np.nan])
    # unmatched detections are NaN, never 0
    unmatched = np.array([-1, 1, -1, -1])
    np.testing.assert_allclose(energy_pointing_game(cams, unmatched, gt),
                               [np.nan, 0.75, np.nan, np.nan])
    np.testing.assert_allclose(off_target_share(cams, unmatched, gt),
                               [np.nan, 0.25, np.nan, np.nan])
    np.testing.assert_array_equal(is_blank(cams), [False, False, False, True])
    assert is_blank(np.zeros((0, 8, 8))).shape == (0, )  # an image without detections


def test_off_target_share_does_not_count_the_overlap_with_the_own_box():
    gt = np.array([[0, 0, 4, 4], [2, 2, 6, 6]], np.float64)
    cam = np.zeros((1, 8, 8))
    cam[0, 3, 3] = 1.0  # inside both boxes: it is the own object
    cam[0, 5, 5] = 1.0  # only in the other box
    np.testing.assert_allclose(off_target_share(cam, [0], gt), [0.5])


def test_matched_metrics_bad_input():
    gt, cams = _two_objects()
    with pytest.raises(ValueError, match='same length'):
        energy_pointing_game(cams, [0], gt)
    with pytest.raises(ValueError, match=r'outside \[-1, 1\]: \[2\]'):
        off_target_share(cams, [0, 2, 0, 0], gt)


def test_peak_in_box_per_detection():
    from mmdet_cam_hook.evaluation.metrics import peak_in_box

    cams = np.stack([peak_cam(1, 1), peak_cam(6, 6), np.zeros((8, 8)), peak_cam(1, 1)])
    gt = [[0, 0, 3, 3], [5, 5, 8, 8]]
    out = peak_in_box(cams, [0, 0, 1, -1], gt)
    np.testing.assert_array_equal(out[:2], [1.0, 0.0])
    assert np.isnan(out[2]) and np.isnan(out[3])  # blank map, unmatched detection


# ------------------------------------------------------------------ one accumulator, one rule
def _eval_records(images, methods):
    """``mmdet-cam-eval``'s records (as ``evaluate_image`` builds them) for given maps, the
    same maps for every method."""
    from mmdet_cam_hook.evaluation.metrics import detection_scores

    records = []
    for cams, bboxes, labels, gt, gt_labels, aucs in images:
        match = match_to_ground_truth(bboxes, labels, gt, gt_labels)
        record = dict(seconds=0.0, num_detections=len(cams),
                      **detection_scores(cams, bboxes, match, gt),
                      deletion_auc=dict(prior=aucs), insertion_auc=dict(prior=aucs))
        records.append({method: record for method in methods})
    return records


def _hook_and_eval(images):
    """The same maps through the hook's path (``MapScores.update``) and the evaluation's
    (records -> ``summarize``)."""
    from mmdet_cam_hook.evaluation.evaluate import EvalSettings, summarize
    from mmdet_cam_hook.evaluation.metrics import MapScores

    scores = MapScores()
    for cams, bboxes, labels, gt, gt_labels, aucs in images:
        scores.update(cams, bboxes, labels, gt, gt_labels,
                      aucs=dict(deletion_auc_prior=aucs, insertion_auc_prior=aucs))
    settings = EvalSettings(methods=['gradcam'], protocols=['prior'])
    return scores.summary(), summarize(_eval_records(images, settings.all_methods),
                                       settings)['gradcam']


def test_blank_map_is_left_out_of_pointing_game_in_hook_and_eval():
    """Two matched detections, one blank (issue 18 item 9: the hook said 0.5, the evaluation
    1.0): both say 1.0 now, and both report the blank map as blank_share 0.5."""
    gt = [[0, 0, 4, 4], [4, 4, 8, 8]]
    cams = np.stack([peak_cam(1, 1), np.zeros((8, 8))])
    hook, ev = _hook_and_eval([(cams, gt, [0, 0], gt, [0, 0], [0.2, 0.4])])
    assert hook['pointing_game'] == ev['pointing_game'] == 1.0
    assert hook['blank_share'] == ev['blank_share'] == 0.5
    assert hook['energy_in_box'] == ev['energy_in_box'] == 1.0  # the blank map left out
    assert hook['deletion_auc_prior'] == ev['deletion_auc']['prior'] == pytest.approx(0.3)
    assert ev['num_detections'] == 2 and ev['num_matched'] == 2


def test_every_map_blank_gives_no_pointing_game_in_hook_and_eval():
    """Every map blank: no pointing game anywhere (the hook logged 0.000, the evaluation null),
    blank_share 1; the AUCs still count."""
    gt = [[0, 0, 4, 4]]
    hook, ev = _hook_and_eval([(np.zeros((1, 8, 8)), gt, [0], gt, [0], [0.5])])
    for name in ('pointing_game', 'energy_pointing_game', 'off_target_share', 'energy_in_box'):
        assert name not in hook and ev[name] is None, name
    assert hook['blank_share'] == ev['blank_share'] == 1.0
    assert hook['insertion_auc_prior'] == ev['insertion_auc']['prior'] == 0.5


def test_map_scores_are_means_over_detections_not_images():
    """An image with 1 detection and one with 3: every number is the mean over the 4
    detections (a mean of per-image means would weigh the lone detection 3x)."""
    gt, cams = _two_objects()
    boxes = np.array([[0, 0, 4, 4]] * 4, np.float64)
    images = [(cams[:1], boxes[:1], [0], gt, [0, 1], [1.0]),
              (cams[1:], boxes[1:], [1, 0, 0], gt, [0, 1], [0.0, 0.0, 0.0])]
    hook, ev = _hook_and_eval(images)
    for name in ('pointing_game', 'energy_pointing_game', 'off_target_share', 'blank_share',
                 'energy_in_box'):
        assert hook[name] == pytest.approx(ev[name]), name
    assert hook['deletion_auc_prior'] == ev['deletion_auc']['prior'] == pytest.approx(0.25)
    assert hook['blank_share'] == 0.25
    # matched: image 1's detection (GT 0, EPG 1) and image 2's first class-0 one (GT 0, the
    # background map: EPG 0); image 2's class-1 box misses GT 1 and its second class-0 box finds
    # GT 0 taken
    assert ev['num_matched'] == 2 and ev['energy_pointing_game'] == pytest.approx(0.5)


def test_map_scores_without_ground_truth_and_bad_lengths():
    from mmdet_cam_hook.evaluation.metrics import MapScores

    scores = MapScores()
    scores.update(diagonal_cam(), [[1, 1, 3, 3]])
    assert scores.summary() == dict(energy_in_box=0.5, blank_share=0.0)
    assert MapScores().summary() == {}
    with pytest.raises(ValueError, match='`deletion_auc_prior` holds 2 values for 1 detections'):
        scores.update(diagonal_cam(), [[1, 1, 3, 3]], aucs=dict(deletion_auc_prior=[0.1, 0.2]))
