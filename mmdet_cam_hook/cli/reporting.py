"""``--report`` of both tools: the records of ``manifest.json`` and the files of
``report.html`` (:mod:`mmdet_cam_hook.visualization.report`).

Each process writes the files of its own images (thumbnails; for ``mmdet-cam-eval`` the maps
of every method too) and keeps one record per image; at the end the records are gathered
(:func:`.distributed.gather`) and rank 0 writes ``manifest.json`` and ``report.html`` in the
job's image order, so a torchrun run's report equals one process's.
"""
from __future__ import annotations

import argparse
import errno
import logging
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

from ..checks import UserError
from ..runtime.io import write_atomically
from .distributed import gather

__all__ = ['check_report_dir', 'base_manifest', 'detection_record', 'image_record', 'write_image',
           'finish_report', 'CamReport', 'EvalReport']

logger = logging.getLogger('mmdet_cam_hook.cli')

#: Where the report's own files go, inside the report's folder.
THUMBS, VIEWS, MAPS = 'report_files/thumbs', 'report_files/views', 'report_files/maps'


def check_report_dir(report: Optional[str]) -> None:
    """Refuse a ``--report DIR`` that exists and is not a folder (before anything is loaded).

    Raises:
        UserError: If it is a file.
    """
    if report and Path(report).exists() and not Path(report).is_dir():
        raise UserError(f'--report {report!r} exists and is not a folder; give a folder')


def write_image(path: Path, image: np.ndarray) -> Path:
    """``image`` (BGR) to ``path`` (folder created), atomically.

    Raises:
        UserError: If it cannot be written.
    """
    import cv2

    def write(tmp: Path) -> None:
        if not cv2.imwrite(str(tmp), image):
            raise OSError(errno.EIO, 'OpenCV could not write the image', str(tmp))

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        return write_atomically(path, write)
    except OSError as exc:
        raise UserError(f'could not write {path}: {exc.strerror or exc}') from exc


def base_manifest(tool: str, args: argparse.Namespace, methods: Sequence[str], layers,
                  class_names, seed: Optional[int], settings: dict) -> dict:
    """The run-wide fields of the manifest (``images`` and ``files`` empty).

    Args:
        tool (str): ``mmdet-cam`` or ``mmdet-cam-eval``.
        args (argparse.Namespace): The parsed arguments (config, checkpoint, score_thr, topk).
        methods (Sequence[str]): The methods, in the order the page shows them.
        layers (Sequence[str] | None): The target layers (the engine's).
        class_names (Sequence[str] | None): The class names.
        seed (int | None): The run's seed.
        settings (dict): The tool's other settings.

    Returns:
        dict: The manifest without images.
    """
    from ..visualization.manifest import SCHEMA_VERSION, file_sha256, stack_versions

    return dict(schema_version=SCHEMA_VERSION, tool=tool, versions=stack_versions(),
                config=str(args.config), checkpoint=str(args.checkpoint),
                checkpoint_sha256=file_sha256(args.checkpoint), methods=list(methods),
                layers=None if layers is None else list(layers),
                thresholds=dict(score_thr=float(args.score_thr), topk=args.topk), seed=seed,
                settings=settings,
                class_names=None if class_names is None else [str(c) for c in class_names],
                images=[], files={})


def detection_record(k: int, box, label: int, score: float, level: int, layers, class_names,
                     metrics: dict, files: dict) -> dict:
    """One detection of the manifest (see :data:`~..visualization.manifest.MANIFEST_SCHEMA`)."""
    label = int(label)
    name = str(class_names[label]) if class_names is not None and label < len(class_names) \
        else None
    return {'index': k, 'box': [round(float(v), 2) for v in box], 'label': label,
            'class': name, 'score': round(float(score), 6), 'level': int(level),
            'layers': list(layers), 'metrics': metrics, 'files': files}


def image_record(path, status: str, image: Optional[np.ndarray], files: dict,
                 detections: list) -> dict:
    """One input image of the manifest."""
    height, width = (None, None) if image is None else image.shape[:2]
    return dict(path=str(path), status=status, width=width, height=height, files=files,
                detections=detections)


def finish_report(folder: Path, manifest: dict, records: list,
                  write: bool = True) -> Optional[Path]:
    """Gather every rank's image records; on rank 0 write ``manifest.json`` and
    ``report.html`` into ``folder``, the images in the order of their keys.

    Args:
        folder (Path): The report's folder.
        manifest (dict): :func:`base_manifest`'s (``files`` filled in by the caller).
        records (list): This rank's ``(key, image record)`` pairs; the key is the image's
            place in the job.
        write (bool): Write (rank 0); False only gathers. Defaults to True.

    Returns:
        Path | None: ``report.html`` on rank 0, else None.

    Raises:
        UserError: If the report cannot be written.
    """
    import torch.distributed as dist

    from ..visualization.report import write_report

    parts = gather(records)
    if not write or (dist.is_available() and dist.is_initialized() and dist.get_rank() != 0):
        return None
    images = [r for _, r in sorted((pair for part in parts for pair in part),
                                   key=lambda pair: pair[0])]
    try:
        page, _ = write_report(folder, dict(manifest, images=images))
    except OSError as exc:
        raise UserError(f'could not write the report in {folder}: {exc.strerror or exc}') \
            from exc
    logger.info('report: %s (%d images; manifest.json beside it)', page, len(images))
    return page


# ---------------------------------------------------------------------------------------------
# mmdet-cam
class CamReport:
    """``mmdet-cam --report``: a thumbnail and a record per image of this rank; the files of
    the maps are ``mmdet-cam``'s own outputs (:mod:`.outputs`).

    Args:
        args (argparse.Namespace): The parsed arguments.
        engine (CAMEngine): The engine (its target layers).
        class_names (Sequence[str] | None): The class names.
        every (Sequence[Path]): The job's images (every rank's), in the job's order.
    """

    def __init__(self, args: argparse.Namespace, engine, class_names,
                 every: Sequence[Path]) -> None:
        self.args, self.class_names = args, class_names
        self._rank = {str(p): i for i, p in enumerate(every)}
        self.folder = Path(args.out_dir)
        self.records: list = []
        self.manifest = base_manifest(
            'mmdet-cam', args, [args.method], engine.layer_names, class_names, None,
            dict(img=str(args.img), renormalize=bool(args.renormalize),
                 level_aware=bool(engine.level_aware),
                 **({'drise_masks': args.drise_masks} if args.method == 'drise' else {})))

    def add(self, item, result, tally) -> Callable[[], list]:
        """Record one image (read or not, with or without detections).

        Args:
            item (Loaded): The image as read.
            result (CAMResult | None): Its result, None when there is nothing to write.
            tally (Tally): What became of the image (decides its status).

        Returns:
            Callable[[], list]: Writes its thumbnail (for the writer thread); returns the paths.
        """
        from ..evaluation.metrics import detection_scores
        from ..visualization.manifest import json_safe
        from ..visualization.render import draw_detections, overlay_cam
        from ..visualization.report import thumbnail
        from .outputs import output_name

        stem, method, path = item.path.stem, self.args.method, item.path
        status = 'explained' if result is not None else 'unreadable' if item.error is not None \
            else 'no_detections' if tally.empty and tally.empty[-1] == path else 'failed'
        files, detections = {}, []
        if item.image is not None:
            files['thumbnail'] = f'{THUMBS}/{stem}.jpg'
        if result is not None:
            files['view'] = output_name(stem, 'combined', method)
            scores = detection_scores(result.cams, result.bboxes)
            for k in range(len(result)):
                metrics = {method: {'energy_in_box': scores['energy_in_box'][k],
                                    'blank': scores['blank'][k]}}
                detections.append(detection_record(
                    k, result.bboxes[k], result.labels[k], result.scores[k], result.levels[k],
                    result.layers[k], self.class_names, metrics,
                    {method: output_name(stem, 'det', method, k)}))
        self.records.append((self._rank.get(str(path), len(self._rank)), json_safe(
            image_record(path, status, item.image, files, detections))))
        if item.image is None:
            return list
        target, names = self.folder / files['thumbnail'], self.class_names

        def save() -> list:
            image = item.image if result is None else draw_detections(
                overlay_cam(item.image, result.combined), result.bboxes, result.labels,
                result.scores, names)
            return [write_image(target, thumbnail(image))]

        return save

    def finish(self) -> Optional[Path]:
        """Gather the records and write the report (rank 0): see :func:`finish_report`."""
        return finish_report(self.folder, self.manifest, self.records)


# ---------------------------------------------------------------------------------------------
# mmdet-cam-eval
#: Per-detection numbers of an eval record that the manifest keeps (the rest are lists of
#: curves or per-image totals).
_EVAL_SCORES = ('energy_in_box', 'pointing', 'epg', 'off_target', 'blank')
#: The longer side of the images the eval report writes (view, maps).
EVAL_VIEW_SIDE = 320


class EvalReport:
    """``mmdet-cam-eval --report``: per image a thumbnail, the image with its detections and
    each detection's map for every method (and baseline); at the end the curves as plots.

    Args:
        args (argparse.Namespace): The parsed arguments (``args.report``: the folder, or ''
            for the folder of ``--out``).
        engine (CAMEngine): The engine (its target layers).
        settings (EvalSettings): The evaluation's settings.
        class_names (Sequence[str] | None): The class names.
    """

    def __init__(self, args: argparse.Namespace, engine, settings, class_names) -> None:
        self.folder = Path(args.report) if args.report else Path(args.out).parent
        self.engine, self.settings, self.class_names = engine, settings, class_names
        self.records: list = []
        self.manifest = base_manifest(
            'mmdet-cam-eval', args, settings.all_methods, engine.layer_names, class_names,
            settings.seed,
            dict(split=args.split, protocols=settings.protocols, steps=settings.steps,
                 fill=settings.fill, batch_size=settings.batch_size,
                 drise_masks=args.drise_masks, randomization=bool(args.randomization),
                 level_aware=bool(engine.level_aware)))

    def _layers(self, level: int) -> list:
        names = self.engine.layer_names
        return [names[level]] if self.engine.level_aware and level < len(names) else names

    def add(self, index: int, path, image: Optional[np.ndarray], keep: Optional[dict],
            record: Optional[dict]) -> None:
        """Write image ``index``'s files and keep its record (``image`` None: unreadable).

        Args:
            index (int): The image's index in the dataset.
            path: Its path.
            image (np.ndarray | None): The image, BGR.
            keep (dict | None): ``evaluate_image(keep=...)``'s detections and maps.
            record (dict | None): ``evaluate_image``'s record.

        Raises:
            UserError: If a file cannot be written.
        """
        import cv2

        from ..visualization.manifest import json_safe
        from ..visualization.render import draw_detections, overlay_cam
        from ..visualization.report import thumbnail

        if image is None:
            self.records.append((index, image_record(path, 'unreadable', None, {}, [])))
            return
        dets = keep['detections']
        bboxes = dets.bboxes.detach().cpu().numpy()
        labels, scores = dets.labels.cpu().numpy(), dets.scores.detach().cpu().numpy()
        levels = dets.levels.cpu().numpy()
        small = thumbnail(image, EVAL_VIEW_SIDE, enlarge=True)
        scale = small.shape[0] / image.shape[0]
        name = f'{index:05d}_{Path(path).stem}'
        files = {'thumbnail': f'{THUMBS}/{name}.jpg', 'view': f'{VIEWS}/{name}.jpg'}
        drawn = draw_detections(small, bboxes * scale, labels, scores, self.class_names)
        write_image(self.folder / files['thumbnail'], thumbnail(drawn))
        write_image(self.folder / files['view'], drawn)
        detections = []
        for k in range(len(bboxes)):
            metrics, det_files = {}, {}
            for method, cams in keep['maps'].items():
                row = record[method]
                metrics[method] = {key: row[key][k] for key in _EVAL_SCORES}
                for curve in ('deletion_auc', 'insertion_auc'):
                    metrics[method][curve] = {p: row[curve][p][k] for p in row[curve]}
                cam = cv2.resize(np.asarray(cams[k], np.float32), small.shape[1::-1],
                                 interpolation=cv2.INTER_AREA)
                det_files[method] = f'{MAPS}/{name}_det{k}_{method}.jpg'
                write_image(self.folder / det_files[method], draw_detections(
                    overlay_cam(small, cam), bboxes[k:k + 1] * scale, labels[k:k + 1],
                    scores[k:k + 1], self.class_names))
            detections.append(detection_record(k, bboxes[k], labels[k], scores[k], levels[k],
                                               self._layers(int(levels[k])), self.class_names,
                                               metrics, det_files))
        status = 'explained' if detections else 'no_detections'
        self.records.append((index, json_safe(image_record(path, status, image, files,
                                                           detections))))

    def _plots(self, records: list) -> dict:
        """The curves of every protocol as ``report_files/curves_{protocol}.png``."""
        from ..visualization.plots import plot_curves

        files = {}
        for protocol in self.settings.protocols:
            curves, fractions = {}, None
            for method in self.settings.all_methods:
                rows = {kind: [c for r in records for c in r[method][f'{kind}_curve'][protocol]]
                        for kind in ('deletion', 'insertion')}
                fractions = next((r[method]['fractions'] for r in records), fractions)
                curves[method] = {k: np.asarray(v, np.float64) for k, v in rows.items()}
            plot = plot_curves(fractions, curves, title=f'protocol {protocol!r}: '
                               f'{self.settings.fill} fill, {self.settings.steps} steps')
            files[f'curves {protocol}'] = f'report_files/curves_{protocol}.png'
            write_image(self.folder / files[f'curves {protocol}'], plot)
        return files

    def finish(self, records: list) -> Optional[Path]:
        """Gather the image records (every rank), then on rank 0 plot the curves of
        ``records`` (the job's eval records in image order) and write the report; nothing
        when no image could be read.

        Raises:
            UserError: If a file cannot be written.
        """
        from ..evaluation.evaluate import summarize

        if records:
            self.manifest['files'] = self._plots(records)
            self.manifest['summary'] = summarize(records, self.settings)
        return finish_report(self.folder, self.manifest, self.records, write=bool(records))
