"""Cheap looks at a data set before training: original image sizes and colour modes.

Sizes come from file headers (:func:`pneumo_utils.data.images.read_header`: Pillow reads only
the header, DICOM is read without pixel data), so a few thousand files take a second or two.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from pneumo_utils import CLASS_NAMES
from pneumo_utils.data.images import read_header


def image_size_table(paths: Sequence[str], labels: Sequence[int] | None = None) -> pd.DataFrame:
    """One row per file: ``path``, ``width``, ``height``, ``mode``, ``aspect`` (w / h), and
    ``class`` when ``labels`` are given. Sizes are as stored (before any EXIF rotation);
    DICOM files report ``mode`` as their photometric interpretation (e.g. ``MONOCHROME2``).
    Unreadable files get NaN sizes and mode ``"error"``.

    The input of :func:`pneumo_utils.explain.plots.image_size_histogram` and :func:`size_summary`.
    """
    rows = []
    for path in paths:
        try:
            header = read_header(path)
            width, height, mode = header.width, header.height, header.mode
        except (OSError, ValueError):
            width, height, mode = np.nan, np.nan, "error"
        rows.append((str(path), width, height, mode))
    table = pd.DataFrame(rows, columns=["path", "width", "height", "mode"])
    table["aspect"] = table["width"] / table["height"]
    if labels is not None:
        table["class"] = [CLASS_NAMES[int(y)] for y in labels]
    return table


def size_summary(sizes: pd.DataFrame) -> pd.DataFrame:
    """Count, min, median and max of width, height and aspect ratio (per class if known),
    plus the number of distinct colour modes, for a compact table in a notebook."""
    group = sizes.groupby("class") if "class" in sizes else sizes.assign(_all="all").groupby("_all")
    stats = group[["width", "height", "aspect"]].agg(["min", "median", "max"]).round(2)
    stats.insert(0, ("images", "count"), group.size())
    stats[("mode", "values")] = group["mode"].agg(lambda m: ", ".join(sorted(set(m))))
    stats.index.name = None
    return stats
