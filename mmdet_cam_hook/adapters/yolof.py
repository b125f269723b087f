"""YOLOF (``YOLOFHead``): one level (stride 32, after the dilated encoder), five anchors per
location, the class score normalised with an implicit objectness in the head's forward, decoded
by ``BaseDenseHead._predict_by_feat_single``."""
from typing import List, Optional

import torch
from torch import nn

from .base import ADAPTERS, Detections
from .dense import DenseAdapter


@ADAPTERS.register_module()
class YOLOFAdapter(DenseAdapter):
    """``YOLOFHead``: its cls output is already ``cls + obj - log(1 + e^cls + e^obj)`` per
    anchor and class (``e^`` clamped at 1e8), the logit of ``σ(cls) · σ(obj)`` over
    ``1 - (1 - σ(cls))(1 - σ(obj))``.

    Score of the detection with label ``c`` at prior ``(0, y, x, a)``::

        sigmoid(cls_scores[0][0, a*C + c, y, x])

    With BatchNorm in eval mode both branches are exact windows: ``cls_subnet`` (2 convs 3x3)
    and ``cls_score``, ``bbox_subnet`` (4 convs 3x3) and ``object_pred``: 11x11 (radius 5).
    """

    head_types = ('YOLOFHead', )
    family = 'YOLOF'
    detectors = 'YOLOF'
    doc_score = 'σ(cls + obj − log(1 + e^cls + e^obj))[a, c]'
    doc_layers = '`neck` (the dilated encoder, stride 32)'
    doc_route = 'local, 11x11 window (radius 5)'

    def _score_branches(self, level: int) -> Optional[List[List[nn.Module]]]:
        head = self.head
        return [[*head.cls_subnet, head.cls_score], [*head.bbox_subnet, head.object_pred]]

    def _read_window(self, outs: List[torch.Tensor], dets: Detections) -> torch.Tensor:
        """``YOLOFHead.forward_single``'s normalisation on the window centres, then the
        sigmoid of the label's logit."""
        from mmdet.models.dense_heads.yolof_head import INF

        k = torch.arange(len(dets), device=outs[0].device)
        cls = outs[0].reshape(len(dets), -1, self.head.num_classes)[k, dets.anchors]
        obj = outs[1][k, dets.anchors][:, None]
        logits = cls + obj - torch.log(1. + torch.clamp(cls.exp(), max=INF)
                                       + torch.clamp(obj.exp(), max=INF))
        return self._prob(logits, dets.labels)
