"""Build a detector from its config and load its weights safely (mmdet's ``apis`` job).

:func:`init_model` is ``mmdet.apis.init_detector`` with the weights read through
:func:`~mmdet_cam_hook.runtime.checkpoint.load_checkpoint` and checked by :func:`load_weights`;
:func:`load_config` reads a config with one clear error for every way a file can be unreadable.
"""
from __future__ import annotations

import copy
import logging
import os
import re
import warnings
from typing import Optional

import torch
from mmengine.config import Config
from torch import nn

from .checkpoint import CheckpointError, PathLike, load_checkpoint

__all__ = ['CheckpointError', 'init_model', 'load_config', 'load_weights']

logger = logging.getLogger(__name__)

#: What ``Config.fromfile`` raises on a file it cannot read (besides a missing file).
CONFIG_ERRORS = (SyntaxError, NameError, KeyError, AttributeError, TypeError, ValueError,
                 ImportError, OSError)


def load_config(config: PathLike) -> Config:
    """Read a config file or package path (``mmdet::yolox/yolox_s_8xb8-300e_coco.py``).

    Args:
        config (str | PathLike): The config.

    Returns:
        mmengine.Config: The config.

    Raises:
        FileNotFoundError: If the file (or a file it inherits from) does not exist.
        ValueError: If it cannot be read (a syntax error, a bad import, ...), naming the error.
    """
    name = os.fspath(config)
    if '::' not in name and not os.path.isfile(name):  # 'mmdet::yolox/...' is a package path
        raise FileNotFoundError(f'config {name!r} does not exist')
    try:
        return Config.fromfile(name)
    except FileNotFoundError as exc:
        raise FileNotFoundError(f'config {name!r}: {exc}') from exc
    except CONFIG_ERRORS as exc:
        raise ValueError(f'config {name!r} could not be read: {type(exc).__name__}: '
                         f'{exc}') from exc


def _state_dict(checkpoint: dict) -> dict:
    state = checkpoint.get('state_dict', checkpoint)
    if not isinstance(state, dict):
        raise CheckpointError(f"the checkpoint's `state_dict` is a {type(state).__name__}, "
                              'expected a dict of tensors')
    return {re.sub(r'^module\.', '', k): v for k, v in state.items()
            if isinstance(v, torch.Tensor)}


def load_weights(model: nn.Module, checkpoint: dict, filename: str = 'checkpoint') -> None:
    """Copy a checkpoint's weights into ``model``.

    Takes ``checkpoint['state_dict']`` (or the dict itself if it is a bare state dict) and strips
    DDP's ``module.`` prefix. Every model parameter and buffer must be present with the same
    shape: a partial load would explain a half-random network. Extra keys (e.g. MMDetection 2.x
    EMA buffers) are logged and ignored.

    Args:
        model (nn.Module): The detector built from the config.
        checkpoint (dict): As returned by :func:`load_checkpoint`.
        filename (str): Name to quote in errors. Defaults to 'checkpoint'.

    Raises:
        CheckpointError: If keys are missing or shapes differ (with examples of each).
    """
    state = _state_dict(checkpoint)
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    mismatched = [f'{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(v.shape)}'
                  for k, v in own.items() if k in state and state[k].shape != v.shape]
    unexpected = [k for k in state if k not in own]
    if missing or mismatched:
        parts = []
        if mismatched:
            parts.append(f'{len(mismatched)} shape mismatch(es), e.g. {mismatched[:3]}')
        if missing:
            parts.append(f'{len(missing)} missing key(s), e.g. {missing[:3]}')
        raise CheckpointError(
            f'{filename!r} does not fit the model built from the config: {"; ".join(parts)}. '
            'Use the config the checkpoint was trained with (e.g. the same model size and '
            'num_classes)')
    if unexpected:
        logger.info('ignoring %d checkpoint key(s) the model does not have, e.g. %s',
                    len(unexpected), unexpected[:3])
    model.load_state_dict({k: state[k] for k in own}, strict=True)


def _dataset_meta(checkpoint: Optional[dict], cfg, num_classes: Optional[int]) -> dict:
    meta = (checkpoint or {}).get('meta') or {}
    if isinstance(meta.get('dataset_meta'), dict):
        return {k.lower(): v for k, v in meta['dataset_meta'].items()}
    if 'CLASSES' in meta:  # MMDetection 2.x checkpoints
        return {'classes': meta['CLASSES']}
    for key in ('test_dataloader', 'val_dataloader'):
        metainfo = ((cfg.get(key) or {}).get('dataset') or {}).get('metainfo')
        if metainfo and metainfo.get('classes'):
            return dict(metainfo)
    from mmdet.evaluation import get_classes

    coco = tuple(get_classes('coco'))
    if num_classes in (None, len(coco)):
        return {'classes': coco}
    return {'classes': tuple(str(i) for i in range(num_classes))}


def init_model(config, checkpoint: Optional[PathLike] = None, device: str = 'cpu',
               trusted: bool = False) -> nn.Module:
    """Build a detector from its config and load a checkpoint safely.

    Like ``mmdet.apis.init_detector`` (which builds the model), but the weights come from
    :func:`load_checkpoint` and :func:`load_weights`. ``model.dataset_meta`` is the checkpoint's
    (``meta.dataset_meta``, or MMDetection 2.x ``meta.CLASSES``), else the config's dataset
    ``metainfo``, else COCO's class names when the head has 80 classes, else ``'0', '1', ...``.

    Args:
        config (str | PathLike | mmengine.Config): The model config: a file, a package path
            such as ``mmdet::yolox/yolox_s_8xb8-300e_coco.py``, or a loaded config.
        checkpoint (str | PathLike, optional): Local file or http(s) URL. Defaults to None
            (random weights).
        device (str): Device to put the model on. Defaults to 'cpu'.
        trusted (bool): See :func:`load_checkpoint`. Defaults to False.

    Returns:
        nn.Module: The detector in eval mode, with ``.cfg`` and ``.dataset_meta``.

    Raises:
        FileNotFoundError: If the config or checkpoint file does not exist.
        ValueError: If the config file cannot be parsed.
        CheckpointError: See :func:`load_checkpoint` and :func:`load_weights`.
    """
    from mmdet.apis import init_detector

    if not isinstance(config, Config):
        config = load_config(config)
    ckpt = None
    if checkpoint is not None:
        ckpt = load_checkpoint(checkpoint, map_location='cpu', trusted=trusted)
    with warnings.catch_warnings(record=True) as caught:
        # init_detector warns that it falls back to COCO names without a checkpoint (the names
        # are set below) and that the config has no palette (not used here); it also sets a
        # global 'once' filter, which this block undoes.
        model = init_detector(copy.deepcopy(config), None, device='cpu')
    for w in caught:
        if not re.match('checkpoint is None|palette does not exist', str(w.message)):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    if ckpt is not None:
        load_weights(model, ckpt, os.fspath(checkpoint))
    num_classes = getattr(getattr(model, 'bbox_head', None), 'num_classes', None)
    model.dataset_meta = _dataset_meta(ckpt, config, num_classes)
    classes = model.dataset_meta.get('classes')
    if num_classes is not None and classes is not None and len(classes) != num_classes:
        logger.warning('the model has %d classes but its class names list %d; labels may be '
                       'misnamed', num_classes, len(classes))
    return model.to(device).eval()
