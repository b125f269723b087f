"""The hook's probe images: the ``probe_images`` argument checked, resolved against the loop's
dataset (with ground truth) or as image files, and each image decoded once.
"""
import dataclasses
import os
import os.path as osp
import re
from typing import Dict, List, Optional, Sequence, Union

import numpy as np
from mmengine.runner import BaseLoop

from ..checks import check_int, is_int
from ..runtime.data import ground_truth
from ..runtime.io import IMAGE_EXTENSIONS, list_images, load_image

ProbeSpec = Union[int, str, os.PathLike, Sequence[Union[str, os.PathLike]], Sequence[int]]

#: The loops whose dataset the probes can come from.
MODES = ('val', 'test')


@dataclasses.dataclass(frozen=True)
class Probe:
    """One probe image; ground truth only when it comes from the evaluation dataset.

    Attributes:
        name (str): The name fragment of its panels (:func:`safe_name`).
        path (str): The image file.
        index (int): Its dataset index, or its position among the given paths (seeds the
            faithfulness curves, as ``mmdet-cam-eval`` seeds image ``index``).
        gt_bboxes (np.ndarray, optional): ``(G, 4)`` ground-truth boxes in image pixels.
        gt_labels (np.ndarray, optional): ``(G,)`` their classes.
    """

    name: str
    path: str
    index: int = 0
    gt_bboxes: Optional[np.ndarray] = None
    gt_labels: Optional[np.ndarray] = None


def safe_name(text: str) -> str:
    """A name fragment that works as a TensorBoard tag, a LocalVisBackend file name, an MLflow
    artifact/metric name and a W&B key: no ``/``, no ``+`` (``gradcam++`` -> ``gradcampp``).

    Args:
        text (str): Any text.

    Returns:
        str: ``text`` with every other character than ``[A-Za-z0-9_.-]`` replaced by ``_``.
    """
    return re.sub(r'[^A-Za-z0-9_.-]', '_', text.replace('+', 'p'))


def check_probe_images(probe_images: ProbeSpec) -> Union[int, List[int], List[str]]:
    """Validate ``probe_images`` when the hook is built.

    Args:
        probe_images (ProbeSpec): A count, dataset indices, a folder, or image paths.

    Returns:
        int | list[int] | list[str]: The count, the distinct indices, or absolute paths.

    Raises:
        TypeError: On a value of the wrong type (or a mix of indices and paths).
        ValueError: On a count < 1, a negative index, an empty list or an imageless folder.
        FileNotFoundError: If an image file does not exist.
    """
    hint = 'a count, a list of dataset indices, an image folder, or a list of image paths'
    if is_int(probe_images):
        return check_int(probe_images, 'probe_images')
    if isinstance(probe_images, (str, os.PathLike)):
        path = os.fspath(probe_images)
        if osp.isdir(path):
            files = list_images(path)
            if not files:
                raise ValueError(f'`probe_images` folder {path!r} holds no image '
                                 f'(extensions {list(IMAGE_EXTENSIONS)}; hidden files are '
                                 'skipped)')
            return [osp.abspath(f) for f in files]
        probe_images = [path]
    if not isinstance(probe_images, (list, tuple)) or not probe_images:
        raise (ValueError if isinstance(probe_images, (list, tuple)) else TypeError)(
            f'`probe_images` must be {hint}, got {probe_images!r}')
    if all(is_int(i) for i in probe_images):
        bad = [i for i in probe_images if i < 0]
        if bad:
            raise ValueError(f'`probe_images` indices must be >= 0, got {bad}')
        return list(dict.fromkeys(int(i) for i in probe_images))
    if not all(isinstance(p, (str, os.PathLike)) for p in probe_images):
        raise TypeError(f'`probe_images` must be {hint} (not a mix), got {probe_images!r}')
    paths = [os.fspath(p) for p in probe_images]
    missing = [p for p in paths if not osp.isfile(p)]
    if missing:
        raise FileNotFoundError(f'`probe_images`: no such image file(s): {missing}')
    return [osp.abspath(p) for p in paths]


class ProbeSet:
    """The probes of one hook: resolved once per loop (``'val'``, ``'test'``), each image
    decoded once and kept (the same images come back at every validation).

    Args:
        probe_images (ProbeSpec): See :func:`check_probe_images`.

    Attributes:
        spec (int | list[int] | list[str]): The checked ``probe_images``.
        images (dict[str, np.ndarray]): Decoded images by path.
    """

    def __init__(self, probe_images: ProbeSpec) -> None:
        self.spec = check_probe_images(probe_images)
        self.images: Dict[str, np.ndarray] = {}
        self._resolved: Dict[str, List[Probe]] = {}

    def __getitem__(self, mode: str) -> List[Probe]:
        """The resolved probes of loop ``mode`` (KeyError before they are resolved)."""
        return self._resolved[mode]

    @property
    def given_paths(self) -> bool:
        """Whether the probes are image paths (not drawn from a dataset)."""
        return isinstance(self.spec, list) and isinstance(self.spec[0], str)

    def prepare(self, runner, keep: bool) -> None:
        """Resolve the probes of every built val/test loop and decode every image, so that a
        bad index or an unreadable image fails when the run starts.

        ``runner._val_loop`` / ``_test_loop`` are read because the public ``val_loop`` /
        ``test_loop`` would *build* a loop (and its dataloader) the run may never use.

        Args:
            runner (Runner): The runner, in ``before_run``.
            keep (bool): Keep the decoded images (the main process, which draws).

        Raises:
            ValueError: On a dataset index out of range or an image that cannot be decoded.
        """
        for mode in MODES:
            loop = getattr(runner, f'_{mode}_loop', None)
            if isinstance(loop, BaseLoop):
                self._resolved[mode] = self.resolve(loop.dataloader.dataset, mode)
        probes = [p for mode_probes in self._resolved.values() for p in mode_probes]
        if self.given_paths:  # decoded even when no val/test loop is built yet
            probes += self.resolve(None, 'val')
        for probe in probes:
            if probe.path not in self.images:
                image = self._decode(probe)
                if keep:
                    self.images[probe.path] = image

    def for_loop(self, runner, mode: str) -> List[Probe]:
        """The probes of loop ``mode`` (``'val'`` or ``'test'``), resolved at the first call."""
        if mode not in self._resolved:
            loop = runner.val_loop if mode == 'val' else runner.test_loop
            self._resolved[mode] = self.resolve(loop.dataloader.dataset, mode)
        return self._resolved[mode]

    def image(self, probe: Probe) -> np.ndarray:
        """The probe's decoded image, read once (normally in :meth:`prepare`) and cached."""
        if probe.path not in self.images:
            self.images[probe.path] = load_image(probe.path)
        return self.images[probe.path]

    def resolve(self, dataset, mode: str) -> List[Probe]:
        """Turn the spec into probes; dataset indices get their ground truth
        (:func:`~mmdet_cam_hook.runtime.data.ground_truth`).

        Args:
            dataset (BaseDetDataset | None): The loop's dataset (unused for paths).
            mode (str): ``'val'`` or ``'test'``, for the error message.

        Returns:
            list[Probe]: The probes, in the spec's order (a count: spread evenly).

        Raises:
            ValueError: If an index is out of range for the dataset.
        """
        if self.given_paths:
            return [Probe(safe_name(f'{i:02d}_{osp.splitext(osp.basename(p))[0]}'), p, i)
                    for i, p in enumerate(self.spec)]
        size = len(dataset)
        if isinstance(self.spec, int):
            count = min(self.spec, size)
            indices = sorted({int(i) for i in np.linspace(0, size - 1, count).round()})
        else:
            indices = self.spec
            bad = [i for i in indices if i >= size]
            if bad:
                raise ValueError(f'`probe_images` indices {bad} are out of range for the {mode} '
                                 f'dataset of {size} images')
        probes = []
        for idx in indices:
            path, gt_bboxes, gt_labels = ground_truth(dataset, idx)
            stem = osp.splitext(osp.basename(path))[0]
            probes.append(Probe(safe_name(f'{idx:02d}_{stem}'), path, idx, gt_bboxes, gt_labels))
        return probes

    @staticmethod
    def _decode(probe: Probe) -> np.ndarray:
        try:
            return load_image(probe.path)
        except (OSError, ValueError) as exc:
            raise ValueError(
                f'`probe_images`: probe {probe.name!r} cannot be used: {exc}. Replace or '
                'remove it; a probe must be an image file that OpenCV decodes (jpg, png, '
                'bmp, tiff, webp, ...)') from exc
