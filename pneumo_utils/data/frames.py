"""An image's outer frame, and frames taken from images of another class.

On the Kermany training images the outer frame (dark borders, true-black backgrounds) alone
tells the classes apart. Two places swap it: the shortcut check
(:mod:`pneumo_utils.evaluation.shortcuts`, NumPy, on loaded validation images) and the
frame-swapped training views of the feature cache (:mod:`pneumo_utils.model.features`,
TensorFlow, inside a tf.data pipeline that never holds all images at once). Both call
:func:`swap_frame`, whose arithmetic works on NumPy arrays and TensorFlow tensors alike, so
the two see the same pixels.
"""

from __future__ import annotations

import numpy as np


def other_class_references(
    labels: np.ndarray, reference_labels: np.ndarray, seed: int = 0
) -> np.ndarray:
    """For each label, the index of a random reference of the *other* class, ``(n,)`` int."""
    labels, reference_labels = np.asarray(labels), np.asarray(reference_labels)
    rng = np.random.default_rng(seed)
    out = np.empty(len(labels), dtype=int)
    for value in np.unique(labels):
        pool = np.flatnonzero(reference_labels != value)
        if pool.size == 0:
            raise ValueError(f"no reference image of a class other than {value}")
        rows = np.flatnonzero(labels == value)
        out[rows] = rng.choice(pool, size=rows.size)
    return out


def frame_mask(height: int, width: int, border: float) -> np.ndarray:
    """``(height, width, 1)`` float32: 1 on the centre, 0 on the outer frame (``border`` of
    each side, rounded to whole pixels)."""
    edge_h, edge_w = round(height * border), round(width * border)
    mask = np.zeros((height, width, 1), dtype=np.float32)
    mask[edge_h: height - edge_h, edge_w: width - edge_w] = 1.0
    return mask


def swap_frame(images, frames, border: float):
    """``images`` (``(..., h, w, 3)``, a NumPy array or a TensorFlow tensor with static ``h``
    and ``w``) with their outer frame (``border`` of each side) taken from ``frames`` (same
    shape). The mask is exactly 0 or 1, so centre and frame pixels are copied unchanged."""
    mask = frame_mask(int(images.shape[-3]), int(images.shape[-2]), border)
    return images * mask + frames * (1.0 - mask)
