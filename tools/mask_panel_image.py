"""Make the README's picture of the instance-mask demo from a demo run's own panels.

``python tools/demo.py --model rtmdet-ins-tiny`` writes, per probe, method and validation, the
class maps' panel ``cam_val_{method}_{probe}_{step}.png`` and the mask maps' panel
``cam_val_{method}_mask_{probe}_{step}.png`` (``vis_data/vis_image/``). This script cuts the
same tiles out of both, the detections (class row) or the combined mask map (mask row), then
the first three detections' own maps, each with its instance's mask outline, and stacks the two
rows under a title each::

    python tools/mask_panel_image.py work_dirs/demo/<timestamp> --probe 04_000005 \\
        --method hirescam --out docs/demo_panel_rtmdet_ins.png

The panels' layout is :func:`mmdet_cam_hook.visualization.render.render_panel`'s: tiles of one
size in rows of :data:`~mmdet_cam_hook.visualization.render.PANEL_COLUMNS`, 4 px apart.
"""
from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np
from PIL import Image  # Pillow: a dependency of matplotlib, so of mmengine

from mmdet_cam_hook.visualization.render import PANEL_COLUMNS

_GAP = 4
#: The tiles taken from each panel: 1 = detections, 2 = combined, 3.. = detection 0, 1, 2.
_TILES = {'class': (1, 3, 4, 5), 'mask': (2, 3, 4, 5)}


def panel_tiles(panel: np.ndarray, count: int) -> list[np.ndarray]:
    """The ``count`` captioned tiles of a panel with ``count`` tiles, in order."""
    rows = -(-count // PANEL_COLUMNS)
    columns = min(count, PANEL_COLUMNS)
    cell_w = (panel.shape[1] - (columns - 1) * _GAP) // columns
    cell_h = (panel.shape[0] - (rows - 1) * _GAP) // rows
    tiles = []
    for i in range(count):
        r, c = divmod(i, PANEL_COLUMNS)
        y, x = r * (cell_h + _GAP), c * (cell_w + _GAP)
        tiles.append(panel[y:y + cell_h, x:x + cell_w])
    return tiles


def _titled_row(tiles: Sequence[np.ndarray], title: str) -> np.ndarray:
    row = np.full((tiles[0].shape[0], len(tiles) * tiles[0].shape[1] + (len(tiles) - 1) * _GAP,
                   3), 255, np.uint8)
    for i, tile in enumerate(tiles):
        x = i * (tile.shape[1] + _GAP)
        row[:, x:x + tile.shape[1]] = tile
    bar = np.full((26, row.shape[1], 3), 255, np.uint8)
    cv2.putText(bar, title, (4, 19), cv2.FONT_HERSHEY_SIMPLEX, 0.6, (0, 0, 0), 1, cv2.LINE_AA)
    return np.concatenate([bar, row], axis=0)


def mask_panel_image(vis_image: Path, probe: str, method: str, step: int) -> np.ndarray:
    """The picture: the class row over the mask row (uint8 BGR)."""
    rows = []
    for view, name in (('class', f'cam_val_{method}_{probe}_{step}.png'),
                       ('mask', f'cam_val_{method}_mask_{probe}_{step}.png')):
        panel = cv2.imread(str(vis_image / name))
        if panel is None:
            raise FileNotFoundError(f'no panel {vis_image / name}')
        tiles = panel_tiles(panel, 3 + 4)  # original, detections, combined, 4 detections
        kind = 'class maps' if view == 'class' else 'mask maps'
        rows.append(_titled_row([tiles[i] for i in _TILES[view]],
                                f'{method}, {kind}: each detection with its own mask outline'))
    gap = np.full((8, rows[0].shape[1], 3), 255, np.uint8)
    return np.concatenate([rows[0], gap, rows[1]], axis=0)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('log_dir', type=Path, help='the demo run, <work-dir>/<timestamp>')
    parser.add_argument('--probe', required=True, help="probe name, e.g. '04_000005'")
    parser.add_argument('--method', default='hirescam', help='default: %(default)s')
    parser.add_argument('--step', type=int, default=None,
                        help='the validation epoch (default: the last one logged)')
    parser.add_argument('--out', type=Path, required=True, help='the PNG to write')
    args = parser.parse_args(argv)
    vis_image = args.log_dir / 'vis_data' / 'vis_image'
    step = args.step
    if step is None:
        pattern = re.compile(rf'cam_val_{re.escape(args.method)}_mask_{re.escape(args.probe)}'
                             r'_(\d+)\.png')
        steps = [int(m.group(1)) for p in vis_image.glob('*.png')
                 if (m := pattern.fullmatch(p.name))]
        if not steps:
            parser.error(f'no mask panel of probe {args.probe!r} and method {args.method!r} in '
                         f'{vis_image}')
        step = max(steps)
    image = mask_panel_image(vis_image, args.probe, args.method, step)
    # a 256-colour palette, as the README's other panels: a quarter of the bytes
    Image.fromarray(image[..., ::-1]).quantize(256).save(args.out, optimize=True)
    print(f'{args.out}: {image.shape[1]}x{image.shape[0]} (step {step})')
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
