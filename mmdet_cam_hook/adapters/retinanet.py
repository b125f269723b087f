"""RetinaNet (``RetinaHead``): A anchors per location (9 in mmdet's configs), sigmoid focal
classification, no score factor."""
from typing import List, Optional

from torch import nn

from .base import ADAPTERS
from .dense import DenseAdapter


@ADAPTERS.register_module()
class RetinaNetAdapter(DenseAdapter):
    """``RetinaHead``, decoded by ``BaseDenseHead._predict_by_feat_single``.

    Score of the detection with label ``c`` at prior ``(l, y, x, a)``::

        sigmoid(cls_scores[l][0, a*C + c, y, x])

    The class branch (``cls_convs``, shared across levels, then ``retina_cls``) has no norm in
    mmdet's configs, so the local-window shortcut is exact: 4 + 1 convolutions 3x3 read an
    11x11 window (radius 5) of the level's map. With a norm over positions (GroupNorm) in
    ``norm_cfg`` there is no shortcut.
    """

    head_types = ('RetinaHead', )
    family = 'RetinaNet'
    detectors = 'RetinaNet'
    doc_score = 'σ(cls[a, c]), one of 9 anchors'
    doc_layers = '`neck.fpn_convs.{0..4}` (P3-P7, strides 8-128)'
    doc_route = 'local, 11x11 window (radius 5); P6 (`fpn_convs.3`) also feeds P7: chain'

    def _score_branches(self, level: int) -> Optional[List[List[nn.Module]]]:
        return [[*self.head.cls_convs, self.head.retina_cls]]
