"""What becomes of each image of an ``mmdet-cam`` run: explained in a batch or alone, skipped
with one log line (unreadable, or refused by the engine), or the run's own error.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

from ..checks import UserError
from .folder import Loaded
from .misses import ground_truth_kwargs

__all__ = ['ImageError', 'SAME_ERROR_LIMIT', 'Tally', 'explain_one', 'explain_batch',
           'result_of']

logger = logging.getLogger('mmdet_cam_hook.cli')


class ImageError(Exception):
    """One image could not be explained (e.g. a 2000x1 strip); the message names it."""


#: Stop a run when this many images in a row, and no image before them, failed with the same
#: message: it is the run's problem (e.g. a target layer whose output is not a tensor), not the
#: images'.
SAME_ERROR_LIMIT = 3


def explain_one(engine, image, args, source: Path):
    """``engine.explain`` for one method.

    Raises:
        UserError: On CUDA out of memory.
        ImageError: If the engine refuses the image or the run's settings for it.
    """
    import torch

    try:
        return engine.explain(image, methods=[args.method], renormalize=args.renormalize,
                              contrast=getattr(args, 'contrast', None),
                              **ground_truth_kwargs(args, source))[args.method]
    except torch.OutOfMemoryError as exc:
        raise UserError(f'CUDA out of memory on {args.device} while processing {source}; try '
                        '--device cpu (or fewer detections with --topk)') from exc
    except ValueError as exc:  # a 2000x1 image, a target layer whose output is not a tensor
        raise ImageError(f'{source}: {exc}') from exc


class Tally:
    """What became of each image; raises the :class:`UserError` that ends the run when an
    image's problem is the run's (a single image, or the same error for the first images).

    Args:
        single (bool): The run has one image: its problem is a user error.
    """

    def __init__(self, single: bool):
        self.single = single
        self.unreadable: list[Path] = []
        self.failed: list[Path] = []
        self.empty: list[Path] = []
        self.done: list[Path] = []
        self._errors: list[str] = []  # the explain errors since the last image that worked

    def not_read(self, path: Path, exc: Exception) -> None:
        if self.single:
            raise UserError(str(exc)) from exc
        logger.error('skipping %s: %s', path, exc)
        self.unreadable.append(path)

    def not_explained(self, path: Path, exc: ImageError) -> None:
        if self.single:
            raise UserError(str(exc)) from exc
        cause = str(exc.__cause__)
        if (not self.done and not self.empty and len(self._errors) == SAME_ERROR_LIMIT - 1
                and all(e == cause for e in self._errors)):
            raise UserError(f'{cause} (the same error for the first {SAME_ERROR_LIMIT} '
                            'images; stopping)') from exc
        logger.error('skipping %s', exc)
        self.failed.append(path)
        self._errors.append(cause)

    def explained(self, path: Path, result, score_thr: float) -> bool:
        """Whether ``result`` has detections or misses (outputs to write)."""
        self._errors.clear()
        if len(result) == 0 and not result.misses:
            self.empty.append(path)
            if not self.single:
                logger.warning('%s: no detections with score >= %g', path, score_thr)
            return False
        self.done.append(path)
        return True


def explain_batch(engine, loaded: list[Loaded], args) -> Optional[dict]:
    """The results of a batch's readable images from one
    :meth:`~mmdet_cam_hook.cam.engine.CAMEngine.explain_batch`, by path; None for fewer than two
    images, or when the engine refuses an image (the caller then explains them one at a time,
    which names the image and keeps the others).

    Raises:
        UserError: On CUDA out of memory.
    """
    import torch

    good = [item for item in loaded if item.error is None]
    if len(good) < 2 or getattr(args, 'explain_misses', False):  # misses: one at a time
        return None
    try:
        results = engine.explain_batch([item.image for item in good], methods=[args.method],
                                       renormalize=args.renormalize,
                                       contrast=getattr(args, 'contrast', None))
    except torch.OutOfMemoryError as exc:
        raise UserError(f'CUDA out of memory on {args.device} while processing a batch of '
                        f'{len(good)} images from {good[0].path}; try a smaller --batch-size, '
                        '--device cpu (or fewer detections with --topk)') from exc
    except ValueError:  # one image (named again when it goes alone), or the run's settings
        return None
    return {item.path: res[args.method] for item, res in zip(good, results)}


def result_of(engine, item: Loaded, batch: Optional[dict], args, tally: Tally):
    """``item``'s result to write, from ``batch`` or explained alone; None (and counted in
    ``tally``) when it cannot be read or explained or has no detections."""
    if item.error is not None:
        tally.not_read(item.path, item.error)
        return None
    if batch is not None:
        result = batch[item.path]
    else:
        try:
            result = explain_one(engine, item.image, args, item.path)
        except ImageError as exc:
            tally.not_explained(item.path, exc)
            return None
    return result if tally.explained(item.path, result, args.score_thr) else None
