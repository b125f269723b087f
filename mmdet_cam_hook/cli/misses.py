"""``mmdet-cam --ann-file COCO.json --explain-misses``: ground truth from a COCO file, by image
file name, for the engine's miss explanation (:mod:`mmdet_cam_hook.cam.misses`)."""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple

import numpy as np

from ..checks import UserError

logger = logging.getLogger('mmdet_cam_hook.cli')

__all__ = ['read_coco_ground_truth', 'ground_truth_kwargs', 'check_misses_args']

GroundTruth = Dict[str, Tuple[np.ndarray, np.ndarray]]


def read_coco_ground_truth(path: str, class_names: Optional[Sequence[str]]) -> GroundTruth:
    """Every image's ground truth in a COCO annotation file, by file name (its base name).

    A category's label is the index of its name in the model's ``class_names`` (as mmdet's
    ``CocoDataset`` maps them); without class names, its rank among the file's category ids.
    Crowd annotations and categories the model does not know are left out.

    Args:
        path (str): The COCO json file.
        class_names (Sequence[str], optional): The model's classes (``dataset_meta``).

    Returns:
        dict[str, tuple[np.ndarray, np.ndarray]]: ``file name -> (boxes (G, 4) x1y1x2y2,
        labels (G,))``.

    Raises:
        UserError: If the file cannot be read or is not COCO (naming it).
    """
    try:
        with open(path) as f:
            coco = json.load(f)
        images = {image['id']: Path(image['file_name']).name for image in coco['images']}
        categories = {c['id']: c['name'] for c in coco['categories']}
        annotations = coco.get('annotations', [])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UserError(f'--ann-file {path!r} is not a readable COCO annotation file: '
                        f'{type(exc).__name__}: {exc}') from exc
    if class_names:
        names = [str(c) for c in class_names]
        label_of = {cid: names.index(name) for cid, name in categories.items() if name in names}
    else:
        label_of = {cid: rank for rank, cid in enumerate(sorted(categories))}
    boxes: Dict[str, list] = {name: [] for name in images.values()}
    labels: Dict[str, list] = {name: [] for name in images.values()}
    for ann in annotations:
        if ann.get('iscrowd', 0) or ann['category_id'] not in label_of \
                or ann['image_id'] not in images:
            continue
        x, y, w, h = ann['bbox']
        name = images[ann['image_id']]
        boxes[name].append([x, y, x + w, y + h])
        labels[name].append(label_of[ann['category_id']])
    return {name: (np.asarray(boxes[name], np.float64).reshape(-1, 4),
                   np.asarray(labels[name], np.int64)) for name in images.values()}


def ground_truth_kwargs(args, source: Path) -> dict:
    """``explain``'s ``gt_bboxes``/``gt_labels`` for image ``source`` under
    ``--explain-misses`` (empty otherwise, or with a warning when the file has no entry for
    it)."""
    truth = getattr(args, 'ground_truth', None)
    if not getattr(args, 'explain_misses', False) or truth is None:
        return {}
    if source.name not in truth:
        logger.warning('%s is not in --ann-file: its misses are not explained', source)
        return {}
    boxes, labels = truth[source.name]
    return dict(gt_bboxes=boxes, gt_labels=labels)


def check_misses_args(args, engine, class_names) -> None:
    """Check ``--explain-misses``/``--ann-file`` against each other and the model, then read
    the file into ``args.ground_truth``.

    Raises:
        UserError: On ``--explain-misses`` without ``--ann-file``, or a model whose adapter
            lists no candidates.
    """
    from ..adapters.candidates import check_candidates

    args.ground_truth = None
    if not getattr(args, 'explain_misses', False):
        return
    if not args.ann_file:
        raise UserError('--explain-misses needs the ground truth: add --ann-file COCO.json')
    try:
        check_candidates(engine.adapter)
    except ValueError as exc:
        raise UserError(str(exc)) from exc
    args.ground_truth = read_coco_ground_truth(args.ann_file, class_names)
