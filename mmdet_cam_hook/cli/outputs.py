"""What files ``mmdet-cam`` writes for an image, and the rules that keep them from overwriting
each other or the inputs.

For each image ``{stem}.*`` with at least one detection (``k`` is the detection's index in score
order, starting at 0)::

    {stem}_gradcam.jpg           all detections' maps (pixel-wise max) with boxes and labels;
                                 named as in the seed tool whatever --method is
    {stem}_det{k}_{method}.jpg   detection k's own map with its box
    {stem}_mask_det{k}_{method}.jpg   instance k's mask map with its mask outline and box
                                 (models with masks: Mask R-CNN, Cascade Mask R-CNN)
    --save-all:  {stem}_original.jpg, {stem}_detection.jpg (boxes only) and
                 {stem}_panel.jpg (everything in one labelled image)
    --save-raw:  {stem}_{method}.npz (bboxes, labels, scores, levels, cams, combined,
                 renormalized, ...; contrast_labels with --contrast; masks and
                 mask_cams for models with masks)

Refused before the model is loaded (:func:`check_inputs`, :func:`check_out_dir`): two inputs
with one stem; with ``--method gradcam`` inputs ``a`` and ``a_det0`` (both would write
``a_det0_gradcam.jpg``); inputs ``a`` and ``a_mask`` (both would write
``a_mask_det0_{method}.jpg``); an ``--out-dir`` that is the input folder; an output name that
is one of the inputs.
"""
from __future__ import annotations

import errno
import re
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

from ..checks import UserError
from ..runtime.io import write_atomically

__all__ = ['COMBINED_NAME', 'EXTRA_NAMES', 'output_name', 'check_inputs', 'check_out_dir',
           'save_outputs']

#: The name of the all-detections image, ``{stem}_gradcam.jpg`` whatever --method is (the
#: seed's); ``{stem}_det{k}_{method}.jpg`` is detection k's.
COMBINED_NAME = 'gradcam'
#: The images ``--save-all`` adds, ``{stem}_{name}.jpg``.
EXTRA_NAMES = ('original', 'detection', 'panel')
_DETECTION_STEM = re.compile(r'(.+)_det(0|[1-9][0-9]*)')


def output_name(stem: str, kind: str, method: str, k: Optional[int] = None) -> str:
    """The file name of one output of image ``stem``.

    Args:
        stem (str): The image's file stem.
        kind (str): ``'combined'``, ``'det'`` (detection ``k``'s map), ``'mask_det'``
            (instance ``k``'s mask map), ``'raw'``, ``'miss'`` (the map of ground-truth box
            ``k``'s best candidate, ``--explain-misses``), ``'misses'`` (the false positives
            and misses) or one of :data:`EXTRA_NAMES` (``'original'``, ``'detection'``: the
            boxes, ``'panel'``).
        method (str): ``--method``.
        k (int, optional): The detection's index, for ``kind='det'``; the ground-truth box's,
            for ``kind='miss'``.

    Returns:
        str: E.g. ``street_gradcam.jpg``, ``street_det0_hirescam.jpg``, ``street_hirescam.npz``.
    """
    if kind == 'combined':
        return f'{stem}_{COMBINED_NAME}.jpg'
    if kind == 'det':
        return f'{stem}_det{k}_{method}.jpg'
    if kind == 'mask_det':
        return f'{stem}_mask_det{k}_{method}.jpg'
    if kind == 'raw':
        return f'{stem}_{method}.npz'
    if kind == 'miss':
        return f'{stem}_miss{k}_{method}.jpg'
    if kind == 'misses':
        return f'{stem}_misses.jpg'
    if kind in EXTRA_NAMES:
        return f'{stem}_{kind}.jpg'
    kinds = ['combined', 'det', 'mask_det', 'raw', 'miss', 'misses', *EXTRA_NAMES]
    raise ValueError(f'`kind` must be one of {kinds}, got {kind!r}')


def _owner(name: str, stems, method: str, save_all: bool, save_raw: bool) -> Optional[str]:
    """The stem among ``stems`` that writes file ``name`` (None if none does)."""
    kinds = ['combined', *(EXTRA_NAMES if save_all else ()), *(['raw'] if save_raw else [])]
    for kind in kinds:
        suffix = output_name('', kind, method)
        if name.endswith(suffix) and name[:-len(suffix)] in stems:
            return name[:-len(suffix)]
    base = re.fullmatch(r'(.+)_det(0|[1-9][0-9]*)_' + re.escape(method) + r'\.jpg', name)
    if base and base[1].endswith('_mask') and base[1][:-len('_mask')] in stems:
        return base[1][:-len('_mask')]
    return base[1] if base and base[1] in stems else None


def check_inputs(paths: Sequence[Path], method: str) -> None:
    """Refuse inputs whose outputs would overwrite each other.

    Args:
        paths (Sequence[Path]): The images of the run.
        method (str): ``--method``; it decides which output names two stems can share.

    Raises:
        UserError: If two inputs share a file stem, or (with ``--method gradcam``) one's stem
            is the other's plus ``_det{k}`` (``a_det0_gradcam.jpg`` is both ``a_det0``'s
            combined map and ``a``'s detection 0), or one's stem is the other's plus ``_mask``
            (``a_mask_det0_{method}.jpg`` is ``a``'s mask map 0 and ``a_mask``'s detection 0).
    """
    seen: dict[str, Path] = {}
    for p in paths:
        if p.stem in seen:
            raise UserError(f'{seen[p.stem]} and {p} share the name {p.stem!r}: their outputs '
                            'would overwrite each other; process them separately')
        seen[p.stem] = p
    for stem, p in seen.items():
        base = _DETECTION_STEM.fullmatch(stem)
        if method == COMBINED_NAME and base and base[1] in seen:
            raise UserError(
                f'{seen[base[1]]} and {p} would both write {output_name(stem, "combined", method)}'
                f" (the first one's detection {int(base[2])}, the second one's combined map); "
                'process them separately or rename one')
        if stem.endswith('_mask') and stem[:-len('_mask')] in seen:
            raise UserError(
                f'{seen[stem[:-len("_mask")]]} and {p} would both write '
                f'{output_name(stem[:-len("_mask")], "mask_det", method, 0)} (the first one\'s '
                "mask map 0 of a model with masks, the second one's detection 0); process them "
                'separately or rename one')


def check_out_dir(paths: Sequence[Path], img: str, out_dir: Path, method: str,
                  save_all: bool = False, save_raw: bool = False) -> None:
    """Refuse an output folder that would mix the outputs into the inputs or overwrite one.

    Args:
        paths (Sequence[Path]): The images of the run (every rank's).
        img (str): The tool's ``img`` argument (a file, a folder or a glob).
        out_dir (Path): ``--out-dir``.
        method (str): ``--method``.
        save_all (bool): ``--save-all``. Defaults to False.
        save_raw (bool): ``--save-raw``. Defaults to False.

    Raises:
        UserError: If ``out_dir`` exists and is not a folder, is the input folder ``img``, or
            one of its output names would be one of ``paths`` (an input in ``out_dir`` named
            like another input's output, e.g. ``a_gradcam.jpg`` beside ``a.jpg``).
    """
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f'--out-dir {str(out_dir)!r} exists and is not a folder')
    where = out_dir.resolve()
    if Path(img).is_dir() and Path(img).resolve() == where:
        raise UserError(f'--out-dir {str(out_dir)!r} is the input folder: the outputs would be '
                        'written among the images (and taken as inputs by the next run); '
                        'choose another --out-dir')
    stems = {p.stem for p in paths}
    for p in paths:
        owner = _owner(p.name, stems, method, save_all, save_raw)
        if owner is not None and p.resolve().parent == where:
            raise UserError(f'--out-dir {str(out_dir)!r}: the outputs of image {owner!r} would '
                            f'overwrite the input {str(p)!r}; choose another --out-dir')


# ---------------------------------------------------------------------------------------------
# Writing
def _write(path: Path, write: Callable[[Path], object]) -> Path:
    """``write(tmp)`` to a temporary name, renamed to ``path`` once complete."""
    try:
        return write_atomically(path, write)
    except OSError as exc:
        raise UserError(f'could not write {path}: {exc.strerror or exc}') from exc


def _write_image(path: Path, image: np.ndarray) -> Path:
    import cv2

    def write(tmp: Path) -> None:
        if not cv2.imwrite(str(tmp), image):
            raise OSError(errno.EIO, 'OpenCV could not write the image', str(tmp))

    return _write(path, write)


def save_outputs(result, stem: str, out_dir: Path, class_names, save_all: bool = False,
                 save_raw: bool = False, source: Optional[Path] = None,
                 renormalized: bool = False) -> list[Path]:
    """Write the images (and ``.npz``) of one result under the names of the module docstring.

    Args:
        result (CAMResult): One method's result for the image, with detections.
        stem (str): The image's file stem.
        out_dir (Path): The output folder (created if missing).
        class_names (Sequence[str], optional): Label names for the boxes.
        save_all (bool): Also the original, the detections and the panel. Defaults to False.
        save_raw (bool): Also the ``.npz`` of the arrays. Defaults to False.
        source (Path, optional): The image's path, stored in the ``.npz``. Defaults to None.
        renormalized (bool): The maps were renormalised in their boxes (``--renormalize``);
            stored in the ``.npz`` as ``renormalized``. Defaults to False.

    Returns:
        list[Path]: The files written.

    Raises:
        UserError: If the folder cannot be created or a file cannot be written.
    """
    from ..visualization.render import (
        draw_detections,
        draw_mask_outlines,
        overlay_cam,
        render_panel,
    )

    image, method = result.image, result.method
    boxes, labels, scores = result.bboxes, result.labels, result.scores
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f'cannot create --out-dir {str(out_dir)!r}: {exc}') from exc

    def name(kind: str, k: Optional[int] = None) -> Path:
        return out_dir / output_name(stem, kind, method, k)

    written = [_write_image(name('combined'),
                            draw_detections(overlay_cam(image, result.combined), boxes, labels,
                                            scores, class_names))]
    for k in range(len(result)):
        written.append(_write_image(name('det', k), draw_detections(
            overlay_cam(image, result.cams[k]), boxes[k:k + 1], labels[k:k + 1],
            scores[k:k + 1], class_names)))
    for k in range(len(result) if result.mask_cams is not None else 0):
        written.append(_write_image(name('mask_det', k), draw_detections(
            draw_mask_outlines(overlay_cam(image, result.mask_cams[k]), result.masks[k:k + 1]),
            boxes[k:k + 1], labels[k:k + 1], scores[k:k + 1], class_names)))
    if save_all:
        written.append(_write_image(name('original'), image))
        written.append(_write_image(name('detection'),
                                    draw_detections(image, boxes, labels, scores, class_names)))
        written.append(_write_image(name('panel'), render_panel(result, class_names=class_names)))
    if save_raw:
        arrays = dict(
            bboxes=boxes, labels=labels, scores=scores, levels=result.levels, cams=result.cams,
            combined=result.combined, method=np.array(method),
            renormalized=np.array(bool(renormalized)),
            layers=np.array([','.join(names) for names in result.layers], dtype=str),
            class_names=np.array([] if class_names is None else [str(c) for c in class_names],
                                 dtype=str),
            image=np.array('' if source is None else str(source)))
        if result.contrast_labels is not None:  # --contrast: class B of each detection
            arrays['contrast_labels'] = result.contrast_labels
        if result.masks is not None:  # a model with masks
            arrays['masks'] = result.masks
        if result.mask_cams is not None:
            arrays['mask_cams'] = result.mask_cams
        written.append(_write(name('raw'), lambda tmp: np.savez_compressed(tmp, **arrays)))
    if result.misses is not None:
        written += _write_misses(result, name, class_names)
    return written


def _write_misses(result, name, class_names) -> list[Path]:
    """``--explain-misses``: each miss's candidate map (the GT box orange, the candidate
    magenta, labelled with the reason) and the misses row of the panel."""
    from ..visualization.render import draw_miss, render_misses_row

    written = [_write_image(name('misses'), render_misses_row(result, class_names,
                                                              max_misses=len(result.misses)))]
    for miss in result.misses:
        if result.method in miss.cams:
            written.append(_write_image(name('miss', miss.gt_index),
                                        draw_miss(result, miss, class_names)))
    return written
