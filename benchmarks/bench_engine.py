"""Per-image cost of per-detection CAMs: the engine vs one forward+backward vs the naive baseline.

For each model / layer setting and K detections, measured side by side in this run:
  ours / fwd+bwd    engine time for all K maps over one plain forward + one full backward
  baseline / ours   pytorch-grad-cam's class called once per detection (what the seed tool and
                    mmyolo's Box AM effectively do) over the engine
  max |diff|        largest difference between the two sets of maps (network-input grid)

Random-init models (no weights can be downloaded here) with raised cls/obj biases so that there
are at least 100 detections; timings are medians of ``--repeats`` interleaved runs.

    .venv/bin/python benchmarks/bench_engine.py            # nano@416 and s@640, K = 1 8 32 100
    .venv/bin/python benchmarks/bench_engine.py --quick    # a smaller table in a minute
"""
import argparse
import statistics
import time

import numpy as np
import torch

from mmdet_cam_hook import CAMEngine
from mmdet_cam_hook.engine import read_only
from mmdet_cam_hook.reference import reference_input_cams
from mmdet_cam_hook.testing import build_yolox, synthetic_image
from mmdet_cam_hook.yolox import decode, preprocess


def forward_backward(model, inputs):
    """One plain forward and one full backward (parameter gradients included) of one score."""
    with read_only(model), torch.enable_grad():
        outs = model.bbox_head(model.extract_feat(inputs))
        cls, _, obj = outs
        (cls[0].sigmoid().amax() * obj[0].sigmoid().amax()).backward()
    model.zero_grad(set_to_none=True)


def timed(fn, repeats):
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def bench(size, input_size, layers, ks, repeats, method):
    model = build_yolox(size, input_size=input_size, num_classes=80, seed=0)
    image = synthetic_image(int(input_size * 0.75), input_size, seed=0)
    engine = CAMEngine(model, target_layers=layers, score_thr=0.0, topk=max(ks))
    inputs, meta = preprocess(model, engine.pipeline, image)
    with torch.no_grad():
        dets = decode(model.bbox_head, model.bbox_head(model.extract_feat(inputs)), meta, 0.0)
    rows = []
    for k in ks:
        engine.topk = k
        t_fb, _ = timed(lambda: forward_backward(model, inputs), repeats)
        t_ours, res = timed(lambda: engine.explain(image, methods=method)[method],  # noqa: B023
                            repeats)
        sub = dets.select(slice(0, k))
        args = (model, inputs, method, res.layers, sub.levels.tolist(), sub.labels.tolist(),
                sub.ys.tolist(), sub.xs.tolist())
        with read_only(model):
            t_base, ref = timed(lambda: reference_input_cams(*args), 1)  # noqa: B023
        model.zero_grad(set_to_none=True)
        diff = float(np.abs(res.input_cams - ref).max()) if len(res) else 0.0
        rows.append((k, len(res), t_fb, t_ours, t_base, diff))
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--quick', action='store_true', help='nano@256 only, K = 1 8 32')
    parser.add_argument('--repeats', type=int, default=3)
    parser.add_argument('--method', default='gradcam')
    args = parser.parse_args(argv)
    torch.set_num_threads(torch.get_num_threads())
    settings = [('nano', 256, [1, 8, 32])] if args.quick else [('nano', 416, [1, 8, 32, 100]),
                                                               ('s', 640, [1, 8, 32, 100])]
    print(f'method={args.method}, torch threads={torch.get_num_threads()}')
    print('| model | layers | K | ours (s) | fwd+bwd (s) | ours / fwd+bwd | baseline (s) '
          '| baseline / ours | max abs diff |')
    print('|---|---|---|---|---|---|---|---|---|')
    for size, input_size, ks in settings:
        for layers in (None, ['backbone.stage4']):
            name = 'level-aware default' if layers is None else layers[0]
            for _k, got, t_fb, t_ours, t_base, diff in bench(size, input_size, layers, ks,
                                                           args.repeats, args.method):
                print(f'| {size}@{input_size} | {name} | {got} | {t_ours:.3f} | {t_fb:.3f} | '
                      f'{t_ours / t_fb:.2f} | {t_base:.2f} | {t_base / t_ours:.1f} | {diff:.1e} |',
                      flush=True)


if __name__ == '__main__':
    main()
