"""The peak memory a call adds, on a CUDA device or on the CPU (Linux), for tests and benchmarks."""
import os
from typing import Optional, Tuple

import torch


def peak_memory(fn, *args, device: Optional[torch.device] = None, **kwargs) -> Tuple[object, int]:
    """Run ``fn(*args, **kwargs)``; return its result and the peak memory it added, in bytes.

    On a CUDA device: ``torch.cuda.max_memory_allocated`` above the level before the call. On
    the CPU: the process's peak resident set size (Linux's ``VmHWM``, reset through
    ``/proc/self/clear_refs`` before the call) above the resident size before it, after glibc's
    ``malloc_trim`` has returned the heap's free memory, so numpy's and torch's allocations both
    count.

    Raises:
        RuntimeError: On a CPU outside Linux (no resettable peak to read).
    """
    device = torch.device('cpu') if device is None else torch.device(device)
    if device.type == 'cuda':
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        out = fn(*args, **kwargs)
        torch.cuda.synchronize(device)
        return out, torch.cuda.max_memory_allocated(device) - before
    if not os.path.exists('/proc/self/clear_refs'):
        raise RuntimeError('peak CPU memory is read from /proc/self (Linux only)')

    def status(key: str) -> int:
        with open('/proc/self/status') as f:
            for line in f:
                if line.startswith(key + ':'):
                    return int(line.split()[1]) * 1024
        raise RuntimeError(f'/proc/self/status has no {key}')

    import ctypes
    import gc
    gc.collect()
    try:  # hand the heap's free memory back, so that the peak counts what ``fn`` allocates
        ctypes.CDLL('libc.so.6').malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the reading may then be lower
        pass
    with open('/proc/self/clear_refs', 'w') as f:
        f.write('5')  # reset the peak resident set size to the current one
    before = status('VmRSS')
    out = fn(*args, **kwargs)
    return out, status('VmHWM') - before
