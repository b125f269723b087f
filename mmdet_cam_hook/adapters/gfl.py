"""GFL (``GFLHead``): quality focal loss joint class-IoU score, distribution (integral) box
regression, decoded by the head's own ``_predict_by_feat_single``."""
from typing import List, Optional

import torch
from mmengine.structures import InstanceData
from torch import nn

from .base import ADAPTERS
from .dense import DenseAdapter


@ADAPTERS.register_module()
class GFLAdapter(DenseAdapter):
    """``GFLHead`` (one anchor per location in mmdet's configs).

    Score of the detection with label ``c`` at prior ``(l, y, x, a)``::

        sigmoid(cls_scores[l][0, a*C + c, y, x])

    GroupNorm in the towers (mmdet's configs): no local-window shortcut; without norm the exact
    window is 11x11 (``cls_convs`` + ``gfl_cls``).
    """

    head_types = ('GFLHead', )
    family = 'GFL'
    detectors = 'GFL'
    doc_score = 'σ(cls[a, c]), a joint class-IoU quality'
    doc_layers = '`neck.fpn_convs.{0..4}`'
    doc_route = 'exact (GroupNorm head)'

    def _level_results(self, cls_score_list: List[torch.Tensor],
                       bbox_pred_list: List[torch.Tensor],
                       score_factor_list: List[Optional[torch.Tensor]],
                       mlvl_priors: List[torch.Tensor], img_meta: dict, cfg) -> InstanceData:
        """``GFLHead._predict_by_feat_single`` up to ``_bbox_post_process`` (integral decode of
        the box distribution times the stride, boxes from the anchor centres), with
        each candidate's flat prior index over all levels stored as ``prior_idx``."""
        from mmdet.models.utils import filter_scores_and_topk

        head = self.head
        img_shape = img_meta['img_shape']
        nms_pre = cfg.get('nms_pre', -1)
        mlvl_bboxes, mlvl_scores, mlvl_labels, mlvl_prior_idx = [], [], [], []
        start = 0
        for cls_score, bbox_pred, stride, priors in zip(
                cls_score_list, bbox_pred_list, head.prior_generator.strides, mlvl_priors):
            num_priors = len(priors)
            bbox_pred = bbox_pred.permute(1, 2, 0)
            bbox_pred = head.integral(bbox_pred) * stride[0]
            scores = cls_score.permute(1, 2, 0).reshape(-1, head.cls_out_channels).sigmoid()
            scores, labels, keep_idxs, filtered_results = filter_scores_and_topk(
                scores, cfg.score_thr, nms_pre, dict(bbox_pred=bbox_pred, priors=priors))
            bboxes = head.bbox_coder.decode(head.anchor_center(filtered_results['priors']),
                                            filtered_results['bbox_pred'], max_shape=img_shape)
            mlvl_bboxes.append(bboxes)
            mlvl_scores.append(scores)
            mlvl_labels.append(labels)
            mlvl_prior_idx.append(keep_idxs + start)
            start += num_priors
        return InstanceData(bboxes=torch.cat(mlvl_bboxes), scores=torch.cat(mlvl_scores),
                            labels=torch.cat(mlvl_labels), prior_idx=torch.cat(mlvl_prior_idx))

    def _score_branches(self, level: int) -> Optional[List[List[nn.Module]]]:
        return [[*self.head.cls_convs, self.head.gfl_cls]]

    def _prior_boxes(self, bbox_pred_list: List[torch.Tensor], mlvl_priors: List[torch.Tensor],
                     img_shape) -> torch.Tensor:
        """(N, 4) every prior's box: the integral of its distribution times the stride,
        decoded from the anchor centre (as :meth:`_level_results`)."""
        head = self.head
        preds = [head.integral(b.permute(1, 2, 0)) * s[0]
                 for b, s in zip(bbox_pred_list, head.prior_generator.strides)]
        return head.bbox_coder.decode(head.anchor_center(torch.cat(mlvl_priors)),
                                      torch.cat(preds), max_shape=img_shape)
