"""The seam between the engine and a detector family.

The engine, the maths, the geometry, the rendering, the metrics, the hook and the CLI know no
head. Everything a detector family decides lives in one adapter, chosen from the model's head
class through :data:`ADAPTERS` (an MMEngine ``Registry``), never from a config file name:

(a) decoding that carries the source prior (level, y, x, anchor) of each kept box through NMS,
    equal to ``model.predict`` (:meth:`DetectorAdapter.decode`);
(b) the differentiable score of one detection, with the head's own formula
    (:meth:`DetectorAdapter.scores`);
(c) the module whose output is the feature map of each level, for the level-aware default
    (:meth:`DetectorAdapter.level_layers`);
(d) what the local-window gradient shortcut needs, only where it is exact
    (:meth:`DetectorAdapter.window_branches`, :meth:`DetectorAdapter.window_scores`).

Adding a head: subclass the closest adapter, set ``head_types`` and register it with
``@ADAPTERS.register_module()``; add one row to the tests' table of heads.
"""
from dataclasses import dataclass, fields
from typing import List, Optional, Sequence, Tuple

import torch
from mmengine.registry import Registry
from torch import nn

#: Adapters by class name; :func:`build_adapter` looks the head's class (and its bases) up in
#: each adapter's ``head_types``.
ADAPTERS = Registry('CAM adapter', scope='mmdet_cam_hook')


@dataclass
class Detections:
    """Kept detections with the prior behind each box (K detections, sorted by score).

    Attributes:
        bboxes (torch.Tensor): (K, 4) x1y1x2y2 in original-image pixels.
        scores (torch.Tensor): (K,) the scores ``model.predict`` reports.
        labels (torch.Tensor): (K,) class indices.
        levels (torch.Tensor): (K,) FPN level of the prior (0 = finest).
        ys (torch.Tensor): (K,) row of the prior on its level's grid.
        xs (torch.Tensor): (K,) column of the prior on its level's grid.
        anchors (torch.Tensor): (K,) index of the prior among the priors at that location
            (0 for anchor-free heads).
    """

    bboxes: torch.Tensor
    scores: torch.Tensor
    labels: torch.Tensor
    levels: torch.Tensor
    ys: torch.Tensor
    xs: torch.Tensor
    anchors: torch.Tensor

    def __len__(self) -> int:
        return len(self.scores)

    def select(self, idx) -> 'Detections':
        """The detections at ``idx`` (an index tensor, a slice or a boolean mask)."""
        return Detections(*(getattr(self, f.name)[idx] for f in fields(self)))


class DetectorAdapter:
    """What the engine needs to know about one detector family.

    Args:
        model (nn.Module): The unwrapped detector.
    """

    #: Names of the head classes this adapter explains (subclasses of them too).
    head_types: Tuple[str, ...] = ()

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.head = model.bbox_head

    # ------------------------------------------------------------------ forward
    def features(self, inputs: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        """The per-level feature maps the head reads (the neck outputs)."""
        return tuple(self.model.extract_feat(inputs))

    def head_outputs(self, feats: Sequence[torch.Tensor]) -> tuple:
        """The head's raw outputs for all levels (``bbox_head.forward``)."""
        return self.head(tuple(feats))

    # ------------------------------------------------------------------ (a) decoding
    def decode(self, outs: tuple, metainfo: dict, score_thr: float) -> Detections:
        """Detections of one image with the prior behind each kept box.

        Boxes, labels and scores equal ``model.predict``'s for the same image when
        ``score_thr`` is at least the config's ``test_cfg.score_thr``; a lower ``score_thr``
        lowers the pre-NMS filter too, so that a random-init model can be explained.
        """
        raise NotImplementedError

    # ------------------------------------------------------------------ (b) score
    def scores(self, outs: tuple, dets: Detections) -> torch.Tensor:
        """(K,) differentiable score of each detection on the live head outputs, with the
        head's own formula (e.g. ``sigmoid(cls) * sigmoid(obj)`` for YOLOX)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ (c) layers
    def level_layers(self) -> List[str]:
        """``named_modules()`` path of the module whose output is ``features()[l]``, per level.

        Raises:
            ValueError: If the model has no such modules (then ``target_layers`` must be given).
        """
        raise NotImplementedError

    def level_of_layer(self, name: str) -> Optional[int]:
        """The level whose head alone the layer ``name`` feeds, or None if it feeds all."""
        for level, layer in enumerate(self.level_layers()):
            if name == layer or name.startswith(layer + '.'):
                return level
        return None

    # ------------------------------------------------------------------ (d) local window
    def window_branches(self, level: int) -> Optional[List[List[nn.Module]]]:
        """The head's modules between ``features()[level]`` and the score, one list per branch
        in the order they run (e.g. YOLOX: cls convs + cls predictor; reg convs + obj
        predictor). The engine checks them (stride-1 zero-padded convolutions and per-position
        operations only: no GroupNorm, no pooling) and derives the window radius from them.
        None: no shortcut for this head (the engine takes the exact full route)."""
        return None

    def window_scores(self, level: int, windows: torch.Tensor, dets: Detections) -> torch.Tensor:
        """(K,) scores of ``dets`` (all on ``level``) computed by the level's head on
        ``windows`` (K, C, S, S): window k is centred on detection k's prior, and its score is
        read at the centre ``(S // 2, S // 2)``, with detection k's label and anchor."""
        raise NotImplementedError


def build_adapter(model: nn.Module) -> DetectorAdapter:
    """The adapter for ``model``'s head class (or the nearest base class that has one).

    Raises:
        ValueError: If no adapter supports the head, naming it and the supported heads.
    """
    head = getattr(model, 'bbox_head', None)
    supported = supported_heads()
    if head is not None:
        for cls in type(head).__mro__:
            for adapter_cls in ADAPTERS.module_dict.values():
                if cls.__name__ in adapter_cls.head_types:
                    return adapter_cls(model)
    name = type(head).__name__ if head is not None else f'{type(model).__name__} (no bbox_head)'
    raise ValueError(f'mmdet-cam-hook has no adapter for the head {name}; supported heads: '
                     f'{supported}. See docs/DESIGN.md ("Adding a head")')


def supported_heads() -> List[str]:
    """Every head class name some adapter supports, sorted."""
    return sorted({t for cls in ADAPTERS.module_dict.values() for t in cls.head_types})
