"""What YOLOXGradCAMHook costs a training run: time and memory, measured side by side.

1. Overhead: the demo training (``configs/demo/yolox_nano_shapes_gradcam.py``, same data, same
   seed, same length) with the hook / without it. Runs alternate (with, without, with, ...), each
   in a fresh process, and only ``runner.train()`` is timed. Goal: <= 1.05.
2. Memory: resident memory after N calls of the hook's ``after_val_epoch`` minus after the first
   (probe images, engine and panels on a real runner). Goal: <= 20 MB after 50 calls.

    .venv/bin/python benchmarks/bench_hook.py               # demo settings, 2 pairs of runs
    .venv/bin/python benchmarks/bench_hook.py --quick       # 2 epochs, 1 pair, 20 calls
"""
import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(work_dir, epochs, with_hook):
    from mmdet_cam_hook.demo import demo_config
    from mmdet_cam_hook.shapes import ensure_shapes

    data = ensure_shapes(os.path.join(ROOT, 'data', 'shapes'))
    cfg = demo_config(data, work_dir, epochs=epochs)
    if not with_hook:
        cfg.custom_hooks = [h for h in cfg.custom_hooks if h['type'] != 'YOLOXGradCAMHook']
    return cfg


def one_training(epochs, with_hook):
    """Child process: train once, print the seconds ``runner.train()`` took."""
    from mmengine.runner import Runner

    with tempfile.TemporaryDirectory() as work_dir:
        runner = Runner.from_cfg(_config(work_dir, epochs, with_hook))
        start = time.perf_counter()
        runner.train()
        print(json.dumps(dict(seconds=time.perf_counter() - start)))


def overhead(epochs, pairs):
    times = {True: [], False: []}
    for _ in range(pairs):
        for with_hook in (True, False):
            out = subprocess.run(
                [sys.executable, __file__, '--child', str(epochs), str(int(with_hook))],
                check=True, capture_output=True, text=True, cwd=ROOT).stdout
            times[with_hook].append(json.loads(out.strip().splitlines()[-1])['seconds'])
            print(f'  {"with" if with_hook else "without"} hook: {times[with_hook][-1]:.1f} s',
                  flush=True)
    ratio = sum(times[True]) / sum(times[False])
    print(f'training with the hook / without: {ratio:.3f} ({pairs} pair(s) of {epochs}-epoch '
          f'runs, interleaved)')


def memory(calls):
    import psutil
    from mmengine.runner import Runner

    with tempfile.TemporaryDirectory() as work_dir:
        runner = Runner.from_cfg(_config(work_dir, 1, True))
        hook = next(h for h in runner.hooks if type(h).__name__ == 'YOLOXGradCAMHook')
        runner.call_hook('before_run')
        proc = psutil.Process()
        rss = []
        for _ in range(calls):
            hook.after_val_epoch(runner, metrics={})
            gc.collect()
            rss.append(proc.memory_info().rss / 2**20)
        print(f'resident memory after {calls} hook calls - after the first: '
              f'{rss[-1] - rss[0]:+.1f} MB (first {rss[0]:.0f} MB, max {max(rss):.0f} MB)')


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--quick', action='store_true')
    parser.add_argument('--epochs', type=int, default=None, help='default: the demo config')
    parser.add_argument('--pairs', type=int, default=None)
    parser.add_argument('--calls', type=int, default=None)
    parser.add_argument('--child', nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        one_training(int(args.child[0]), bool(int(args.child[1])))
        return
    epochs = args.epochs or (2 if args.quick else 12)
    print('1. overhead')
    overhead(epochs, args.pairs or (1 if args.quick else 2))
    print('2. memory')
    memory(args.calls or (20 if args.quick else 50))


if __name__ == '__main__':
    main()
