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

#: Scores 0.3-0.5 that depend on the pixels (see tests/test_evaluation.py).
PERTURB = dict(calibrate=True, weights={'multi_level_conv_': 0.002},
               biases={'multi_level_conv_cls': (0.0, 0.5), 'multi_level_conv_obj': (0.0, 0.5)})
KEYS = {'pointing_game', 'energy_pointing_game', 'off_target_share', 'blank_share',
        'deletion_auc', 'insertion_auc', 'num_detections', 'num_matched', 'seconds_per_image'}


@pytest.fixture(scope='module')
def ws(tmp_path_factory, make_tiny_coco):
    """A 4-image val split of the shapes at 64 px, a YOLOX-nano config testing at 96 px, and a
    checkpoint of a perturbed random-init YOLOX-nano."""
    root = tmp_path_factory.mktemp('eval')
    _, _, config, checkpoint, _ = make_tiny_coco(root, num_val=4, perturb=PERTURB)
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
