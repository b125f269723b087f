"""mmdet-cam-hook: per-detection class-activation maps for MMDetection YOLOX.

Importing the package only registers things, through the frameworks' own extension points:
``YOLOXGradCAMHook`` into mmdet's ``HOOKS``, and a safe checkpoint loader for local files and
``http(s)://`` URLs into MMEngine's ``CheckpointLoader`` (so that MMEngine can load, with
``weights_only``, the checkpoints it writes: see :mod:`mmdet_cam_hook.checkpoint`).
pytorch-grad-cam is imported when maps are first computed.
"""
from .checkpoint import register_mmengine_loaders
from .engine import CAMEngine, CAMResult, compute_cams
from .hook import YOLOXGradCAMHook
from .methods import METHODS, check_method
from .version import __version__

register_mmengine_loaders()

__all__ = [
    'CAMEngine', 'CAMResult', 'compute_cams', 'YOLOXGradCAMHook', 'METHODS', 'check_method',
    '__version__'
]
