"""Text-prompted detectors: Grounding DINO and MM-Grounding-DINO (``GroundingDINOHead``), GLIP
(``ATSSVLFusionHead``).

A detection is a pair (query or prior, phrase) for a prompt of phrases (``'red car . person'``
or ``['red car', 'person']``); its label is the phrase's index in the prompt. Its score is the
head's own, exactly the number ``model.predict`` reports for that box and that phrase with the
same prompt: the sigmoid of the query-token (prior-token) logits averaged over the tokens of the
phrase (mmdet's ``convert_grounding_to_cls_scores``; the issue that asked for this said "max":
mmdet takes the mean), then for Grounding DINO the top-k over queries x phrases, for GLIP
``sqrt(that x sigmoid(centerness))`` through ATSS's pre-NMS top-k and NMS.

The prompt is the adapter's :attr:`TextPrompt.prompt`, a list of phrases: set it with
``CAMEngine(model, texts=...)`` or ``explain(..., texts=...)``; by default the classes of
``model.dataset_meta`` (what mmdet's own validation prompts with). Phrases are always passed
as custom entities: mmdet's free-text path (noun-phrase extraction with NLTK) needs data
downloaded at run time, which this package never does.

The text encoder sees only the text, so every map on a visual layer is of the image evidence
for the detection's phrase. Every neck level feeds every detection (Grounding DINO's encoder
mixes them; GLIP's DyHead blocks attend across neighbouring levels, six blocks deep), so the
level-aware default takes all the neck outputs together
(:attr:`~.base.DetectorAdapter.levels_shared`) on the exact route.
"""
import contextlib
from typing import Dict, Iterator, List, NamedTuple, Optional, Sequence, Union

import torch
from mmengine.structures import InstanceData
from torch import nn

from .base import ADAPTERS, Detections, complete_stages
from .dense import DenseAdapter
from .detr import DETRAdapter

#: A prompt: a caption of phrases separated by ``' . '`` or a sequence of phrases.
Texts = Union[str, Sequence[str]]


class GroundingOutputs(NamedTuple):
    """What :meth:`GroundingDINOAdapter.head_outputs` returns: the last decoder layer's
    query-token logits (B, Q, T) and normalised boxes (B, Q, 4), live, and the prompt's token
    positive map (``{phrase index + 1: [token indices]}``, mmdet's own)."""

    cls_scores: torch.Tensor
    bbox_preds: torch.Tensor
    positive_map: Dict[int, List[int]]


def phrases_of(texts: Texts) -> List[str]:
    """The phrases of a prompt, as mmdet splits a custom-entities caption (on ``.``).

    Args:
        texts (str | Sequence[str]): ``'red car . person'`` or ``['red car', 'person']``.

    Returns:
        list[str]: The non-empty phrases, stripped.

    Raises:
        ValueError: If the prompt holds no phrase.
        TypeError: If it is neither a string nor a sequence of strings.
    """
    if isinstance(texts, str):
        phrases = texts.split('.')
    elif isinstance(texts, Sequence) and all(isinstance(t, str) for t in texts):
        phrases = list(texts)
    else:
        raise TypeError(f'`texts` must be a caption such as "red car . person" or a list of '
                        f'phrases, got {texts!r}')
    phrases = [p.strip() for p in phrases if p.strip()]
    if not phrases:
        raise ValueError(f'`texts` holds no phrase: {texts!r}; give a caption such as '
                         '"red car . person" or a list of phrases')
    return phrases


class TextPrompt:
    """What the text-prompted adapters share: the prompt (:attr:`prompt`, a list of phrases;
    default: the classes of ``model.dataset_meta``), mmdet's own token positive map and
    language model for it, the phrase scores (mean over a phrase's tokens), and the token
    targets (:meth:`token_targets`)."""

    #: True inside :meth:`token_targets`: a detection's ``label`` is then a token index of the
    #: tokenised prompt and its score the sigmoid of its query's (prior's) logit at that token.
    per_token: bool = False

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        meta = getattr(model, 'dataset_meta', None) or {}
        classes = meta.get('classes')
        self.prompt: Optional[List[str]] = phrases_of(list(classes)) if classes else None

    @classmethod
    def accepts(cls, model: nn.Module) -> bool:
        return hasattr(model, 'language_model') and hasattr(model,
                                                            'get_tokens_positive_and_prompts')

    def set_prompt(self, texts: Texts) -> List[str]:
        """Make ``texts`` the prompt of the next forward passes.

        Returns:
            list[str]: Its phrases (the labels' names, in label order).
        """
        self.prompt = phrases_of(texts)
        return list(self.prompt)

    @contextlib.contextmanager
    def token_targets(self) -> Iterator[None]:
        """Within the block, :meth:`scores` reads one token's probability per detection
        (``labels`` are token indices): the targets of the per-token maps."""
        self.per_token = True
        try:
            yield
        finally:
            self.per_token = False

    def positive_map(self) -> Dict[int, List[int]]:
        """The prompt's token positive map, ``{phrase index + 1: [token indices]}`` (mmdet's
        own, from the tokenizer alone)."""
        return self.model.get_tokens_positive_and_prompts(list(self._checked_prompt()), True,
                                                          None, None)[0]

    def token_names(self) -> List[str]:
        """The tokens of the tokenised prompt, by index (``[CLS]``, ``red``, ``car``, ...)."""
        model = self.model
        caption = model.get_tokens_positive_and_prompts(list(self._checked_prompt()), True,
                                                        None, None)[1]
        tokenizer = model.language_model.tokenizer
        return tokenizer.convert_ids_to_tokens(tokenizer([caption])['input_ids'][0])

    def _checked_prompt(self) -> List[str]:
        if self.prompt is None:
            raise ValueError(f'{type(self.model).__name__} is a text-prompted detector and has '
                             'no prompt: pass `texts=` ("red car . person" or a list of '
                             'phrases), or set `model.dataset_meta["classes"]`')
        return self.prompt

    def _language(self, batch: int) -> tuple:
        """(language features for ``batch`` images, positive map) of the prompt: mmdet's own
        ``get_tokens_positive_and_prompts`` (custom entities), language model and (Grounding
        DINO) ``text_feat_map``."""
        model = self.model
        positive_map, caption, _, _ = model.get_tokens_positive_and_prompts(
            list(self._checked_prompt()), True, None, None)
        language = model.language_model([caption] * batch)
        if getattr(model, 'text_feat_map', None) is not None:
            language['embedded'] = model.text_feat_map(language['embedded'])
        return language, positive_map

    @staticmethod
    def _phrase_scores(probs: torch.Tensor, positive_map: Dict[int, List[int]]) -> torch.Tensor:
        """(N, P): each phrase's tokens' probabilities (N, T) averaged, as
        ``convert_grounding_to_cls_scores`` does (same ops, same order)."""
        scores = probs.new_zeros((probs.shape[0], len(positive_map)))
        for label, tokens in positive_map.items():
            scores[:, label - 1] = probs[:, torch.as_tensor(tokens, dtype=torch.long)].mean(-1)
        return scores

    @staticmethod
    def phrase_tokens(positive_map: Dict[int, List[int]], label: int) -> torch.Tensor:
        """Token indices (in the tokenised prompt) of phrase ``label``."""
        return torch.as_tensor(positive_map[label + 1], dtype=torch.long)

    def _phrase_means(self, probs: torch.Tensor, labels: torch.Tensor,
                      positive_map: Dict[int, List[int]]) -> torch.Tensor:
        """(K,): row k of ``probs`` (K, T) averaged over the tokens of phrase ``labels[k]``
        (inside :meth:`token_targets`: at token ``labels[k]``), differentiable."""
        if self.per_token:
            return probs.gather(1, labels[:, None].long())[:, 0]
        out = probs.new_zeros((len(labels), ))
        for label in labels.unique().tolist():
            rows = (labels == label).nonzero()[:, 0]
            tokens = self.phrase_tokens(positive_map, int(label))
            out = out.index_put((rows, ), probs[rows][:, tokens].mean(-1))
        return out

    def _language_stages(self, base: Dict[str, List[str]], language: List[str],
                         rest: str) -> Dict[str, List[str]]:
        """``base`` (complete stages) with the language branch as a stage of its own after the
        head."""
        stages = {'head': base.pop('head'), 'language': language}
        stages.update({name: [p for p in paths if p not in language]
                       for name, paths in base.items()})
        return complete_stages(self.model, stages, rest=rest)


@ADAPTERS.register_module()
class GroundingDINOAdapter(TextPrompt, DETRAdapter):
    """``GroundingDINOHead`` in mmdet's ``GroundingDINO`` (Grounding DINO, MM-Grounding-DINO).

    Score of a detection (query q, phrase p) with tokens ``T_p`` of the prompt::

        mean_{t in T_p} sigmoid(logit[q, t])       (last decoder layer)
    """

    head_types = ('GroundingDINOHead', )
    family = 'Grounding DINO'
    detectors = 'Grounding DINO, MM-Grounding-DINO'
    doc_score = ('mean over the phrase\'s tokens of σ(logit[q, token]) (last decoder layer; '
                 'prompt `texts=`)')
    doc_layers = 'all neck outputs together, maps averaged (`neck.convs.{0,1,2}`, ' \
                 '`neck.extra_convs.0`)'
    doc_route = 'exact (one backward through the transformer per detection)'

    @classmethod
    def accepts(cls, model: nn.Module) -> bool:
        return hasattr(model, 'forward_transformer') and super().accepts(model)

    # ------------------------------------------------------------------ forward
    def head_outputs(self, feats: Sequence[torch.Tensor],
                     metainfo: Optional[Sequence[dict]] = None) -> GroundingOutputs:
        """The prompt's text features, the transformer and the head on ``feats``."""
        from mmdet.structures import DetDataSample

        if metainfo is None:
            shape = tuple(int(s) * self.strides()[0] for s in feats[0].shape[-2:])
            metainfo = [dict(img_shape=shape, batch_input_shape=shape)] * len(feats[0])
        text_dict, positive_map = self._language(len(feats[0]))
        samples = [DetDataSample(metainfo=dict(m)) for m in metainfo]
        head_inputs = self.model.forward_transformer(tuple(feats), text_dict, samples)
        keys = ('hidden_states', 'references', 'memory_text', 'text_token_mask')
        cls_scores, bbox_preds = self.head(**{k: head_inputs[k] for k in keys})
        return GroundingOutputs(cls_scores[-1], bbox_preds[-1], positive_map)

    # ------------------------------------------------------------------ (a) decoding
    def decode(self, outs: GroundingOutputs, metainfo: dict, score_thr: float) -> Detections:
        """``GroundingDINOHead._predict_by_feat_single`` with the query carried through its
        top-k over queries x phrases (then the DETR family's box decoding)."""
        logits = outs.cls_scores[0].detach()
        phrase_scores = self._phrase_scores(logits.sigmoid(), outs.positive_map)
        max_per_img = self.head.test_cfg.get('max_per_img', len(logits))
        scores, indexes = phrase_scores.view(-1).topk(max_per_img)
        num_phrases = phrase_scores.shape[-1]
        return self._query_detections(outs.bbox_preds[0].detach(), scores,
                                      indexes % num_phrases, indexes // num_phrases,
                                      metainfo, score_thr)

    # ------------------------------------------------------------------ (b) score
    def scores(self, outs: GroundingOutputs, dets: Detections) -> torch.Tensor:
        """(K,) scores of ``dets``' (query, phrase) pairs on the live last-layer logits."""
        probs = outs.cls_scores[0][dets.index.long()].sigmoid()  # (K, T)
        return self._phrase_means(probs, dets.labels, outs.positive_map)

    # ------------------------------------------------------------------ randomisation stages
    def stages(self) -> Dict[str, List[str]]:
        """The DETR family's stages, with the language branch (``language_model``,
        ``text_feat_map``) as a stage of its own after the head."""
        return self._language_stages(super().stages(), ['language_model', 'text_feat_map'],
                                     rest='decoder')


class GLIPOutputs(NamedTuple):
    """What :meth:`GLIPAdapter.head_outputs` returns, live: per level the prior-token logits
    (B, H*W*A, T), the box deltas (B, 4A, H, W) and the centerness (B, A, H, W); and the
    prompt's token positive map."""

    cls_logits: Sequence[torch.Tensor]
    bbox_preds: Sequence[torch.Tensor]
    centernesses: Sequence[torch.Tensor]
    positive_map: Dict[int, List[int]]


@ADAPTERS.register_module()
class GLIPAdapter(TextPrompt, DenseAdapter):
    """``ATSSVLFusionHead`` in mmdet's ``GLIP`` (one anchor per location, as in mmdet's GLIP
    configs).

    Score of the detection (prior (l, y, x), phrase p) with tokens ``T_p``::

        sqrt(mean_{t in T_p} sigmoid(logit[l][y*W + x, t]) * sigmoid(centerness[l][0, y, x]))

    decoded as ``ATSSVLFusionHead._predict_by_feat_single`` does (the per-level pre-NMS top-k on
    the phrase scores, then the square root with the centerness, NMS, and GLIP's ``+ 1`` on
    ``x2, y2``), with the prior behind each box carried through.
    """

    head_types = ('ATSSVLFusionHead', )
    family = 'GLIP'
    detectors = 'GLIP'
    doc_score = ('√(mean over the phrase\'s tokens of σ(logit[prior, token]) · '
                 'σ(centerness)) (prompt `texts=`)')
    doc_layers = 'all neck outputs together, maps averaged (`neck.fpn_convs.{0..4}`)'
    doc_route = 'exact (DyHead and the language fusion mix the levels)'
    levels_shared = True

    @classmethod
    def accepts(cls, model: nn.Module) -> bool:
        head = getattr(model, 'bbox_head', None)
        return (super().accepts(model) and head is not None
                and int(head.prior_generator.num_base_priors[0]) == 1)

    # ------------------------------------------------------------------ forward
    def head_outputs(self, feats: Sequence[torch.Tensor],
                     metainfo: Optional[Sequence[dict]] = None) -> GLIPOutputs:
        """The prompt's language features and the head (with its language fusion) on
        ``feats``."""
        language, positive_map = self._language(len(feats[0]))
        cls_logits, bbox_preds, centernesses = self.head(tuple(feats), language)
        return GLIPOutputs(cls_logits, bbox_preds, centernesses, positive_map)

    # ------------------------------------------------------------------ (a) decoding
    def decode(self, outs: GLIPOutputs, metainfo: dict, score_thr: float) -> Detections:
        """Detections of image 0 with the prior behind each kept box, equal to
        ``model.predict``'s; the pre-NMS filter is ``min(test_cfg.score_thr, score_thr)``."""
        from mmdet.models.utils import filter_scores_and_topk
        from mmdet.structures.bbox import cat_boxes

        head = self.head
        sizes = [tuple(b.shape[-2:]) for b in outs.bbox_preds]
        mlvl_priors = head.prior_generator.grid_priors(
            sizes, dtype=outs.bbox_preds[0].dtype, device=outs.bbox_preds[0].device)
        cfg = self._pre_cfg(score_thr)
        parts = {'bbox_pred': [], 'priors': [], 'scores': [], 'labels': [], 'prior_idx': []}
        start = 0
        for cls_logit, bbox_pred, centerness, priors in zip(
                outs.cls_logits, outs.bbox_preds, outs.centernesses, mlvl_priors):
            bbox_pred = bbox_pred[0].detach().permute(1, 2, 0).reshape(
                -1, head.bbox_coder.encode_size)
            factor = centerness[0].detach().permute(1, 2, 0).reshape(-1).sigmoid()
            scores = self._phrase_scores(cls_logit[0].detach().sigmoid(), outs.positive_map)
            scores, labels, keep, kept = filter_scores_and_topk(
                scores, cfg.get('score_thr', 0), cfg.get('nms_pre', -1),
                dict(bbox_pred=bbox_pred, priors=priors))
            for key, value in (('bbox_pred', kept['bbox_pred']), ('priors', kept['priors']),
                               ('scores', torch.sqrt(scores * factor[keep])),
                               ('labels', labels), ('prior_idx', keep + start)):
                parts[key].append(value)
            start += len(priors)
        results = InstanceData(
            bboxes=head.bbox_coder.decode(cat_boxes(parts['priors']),
                                          torch.cat(parts['bbox_pred']),
                                          max_shape=metainfo['img_shape']),
            **{key: torch.cat(parts[key]) for key in ('scores', 'labels', 'prior_idx')})
        results = head._bbox_post_process(results=results, cfg=cfg, rescale=True,
                                          with_nms=True, img_meta=metainfo)
        if len(results) > 0:
            results.bboxes[:, 2:] = results.bboxes[:, 2:] + 1  # as mmdet's GLIP decoding
        return self._locate(results, score_thr, sizes)

    # ------------------------------------------------------------------ (b) score
    def scores(self, outs: GLIPOutputs, dets: Detections) -> torch.Tensor:
        """(K,) differentiable scores of ``dets`` on the live head outputs."""
        return self._per_level(dets, outs.bbox_preds[0], lambda level, d: self._glip_read(
            outs, level, d))

    def _glip_read(self, outs: GLIPOutputs, level: int, dets: Detections) -> torch.Tensor:
        width = outs.bbox_preds[level].shape[-1]
        probs = outs.cls_logits[level][0, dets.ys * width + dets.xs].sigmoid()  # (K, T)
        phrase = self._phrase_means(probs, dets.labels, outs.positive_map)
        if self.per_token:
            return phrase
        factor = outs.centernesses[level][0, dets.anchors, dets.ys, dets.xs].sigmoid()
        return torch.sqrt(phrase * factor)

    def level_of_layer(self, name: str) -> Optional[int]:
        """None: the head's DyHead blocks read the neighbouring levels (six blocks in mmdet's
        configs: every level reaches every detection), so no layer feeds one level alone."""
        return None

    def window_branches(self, level: int):
        """None: the head's DyHead blocks read the neighbouring levels (no local window)."""
        return None

    # ------------------------------------------------------------------ randomisation stages
    def stages(self) -> Dict[str, List[str]]:
        """``head``, ``language`` (``language_model``), ``neck``, ``backbone``."""
        return self._language_stages(super().stages(), ['language_model'], rest='head')
