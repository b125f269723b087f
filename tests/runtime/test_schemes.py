"""Every checkpoint scheme MMEngine's CheckpointLoader knows goes through the safe loader once
the package is imported: model-zoo names (``torchvision://``, ``open-mmlab://``, ``mmcls://``,
which mmdet's R50 configs use for their backbones) included. Cache hits only: no network."""
import os

import pytest
import torch

import mmdet_cam_hook  # noqa: F401 - registers the loaders
from mmdet_cam_hook.runtime.checkpoint import (
    CheckpointError,
    UnsafeCheckpointError,
    load_checkpoint,
    register_mmengine_loaders,
)


class _System:
    """Unpickling this runs ``os.system(command)`` (pickled as ``posix.system``)."""

    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command, ))


def _hub_file(torch_home, name):
    folder = torch_home / 'hub' / 'checkpoints'
    folder.mkdir(parents=True, exist_ok=True)
    return folder / name


@pytest.fixture
def torch_home(tmp_path, monkeypatch):
    home = tmp_path / 'torch'
    monkeypatch.setenv('TORCH_HOME', str(home))
    monkeypatch.delenv('MMDET_CAM_TRUST_CHECKPOINT', raising=False)
    return home


def test_every_mmengine_scheme_is_ours():
    from mmengine.runner.checkpoint import CheckpointLoader

    register_mmengine_loaders()  # idempotent
    schemes = dict(CheckpointLoader._schemes)
    assert {'', 'http://', 'https://', 'torchvision://', 'modelzoo://', 'open-mmlab://',
            'openmmlab://', 'mmcls://', 'pavi://'} <= set(schemes)
    foreign = {p: f'{f.__module__}.{f.__name__}' for p, f in schemes.items()
               if f.__module__ != 'mmdet_cam_hook.runtime.checkpoint'}
    assert not foreign


def test_poisoned_torchvision_cache_is_refused(torch_home, tmp_path):
    """MMEngine's own ``torchvision://`` loader unpickles the cached file with
    ``weights_only=False`` (``torch.hub.load_state_dict_from_url``); ours refuses it."""
    from mmengine.runner.checkpoint import _load_checkpoint

    marker = tmp_path / 'pwned'
    torch.save({'conv1.weight': torch.ones(1), 'x': _System(f'touch {marker}')},
               _hub_file(torch_home, 'resnet18-f37072fd.pth'))
    with pytest.raises(UnsafeCheckpointError, match='posix.system') as info:
        _load_checkpoint('torchvision://resnet18', map_location='cpu')
    assert 'resnet18-f37072fd.pth' in str(info.value)
    with pytest.raises(UnsafeCheckpointError, match='posix.system'):
        load_checkpoint('torchvision://resnet18')
    assert not marker.exists(), 'the code in the cached checkpoint ran'


def test_pretrained_backbone_from_a_clean_cache(torch_home):
    """An mmdet ResNet with ``init_cfg=dict(type='Pretrained', checkpoint='torchvision://...')``
    (as mmdet's R50 configs have) loads the cached file through the safe loader."""
    from mmdet.registry import MODELS
    from mmengine.registry import DefaultScope

    weight = torch.full((64, 3, 7, 7), 0.5)
    torch.save({'conv1.weight': weight, 'fc.weight': torch.ones(2)},
               _hub_file(torch_home, 'resnet18-f37072fd.pth'))
    with DefaultScope.overwrite_default_scope('mmdet'):
        backbone = MODELS.build(dict(
            type='ResNet', depth=18, num_stages=4, out_indices=(3, ), frozen_stages=-1,
            init_cfg=dict(type='Pretrained', checkpoint='torchvision://resnet18')))
    backbone.init_weights()
    assert torch.equal(backbone.conv1.weight, weight)


def test_poisoned_backbone_init_is_refused(torch_home, tmp_path):
    from mmdet.registry import MODELS
    from mmengine.registry import DefaultScope

    marker = tmp_path / 'pwned'
    torch.save({'conv1.weight': torch.ones(1), 'x': _System(f'touch {marker}')},
               _hub_file(torch_home, 'resnet50-0676ba61.pth'))
    with DefaultScope.overwrite_default_scope('mmdet'):
        backbone = MODELS.build(dict(
            type='ResNet', depth=50, num_stages=4, out_indices=(3, ),
            init_cfg=dict(type='Pretrained', checkpoint='torchvision://resnet50')))
    with pytest.raises(UnsafeCheckpointError, match='posix.system'):
        backbone.init_weights()
    assert not marker.exists()


@pytest.mark.parametrize('name, cached', [
    ('open-mmlab://resnet50_v1c', 'resnet50_v1c-2cccc1ad.pth'),
    ('openmmlab://resnet50_v1c', 'resnet50_v1c-2cccc1ad.pth'),
    ('modelzoo://resnet18', 'resnet18-f37072fd.pth'),
    ('mmcls://vgg11', 'vgg11_batch256_imagenet_20210208-4271cd6c.pth'),
])
def test_other_zoo_schemes_read_the_cache_safely(torch_home, tmp_path, name, cached):
    from mmengine.runner.checkpoint import _load_checkpoint

    path = _hub_file(torch_home, cached)
    torch.save({'state_dict': {'backbone.w': torch.full((2, ), 3.0)}}, path)
    ckpt = _load_checkpoint(name, map_location='cpu')
    # mmcls:// keeps the backbone's weights, without the prefix (MMEngine's own rule)
    key = 'w' if name.startswith('mmcls') else 'backbone.w'
    assert torch.equal(ckpt['state_dict'][key], torch.full((2, ), 3.0))
    marker = tmp_path / 'pwned'
    torch.save({'x': _System(f'touch {marker}')}, path)
    with pytest.raises(UnsafeCheckpointError, match='posix.system'):
        _load_checkpoint(name, map_location='cpu')
    assert not marker.exists()


def test_trusted_environment_opts_in_for_zoo_files(torch_home, monkeypatch):
    import datetime

    from mmengine.runner.checkpoint import _load_checkpoint

    torch.save({'day': datetime.date(2024, 1, 2)}, _hub_file(torch_home, 'resnet18-f37072fd.pth'))
    with pytest.raises(UnsafeCheckpointError, match='datetime.date'):
        _load_checkpoint('torchvision://resnet18')
    monkeypatch.setenv('MMDET_CAM_TRUST_CHECKPOINT', '1')
    assert _load_checkpoint('torchvision://resnet18')['day'] == datetime.date(2024, 1, 2)


def test_unknown_zoo_name_and_unsupported_scheme(torch_home):
    from mmengine.runner.checkpoint import _load_checkpoint

    with pytest.raises(CheckpointError, match="no model 'resnet19'.*resnet18"):
        load_checkpoint('torchvision://resnet19')
    with pytest.raises(CheckpointError, match="does not read 'pavi://'.*MMDET_CAM_TRUST"):
        _load_checkpoint('pavi://models/yolox.pth')
