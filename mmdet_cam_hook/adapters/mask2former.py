"""MaskFormer and Mask2Former in instance mode (``MaskFormerHead`` / ``Mask2FormerHead``, fused
by ``MaskFormerFusionHead`` with ``test_cfg.instance_on=True``).

The head's pixel decoder turns the backbone's level maps into mask features (stride 4) and the
maps its transformer decoder attends to; each of the Q queries of the last decoder layer gives
class logits (C + 1, the last one "no object") and mask logits on the mask features' grid
(``einsum(mask_embed(query), mask_features)``). ``model.predict`` (``MaskFormerHead.predict``,
then ``MaskFormerFusionHead.predict`` and ``instance_postprocess``) upsamples the mask logits to
the padded input, crops the padding, resizes them to the original image (bilinear, twice),
takes the ``max_per_image`` best (query, class) pairs of ``softmax(cls)[:, :-1]`` over
``Q x C`` (no NMS), keeps the thing classes and reports, for pair (q, c)::

    score = softmax(cls[q])[c] * mean(sigmoid(mask[q]) over mask[q] > 0)  (count + 1e-6)
    mask  = mask[q] > 0 at the original size;  bbox = the mask's bounding box (mask2bbox)

A detection is such a pair, the query carried through that top-k, so labels, scores, boxes and
masks equal ``model.predict``'s exactly; its differentiable score is the same number on the live
head outputs (the binary mask, a selection of pixels, is a constant).

Every query attends to every level and the mask features mix all of them (the pixel decoder's
deformable encoder, its FPN), so every level map feeds every detection: the level-aware default
takes the maps the head reads, the backbone's outputs (``backbone.layer{1..4}``, strides 4-32),
together (maps averaged, as DETR's neck outputs), on the exact route (one backward through the
head per detection). The pixel decoder's own multi-scale outputs are reshaped encoder tokens,
which no module outputs; so are Swin's outputs (reshaped norms): there the default is the one
module reading each level map, the pixel decoder's per-level input projection.

The mask branch (:class:`MaskFormerMaskBranch`) gives each instance's mask and its mask target:
the mean of ``sigmoid(mask logits of its query)`` over its own binary mask on the mask
features' grid (before mmdet's upsampling), inside the unpadded image.

Panoptic configs: Mask2Former's report instances too (``panoptic_on`` and ``instance_on``), and
those are explained. MaskFormer's panoptic-only config (``instance_on=False``) reports segments
without a score, so nothing ``model.predict`` scores to explain: it is refused when the engine
is built (:meth:`MaskFormerAdapter.refusal_reason`); the same weights with
``model.test_cfg.instance_on=True`` are explained.
"""
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
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
from .masks import MaskBranch, register_mask_branch

#: Side of the zero input used to find the level maps' strides and modules.
_TRACE_SIZE = 128
#: ``instance_postprocess``'s guard in the mean over the binary mask.
_EPS = 1e-6


class MaskFormerOutputs(NamedTuple):
    """What :meth:`MaskFormerAdapter.head_outputs` returns: the last decoder layer's class
    logits (B, Q, C + 1) and mask logits on the mask features' grid (B, Q, h, w), live, and
    each image's sizes (B, 6) int64: ``batch_input_shape``, ``img_shape``, ``ori_shape`` (h, w
    each), a tensor so that slicing a batch slices them too."""

    cls_scores: torch.Tensor
    mask_preds: torch.Tensor
    shapes: torch.Tensor


def image_shapes(metainfo: Sequence[dict], device=None) -> torch.Tensor:
    """(B, 6) int64 ``batch_input_shape``, ``img_shape``, ``ori_shape`` of each image."""
    return torch.tensor([[*m['batch_input_shape'][:2], *m['img_shape'][:2], *m['ori_shape'][:2]]
                         for m in metainfo], dtype=torch.long, device=device)


def original_logits(mask_preds: torch.Tensor, shapes: torch.Tensor) -> torch.Tensor:
    """(K, H, W) mask logits at the original image size, as ``model.predict`` computes them:
    bilinear to the padded input (``MaskFormerHead.predict``), padding cropped, bilinear to
    ``ori_shape`` (``MaskFormerFusionHead.predict`` with ``rescale=True``).

    Args:
        mask_preds (torch.Tensor): (K, h, w) logits on the mask features' grid.
        shapes (torch.Tensor): (6, ) the image's sizes (:func:`image_shapes`).
    """
    bh, bw, ih, iw, oh, ow = (int(s) for s in shapes)
    up = F.interpolate(mask_preds[None], size=(bh, bw), mode='bilinear', align_corners=False)[0]
    up = up[:, :ih, :iw]
    return F.interpolate(up[:, None], size=(oh, ow), mode='bilinear', align_corners=False)[:, 0]


def mask_scores(logits: torch.Tensor) -> torch.Tensor:
    """(K,) ``instance_postprocess``'s mask score: the mean of ``sigmoid`` over each map's
    own binary mask (``logits > 0``, a constant), with its ``1e-6`` guard."""
    binary = (logits.detach() > 0).to(logits.dtype)
    return (logits.sigmoid() * binary).flatten(1).sum(1) / (binary.flatten(1).sum(1) + _EPS)


@ADAPTERS.register_module()
class MaskFormerAdapter(DetectorAdapter):
    """``MaskFormerHead`` and ``Mask2FormerHead`` (``model.panoptic_head``) of mmdet's
    ``MaskFormer`` / ``Mask2Former`` detectors whose ``MaskFormerFusionHead`` reports instances
    (``test_cfg.instance_on=True``, ``semantic_on=False``).

    Score of a detection (query q, class c), on the last decoder layer::

        softmax(cls[q])[c] * mean(sigmoid(mask[q]) over its binary mask mask[q] > 0)

    the mask logits taken to the original image as ``model.predict`` does
    (:func:`original_logits`).
    """

    head_types = ('MaskFormerHead', 'Mask2FormerHead')
    head_path = 'panoptic_head'
    relies_on = ('forward', 'predict')
    relies_on_parts = {'panoptic_fusion_head': (('MaskFormerFusionHead', ),
                                                ('predict', 'instance_postprocess'))}
    levels_shared = True
    family = 'MaskFormer'
    detectors = 'Mask2Former, MaskFormer (instance mode: `test_cfg.instance_on=True`)'
    doc_score = ('softmax(cls[q])[c] × mean of σ(mask[q]) over its own binary mask '
                 '(`instance_postprocess`, original size); last decoder layer')
    doc_layers = ('all backbone outputs together, maps averaged (`backbone.layer{1..4}`, '
                  'strides 4-32: the maps the pixel decoder reads; Swin: `backbone:{0..3}`, '
                  'the maps of its tuple output)')
    doc_route = 'exact (one backward through the pixel decoder and transformer per detection)'

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        self.fusion_head = model.panoptic_fusion_head

    @classmethod
    def accepts(cls, model: nn.Module) -> bool:
        """A ``MaskFormer`` detector (or a subclass keeping its ``predict``) whose fusion head
        reports instances: ``test_cfg.instance_on=True`` and ``semantic_on=False``. A
        panoptic-only model (mmdet's MaskFormer panoptic config) reports no instance, so no
        detection to explain: refused (set ``model.test_cfg.instance_on=True``)."""
        from mmdet.models.detectors import MaskFormer

        if not isinstance(model, MaskFormer) or type(model).predict is not MaskFormer.predict:
            return False
        test_cfg = getattr(model.panoptic_fusion_head, 'test_cfg', None) or {}
        return bool(test_cfg.get('instance_on', False)) and not test_cfg.get('semantic_on',
                                                                             False)

    @classmethod
    def refusal_reason(cls, model: nn.Module) -> Optional[str]:
        """Why :meth:`accepts` refuses ``model``: the panoptic-only config (what to set), or
        ``semantic_on``, or a detector that is not MaskFormer's (None: it does not)."""
        if cls.accepts(model):
            return None
        test_cfg = getattr(getattr(model, 'panoptic_fusion_head', None), 'test_cfg', None) or {}
        if not test_cfg.get('instance_on', False):
            return ('its panoptic_fusion_head reports no instances (test_cfg.instance_on=False, '
                    'a panoptic-only config): set model.test_cfg.instance_on=True to explain '
                    "the model's instances")
        if test_cfg.get('semantic_on', False):
            return 'its panoptic_fusion_head has test_cfg.semantic_on=True, which mmdet refuses'
        return (f'{type(model).__name__} is not a MaskFormer detector keeping '
                "MaskFormer.predict")

    # ------------------------------------------------------------------ forward
    def head_outputs(self, feats: Sequence[torch.Tensor],
                     metainfo: Optional[Sequence[dict]] = None) -> MaskFormerOutputs:
        """The head (pixel decoder, transformer decoder) on ``feats``; ``metainfo`` (one dict
        per image) gives the padding mask MaskFormer's decoder reads and the sizes the scores
        upsample to (None: unpadded inputs, the finest map times its stride)."""
        from mmdet.structures import DetDataSample

        if metainfo is None:
            shape = tuple(int(s) * self.strides()[0] for s in feats[0].shape[-2:])
            metainfo = [dict(img_shape=shape, batch_input_shape=shape, ori_shape=shape)
                        ] * len(feats[0])
        samples = [DetDataSample(metainfo=dict(m)) for m in metainfo]
        cls_scores, mask_preds = self.head(tuple(feats), samples)
        return MaskFormerOutputs(cls_scores[-1], mask_preds[-1],
                                 image_shapes(metainfo, cls_scores[-1].device))

    # ------------------------------------------------------------------ (a) decoding
    def _pairs(self, cls_score: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        """``instance_postprocess``'s top-k: the ``max_per_image`` best (query, class) pairs of
        ``softmax(cls)[:, :-1]`` (unsorted, as mmdet takes them), thing classes only:
        ``(class scores, labels, queries)``."""
        fusion = self.fusion_head
        num_classes = fusion.num_classes
        max_per_image = fusion.test_cfg.get('max_per_image', 100)
        scores = F.softmax(cls_score, dim=-1)[:, :-1]
        labels = torch.arange(num_classes, device=cls_score.device).unsqueeze(0).repeat(
            len(cls_score), 1).flatten(0, 1)
        top_scores, top = scores.flatten(0, 1).topk(max_per_image, sorted=False)
        labels, query = labels[top], top // num_classes
        thing = labels < fusion.num_things_classes
        return top_scores[thing], labels[thing], query[thing]

    def _masks(self, outs: MaskFormerOutputs, query: torch.Tensor) -> torch.Tensor:
        """(K, H, W) original-size mask logits of ``query`` (each query upsampled once)."""
        unique, inverse = query.unique(return_inverse=True)
        return original_logits(outs.mask_preds[0][unique], outs.shapes[0])[inverse]

    @torch.no_grad()
    def decode(self, outs: MaskFormerOutputs, metainfo: dict, score_thr: float) -> Detections:
        """Detections with the query behind each: ``instance_postprocess`` with the query
        carried through its top-k; those scoring at least ``score_thr``, by score (stable).
        The cell of each box centre on the finest level stands for its position."""
        from mmdet.structures.mask import mask2bbox

        outs = MaskFormerOutputs(*(o.detach() for o in outs))
        cls_scores, labels, query = self._pairs(outs.cls_scores[0])
        logits = self._masks(outs, query)
        scores = cls_scores * mask_scores(logits)
        bboxes = mask2bbox(logits > 0)
        results = InstanceData(bboxes=bboxes, scores=scores, labels=labels, query=query)
        results = results[results.scores >= score_thr]
        results = results[results.scores.argsort(descending=True, stable=True)]
        return self._detections(results, metainfo)

    def _detections(self, results: InstanceData, metainfo: dict) -> Detections:
        scale = results.bboxes.new_tensor(metainfo['scale_factor'])
        centres = (results.bboxes[:, :2] + results.bboxes[:, 2:]) / 2 * scale
        cells = (centres / self.strides()[0]).floor().long()
        zeros = torch.zeros_like(results.query)
        return Detections(results.bboxes, results.scores, results.labels, zeros, cells[:, 1],
                          cells[:, 0], zeros, index=results.query)

    # ------------------------------------------------------------------ (b) score
    def scores(self, outs: MaskFormerOutputs, dets: Detections) -> torch.Tensor:
        """(K,) ``softmax(cls[q])[c]`` times the mask score of ``q`` (original size), on the
        live last-layer outputs."""
        query = dets.index.long()
        probs = outs.cls_scores[0][query].softmax(-1)
        cls = probs.gather(1, dets.labels[:, None].long().to(probs.device))[:, 0]
        return cls * mask_scores(self._masks(outs, query))

    # ------------------------------------------------------------------ (c) layers
    def features(self, inputs: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        return tuple(self.model.extract_feat(inputs))

    def strides(self) -> List[int]:
        """Stride of each backbone output (from one forward of :meth:`features` on a zero
        input)."""
        if getattr(self, '_strides', None) is None:
            self._strides = trace_strides(self.model, self.features, _TRACE_SIZE)
        return list(self._strides)

    def level_layers(self) -> List[str]:
        """The modules outputting the backbone's maps (``backbone.layer{1..4}``); for a
        backbone whose maps no module outputs alone (Swin reshapes its norms' outputs), the
        maps of its tuple output, ``backbone:{0..3}`` (:func:`~.base.trace_level_layers`).

        Raises:
            ValueError: If some level map is output by no module, alone or in a tuple.
        """
        if getattr(self, '_level_layers', None) is None:
            self._level_layers = trace_level_layers(self.model, self.features, _TRACE_SIZE)
        return list(self._level_layers)

    def level_of_layer(self, name: str) -> Optional[int]:
        """None: the pixel decoder mixes the levels, so every layer feeds every detection."""
        return None

    # ------------------------------------------------------------------ randomisation stages
    def stages(self) -> Dict[str, List[str]]:
        """``head`` (the transformer decoder and what reads it: queries, class and mask
        embeddings, input projections, level embeddings), ``pixel_decoder``, ``backbone``
        (with a neck, if any)."""
        head = [f'{self.head_path}.{name}' for name, _ in self.head.named_children()
                if name != 'pixel_decoder']
        return complete_stages(self.model, {
            'head': head, 'pixel_decoder': [f'{self.head_path}.pixel_decoder'],
            'backbone': ['neck', 'backbone']}, rest='head')

    # ------------------------------------------------------------------ (e) candidates
    @torch.no_grad()
    def candidates(self, outs: MaskFormerOutputs, metainfo: dict, score_thr: float,
                   detections: Optional[Detections] = None) -> Candidates:
        """Every query before the top-k and the score threshold (no NMS): its box (of its
        binary mask), its per-class scores (the formula of :meth:`scores`; 0 for stuff
        classes, which are never reported as instances) and the (query, class) pairs that
        made ``instance_postprocess``'s top-k (:meth:`decode` with no threshold)."""
        from mmdet.structures.mask import mask2bbox

        entered_dets = self.decode(outs, metainfo, -1.0)
        dets = self.decode(outs, metainfo, score_thr) if detections is None else detections
        outs = MaskFormerOutputs(*(o.detach() for o in outs))
        num = len(outs.cls_scores[0])
        device = outs.cls_scores.device
        queries = torch.arange(num, device=device)
        logits = self._masks(outs, queries)
        things = self.fusion_head.num_things_classes
        probs = F.softmax(outs.cls_scores[0], dim=-1)[:, :things]
        scores = probs * mask_scores(logits)[:, None]
        pad = self.fusion_head.num_classes - things
        scores = torch.cat([scores, scores.new_zeros((num, pad))], 1)
        boxes = mask2bbox(logits > 0)
        entered = pair_table(num, self.fusion_head.num_classes, entered_dets.index,
                             entered_dets.labels)
        kept = pair_table(num, self.fusion_head.num_classes, dets.index.to(device),
                          dets.labels.to(device), torch.arange(len(dets), device=device))
        scale = boxes.new_tensor(metainfo['scale_factor'])
        cells = ((boxes[:, :2] + boxes[:, 2:]) / 2 * scale / self.strides()[0]).floor().long()
        zeros = torch.zeros(num, dtype=torch.long, device=device)
        return Candidates(boxes, scores, entered, kept, zeros, cells[:, 1], cells[:, 0], zeros,
                          dets, -1.0, index=queries)


@register_mask_branch
class MaskFormerMaskBranch(MaskBranch):
    """Each instance's mask and mask target for :class:`MaskFormerAdapter` (route 'exact':
    the target mixes every level, so the engine backpropagates :meth:`scores` through the
    full graph, one vector-Jacobian product per instance)."""

    route = 'exact'
    doc_target = ('mean of σ(mask logits of its query) over its own binary mask (> 0.5) on the '
                  "mask features' grid (stride 4, before mmdet's upsampling), inside the "
                  'unpadded image')

    adapter_type = MaskFormerAdapter

    def scores(self, outs: MaskFormerOutputs, dets: Detections, metainfo: dict) -> torch.Tensor:
        """(K,) the mean of each query's mask probabilities over its binary mask (probability
        > 0.5, as mmdet binarises), on the cells of the mask features' grid that cover the
        unpadded image; the mean over those cells when none passes."""
        logits = outs.mask_preds[0][dets.index.long()]
        bh, bw, ih, iw = (int(s) for s in outs.shapes[0][:4])
        h, w = logits.shape[-2:]
        # the cells any part of the unpadded image falls in (the padding is bottom/right)
        logits = logits[:, :-(-ih * h // bh), :-(-iw * w // bw)]
        probs = logits.sigmoid()
        binary = (logits.detach() > 0).to(probs.dtype)
        count = binary.sum(dim=(1, 2))
        inside = (probs * binary).sum(dim=(1, 2)) / count.clamp(min=1)
        return torch.where(count > 0, inside, probs.mean(dim=(1, 2)))

    @torch.no_grad()
    def masks(self, outs: MaskFormerOutputs, dets: Detections, metainfo: dict) -> torch.Tensor:
        """(K, H, W) bool: ``model.predict``'s masks (original-size logits > 0)."""
        h, w = metainfo['ori_shape'][:2]
        if len(dets) == 0:
            return torch.zeros((0, h, w), dtype=torch.bool, device=outs.mask_preds.device)
        outs = MaskFormerOutputs(*(o.detach() for o in outs))
        return self.adapter._masks(outs, dets.index.long().to(outs.mask_preds.device)) > 0
