"""The one table of CAM methods: each entry an object holding its maths and its options.

The hook, the command-line tools (``choices=``), the evaluation and the tests all read
:data:`METHODS`. Two families share it (captum's gradient/perturbation split):

- :class:`GradientMethod` (``kind='cam'``): a layer's activations (and the detection's gradients
  there) weighted into a map. Each entry holds its maths (``raw``, a function of
  :mod:`mmdet_cam_hook.cam.maths`: activations (1, C, h, w) and gradients (K, C, h, w) to raw
  maps), which gives what pytorch-grad-cam's class (``cam_class``) gives, batched over
  detections on the model's device; the tests check it against that class.
- :class:`PerturbationMethod` (``kind='black_box'``): the detector is only run, never
  differentiated, and no target layer is read. Each entry holds its options and an
  :meth:`~PerturbationMethod.explain` the engine calls without knowing its name (``drise``,
  :class:`DRISE`, :mod:`mmdet_cam_hook.cam.drise`).

``methods=`` (``CAMEngine.explain``, ``explain_batch``, ``compute_cams``) takes names, method
objects (``DRISE(num_masks=50)``) or config dicts (``dict(type='drise', num_masks=50)``), all
through :func:`method_from`.

Adding a method is one entry of :data:`METHODS` and one test row: a gradient method is a
``raw`` function in :mod:`~mmdet_cam_hook.cam.maths` and the name of the grad-cam class it
equals (``tests/cam/test_maths.py`` runs every :data:`CAM_METHODS` entry against its class); a
perturbation method is a :class:`PerturbationMethod` subclass with its options as fields.
"""
import dataclasses
import importlib
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Union

import numpy as np
import torch

from ..checks import check_int
from ..runtime.detector import BatchedDetector
from . import maths
from .drise import drise_input_maps
from .geometry import Letterbox

#: What a method reads from the detector (see the module docstring).
KINDS = ('cam', 'black_box')


def require_grad_cam() -> ModuleType:
    """Import pytorch-grad-cam, for its classes (:attr:`GradientMethod.cam_class`): only the
    reference comparison (:mod:`..testing.reference`) uses them; the engine, the hook and
    the command-line tools do not need grad-cam.

    Raises:
        ImportError: If grad-cam is not installed, with the command that installs it.
    """
    try:
        return importlib.import_module('pytorch_grad_cam')
    except ImportError as exc:
        raise ImportError('grad-cam is not installed (no module pytorch_grad_cam): '
                          'pip install grad-cam==1.5.7') from exc


@dataclass(frozen=True)
class CAMMethod:
    """One CAM method: what both families share.

    Args:
        name (str): The name users type (``--method``, ``methods=``); ``CAMResult.method``.
        uses_gradients (bool): Whether the method needs gradients of the detection score.
        spatial (bool): Whether the map keeps the location of the evidence (element-wise
            methods, black-box methods), which keeps it on the instance rather than on every
            object of the same class.
        summary (str): One line with the paper and the formula.
    """

    name: str
    uses_gradients: bool
    spatial: bool
    summary: str = field(repr=False)

    #: One of :data:`KINDS`.
    kind = 'cam'

    @property
    def black_box(self) -> bool:
        """Whether the method only runs the detector (no gradients, no target layer)."""
        return self.kind == 'black_box'

    @property
    def options(self) -> Dict[str, Any]:
        """The method's own options (what :func:`method_from` takes besides ``type``)."""
        return {}

    def configured(self, **options: Any) -> 'CAMMethod':
        """This method with ``options`` changed (a new object; the table is not changed).

        Raises:
            ValueError: On an option the method does not have (naming the valid ones).
        """
        unknown = sorted(set(options) - set(self.options))
        if unknown:
            raise ValueError(f'method {self.name!r} has no option(s) {unknown}; its options are '
                             f'{sorted(self.options)}')
        return dataclasses.replace(self, **options) if options else self


@dataclass(frozen=True)
class GradientMethod(CAMMethod):
    """A method computed from one layer's activations and gradients (grad-cam's maths).

    Args:
        class_name (str): The pytorch-grad-cam class the maths equals.
        raw (Callable): ``raw(activation (1, C, h, w), grads (K, C, h, w) | windows | None)
            -> (K or 1, h, w)`` maps before ReLU and scaling (:mod:`..maths`).
    """

    class_name: str = ''
    raw: Callable = field(default=None, repr=False, compare=False)

    @property
    def cam_class(self) -> type:
        """The pytorch-grad-cam class (imported on first use)."""
        return getattr(require_grad_cam(), self.class_name)

    def layer_maps(self, activation: torch.Tensor, grads: Optional[maths.Grads],
                   num: int) -> torch.Tensor:
        """Maps of ``num`` detections on the layer's own grid, after grad-cam's ReLU and
        min-max scaling (:func:`~mmdet_cam_hook.cam.maths.cam_maps`).

        Args:
            activation (torch.Tensor): (1, C, h, w) layer output for the image.
            grads (torch.Tensor | WindowGradients | None): (num, C, h, w) gradients of each
                detection's score there (or as windows); None for gradient-free methods.
            num (int): Number of detections.

        Returns:
            torch.Tensor: (num, h, w) float32 on ``activation``'s device, in [0, 1].
        """
        return maths.cam_maps(self.raw, activation, grads, num)


@dataclass(frozen=True)
class PerturbationMethod(CAMMethod):
    """A black-box method: the detector is run on perturbed images, never differentiated."""

    kind = 'black_box'

    @property
    def cam_class(self) -> type:
        """Raises:
            ValueError: Always: a black-box method has no grad-cam class.
        """
        raise ValueError(f'{self.name!r} is a black-box method: it has no grad-cam class')

    def explain(self, detector: BatchedDetector, image: np.ndarray, bboxes: np.ndarray,
                labels: np.ndarray, letterbox: Letterbox) -> np.ndarray:
        """Maps of K detections on the network-input grid.

        Args:
            detector (BatchedDetector): The detector on batches of images.
            image (np.ndarray): (H, W, 3) uint8 BGR original image.
            bboxes (np.ndarray): (K, 4) detections in original pixels.
            labels (np.ndarray): (K,) their classes.
            letterbox (Letterbox): Where the image sits in the network input.

        Returns:
            np.ndarray: (K, H_in, W_in) float32 in [0, 1].
        """
        raise NotImplementedError


@dataclass(frozen=True)
class DRISE(PerturbationMethod):
    """D-RISE (:mod:`mmdet_cam_hook.cam.drise`) with its options.

    Args:
        num_masks (int): Random masks per image (each masked image through the network).
            Defaults to 1000.
        batch_size (int): Masked images per forward pass. Defaults to 16.
        seed (int): Seed of the masks. Defaults to 0.

    Raises:
        ValueError, TypeError: On an option that is not a positive int (``seed``: int >= 0).
    """

    name: str = field(default='drise', init=False)
    uses_gradients: bool = field(default=False, init=False)
    spatial: bool = field(default=True, init=False)
    summary: str = field(default=(
        'D-RISE (Petsiuk et al., CVPR 2021): S_t = mean_M w_t(M) * M over random masks M, '
        'w_t(M) = max_j IoU(b_t, b_j) * [l_j == l_t] * s_j on the masked image; black-box (no '
        'gradients, no target layer), N forwards per image.'), repr=False, init=False)
    num_masks: int = 1000
    batch_size: int = 16
    seed: int = 0

    def __post_init__(self) -> None:
        check_int(self.num_masks, 'num_masks')
        check_int(self.batch_size, 'batch_size')
        check_int(self.seed, 'seed', low=0)

    @property
    def options(self) -> Dict[str, Any]:
        return dict(num_masks=self.num_masks, batch_size=self.batch_size, seed=self.seed)

    def explain(self, detector: BatchedDetector, image: np.ndarray, bboxes: np.ndarray,
                labels: np.ndarray, letterbox: Letterbox) -> np.ndarray:
        return drise_input_maps(detector, image, bboxes, labels, letterbox.resized_shape,
                                letterbox.input_shape, **self.options)


def _gradient(name: str, class_name: str, raw: Callable, uses_gradients: bool, spatial: bool,
              summary: str) -> GradientMethod:
    return GradientMethod(name, uses_gradients, spatial, summary, class_name=class_name, raw=raw)


METHODS: Dict[str, CAMMethod] = {
    m.name: m
    for m in (
        _gradient('gradcam', 'GradCAM', maths.gradcam, True, False,
                  'Grad-CAM (Selvaraju et al., ICCV 2017): ReLU(sum_c mean_xy(dS/dA_c) * A_c).'),
        _gradient('gradcam++', 'GradCAMPlusPlus', maths.gradcam_plusplus, True, False,
                  'Grad-CAM++ (Chattopadhyay et al., WACV 2018): channel weights '
                  'sum_xy alpha_xy * ReLU(dS/dA) with second/third-order alpha (eq. 19).'),
        _gradient('xgradcam', 'XGradCAM', maths.xgradcam, True, False,
                  'XGrad-CAM (Fu et al., BMVC 2020): weights sum_xy (A * dS/dA) / sum_xy A.'),
        _gradient('eigencam', 'EigenCAM', maths.eigencam, False, False,
                  'Eigen-CAM (Muhammad & Yeasin, IJCNN 2020): projection of the activations on '
                  'their first principal component; gradient-free, so the same for every '
                  'detection on a layer.'),
        _gradient('layercam', 'LayerCAM', maths.layercam, True, True,
                  'LayerCAM (Jiang et al., TIP 2021): ReLU(sum_c ReLU(dS/dA_c) * A_c), '
                  'element-wise.'),
        _gradient('hirescam', 'HiResCAM', maths.hirescam, True, True,
                  'HiResCAM (Draelos & Carin, 2020): ReLU(sum_c dS/dA_c * A_c), element-wise; '
                  'provably shows the locations the score used.'),
        _gradient('eigengradcam', 'EigenGradCAM', maths.eigengradcam, True, True,
                  'Eigen-Grad-CAM: first principal component of dS/dA * A.'),
        DRISE(),
    )
}

#: The gradient-family methods (grad-cam's maths on a target layer), in table order.
CAM_METHODS = tuple(name for name, m in METHODS.items() if not m.black_box)

#: What :func:`method_from` takes: a name, a method object or ``dict(type=name, **options)``.
MethodSpec = Union[str, CAMMethod, Mapping[str, Any]]


def check_method(method: str, arg: str = 'method') -> str:
    """Return ``method`` if it is a known CAM method name, else raise.

    Args:
        method (str): The method name.
        arg (str): The argument name to quote in the error. Defaults to 'method'.

    Returns:
        str: ``method``.

    Raises:
        TypeError: If ``method`` is not a string.
        ValueError: If ``method`` is not in :data:`METHODS`.
    """
    if not isinstance(method, str):
        raise TypeError(f'`{arg}` must be a str, one of {sorted(METHODS)}, '
                        f'got {method!r} ({type(method).__name__})')
    if method not in METHODS:
        raise ValueError(f'`{arg}` must be one of {sorted(METHODS)}, got {method!r}')
    return method


def method_from(spec: MethodSpec, arg: str = 'method') -> CAMMethod:
    """The method object for a name, a method object or a config dict.

    Args:
        spec (str | CAMMethod | Mapping): ``'gradcam'``, ``DRISE(num_masks=50)`` or
            ``dict(type='drise', num_masks=50)`` (the hook's and configs' form).
        arg (str): The argument name to quote in errors. Defaults to 'method'.

    Returns:
        CAMMethod: The table's entry, or a configured copy of it.

    Raises:
        TypeError: If ``spec`` is none of these.
        ValueError: On an unknown name or ``type`` (listing :data:`METHODS`), a dict without
            ``type``, or an option the method does not have (listing its options).
    """
    if isinstance(spec, CAMMethod):
        return spec
    if isinstance(spec, str):
        return METHODS[check_method(spec, arg)]
    if isinstance(spec, Mapping):
        options = dict(spec)
        if 'type' not in options:
            raise ValueError(f'`{arg}` as a dict needs a `type`, one of {sorted(METHODS)}, '
                             f'got {spec!r}')
        name = options.pop('type')
        try:
            return METHODS[check_method(name, arg)].configured(**options)
        except (TypeError, ValueError) as exc:
            raise type(exc)(f'`{arg}` {spec!r}: {exc}') from exc
    raise TypeError(f'`{arg}` must be a method name (one of {sorted(METHODS)}), a method '
                    f'object or a dict(type=...), got {spec!r} ({type(spec).__name__})')


def methods_from(methods: Union[MethodSpec, Iterable[MethodSpec]],
                 arg: str = 'methods') -> List[CAMMethod]:
    """Validate one method spec or a non-empty sequence of them (see :func:`method_from`);
    repeats of the same method are dropped.

    Returns:
        list[CAMMethod]: The methods, in the given order.

    Raises:
        TypeError: If ``methods`` is not a spec or an iterable of specs.
        ValueError: If it is empty, names an unknown method, or two differently configured
            methods share a name (their results would share a key).
    """
    if isinstance(methods, (str, CAMMethod, Mapping)):
        methods = [methods]
    if not isinstance(methods, (Sequence, set, frozenset, tuple)):
        raise TypeError(f'`{arg}` must be a method name or a list of them, one of '
                        f'{sorted(METHODS)}, got {methods!r}')
    out: Dict[str, CAMMethod] = {}
    for spec in methods:
        method = method_from(spec, arg)
        if out.setdefault(method.name, method) != method:
            raise ValueError(f'`{arg}` has two different {method.name!r} methods: '
                             f'{out[method.name]!r} and {method!r}')
    if not out:
        raise ValueError(f'`{arg}` must name at least one of {sorted(METHODS)}, got {methods!r}')
    return list(out.values())


def check_methods(methods: Union[str, Iterable[str]], arg: str = 'methods') -> List[str]:
    """Validate one method name or a non-empty sequence of them (duplicates removed): the
    names-only form, for the callers that store names (the hook, the evaluation); the engine
    also takes method objects and dicts (:func:`methods_from`).

    Args:
        methods (str | Iterable[str]): Method name(s).
        arg (str): The argument name to quote in errors. Defaults to 'methods'.

    Returns:
        list[str]: The validated names, in the given order.

    Raises:
        TypeError: If ``methods`` is neither a str nor an iterable of str.
        ValueError: If it is empty or names an unknown method.
    """
    if isinstance(methods, str):
        return [check_method(methods, arg)]
    if not isinstance(methods, (Sequence, set, frozenset, tuple)):
        raise TypeError(f'`{arg}` must be a method name or a list of them, one of '
                        f'{sorted(METHODS)}, got {methods!r}')
    names = [check_method(m, arg) for m in methods]
    if not names:
        raise ValueError(f'`{arg}` must name at least one of {sorted(METHODS)}, got {methods!r}')
    return list(dict.fromkeys(names))
