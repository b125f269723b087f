"""DetCAMHook on real MMEngine runners: a tiny YOLOX-nano trained for a few iterations on
a generated COCO-format dataset (96 px shapes), CPU only.

Run directly (``python tests/test_hook.py WORK_DIR DATA_ROOT``) under ``torchrun`` it is the
worker of the 2-process DDP test.
"""
import contextlib
import json
import os
import random
import re
import shutil
import subprocess
import sys
import uuid
from pathlib import Path
from typing import List

import cv2
import numpy as np
import pytest
import torch
from mmengine.config import Config
from mmengine.hooks import Hook
from mmengine.model import is_model_wrapper
from mmengine.runner import Runner

from mmdet_cam_hook.hooks import schedule
from mmdet_cam_hook.hooks.cam_hook import DetCAMHook, YOLOXGradCAMHook
from mmdet_cam_hook.testing import (
    TINY_METHODS,
    TINY_SIZE,
    cam_hook,
    hooks_of,
    mmdet_config,
    run_log_dir,
    run_log_text,
    tiny_cfg,
    tiny_shapes,
    unwrap_model,
)
from mmdet_cam_hook.visualization.cards import CARD_WIDTH

pytestmark = pytest.mark.usefixtures('one_thread')

SIZE = TINY_SIZE  # network input and longest image side
METHODS = list(TINY_METHODS)
DDP_TIMEOUT = 300


# --------------------------------------------------------------------------- one training, twice


class StateSpy(Hook):
    """Records the model's and the process's state in after_val_epoch."""

    def __init__(self, priority, make_train=False):
        self.priority = priority
        self.make_train = make_train
        self.states = []

    def after_val_epoch(self, runner, metrics=None):
        model = unwrap_model(runner.model)
        if self.make_train:
            model.train()  # the engine must switch to eval itself and restore this
        self.states.append(dict(
            training=[m.training for m in model.modules()],
            hooks=sum(
                len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
                + len(m._backward_pre_hooks) for m in model.modules()),
            grads=[None if p.grad is None else p.grad.clone() for p in model.parameters()],
            grad_enabled=torch.is_grad_enabled(),
            torch_rng=torch.get_rng_state(),
            numpy_rng=np.random.get_state(),
            python_rng=random.getstate(),
            params=[p.detach().clone() for p in model.parameters()],
        ))


def _final_weights(runner):
    (ema, ) = [h for h in runner.hooks if type(h).__name__ == 'EMAHook']
    return {**{k: v.clone() for k, v in unwrap_model(runner.model).state_dict().items()},
            **{f'ema.{k}': v.clone() for k, v in ema.ema_model.state_dict().items()}}


@pytest.fixture(scope='module')
def runs(shapes, tmp_path_factory):
    """The same 2-epoch training with and without CAM hooks (state spies in both), then a test
    run on the trained runner with the hooks. Two CAM hooks: one on dataset probes (GT known),
    one on a grey image whose only colour in the panel is the heat map (renormalised, small),
    configured by the hook's first name, ``YOLOXGradCAMHook``."""
    root = tmp_path_factory.mktemp('runs')
    grey = root / 'grey.png'
    rng = np.random.default_rng(0)
    cv2.imwrite(str(grey), rng.integers(100, 156, (72, SIZE), np.uint8)[..., None].repeat(3, 2))
    out = {}
    for with_hook in (False, True):
        hooks = [cam_hook(), cam_hook(type='YOLOXGradCAMHook', probe_images=str(grey),
                                      methods='layercam', renormalize=True, max_image_size=400)]
        cfg = tiny_cfg(shapes, root / f'hook{with_hook}', hooks=hooks if with_hook else [],
                       backends=('LocalVisBackend', 'TensorboardVisBackend'))
        runner = Runner.from_cfg(cfg)
        spies = (StateSpy(priority=47, make_train=True), StateSpy(priority=48))
        for spy in spies:  # registered after the CAM hooks: same priority 48 runs later
            runner.register_hook(spy)
        runner.train()
        weights = _final_weights(runner)
        if with_hook:
            runner.test()
        out[with_hook] = dict(runner=runner, spies=spies, weights=weights)
    return out


def test_training_is_bit_identical_with_and_without_the_hook(runs):
    without, with_hook = runs[False]['weights'], runs[True]['weights']
    assert without.keys() == with_hook.keys()
    for key, value in without.items():
        assert torch.equal(value, with_hook[key]), key


def test_state_after_the_hook_is_as_before(runs):
    runner = runs[True]['runner']
    assert all(h._engine is not None for h in hooks_of(runner, DetCAMHook))  # they ran
    before, after = runs[True]['spies']
    assert len(before.states) == len(after.states) == 2
    for b, a in zip(before.states, after.states):
        assert b['training'] == a['training'] and all(a['training'])
        assert b['hooks'] == a['hooks']
        assert b['grad_enabled'] == a['grad_enabled']
        assert all(g is None for g in b['grads'] + a['grads'])
        assert torch.equal(b['torch_rng'], a['torch_rng'])
        assert b['python_rng'] == a['python_rng']
        b_np, a_np = b['numpy_rng'], a['numpy_rng']
        assert b_np[0] == a_np[0] and np.array_equal(b_np[1], a_np[1]) and b_np[2:] == a_np[2:]
        assert all(torch.equal(x, y) for x, y in zip(b['params'], a['params']))


def test_runs_before_ema_hook_swaps_weights_back(runs):
    order = [type(h).__name__ for h in runs[True]['runner'].hooks]
    # In after_val_epoch, before EMAHook (49): it explains the EMA weights that were evaluated.
    assert order.index('DetCAMHook') < order.index('EMAHook')


def test_tensorboard_images_and_scalars(runs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    runner = runs[True]['runner']
    hook = hooks_of(runner, DetCAMHook)[0]
    probes = hook._probes['val']
    assert len(probes) == 2 and all(p.gt_bboxes is not None for p in probes)
    names = {f'cam_val_{m}_{p.name}' for m in METHODS for p in probes}
    assert all('/' not in n and '+' not in n for n in names)

    events = EventAccumulator(str(run_log_dir(runner) / 'vis_data'),
                              size_guidance={'images': 0, 'scalars': 0})
    events.Reload()
    # issue 24: TensorBoard gets the cards (an overview and one per detection, grouped under the
    # panel's name), no longer the wide panel, which stays in the local PNGs
    tags = set(events.Tags()['images'])
    assert {f'{n}/all' for n in names} <= tags
    for name in names:
        slots = {t.split('/', 1)[1] for t in tags if t.startswith(name + '/')}
        assert all(re.fullmatch(r'all|gt_\d+|fp_\d+', s) for s in slots), slots  # GT known
        for step in (1, 2):  # step = epoch; the overview plus the top 3 detections (topk=3)
            assert sum(step in [e.step for e in events.Images(f'{name}/{s}')]
                       for s in slots) == 4
        for event in events.Images(f'{name}/all'):
            decoded = cv2.imdecode(np.frombuffer(event.encoded_image_string, np.uint8),
                                   cv2.IMREAD_COLOR)
            assert decoded.shape[:2] == (event.height, event.width)
            assert decoded.shape[1] == CARD_WIDTH
    # runner.test() after training: its own names, at the last epoch
    for name in {f'cam_test_{m}_{p.name}' for m in METHODS for p in hook._probes['test']}:
        assert [e.step for e in events.Images(f'{name}/all')] == [2]
    for method in METHODS:
        scalars = events.Scalars(f'cam_val/{method}_energy_in_box')
        assert [s.step for s in scalars] == [1, 2]
        assert all(0.0 <= s.value <= 1.0 for s in scalars)


def _panels_at_steps_1_and_2(runner, hook, methods):
    """Read the run's TensorBoard events back; every probe (2) and method has a decodable panel
    at steps 1 and 2. Returns the loaded EventAccumulator."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    probes = hook._probes['val']
    assert len(probes) == 2
    events = EventAccumulator(str(run_log_dir(runner) / 'vis_data'),
                              size_guidance={'images': 0, 'scalars': 0})
    events.Reload()
    names = {f'cam_val_{m}_{p.name}/all' for m in methods for p in probes}  # the overviews
    assert names <= set(events.Tags()['images'])
    for name in names:
        images = events.Images(name)
        assert [e.step for e in images] == [1, 2]
        decoded = cv2.imdecode(np.frombuffer(images[-1].encoded_image_string, np.uint8),
                               cv2.IMREAD_COLOR)
        assert decoded.shape[:2] == (images[-1].height, images[-1].width)
        assert decoded.shape[1] == CARD_WIDTH  # drawn for TensorBoard's default card (issue 24)
    return events


def test_rtmdet_run_in_tensorboard(shapes, tmp_path):
    """The hook on a tiny RTMDet-tiny (mmdet's config, its EMA and pipeline-switch hooks kept)
    trained for 2 epochs: every probe and method has a panel at each validation in TensorBoard,
    and per-method scalars; the hook runs before RTMDet's EMAHook swaps the weights back.

    Two epochs on 4 images leave RTMDet's classifier at its prior (scores ~0.01): the
    gradient-weighted maps are blank (counted in ``blank_share``, no energy mean), the
    gradient-free Eigen-CAM's are not."""
    methods = ['eigencam', 'hirescam']
    cfg = tiny_cfg(shapes, tmp_path, detector='rtmdet', hooks=[cam_hook(methods=methods)],
                   backends=('LocalVisBackend', 'TensorboardVisBackend'))
    runner = Runner.from_cfg(cfg)
    runner.train()

    order = [type(h).__name__ for h in runner.hooks]
    assert {'EMAHook', 'PipelineSwitchHook'} <= set(order)
    assert order.index('DetCAMHook') < order.index('EMAHook')
    (hook, ) = hooks_of(runner, DetCAMHook)
    assert type(hook._engine.adapter).__name__ == 'RTMDetAdapter'
    events = _panels_at_steps_1_and_2(runner, hook, methods)
    for method in methods:
        shares = events.Scalars(f'cam_val/{method}_blank_share')
        assert [s.step for s in shares] == [1, 2]
        assert all(0.0 <= s.value <= 1.0 for s in shares)
    energy = events.Scalars('cam_val/eigencam_energy_in_box')
    assert [s.step for s in energy] == [1, 2] and all(0 <= s.value <= 1 for s in energy)
    assert [s.value for s in events.Scalars('cam_val/eigencam_blank_share')] == [0.0, 0.0]
    log = run_log_text(runner)
    assert log.count('DetCAMHook: explained 2/2 probe image(s) x 2 method(s)') == 2
    assert 'runs without' not in log and 'failed after' not in log


def test_faster_rcnn_run_in_tensorboard(shapes, tmp_path):
    """The hook end to end on a two-stage run: a tiny Faster R-CNN (mmdet's config shrunk as in
    tests/test_two_stage.py: ResNet-18, 50 proposals) trained for 2 epochs; the two-stage adapter
    explains every probe with every method at each validation in TensorBoard, with per-method
    scalars. The gradient-free Eigen-CAM's maps are not blank; Grad-CAM's energy is checked
    whenever this barely trained RoI head gives it non-blank maps."""
    methods = ['eigencam', 'gradcam']
    cfg = tiny_cfg(shapes, tmp_path, detector='faster-rcnn', hooks=[cam_hook(methods=methods)],
                   backends=('LocalVisBackend', 'TensorboardVisBackend'))
    runner = Runner.from_cfg(cfg)
    runner.train()

    (hook, ) = hooks_of(runner, DetCAMHook)
    assert type(hook._engine.adapter).__name__ == 'TwoStageAdapter'
    events = _panels_at_steps_1_and_2(runner, hook, methods)
    scalars = set(events.Tags()['scalars'])
    for method in methods:
        shares = events.Scalars(f'cam_val/{method}_blank_share')
        assert [s.step for s in shares] == [1, 2]
        assert all(0.0 <= s.value <= 1.0 for s in shares)
        if any(s.value < 1.0 for s in shares):
            energy = events.Scalars(f'cam_val/{method}_energy_in_box')
            assert [s.step for s in energy] == [s.step for s in shares if s.value < 1.0]
            assert all(0 <= s.value <= 1 for s in energy)
        else:
            assert f'cam_val/{method}_energy_in_box' not in scalars
    assert [s.value for s in events.Scalars('cam_val/eigencam_blank_share')] == [0.0, 0.0]
    log = run_log_text(runner)
    assert log.count('DetCAMHook: explained 2/2 probe image(s) x 2 method(s)') == 2
    assert 'runs without' not in log and 'failed after' not in log


def test_local_pngs_and_scalars(runs):
    runner = runs[True]['runner']
    vis_data = run_log_dir(runner) / 'vis_data'
    probes = hooks_of(runner, DetCAMHook)[0]._probes['val']
    for name in (f'cam_val_{m}_{p.name}' for m in METHODS for p in probes):
        for step in (1, 2):
            png = cv2.imread(str(vis_data / 'vis_image' / f'{name}_{step}.png'))
            assert png is not None and png.shape[0] > SIZE and png.shape[1] > 3 * SIZE
    rows = [json.loads(line) for line in (vis_data / 'scalars.json').read_text().splitlines()]
    logged = {k for row in rows for k in row}
    assert {f'cam_val/{m}_energy_in_box' for m in [*METHODS, 'layercam']} <= logged


def test_local_png_shows_a_heat_map(runs):
    """The grey probe has no colour of its own, so colour in its panel is the JET map (and the
    green boxes): blue for low values and red/yellow for the peaks must both be there."""
    vis_image = run_log_dir(runs[True]['runner']) / 'vis_data' / 'vis_image'
    png = cv2.imread(str(vis_image / 'cam_val_layercam_00_grey_2.png'))
    assert png is not None and max(png.shape[:2]) == 400  # max_image_size
    hsv = cv2.cvtColor(png, cv2.COLOR_BGR2HSV)
    hues = hsv[..., 0][(hsv[..., 1] > 80) & (hsv[..., 2] > 60)]
    assert hues.size > 0.2 * png.shape[0] * png.shape[1]
    blue = ((hues >= 100) & (hues <= 130)).mean()
    warm = ((hues <= 35) | (hues >= 170)).mean()
    # The peaks are small: the probe's boxes are 8 px tall on a 72x96 image. Renormalising
    # takes the pixels whose centres lie in a box (geometry.box_slices, the metrics' rule since
    # the restructure; before, every pixel a box touched), one row and column fewer here: warm
    # was 0.011 with the old rule and is 0.0066 with it.
    assert blue > 0.05 and warm > 0.004, (blue, warm)


def test_summary_line_counts_what_each_backend_received(runs):
    log = run_log_text(runs[True]['runner'])
    # 2 probes x 2 methods + the scalars, per validation, for the first hook
    assert log.count('explained 2/2 probe image(s) x 2 method(s) after val at step') == 2
    assert 'LocalVisBackend 5/5, TensorboardVisBackend 5/5' in log
    assert 'LOST' not in log and 'VisBackend lost' not in log
    assert 'runs without' not in log  # the base config's hooks are all there


# --------------------------------------------------------------------------- steps, interval


def test_iteration_based_steps_and_interval(shapes, tmp_path):
    """Validations after iterations 1 to 4; interval=3 draws the 3rd and the last one."""
    cfg = tiny_cfg(shapes, tmp_path, hooks=[cam_hook(interval=3, methods='gradcam',
                                                     probe_images=[1])], max_iters=4)
    runner = Runner.from_cfg(cfg)
    runner.train()
    pngs = sorted(p.name for p in (run_log_dir(runner) / 'vis_data' / 'vis_image').glob('cam_*'))
    (probe, ) = hooks_of(runner, DetCAMHook)[0]._probes['val']
    assert pngs == [f'cam_val_gradcam_{probe.name}_{step}.png' for step in (3, 4)]


def test_drise_cost_is_the_methods_option(shapes, tmp_path, monkeypatch):
    """issue 18 #11: D-RISE's cost is set in the config as the method's own option; the hook
    runs exactly that many masked images per probe (counted at the detector)."""
    from mmdet_cam_hook.runtime.detector import BatchedDetector

    cfg = tiny_cfg(shapes, tmp_path, hooks=[cam_hook(
        methods=['gradcam', dict(type='drise', num_masks=24, batch_size=8)], probe_images=1)])
    runner = Runner.from_cfg(cfg)
    seen = []
    outputs = BatchedDetector.outputs

    def counting(self, images):
        seen.append(len(images))
        return outputs(self, images)

    monkeypatch.setattr(BatchedDetector, 'outputs', counting)
    runner.test()
    hook = hooks_of(runner, DetCAMHook)[0]
    assert hook.methods == ['gradcam', 'drise'] and hook._methods[1].num_masks == 24
    pngs = sorted(p.name for p in (run_log_dir(runner) / 'vis_data' / 'vis_image').glob('cam_*'))
    assert [p.split('_')[2] for p in pngs] == ['drise', 'gradcam']
    assert seen.count(8) == 3, seen  # 24 masked images in batches of 8 (one probe)


def test_test_only_run_uses_step_0_and_builds_no_train_loop(shapes, tmp_path):
    cfg = tiny_cfg(shapes, tmp_path, hooks=[cam_hook(methods='gradcam', probe_images=1)])
    runner = Runner.from_cfg(cfg)
    runner.test()
    assert isinstance(runner._train_loop, dict)  # the step guard did not build it
    pngs = [p.name for p in (run_log_dir(runner) / 'vis_data' / 'vis_image').glob('cam_*')]
    assert len(pngs) == 1 and pngs[0].startswith('cam_test_gradcam_') and \
        pngs[0].endswith('_0.png')


def test_val_only_run_logs_pointing_game_against_dataset_gt(shapes, tmp_path):
    """A stand-alone ``runner.val()`` (step 0, drawn whatever the interval) on a val set whose
    ground truth of probe 0 is set to the boxes the model will detect: every detection is
    matched, and the logged hit rate is the pointing game of the engine's own maps."""
    from mmdet_cam_hook import CAMEngine
    from mmdet_cam_hook.evaluation.metrics import pointing_game
    from mmdet_cam_hook.runtime.pipeline import test_pipeline_cfg

    coco = json.loads(shapes.ann_file('val').read_text())
    ann_file = tmp_path / 'val.json'
    cfg = tiny_cfg(shapes, tmp_path, hooks=[cam_hook(probe_images=[0], interval=5)])
    cfg.val_dataloader.dataset.ann_file = str(ann_file)
    cfg.val_evaluator.ann_file = str(ann_file)
    runner = Runner.from_cfg(cfg)

    image = coco['images'][0]
    engine = CAMEngine(unwrap_model(runner.model), score_thr=0.0, topk=3,
                       test_pipeline=test_pipeline_cfg(runner.cfg))
    results = engine.explain(shapes.img_dir('val') / image['file_name'], methods=METHODS)
    dets = results[METHODS[0]]
    cat_ids = sorted(c['id'] for c in coco['categories'])
    coco['annotations'] = [a for a in coco['annotations'] if a['image_id'] != image['id']] + [
        dict(id=10_000 + k, image_id=image['id'], category_id=cat_ids[int(label)], iscrowd=0,
             bbox=[float(x1), float(y1), float(x2 - x1), float(y2 - y1)],
             area=float((x2 - x1) * (y2 - y1)))
        for k, ((x1, y1, x2, y2), label) in enumerate(zip(dets.bboxes, dets.labels))
    ]
    ann_file.write_text(json.dumps(coco))

    runner.val()
    rows = [json.loads(line) for line in
            (run_log_dir(runner) / 'vis_data' / 'scalars.json').read_text().splitlines()]
    (row, ) = [r for r in rows if any(k.startswith('cam_val/') for k in r)]
    assert row['step'] == 0
    for method in METHODS:
        res = results[method]
        hits, total = pointing_game(res.cams, res.bboxes, res.labels, res.bboxes, res.labels)
        assert total == len(res) == 3
        assert row[f'cam_val/{method}_pointing_game'] == pytest.approx(hits / total)


def test_blank_maps_are_counted_and_faithfulness_is_logged(shapes, tmp_path):
    """A fixed stride-32 layer cannot explain stride-8 detections: their blank maps are
    counted in ``blank_share`` and left out of the energy mean (never averaged in as 0); with
    ``faithfulness=True`` the deletion/insertion AUCs of the same maps are logged too."""
    from mmdet_cam_hook import CAMEngine
    from mmdet_cam_hook.evaluation.evaluate import image_seed, probe_faithfulness
    from mmdet_cam_hook.evaluation.metrics import energy_in_box, is_blank
    from mmdet_cam_hook.runtime.pipeline import test_pipeline_cfg

    hook = cam_hook(probe_images=[0], methods='hirescam', target_layers='neck.out_convs.2',
                    topk=12, faithfulness=True)
    runner = Runner.from_cfg(tiny_cfg(shapes, tmp_path, hooks=[hook]))
    engine = CAMEngine(unwrap_model(runner.model), target_layers='neck.out_convs.2',
                       score_thr=0.0, topk=12, test_pipeline=test_pipeline_cfg(runner.cfg))
    image = runner.val_dataloader.dataset.get_data_info(0)['img_path']
    with pytest.warns(UserWarning, match='no gradient path'):  # 3x3 priors at stride 32
        res = engine.explain(image, methods=['hirescam'])['hirescam']
    blank = is_blank(res.cams)
    assert 0 < blank.sum() < len(res), res.levels  # detections on other levels are blank
    faith = probe_faithfulness(engine, image, {'hirescam': res}, seed=image_seed(0, 0))

    runner.val()
    rows = [json.loads(line) for line in
            (run_log_dir(runner) / 'vis_data' / 'scalars.json').read_text().splitlines()]
    (row, ) = [r for r in rows if any(k.startswith('cam_val/') for k in r)]
    assert row['cam_val/hirescam_blank_share'] == pytest.approx(blank.mean())
    assert row['cam_val/hirescam_energy_in_box'] == pytest.approx(
        energy_in_box(res.cams[~blank], res.bboxes[~blank]).mean(), rel=1e-5)
    for curve in ('deletion', 'insertion'):
        assert row[f'cam_val/hirescam_{curve}_auc_prior'] == pytest.approx(
            faith[f'hirescam_{curve}_auc_prior'], rel=1e-5)


@pytest.mark.filterwarnings('ignore:.*no gradient path')  # the stride-32 layer, on purpose
def test_hook_scalars_are_mmdet_cam_eval_numbers(shapes, tmp_path):
    """The same probes through the hook (a stand-alone val run with ``faithfulness=True``) and
    through ``mmdet-cam-eval``'s ``evaluate_image`` and ``summarize`` (same layer, score
    threshold, top-k; the hook's curve settings): every number the hook logs is the
    evaluation's, under the same name (issue 18 item 9). Probe 0's ground truth is set to the
    boxes the model detects, so detections match; the stride-32 layer leaves the stride-8
    detections' maps blank, so the blank rule is exercised; probe 1 keeps its own ground truth.
    """
    from mmdet_cam_hook import CAMEngine
    from mmdet_cam_hook.evaluation.evaluate import EvalSettings, evaluate_image, summarize
    from mmdet_cam_hook.runtime.data import ground_truth
    from mmdet_cam_hook.runtime.pipeline import test_pipeline_cfg

    methods, layer = ['hirescam'], 'neck.out_convs.2'
    coco = json.loads(shapes.ann_file('val').read_text())
    ann_file = tmp_path / 'val.json'
    cfg = tiny_cfg(shapes, tmp_path, hooks=[cam_hook(
        probe_images=[0, 1], methods=methods, target_layers=layer, topk=12, faithfulness=True)])
    cfg.val_dataloader.dataset.ann_file = str(ann_file)
    cfg.val_evaluator.ann_file = str(ann_file)
    runner = Runner.from_cfg(cfg)
    engine = CAMEngine(unwrap_model(runner.model), target_layers=layer, score_thr=0.0,
                       topk=12, test_pipeline=test_pipeline_cfg(runner.cfg),
                       keep_input_cams=False)
    image = coco['images'][0]
    dets = engine.detect(str(shapes.img_dir('val') / image['file_name']))
    cat_ids = sorted(c['id'] for c in coco['categories'])
    coco['annotations'] = [a for a in coco['annotations'] if a['image_id'] != image['id']] + [
        dict(id=10_000 + k, image_id=image['id'], category_id=cat_ids[int(label)], iscrowd=0,
             bbox=[float(x1), float(y1), float(x2 - x1), float(y2 - y1)],
             area=float((x2 - x1) * (y2 - y1)))
        for k, ((x1, y1, x2, y2), label) in enumerate(zip(dets.bboxes.tolist(), dets.labels))
    ]
    ann_file.write_text(json.dumps(coco))

    runner.val()
    rows = [json.loads(line) for line in
            (run_log_dir(runner) / 'vis_data' / 'scalars.json').read_text().splitlines()]
    (row, ) = [r for r in rows if any(k.startswith('cam_val/') for k in r)]
    dataset = runner.val_dataloader.dataset
    settings = EvalSettings(methods=methods, protocols='prior', steps=10, fill='blur',
                            batch_size=32, seed=0)  # the hook's probe settings
    records = [evaluate_image(engine, *ground_truth(dataset, i), settings, index=i)
               for i in (0, 1)]
    summary = summarize(records, settings)
    for method in methods:
        numbers = summary[method]
        assert 0 < numbers['blank_share'] < 1 and numbers['num_matched'] >= 1, numbers
        expected = {name: numbers[name] for name in (
            'energy_in_box', 'pointing_game', 'energy_pointing_game', 'off_target_share',
            'blank_share')}
        expected.update({f'{c}_prior': numbers[c]['prior']
                         for c in ('deletion_auc', 'insertion_auc')})
        logged = {k.split('/', 1)[1][len(method) + 1:]: v for k, v in row.items()
                  if k.startswith(f'cam_val/{method}_')}
        assert set(logged) == {k for k, v in expected.items() if v is not None}
        for name, value in logged.items():
            assert value == pytest.approx(expected[name], rel=1e-5, abs=1e-6), (method, name)


# --------------------------------------------------------------------------- fail-soft, strict


def _thin_and_good_probes(folder: Path) -> List[str]:
    """A 400x1 image (it decodes, so it passes the build-time check, but the test pipeline
    cannot shrink it to the 96 px input: the engine raises at run time) and a good one."""
    thin, good = folder / 'a_thin.png', folder / 'b_good.png'
    cv2.imwrite(str(thin), np.full((1, 400, 3), 128, np.uint8))
    cv2.imwrite(str(good), np.full((SIZE, SIZE, 3), 128, np.uint8))
    return [str(thin), str(good)]


def test_failing_probe_costs_only_its_own_panels(shapes, tmp_path):
    cfg = tiny_cfg(shapes, tmp_path, hooks=[cam_hook(probe_images=_thin_and_good_probes(
        tmp_path), methods='gradcam')])
    runner = Runner.from_cfg(cfg)
    runner.train()
    assert runner.epoch == 2
    pngs = sorted(p.name for p in (run_log_dir(runner) / 'vis_data' / 'vis_image').glob('cam_*'))
    assert pngs == ['cam_val_gradcam_01_b_good_1.png', 'cam_val_gradcam_01_b_good_2.png']
    log = run_log_text(runner)
    for step in (1, 2):
        assert (f"DetCAMHook: probe '00_a_thin' ({tmp_path / 'a_thin.png'}) failed after "
                f'val at step {step}; the other probes are still logged') in log
        assert f'explained 1/2 probe image(s) x 1 method(s) after val at step {step}' in log
    # the traceback the first time, then the error in one line
    assert log.count('raises instead): \nTraceback') == 1
    assert log.count('raises instead): ValueError: ') == 1 and '400x1' in log


def test_strict_raises_runtime_error(shapes, tmp_path):
    cfg = tiny_cfg(shapes, tmp_path, hooks=[cam_hook(probe_images=_thin_and_good_probes(
        tmp_path), strict=True)])
    runner = Runner.from_cfg(cfg)
    with pytest.raises(ValueError, match='400'):
        runner.train()
    assert runner.epoch == 1  # raised at the first validation


@contextlib.contextmanager
def _unwritable(folder: Path):
    """Make ``folder`` unwritable for this process: immutable (``chattr +i``) for root, whom
    permission bits do not stop; read-only permissions otherwise."""
    folder.mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0:
        if shutil.which('chattr') is None:
            pytest.skip('running as root without chattr: cannot make a folder unwritable')
        subprocess.run(['chattr', '+i', str(folder)], check=True, capture_output=True)
        undo = ['chattr', '-i', str(folder)]
    else:
        folder.chmod(0o555)
        undo = ['chmod', '755', str(folder)]
    try:
        try:
            (folder / 'write_test').write_bytes(b'')
        except OSError:
            pass
        else:
            pytest.skip(f'{folder} stays writable on this file system')
        yield
    finally:
        subprocess.run(undo, check=True)


def test_lost_local_panels_are_reported_once_and_training_continues(shapes, tmp_path):
    """LocalVisBackend's ``cv2.imwrite`` fails silently in an unwritable folder: TensorBoard
    keeps its copy, training finishes, and the hook says once what LocalVisBackend lost."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = tiny_cfg(shapes, tmp_path, hooks=[cam_hook(probe_images=[1], methods='gradcam')],
                   backends=('LocalVisBackend', 'TensorboardVisBackend'))
    runner = Runner.from_cfg(cfg)
    vis_image = run_log_dir(runner) / 'vis_data' / 'vis_image'
    with _unwritable(vis_image):
        runner.train()
    assert runner.epoch == 2
    assert list(vis_image.iterdir()) == []
    (probe, ) = hooks_of(runner, DetCAMHook)[0]._probes['val']
    events = EventAccumulator(str(run_log_dir(runner) / 'vis_data'), size_guidance={'images': 0})
    events.Reload()
    assert [e.step for e in events.Images(f'cam_val_gradcam_{probe.name}/all')] == [1, 2]

    log = run_log_text(runner)
    assert log.count('DetCAMHook: LocalVisBackend lost') == 1  # once, at step 1
    (warning, ) = [line for line in log.splitlines() if 'LocalVisBackend lost' in line]
    assert 'lost 1 item(s) at step 1' in warning
    assert f'cam_val_gradcam_{probe.name}_1.png was not written' in warning
    assert 'kept by: TensorboardVisBackend' in warning
    # every summary line says what was lost; none claims the local copy
    for step in (1, 2):
        assert (f'after val at step {step} in' in log)
    assert log.count('LocalVisBackend 1/2 LOST, TensorboardVisBackend 2/2') == 2


def test_failing_backend_costs_only_its_own_copy(shapes, tmp_path):
    """A backend that raises (here LocalVisBackend, whose image folder is a file) loses its
    copy; the others get theirs and training finishes."""
    cfg = tiny_cfg(shapes, tmp_path, hooks=[cam_hook(probe_images=[1], methods='gradcam')],
                   backends=('LocalVisBackend', 'TensorboardVisBackend'), max_epochs=1)
    runner = Runner.from_cfg(cfg)
    (run_log_dir(runner) / 'vis_data' / 'vis_image').write_text('not a folder')
    runner.train()
    assert runner.epoch == 1
    log = run_log_text(runner)
    assert 'DetCAMHook: LocalVisBackend lost 1 item(s) at step 1' in log
    assert 'FileExistsError' in log
    assert 'LocalVisBackend 1/2 LOST, TensorboardVisBackend 2/2' in log
    assert list((run_log_dir(runner) / 'vis_data').glob('events.out.tfevents.*'))


@pytest.mark.parametrize('content', [b'', b'\x89PNG\r\n\x1a\n' + b'\x00' * 64, b'not an image'],
                         ids=['empty', 'truncated-png', 'garbage'])
def test_unreadable_probe_fails_before_training(shapes, tmp_path, content):
    good, bad = tmp_path / 'good.png', tmp_path / 'bad.png'
    cv2.imwrite(str(good), np.full((SIZE, SIZE, 3), 128, np.uint8))
    bad.write_bytes(content)
    cfg = tiny_cfg(shapes, tmp_path, hooks=[cam_hook(probe_images=[str(good), str(bad)])])
    runner = Runner.from_cfg(cfg)
    with pytest.raises(ValueError, match=r"`probe_images`: probe '01_bad' cannot be used: "
                       r"image '.*bad\.png' could not be decoded"):
        runner.train()
    assert runner.iter == 0


def test_probe_removed_after_build_fails_before_training(shapes, tmp_path):
    probe = tmp_path / 'probe.png'
    cv2.imwrite(str(probe), np.full((SIZE, SIZE, 3), 128, np.uint8))
    runner = Runner.from_cfg(tiny_cfg(shapes, tmp_path, hooks=[cam_hook(probe_images=str(probe))]))
    probe.unlink()
    with pytest.raises(ValueError, match=r"probe '00_probe' cannot be used: .*does not exist"):
        runner.train()
    assert runner.iter == 0


def test_unreadable_dataset_probe_fails_before_training(shapes, tmp_path):
    """Dataset probes are decoded in before_run too: the error names the dataset's file."""
    data = tiny_shapes(tmp_path)
    coco = json.loads(data.ann_file('val').read_text())
    broken = data.img_dir('val') / coco['images'][1]['file_name']
    broken.write_bytes(b'')
    runner = Runner.from_cfg(tiny_cfg(data, tmp_path, hooks=[cam_hook(probe_images=[1])]))
    with pytest.raises(ValueError, match=re.escape(str(broken))):
        runner.train()
    assert runner.iter == 0


@pytest.mark.parametrize('family, missing', [
    ('YOLOX', 'YOLOXModeSwitchHook, EMAHook'),
    ('RTMDet', 'PipelineSwitchHook, EMAHook'),
])
def test_replaced_custom_hooks_warn_with_the_fix(shapes, tmp_path, family, missing):
    """``custom_hooks = [dict(type='DetCAMHook')]`` drops the family's own hooks: the
    warning, when the runner starts, names them and the fix."""
    cfg = tiny_cfg(shapes, tmp_path, detector=family.lower())
    cfg.custom_hooks = [cam_hook(probe_images=[0], methods='gradcam')]
    runner = Runner.from_cfg(cfg)
    runner.val()
    log = run_log_text(runner)
    assert f'this {family} model runs without {missing}' in log
    assert "Keep them: `custom_hooks = [*_base_.custom_hooks, dict(type='DetCAMHook', " \
        "...)]`" in log


def test_unsupported_detector_fails_before_training(shapes, tmp_path):
    """A detector no adapter supports (CenterNet's ``CenterNetHead``: its heat-map peaks are not
    yet priors the engine knows) fails in before_run, naming its head and the supported ones,
    also when ``target_layers`` is given (nothing else would look at the head before the first
    validation)."""
    cfg = tiny_cfg(shapes, tmp_path, hooks=[cam_hook(target_layers='backbone.layer4')])
    cfg.model = Config.fromfile(
        mmdet_config('centernet/centernet_r18_8xb16-crop512-140e_coco.py')).model
    cfg.model.bbox_head.num_classes = len(shapes.classes)
    cfg.model.backbone.init_cfg = None
    cfg.custom_hooks = [h for h in cfg.custom_hooks if h['type'] != 'YOLOXModeSwitchHook']
    runner = Runner.from_cfg(cfg)
    with pytest.raises(ValueError, match=r'no adapter for the head CenterNetHead; supported '
                       r"heads: \[.*'RTMDetHead'.*'YOLOXHead'.*\]"):
        runner.train()
    assert runner.iter == 0


def test_large_probe_is_explained_at_max_image_size(shapes, tmp_path):
    """A 3000x2000 probe: the panel and the maps stay within ``max_image_size``. The peak
    resident memory of the call is read back (numpy's and torch's allocations both count), so
    full-size float maps (24 MB each) would show."""
    from mmdet_cam_hook import CAMEngine
    from mmdet_cam_hook.runtime.pipeline import test_pipeline_cfg
    from mmdet_cam_hook.testing import peak_memory

    scene = cv2.imread(str(next(iter(sorted(shapes.img_dir('val').iterdir())))))
    big = tmp_path / 'big.png'
    cv2.imwrite(str(big), cv2.resize(scene, (3000, 2000), interpolation=cv2.INTER_NEAREST))
    cfg = tiny_cfg(shapes, tmp_path, hooks=[cam_hook(probe_images=str(big), max_image_size=300)])
    runner = Runner.from_cfg(cfg)
    runner.val()  # decodes the probe in before_run, then logs its panels at step 0
    pngs = sorted((run_log_dir(runner) / 'vis_data' / 'vis_image').glob('cam_val_*_0.png'))
    assert len(pngs) == len(METHODS)
    assert all(max(cv2.imread(str(p)).shape[:2]) <= 300 for p in pngs)

    hook = hooks_of(runner, DetCAMHook)[0]
    assert list(hook._probes.images) == [str(big)]  # decoded once, kept once
    full_map = 3000 * 2000 * 4
    hook.after_val_epoch(runner)  # warm-up: the allocator's first pages
    _, bounded = peak_memory(hook.after_val_epoch, runner)  # only the maps and panels count
    engine = CAMEngine(unwrap_model(runner.model), score_thr=0.0, topk=3,
                       test_pipeline=test_pipeline_cfg(runner.cfg))
    results, unbounded = peak_memory(engine.explain, hook._probes.images[str(big)], methods=METHODS)
    assert len(results[METHODS[0]]) == 3
    assert unbounded > 3 * full_map, unbounded  # the reading sees full-size maps ...
    assert bounded < full_map, bounded  # ... and the hook made none


def _toy_runner(work_dir, train_cfg: dict, spy: Hook) -> Runner:
    """A real MMEngine runner on a one-parameter model and 1-sample loaders: fast loops."""
    from mmengine.evaluator import BaseMetric, Evaluator
    from mmengine.model import BaseModel
    from torch.utils.data import DataLoader, default_collate

    class Toy(BaseModel):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def forward(self, inputs, data_samples=None, mode='tensor'):
            if mode == 'loss':
                return dict(loss=((self.w - inputs) ** 2).mean())
            return [dict(w=float(self.w))] * len(inputs)

    class Count(BaseMetric):
        def process(self, data_batch, data_samples):
            self.results.extend(data_samples)

        def compute_metrics(self, results):
            return dict(n=len(results))

    def loader(size):
        return DataLoader([dict(inputs=torch.ones(1))] * size, batch_size=1,
                          collate_fn=default_collate)

    # iteration-based: enough samples for the whole run (MMEngine sleeps 2 s at each restart)
    train_size = train_cfg.get('max_iters', 1)
    return Runner(model=Toy(), work_dir=str(work_dir), experiment_name=uuid.uuid4().hex,
                  train_dataloader=loader(train_size), val_dataloader=loader(1),
                  val_evaluator=Evaluator(Count()),
                  train_cfg=train_cfg, val_cfg=dict(),
                  optim_wrapper=dict(optimizer=dict(type='SGD', lr=0.01)),
                  default_hooks=dict(checkpoint=None), custom_hooks=[spy])


@pytest.mark.parametrize('train_cfg', [
    dict(by_epoch=True, max_epochs=14, val_begin=2, val_interval=3,
         dynamic_intervals=[(7, 2), (11, 1)]),
    dict(by_epoch=False, max_iters=14, val_begin=2, val_interval=3,
         dynamic_intervals=[(7, 2), (11, 1)]),
    dict(by_epoch=True, max_epochs=7, val_interval=3),  # the last epoch is off the interval
    dict(by_epoch=False, max_iters=10, val_begin=3, val_interval=2, dynamic_intervals=[(9, 5)]),
], ids=['epoch-dynamic', 'iter-dynamic', 'epoch-last', 'iter-begin'])
def test_validation_ordinal_replays_the_train_loop(tmp_path, train_cfg):
    """At every validation MMEngine's own loop runs, the ordinal derived from the loop's state
    is the number of validations run so far: the loop's rule is replayed exactly."""

    class Spy(Hook):
        def __init__(self):
            self.seen = []

        def after_val_epoch(self, runner, metrics=None):
            self.seen.append((schedule.step(runner), schedule.validation_ordinal(runner)))

    spy = Spy()
    _toy_runner(tmp_path, train_cfg, spy).train()
    assert len(spy.seen) >= 3
    assert [n for _, n in spy.seen] == list(range(1, len(spy.seen) + 1)), spy.seen


# --------------------------------------------------------------------------- argument validation


@pytest.mark.parametrize('kwargs, error, match', [
    (dict(interval=0), ValueError, r'`interval` must be a positive int, got 0'),
    (dict(interval=1.5), TypeError, r'`interval` must be a positive int, got 1.5'),
    (dict(interval=True), TypeError, r'`interval` must be a positive int, got True'),
    (dict(methods='gradcm'), ValueError, r"`methods` must be one of \[.*'gradcam'.*\], "
     r"got 'gradcm'"),
    (dict(methods=[]), ValueError, r'`methods` must name at least one'),
    (dict(methods=['gradcam', 3]), TypeError, r'`methods` must be a str'),
    (dict(methods=[dict(type='drise', num_mask=8)]), ValueError, r"num_mask.*num_masks"),
    (dict(methods=dict(num_masks=8)), ValueError, r'`methods` as a dict needs a `type`'),
    (dict(methods=dict(type='drise', num_masks=0)), ValueError, r'`num_masks` must be a '
     r'positive int, got 0'),
    (dict(target_layers=[]), ValueError, r'`target_layers` must name at least one layer'),
    (dict(target_layers=3), TypeError, r'`target_layers` must be None, a layer name'),
    (dict(score_thr=1.5), ValueError, r'`score_thr` must be a number in \[0, 1\], got 1.5'),
    (dict(topk=0), ValueError, r'`topk` must be None or a positive int, got 0'),
    (dict(renormalize='yes'), TypeError, r"`renormalize` must be True or False, got 'yes'"),
    (dict(strict=1), TypeError, r'`strict` must be True or False, got 1'),
    (dict(max_detection_tiles=-1), ValueError, r'`max_detection_tiles` must be an int >= 0'),
    (dict(max_image_size=0), ValueError, r'`max_image_size` must be None or a positive int'),
    (dict(probe_images=0), ValueError, r'`probe_images` must be a positive int, got 0'),
    (dict(probe_images=[]), ValueError, r'`probe_images` must be a count, a list of'),
    (dict(probe_images=[1, -2]), ValueError, r'`probe_images` indices must be >= 0, got \[-2\]'),
    (dict(probe_images=[0, 'a.png']), TypeError, r'\(not a mix\)'),
    (dict(probe_images=2.0), TypeError, r'`probe_images` must be a count'),
    (dict(probe_images='no/such/image.png'), FileNotFoundError, r'no/such/image.png'),
    (dict(probe_images=['no/such/image.png']), FileNotFoundError, r'no/such/image.png'),
])
def test_bad_arguments_fail_at_build(kwargs, error, match):
    with pytest.raises(error, match=match):
        DetCAMHook(**kwargs)


def test_probe_folder(tmp_path):
    with pytest.raises(ValueError, match='holds no image'):
        DetCAMHook(probe_images=str(tmp_path))
    for name in ('b.jpg', 'a.PNG', 'notes.txt'):
        (tmp_path / name).write_bytes(b'x')
    hook = DetCAMHook(probe_images=tmp_path)
    assert hook.probe_spec == [str(tmp_path / 'a.PNG'), str(tmp_path / 'b.jpg')]


@pytest.mark.parametrize('kwargs, match', [
    (dict(target_layers='neck.out_conv.0'), r"unknown target layer 'neck.out_conv.0'.*"
     r"neck.out_convs.0"),
    (dict(probe_images=[1, 2]), r'`probe_images` indices \[2\] are out of range for the val '
     r'dataset of 2 images'),
])
def test_model_and_data_mistakes_fail_before_training(shapes, tmp_path, kwargs, match):
    runner = Runner.from_cfg(tiny_cfg(shapes, tmp_path, hooks=[cam_hook(**kwargs)]))
    with pytest.raises(ValueError, match=match):
        runner.train()
    assert runner.iter == 0


def test_builds_from_registry_by_name():
    from mmengine.registry import HOOKS, DefaultScope

    with DefaultScope.overwrite_default_scope('mmdet'):
        hooks = [HOOKS.build(dict(type=name, probe_images=[0, 2], methods=METHODS))
                 for name in ('DetCAMHook', 'YOLOXGradCAMHook')]
    # One class under both names: configs written for YOLOX only keep working.
    assert YOLOXGradCAMHook is DetCAMHook
    assert all(type(h) is DetCAMHook and h.priority == 48 for h in hooks)


# --------------------------------------------------------------------------- distributed


def _ddp_worker(work_dir: str, data_root: str) -> None:
    """Run under torchrun: the same tiny training on 2 gloo processes, with the hook."""
    from mmdet_cam_hook.demo.shapes import CLASSES, ShapesDataset

    class RankReport(Hook):
        priority = 49  # right after the CAM hook

        def after_val_epoch(self, runner, metrics=None):
            (cam, ) = hooks_of(runner, DetCAMHook)
            report = dict(rank=runner.rank, engine_built=cam._engine is not None,
                          epoch=runner.epoch)
            with open(Path(work_dir) / f'rank{runner.rank}.jsonl', 'a') as f:
                f.write(json.dumps(report) + '\n')

    data = ShapesDataset(root=Path(data_root), classes=CLASSES, params={})
    # mmengine's `pytorch` launcher calls torch.cuda.set_device, which fails without a GPU; it
    # skips its own set-up when the process group exists, so gloo is initialised here.
    torch.distributed.init_process_group(backend='gloo')
    cfg = tiny_cfg(data, work_dir, hooks=[cam_hook()])
    cfg.launcher = 'pytorch'
    # CPU modules take no device_ids (mmengine's default wrapper passes [LOCAL_RANK]).
    cfg.model_wrapper_cfg = dict(type='MMDistributedDataParallel', device_ids=None,
                                 broadcast_buffers=False)
    runner = Runner.from_cfg(cfg)
    assert runner.world_size == 2 and is_model_wrapper(runner.model)
    runner.register_hook(RankReport())
    runner.train()


def test_ddp_two_processes_only_rank0_writes(shapes, tmp_path):
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
           __file__, str(tmp_path), str(shapes.root)]
    env = dict(os.environ, OMP_NUM_THREADS='1')
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=DDP_TIMEOUT, env=env)
    assert proc.returncode == 0, proc.stderr[-5000:]

    reports = {
        rank: [json.loads(line) for line in (tmp_path / f'rank{rank}.jsonl').open()]
        for rank in (0, 1)
    }
    assert [r['epoch'] for r in reports[0]] == [r['epoch'] for r in reports[1]] == [1, 2]
    assert all(r['engine_built'] for r in reports[0])
    assert not any(r['engine_built'] for r in reports[1])  # rank 1 never ran the engine
    (run_dir, ) = [p for p in tmp_path.iterdir() if p.is_dir()]
    pngs = list((run_dir / 'vis_data' / 'vis_image').glob('cam_val_*.png'))
    assert len(pngs) == 2 * len(METHODS) * 2


if __name__ == '__main__':
    _ddp_worker(*sys.argv[1:3])
