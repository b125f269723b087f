"""``--report`` of both tools, end to end: the manifest read back with ``json`` and the schema,
its records equal to the run's own outputs (``--save-raw``, ``results.json``), the page in a
real headless Chromium (no console error, no network request, thumbnails, a click on an image
then a detection shows its maps, the table sorts), and a torchrun run's report equal to one
process's."""
import json
import math
import os

import cv2
import numpy as np
import pytest
import torch

from mmdet_cam_hook.cli.cam import main as cam_main
from mmdet_cam_hook.cli.eval import main as eval_main
from mmdet_cam_hook.evaluation.metrics import energy_in_box
from mmdet_cam_hook.testing import confident_yolox_128, squares_image, torchrun_beside
from mmdet_cam_hook.testing.browser import browser_unavailable, launch_chromium, open_page
from mmdet_cam_hook.visualization.manifest import MANIFEST_SCHEMA, validate


@pytest.fixture(scope='module')
def ws(tmp_path_factory):
    """A YOLOX-nano config at 128 px, a checkpoint whose random model detects things, a folder
    of 4 images and one unreadable file."""
    root = tmp_path_factory.mktemp('report_cli')
    model = confident_yolox_128(root / 'yolox.py')
    torch.save(dict(state_dict=model.state_dict(),
                    meta=dict(dataset_meta=dict(classes=('circle', 'square', 'triangle')))),
               root / 'yolox.pth')
    (root / 'imgs').mkdir()
    for i, (h, w) in enumerate([(96, 160), (128, 100), (80, 120), (100, 140)]):
        cv2.imwrite(str(root / 'imgs' / f'im{i}.jpg'), squares_image(h, w, i))
    (root / 'imgs' / 'broken.jpg').write_bytes(b'not an image')
    from mmengine.registry import DefaultScope
    DefaultScope._instance_dict.clear()
    return root


@pytest.fixture(scope='module')
def cam_run(ws):
    """``mmdet-cam imgs --report --save-raw`` in-process; returns (out_dir, manifest)."""
    cwd = os.getcwd()
    os.chdir(ws)
    try:
        code = cam_main(['yolox.py', 'yolox.pth', 'imgs', '--topk', '3', '--device', 'cpu',
                         '--out-dir', 'out_one', '--save-raw', '--report'])
    finally:
        os.chdir(cwd)
    assert code == 1  # broken.jpg could not be read
    out = ws / 'out_one'
    return out, json.loads((out / 'manifest.json').read_text())


@pytest.fixture(scope='module')
def browser():
    reason = browser_unavailable()
    if reason is not None:
        pytest.skip(reason)
    with launch_chromium() as b:
        yield b


def test_cam_manifest_equals_the_runs_outputs(ws, cam_run):
    out, manifest = cam_run
    validate(manifest, MANIFEST_SCHEMA)
    assert manifest['schema_version'] == 1 and manifest['tool'] == 'mmdet-cam'
    assert manifest['methods'] == ['gradcam']
    assert manifest['layers'] == ['neck.out_convs.0', 'neck.out_convs.1', 'neck.out_convs.2']
    assert manifest['thresholds'] == dict(score_thr=0.3, topk=3)
    assert manifest['versions']['torch'] == torch.__version__.split('+')[0]
    import hashlib
    assert manifest['checkpoint_sha256'] == hashlib.sha256(
        (ws / 'yolox.pth').read_bytes()).hexdigest()
    paths = [r['path'] for r in manifest['images']]
    assert paths == [os.path.join('imgs', n) for n in
                     ('broken.jpg', 'im0.jpg', 'im1.jpg', 'im2.jpg', 'im3.jpg')]
    assert manifest['images'][0]['status'] == 'unreadable'
    for record in manifest['images'][1:]:
        stem = os.path.basename(record['path'])[:-4]
        raw = np.load(out / f'{stem}_gradcam.npz')
        assert record['status'] == 'explained'
        assert (record['height'], record['width']) == raw['cams'].shape[1:]
        dets = record['detections']
        assert len(dets) == len(raw['scores']) == 3
        np.testing.assert_allclose([d['box'] for d in dets], raw['bboxes'], atol=0.01)
        np.testing.assert_allclose([d['score'] for d in dets], raw['scores'], atol=1e-6)
        assert [d['label'] for d in dets] == raw['labels'].tolist()
        assert [d['level'] for d in dets] == raw['levels'].tolist()
        assert [','.join(d['layers']) for d in dets] == raw['layers'].tolist()
        energy = energy_in_box(raw['cams'], raw['bboxes'])
        for k, det in enumerate(dets):
            got = det['metrics']['gradcam']['energy_in_box']
            if det['metrics']['gradcam']['blank']:
                assert got is None
            else:
                assert got == pytest.approx(energy[k], abs=1e-6)
            assert (out / det['files']['gradcam']).is_file()
        for name in record['files'].values():
            assert cv2.imread(str(out / name)) is not None, name


def _check_page(session, manifest, shot, methods):
    page = session.page
    page.wait_for_selector('body[data-ready="1"]')
    thumbs = page.locator('#gallery .thumb')
    assert thumbs.count() == len(manifest['images'])
    i = next(i for i, r in enumerate(manifest['images']) if r['detections'])
    thumbs.nth(i).click()
    assert page.inner_text('#panel-title').startswith(manifest['images'][i]['path'])
    items = page.locator('#detections li')
    assert items.count() == len(manifest['images'][i]['detections'])
    items.nth(-1).click()
    det = manifest['images'][i]['detections'][-1]
    maps = page.locator('#maps figure img')
    assert maps.count() == len(methods)
    for j, method in enumerate(methods):
        assert maps.nth(j).get_attribute('src') == det['files'][method]
        page.wait_for_function('e => e.complete', arg=maps.nth(j).element_handle())
        assert maps.nth(j).evaluate('e => e.naturalWidth') > 0  # the file loaded
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 0
    # The table sorts: by score (ascending, then descending), by class.
    col = page.locator('#table thead th').all_inner_texts().index('score')

    def column(index):
        return page.locator(f'#table tbody tr td:nth-child({index + 1})').all_inner_texts()

    page.click('#table th[data-key="score"]')
    ascending = [float(v) for v in column(col)]
    assert ascending == sorted(ascending) and len(ascending) > 1
    page.click('#table th[data-key="score"]')
    assert [float(v) for v in column(col)] == sorted(ascending, reverse=True)
    assert page.get_attribute('#table th[data-key="score"]', 'aria-sort') == 'descending'
    page.click('#table th[data-key="class"]')
    names = column(page.locator('#table thead th').all_inner_texts().index('class'))
    assert names == sorted(names)
    assert session.console_errors == [] and session.network_requests == []


def test_cam_page_in_chromium(cam_run, browser, tmp_path):
    out, manifest = cam_run
    with open_page(out / 'report.html', browser=browser) as session:
        _check_page(session, manifest, tmp_path / 'cam_report.png', ['gradcam'])
        assert all(u.startswith('file://') for u in session.file_requests)


def test_torchrun_report_equals_one_process(ws):
    """2 ranks each write their share's thumbnails; rank 0 writes the report of the whole job,
    equal to one process's (numbers to float tolerance), run meanwhile in this process."""
    # The readable images only: a rank that exits with 1 makes torchrun stop the job.
    args = ['yolox.py', 'yolox.pth', 'imgs/im*.jpg', '--topk', '3', '--device', 'cpu',
            '--report']
    code, returncode, _, stderr = torchrun_beside(
        'mmdet_cam_hook.cli', [*args, '--out-dir', 'out_two'],
        lambda: cam_main([*args, '--out-dir', 'out_glob']), cwd=ws)
    assert code == 0
    assert returncode == 0, stderr[-3000:]
    assert 'Traceback' not in stderr
    assert 'mmdet-cam: rank 0/2: 2 of 4 images' in stderr
    one, two = ws / 'out_glob', ws / 'out_two'
    assert sorted(os.listdir(two / 'report_files' / 'thumbs')) == \
        sorted(os.listdir(one / 'report_files' / 'thumbs')) == [f'im{i}.jpg' for i in range(4)]
    _assert_close(json.loads((two / 'manifest.json').read_text()),
                  json.loads((one / 'manifest.json').read_text()))
    head = '<script type="application/json"'
    assert (one / 'report.html').read_text().split(head)[0] == \
        (two / 'report.html').read_text().split(head)[0]


def _assert_close(a, b, where='manifest'):
    if isinstance(a, dict):
        assert set(a) == set(b), where
        for k in a:
            _assert_close(a[k], b[k], f'{where}.{k}')
    elif isinstance(a, list):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_close(x, y, f'{where}[{i}]')
    elif isinstance(a, float) and isinstance(b, float):
        assert math.isclose(a, b, rel_tol=1e-3, abs_tol=1e-3), (where, a, b)
    else:
        assert a == b, (where, a, b)


# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope='module')
def eval_run(tmp_path_factory, make_tiny_coco):
    """``mmdet-cam-eval --report`` on a 2-image val split (64 px shapes, YOLOX-nano at 96)."""
    root = tmp_path_factory.mktemp('report_eval')
    make_tiny_coco(root, num_val=2)
    code = eval_main([str(root / 'tiny.py'), str(root / 'tiny.pth'), '--score-thr', '0',
                      '--topk', '1', '--steps', '2', '--device', 'cpu', '--methods',
                      'hirescam', '--protocol', 'prior', '--out', str(root / 'results.json'),
                      '--report', str(root / 'report')])
    assert code == 0
    return root, json.loads((root / 'report' / 'manifest.json').read_text())


def test_eval_report_manifest_and_curves(eval_run):
    root, manifest = eval_run
    validate(manifest)
    results = json.loads((root / 'results.json').read_text())
    assert manifest['tool'] == 'mmdet-cam-eval'
    assert manifest['methods'] == ['hirescam', 'random', 'box'] == list(results['methods'])
    assert manifest['seed'] == 0 and manifest['settings']['protocols'] == ['prior']
    assert manifest['summary'] == results['methods']  # the same summarize() numbers
    plot = cv2.imread(str(root / 'report' / manifest['files']['curves prior']))
    assert plot is not None and plot.shape[1] > 400
    aucs = {m: [d['metrics'][m]['deletion_auc']['prior'] for r in manifest['images']
                for d in r['detections']] for m in manifest['methods']}
    for method, values in aucs.items():
        assert len(values) == 2
        assert np.mean(values) == pytest.approx(
            results['methods'][method]['deletion_auc']['prior'], rel=1e-6)


def test_eval_page_in_chromium(eval_run, browser, tmp_path):
    root, manifest = eval_run
    with open_page(root / 'report' / 'report.html', browser=browser) as session:
        _check_page(session, manifest, tmp_path / 'eval_report.png', manifest['methods'])
        curves = session.page.locator('#evaluation .curves img')
        assert curves.count() == 1
        assert curves.nth(0).evaluate('e => e.naturalWidth') > 0
        assert session.page.locator('#summary tbody tr').count() == 3
