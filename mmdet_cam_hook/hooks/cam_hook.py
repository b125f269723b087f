"""``DetCAMHook``: per-detection CAMs of a fixed probe set at every validation, for any
detector an adapter supports (:func:`~mmdet_cam_hook.adapters.supported_heads`; the README's
table is generated from the same registry).

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
import time
import traceback
from typing import Dict, List, Optional, Sequence, Union

import torch
from mmdet.registry import HOOKS
from mmengine.dist import is_main_process
from mmengine.hooks import Hook
from mmengine.model import is_model_wrapper
from torch import nn

from ..adapters import build_adapter
from ..adapters.candidates import check_candidates
from ..adapters.grounding import phrases_of
from ..cam.engine import CAMEngine
from ..cam.layers import resolve_layers
from ..cam.methods import methods_from
from ..cam.targets import check_contrast
from ..checks import check_bool, check_int, check_max_size, check_score_thr, check_topk
from ..evaluation.evaluate import image_seed, probe_faithfulness
from ..evaluation.metrics import MapScores
from ..runtime.state import preserved_rng
from ..visualization.delivery import Delivery
from . import schedule
from .arguments import (
    check_contrast_classes,
    check_method_specs,
    check_target_layers,
    runner_test_pipeline,
    warn_missing_hooks,
)
from .probes import Probe, ProbeSet, ProbeSpec, safe_name
from .run_log import MISSES, RunLog, RunNumbers
from .views import log_views, mask_view


@HOOKS.register_module(name=['DetCAMHook', 'YOLOXGradCAMHook'])
class DetCAMHook(Hook):
    """Log per-detection CAMs of fixed probe images after every validation (and test).

    Works for every detector whose head an adapter supports
    (:func:`~mmdet_cam_hook.adapters.supported_heads`); ``type='YOLOXGradCAMHook'`` builds this
    same class.

    For each probe image and CAM method it logs, through every backend of
    ``runner.visualizer``: to ``LocalVisBackend`` one full-resolution panel (the original, the
    detections with ground-truth boxes for dataset probes, the combined CAM overlay and one
    overlay per detection, labelled with class names and scores); to the image backends
    (TensorBoard, W&B, MLflow, any other) cards drawn for their ~330 px-wide default view
    (:mod:`..visualization.cards`): an overview and one card per detection.
    The same probe images are used at every validation, so the maps can
    be compared epoch after epoch. It also logs, per method, the numbers of
    :class:`~..evaluation.metrics.MapScores` over all probes' detections, on the maps before
    ``renormalize``, named as in ``mmdet-cam-eval`` (the same definitions):
    ``cam_val/<method>_energy_in_box`` and ``_blank_share``, and for probes from the dataset
    (ground truth known) ``_pointing_game``, ``_energy_pointing_game`` and
    ``_off_target_share``. Blank maps are left out of all but ``blank_share``.

    Image names are ``cam_{val|test}_{method}_{probe}``: no ``/`` (LocalVisBackend writes nothing
    for it), ``+`` spelled ``p`` (MLflow gets ``{name}_{step}.png``; W&B ignores ``step``:
    :class:`~..visualization.delivery.Delivery`). The cards are ``{name}/{slot}``, grouped
    under ``name`` by TensorBoard and W&B: ``all`` (the overview), then per detection ``gt_j``
    when it matched ground-truth box ``j`` of a dataset probe (so the card follows one object
    from validation to validation), ``fp_r`` for the other detections of a dataset probe and
    ``det_r`` (rank ``r`` by score) on a probe without ground truth
    (:func:`~..visualization.cards.detection_slots`); MLflow stores them as
    ``{name}/{slot}_{step}.png``. The step is the epoch for epoch-based
    training (as LoggerHook logs validation metrics), the iteration for iteration-based
    training, and 0 in a stand-alone ``val``/``test`` run.

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
      its own panels (one warning with the traceback, naming it), and one failing backend (an
      unwritable ``vis_image`` folder, whose missing PNG is detected) only its own copy; the
      first loss per backend is a warning naming what was lost and which backends kept it, and
      the summary line of every run counts the items each backend received.
    - ``interval`` counts validations from the start of training, replayed from the train
      loop's state (epoch or iteration, ``val_begin``, ``val_interval``, ``dynamic_intervals``;
      see :func:`.schedule.count_validations`), so a run resumed with ``--resume`` draws at
      the same steps as an uninterrupted one.
    - Memory: each probe image is decoded once and kept; the maps and panels of one probe are
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
        methods (str | dict | Sequence[str | dict]): CAM method(s): keys of
            :data:`~mmdet_cam_hook.METHODS`, or configured ones as dicts, e.g.
            ``dict(type='drise', num_masks=100)`` (D-RISE's cost is ``num_masks`` images
            through the network per probe; its default 1000 costs ~45 s per validation for two
            probes on YOLOX-nano at 256 px on 2 CPU cores). ``gradcam`` averages the gradient
            over the map into one weight per channel, so it can light up other objects of the
            same class; the element-wise ``hirescam`` and ``layercam`` stay on the instance.
            All gradient methods share one forward pass per image. Defaults to 'gradcam'.
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
        max_detection_tiles (int): Per-detection overlays drawn in each panel, and cards sent
            to the image backends (highest scores first); 0 draws only the original, the
            detections and the combined map (the overview card). Defaults to 4.
        max_image_size (int, optional): Longer side, in pixels, of a logged panel or card and of
            the maps computed for it: a 6000x4000 probe is explained at this size (the detector
            still sees the whole image), so one probe's maps are K float32 maps of at most
            ``max_image_size`` pixels a side. None keeps the full size. Defaults to 1600.
        strict (bool): Raise run-time errors (a failing probe or backend) instead of logging a
            warning and continuing. Defaults to False.
        faithfulness (bool): Also log, per method, the deletion and insertion AUC of the
            probes' maps under the ``prior`` protocol with 10 steps and the ``blur`` fill, the
            mean over detections with each probe seeded as ``mmdet-cam-eval`` seeds its image
            (:func:`..evaluation.evaluate.image_seed` of seed 0 and the probe's index)
            (``cam_{mode}/{method}_deletion_auc_prior``, ``..._insertion_auc_prior``; see
            :func:`..evaluation.evaluate.probe_faithfulness`). Costs 2 x 11 images through
            the network per detection and method: with the demo's 8 probes, ``topk=4`` and two
            methods, about +25 s per validation (YOLOX-nano at 256 px, 2 CPU cores).
            Defaults to False.
        explain_misses (bool): For probes with ground truth (dataset probes): explain what
            the model missed and where it fired wrongly (:mod:`~..cam.misses`). Each panel gets
            a row with the false positives (red) and, per missed ground-truth box (orange), its
            best candidate before the threshold and NMS (magenta) with that candidate's map and
            the reason (``missed: 0.12 < 0.30``, ``suppressed by #2``, ``top-k cut``, ``seen as
            B``, ``no candidate``); the scalars ``cam_{mode}/misses``, ``false_positives``,
            ``miss_candidate_score`` and ``miss_share_<reason>`` are logged per validation.
            Off by default: each miss costs one more map per method (from the same forward
            pass), and early in training nearly every ground-truth box is a miss.
            Defaults to False.
        contrast (None | str | int): Log contrastive maps, "class A rather than class B"
            (``CAMEngine.explain(..., contrast=...)``): ``'runner_up'`` (each detection's
            second-best class at its own prior, RoI or query), a class index or a class name.
            None logs the maps of each detection's own score. Defaults to None.
        texts (str | Sequence[str], optional): The prompt of a text-prompted detector
            (Grounding DINO): ``'red car . person'`` or a list of phrases; panels name each
            detection by its phrase. None: the dataset's class names, as mmdet's own validation
            prompts. Refused (at ``before_run``) for other detectors. Defaults to None.

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
                 faithfulness: bool = False,
                 explain_misses: bool = False,
                 texts: Union[None, str, Sequence[str]] = None,
                 contrast: Union[None, str, int] = None) -> None:
        self._probes = ProbeSet(probe_images)
        self.probe_spec = self._probes.spec
        self.interval = check_int(interval, 'interval')
        # the configured methods (names, objects or dict(type='drise', num_masks=50)) and,
        # for the scalars and panel names, their names
        self._methods = methods_from(check_method_specs(methods), arg='methods')
        self.methods = [method.name for method in self._methods]
        self.target_layers = check_target_layers(target_layers)
        self.score_thr = check_score_thr(score_thr)
        self.topk = check_topk(topk)
        self.renormalize = check_bool(renormalize, 'renormalize')
        self.max_detection_tiles = check_int(max_detection_tiles, 'max_detection_tiles', low=0)
        self.max_image_size = check_max_size(max_image_size, 'max_image_size')
        self.strict = check_bool(strict, 'strict')
        self.faithfulness = check_bool(faithfulness, 'faithfulness')
        self.explain_misses = check_bool(explain_misses, 'explain_misses')
        self.contrast = check_contrast(contrast)
        self.texts = None if texts is None else phrases_of(texts)

        self._engine: Optional[CAMEngine] = None
        self._pipeline: Optional[list] = None
        self._val_rounds = 0  # validations seen, for loops whose schedule is not replayable
        self._run_log = RunLog()  # what was told already: failed probes, lost items

    # ------------------------------------------------------------------------ stages
    def before_run(self, runner) -> None:
        """Check the run against the real model and data, on every rank, so that a mistake
        stops the job before training (a check on rank 0 alone would leave the other ranks
        waiting in their first collective): the detector's head (always, also with
        ``target_layers`` given), target layers, test pipeline, dataset indices, and every probe
        image decoded (the main process keeps the decoded images). Warns when the runner lacks
        hooks the detector family's configs register (the adapter's ``required_hooks``).

        Raises:
            ValueError: On a head no adapter supports (naming it and the supported heads), an
                unknown target layer (with close matches), a model whose level feature maps
                cannot be found (default layers), no test pipeline, a dataset index out of
                range, a probe image that cannot be read or decoded, ``explain_misses`` on a
                head whose adapter cannot list its candidates, ``texts`` for a detector that
                takes no prompt, or a ``contrast`` class the head does not have.
        """
        model = self._unwrap(runner.model)
        adapter = build_adapter(model)  # an unsupported head fails here, before training
        if self.explain_misses:
            check_candidates(adapter)
        if self.texts is not None and not hasattr(adapter, 'set_prompt'):
            raise ValueError(f'`texts` is for text-prompted detectors (Grounding DINO); '
                             f'{type(adapter.head).__name__} takes no prompt')
        warn_missing_hooks(runner, model, adapter.required_hooks)
        if self.target_layers is None:
            adapter.level_layers()
        else:
            resolve_layers(model, self.target_layers, arg='target_layers')
        check_contrast_classes(self.contrast, runner, model, adapter)
        self._pipeline = runner_test_pipeline(runner, model)
        self._probes.prepare(runner, keep=is_main_process())

    def after_val_epoch(self, runner, metrics: Optional[Dict[str, float]] = None) -> None:
        """Explain the probe set after every ``interval``-th validation and the last one,
        validations counted from the start of training (:mod:`.schedule`), so a resumed run
        draws at the same steps as an uninterrupted one."""
        self._val_rounds += 1
        ordinal = schedule.validation_ordinal(runner)
        if ordinal is None:
            ordinal = self._val_rounds
        if ordinal % self.interval == 0 or schedule.is_final_validation(runner):
            self._run_safely(runner, 'val')

    def after_test_epoch(self, runner, metrics: Optional[Dict[str, float]] = None) -> None:
        """Explain the probe set after a test run (``tools/test.py``)."""
        self._run_safely(runner, 'test')

    # ------------------------------------------------------------------------ helpers
    @staticmethod
    def _unwrap(model: nn.Module) -> nn.Module:
        return model.module if is_model_wrapper(model) else model

    def _run_safely(self, runner, mode: str) -> None:
        """Main process only; a failure is a warning (with traceback) unless ``strict``."""
        if not is_main_process():
            return
        step = schedule.step(runner)
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
            model = self._unwrap(runner.model)
            self._engine = CAMEngine(model, target_layers=self.target_layers,
                                     score_thr=self.score_thr, topk=self.topk,
                                     test_pipeline=self._pipeline, keep_input_cams=False,
                                     texts=self._texts(runner, model))
        return self._engine

    def _texts(self, runner, model: nn.Module) -> Optional[List[str]]:
        """The prompt of a text-prompted detector: ``texts`` or, as mmdet's own validation
        prompts, the dataset's class names; None for other detectors."""
        if self.texts is not None or not hasattr(build_adapter(model), 'set_prompt'):
            return self.texts
        for mode in ('val', 'test', 'train'):
            try:
                names = self._class_names(runner, mode)
            except Exception:  # noqa: BLE001 - a loop without that dataloader
                names = None
            if names:
                return names
        return None

    def _class_names(self, runner, mode: str) -> Optional[Sequence[str]]:
        for meta in (getattr(self._unwrap(runner.model), 'dataset_meta', None),
                     getattr(getattr(runner, f'{mode}_dataloader').dataset, 'metainfo', None),
                     getattr(runner.visualizer, 'dataset_meta', None)):
            if meta and meta.get('classes'):
                return list(meta['classes'])
        return None

    def _explain_probes(self, runner, mode: str, step: int) -> None:
        """Every probe (one failing costs only its own panels), then the scalars and the
        summary line."""
        start = time.perf_counter()
        engine = self._get_engine(runner)
        probes = self._probes.for_loop(runner, mode)
        class_names = engine.phrases or self._class_names(runner, mode)
        numbers = RunNumbers(self.methods)
        log = Delivery(runner.visualizer, strict=self.strict)
        failed = 0
        with torch.enable_grad(), preserved_rng(next(engine.model.parameters()).device):
            for probe in probes:
                probe_curves = {}  # {method: {protocol: Curves}}, with ``faithfulness``
                try:
                    probe_numbers = self._explain_probe(engine, probe, mode, step, class_names,
                                                        log, probe_curves)
                except Exception as exc:  # noqa: BLE001 - one probe must not cost the others
                    if self.strict:
                        raise
                    failed += 1
                    self._run_log.probe_failed(runner, probe, mode, step, exc)
                    continue
                numbers.add(probe_numbers, probe_curves)
        scalars = numbers.scalars(mode)
        if scalars:
            log.add_scalars(scalars, step)
        self._run_log.log_curves(runner, log, mode, step, numbers.curves)
        self._run_log.report(runner, mode, step, len(probes) - failed, len(probes),
                             len(self.methods), log, time.perf_counter() - start, scalars)

    def _explain_probe(self, engine: CAMEngine, probe: Probe, mode: str, step: int,
                       class_names: Optional[Sequence[str]], log: Delivery,
                       curves: Optional[dict] = None) -> Dict[str, tuple]:
        """Explain one probe (one forward pass for all methods) and log its panels.

        The maps come back at most ``max_image_size`` pixels a side, so ground-truth boxes are
        scaled by ``result.scale`` for the metrics and the drawing. The numbers use the raw maps
        (``renormalize`` is for show).

        Returns:
            dict[str, tuple]: Per method, the probe's per-detection
            :func:`~..evaluation.metrics.detection_scores` and AUCs (empty unless
            ``faithfulness``), added to the run's :class:`~..evaluation.metrics.MapScores` only
            once the whole probe succeeded.
        """
        numbers = {}
        image = self._probes.image(probe)
        with_gt = self.explain_misses and probe.gt_bboxes is not None
        results = engine.explain(image, methods=self._methods, max_size=self.max_image_size,
                                 contrast=self.contrast,
                                 **(dict(gt_bboxes=probe.gt_bboxes, gt_labels=probe.gt_labels)
                                    if with_gt else {}))
        if with_gt:  # the same records in every method's result: counted once
            first = next(iter(results.values()))
            numbers[MISSES] = (first.misses, first.false_positive)
        # probe_faithfulness gives the mean over the probe's K detections: K copies of it weigh
        # the probe by its detections, so the run's number is the mean over detections.
        faith = probe_faithfulness(engine, image, results, seed=image_seed(0, probe.index),
                                   curves=curves) if self.faithfulness else {}
        for method, result in results.items():
            gt_bboxes = None if probe.gt_bboxes is None else probe.gt_bboxes * result.scale
            # a model with masks: energy and pointing game in each instance's mask, for its
            # class map and its mask map
            image_scores = MapScores().update(result.cams, result.bboxes, result.labels,
                                              gt_bboxes, probe.gt_labels, masks=result.masks,
                                              mask_cams=result.mask_cams)
            aucs = {f'{c}_auc_prior': [faith[f'{method}_{c}_auc_prior']] * len(result)
                    for c in ('deletion', 'insertion') if f'{method}_{c}_auc_prior' in faith}
            numbers[method] = (image_scores, aucs)
            self._log_views(log, f'cam_{mode}_{safe_name(method)}_{probe.name}',
                            result.renormalized() if self.renormalize else result, probe,
                            gt_bboxes, class_names, step, misses_row=with_gt)
            if result.mask_cams is not None:  # a model with masks: its mask maps too
                self._log_views(log, f'cam_{mode}_{safe_name(method)}_mask_{probe.name}',
                                mask_view(result), probe, gt_bboxes, class_names, step)
        return numbers

    def _log_views(self, log: Delivery, name: str, result, probe: Probe, gt_bboxes,
                   class_names: Optional[Sequence[str]], step: int,
                   misses_row: bool = False) -> None:
        """:func:`.views.log_views` with this hook's sizes."""
        log_views(log, name, result, step, class_names=class_names, gt_bboxes=gt_bboxes,
                  gt_labels=probe.gt_labels, max_detections=self.max_detection_tiles,
                  max_size=self.max_image_size, misses_row=misses_row)


#: The name this hook had while it explained YOLOX only; configs with
#: ``type='YOLOXGradCAMHook'`` build the same class.
YOLOXGradCAMHook = DetCAMHook
