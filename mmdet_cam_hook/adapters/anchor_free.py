"""Anchor-free heads (``AnchorFreeHead`` subclasses, one prior per location) that FCOS's
adapter does not take: FoveaBox and RepPoints (their own box decoding), AutoAssign (objectness
as score factor) and CenterNet-update (a plain sigmoid class score)."""
from typing import List, Optional

import torch
from mmengine.structures import InstanceData
from torch import nn

from .base import ADAPTERS
from .dense import DenseAdapter
from .fcos import FCOSAdapter


class PointDecodeAdapter(DenseAdapter):
    """Heads whose ``_predict_by_feat_single`` is ``BaseDenseHead``'s with the head's own
    ``_bbox_decode(points, bbox_pred, per-level size, img_shape)`` run per level after the
    pre-NMS top-k (FoveaBox, RepPoints); no score factor."""

    #: The head's attribute listing that per-level size (``base_edge_list``, ``point_strides``).
    level_sizes: str = ''

    def _decode_level(self, level: int, priors: torch.Tensor, bbox_pred: torch.Tensor,
                      img_shape) -> torch.Tensor:
        """The head's boxes of one level's kept candidates."""
        return self.head._bbox_decode(priors, bbox_pred,
                                      getattr(self.head, self.level_sizes)[level], img_shape)

    def _level_results(self, cls_score_list, bbox_pred_list, score_factor_list, mlvl_priors,
                       img_meta: dict, cfg) -> InstanceData:
        """The head's ``_predict_by_feat_single`` up to ``_bbox_post_process``, with
        ``prior_idx``."""
        from mmdet.models.utils import filter_scores_and_topk

        head = self.head
        nms_pre = cfg.get('nms_pre', -1)
        bboxes, scores, labels, prior_idx = [], [], [], []
        start = 0
        for level, (cls_score, bbox_pred, priors) in enumerate(
                zip(cls_score_list, bbox_pred_list, mlvl_priors)):
            bbox_pred = bbox_pred.permute(1, 2, 0).reshape(-1, 4)
            logits = cls_score.permute(1, 2, 0).reshape(-1, head.cls_out_channels)
            prob = logits.sigmoid() if head.use_sigmoid_cls else logits.softmax(-1)[:, :-1]
            prob, label, keep, filtered = filter_scores_and_topk(
                prob, cfg.score_thr, nms_pre, dict(bbox_pred=bbox_pred, priors=priors))
            bboxes.append(self._decode_level(level, filtered['priors'], filtered['bbox_pred'],
                                             img_meta['img_shape']))
            scores.append(prob)
            labels.append(label)
            prior_idx.append(keep + start)
            start += len(priors)
        return InstanceData(bboxes=torch.cat(bboxes), scores=torch.cat(scores),
                            labels=torch.cat(labels), prior_idx=torch.cat(prior_idx))


@ADAPTERS.register_module()
class FoveaAdapter(PointDecodeAdapter):
    """``FoveaHead``: boxes are ``exp`` of the distances times the level's base edge, around
    the point.

    Score of the detection with label ``c`` at ``(l, y, x)``::

        sigmoid(cls_scores[l][0, c, y, x])

    Without ``with_deform`` the class branch (``cls_convs``, ``conv_cls``) has no norm in
    mmdet's configs: an exact 11x11 window. The ``gn-head-align`` configs put GroupNorm and a
    deformable feature alignment (offsets from the box branch) in the path: no window.
    """

    head_types = ('FoveaHead', )
    level_sizes = 'base_edge_list'
    family = 'FoveaBox'
    detectors = 'FoveaBox'
    doc_score = 'σ(cls[c])'
    doc_layers = '`neck.fpn_convs.{0..4}`'
    doc_route = 'local, 11x11 window (radius 5); `align` configs: exact'

    def _score_branches(self, level: int) -> Optional[List[List[nn.Module]]]:
        if self.head.with_deform:
            return None
        return [[*self.head.cls_convs, self.head.conv_cls]]


@ADAPTERS.register_module()
class RepPointsAdapter(PointDecodeAdapter):
    """``RepPointsHead``: at test time its box output is ``points2bbox`` of the refined point
    set (min-max or moment transform), decoded around the point at the level's point stride.

    Score of the detection with label ``c`` at ``(l, y, x)``::

        sigmoid(cls_scores[l][0, c, y, x])   (softmax over C + 1 without sigmoid loss)

    The class map is read from a deformable conv whose offsets are the initial points (the
    point tower): no window (exact route).
    """

    head_types = ('RepPointsHead', )
    level_sizes = 'point_strides'
    family = 'RepPoints'
    detectors = 'RepPoints'
    doc_score = 'σ(cls[c]) at the point, box from the refined point set'
    doc_layers = '`neck.fpn_convs.{0..4}`'
    doc_route = 'exact (deformable conv, GroupNorm)'


@ADAPTERS.register_module()
class AutoAssignAdapter(FCOSAdapter):
    """``AutoAssignHead`` (an ``FCOSHead``): its third output is an objectness, always read from
    the regression tower, decoded as FCOS's centerness (score factor).

    Score of the detection with label ``c`` at ``(l, y, x)``::

        sigmoid(cls_scores[l][0, c, y, x]) * sigmoid(objectness[l][0, 0, y, x])

    GroupNorm in the towers (``FCOSHead``'s default, which mmdet's config keeps): no window;
    without norm the window is exact (11x11, both branches).
    """

    head_types = ('AutoAssignHead', )
    family = 'AutoAssign'
    detectors = 'AutoAssign'
    doc_score = 'σ(cls[c]) · σ(objectness)'
    doc_layers = '`neck.fpn_convs.{0..4}`'
    doc_route = 'exact (GroupNorm head)'

    def _score_branches(self, level: int) -> Optional[List[List[nn.Module]]]:
        head = self.head
        return [[*head.cls_convs, head.conv_cls], [*head.reg_convs, head.conv_centerness]]


@ADAPTERS.register_module()
class CenterNetUpdateAdapter(DenseAdapter):
    """``CenterNetUpdateHead`` (CenterNet as an FPN dense head): ``BaseDenseHead``'s decoding,
    no score factor.

    Score of the detection with label ``c`` at ``(l, y, x)``::

        sigmoid(cls_scores[l][0, c, y, x])

    GroupNorm in the towers (mmdet's config): no window; without norm, 11x11.
    """

    head_types = ('CenterNetUpdateHead', )
    family = 'CenterNet (update)'
    detectors = 'CenterNet-update'
    doc_score = 'σ(cls[c])'
    doc_layers = '`neck.fpn_convs.{0..4}`'
    doc_route = 'exact (GroupNorm head)'

    def _score_branches(self, level: int) -> Optional[List[List[nn.Module]]]:
        return [[*self.head.cls_convs, self.head.conv_cls]]
