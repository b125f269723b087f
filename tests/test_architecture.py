"""The import rule of the wings (``.importlinter``, docs/DESIGN.md) holds, and the checker
catches a break of it: an import running back up a wing, and an import cycle inside one."""
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import mmdet_cam_hook

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / '.importlinter'
LINT = Path(sys.executable).parent / 'lint-imports'


def lint(pythonpath: Path) -> subprocess.CompletedProcess:
    env = {'PYTHONPATH': str(pythonpath), 'PATH': '/usr/bin:/bin'}
    return subprocess.run([str(LINT), '--config', str(CONFIG), '--no-cache'], cwd=pythonpath,
                          env=env, capture_output=True, text=True, timeout=120)


def test_import_rule_holds():
    proc = lint(Path(mmdet_cam_hook.__file__).parents[1])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert 'Contracts: 3 kept, 0 broken.' in proc.stdout, proc.stdout


@pytest.fixture
def package_copy(tmp_path):
    shutil.copytree(Path(mmdet_cam_hook.__file__).parent, tmp_path / 'mmdet_cam_hook',
                    ignore=shutil.ignore_patterns('__pycache__'))
    return tmp_path


def _append(path: Path, line: str) -> None:
    path.write_text(path.read_text() + '\n' + line + '\n')


def test_an_import_running_up_is_caught(package_copy):
    # runtime is the bottom wing: it may not reach the hook (hidden in a function, too)
    _append(package_copy / 'mmdet_cam_hook' / 'runtime' / 'io.py',
            'def _late():\n    from ..hooks import cam_hook  # noqa: F401')
    proc = lint(package_copy)
    assert proc.returncode != 0
    assert 'mmdet_cam_hook.runtime is not allowed to import mmdet_cam_hook.hooks' in proc.stdout


def test_a_cycle_inside_a_wing_is_caught(package_copy):
    # cam.geometry is imported by cam.maths; importing maths back is a cycle in the cam wing
    _append(package_copy / 'mmdet_cam_hook' / 'cam' / 'geometry.py',
            'def _late():\n    from . import maths  # noqa: F401')
    proc = lint(package_copy)
    assert proc.returncode != 0
    assert 'No import cycle between the modules of any wing BROKEN' in proc.stdout
