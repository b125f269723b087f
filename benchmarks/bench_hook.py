"""What DetCAMHook costs a training run: time and memory, measured side by side.

1. Overhead: the demo training of ``--model`` (``yolox-nano``:
   ``configs/demo/yolox_nano_shapes_gradcam.py``; ``rtmdet-tiny``:
   ``configs/demo/rtmdet_tiny_shapes_gradcam.py``; same data, same seed, same length) with the
   hook / without it. Runs alternate (with, without, with, ...), each
   in a fresh process, and only ``runner.train()`` is timed. Goal: <= 1.05.
2. Memory: resident memory after N calls of the hook's ``after_val_epoch`` minus after the first
   (probe images, engine and panels on a real runner). Goal: <= 20 MB after 50 calls.
3. One large probe (6000x4000 by default, 10 detections): seconds and peak resident memory of
   one hook call at the default ``max_image_size=1600`` and with it off (full-size maps).

    .venv/bin/python benchmarks/bench_hook.py               # demo settings, 2 pairs of runs
    .venv/bin/python benchmarks/bench_hook.py --quick       # 2 epochs, 1 pair, 20 calls
    .venv/bin/python benchmarks/bench_hook.py --model rtmdet-tiny --quick
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
#: Names the CAM hook is registered under (configs may use either).
CAM_HOOKS = ('DetCAMHook', 'YOLOXGradCAMHook')


def _config(work_dir, epochs, with_hook, model):
    from mmdet_cam_hook.configs import config_path
    from mmdet_cam_hook.demo import MODELS, demo_config
    from mmdet_cam_hook.shapes import ensure_shapes

    data = ensure_shapes(os.path.join(ROOT, 'data', 'shapes'))
    cfg = demo_config(data, work_dir, config=config_path(MODELS[model]), epochs=epochs)
    if not with_hook:
        cfg.custom_hooks = [h for h in cfg.custom_hooks if h['type'] not in CAM_HOOKS]
    return cfg


def _cam_hook(runner):
    from mmdet_cam_hook.hook import DetCAMHook

    return next(h for h in runner.hooks if isinstance(h, DetCAMHook))


def one_training(epochs, with_hook, model):
    """Child process: train once, print the seconds ``runner.train()`` took."""
    from mmengine.runner import Runner

    with tempfile.TemporaryDirectory() as work_dir:
        runner = Runner.from_cfg(_config(work_dir, epochs, with_hook, model))
        start = time.perf_counter()
        runner.train()
        print(json.dumps(dict(seconds=time.perf_counter() - start)))


def overhead(epochs, pairs, model):
    times = {True: [], False: []}
    for _ in range(pairs):
        for with_hook in (True, False):
            out = subprocess.run(
                [sys.executable, __file__, '--model', model, '--child', str(epochs),
                 str(int(with_hook))],
                check=True, capture_output=True, text=True, cwd=ROOT).stdout
            times[with_hook].append(json.loads(out.strip().splitlines()[-1])['seconds'])
            print(f'  {"with" if with_hook else "without"} hook: {times[with_hook][-1]:.1f} s',
                  flush=True)
    ratio = sum(times[True]) / sum(times[False])
    print(f'training with the hook / without: {ratio:.3f} ({pairs} pair(s) of {epochs}-epoch '
          f'runs, interleaved)')


def memory(calls, model):
    import psutil
    from mmengine.runner import Runner

    with tempfile.TemporaryDirectory() as work_dir:
        runner = Runner.from_cfg(_config(work_dir, 1, True, model))
        hook = _cam_hook(runner)
        runner.call_hook('before_run')
        proc = psutil.Process()
        rss = []
        for _ in range(calls):
            hook.after_val_epoch(runner, metrics={})
            gc.collect()
            rss.append(proc.memory_info().rss / 2**20)
        print(f'resident memory after {calls} hook calls - after the first: '
              f'{rss[-1] - rss[0]:+.1f} MB (first {rss[0]:.0f} MB, max {max(rss):.0f} MB)')


def one_large_probe(width, height, max_image_size, model):
    """Child process: one hook call on a ``width`` x ``height`` probe (10 detections); print
    its seconds and the peak resident memory above the level before the call."""
    import threading

    import cv2
    import numpy as np
    import psutil
    from mmengine.runner import Runner

    with tempfile.TemporaryDirectory() as work_dir:
        probe = os.path.join(work_dir, 'large.png')
        rng = np.random.default_rng(0)
        cv2.imwrite(probe, cv2.resize(rng.integers(0, 255, (height // 50, width // 50, 3),
                                                   np.uint8), (width, height)))
        cfg = _config(work_dir, 1, True, model)
        for hook in cfg.custom_hooks:
            if hook['type'] in CAM_HOOKS:  # random weights: every prior is a detection
                hook.update(probe_images=probe, score_thr=0.0, topk=10,
                            max_image_size=max_image_size)
        runner = Runner.from_cfg(cfg)
        hook = _cam_hook(runner)
        runner.call_hook('before_run')  # decodes (and keeps) the probe
        gc.collect()
        proc = psutil.Process()
        base = peak = proc.memory_info().rss
        done = threading.Event()

        def sample():
            nonlocal peak
            while not done.wait(0.005):
                peak = max(peak, proc.memory_info().rss)

        sampler = threading.Thread(target=sample)
        sampler.start()
        start = time.perf_counter()
        hook.after_val_epoch(runner, metrics={})
        seconds = time.perf_counter() - start
        done.set()
        sampler.join()
        print(json.dumps(dict(seconds=seconds, peak_mb=(peak - base) / 2**20)))


def large_probe(width, height, model):
    for max_image_size in (1600, None):
        out = subprocess.run(
            [sys.executable, __file__, '--model', model, '--large-child', str(width), str(height),
             str(max_image_size or 0)], check=True, capture_output=True, text=True,
            cwd=ROOT).stdout
        res = json.loads(out.strip().splitlines()[-1])
        print(f'  {width}x{height} probe, 10 detections, max_image_size={max_image_size}: '
              f'{res["seconds"]:.1f} s, peak resident memory +{res["peak_mb"]:.0f} MB above the '
              'level before the call', flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--model', choices=['yolox-nano', 'rtmdet-tiny'], default='yolox-nano',
                        help='the demo model to train (default: %(default)s)')
    parser.add_argument('--quick', action='store_true')
    parser.add_argument('--epochs', type=int, default=None, help='default: the demo config')
    parser.add_argument('--pairs', type=int, default=None)
    parser.add_argument('--calls', type=int, default=None)
    parser.add_argument('--large', default='6000x4000', help='large-probe size, WxH')
    parser.add_argument('--child', nargs=2, help=argparse.SUPPRESS)
    parser.add_argument('--large-child', nargs=3, type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        one_training(int(args.child[0]), bool(int(args.child[1])), args.model)
        return
    if args.large_child:
        width, height, max_image_size = args.large_child
        one_large_probe(width, height, max_image_size or None, args.model)
        return
    epochs = args.epochs or (2 if args.quick else 12)
    print('1. overhead')
    overhead(epochs, args.pairs or (1 if args.quick else 2), args.model)
    print('2. memory')
    memory(args.calls or (20 if args.quick else 50), args.model)
    print('3. one large probe')
    large_probe(*(int(v) for v in args.large.lower().split('x')), args.model)


if __name__ == '__main__':
    main()
