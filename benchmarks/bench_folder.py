"""Images per second of ``mmdet-cam`` on a folder: the plain loop vs the CLI's overlapped
reading/writing and its ``--batch-size``.

Settings, measured side by side in this run on the same folder of generated images:
  plain loop        load_image, engine.explain, save_outputs, one image after the other (what
                    the CLI did before it read ahead and wrote in the background)
  --batch-size 1    the CLI's run(): the next image is read and the last one's outputs are
                    written on background threads while this one is explained
  --batch-size N    as above, N images per forward pass (CAMEngine.explain_batch)

Each setting is timed from loading the checkpoint to the last file written (imports and the
interpreter's start are not counted), best of ``--repeats``, after one untimed warm-up run.
Random-init YOLOX (raised cls/obj biases, so that it detects things) saved as a checkpoint
and config the way tests/cli/test_cli.py does; ``--topk`` detections per image, so each image
writes ``topk + 1`` JPEGs. Run it on a quiet machine:

    .venv/bin/python benchmarks/bench_folder.py                       # YOLOX-s@640, 16 images
    .venv/bin/python benchmarks/bench_folder.py --model nano --input-size 416 --images 8
    .venv/bin/python benchmarks/bench_folder.py --batch-sizes 1 2 4 8 16 --repeats 2
"""
import argparse
import shutil
import tempfile
import time
from pathlib import Path

import cv2
import torch

from mmdet_cam_hook import CAMEngine
from mmdet_cam_hook.cam.methods import METHODS
from mmdet_cam_hook.cli.cam import build_parser, run
from mmdet_cam_hook.cli.outputs import save_outputs
from mmdet_cam_hook.runtime.io import load_image
from mmdet_cam_hook.runtime.model import init_model
from mmdet_cam_hook.testing import SIZES, build_yolox, synthetic_image


def make_inputs(root: Path, model_size: str, input_size: int, images: int, height: int,
                width: int) -> tuple:
    """Config, checkpoint and a folder of images under ``root``."""
    model = build_yolox(model_size, input_size)
    config, checkpoint, folder = root / 'model.py', root / 'model.pth', root / 'images'
    model.cfg.dump(str(config))
    torch.save(dict(state_dict=model.state_dict(), meta=dict(dataset_meta=model.dataset_meta)),
               checkpoint)
    folder.mkdir()
    for i in range(images):
        cv2.imwrite(str(folder / f'img{i:03d}.jpg'), synthetic_image(height, width, seed=i))
    return config, checkpoint, folder


def plain_loop(config: Path, checkpoint: Path, folder: Path, out: Path, topk: int,
               score_thr: float) -> None:
    """One image after the other, nothing in the background."""
    model = init_model(str(config), str(checkpoint), device='cpu')
    engine = CAMEngine(model, score_thr=score_thr, topk=topk, keep_input_cams=False)  # as the CLI
    classes = model.dataset_meta['classes']
    for path in sorted(folder.iterdir()):
        result = engine.explain(load_image(path), methods=['gradcam'])['gradcam']
        if len(result):
            save_outputs(result, path.stem, out, classes, False, False, path)


def cli_run(config: Path, checkpoint: Path, folder: Path, out: Path, topk: int,
            score_thr: float, batch_size: int) -> None:
    """The CLI's run() on parsed arguments."""
    args = build_parser(list(METHODS)).parse_args([
        str(config), str(checkpoint), str(folder), '--out-dir', str(out), '--device', 'cpu',
        '--topk', str(topk), '--score-thr', str(score_thr), '--batch-size', str(batch_size)])
    code = run(args)
    if code != 0:
        raise RuntimeError(f'run() returned {code}')


def best_time(fn, out: Path, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        shutil.rmtree(out, ignore_errors=True)
        start = time.perf_counter()
        fn(out)
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--model', default='s', choices=SIZES, help='YOLOX size (default s)')
    parser.add_argument('--input-size', type=int, default=640,
                        help='Test pipeline size (default 640)')
    parser.add_argument('--images', type=int, default=16, help='Images (default 16)')
    parser.add_argument('--image-size', type=int, nargs=2, default=(480, 640),
                        metavar=('H', 'W'), help='Image height and width (default 480 640)')
    parser.add_argument('--batch-sizes', type=int, nargs='+', default=(1, 4, 8),
                        help='--batch-size settings of the CLI (default 1 4 8)')
    parser.add_argument('--topk', type=int, default=5, help='Detections per image (default 5)')
    parser.add_argument('--score-thr', type=float, default=0.3, help='Default 0.3')
    parser.add_argument('--repeats', type=int, default=1, help='Timed runs per setting')
    opts = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix='bench_folder_') as tmp:
        root = Path(tmp)
        config, checkpoint, folder = make_inputs(root, opts.model, opts.input_size, opts.images,
                                                 *opts.image_size)
        settings = {'plain loop': lambda out: plain_loop(config, checkpoint, folder, out,
                                                         opts.topk, opts.score_thr)}
        for n in opts.batch_sizes:
            settings[f'--batch-size {n}'] = (
                lambda out, n=n: cli_run(config, checkpoint, folder, out, opts.topk,
                                         opts.score_thr, n))
        cli_run(config, checkpoint, folder, root / 'warmup', opts.topk, opts.score_thr,
                max(opts.batch_sizes))
        seconds = {name: best_time(fn, root / 'out', opts.repeats)
                   for name, fn in settings.items()}

    h, w = opts.image_size
    print(f'\nYOLOX-{opts.model} at {opts.input_size}, {opts.images} images of {h}x{w}, '
          f'top {opts.topk} detections each, gradcam, {torch.get_num_threads()} torch threads\n')
    print('| setting | seconds | images/s | speed-up |')
    print('|---|---|---|---|')
    base = seconds['plain loop']
    for name, sec in seconds.items():
        print(f'| {name} | {sec:.2f} | {opts.images / sec:.2f} | {base / sec:.2f}x |')


if __name__ == '__main__':
    main()
