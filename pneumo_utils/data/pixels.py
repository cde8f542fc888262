"""What every image decoder shares: the error naming a file, the pixel limits, and the
conversions of decoded values to uint8.

Kept apart from :mod:`pneumo_utils.data.images` so that the DICOM reader
(:mod:`pneumo_utils.data.dicom`), which :mod:`~pneumo_utils.data.images` calls, uses them too.
"""

from __future__ import annotations

import os

import numpy as np

MAX_PIXELS = 20_000 * 20_000
"""Largest image (width * height) opened at all: Pillow's decompression-bomb limit
(~89 Mpx, error above ~179 Mpx) is raised to this because big JPEGs are decoded at 1/8
scale. Above it, or above :data:`PIXEL_BUDGET` where no reduced decode exists, the file is
refused."""

PIXEL_BUDGET = 6_000 * 6_000
"""Most pixels decoded for one image (after the JPEG draft reduction): 36 Mpx, about
150 MB in Pillow's 4-bytes-per-pixel RGB. Chest radiographs are below 20 Mpx."""


class ImageReadError(ValueError):
    """An image file exists but cannot be decoded (corrupt, truncated, empty, not an image).

    ``str(err)`` is ``"cannot read <path>: <reason>"``; ``err.path`` and ``err.reason`` hold
    the parts separately.
    """

    def __init__(self, path: str | os.PathLike, reason: str) -> None:
        # Both parts go to super() so that the exception survives pickling
        # (multiprocessing workers, tf.data py_function).
        super().__init__(str(path), reason)
        self.path = str(path)
        self.reason = reason

    def __str__(self) -> str:
        return f"cannot read {self.path}: {self.reason}"


def minmax_to_uint8(arr: np.ndarray, lo: float | None = None, hi: float | None = None):
    """Map ``[lo, hi]`` (default: the array's finite min/max) linearly onto 0..255."""
    a = np.nan_to_num(arr.astype(np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    lo = float(a.min()) if lo is None else lo
    hi = float(a.max()) if hi is None else hi
    if hi <= lo:
        return np.zeros(a.shape, np.uint8)
    a -= lo
    a *= 255.0 / (hi - lo)
    return np.clip(np.rint(a), 0, 255).astype(np.uint8)



def block_mean(arr: np.ndarray, k: int) -> np.ndarray:
    """Mean of each ``k x k`` block (partial blocks at the edges too), rounded back to the
    array's own dtype so that the DICOM LUTs see the same kind of values; ``k < 2`` returns
    ``arr``. Rows are summed first, so the float64 intermediate is ``1/k`` of the image."""
    if k < 2:
        return arr
    row_starts, col_starts = np.arange(0, arr.shape[0], k), np.arange(0, arr.shape[1], k)
    sums = np.add.reduceat(np.add.reduceat(arr, row_starts, axis=0, dtype=np.float64),
                           col_starts, axis=1)
    rows = np.minimum(k, arr.shape[0] - row_starts)
    cols = np.minimum(k, arr.shape[1] - col_starts)
    means = sums / (rows[:, None] * cols[None, :])
    if np.issubdtype(arr.dtype, np.integer):
        return np.rint(means).astype(arr.dtype)
    return means.astype(arr.dtype)

