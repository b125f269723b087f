"""What the engine does for text-prompted detectors (Grounding DINO, MM-Grounding-DINO, GLIP;
:mod:`~mmdet_cam_hook.adapters.grounding`): the prompt (``texts=``) and the per-token maps.

:class:`PromptedEngine` is a base of :class:`~mmdet_cam_hook.cam.engine.CAMEngine`; for other
detectors its methods refuse ``texts`` with a clear error and :attr:`PromptedEngine.phrases` is
None.

Per-token maps: for each detection of phrase ``p``, one map per token of ``p``, the evidence for
that token's own probability (the sigmoid of the detection's query / prior logit at that token),
so that a user sees what "red" and what "car" point at. The detections are the engine's (same
prompt, same decoding); each (detection, token) pair is then explained as a given detection
whose ``label`` is the token index, with the adapter's token targets
(:meth:`~mmdet_cam_hook.adapters.grounding.TextPrompt.token_targets`): every method and route of
the engine applies, from one forward pass for the maps.
"""
import contextlib
import dataclasses
from dataclasses import dataclass, replace
from typing import Dict, Iterator, List, Optional, Sequence, Union

import numpy as np
import torch
from torch import nn

from ..adapters import Detections, build_adapter
from ..runtime.io import ImageLike, load_image
from .methods import MethodSpec
from .result import CAMResult


@dataclass
class TokenMaps:
    """One method's per-token maps of an image.

    Attributes:
        result (CAMResult): One row per (detection, token) pair: the detection's box, ``labels``
            the token index in the tokenised prompt, ``scores`` the token's probability,
            ``cams`` the token's map.
        detection (np.ndarray): (R,) the row's detection, an index into the image's
            detections (:meth:`~mmdet_cam_hook.cam.engine.CAMEngine.detect`, by score).
        tokens (list[str]): (R,) the row's token (``red``, ``car``).
        phrases (list[str]): (R,) the phrase of the row's detection.
    """

    result: CAMResult
    detection: np.ndarray
    tokens: List[str]
    phrases: List[str]

    def __len__(self) -> int:
        return len(self.tokens)


def token_rows(adapter, dets: Detections) -> tuple:
    """(rows, detection index (R,), token indices (R,)): ``dets`` repeated once per token of
    each detection's phrase, ``labels`` set to the token indices."""
    positive_map = adapter.positive_map()
    owner, tokens = [], []
    for k, label in enumerate(dets.labels.tolist()):
        for token in positive_map[int(label) + 1]:
            owner.append(k)
            tokens.append(int(token))
    device = dets.labels.device
    owner_t = torch.as_tensor(owner, dtype=torch.long, device=device)
    rows = dets.select(owner_t)
    rows = replace(rows, labels=torch.as_tensor(tokens, dtype=dets.labels.dtype, device=device))
    return rows, owner_t, tokens


def token_results(results: Dict[str, CAMResult], owner: torch.Tensor, tokens: List[int],
                  names: List[str], phrases: List[str], labels: torch.Tensor
                  ) -> Dict[str, TokenMaps]:
    """Each method's :class:`TokenMaps` from the engine's results on the token rows."""
    detection = owner.cpu().numpy()
    row_phrases = [phrases[int(labels[k])] for k in detection]
    return {name: TokenMaps(res, detection, [names[t] for t in tokens], row_phrases)
            for name, res in results.items()}


class PromptedEngine:
    """The prompt and per-token maps of :class:`~mmdet_cam_hook.cam.engine.CAMEngine` (its base;
    uses the engine's ``adapter``, ``detector``, ``_decode`` and ``explain``)."""

    @staticmethod
    def takes_texts(model: nn.Module) -> bool:
        """Whether ``model`` is a text-prompted detector (its adapter takes ``texts=``); no
        forward pass.

        Raises:
            ValueError: On a head no adapter supports.
        """
        return hasattr(build_adapter(model), 'set_prompt')

    @property
    def phrases(self) -> Optional[List[str]]:
        """The prompt's phrases of a text-prompted detector, in label order (the labels'
        names); None for a detector that takes no prompt."""
        prompt = getattr(self.adapter, 'prompt', None)
        return None if prompt is None else list(prompt)

    def set_texts(self, texts: Union[str, Sequence[str]]) -> List[str]:
        """Make ``texts`` the prompt of a text-prompted detector for the next calls.

        Args:
            texts (str | Sequence[str]): ``'red car . person'`` or ``['red car', 'person']``.

        Returns:
            list[str]: The phrases, in label order.

        Raises:
            ValueError: If the detector takes no prompt, or the prompt holds no phrase.
        """
        if not hasattr(self.adapter, 'set_prompt'):
            raise ValueError(f'`texts` is for text-prompted detectors (Grounding DINO); '
                             f'{type(self.adapter.head).__name__} takes no prompt')
        return self.adapter.set_prompt(texts)

    @contextlib.contextmanager
    def _prompt(self, texts) -> Iterator[None]:
        """``texts`` as the prompt for one call (None: the current one), restored after."""
        if texts is None:
            yield
            return
        before = self.phrases
        self.set_texts(texts)
        try:
            yield
        finally:
            self.adapter.prompt = before

    def explain_tokens(self,
                       image: ImageLike,
                       methods: Union[MethodSpec, Sequence[MethodSpec]] = ('gradcam', ),
                       texts: Union[None, str, Sequence[str]] = None) -> Dict[str, TokenMaps]:
        """Per-token maps of a text-prompted detector (this module): for each detection (as
        :meth:`explain` would explain it), one map per token of its phrase, of that token's
        probability at the detection's query / prior.

        Args:
            image (str | PathLike | np.ndarray): A path or an HxWx3 uint8 BGR array.
            methods (str | CAMMethod | dict | Sequence): As for :meth:`explain`.
            texts (str | Sequence[str], optional): The prompt for this call. Defaults to None
                (the engine's).

        Returns:
            dict[str, TokenMaps]: One per method, keyed by its name.

        Raises:
            ValueError: If the detector takes no prompt, or as :meth:`explain`.
        """
        if not hasattr(self.adapter, 'token_targets'):
            raise ValueError(f'per-token maps are for text-prompted detectors (Grounding DINO, '
                             f'GLIP); {type(self.adapter.head).__name__} takes no prompt')
        img = load_image(image)
        with self._prompt(texts):
            outs, metas = self.detector.outputs([img])
            dets = self._decode(outs, metas[0])
            rows, owner, tokens = token_rows(self.adapter, dets)
            with self.adapter.token_targets():
                with torch.no_grad():
                    rows = dataclasses.replace(rows, scores=self.adapter.scores(outs, rows))
                results = self.explain(img, methods, detections=rows)
            names, phrases = self.adapter.token_names(), self.phrases
        return token_results(results, owner, tokens, names, phrases, dets.labels)
