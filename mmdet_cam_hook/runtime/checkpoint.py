"""Safe loading of MMEngine / MMDetection checkpoints, for our CLI and for MMEngine itself.

A safe load only rebuilds tensors, containers and an allow-list of classes, so a checkpoint
cannot run code while it is read. MMEngine training checkpoints hold a few more objects than
tensors (the message hub's :class:`~mmengine.logging.HistoryBuffer`, numpy arrays and scalars of
logged metrics); :func:`~mmdet_cam_hook.runtime.unpickler.safe_globals` allows exactly those, and
:mod:`~mmdet_cam_hook.runtime.unpickler` enforces the list without touching torch's process-wide
one. A file that needs anything else is refused with :class:`UnsafeCheckpointError`, which names
the offending globals and the opt-in for a file whose source the user trusts (``trusted=True``,
``--trust-checkpoint`` on our command line, ``MMDET_CAM_TRUST_CHECKPOINT=1`` in the environment
of any other program). Nothing is unpickled unrestricted otherwise.

MMEngine 0.10.7 calls ``torch.load`` without ``weights_only``, which torch >= 2.6 reads as True
with torch's own allow-list only, so MMEngine cannot load the checkpoints it writes; and its
model-zoo schemes (``torchvision://``, ``open-mmlab://``, ``mmcls://``, which mmdet's R50
configs use for their backbones) go through ``torch.hub.load_state_dict_from_url``, which
unpickles anything. Importing this package registers our loaders for every scheme MMEngine's
``CheckpointLoader`` knows (``register_scheme``, MMEngine's public extension point):
``Runner.resume`` / ``--resume``, ``load_from``, ``init_cfg=dict(type='Pretrained', ...)``,
mmdet's ``tools/test.py`` and ``mmdet.apis.init_detector`` then all load through the same
allow-list as ``mmdet-cam``.

A checkpoint is a local path, an ``http(s)://`` URL or a model-zoo name. A URL is downloaded
once into ``torch.hub.get_dir()/checkpoints/mmdet_cam_hook/<hash of the whole URL>/`` (so
``TORCH_HOME`` moves it, and two URLs never share a cached file); a model-zoo name into
``torch.hub.get_dir()/checkpoints/``, where torch and MMEngine cache those files too. A download
goes to a temporary name and is kept only when it has the ``Content-Length`` the server
announced and, when its file name carries one (``..._20211121_095711-4592a793.pth``), the
sha256 prefix; a failed or unreachable one is a :class:`CheckpointError` that says what to do.
"""
from __future__ import annotations

import hashlib
import http.client
import io
import logging
import os
import pickle
import re
import tempfile
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from pathlib import Path
from typing import Callable, Optional, Union

import torch

from . import unpickler
from .unpickler import safe_globals

__all__ = ['CheckpointError', 'UnsafeCheckpointError', 'TRUST_ENV', 'download', 'is_url',
           'load_checkpoint', 'register_mmengine_loaders', 'safe_globals']

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

#: MMEngine's model-zoo schemes, resolved with MMEngine's own tables (``mmengine/hub/*.json``).
ZOO_SCHEMES = ('torchvision://', 'modelzoo://', 'open-mmlab://', 'openmmlab://', 'mmcls://')

#: ``<name>-<first 8+ hex digits of the sha256>.<ext>``, as torch's and OpenMMLab's files are
#: named. An all-digit suffix is taken for a date or a step count, not a hash.
_HASH_IN_NAME = re.compile(r'-([0-9a-f]{8,64})\.[A-Za-z0-9]+$')


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


def is_url(filename: PathLike) -> bool:
    """Whether ``filename`` is an ``http://`` or ``https://`` URL."""
    return isinstance(filename, str) and re.match(r'https?://', filename) is not None


def url_cache_dir(url: str) -> Path:
    """Where :func:`download` keeps ``url``: ``torch.hub.get_dir()/checkpoints/mmdet_cam_hook/``
    and the first 16 hex digits of the sha256 of the whole URL."""
    digest = hashlib.sha256(url.encode('utf-8')).hexdigest()[:16]
    return Path(torch.hub.get_dir()) / 'checkpoints' / 'mmdet_cam_hook' / digest


def hash_prefix(name: str) -> Optional[str]:
    """The sha256 prefix a file name such as ``yolox_s_..._20211121_095711-4592a793.pth``
    carries (``'4592a793'``), or None."""
    found = _HASH_IN_NAME.search(name)
    return found.group(1) if found and not found.group(1).isdigit() else None


def download(url: str, timeout: float = DOWNLOAD_TIMEOUT,
             folder: Optional[PathLike] = None) -> Path:
    """Download ``url`` into ``folder``, or return the file already cached there.

    The file is written under a temporary name and kept only when it is complete: as long as
    the server's ``Content-Length`` and, when the file name carries one (:func:`hash_prefix`),
    with that sha256 prefix. A partial file is never cached.

    Args:
        url (str): An ``http(s)://`` URL.
        timeout (float): Seconds to wait for the server. Defaults to :data:`DOWNLOAD_TIMEOUT`.
        folder (str | PathLike, optional): The cache folder. Defaults to
            :func:`url_cache_dir` of ``url``.

    Returns:
        Path: The local file.

    Raises:
        CheckpointError: If the server cannot be reached, the transfer fails or is cut short,
            or the file does not have the sha256 prefix its name carries.
    """
    name = os.path.basename(urllib.parse.urlparse(url).path) or 'checkpoint.pth'
    folder = Path(folder) if folder is not None else url_cache_dir(url)
    target = folder / name
    if target.is_file():
        logger.info('using cached download %s', target)
        return target
    folder.mkdir(parents=True, exist_ok=True)
    logger.info('downloading %s to %s', url, target)
    retry = ('; try again, or download the file elsewhere and pass its local path (nothing '
             'was cached)')
    tmp = tempfile.NamedTemporaryFile(dir=folder, prefix=f'.{name}.', suffix='.partial',
                                      delete=False)
    try:
        with tmp, urllib.request.urlopen(url, timeout=timeout) as response:
            length = response.headers.get('Content-Length', '')
            size, sha = _copy(response, tmp)
        if length.strip().isdigit() and size != int(length):
            raise CheckpointError(f'download of {url!r} was cut short: {size} of '
                                  f'{int(length)} bytes{retry}')
        prefix = hash_prefix(name)
        if prefix is not None and not sha.startswith(prefix):
            raise CheckpointError(f'download of {url!r} is corrupt: its sha256 starts with '
                                  f'{sha[:len(prefix)]}, its file name says {prefix}{retry}')
        os.replace(tmp.name, target)
    except http.client.IncompleteRead as exc:
        raise CheckpointError(f'download of {url!r} was cut short: {len(exc.partial)} bytes of '
                              f'a chunk, then the connection closed{retry}') from exc
    except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as exc:
        reason = getattr(exc, 'reason', None) or exc
        raise CheckpointError(
            f'could not download checkpoint {url!r}: {reason}. If this machine has no internet '
            'access, download the file elsewhere and pass its local path') from exc
    finally:
        if os.path.exists(tmp.name):
            os.unlink(tmp.name)
    return target


def _copy(response, out) -> tuple[int, str]:
    """Copy an HTTP response body to ``out``: (bytes copied, sha256 hex digest)."""
    sha, size = hashlib.sha256(), 0
    while True:
        chunk = response.read(1 << 20)
        if not chunk:
            return size, sha.hexdigest()
        out.write(chunk)
        sha.update(chunk)
        size += len(chunk)


def _reason(exc: BaseException) -> str:
    """The informative part of a ``torch.load`` error (torch prefixes weights-only failures with
    a long generic paragraph)."""
    text = str(exc)
    if 'WeightsUnpickler error:' in text:
        text = text.split('WeightsUnpickler error:', 1)[1]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__ + ' (empty or truncated file)'


def _trusted_by_environment() -> bool:
    return os.environ.get(TRUST_ENV, '').strip().lower() in ('1', 'true', 'yes')


def _unsafe_globals(path: str, exc: Exception) -> list[str]:
    """The globals ``path`` needs beyond the allow-list, for the refusal message."""
    names: list[str] = []
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                for member in archive.namelist():
                    if member.endswith('.pkl'):
                        names += unpickler.pickle_globals(io.BytesIO(archive.read(member)),
                                                          limit=1)
        else:
            with open(path, 'rb') as stream:
                names = unpickler.pickle_globals(stream)
    except (OSError, zipfile.BadZipFile):
        names = []
    return unpickler.unsafe_names(names, exc)


def _torch_load(path: str, map_location, trusted: bool):
    if trusted:
        logger.warning('loading %s with weights_only=False (trusted): it may run code', path)
        return torch.load(path, map_location=map_location, weights_only=False)
    if os.environ.get('TORCH_FORCE_WEIGHTS_ONLY_LOAD', '0') in ('1', 'y', 'yes', 'true'):
        # torch then refuses any pickle_module: its own weights-only list alone (stricter)
        return torch.load(path, map_location=map_location, weights_only=True)
    # ``weights_only=False`` only lets torch take a pickle_module: ours allows less than torch's
    # weights-only unpickler with safe_globals() added, and leaves torch's global list alone.
    return torch.load(path, map_location=map_location, pickle_module=unpickler,
                      weights_only=False)


def _read(path: str, map_location, trusted: bool) -> dict:
    """``torch.load`` a local file through the allow-list (or not, if ``trusted``)."""
    try:
        checkpoint = _torch_load(path, map_location, trusted)
    except (pickle.UnpicklingError, RuntimeError, EOFError, KeyError, ValueError, TypeError,
            IndexError, AssertionError) as exc:
        # (torch raises an AssertionError on a protocol-0 storage id): a file naming a global
        # outside the allow-list is refused for that, whatever failed first
        if not trusted:
            names = _unsafe_globals(path, exc)
            if names:
                raise UnsafeCheckpointError(path, names) from exc
        raise CheckpointError(f'checkpoint {path!r} is not a readable torch checkpoint: '
                              f'{_reason(exc)}') from exc
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f'checkpoint {path!r} holds a {type(checkpoint).__name__}, '
                              'expected a dict (an MMEngine checkpoint or a state dict)')
    return checkpoint


def _local_path(filename: PathLike) -> str:
    path = os.path.expanduser(os.fspath(filename))
    if os.path.isdir(path):
        raise IsADirectoryError(f'checkpoint {path!r} is a directory, not a checkpoint file')
    if not os.path.isfile(path):
        raise FileNotFoundError(f'checkpoint {path!r} does not exist')
    return path


def load_checkpoint(filename: PathLike,
                    map_location: Union[str, torch.device, Callable, None] = 'cpu',
                    trusted: bool = False) -> dict:
    """Read a checkpoint without running code from it (unless ``trusted``).

    Args:
        filename (str | PathLike): A local file, an ``http(s)://`` URL or a model-zoo name
            (:data:`ZOO_SCHEMES`, e.g. ``torchvision://resnet50``).
        map_location (str | torch.device | callable): Where tensors go, as ``torch.load``
            takes it. Defaults to 'cpu'.
        trusted (bool): Unpickle anything the file names (``weights_only=False``). Only for
            files from a source you trust. Defaults to False.

    Returns:
        dict: The checkpoint (a full MMEngine checkpoint or a bare state dict).

    Raises:
        FileNotFoundError: If a local file does not exist.
        IsADirectoryError: If a local path is a directory.
        UnsafeCheckpointError: If the file needs globals outside :func:`safe_globals`.
        CheckpointError: If a URL cannot be fetched, a model-zoo name is unknown or the file
            is not a torch checkpoint.
    """
    if is_url(filename):
        return _read(str(download(filename)), map_location, trusted)
    if isinstance(filename, str) and filename.startswith(ZOO_SCHEMES):
        return _load_zoo(filename, map_location, trusted, fetch=download)
    if isinstance(filename, str) and re.match(r'[a-z][a-z0-9+.-]*://', filename):
        raise CheckpointError(f'checkpoint {filename!r}: only local paths and http(s):// URLs '
                              f'are supported, and the model-zoo names {", ".join(ZOO_SCHEMES)}')
    return _read(_local_path(filename), map_location, trusted)


def zoo_url(filename: str) -> str:
    """The URL (or the file under MMEngine's home) of a model-zoo name, from MMEngine's own
    tables, as MMEngine's loaders resolve it (deprecated ``open-mmlab://`` names included).

    Raises:
        CheckpointError: If the name is unknown (with close matches).
    """
    import difflib

    from mmengine.runner import checkpoint as mmengine_checkpoint

    scheme, name = filename.split('://', 1)
    if scheme in ('torchvision', 'modelzoo'):
        urls = mmengine_checkpoint.get_torchvision_models()
    elif scheme in ('open-mmlab', 'openmmlab'):
        urls = mmengine_checkpoint.get_external_models()
        deprecated = mmengine_checkpoint.get_deprecated_model_names()
        if name in deprecated:
            logger.warning('%s is deprecated in favour of %s://%s', filename, scheme,
                           deprecated[name])
            name = deprecated[name]
    else:
        urls = mmengine_checkpoint.get_mmcls_models()
    if name not in urls:
        close = difflib.get_close_matches(name, list(urls), n=3)
        raise CheckpointError(f'checkpoint {filename!r}: {scheme}:// has no model {name!r}'
                              + (f'; close matches: {close}' if close else ''))
    url = urls[name]
    if is_url(url):
        return url
    return os.path.join(mmengine_checkpoint._get_mmengine_home(), url)


def _load_zoo(filename: str, map_location, trusted: bool, fetch: Callable) -> dict:
    """A model-zoo checkpoint: downloaded with ``fetch`` into torch hub's ``checkpoints/``
    folder (where torch and MMEngine cache these files), then read safely."""
    url = zoo_url(filename)
    if is_url(url):
        path = str(fetch(url, folder=Path(torch.hub.get_dir()) / 'checkpoints'))
    else:
        path = _local_path(url)
    checkpoint = _read(path, map_location, trusted)
    if filename.startswith('mmcls://'):
        from mmengine.runner.checkpoint import _process_mmcls_checkpoint

        checkpoint = _process_mmcls_checkpoint(checkpoint)
    return checkpoint


# ---------------------------------------------------------------------------------------------
# MMEngine's CheckpointLoader schemes
def _download_rank0_first(url: str, folder: Optional[Path] = None) -> Path:
    """:func:`download` on rank 0, then a barrier, then the cached file on every rank (as
    MMEngine's own ``load_from_http`` does)."""
    from mmengine.dist import barrier, get_dist_info

    rank, world_size = get_dist_info()
    if rank == 0:
        download(url, folder=folder)
    if world_size > 1:
        barrier()
    return download(url, folder=folder)


def load_from_local_safe(filename: str, map_location=None) -> dict:
    """MMEngine's loader for local files (``CheckpointLoader`` scheme ``''``): like MMEngine's
    own ``load_from_local``, through the allow-list (``MMDET_CAM_TRUST_CHECKPOINT=1`` opts
    out)."""
    return _read(_local_path(filename), map_location, _trusted_by_environment())


def load_from_http_safe(filename: str, map_location=None) -> dict:
    """MMEngine's loader for ``http(s)://`` URLs: rank 0 downloads first, then every rank reads
    the cached file through the allow-list."""
    return _read(str(_download_rank0_first(filename)), map_location, _trusted_by_environment())


def load_from_zoo_safe(filename: str, map_location=None) -> dict:
    """MMEngine's loader for its model-zoo schemes (:data:`ZOO_SCHEMES`): resolved with
    MMEngine's tables, cached where MMEngine caches them, read through the allow-list."""
    return _load_zoo(filename, map_location, _trusted_by_environment(),
                     fetch=_download_rank0_first)


def _unsupported_scheme(prefix: str, original: Callable) -> Callable:
    """A loader for a scheme we do not implement (``pavi://``, ``s3://``, ...): MMEngine's own
    loader when the user trusts checkpoints (``MMDET_CAM_TRUST_CHECKPOINT=1``), else an error."""

    def load_unsupported_scheme(filename: str, map_location=None) -> dict:
        if _trusted_by_environment():
            return original(filename, map_location)
        raise CheckpointError(
            f'checkpoint {filename!r}: the safe loader of mmdet_cam_hook does not read '
            f'{prefix!r} checkpoints; copy the file to a local path, or {_TRUST_HINT}')

    load_unsupported_scheme.scheme = prefix
    load_unsupported_scheme.original = original
    return load_unsupported_scheme


def register_mmengine_loaders() -> None:
    """Make MMEngine load every checkpoint through the allow-list.

    MMEngine's ``CheckpointLoader.register_scheme`` is its public extension point for this;
    ``Runner.resume``, ``load_from``, ``init_cfg=dict(type='Pretrained', ...)``, mmdet's
    ``tools/test.py`` and ``init_detector`` all read checkpoints through it. Local files,
    ``http(s)://`` and the model-zoo schemes get our loaders; any other scheme registered by
    then (MMEngine's ``pavi://``, ``s3://``, ``petrel://``) is refused unless
    ``MMDET_CAM_TRUST_CHECKPOINT=1``. Called when the package is imported (every config of ours
    imports it through ``custom_imports``); a config of your own needs
    ``custom_imports = dict(imports=['mmdet_cam_hook'])`` or, in a script,
    ``import mmdet_cam_hook``. Idempotent.
    """
    from mmengine.runner.checkpoint import CheckpointLoader

    ours = {'': load_from_local_safe, 'http://': load_from_http_safe,
            'https://': load_from_http_safe, **{p: load_from_zoo_safe for p in ZOO_SCHEMES}}
    for prefix, loader in list(CheckpointLoader._schemes.items()):
        if prefix not in ours and loader.__module__ != __name__:
            ours[prefix] = _unsupported_scheme(prefix, loader)
    for prefix, loader in ours.items():
        CheckpointLoader.register_scheme(prefixes=prefix, loader=loader, force=True)
