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
    rows += ['', 'Head classes include their subclasses that override none of the methods the '
             'adapter relies on (its `relies_on`); any other head is refused when the engine or '
             'the hook is built. This table is generated from the adapter registry: '
             '`python -m mmdet_cam_hook.adapters --write README.md`.']
    return '\n'.join(rows) + '\n'


def replace_table(text: str, table: Optional[str] = None, begin: str = TABLE_BEGIN,
                  end: str = TABLE_END) -> str:
    """``text`` (README.md's) with the part between the markers ``begin`` and ``end`` replaced
    by ``table``.

    Args:
        text (str): The document.
        table (str, optional): The new table. Defaults to :func:`supported_table`.
        begin (str): The opening marker. Defaults to :data:`TABLE_BEGIN`.
        end (str): The closing marker. Defaults to :data:`TABLE_END`.

    Returns:
        str: The new document.

    Raises:
        ValueError: If the markers are missing or out of order.
    """
    start, stop = text.find(begin), text.find(end)
    if start < 0 or stop < start:
        raise ValueError(f'the document has no {begin} ... {end} markers')
    table = supported_table() if table is None else table
    return text[:start + len(begin)] + '\n' + table + text[stop:]


#: The markers around the generated model-zoo coverage section in README.md
#: (``python tools/zoo_coverage.py --write-readme README.md``).
COVERAGE_BEGIN = '<!-- zoo-coverage:begin -->'
COVERAGE_END = '<!-- zoo-coverage:end -->'
#: The statuses of a group of checkpoints in ``docs/zoo_coverage.json``, in table order.
COVERAGE_STATUSES = ('explained', 'refused', 'error', 'timeout', 'cannot build')


def coverage_shares(data: dict) -> Dict[str, Tuple[int, int]]:
    """``{share: (explained, of)}`` checkpoints of a zoo coverage run (the JSON that
    ``tools/zoo_coverage.py`` writes): of all of them (``all``), of the detection and instance
    segmentation ones (``det_inst``), and of those whose model could be built here
    (``det_inst_buildable``, the issue's goal).

    Args:
        data (dict): The run (``groups``: ``checkpoints``, ``det_inst`` and ``status`` each).

    Returns:
        dict[str, tuple[int, int]]: Explained and total checkpoint counts per share.
    """
    groups = data['groups']

    def count(key, keep=lambda g: True):
        return (sum(g[key] for g in groups if keep(g) and g['status'] == 'explained'),
                sum(g[key] for g in groups if keep(g)))

    return {'all': count('checkpoints'), 'det_inst': count('det_inst'),
            'det_inst_buildable': count('det_inst', lambda g: g['status'] != 'cannot build')}


def coverage_section(data: dict) -> str:
    """The README's Markdown section of a zoo coverage run: the shares and one row per group
    of checkpoints (detector, heads), explained first, then by checkpoints.

    Args:
        data (dict): The run, as ``tools/zoo_coverage.py --json`` writes it.

    Returns:
        str: The section, ending with a newline.
    """
    shares = coverage_shares(data)

    def pct(share):
        done, total = shares[share]
        return f'{done} of {total} ({100.0 * done / max(total, 1):.1f}%)'

    lines = [f"Measured by `python tools/zoo_coverage.py` on mmdet {data['mmdet']}'s "
             f"`model-index.yml` ({shares['all'][1]} checkpoints in {len(data['groups'])} "
             f"groups of (detector, heads)), one random-init model per group at "
             f"{data['input_size']} px: detections equal `model.predict`'s and HiResCAM maps "
             '(Grad-CAM for the text-prompted models) equal a plain full backward per '
             'detection. Explained: '
             f"{pct('det_inst_buildable')} of the detection and instance-segmentation "
             f"checkpoints that can be built here offline; {pct('det_inst')} of all of them; "
             f"{pct('all')} of every checkpoint.", '',
             '| detector | heads | checkpoints (det+inst) | result | why / adapter |',
             '|---|---|---|---|---|']
    order = {s: i for i, s in enumerate(COVERAGE_STATUSES)}
    for g in sorted(data['groups'], key=lambda g: (order.get(g['status'], len(order)),
                                                   -g['checkpoints'], g['detector'])):
        heads = ', '.join(f'`{h}`' for h in g['heads']) or '-'
        why = g.get('adapter') if g['status'] == 'explained' else g.get('reason')
        cells = (g['detector'], heads, f"{g['checkpoints']} ({g['det_inst']})", g['status'],
                 (why or '-').replace('\n', ' '))
        lines.append('| ' + ' | '.join(c.replace('|', '\\|') for c in cells) + ' |')
    return '\n'.join(lines) + '\n'


def replace_coverage(text: str, data: dict) -> str:
    """``text`` with the part between :data:`COVERAGE_BEGIN` and :data:`COVERAGE_END` replaced
    by :func:`coverage_section` of ``data``.

    Raises:
        ValueError: If the markers are missing or out of order.
    """
    return replace_table(text, coverage_section(data), COVERAGE_BEGIN, COVERAGE_END)
