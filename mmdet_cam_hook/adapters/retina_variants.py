"""RetinaNet's relatives: heads that subclass ``RetinaHead`` and change only the training (FSAF,
FreeAnchor, PISA) or its BatchNorms (``RetinaSepBNHead``, the FPG configs), all decoded by
``BaseDenseHead._predict_by_feat_single`` (:class:`~.dense.DenseAdapter`'s)."""
from typing import List, Optional

from torch import nn

from .base import ADAPTERS
from .retinanet import RetinaNetAdapter


@ADAPTERS.register_module()
class RetinaVariantsAdapter(RetinaNetAdapter):
    """``FSAFHead``, ``FreeAnchorRetinaHead``, ``PISARetinaHead``: ``RetinaHead``'s forward and
    decoding (FSAF only puts a ReLU on its one anchor's box distances), new losses.

    Score of the detection with label ``c`` at prior ``(l, y, x, a)``::

        sigmoid(cls_scores[l][0, a*C + c, y, x])

    The class branch is RetinaNet's (``cls_convs``, ``retina_cls``): an exact 11x11 window.
    """

    head_types = ('FSAFHead', 'FreeAnchorRetinaHead', 'PISARetinaHead')
    family = 'RetinaNet variants'
    detectors = 'FSAF, FreeAnchor, PISA RetinaNet'
    doc_score = 'σ(cls[a, c]) (FSAF: 1 anchor, FreeAnchor/PISA: 9)'
    doc_layers = '`neck.fpn_convs.{0..4}`'
    doc_route = "local, 11x11 window (radius 5); a level feeding the next (FSAF's P6): chain"


@ADAPTERS.register_module()
class RetinaSepBNAdapter(RetinaNetAdapter):
    """``RetinaSepBNHead`` (FPG's RetinaNet): RetinaNet's towers with the convolutions shared by
    the levels and one BatchNorm per level (``cls_convs[l]``), one predictor ``retina_cls``.

    Score as RetinaNet's, ``sigmoid(cls_scores[l][0, a*C + c, y, x])``. BatchNorm in eval mode
    is per position: the window is exact, 11x11.
    """

    head_types = ('RetinaSepBNHead', )
    family = 'RetinaNet SepBN'
    detectors = 'FPG RetinaNet'
    doc_score = 'σ(cls[a, c]), one of 9 anchors'
    doc_layers = '`neck.output_transition.{0..4}` (FPG\'s outputs, strides 8-128)'
    doc_route = 'local, 11x11 window (radius 5)'

    def level_roots(self, level: int) -> List[str]:
        """The level map and the level's own tower (its BatchNorms; the convs are shared)."""
        return super().level_roots(level) + [f'bbox_head.cls_convs.{level}',
                                             f'bbox_head.reg_convs.{level}']

    def _score_branches(self, level: int) -> Optional[List[List[nn.Module]]]:
        return [[*self.head.cls_convs[level], self.head.retina_cls]]
