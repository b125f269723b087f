"""Tracking models (mmdet's MOT/VIS configs): ByteTrack (a YOLOX-nano-sized detector), QDTrack
(Faster R-CNN) and MaskTrack R-CNN (Mask R-CNN), random init, ResNet-18 / YOLOX-nano widths,
128 px frames, 3 classes, their detectors perturbed as the detector tests do. The engine
explains the per-frame detector (``TrackingAdapter``): its input equals what the tracking
model's own video pipeline and ``TrackDataPreprocessor`` give the detector for that frame, its
detections equal ``model.detector.predict`` on it (what the tracker is fed; masks too), and its
maps (boxes, and MaskTrack's masks) equal grad-cam's class run once per detection on the
detector itself (atol 1e-4). On a two-frame video, every box ByteTrack tracks is one of the
engine's detections of its frame, so a track's maps are the engine's maps of those detections.
"""
import numpy as np
import pytest
import torch

from mmdet_cam_hook import CAMEngine
from mmdet_cam_hook.adapters.masks import RoIMaskBranch
from mmdet_cam_hook.adapters.wrappers import TrackingAdapter
from mmdet_cam_hook.testing import (
    _set_num_classes,
    build_model,
    calibrate_bn,
    offline_config,
    perturb_head,
    synthetic_image,
)
from mmdet_cam_hook.testing.reference import on_original, reference_cams

R18 = {'backbone.depth': 18, 'neck.in_channels': [64, 128, 256, 512],
       'test_cfg.rpn.max_per_img': 100, 'test_cfg.rcnn.max_per_img': 20,
       'roi_head.bbox_roi_extractor.finest_scale': 8}
NANO = {'backbone.deepen_factor': 0.33, 'backbone.widen_factor': 0.25,
        'backbone.use_depthwise': True, 'neck.in_channels': [64, 128, 256],
        'neck.out_channels': 64, 'neck.num_csp_blocks': 1, 'neck.use_depthwise': True,
        'bbox_head.in_channels': 64, 'bbox_head.feat_channels': 64,
        'bbox_head.use_depthwise': True}
TWO_STAGE = dict(weights={'rpn_reg': 0.2, 'fc_cls': 0.05, 'fc_reg': 0.01, 'conv_logits': 0.3},
                 biases={'fc_cls': (0.0, 0.5), 'conv_logits': (0.0, 0.3)})
YOLOX = dict(calibrate=True, weights={'multi_level_conv_': 0.02},
             biases={'multi_level_conv_cls': (0.0, 0.5), 'multi_level_conv_obj': (0.0, 0.5)})
#: name: (mmdet config, detector options, perturbation, default layers)
MODELS = {
    'bytetrack': ('bytetrack/bytetrack_yolox_x_8xb4-amp-80e_crowdhuman-mot17halftrain_'
                  'test-mot17halfval.py', NANO, YOLOX, [f'neck.out_convs.{i}' for i in range(3)]),
    'qdtrack': ('qdtrack/qdtrack_faster-rcnn_r50_fpn_8xb2-4e_mot17halftrain_test-mot17halfval.py',
                R18, TWO_STAGE, [f'neck.fpn_convs.{i}' for i in range(4)]),
    'masktrack': ('masktrack_rcnn/masktrack-rcnn_mask-rcnn_r50_fpn_8xb1-12e_youtubevis2019.py',
                  {**R18, 'roi_head.mask_roi_extractor.finest_scale': 8}, TWO_STAGE,
                  [f'neck.fpn_convs.{i}' for i in range(4)]),
}
_BUILT = {}


def build_tracker(name: str, size: int = 128, num_classes: int = 3):
    """A random-init tracking model from mmdet's config: its detector narrowed, ``num_classes``
    classes, no score filter, frames resized to ``size``, the detector's head perturbed."""
    config, options, perturb, _ = MODELS[name]
    cfg = offline_config(config, size)
    cfg.merge_from_dict({f'model.detector.{k}': v for k, v in options.items()
                         if k.split('.')[0] in cfg.model.detector})
    det_cfg = cfg.model.detector
    _set_num_classes(det_cfg, num_classes)
    (det_cfg.test_cfg.rcnn if 'rcnn' in det_cfg.test_cfg else det_cfg.test_cfg).score_thr = 0.0
    model = build_model(cfg, 0, num_classes)
    perturb = dict(perturb)
    if perturb.pop('calibrate', False):
        # calibrate_bn reads the (per-frame) test pipeline and preprocesses as the tracker does
        own, model.detector.cfg = model.detector.data_preprocessor, cfg
        model.detector.data_preprocessor = model.data_preprocessor
        try:
            calibrate_bn(model.detector)
        finally:
            model.detector.data_preprocessor = own
            del model.detector.cfg
    perturb_head(model.detector, 0, **perturb)
    return model


@pytest.fixture(scope='module', params=list(MODELS))
def tracker(request):
    torch.set_num_threads(1)
    if request.param not in _BUILT:
        _BUILT[request.param] = build_tracker(request.param)
    return request.param, _BUILT[request.param]


def track_video(model, frames):
    """Frames through the tracking model's own video pipeline (its TransformBroadcaster reading
    arrays) and its ``TrackDataPreprocessor``: the (1, T, 3, H, W) input and the video's data
    sample, as the tracker's ``predict`` takes them."""
    import copy

    from mmdet_cam_hook.runtime.pipeline import build_pipeline

    steps = copy.deepcopy([dict(t) for t in model.cfg.test_dataloader.dataset.pipeline])
    steps[0]['transforms'] = [dict(type='mmdet.LoadImageFromNDArray')] + [
        dict(t) for t in steps[0]['transforms'][1:] if 'Annotations' not in t['type']]
    n = len(frames)
    data = build_pipeline(steps)(dict(img=list(frames), img_id=list(range(n)),
                                      frame_id=list(range(n)), ori_shape=[None] * n,
                                      video_length=[n] * n, img_path=[None] * n))
    batch = model.data_preprocessor(dict(inputs=[data['inputs']],
                                         data_samples=[data['data_samples']]), False)
    assert batch['inputs'].dim() == 5
    return batch['inputs'], batch['data_samples']


def track_frame(model, image):
    """The detector's input for one frame and the frame's data sample (:func:`track_video`)."""
    inputs, samples = track_video(model, [image])
    return inputs[:, 0], samples[0][0]


def test_engine_explains_the_per_frame_detector(tracker):
    """The engine's input is the tracker's frame input; its detections (and masks) equal
    ``model.detector.predict`` on it; layers are the detector's, prefixed."""
    name, model = tracker
    image = synthetic_image(96, 160, seed=4)
    engine = CAMEngine(model, score_thr=0.0)
    adapter = engine.adapter
    assert type(adapter) is TrackingAdapter and adapter.inner.model is model.detector
    assert engine.layer_names == [f'detector.{n}' for n in MODELS[name][3]]
    assert (engine.mask_branch is not None) == (name == 'masktrack')
    inputs, sample = track_frame(model, image)
    from mmdet_cam_hook.runtime.pipeline import preprocess
    mine, meta = preprocess(model, engine.pipeline, image)
    assert torch.equal(mine, inputs)
    for key in ('img_shape', 'ori_shape', 'scale_factor', 'batch_input_shape', 'pad_shape'):
        assert tuple(np.ravel(meta[key])) == tuple(np.ravel(sample.metainfo[key])), key
    with torch.no_grad():
        dets = adapter.decode(adapter.head_outputs(adapter.features(inputs)), meta, 0.0)
        pred = model.detector.predict(inputs, [sample])[0].pred_instances
    order = pred.scores.argsort(descending=True, stable=True)
    assert len(dets) == len(pred) > 0
    assert torch.equal(dets.bboxes, pred.bboxes[order])
    assert torch.equal(dets.labels, pred.labels[order])
    assert torch.equal(dets.scores, pred.scores[order])
    res = engine.explain(image, methods='hirescam')['hirescam']
    np.testing.assert_array_equal(res.scores, pred.scores[order].numpy())
    if name == 'masktrack':
        assert isinstance(engine.mask_branch, RoIMaskBranch)
        np.testing.assert_array_equal(res.masks, pred.masks[order].numpy())


def test_maps_equal_grad_cam(tracker):
    """HiResCAM on the default layers, one detection per level, equals grad-cam's class run
    once per detection on the detector itself (its own layer names)."""
    name, model = tracker
    image = synthetic_image(96, 160, seed=4)
    engine = CAMEngine(model, score_thr=0.0, topk=8)
    adapter = engine.adapter
    inputs, sample = track_frame(model, image)
    with torch.no_grad():
        dets = adapter.decode(adapter.head_outputs(adapter.features(inputs)),
                              sample.metainfo, 0.0)
    res = engine.explain(image, methods='hirescam')['hirescam']
    idx = [int(np.flatnonzero(res.levels == lv)[0]) for lv in sorted(set(res.levels.tolist()))]
    assert len(idx) >= 2
    layers = [[n[len('detector.'):] for n in res.layers[i]] for i in idx]
    ref = reference_cams(model.detector, inputs, 'hirescam', layers,
                         dets.select(torch.tensor(idx)))
    np.testing.assert_allclose(res.input_cams[idx], ref, atol=1e-4)


def test_mask_maps_equal_grad_cam():
    """MaskTrack R-CNN's mask branch (the ``level`` route): one instance per level its masks
    come from, mask maps equal grad-cam's class run with the mask target on the detector."""
    model = _BUILT.get('masktrack') or build_tracker('masktrack')
    image = synthetic_image(96, 160, seed=4)
    engine = CAMEngine(model, score_thr=0.0, topk=16)
    adapter, branch = engine.adapter, engine.mask_branch
    inputs, sample = track_frame(model, image)
    meta = sample.metainfo
    with torch.no_grad():
        dets = adapter.decode(adapter.head_outputs(adapter.features(inputs)), meta, 0.0)
    levels = branch.levels(dets, meta)[:16].numpy()
    idx = [int(np.flatnonzero(levels == lv)[0]) for lv in sorted(set(levels.tolist()))]
    assert len(idx) >= 2
    layers = [[MODELS['masktrack'][3][levels[i]]] for i in idx]
    res = engine.explain(image, methods='hirescam')['hirescam']
    ref = reference_cams(model.detector, inputs, 'hirescam', layers,
                         dets.select(torch.tensor(idx)), metainfo=meta, mask_branch=branch)
    np.testing.assert_allclose(res.mask_cams[idx], on_original(res, ref, image), atol=1e-4)
    assert (res.mask_cams[idx].reshape(len(idx), -1).max(1) > 0).all()


def test_tracks_are_engine_detections():
    """ByteTrack on a two-frame video (the tracker's thresholds lowered so that the random model
    starts tracks): every tracked box of each frame is exactly one of the engine's detections
    of that frame (score too), so a track's map sequence is the engine's maps at those
    detections, one per frame."""
    model = _BUILT.get('bytetrack') or build_tracker('bytetrack')
    tracker = model.tracker
    saved = (tracker.init_track_thr, dict(tracker.obj_score_thrs))
    frames = [synthetic_image(96, 160, seed=4), synthetic_image(96, 160, seed=4)[:, ::-1].copy()]
    tracker.init_track_thr, tracker.obj_score_thrs = 0.0, dict(high=0.3, low=0.05)
    try:
        inputs, samples = track_video(model, frames)
        with torch.no_grad():
            video = model.predict(inputs, samples)[0]
    finally:
        tracker.init_track_thr, tracker.obj_score_thrs = saved
    engine = CAMEngine(model, score_thr=0.0)
    ids = []
    for t, frame in enumerate(frames):
        tracks = video[t].pred_track_instances
        res = engine.explain(frame, methods='hirescam')['hirescam']
        assert len(tracks) > 0
        for box, score in zip(tracks.bboxes.numpy(), tracks.scores.numpy()):
            hit = np.flatnonzero((res.bboxes == box).all(1) & (res.scores == score))
            assert len(hit) == 1
        ids.append(set(tracks.instances_id.tolist()))
    assert ids[0] & ids[1]  # some tracks go on into the second frame
