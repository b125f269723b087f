"""Files on disk: which files count as images, a folder's images, and writing an output file
so that it never appears half-written under its final name.

The command-line tool and the hook both read folders of images; they share
:data:`IMAGE_EXTENSIONS` and :func:`list_images` from here.
"""
from __future__ import annotations

import os
import secrets
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Union

__all__ = ['IMAGE_EXTENSIONS', 'is_image_file', 'list_images', 'atomic_path', 'write_atomically']

PathLike = Union[str, os.PathLike]

#: File extensions (lower case) taken as images from a folder: the formats OpenCV reads.
IMAGE_EXTENSIONS = ('.bmp', '.jpeg', '.jpg', '.png', '.tif', '.tiff', '.webp')


def is_image_file(path: PathLike) -> bool:
    """Whether ``path`` is a regular, non-hidden file with an image extension.

    Hidden files (name starting with ``.``) are not images here: they are an editor's or an
    operating system's (``._photo.jpg``), or a write in progress (:func:`atomic_path`).

    Args:
        path (str | PathLike): The file.

    Returns:
        bool: True for an image file.
    """
    path = Path(path)
    return (not path.name.startswith('.') and path.suffix.lower() in IMAGE_EXTENSIONS
            and path.is_file())


def list_images(folder: PathLike) -> list[Path]:
    """The image files directly inside ``folder`` (not recursive), sorted by name.

    Args:
        folder (str | PathLike): The folder.

    Returns:
        list[Path]: ``folder / name`` for every file that :func:`is_image_file` accepts; empty
        when there is none.

    Raises:
        FileNotFoundError: If ``folder`` does not exist.
        NotADirectoryError: If ``folder`` is not a folder.
    """
    folder = Path(folder)
    if not folder.exists():
        raise FileNotFoundError(f'folder {str(folder)!r} does not exist')
    if not folder.is_dir():
        raise NotADirectoryError(f'{str(folder)!r} is not a folder')
    return sorted(p for p in folder.iterdir() if is_image_file(p))


@contextmanager
def atomic_path(path: PathLike) -> Iterator[Path]:
    """A temporary name next to ``path`` to write to; renamed to ``path`` when the block ends.

    The temporary file is hidden, in the same folder (so the rename is atomic, with
    :func:`os.replace`) and ends with the same extension as ``path`` (writers such as
    ``cv2.imwrite`` choose the format from it). If the block raises, ``KeyboardInterrupt``
    included, the temporary file is removed and ``path`` is left as it was: absent, or the
    complete file of an earlier run.

    Args:
        path (str | PathLike): The final name.

    Yields:
        Path: The temporary name (nothing exists there yet).
    """
    path = Path(path)
    tmp = path.with_name(f'.{path.stem}.partial-{secrets.token_hex(4)}{path.suffix}')
    done = False
    try:
        yield tmp
        os.replace(tmp, path)
        done = True
    finally:
        if not done:
            tmp.unlink(missing_ok=True)


def write_atomically(path: PathLike, write: Callable[[Path], object]) -> Path:
    """Call ``write(tmp)`` on a temporary name, then rename the result to ``path``.

    Args:
        path (str | PathLike): The final name.
        write (Callable[[Path], object]): Writes the whole file to the path it is given; its
            return value is ignored. If it raises, nothing appears under ``path``.

    Returns:
        Path: ``path``.

    Raises:
        OSError: If the temporary file cannot be renamed (or ``write`` raises it).
    """
    with atomic_path(path) as tmp:
        write(tmp)
    return Path(path)
