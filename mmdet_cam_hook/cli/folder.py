"""The images of one ``mmdet-cam`` run: which ones (a file, a folder or a glob, refused when
two would write the same output name: :func:`.outputs.check_inputs`), this process's share
under torchrun, and reading ahead and writing behind the explaining in two background threads.
"""
from __future__ import annotations

import glob
import os
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterator, NamedTuple, Optional, Sequence

import numpy as np

from ..checks import UserError
from ..runtime.io import IMAGE_EXTENSIONS, list_images
from .outputs import check_inputs

__all__ = ['collect_images', 'rank_share', 'Loaded', 'read_batch', 'Overlap']


# ---------------------------------------------------------------------------------------------
# Which images, and which of them this rank explains
def rank_share(paths: Sequence[Path], rank: int, world_size: int) -> list[Path]:
    """The images rank ``rank`` of ``world_size`` explains: the groups of images with one file
    stem (they write the same output names), in sorted stem order, dealt round-robin.

    Args:
        paths (Sequence[Path]): Every image of the run.
        rank (int): This process's rank, ``0 <= rank < world_size``.
        world_size (int): The number of processes.

    Returns:
        list[Path]: This rank's images, in the order of ``paths``. The shares of all ranks
        partition ``paths``.
    """
    turn = {stem: i % world_size for i, stem in enumerate(sorted({p.stem for p in paths}))}
    return [p for p in paths if turn[p.stem] == rank]


def collect_images(img: str, method: str = 'gradcam') -> list[Path]:
    """The images named by ``img``: a file, a folder (its images, not recursive) or a glob.

    Args:
        img (str): The tool's ``img`` argument.
        method (str): ``--method``; it decides which output names two stems can share.

    Returns:
        list[Path]: Sorted paths.

    Raises:
        UserError: If nothing matches, or two inputs' outputs would overwrite each other
            (:func:`.outputs.check_inputs`).
    """
    path = Path(img)
    if path.is_file():
        return [path]
    if path.is_dir():
        paths = list_images(path)
        if not paths:
            raise UserError(f'folder {img!r} has no images (extensions: '
                            f'{", ".join(IMAGE_EXTENSIONS)})')
    elif any(c in img for c in '*?['):
        paths = sorted(Path(p) for p in glob.glob(img, recursive=True) if os.path.isfile(p))
        if not paths:
            raise UserError(f'no files match {img!r}')
    else:
        raise UserError(f'image {img!r} does not exist')
    check_inputs(paths, method)
    return paths


# ---------------------------------------------------------------------------------------------
# Reading ahead, writing behind
class Loaded(NamedTuple):
    """One image as read by :func:`read_batch`: the pixels, or why there are none."""

    path: Path
    image: Optional[np.ndarray]
    error: Optional[Exception]


def read_batch(paths: Sequence[Path]) -> list[Loaded]:
    """:func:`~mmdet_cam_hook.runtime.io.load_image` on each path, keeping the errors."""
    from ..runtime.io import load_image

    loaded = []
    for path in paths:
        try:
            loaded.append(Loaded(path, load_image(path), None))
        except (OSError, ValueError) as exc:  # missing, 0-byte, corrupt, unsupported
            loaded.append(Loaded(path, None, exc))
    return loaded


class Overlap:
    """The two background threads around the loop over batches: one reads and decodes the next
    batch while the current one is explained, the other writes each batch's outputs while the
    next one is explained (OpenCV releases the GIL while it decodes and encodes).

    At most one batch is read ahead and one batch's outputs wait for the writer, so about three
    batches are in memory. Leaving the ``with`` block shuts both threads down; after an error
    or Ctrl-C, the write in progress is completed (each output is written atomically anyway)
    and the queued ones never start.

    Args:
        batches (Sequence[Sequence[Path]]): The images, batch by batch.
    """

    def __init__(self, batches: Sequence[Sequence[Path]]):
        self._batches = batches
        self._reader = ThreadPoolExecutor(1, thread_name_prefix='mmdet-cam-read')
        self._writer = ThreadPoolExecutor(1, thread_name_prefix='mmdet-cam-write')
        self._writes: list[Future] = []  # the current batch's
        self._previous: list[Future] = []  # the batch before's
        self._written: list[Path] = []

    def __enter__(self) -> Overlap:
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        for executor in (self._reader, self._writer):
            executor.shutdown(wait=True, cancel_futures=exc_type is not None)

    def read(self) -> Iterator[list[Loaded]]:
        """The batches, read in order; the next one is read while the caller works on this
        one. Before it reads on, the writes of the batch before this one are waited for."""
        ahead = self._reader.submit(read_batch, self._batches[0]) if self._batches else None
        for i in range(len(self._batches)):
            loaded = ahead.result()
            if i + 1 < len(self._batches):
                ahead = self._reader.submit(read_batch, self._batches[i + 1])
            yield loaded
            self._collect(self._previous)
            self._previous, self._writes = self._writes, []

    def write(self, save: Callable[[], list[Path]]) -> None:
        """Queue ``save()``, which writes one image's outputs and returns their paths."""
        self._writes.append(self._writer.submit(save))

    def finish(self) -> list[Path]:
        """Wait for the queued writes.

        Returns:
            list[Path]: Every file written, in the order of the images.

        Raises:
            UserError: The first error of a write (e.g. a full disk).
        """
        self._collect(self._previous + self._writes)
        self._previous, self._writes = [], []
        return self._written

    def _collect(self, futures: list[Future]) -> None:
        for future in futures:
            self._written += future.result()
