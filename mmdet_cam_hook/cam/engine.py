"""The CAM engine: per-detection maps for any supported detector, on the original image.

One forward pass per image serves every detection and every method. Everything about the
detector comes from its adapter (:mod:`mmdet_cam_hook.adapters`): decoding with the prior of
each kept box, the score of one detection, the level feature maps, the local window. Gradients
come from ``torch.autograd.grad`` on activations only, so the model's parameters never receive
``.grad``; the model's ``training`` flags, grad mode and forward hooks are restored after every
call, also one that raised.

Each target layer is resolved once, at construction, into a
:class:`~mmdet_cam_hook.cam.routes.TargetLayer` with its route, ``local``, ``chain`` or ``exact``
(how its K per-detection gradients are computed: :mod:`mmdet_cam_hook.cam.routes`). One dummy
forward at construction decides which modules can be target layers at all
(:meth:`CAMEngine.describe_layers`), so that an unusable ``target_layers`` is refused then,
naming why and a usable layer of the model (:mod:`.engine_layers`).

Methods are the objects of :data:`~mmdet_cam_hook.cam.methods.METHODS`: the engine gives each
gradient method a layer's activations and gradients, and calls each perturbation method's
``explain`` with the detector, without knowing their names (:mod:`.engine_maps`).

This module holds the construction, the arguments' checks and the public calls (``explain``,
``explain_batch``, ``detect``, ``misses``); the engine's bases hold its target layers
(:class:`~.engine_layers.EngineLayers`), the maps of one forward pass
(:class:`~.engine_maps.EngineMaps`) and the prompt of text-prompted detectors
(:class:`~.prompts.PromptedEngine`).
"""
import warnings
from typing import Dict, List, Optional, Sequence, Union

import torch
from torch import nn

from ..adapters import Detections, DetectorAdapter, build_adapter
from ..adapters.candidates import check_candidates
from ..adapters.masks import MaskBranch, build_mask_branch
from ..checks import check_bool, check_int, check_max_size, check_score_thr, check_topk
from ..runtime.detector import BatchedDetector
from ..runtime.io import ImageLike, load_image
from ..runtime.pipeline import build_pipeline, test_pipeline_cfg
from . import targets
from .engine_layers import EngineLayers
from .engine_maps import EngineMaps
from .methods import DRISE, METHODS, CAMMethod, MethodSpec, method_from, methods_from
from .misses import MissReport, explain_misses, ground_truth_args
from .prompts import PromptedEngine
from .result import CAMResult, Renormalize, check_renormalize
from .routes import ROUTES, TargetLayer
from .targets import Contrast

__all__ = ['CAMEngine', 'compute_cams', 'ROUTES', 'TargetLayer']

# Detections whose maps are computed together; bounds memory at K x C x h x w per layer.
_CHUNK = 16


class CAMEngine(PromptedEngine, EngineLayers, EngineMaps):
    """Computes per-detection CAMs of any detector an adapter supports
    (:func:`~mmdet_cam_hook.adapters.supported_heads`: one-stage, two-stage and DETR-like heads).

    Args:
        model (nn.Module): An mmdet detector with a supported ``bbox_head``, unwrapped, with
            ``.cfg`` (as ``mmdet.apis.init_detector`` sets it) unless ``test_pipeline`` is given.
        target_layers (Sequence[str] | str | None): ``named_modules()`` paths
            (``neck.out_convs.2`` or ``neck.out_convs[-1]``); maps of several layers are averaged.
            None (default) is level-aware: each detection is explained on the feature map of its
            own FPN level (the adapter's ``level_layers``). Defaults to None.
        score_thr (float): Keep detections scoring at least this. Defaults to 0.3.
        topk (int, optional): Keep at most this many detections (highest scores). Defaults to
            None (all).
        test_pipeline (Sequence[dict], optional): Test pipeline to use instead of the one in
            ``model.cfg``. Defaults to None.
        drise_masks (int): Shorthand configuring the ``drise`` that ``methods=['drise']``
            (the name) means here: random masks per image (each one masked image through the
            network); a :class:`~mmdet_cam_hook.cam.methods.DRISE` object given to ``methods``
            keeps its own options. Defaults to 1000.
        drise_batch_size (int): The same shorthand: masked images per forward pass for
            ``drise``. Defaults to 16.
        drise_seed (int): The same shorthand: seed of ``drise``'s masks. Defaults to 0.
        keep_input_cams (bool): Also return each detection's map on the network-input grid
            (``CAMResult.input_cams``, where the maps equal grad-cam's output): K more maps of
            the input's size in memory and in time. False (what the hook and the CLI use)
            leaves ``input_cams`` None. Defaults to True.
        chunk_size (int): Detections whose gradients are held at once (``chunk_size`` x C x h
            x w per target layer): bounds the memory at large K; larger chunks batch more work
            per call. Defaults to 16.
        texts (str | Sequence[str], optional): The prompt of a text-prompted detector
            (Grounding DINO): a caption of phrases (``'red car . person'``) or a list of
            phrases; a detection's label is its phrase's index (:attr:`phrases`). None: the
            classes of ``model.dataset_meta``. Refused for a detector that takes no prompt.
            Defaults to None.
        masks (bool): For a model with masks (:func:`~..adapters.masks.build_mask_branch`:
            Mask R-CNN, Cascade Mask R-CNN), also return each instance's mask and mask map
            (``CAMResult.masks``, ``mask_cams``): one more gradient per instance (measured
            ~1.9x the class maps' time on Mask R-CNN R50 at 512x384, K = 8). False leaves
            them None. Defaults to True.

    Raises:
        ValueError: On a head no adapter supports (naming it and the supported heads), an
            unknown layer (with close matches), a layer that cannot be explained (it does not
            run, outputs no 4-D map or one the scores do not depend on: naming why and a usable
            layer of this model), a bad ``score_thr``, ``topk`` or ``drise_*`` argument, or a
            model without a test pipeline.
        TypeError: On a ``score_thr`` or ``topk`` of the wrong type (e.g. ``topk='3'``); the
            checks are :mod:`mmdet_cam_hook.checks`, shared with the hook and the CLI.
    """

    def __init__(self,
                 model: nn.Module,
                 target_layers: Union[None, str, Sequence[str]] = None,
                 score_thr: float = 0.3,
                 topk: Optional[int] = None,
                 test_pipeline: Optional[Sequence[dict]] = None,
                 drise_masks: int = 1000,
                 drise_batch_size: int = 16,
                 drise_seed: int = 0,
                 keep_input_cams: bool = True,
                 chunk_size: int = _CHUNK,
                 texts: Union[None, str, Sequence[str]] = None,
                 masks: bool = True) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f'`model` must be an mmdet detector nn.Module, '
                            f'got {type(model).__name__}')
        self.model = model
        self.score_thr = check_score_thr(score_thr)
        self.topk = check_topk(topk)
        self.chunk_size = check_int(chunk_size, 'chunk_size')
        self.keep_input_cams = bool(keep_input_cams)
        self.drise = DRISE(num_masks=check_int(drise_masks, 'drise_masks'),
                           batch_size=check_int(drise_batch_size, 'drise_batch_size'),
                           seed=check_int(drise_seed, 'drise_seed', low=0))
        self.adapter: DetectorAdapter = build_adapter(model)
        #: The instance-mask branch (masks and mask maps), None for a box-only detector.
        self.mask_branch: Optional[MaskBranch] = (
            build_mask_branch(self.adapter) if check_bool(masks, 'masks') else None)
        if texts is not None:
            self.set_texts(texts)
        self.pipeline = build_pipeline(self._test_pipeline(test_pipeline))
        self._build_layers(target_layers)  # one dummy forward: which modules can be layers
        self.detector = BatchedDetector(model, self.adapter, self.pipeline)

    def _test_pipeline(self, test_pipeline: Optional[Sequence[dict]]) -> Sequence[dict]:
        if test_pipeline is not None:
            return test_pipeline
        if getattr(self.model, 'cfg', None) is None:
            raise ValueError('`model` has no `.cfg` to take the test pipeline from; build it '
                             'with mmdet.apis.init_detector or pass `test_pipeline`')
        return test_pipeline_cfg(self.model.cfg)

    def _contrast(self, contrast: Contrast, methods: List[CAMMethod]) -> Contrast:
        """``contrast`` checked against the model's classes (:func:`.targets.resolve_contrast`);
        a warning, once per engine, when some of ``methods`` have no target to contrast."""
        if contrast is None:
            return None
        contrast = targets.resolve_contrast(
            contrast, (getattr(self.model, 'dataset_meta', None) or {}).get('classes'),
            targets.num_classes(self.adapter))
        blind = [m.name for m in methods if not m.uses_gradients]
        if blind and not getattr(self, '_warned_contrast', False):
            self._warned_contrast = True
            warnings.warn(f'contrast={contrast!r}: the methods {blind} read no gradient of a '
                          'score, so their maps are those of the detection itself',
                          UserWarning, stacklevel=3)
        return contrast

    def _methods(self, methods) -> List[CAMMethod]:
        """The method objects for ``methods=``; the name ``drise`` means this engine's
        :attr:`drise` (configured by ``drise_*``)."""
        default = METHODS['drise']
        return [self.drise if m is default else m for m in methods_from(methods)]

    def explain(self,
                image: ImageLike,
                methods: Union[MethodSpec, Sequence[MethodSpec]] = ('gradcam', ),
                renormalize: Renormalize = False,
                max_size: Optional[int] = None,
                detections: Optional[Detections] = None,
                texts: Union[None, str, Sequence[str]] = None,
                gt_bboxes=None,
                gt_labels=None,
                miss_iou: float = 0.5,
                contrast: Contrast = None) -> Dict[str, CAMResult]:
        """Per-detection CAMs of one image for one or more methods, from one forward pass.

        Works inside ``torch.no_grad()`` and ``torch.inference_mode()`` blocks too: gradients
        are enabled (and inference mode left) for the call only.

        Args:
            image (str | PathLike | np.ndarray): A path or an HxWx3 uint8 BGR array.
            methods (str | CAMMethod | dict | Sequence): Keys of
                :data:`~mmdet_cam_hook.cam.methods.METHODS`, method objects
                (``DRISE(num_masks=50)``) or ``dict(type='drise', num_masks=50)``
                (:func:`~mmdet_cam_hook.cam.methods.method_from`). Defaults to ('gradcam',).
            renormalize (bool | str): Min-max each map inside its own box and zero it
                outside (True or ``'box'``: the seed tool's ``--renormalize``), or inside its
                instance's own mask (``'mask'``: models with masks). Defaults to False.
            max_size (int, optional): Longer side, in pixels, of the returned image and maps.
                A larger image is still fed to the network whole (the detections do not
                change), but its maps are resized straight from the network-input grid to the
                smaller size, so a 6000x4000 image costs K maps of at most ``max_size`` pixels
                a side instead of K full-size ones. ``bboxes`` are then in the returned image's
                pixels and ``CAMResult.scale`` says by how much it was shrunk. None keeps the
                original size. Defaults to None.
            detections (Detections, optional): Explain these detections (boxes in original
                pixels, and the prior and label of each) instead of decoding the image: the
                maps are those of the score of each given prior and label on *this* model, and
                the results report the given boxes, labels and scores. For comparing two models
                on the same detections (the randomisation check, :mod:`..evaluation.sanity`).
                ``score_thr`` and ``topk`` are not applied. Defaults to None (decode).
            contrast (None | str | int): Explain "class A rather than class B": each map is
                that of ``score[A] - score[B]`` of the detection's own prior, RoI or query (A
                its label), with the adapter's own score formula (:mod:`.targets`). B is
                ``'runner_up'`` (the class that prior scores highest after A), a class index or
                a class name; the results' ``contrast_labels`` name B per detection.
                Gradient-free and perturbation methods are unchanged. Defaults to None (each
                detection's own score).
            texts (str | Sequence[str], optional): The prompt for this call (text-prompted
                detectors; see the constructor). Defaults to None (the engine's).
            gt_bboxes (array-like, optional): (G, 4) ground-truth boxes x1y1x2y2 in
                original-image pixels. With ``gt_labels``, each result gets ``misses`` (one
                record per ground-truth box no detection matched: its best candidate before the
                threshold and NMS, why it was dropped and its map per method, from the same
                forward pass: :mod:`~mmdet_cam_hook.cam.misses`) and ``false_positive`` (per
                detection). Defaults to None (no ground truth).
            gt_labels (array-like, optional): (G,) their classes. Defaults to None.
            miss_iou (float): Minimum IoU between a miss's ground-truth box and its candidate's
                box. Defaults to 0.5.

        Returns:
            dict[str, CAMResult]: One result per method, keyed by its name.

        Raises:
            ValueError: On an unknown method, a bad ``max_size`` or ``contrast`` (an unknown
                class, naming the valid choices), an image that cannot be read or one the test
                pipeline cannot resize (e.g. 4000x2 pixels).
        """
        methods = self._methods(methods)
        max_size = check_max_size(max_size)
        self._check_renormalize(renormalize)
        contrast = self._contrast(contrast, methods)
        img = load_image(image)
        if detections is not None and not isinstance(detections, Detections):
            raise TypeError(f'`detections` must be None or a Detections, '
                            f'got {type(detections).__name__}')
        gt = ground_truth_args(gt_bboxes, gt_labels, miss_iou)
        if gt is not None:
            check_candidates(self.adapter)
        with torch.inference_mode(False), self._prompt(texts):
            return self._explain([img], methods, renormalize, max_size, detections, gt,
                                 contrast=contrast)[0]

    def _check_renormalize(self, renormalize: Renormalize) -> None:
        """Refuse a bad ``renormalize`` before any forward (naming the choices), and
        ``'mask'`` on an engine without masks."""
        if check_renormalize(renormalize) == 'mask' and self.mask_branch is None:
            raise ValueError("`renormalize='mask'` needs instance masks, and this engine has "
                             'none (a box-only detector, or masks=False); use '
                             'renormalize=True (in the boxes)')

    def detect(self, image: ImageLike,
               texts: Union[None, str, Sequence[str]] = None) -> Detections:
        """The detections :meth:`explain` would explain for ``image``: the adapter's decoding
        (each kept box with its prior, RoI or query), the engine's ``score_thr`` and ``topk``;
        one forward pass without gradients.

        Args:
            image (str | PathLike | np.ndarray): A path or an HxWx3 uint8 BGR array.
            texts (str | Sequence[str], optional): The prompt for this call (text-prompted
                detectors). Defaults to None (the engine's).

        Returns:
            Detections: Boxes in original-image pixels, sorted by score.
        """
        with self._prompt(texts):
            outs, metas = self.detector.outputs([load_image(image)])
            return self._decode(outs, metas[0])

    def misses(self, image: ImageLike, gt_bboxes, gt_labels,
               miss_iou: float = 0.5) -> MissReport:
        """The misses and false positives of ``image`` without maps (what
        ``explain(gt_bboxes=..., gt_labels=...)`` reports, with empty ``cams``), from one
        forward pass without gradients: for counting them over a data set
        (``mmdet-cam-eval --explain-misses``).

        Raises:
            ValueError: On bad ground truth or ``miss_iou``, or an image that cannot be read.
            ValueError: For an adapter that cannot list its candidates.
        """
        gt = ground_truth_args(gt_bboxes, gt_labels, miss_iou)
        if gt is not None:
            check_candidates(self.adapter)
        if gt is None:
            raise ValueError('`misses` needs the ground truth: `gt_bboxes` and `gt_labels`')
        outs, metas = self.detector.outputs([load_image(image)])
        dets = self._decode(outs, metas[0])
        with torch.no_grad():
            cands = self.adapter.candidates(outs, metas[0], self.score_thr, dets)
        return explain_misses(cands, gt[0], gt[1], self.score_thr, gt[2])

    def _decode(self, outs, metainfo: dict) -> Detections:
        """The one decoding rule of the engine: the adapter's, then ``topk``."""
        with torch.no_grad():
            dets = self.adapter.decode(outs, metainfo, self.score_thr)
        return dets if self.topk is None else dets.select(slice(0, self.topk))

    @property
    def batchable(self) -> bool:
        """Whether :meth:`explain_batch` runs several images through the network at once: when
        every target layer takes the ``local`` route. The ``chain`` and ``exact`` routes pull
        each detection's gradient back through the graph of the forward pass, and through a
        batch's graph that costs as many images as the batch holds, so their images go one at
        a time; so do the images of a mask branch on the ``exact`` route (its mask targets are
        pulled back through that graph too)."""
        exact_masks = self.mask_branch is not None and self.mask_branch.route == 'exact'
        return not exact_masks and all(layer.route == 'local' for layer in self.layers)

    def explain_batch(self,
                      images: Sequence[ImageLike],
                      methods: Union[MethodSpec, Sequence[MethodSpec]] = ('gradcam', ),
                      renormalize: Renormalize = False,
                      max_size: Optional[int] = None,
                      contrast: Contrast = None) -> List[Dict[str, CAMResult]]:
        """:meth:`explain` for several images, through the network as one batch when the
        engine is :attr:`batchable` (one at a time otherwise).

        The batch goes through the model's data preprocessor as ``model.predict`` batches do,
        padded to its largest image: with a test pipeline that pads every image to one size
        (YOLOX, RTMDet) the results equal :meth:`explain`'s; with keep-ratio pipelines padded
        only to a multiple of 32 (the FPN detectors) images of other shapes get the extra
        padding a batched ``model.predict`` gives them too.

        Args:
            images (Sequence[str | PathLike | np.ndarray]): Paths or HxWx3 uint8 BGR arrays.
            methods, renormalize, max_size, contrast: As for :meth:`explain`.

        Returns:
            list[dict[str, CAMResult]]: One :meth:`explain` result per image, in order.

        Raises:
            ValueError: As :meth:`explain`, for the first image that cannot be read or
                resized (its index in ``images`` is in the message).
        """
        methods = self._methods(methods)
        self._check_renormalize(renormalize)
        max_size = check_max_size(max_size)
        contrast = self._contrast(contrast, methods)
        imgs = []
        for i, image in enumerate(images):
            try:
                imgs.append(load_image(image))
            except ValueError as exc:
                raise ValueError(f'image {i} of the batch: {exc}') from exc
        groups = [imgs] if self.batchable else [[img] for img in imgs]
        with torch.inference_mode(False):
            return [res for group in groups if group
                    for res in self._explain(group, methods, renormalize, max_size,
                                             contrast=contrast)]


def compute_cams(model: nn.Module,
                 image: ImageLike,
                 *,
                 method: MethodSpec = 'gradcam',
                 target_layers: Union[None, str, Sequence[str]] = None,
                 score_thr: float = 0.3,
                 topk: Optional[int] = None,
                 renormalize: bool = False,
                 max_size: Optional[int] = None) -> CAMResult:
    """Per-detection CAMs of one image (see :class:`CAMEngine` and
    :meth:`CAMEngine.explain` for the arguments).

    Example:
        >>> from mmdet.apis import init_detector
        >>> model = init_detector('yolox_s_8xb8-300e_coco.py', 'yolox_s.pth', device='cpu')
        >>> res = compute_cams(model, 'demo.jpg', method='hirescam', topk=5)
        >>> res.cams.shape  # (K, H, W), one map per detection

    Returns:
        CAMResult: Detections and their maps, on the original image.
    """
    method = method_from(method)
    engine = CAMEngine(model, target_layers=target_layers, score_thr=score_thr, topk=topk)
    return engine.explain(image, methods=[method], renormalize=renormalize,
                          max_size=max_size)[method.name]
