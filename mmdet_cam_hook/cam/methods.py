"""The one table of CAM methods.

The hook, the command-line tools (``choices=``), the evaluation and the tests all read
:data:`METHODS`. Two kinds of method share it:

- ``cam``: a layer's activations (and the detection's gradients there) weighted into a map. The
  maths of each is pytorch-grad-cam's class (``cam_class``), written again in torch in
  :mod:`mmdet_cam_hook.cam.maths` to run batched over detections on the model's device, and
  tested equal to that class; the class itself serves as the reference
  (:mod:`..testing.reference`).
- ``black_box``: the detector is only run, never differentiated, and no target layer is read
  (``drise``, :mod:`mmdet_cam_hook.cam.drise`). The engine routes these past the CAM maths.
"""
import importlib
from dataclasses import dataclass
from types import ModuleType
from typing import Iterable, List, Sequence, Union

#: What a method reads from the detector (see the module docstring).
KINDS = ('cam', 'black_box')


def require_grad_cam() -> ModuleType:
    """Import pytorch-grad-cam, for its classes (:attr:`CAMMethod.cam_class`): only the
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
    """One CAM method.

    Args:
        name (str): The name users type (``--method``, ``methods=``).
        class_name (str): The pytorch-grad-cam class the maths equals ('' for a
            ``black_box`` method).
        uses_gradients (bool): Whether the method needs gradients of the detection score.
        spatial (bool): Whether the map keeps the location of the evidence (element-wise
            methods, black-box methods), which keeps it on the instance rather than on every
            object of the same class.
        summary (str): One line with the paper and the formula.
        kind (str): One of :data:`KINDS`. Defaults to 'cam'.
    """

    name: str
    class_name: str
    uses_gradients: bool
    spatial: bool
    summary: str
    kind: str = 'cam'

    @property
    def black_box(self) -> bool:
        """Whether the method only runs the detector (no gradients, no target layer)."""
        return self.kind == 'black_box'

    @property
    def cam_class(self) -> type:
        """The pytorch-grad-cam class (imported on first use).

        Raises:
            ValueError: For a ``black_box`` method, which has none.
        """
        if self.black_box:
            raise ValueError(f'{self.name!r} is a black-box method: it has no grad-cam class')
        return getattr(require_grad_cam(), self.class_name)


METHODS = {
    m.name: m
    for m in (
        CAMMethod('gradcam', 'GradCAM', True, False,
                  'Grad-CAM (Selvaraju et al., ICCV 2017): ReLU(sum_c mean_xy(dS/dA_c) * A_c).'),
        CAMMethod('gradcam++', 'GradCAMPlusPlus', True, False,
                  'Grad-CAM++ (Chattopadhyay et al., WACV 2018): channel weights '
                  'sum_xy alpha_xy * ReLU(dS/dA) with second/third-order alpha (eq. 19).'),
        CAMMethod('xgradcam', 'XGradCAM', True, False,
                  'XGrad-CAM (Fu et al., BMVC 2020): weights sum_xy (A * dS/dA) / sum_xy A.'),
        CAMMethod('eigencam', 'EigenCAM', False, False,
                  'Eigen-CAM (Muhammad & Yeasin, IJCNN 2020): projection of the activations on '
                  'their first principal component; gradient-free, so the same for every '
                  'detection on a layer.'),
        CAMMethod('layercam', 'LayerCAM', True, True,
                  'LayerCAM (Jiang et al., TIP 2021): ReLU(sum_c ReLU(dS/dA_c) * A_c), '
                  'element-wise.'),
        CAMMethod('hirescam', 'HiResCAM', True, True,
                  'HiResCAM (Draelos & Carin, 2020): ReLU(sum_c dS/dA_c * A_c), element-wise; '
                  'provably shows the locations the score used.'),
        CAMMethod('eigengradcam', 'EigenGradCAM', True, True,
                  'Eigen-Grad-CAM: first principal component of dS/dA * A.'),
        CAMMethod('drise', '', False, True,
                  'D-RISE (Petsiuk et al., CVPR 2021): S_t = mean_M w_t(M) * M over random '
                  'masks M, w_t(M) = max_j IoU(b_t, b_j) * [l_j == l_t] * s_j on the masked '
                  'image; black-box (no gradients, no target layer), N forwards per image.',
                  kind='black_box'),
    )
}

#: The ``cam`` methods (grad-cam's maths on a target layer), in table order.
CAM_METHODS = tuple(name for name, m in METHODS.items() if not m.black_box)


def check_method(method: str, arg: str = 'method') -> str:
    """Return ``method`` if it is a known CAM method, else raise.

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


def check_methods(methods: Union[str, Iterable[str]], arg: str = 'methods') -> List[str]:
    """Validate one method name or a non-empty sequence of them (duplicates removed).

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
