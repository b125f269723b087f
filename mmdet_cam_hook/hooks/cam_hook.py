"""``DetCAMHook``: per-detection CAMs of a fixed probe set at every validation, for any
detector :func:`~mmdet_cam_hook.adapters.build_adapter` supports (YOLOX, RTMDet, RetinaNet,
FCOS, ATSS, GFL, YOLOv3).

MMEngine glue only: the maps come from :class:`~mmdet_cam_hook.CAMEngine`, the panels from
:func:`..visualization.render.render_panel` and the numbers from
:mod:`..evaluation.metrics`.
Add it to a stock mmdet config without dropping the config's own hooks::

    custom_imports = dict(imports=['mmdet_cam_hook'], allow_failed_imports=False)
    custom_hooks = [*_base_.custom_hooks, dict(type='DetCAMHook', probe_images=4)]

The class is registered under two names: ``DetCAMHook`` and ``YOLOXGradCAMHook``, its name
while it explained YOLOX only, so that existing configs keep working (same class, same
behaviour; :data:`YOLOXGradCAMHook` is the same object in python).
"""
import bisect
import dataclasses
import os
import os.path as osp
import re
import time
import traceback
from typing import Dict, List, Optional, Sequence, Tuple, Union

import cv2
import numpy as np
import torch
from mmdet.registry import HOOKS
from mmengine.dist import is_main_process
from mmengine.hooks import Hook
from mmengine.model import is_model_wrapper
from mmengine.runner import BaseLoop, EpochBasedTrainLoop, IterBasedTrainLoop
from mmengine.visualization import LocalVisBackend, MLflowVisBackend, TensorboardVisBackend
from torch import nn

from ..adapters import build_adapter
from ..cam.engine import CAMEngine
from ..cam.layers import resolve_layers
from ..cam.methods import check_methods
from ..checks import check_bool, check_int, check_max_size, check_score_thr, check_topk, is_int
from ..evaluation.evaluate import probe_faithfulness
from ..evaluation.metrics import energy_in_box, is_blank, pointing_game
from ..runtime.io import IMAGE_EXTENSIONS, list_images, load_image
from ..runtime.pipeline import test_pipeline_cfg
from ..runtime.state import preserved_rng
from ..visualization.render import render_panel

ProbeSpec = Union[int, str, os.PathLike, Sequence[Union[str, os.PathLike]], Sequence[int]]

#: Hooks that mmdet's own configs of a detector family (keyed by the detector's class name,
#: matched along its MRO) register in ``custom_hooks``. A user config that sets
#: ``custom_hooks = [...]`` replaces the inherited list and silently trains without them. The
#: other supported families (RetinaNet, FCOS, ATSS, GFL, YOLOv3) register none in mmdet 3.3.
FAMILY_HOOKS: Dict[str, Tuple[str, ...]] = {
    'YOLOX': ('YOLOXModeSwitchHook', 'EMAHook'),
    'RTMDet': ('PipelineSwitchHook', 'EMAHook'),
}


def count_validations(done: int, last: int, val_begin: int, milestones: Sequence[int],
                      intervals: Sequence[int]) -> int:
    """How many validations an MMEngine train loop has run once ``done`` epochs (or
    iterations) are complete, counted from the start of training.

    It replays the rule of ``EpochBasedTrainLoop.run`` and ``IterBasedTrainLoop.run``: after
    step ``c`` (1-based) the loop validates if ``c >= val_begin`` and ``c % interval == 0`` or
    ``c == last``, where ``_decide_current_val_interval`` sets ``interval`` to
    ``intervals[bisect(milestones, c + 1) - 1]`` (``milestones`` starts with 0, as the loop's
    ``dynamic_milestones``; ``dynamic_intervals`` in a config adds the later ones). Each
    interval's stretch of steps is counted in closed form, so the cost does not grow with the
    length of training.

    Args:
        done (int): Completed epochs (or iterations), the loop's ``epoch`` (or ``iter``).
        last (int): ``max_epochs`` (or ``max_iters``).
        val_begin (int): The loop's ``val_begin``.
        milestones (Sequence[int]): The loop's ``dynamic_milestones``, ascending, first 0.
        intervals (Sequence[int]): The loop's ``dynamic_intervals``, one per milestone.

    Returns:
        int: The number of validations at steps ``1..done``.
    """
    first = max(int(val_begin), 1)
    ends = [m - 2 for m in milestones[1:]] + [done]
    count = 0
    for start, end, interval in zip(milestones, ends, intervals):
        # step c uses this interval while start <= c + 1 < next milestone
        lo, hi = max(first, start - 1), min(done, end)
        if lo <= hi:
            count += hi // interval - (lo - 1) // interval
    final_interval = intervals[bisect.bisect(milestones, last + 1) - 1]
    if first <= last <= done and last % final_interval:
        count += 1  # the last step always validates
    return count


@dataclasses.dataclass(frozen=True)
class _Probe:
    """One probe image; ground truth only when it comes from the evaluation dataset."""

    name: str
    path: str
    gt_bboxes: Optional[np.ndarray] = None
    gt_labels: Optional[np.ndarray] = None


def _safe_name(text: str) -> str:
    """A name fragment that works as a TensorBoard tag, a LocalVisBackend file name, an MLflow
    artifact/metric name and a W&B key: no ``/``, no ``+`` (``gradcam++`` -> ``gradcampp``)."""
    return re.sub(r'[^A-Za-z0-9_.-]', '_', text.replace('+', 'p'))


@HOOKS.register_module(name=['DetCAMHook', 'YOLOXGradCAMHook'])
class DetCAMHook(Hook):
    """Log per-detection CAMs of fixed probe images after every validation (and test).

    Works for every detector whose head an adapter supports (``build_adapter``: YOLOX, RTMDet,
    RetinaNet, FCOS, ATSS, GFL, YOLOv3); ``type='YOLOXGradCAMHook'`` builds this same class.

    For each probe image and CAM method it logs one panel through ``runner.visualizer``, so
    every configured backend receives it: the original, the detections (with ground-truth boxes
    for dataset probes), the combined CAM overlay and one overlay per detection, labelled with
    class names and scores. The same probe images are used at every validation, so the maps can
    be compared epoch after epoch. It also logs, per method, the mean share of each detection's
    map inside its own box (``cam_val/<method>_energy_in_box``) and, for probes from the dataset
    (ground truth known), the pointing-game hit rate (``cam_val/<method>_pointing_game``). Both
    are computed on the maps before ``renormalize``.

    Image names are ``cam_{val|test}_{method}_{probe}``: no ``/`` (LocalVisBackend writes nothing
    for it), ``+`` spelled ``p``. MLflow stores a name as an artifact file, ignores ``step`` and
    needs an extension, so MLflow backends get ``{name}_{step}.png``; W&B ignores ``step`` too
    (one history row per validation, in order) and keeps the name. The step is the epoch for
    epoch-based training (as LoggerHook logs validation metrics), the iteration for
    iteration-based training, and 0 in a stand-alone ``val``/``test`` run.

    When and where it runs:

    - In ``after_val_epoch`` and ``after_test_epoch``, with priority 48, below the 49 of the
      ``EMAHook`` of mmdet's YOLOX and RTMDet configs: EMAHook swaps the EMA weights in at
      ``before_val_epoch`` and back out at ``after_val_epoch``, so a hook running before it in
      ``after_val_epoch`` explains the EMA weights that were just evaluated (and that the
      checkpoint stores). At NORMAL (50) it would explain the raw training weights instead.
    - On the main process only, on the unwrapped model, without collectives, so other ranks never
      wait for it. The engine runs the model in eval mode and fp32 (autocast disabled),
      gradients are enabled explicitly, gradients are taken with respect to activations only (no
      parameter ``.grad``), and the ``training`` flags, forward hooks and the torch, numpy and
      ``random`` RNG states are as before afterwards: training is bit-identical with and without
      the hook.
    - Bad arguments fail when the hook is built. In ``before_run`` (on every rank, before the
      first training iteration) a detector head no adapter supports (SSD, a two-stage
      detector, ...), a target layer the model lacks, a dataset index out of range and a probe
      image that cannot be decoded (empty, corrupt) fail with an error naming them, and a YOLOX
      or RTMDet run that lacks its family's own hooks (``YOLOXModeSwitchHook`` /
      ``PipelineSwitchHook``, ``EMAHook``; the usual cause is a config that replaced
      ``custom_hooks`` instead of extending it) is warned about.
    - At run time nothing stops training unless ``strict=True``: a probe that fails costs only
      its own panels (one warning with the traceback, naming it), and each visualizer backend
      receives every item on its own, so one failing backend (an unwritable ``vis_image``
      folder, whose missing PNG is detected) costs only its own copy; the first loss per backend
      is a warning naming the backend, what it lost and which backends kept it, and the summary
      line of every run counts the items each backend received.
    - ``interval`` counts validations from the start of training, replayed from the train
      loop's state (epoch or iteration, ``val_begin``, ``val_interval``, ``dynamic_intervals``;
      see :func:`count_validations`), so a run resumed with ``--resume`` draws at the same steps
      as an uninterrupted one.
    - Memory: each probe image is decoded once and kept; the maps and panels of one probe are
      computed at most ``max_image_size`` pixels a side (``CAMEngine.explain(max_size=...)``) and
      dropped once logged.

    Args:
        probe_images (int | str | PathLike | Sequence[str] | Sequence[int]): The probe set:
            an int ``n`` picks ``n`` images spread evenly over the evaluation dataset (all of
            them if it is smaller); a list of ints picks those dataset indices; a folder takes
            its images (sorted by name); a path or list of paths takes those images. Dataset
            probes carry their ground-truth boxes, which enables the pointing game. Indices
            refer to the dataset of the loop that ran (``val_dataloader`` during training,
            ``test_dataloader`` in ``tools/test.py``). Paths must exist when the hook is built.
            Defaults to 4.
        interval (int): Run after every ``interval``-th validation counted from the start of
            training (also across a resume), and always after the last validation of training
            and in a stand-alone ``val``/``test`` run. Defaults to 1.
        methods (str | Sequence[str]): CAM method(s), keys of
            :data:`~mmdet_cam_hook.METHODS`. ``gradcam`` averages the gradient over the map into
            one weight per channel, so it can light up other objects of the same class; the
            element-wise ``hirescam`` and ``layercam`` stay on the instance. All methods share one
            forward pass per image. Defaults to 'gradcam'.
        target_layers (str | Sequence[str], optional): ``named_modules()`` paths such as
            ``'neck.out_convs.0'`` (YOLOX/RTMDet, stride 8), ``'neck.fpn_convs[-1]'`` (FPN
            detectors, the coarsest level) or ``'backbone.stage4'``; maps of several layers are
            averaged. None explains each detection on the feature map of its own FPN level (the
            adapter's ``level_layers()``). Defaults to None.
        score_thr (float): Explain detections scoring at least this, in [0, 1]. Defaults to 0.3.
        topk (int, optional): Explain at most this many detections per image (highest scores
            first); bounds the time per validation. None explains all. Defaults to 10.
        renormalize (bool): Show each map min-max scaled inside its own box and zeroed outside.
            Defaults to False.
        max_detection_tiles (int): Per-detection overlays drawn in each panel (highest scores
            first); 0 draws only the original, the detections and the combined map. Defaults
            to 4.
        max_image_size (int, optional): Longer side, in pixels, of a logged panel and of the
            maps computed for it: a 6000x4000 probe is explained at this size (the detector
            still sees the whole image), so one probe's maps are K float32 maps of at most
            ``max_image_size`` pixels a side. None keeps the full size. Defaults to 1600.
        strict (bool): Raise run-time errors (a failing probe or backend) instead of logging a
            warning and continuing. Defaults to False.
        faithfulness (bool): Also log, per method, the mean deletion and insertion AUC of the
            probes' maps under the ``prior`` protocol with 10 steps and the ``blur`` fill
            (``cam_{mode}/{method}_deletion_auc_prior``, ``..._insertion_auc_prior``; see
            :func:`..evaluation.evaluate.probe_faithfulness`). Costs 2 x 11 images through
            the network per detection and method: with the demo's 8 probes, ``topk=4`` and two
            methods, about +25 s per validation (YOLOX-nano at 256 px, 2 CPU cores).
            Defaults to False.

    Raises:
        TypeError: If an argument has the wrong type.
        ValueError: If an argument has a bad value, a probe folder holds no image, or a method
            is unknown.
        FileNotFoundError: If a probe image or folder does not exist.
    """

    priority = 48

    def __init__(self,
                 probe_images: ProbeSpec = 4,
                 interval: int = 1,
                 methods: Union[str, Sequence[str]] = 'gradcam',
                 target_layers: Union[None, str, Sequence[str]] = None,
                 score_thr: float = 0.3,
                 topk: Optional[int] = 10,
                 renormalize: bool = False,
                 max_detection_tiles: int = 4,
                 max_image_size: Optional[int] = 1600,
                 strict: bool = False,
                 faithfulness: bool = False) -> None:
        self.probe_spec = self._check_probe_images(probe_images)
        self.interval = check_int(interval, 'interval')
        self.methods = check_methods(methods, arg='methods')
        self.target_layers = self._check_target_layers(target_layers)
        self.score_thr = check_score_thr(score_thr)
        self.topk = check_topk(topk)
        self.renormalize = check_bool(renormalize, 'renormalize')
        self.max_detection_tiles = check_int(max_detection_tiles, 'max_detection_tiles', low=0)
        self.max_image_size = check_max_size(max_image_size, 'max_image_size')
        self.strict = check_bool(strict, 'strict')
        self.faithfulness = check_bool(faithfulness, 'faithfulness')

        self._engine: Optional[CAMEngine] = None
        self._pipeline: Optional[list] = None
        self._probes: Dict[str, List[_Probe]] = {}
        self._images: Dict[str, np.ndarray] = {}
        self._val_rounds = 0  # validations seen, for loops whose schedule is not replayable
        self._lost_warned: set = set()  # backends whose lost panels were reported
        self._failed: set = set()  # probes whose failure traceback was logged

    # ------------------------------------------------------------------------ argument checks
    @staticmethod
    def _check_target_layers(target_layers):
        if target_layers is None:
            return None
        names = [target_layers] if isinstance(target_layers, str) else target_layers
        if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
            raise TypeError('`target_layers` must be None, a layer name or a list of them '
                            f'(e.g. ["neck.out_convs.0"]), got {target_layers!r}')
        if not names:
            raise ValueError('`target_layers` must name at least one layer, or be None for the '
                             'level-aware default, got []')
        return list(names)

    @classmethod
    def _check_probe_images(cls, probe_images: ProbeSpec) -> Union[int, List[int], List[str]]:
        """An int count, a list of dataset indices or a list of existing image paths."""
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

    # ------------------------------------------------------------------------ stages
    def before_run(self, runner) -> None:
        """Check the run against the real model and data, on every rank, so that a mistake
        stops the job before training (a check on rank 0 alone would leave the other ranks
        waiting in their first collective): the detector's head (always, also with
        ``target_layers`` given), target layers, test pipeline, dataset indices, and every probe
        image decoded (the main process keeps the decoded images). Warns when the detector
        family's own hooks are missing from the runner.

        Raises:
            ValueError: On a head no adapter supports (naming it and the supported heads), an
                unknown target layer (with close matches), a model whose level feature maps
                cannot be found (default layers), no test pipeline, a dataset index out of
                range, or a probe image that cannot be read or decoded.
        """
        model = self._unwrap(runner.model)
        adapter = build_adapter(model)  # an unsupported head fails here, before training
        self._warn_missing_family_hooks(runner, model)
        if self.target_layers is None:
            adapter.level_layers()
        else:
            resolve_layers(model, self.target_layers, arg='target_layers')
        self._pipeline = self._test_pipeline(runner, model)
        for mode in ('val', 'test'):
            loop = getattr(runner, f'_{mode}_loop', None)
            if isinstance(loop, BaseLoop):
                self._probes[mode] = self._resolve_probes(loop.dataloader.dataset, mode)
        probes = [p for mode_probes in self._probes.values() for p in mode_probes]
        if self._given_paths():  # decoded even when no val/test loop is built yet
            probes += self._resolve_probes(None, 'val')
        self._decode(probes, keep=is_main_process())

    def after_val_epoch(self, runner, metrics: Optional[Dict[str, float]] = None) -> None:
        """Explain the probe set after every ``interval``-th validation and the last one.

        Validations are counted from the start of training, replayed from the train loop's
        state (see :func:`count_validations`), so a resumed run draws at the same steps as an
        uninterrupted one.
        """
        self._val_rounds += 1
        ordinal = self._validation_ordinal(runner)
        if ordinal is None:
            ordinal = self._val_rounds
        if ordinal % self.interval == 0 or self._is_final_validation(runner):
            self._run_safely(runner, 'val')

    def after_test_epoch(self, runner, metrics: Optional[Dict[str, float]] = None) -> None:
        """Explain the probe set after a test run (``tools/test.py``)."""
        self._run_safely(runner, 'test')

    # ------------------------------------------------------------------------ helpers
    @staticmethod
    def _unwrap(model: nn.Module) -> nn.Module:
        return model.module if is_model_wrapper(model) else model

    @staticmethod
    def _test_pipeline(runner, model: nn.Module) -> Optional[list]:
        """The runner config's test pipeline (test, else val dataloader); None lets the engine
        take it from ``model.cfg``."""
        try:
            return test_pipeline_cfg(runner.cfg)
        except ValueError as exc:
            if getattr(model, 'cfg', None) is not None:
                return None
            raise ValueError('DetCAMHook needs the test pipeline: build the runner from a '
                             'config with `test_dataloader` or `val_dataloader` '
                             '(Runner.from_cfg), or set `model.cfg`') from exc

    @staticmethod
    def _is_final_validation(runner) -> bool:
        """Last validation of training, or a validation outside training."""
        loop = runner._train_loop  # reading runner.epoch would build a train loop in val runs
        if not isinstance(loop, BaseLoop):
            return True
        if isinstance(loop, EpochBasedTrainLoop):
            return runner.epoch >= runner.max_epochs
        return runner.iter >= runner.max_iters

    @staticmethod
    def _step(runner) -> int:
        loop = runner._train_loop  # dict or None in val/test-only runs: do not build it
        if not isinstance(loop, BaseLoop):
            return 0
        return runner.epoch if isinstance(loop, EpochBasedTrainLoop) else runner.iter

    @staticmethod
    def _validation_ordinal(runner) -> Optional[int]:
        """The 1-based number of the current validation since the start of training, from
        the train loop's state (epoch or iteration, ``val_begin``, dynamic intervals); None
        without a built ``EpochBasedTrainLoop`` or ``IterBasedTrainLoop``."""
        loop = runner._train_loop  # a dict or None in val/test-only runs: do not build it
        if isinstance(loop, EpochBasedTrainLoop):
            done, last = loop.epoch, loop.max_epochs
        elif isinstance(loop, IterBasedTrainLoop):
            done, last = loop.iter, loop.max_iters
        else:
            return None
        return count_validations(done, last, loop.val_begin, loop.dynamic_milestones,
                                 loop.dynamic_intervals)

    @staticmethod
    def _warn_missing_family_hooks(runner, model: nn.Module) -> None:
        """Warn when the runner lacks hooks that mmdet's configs of this detector family
        register (see :data:`FAMILY_HOOKS`): the usual cause is a config that replaced
        ``custom_hooks`` instead of extending it."""
        family = next((c.__name__ for c in type(model).__mro__ if c.__name__ in FAMILY_HOOKS),
                      None)
        if family is None:
            return
        registered = {c.__name__ for h in runner.hooks for c in type(h).__mro__}
        missing = [h for h in FAMILY_HOOKS[family] if h not in registered]
        if missing:
            runner.logger.warning(
                f'DetCAMHook: this {family} model runs without {", ".join(missing)}, '
                f"which mmdet's {family} configs register in `custom_hooks`; a config that sets "
                "`custom_hooks = [dict(type='DetCAMHook', ...)]` replaces the inherited "
                'list. Keep them: `custom_hooks = [*_base_.custom_hooks, '
                "dict(type='DetCAMHook', ...)]`.")

    def _decode(self, probes: Sequence[_Probe], keep: bool) -> None:
        """Decode every probe image now, so that an unreadable one fails when the runner is
        built; with ``keep`` the decoded images are cached (each one once)."""
        for probe in probes:
            if probe.path in self._images:
                continue
            try:
                image = load_image(probe.path)
            except (OSError, ValueError) as exc:
                raise ValueError(
                    f'`probe_images`: probe {probe.name!r} cannot be used: {exc}. Replace or '
                    'remove it; a probe must be an image file that OpenCV decodes (jpg, png, '
                    'bmp, tiff, webp, ...)') from exc
            if keep:
                self._images[probe.path] = image

    def _given_paths(self) -> bool:
        """Whether the probes are image paths (not drawn from a dataset)."""
        return isinstance(self.probe_spec, list) and isinstance(self.probe_spec[0], str)

    def _resolve_probes(self, dataset, mode: str) -> List[_Probe]:
        """Turn the probe spec into images; dataset indices get their ground truth."""
        if self._given_paths():
            return [
                _Probe(_safe_name(f'{i:02d}_{osp.splitext(osp.basename(p))[0]}'), p)
                for i, p in enumerate(self.probe_spec)
            ]
        size = len(dataset)
        if isinstance(self.probe_spec, int):
            count = min(self.probe_spec, size)
            indices = sorted({int(i) for i in np.linspace(0, size - 1, count).round()})
        else:
            indices = self.probe_spec
            bad = [i for i in indices if i >= size]
            if bad:
                raise ValueError(f'`probe_images` indices {bad} are out of range for the {mode} '
                                 f'dataset of {size} images')
        probes = []
        for idx in indices:
            info = dataset.get_data_info(idx)
            instances = [i for i in info.get('instances', []) if not i.get('ignore_flag', 0)]
            bboxes = np.array([i['bbox'] for i in instances], np.float32).reshape(-1, 4)
            labels = np.array([i['bbox_label'] for i in instances], np.int64)
            stem = osp.splitext(osp.basename(info['img_path']))[0]
            probes.append(_Probe(_safe_name(f'{idx:02d}_{stem}'), info['img_path'], bboxes,
                                 labels))
        return probes

    def _run_safely(self, runner, mode: str) -> None:
        """Main process only; a failure is a warning (with traceback) unless ``strict``."""
        if not is_main_process():
            return
        step = self._step(runner)
        try:
            self._explain_probes(runner, mode, step)
        except Exception:  # noqa: BLE001 - an optional visualisation must not stop training
            if self.strict:
                raise
            # The step keeps the message unique: MMLogger drops repeated warnings.
            runner.logger.warning(
                f'DetCAMHook failed after {mode} at step {step} and logged nothing for it; '
                'training continues (strict=True raises instead):\n' + traceback.format_exc())

    def _get_engine(self, runner) -> CAMEngine:
        if self._engine is None:  # built once, on the main process, at the first use
            self._engine = CAMEngine(self._unwrap(runner.model), target_layers=self.target_layers,
                                     score_thr=self.score_thr, topk=self.topk,
                                     test_pipeline=self._pipeline, keep_input_cams=False)
        return self._engine

    def _image(self, probe: _Probe) -> np.ndarray:
        """The probe's decoded image, read once (normally in ``before_run``) and cached: the
        same images come back every validation."""
        if probe.path not in self._images:
            self._images[probe.path] = load_image(probe.path)
        return self._images[probe.path]

    def _get_probes(self, runner, mode: str) -> List[_Probe]:
        if mode not in self._probes:
            loop = runner.val_loop if mode == 'val' else runner.test_loop
            self._probes[mode] = self._resolve_probes(loop.dataloader.dataset, mode)
        return self._probes[mode]

    @staticmethod
    def _class_names(runner, mode: str) -> Optional[Sequence[str]]:
        model = DetCAMHook._unwrap(runner.model)
        for meta in (getattr(model, 'dataset_meta', None),
                     getattr(getattr(runner, f'{mode}_dataloader').dataset, 'metainfo', None),
                     getattr(runner.visualizer, 'dataset_meta', None)):
            if meta and meta.get('classes'):
                return list(meta['classes'])
        return None

    def _explain_probes(self, runner, mode: str, step: int) -> None:
        start = time.perf_counter()
        engine = self._get_engine(runner)
        probes = self._get_probes(runner, mode)
        class_names = self._class_names(runner, mode)
        energies: Dict[str, List[float]] = {m: [] for m in self.methods}
        points = {m: [0, 0] for m in self.methods}  # pointing game: hits, matched detections
        blanks = {m: [0, 0] for m in self.methods}  # blank maps, all maps
        aucs: Dict[str, Dict[str, List[float]]] = {m: {} for m in self.methods}  # per probe
        log = _Delivery(runner.visualizer, strict=self.strict)
        failed = []
        with torch.enable_grad(), preserved_rng(next(engine.model.parameters()).device):
            for probe in probes:
                try:
                    numbers = self._explain_probe(engine, probe, mode, step, class_names, log)
                except Exception as exc:  # noqa: BLE001 - one probe must not cost the others
                    if self.strict:
                        raise
                    failed.append(probe.name)
                    # The traceback once per probe; the step keeps each message unique (MMLogger
                    # drops repeated warnings).
                    detail = f'{type(exc).__name__}: {exc}' if probe.name in self._failed \
                        else '\n' + traceback.format_exc()
                    self._failed.add(probe.name)
                    runner.logger.warning(
                        f'DetCAMHook: probe {probe.name!r} ({probe.path}) failed after '
                        f'{mode} at step {step}; the other probes are still logged (strict=True '
                        f'raises instead): {detail}')
                    continue
                for method, (energy, hits, total, blank, faith) in numbers.items():
                    energies[method].extend(energy)
                    points[method][0] += hits
                    points[method][1] += total
                    blanks[method][0] += blank
                    blanks[method][1] += blank + len(energy)
                    for key, value in faith.items():
                        aucs[method].setdefault(key, []).append(value)
        scalars = self._scalars(mode, energies, points, blanks)
        scalars.update({f'cam_{mode}/{_safe_name(m)}_{key}': float(np.mean(values))
                        for m in self.methods for key, values in aucs[m].items()})
        if scalars:
            log.add_scalars(scalars, step)
        self._report(runner, mode, step, len(probes) - len(failed), len(probes), log,
                     time.perf_counter() - start, scalars)

    def _explain_probe(self, engine: CAMEngine, probe: _Probe, mode: str, step: int,
                       class_names: Optional[Sequence[str]],
                       log: '_Delivery') -> Dict[str, tuple]:
        """Explain one probe (one forward pass for all methods) and log its panels.

        The maps come back at most ``max_image_size`` pixels a side, so ground-truth boxes are
        scaled by ``result.scale`` for the pointing game and the drawing. The numbers use the
        raw maps (``renormalize`` is for show). A blank map (all zero) is counted, not averaged
        into the energy share as 0.

        Returns:
            dict[str, tuple]: Per method, the energy shares in the boxes of the non-blank maps,
            the pointing-game hits and matched detections, the number of blank maps, and the
            faithfulness AUCs (empty unless ``faithfulness``).
        """
        numbers = {}
        image = self._image(probe)
        results = engine.explain(image, methods=self.methods, max_size=self.max_image_size)
        faith = probe_faithfulness(engine, image, results) if self.faithfulness else {}
        for method, result in results.items():
            gt_bboxes = None if probe.gt_bboxes is None else \
                probe.gt_bboxes * np.float32(result.scale)
            blank = is_blank(result.cams)
            energy = energy_in_box(result.cams[~blank], result.bboxes[~blank]).tolist()
            hits = total = 0
            if gt_bboxes is not None:
                hits, total = pointing_game(result.cams, result.bboxes, result.labels, gt_bboxes,
                                            probe.gt_labels)
            numbers[method] = (energy, hits, total, int(blank.sum()), {
                f'{c}_auc_prior': faith[f'{method}_{c}_auc_prior']
                for c in ('deletion', 'insertion') if f'{method}_{c}_auc_prior' in faith})
            panel = render_panel(result.renormalized() if self.renormalize else result,
                                 class_names=class_names, max_detections=self.max_detection_tiles,
                                 max_size=self.max_image_size, gt_bboxes=gt_bboxes)
            log.add_image(f'cam_{mode}_{_safe_name(method)}_{probe.name}', panel, step)
        return numbers

    def _scalars(self, mode: str, energies: Dict[str, List[float]],
                 points: Dict[str, List[int]],
                 blanks: Dict[str, List[int]]) -> Dict[str, float]:
        """Per method: mean energy share in the own box (non-blank maps), the share of blank
        maps, and the pointing-game rate when ground truth matched."""
        scalars = {}
        for method in self.methods:
            tag = f'cam_{mode}/{_safe_name(method)}'
            if energies[method]:
                scalars[f'{tag}_energy_in_box'] = float(np.mean(energies[method]))
            blank, maps = blanks[method]
            if maps:
                scalars[f'{tag}_blank_share'] = blank / maps
            hits, total = points[method]
            if total:
                scalars[f'{tag}_pointing_game'] = hits / total
        return scalars

    def _report(self, runner, mode: str, step: int, explained: int, probes: int,
                log: '_Delivery', seconds: float, scalars: Dict[str, float]) -> None:
        """One info line; a warning the first time a backend loses panels or scalars."""
        for backend, losses in log.lost.items():
            if backend not in self._lost_warned:
                self._lost_warned.add(backend)
                kept = [b for b in log.sent if b not in log.lost]
                runner.logger.warning(
                    f'DetCAMHook: {backend} lost {len(losses)} item(s) at step {step} '
                    f'(first: {losses[0]}); kept by: {", ".join(kept) or "no backend"}. '
                    'Training continues; later losses are counted in the summary line.')
        delivered = ', '.join(
            f'{b} {n - len(log.lost.get(b, []))}/{n}' + (' LOST' if b in log.lost else '')
            for b, n in log.sent.items())
        summary = ''.join(f'; {k.split("/")[1]}={v:.3f}' for k, v in scalars.items())
        runner.logger.info(
            f'DetCAMHook: explained {explained}/{probes} probe image(s) x '
            f'{len(self.methods)} method(s) after {mode} at step {step} in {seconds:.1f} s; '
            f'items delivered per backend: {delivered or "none"}{summary}')


#: The name this hook had while it explained YOLOX only; configs with
#: ``type='YOLOXGradCAMHook'`` build the same class.
YOLOXGradCAMHook = DetCAMHook


class _Panel:
    """One rendered panel, converted at most once into each form the backends take: RGB pixels
    (MMEngine's ``add_image``) and PNG bytes (files and TensorBoard events).

    Args:
        bgr (np.ndarray): The panel, ``(H, W, 3)`` uint8 BGR as :func:`render_panel` draws it.
    """

    def __init__(self, bgr: np.ndarray) -> None:
        self.bgr = bgr
        self._rgb: Optional[np.ndarray] = None
        self._png: Optional[bytes] = None

    @property
    def rgb(self) -> np.ndarray:
        """The panel as RGB, the format of MMEngine's ``add_image``."""
        if self._rgb is None:
            self._rgb = cv2.cvtColor(self.bgr, cv2.COLOR_BGR2RGB)
        return self._rgb

    @property
    def png(self) -> bytes:
        """The panel encoded as PNG once, with OpenCV's defaults (what ``LocalVisBackend``'s
        ``cv2.imwrite`` writes)."""
        if self._png is None:
            ok, buffer = cv2.imencode('.png', self.bgr)
            if not ok:
                raise ValueError(f'cv2.imencode could not encode a {self.bgr.shape} panel')
            self._png = buffer.tobytes()
        return self._png


class _Delivery:
    """Sends images and scalars to each of a visualizer's backends on its own, so that one
    failing backend costs only its own copy, and records what each one lost.

    Each panel is encoded as PNG once for the backends that store PNGs: ``LocalVisBackend``
    gets the bytes written to the file its ``add_image`` would write (``vis_image/{name}_
    {step}.png``), and a ``TensorboardVisBackend`` on torch's ``SummaryWriter`` gets them as
    the image summary its ``add_image`` would build, through the writer's public
    ``file_writer.add_summary`` (``add_image`` would encode again, with PIL, about 2x slower
    than OpenCV). The other backends (W&B, MLflow, any other) get ``add_image`` with RGB pixels.
    MLflow uses an image's name as the artifact file name, needs an extension and ignores
    ``step``, so MLflow backends get ``{name}_{step}.png``. ``LocalVisBackend``'s own
    ``cv2.imwrite`` fails silently (unwritable folder, full disk); the bytes written here raise
    instead, and the loss names the file.

    Args:
        visualizer (Visualizer): The runner's visualizer.
        strict (bool): Raise a backend's error instead of recording it. Defaults to False.

    Attributes:
        sent (dict[str, int]): Items sent, per backend name.
        lost (dict[str, list[str]]): What each backend lost, with the reason.
    """

    def __init__(self, visualizer, strict: bool = False) -> None:
        self.strict = strict
        self.backends = dict(getattr(visualizer, '_vis_backends', {}))
        self.sent: Dict[str, int] = {name: 0 for name in self.backends}
        self.lost: Dict[str, List[str]] = {}

    def add_image(self, name: str, image: np.ndarray, step: int) -> None:
        """Send one panel to every backend.

        Args:
            name (str): The image name (no ``/``).
            image (np.ndarray): The panel, ``(H, W, 3)`` uint8 **BGR**.
            step (int): The step.
        """
        panel = _Panel(image)
        for key, backend in self.backends.items():
            self._send(key, name, lambda b=backend: self._image_to(b, name, panel, step))

    def _image_to(self, backend, name: str, panel: _Panel, step: int) -> None:
        if isinstance(backend, MLflowVisBackend):
            backend.add_image(f'{name}_{step}.png', panel.rgb, step=step)
        elif isinstance(backend, LocalVisBackend):
            self._local_image(backend, name, panel, step)
        elif isinstance(backend, TensorboardVisBackend):
            self._tensorboard_image(backend, name, panel, step)
        else:
            backend.add_image(name, panel.rgb, step=step)

    def add_scalars(self, scalars: Dict[str, float], step: int) -> None:
        for key, backend in self.backends.items():
            self._send(key, 'scalars ' + ', '.join(scalars),
                       lambda b=backend: b.add_scalars(scalars, step=step))

    def _send(self, key: str, what: str, call) -> None:
        self.sent[key] += 1
        try:
            call()
        except Exception as exc:  # noqa: BLE001 - a backend's failure must not stop training
            if self.strict:
                raise
            self.lost.setdefault(key, []).append(f'{what}: {type(exc).__name__}: {exc}')

    @staticmethod
    def _local_image(backend: LocalVisBackend, name: str, panel: _Panel, step: int) -> None:
        """Write the PNG ``backend.add_image`` would write (same folder, name and pixels)."""
        folder = backend.experiment._img_save_dir  # `experiment` initialises the backend
        os.makedirs(folder, exist_ok=True)
        path = osp.join(folder, f'{name}_{step}.png')
        try:
            with open(path, 'wb') as file:
                file.write(panel.png)
        except OSError as exc:
            raise OSError(f'{path} was not written; check that {folder} is writable and the '
                          f'disk has space ({exc})') from exc

    @staticmethod
    def _tensorboard_image(backend: TensorboardVisBackend, name: str, panel: _Panel,
                           step: int) -> None:
        """The event ``backend.add_image`` would log (tag ``name``, the panel's pixels as PNG,
        ``step``), from the already encoded PNG; ``add_image`` itself on another writer."""
        from tensorboard.compat.proto.summary_pb2 import Summary
        from torch.utils.tensorboard import SummaryWriter

        writer = backend.experiment  # initialises the backend
        file_writer = getattr(writer, 'file_writer', None)
        if not isinstance(writer, SummaryWriter) or file_writer is None:  # tensorboardX
            backend.add_image(name, panel.rgb, step=step)
            return
        height, width = panel.bgr.shape[:2]
        image = Summary.Image(height=height, width=width, colorspace=3,
                              encoded_image_string=panel.png)
        file_writer.add_summary(Summary(value=[Summary.Value(tag=name, image=image)]), step)
