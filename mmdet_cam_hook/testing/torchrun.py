"""A ``torchrun`` job on the CPU beside an in-process run with the same numerics (the CLIs'
distributed tests)."""
import os

import torch


def torchrun_beside(module: str, args: list, in_process, nproc: int = 2, cwd=None,
                    timeout: float = 300.0, launcher=None):
    """Run ``python -m torch.distributed.run --standalone --nproc_per_node nproc -m module
    *args`` on the CPU (``OMP_NUM_THREADS=1``, no CUDA) while ``in_process()`` runs here with
    one torch thread, as torchrun's workers have (the same numerics), in ``cwd`` if given.
    ``launcher`` (a list) replaces everything before ``-m module``, e.g. ``[.../torchrun,
    '--standalone', '--nproc_per_node', '2']``.

    Returns:
        tuple: ``(in_process(), returncode, stdout, stderr)`` of the torchrun job.
    """
    import subprocess
    import sys

    env = dict(os.environ, CUDA_VISIBLE_DEVICES='', OMP_NUM_THREADS='1')
    if launcher is None:
        launcher = [sys.executable, '-m', 'torch.distributed.run', '--standalone',
                    '--nproc_per_node', str(nproc)]
    proc = subprocess.Popen(
        [*map(str, launcher), '-m', module, *map(str, args)],
        cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    threads, here = torch.get_num_threads(), os.getcwd()
    torch.set_num_threads(1)
    try:
        if cwd is not None:
            os.chdir(cwd)
        out = in_process()
        stdout, stderr = proc.communicate(timeout=timeout)
    finally:
        proc.kill()
        torch.set_num_threads(threads)
        os.chdir(here)
    return out, proc.returncode, stdout, stderr
