"""Synthetic images for tests and benchmarks: coloured rectangles on noise, from a seed."""
import numpy as np


def synthetic_image(h: int = 96, w: int = 160, seed: int = 0) -> np.ndarray:
    """A BGR uint8 image with a few coloured rectangles on noise."""
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 60, (h, w, 3), dtype=np.uint8)
    for _ in range(3):
        x0, y0 = int(rng.integers(0, max(w - 20, 1))), int(rng.integers(0, max(h - 20, 1)))
        x1, y1 = x0 + int(rng.integers(10, 40)), y0 + int(rng.integers(10, 40))
        img[y0:y1, x0:x1] = rng.integers(100, 255, 3, dtype=np.uint8)
    return img


def squares_image(h: int, w: int, seed: int) -> np.ndarray:
    """A BGR uint8 image with three coloured 30 px squares on noise (``h`` and ``w`` above
    30), the images the CLI tests write."""
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 60, (h, w, 3), dtype=np.uint8)
    for _ in range(3):
        x0, y0 = int(rng.integers(0, w - 30)), int(rng.integers(0, h - 30))
        img[y0:y0 + 30, x0:x0 + 30] = rng.integers(100, 255, 3, dtype=np.uint8)
    return img
