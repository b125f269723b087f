"""``mmdet-cam-eval`` end to end on a tiny generated dataset and a perturbed random-init
YOLOX-nano checkpoint; torchrun with 2 gloo processes equals one process."""
import contextlib
import json
import os
import shutil
from pathlib import Path

import pytest

from mmdet_cam_hook.cli.eval import main
from mmdet_cam_hook.testing import torchrun_beside

KEYS = {'pointing_game', 'energy_pointing_game', 'off_target_share', 'blank_share',
        'deletion_auc', 'insertion_auc', 'num_detections', 'num_matched', 'seconds_per_image'}


@pytest.fixture(scope='module')
def ws(tmp_path_factory, make_tiny_coco):
    """A 4-image val split of the shapes at 64 px, a YOLOX-nano config testing at 96 px, and a
    checkpoint of a perturbed random-init YOLOX-nano."""
    root = tmp_path_factory.mktemp('eval')
    _, _, config, checkpoint, _ = make_tiny_coco(root, num_val=4)
    return root, str(config), str(checkpoint)


def _args(ws, *extra):
    root, config, checkpoint = ws
    return [config, checkpoint, '--score-thr', '0', '--topk', '2', '--steps', '1',
            '--device', 'cpu', *extra]


def test_end_to_end_writes_every_key(ws, capsys):
    out = ws[0] / 'results.json'
    code = main(_args(ws, '--num-images', '2', '--methods', 'hirescam', 'drise',
                      '--drise-masks', '8', '--randomization', '--out', str(out)))
    captured = capsys.readouterr()
    assert code == 0, captured.err
    result = json.loads(out.read_text())
    assert result['settings']['protocols'] == ['prior', 'matched']
    assert result['settings']['num_images'] == 2
    assert list(result['methods']) == ['hirescam', 'drise', 'random', 'box']
    for method, numbers in result['methods'].items():
        assert KEYS <= set(numbers), method
        assert set(numbers['deletion_auc']) == set(numbers['insertion_auc']) == \
            {'prior', 'matched'}
        assert numbers['num_detections'] == 4
        if method in ('hirescam', 'drise'):
            assert set(numbers['randomization_similarity']) == \
                {'head', 'head+neck', 'head+neck+backbone'}
    for method in result['methods']:
        assert f'| {method} |' in captured.out
    assert 'del prior' in captured.out and 'wrote' in captured.err


def test_torchrun_two_processes_equal_one(ws, readme_torchrun):
    """2 gloo processes on CPU split the 4 images, started as README.md says (the torchrun
    script, -m mmdet_cam_hook.cli.eval); the JSON equals a one-process run's (all but the
    timings)."""
    root = ws[0]
    args = _args(ws, '--methods', 'hirescam', '--topk', '1', '--num-images', '4')
    one, two = root / 'one.json', root / 'two.json'
    code, returncode, stdout, stderr = torchrun_beside(
        'mmdet_cam_hook.cli.eval', [*args, '--out', two], lambda: main([*args, '--out', str(one)]),
        launcher=readme_torchrun('mmdet_cam_hook.cli.eval'))
    assert code == 0
    assert returncode == 0, stderr[-3000:]
    assert stdout.count('| hirescam |') == 1  # rank 0 alone prints
    a, b = json.loads(one.read_text()), json.loads(two.read_text())
    for result in (a, b):
        for numbers in result['methods'].values():
            numbers.pop('seconds_per_image')
    a['settings'].pop('checkpoint'), b['settings'].pop('checkpoint')
    assert a == b
    assert a['methods']['hirescam']['num_detections'] == 4


@pytest.mark.parametrize('extra, code, message', [
    (['--steps', '0'], 2, "argument --steps: must be an integer >= 1, got '0'"),
    (['--methods', 'gradcm'], 2, "argument --methods: invalid choice: 'gradcm'"),
    (['--protocol', 'best'], 2, "argument --protocol: invalid choice: 'best'"),
    (['--fill', 'black'], 2, "argument --fill: invalid choice: 'black'"),
    (['--split', 'train'], 2, "argument --split: invalid choice: 'train'"),
    (['--device', 'tpu'], 1, "mmdet-cam-eval: error: --device must be 'cpu' or 'cuda[:N]'"),
    (['--out', '{root}'], 1, 'is a folder; give a file name'),
    (['--out', '{root}/missing/r.json'], 1, 'does not exist'),
])
def test_bad_arguments(ws, capsys, extra, code, message):
    extra = [e.format(root=ws[0]) for e in extra]
    with pytest.raises(SystemExit) if code == 2 else contextlib.nullcontext() as exc:
        result = main(_args(ws, *extra))
    assert (exc.value.code if code == 2 else result) == code
    assert message in capsys.readouterr().err


def test_missing_checkpoint_and_split(ws, capsys, tmp_path):
    root, config, _ = ws
    assert main([config, str(root / 'nope.pth'), '--device', 'cpu']) == 1
    assert 'nope.pth' in capsys.readouterr().err
    from mmengine.config import Config

    cfg = Config.fromfile(config)
    cfg.test_dataloader = None
    no_test = tmp_path / 'no_test.py'
    cfg.dump(str(no_test))
    assert main([str(no_test), ws[2], '--split', 'test', '--device', 'cpu']) == 1
    assert 'the config has no `test_dataloader.dataset`' in capsys.readouterr().err


def test_unreadable_image_is_skipped_and_counted(ws, capsys, tmp_path):
    """A corrupt image in the split: one line names it, the other images are evaluated, the
    JSON counts it (unreadable_images, unreadable_paths) and the exit code is 1."""
    from mmengine.config import Config

    from mmdet_cam_hook.cli.eval import ground_truth_dataset
    from mmdet_cam_hook.runtime.data import ground_truth

    cfg = Config.fromfile(ws[1])
    images = tmp_path / 'images'
    shutil.copytree(cfg.val_dataloader.dataset.data_prefix.img, images)
    broken = images / Path(ground_truth(ground_truth_dataset(cfg, 'val'), 0).path).name
    broken.write_bytes(b'not an image')
    for key in ('val_dataloader', 'test_dataloader'):
        cfg[key].dataset.data_prefix = dict(img=str(images) + os.sep)
    cfg.dump(str(tmp_path / 'broken.py'))
    out = tmp_path / 'results.json'
    code = main([str(tmp_path / 'broken.py'), ws[2], '--score-thr', '0', '--topk', '1',
                 '--steps', '1', '--device', 'cpu', '--methods', 'hirescam', '--num-images', '2',
                 '--out', str(out)])
    captured = capsys.readouterr()
    assert code == 1, captured.err
    assert 'Traceback' not in captured.err
    skipped = [line for line in captured.err.splitlines() if 'skipping' in line]
    assert len(skipped) == 1 and broken.name in skipped[0], captured.err
    assert skipped[0].startswith('mmdet-cam-eval: error: ') and 'could not be decoded' in skipped[0]
    assert 'mmdet-cam-eval: error: 1 of 2 images could not be read' in captured.err
    result = json.loads(out.read_text())
    assert result['unreadable_images'] == 1 and result['unreadable_paths'] == [str(broken)]
    assert result['settings']['num_images'] == 2
    assert result['methods']['hirescam']['num_detections'] == 1  # the other image's
    assert '2 images (1 unreadable, skipped)' in captured.out and '| hirescam |' in captured.out


def test_mmdet_package_config(ws, capsys, monkeypatch, tmp_path):
    """`mmdet::PATH` is mmdet's own config: read (its COCO val split is then missing here, a
    clear error), and a missing one is named."""
    monkeypatch.chdir(tmp_path)
    assert main(['mmdet::yolox/yolox_nano_8xb8-300e_coco.py', ws[2], '--device', 'cpu']) == 1
    err = capsys.readouterr().err
    assert 'mmdet-cam-eval: error: the val dataset of the config could not be built' in err, err
    assert 'annotations/instances_val2017.json' in err
    assert main(['mmdet::yolox/yolox_q.py', ws[2], '--device', 'cpu']) == 1
    assert "mmdet has no config 'yolox/yolox_q.py'" in capsys.readouterr().err


# --------------------------------------------------------------------------- masks
#: A small Mask R-CNN (mmdet's config, ResNet-18, 32-channel mask head) whose random mask
#: head predicts masks of varied sizes (as tests/adapters/test_masks.py builds it).
MASK_RCNN = {'model.backbone.depth': 18, 'model.neck.in_channels': [64, 128, 256, 512],
             'model.test_cfg.rpn.max_per_img': 50, 'model.test_cfg.rcnn.max_per_img': 10,
             'model.roi_head.mask_head.conv_out_channels': 32,
             'model.roi_head.bbox_roi_extractor.finest_scale': 8,
             'model.roi_head.mask_roi_extractor.finest_scale': 8}
MASK_PERTURB = dict(weights={'rpn_reg': 0.2, 'fc_cls': 0.05, 'fc_reg': 0.01, 'conv_logits': 0.3},
                    biases={'fc_cls': (0.0, 0.5), 'conv_logits': (0.0, 0.3)})
MASK_NUMBERS = ('energy_in_mask', 'pointing_game_in_mask', 'mask_energy_in_mask',
                'mask_pointing_game_in_mask')


@pytest.fixture(scope='module')
def mask_ws(tmp_path_factory):
    """The shapes' 2-image val split at 64 px, a Mask R-CNN config testing at 128 px on it and
    the checkpoint of a perturbed random-init Mask R-CNN."""
    import torch

    from mmdet_cam_hook.demo.shapes import generate_shapes
    from mmdet_cam_hook.testing import build_detector, coco_dataset

    root = tmp_path_factory.mktemp('eval_masks')
    data = generate_shapes(root / 'shapes', num_train=1, num_val=2, image_size=64, seed=0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    model = build_detector('mask_rcnn/mask-rcnn_r50_fpn_1x_coco.py', perturb=MASK_PERTURB,
                           num_classes=len(data.classes), cfg_options=MASK_RCNN)
    cfg = model.cfg
    pipeline = [dict(type='LoadImageFromFile'),
                dict(type='Resize', scale=(128, 128), keep_ratio=True),
                dict(type='LoadAnnotations', with_bbox=True), dict(type='PackDetInputs')]
    cfg.val_dataloader = cfg.test_dataloader = dict(
        batch_size=1, num_workers=0, dataset=coco_dataset(data, 'val', pipeline))
    cfg.train_dataloader = None
    cfg.dump(str(root / 'mask_rcnn.py'))
    torch.save({'state_dict': model.state_dict(), 'meta': {}}, root / 'mask_rcnn.pth')
    yield root, model
    torch.set_num_threads(threads)


def test_mask_numbers_beside_the_box_ones(mask_ws, capsys):
    """``mmdet-cam-eval`` on a Mask R-CNN: each method's JSON has the mask numbers beside the
    box ones, equal to the metrics run on the engine's own results (the class map and the
    mask map in each instance's predicted mask, means over the instances); the baselines have
    the class-map ones only; the table shows them."""
    import numpy as np
    from mmengine.config import Config

    from mmdet_cam_hook import CAMEngine
    from mmdet_cam_hook.cli.eval import ground_truth_dataset
    from mmdet_cam_hook.evaluation.faithfulness import box_maps
    from mmdet_cam_hook.evaluation.metrics import energy_in_mask, peak_in_mask
    from mmdet_cam_hook.runtime.data import ground_truth

    root, model = mask_ws
    out = root / 'results.json'
    code = main([str(root / 'mask_rcnn.py'), str(root / 'mask_rcnn.pth'), '--score-thr', '0',
                 '--topk', '3', '--steps', '1', '--protocol', 'prior', '--device', 'cpu',
                 '--methods', 'hirescam', '--out', str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    numbers = json.loads(out.read_text())['methods']
    dataset = ground_truth_dataset(Config.fromfile(str(root / 'mask_rcnn.py')), 'val')
    engine = CAMEngine(model, score_thr=0.0, topk=3)
    per = {name: [] for name in MASK_NUMBERS}
    box_energy = []
    for index in range(2):
        res = engine.explain(ground_truth(dataset, index).path, methods='hirescam')['hirescam']
        per['energy_in_mask'] += energy_in_mask(res.cams, res.masks).tolist()
        per['pointing_game_in_mask'] += peak_in_mask(res.cams, res.masks).tolist()
        per['mask_energy_in_mask'] += energy_in_mask(res.mask_cams, res.masks).tolist()
        per['mask_pointing_game_in_mask'] += peak_in_mask(res.mask_cams, res.masks).tolist()
        box_energy += energy_in_mask(box_maps(res.bboxes, res.masks.shape[1:]),
                                     res.masks).tolist()
    assert numbers['hirescam']['num_detections'] == 6
    for name in MASK_NUMBERS:
        assert numbers['hirescam'][name] == pytest.approx(np.nanmean(per[name]), abs=1e-5), name
    assert 0 < numbers['hirescam']['mask_energy_in_mask'] < 1
    assert numbers['box']['energy_in_mask'] == pytest.approx(np.nanmean(box_energy), abs=1e-6)
    for baseline in ('random', 'box'):
        assert numbers[baseline]['energy_in_mask'] is not None
        assert numbers[baseline]['mask_energy_in_mask'] is None
    assert 'EiM ↑ | PGiM ↑ | mask EiM ↑ | mask PGiM ↑' in captured.out
    assert KEYS <= set(numbers['hirescam'])


def test_box_only_model_reports_no_mask_numbers(ws, capsys):
    out = ws[0] / 'box_only.json'
    assert main(_args(ws, '--num-images', '1', '--methods', 'hirescam', '--protocol', 'prior',
                      '--out', str(out))) == 0
    numbers = json.loads(out.read_text())['methods']['hirescam']
    assert not set(MASK_NUMBERS) & set(numbers)
    assert 'EiM' not in capsys.readouterr().out
