"""What DetCAMHook costs a training run: time and memory, measured side by side.

1. Overhead: the demo training of ``--model`` (``yolox-nano``:
   ``configs/demo/yolox_nano_shapes_gradcam.py``; ``rtmdet-tiny``:
   ``configs/demo/rtmdet_tiny_shapes_gradcam.py``; same data, same seed, same length) with the
   hook / without it. Runs alternate (with, without, with, ...), each
   in a fresh process, and only ``runner.train()`` is timed; the seconds of the hook's own
   ``after_val_epoch`` calls are reported per validation. Goal: <= 1.05. ``--revs A B`` times
   the hook of each git revision side by side in the same pairs (``git archive`` of the
   revision into a temporary folder, put first on ``PYTHONPATH``); by default the working tree.
2. Memory: resident memory after N calls of the hook's ``after_val_epoch`` minus after the first
   (probe images, engine and panels on a real runner). Goal: <= 20 MB after 50 calls.
3. One large probe (6000x4000 by default, 10 detections): seconds and peak resident memory of
   one hook call at the default ``max_image_size=1600`` and with it off (full-size maps).

    .venv/bin/python benchmarks/bench_hook.py               # demo settings, 2 pairs of runs
    .venv/bin/python benchmarks/bench_hook.py --quick       # 2 epochs, 1 pair, 20 calls
    .venv/bin/python benchmarks/bench_hook.py --model rtmdet-tiny --quick
    .venv/bin/python benchmarks/bench_hook.py --revs HEAD~1 HEAD --only overhead  # before/after
"""
import argparse
import gc
import io
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: Names the CAM hook is registered under (configs may use either).
CAM_HOOKS = ('DetCAMHook', 'YOLOXGradCAMHook')


def _config(work_dir, epochs, with_hook, model):
    from mmdet_cam_hook.configs import config_path
    from mmdet_cam_hook.demo.run import MODELS, demo_config
    from mmdet_cam_hook.demo.shapes import ensure_shapes

    data = ensure_shapes(os.path.join(ROOT, 'data', 'shapes'))
    cfg = demo_config(data, work_dir, config=config_path(MODELS[model]), epochs=epochs)
    if not with_hook:
        cfg.custom_hooks = [h for h in cfg.custom_hooks if h['type'] not in CAM_HOOKS]
    return cfg


def _cam_hook(runner):
    from mmdet_cam_hook.hooks.cam_hook import DetCAMHook

    return next(h for h in runner.hooks if isinstance(h, DetCAMHook))


def one_training(epochs, with_hook, model):
    """Child process: train once, print the seconds ``runner.train()`` took, the seconds of
    each of the hook's ``after_val_epoch`` calls and where the package was imported from."""
    from mmengine.runner import Runner

    import mmdet_cam_hook

    with tempfile.TemporaryDirectory() as work_dir:
        runner = Runner.from_cfg(_config(work_dir, epochs, with_hook, model))
        hook_seconds = []
        if with_hook:
            hook = _cam_hook(runner)
            inner = hook.after_val_epoch

            def timed(*args, **kwargs):  # runner.call_hook looks the method up on the hook
                begin = time.perf_counter()
                try:
                    return inner(*args, **kwargs)
                finally:
                    hook_seconds.append(time.perf_counter() - begin)

            hook.after_val_epoch = timed
        start = time.perf_counter()
        runner.train()
        print(json.dumps(dict(seconds=time.perf_counter() - start, hook_seconds=hook_seconds,
                              package=os.path.dirname(mmdet_cam_hook.__file__))))


def _extract(rev, folder):
    """``git archive`` of ``rev`` (the repository at ``ROOT``) extracted into ``folder``."""
    tar = subprocess.run(['git', 'archive', '--format=tar', rev], check=True,
                         capture_output=True, cwd=ROOT).stdout
    with tarfile.open(fileobj=io.BytesIO(tar)) as archive:
        if hasattr(tarfile, 'data_filter'):
            archive.extractall(folder, filter='data')
        else:  # python < 3.11.4: our own repository's archive
            archive.extractall(folder)


def _child(args, pythonpath=None):
    env = dict(os.environ)
    if pythonpath:
        env['PYTHONPATH'] = os.pathsep.join(filter(None, [pythonpath, env.get('PYTHONPATH')]))
    out = subprocess.run([sys.executable, __file__, *args], check=True, capture_output=True,
                         text=True, cwd=ROOT, env=env).stdout
    return json.loads(out.strip().splitlines()[-1])


def overhead(epochs, pairs, model, revs=()):
    """Interleaved runs: for each pair, one run with the hook of each revision in ``revs``
    (the working tree if none), then one without the hook."""
    with tempfile.TemporaryDirectory() as trees:
        variants = {}
        for rev in revs:
            sha = subprocess.run(['git', 'rev-parse', '--short', rev], check=True,
                                 capture_output=True, text=True, cwd=ROOT).stdout.strip()
            folder = os.path.join(trees, sha)
            _extract(sha, folder)
            variants[f'{rev} ({sha})'] = folder
        variants = variants or {'working tree': None}
        times = {name: [] for name in [*variants, None]}
        hook_times = {name: [] for name in variants}
        child = ['--model', model, '--child', str(epochs)]
        for _ in range(pairs):
            for name, tree in variants.items():
                res = _child([*child, '1'], tree)
                times[name].append(res['seconds'])
                hook_times[name].extend(res['hook_seconds'])
                per_val = sum(res['hook_seconds']) / max(1, len(res['hook_seconds']))
                print(f'  with the hook of {name}: {res["seconds"]:.1f} s, of which the hook '
                      f'{sum(res["hook_seconds"]):.1f} s in {len(res["hook_seconds"])} '
                      f'validation(s), {per_val:.2f} s each (package {res["package"]})',
                      flush=True)
            res = _child([*child, '0'])
            times[None].append(res['seconds'])
            print(f'  without hook: {res["seconds"]:.1f} s', flush=True)
    for name in variants:
        ratio = sum(times[name]) / sum(times[None])
        per_val = sum(hook_times[name]) / max(1, len(hook_times[name]))
        print(f'{name}: training with the hook / without: {ratio:.3f}; the hook: {per_val:.2f} s '
              f'per validation ({pairs} pair(s) of {epochs}-epoch runs, interleaved)')


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
    parser.add_argument('--revs', nargs='+', default=(),
                        help='time the hook of these git revisions side by side (default: the '
                        'working tree)')
    parser.add_argument('--only', choices=['overhead', 'memory', 'large'], nargs='+',
                        default=('overhead', 'memory', 'large'), help='sections to run')
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
    if 'overhead' in args.only:
        print('1. overhead')
        overhead(epochs, args.pairs or (1 if args.quick else 2), args.model, args.revs)
    if 'memory' in args.only:
        print('2. memory')
        memory(args.calls or (20 if args.quick else 50), args.model)
    if 'large' in args.only:
        print('3. one large probe')
        large_probe(*(int(v) for v in args.large.lower().split('x')), args.model)

if __name__ == '__main__':
    main()
