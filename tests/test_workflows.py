"""mmdet's own ``tools/train.py`` and ``tools/test.py`` (shipped inside the installed mmdet
package) as clients of DetCAMHook, run as subprocesses on a tiny YOLOX-nano (96 px) and a
generated shapes dataset, read back from the TensorBoard event files with TensorBoard's reader.

- an uninterrupted 4-epoch run, validation every epoch, hook ``interval=3``: panels at 3 and 4;
- the same config stopped after epoch 2 (its checkpoint and validation done) by a test-only hook
  module on ``PYTHONPATH``, then ``--resume`` to epoch 4: the same steps, none twice;
- ``tools/test.py CFG CKPT`` on the uninterrupted run's checkpoint: ``cam_test_*`` panels and
  scalars at step 0, with the misses (`explain_misses=True`) counted.

Two processes run at a time (one thread each): first the uninterrupted and the interrupted run,
then the resumed run and ``tools/test.py``.
"""
import os
import re
import subprocess
import sys
from pathlib import Path

import mmdet
import pytest

from mmdet_cam_hook.demo.shapes import generate_shapes
from mmdet_cam_hook.testing import TINY_SIZE as SIZE
from mmdet_cam_hook.testing import cam_hook, tiny_cfg

TOOLS = Path(mmdet.__file__).parent / '.mim' / 'tools'
TIMEOUT = 300
STOP_ENV = 'CAM_TEST_STOP_AFTER_EPOCH'

# A test-only hook: stops training after the validation of the epoch named in the environment
# (that epoch's checkpoint is already written), as a job that was interrupted there.
STOP_HOOK_MODULE = f'''
import os

from mmdet.registry import HOOKS
from mmengine.hooks import Hook


@HOOKS.register_module()
class StopAfterEpochHook(Hook):
    priority = 'LOWEST'

    def after_val_epoch(self, runner, metrics=None):
        if runner.epoch == int(os.environ.get({STOP_ENV!r}, '0')):
            runner.train_loop.stop_training = True
'''


def _start(cmd, log: Path, stop_after=None) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS='1', MKL_NUM_THREADS='1',
               PYTHONPATH=os.pathsep.join([str(log.parent / 'modules'),
                                           os.environ.get('PYTHONPATH', '')]))
    env.pop(STOP_ENV, None)
    if stop_after is not None:
        env[STOP_ENV] = str(stop_after)
    out = log.open('w')
    proc = subprocess.Popen([sys.executable, *map(str, cmd)], stdout=out,
                            stderr=subprocess.STDOUT, env=env, cwd=log.parent)
    proc.log = log
    out.close()
    return proc


def _finish(proc: subprocess.Popen) -> dict:
    try:
        code = proc.wait(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        code = proc.wait()
    return dict(returncode=code, output=proc.log.read_text())


@pytest.fixture(scope='module')
def workflows(tmp_path_factory):
    root = tmp_path_factory.mktemp('workflows')
    data = generate_shapes(root / 'shapes', num_train=4, num_val=2, image_size=SIZE, seed=0)
    (root / 'modules').mkdir()
    (root / 'modules' / 'cam_test_stop_hook.py').write_text(STOP_HOOK_MODULE)
    cfg = tiny_cfg(data, root / 'unused', max_epochs=4,
                   backends=('LocalVisBackend', 'TensorboardVisBackend'),
                   hooks=[cam_hook(interval=3, methods='gradcam', probe_images=[1],
                                   explain_misses=True),
                          dict(type='StopAfterEpochHook')])
    cfg.default_hooks.checkpoint = dict(type='CheckpointHook', interval=1)
    cfg.custom_imports = dict(imports=['mmdet_cam_hook', 'cam_test_stop_hook'],
                              allow_failed_imports=False)
    config = root / 'yolox_nano_tiny_gradcam.py'
    cfg.dump(str(config))
    dirs = {k: root / k for k in ('full', 'resumed', 'test')}
    train = TOOLS / 'train.py'

    full = _start([train, config, '--work-dir', dirs['full']], root / 'full.log')
    first = _start([train, config, '--work-dir', dirs['resumed']], root / 'first.log',
                   stop_after=2)
    runs = dict(full=_finish(full), first=_finish(first))
    runs['first']['checkpoints'] = sorted(p.name for p in dirs['resumed'].glob('epoch_*.pth'))
    runs['first']['events'] = _events(dirs['resumed'])

    resumed = _start([train, config, '--work-dir', dirs['resumed'], '--resume'],
                     root / 'resumed.log')
    test = _start([TOOLS / 'test.py', config, dirs['full'] / 'epoch_4.pth', '--work-dir',
                   dirs['test']], root / 'test.log')
    runs.update(resumed=_finish(resumed), test=_finish(test))
    for key, folder in (('full', 'full'), ('resumed', 'resumed'), ('test', 'test')):
        runs[key]['events'] = _events(dirs[folder])
    return runs


def _events(work_dir: Path) -> dict:
    """``{'images'|'scalars': {tag: [step, ...]}}`` over all event files under ``work_dir``,
    read with TensorBoard's own EventAccumulator."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = dict(images={}, scalars={})
    for path in sorted(work_dir.rglob('events.out.tfevents.*')):
        acc = EventAccumulator(str(path), size_guidance={'images': 0, 'scalars': 0})
        acc.Reload()
        for tag in acc.Tags()['images']:
            out['images'].setdefault(tag, []).extend(e.step for e in acc.Images(tag))
        for tag in acc.Tags()['scalars']:
            out['scalars'].setdefault(tag, []).extend(e.step for e in acc.Scalars(tag))
    return out


def _cam_steps(events: dict, prefix: str) -> dict:
    """The steps of each image and scalar tag starting with ``prefix``; of the images, the
    probes' overview cards (``.../all``: one per probe and method)."""
    return {
        kind: {t: sorted(s) for t, s in events[kind].items() if t.startswith(prefix)
               and (kind == 'scalars' or t.endswith('/all'))}
        for kind in ('images', 'scalars')
    }


def _validated_epochs(run: dict) -> list:
    """The epochs MMEngine's LoggerHook reports a validation for (``Epoch(val) [N][...]``)."""
    return sorted({int(n) for n in re.findall(r'Epoch\(val\) \[(\d+)\]', run['output'])})


def _ok(run: dict) -> None:
    assert run['returncode'] == 0, run['output'][-6000:]


def test_uninterrupted_training_draws_every_third_and_the_last_validation(workflows):
    full = workflows['full']
    _ok(full)
    steps = _cam_steps(full['events'], 'cam_val')
    (image_tag, ) = steps['images']  # one probe, one method
    assert image_tag.startswith('cam_val_gradcam_')
    assert steps['images'][image_tag] == [3, 4]
    assert steps['scalars']['cam_val/gradcam_energy_in_box'] == [3, 4]
    assert steps['scalars']['cam_val/misses'] == [3, 4]
    assert _validated_epochs(full) == [1, 2, 3, 4]


def test_resumed_training_draws_at_the_same_steps(workflows):
    first, resumed, full = workflows['first'], workflows['resumed'], workflows['full']
    _ok(first)
    # interrupted after epoch 2: two validations, nothing drawn yet (interval 3)
    assert first['checkpoints'] == ['epoch_1.pth', 'epoch_2.pth']
    assert _validated_epochs(first) == [1, 2]
    assert _cam_steps(first['events'], 'cam_val') == dict(images={}, scalars={})
    _ok(resumed)
    assert 'resumed epoch: 2, iter: 4' in resumed['output']  # 4 images, batches of 2
    assert _validated_epochs(resumed) == [3, 4]
    # the events of both processes: panels as without interruption, none twice
    assert _cam_steps(resumed['events'], 'cam_val') == _cam_steps(full['events'], 'cam_val')
    assert list(_cam_steps(resumed['events'], 'cam_val')['images'].values()) == [[3, 4]]


def test_tools_test_logs_cam_test_panels_and_scalars(workflows):
    test = workflows['test']
    _ok(test)
    steps = _cam_steps(test['events'], 'cam_test')
    (image_tag, ) = steps['images']
    assert image_tag.startswith('cam_test_gradcam_') and steps['images'][image_tag] == [0]
    assert steps['scalars']['cam_test/gradcam_energy_in_box'] == [0]
    # misses (issue 21) through mmdet's own tools/test.py: counted at the test's step
    assert steps['scalars']['cam_test/misses'] == [0]
    assert steps['scalars']['cam_test/false_positives'] == [0]
    assert 'DetCAMHook: explained 1/1 probe image(s)' in test['output']
