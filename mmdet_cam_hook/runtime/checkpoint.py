"""Safe loading of MMEngine / MMDetection checkpoints, for our CLI and for MMEngine itself.

``torch.load(..., weights_only=True)`` only rebuilds tensors, containers and an allow-list of
classes, so a checkpoint cannot run code while it is read. MMEngine training checkpoints hold a
few more objects than tensors (the message hub's :class:`~mmengine.logging.HistoryBuffer`, numpy
arrays and scalars of logged metrics); :func:`safe_globals` allows exactly those. A file that
needs anything else is refused with :class:`UnsafeCheckpointError`, which names the offending
globals and the opt-in for a file whose source the user trusts (``trusted=True``,
``--trust-checkpoint`` on our command line, ``MMDET_CAM_TRUST_CHECKPOINT=1`` in the environment
of any other program). ``weights_only`` is never turned off otherwise.

MMEngine 0.10.7 calls ``torch.load`` without ``weights_only``, which torch >= 2.6 reads as True
with torch's own allow-list only, so MMEngine cannot load the checkpoints it writes. Importing
this package registers :func:`load_checkpoint` as MMEngine's loader for local files and
``http(s)://`` URLs (``CheckpointLoader.register_scheme``, MMEngine's public extension point):
``Runner.resume`` / ``--resume``, ``load_from``, mmdet's ``tools/test.py`` and
``mmdet.apis.init_detector`` then all load through the same allow-list as ``mmdet-cam``.

A checkpoint is a local path or an ``http(s)://`` URL; a URL is downloaded once into
``torch.hub.get_dir()/checkpoints/mmdet_cam_hook/<hash of the whole URL>/`` (so ``TORCH_HOME``
moves it, and two URLs never share a cached file), and an unreachable one is a
:class:`CheckpointError` that says to download the file elsewhere.
"""
from __future__ import annotations

import copy
import hashlib
import io
import logging
import os
import pickle
import pickletools
import re
import shutil
import tempfile
import urllib.error
import urllib.parse
import urllib.request
import warnings
import zipfile
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch
from torch import nn

logger = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]

#: Seconds to wait for a checkpoint server before giving up.
DOWNLOAD_TIMEOUT = 30

#: Environment variable that lets MMEngine's loaders (``--resume``, ``load_from``,
#: ``tools/test.py``, ``init_detector``) load checkpoints with ``weights_only=False``.
TRUST_ENV = 'MMDET_CAM_TRUST_CHECKPOINT'

_TRUST_HINT = ('pass trusted=True (command line: --trust-checkpoint; mmdet\'s tools/train.py, '
               f'tools/test.py and other MMEngine programs: set {TRUST_ENV}=1) only if you trust '
               "the file's source: loading it then runs whatever code it names")


class CheckpointError(RuntimeError):
    """A checkpoint could not be fetched, read or matched to the model."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint needs globals outside the allow-list to be unpickled.

    Attributes:
        filename (str): The checkpoint.
        unsafe_globals (list[str]): The globals it names that are not allowed.
    """

    def __init__(self, filename: str, unsafe_globals: list[str]) -> None:
        self.filename = filename
        self.unsafe_globals = unsafe_globals
        names = ', '.join(unsafe_globals) if unsafe_globals else 'an unrecognised global'
        super().__init__(
            f'refusing to load checkpoint {filename!r}: it needs {names}, which a safe '
            '(weights_only) load does not allow; an MMEngine checkpoint needs only tensors, '
            f'numpy values and HistoryBuffer. To load it anyway, {_TRUST_HINT}')


def _history_buffer():
    from mmengine.logging import HistoryBuffer

    return HistoryBuffer


def _restricted_getattr(obj: Any, name: str) -> Any:
    """Stands in for ``builtins.getattr`` while unpickling.

    A pickled :class:`~mmengine.logging.HistoryBuffer` holds its statistics methods as
    ``getattr(HistoryBuffer, 'mean')``; that, and nothing else, is allowed.
    """
    history_buffer = _history_buffer()
    if obj is history_buffer and isinstance(name, str) and not name.startswith('_') \
            and callable(getattr(history_buffer, name, None)):
        return getattr(history_buffer, name)
    raise pickle.UnpicklingError(
        f'checkpoint calls getattr({obj!r}, {name!r}); only public HistoryBuffer methods are '
        f'allowed. To load it anyway, {_TRUST_HINT}')


def safe_globals() -> list:
    """The allow-list for ``torch.serialization.safe_globals``.

    Entries are the classes and functions themselves, or ``(object, 'pickled.name')`` pairs for
    names that differ between library versions (numpy 2 pickles ``numpy._core``) and for
    ``builtins.getattr``, which maps to :func:`_restricted_getattr`.

    Returns:
        list: Objects and ``(object, name)`` pairs.
    """
    reconstruct = np.core.multiarray._reconstruct
    scalar = np.core.multiarray.scalar
    entries: list = [
        _history_buffer(),
        np.ndarray,
        np.dtype,
        reconstruct,
        scalar,
        (reconstruct, 'numpy._core.multiarray._reconstruct'),
        (scalar, 'numpy._core.multiarray.scalar'),
        (_restricted_getattr, 'builtins.getattr'),
    ]
    dtypes = getattr(np, 'dtypes', None)
    if dtypes is not None:
        entries += [getattr(dtypes, n) for n in dir(dtypes) if n.endswith('DType')]
    return entries


def is_url(filename: PathLike) -> bool:
    """Whether ``filename`` is an ``http://`` or ``https://`` URL."""
    return isinstance(filename, str) and re.match(r'https?://', filename) is not None


def download(url: str, timeout: float = DOWNLOAD_TIMEOUT) -> Path:
    """Download ``url`` into ``torch.hub.get_dir()/checkpoints/mmdet_cam_hook/<url hash>/``, or
    return the file cached there for this exact URL.

    Args:
        url (str): An ``http(s)://`` URL.
        timeout (float): Seconds to wait for the server. Defaults to :data:`DOWNLOAD_TIMEOUT`.

    Returns:
        Path: The local file.

    Raises:
        CheckpointError: If the server cannot be reached or the transfer fails.
    """
    name = os.path.basename(urllib.parse.urlparse(url).path) or 'checkpoint.pth'
    digest = hashlib.sha256(url.encode('utf-8')).hexdigest()[:16]
    folder = Path(torch.hub.get_dir()) / 'checkpoints' / 'mmdet_cam_hook' / digest
    target = folder / name
    if target.is_file():
        logger.info('using cached download %s', target)
        return target
    folder.mkdir(parents=True, exist_ok=True)
    logger.info('downloading %s to %s', url, target)
    tmp = tempfile.NamedTemporaryFile(dir=folder, prefix=f'.{name}.', delete=False)
    try:
        with tmp, urllib.request.urlopen(url, timeout=timeout) as response:
            shutil.copyfileobj(response, tmp)
        os.replace(tmp.name, target)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, 'reason', None) or exc
        raise CheckpointError(
            f'could not download checkpoint {url!r}: {reason}. If this machine has no internet '
            'access, download the file elsewhere and pass its local path') from exc
    finally:
        if os.path.exists(tmp.name):
            os.unlink(tmp.name)
    return target


def _reason(exc: BaseException) -> str:
    """The informative part of a ``torch.load`` error (torch prefixes weights-only failures with
    a long generic paragraph)."""
    text = str(exc)
    if 'WeightsUnpickler error:' in text:
        text = text.split('WeightsUnpickler error:', 1)[1]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__ + ' (empty or truncated file)'


_STRING_OPS = {'STRING', 'BINSTRING', 'SHORT_BINSTRING', 'UNICODE', 'BINUNICODE',
               'SHORT_BINUNICODE', 'BINUNICODE8'}


def _pickle_globals(stream: io.BufferedIOBase, limit: int = 8) -> list[str]:
    """The ``module.name`` of every global the pickles at the start of ``stream`` import,
    found by reading the opcodes (nothing is unpickled). Covers every protocol: ``GLOBAL`` and
    ``INST`` (protocols 0-3) and ``STACK_GLOBAL`` (4-5, with its two strings possibly memoised).
    A legacy torch file is several pickles in a row; reading stops at data that is no pickle."""
    names: list[str] = []
    for _ in range(limit):
        memo: dict = {}
        pushed: list = []
        try:
            for op, arg, _pos in pickletools.genops(stream):
                if op.name in ('GLOBAL', 'INST'):
                    names.append(arg.replace(' ', '.'))
                    pushed.append(None)
                elif op.name == 'STACK_GLOBAL':
                    if len(pushed) >= 2 and all(isinstance(v, str) for v in pushed[-2:]):
                        names.append(f'{pushed[-2]}.{pushed[-1]}')
                    pushed.append(None)
                elif op.name in _STRING_OPS:
                    pushed.append(arg if isinstance(arg, str) else
                                  arg.decode('latin-1') if isinstance(arg, bytes) else None)
                elif op.name == 'MEMOIZE':
                    memo[len(memo)] = pushed[-1] if pushed else None
                elif op.name in ('PUT', 'BINPUT', 'LONG_BINPUT'):
                    memo[arg] = pushed[-1] if pushed else None
                elif op.name in ('GET', 'BINGET', 'LONG_BINGET'):
                    pushed.append(memo.get(arg))
                elif op.name == 'STOP':
                    break
                else:
                    pushed.append(None)
        except (ValueError, EOFError, pickle.UnpicklingError, UnicodeDecodeError):
            break  # the raw tensor data of a legacy file, or the end of the file
        if not pushed:
            break
    return names


def _allowed_names() -> set:
    """``module.name`` of every global a safe load allows: ours and torch's own."""
    allowed = set()
    for entry in safe_globals():
        if isinstance(entry, tuple):
            allowed.add(entry[1])
        else:
            allowed.add(f'{entry.__module__}.{entry.__qualname__}')
    try:  # torch's default weights_only allow-list (tensors, storages, OrderedDict, ...)
        from torch._weights_only_unpickler import _get_allowed_globals
        allowed.update(_get_allowed_globals())
    except (ImportError, AttributeError):  # only the message would be less precise
        allowed.update(n for n in ('collections.OrderedDict', ))
    return allowed


def _unsafe_globals(path: str, exc: Exception) -> list[str]:
    """The globals ``path`` needs beyond the allow-list, for the refusal message."""
    names: list[str] = []
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                for member in archive.namelist():
                    if member.endswith('.pkl'):
                        names += _pickle_globals(io.BytesIO(archive.read(member)), limit=1)
        else:
            with open(path, 'rb') as stream:
                names = _pickle_globals(stream)
    except (OSError, zipfile.BadZipFile):
        names = []
    allowed = _allowed_names()
    unsafe = [n for n in names if n not in allowed and not n.startswith('torch.')]
    call = re.search(r'checkpoint calls (getattr\(.*?\));', str(exc))
    if call:
        unsafe.append(f'builtins.getattr, as {call.group(1)}')
    if not unsafe:
        unsafe = re.findall(r'GLOBAL (\S+) was not an allowed', str(exc))
    return sorted(set(unsafe))


def _trusted_by_environment() -> bool:
    return os.environ.get(TRUST_ENV, '').strip().lower() in ('1', 'true', 'yes')


def load_checkpoint(filename: PathLike,
                    map_location: Union[str, torch.device] = 'cpu',
                    trusted: bool = False) -> dict:
    """Read a checkpoint without running code from it (unless ``trusted``).

    Args:
        filename (str | PathLike): A local file or an ``http(s)://`` URL.
        map_location (str | torch.device): Where tensors go. Defaults to 'cpu'.
        trusted (bool): Unpickle anything the file names (``weights_only=False``). Only for
            files from a source you trust. Defaults to False.

    Returns:
        dict: The checkpoint (a full MMEngine checkpoint or a bare state dict).

    Raises:
        FileNotFoundError: If a local file does not exist.
        IsADirectoryError: If a local path is a directory.
        UnsafeCheckpointError: If the file needs globals outside :func:`safe_globals`.
        CheckpointError: If a URL cannot be fetched or the file is not a torch checkpoint.
    """
    if is_url(filename):
        path = str(download(filename))
    else:
        if isinstance(filename, str) and re.match(r'[a-z][a-z0-9+.-]*://', filename):
            raise CheckpointError(f'checkpoint {filename!r}: only local paths and http(s):// '
                                  'URLs are supported')
        path = os.path.expanduser(os.fspath(filename))
        if os.path.isdir(path):
            raise IsADirectoryError(f'checkpoint {path!r} is a directory, not a checkpoint file')
        if not os.path.isfile(path):
            raise FileNotFoundError(f'checkpoint {path!r} does not exist')
    try:
        if trusted:
            logger.warning('loading %s with weights_only=False (trusted): it may run code', path)
            checkpoint = torch.load(path, map_location=map_location, weights_only=False)
        else:
            with torch.serialization.safe_globals(safe_globals()):
                checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        if not trusted:
            names = _unsafe_globals(path, exc)
            if names:
                raise UnsafeCheckpointError(path, names) from exc
        raise CheckpointError(f'checkpoint {path!r} is not a readable torch checkpoint: '
                              f'{_reason(exc)}') from exc
    except (RuntimeError, EOFError) as exc:
        raise CheckpointError(f'checkpoint {path!r} is not a readable torch checkpoint: '
                              f'{_reason(exc)}') from exc
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f'checkpoint {path!r} holds a {type(checkpoint).__name__}, '
                              'expected a dict (an MMEngine checkpoint or a state dict)')
    return checkpoint


def load_from_local_safe(filename: str, map_location=None) -> dict:
    """MMEngine's loader for local files (``CheckpointLoader`` scheme ``''``): like MMEngine's
    own ``load_from_local``, through :func:`load_checkpoint` (``weights_only`` with
    :func:`safe_globals`; ``MMDET_CAM_TRUST_CHECKPOINT=1`` opts out)."""
    return load_checkpoint(filename, map_location=map_location,
                           trusted=_trusted_by_environment())


def load_from_http_safe(filename: str, map_location=None) -> dict:
    """MMEngine's loader for ``http(s)://`` URLs: rank 0 downloads first (as MMEngine's own
    ``load_from_http`` does), then every rank reads the cached file through
    :func:`load_checkpoint`."""
    from mmengine.dist import barrier, get_dist_info

    rank, world_size = get_dist_info()
    if rank == 0:
        download(filename)
    if world_size > 1:
        barrier()
    return load_checkpoint(filename, map_location=map_location,
                           trusted=_trusted_by_environment())


def register_mmengine_loaders() -> None:
    """Make MMEngine load local and ``http(s)://`` checkpoints through :func:`load_checkpoint`.

    MMEngine's ``CheckpointLoader.register_scheme`` is its public extension point for this;
    ``Runner.resume``, ``load_from``, ``init_cfg=dict(type='Pretrained', ...)``, mmdet's
    ``tools/test.py`` and ``init_detector`` all read checkpoints through it. Called when the
    package is imported (every config of ours imports it through ``custom_imports``); a config
    of your own needs ``custom_imports = dict(imports=['mmdet_cam_hook'])`` or, in a script,
    ``import mmdet_cam_hook``. Idempotent.
    """
    from mmengine.runner.checkpoint import CheckpointLoader

    CheckpointLoader.register_scheme(prefixes='', loader=load_from_local_safe, force=True)
    CheckpointLoader.register_scheme(prefixes=('http://', 'https://'),
                                     loader=load_from_http_safe, force=True)


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
    from mmengine.config import Config

    if not isinstance(config, Config):
        name = os.fspath(config)
        if '::' not in name and not os.path.isfile(name):  # 'mmdet::yolox/...' is a package path
            raise FileNotFoundError(f'config {name!r} does not exist')
        try:
            config = Config.fromfile(name)
        except FileNotFoundError as exc:
            raise FileNotFoundError(f'config {name!r}: {exc}') from exc
        except (SyntaxError, NameError, KeyError, AttributeError, TypeError, ValueError,
                ImportError) as exc:
            raise ValueError(f'config {name!r} could not be read: {type(exc).__name__}: '
                             f'{exc}') from exc
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
