"""Counting misses and false positives over many images: :class:`MissCounts`, THE accumulator
the hook's scalars (``cam_{mode}/misses`` ...) and ``mmdet-cam-eval``'s JSON both use, so that a
name means one thing wherever it is reported.

The numbers (:meth:`MissCounts.summary`):

- ``misses``: ground-truth boxes no kept detection matched (same class, IoU >= 0.5), summed;
- ``false_positives``: kept detections that match no ground-truth box, summed;
- ``miss_candidate_score``: the mean score of the misses' best candidates (misses without a
  candidate left out; NaN when no miss has one): how close the model came;
- ``miss_share_<reason>``: the share of misses of each reason
  (:data:`~mmdet_cam_hook.cam.misses.REASONS`), 0 when there is no miss.
"""
from __future__ import annotations

import math
from typing import Dict, List

import numpy as np

from ..cam.misses import REASONS, Miss

__all__ = ['MissCounts']


class MissCounts:
    """Accumulates misses and false positives (``update``, ``summary``)."""

    def __init__(self) -> None:
        self.misses: List[Miss] = []
        self.false_positives = 0
        self.detections = 0
        self.images = 0

    def update(self, misses, false_positive) -> MissCounts:
        """Add one image's records and per-detection false-positive flags (a ``CAMResult``'s
        ``misses`` and ``false_positive``).

        Returns:
            MissCounts: ``self``.
        """
        flags = np.asarray(false_positive, dtype=bool).reshape(-1)
        self.misses.extend(misses)
        self.false_positives += int(flags.sum())
        self.detections += len(flags)
        self.images += 1
        return self

    def summary(self) -> Dict[str, float]:
        """The numbers of the module docstring, by name."""
        scores = [m.candidate_score for m in self.misses if m.candidate_score is not None]
        out = {'misses': float(len(self.misses)),
               'false_positives': float(self.false_positives),
               'miss_candidate_score': float(np.mean(scores)) if scores else math.nan}
        for reason in REASONS:
            count = sum(m.reason == reason for m in self.misses)
            out[f'miss_share_{reason}'] = count / len(self.misses) if self.misses else 0.0
        return out

    def counts(self) -> Dict[str, int]:
        """Misses per reason (every reason, 0 included)."""
        return {reason: sum(m.reason == reason for m in self.misses) for reason in REASONS}
