"""The table of supported detectors, generated from the adapter registry (:data:`ADAPTERS`):
README.md holds it between :data:`TABLE_BEGIN` and :data:`TABLE_END`, and
``python -m mmdet_cam_hook.adapters --write README.md`` regenerates it."""
import functools
from typing import Dict, List, Optional, Tuple

from ..configs import CONFIG_DIR, list_configs
from .base import ADAPTERS
from .support import head_matches

#: The markers around the generated table in README.md (:func:`replace_table`).
TABLE_BEGIN = '<!-- supported-heads:begin -->'
TABLE_END = '<!-- supported-heads:end -->'
_COLUMNS = ('family', 'detectors', 'head classes', 'adapter', 'configs shipped',
            'score of one detection', 'level-aware default layers',
            'gradient route on the default layers')


def supported_detectors() -> List[str]:
    """The detectors the registered adapters explain, from their ``detectors`` (registration
    order, without parenthesised remarks), for ``--help`` texts and messages, e.g.
    ``['DINO', 'Deformable DETR', 'DETR', 'FCOS', ...]``.

    Returns:
        list[str]: Detector names, each once.
    """
    names: Dict[str, None] = {}
    for name, cls in ADAPTERS.module_dict.items():
        for det in (cls.detectors or cls.family or name).split(', '):
            names.setdefault(det.split(' (')[0].strip(), None)
    return list(names)


def _head_cell(cls: type) -> str:
    heads = ', '.join(f'`{t}`' for t in cls.head_types)
    if cls.head_path != 'bbox_head':
        heads = f'`{cls.head_path}`: {heads}'
    if cls.excluded_types:
        heads += ' (not ' + ', '.join(f'`{t}`' for t in cls.excluded_types) + ')'
    return heads


def _config_adapter(model_cfg: dict) -> Optional[str]:
    """The adapter :func:`~.support.build_adapter` would pick for a model config, by the same
    rule (:func:`~.support.head_matches`: nearest listed class, no relied-upon method
    overridden), without building the model (so without ``accepts``)."""
    from mmdet.registry import MODELS

    matches = []
    for cls in ADAPTERS.module_dict.values():
        node = model_cfg
        for part in cls.head_path.split('.'):
            node = node.get(part) if isinstance(node, dict) else None
        head = MODELS.get(node['type']) if isinstance(node, dict) and 'type' in node else None
        if head is not None:
            matches += [m for m in head_matches(head, cls.head_path) if m.adapter is cls]
    best = min((m for m in matches if not m.overrides), key=lambda m: m.rank, default=None)
    return None if best is None else best.adapter.__name__


@functools.lru_cache(maxsize=1)
def shipped_configs() -> Dict[str, Tuple[str, ...]]:
    """``{adapter name: (shipped config names)}``, each shipped config (but ``_base_/``) parsed
    once per process and assigned to the adapter of its model's head.

    Returns:
        dict[str, tuple[str, ...]]: Config names relative to the config folder, sorted.
    """
    import mmdet.models  # noqa: F401  (fill mmdet's registry)
    from mmengine.config import Config

    out: Dict[str, List[str]] = {}
    for name in list_configs():
        if name.startswith('_base_/'):
            continue
        adapter = _config_adapter(Config.fromfile(str(CONFIG_DIR / name)).model)
        if adapter is not None:
            out.setdefault(adapter, []).append(name)
    return {name: tuple(names) for name, names in out.items()}


def supported_table() -> str:
    """The Markdown table of the supported detectors, one row per registered adapter (in
    registration order): family, detectors, head classes (subclasses included), adapter, the
    shipped configs it explains, score, default layers and route.

    Returns:
        str: The table and a line saying how it was made, ending with a newline.
    """
    configs = shipped_configs()
    rows = ['| ' + ' | '.join(_COLUMNS) + ' |', '|' + '---|' * len(_COLUMNS)]
    for name, cls in ADAPTERS.module_dict.items():
        source = cls.__module__.replace('.', '/').split('mmdet_cam_hook/', 1)[-1] + '.py'
        cells = (cls.family or name, cls.detectors or '-', _head_cell(cls),
                 f'`{name}` (`{source}`)',
                 ', '.join(f'`{c}`' for c in configs.get(name, [])) or '-',
                 cls.doc_score or '-', cls.doc_layers or '-', cls.doc_route or '-')
        rows.append('| ' + ' | '.join(c.replace('|', '\\|') for c in cells) + ' |')
    rows += ['', 'Head classes include their subclasses. This table is generated from the '
             'adapter registry: `python -m mmdet_cam_hook.adapters --write README.md`.']
    return '\n'.join(rows) + '\n'


def replace_table(text: str, table: Optional[str] = None) -> str:
    """``text`` (README.md's) with the part between :data:`TABLE_BEGIN` and :data:`TABLE_END`
    replaced by ``table``.

    Args:
        text (str): The document.
        table (str, optional): The new table. Defaults to :func:`supported_table`.

    Returns:
        str: The new document.

    Raises:
        ValueError: If the markers are missing or out of order.
    """
    start, end = text.find(TABLE_BEGIN), text.find(TABLE_END)
    if start < 0 or end < start:
        raise ValueError(f'the document has no {TABLE_BEGIN} ... {TABLE_END} markers')
    table = supported_table() if table is None else table
    return text[:start + len(TABLE_BEGIN)] + '\n' + table + text[end:]
