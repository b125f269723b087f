"""Two-stage detectors: Faster R-CNN, Mask R-CNN (its box branch) and Cascade R-CNN.

A detection is a pair (RoI, class). Its score is the RoI bbox head's class probability
(softmax over the ``C + 1`` logits, or the loss's own activation) for the refined box that was
kept; Cascade R-CNN's is that of the mean of its stages' logits, each stage read on its own
RoI (the RoI refined by the stage before), as ``CascadeRoIHead.predict_bbox`` computes it.

Decoding re-runs mmdet's inference on the detached features (the RPN's own ``predict_by_feat``,
the RoI head's own ``_bbox_forward`` on every proposal, then ``BBoxHead._predict_by_feat_single``
with ``multiclass_nms(..., return_inds=True)``, whose kept indices into the flattened
``RoIs x classes`` give each detection its RoI and class), so boxes, labels and scores equal
``model.predict``'s exactly. Proposals are constants, as in mmdet's inference (its RPN decoding
detaches them, and RoIAlign has no gradient w.r.t. its boxes).

The differentiable score of a detection needs only its own RoI: RoIAlign pools each RoI on its
own and the bbox head is per row (eval mode), so :meth:`TwoStageAdapter.scores` re-runs the RoI
head's ``_bbox_forward`` on the live level maps for the K detections' RoIs only.

Level-aware default: the FPN level the RoI extractor pooled the detection's (last-stage) RoI
from (its own ``map_roi_levels``), on the FPN outputs the extractor reads (``neck.fpn_convs.l``).
For Faster/Mask R-CNN a level's map feeds only the RoIs pooled from it, and
:class:`RoIGradient` gives every detection's gradient there from one backward through the RoI
head for all K RoIs, then RoIAlign's own backward per detection (exact). Cascade R-CNN's stages
may pool one detection from several levels, so its maps take the engine's exact route.
"""
import copy
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch
from mmengine.structures import InstanceData
from torch import nn

from .base import ADAPTERS, Detections, DetectorAdapter, complete_stages, trace_level_layers
from .candidates import Candidates, nms_threshold, pair_table


class RoIOutputs(NamedTuple):
    """What :meth:`TwoStageAdapter.head_outputs` returns: the live level maps and the RPN's raw
    outputs (computed without gradients: the proposals are constants)."""

    feats: Tuple[torch.Tensor, ...]
    rpn: tuple


#: What the two-stage adapters run of the RPN themselves (its forward, its own decoding).
_RPN_RELIES_ON = ('forward', 'forward_single', 'predict_by_feat', '_predict_by_feat_single',
                  '_bbox_post_process')
#: What the adapters of a single-stage RoI head run of it themselves (its box prediction).
_ROI_BOX_RELIES_ON = ('predict', 'predict_bbox', '_bbox_forward')


def _overrides(cls: type, base: type, names: Sequence[str]) -> bool:
    return any(getattr(cls, n, None) is not getattr(base, n) for n in names)


def roi_head_standard(model: nn.Module, roi_head_type: type, methods: Sequence[str]) -> bool:
    """Whether ``model`` has an RPN and its ``roi_head`` is a ``roi_head_type`` (or a subclass)
    overriding none of ``methods``, with a ``bbox_head`` decoding with
    ``BBoxHead._predict_by_feat_single``: the single-stage RoI heads' :meth:`accepts` (the
    standard one, Grid R-CNN's, Mask Scoring R-CNN's, TridentNet's)."""
    from mmdet.models.roi_heads.bbox_heads import BBoxHead

    roi_head = getattr(model, 'roi_head', None)
    return (getattr(model, 'rpn_head', None) is not None
            and isinstance(roi_head, roi_head_type)
            and not _overrides(type(roi_head), roi_head_type, methods)
            and not _overrides(type(roi_head.bbox_head), BBoxHead,
                               ('_predict_by_feat_single', )))


@ADAPTERS.register_module()
class TwoStageAdapter(DetectorAdapter):
    """``StandardRoIHead`` models with an RPN (Faster R-CNN, Mask R-CNN, ...) whose RoI bbox
    head decodes with ``BBoxHead._predict_by_feat_single``.

    Selected by the class of ``roi_head.bbox_head`` (any ``BBoxHead``); :meth:`accepts` also
    asks that the RoI head predicts boxes as ``StandardRoIHead`` does (a subclass overriding
    ``predict``/``predict_bbox``, e.g. Grid R-CNN, is not taken). ``self.head`` is the RoI head.
    """

    head_types = ('BBoxHead', 'ConvFCBBoxHead')
    relies_on = ('forward', 'predict_by_feat', '_predict_by_feat_single', 'regress_by_class')
    relies_on_parts = {'rpn_head': (('RPNHead', ), _RPN_RELIES_ON),
                       'roi_head': (('StandardRoIHead', 'PointRendRoIHead'),
                                    _ROI_BOX_RELIES_ON + ('predict_mask', ))}
    excluded_types = ('SABLHead', 'MultiInstanceBBoxHead')
    head_path = 'roi_head.bbox_head'
    family = 'two-stage'
    detectors = ('Faster R-CNN, Mask R-CNN (its box branch), Libra R-CNN, Dynamic R-CNN, PISA, '
                 'PointRend (its box branch)')
    doc_score = "softmax(cls[i])[c] of the kept RoI i (or the loss's own activation)"
    doc_layers = 'the FPN output the RoI was pooled from, `neck.fpn_convs.{0..3}` (strides 4-32)'
    doc_route = ("one backward through the RoI head for all detections, then RoIAlign's own "
                 'backward per detection (exact)')

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        self.roi_head = model.roi_head
        self.head = model.roi_head
        self.extractor = model.roi_head.bbox_roi_extractor

    @classmethod
    def accepts(cls, model: nn.Module) -> bool:
        from mmdet.models.roi_heads import StandardRoIHead

        return roi_head_standard(model, StandardRoIHead, ('predict', 'predict_bbox'))

    # ------------------------------------------------------------------ forward
    def head_outputs(self, feats: Sequence[torch.Tensor],
                     metainfo: Optional[Sequence[dict]] = None) -> RoIOutputs:
        """The live level maps and the RPN's raw outputs (without gradients)."""
        with torch.no_grad():
            rpn = self.model.rpn_head(tuple(f.detach() for f in feats))
        return RoIOutputs(tuple(feats), rpn)

    @property
    def _last_bbox_head(self) -> nn.Module:
        return self.roi_head.bbox_head

    def _stage_forward(self, feats: Sequence[torch.Tensor], rois: torch.Tensor,
                       metainfo: Optional[dict] = None
                       ) -> Tuple[List[torch.Tensor], torch.Tensor, Optional[torch.Tensor]]:
        """``([rois of each stage], cls_score, bbox_pred)`` of the RoI head on ``rois``
        (N, 5); one stage here."""
        res = self.roi_head._bbox_forward(tuple(feats), rois)
        return [rois], res['cls_score'], res['bbox_pred']

    def _activation(self, cls_score: torch.Tensor) -> torch.Tensor:
        """Class probabilities as the last bbox head's decoding computes them."""
        head = self._last_bbox_head
        if head.custom_cls_channels:
            return head.loss_cls.get_activation(cls_score)
        return cls_score.softmax(-1)

    # ------------------------------------------------------------------ (a) decoding
    def proposals(self, outs: RoIOutputs, metainfo: dict) -> torch.Tensor:
        """(N, 4) proposals of the RPN (``rpn_head.predict`` without rescaling), constants."""
        results = self.model.rpn_head.predict_by_feat(
            *(tuple(t.detach() for t in o) for o in outs.rpn), batch_img_metas=[metainfo],
            rescale=False)
        return results[0].bboxes.detach()

    def decode(self, outs: RoIOutputs, metainfo: dict, score_thr: float) -> Detections:
        """Detections with the RoI behind each kept box; equal to ``model.predict`` for scores
        ``>= score_thr`` (the RoI head's pre-NMS filter is ``min(test_cfg.score_thr,
        score_thr)``)."""
        from mmdet.structures.bbox import bbox2roi

        feats = tuple(f.detach() for f in outs.feats)
        with torch.no_grad():
            rois = bbox2roi([self.proposals(outs, metainfo)])
            if rois.shape[0] == 0:
                none = rois.new_zeros((0, ), dtype=torch.long)
                return Detections(rois.new_zeros((0, 4)), rois.new_zeros((0, )), none, none,
                                  none, none, none, index=none,
                                  rois=rois.new_zeros((0, 1, 4)))
            stage_rois, cls_score, bbox_pred = self._stage_forward(feats, rois, metainfo)
            cfg = copy.deepcopy(self.roi_head.test_cfg)
            cfg.score_thr = min(float(cfg.get('score_thr', 0.0)), float(score_thr))
            results = self._predict_single(stage_rois[-1], cls_score, bbox_pred, metainfo, cfg)
        results = results[results.scores >= score_thr]
        results = results[results.scores.argsort(descending=True, stable=True)]
        idx = results.roi_idx
        per_stage = torch.stack([r[idx, 1:] for r in stage_rois], 1)  # (K, S, 4)
        last = torch.cat([per_stage.new_zeros((len(idx), 1)), per_stage[:, -1]], 1)
        levels = self.extractor.map_roi_levels(last, len(self.strides()))
        strides = torch.tensor(self.strides(), device=levels.device)[levels]
        cx = (per_stage[:, -1, 0] + per_stage[:, -1, 2]) / 2
        cy = (per_stage[:, -1, 1] + per_stage[:, -1, 3]) / 2
        ys = (cy / strides).floor().long()
        xs = (cx / strides).floor().long()
        return Detections(results.bboxes, results.scores, results.labels, levels, ys, xs,
                          torch.zeros_like(levels), index=idx, rois=per_stage)

    def _predict_single(self, roi: torch.Tensor, cls_score: torch.Tensor,
                        bbox_pred: Optional[torch.Tensor], metainfo: dict, cfg) -> InstanceData:
        """``BBoxHead._predict_by_feat_single`` with ``multiclass_nms(return_inds=True)``: each
        kept box's RoI as ``roi_idx``. With a mask head, boxes are rescaled after NMS by
        division, as ``StandardRoIHead.predict`` (``FCNMaskHead``) does."""
        from mmdet.models.layers import multiclass_nms
        from mmdet.structures.bbox import get_box_tensor, scale_boxes

        head = self._last_bbox_head
        rescale_after = bool(getattr(self.roi_head, 'with_mask', False))
        scores = self._activation(cls_score)
        img_shape = metainfo['img_shape']
        num_rois = roi.size(0)
        if bbox_pred is not None:
            num_classes = 1 if head.reg_class_agnostic else head.num_classes
            rep = roi.repeat_interleave(num_classes, dim=0)
            bbox_pred = bbox_pred.view(-1, head.bbox_coder.encode_size)
            bboxes = head.bbox_coder.decode(rep[..., 1:], bbox_pred, max_shape=img_shape)
        else:
            bboxes = roi[:, 1:].clone()
            if img_shape is not None and bboxes.size(-1) == 4:
                bboxes[:, [0, 2]].clamp_(min=0, max=img_shape[1])
                bboxes[:, [1, 3]].clamp_(min=0, max=img_shape[0])
        if not rescale_after and bboxes.size(0) > 0:
            bboxes = scale_boxes(bboxes, [1 / s for s in metainfo['scale_factor']])
        bboxes = get_box_tensor(bboxes)
        box_dim = bboxes.size(-1)
        bboxes = bboxes.view(num_rois, -1)
        dets, labels, inds = multiclass_nms(bboxes, scores, cfg.score_thr, cfg.nms,
                                            cfg.max_per_img, box_dim=box_dim, return_inds=True)
        out = InstanceData()
        out.bboxes = dets[:, :-1]
        out.scores = dets[:, -1]
        out.labels = labels
        out.roi_idx = torch.div(inds, head.num_classes, rounding_mode='floor')
        if rescale_after and len(out) > 0:
            out.bboxes = out.bboxes / out.bboxes.new_tensor(metainfo['scale_factor']).repeat(
                (1, 2))
        return out

    # ------------------------------------------------------------------ (b) score
    def scores(self, outs: RoIOutputs, dets: Detections) -> torch.Tensor:
        """(K,) class probabilities of ``dets`` from the RoI head re-run on the live level maps
        for their own RoIs only (each RoI is pooled and classified on its own)."""
        if len(dets) == 0:
            return outs.feats[0].new_zeros((0, ))
        cls_score = self._roi_logits(outs.feats, dets.rois)
        return self._activation(cls_score).gather(1, dets.labels[:, None].long())[:, 0]

    def _roi_logits(self, feats: Sequence[torch.Tensor], rois: torch.Tensor) -> torch.Tensor:
        """(K, C + 1) logits of the RoI head on (K, S, 4) per-stage RoIs of one image."""
        roi = torch.cat([rois.new_zeros((len(rois), 1)), rois[:, 0]], 1).to(feats[0])
        return self.roi_head._bbox_forward(tuple(feats), roi)['cls_score']

    def _pooled_logits(self, pooled: torch.Tensor) -> torch.Tensor:
        """(K, C + 1) logits of the bbox head on (K, C, s, s) RoI features pooled by the
        extractor (the shared head first, if any), for :class:`RoIGradient`."""
        roi_head = self.roi_head
        x = roi_head.shared_head(pooled) if roi_head.with_shared_head else pooled
        return roi_head.bbox_head(x)[0]

    # ------------------------------------------------------------------ (c) layers
    def strides(self) -> List[int]:
        """Strides of the level maps the RoI extractor reads."""
        return [int(s) for s in self.extractor.featmap_strides]

    def features(self, inputs: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        """The neck's maps (the RPN reads all of them; the RoI extractor the first
        ``len(strides())``)."""
        return tuple(self.model.extract_feat(inputs))

    def level_layers(self) -> List[str]:
        """The modules outputting the maps the RoI extractor reads (``neck.fpn_convs.l``).

        A neck made of several necks whose last adds to each level what no module outputs
        (Libra R-CNN's ``BFP``: the balanced feature, resized, plus the level's FPN map) has
        them as the maps of its tuple output, ``neck:l`` (:func:`.base.trace_level_layers`)."""
        if getattr(self, '_level_layers', None) is None:
            num, size = len(self.strides()), 2 * max(self.strides())
            self._level_layers = trace_level_layers(
                self.model, lambda x: self.features(x)[:num], size)
        return list(self._level_layers)

    # ------------------------------------------------------------------ (d) RoI route
    def level_gradient(self) -> Optional['RoIGradient']:
        return RoIGradient(self)

    # ------------------------------------------------------------------ randomisation stages
    def stages(self) -> Dict[str, List[str]]:
        """``roi_head`` (every RoI stage, and the mask branch), ``rpn_head``, ``neck``,
        ``backbone``: the RoI head reads the RPN's proposals, both read the neck."""
        return complete_stages(self.model, {'roi_head': ['roi_head'], 'rpn_head': ['rpn_head'],
                                            'neck': ['neck'], 'backbone': ['backbone']},
                               rest='roi_head')

    # ------------------------------------------------------------------ (e) candidates
    def candidates(self, outs: RoIOutputs, metainfo: dict, score_thr: float,
                   detections: Optional[Detections] = None) -> Candidates:
        """Every RoI (proposal) before the score threshold and NMS: its refined box for every
        class and its class probabilities, from the RoI head's own decoding
        (:meth:`_predict_single` with no score filter, no cap and an NMS that suppresses
        nothing, so boxes are rescaled exactly as for the kept ones); a pair went into NMS
        when its score passed ``min(test_cfg.score_thr, score_thr)`` (mmdet's
        ``multiclass_nms`` has no top-k before NMS)."""
        from mmdet.structures.bbox import bbox2roi

        dets = self.decode(outs, metainfo, score_thr) if detections is None else detections
        feats = tuple(f.detach() for f in outs.feats)
        cfg = copy.deepcopy(self.roi_head.test_cfg)
        pre_thr = min(float(cfg.get('score_thr', 0.0)), float(score_thr))
        cfg.update(score_thr=-1.0, max_per_img=-1, nms=dict(type='nms', iou_threshold=1.0))
        num_classes = self._last_bbox_head.num_classes
        with torch.no_grad():
            rois = bbox2roi([self.proposals(outs, metainfo)])
            num = len(rois)
            stage_rois, cls_score, bbox_pred = self._stage_forward(feats, rois, metainfo)
            scores = self._activation(cls_score)[:, :num_classes]
            boxes = rois.new_zeros((num, num_classes, 4))
            if num:
                every = self._predict_single(stage_rois[-1], cls_score, bbox_pred, metainfo, cfg)
                boxes[every.roi_idx, every.labels] = every.bboxes
        per_stage = torch.stack([r[:, 1:] for r in stage_rois], 1)  # (N, S, 4)
        levels, ys, xs = self._roi_places(per_stage)
        kept = pair_table(num, num_classes, dets.index.to(rois.device),
                          dets.labels.to(rois.device),
                          torch.arange(len(dets), device=rois.device))
        nms = self.roi_head.test_cfg.get('nms') or {}
        return Candidates(boxes, scores, scores > pre_thr, kept, levels, ys, xs,
                          torch.zeros_like(levels), dets, pre_thr,
                          index=torch.arange(num, device=rois.device), rois=per_stage,
                          class_agnostic=bool(nms.get('class_agnostic', False)),
                          nms_iou=nms_threshold(nms))

    def _roi_places(self, per_stage: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        """``levels, ys, xs`` of (N, S, 4) per-stage RoIs: the level the extractor pools the
        last stage's RoI from and its centre's cell there (as :meth:`decode`)."""
        last = torch.cat([per_stage.new_zeros((len(per_stage), 1)), per_stage[:, -1]], 1)
        levels = self.extractor.map_roi_levels(last, len(self.strides()))
        strides = torch.tensor(self.strides(), device=levels.device)[levels]
        cx = (per_stage[:, -1, 0] + per_stage[:, -1, 2]) / 2
        cy = (per_stage[:, -1, 1] + per_stage[:, -1, 3]) / 2
        return levels, (cy / strides).floor().long(), (cx / strides).floor().long()


class RoIGradient:
    """d score / d own level map for many detections of a single-stage RoI head, exactly.

    One backward through the RoI head (shared head, bbox head, activation) gives every
    detection's gradient w.r.t. its own pooled features; RoIAlign's own backward then takes
    each one onto the level map its RoI was pooled from, one small backward per detection.
    Nothing else reads a level map's RoI features, so this equals the full backward.

    Args:
        adapter (TwoStageAdapter): The detector's adapter.
    """

    def __init__(self, adapter: TwoStageAdapter) -> None:
        self.adapter = adapter
        #: every level has the route (the engine asks ``radii[level] is not None``)
        self.radii: Dict[int, int] = {level: 0 for level in range(len(adapter.strides()))}

    @property
    def available(self) -> bool:
        return True

    def __call__(self, feat: torch.Tensor, level: int, dets: Detections) -> torch.Tensor:
        """Gradients of ``dets``' scores (all pooled from ``level``) w.r.t. ``feat``
        (1, C, h, w), as (K, C, h, w)."""
        adapter = self.adapter
        layer = adapter.extractor.roi_layers[level]
        base = feat.detach()
        rois = torch.cat([base.new_zeros((len(dets), 1)), dets.rois[:, -1].to(base)], 1)
        with torch.enable_grad():
            pooled = layer(base, rois).detach().requires_grad_(True)
            cls_score = adapter._pooled_logits(pooled)
            prob = adapter._activation(cls_score).gather(1, dets.labels[:, None].long())[:, 0]
            (grad, ) = torch.autograd.grad(prob.sum(), pooled)
            leaf = base.clone().requires_grad_(True)
            out = [torch.autograd.grad(layer(leaf, rois[k:k + 1]), leaf, grad[k:k + 1])[0][0]
                   for k in range(len(dets))]
        return torch.stack(out) if out else base.new_zeros((0, *base.shape[1:]))


def cascade_stages_standard(roi_head: nn.Module) -> bool:
    """Whether every stage of a cascade RoI head decodes with
    ``BBoxHead._predict_by_feat_single`` and all its RoI extractors are alike (same class,
    same strides)."""
    from mmdet.models.roi_heads.bbox_heads import BBoxHead

    extractors = roi_head.bbox_roi_extractor
    return (all(not _overrides(type(h), BBoxHead, ('_predict_by_feat_single', ))
                for h in roi_head.bbox_head)
            and all(type(e) is type(extractors[0])
                    and e.featmap_strides == extractors[0].featmap_strides
                    for e in extractors))


@ADAPTERS.register_module()
class CascadeRCNNAdapter(TwoStageAdapter):
    """``CascadeRoIHead`` (Cascade R-CNN, Cascade Mask R-CNN's box branch).

    Score of a detection (RoI i, class c)::

        softmax(mean_s cls_score_s(roi_s[i]))[c]

    ``roi_s`` being the RoIs of stage s (the proposals refined by stages ``< s``), as
    ``CascadeRoIHead._refine_roi`` computes it; boxes come from the last stage. Its stages may
    pool one detection from several FPN levels, so every level layer feeds every detection
    (:meth:`level_of_layer` is None) and maps take the engine's exact route.
    """

    head_types = ('CascadeRoIHead', )
    relies_on = ('predict', 'predict_bbox', '_refine_roi', '_bbox_forward')
    relies_on_parts = {'rpn_head': (('RPNHead', ), _RPN_RELIES_ON)}
    excluded_types = ('HybridTaskCascadeRoIHead', 'SCNetRoIHead')
    head_path = 'roi_head'
    detectors = 'Cascade R-CNN, Cascade Mask R-CNN (its box branch)'
    doc_score = 'softmax(mean over stages of cls_s[i])[c], each stage on its own refined RoI'
    doc_layers = "the FPN output the last stage's RoI was pooled from, `neck.fpn_convs.{0..3}`"
    doc_route = 'exact (stages may pool one detection from several levels)'

    def __init__(self, model: nn.Module) -> None:
        DetectorAdapter.__init__(self, model)
        self.roi_head = model.roi_head
        self.head = model.roi_head
        self.extractor = model.roi_head.bbox_roi_extractor[-1]

    @classmethod
    def accepts(cls, model: nn.Module) -> bool:
        from mmdet.models.roi_heads import CascadeRoIHead

        return (getattr(model, 'rpn_head', None) is not None
                and not _overrides(type(model.roi_head), CascadeRoIHead,
                                   ('predict', 'predict_bbox', '_refine_roi'))
                and cascade_stages_standard(model.roi_head))

    @property
    def _last_bbox_head(self) -> nn.Module:
        return self.roi_head.bbox_head[-1]

    def _stage_forward(self, feats, rois, metainfo=None):
        """``CascadeRoIHead._refine_roi`` for one image, keeping each stage's RoIs."""
        from mmdet.structures.bbox import get_box_tensor

        roi_head = self.roi_head
        stage_rois, ms_scores, bbox_pred = [], [], None
        kwargs = self._stage_kwargs(feats)
        for stage in range(roi_head.num_stages):
            res = roi_head._bbox_forward(stage, tuple(feats), rois, **kwargs)
            stage_rois.append(rois)
            cls_score, bbox_pred = res['cls_score'], res['bbox_pred']
            ms_scores.append(cls_score)
            if stage < roi_head.num_stages - 1 and rois.shape[0] > 0:
                head = roi_head.bbox_head[stage]
                if head.custom_activation:
                    cls_score = head.loss_cls.get_activation(cls_score)
                label = cls_score[:, :-1].argmax(dim=1)
                refined = get_box_tensor(
                    head.regress_by_class(rois[:, 1:], label, bbox_pred, metainfo))
                rois = torch.cat([rois[:, [0]], refined], dim=1)
        return stage_rois, sum(ms_scores) / float(len(ms_scores)), bbox_pred

    def _roi_logits(self, feats, rois):
        """Mean over stages of each stage's logits on its own RoIs, (K, C + 1)."""
        logits = []
        kwargs = self._stage_kwargs(feats)
        for stage in range(self.roi_head.num_stages):
            roi = torch.cat([rois.new_zeros((len(rois), 1)), rois[:, stage]], 1).to(feats[0])
            logits.append(self.roi_head._bbox_forward(stage, tuple(feats), roi,
                                                      **kwargs)['cls_score'])
        return sum(logits) / float(len(logits))

    def _stage_kwargs(self, feats: Sequence[torch.Tensor]) -> dict:
        """Extra keyword arguments of the RoI head's ``_bbox_forward`` computed once from the
        level maps (none here; HTC's semantic feature)."""
        return {}

    def level_of_layer(self, name: str) -> Optional[int]:
        """None: a level map may feed any detection (through one of its stages)."""
        return None

    def level_gradient(self) -> None:
        return None
