"""Misses end to end: DetCAMHook(explain_misses=True) on a real MMEngine run of a tiny YOLOX-nano
(mmdet's config, 4 training and 2 validation images of the shapes data set, 2 epochs, CPU, then
``runner.test()`` as mmdet's ``tools/test.py`` runs it), read back from TensorBoard with its
own reader; then the trained model with the score threshold raised so that objects are missed:
every unmatched ground-truth box has a record whose candidate score is the raw per-prior score
``sigmoid(cls) * sigmoid(obj)`` and whose map is grad-cam's class on that score.
"""
import cv2
import numpy as np
import pytest
import torch
from mmengine.runner import Runner

from mmdet_cam_hook import CAMEngine
from mmdet_cam_hook.adapters import Detections
from mmdet_cam_hook.cam.geometry import Letterbox, box_iou
from mmdet_cam_hook.cam.misses import REASONS
from mmdet_cam_hook.hooks.cam_hook import DetCAMHook
from mmdet_cam_hook.runtime import pipeline as pipelines
from mmdet_cam_hook.runtime.data import ground_truth
from mmdet_cam_hook.runtime.io import load_image
from mmdet_cam_hook.testing import (
    cam_hook,
    hooks_of,
    run_log_dir,
    tiny_cfg,
    unwrap_model,
)
from mmdet_cam_hook.testing.reference import reference_input_cams
from mmdet_cam_hook.visualization.cards import CARD_WIDTH

pytestmark = pytest.mark.usefixtures('one_thread')

METHODS = ['gradcam', 'hirescam']


@pytest.fixture(scope='module')
def run(shapes, tmp_path_factory):
    cfg = tiny_cfg(shapes, tmp_path_factory.mktemp('run'),
                   hooks=[cam_hook(methods=METHODS, explain_misses=True)],
                   backends=('LocalVisBackend', 'TensorboardVisBackend'))
    runner = Runner.from_cfg(cfg)
    runner.train()
    runner.test()  # what mmdet's tools/test.py runs: the hook's after_test_epoch
    return runner


def test_misses_in_tensorboard(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (hook, ) = hooks_of(run, DetCAMHook)
    assert hook.explain_misses
    probes = hook._probes['val']
    events = EventAccumulator(str(run_log_dir(run) / 'vis_data'),
                              size_guidance={'images': 0, 'scalars': 0})
    events.Reload()
    values = {name: [s.value for s in events.Scalars(f'cam_val/{name}')]
              for name in ['misses', 'false_positives'] + [f'miss_share_{r}' for r in REASONS]}
    assert all(len(v) == 2 for v in values.values())  # steps 1 and 2
    num_gt = sum(len(p.gt_bboxes) for p in probes)
    for step in range(2):
        misses = values['misses'][step]
        assert 0 <= misses <= num_gt and misses == int(misses)
        assert 0 <= values['false_positives'][step] <= 3 * len(probes)  # topk=3
        shares = [values[f'miss_share_{r}'][step] for r in REASONS]
        assert sum(shares) == pytest.approx(1.0 if misses else 0.0)
    assert values['misses'][-1] > 0  # two epochs on 4 images: the model misses objects
    test = events.Scalars('cam_test/misses')
    assert [(s.step, s.value) for s in test] == [(2, values['misses'][-1])]  # the same model
    vis_image = run_log_dir(run) / 'vis_data' / 'vis_image'
    for method in METHODS:  # a card per miss (at most max_detection_tiles per probe)
        misses = [t for t in events.Tags()['images'] if t.startswith(f'cam_val_{method}_')
                  and '/miss_' in t and 2 in [e.step for e in events.Images(t)]]
        assert 1 <= len(misses) <= values['misses'][-1]
        for tag in misses:
            assert events.Images(tag)[-1].width == CARD_WIDTH
    for method, probe in ((m, p) for m in METHODS for p in probes):
        name = f'cam_val_{method}_{probe.name}'
        # TensorBoard gets the cards (issue 24): the overview at each validation
        assert [e.step for e in events.Images(f'{name}/all')] == [1, 2]
        # the local panel: the misses row under the two-row panel (3 + 3 detection tiles),
        # three tile rows
        local = cv2.imread(str(vis_image / f'{name}_2.png'), cv2.IMREAD_COLOR)
        h, w = hook._probes.image(probe).shape[:2]
        assert local.shape[0] > 3 * round(h * 256 / max(h, w))


def test_trained_model_misses_are_explained(run):
    """At a raised threshold (the trained model's 5th-highest score on each image), every
    ground-truth box that no kept detection matches (same class, IoU >= 0.5, greedy by score:
    checked here with plain loops) has a record; a candidate's score is the raw score of its
    prior and its Grad-CAM map equals grad-cam's class on that prior's score."""
    model = unwrap_model(run.model)
    dataset = run.val_dataloader.dataset
    pipeline = pipelines.test_pipeline_cfg(run.cfg)
    probe_engine = CAMEngine(model, score_thr=0.0, test_pipeline=pipeline)
    checked = 0
    for index in range(len(dataset)):
        path, gt_bboxes, gt_labels = ground_truth(dataset, index)
        image = load_image(path)
        dets = probe_engine.detect(image)
        thr = float(dets.scores[min(4, len(dets) - 1)]) + 1e-6
        engine = CAMEngine(model, score_thr=thr, test_pipeline=pipeline)
        res = engine.explain(image, methods='gradcam', gt_bboxes=gt_bboxes,
                             gt_labels=gt_labels)['gradcam']
        taken = set()
        for box, label in zip(res.bboxes, res.labels):
            ious = [box_iou(box, g[None])[0] if (j not in taken and gt_labels[j] == label)
                    else -1 for j, g in enumerate(gt_bboxes)]
            if ious and max(ious) >= 0.5:
                taken.add(int(np.argmax(ious)))
        unmatched = [j for j in range(len(gt_bboxes)) if j not in taken]
        assert [m.gt_index for m in res.misses] == unmatched and unmatched
        inputs, meta = pipelines.preprocess(model, engine.pipeline, image)
        adapter = engine.adapter
        with torch.no_grad():
            cls, _, obj = adapter.head_outputs(adapter.features(inputs))
        sizes = [tuple(c.shape[-2:]) for c in cls]
        for miss in res.misses:
            if miss.candidate is None:
                continue
            level, cell = _locate(miss.candidate, sizes)
            y, x = divmod(cell, sizes[level][1])
            raw = cls[level][0, miss.candidate_label, y, x].sigmoid() \
                * obj[level][0, 0, y, x].sigmoid()
            assert miss.candidate_score == pytest.approx(float(raw), rel=1e-6)
            assert miss.reason in REASONS
            if checked < 3:
                _check_map(model, engine, inputs, meta, image, miss, level, y, x)
            checked += 1
    assert checked > 0


def _locate(row, sizes):
    for level, (h, w) in enumerate(sizes):
        if row < h * w:
            return level, row
        row -= h * w
    raise AssertionError('prior index beyond the last level')


def _check_map(model, engine, inputs, meta, image, miss, level, y, x):
    one = torch.tensor([0])
    det = Detections(torch.from_numpy(np.asarray([miss.candidate_box], np.float32)), one.float(),
                     torch.tensor([miss.candidate_label]), torch.tensor([level]),
                     torch.tensor([y]), torch.tensor([x]), one)
    ref = reference_input_cams(model, inputs, 'gradcam', [[engine.layers[level].name]], det)
    model.zero_grad(set_to_none=True)
    ref = Letterbox.from_metainfo(meta).to_original(torch.from_numpy(ref), image.shape[:2])
    np.testing.assert_allclose(miss.cams['gradcam'], ref.clamp(0, 1)[0].numpy(), atol=1e-4)
