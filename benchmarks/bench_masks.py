"""Cost of the mask maps (issue 20) and of the contrastive target, measured side by side.

For a random-init Mask R-CNN R50 (mmdet's config; RPN regression, RoI classifier and mask
logits perturbed as in tests/adapters/test_masks.py) or RTMDet-Ins-s (``--model
rtmdet-ins-s``: BatchNorms calibrated, class, box and kernel predictors perturbed as in
tests/adapters/test_rtmdet_ins.py; its mask target mixes the levels, so the mask maps take the
engine's exact route, one full backward per instance) at a CPU-sized input and K instances:

  box / fwd+bwd       the engine's class maps alone (mask branch off) over one plain forward +
                      one full backward
  +mask / box         the same call with the mask maps too, over the class maps alone
  mask part / fwd+bwd the engine's extra time for the mask maps over one plain forward + one
                      full backward
  naive / mask part   grad-cam's class once per instance with the mask target (one forward +
                      full backward each) over the engine's extra time for the mask maps
  contrast / box      ``contrast='runner_up'`` (class maps of score[A] - score[B]) over the
                      class maps alone
  max |diff|          mask maps: engine vs the naive reference (on the image)

Timings are the best of ``--repeats`` runs (the naive reference: one run, on the first
``--baseline-max`` instances, scaled to K; on the instance's mask level for Mask R-CNN, on all
the level maps for RTMDet-Ins, as the engine's mask maps). Run it on a quiet machine, e.g. with
``OMP_NUM_THREADS=1``; ``--quick`` is a 256 px input, one repeat, a 4-instance baseline.

    .venv/bin/python benchmarks/bench_masks.py                # Mask R-CNN, K = 8 32 100
    .venv/bin/python benchmarks/bench_masks.py --model rtmdet-ins-s --quick
    .venv/bin/python benchmarks/bench_masks.py --ks 8 --size 320 --baseline-max 4
"""
import argparse

import numpy as np
import torch
from bench_engine import forward_backward, timed

from mmdet_cam_hook import CAMEngine
from mmdet_cam_hook.runtime.pipeline import preprocess
from mmdet_cam_hook.runtime.state import read_only
from mmdet_cam_hook.testing import build_detector, synthetic_image
from mmdet_cam_hook.testing.reference import reference_input_cams

MASK_RCNN = dict(weights={'rpn_reg': 0.2, 'fc_cls': 0.05, 'fc_reg': 0.01, 'conv_logits': 0.3},
                 biases={'fc_cls': (0.0, 0.5), 'conv_logits': (0.0, 0.3)})
RTMDET_INS = dict(calibrate=True, weights={'rtm_cls': 0.1, 'rtm_reg': 0.02, 'rtm_kernel': 0.02},
                  biases={'rtm_cls': (0.0, 0.5), 'rtm_reg': (2.0, 0.3), 'rtm_kernel': (0.0, 1.0)})
#: --model: (name shown, mmdet config, perturbation)
MODELS = {
    'mask-rcnn': ('Mask R-CNN R50', 'mask_rcnn/mask-rcnn_r50_fpn_1x_coco.py', MASK_RCNN),
    'rtmdet-ins-s': ('RTMDet-Ins-s', 'rtmdet/rtmdet-ins_s_8xb32-300e_coco.py', RTMDET_INS),
}


def reference_layers(engine, dets, meta, n):
    """The layers of the naive reference for the first ``n`` instances: those of the engine's
    mask maps (the mask level's map on the ``level`` route, every target layer on ``exact``)."""
    branch = engine.mask_branch
    if branch.route == 'exact':
        return [list(engine.layer_names)] * n
    return [[engine.layer_names[lv]] for lv in branch.levels(dets, meta)[:n].tolist()]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--model', choices=list(MODELS), default='mask-rcnn')
    parser.add_argument('--ks', nargs='+', type=int, default=[8, 32, 100])
    parser.add_argument('--size', type=int, default=512)
    parser.add_argument('--repeats', type=int, default=3)
    parser.add_argument('--method', default='gradcam')
    parser.add_argument('--baseline-max', type=int, default=8)
    parser.add_argument('--quick', action='store_true',
                        help='256 px, one repeat, a 4-instance baseline (a loaded machine)')
    args = parser.parse_args(argv)
    if args.quick:
        args.size, args.repeats, args.baseline_max = 256, 1, 4
    title, config, perturb = MODELS[args.model]
    model = build_detector(config, args.size, num_classes=80, perturb=perturb)
    image = synthetic_image(int(args.size * 0.75), args.size, seed=0)
    engine = CAMEngine(model, score_thr=0.0, topk=max(args.ks), keep_input_cams=False)
    branch, method = engine.mask_branch, args.method
    inputs, meta = preprocess(model, engine.pipeline, image)
    with torch.no_grad():
        dets = engine.adapter.decode(engine.adapter.head_outputs(engine.adapter.features(inputs)),
                                     meta, 0.0)
    print(f'{title} @ {tuple(inputs.shape[-2:])}, {method}, torch threads '
          f'{torch.get_num_threads()}')
    print('| K | fwd+bwd s | box s | +mask s | contrast s | box / fwd+bwd | +mask / box | '
          'mask part / fwd+bwd | naive / mask part | contrast / box | max diff |')
    print('|---|---|---|---|---|---|---|---|---|---|---|')
    for k in args.ks:
        engine.topk = k
        t_fb, _ = timed(lambda: forward_backward(engine, inputs, meta, dets), args.repeats,
                        inputs.device)
        engine.mask_branch = None
        t_box, _ = timed(lambda: engine.explain(image, methods=method), args.repeats,
                         inputs.device)
        t_con, _ = timed(lambda: engine.explain(image, methods=method, contrast='runner_up'),
                         args.repeats, inputs.device)
        engine.mask_branch = branch
        t_mask, res = timed(lambda: engine.explain(image, methods=method)[method], args.repeats,
                            inputs.device)
        n = min(len(res), args.baseline_max)
        ref_args = (model, inputs, method, reference_layers(engine, dets, meta, n),
                    dets.select(slice(0, n)))
        with read_only(model):
            t_naive, ref = timed(lambda: reference_input_cams(
                *ref_args, metainfo=meta, mask_branch=branch), 1, inputs.device)  # noqa: B023
        model.zero_grad(set_to_none=True)
        t_naive *= len(res) / max(n, 1)
        diff = float(np.abs(res.mask_cams[:n] - res.letterbox.to_original(
            torch.from_numpy(ref), image.shape[:2]).clamp(0, 1).numpy()).max())
        part = max(t_mask - t_box, 1e-9)
        print(f'| {len(res)} | {t_fb:.2f} | {t_box:.2f} | {t_mask:.2f} | {t_con:.2f} | '
              f'{t_box / t_fb:.2f} | {t_mask / t_box:.2f} | {part / t_fb:.1f} | '
              f'{t_naive / part:.1f} | '
              f'{t_con / t_box:.2f} | {diff:.1e} |')


if __name__ == '__main__':
    main()
