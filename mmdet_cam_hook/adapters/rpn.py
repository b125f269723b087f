"""The region proposal network on its own (mmdet's ``RPN`` detector, ``RPNHead``): its
proposals are its detections, class-agnostic (label 0).

``RPNHead._predict_by_feat_single`` keeps the ``nms_pre`` best anchors of each level by score,
decodes them, and ``RPNHead._bbox_post_process`` rescales, drops boxes under
``min_bbox_size``, runs NMS per level (``batched_nms`` on the level ids) and keeps
``max_per_img``. :class:`RPNAdapter` re-runs that loop with the anchor index carried as an
extra ``InstanceData`` field through mmdet's own ``_bbox_post_process``, so the proposals equal
``model.predict``'s exactly.

mmdet's RPN configs build the FPN with ``add_extra_convs=False``: its top level (P6, stride
64) is ``F.max_pool2d(P5, 1, stride=2)``, which no module outputs. There the adapter's level
maps are the FPN's convolved outputs only (P2-P5), :meth:`RPNAdapter.head_outputs` pools P6
from P5 as the FPN does, and a proposal from P6 anchor ``(y, x, a)`` is located on P5 at
``(2y, 2x)`` with anchor index ``A + a`` (A anchors per location): P6[y, x] *is* P5[2y, 2x],
so its map is taken on P5 (whose route is then the exact one: P5's window does not hold the
dilated one P6's 3x3 conv reads).
"""
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from mmengine.structures import InstanceData
from torch import nn

from .base import ADAPTERS, Detections
from .dense import DenseAdapter


class PooledTopLevel:
    """For adapters (put before their base adapter class) whose neck may be an FPN with a
    max-pooled top level (mmdet's RPN and SOLO configs, see the module docstring): the level
    maps are then the convolved ones, and the head's outputs pool the top level from the
    level below as the FPN does."""

    model: nn.Module
    head: nn.Module

    @property
    def pooled_top(self) -> bool:
        """Whether the neck's top output is its level below max-pooled (an ``FPN`` with
        ``add_extra_convs=False`` and one level more than it convolves)."""
        neck = getattr(self.model, 'neck', None)
        return (type(neck).__name__ == 'FPN' and not neck.add_extra_convs
                and neck.num_outs == neck.backbone_end_level - neck.start_level + 1)

    # ------------------------------------------------------------------ forward
    def features(self, inputs: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        """The neck's maps; without a pooled top level's (see :attr:`pooled_top`)."""
        feats = tuple(self.model.extract_feat(inputs))
        return feats[:-1] if self.pooled_top else feats

    def head_outputs(self, feats: Sequence[torch.Tensor],
                     metainfo: Optional[Sequence[dict]] = None) -> tuple:
        """The head's forward on every level, a pooled top one made as the FPN does."""
        feats = tuple(feats)
        if self.pooled_top:
            feats = feats + (F.max_pool2d(feats[-1], 1, stride=2), )
        return self.head(feats)


@ADAPTERS.register_module()
class RPNAdapter(PooledTopLevel, DenseAdapter):
    """``RPNHead`` as the detector's own head (the ``RPN`` detector).

    Score of the proposal at anchor ``(l, y, x, a)``::

        sigmoid(rpn_cls[l][0, a, y, x])        (softmax over 2 logits with use_sigmoid=False)

    The objectness branch is ``rpn_conv`` (one 3x3 convolution in mmdet's configs), a ReLU and
    the 1x1 ``rpn_cls``, with no norm: the local-window shortcut is exact (radius 1) on every
    level map but the one a pooled top level is read from.
    """

    head_types = ('RPNHead', )
    family = 'RPN'
    detectors = 'RPN (proposals as detections)'
    doc_score = 'σ(rpn_cls[a]), one of 3 anchors; class-agnostic (label 0)'
    doc_layers = ('`neck.fpn_convs.{0..3}` (strides 4-32); P6 = max-pool of P5 is read on '
                  '`fpn_convs.3`')
    doc_route = 'local, 3x3 window (radius 1); `fpn_convs.3` (also feeds P6): exact'

    def strides(self) -> List[int]:
        """Strides of the maps :meth:`features` returns."""
        strides = super().strides()
        return strides[:-1] if self.pooled_top else strides

    # ------------------------------------------------------------------ (a) decoding
    def _level_results(self, cls_score_list: List[torch.Tensor],
                       bbox_pred_list: List[torch.Tensor],
                       score_factor_list: List[Optional[torch.Tensor]],
                       mlvl_priors: List[torch.Tensor], img_meta: dict, cfg) -> InstanceData:
        """``RPNHead._predict_by_feat_single`` up to ``_bbox_post_process``, storing each
        candidate's flat anchor index over all levels as ``prior_idx``."""
        from mmdet.structures.bbox import cat_boxes

        head = self.head
        nms_pre = cfg.get('nms_pre', -1)
        preds, valid_priors, scores_list, level_ids, prior_idx = [], [], [], [], []
        start = 0
        for level, (cls_score, bbox_pred, priors) in enumerate(
                zip(cls_score_list, bbox_pred_list, mlvl_priors)):
            bbox_pred = bbox_pred.permute(1, 2, 0).reshape(-1, head.bbox_coder.encode_size)
            cls_score = cls_score.permute(1, 2, 0).reshape(-1, head.cls_out_channels)
            scores = cls_score.sigmoid() if head.use_sigmoid_cls else \
                cls_score.softmax(-1)[:, :-1]
            scores = torch.squeeze(scores)
            keep = torch.arange(len(scores), device=scores.device)
            if 0 < nms_pre < scores.shape[0]:
                ranked, rank_inds = scores.sort(descending=True)
                keep = rank_inds[:nms_pre]
                scores, bbox_pred, priors = ranked[:nms_pre], bbox_pred[keep, :], priors[keep]
            preds.append(bbox_pred)
            valid_priors.append(priors)
            scores_list.append(scores)
            level_ids.append(scores.new_full((scores.size(0), ), level, dtype=torch.long))
            prior_idx.append(keep + start)
            start += len(mlvl_priors[level])
        results = InstanceData()
        results.bboxes = head.bbox_coder.decode(cat_boxes(valid_priors), torch.cat(preds),
                                                max_shape=img_meta['img_shape'])
        results.scores = torch.cat(scores_list)
        results.level_ids = torch.cat(level_ids)
        results.prior_idx = torch.cat(prior_idx)
        return results

    def _locate(self, results: InstanceData, score_thr: float,
                sizes: Sequence[Tuple[int, int]]) -> Detections:
        """As the dense adapters, then a pooled top level's proposals onto the level below."""
        dets = super()._locate(results, score_thr, sizes)
        if self.pooled_top:
            top = dets.levels == len(sizes) - 1
            dets.levels[top] -= 1
            dets.ys[top] *= 2
            dets.xs[top] *= 2
            dets.anchors[top] += self.num_base_priors
        return dets

    # ------------------------------------------------------------------ (b) score
    def scores(self, outs: tuple, dets: Detections) -> torch.Tensor:
        """(K,) objectness of ``dets`` on the live outputs; those of a pooled top level (anchor
        index ``>= A``) read on its own outputs at ``(y / 2, x / 2)``."""
        if not self.pooled_top:
            return super().scores(outs, dets)
        num = self.num_base_priors
        top = dets.anchors >= num
        shifted = Detections(dets.bboxes, dets.scores, dets.labels,
                             torch.where(top, dets.levels + 1, dets.levels),
                             torch.where(top, dets.ys // 2, dets.ys),
                             torch.where(top, dets.xs // 2, dets.xs),
                             torch.where(top, dets.anchors - num, dets.anchors))
        return super().scores(outs, shifted)

    # ------------------------------------------------------------------ (d) local window
    def _score_branches(self, level: int) -> Optional[List[List[nn.Module]]]:
        """``rpn_conv``, a ReLU (``F.relu`` in ``forward_single``), ``rpn_cls``; none on the
        map a pooled top level is read from."""
        if self.pooled_top and level == len(self.strides()) - 1:
            return None
        return [[self.head.rpn_conv, nn.ReLU(), self.head.rpn_cls]]
