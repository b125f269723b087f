"""Safe checkpoint loading: real MMEngine training checkpoints load with weights_only, anything
else is refused with the offending global named, and weights must fit the model."""
import collections
import datetime
import os
import pickle

import numpy as np
import pytest
import torch
from torch import nn

from mmdet_cam_hook.runtime.checkpoint import (
    CheckpointError,
    UnsafeCheckpointError,
    load_checkpoint,
)
from mmdet_cam_hook.runtime.model import load_weights
from mmdet_cam_hook.runtime.unpickler import safe_globals


# ---------------------------------------------------------------------------------------------
# A real MMEngine Runner checkpoint: EMA, LR schedulers, SGD momentum, numpy metrics, best-ckpt
# bookkeeping, dataset_meta.
class _Toy(nn.Module):

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(2, 1)
        self.norm = nn.BatchNorm1d(1)


def _runner_checkpoint(work_dir) -> str:
    from mmengine.evaluator import BaseMetric
    from mmengine.model import BaseModel
    from mmengine.runner import Runner

    class Model(BaseModel):

        def __init__(self):
            super().__init__()
            self.toy = _Toy()

        def forward(self, x, y, mode='tensor'):
            out = self.toy.norm(self.toy.linear(torch.stack(x)))
            if mode == 'loss':
                return {'loss': ((out - torch.stack(y))**2).mean()}
            return list(out)

    class Data(torch.utils.data.Dataset):
        metainfo = dict(classes=('circle', 'square'), palette=[(1, 2, 3), (4, 5, 6)])

        def __len__(self):
            return 8

        def __getitem__(self, i):
            return dict(x=torch.full((2, ), float(i)), y=torch.ones(1))

    class Metric(BaseMetric):

        def process(self, data_batch, data_samples):
            self.results.append(np.float32(0.25))

        def compute_metrics(self, results):
            return dict(mAP=np.float64(np.mean(results)), count=np.int64(len(results)))

    loader = dict(dataset=Data(), batch_size=4, num_workers=0,
                  sampler=dict(type='DefaultSampler', shuffle=True))
    runner = Runner(
        model=Model(), work_dir=str(work_dir), train_dataloader=loader,
        optim_wrapper=dict(optimizer=dict(type='SGD', lr=0.01, momentum=0.9)),
        param_scheduler=[dict(type='LinearLR', start_factor=0.1, by_epoch=False, begin=0, end=2),
                         dict(type='MultiStepLR', milestones=[1])],
        train_cfg=dict(by_epoch=True, max_epochs=1, val_interval=1),
        val_dataloader=loader, val_cfg=dict(), val_evaluator=dict(type=Metric),
        custom_hooks=[dict(type='EMAHook', momentum=0.0001, update_buffers=True, priority=49)],
        default_hooks=dict(checkpoint=dict(type='CheckpointHook', interval=1, save_best='mAP',
                                           rule='greater')),
        randomness=dict(seed=0), cfg=dict(model=dict(type='Toy')),
        visualizer=dict(type='Visualizer', vis_backends=[]))
    runner.train()
    return os.path.join(work_dir, 'epoch_1.pth')


@pytest.fixture(scope='module')
def runner_ckpt(tmp_path_factory):
    path = _runner_checkpoint(tmp_path_factory.mktemp('runner'))
    from mmengine.logging import MessageHub, MMLogger
    from mmengine.registry import DefaultScope
    from mmengine.visualization import Visualizer

    for cls in (Visualizer, DefaultScope, MessageHub, MMLogger):
        cls._instance_dict.clear()
    return path


def test_runner_checkpoint_needs_the_allow_list(runner_ckpt):
    from mmengine.logging import HistoryBuffer

    # What a stock weights_only load rejects, and that our list covers all of it.
    unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(runner_ckpt)
    assert 'mmengine.logging.history_buffer.HistoryBuffer' in unsafe
    with pytest.raises(pickle.UnpicklingError):
        torch.load(runner_ckpt, weights_only=True)
    with torch.serialization.safe_globals(safe_globals()):
        assert torch.serialization.get_unsafe_globals_in_checkpoint(runner_ckpt) == []

    ckpt = load_checkpoint(runner_ckpt)
    assert {'meta', 'state_dict', 'message_hub', 'optimizer', 'param_schedulers',
            'ema_state_dict'} <= set(ckpt)
    assert ckpt['meta']['dataset_meta']['classes'] == ('circle', 'square')
    scalars = ckpt['message_hub']['log_scalars']
    assert isinstance(scalars['val/mAP'], HistoryBuffer)
    assert scalars['val/mAP'].mean() == pytest.approx(0.25)
    assert scalars['val/mAP'].statistics('current') == pytest.approx(0.25)
    assert ckpt['state_dict']['toy.linear.weight'].shape == (1, 2)
    # The allow-list is scoped to the call.
    with pytest.raises(pickle.UnpicklingError):
        torch.load(runner_ckpt, weights_only=True)


def test_runner_checkpoint_loads_into_model(runner_ckpt):
    model = _Toy()
    load_weights(model, {'state_dict': {k.replace('toy.', 'module.'): v for k, v in
                                        load_checkpoint(runner_ckpt)['state_dict'].items()}})
    ref = load_checkpoint(runner_ckpt)['state_dict']
    assert torch.equal(model.linear.weight, ref['toy.linear.weight'])


# ---------------------------------------------------------------------------------------------
# Refusals
class _MakeDirs:
    """Unpickling this runs ``os.makedirs(path)``: code from the file."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.makedirs, (self.path, ))


class _GetAttr:

    def __init__(self, obj, name):
        self.obj, self.name = obj, name

    def __reduce__(self):
        return (getattr, (self.obj, self.name))


def test_code_in_checkpoint_is_refused_and_not_run(tmp_path):
    marker = tmp_path / 'pwned'
    path = tmp_path / 'evil.pth'
    torch.save({'state_dict': {}, 'x': _MakeDirs(str(marker))}, path)
    with pytest.raises(UnsafeCheckpointError) as info:
        load_checkpoint(path)
    assert not marker.exists()
    message = str(info.value)
    assert 'os.makedirs' in message and 'trusted=True' in message
    assert '--trust-checkpoint' in message and str(path) in message
    assert info.value.unsafe_globals == ['os.makedirs']


def test_unknown_class_refused_unless_trusted(tmp_path):
    path = tmp_path / 'date.pth'
    torch.save({'state_dict': {'w': torch.ones(1)}, 'meta': {'day': datetime.date(2024, 1, 2)}},
               path)
    with pytest.raises(UnsafeCheckpointError, match='datetime.date'):
        load_checkpoint(path)
    assert load_checkpoint(path, trusted=True)['meta']['day'] == datetime.date(2024, 1, 2)


class _System:
    """Unpickling this runs ``os.system(command)`` (pickled as ``posix.system``)."""

    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command, ))


@pytest.mark.parametrize('zipped', [True, False])
@pytest.mark.parametrize('protocol', range(pickle.HIGHEST_PROTOCOL + 1))
def test_refusal_names_the_global_for_every_pickle_protocol(tmp_path, protocol, zipped):
    """Old-format and new-format files, pickle protocols 0-5: the message names the blocked
    global and the opt-ins, never torch's 'weights_only=False will likely succeed'."""
    marker = tmp_path / 'pwned'
    path = tmp_path / 'evil.pth'
    torch.save({'state_dict': {'w': torch.ones(1)}, 'x': _System(f'touch {marker}')}, path,
               pickle_protocol=protocol, _use_new_zipfile_serialization=zipped)
    with pytest.raises(UnsafeCheckpointError) as info:
        load_checkpoint(path)
    assert not marker.exists()
    message = str(info.value)
    assert info.value.unsafe_globals == ['posix.system'], message
    assert '--trust-checkpoint' in message and 'MMDET_CAM_TRUST_CHECKPOINT=1' in message
    assert 'will likely succeed' not in message


def test_legacy_format_refusal_names_the_global(tmp_path):
    path = tmp_path / 'legacy.pth'
    torch.save({'d': datetime.date(2024, 1, 2)}, path, _use_new_zipfile_serialization=False)
    with pytest.raises(UnsafeCheckpointError, match='datetime.date'):
        load_checkpoint(path)
    good = tmp_path / 'legacy_ok.pth'
    torch.save({'w': torch.ones(2)}, good, _use_new_zipfile_serialization=False)
    assert torch.equal(load_checkpoint(good)['w'], torch.ones(2))


@pytest.mark.parametrize('name', ['_set_default_statistics', '__init__'])
def test_getattr_only_for_history_buffer_methods(tmp_path, name):
    from mmengine.logging import HistoryBuffer

    path = tmp_path / 'getattr.pth'
    torch.save({'f': _GetAttr(HistoryBuffer, name)}, path)
    with pytest.raises(UnsafeCheckpointError, match=f'getattr.*{name}'):
        load_checkpoint(path)
    torch.save({'f': _GetAttr(np.ndarray, 'tofile')}, path)
    with pytest.raises(UnsafeCheckpointError, match='tofile'):
        load_checkpoint(path)
    torch.save({'f': _GetAttr(HistoryBuffer, 'mean')}, path)
    assert load_checkpoint(path)['f'] is HistoryBuffer.mean


def test_numpy_values_load(tmp_path):
    path = tmp_path / 'np.pth'
    value = {'a': np.arange(6, dtype=np.int16).reshape(2, 3), 'b': np.float32(1.5),
             'c': np.array(['x', 'yz']), 'd': collections.OrderedDict(e=np.bool_(True))}
    torch.save(value, path)
    loaded = load_checkpoint(path)
    np.testing.assert_array_equal(loaded['a'], value['a'])
    assert loaded['b'] == np.float32(1.5) and loaded['b'].dtype == np.float32
    np.testing.assert_array_equal(loaded['c'], value['c'])
    assert loaded['d']['e']


@pytest.mark.parametrize('content, match', [
    (b'', 'empty or truncated'),
    (b'not a checkpoint', 'not a readable torch checkpoint: invalid load key'),
])
def test_not_a_checkpoint(tmp_path, content, match):
    path = tmp_path / 'bad.pth'
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=match):
        load_checkpoint(path)


def test_not_a_dict(tmp_path):
    path = tmp_path / 'tensor.pth'
    torch.save(torch.ones(2), path)
    with pytest.raises(CheckpointError, match='holds a Tensor'):
        load_checkpoint(path)


def test_missing_file_and_unsupported_scheme(tmp_path):
    with pytest.raises(FileNotFoundError, match='nope.pth'):
        load_checkpoint(tmp_path / 'nope.pth')
    with pytest.raises(IsADirectoryError, match='is a directory'):
        load_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match='only local paths and http'):
        load_checkpoint('s3://bucket/yolox.pth')


def test_unreachable_url_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv('TORCH_HOME', str(tmp_path))
    # Port 9 on the loopback: refused at once, no network needed.
    with pytest.raises(CheckpointError, match='could not download.*local path'):
        load_checkpoint('http://127.0.0.1:9/ckpts/yolox_tiny.pth')
    left = [p for p in (tmp_path / 'hub' / 'checkpoints').rglob('*') if p.is_file()]
    assert not left, 'no partial file left'


@pytest.fixture
def http_server(tmp_path):
    """A loopback HTTP server for ``tmp_path/www`` that counts its requests."""
    import functools
    import http.server
    import threading

    root = tmp_path / 'www'
    root.mkdir()
    requests = []

    class Handler(http.server.SimpleHTTPRequestHandler):

        def do_GET(self):  # noqa: N802 - the stdlib's name
            requests.append(self.path)
            super().do_GET()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(
        ('127.0.0.1', 0), functools.partial(Handler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f'http://127.0.0.1:{server.server_address[1]}', root, requests
    finally:
        server.shutdown()
        server.server_close()


def test_url_cache_is_keyed_on_the_whole_url(tmp_path, monkeypatch, http_server):
    """``.../a/model.pth`` and ``.../b/model.pth`` are different files; each is fetched once."""
    monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'torch'))
    url, root, requests = http_server
    for folder, value in (('a', 1.0), ('b', 2.0)):
        (root / folder).mkdir()
        torch.save({'state_dict': {'w': torch.full((1, ), value)}}, root / folder / 'model.pth')
    for _ in range(2):
        a = load_checkpoint(f'{url}/a/model.pth')['state_dict']['w']
        b = load_checkpoint(f'{url}/b/model.pth')['state_dict']['w']
        assert a.item() == 1.0 and b.item() == 2.0
    assert sorted(requests) == ['/a/model.pth', '/b/model.pth']


# ---------------------------------------------------------------------------------------------
# MMEngine's own loaders go through the same allow-list once the package is imported
def test_mmengine_loads_its_own_checkpoints(runner_ckpt, tmp_path, monkeypatch):
    from mmengine.runner.checkpoint import CheckpointLoader, _load_checkpoint

    import mmdet_cam_hook  # noqa: F401 - registers the loaders

    assert CheckpointLoader._get_checkpoint_loader(runner_ckpt).__module__ == \
        'mmdet_cam_hook.runtime.checkpoint'
    ckpt = _load_checkpoint(runner_ckpt, map_location='cpu')
    assert {'message_hub', 'optimizer', 'state_dict'} <= set(ckpt)
    marker = tmp_path / 'pwned'
    evil = tmp_path / 'evil.pth'
    torch.save({'state_dict': {}, 'x': _System(f'touch {marker}')}, evil)
    with pytest.raises(UnsafeCheckpointError, match='posix.system'):
        _load_checkpoint(str(evil), map_location='cpu')
    assert not marker.exists()
    # the explicit opt-in for programs that are not ours
    date = tmp_path / 'date.pth'
    torch.save({'meta': {'day': datetime.date(2024, 1, 2)}}, date)
    monkeypatch.setenv('MMDET_CAM_TRUST_CHECKPOINT', '1')
    assert _load_checkpoint(str(date))['meta']['day'] == datetime.date(2024, 1, 2)


def test_init_detector_with_a_checkpoint(tmp_path, make_yolox):
    """``mmdet.apis.init_detector(cfg, ckpt)`` with an MMEngine checkpoint holding a message
    hub (HistoryBuffer) and numpy values, as a user's script calls it."""
    from mmdet.apis import init_detector
    from mmengine.logging import HistoryBuffer

    import mmdet_cam_hook  # noqa: F401

    model = make_yolox('nano', input_size=64)
    path = tmp_path / 'epoch_1.pth'
    buffer = HistoryBuffer()
    buffer.update(np.float64(0.5))
    torch.save({'meta': {'dataset_meta': {'classes': ('a', 'b', 'c')}, 'epoch': 1},
                'state_dict': model.state_dict(),
                'message_hub': {'log_scalars': {'loss': buffer}}}, path)
    loaded = init_detector(model.cfg, str(path), device='cpu')
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    assert loaded.dataset_meta['classes'] == ('a', 'b', 'c')


# ---------------------------------------------------------------------------------------------
# mmdet's own scripts, as subprocesses: a checkpoint carrying code is refused, the code never runs
def _tools(name: str) -> str:
    import mmdet

    return os.path.join(os.path.dirname(mmdet.__file__), '.mim', 'tools', name)


def _tiny_config(tmp_path) -> str:
    """mmdet's YOLOX-nano config on 3 generated 64 px images, importing this package as our
    configs do (``custom_imports``)."""
    from mmengine.config import Config

    from mmdet_cam_hook.demo.shapes import generate_shapes
    from mmdet_cam_hook.testing import mmdet_config

    data = generate_shapes(tmp_path / 'shapes', num_train=2, num_val=1, image_size=64, seed=0)
    cfg = Config.fromfile(mmdet_config('yolox/yolox_nano_8xb8-300e_coco.py'))
    cfg.custom_imports = dict(imports=['mmdet_cam_hook'], allow_failed_imports=False)
    cfg.model.bbox_head.num_classes = len(data.classes)
    cfg.model.data_preprocessor.batch_augments = None
    pipeline = [dict(type='LoadImageFromFile'),
                dict(type='Resize', scale=(64, 64), keep_ratio=True),
                dict(type='Pad', pad_to_square=True, pad_val=dict(img=(114.0, 114.0, 114.0))),
                dict(type='LoadAnnotations', with_bbox=True), dict(type='PackDetInputs')]

    def dataset(split):
        return dict(type='CocoDataset', data_root=str(data.root),
                    ann_file=str(data.ann_file(split)),
                    data_prefix=dict(img=str(data.img_dir(split)) + os.sep),
                    metainfo=dict(classes=data.classes), filter_cfg=dict(filter_empty_gt=False),
                    pipeline=pipeline)

    loader = dict(batch_size=1, num_workers=0, persistent_workers=False,
                  sampler=dict(type='DefaultSampler', shuffle=False))
    cfg.train_dataloader = dict(loader, dataset=dataset('train'))
    cfg.val_dataloader = cfg.test_dataloader = dict(loader, dataset=dataset('val'))
    cfg.val_evaluator = cfg.test_evaluator = dict(type='CocoMetric', metric='bbox',
                                                  ann_file=str(data.ann_file('val')))
    cfg.train_cfg = dict(type='EpochBasedTrainLoop', max_epochs=1, val_interval=1)
    cfg.param_scheduler = None
    cfg.custom_hooks = []
    path = tmp_path / 'tiny_yolox.py'
    cfg.dump(str(path))
    return str(path)


@pytest.mark.parametrize('script', ['test.py', 'train.py --resume'])
def test_mmdet_tools_refuse_code_in_a_checkpoint(tmp_path, script):
    import subprocess
    import sys

    config = _tiny_config(tmp_path)
    marker = tmp_path / 'pwned'
    evil = tmp_path / 'evil.pth'
    torch.save({'state_dict': {}, 'meta': {}, 'x': _System(f'touch {marker}')}, evil)
    name, *flags = script.split()
    cmd = [sys.executable, _tools(name), config, *(
        [str(evil)] if name == 'test.py' else [*flags, str(evil)]),
           '--work-dir', str(tmp_path / 'work')]
    env = dict(os.environ, OMP_NUM_THREADS='1')
    env.pop('MMDET_CAM_TRUST_CHECKPOINT', None)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode != 0
    assert not marker.exists(), 'the code in the checkpoint ran'
    assert 'UnsafeCheckpointError' in proc.stderr and 'posix.system' in proc.stderr
    assert 'MMDET_CAM_TRUST_CHECKPOINT=1' in proc.stderr
