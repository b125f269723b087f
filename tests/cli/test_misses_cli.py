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
def ws(tmp_path_factory, make_tiny_coco):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp('misses')
    data, cfg, config, checkpoint, model = make_tiny_coco(root, num_val=3, perturb=PERTURB)
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
