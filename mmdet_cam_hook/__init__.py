"""mmdet-cam-hook: per-detection class-activation maps for MMDetection 3.x detectors.

Importing the package only registers things, through the frameworks' own extension points:
``DetCAMHook`` (also under its first name, ``YOLOXGradCAMHook``) into mmdet's ``HOOKS``, and a
safe checkpoint loader for every scheme of MMEngine's ``CheckpointLoader`` (local files,
``http(s)://``, ``torchvision://``, ``open-mmlab://``, ...), so that MMEngine loads the
checkpoints it writes, and no others, without running code: see
:mod:`mmdet_cam_hook.runtime.checkpoint`.
pytorch-grad-cam is not needed to compute maps (:mod:`mmdet_cam_hook.cam.maths` has the maths):
only :mod:`.testing.reference`, the per-detection comparison the tests and benchmarks run,
imports it (``pip install mmdet-cam-hook[reference]``).
"""
from .cam.engine import CAMEngine, compute_cams
from .cam.methods import DRISE, METHODS, check_method, method_from
from .cam.result import CAMResult
from .hooks.cam_hook import DetCAMHook, YOLOXGradCAMHook
from .runtime.checkpoint import register_mmengine_loaders
from .version import __version__

register_mmengine_loaders()

__all__ = [
    'CAMEngine', 'CAMResult', 'compute_cams', 'DetCAMHook', 'YOLOXGradCAMHook', 'METHODS', 'DRISE',
    'check_method', 'method_from', '__version__'
]
