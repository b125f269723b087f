"""What both tools' tests share: the torchrun commands as README.md documents them."""
import shlex
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[2] / 'README.md'
#: torchrun's own console script, beside this Python.
TORCHRUN = Path(sys.executable).parent / 'torchrun'


def readme_torchrun_lines():
    """The commands in README's code blocks that start with torchrun."""
    lines, code = [], False
    for line in README.read_text().splitlines():
        if line.startswith('```'):
            code = not code
        elif code and line.startswith('torchrun '):
            lines.append(line)
    return lines


@pytest.fixture
def readme_torchrun():
    """``launcher(module)``: README's torchrun command for ``module`` up to ``-m module``, with
    the real ``torchrun`` script and 2 processes (for :func:`~mmdet_cam_hook.testing.
    torchrun_beside`'s ``launcher``); ``launcher.lines()``: every torchrun line of README."""
    def launcher(module):
        lines = [line for line in readme_torchrun_lines() if f' -m {module} ' in line]
        assert len(lines) == 1, (module, readme_torchrun_lines())
        head = shlex.split(lines[0].split(f' -m {module} ')[0])
        assert head[0] == 'torchrun' and '--nproc_per_node' in head, head
        head[head.index('--nproc_per_node') + 1] = '2'
        return [str(TORCHRUN), *head[1:]]

    launcher.lines = readme_torchrun_lines
    return launcher
