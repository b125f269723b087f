"""The built-in shapes dataset, and the demo end to end through TensorBoard's HTTP API."""
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import cv2
import numpy as np
import pytest
from pycocotools import mask as mask_utils

from mmdet_cam_hook.configs import config_path
from mmdet_cam_hook.demo import shapes
from mmdet_cam_hook.demo.run import MODELS, demo_config, main, parse_args, run_demo
from mmdet_cam_hook.demo.shapes import CLASSES, ensure_shapes, generate_shapes

PNG_MAGIC = b'\x89PNG\r\n\x1a\n'


# --------------------------------------------------------------------------- the generator


def _load(root, split):
    with open(Path(root) / 'annotations' / f'{split}.json') as f:
        return json.load(f)


def test_generator_is_deterministic(tmp_path):
    a = generate_shapes(tmp_path / 'a', num_train=5, num_val=3, seed=7)
    b = generate_shapes(tmp_path / 'b', num_train=5, num_val=3, seed=7)
    c = generate_shapes(tmp_path / 'c', num_train=5, num_val=3, seed=8)
    for split in ('train', 'val'):
        assert _load(a.root, split) == _load(b.root, split)
        for image in _load(a.root, split)['images']:
            name = image['file_name']
            assert (a.img_dir(split) / name).read_bytes() == (b.img_dir(split) / name).read_bytes()
    assert _load(a.root, 'train') != _load(c.root, 'train')


def test_generator_writes_valid_coco(tmp_path):
    data = generate_shapes(tmp_path / 'shapes', num_train=24, num_val=6, image_size=128, seed=3)
    sizes = []
    for split, count in (('train', 24), ('val', 6)):
        coco = _load(data.root, split)
        assert [c['name'] for c in sorted(coco['categories'], key=lambda c: c['id'])] == list(
            CLASSES)
        assert [image['id'] for image in coco['images']] == list(range(1, count + 1))
        assert len({ann['id'] for ann in coco['annotations']}) == len(coco['annotations'])
        images = {image['id']: image for image in coco['images']}
        per_image = {image_id: 0 for image_id in images}
        for ann in coco['annotations']:
            image = images[ann['image_id']]
            x, y, w, h = ann['bbox']
            assert ann['category_id'] in (1, 2, 3)
            assert w > 0 and h > 0, ann
            assert x >= 0 and y >= 0 and x + w <= image['width'] and y + h <= image['height'], ann
            assert 0 < ann['area'] <= w * h
            assert ann['iscrowd'] == 0
            # the exact mask: compressed RLE of the image's size, tight in its box, its area
            assert ann['segmentation']['size'] == [image['height'], image['width']]
            mask = mask_utils.decode(ann['segmentation']).astype(bool)
            ys, xs = np.nonzero(mask)
            assert [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1] == [
                x, y, w, h]
            assert mask.sum() == ann['area'] == mask_utils.area(ann['segmentation'])
            per_image[ann['image_id']] += 1
        assert all(n >= 1 for n in per_image.values())
        for image in coco['images']:
            pixels = cv2.imread(str(data.img_dir(split) / image['file_name']))
            assert pixels.shape == (image['height'], image['width'], 3)
            assert max(pixels.shape[:2]) == 128
            sizes.append((image['height'], image['width']))
    assert any(h == w for h, w in sizes) and any(h < w for h, w in sizes) and any(
        h > w for h, w in sizes), sizes


def test_sample_boxes_lie_inside_the_image():
    rng = np.random.default_rng(0)
    for _ in range(10):
        img, objects = shapes.draw_sample(rng, image_size=96, max_objects=3)
        assert objects
        for obj in objects:
            x, y, w, h = obj['bbox']
            assert 0 <= x and 0 <= y and x + w <= img.shape[1] and y + h <= img.shape[0]
            assert obj['label'] in range(len(CLASSES))


def test_masks_are_exactly_the_drawn_shapes():
    """Each object's mask is the set of pixels drawn in its colour: the image (before blur
    and noise) is that colour on the mask and not next to it; squares fill their box; the RLE
    written to the json decodes to exactly the mask; masks never overlap."""
    rng = np.random.default_rng(5)
    for _ in range(8):
        img, objects = shapes.draw_sample(rng, image_size=128, max_objects=4)
        union = np.zeros(img.shape[:2], int)
        for obj in objects:
            mask = obj['mask']
            assert mask.dtype == bool and mask.shape == img.shape[:2]
            assert mask.sum() == obj['area']
            union += mask
            np.testing.assert_array_equal(
                mask_utils.decode(shapes.encode_mask(mask)).astype(bool), mask)
            x, y, w, h = obj['bbox']
            if obj['label'] == 0:  # a square fills its box
                assert obj['area'] == w * h and mask[y:y + h, x:x + w].all()
            # inside the mask (away from the blurred edge) one colour up to the noise
            inner = cv2.erode(mask.astype(np.uint8), np.ones((5, 5), np.uint8)) > 0
            if inner.sum() > 20:
                assert img[inner].astype(float).std(axis=0).max() < 20
        assert union.max() <= 1


def test_demo_loads_the_masks_with_mmdet(tmp_path):
    """mmdet's own ``LoadAnnotations(with_mask=True)``, as the instance demo's pipeline
    runs it, reads each annotation's mask as exactly its RLE's pixels."""
    from mmdet.datasets import CocoDataset
    from mmdet.utils import register_all_modules

    register_all_modules()
    data = ensure_shapes(tmp_path / 'shapes', num_train=3, num_val=1, image_size=96)
    dataset = CocoDataset(
        data_root=str(data.root), ann_file=str(data.ann_file('train')),
        data_prefix=dict(img=str(data.img_dir('train')) + os.sep),
        metainfo=dict(classes=data.classes), pipeline=[
            dict(type='LoadImageFromFile'),
            dict(type='LoadAnnotations', with_bbox=True, with_mask=True)])
    coco = _load(data.root, 'train')
    for index in range(len(dataset)):
        sample = dataset[index]
        image_id = sample['img_id']
        anns = [a for a in coco['annotations'] if a['image_id'] == image_id]
        expected = np.stack([mask_utils.decode(a['segmentation']) for a in anns])
        np.testing.assert_array_equal(sample['gt_masks'].masks, expected)
        assert not sample['gt_ignore_flags'].any()


def test_ensure_shapes_reuses_and_regenerates(tmp_path, monkeypatch):
    root = tmp_path / 'shapes'
    ensure_shapes(root, num_train=6, num_val=2)
    manifest = root / shapes.MANIFEST
    stamp = manifest.stat().st_mtime_ns
    (root / 'notes.txt').write_text('mine')

    ensure_shapes(root, num_train=6, num_val=2)
    assert manifest.stat().st_mtime_ns == stamp  # re-used, not rewritten

    ensure_shapes(root, num_train=4, num_val=2)  # other parameters: regenerated
    assert json.loads(manifest.read_text())['params']['num_train'] == 4
    assert sorted(p.name for p in (root / 'train').iterdir()) == [
        f'{i:06d}.jpg' for i in range(1, 5)]
    assert (root / 'notes.txt').read_text() == 'mine'  # only the generator's files replaced

    monkeypatch.setattr(shapes, 'GENERATOR_VERSION', shapes.GENERATOR_VERSION + 1)
    ensure_shapes(root, num_train=4, num_val=2)  # a changed generator: regenerated
    assert json.loads(manifest.read_text())['version'] == shapes.GENERATOR_VERSION

    (root / 'val' / '000001.jpg').unlink()  # incomplete: regenerated
    ensure_shapes(root, num_train=4, num_val=2)
    assert (root / 'val' / '000001.jpg').is_file()
    assert not [p for p in tmp_path.iterdir() if '.partial-' in p.name]


def test_generator_refuses_a_foreign_folder(tmp_path):
    (tmp_path / 'photos').mkdir()
    (tmp_path / 'photos' / 'holiday.jpg').write_bytes(b'x')
    with pytest.raises(FileExistsError, match='photos'):
        ensure_shapes(tmp_path / 'photos', num_train=2, num_val=1)
    assert (tmp_path / 'photos' / 'holiday.jpg').read_bytes() == b'x'


@pytest.mark.parametrize('kwargs, error, match', [
    (dict(num_train=0), ValueError, 'num_train.*got 0'),
    (dict(num_val=-1), ValueError, 'num_val.*got -1'),
    (dict(image_size=32), ValueError, 'image_size.*got 32'),
    (dict(image_size='256'), TypeError, "image_size.*'256'"),
    (dict(seed=1.5), TypeError, 'seed.*1.5'),
])
def test_generator_rejects_bad_parameters(tmp_path, kwargs, error, match):
    with pytest.raises(error, match=match):
        generate_shapes(tmp_path / 'shapes', **kwargs)
    assert not (tmp_path / 'shapes').exists()


def test_generator_command_line(tmp_path, capsys):
    out = tmp_path / 'shapes'
    assert shapes.main(['--out', str(out), '--num-train', '3', '--num-val', '2']) == 0
    assert len(_load(out, 'train')['images']) == 3
    assert 'val.json' in capsys.readouterr().out


# --------------------------------------------------------------------------- the demo config


@pytest.mark.parametrize('epochs', [1, 2, 5, 12])
def test_demo_schedule_is_rescaled(tmp_path, epochs):
    data = ensure_shapes(tmp_path / 'shapes', num_train=2, num_val=1)
    cfg = demo_config(data, tmp_path / 'work', epochs=epochs, val_interval=1)
    assert cfg.train_cfg.max_epochs == epochs
    schedulers = cfg.param_scheduler
    assert schedulers[0]['begin'] == 0 and schedulers[-1]['end'] == epochs
    for before, after in zip(schedulers, schedulers[1:]):
        assert before['end'] == after['begin'] and before['begin'] < before['end']
    types = [hook['type'] for hook in cfg.custom_hooks]
    # YOLOX's own hooks are kept, and the CAM hook is added.
    assert {'YOLOXModeSwitchHook', 'SyncNormHook', 'EMAHook', 'DetCAMHook'} <= set(types)
    switch = next(h for h in cfg.custom_hooks if h['type'] == 'YOLOXModeSwitchHook')
    assert 0 <= switch['num_last_epochs'] < epochs or epochs == 1
    train_set = cfg.train_dataloader.dataset.dataset
    assert Path(train_set.ann_file) == (data.root / 'annotations' / 'train.json').resolve()
    assert tuple(train_set.metainfo['classes']) == CLASSES


def test_demo_probes_fit_a_small_val_split(tmp_path):
    data = ensure_shapes(tmp_path / 'shapes', num_train=2, num_val=3)
    cfg = demo_config(data, tmp_path / 'work', config='mmdet_cam_hook::demo/'
                      'yolox_nano_shapes_gradcam.py')
    (hook, ) = [h for h in cfg.custom_hooks if h['type'] == 'DetCAMHook']
    assert hook['probe_images'] == [0, 1, 2]  # the config's 0..7, cut to the 3 val images


def test_demo_rejects_bad_arguments(capsys):
    with pytest.raises(SystemExit):
        parse_args(['--epochs', '0'])
    assert "--epochs: must be an integer >= 1, got '0'" in capsys.readouterr().err


def test_demo_model_choice(capsys):
    """``--model`` picks a shipped demo config; a bad choice is an error naming the choices,
    also through the python API."""
    assert parse_args([]).model == 'yolox-nano'
    assert parse_args(['--model', 'rtmdet-tiny']).model == 'rtmdet-tiny'
    assert parse_args(['--model', 'rtmdet-ins-tiny']).model == 'rtmdet-ins-tiny'
    with pytest.raises(SystemExit):
        parse_args(['--model', 'rtmdet-ins'])
    assert ("--model: invalid choice: 'rtmdet-ins' (choose from 'yolox-nano', 'rtmdet-tiny', "
            "'rtmdet-ins-tiny')" in capsys.readouterr().err)
    with pytest.raises(ValueError, match=r"`model` must be one of \['yolox-nano', "
                       r"'rtmdet-tiny', 'rtmdet-ins-tiny'\], got 'rtmdet-ins'"):
        run_demo(model='rtmdet-ins')
    assert list(MODELS) == ['yolox-nano', 'rtmdet-tiny', 'rtmdet-ins-tiny']
    assert all(Path(config_path(c)).is_file() for c in MODELS.values())


@pytest.mark.parametrize('epochs', [1, 2, 5, 12])
def test_rtmdet_demo_schedule_is_rescaled(tmp_path, epochs):
    """RTMDet's demo config: the schedule ends at ``epochs``, RTMDet's EMA and pipeline switch
    are kept (the switch moved into the run, or past its end for short runs), and the CAM hook
    is there under its generic name."""
    data = ensure_shapes(tmp_path / 'shapes', num_train=2, num_val=3)
    cfg = demo_config(data, tmp_path / 'work', config=config_path(MODELS['rtmdet-tiny']),
                      epochs=epochs, val_interval=1)
    assert cfg.model.type == 'RTMDet' and cfg.train_cfg.max_epochs == epochs
    schedulers = cfg.param_scheduler
    assert schedulers[0]['begin'] == 0 and schedulers[-1]['end'] == epochs
    for before, after in zip(schedulers, schedulers[1:]):
        assert before['end'] == after['begin'] and before['begin'] < before['end']
    hooks = {hook['type']: hook for hook in cfg.custom_hooks}
    assert {'EMAHook', 'PipelineSwitchHook', 'DetCAMHook'} <= set(hooks)
    assert 0 < hooks['PipelineSwitchHook']['switch_epoch'] <= epochs
    assert hooks['DetCAMHook']['probe_images'] == [0, 1, 2]
    assert not any(t['type'] in ('CachedMosaic', 'CachedMixUp', 'Mosaic')
                   for t in cfg.train_dataloader.dataset.pipeline)


@pytest.mark.parametrize('epochs', [1, 5, 12])
def test_rtmdet_ins_demo_config(tmp_path, epochs):
    """RTMDet-Ins-tiny's demo config: RTMDet-Ins's head, masks loaded for training (as
    bitmaps, the RLE's exact pixels), bbox and segm evaluated, RTMDet's hooks kept, the
    schedule rescaled as RTMDet-tiny's."""
    data = ensure_shapes(tmp_path / 'shapes', num_train=2, num_val=3)
    cfg = demo_config(data, tmp_path / 'work', config=config_path(MODELS['rtmdet-ins-tiny']),
                      epochs=epochs, val_interval=1)
    assert cfg.model.type == 'RTMDet' and cfg.model.bbox_head.type == 'RTMDetInsSepBNHead'
    assert cfg.model.bbox_head.num_classes == 3 and cfg.model.backbone.init_cfg is None
    (load, ) = [t for t in cfg.train_dataloader.dataset.pipeline
                if t['type'] == 'LoadAnnotations']
    assert load['with_mask'] and load.get('poly2mask', True)
    assert cfg.val_evaluator.metric == ['bbox', 'segm']
    assert Path(cfg.val_evaluator.ann_file) == data.ann_file('val').resolve()
    schedulers = cfg.param_scheduler
    assert schedulers[0]['begin'] == 0 and schedulers[-1]['end'] == epochs
    hooks = {hook['type']: hook for hook in cfg.custom_hooks}
    assert {'EMAHook', 'PipelineSwitchHook', 'DetCAMHook'} <= set(hooks)
    assert 0 < hooks['PipelineSwitchHook']['switch_epoch'] <= epochs
    switched = hooks['PipelineSwitchHook']['switch_pipeline']
    assert any(t['type'] == 'LoadAnnotations' and t['with_mask'] for t in switched)
    assert not any(t['type'] in ('CachedMosaic', 'CachedMixUp', 'RandomCrop')
                   for t in [*cfg.train_dataloader.dataset.pipeline, *switched])


# --------------------------------------------------------------------------- end to end


def test_rtmdet_demo_one_epoch(tmp_path, capsys):
    """``--model rtmdet-tiny`` trains RTMDet (its EMA and pipeline-switch hooks running) and the
    hook logs a panel per probe and method; 1 epoch on 8 images."""
    work_dir = tmp_path / 'work'
    assert main(['--model', 'rtmdet-tiny', '--work-dir', str(work_dir), '--data-root',
                 str(tmp_path / 'shapes'), '--num-train', '8', '--num-val', '2', '--epochs', '1',
                 '--threads', '1']) == 0
    printed = capsys.readouterr().out
    assert 'Demo run finished: 1 validations' in printed and 'epoch 1' in printed
    (log_dir, ) = [p for p in work_dir.iterdir() if p.is_dir()]
    config = (log_dir / 'vis_data' / 'config.py').read_text()
    assert "type='RTMDet'" in config and "type='DetCAMHook'" in config
    log = next(log_dir.glob('*.log')).read_text()
    assert 'DetCAMHook: explained 2/2 probe image(s) x 2 method(s) after val at step 1' in log
    assert 'runs without' not in log
    pngs = sorted(p.name for p in (log_dir / 'vis_data' / 'vis_image').glob('cam_val_*.png'))
    assert pngs == sorted(f'cam_val_{m}_{i:02d}_{i + 1:06d}_1.png' for m in ('gradcam', 'hirescam')
                          for i in range(2))



def test_rtmdet_ins_demo_one_epoch(tmp_path, capsys):
    """``--model rtmdet-ins-tiny`` trains RTMDet-Ins on the shapes' masks and the hook logs,
    per probe and method, the class maps' panel and the mask maps' panel; 1 epoch on 8 images,
    so the scores are near RTMDet's prior: the hook's threshold is lowered to see detections."""
    work_dir = tmp_path / 'work'
    assert main(['--model', 'rtmdet-ins-tiny', '--work-dir', str(work_dir), '--data-root',
                 str(tmp_path / 'shapes'), '--num-train', '8', '--num-val', '2', '--epochs', '1',
                 '--threads', '1', '--cfg-options', 'custom_hooks.2.score_thr=0.0',
                 'custom_hooks.2.topk=2']) == 0
    printed = capsys.readouterr().out
    assert 'Demo run finished' in printed
    (log_dir, ) = [p for p in work_dir.iterdir() if p.is_dir()]
    config = (log_dir / 'vis_data' / 'config.py').read_text()
    assert "type='RTMDetInsSepBNHead'" in config and 'with_mask=True' in config
    log = next(log_dir.glob('*.log')).read_text()
    assert 'DetCAMHook: explained 2/2 probe image(s) x 2 method(s) after val at step 1' in log
    pngs = sorted(p.name for p in (log_dir / 'vis_data' / 'vis_image').glob('cam_val_*.png'))
    assert pngs == sorted(f'cam_val_{m}{view}_{i:02d}_{i + 1:06d}_1.png'
                          for m in ('gradcam', 'hirescam') for view in ('', '_mask')
                          for i in range(2))


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(('127.0.0.1', 0))
        return sock.getsockname()[1]


def _get(url, timeout=10):
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.status, response.headers.get('Content-Type', ''), response.read()


def _tensorboard_images(logdir, workdir, timeout=120):
    """Start TensorBoard on ``logdir``; return the image tags and one image's PNG bytes."""
    exe = Path(sys.executable).parent / 'tensorboard'
    assert exe.is_file(), f'no tensorboard next to {sys.executable}'
    port = _free_port()
    base = f'http://127.0.0.1:{port}'
    log = open(workdir / 'tensorboard.log', 'wb')
    proc = subprocess.Popen(
        [str(exe), '--logdir', str(logdir), '--host', '127.0.0.1', '--port', str(port),
         '--reload_interval', '1'],
        stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + timeout
        tags = {}
        while time.monotonic() < deadline:
            assert proc.poll() is None, (workdir / 'tensorboard.log').read_text()
            try:
                _, _, body = _get(f'{base}/data/plugin/images/tags')
                tags = json.loads(body)
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                tags = {}
            if any(tags.values()):
                break
            time.sleep(0.5)
        assert any(tags.values()), (tags, (workdir / 'tensorboard.log').read_text())
        run, run_tags = next((run, t) for run, t in tags.items() if t)
        tag = sorted(run_tags)[0]
        query = urllib.parse.urlencode(dict(run=run, tag=tag, sample=0))
        _, _, body = _get(f'{base}/data/plugin/images/images?{query}')
        entries = json.loads(body)
        assert entries, (run, tag)
        status, content_type, png = _get(
            f'{base}/data/plugin/images/individualImage?{entries[-1]["query"]}')
        assert status == 200
        return tags, entries, content_type, png
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def test_demo_end_to_end_in_tensorboard(tmp_path, capsys):
    work_dir = tmp_path / 'work_dirs' / 'demo'
    # One torch thread: on a 2-core machine that is busy with anything else, two threads wait
    # for each other and an epoch takes minutes instead of seconds.
    assert main([
        '--work-dir', str(work_dir), '--data-root', str(tmp_path / 'data' / 'shapes'),
        '--num-train', '48', '--num-val', '12', '--epochs', '2', '--val-interval', '1',
        '--threads', '1',
    ]) == 0
    printed = capsys.readouterr().out

    (log_dir, ) = [p for p in work_dir.iterdir() if p.is_dir()]
    vis_dir = log_dir / 'vis_data'
    assert 'tensorboard --logdir' in printed and str(log_dir.name) in printed
    assert 'bbox mAP50' in printed and 'epoch 2' in printed
    pngs = sorted((vis_dir / 'vis_image').glob('*.png'))
    assert pngs, 'the hook wrote no panels'
    assert any('gradcam' in p.name for p in pngs) and any('hirescam' in p.name for p in pngs)
    assert list(vis_dir.glob('events.out.tfevents.*'))

    tags, entries, content_type, png = _tensorboard_images(log_dir, tmp_path)
    all_tags = {tag for run_tags in tags.values() for tag in run_tags}
    assert any('gradcam' in tag for tag in all_tags), all_tags
    assert any('hirescam' in tag for tag in all_tags), all_tags
    assert {entry['step'] for entry in entries} == {1, 2}  # one image per validation (epoch)
    assert content_type == 'image/png'
    assert png.startswith(PNG_MAGIC)
    image = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_COLOR)
    assert image is not None and image.ndim == 3 and image.shape[2] == 3
    assert os.path.getsize(pngs[0]) > 0
