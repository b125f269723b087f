"""Iterative query heads: Sparse R-CNN and QueryInst's box branch (``SparseRoIHead`` with
``DIIHead`` stages, proposals from ``EmbeddingRPNHead``).

The RPN's learned proposal boxes (scaled to the image) and proposal features (the queries) go
through ``num_stages`` DII heads; each stage pools every proposal's RoI from the FPN, updates
the queries (dynamic convolution, then self-attention across the image's proposals) and
refines the boxes. A detection is a pair (proposal q, class c) of the last stage: its score is
``sigmoid(cls[q, c])`` (or the softmax without the background), and ``model.predict`` keeps the
``max_per_img`` best pairs over ``Q x C`` (``SparseRoIHead.predict_bbox``), with no NMS.

Decoding re-runs those stages (the RoI head's own ``_bbox_forward``) and carries the proposal
index through the top-k, so boxes, labels and scores equal ``model.predict``'s exactly. The
differentiable score re-runs all stages on the live level maps: the attention mixes the
proposals, so a score reads every proposal's RoI at every stage (no RoI-only shortcut; the
engine takes the exact route). Level-aware default: the FPN level the last stage pooled the
detection's RoI from, as for Cascade R-CNN.
"""
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import nn

from .base import ADAPTERS, Detections, DetectorAdapter, complete_stages, trace_level_layers


class QueryRoIOutputs(NamedTuple):
    """What :meth:`SparseRCNNAdapter.head_outputs` returns: the last stage's class logits
    (B, Q, C or C + 1), live, and each stage's RoIs (S, B, Q, 4, x1y1x2y2 on the network input,
    constants: mmdet detaches the refined boxes between stages) and the last stage's refined
    boxes (B, Q, 4)."""

    cls_score: torch.Tensor
    stage_rois: torch.Tensor
    bboxes: torch.Tensor


@ADAPTERS.register_module()
class SparseRCNNAdapter(DetectorAdapter):
    """``SparseRoIHead`` (Sparse R-CNN, QueryInst's box branch); ``self.head`` is the RoI head.

    Score of a detection (proposal q, class c), on the last stage's logits::

        sigmoid(cls_S[q, c])                (loss_cls.use_sigmoid, mmdet's configs)
        softmax(cls_S[q])[c], c < C         (otherwise)
    """

    head_types = ('SparseRoIHead', )
    head_path = 'roi_head'
    family = 'query RoI'
    detectors = 'Sparse R-CNN, QueryInst (its box branch)'
    doc_score = 'σ(cls[q, c]) of the last DII stage (proposal q)'
    doc_layers = ("the FPN output the last stage pooled the proposal's RoI from, "
                  '`neck.fpn_convs.{0..3}` (strides 4-32)')
    doc_route = 'exact (self-attention mixes every proposal at every stage)'

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        self.roi_head = model.roi_head
        self.extractor = model.roi_head.bbox_roi_extractor[-1]

    @classmethod
    def accepts(cls, model: nn.Module) -> bool:
        from mmdet.models.dense_heads import EmbeddingRPNHead
        from mmdet.models.roi_heads import SparseRoIHead

        return (isinstance(getattr(model, 'rpn_head', None), EmbeddingRPNHead)
                and type(model.roi_head).predict_bbox is SparseRoIHead.predict_bbox
                and type(model.roi_head)._bbox_forward is SparseRoIHead._bbox_forward)

    # ------------------------------------------------------------------ forward
    def head_outputs(self, feats: Sequence[torch.Tensor],
                     metainfo: Optional[Sequence[dict]] = None) -> QueryRoIOutputs:
        """The RPN's proposals for each image's ``img_shape`` (``metainfo``; None: unpadded
        inputs, the finest map's size times its stride), then every stage, as
        ``SparseRoIHead.predict_bbox`` runs them."""
        from mmdet.structures import DetDataSample
        from mmdet.structures.bbox import bbox2roi

        feats = tuple(feats)
        if metainfo is None:
            shape = tuple(int(s) * self.strides()[0] for s in feats[0].shape[-2:])
            metainfo = [dict(img_shape=shape, batch_input_shape=shape)] * len(feats[0])
        metas = [dict(m) for m in metainfo]
        samples = [DetDataSample(metainfo=m) for m in metas]
        proposals = self.model.rpn_head.predict(feats, samples)
        boxes = [p.bboxes for p in proposals]
        object_feats = torch.cat([p.features[None] for p in proposals])
        stage_rois, cls_score = [], None
        for stage in range(self.roi_head.num_stages):
            stage_rois.append(torch.stack([b.detach() for b in boxes]))
            res = self.roi_head._bbox_forward(stage, feats, bbox2roi(boxes), object_feats, metas)
            object_feats, cls_score = res['object_feats'], res['cls_score']
            boxes = res['detached_proposals']
        return QueryRoIOutputs(cls_score, torch.stack(stage_rois), torch.stack(boxes))

    def _probs(self, cls_score: torch.Tensor) -> torch.Tensor:
        if self.roi_head.bbox_head[-1].loss_cls.use_sigmoid:
            return cls_score.sigmoid()
        return cls_score.softmax(-1)[..., :-1]

    # ------------------------------------------------------------------ (a) decoding
    def decode(self, outs: QueryRoIOutputs, metainfo: dict, score_thr: float) -> Detections:
        """Detections of image 0 with the proposal behind each box: the ``max_per_img`` best
        (proposal, class) pairs of ``SparseRoIHead.predict_bbox`` (rescaled to the original
        image) scoring at least ``score_thr``, by score."""
        num_classes = self.roi_head.bbox_head[-1].num_classes
        probs = self._probs(outs.cls_score[0].detach())
        scores, inds = probs.flatten(0, 1).topk(self.roi_head.test_cfg.max_per_img, sorted=False)
        labels = inds % num_classes
        query = torch.div(inds, num_classes, rounding_mode='floor')
        bboxes = outs.bboxes[0][query]
        if len(bboxes) > 0:
            bboxes = bboxes / bboxes.new_tensor(metainfo['scale_factor']).repeat((1, 2))
        keep = scores >= score_thr
        scores, labels, query, bboxes = scores[keep], labels[keep], query[keep], bboxes[keep]
        order = scores.argsort(descending=True, stable=True)
        scores, labels, query, bboxes = scores[order], labels[order], query[order], bboxes[order]
        rois = outs.stage_rois[:, 0, query].permute(1, 0, 2)  # (K, S, 4)
        last = torch.cat([rois.new_zeros((len(query), 1)), rois[:, -1]], 1)
        levels = self.extractor.map_roi_levels(last, len(self.strides()))
        strides = torch.tensor(self.strides(), device=levels.device)[levels]
        ys = ((rois[:, -1, 1] + rois[:, -1, 3]) / 2 / strides).floor().long()
        xs = ((rois[:, -1, 0] + rois[:, -1, 2]) / 2 / strides).floor().long()
        return Detections(bboxes, scores, labels, levels, ys, xs, torch.zeros_like(levels),
                          index=query, rois=rois)

    # ------------------------------------------------------------------ (b) score
    def scores(self, outs: QueryRoIOutputs, dets: Detections) -> torch.Tensor:
        """(K,) class scores of ``dets``' (proposal, class) pairs on the live last stage."""
        probs = self._probs(outs.cls_score[0][dets.index.long()])
        return probs.gather(1, dets.labels[:, None].long())[:, 0]

    # ------------------------------------------------------------------ (c) layers
    def strides(self) -> List[int]:
        """Strides of the level maps the last stage's RoI extractor reads."""
        return [int(s) for s in self.extractor.featmap_strides]

    def features(self, inputs: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        return tuple(self.model.extract_feat(inputs))

    def level_layers(self) -> List[str]:
        """The modules outputting the maps the RoI extractors read (``neck.fpn_convs.l``)."""
        if getattr(self, '_level_layers', None) is None:
            num = len(self.strides())
            self._level_layers = trace_level_layers(
                self.model, lambda x: self.features(x)[:num], 2 * max(self.strides()))
        return list(self._level_layers)

    def level_of_layer(self, name: str) -> Optional[int]:
        """None: every stage pools every proposal, and the attention mixes them."""
        return None

    # ------------------------------------------------------------------ randomisation stages
    def stages(self) -> Dict[str, List[str]]:
        """``roi_head`` (every DII stage, and the mask branch), ``rpn_head`` (the learned
        proposals and queries), ``neck``, ``backbone``."""
        return complete_stages(self.model, {'roi_head': ['roi_head'], 'rpn_head': ['rpn_head'],
                                            'neck': ['neck'], 'backbone': ['backbone']},
                               rest='roi_head')
