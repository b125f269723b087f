"""Building a detector from its config with safely loaded weights: every parameter must fit,
class names come from the checkpoint or the config, and a bad config is one clear error."""
import numpy as np
import pytest
import torch
from torch import nn

from mmdet_cam_hook.runtime.checkpoint import CheckpointError
from mmdet_cam_hook.runtime.model import init_model, load_config, load_weights


class _Toy(nn.Module):

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(2, 1)
        self.norm = nn.BatchNorm1d(1)


def test_load_weights_checks_keys_and_shapes(caplog):
    model = _Toy()
    state = {f'module.{k}': torch.full_like(v, 7.0) if v.is_floating_point() else v
             for k, v in _Toy().state_dict().items()}
    state['ema_extra'] = torch.ones(1)
    with caplog.at_level('INFO', logger='mmdet_cam_hook'):
        load_weights(model, {'state_dict': state, 'meta': {}})
    assert (model.linear.weight == 7).all() and (model.norm.running_var == 7).all()
    assert 'ema_extra' in caplog.text

    wrong = {k: v for k, v in _Toy().state_dict().items() if k != 'norm.bias'}
    wrong['linear.weight'] = torch.zeros(3, 2)
    with pytest.raises(CheckpointError) as info:
        load_weights(_Toy(), wrong, 'x.pth')
    message = str(info.value)
    assert 'linear.weight: checkpoint (3, 2) vs model (1, 2)' in message
    assert "missing key(s), e.g. ['norm.bias']" in message and 'x.pth' in message


def test_init_model_from_config_and_checkpoint(tmp_path, make_yolox):
    source = make_yolox(num_classes=3)
    path = tmp_path / 'yolox.pth'
    torch.save({'meta': {'dataset_meta': {'CLASSES': ('a', 'b', 'c')}, 'seed': np.int64(3)},
                'state_dict': source.state_dict()}, path)
    model = init_model(source.cfg, path, device='cpu')
    assert not model.training
    assert model.dataset_meta == {'classes': ('a', 'b', 'c')}
    for key, value in source.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key

    # MMDetection 2.x meta, then none at all (the head has 3 classes, not COCO's 80).
    torch.save({'meta': {'CLASSES': ('x', 'y', 'z')}, 'state_dict': source.state_dict()}, path)
    assert init_model(source.cfg, path).dataset_meta == {'classes': ('x', 'y', 'z')}
    torch.save(source.state_dict(), path)
    assert init_model(source.cfg, path).dataset_meta == {'classes': ('0', '1', '2')}

    # A checkpoint of another model is refused, naming a mismatching key.
    other = make_yolox(num_classes=5)
    torch.save({'state_dict': other.state_dict()}, path)
    with pytest.raises(CheckpointError, match='multi_level_conv_cls.*checkpoint \\(5'):
        init_model(source.cfg, path)
    with pytest.raises(FileNotFoundError, match='missing.py'):
        init_model(str(tmp_path / 'missing.py'), path)


def test_load_config_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match='missing.py'):
        load_config(tmp_path / 'missing.py')
    broken = tmp_path / 'broken.py'
    broken.write_text('model = dict(type=\n')
    with pytest.raises(ValueError, match='broken.py.*could not be read: SyntaxError'):
        load_config(broken)
    child = tmp_path / 'child.py'
    child.write_text("_base_ = ['./no_such_base.py']\n")
    with pytest.raises((FileNotFoundError, ValueError), match='child.py'):
        load_config(child)
    good = tmp_path / 'good.py'
    good.write_text("default_scope = 'mmdet'\nmodel = dict(type='YOLOX')\n")
    assert load_config(str(good)).model.type == 'YOLOX'
