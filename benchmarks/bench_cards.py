"""What the image backends' cards (issue 24) cost next to the full panel, per probe and method.

Side by side on the same result (a synthetic noisy image with ``--detections`` boxes and maps,
ground truth for half of them): drawing and PNG-encoding the full panel (what LocalVisBackend
writes), and drawing and PNG-encoding the overview and per-detection cards (what TensorBoard,
W&B and MLflow get). Best of ``--repeats`` runs of ``--calls`` calls each. A run with
LocalVisBackend and TensorBoard pays both; one with LocalVisBackend only draws no card. Run it
on a quiet machine:

    .venv/bin/python benchmarks/bench_cards.py                      # 256 px image, 4 detections
    .venv/bin/python benchmarks/bench_cards.py --size 640 --detections 10
"""
import argparse
import time

import numpy as np

from mmdet_cam_hook import CAMResult
from mmdet_cam_hook.testing import synthetic_image
from mmdet_cam_hook.visualization.cards import render_cards
from mmdet_cam_hook.visualization.delivery import Panel
from mmdet_cam_hook.visualization.render import render_panel


def make_result(size: int, k: int) -> CAMResult:
    rng = np.random.default_rng(0)
    xy = rng.uniform(0, size * 0.8, (k, 2))
    wh = rng.uniform(size * 0.05, size * 0.2, (k, 2))
    bboxes = np.concatenate([xy, xy + wh], 1).astype(np.float32)
    cams = rng.random((k, size, size)).astype(np.float32)
    return CAMResult(bboxes=bboxes, labels=np.arange(k) % 3, scores=np.linspace(0.9, 0.3, k),
                     levels=np.zeros(k, np.int64), cams=cams, combined=cams.max(0),
                     method='gradcam', layers=[['l']] * k, image=synthetic_image(size, size),
                     input_cams=None, letterbox=None)


def best(fn, calls: int, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter() - start) / calls)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--size', type=int, default=256)
    parser.add_argument('--detections', type=int, default=4)
    parser.add_argument('--calls', type=int, default=20)
    parser.add_argument('--repeats', type=int, default=3)
    args = parser.parse_args()
    result = make_result(args.size, args.detections)
    gt = result.bboxes[::2] + 1.0
    match = np.where(np.arange(args.detections) % 2 == 0, np.arange(args.detections) // 2, -1)
    panel = best(lambda: Panel(render_panel(result, gt_bboxes=gt)).png, args.calls,
                 args.repeats)
    cards = best(lambda: [Panel(c).png for c in render_cards(result, gt_bboxes=gt,
                                                             match=match).values()],
                 args.calls, args.repeats)
    print(f'panel (draw + PNG): {panel * 1e3:.1f} ms; cards (draw + PNG): {cards * 1e3:.1f} ms; '
          f'cards / panel = {cards / panel:.2f}')


if __name__ == '__main__':
    main()
