"""Per-token maps of text-prompted detectors: for each detection of phrase ``p``, one map per
token of ``p``, the evidence for that token's own probability (the sigmoid of the detection's
query / prior logit at that token), so that a user sees what "red" and what "car" point at.

The detections are the engine's (same prompt, same decoding); each (detection, token) pair is
then explained as a given detection whose ``label`` is the token index, with the adapter's
token targets (:meth:`~mmdet_cam_hook.adapters.grounding.TextPrompt.token_targets`): every
method and route of the engine applies, from one forward pass for the maps.
"""
from dataclasses import dataclass, replace
from typing import Dict, List

import numpy as np
import torch

from ..adapters import Detections
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
