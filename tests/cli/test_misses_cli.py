"""``--explain-misses`` in both tools, on a 3-image val split of the shapes (64 px) and a
perturbed random-init YOLOX-nano checkpoint (scores 0.3-0.5): ``mmdet-cam --ann-file`` writes
each miss's map next to the detection maps, ``mmdet-cam-eval`` adds the records (no maps, each
with its image) and the counts per reason to its JSON."""
import json
import os

import cv2
import numpy as np
import pytest
import torch

from mmdet_cam_hook import CAMEngine
from mmdet_cam_hook.cam.misses import REASONS
from mmdet_cam_hook.cli.cam import main as cam_main
from mmdet_cam_hook.cli.eval import main as eval_main
from mmdet_cam_hook.cli.misses import read_coco_ground_truth
from mmdet_cam_hook.runtime.io import load_image

PERTURB = dict(calibrate=True, weights={'multi_level_conv_': 0.002},
               biases={'multi_level_conv_cls': (0.0, 0.5), 'multi_level_conv_obj': (0.0, 0.5)})
THR = '0.42'  # between this model's scores: some objects are found, the others missed


@pytest.fixture(scope='module')
def ws(tmp_path_factory):
    from mmengine.config import Config

    from mmdet_cam_hook.demo.shapes import generate_shapes
    from mmdet_cam_hook.testing import build_detector, mmdet_config

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp('misses')
    data = generate_shapes(root / 'shapes', num_train=1, num_val=3, image_size=64, seed=0)
    cfg = Config.fromfile(mmdet_config('yolox/yolox_nano_8xb8-300e_coco.py'))
    cfg.model.bbox_head.num_classes = len(data.classes)
    cfg.model.data_preprocessor.batch_augments = None
    pipeline = [dict(type='LoadImageFromFile'),
                dict(type='Resize', scale=(96, 96), keep_ratio=True),
                dict(type='Pad', pad_to_square=True, pad_val=dict(img=(114.0, 114.0, 114.0))),
                dict(type='LoadAnnotations', with_bbox=True), dict(type='PackDetInputs')]
    dataset = dict(type='CocoDataset', data_root=str(data.root),
                   ann_file=str(data.ann_file('val')),
                   data_prefix=dict(img=str(data.img_dir('val')) + os.sep),
                   metainfo=dict(classes=data.classes), filter_cfg=dict(filter_empty_gt=False),
                   pipeline=pipeline, test_mode=True)
    cfg.val_dataloader = cfg.test_dataloader = dict(batch_size=1, num_workers=0,
                                                    dataset=dataset)
    cfg.train_dataloader = None
    cfg.custom_hooks = []
    config = root / 'tiny.py'
    cfg.dump(str(config))
    torch.manual_seed(0)
    model = build_detector('yolox/yolox_nano_8xb8-300e_coco.py', input_size=96,
                           num_classes=len(data.classes), perturb=PERTURB)
    checkpoint = root / 'tiny.pth'
    torch.save({'state_dict': model.state_dict(), 'meta': {}}, checkpoint)
    model.cfg = cfg
    return dict(root=root, data=data, config=str(config), checkpoint=str(checkpoint),
                model=model)


def test_eval_json_has_the_misses(ws):
    out = ws['root'] / 'results.json'
    code = eval_main([ws['config'], ws['checkpoint'], '--score-thr', THR, '--steps', '1',
                      '--methods', 'hirescam', '--device', 'cpu', '--explain-misses',
                      '--out', str(out)])
    assert code == 0
    result = json.loads(out.read_text())
    misses, summary = result['misses'], result['miss_summary']
    assert misses and summary['images'] == 3
    assert summary['misses'] == len(misses) == sum(summary['counts'].values())
    assert set(summary['counts']) == set(REASONS)
    for reason in REASONS:
        assert summary[f'miss_share_{reason}'] == pytest.approx(
            summary['counts'][reason] / len(misses))
    keys = {'gt_index', 'gt_box', 'gt_label', 'reason', 'candidate_box', 'candidate_label',
            'candidate_score', 'suppressed_by', 'image'}
    assert all(set(m) == keys for m in misses)
    # the same records as the engine's, image by image
    truth = read_coco_ground_truth(str(ws['data'].ann_file('val')), None)
    engine = CAMEngine(ws['model'], score_thr=float(THR))
    for image in sorted({m['image'] for m in misses}):
        boxes, labels = truth[os.path.basename(image)]
        report = engine.misses(load_image(image), boxes, labels)
        assert [m.to_dict() for m in report.misses] == \
            [{k: v for k, v in m.items() if k != 'image'} for m in misses if m['image'] == image]
    scores = [m['candidate_score'] for m in misses if m['candidate_score'] is not None]
    assert summary['miss_candidate_score'] == pytest.approx(np.mean(scores))
    assert summary['false_positives'] >= 0


def test_cam_writes_miss_maps(ws, tmp_path):
    out = tmp_path / 'out'
    img_dir = ws['data'].img_dir('val')
    code = cam_main([ws['config'], ws['checkpoint'], str(img_dir), '--out-dir', str(out),
                     '--score-thr', THR, '--method', 'hirescam', '--device', 'cpu',
                     '--ann-file', str(ws['data'].ann_file('val')), '--explain-misses'])
    assert code == 0
    truth = read_coco_ground_truth(str(ws['data'].ann_file('val')), None)
    engine = CAMEngine(ws['model'], score_thr=float(THR))
    found = 0
    for path in sorted(img_dir.iterdir()):
        boxes, labels = truth[path.name]
        res = engine.explain(load_image(path), methods='hirescam', gt_bboxes=boxes,
                             gt_labels=labels)['hirescam']
        expected = {f'{path.stem}_miss{m.gt_index}_hirescam.jpg' for m in res.misses
                    if m.candidate is not None}
        written = {p.name for p in out.glob(f'{path.stem}_miss*_hirescam.jpg')}
        assert written == expected
        found += len(expected)
        misses = cv2.imread(str(out / f'{path.stem}_misses.jpg'))
        assert misses is not None and misses.shape[1] > 0
    assert found > 0


def test_explain_misses_needs_an_ann_file(ws, tmp_path, capsys):
    code = cam_main([ws['config'], ws['checkpoint'], str(ws['data'].img_dir('val')),
                     '--out-dir', str(tmp_path / 'o'), '--device', 'cpu', '--explain-misses'])
    assert code == 1
    assert '--explain-misses needs the ground truth: add --ann-file' in capsys.readouterr().err
