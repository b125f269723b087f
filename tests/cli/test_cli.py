"""The command-line tool, run as users run it: ``mmdet-cam``, the seed's script path and
``python -m mmdet_cam_hook.cli``, on a checkpoint and images the tests make.

Each subprocess pays ~5 s of imports, so the options are grouped into a few runs; errors found
before the model is built are checked in-process through :func:`mmdet_cam_hook.cli.cam.main`.
"""
import datetime
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from mmdet_cam_hook import METHODS
from mmdet_cam_hook.cli.cam import build_parser, main
from mmdet_cam_hook.testing import (
    YOLOX_NANO_128,
    confident_yolox_128,
    squares_image,
    torchrun_beside,
)

REPO = Path(__file__).resolve().parents[2]
MMDET_CAM = Path(sys.executable).parent / 'mmdet-cam'
TOOL = REPO / 'tools' / 'analysis_tools' / 'demo_yolox_gradcam.py'
CLASSES = ('circle', 'square', 'triangle')


def training_checkpoint(model, path, extra_meta=None):
    """Saves ``model`` the way an MMEngine Runner does: meta with dataset_meta, the message hub
    (HistoryBuffers of numpy values), optimizer state."""
    from mmengine.logging import MessageHub

    hub = MessageHub('mmdet-cam-test')
    hub.update_scalar('train/loss', np.float64(1.25))
    hub.update_scalar('coco/bbox_mAP', np.float64(0.125))
    hub.update_info('epoch', 3)
    meta = dict(epoch=3, iter=30, cfg=YOLOX_NANO_128, seed=0, mmengine_version='0.10.7',
                dataset_meta=dict(classes=CLASSES, palette=[(1, 2, 3)] * 3))
    meta.update(extra_meta or {})
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    torch.save(dict(meta=meta, state_dict=model.state_dict(), message_hub=hub.state_dict(),
                    optimizer=optimizer.state_dict()), path)
    MessageHub._instance_dict.clear()


@pytest.fixture(scope='module')
def ws(tmp_path_factory):
    """Config, checkpoints and images. The random model's cls/obj biases are raised so that it
    scores priors at ~0.3-0.9 and detects things."""
    root = tmp_path_factory.mktemp('cli')
    model = confident_yolox_128(root / 'yolox_nano_128.py')
    training_checkpoint(model, root / 'yolox.pth')
    training_checkpoint(model, root / 'unsafe.pth', dict(day=datetime.date(2024, 5, 1)))
    model.bbox_head.multi_level_conv_cls = model.bbox_head.multi_level_conv_cls[:2]
    torch.save(dict(state_dict=model.state_dict()), root / 'partial.pth')

    cv2.imwrite(str(root / 'street.jpg'), squares_image(96, 160, 0))
    many = root / 'many'
    many.mkdir()
    cv2.imwrite(str(many / 'a.jpg'), squares_image(96, 160, 1))
    cv2.imwrite(str(many / 'b.png'), cv2.cvtColor(squares_image(128, 100, 2), cv2.COLOR_BGR2GRAY))
    cv2.imwrite(str(many / 'c.bmp'), squares_image(80, 120, 3))
    (many / 'broken.jpg').write_bytes(b'not an image')
    (many / 'notes.txt').write_text('not an image either')
    # Unreadable and unusable images between good ones (sorted: a, b, c, d, e).
    mixed = root / 'mixed'
    mixed.mkdir()
    cv2.imwrite(str(mixed / 'a.jpg'), squares_image(96, 160, 1))
    (mixed / 'b_empty.jpg').write_bytes(b'')
    cv2.imwrite(str(mixed / 'c_strip.png'), np.full((1, 2000, 3), 200, np.uint8))
    cv2.imwrite(str(mixed / 'd.png'), squares_image(128, 100, 2))
    cv2.imwrite(str(mixed / 'e_strip.png'), np.full((2, 4000, 3), 200, np.uint8))
    cv2.imwrite(str(root / 'strip.png'), np.full((1, 2000, 3), 200, np.uint8))
    # Six images of different shapes for --batch-size; five in two subfolders for torchrun.
    batch = root / 'batch'
    batch.mkdir()
    for i, (h, w) in enumerate([(96, 160), (128, 100), (80, 120), (128, 128), (60, 90),
                                (100, 140)]):
        cv2.imwrite(str(batch / f'img{i}.jpg'), squares_image(h, w, 10 + i))
    for sub, stems in (('x', 'ace'), ('y', 'bd')):
        (root / 'tree' / sub).mkdir(parents=True)
        for stem in stems:
            cv2.imwrite(str(root / 'tree' / sub / f'{stem}.jpg'),
                        squares_image(96, 120, ord(stem)))
    (root / 'broken_config.py').write_text('model = dict(\n')
    from mmengine.registry import DefaultScope
    DefaultScope._instance_dict.clear()
    return root


def run(ws, *args, cmd=(str(MMDET_CAM), ), cwd=None):
    env = dict(os.environ, CUDA_VISIBLE_DEVICES='', TORCH_HOME=str(ws / 'torch_home'))
    return subprocess.run([*cmd, *map(str, args)], cwd=cwd or ws, env=env, capture_output=True,
                          text=True, timeout=600)


def error_line(stderr):
    """The tool's error line; also checks there is exactly one and no traceback."""
    assert 'Traceback' not in stderr, stderr
    lines = [line for line in stderr.splitlines() if 'error:' in line]
    assert len(lines) == 1, stderr
    return lines[0]


def assert_user_error(proc, *needles):
    assert proc.returncode == 1, (proc.returncode, proc.stderr)
    line = error_line(proc.stderr)
    assert line.startswith('mmdet-cam: error: '), line
    for needle in needles:
        assert needle in line, (needle, line)
    return line


def read(path):
    img = cv2.imread(str(path))
    assert img is not None, f'{path} missing or unreadable'
    return img


# ---------------------------------------------------------------------------------------------
# Successful runs
def test_help_lists_the_seed_options(capsys):
    with pytest.raises(SystemExit) as info:
        main(['--help'])
    assert info.value.code == 0
    text = ' '.join(capsys.readouterr().out.split())
    for option in ('--out-dir', '--method', '--target-layers', '--score-thr', '--topk',
                   '--device', '--renormalize', '--save-all', '--save-raw', '--list-layers',
                   '--trust-checkpoint', '--batch-size', 'config', 'checkpoint', 'img'):
        assert option in text
    assert 'torchrun --nproc_per_node P -m mmdet_cam_hook.cli' in text
    assert 'Defaults to outputs/gradcam' in text and 'Defaults to 0.3' in text
    assert 'Defaults to cuda:0 when CUDA is available, else cpu' in text
    for method in METHODS:
        assert method in text


def test_single_image_all_outputs(ws):
    out = ws / 'out_single'
    out.mkdir()
    (out / 'keep.txt').write_text('the user\'s file')
    proc = run(ws, 'yolox_nano_128.py', 'yolox.pth', 'street.jpg', '--out-dir', out, '--method',
               'gradcam', '--score-thr', '0.35', '--topk', '3', '--device', 'cpu', '--save-all',
               '--save-raw')
    assert proc.returncode == 0, proc.stderr
    assert 'Traceback' not in proc.stderr
    assert (out / 'keep.txt').read_text() == 'the user\'s file', 'never delete user files'
    expected = {'keep.txt', 'street_gradcam.jpg', 'street_original.jpg', 'street_detection.jpg',
                'street_panel.jpg', 'street_gradcam.npz',
                *(f'street_det{k}_gradcam.jpg' for k in range(3))}
    assert {p.name for p in out.iterdir()} == expected

    original = cv2.imread(str(ws / 'street.jpg'))
    assert read(out / 'street_gradcam.jpg').shape == original.shape
    assert np.abs(read(out / 'street_original.jpg').astype(int) - original).mean() < 3
    detection = read(out / 'street_detection.jpg')
    assert ((detection[..., 1] > 200) & (detection[..., 0] < 60)).any(), 'green boxes'
    assert read(out / 'street_panel.jpg').shape[1] > 3 * original.shape[1]

    raw = np.load(out / 'street_gradcam.npz')
    assert raw['cams'].shape == (3, 96, 160) and raw['cams'].dtype == np.float32
    assert raw['bboxes'].shape == (3, 4)
    assert (raw['scores'] >= 0.35).all() and (np.diff(raw['scores']) <= 0).all()
    np.testing.assert_allclose(raw['combined'], raw['cams'].max(0))
    assert str(raw['method']) == 'gradcam'
    assert raw['renormalized'].dtype == bool and not raw['renormalized']
    assert list(raw['class_names']) == list(CLASSES)
    levels = raw['levels']
    assert [str(x) for x in raw['layers']] == [f'neck.out_convs.{lv}' for lv in levels]
    assert str(raw['image']).endswith('street.jpg')
    # Each detection's image shows its own map.
    det_imgs = [read(out / f'street_det{k}_gradcam.jpg') for k in range(3)]
    for k in (1, 2):
        if np.abs(raw['cams'][k] - raw['cams'][0]).max() > 0.2:
            assert np.abs(det_imgs[k].astype(int) - det_imgs[0]).max() > 40


def test_folder_with_seed_script(ws):
    out = ws / 'out_folder'
    proc = run(ws, 'yolox_nano_128.py', 'yolox.pth', 'many', '--out-dir', out, '--method',
               'hirescam', '--target-layers', 'neck.out_convs[-1]', 'neck.out_convs.1',
               '--renormalize', '--topk', '2', '--save-raw', '--device', 'cpu',
               cmd=(sys.executable, str(TOOL)))
    # broken.jpg cannot be read: the others are still processed, and the exit code says so.
    assert proc.returncode == 1, proc.stderr
    assert 'Traceback' not in proc.stderr
    assert 'skipping' in proc.stderr and 'broken.jpg' in proc.stderr
    assert '1 of 4 images could not be read' in proc.stderr
    assert '4/4' in proc.stderr, 'progress bar'
    names = {p.name for p in out.iterdir()}
    for stem, shape in (('a', (96, 160)), ('b', (128, 100)), ('c', (80, 120))):
        assert {f'{stem}_gradcam.jpg', f'{stem}_det0_hirescam.jpg', f'{stem}_det1_hirescam.jpg',
                f'{stem}_hirescam.npz'} <= names
        assert read(out / f'{stem}_gradcam.jpg').shape[:2] == shape
        raw = np.load(out / f'{stem}_hirescam.npz')
        assert len(raw['scores']) == 2
        assert raw['renormalized'].dtype == bool and raw['renormalized']
        assert set(str(x) for x in raw['layers']) == {'neck.out_convs.2,neck.out_convs.1'}
        for cam, (x1, y1, x2, y2) in zip(raw['cams'], raw['bboxes']):
            outside = np.ones(cam.shape, bool)
            outside[max(int(np.floor(y1)), 0):max(int(np.ceil(y2)), 0),
                    max(int(np.floor(x1)), 0):max(int(np.ceil(x2)), 0)] = False
            assert (cam[outside] == 0).all(), '--renormalize zeroes the map outside the box'
    assert not any(n.startswith(('broken', 'notes')) for n in names)


def test_glob_defaults_and_trusted_checkpoint(ws):
    work = ws / 'cwd_glob'
    work.mkdir()
    # Default --out-dir (outputs/gradcam in the working directory) and default --device (cpu
    # without CUDA); a checkpoint with a non-allow-listed object loads with --trust-checkpoint.
    proc = run(ws, ws / 'yolox_nano_128.py', ws / 'unsafe.pth', str(ws / 'many' / '[ab].*'),
               '--method', 'eigencam', '--topk', '1', '--trust-checkpoint',
               cmd=(sys.executable, '-m', 'mmdet_cam_hook.cli'), cwd=work)
    assert proc.returncode == 0, proc.stderr
    assert 'weights_only=False' in proc.stderr
    out = work / 'outputs' / 'gradcam'
    assert {p.name for p in out.iterdir()} == {'a_gradcam.jpg', 'a_det0_eigencam.jpg',
                                                'b_gradcam.jpg', 'b_det0_eigencam.jpg'}


def test_list_layers(ws, capsys, monkeypatch):
    monkeypatch.chdir(ws)
    assert main(['yolox_nano_128.py', '--list-layers']) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split() for line in out.splitlines()
            if line and not line.startswith('#')}
    assert rows['layer'] == ['layer', 'type', 'output', 'shape', 'stride', 'route']
    # nano's neck has 64 channels; at 128 px input the levels are 16, 8 and 4 px; the level
    # maps take the local window, layers upstream the chain, layers in the head the exact route.
    assert rows['neck.out_convs.0'][1:] == ['ConvModule', '1x64x16x16', '8', 'local']
    assert rows['neck.out_convs.1'][1:] == ['ConvModule', '1x64x8x8', '16', 'local']
    assert rows['neck.out_convs.2'][1:] == ['ConvModule', '1x64x4x4', '32', 'local']
    assert rows['bbox_head.multi_level_conv_obj.2'][2:] == ['1x1x4x4', '32', 'exact']
    assert rows['backbone.stem'][2:] == ['1x16x64x64', '2', 'chain']
    assert 'input 1x3x128x128' in out
    assert ('default layers (each detection on its own level): neck.out_convs.0 (level 0, '
            'local), neck.out_convs.1 (level 1, local)') in out

    # The form the engine's unknown-layer error suggests; the image is not read.
    assert main(['yolox_nano_128.py', 'yolox.pth', 'unused.jpg', '--list-layers']) == 0
    assert capsys.readouterr().out == out


#: mmdet's configs with a light backbone (the CLI does not care), 3 classes, 128 px inputs.
OTHER_HEADS = {
    'rtmdet': ('rtmdet/rtmdet_tiny_8xb32-300e_coco.py',
               dict(calibrate=True, weights={'rtm_cls': 0.02, 'rtm_reg': 0.02},
                    biases={'rtm_cls': (0.0, 0.5), 'rtm_reg': (2.0, 0.3)}), {},
               'neck.out_convs.{}', ['local'] * 3),
    'retinanet': ('retinanet/retinanet_r50_fpn_1x_coco.py',
                  dict(calibrate=True, weights={'conv.weight': 0.08, 'retina_cls': 0.05,
                                                'retina_reg': 0.003},
                       biases={'retina_cls': (0., 0.5)}),
                  {'model.backbone.depth': 18, 'model.backbone.base_channels': 16,
                   'model.neck.in_channels': [16, 32, 64, 128], 'model.neck.out_channels': 32,
                   'model.bbox_head.in_channels': 32, 'model.bbox_head.feat_channels': 32},
                  'neck.fpn_convs.{}', ['local', 'local', 'local', 'chain', 'local']),
}


@pytest.mark.parametrize('head', sorted(OTHER_HEADS))
def test_other_heads(head, tmp_path, capsys, monkeypatch):
    """Any supported config: an RTMDet and a RetinaNet (random weights saved from a perturbed
    model, so that there are detections) through main(): --list-layers with each level map's
    route, then the maps of the top detections on each detection's own level."""
    from mmdet_cam_hook.testing import build_detector

    config, perturb, options, layer, routes = OTHER_HEADS[head]
    model = build_detector(config, 128, perturb=perturb, cfg_options=options)
    model.cfg.dump(str(tmp_path / 'model.py'))
    torch.save(dict(state_dict=model.state_dict(),
                    meta=dict(dataset_meta=dict(classes=CLASSES))), tmp_path / 'model.pth')
    cv2.imwrite(str(tmp_path / 'street.jpg'), squares_image(96, 160, 0))
    monkeypatch.chdir(tmp_path)

    assert main(['model.py', '--list-layers']) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split() for line in out.splitlines()
            if line and not line.startswith('#')}
    assert [rows[layer.format(i)][-1] for i in range(len(routes))] == routes
    assert rows['bbox_head.cls_convs.0.0.conv' if head == 'rtmdet' else
                'bbox_head.cls_convs.0.conv'][-1] == 'exact'

    assert main(['model.py', 'model.pth', 'street.jpg', '--out-dir', 'out', '--topk', '3',
                 '--device', 'cpu', '--save-raw', '--method', 'hirescam']) == 0, \
        capsys.readouterr().err
    raw = np.load(tmp_path / 'out' / 'street_hirescam.npz')
    assert raw['cams'].shape == (3, 96, 160) and (raw['scores'] >= 0.3).all()
    assert [str(x) for x in raw['layers']] == [layer.format(lv) for lv in raw['levels']]
    assert (raw['cams'].reshape(3, -1).max(1) > 0).all()
    assert {p.name for p in (tmp_path / 'out').iterdir()} == {
        'street_gradcam.jpg', 'street_hirescam.npz',
        *(f'street_det{k}_hirescam.jpg' for k in range(3))}


@pytest.mark.parametrize('batch_size', ['1', '4'])
def test_folder_with_unreadable_and_thin_images(ws, capsys, monkeypatch, batch_size):
    """A 0-byte file and 2000x1 / 4000x2 strips do not stop the run: each is skipped with one
    line naming it, the good images are processed, and the exit code says some failed. With
    --batch-size 4 the first batch holds the 0-byte file (never read) and a strip that the
    batch cannot take: its images are explained one at a time instead."""
    monkeypatch.chdir(ws)
    out = ws / f'out_mixed_{batch_size}'
    assert main(['yolox_nano_128.py', 'yolox.pth', 'mixed', '--out-dir', str(out), '--topk',
                 '1', '--device', 'cpu', '--batch-size', batch_size]) == 1
    err = capsys.readouterr().err
    assert 'Traceback' not in err and 'cv2.error' not in err, err
    skipped = [line for line in err.splitlines() if 'skipping' in line]
    assert len(skipped) == 3, err
    assert 'b_empty.jpg' in skipped[0] and 'could not be decoded' in skipped[0]
    assert 'c_strip.png' in skipped[1] and '2000x1' in skipped[1]
    assert 'e_strip.png' in skipped[2] and '4000x2' in skipped[2]
    assert '1 of 5 images could not be read' in err
    assert '2 of 5 images could not be explained' in err
    assert {p.name for p in out.iterdir()} == {'a_gradcam.jpg', 'a_det0_gradcam.jpg',
                                                'd_gradcam.jpg', 'd_det0_gradcam.jpg'}


def test_folder_refuses_an_unusable_layer_before_any_image(ws, capsys, monkeypatch):
    """A layer whose output is not a tensor is refused when the engine is built (one dummy
    forward decides it), before any image is read."""
    monkeypatch.chdir(ws)
    assert main(['yolox_nano_128.py', 'yolox.pth', 'many', '--target-layers', 'neck',
                 '--out-dir', 'out_stop']) == 1
    err = capsys.readouterr().err
    assert 'Traceback' not in err
    lines = [line for line in err.splitlines() if 'error:' in line]
    assert len(lines) == 1 and "'neck' outputs a tuple" in lines[0], err
    assert 'choose one of its submodules' in lines[0] and 'a.jpg' not in err
    assert not (ws / 'out_stop').exists()


def test_folder_stops_on_the_runs_own_error(ws, capsys, monkeypatch):
    """An error that is not the image's stops the run after the same message for 3 images in
    a row, instead of one line per image. The engine now refuses the layers that used to fail
    this way when it is built, so ``explain`` is made to raise such an error."""
    from mmdet_cam_hook.cam.engine import CAMEngine

    def explain(self, image, **kwargs):
        raise ValueError("target layer 'neck' outputs a tuple, not a tensor; choose one of its "
                         "submodules (e.g. 'neck.out_convs.0' instead of 'neck')")

    monkeypatch.setattr(CAMEngine, 'explain', explain)
    monkeypatch.chdir(ws)
    assert main(['yolox_nano_128.py', 'yolox.pth', 'many', '--out-dir', 'out_stop']) == 1
    err = capsys.readouterr().err
    assert 'Traceback' not in err
    lines = [line for line in err.splitlines() if 'error:' in line]
    assert ['a.jpg' in lines[0], 'b.png' in lines[1], 'broken.jpg' in lines[2]] == [True] * 3
    assert len(lines) == 4 and 'c.bmp' not in lines[3], err
    assert 'choose one of its submodules' in lines[3]
    assert '(the same error for the first 3 images; stopping)' in lines[3]
    assert not (ws / 'out_stop').exists()


def _raw(out):
    """The ``--save-raw`` arrays of each npz in ``out``, by file name."""
    raw = {}
    for path in sorted(out.glob('*.npz')):
        with np.load(path) as data:
            raw[path.name] = {key: data[key] for key in ('cams', 'bboxes', 'scores', 'labels')}
    return raw


def _assert_same_raw(a, b, atol):
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(a[name]['labels'], b[name]['labels'], err_msg=name)
        for key in ('cams', 'bboxes', 'scores'):
            np.testing.assert_allclose(a[name][key], b[name][key], atol=atol, rtol=0,
                                       err_msg=f'{name}: {key}')


#: Head perturbation under which a random-init YOLOX-nano's scores depend on the pixels
#: (tests/cli/test_eval_cli.py's): the raised biases alone give every prior of a level the same
#: score, to 1e-7, and which of them are the top k is then float rounding.
PIXEL_SCORES = dict(calibrate=True, weights={'multi_level_conv_': 0.002},
                    biases={'multi_level_conv_cls': (0.0, 0.5),
                            'multi_level_conv_obj': (0.0, 0.5)})


def test_batch_size_equals_one_at_a_time(ws, capsys, monkeypatch, tmp_path):
    """Six images of different shapes in batches of 3 (one forward pass each: the default
    layers take the local route) give the files and maps of one image at a time. The model's
    scores depend on the pixels, so that the top 2 are not a tie broken by rounding."""
    from mmdet_cam_hook.testing import build_detector

    model = build_detector('yolox/yolox_nano_8xb8-300e_coco.py', 128, perturb=PIXEL_SCORES)
    model.cfg.dump(str(tmp_path / 'model.py'))
    torch.save(dict(state_dict=model.state_dict(),
                    meta=dict(dataset_meta=dict(classes=CLASSES))), tmp_path / 'model.pth')
    monkeypatch.chdir(ws)
    outs = {}
    for batch_size in ('1', '3'):
        outs[batch_size] = tmp_path / f'out_batch_{batch_size}'
        assert main([str(tmp_path / 'model.py'), str(tmp_path / 'model.pth'), 'batch',
                     '--out-dir', str(outs[batch_size]), '--topk', '2', '--save-raw',
                     '--device', 'cpu', '--score-thr', '0', '--batch-size', batch_size]) == 0, \
            capsys.readouterr().err
        assert '24 file(s) for 6 image(s)' in capsys.readouterr().err
    names = {p.name for p in outs['1'].iterdir()}
    assert names == {p.name for p in outs['3'].iterdir()}
    assert len(names) == 6 * 4
    raw = _raw(outs['1'])
    assert len(raw) == 6 and all(len(r['scores']) == 2 for r in raw.values())
    # The scores depend on the pixels: the images' top scores differ, by far more than rounding.
    tops = sorted(float(r['scores'][0]) for r in raw.values())
    assert min(np.diff(tops)) > 1e-4, tops
    _assert_same_raw(raw, _raw(outs['3']), atol=1e-5)


def test_readme_torchrun_commands_take_a_module(readme_torchrun):
    """torchrun runs a file or, with -m, a module: never the mmdet-cam(-eval) scripts."""
    lines = readme_torchrun.lines()
    assert len(lines) == 2, lines
    for line in lines:
        assert ' -m mmdet_cam_hook.cli' in line and 'mmdet-cam' not in line, line


def test_torchrun_two_processes_equal_one(ws, readme_torchrun):
    """torchrun with 2 processes on a recursive glob, started as README.md says (the torchrun
    script, -m mmdet_cam_hook.cli): each rank explains and writes its share (the stems a, c, e
    and b, d in sorted order, whatever their folders), and together they write the files and
    maps of one process."""
    args = ['yolox_nano_128.py', 'yolox.pth', 'tree/**/*.jpg', '--topk', '2', '--save-raw',
            '--device', 'cpu', '--batch-size', '2']
    one, two = ws / 'out_rank_one', ws / 'out_rank_two'
    code, returncode, _, stderr = torchrun_beside(
        'mmdet_cam_hook.cli', [*args, '--out-dir', two],
        lambda: main([*args, '--out-dir', str(one)]), cwd=ws,
        launcher=readme_torchrun('mmdet_cam_hook.cli'))
    assert code == 0
    assert returncode == 0, stderr[-3000:]
    assert 'Traceback' not in stderr
    assert 'mmdet-cam: rank 0/2: 3 of 5 images' in stderr
    assert 'mmdet-cam: rank 1/2: 2 of 5 images' in stderr
    assert 'mmdet-cam: rank 0/2: gradcam: 12 file(s) for 3 image(s)' in stderr
    assert 'mmdet-cam: rank 1/2: gradcam: 8 file(s) for 2 image(s)' in stderr
    assert 'mmdet-cam: all 2 ranks: gradcam: 20 file(s) for 5 image(s)' in stderr
    assert 'more than one rank' not in stderr
    names = {p.name for p in two.iterdir()}
    assert names == {p.name for p in one.iterdir()}
    assert names == {f'{stem}_{kind}' for stem in 'abcde'
                     for kind in ('gradcam.jpg', 'det0_gradcam.jpg', 'det1_gradcam.jpg',
                                  'gradcam.npz')}
    _assert_same_raw(_raw(one), _raw(two), atol=1e-4)


def test_torchrun_without_detections_fails_on_every_rank(ws):
    """No image of the whole job has a detection: every rank exits with the one-process run's
    error (the ranks' totals are gathered over gloo), so the job fails."""
    args = ['yolox_nano_128.py', 'yolox.pth', 'tree/**/*.jpg', '--score-thr', '1', '--device',
            'cpu', '--out-dir', 'out_rank_empty']
    code, returncode, _, stderr = torchrun_beside('mmdet_cam_hook.cli', args,
                                                  lambda: main(args), cwd=ws)
    needle = 'mmdet-cam: error: no detections with score >= 1 in any of the 5 images'
    assert code == 1
    assert returncode != 0
    assert stderr.count(needle) == 2, stderr[-3000:]


def test_rank_share():
    """Images with one stem (in different folders they would write the same files) go to one
    rank; groups are dealt round-robin in sorted stem order; the shares partition the run."""
    from mmdet_cam_hook.cli.folder import rank_share

    paths = [Path(p) for p in ('x/a.jpg', 'x/b.jpg', 'x/c.png', 'y/a.png', 'y/d.jpg',
                               'y/e.jpg', 'z/a.bmp')]
    assert rank_share(paths, 0, 2) == [Path(p) for p in ('x/a.jpg', 'x/c.png', 'y/a.png',
                                                         'y/e.jpg', 'z/a.bmp')]
    assert rank_share(paths, 1, 2) == [Path('x/b.jpg'), Path('y/d.jpg')]
    for world in (1, 2, 3, 8):
        shares = [rank_share(paths, rank, world) for rank in range(world)]
        assert sorted(p for share in shares for p in share) == sorted(paths)
        for stem in 'abcde':
            assert sum(any(p.stem == stem for p in share) for share in shares) == 1


def test_device_under_torchrun(monkeypatch):
    """--device cuda (or the default with CUDA) is cuda:LOCAL_RANK; an explicit index is kept.
    No GPU here: torch.cuda is made to report two devices."""
    from mmdet_cam_hook.checks import UserError
    from mmdet_cam_hook.cli.common import resolve_device

    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(torch.cuda, 'device_count', lambda: 2)
    assert [resolve_device(d, 1) for d in (None, 'cuda', 'cuda:0', 'cpu')] == [
        'cuda:1', 'cuda:1', 'cuda:0', 'cpu']
    assert resolve_device('cuda') == resolve_device(None) == 'cuda:0'
    with pytest.raises(UserError, match=r"--device 'cuda' \(LOCAL_RANK=2\): this machine has 2"):
        resolve_device('cuda', 2)


@pytest.mark.parametrize('env, needle', [
    (dict(WORLD_SIZE='two'), "WORLD_SIZE must be an integer >= 1 (torchrun sets RANK, "
     "WORLD_SIZE and LOCAL_RANK), got 'two'"),
    (dict(WORLD_SIZE='0'), "WORLD_SIZE must be an integer >= 1"),
    (dict(WORLD_SIZE='2'), 'RANK must be an integer from 0 to 1 (torchrun sets RANK, '
     'WORLD_SIZE and LOCAL_RANK), it is not set'),
    (dict(WORLD_SIZE='2', RANK='2'), "RANK must be an integer from 0 to 1"),
    (dict(WORLD_SIZE='2', RANK='1', LOCAL_RANK='-1'), "LOCAL_RANK must be an integer >= 0"),
    (dict(WORLD_SIZE='2', RANK='1'), 'could not join the torchrun job (start it with torchrun, '
     'which sets MASTER_ADDR and MASTER_PORT)'),
], ids=['world-text', 'world-0', 'rank-unset', 'rank-too-large', 'local-rank', 'no-master'])
def test_bad_torchrun_environment(ws, capsys, monkeypatch, env, needle):
    for name in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'MASTER_ADDR', 'MASTER_PORT'):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    line = run_main(ws, capsys, 'yolox_nano_128.py', 'yolox.pth', 'street.jpg')
    assert needle in line, line


#: Run in a subprocess: Ctrl-C comes (a real SIGINT to the main thread, as a terminal sends it)
#: during the Nth output write, which the background writer thread is doing.
INTERRUPT_AT_NTH_WRITE = """
import os, signal, sys, threading, time
import cv2
import numpy as np

calls = []


def interrupting(write):
    def wrapper(path, *args, **kwargs):
        calls.append(path)
        if len(calls) == int(os.environ['INTERRUPT_AT']):
            signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)
            time.sleep(1.0)  # the main thread stops while this write is still in progress
        return write(path, *args, **kwargs)
    return wrapper


cv2.imwrite = interrupting(cv2.imwrite)
np.savez_compressed = interrupting(np.savez_compressed)
# Ctrl-C in a terminal raises KeyboardInterrupt; a runner started in the background (as CI may
# start it) hands its children an ignored SIGINT, which Python then keeps ignored.
signal.signal(signal.SIGINT, signal.default_int_handler)
from mmdet_cam_hook.cli.cam import main
sys.exit(main())
"""


@pytest.mark.parametrize('interrupt_at, finished', [(3, 'a'), (14, 'ab')], ids=['jpg', 'npz'])
def test_interrupt_leaves_no_truncated_output(ws, interrupt_at, finished):
    """Per image: combined map, 2 detections, original, detections, panel, npz = 7 writes;
    the 3rd is the first image's detection 1 (while the second is explained), the 14th the
    second image's npz (while the third is explained). The image being written when Ctrl-C
    comes is finished, no later one is started, and nothing is left half-written."""
    out = ws / f'out_interrupt_{interrupt_at}'
    env = dict(os.environ, CUDA_VISIBLE_DEVICES='', INTERRUPT_AT=str(interrupt_at))
    proc = subprocess.run(
        [sys.executable, '-c', INTERRUPT_AT_NTH_WRITE, 'yolox_nano_128.py', 'yolox.pth', 'many',
         '--out-dir', str(out), '--topk', '2', '--save-all', '--save-raw', '--device', 'cpu'],
        cwd=ws, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 130, proc.stderr
    assert 'interrupted' in proc.stderr and 'Traceback' not in proc.stderr
    names = sorted(p.name for p in out.iterdir())
    assert not [n for n in names if n.startswith('.')], 'temporary files left behind'
    assert names == sorted(f'{stem}_{kind}' for stem in finished for kind in (
        'gradcam.jpg', 'det0_gradcam.jpg', 'det1_gradcam.jpg', 'original.jpg', 'detection.jpg',
        'panel.jpg', 'gradcam.npz'))
    for name in names:  # every file under its final name is complete
        if name.endswith('.npz'):
            with np.load(out / name) as raw:
                assert all(raw[key] is not None for key in raw.files)
        else:
            data = (out / name).read_bytes()
            assert data.endswith(b'\xff\xd9'), f'{name} is truncated'  # JPEG end marker
            assert cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR) is not None


def test_packaged_config(capsys, monkeypatch, tmp_path):
    """`mmdet_cam_hook::NAME` is a config shipped with the package, from any directory."""
    monkeypatch.chdir(tmp_path)
    assert main(['mmdet_cam_hook::yolox_nano_gradcam.py', '--list-layers']) == 0
    assert 'neck.out_convs.2' in capsys.readouterr().out
    assert main(['mmdet_cam_hook::yolox_q_gradcam.py', '--list-layers']) == 1
    line = error_line(capsys.readouterr().err)
    assert "no config 'mmdet_cam_hook::yolox_q_gradcam.py'" in line
    assert "'yolox_s_gradcam.py'" in line


def test_mmdet_package_config(capsys, monkeypatch, tmp_path):
    """`mmdet::PATH` (README's form) is mmdet's own config, from any directory; a missing one
    is a clear error naming the configs beside it, an unknown package one naming the known."""
    monkeypatch.chdir(tmp_path)
    assert main(['mmdet::yolox/yolox_nano_8xb8-300e_coco.py', '--list-layers']) == 0, \
        capsys.readouterr().err
    out = capsys.readouterr().out
    assert 'input 1x3x416x416' in out and 'neck.out_convs.2' in out
    assert main(['mmdet::yolox/yolox_q_8xb8-300e_coco.py', '--list-layers']) == 1
    line = error_line(capsys.readouterr().err)
    assert "mmdet has no config 'yolox/yolox_q_8xb8-300e_coco.py'" in line
    assert 'yolox_nano_8xb8-300e_coco.py' in line
    assert main(['mmfoo::yolox/x.py', '--list-layers']) == 1
    line = error_line(capsys.readouterr().err)
    assert "'mmfoo' is not a package" in line and 'mmdet' in line


# ---------------------------------------------------------------------------------------------
# User errors: one line on stderr, exit code 1, no traceback. Those that need a patched
# environment run in a subprocess, the others through main() in-process.
def run_main(ws, capsys, *args):
    """main() in ``ws``; returns the error line after checking exit code 1."""
    cwd = os.getcwd()
    os.chdir(ws)
    try:
        assert main([str(a) for a in args]) == 1
    finally:
        os.chdir(cwd)
    line = error_line(capsys.readouterr().err)
    assert line.startswith('mmdet-cam: error: '), line
    return line


def test_no_detections(ws, capsys):
    line = run_main(ws, capsys, 'yolox_nano_128.py', 'yolox.pth', 'street.jpg', '--score-thr',
                    '0.999', '--out-dir', 'out_none')
    assert 'no detections' in line and "'street.jpg'" in line and 'lower --score-thr' in line
    assert not (ws / 'out_none').exists()


def test_unknown_layer(ws, capsys):
    line = run_main(ws, capsys, 'yolox_nano_128.py', 'yolox.pth', 'street.jpg',
                    '--target-layers', 'neck.out_conv.2')
    assert "'neck.out_conv.2'" in line and "'neck.out_convs.2'" in line
    assert '--list-layers' in line


def test_layer_without_tensor_output(ws, capsys):
    line = run_main(ws, capsys, 'yolox_nano_128.py', 'yolox.pth', 'street.jpg',
                    '--target-layers', 'neck', '--out-dir', 'out_neck')
    assert 'choose one of its submodules' in line


def test_unsafe_checkpoint_refused(ws, capsys):
    line = run_main(ws, capsys, 'yolox_nano_128.py', 'unsafe.pth', 'street.jpg')
    assert 'unsafe.pth' in line and 'datetime.date' in line and '--trust-checkpoint' in line


def test_unreachable_url(ws, capsys, monkeypatch):
    monkeypatch.setenv('TORCH_HOME', str(ws / 'torch_home'))
    line = run_main(ws, capsys, 'yolox_nano_128.py', 'http://127.0.0.1:9/yolox_s.pth',
                    'street.jpg')
    assert 'could not download' in line and 'http://127.0.0.1:9/yolox_s.pth' in line
    assert 'local path' in line


def test_cuda_device_without_cuda(ws, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    line = run_main(ws, capsys, 'yolox_nano_128.py', 'yolox.pth', 'street.jpg', '--device',
                    'cuda:0')
    assert "'cuda:0'" in line and 'CUDA is not available' in line and '--device cpu' in line


def test_cuda_out_of_memory(ws):
    """OOM cannot be provoked on a CPU machine: the engine is made to raise it."""
    code = ('import sys, torch\n'
            'from mmdet_cam_hook.cam import engine\n'
            'def explain(*args, **kwargs):\n'
            '    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")\n'
            'engine.CAMEngine.explain = explain\n'
            'from mmdet_cam_hook.cli.cam import main\n'
            'sys.exit(main())\n')
    proc = run(ws, 'yolox_nano_128.py', 'yolox.pth', 'street.jpg', '--out-dir', ws / 'out_oom',
               cmd=(sys.executable, '-c', code))
    assert_user_error(proc, 'out of memory', 'street.jpg', '--device cpu')


def test_without_grad_cam(ws):
    """grad-cam is only the tests' reference: the tool runs, with --renormalize too, when it
    cannot be imported; the reference then names the package to install."""
    code = ('import sys\n'
            "sys.modules['pytorch_grad_cam'] = None  # as if grad-cam were not installed\n"
            'from mmdet_cam_hook.cli.cam import main\n'
            'code = main()\n'
            'from mmdet_cam_hook.cam.methods import METHODS\n'
            'try:\n'
            "    METHODS['gradcam'].cam_class\n"
            'except ImportError as exc:\n'
            '    print(exc)\n'
            'sys.exit(code)\n')
    out = ws / 'out_without_grad_cam'
    proc = run(ws, 'yolox_nano_128.py', 'yolox.pth', 'street.jpg', '--topk', '1',
               '--renormalize', '--out-dir', out, cmd=(sys.executable, '-c', code))
    assert proc.returncode == 0, proc.stderr
    assert {p.name for p in out.iterdir()} == {'street_gradcam.jpg', 'street_det0_gradcam.jpg'}
    assert 'grad-cam is not installed (no module pytorch_grad_cam): pip install grad-cam==1.5.7' \
        in proc.stdout


# ---------------------------------------------------------------------------------------------
# User errors in-process (no model needed, or a cheap one)
@pytest.mark.parametrize('args, needle', [
    (['--method', 'gradcm'], "invalid choice: 'gradcm' (choose from 'gradcam', 'gradcam++'"),
    (['--score-thr', '1.5'], "--score-thr: must be a number in [0, 1], got '1.5'"),
    (['--topk', '0'], "--topk: must be an integer >= 1, got '0'"),
    (['--batch-size', '0'], "--batch-size: must be an integer >= 1, got '0'"),
    (['--batch-size', 'all'], "--batch-size: must be an integer >= 1, got 'all'"),
])
def test_argparse_errors(ws, capsys, args, needle):
    with pytest.raises(SystemExit) as info:
        main(['cfg.py', 'ckpt.pth', 'img.jpg', *args])
    assert info.value.code == 2
    assert needle in capsys.readouterr().err


def test_missing_positionals(capsys):
    with pytest.raises(SystemExit) as info:
        main(['cfg.py', 'ckpt.pth'])
    assert info.value.code == 2
    assert 'the following arguments are required: img' in capsys.readouterr().err


@pytest.mark.parametrize('args, needles', [
    (['--device', 'gpu'], ["--device must be 'cpu' or 'cuda[:N]', got 'gpu'"]),
    (['--out-dir', 'street.jpg'], ["--out-dir 'street.jpg' exists and is not a folder"]),
], ids=['device', 'out-dir-is-file'])
def test_bad_options(ws, capsys, monkeypatch, args, needles):
    monkeypatch.chdir(ws)
    assert main(['yolox_nano_128.py', 'yolox.pth', 'street.jpg', *args]) == 1
    line = error_line(capsys.readouterr().err)
    for needle in needles:
        assert needle in line


@pytest.mark.parametrize('config, checkpoint, img, needles', [
    ('missing.py', 'yolox.pth', 'street.jpg', ["config 'missing.py' does not exist"]),
    ('broken_config.py', 'yolox.pth', 'street.jpg', ["config 'broken_config.py' could not be "
                                                     'read: SyntaxError']),
    ('yolox_nano_128.py', 'missing.pth', 'street.jpg', ["checkpoint 'missing.pth' does not"]),
    ('yolox_nano_128.py', 'yolox.pth', 'missing.jpg', ["image 'missing.jpg' does not exist"]),
    ('yolox_nano_128.py', 'yolox.pth', 'torch_home', ["folder 'torch_home' has no images",
                                                      '.jpg']),
    ('yolox_nano_128.py', 'yolox.pth', 'many/*.gif', ["no files match 'many/*.gif'"]),
    ('yolox_nano_128.py', 'yolox.pth', 'many/broken.jpg', ['broken.jpg', 'could not be decoded']),
    ('yolox_nano_128.py', 'partial.pth', 'street.jpg', ['does not fit the model',
                                                        'missing key(s)',
                                                        'multi_level_conv_cls.2']),
    ('yolox_nano_128.py', 's3://bucket/yolox.pth', 'street.jpg', ['only local paths']),
    ('yolox_nano_128.py', 'yolox.pth', 'strip.png', ['strip.png', '2000x1']),
    ('yolox_nano_128.py', 'many', 'street.jpg', ["checkpoint 'many' is a directory"]),
    ('many', 'yolox.pth', 'street.jpg', ["config 'many' is a directory"]),
], ids=['config', 'config-syntax', 'checkpoint', 'image', 'empty-folder', 'glob', 'unreadable',
        'checkpoint-mismatch', 'scheme', 'thin-image', 'checkpoint-folder', 'config-folder'])
def test_bad_inputs(ws, capsys, monkeypatch, config, checkpoint, img, needles):
    monkeypatch.chdir(ws)
    (ws / 'torch_home').mkdir(exist_ok=True)
    assert main([config, checkpoint, img, '--out-dir', 'out_bad_inputs']) == 1
    line = error_line(capsys.readouterr().err)
    for needle in needles:
        assert needle in line, line
    assert not (ws / 'out_bad_inputs').exists()


def test_duplicate_stems(tmp_path, capsys):
    for name in ('x.jpg', 'x.png'):
        cv2.imwrite(str(tmp_path / name), squares_image(40, 40, 0))
    assert main(['cfg.py', 'ckpt.pth', str(tmp_path)]) == 1
    assert "share the name 'x'" in error_line(capsys.readouterr().err)
    # In two folders of a recursive glob, too (under torchrun, too: every rank says it).
    (tmp_path / 'sub').mkdir()
    cv2.imwrite(str(tmp_path / 'sub' / 'y.jpg'), squares_image(40, 40, 0))
    cv2.imwrite(str(tmp_path / 'y.bmp'), squares_image(40, 40, 0))
    assert main(['cfg.py', 'ckpt.pth', str(tmp_path / '**' / 'y.*')]) == 1
    assert "share the name 'y'" in error_line(capsys.readouterr().err)


def test_output_name_clash(tmp_path, capsys):
    """Image ``a_det0`` writes ``a_det0_gradcam.jpg``, which is also image ``a``'s detection-0
    map with --method gradcam: refused before anything is loaded; other methods (and names
    the tool never writes, like ``a_det01``) are fine."""
    for name in ('a.jpg', 'a_det10.png', 'a_det01.jpg'):
        cv2.imwrite(str(tmp_path / name), squares_image(40, 40, 0))
    assert main(['cfg.py', 'ckpt.pth', str(tmp_path)]) == 1
    line = error_line(capsys.readouterr().err)
    assert 'a.jpg and ' in line and 'a_det10.png would both write a_det10_gradcam.jpg' in line
    assert "first one's detection 10" in line
    from mmdet_cam_hook.cli.folder import collect_images
    assert len(collect_images(str(tmp_path), 'eigencam')) == 3
    (tmp_path / 'a_det10.png').unlink()
    assert len(collect_images(str(tmp_path), 'gradcam')) == 2


def test_out_dir_never_overwrites_inputs(tmp_path, capsys):
    """--out-dir the input folder (however spelled), or an output name that is an input, is
    refused before the model loads (cfg.py does not exist: it is never read) and no input
    changes; outputs beside the inputs of a glob are fine when no name clashes."""
    images = tmp_path / 'images'
    images.mkdir()
    for name in ('a.jpg', 'b.png'):
        cv2.imwrite(str(images / name), squares_image(40, 40, 0))
    before = {p.name: p.read_bytes() for p in images.iterdir()}
    for out_dir in (images, images / '.', tmp_path / '..' / tmp_path.name / 'images'):
        assert main(['cfg.py', 'ckpt.pth', str(images), '--out-dir', str(out_dir)]) == 1
        line = error_line(capsys.readouterr().err)
        assert 'is the input folder' in line and 'choose another --out-dir' in line, line
    # A glob of the folder, --out-dir the folder: no output is named like an input.
    assert main(['cfg.py', 'ckpt.pth', str(images / '*'), '--out-dir', str(images)]) == 1
    assert "config 'cfg.py' does not exist" in error_line(capsys.readouterr().err)
    # a_gradcam.jpg (a's combined map) and, with --save-all, b_panel.jpg are inputs too.
    cv2.imwrite(str(images / 'a_gradcam.jpg'), squares_image(40, 40, 1))
    cv2.imwrite(str(images / 'b_panel.jpg'), squares_image(40, 40, 2))
    before = {p.name: p.read_bytes() for p in images.iterdir()}
    assert main(['cfg.py', 'ckpt.pth', str(images / '*'), '--out-dir', str(images)]) == 1
    line = error_line(capsys.readouterr().err)
    assert "the outputs of image 'a' would overwrite the input" in line and 'a_gradcam.jpg' in line
    assert main(['cfg.py', 'ckpt.pth', str(images / 'b*'), '--out-dir', str(images),
                 '--save-all']) == 1
    line = error_line(capsys.readouterr().err)
    assert "image 'b' would overwrite" in line and 'b_panel.jpg' in line
    assert main(['cfg.py', 'ckpt.pth', str(images / 'b*'), '--out-dir', str(images)]) == 1
    assert "config 'cfg.py' does not exist" in error_line(capsys.readouterr().err)
    assert {p.name: p.read_bytes() for p in images.iterdir()} == before


def test_drise_masks_and_progress(ws, capsys, monkeypatch):
    """issue 18 #11: --drise-masks sets D-RISE's cost (counted at the detector), and a long
    D-RISE logs its progress (every PROGRESS_EVERY seconds; 0 here, so every batch)."""
    from mmdet_cam_hook.cam import drise
    from mmdet_cam_hook.runtime.detector import BatchedDetector

    seen = []
    outputs = BatchedDetector.outputs

    def counting(self, images):
        seen.append(len(images))
        return outputs(self, images)

    monkeypatch.setattr(BatchedDetector, 'outputs', counting)
    monkeypatch.setattr(drise, 'PROGRESS_EVERY', 0.0)
    monkeypatch.chdir(ws)
    assert main(['yolox_nano_128.py', 'yolox.pth', 'street.jpg', '--out-dir', 'out_drise',
                 '--method', 'drise', '--drise-masks', '40', '--topk', '1',
                 '--device', 'cpu']) == 0
    assert sum(n for n in seen if n > 1) == 40, seen  # masked images, batches of 16
    err = capsys.readouterr().err
    assert 'mmdet-cam: drise: 16/40 masked images' in err and '32/40' in err, err
    # the seed tool's names: the combined map is {stem}_gradcam.jpg whatever the method
    assert {p.name for p in (ws / 'out_drise').iterdir()} == {'street_gradcam.jpg',
                                                              'street_det0_drise.jpg'}
    assert build_parser(['gradcam', 'drise']).parse_args(
        ['c.py', 'c.pth', 'i.jpg']).drise_masks == 1000
