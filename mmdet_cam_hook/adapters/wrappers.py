"""Detectors wrapped in another model: the semi-supervised ``SemiBaseDetector`` family
(SoftTeacher), whose ``teacher`` and ``student`` are each a whole detector, and the tracking
models (``BaseMOTModel``: ByteTrack, OC-SORT, QDTrack, MaskTrack R-CNN, ...), whose
``detector`` is one.

:class:`SemiSupervisedAdapter` explains the detector ``model.predict`` runs: mmdet's own switch
``semi_test_cfg.predict_on`` (``'teacher'``, the default and the setting of mmdet's SoftTeacher
configs, or ``'student'``). To explain the student, set it in the config
(``model.semi_test_cfg.predict_on='student'``, e.g. ``--cfg-options`` for mmdet's tools) or on
the built model (``model.semi_test_cfg['predict_on'] = 'student'``) before the engine or hook is
built; ``model.predict`` then reports the student's detections too, so the maps explain what
the user sees. Everything else is the inner detector's own adapter (chosen by the same rule),
its layer names prefixed with ``teacher.`` / ``student.``.

:class:`TrackingAdapter` explains a tracking model's per-frame detector: the detections
``model.detector.predict`` reports on one frame, which are what the tracker is fed (the track
ids, the matching and the track heads are not explained). The engine reads a frame through the
config's video pipeline unwrapped to one image and the model's ``TrackDataPreprocessor`` on a
one-frame video (:mod:`~mmdet_cam_hook.runtime.pipeline`), as the tracker preprocesses each frame.
"""
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from .base import ADAPTERS, Detections, DetectorAdapter, LevelGradient, complete_stages
from .support import build_adapter

#: The values ``semi_test_cfg.predict_on`` takes.
BRANCHES = ('teacher', 'student')


class InnerDetectorAdapter(DetectorAdapter):
    """A model that runs a whole inner detector (its submodule :attr:`branch`): that detector's
    own adapter (chosen, and a head it does not support refused, by
    :func:`~.support.build_adapter`), its layer names prefixed with ``branch + '.'``."""

    head_types = ('BaseDetector', )
    #: Nothing of the branch's detector class: the inner adapter is chosen (and a head it does
    #: not support refused) by :func:`~.base.build_adapter` on the branch itself.
    relies_on: tuple = ()
    family = 'wrapper'
    doc_score = "the inner detector's"
    doc_route = "the inner detector's"

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        self.branch = self.branch_of(model)
        self.prefix = self.branch + '.'
        self.inner = build_adapter(getattr(model, self.branch))
        self.head = self.inner.head
        self.levels_shared = self.inner.levels_shared

    def branch_of(self, model: nn.Module) -> str:
        """The name of the submodule that is the explained detector."""
        return self.head_path

    # ------------------------------------------------------------------ the inner adapter's
    def features(self, inputs: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        return self.inner.features(inputs)

    def head_outputs(self, feats: Sequence[torch.Tensor],
                     metainfo: Optional[Sequence[dict]] = None):
        return self.inner.head_outputs(feats, metainfo)

    def decode(self, outs, metainfo: dict, score_thr: float) -> Detections:
        return self.inner.decode(outs, metainfo, score_thr)

    def scores(self, outs, dets: Detections) -> torch.Tensor:
        return self.inner.scores(outs, dets)

    def strides(self) -> List[int]:
        return self.inner.strides()

    def level_layers(self) -> List[str]:
        return [self.prefix + name for name in self.inner.level_layers()]

    def level_roots(self, level: int) -> List[str]:
        return [self.prefix + name for name in self.inner.level_roots(level)]

    def level_of_layer(self, name: str) -> Optional[int]:
        """The inner adapter's answer for a layer of the explained branch; None for the other
        branch (it feeds no detection)."""
        if not name.startswith(self.prefix):
            return None
        return self.inner.level_of_layer(name[len(self.prefix):])

    def level_gradient(self) -> Optional[LevelGradient]:
        return self.inner.level_gradient()

    def window_branches(self, level: int) -> Optional[List[List[nn.Module]]]:
        return self.inner.window_branches(level)

    def window_scores(self, level: int, windows: torch.Tensor, dets: Detections) -> torch.Tensor:
        return self.inner.window_scores(level, windows, dets)

    def stages(self) -> Dict[str, List[str]]:
        """The explained branch's stages, prefixed; the other branch (which feeds no
        detection) goes with the first stage."""
        inner = self.inner.stages()
        stages = {name: [self.prefix + p for p in paths] for name, paths in inner.items()}
        return complete_stages(self.model, stages, rest=next(iter(stages)))


@ADAPTERS.register_module()
class SemiSupervisedAdapter(InnerDetectorAdapter):
    """``SemiBaseDetector`` subclasses (``SoftTeacher``): the adapter of the branch
    ``semi_test_cfg.predict_on`` names (default ``'teacher'``), with prefixed layer names.

    Raises:
        ValueError: If ``predict_on`` is not one of :data:`BRANCHES` (when the engine is
            built), or the inner detector has no adapter.
    """

    head_path = 'teacher'
    detectors = 'SoftTeacher (its teacher; the student with semi_test_cfg.predict_on=student)'
    doc_layers = "the inner detector's, prefixed `teacher.` (or `student.`)"

    def branch_of(self, model: nn.Module) -> str:
        branch = dict(getattr(model, 'semi_test_cfg', None) or {}).get('predict_on', 'teacher')
        if branch not in BRANCHES:
            raise ValueError(f'`semi_test_cfg.predict_on` of {type(model).__name__} must be one '
                             f'of {list(BRANCHES)}, got {branch!r}')
        return branch

    @classmethod
    def accepts(cls, model: nn.Module) -> bool:
        from mmdet.models.detectors import SemiBaseDetector

        return isinstance(model, SemiBaseDetector)


@ADAPTERS.register_module()
class TrackingAdapter(InnerDetectorAdapter):
    """Tracking models (``BaseMOTModel``: ByteTrack, OC-SORT, QDTrack, MaskTrack R-CNN, ...):
    the adapter of their per-frame ``detector`` (mask branch included), with layer names
    prefixed ``detector.``; the tracker and the track heads are not explained.

    Raises:
        ValueError: If the detector has no adapter.
    """

    head_path = 'detector'
    detectors = ('ByteTrack, OC-SORT, QDTrack, MaskTrack R-CNN (the per-frame detections of '
                 'their detector)')
    doc_layers = "the detector's, prefixed `detector.`"

    @classmethod
    def accepts(cls, model: nn.Module) -> bool:
        from mmdet.models.mot import BaseMOTModel

        return isinstance(model, BaseMOTModel)
