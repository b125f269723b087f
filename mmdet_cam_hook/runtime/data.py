"""The ground truth of one dataset sample: the one reading of an mmdet dataset's annotations
that the hook's probes and ``mmdet-cam-eval`` share.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np


class Sample(NamedTuple):
    """One image of a dataset and its ground truth.

    Attributes:
        path (str): The image file (``img_path`` of the data info).
        gt_bboxes (np.ndarray): ``(G, 4)`` float64 boxes ``x1, y1, x2, y2`` in the image's
            pixels.
        gt_labels (np.ndarray): ``(G,)`` int64 class indices.
    """

    path: str
    gt_bboxes: np.ndarray
    gt_labels: np.ndarray


def ground_truth(dataset, index: int) -> Sample:
    """The image path and ground truth of sample ``index``, boxes with ``ignore_flag`` left out.

    The boxes are float64, the precision of the annotation file's numbers (float32 would round
    a coordinate such as 10.7 to 10.69999981, and move a pixel centre across a box edge in the
    metrics). The dataset's pipeline is not run: only ``get_data_info`` is read.

    Args:
        dataset (BaseDetDataset): A dataset with ``get_data_info`` (annotations loaded).
        index (int): The sample's index.

    Returns:
        Sample: ``(path, gt_bboxes (G, 4), gt_labels (G,))``.

    Raises:
        IndexError: If ``index`` is out of range (from the dataset).
    """
    info = dataset.get_data_info(index)
    kept = [i for i in info.get('instances', []) if not i.get('ignore_flag', 0)]
    return Sample(info['img_path'],
                  np.array([i['bbox'] for i in kept], np.float64).reshape(-1, 4),
                  np.array([i['bbox_label'] for i in kept], np.int64))
