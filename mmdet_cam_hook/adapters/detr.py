"""The DETR family: DETR, Deformable DETR, DINO, Conditional DETR and DAB-DETR.

A detection is a pair (query, class). Its score is the head's own class score of that query at
the last decoder layer: ``sigmoid(cls[q, c])`` for Deformable DETR and DINO (focal-loss heads,
top-k over queries x classes), ``softmax(cls[q])[c]`` without the no-object class for DETR.

Decoding re-runs ``DETRHead._predict_by_feat_single`` (which both subclasses use) on the
detached last-layer outputs with the query index carried through its top-k, so boxes, labels and
scores equal ``model.predict``'s exactly; there is no NMS.

The head reads the transformer's output, and the transformer's encoder mixes every neck level
(and, in DETR, every position) through attention: every level map feeds every detection. The
level-aware default therefore takes all the neck outputs together (the maps of all levels
averaged, as for several given layers; :attr:`DetectorAdapter.levels_shared`), and every layer
takes the engine's exact route (one backward per detection through the transformer).
"""
from typing import Dict, List, NamedTuple, Optional, Sequence

import torch
from mmengine.structures import InstanceData
from torch import nn

from .base import (
    ADAPTERS,
    Detections,
    DetectorAdapter,
    complete_stages,
    trace_level_layers,
    trace_strides,
)
from .candidates import Candidates, pair_table

#: Side of the zero input used to find the level maps' strides and modules.
_TRACE_SIZE = 256


class QueryOutputs(NamedTuple):
    """What :meth:`DETRAdapter.head_outputs` returns: the last decoder layer's class logits
    (B, Q, C or C + 1) and normalised ``(cx, cy, w, h)`` boxes (B, Q, 4), live."""

    cls_scores: torch.Tensor
    bbox_preds: torch.Tensor


@ADAPTERS.register_module()
class DETRAdapter(DetectorAdapter):
    """``DETRHead`` and its subclasses (``DeformableDETRHead``, ``DINOHead``,
    ``ConditionalDETRHead``, ``DABDETRHead``) in mmdet's ``DetectionTransformer`` detectors
    (``forward_transformer``, then the head).

    Score of a detection (query q, class c), on the last decoder layer's logits::

        sigmoid(cls[q, c])                 (loss_cls.use_sigmoid: Deformable DETR, DINO)
        softmax(cls[q])[c], c < C          (DETR; the no-object logit is in the softmax)
    """

    head_types = ('DETRHead', 'DeformableDETRHead', 'DINOHead', 'ConditionalDETRHead',
                  'DABDETRHead')
    relies_on = ('_predict_by_feat_single', )
    family = 'DETR'
    detectors = 'DINO, Deformable DETR, DETR, Conditional DETR, DAB-DETR'
    doc_score = ('σ(cls[q, c]) (DINO, Deformable DETR, Conditional DETR, DAB-DETR); '
                 'softmax(cls[q])[c] without no-object (DETR); last decoder layer')
    doc_layers = ('all neck outputs together, maps averaged (`neck.convs.{0,1,2}`, '
                  '`neck.extra_convs.0`, strides 8-64; DETR: `neck.convs.0`)')
    doc_route = 'exact (one backward through the transformer per detection)'
    levels_shared = True

    @classmethod
    def accepts(cls, model: nn.Module) -> bool:
        from mmdet.models.dense_heads import DETRHead

        return (hasattr(model, 'forward_transformer')
                and type(model.bbox_head)._predict_by_feat_single
                is DETRHead._predict_by_feat_single)

    # ------------------------------------------------------------------ forward
    def head_outputs(self, feats: Sequence[torch.Tensor],
                     metainfo: Optional[Sequence[dict]] = None) -> QueryOutputs:
        """The transformer and the head on ``feats``; the padding masks come from each image's
        ``img_shape`` and ``batch_input_shape`` in ``metainfo`` (one dict per image; None:
        unpadded inputs, the size of the level maps times their strides)."""
        from mmdet.structures import DetDataSample

        if metainfo is None:
            shape = tuple(int(s) * self.strides()[0] for s in feats[0].shape[-2:])
            metainfo = [dict(img_shape=shape, batch_input_shape=shape)] * len(feats[0])
        samples = [DetDataSample(metainfo=dict(m)) for m in metainfo]
        head_inputs = self.model.forward_transformer(tuple(feats), samples)
        inputs = {k: head_inputs[k] for k in ('hidden_states', 'references') if k in head_inputs}
        cls_scores, bbox_preds = self.head(**inputs)
        return QueryOutputs(cls_scores[-1], bbox_preds[-1])

    # ------------------------------------------------------------------ (a) decoding
    def decode(self, outs: QueryOutputs, metainfo: dict, score_thr: float) -> Detections:
        """Detections with the query behind each box: ``DETRHead._predict_by_feat_single``
        (rescaled to the original image) with the query index carried through its top-k; the
        ``max_per_img`` results scoring at least ``score_thr``, by score."""
        head = self.head
        cls_score = outs.cls_scores[0].detach()
        max_per_img = head.test_cfg.get('max_per_img', len(cls_score))
        if head.loss_cls.use_sigmoid:
            scores, indexes = cls_score.sigmoid().view(-1).topk(max_per_img)
            labels = indexes % head.num_classes
            query = indexes // head.num_classes
        else:
            scores, labels = cls_score.softmax(-1)[..., :-1].max(-1)
            scores, query = scores.topk(max_per_img)
            labels = labels[query]
        return self._query_detections(outs.bbox_preds[0].detach(), scores, labels, query,
                                      metainfo, score_thr)

    def _query_detections(self, bbox_pred: torch.Tensor, scores: torch.Tensor,
                          labels: torch.Tensor, query: torch.Tensor, metainfo: dict,
                          score_thr: float) -> Detections:
        """The detections of the selected (query, label) pairs: ``DETRHead``'s box decoding
        (normalised ``cx, cy, w, h`` to clamped ``x1, y1, x2, y2``, rescaled to the original
        image), those scoring at least ``score_thr``, by score (stable); the cell of each box
        centre on the finest level stands for its position."""
        from mmdet.structures.bbox import bbox_cxcywh_to_xyxy

        img_shape = metainfo['img_shape']
        boxes = bbox_cxcywh_to_xyxy(bbox_pred[query])
        boxes[:, 0::2] = boxes[:, 0::2] * img_shape[1]
        boxes[:, 1::2] = boxes[:, 1::2] * img_shape[0]
        boxes[:, 0::2].clamp_(min=0, max=img_shape[1])
        boxes[:, 1::2].clamp_(min=0, max=img_shape[0])
        centres = bbox_pred[query, :2] * bbox_pred.new_tensor(img_shape[::-1])
        boxes /= boxes.new_tensor(metainfo['scale_factor']).repeat((1, 2))
        results = InstanceData(bboxes=boxes, scores=scores, labels=labels, query=query,
                               centres=centres)
        results = results[results.scores >= score_thr]
        results = results[results.scores.argsort(descending=True, stable=True)]
        cells = (results.centres / self.strides()[0]).floor().long()
        levels = torch.zeros_like(results.query)
        return Detections(results.bboxes, results.scores, results.labels, levels,
                          cells[:, 1], cells[:, 0], torch.zeros_like(levels),
                          index=results.query)

    # ------------------------------------------------------------------ (b) score
    def scores(self, outs: QueryOutputs, dets: Detections) -> torch.Tensor:
        """(K,) class scores of ``dets``' (query, class) pairs on the live last-layer logits."""
        logits = outs.cls_scores[0][dets.index.long()]  # (K, C or C + 1)
        probs = logits.sigmoid() if self.head.loss_cls.use_sigmoid else logits.softmax(-1)
        return probs.gather(1, dets.labels[:, None].long())[:, 0]

    # ------------------------------------------------------------------ (c) layers
    def strides(self) -> List[int]:
        """Stride of each neck output (from one forward of :meth:`features` on a zero input)."""
        if getattr(self, '_strides', None) is None:
            self._strides = trace_strides(self.model, self.features, _TRACE_SIZE)
        return list(self._strides)

    def level_layers(self) -> List[str]:
        """The modules outputting the neck's maps (``neck.convs.l``, ``neck.extra_convs.0``)."""
        if getattr(self, '_level_layers', None) is None:
            self._level_layers = trace_level_layers(self.model, self.features, _TRACE_SIZE)
        return list(self._level_layers)

    def level_of_layer(self, name: str) -> Optional[int]:
        """None: the encoder mixes the levels, so every layer feeds every detection."""
        return None

    # ------------------------------------------------------------------ randomisation stages
    def stages(self) -> Dict[str, List[str]]:
        """``head`` (``bbox_head``), ``decoder`` (with what builds its queries and reference
        points: ``query_embedding``, ``memory_trans_*``, ``reference_points_fc``,
        ``pos_trans_*``, ``dn_query_generator``), ``encoder`` (with ``level_embed``, added to
        its input), ``neck``, ``backbone``. Any other top-level part goes with the decoder."""
        decoder = ['decoder', 'query_embedding', 'memory_trans_fc', 'memory_trans_norm',
                   'reference_points_fc', 'pos_trans_fc', 'pos_trans_norm',
                   'dn_query_generator']
        return complete_stages(self.model, {'head': ['bbox_head'], 'decoder': decoder,
                                            'encoder': ['encoder', 'level_embed'],
                                            'neck': ['neck'], 'backbone': ['backbone']},
                               rest='decoder')


    # ------------------------------------------------------------------ (e) candidates
    def candidates(self, outs: QueryOutputs, metainfo: dict, score_thr: float,
                   detections: Optional[Detections] = None) -> Candidates:
        """Every query before the top-k and the score threshold (DETR has no NMS): its box as
        :meth:`decode` converts it, its per-class scores (the formula of :meth:`scores`), and
        the (query, class) pairs that made ``DETRHead._predict_by_feat_single``'s
        ``max_per_img`` top-k (:meth:`decode` with no threshold)."""
        entered_dets = self.decode(outs, metainfo, -1.0)
        dets = self.decode(outs, metainfo, score_thr) if detections is None else detections
        cls_score, bbox_pred = outs.cls_scores[0].detach(), outs.bbox_preds[0].detach()
        num = len(cls_score)
        with torch.no_grad():
            probs = cls_score.sigmoid() if self.head.loss_cls.use_sigmoid \
                else cls_score.softmax(-1)[:, :-1]
            boxes, centres = self._query_boxes(bbox_pred, metainfo)
        device = cls_score.device
        entered = pair_table(num, self.head.num_classes, entered_dets.index, entered_dets.labels)
        kept = pair_table(num, self.head.num_classes, dets.index.to(device),
                          dets.labels.to(device), torch.arange(len(dets), device=device))
        cells = (centres / self.strides()[0]).floor().long()
        zeros = torch.zeros(num, dtype=torch.long, device=device)
        return Candidates(boxes, probs, entered, kept, zeros, cells[:, 1], cells[:, 0], zeros,
                          dets, -1.0, index=torch.arange(num, device=device))

    @staticmethod
    def _query_boxes(bbox_pred: torch.Tensor, metainfo: dict):
        """(Q, 4) every query's box in original-image pixels and (Q, 2) its centre on the
        network input, converted as :meth:`decode` converts the kept ones."""
        from mmdet.structures.bbox import bbox_cxcywh_to_xyxy

        img_shape = metainfo['img_shape']
        boxes = bbox_cxcywh_to_xyxy(bbox_pred)
        boxes[:, 0::2] = boxes[:, 0::2] * img_shape[1]
        boxes[:, 1::2] = boxes[:, 1::2] * img_shape[0]
        boxes[:, 0::2].clamp_(min=0, max=img_shape[1])
        boxes[:, 1::2].clamp_(min=0, max=img_shape[0])
        centres = bbox_pred[:, :2] * bbox_pred.new_tensor(img_shape[::-1])
        boxes /= boxes.new_tensor(metainfo['scale_factor']).repeat((1, 2))
        return boxes, centres
