"""mmdet-cam-hook: per-detection class-activation maps for MMDetection YOLOX.

Importing the package only registers things (``YOLOXGradCAMHook`` into mmdet's ``HOOKS``);
pytorch-grad-cam is imported when maps are first computed.
"""
from .engine import CAMEngine, CAMResult, compute_cams
from .hook import YOLOXGradCAMHook
from .methods import METHODS, check_method
from .version import __version__

__all__ = [
    'CAMEngine', 'CAMResult', 'compute_cams', 'YOLOXGradCAMHook', 'METHODS', 'check_method',
    '__version__'
]
