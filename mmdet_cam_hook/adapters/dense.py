"""The generic adapter for mmdet's dense heads (``BaseDenseHead``'s own decoding).

``BaseDenseHead.predict_by_feat`` detaches the head outputs, and ``_predict_by_feat_single``
throws away the index of the prior behind each box (``keep_idxs`` from
``filter_scores_and_topk``). :class:`DenseAdapter` re-runs that per-level loop on one image
with the same ops in the same order, and stores each candidate's prior index (flat over all
levels) as an extra ``InstanceData`` field; it rides through the head's own
``_bbox_post_process`` (score factors, minimum size, NMS, ``max_per_img``) because indexing an
``InstanceData`` keeps every field. Decoded boxes, labels and scores therefore equal
``model.predict``'s exactly.

Within a level, mmdet flattens ``cls_score.permute(1, 2, 0).reshape(-1, C)``, so prior
``p = (y * W + x) * A + a`` (A priors per location) and the raw logit of class ``c`` is
``cls_scores[l][0, a * C + c, y, x]``.

Subclasses per head family (one file each) set ``head_types`` and override only what differs,
the way mmdet itself does: the per-level loop (:meth:`DenseAdapter._level_results`), the score
(:meth:`DenseAdapter._read`), the branches the score reads (:meth:`DenseAdapter._score_branches`).
"""
import copy
from typing import List, Optional, Sequence, Tuple

import torch
from mmengine.structures import InstanceData
from torch import nn

from .base import Detections, DetectorAdapter, eval_mode, locate_priors
from .candidates import Candidates, dense_candidates, record_post_process, rescaled

#: Norms whose statistics are taken over positions: a score then reads the whole map.
_GLOBAL_NORMS = (nn.GroupNorm, nn.LayerNorm, nn.modules.instancenorm._InstanceNorm)


def level_feeds(model: nn.Module, features, size: int) -> List[List[int]]:
    """For each level j, the levels whose feature maps depend on level j's map.

    Found once from the autograd graph of :meth:`DetectorAdapter.features` on a (1, 3, size,
    size) zero input, in eval mode (``training`` flags restored after; gradients enabled, also
    under ``no_grad`` or ``inference_mode``): level l depends on level j when
    ``d features[l] / d features[j]`` has a path. In an FPN with extra convs the first extra
    level reads the top output (``add_extra_convs='on_output'``) and each extra level feeds the
    next; in ``YOLOV3Neck`` each detect block feeds the finer levels.

    Args:
        model (nn.Module): The detector.
        features (Callable): ``inputs -> tuple of level maps`` (the adapter's ``features``).
        size (int): Side of the dummy input (a multiple of the largest stride).

    Returns:
        list[list[int]]: ``feeds[j]``: the levels that read level j's map (j included).
    """
    param = next(model.parameters())
    with eval_mode(model), torch.inference_mode(False), torch.enable_grad():
        inputs = torch.zeros((1, 3, size, size), dtype=param.dtype, device=param.device,
                             requires_grad=True)
        feats = list(features(inputs))
        feeds: List[List[int]] = [[] for _ in feats]
        for level, feat in enumerate(feats):
            grads = torch.autograd.grad(feat.sum(), feats, retain_graph=True,
                                        allow_unused=True)
            for source, grad in enumerate(grads):
                if grad is not None:
                    feeds[source].append(level)
    return feeds


class DenseAdapter(DetectorAdapter):
    """Any head that decodes with ``BaseDenseHead._predict_by_feat_single``.

    Score of the detection with label ``c`` at prior ``(l, y, x, a)``::

        sigmoid(cls_scores[l][0, a*C + c, y, x]) [* sigmoid(score_factors[l][0, a, y, x])]

    (softmax over the prior's ``C + 1`` logits instead for softmax heads). The score factor
    (FCOS/ATSS centerness) is the head's third output when it has one.
    """

    relies_on = ('forward', 'forward_single', 'predict', 'predict_by_feat',
                 '_predict_by_feat_single', '_bbox_post_process')

    # ------------------------------------------------------------------ helpers
    def _split(self, outs: tuple) -> Tuple[Sequence[torch.Tensor], Sequence[torch.Tensor],
                                           Optional[Sequence[torch.Tensor]]]:
        """(cls_scores, bbox_preds, score_factors or None) from ``head.forward``'s outputs."""
        return outs[0], outs[1], (outs[2] if len(outs) > 2 else None)

    @property
    def num_base_priors(self) -> int:
        """Priors (anchors) per location, the same on every level."""
        return int(self.head.prior_generator.num_base_priors[0])

    def _pre_cfg(self, score_thr: float):
        """The head's test cfg with the pre-NMS score filter at ``min(cfg, score_thr)``."""
        cfg = copy.deepcopy(self.head.test_cfg)
        cfg.score_thr = min(float(cfg.get('score_thr', 0)), float(score_thr))
        return cfg

    # ------------------------------------------------------------------ (a) decoding
    def decode(self, outs: tuple, metainfo: dict, score_thr: float) -> Detections:
        """Detections of image 0 of ``outs`` with the prior behind each kept box.

        Equal to ``model.predict`` (boxes, labels, scores, order) restricted to scores
        ``>= score_thr``; the pre-NMS filter is ``min(test_cfg.score_thr, score_thr)``.
        """
        cls_scores, bbox_preds, score_factors = self._split(outs)
        sizes = [tuple(c.shape[-2:]) for c in cls_scores]
        priors = self.head.prior_generator.grid_priors(
            sizes, dtype=cls_scores[0].dtype, device=cls_scores[0].device)
        cls_list = [c[0].detach() for c in cls_scores]
        bbox_list = [b[0].detach() for b in bbox_preds]
        factor_list = ([s[0].detach() for s in score_factors] if score_factors is not None
                       else [None] * len(cls_list))
        cfg = self._pre_cfg(score_thr)
        results = self._level_results(cls_list, bbox_list, factor_list, priors, metainfo, cfg)
        results = self.head._bbox_post_process(results=results, cfg=cfg, rescale=True,
                                               with_nms=True, img_meta=metainfo)
        return self._locate(results, score_thr, sizes)

    def _level_results(self, cls_score_list: List[torch.Tensor],
                       bbox_pred_list: List[torch.Tensor],
                       score_factor_list: List[Optional[torch.Tensor]],
                       mlvl_priors: List[torch.Tensor], img_meta: dict, cfg) -> InstanceData:
        """``BaseDenseHead._predict_by_feat_single`` up to ``_bbox_post_process``, storing each
        candidate's flat prior index over all levels as ``prior_idx``."""
        from mmdet.models.utils import filter_scores_and_topk
        from mmdet.structures.bbox import cat_boxes

        head = self.head
        with_score_factors = score_factor_list[0] is not None
        img_shape = img_meta['img_shape']
        nms_pre = cfg.get('nms_pre', -1)
        mlvl_bbox_preds, mlvl_valid_priors, mlvl_scores, mlvl_labels = [], [], [], []
        mlvl_score_factors, mlvl_prior_idx = [], []
        start = 0
        for cls_score, bbox_pred, score_factor, priors in zip(
                cls_score_list, bbox_pred_list, score_factor_list, mlvl_priors):
            num_priors = len(priors)
            dim = head.bbox_coder.encode_size
            bbox_pred = bbox_pred.permute(1, 2, 0).reshape(-1, dim)
            if with_score_factors:
                score_factor = score_factor.permute(1, 2, 0).reshape(-1).sigmoid()
            cls_score = cls_score.permute(1, 2, 0).reshape(-1, head.cls_out_channels)
            if getattr(getattr(head, 'loss_cls', None), 'custom_cls_channels', False):
                scores = head.loss_cls.get_activation(cls_score)
            elif head.use_sigmoid_cls:
                scores = cls_score.sigmoid()
            else:
                scores = cls_score.softmax(-1)[:, :-1]
            score_thr = cfg.get('score_thr', 0)
            scores, labels, keep_idxs, filtered_results = filter_scores_and_topk(
                scores, score_thr, nms_pre, dict(bbox_pred=bbox_pred, priors=priors))
            if with_score_factors:
                mlvl_score_factors.append(score_factor[keep_idxs])
            mlvl_bbox_preds.append(filtered_results['bbox_pred'])
            mlvl_valid_priors.append(filtered_results['priors'])
            mlvl_scores.append(scores)
            mlvl_labels.append(labels)
            mlvl_prior_idx.append(keep_idxs + start)
            start += num_priors

        bbox_pred = torch.cat(mlvl_bbox_preds)
        priors = cat_boxes(mlvl_valid_priors)
        bboxes = head.bbox_coder.decode(priors, bbox_pred, max_shape=img_shape)
        results = InstanceData()
        results.bboxes = bboxes
        results.scores = torch.cat(mlvl_scores)
        results.labels = torch.cat(mlvl_labels)
        if with_score_factors:
            results.score_factors = torch.cat(mlvl_score_factors)
        results.prior_idx = torch.cat(mlvl_prior_idx)
        return results

    def _locate(self, results: InstanceData, score_thr: float,
                sizes: Sequence[Tuple[int, int]]) -> Detections:
        """Filter at ``score_thr``, sort by score (stable, so NMS order is kept) and split each
        flat prior index into ``(level, y, x, anchor)``."""
        results = results[results.scores >= score_thr]
        results = results[results.scores.argsort(descending=True, stable=True)]
        levels, ys, xs, anchors = locate_priors(results.prior_idx.long(), sizes,
                                                self.num_base_priors)
        return Detections(results.bboxes, results.scores, results.labels, levels, ys, xs,
                          anchors)

    # ------------------------------------------------------------------ (b) score
    def scores(self, outs: tuple, dets: Detections) -> torch.Tensor:
        """(K,) differentiable scores of ``dets`` read from the live head outputs."""
        cls_scores, _, score_factors = self._split(outs)
        return self._per_level(dets, cls_scores[0], lambda level, d: self._read(
            cls_scores[level][0], None if score_factors is None else score_factors[level][0],
            d))

    @staticmethod
    def _per_level(dets: Detections, like: torch.Tensor, read) -> torch.Tensor:
        """``read(level, dets_on_level)`` for each level present, back in ``dets``' order."""
        parts, order = [], []
        for level in dets.levels.unique().tolist():
            idx = (dets.levels == level).nonzero()[:, 0]
            parts.append(read(level, dets.select(idx)))
            order.append(idx)
        if not parts:
            return like.new_zeros((0, ))
        return torch.cat(parts)[torch.cat(order).argsort()]

    def _read(self, cls_map: torch.Tensor, factor_map: Optional[torch.Tensor],
              dets: Detections) -> torch.Tensor:
        """Scores of ``dets`` from one level's (A*C, H, W) class map and (A, H, W) score
        factor map (or None)."""
        c = self.head.cls_out_channels
        logits = cls_map.reshape(-1, c, *cls_map.shape[-2:])[dets.anchors, :, dets.ys, dets.xs]
        prob = self._prob(logits, dets.labels)  # logits: (K, C)
        if factor_map is not None:
            prob = prob * factor_map[dets.anchors, dets.ys, dets.xs].sigmoid()
        return prob

    def _prob(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Class probability of each row's label, as the head's decoding computes it."""
        head = self.head
        if getattr(getattr(head, 'loss_cls', None), 'custom_cls_channels', False):
            return head.loss_cls.get_activation(logits).gather(1, labels[:, None])[:, 0]
        if head.use_sigmoid_cls:
            return logits.gather(1, labels[:, None])[:, 0].sigmoid()
        return logits.softmax(-1).gather(1, labels[:, None])[:, 0]

    # ------------------------------------------------------------------ (c) layers
    def level_roots(self, level: int) -> List[str]:
        """The level layers whose output reaches this level's feature map (its own and, in an
        FPN with extra convs or in ``YOLOV3Neck``, lower ones), so that
        :meth:`level_of_layer` is None for a layer that feeds several levels' heads."""
        if getattr(self, '_feeds', None) is None:
            self._feeds = level_feeds(self.model, self.features, 2 * max(self.strides()))
        layers = self.level_layers()
        return [layers[j] for j, fed in enumerate(self._feeds) if level in fed]

    # ------------------------------------------------------------------ (d) local window
    def _score_branches(self, level: int) -> Optional[List[List[nn.Module]]]:
        """Every branch the score reads, from the level's map to the output read by
        :meth:`_read_window`, or None."""
        return None

    def window_branches(self, level: int) -> Optional[List[List[nn.Module]]]:
        """The score's branches (see :meth:`DetectorAdapter.window_branches`); None when they
        hold a norm over positions (GroupNorm, as in mmdet's FCOS, ATSS and GFL configs)."""
        branches = self._score_branches(level)
        if branches is None or any(isinstance(m, _GLOBAL_NORMS)
                                   for branch in branches for module in branch
                                   for m in module.modules()):
            return None
        return branches

    def window_scores(self, level: int, windows: torch.Tensor, dets: Detections) -> torch.Tensor:
        """(K,) scores of ``dets`` (all on ``level``) from the score's branches run on the
        (K, C, S, S) ``windows``, read at the centre (the engine zeroes off-map positions)."""
        branches = self._score_branches(level)
        if branches is None:
            raise ValueError(f'{type(self.head).__name__} has no local-window branches')
        outs = []
        for branch in branches:
            out = windows
            for module in branch:
                out = module(out)
            r = out.shape[-1] // 2
            outs.append(out[:, :, r, r])
        return self._read_window(outs, dets)

    def _read_window(self, outs: List[torch.Tensor], dets: Detections) -> torch.Tensor:
        """Scores from the branches' (K, channels) outputs at the window centres: the class
        map, then the score factor map if the head has one."""
        k = torch.arange(len(dets), device=outs[0].device)
        c = self.head.cls_out_channels
        prob = self._prob(outs[0].reshape(len(dets), -1, c)[k, dets.anchors], dets.labels)
        if len(outs) > 1:
            prob = prob * outs[1][k, dets.anchors].sigmoid()
        return prob

    # ------------------------------------------------------------------ (e) candidates
    def candidates(self, outs: tuple, metainfo: dict, score_thr: float,
                   detections: Optional[Detections] = None) -> Candidates:
        """Every prior of image 0 before the score threshold and NMS
        (:class:`~.candidates.Candidates`): boxes decoded as ``_predict_by_feat_single`` does
        and rescaled by the head's ``_bbox_post_process``, per-class scores with the head's
        formula (times the score factor, as the post-process multiplies it in), and the pairs
        that went into NMS as recorded from :meth:`decode`.

        Args:
            outs (tuple): The head's outputs.
            metainfo (dict): The image's metainfo.
            score_thr (float): The engine's score threshold (the pre-NMS filter is
                ``min(test_cfg.score_thr, score_thr)``, as in :meth:`decode`).
            detections (Detections, optional): The kept detections (e.g. after the engine's
                ``topk``). Defaults to None: :meth:`decode`'s.
        """
        cls_scores, bbox_preds, score_factors = self._split(outs)
        with record_post_process(self.head) as seen:
            dets = self.decode(outs, metainfo, score_thr)
        sizes = [tuple(c.shape[-2:]) for c in cls_scores]
        priors = self.head.prior_generator.grid_priors(
            sizes, dtype=cls_scores[0].dtype, device=cls_scores[0].device)
        with torch.no_grad():
            boxes = self._prior_boxes([b[0].detach() for b in bbox_preds], priors,
                                      metainfo['img_shape'])
            scores = self._prior_scores(
                [c[0].detach() for c in cls_scores],
                None if score_factors is None else [s[0].detach() for s in score_factors])
            boxes = rescaled(self.head, boxes, metainfo)
        return dense_candidates(boxes, scores, seen, dets if detections is None else detections,
                                sizes, self.num_base_priors, self._pre_cfg(score_thr).score_thr,
                                self.head.test_cfg)

    def _prior_boxes(self, bbox_pred_list: List[torch.Tensor], mlvl_priors: List[torch.Tensor],
                     img_shape) -> torch.Tensor:
        """(N, 4) every prior's box on the network input, decoded as
        ``_predict_by_feat_single`` decodes the kept ones."""
        from mmdet.structures.bbox import cat_boxes

        dim = self.head.bbox_coder.encode_size
        pred = torch.cat([b.permute(1, 2, 0).reshape(-1, dim) for b in bbox_pred_list])
        return self.head.bbox_coder.decode(cat_boxes(mlvl_priors), pred, max_shape=img_shape)

    def _prior_scores(self, cls_score_list: List[torch.Tensor],
                      score_factor_list: Optional[List[torch.Tensor]]) -> torch.Tensor:
        """(N, C) every prior's per-class score: the class activation of
        ``_predict_by_feat_single`` times the sigmoid score factor if the head has one."""
        head = self.head
        cls = torch.cat([c.permute(1, 2, 0).reshape(-1, head.cls_out_channels)
                         for c in cls_score_list])
        if getattr(head.loss_cls, 'custom_cls_channels', False):
            scores = head.loss_cls.get_activation(cls)
        elif head.use_sigmoid_cls:
            scores = cls.sigmoid()
        else:
            scores = cls.softmax(-1)[:, :-1]
        if score_factor_list is not None:
            factor = torch.cat([s.permute(1, 2, 0).reshape(-1) for s in score_factor_list])
            scores = scores * factor.sigmoid()[:, None]
        return scores
