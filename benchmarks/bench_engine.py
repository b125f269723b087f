"""Per-image cost of per-detection CAMs: the engine vs one forward+backward vs the naive baseline.

For each model / layer setting and K detections, measured side by side in this run:
  ours / fwd+bwd    engine time for all K maps over one plain forward + one full backward
  baseline / ours   pytorch-grad-cam's class called once per detection (what the seed tool and
                    mmyolo's Box AM effectively do) over the engine
  max |diff|        largest difference between the two sets of maps (network-input grid)

Random-init models (no weights can be downloaded here) with raised cls/obj biases (YOLOX) or
calibrated BatchNorms and a perturbed head (RTMDet, RetinaNet, FCOS; Faster R-CNN's RPN
regression and RoI classifier, as in tests/test_two_stage.py) so that there are at least
100 detections (DINO: stock random init, its 300 queries); timings are the best of
``--repeats`` runs (the baseline: one run). The layers column names the gradient route the
engine takes (``local`` window, ``chain`` of VJPs, ``exact`` backward per detection; see
``mmdet_cam_hook/engine.py``). Run it on a quiet machine, e.g. with ``OMP_NUM_THREADS=1``.

    .venv/bin/python benchmarks/bench_engine.py                  # every model, K = 1 8 32 100
    .venv/bin/python benchmarks/bench_engine.py --models rtmdet-s
    .venv/bin/python benchmarks/bench_engine.py --quick          # nano@256, K = 1 8 32
    .venv/bin/python benchmarks/bench_engine.py --models retinanet-r50 fcos-r50 --baseline-max 8
    .venv/bin/python benchmarks/bench_engine.py --models faster-rcnn-r50 --ks 8 32
    .venv/bin/python benchmarks/bench_engine.py --models dino-4scale-r50 --ks 8 --repeats 1
    .venv/bin/python benchmarks/bench_engine.py --models yolox-s --ks 100 --chunk-sizes 4 16 64
    .venv/bin/python benchmarks/bench_engine.py --device cuda:0          # the same on a GPU
    .venv/bin/python benchmarks/bench_engine.py --models fsaf-r50 fovea-r50 yolof-r50 ssdlite \
        --ks 32 --baseline-max 8     # issue 19's dense heads with an exact window

``ours`` is timed as the hook and the CLI run the engine (``keep_input_cams=False``); the maps
compared with the baseline come from one more call that keeps them on the input grid.
``peak MB`` is the memory one ``explain`` call adds at its peak (on a GPU
``torch.cuda.max_memory_allocated``; on the CPU the process's peak resident size, Linux only),
maps of the K detections included; ``--chunk-sizes`` repeats the K rows with each
``CAMEngine(chunk_size=...)`` (how many detections' gradients are held at once).
``--exact-vjp loop batched probe`` repeats the rows of models with exact-route layers with the
route's VJPs one per detection (the default), batched with ``is_grads_batched``, or chosen by
the engine's timed probe (``GradientRoutes.batched['exact']`` = False / True / None), side by
side in one run:

    .venv/bin/python benchmarks/bench_engine.py --models dino-4scale-r50 grounding-dino-r50 \
        --ks 8 32 --repeats 1 --baseline-max 1 --exact-vjp loop batched
"""
import argparse
import time

import numpy as np
import torch

from mmdet_cam_hook import CAMEngine
from mmdet_cam_hook.runtime.pipeline import preprocess
from mmdet_cam_hook.runtime.state import read_only
from mmdet_cam_hook.testing import build_detector, build_yolox, peak_memory, synthetic_image
from mmdet_cam_hook.testing.reference import reference_input_cams

RTMDET = dict(calibrate=True, weights={'rtm_cls': 0.02, 'rtm_reg': 0.02},
              biases={'rtm_cls': (0.0, 0.5), 'rtm_reg': (2.0, 0.3)})
RETINANET = dict(weights={'conv.weight': 0.03, 'retina_cls': 0.03, 'retina_reg': 0.003},
                 biases={'retina_cls': (0., 0.5)})
FCOS = dict(weights={'conv.weight': 0.03, 'conv_cls': 0.03, 'conv_centerness': 0.03,
                     'conv_reg': 0.03},
            biases={'conv_cls': (0., 0.5), 'conv_centerness': (0., 0.5)})
FOVEA = dict(weights={'conv.weight': 0.03, 'conv_cls': 0.03, 'conv_reg': 0.03},
             biases={'conv_cls': (0., 0.5), 'conv_reg': (0., 0.3)})
YOLOF = dict(calibrate=True, weights={'cls_score': 0.05, 'object_pred': 0.05, 'bbox_pred': 0.003},
             biases={'cls_score': (0., 0.5), 'object_pred': (2., 0.5)})
SSD = dict(calibrate=True, weights={'cls_convs': 0.05}, biases={'cls_convs': (0., 0.5)})
SABL_RETINA = dict(calibrate=True, weights={'conv.weight': 0.08, 'retina_cls': 0.05,
                                            'retina_bbox_cls': 0.05, 'retina_bbox_reg': 0.003},
                   biases={'retina_cls': (0., 0.5)})
ATSS = dict(weights={'conv.weight': 0.03, 'atss_cls': 0.03, 'atss_centerness': 0.03,
                     'atss_reg': 0.003},
            biases={'atss_cls': (0., 0.5), 'atss_centerness': (0., 0.5)})
FASTER_RCNN = dict(weights={'rpn_reg': 0.2, 'fc_cls': 0.05, 'fc_reg': 0.01},
                   biases={'fc_cls': (0., 0.5)})

#: name -> (builder(input_size), input size, a layer upstream of the level maps or None: the
#: level-aware default only)
MODELS = {
    'yolox-nano': (lambda size: build_yolox('nano', input_size=size, num_classes=80), 416,
                   'backbone.stage4'),
    'yolox-s': (lambda size: build_yolox('s', input_size=size, num_classes=80), 640,
                'backbone.stage4'),
    'rtmdet-s': (lambda size: build_detector(
        'rtmdet/rtmdet_s_8xb32-300e_coco.py', size, num_classes=80, perturb=RTMDET,
        cfg_options={'model.test_cfg.nms_pre': 1000}), 640, 'backbone.stage4'),
    # FPN models at a CPU-sized input (their configs test at 1333x800): keep-ratio resize to
    # 512 on the longest side, padded to a multiple of 32 (512x384 for the 4:3 image).
    'retinanet-r50': (lambda size: build_detector(
        'retinanet/retinanet_r50_fpn_1x_coco.py', size, num_classes=80, perturb=RETINANET),
        512, 'backbone.layer4'),
    'fcos-r50': (lambda size: build_detector(
        'fcos/fcos_r50-caffe_fpn_gn-head_1x_coco.py', size, num_classes=80, perturb=FCOS),
        512, 'backbone.layer4'),
    # Two-stage and DETR at CPU-sized inputs: Faster R-CNN at 512x384 (as RetinaNet), DINO at
    # 320x240 (its exact route costs one backward through the transformer per detection).
    'faster-rcnn-r50': (lambda size: build_detector(
        'faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py', size, num_classes=80,
        perturb=FASTER_RCNN), 512, 'backbone.layer4'),
    # issue 19's RoI/query families: Double-Head R-CNN (the RoI route through its classification
    # branch), Sparse R-CNN (exact route: self-attention mixes the 100 proposals)
    'dh-faster-rcnn-r50': (lambda size: build_detector(
        'double_heads/dh-faster-rcnn_r50_fpn_1x_coco.py', size, num_classes=80,
        perturb=FASTER_RCNN), 512, 'backbone.layer4'),
    'sparse-rcnn-r50': (lambda size: build_detector(
        'sparse_rcnn/sparse-rcnn_r50_fpn_1x_coco.py', size, num_classes=80), 512, None),
    'dino-4scale-r50': (lambda size: build_detector(
        'dino/dino-4scale_r50_8xb2-12e_coco.py', size, num_classes=80), 320, None),
    # Grounding DINO R50 at its config's sizes (900 queries, 6+6 layers) with a random BERT of
    # BERT-base's shape (12 layers of 768) saved here; prompted with three phrases
    'grounding-dino-r50': (lambda size: _grounding_dino(size), 320, None),
    # Issue 19's dense heads with an exact window (the rest take the exact route, as FCOS).
    'fsaf-r50': (lambda size: build_detector(
        'fsaf/fsaf_r50_fpn_1x_coco.py', size, num_classes=80, perturb=RETINANET), 512,
        'backbone.layer4'),
    'fovea-r50': (lambda size: build_detector(
        'foveabox/fovea_r50_fpn_4xb4-1x_coco.py', size, num_classes=80, perturb=FOVEA), 512,
        'backbone.layer4'),
    'yolof-r50': (lambda size: build_detector(
        'yolof/yolof_r50-c5_8xb8-1x_coco.py', size, num_classes=80, perturb=YOLOF,
        cfg_options={'model.test_cfg.nms_pre': 1000}), 512, 'backbone.layer4'),
    # This session's dense heads with an exact window: SABL RetinaNet (bucketed boxes, 11x11
    # window), ATSS on DyHead (its level maps are the neck's tuple outputs, `neck:i`).
    'sabl-retinanet-r50': (lambda size: build_detector(
        'sabl/sabl-retinanet_r50_fpn_1x_coco.py', size, num_classes=80, perturb=SABL_RETINA,
        cfg_options={'model.test_cfg.nms_pre': 1000}), 512, 'backbone.layer4'),
    'atss-dyhead-r50': (lambda size: build_detector(
        'dyhead/atss_r50_fpn_dyhead_1x_coco.py', size, num_classes=80, perturb=ATSS,
        cfg_options={'model.test_cfg.nms_pre': 1000}), 512, 'backbone.layer4'),
    'ssdlite': (lambda size: _ssd(build_detector(
        'ssd/ssdlite_mobilenetv2-scratch_8xb24-600e_coco.py', size, num_classes=80,
        perturb=SSD, cfg_options={'model.test_cfg.nms_pre': 1000})), 320, 'backbone.layer3'),
}


def _ssd(model):
    """mmdet 3.3's ``SSDHead`` lacks the ``loss_cls`` its decoding reads (see
    tests/adapters/test_adapters.py); the engine does not need it, ``model.predict`` does."""
    from mmdet.models.losses import CrossEntropyLoss

    model.bbox_head.loss_cls = CrossEntropyLoss(use_sigmoid=False)
    return model
# RTMDet keeps every (prior, class) pair above the score threshold before NMS (nms_pre=30000 per
# level); a random-init model scores all 8400 x 80 of them ~0.5, which makes NMS, not the CAMs,
# the cost. nms_pre=1000 (RetinaNet's, FCOS's) keeps the decode at a trained model's size.


def _grounding_dino(size):
    import tempfile

    from mmdet_cam_hook.testing.text import build_grounding_dino, tiny_bert

    bert = tiny_bert(tempfile.mkdtemp(prefix='bench_bert_'), hidden_size=768, num_layers=12)
    return build_grounding_dino(bert, input_size=size, small=False)


def forward_backward(engine, inputs, meta, dets):
    """One plain forward and one full backward (parameter gradients included) of one score."""
    model, adapter = engine.model, engine.adapter
    with read_only(model), torch.enable_grad():
        outs = adapter.head_outputs(adapter.features(inputs), [meta])
        adapter.scores(outs, dets.select(slice(0, 1))).sum().backward()
    model.zero_grad(set_to_none=True)


def synchronize(device):
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def timed(fn, repeats, device, budget=20.0):
    """Best of up to ``repeats`` runs (as ``timeit`` reports: on a shared machine the other
    runs measure the neighbours); no more runs once ``budget`` seconds are spent. The device
    is synchronised before and after each run."""
    times = []
    for _ in range(repeats):
        synchronize(device)
        t0 = time.perf_counter()
        out = fn()
        synchronize(device)
        times.append(time.perf_counter() - t0)
        if sum(times) > budget:
            break
    return min(times), out


#: ``--exact-vjp`` choices: the value of ``GradientRoutes.batched['exact']`` each one sets.
EXACT_VJP = {'loop': False, 'batched': True, 'probe': None}


def bench(model, input_size, layers, ks, repeats, method, baseline_max=None, chunk_size=16,
          exact_vjp='loop'):
    image = synthetic_image(int(input_size * 0.75), input_size, seed=0)
    device = next(model.parameters()).device
    # timed as the hook and the CLI run it (no maps kept on the input grid); the maps compared
    # with the baseline come from one more call that keeps them
    engine = CAMEngine(model, target_layers=layers, score_thr=0.0, topk=max(ks),
                       chunk_size=chunk_size, keep_input_cams=False)
    engine.routes.batched['exact'] = EXACT_VJP[exact_vjp]
    inputs, meta = preprocess(model, engine.pipeline, image)
    adapter = engine.adapter
    with torch.no_grad():
        dets = adapter.decode(adapter.head_outputs(adapter.features(inputs), [meta]), meta,
                              0.0)
    rows = []
    route = '/'.join(sorted({layer.route for layer in engine.layers}))
    if exact_vjp != 'loop':
        if 'exact' not in route:
            return route, []  # no exact-route layer: the loop's rows
        route = f'{route}, {exact_vjp}'  # the probe's choice is made on the first call
    for k in ks:
        engine.topk = k
        t_fb, _ = timed(lambda: forward_backward(engine, inputs, meta, dets), repeats, device)
        t_ours, lean = timed(lambda: engine.explain(image, methods=method)[method],  # noqa: B023
                             repeats, device)
        _, peak = peak_memory(engine.explain, image, methods=method, device=device)
        engine.keep_input_cams = True
        res = engine.explain(image, methods=method)[method]
        engine.keep_input_cams = False
        # The baseline costs one forward+backward per detection: on the first ``baseline_max``
        # detections only, scaled to K (and compared with ours on those).
        n = len(res) if baseline_max is None else min(len(res), baseline_max)
        sub = dets.select(slice(0, n))
        args = (model, inputs, method, res.layers[:n], sub)
        with read_only(model):
            t_base, ref = timed(lambda: reference_input_cams(*args), 1, device)  # noqa: B023
        model.zero_grad(set_to_none=True)
        t_base *= len(res) / max(n, 1)
        # on the input grid, and on the image (the timed maps, straight from the layer's grid,
        # against the reference's taken there by the letterbox)
        diff = 0.0 if not n else max(
            float(np.abs(res.input_cams[:n] - ref).max()),
            float(np.abs(lean.cams[:n] - res.letterbox.to_original(ref)).max()))
        rows.append((k, len(res), t_fb, t_ours, t_base, diff, n < len(res), peak / 2**20))
    return route, rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--quick', action='store_true', help='yolox-nano@256 only, K = 1 8 32')
    parser.add_argument('--models', nargs='+', choices=sorted(MODELS), default=sorted(MODELS))
    parser.add_argument('--ks', nargs='+', type=int, default=[1, 8, 32, 100])
    parser.add_argument('--repeats', type=int, default=3)
    parser.add_argument('--method', default='gradcam')
    parser.add_argument('--device', default='cpu', help='torch device, e.g. cuda:0')
    parser.add_argument('--chunk-sizes', nargs='+', type=int, default=[16],
                        help='CAMEngine(chunk_size=...) values to measure (default 16)')
    parser.add_argument('--exact-vjp', nargs='+', choices=list(EXACT_VJP), default=['loop'],
                        help="the exact route's VJPs: one per detection (loop, the default), "
                        'batched, or chosen by the timed probe; several: rows side by side')
    parser.add_argument('--baseline-max', type=int, default=None,
                        help='time the baseline on at most this many detections and scale it '
                        'to K (marked ~); default: all K')
    args = parser.parse_args(argv)
    settings = [('yolox-nano', 256, [1, 8, 32])] if args.quick else \
        [(name, MODELS[name][1], args.ks) for name in args.models]
    device = torch.device(args.device)
    print(f'method={args.method}, device={device}, torch threads={torch.get_num_threads()}')
    print('| model | layers | chunk | K | ours (s) | fwd+bwd (s) | ours / fwd+bwd | peak MB '
          '| baseline (s) | baseline / ours | max abs diff |')
    print('|---|---|---|---|---|---|---|---|---|---|---|')
    for name, input_size, ks in settings:
        build, _, upstream = MODELS[name]
        model = build(input_size).to(device)
        for layers in (None, [upstream]) if upstream else (None, ):
            for chunk, vjp in [(c, v) for c in args.chunk_sizes for v in args.exact_vjp]:
                route, rows = bench(model, input_size, layers, ks, args.repeats, args.method,
                                    args.baseline_max, chunk, vjp)
                label = 'level-aware default' if layers is None else layers[0]
                label = f'{label} ({route})'
                for _k, got, t_fb, t_ours, t_base, diff, scaled, peak in rows:
                    est = '~' if scaled else ''
                    print(f'| {name}@{input_size} | {label} | {chunk} | {got} | {t_ours:.3f} | '
                          f'{t_fb:.3f} | {t_ours / t_fb:.2f} | {peak:.0f} | {est}{t_base:.2f} | '
                          f'{est}{t_base / t_ours:.1f} | {diff:.1e} |', flush=True)


if __name__ == '__main__':
    main()
