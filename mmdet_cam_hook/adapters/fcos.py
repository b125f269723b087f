"""FCOS (``FCOSHead``) and ATSS (``ATSSHead``): sigmoid classification times sigmoid
centerness, both decoded by ``BaseDenseHead._predict_by_feat_single`` with the centerness as
score factor (multiplied after the pre-NMS top-k, before NMS)."""
from typing import List, Optional

from torch import nn

from .base import ADAPTERS
from .dense import DenseAdapter


@ADAPTERS.register_module()
class FCOSAdapter(DenseAdapter):
    """``FCOSHead`` (anchor-free, one prior per location).

    Score of the detection with label ``c`` at ``(l, y, x)``::

        sigmoid(cls_scores[l][0, c, y, x]) * sigmoid(centernesses[l][0, 0, y, x])

    The centerness reads the class tower (``reg_convs`` with ``centerness_on_reg``). mmdet's
    configs put GroupNorm in the towers: its statistics are taken over the whole map, so there
    is no local-window shortcut (:meth:`window_branches` returns None, the engine takes the
    exact full route); a head built without norm gets the exact 11x11 window.
    """

    head_types = ('FCOSHead', )
    family = 'FCOS'
    detectors = 'FCOS'
    doc_score = 'σ(cls[c]) · σ(centerness)'
    doc_layers = '`neck.fpn_convs.{0..4}`'
    doc_route = 'exact (GroupNorm head)'

    def _score_branches(self, level: int) -> Optional[List[List[nn.Module]]]:
        head = self.head
        tower = head.reg_convs if head.centerness_on_reg else head.cls_convs
        return [[*head.cls_convs, head.conv_cls],
                [*tower, head.conv_centerness]]


@ADAPTERS.register_module()
class ATSSAdapter(DenseAdapter):
    """``ATSSHead`` (anchor-based; one anchor per location in mmdet's configs).

    Score of the detection with label ``c`` at prior ``(l, y, x, a)``::

        sigmoid(cls_scores[l][0, a*C + c, y, x]) * sigmoid(centernesses[l][0, a, y, x])

    The centerness reads the regression tower. GroupNorm in the towers (mmdet's configs):
    no local-window shortcut; without norm the exact window is 11x11.
    """

    head_types = ('ATSSHead', )
    family = 'ATSS'
    detectors = 'ATSS'
    doc_score = 'σ(cls[a, c]) · σ(centerness[a])'
    doc_layers = '`neck.fpn_convs.{0..4}`'
    doc_route = 'exact (GroupNorm head)'

    def _score_branches(self, level: int) -> Optional[List[List[nn.Module]]]:
        head = self.head
        return [[*head.cls_convs, head.atss_cls],
                [*head.reg_convs, head.atss_centerness]]
