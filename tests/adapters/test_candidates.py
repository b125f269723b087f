"""Candidates before the score threshold and NMS (``DetectorAdapter.candidates``) equal what the
head computes before ``_bbox_post_process``, checked against mmdet's own decoding run
independently: a dense head with a score factor (FCOS), a two-stage detector (Faster R-CNN) and
a DETR (Deformable DETR), random-init from mmdet's configs and perturbed so that scores vary.

The oracles: FCOS's ``_predict_by_feat_single`` with no score filter, no top-k and no NMS gives
every (prior, class) pair's rescaled box and final score; with the config's own filter and top-k
(still no NMS) it gives the pairs that went into NMS. Faster R-CNN's ``BBoxHead.predict_by_feat``
with ``rcnn_test_cfg=None`` gives every RoI's per-class boxes and scores. Deformable DETR's
``_predict_by_feat_single`` gives the ``max_per_img`` top-k pairs. Torch runs at one thread.
"""
import copy

import numpy as np
import pytest
import torch

from mmdet_cam_hook import CAMEngine
from mmdet_cam_hook.runtime.pipeline import preprocess
from mmdet_cam_hook.testing import build_detector, decoded, kept_pairs, synthetic_image

pytestmark = pytest.mark.usefixtures('one_thread')

LIGHT_FPN = {'model.backbone.depth': 18, 'model.backbone.base_channels': 16,
             'model.neck.in_channels': [16, 32, 64, 128], 'model.neck.out_channels': 32,
             'model.bbox_head.in_channels': 32, 'model.bbox_head.feat_channels': 32}
FCOS = dict(weights={'conv.weight': 0.03, 'conv_cls': 0.03, 'conv_centerness': 0.03,
                     'conv_reg': 0.03},
            biases={'conv_cls': (0., 0.5), 'conv_centerness': (0., 0.5), 'conv_reg': (2.5, 0.3)})
FASTER = dict(weights={'rpn_reg': 0.2, 'fc_cls': 0.05, 'fc_reg': 0.01},
              biases={'fc_cls': (0., 0.5)})
SMALL_FASTER = {'model.backbone.depth': 18, 'model.neck.in_channels': [64, 128, 256, 512],
                'model.test_cfg.rpn.max_per_img': 60}
SMALL_DETR = {'model.backbone.depth': 18, 'model.backbone.base_channels': 16,
              'model.num_queries': 30, 'model.test_cfg.max_per_img': 20,
              'model.encoder.num_layers': 1, 'model.decoder.num_layers': 1,
              'model.neck.in_channels': [32, 64, 128]}
_BUILT = {}


def _model(name):
    if name not in _BUILT:
        if name == 'fcos':
            _BUILT[name] = build_detector('fcos/fcos_r50-caffe_fpn_gn-head_1x_coco.py', 256,
                                          perturb=FCOS, cfg_options=LIGHT_FPN)
        elif name == 'faster-rcnn':
            _BUILT[name] = build_detector('faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py', 128,
                                          perturb=FASTER, cfg_options=SMALL_FASTER)
        else:
            _BUILT[name] = build_detector(
                'deformable_detr/deformable-detr_r50_16xb2-50e_coco.py', cfg_options=SMALL_DETR)
    return _BUILT[name]


def _outputs(model, score_thr, image):
    engine = CAMEngine(model, score_thr=score_thr)
    _, meta, outs, _ = decoded(engine, image)
    adapter = engine.adapter
    with torch.no_grad():
        cands = adapter.candidates(outs, meta, score_thr)
    return adapter, outs, meta, cands


def _check_kept(cands):
    """Every kept detection is one candidate pair, with its box, score and prior."""
    dets = cands.detections
    rows, labels, same = kept_pairs(cands)
    assert len(rows) == len(dets) > 0
    torch.testing.assert_close(same.scores, dets.scores, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(same.bboxes, dets.bboxes, rtol=1e-6, atol=1e-4)
    for name in ('labels', 'levels', 'ys', 'xs', 'anchors'):
        assert torch.equal(getattr(same, name), getattr(dets, name)), name
    assert cands.entered[rows, labels].all()


def _pairs(cands, rows, labels):
    """(P, 6) score, label, box of the candidate pairs ``(rows, labels)``."""
    boxes = cands.rows(rows.tolist(), labels.tolist()).bboxes
    return torch.cat([cands.scores[rows, labels, None], labels[:, None].float(), boxes], 1)


def _same_rows(ours, results):
    """The same (score, label, box) rows as mmdet's ``results``, whatever the order."""
    theirs = torch.cat([results.scores[:, None], results.labels[:, None].float(),
                        results.bboxes], 1)
    assert ours.shape == theirs.shape

    def order(t):
        return t[np.lexsort(t.numpy().T[::-1])]

    torch.testing.assert_close(order(ours), order(theirs))


def test_dense_candidates_equal_predict_by_feat_single():
    model = _model('fcos')
    image = synthetic_image(200, 256, seed=4)  # resized: scale_factor != 1
    adapter, outs, meta, cands = _outputs(model, 0.05, image)
    head = model.bbox_head
    cls, reg, ctr = ([t[0] for t in o] for o in outs)
    sizes = [c.shape[-2:] for c in cls]
    priors = head.prior_generator.grid_priors(sizes, dtype=cls[0].dtype, device=cls[0].device)
    # mmdet sorts each level's pairs by score (and nms_pre=-1 drops one): take every pair
    every = copy.deepcopy(head.test_cfg)
    every.update(score_thr=-1.0, nms_pre=10**9, min_bbox_size=-1)
    with torch.no_grad():
        ref = head._predict_by_feat_single(cls, reg, ctr, priors, meta, every, rescale=True,
                                           with_nms=False)
    num, num_classes = cands.scores.shape
    assert num == sum(len(p) for p in priors) and num_classes == 3
    everything = torch.ones_like(cands.entered).nonzero(as_tuple=True)
    _same_rows(_pairs(cands, *everything), ref)
    cfg = copy.deepcopy(head.test_cfg)
    cfg.score_thr = 0.05
    with torch.no_grad():
        pre = head._predict_by_feat_single(cls, reg, ctr, priors, meta, cfg, rescale=True,
                                           with_nms=False)
    rows, labels = cands.entered.nonzero(as_tuple=True)
    assert 0 < len(rows) == len(pre) < num * num_classes
    _same_rows(_pairs(cands, rows, labels), pre)
    _check_kept(cands)
    # the engine's differentiable score of a candidate pair is its candidate score
    some = cands.rows([0, num // 2, num - 1], [0, 1, 2])
    torch.testing.assert_close(adapter.scores(outs, some), some.scores)


def test_two_stage_candidates_equal_bbox_head_without_nms():
    from mmdet.structures.bbox import bbox2roi

    model = _model('faster-rcnn')
    image = synthetic_image(100, 140, seed=3)
    adapter, outs, meta, cands = _outputs(model, 0.3, image)
    with torch.no_grad():
        rois = bbox2roi([adapter.proposals(outs, meta)])
        res = model.roi_head._bbox_forward(tuple(outs.feats), rois)
        ref = model.roi_head.bbox_head.predict_by_feat(
            rois=(rois, ), cls_scores=(res['cls_score'], ), bbox_preds=(res['bbox_pred'], ),
            batch_img_metas=[meta], rcnn_test_cfg=None, rescale=True)[0]
    num, num_classes = cands.scores.shape
    assert num == len(rois) == 60
    torch.testing.assert_close(cands.scores, ref.scores[:, :num_classes])
    torch.testing.assert_close(cands.bboxes, ref.bboxes.view(num, num_classes, 4))
    assert torch.equal(cands.entered, cands.scores > model.roi_head.test_cfg.score_thr)
    _check_kept(cands)
    some = cands.rows([0, 7, num - 1], [2, 0, 1])
    torch.testing.assert_close(adapter.scores(outs, some), some.scores)


def test_detr_candidates_equal_predict_by_feat_single():
    model = _model('deformable-detr')
    image = synthetic_image(100, 140, seed=3)
    adapter, outs, meta, cands = _outputs(model, 0.0, image)
    head = model.bbox_head
    with torch.no_grad():
        ref = head._predict_by_feat_single(outs.cls_scores[0], outs.bbox_preds[0], meta,
                                           rescale=True)
    assert cands.scores.shape == (30, 3)
    torch.testing.assert_close(cands.scores, outs.cls_scores[0].sigmoid())
    rows, labels = cands.entered.nonzero(as_tuple=True)  # the top-k pairs, as mmdet's
    assert len(rows) == len(ref) == 20
    _same_rows(_pairs(cands, rows, labels), ref)
    _check_kept(cands)
    np.testing.assert_array_equal(cands.index.numpy(), np.arange(30))


@pytest.mark.parametrize('name', ['faster-rcnn', 'deformable-detr'])
def test_miss_maps_on_the_roi_and_exact_routes(name):
    """A miss's candidate is one more row of the engine's maps: on the RoI route (Faster R-CNN)
    and the exact route (Deformable DETR) its Grad-CAM map equals grad-cam's class run on that
    RoI's / query's score, taken to the original image."""
    from mmdet_cam_hook.cam.geometry import Letterbox
    from mmdet_cam_hook.testing.reference import reference_input_cams

    model = _model(name)
    image = synthetic_image(100, 140, seed=3)
    engine = CAMEngine(model, score_thr=0.9)  # (almost) nothing kept: every GT is missed
    adapter, outs, meta, cands = _outputs(model, 0.9, image)
    # ground truth: the boxes of the two best dropped candidates no kept detection matches
    dropped = (cands.kept < 0).nonzero().tolist()
    rows = sorted(dropped, key=lambda rc: -float(cands.scores[rc[0], rc[1]]))[:60]
    gt, labels = [], []
    for row, label in rows:
        box = cands.boxes(label)[row]
        if len(gt) == 2:
            break
        if all(_iou(box, d) < 0.5 for d in cands.detections.bboxes) and \
                all(_iou(box, g) < 0.5 for g in gt):
            gt.append(box)
            labels.append(label)
    assert len(gt) == 2
    res = engine.explain(image, methods='gradcam', gt_bboxes=torch.stack(gt).numpy(),
                         gt_labels=labels)['gradcam']
    inputs, _ = preprocess(model, engine.pipeline, image)
    letterbox = Letterbox.from_metainfo(meta)
    mapped = [m for m in res.misses if m.candidate is not None]
    assert mapped
    for miss in mapped:
        row = cands.rows([miss.candidate], [miss.candidate_label])
        layers = [engine.layers[int(row.levels)].name] if engine.level_aware \
            else engine.layer_names
        ref = reference_input_cams(model, inputs, 'gradcam', [layers], row, metainfo=meta)
        model.zero_grad(set_to_none=True)
        ref = letterbox.to_original(torch.from_numpy(ref), image.shape[:2]).clamp(0, 1)
        np.testing.assert_allclose(miss.cams['gradcam'], ref[0].numpy(), atol=1e-4)


def _iou(a, b):
    from mmdet_cam_hook.cam.geometry import box_iou

    return float(box_iou(np.asarray(a, np.float64), np.asarray(b, np.float64)[None])[0])
