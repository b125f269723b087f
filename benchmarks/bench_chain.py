"""The chain route's vector-Jacobian products three ways, side by side in one run.

On the chain route each detection's gradient at a deep layer (``backbone.stage4``) is its local
window gradient ``v`` at a level map pulled back through the neck: ``J^T v``, one per detection.
The issue asked which batched form measures fastest on the CPU:

  loop          one ``torch.autograd.grad`` per detection on the shared graph (what the engine
                does, with detections whose regions do not meet packed into one backward:
                ``mmdet_cam_hook/packing.py``)
  batched       one ``torch.autograd.grad(..., is_grads_batched=True)`` for all K (vmap over the
                backward)
  K copies      the neck re-run on a batch of K copies of the layer's output, one backward of
                the K cotangents (eval-mode BatchNorm keeps the copies independent)

Random-init YOLOX (the tests' ``build_yolox``), ``backbone.stage4`` to a level map
(``--level``: the stride-16 ``neck.out_convs[1]`` by default), K cotangents that are random
inside a 5x5 window (the head's window) around K random positions; the three results are
compared (max abs diff). Times are the best of ``--repeats``. Run it on a quiet machine:

    .venv/bin/python benchmarks/bench_chain.py                       # YOLOX-s@640, K = 8 32
    .venv/bin/python benchmarks/bench_chain.py --model nano --input-size 416 --ks 32 100
"""
import argparse

import torch
from bench_engine import timed

from mmdet_cam_hook.testing import build_yolox

RADIUS = 2  # the YOLOX head's window: 5x5


def cotangents(shape, k, seed=0):
    """(k, *shape[1:]) cotangents, random inside a 5x5 window at k random positions."""
    gen = torch.Generator().manual_seed(seed)
    _, c, h, w = shape
    out = torch.zeros((k, c, h, w))
    ys = torch.randint(RADIUS, h - RADIUS, (k, ), generator=gen)
    xs = torch.randint(RADIUS, w - RADIUS, (k, ), generator=gen)
    for i, (y, x) in enumerate(zip(ys.tolist(), xs.tolist())):
        out[i, :, y - RADIUS:y + RADIUS + 1, x - RADIUS:x + RADIUS + 1] = torch.randn(
            (c, 2 * RADIUS + 1, 2 * RADIUS + 1), generator=gen)
    return out


def bench(model, input_size, level_index, k, repeats):
    x = torch.rand((1, 3, input_size, input_size), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        low3, low4, deep = model.backbone(x * 255)
    deep = deep.detach().requires_grad_(True)
    level = model.neck((low3, low4, deep))[level_index]
    vs = cotangents(level.shape, k)

    def loop():
        return torch.stack([torch.autograd.grad(level, deep, v[None], retain_graph=True)[0][0]
                            for v in vs])

    def batched():
        return torch.autograd.grad(level, deep, vs[:, None], retain_graph=True,
                                   is_grads_batched=True)[0][:, 0]

    def copies():
        many = deep.detach().expand(k, -1, -1, -1).clone().requires_grad_(True)
        out = model.neck((low3.expand(k, -1, -1, -1), low4.expand(k, -1, -1, -1),
                          many))[level_index]
        return torch.autograd.grad(out, many, vs)[0]

    device = torch.device('cpu')
    rows = []
    ref = None
    for name, fn in (('loop', loop), ('batched', batched), ('K copies', copies)):
        seconds, grads = timed(fn, repeats, device)
        ref = grads if ref is None else ref
        rows.append((name, seconds, float((grads - ref).abs().max())))
    # the comparison means something: every detection's gradient is non-zero, and its own
    assert (ref.flatten(1).abs().amax(1) > 0).all()
    assert k < 2 or not torch.equal(ref[0], ref[1])
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--model', default='s', choices=['nano', 'tiny', 's', 'm'])
    parser.add_argument('--input-size', type=int, default=640)
    parser.add_argument('--ks', type=int, nargs='+', default=[8, 32])
    parser.add_argument('--level', type=int, default=1, choices=[0, 1, 2],
                        help='the level map (stride 8, 16, 32); default: %(default)s')
    parser.add_argument('--repeats', type=int, default=3)
    args = parser.parse_args(argv)
    model = build_yolox(args.model, input_size=args.input_size, num_classes=80)
    for p in model.parameters():
        p.requires_grad_(False)
    print(f'YOLOX-{args.model}@{args.input_size}, backbone.stage4 -> the stride-'
          f'{8 << args.level} level map, torch threads={torch.get_num_threads()}')
    print('| K | way | seconds | / loop | max abs diff vs loop |')
    print('|---|---|---|---|---|')
    for k in args.ks:
        rows = bench(model, args.input_size, args.level, k, args.repeats)
        for name, seconds, diff in rows:
            print(f'| {k} | {name} | {seconds:.3f} | {seconds / rows[0][1]:.2f} | {diff:.1e} |')


if __name__ == '__main__':
    main()
