"""Text-prompted detectors: Grounding DINO and MM-Grounding-DINO (``GroundingDINOHead``).

A detection is a pair (query, phrase) for a prompt of phrases (``'red car . person'`` or
``['red car', 'person']``). Its score is the head's own: for each query the last decoder
layer's query-token logits, sigmoid, averaged over the tokens of the phrase
(``convert_grounding_to_cls_scores``), then the top-k over queries x phrases — exactly the
number ``model.predict`` reports for that box and that phrase with the same prompt. The label
of a detection is the phrase's index in the prompt.

The prompt is the adapter's :attr:`GroundingDINOAdapter.prompt`, a list of phrases: set it with
``CAMEngine(model, texts=...)`` or ``explain(..., texts=...)``; by default the classes of
``model.dataset_meta`` (what mmdet's own validation prompts with). Phrases are always passed
as custom entities: mmdet's free-text path (noun-phrase extraction with NLTK) needs data
downloaded at run time, which this package never does.

The text encoder sees only the text, so every map on a visual layer is of the image evidence
for the detection's phrase; the maps themselves are the DETR family's (every neck level feeds
every query through the encoder: :attr:`~.base.DetectorAdapter.levels_shared`).
"""
from typing import Dict, List, NamedTuple, Optional, Sequence, Union

import torch
from torch import nn

from .base import ADAPTERS, Detections, complete_stages
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


@ADAPTERS.register_module()
class GroundingDINOAdapter(DETRAdapter):
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

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        meta = getattr(model, 'dataset_meta', None) or {}
        classes = meta.get('classes')
        self.prompt: Optional[List[str]] = phrases_of(list(classes)) if classes else None
        self._text_cache: Optional[tuple] = None

    @classmethod
    def accepts(cls, model: nn.Module) -> bool:
        return hasattr(model, 'forward_transformer') and hasattr(model, 'language_model')

    # ------------------------------------------------------------------ the prompt
    def set_prompt(self, texts: Texts) -> List[str]:
        """Make ``texts`` the prompt of the next forward passes.

        Returns:
            list[str]: Its phrases (the labels' names, in label order).
        """
        self.prompt = phrases_of(texts)
        return list(self.prompt)

    def _text(self, batch: int) -> tuple:
        """(text_dict for ``batch`` images, positive map) of the prompt: mmdet's own
        ``get_tokens_positive_and_prompts`` (custom entities) and language model."""
        if self.prompt is None:
            raise ValueError(f'{type(self.model).__name__} is a text-prompted detector and has '
                             'no prompt: pass `texts=` ("red car . person" or a list of '
                             'phrases), or set `model.dataset_meta["classes"]`')
        model = self.model
        positive_map, caption, _, _ = model.get_tokens_positive_and_prompts(
            list(self.prompt), True, None, None)
        text_dict = model.language_model([caption] * batch)
        if model.text_feat_map is not None:
            text_dict['embedded'] = model.text_feat_map(text_dict['embedded'])
        return text_dict, positive_map

    # ------------------------------------------------------------------ forward
    def head_outputs(self, feats: Sequence[torch.Tensor],
                     metainfo: Optional[Sequence[dict]] = None) -> GroundingOutputs:
        """The prompt's text features, the transformer and the head on ``feats``."""
        from mmdet.structures import DetDataSample

        if metainfo is None:
            shape = tuple(int(s) * self.strides()[0] for s in feats[0].shape[-2:])
            metainfo = [dict(img_shape=shape, batch_input_shape=shape)] * len(feats[0])
        text_dict, positive_map = self._text(len(feats[0]))
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

    @staticmethod
    def _phrase_scores(probs: torch.Tensor, positive_map: Dict[int, List[int]]) -> torch.Tensor:
        """(Q, P): each phrase's tokens' probabilities averaged, as
        ``convert_grounding_to_cls_scores`` does (same ops, same order)."""
        scores = probs.new_zeros((probs.shape[0], len(positive_map)))
        for label, tokens in positive_map.items():
            scores[:, label - 1] = probs[:, torch.as_tensor(tokens, dtype=torch.long)].mean(-1)
        return scores

    # ------------------------------------------------------------------ (b) score
    def scores(self, outs: GroundingOutputs, dets: Detections) -> torch.Tensor:
        """(K,) scores of ``dets``' (query, phrase) pairs on the live last-layer logits."""
        return self._per_phrase(outs, dets, lambda probs: probs.mean(-1))

    def token_scores(self, outs: GroundingOutputs, dets: Detections) -> List[torch.Tensor]:
        """Per detection, the (n_tokens,) sigmoid of its query's logit at each token of its
        phrase, live: the targets of the per-token maps."""
        probs = outs.cls_scores[0][dets.index.long()].sigmoid()
        return [probs[k, self.phrase_tokens(outs, int(label))]
                for k, label in enumerate(dets.labels.tolist())]

    @staticmethod
    def phrase_tokens(outs: GroundingOutputs, label: int) -> torch.Tensor:
        """Token indices (in the tokenised prompt) of phrase ``label``."""
        return torch.as_tensor(outs.positive_map[label + 1], dtype=torch.long)

    def _per_phrase(self, outs: GroundingOutputs, dets: Detections, reduce) -> torch.Tensor:
        probs = outs.cls_scores[0][dets.index.long()].sigmoid()  # (K, T)
        out = probs.new_zeros((len(dets), ))
        for label in dets.labels.unique().tolist():
            rows = (dets.labels == label).nonzero()[:, 0]
            out = out.index_put((rows, ), reduce(probs[rows][:, self.phrase_tokens(
                outs, int(label))]))
        return out

    # ------------------------------------------------------------------ randomisation stages
    def stages(self) -> Dict[str, List[str]]:
        """The DETR family's stages, with the language branch (``language_model``,
        ``text_feat_map``) as a stage of its own after the head."""
        language = ['language_model', 'text_feat_map']
        base = super().stages()  # the language branch is in `decoder` (the rest) there
        stages = {'head': base.pop('head'), 'language': language}
        stages.update({name: [p for p in paths if p not in language]
                       for name, paths in base.items()})
        return complete_stages(self.model, stages, rest='decoder')
