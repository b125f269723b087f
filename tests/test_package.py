"""The package as a user installs it: a wheel built from this tree, installed (not editable) into
a throwaway virtual environment, used from a folder that is not the source tree.

The throwaway environment reuses the built stack (torch, mmcv, mmdet, ...) of the environment
running the tests through a ``.pth`` file that puts its site-packages on ``sys.path`` as a plain
path entry. The ``.pth`` files in there are not processed (only a site directory's are), so the
editable install of ``mmdet_cam_hook`` does not reach the throwaway environment: every test
checks that the package it runs is the wheel's copy.
"""
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
#: Top-level entries of the tree that are not part of a build.
_NOT_SOURCE = {'.git', '.venv', 'build', 'dist', 'data', 'work_dirs', 'outputs'}


def _ignore(folder, names):
    skip = {n for n in names if n in ('__pycache__', '.pytest_cache', '.ruff_cache')
            or n.endswith('.egg-info')}
    if Path(folder).resolve() == REPO:
        skip |= _NOT_SOURCE & set(names)
    return skip


@pytest.fixture(scope='module')
def env(tmp_path_factory):
    """Build the wheel from a copy of the tree, install it into a new venv, and return
    ``(venv, wheel, run)``; ``run(*cmd)`` runs a command in an empty folder elsewhere."""
    root = tmp_path_factory.mktemp('package')
    src = root / 'src'
    # A copy, so that the build's egg-info and build/ folders stay out of the working tree.
    shutil.copytree(REPO, src, symlinks=True, ignore=_ignore)
    pip = [sys.executable, '-m', 'pip', '--disable-pip-version-check', '-q']
    subprocess.run([*pip, 'wheel', '--no-deps', '--no-build-isolation', '-w', root / 'dist',
                    src], check=True, capture_output=True, timeout=300)
    (wheel, ) = (root / 'dist').glob('mmdet_cam_hook-*.whl')

    venv = root / 'venv'
    subprocess.run([sys.executable, '-m', 'venv', '--without-pip', venv], check=True,
                   timeout=120)
    python = venv / 'bin' / 'python'
    # Installed before the stack is visible, so that pip sees no other mmdet-cam-hook.
    subprocess.run([*pip, '--python', python, 'install', '--no-deps', '--no-index', wheel],
                   check=True, capture_output=True, timeout=300)
    site = subprocess.run([python, '-c', 'import sysconfig; print(sysconfig.get_paths()'
                           '["purelib"])'], check=True, capture_output=True, text=True).stdout
    stack = {sysconfig.get_paths()['purelib'], sysconfig.get_paths()['platlib']}
    (Path(site.strip()) / 'reuse_test_stack.pth').write_text('\n'.join(sorted(stack)) + '\n')

    elsewhere = root / 'elsewhere'
    elsewhere.mkdir()
    run_env = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}
    run_env.update(CUDA_VISIBLE_DEVICES='', OMP_NUM_THREADS='1')

    def run(*cmd):
        proc = subprocess.run([str(c) for c in cmd], cwd=elsewhere, env=run_env,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, (cmd, proc.stdout, proc.stderr)
        assert 'Traceback' not in proc.stderr, proc.stderr
        return proc.stdout

    return venv, wheel, run


def test_wheel_holds_the_package_and_its_configs(env):
    _, wheel, _ = env
    names = set(zipfile.ZipFile(wheel).namelist())
    for name in ('cli/cam.py', 'cli/__main__.py', 'demo/__main__.py', 'runtime/io.py',
                 'hooks/cam_hook.py', 'testing/__init__.py', 'configs/__init__.py',
                 'configs/__main__.py', 'configs/yolox_s_gradcam.py',
                 'configs/yolox_nano_gradcam.py', 'configs/_base_/gradcam_hook.py',
                 'configs/demo/yolox_nano_shapes_gradcam.py'):
        assert f'mmdet_cam_hook/{name}' in names, name
    assert not [n for n in names if n.startswith(('configs/', 'tests/', 'tools/'))]
    entry_points = next(n for n in names if n.endswith('.dist-info/entry_points.txt'))
    assert 'mmdet-cam = mmdet_cam_hook.cli.cam:main' in zipfile.ZipFile(wheel).read(
        entry_points).decode()


def test_installed_configs_inherit_mmdet_and_register_the_hook(env, tmp_path):
    venv, _, run = env
    python = venv / 'bin' / 'python'
    listing = run(python, '-m', 'mmdet_cam_hook.configs')
    (base, ) = [line for line in listing.splitlines() if line.endswith('/yolox_s_gradcam.py')]
    assert Path(base).is_file() and Path(base).is_relative_to(venv), base
    # A user's config that inherits a shipped one, as the README shows.
    user_config = tmp_path / 'my_yolox_s.py'
    user_config.write_text(
        f'_base_ = {base!r}\n'
        "custom_hooks = [*_base_.custom_hooks[:-1],\n"
        "                dict(_base_.custom_hooks[-1], methods=['hirescam'])]\n")
    code = f"""
import inspect
import mmdet_cam_hook
from pathlib import Path
from mmengine.config import Config
from mmdet.registry import HOOKS
import mmdet_cam_hook.demo.run as demo

venv = Path({str(venv)!r})
assert Path(mmdet_cam_hook.__file__).is_relative_to(venv), mmdet_cam_hook.__file__
cfg = Config.fromfile({str(user_config)!r})
assert cfg.model.type == 'YOLOX' and cfg.model.backbone.deepen_factor == 0.33, cfg.model
assert [h['type'] for h in cfg.custom_hooks] == [
    'YOLOXModeSwitchHook', 'SyncNormHook', 'EMAHook', 'DetCAMHook'], cfg.custom_hooks
assert cfg.custom_hooks[-1]['methods'] == ['hirescam']
# custom_imports registered the wheel's hook.
assert Path(inspect.getfile(HOOKS.get('DetCAMHook'))).is_relative_to(venv)
assert HOOKS.get('YOLOXGradCAMHook') is HOOKS.get('DetCAMHook')
assert demo.DEFAULT_CONFIG.is_file() and demo.DEFAULT_CONFIG.is_relative_to(venv)
print('ok')
"""
    assert run(python, '-c', code).strip().endswith('ok')


def test_installed_command_line_tool(env):
    venv, _, run = env
    text = run(venv / 'bin' / 'mmdet-cam', '--help')
    assert 'mmdet_cam_hook::yolox_s_gradcam.py' in ' '.join(text.split())
    layers = run(venv / 'bin' / 'mmdet-cam', 'mmdet_cam_hook::yolox_nano_gradcam.py',
                 '--list-layers')
    rows = {line.split()[0]: line.split() for line in layers.splitlines()
            if line and not line.startswith('#')}
    assert rows['neck.out_convs.2'][1:] == ['ConvModule', '1x64x13x13', '32', 'local']  # 416 px


def test_installed_demo_module(env):
    venv, _, run = env
    text = run(venv / 'bin' / 'python', '-m', 'mmdet_cam_hook.demo', '--help')
    assert '--epochs' in text and 'mmdet_cam_hook::demo/yolox_nano_shapes_gradcam.py' in text
