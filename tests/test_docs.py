"""Docs generated, not typed: README.md's table of supported detectors is the adapter
registry's (``python -m mmdet_cam_hook.adapters --write README.md`` regenerates it)."""
from pathlib import Path

import pytest

from mmdet_cam_hook.adapters import (
    ADAPTERS,
    replace_table,
    supported_detectors,
    supported_heads,
    supported_table,
)
from mmdet_cam_hook.adapters.__main__ import main
from mmdet_cam_hook.adapters.table import TABLE_BEGIN, TABLE_END, shipped_configs

README = Path(__file__).resolve().parents[1] / 'README.md'


def between_markers(text):
    start, end = text.index(TABLE_BEGIN), text.index(TABLE_END)
    return text[start + len(TABLE_BEGIN):end].strip('\n')


def test_readme_table_is_the_generated_one():
    text = README.read_text(encoding='utf-8')
    assert text.count(TABLE_BEGIN) == 1 and text.count(TABLE_END) == 1
    assert between_markers(text) == supported_table().strip('\n'), \
        'README.md is stale: run python -m mmdet_cam_hook.adapters --write README.md'


def test_table_has_one_documented_row_per_adapter():
    lines = supported_table().splitlines()
    rows = [line for line in lines[2:] if line.startswith('| ')]
    assert len(rows) == len(ADAPTERS.module_dict)
    for (name, cls), row in zip(ADAPTERS.module_dict.items(), rows):
        cells = [c.strip() for c in row.strip('|').split(' | ')]
        assert len(cells) == len(lines[0].strip('|').split(' | ')), row
        assert f'`{name}`' in cells[3]
        for attr in ('family', 'detectors', 'doc_score', 'doc_layers', 'doc_route'):
            assert getattr(cls, attr), f'{name}.{attr} is empty'
    table = supported_table()
    assert all(f'`{head}`' in table for head in supported_heads())


def test_supported_detectors_come_from_the_adapters():
    names = supported_detectors()
    assert len(names) == len(set(names))
    assert {'YOLOX', 'RTMDet', 'RetinaNet', 'FCOS', 'ATSS', 'GFL', 'YOLOv3', 'Faster R-CNN',
            'Mask R-CNN', 'Cascade R-CNN', 'DINO', 'Deformable DETR', 'DETR'} <= set(names)
    table = supported_table()
    assert all(name in table for name in names)


def test_every_shipped_config_is_in_the_table():
    from mmdet_cam_hook.configs import list_configs

    configs = shipped_configs()
    listed = sorted(c for names in configs.values() for c in names)
    assert listed == [c for c in list_configs() if not c.startswith('_base_/')]
    assert 'yolox_s_gradcam.py' in configs['YOLOXAdapter']
    assert configs['CascadeRCNNAdapter'] == ('cascade-rcnn_r50_fpn_gradcam.py', )
    assert 'faster-rcnn_r50_fpn_gradcam.py' in configs['TwoStageAdapter']
    assert 'demo/rtmdet_tiny_shapes_gradcam.py' in configs['RTMDetAdapter']


def test_write_regenerates_between_the_markers(tmp_path, capsys):
    doc = tmp_path / 'doc.md'
    doc.write_text(f'intro\n{TABLE_BEGIN}\n| stale |\n{TABLE_END}\nafter\n', encoding='utf-8')
    assert main(['--write', str(doc)]) == 0
    text = doc.read_text(encoding='utf-8')
    assert text.startswith('intro\n') and text.endswith(f'{TABLE_END}\nafter\n')
    assert between_markers(text) == supported_table().strip('\n') and '| stale |' not in text
    assert replace_table(text) == text  # idempotent
    assert main([]) == 0 and capsys.readouterr().out == supported_table()
    doc.write_text('no markers\n', encoding='utf-8')
    assert main(['--write', str(doc)]) == 2
    assert 'supported-heads:begin' in capsys.readouterr().err
    with pytest.raises(ValueError, match='markers'):
        replace_table(f'{TABLE_END} before {TABLE_BEGIN}')


ZOO_JSON = README.parent / 'docs' / 'zoo_coverage.json'


def test_readme_zoo_coverage_is_the_generated_one():
    """README's model-zoo coverage section is the one ``tools/zoo_coverage.py`` generates from
    its last run (``docs/zoo_coverage.json``); no model is built here."""
    import json

    from mmdet_cam_hook.adapters.table import (
        COVERAGE_BEGIN,
        COVERAGE_END,
        COVERAGE_STATUSES,
        coverage_section,
        coverage_shares,
        replace_coverage,
    )

    data = json.loads(ZOO_JSON.read_text(encoding='utf-8'))
    text = README.read_text(encoding='utf-8')
    assert text.count(COVERAGE_BEGIN) == 1 and text.count(COVERAGE_END) == 1
    assert replace_coverage(text, data) == text, \
        'README.md is stale: python tools/zoo_coverage.py --write-readme README.md (or --json)'
    section = coverage_section(data)
    assert len([line for line in section.splitlines() if line.startswith('| ')]) == \
        len(data['groups']) + 1
    assert {g['status'] for g in data['groups']} <= set(COVERAGE_STATUSES)
    assert all(g['reason'] for g in data['groups'] if g['status'] != 'explained')
    shares = coverage_shares(data)
    assert shares['all'][1] == sum(g['checkpoints'] for g in data['groups'])
    assert shares['det_inst_buildable'][1] <= shares['det_inst'][1] <= shares['all'][1]
    with pytest.raises(ValueError, match='markers'):
        replace_coverage('no markers', data)
