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

import cv2
import numpy as np

__all__ = [
    'IMAGE_EXTENSIONS', 'ImageLike', 'is_image_file', 'list_images', 'load_image', 'atomic_path',
    'write_atomically'
]

PathLike = Union[str, os.PathLike]
ImageLike = Union[str, os.PathLike, np.ndarray]

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


def load_image(image: ImageLike) -> np.ndarray:
    """Read or check an image: a path (read as the test pipeline's ``LoadImageFromFile`` does,
    colour BGR) or an HxWx3 uint8 BGR array. A 2-D array is taken as grayscale and an HxWx4 one as
    BGRA, both converted to BGR.

    Raises:
        FileNotFoundError: If a path does not exist.
        IsADirectoryError: If a path is a directory.
        ValueError: If a file cannot be decoded (also an empty file), or an array is not an
            8-bit image.
        TypeError: If ``image`` is neither a path nor an array.
    """
    import mmcv

    if isinstance(image, (str, os.PathLike)):
        path = Path(image)
        if path.is_dir():
            raise IsADirectoryError(f'image {str(path)!r} is a directory, not an image file')
        if not path.is_file():
            raise FileNotFoundError(f'image {str(path)!r} does not exist')
        data = path.read_bytes()
        try:
            img = mmcv.imfrombytes(data, flag='color', channel_order='bgr') if data else None
        except cv2.error:  # e.g. a header OpenCV recognises with no data behind it
            img = None
        if img is None:
            raise ValueError(f'image {str(path)!r} could not be decoded; expected a file that '
                             'OpenCV reads (jpg, png, bmp, tiff, webp, ...)')
        return img
    if not isinstance(image, np.ndarray):
        raise TypeError(f'`image` must be a path or an HxWx3 uint8 BGR numpy array, '
                        f'got {type(image).__name__}')
    if image.dtype != np.uint8:
        raise ValueError(f'`image` must be an 8-bit (uint8) BGR array, got dtype {image.dtype}; '
                         'for 16-bit data use (img >> 8).astype(np.uint8)')
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    if image.ndim == 2:
        image = cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
    elif image.ndim == 3 and image.shape[2] == 4:
        image = cv2.cvtColor(image, cv2.COLOR_BGRA2BGR)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f'`image` must be HxWx3 (BGR), HxW (gray) or HxWx4 (BGRA), '
                         f'got shape {image.shape}')
    if image.shape[0] < 1 or image.shape[1] < 1:
        raise ValueError(f'`image` is empty: shape {image.shape}')
    return np.ascontiguousarray(image)
