"""mmdet-cam-hook: per-detection class-activation maps for MMDetection YOLOX.

Importing the package only registers things (the hook into mmdet's ``HOOKS``).
"""
from .engine import CAMEngine, CAMResult, compute_cams
from .methods import METHODS, check_method
from .version import __version__

__all__ = ['CAMEngine', 'CAMResult', 'compute_cams', 'METHODS', 'check_method', '__version__']
