"""What the hook draws for the visualizer: the full panel for local files, the cards for the
image backends (:mod:`..visualization.cards`), the mask maps' view and the faithfulness plot.
The hook decides what to explain and when; this module only turns results into images."""
import dataclasses
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from ..cam.result import CAMResult, combined_map
from ..evaluation.metrics import match_to_ground_truth
from ..visualization.cards import render_cards
from ..visualization.delivery import Delivery
from ..visualization.plots import plot_curves
from ..visualization.render import (
    render_misses_row,
    render_panel,
    stack_rows,
)


def mask_view(result: CAMResult) -> CAMResult:
    """The result as its mask maps' views show it: the mask maps as ``cams`` (the panels and
    cards draw each instance's mask outline on its own tile, ``result.masks``)."""
    cams = torch.from_numpy(result.mask_cams)
    return dataclasses.replace(result, cams=result.mask_cams,
                               combined=combined_map(cams, result.ori_shape).numpy())


def log_views(log: Delivery, name: str, result: CAMResult, step: int, *,
              class_names: Optional[Sequence[str]], gt_bboxes: Optional[np.ndarray],
              gt_labels: Optional[np.ndarray], max_detections: int, max_size: Optional[int],
              misses_row: bool = False) -> None:
    """The full panel for local files (with the misses row under it when ``misses_row``), the
    cards (an overview and one per detection, with slots named by the ground-truth box they
    matched, :func:`..visualization.cards.detection_slots`) for the other backends; each drawn
    only if a backend takes it.

    Args:
        log (Delivery): The validation's delivery.
        name (str): The panel's name (the cards' group).
        result (CAMResult): One method's result of one probe.
        step (int): The step to log at.
        class_names (Sequence[str], optional): Label names.
        gt_bboxes (np.ndarray, optional): The probe's ground-truth boxes.
        gt_labels (np.ndarray, optional): Their labels.
        max_detections (int): Detection tiles / cards at most.
        max_size (int, optional): Longer side of the images drawn.
        misses_row (bool): Add the misses row (``result.misses``) to the panel.
    """
    panel, cards = None, {}
    if log.needs_panel:
        panel = render_panel(result, class_names=class_names, max_detections=max_detections,
                             max_size=max_size, gt_bboxes=gt_bboxes)
        if misses_row:
            panel = stack_rows(panel, render_misses_row(result, class_names))
    if log.needs_cards:
        match = None if gt_bboxes is None else match_to_ground_truth(
            result.bboxes, result.labels, gt_bboxes, gt_labels)
        cards = render_cards(result, class_names=class_names, max_detections=max_detections,
                             max_size=max_size, gt_bboxes=gt_bboxes, match=match)
    log.add_views(name, panel, cards, step)


def curves_plot(curves: Dict[str, List], title: str) -> np.ndarray:
    """One plot image of the probes' deletion/insertion curves, per method.

    Args:
        curves (dict[str, list]): Per method, each probe's curves (``fractions``,
            ``deletion``, ``insertion``).
        title (str): The plot's title.

    Raises:
        ImportError: Without matplotlib.
    """
    return plot_curves(next(iter(curves.values()))[0].fractions, {
        method: {kind: [row for c in per_probe for row in getattr(c, kind)]
                 for kind in ('deletion', 'insertion')}
        for method, per_probe in curves.items()}, title=title)
