"""DetCAMHook with the real MLflow and Weights & Biases backends of MMEngine.

One tiny YOLOX-nano training (2 epochs, a validation after each) logs to LocalVisBackend,
MLflowVisBackend (a ``file:`` store in a temporary folder, no server) and WandbVisBackend
(``WANDB_MODE=offline``: no account, no network). Each tracker is read back with its own
library's reader (``MlflowClient``; ``wandb leet inspect --json`` on the offline run's ``.wandb``
log) and compared with LocalVisBackend's PNGs and ``scalars.json``.
"""
import json
import subprocess
import sys
from pathlib import Path

import cv2
import mlflow  # noqa: F401 - pinned with wandb; tools/setup_env.sh installs both
import numpy as np
import pytest
import torch
import wandb
from mmengine.runner import Runner

from mmdet_cam_hook.demo.shapes import generate_shapes
from mmdet_cam_hook.hooks.cam_hook import DetCAMHook
from mmdet_cam_hook.testing import TINY_SIZE as SIZE
from mmdet_cam_hook.testing import cam_hook, hooks_of, run_log_dir, tiny_cfg
from mmdet_cam_hook.visualization.cards import CARD_WIDTH

METHODS = ['gradcam', 'hirescam']
STEPS = [1, 2]


@pytest.fixture(scope='module')
def tracked(tmp_path_factory):
    root = tmp_path_factory.mktemp('trackers')
    data = generate_shapes(root / 'shapes', num_train=4, num_val=2, image_size=SIZE, seed=0)
    uri = (root / 'mlruns').as_uri()  # file:///...
    mp = pytest.MonkeyPatch()
    mp.setenv('WANDB_MODE', 'offline')
    mp.setenv('WANDB_SILENT', 'true')
    mp.setenv('WANDB_DIR', str(root))
    mp.chdir(root)  # MMEngine's WandbVisBackend uploads the code under the working directory
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny model on a busy 2-core machine: see conftest.one_thread
    try:
        cfg = tiny_cfg(data, root / 'work', hooks=[cam_hook(methods=METHODS)])
        cfg.visualizer.vis_backends = [
            dict(type='LocalVisBackend'),
            dict(type='MLflowVisBackend', tracking_uri=uri, exp_name='cam'),
            dict(type='WandbVisBackend', init_kwargs=dict(project='cam', mode='offline',
                                                          dir=str(root))),
        ]
        runner = Runner.from_cfg(cfg)
        runner.train()
    finally:
        torch.set_num_threads(threads)
        mp.undo()
        wandb.teardown()  # ends the wandb-core service this process started
    probes = hooks_of(runner, DetCAMHook)[0]._probes['val']
    vis_data = run_log_dir(runner) / 'vis_data'
    rows = [json.loads(line) for line in (vis_data / 'scalars.json').read_text().splitlines()]
    local_scalars = [r for r in rows if any(k.startswith('cam_val/') for k in r)]
    return dict(root=root, uri=uri, runner=runner, probes=probes,
                names=[f'cam_val_{m}_{p.name}' for m in METHODS for p in probes],
                local_png=lambda name, step: cv2.imread(
                    str(vis_data / 'vis_image' / f'{name}_{step}.png')),
                local_scalars=local_scalars, log=(run_log_dir(runner) /
                                                  f'{runner.timestamp}.log').read_text())


def test_all_backends_received_everything(tracked):
    assert tracked['runner'].epoch == 2
    assert [r['step'] for r in tracked['local_scalars']] == STEPS
    line = 'LocalVisBackend 5/5, MLflowVisBackend 5/5, WandbVisBackend 5/5'
    assert tracked['log'].count(line) == len(STEPS)  # 4 panels + 1 scalar set, per validation


def test_mlflow_run_has_one_image_artifact_per_probe_method_and_step(tracked, tmp_path):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracked['uri'])
    experiment = client.get_experiment_by_name('cam')
    (run, ) = client.search_runs([experiment.experiment_id])
    run_id = run.info.run_id
    artifacts = {a.path for a in client.list_artifacts(run_id)}
    # issue 24: the cards, one folder per probe and method (the full panel stays local); MLflow
    # needs an extension and ignores the step: it is part of the name
    assert {a for a in artifacts if a.startswith('cam_')} == set(tracked['names'])
    for name in tracked['names']:
        cards = {a.path for a in client.list_artifacts(run_id, name)}
        for step in STEPS:
            # the overview and the top 3 detections (topk=3), each slot once per step
            assert len({c for c in cards if c.endswith(f'_{step}.png')}) == 4
            path = client.download_artifacts(run_id, f'{name}/all_{step}.png', str(tmp_path))
            assert cv2.imread(path).shape[1] == CARD_WIDTH
    for method in METHODS:
        key = f'cam_val/{method}_energy_in_box'
        history = client.get_metric_history(run_id, key)
        assert [(m.step, m.value) for m in history] == [
            (r['step'], pytest.approx(r[key])) for r in tracked['local_scalars']]


def _wandb_records(run_dir: Path) -> list:
    """The records of an offline run's ``.wandb`` log, through wandb's own reader."""
    out = subprocess.run([sys.executable, '-m', 'wandb', 'leet', 'inspect', '--json',
                          str(run_dir)], capture_output=True, text=True, timeout=120, check=True)
    return [json.loads(line) for line in out.stdout.splitlines() if line.startswith('{')]


def test_wandb_offline_run_has_the_images_and_the_scalar_history(tracked, tmp_path):
    (run_dir, ) = (tracked['root'] / 'wandb').glob('offline-run-*')
    history = [r['history']['item'] for r in _wandb_records(run_dir) if r['type'] == 'history']
    assert history
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracked['uri'])
    (run, ) = client.search_runs([client.get_experiment_by_name('cam').experiment_id])
    for name in tracked['names']:
        # W&B ignores MMEngine's step: one history row per validation, in order; its overview
        # card has the pixels of MLflow's copy of that step (issue 24: cards, not the panel)
        key = f'{name}/all'
        images = [row for row in history if row.get(f'{key}._type') == 'image-file']
        assert len(images) == len(STEPS)
        for row, step in zip(images, STEPS):
            png = cv2.imread(str(run_dir / 'files' / row[f'{key}.path']))
            path = client.download_artifacts(run.info.run_id, f'{key}_{step}.png',
                                             str(tmp_path / str(step)))
            assert np.array_equal(png, cv2.imread(path))
    for method in METHODS:
        key = f'cam_val/{method}_energy_in_box'
        values = [row[key] for row in history if key in row]
        assert values == [pytest.approx(r[key]) for r in tracked['local_scalars']]
