"""How fast a large run's report.html opens: a page of N images (1,000 by default, 3
detections each, two methods), with real thumbnail files, opened from disk in headless
Chromium (the OS's, driven by Playwright: :mod:`mmdet_cam_hook.testing.browser`).

Prints, for each N, the time from navigation to the page's ``load`` event and to the end of
its script (gallery and table built), the bytes of report.html, and as a ratio the time per
image against the smallest N. A measurement, not a test: no assert on time.

Usage: python benchmarks/bench_report.py [--images 1000] [--repeat 3]
"""
import argparse
import statistics
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

from mmdet_cam_hook.testing.browser import browser_unavailable, launch_chromium, open_page
from mmdet_cam_hook.visualization.manifest import SCHEMA_VERSION, stack_versions
from mmdet_cam_hook.visualization.report import thumbnail, write_report

METHODS = ('gradcam', 'hirescam')


def make_run(folder: Path, num_images: int, seed: int = 0) -> None:
    """Thumbnails, map files and a manifest of ``num_images`` images in ``folder``."""
    rng = np.random.default_rng(seed)
    (folder / 'report_files' / 'thumbs').mkdir(parents=True)
    images = []
    for i in range(num_images):
        pixels = rng.integers(0, 255, (240, 320, 3), dtype=np.uint8)
        cv2.imwrite(str(folder / 'report_files' / 'thumbs' / f'img{i:04d}.jpg'),
                    thumbnail(pixels))
        dets = []
        for k in range(3):
            files = {m: f'img{i:04d}_det{k}_{m}.jpg' for m in METHODS}
            for name in files.values():  # the first image's maps only: the others are lazy
                if i == 0:
                    cv2.imwrite(str(folder / name), pixels)
            dets.append(dict(index=k, box=[10.0, 10.0, 90.0, 80.0], label=k, class_=None,
                             score=float(rng.uniform(0.3, 1)), level=k,
                             layers=[f'neck.out_convs.{k}'], files=files,
                             metrics={m: {'energy_in_box': float(rng.uniform()),
                                          'blank': False} for m in METHODS}))
            dets[-1]['class'] = dets[-1].pop('class_')
        images.append(dict(path=f'imgs/img{i:04d}.jpg', status='explained', width=320,
                           height=240, files={'thumbnail': f'report_files/thumbs/img{i:04d}.jpg',
                                              'view': f'img{i:04d}_det0_gradcam.jpg'},
                           detections=dets))
    write_report(folder, dict(
        schema_version=SCHEMA_VERSION, tool='mmdet-cam', versions=stack_versions(),
        config='bench.py', checkpoint='bench.pth', checkpoint_sha256=None, methods=list(METHODS),
        layers=None, thresholds=dict(score_thr=0.3, topk=None), seed=None, settings={},
        class_names=None, images=images, files={}))


def open_times(page_path: Path, browser, repeat: int) -> tuple:
    """Median seconds to the load event and to the script's end over ``repeat`` openings."""
    loads, readies = [], []
    for _ in range(repeat):
        start = time.perf_counter()
        with open_page(page_path, browser=browser) as session:
            loaded = time.perf_counter() - start
            session.page.wait_for_selector('body[data-ready="1"]', state='attached')
            ready = time.perf_counter() - start
            assert not session.network_requests and not session.console_errors
        loads.append(loaded)
        readies.append(ready)
    return statistics.median(loads), statistics.median(readies)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--images', type=int, default=1000)
    parser.add_argument('--repeat', type=int, default=3)
    args = parser.parse_args()
    reason = browser_unavailable()
    if reason:
        raise SystemExit(f'bench_report: {reason}')
    sizes = sorted({10, args.images})
    with tempfile.TemporaryDirectory() as tmp, launch_chromium() as browser:
        rows = []
        for n in sizes:
            folder = Path(tmp) / f'run{n}'
            make_run(folder, n)
            load, ready = open_times(folder / 'report.html', browser, args.repeat)
            rows.append((n, load, ready, (folder / 'report.html').stat().st_size))
    base = rows[0][2] / rows[0][0]
    print(f'{"images":>7} {"load s":>8} {"ready s":>8} {"html KB":>8} {"ready/img vs 10":>16}')
    for n, load, ready, size in rows:
        print(f'{n:>7} {load:>8.2f} {ready:>8.2f} {size / 1024:>8.0f} {ready / n / base:>16.3f}')


if __name__ == '__main__':
    main()
