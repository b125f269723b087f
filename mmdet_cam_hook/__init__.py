"""mmdet-cam-hook: per-detection class-activation maps for MMDetection 3.x detectors.

Importing the package only registers things, through the frameworks' own extension points:
``DetCAMHook`` (also under its first name, ``YOLOXGradCAMHook``) into mmdet's ``HOOKS``, and a
safe checkpoint loader for local files and ``http(s)://`` URLs into MMEngine's
``CheckpointLoader`` (so that MMEngine can load, with ``weights_only``, the checkpoints it
writes: see :mod:`mmdet_cam_hook.checkpoint`).
pytorch-grad-cam is not needed to compute maps (:mod:`mmdet_cam_hook.cam_math` has the maths):
only :mod:`mmdet_cam_hook.reference`, the per-detection comparison the tests and benchmarks run,
imports it (``pip install mmdet-cam-hook[reference]``).
"""
from .checkpoint import register_mmengine_loaders
from .engine import CAMEngine, CAMResult, compute_cams
from .hook import DetCAMHook, YOLOXGradCAMHook
from .methods import METHODS, check_method
from .version import __version__

register_mmengine_loaders()

__all__ = [
    'CAMEngine', 'CAMResult', 'compute_cams', 'DetCAMHook', 'YOLOXGradCAMHook', 'METHODS',
    'check_method', '__version__'
]
