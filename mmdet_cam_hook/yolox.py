"""Moved: the pipeline helpers to :mod:`mmdet_cam_hook.pipeline`, YOLOX decoding and scores to
:mod:`mmdet_cam_hook.adapters.yolox`, the local window to :mod:`mmdet_cam_hook.local`.

Thin re-exports until the hook and the CLI import from :mod:`mmdet_cam_hook.pipeline`.
"""
from .pipeline import build_pipeline, preprocess, test_pipeline_cfg

__all__ = ['build_pipeline', 'preprocess', 'test_pipeline_cfg']
