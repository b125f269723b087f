"""Deletion and insertion curves as a plot (matplotlib, the Agg backend: no display, no
window), for ``mmdet-cam-eval --report`` and the hook's ``faithfulness=True``.

matplotlib is optional (the ``report`` extra); :func:`plot_curves` raises a clear
``ImportError`` without it.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

__all__ = ['BASELINE_STYLE', 'plot_curves']

#: Baselines drawn dashed and grey-ish, so the methods stand out.
BASELINE_STYLE = {'random': dict(color='0.45', linestyle='--'),
                  'box': dict(color='0.2', linestyle=':')}


def _pyplot():
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise ImportError('plotting the curves needs matplotlib (pip install '
                          "'mmdet-cam-hook[report]' or matplotlib==3.11.2)") from exc
    return Figure, FigureCanvasAgg


def plot_curves(fractions: Sequence[float], curves: Mapping[str, Mapping[str, np.ndarray]],
                title: str = '', size=(9.0, 3.6), dpi: int = 100) -> np.ndarray:
    """The deletion and insertion curves of several methods, side by side: per method the
    mean over detections and, shaded, the spread between the 25th and 75th percentiles.

    Args:
        fractions (Sequence[float]): ``(S,)`` share of the pixels removed / inserted.
        curves (Mapping[str, Mapping[str, np.ndarray]]): ``{method: {'deletion': (N, S),
            'insertion': (N, S)}}``, one row per detection; a method with no rows is listed
            in the legend as "(no detections)".
        title (str): The figure's title. Defaults to ''.
        size (tuple[float, float]): Inches. Defaults to (9.0, 3.6).
        dpi (int): Dots per inch. Defaults to 100.

    Returns:
        np.ndarray: The plot, ``(H, W, 3)`` uint8 **BGR** (what OpenCV writes and
        :class:`~.delivery.Delivery` sends).

    Raises:
        ImportError: Without matplotlib.
        ValueError: If a method's curves do not have ``len(fractions)`` columns.
    """
    figure, canvas_agg = _pyplot()
    x = np.asarray(fractions, np.float64)
    fig = figure(figsize=size, dpi=dpi, layout='constrained')
    canvas = canvas_agg(fig)
    axes = fig.subplots(1, 2, sharey=True)
    for ax, kind, better in zip(axes, ('deletion', 'insertion'), ('lower', 'higher')):
        for i, (method, rows) in enumerate(curves.items()):
            ys = np.asarray(rows.get(kind, np.zeros((0, len(x)))), np.float64).reshape(-1,
                                                                                       len(x))
            style = BASELINE_STYLE.get(method, dict(color=f'C{i}'))
            if not len(ys):
                ax.plot([], [], label=f'{method} (no detections)', **style)
                continue
            ax.plot(x, ys.mean(0), label=f'{method} (n={len(ys)})', linewidth=1.6, **style)
            low, high = np.percentile(ys, [25, 75], axis=0)
            ax.fill_between(x, low, high, color=style['color'], alpha=0.15, linewidth=0)
        ax.set_title(f'{kind} ({better} area is more faithful)', fontsize=10)
        ax.set_xlabel(f'share of pixels {"removed" if kind == "deletion" else "inserted"}')
        ax.set_xlim(0, 1)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel('score (mean, 25-75% band)')
    axes[1].legend(fontsize=8, loc='best')
    if title:
        fig.suptitle(title, fontsize=11)
    canvas.draw()
    rgba = np.asarray(canvas.buffer_rgba())
    return np.ascontiguousarray(rgba[..., 2::-1])
