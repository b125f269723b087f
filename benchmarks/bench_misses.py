"""Cost of explaining misses: ``explain`` with ground truth vs without, over one forward+backward.

A random-init YOLOX with raised cls/obj biases (as in bench_engine.py), ``topk`` detections
kept, and ground truth made of ``--misses`` boxes that no kept detection matches: the boxes
of the best dropped candidates (by score, one per prior, of their own class), so that each GT
is a miss with a candidate (a map to compute). Measured side by side in this run, best of
``--repeats``:

  plain / fwd+bwd     ``explain`` of the K detections over one forward + one full backward
  misses / fwd+bwd    ``explain`` with the ground truth (K detections + M miss maps, the
                      candidates listed and matched) over the same
  misses / plain      what explaining the misses adds

    .venv/bin/python benchmarks/bench_misses.py                  # yolox-nano@416, K 32, M 10
    .venv/bin/python benchmarks/bench_misses.py --size s --input-size 640 --method hirescam
"""
import argparse

import numpy as np
import torch
from bench_engine import forward_backward, timed

from mmdet_cam_hook import CAMEngine
from mmdet_cam_hook.cam.geometry import box_iou
from mmdet_cam_hook.runtime.pipeline import preprocess
from mmdet_cam_hook.testing import build_yolox, synthetic_image


def ground_truth(engine, image, num):
    """``num`` boxes of the best dropped candidates that overlap no kept detection (IoU < 0.5
    with each), with their classes."""
    adapter = engine.adapter
    inputs, meta = preprocess(engine.model, engine.pipeline, image)
    with torch.no_grad():
        outs = adapter.head_outputs(adapter.features(inputs), [meta])
        dets = engine._decode(outs, meta)
        cands = adapter.candidates(outs, meta, engine.score_thr, dets)
    kept = dets.bboxes.numpy()
    best, labels = cands.scores.max(1)
    boxes, classes = [], []
    for row in best.argsort(descending=True).tolist():
        box = cands.boxes(int(labels[row]))[row].numpy()
        if (cands.kept[row] >= 0).any() or (len(kept) and box_iou(box, kept).max() >= 0.5) \
                or (boxes and box_iou(box, np.array(boxes)).max() >= 0.5):
            continue
        boxes.append(box)
        classes.append(int(labels[row]))
        if len(boxes) == num:
            break
    return np.array(boxes), np.array(classes), inputs, meta, dets


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--size', default='nano')
    parser.add_argument('--input-size', type=int, default=416)
    parser.add_argument('--detections', type=int, default=32)
    parser.add_argument('--misses', type=int, default=10)
    parser.add_argument('--method', default='gradcam')
    parser.add_argument('--repeats', type=int, default=5)
    args = parser.parse_args(argv)
    model = build_yolox(args.size, input_size=args.input_size, num_classes=80)
    engine = CAMEngine(model, score_thr=0.0, topk=args.detections, keep_input_cams=False)
    image = synthetic_image(args.input_size, args.input_size, seed=0)
    gt, labels, inputs, meta, dets = ground_truth(engine, image, args.misses)
    device = next(model.parameters()).device
    fwd_bwd, _ = timed(lambda: forward_backward(engine, inputs, meta, dets), args.repeats, device)
    plain, _ = timed(lambda: engine.explain(image, methods=args.method), args.repeats, device)
    with_gt, res = timed(lambda: engine.explain(image, methods=args.method, gt_bboxes=gt,
                                                gt_labels=labels), args.repeats, device)
    res = res[args.method]
    mapped = sum(m.candidate is not None for m in res.misses)
    print('| model | K | misses (mapped) | fwd+bwd (s) | plain (s) | misses (s) | '
          'plain / fwd+bwd | misses / fwd+bwd | misses / plain |')
    print('|---|---|---|---|---|---|---|---|---|')
    print(f'| yolox-{args.size}@{args.input_size} | {len(res)} | {len(res.misses)} ({mapped}) '
          f'| {fwd_bwd:.3f} | {plain:.3f} | {with_gt:.3f} | {plain / fwd_bwd:.2f} | '
          f'{with_gt / fwd_bwd:.2f} | {with_gt / plain:.2f} |')


if __name__ == '__main__':
    main()
