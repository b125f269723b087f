"""The report's parts on their own: the manifest's schema check, the curve plots, the page of a
hand-made manifest in headless Chromium, and the hook's faithfulness curves delivered as a plot
image (LocalVisBackend's PNG read back and TensorBoard's events) equal to the plot of the
probe's own curves."""
import json

import cv2
import numpy as np
import pytest
import torch
from mmengine.runner import Runner

from mmdet_cam_hook.demo.shapes import generate_shapes
from mmdet_cam_hook.testing import TINY_SIZE, cam_hook, run_log_dir, tiny_cfg, unwrap_model
from mmdet_cam_hook.testing.browser import open_page, require_browser
from mmdet_cam_hook.visualization.manifest import (
    SCHEMA_VERSION,
    json_safe,
    read_manifest,
    stack_versions,
    validate,
)
from mmdet_cam_hook.visualization.plots import plot_curves
from mmdet_cam_hook.visualization.report import page_html, thumbnail, write_report


def _manifest(num_images=3, methods=('gradcam', 'hirescam')):
    images = []
    for i in range(num_images):
        dets = [dict(index=k, box=[1.0, 2.0, 30.0, 40.0], label=k % 2,
                     score=0.9 - 0.1 * k - i / 100, level=k, layers=[f'neck.out_convs.{k}'],
                     files={m: f'm{i}_{k}_{m}.png' for m in methods},
                     metrics={m: {'energy_in_box': 0.5 + k / 10, 'blank': False,
                                  'deletion_auc': {'prior': 0.1 * k}} for m in methods})
                for k in range(i % 3)]
        for d in dets:
            d['class'] = ['circle', 'square'][d['label']]
        images.append(dict(path=f'imgs/i{i}.jpg', status='explained' if dets else 'no_detections',
                           width=64, height=48, files={'thumbnail': f't{i}.png'},
                           detections=dets))
    return dict(schema_version=SCHEMA_VERSION, tool='mmdet-cam', versions=stack_versions(),
                config='c.py', checkpoint='c.pth', checkpoint_sha256=None, methods=list(methods),
                layers=None, thresholds=dict(score_thr=0.3, topk=None), seed=None, settings={},
                class_names=['circle', 'square'], images=images, files={})


@pytest.mark.parametrize('path, value, needle', [
    (('schema_version', ), 2, 'manifest.schema_version must be one of [1], got 2'),
    (('images', 1, 'detections', 0, 'score'), 'high',
     'manifest.images[1].detections[0].score must be number'),
    (('images', 2, 'detections', 1, 'box'), [1, 2, 3], 'must have 4 to 4 items, got 3'),
    (('images', 0, 'status'), 'done', "must be one of ['explained', 'no_detections'"),
    (('thresholds', 'topk'), 2.5, 'manifest.thresholds.topk must be integer or null'),
])
def test_schema_names_the_bad_field(path, value, needle):
    manifest = _manifest()
    validate(manifest)
    target = manifest
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    with pytest.raises(ValueError, match=None) as info:
        validate(manifest)
    assert needle in str(info.value)
    del manifest['images']
    with pytest.raises(ValueError, match="lacks the required field 'images'"):
        validate(manifest)


def test_json_safe_and_read_back(tmp_path):
    manifest = _manifest()
    manifest['images'][1]['detections'][0]['metrics']['gradcam']['energy_in_box'] = np.float32(
        float('nan'))
    manifest['images'][1]['detections'][0]['score'] = np.float64(0.25)
    write_report(tmp_path, manifest)
    back = read_manifest(tmp_path / 'manifest.json')
    det = back['images'][1]['detections'][0]
    assert det['metrics']['gradcam']['energy_in_box'] is None and det['score'] == 0.25
    assert json.loads(json.dumps(json_safe(manifest))) == back
    (tmp_path / 'manifest.json').write_text('{"schema_version": 1}')
    with pytest.raises(ValueError, match="lacks the required field 'tool'"):
        read_manifest(tmp_path / 'manifest.json')


def test_page_escapes_the_data():
    manifest = _manifest()
    manifest['images'][0]['path'] = 'a</script><script>alert(1)</script>.jpg'
    page = page_html(manifest)
    assert page.count('</script>') == 2  # the data's own closing tag is escaped
    assert 'a<\\/script>' in page


def test_thumbnail_sizes():
    image = np.zeros((90, 300, 3), np.uint8)
    assert thumbnail(image, 150).shape == (45, 150, 3)
    assert thumbnail(image, 400) is image
    assert thumbnail(image, 600, enlarge=True).shape == (180, 600, 3)


def test_plot_curves_draws_each_method():
    x = np.linspace(0, 1, 5)
    rows = np.stack([1 - x, 0.5 * (1 - x)])
    one = plot_curves(x, {'gradcam': {'deletion': rows, 'insertion': rows[::-1]}})
    two = plot_curves(x, {'gradcam': {'deletion': rows, 'insertion': rows[::-1]},
                          'random': {'deletion': rows * 0.5, 'insertion': rows}})
    assert one.dtype == np.uint8 and one.shape == (360, 900, 3) == two.shape
    assert (one != two).any()
    empty = plot_curves(x, {'gradcam': {'deletion': np.zeros((0, 5)),
                                        'insertion': np.zeros((0, 5))}})
    assert empty.shape == one.shape
    with pytest.raises(ValueError):
        plot_curves(x, {'gradcam': {'deletion': np.zeros((2, 3)), 'insertion': rows}})


def test_hand_made_page_sorts_and_shows_maps(tmp_path):
    """The page of a hand-made manifest: thumbnails for images without files too, the
    missing values sorted last in both directions, a detection's maps side by side."""
    require_browser()
    manifest = _manifest(num_images=4)
    for i in range(4):
        cv2.imwrite(str(tmp_path / f't{i}.png'), np.full((48, 64, 3), 40 * i, np.uint8))
        for k in range(3):
            for m in manifest['methods']:
                cv2.imwrite(str(tmp_path / f'm{i}_{k}_{m}.png'), np.full((48, 64, 3), 200,
                                                                        np.uint8))
    manifest['images'][2]['detections'][0]['metrics']['gradcam']['energy_in_box'] = None
    write_report(tmp_path, manifest)
    with open_page(tmp_path / 'report.html') as session:
        page = session.page
        assert page.locator('#gallery .thumb').count() == 4
        assert page.locator('#gallery .thumb.empty').count() == 2  # i0, i3: no detections
        page.locator('#gallery .thumb').nth(2).click()
        page.locator('#detections li').nth(1).click()
        assert page.locator('#maps figure').evaluate_all(
            'fs => fs.map(f => f.dataset.method)') == ['gradcam', 'hirescam']
        header = page.locator('#table thead th').all_inner_texts()
        col = header.index('energy_in_box') + 1
        for _ in range(2):  # ascending, then descending: the missing value stays last
            page.click('#table th[data-key="energy_in_box"]')
            values = page.locator(f'#table tbody td:nth-child({col})').all_inner_texts()
            assert values[-1] == '-' and values.count('-') == 1, values
        assert session.console_errors == [] and session.network_requests == []


# ---------------------------------------------------------------------------------------------
def test_hook_logs_the_curves_as_a_plot(tmp_path):
    """``faithfulness=True``: each validation's curves reach every backend as one plot image,
    ``cam_val_faithfulness_curves``, equal to the plot of the probe's own curves."""
    from mmdet_cam_hook import CAMEngine
    from mmdet_cam_hook.evaluation.evaluate import image_seed, probe_faithfulness
    from mmdet_cam_hook.runtime.pipeline import test_pipeline_cfg

    torch.set_num_threads(1)
    shapes = generate_shapes(tmp_path / 'shapes', num_train=2, num_val=1, image_size=TINY_SIZE,
                             seed=0)
    hook = cam_hook(probe_images=[0], methods='hirescam', topk=2, faithfulness=True)
    runner = Runner.from_cfg(tiny_cfg(shapes, tmp_path / 'run', hooks=[hook],
                                      backends=('LocalVisBackend', 'TensorboardVisBackend')))
    engine = CAMEngine(unwrap_model(runner.model), score_thr=0.0, topk=2,
                       test_pipeline=test_pipeline_cfg(runner.cfg))
    image = runner.val_dataloader.dataset.get_data_info(0)['img_path']
    results = engine.explain(image, methods=['hirescam'])
    curves = {}
    probe_faithfulness(engine, image, results, seed=image_seed(0, 0), curves=curves)
    (prior, ) = curves['hirescam'].values()
    expected = plot_curves(prior.fractions, {'hirescam': {'deletion': prior.deletion,
                                                          'insertion': prior.insertion}},
                           title='val, step 0')
    runner.val()
    vis = run_log_dir(runner) / 'vis_data'
    logged = cv2.imread(str(vis / 'vis_image' / 'cam_val_faithfulness_curves_0.png'))
    assert logged is not None
    np.testing.assert_array_equal(logged, expected)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(vis), size_guidance={'images': 0})
    events.Reload()
    assert [e.step for e in events.Images('cam_val_faithfulness_curves')] == [0]
