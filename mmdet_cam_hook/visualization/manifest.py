"""``manifest.json``: what a run of ``mmdet-cam --report`` or ``mmdet-cam-eval --report`` did,
for scripts and CI, beside the ``report.html`` people open.

The fields (README, "The report") are those of :data:`MANIFEST_SCHEMA`, a JSON-Schema subset
(``type``, ``properties``, ``required``, ``items``, ``additionalProperties``, ``enum``) that
:func:`validate` checks without a dependency. Every number is a finite JSON number or
``null`` (JSON has no NaN); every path in ``files`` is relative to the manifest's folder.
"""
from __future__ import annotations

import hashlib
import json
import math
import platform
from importlib import metadata
from pathlib import Path
from typing import Any, Mapping, Optional

import numpy as np

from ..runtime.io import write_atomically
from ..version import __version__

__all__ = ['SCHEMA_VERSION', 'MANIFEST_SCHEMA', 'STATUSES', 'validate', 'stack_versions',
           'file_sha256', 'json_safe', 'write_json', 'read_manifest']

#: Bumped when a field changes meaning or goes away (a new optional field keeps it).
SCHEMA_VERSION = 1
#: What became of an input image.
STATUSES = ('explained', 'no_detections', 'unreadable', 'failed')

_NUM = {'type': ['number', 'null']}
_STR_MAP = {'type': 'object', 'additionalProperties': {'type': 'string'}}
_METRICS = {'type': 'object', 'additionalProperties': {
    'type': 'object', 'additionalProperties': {
        'type': ['number', 'null', 'boolean', 'object'],
        'additionalProperties': _NUM}}}
_DETECTION = {
    'type': 'object',
    'required': ['index', 'box', 'label', 'class', 'score', 'level', 'layers', 'metrics',
                 'files'],
    'properties': {
        'index': {'type': 'integer'},
        'box': {'type': 'array', 'items': {'type': 'number'}, 'minItems': 4, 'maxItems': 4},
        'label': {'type': 'integer'},
        'class': {'type': ['string', 'null']},
        'score': {'type': 'number'},
        'level': {'type': 'integer'},
        'layers': {'type': 'array', 'items': {'type': 'string'}},
        'metrics': _METRICS,
        'files': _STR_MAP,
    },
}
_IMAGE = {
    'type': 'object',
    'required': ['path', 'status', 'width', 'height', 'files', 'detections'],
    'properties': {
        'path': {'type': 'string'},
        'status': {'type': 'string', 'enum': list(STATUSES)},
        'width': {'type': ['integer', 'null']},
        'height': {'type': ['integer', 'null']},
        'files': _STR_MAP,
        'detections': {'type': 'array', 'items': _DETECTION},
    },
}
#: The manifest's schema (a JSON-Schema subset: see :func:`validate`).
MANIFEST_SCHEMA = {
    'type': 'object',
    'required': ['schema_version', 'tool', 'versions', 'config', 'checkpoint',
                 'checkpoint_sha256', 'methods', 'layers', 'thresholds', 'seed', 'settings',
                 'class_names', 'images', 'files'],
    'properties': {
        'schema_version': {'type': 'integer', 'enum': [SCHEMA_VERSION]},
        'tool': {'type': 'string', 'enum': ['mmdet-cam', 'mmdet-cam-eval']},
        'versions': _STR_MAP,
        'config': {'type': 'string'},
        'checkpoint': {'type': 'string'},
        'checkpoint_sha256': {'type': ['string', 'null']},
        'methods': {'type': 'array', 'items': {'type': 'string'}},
        'layers': {'type': ['array', 'null'], 'items': {'type': 'string'}},
        'thresholds': {'type': 'object', 'required': ['score_thr', 'topk'],
                       'properties': {'score_thr': {'type': 'number'},
                                      'topk': {'type': ['integer', 'null']}}},
        'seed': {'type': ['integer', 'null']},
        'settings': {'type': 'object'},
        'class_names': {'type': ['array', 'null'], 'items': {'type': 'string'}},
        'images': {'type': 'array', 'items': _IMAGE},
        'files': _STR_MAP,
        'summary': {'type': ['object', 'null']},
    },
}
_TYPES = {'object': dict, 'array': list, 'string': str, 'boolean': bool, 'null': type(None)}


def _is(value: Any, name: str) -> bool:
    if name == 'integer':
        return isinstance(value, int) and not isinstance(value, bool)
    if name == 'number':
        return (isinstance(value, (int, float)) and not isinstance(value, bool)
                and math.isfinite(value))
    return isinstance(value, _TYPES[name])


def validate(value: Any, schema: Optional[Mapping] = None, where: str = 'manifest') -> None:
    """Check ``value`` against ``schema`` (a JSON-Schema subset).

    Args:
        value: The decoded JSON.
        schema (Mapping, optional): Defaults to None (:data:`MANIFEST_SCHEMA`).
        where (str): The name of ``value`` in messages. Defaults to 'manifest'.

    Raises:
        ValueError: On the first field that does not fit, naming its path (e.g.
            ``manifest.images[3].detections[0].score``), the value and what was expected.
    """
    schema = MANIFEST_SCHEMA if schema is None else schema
    types = schema.get('type')
    if types is not None:
        types = [types] if isinstance(types, str) else types
        if not any(_is(value, t) for t in types):
            raise ValueError(f'{where} must be {" or ".join(types)}, got {value!r:.80}')
    if 'enum' in schema and value not in schema['enum']:
        raise ValueError(f'{where} must be one of {schema["enum"]}, got {value!r}')
    if isinstance(value, dict):
        for key in schema.get('required', ()):
            if key not in value:
                raise ValueError(f'{where} lacks the required field {key!r}')
        props, extra = schema.get('properties', {}), schema.get('additionalProperties')
        for key, item in value.items():
            sub = props.get(key, extra if isinstance(extra, Mapping) else None)
            if sub is not None:
                validate(item, sub, f'{where}.{key}')
    elif isinstance(value, list):
        low, high = schema.get('minItems', 0), schema.get('maxItems', math.inf)
        if not low <= len(value) <= high:
            raise ValueError(f'{where} must have {low} to {high} items, got {len(value)}')
        if 'items' in schema:
            for i, item in enumerate(value):
                validate(item, schema['items'], f'{where}[{i}]')


def stack_versions() -> dict:
    """The versions of this package, Python and the stack (``None``-free: a missing one is
    ``'not installed'``)."""
    out = {'mmdet-cam-hook': __version__, 'python': platform.python_version()}
    for dist in ('torch', 'mmcv', 'mmdet', 'mmengine', 'numpy', 'opencv-python'):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = 'not installed'
    return out


def file_sha256(path) -> Optional[str]:
    """The SHA-256 hex digest of a local file, ``None`` for a URL or a missing file."""
    path = Path(str(path))
    if '://' in str(path) or not path.is_file():
        return None
    digest = hashlib.sha256()
    with path.open('rb') as f:
        for block in iter(lambda: f.read(1 << 20), b''):
            digest.update(block)
    return digest.hexdigest()


def json_safe(value: Any) -> Any:
    """``value`` with numpy scalars and arrays as Python numbers and lists, tuples as lists,
    paths as strings and NaN/inf as ``None``."""
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, np.ndarray):
        return json_safe(value.tolist())
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, Path):
        return str(value)
    return value


def write_json(path, obj: Any) -> Path:
    """Write ``obj`` (through :func:`json_safe`) as indented JSON, atomically.

    Raises:
        OSError: If the file cannot be written.
    """
    text = json.dumps(json_safe(obj), indent=1, allow_nan=False) + '\n'
    return write_atomically(path, lambda tmp: Path(tmp).write_text(text, encoding='utf-8'))


def read_manifest(path) -> dict:
    """Read and :func:`validate` a ``manifest.json``.

    Raises:
        ValueError: If it is not valid JSON or does not fit :data:`MANIFEST_SCHEMA`.
    """
    try:
        manifest = json.loads(Path(path).read_text(encoding='utf-8'))
    except json.JSONDecodeError as exc:
        raise ValueError(f'{path} is not JSON: {exc}') from exc
    validate(manifest)
    return manifest
