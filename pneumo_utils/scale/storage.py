"""One reader for the NIH images, wherever they are stored: a folder of PNGs with its label
table, or TFRecord shards written from one (:func:`open_nih`).

A notebook asks the source once for what it needs (the index with its patient split, a few
images as arrays, the backbone features of each split) and never branches on the storage, as
timm's reader factory hands a training loop one reader whatever the files are.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from pneumo_utils import CLASS_NAMES
from pneumo_utils.data import fetch, nih, pipelines, splits
from pneumo_utils.model import features
from pneumo_utils.scale import shard_manifest, shard_reader, shard_writer


@dataclass
class ImageSource:
    """The NIH images of one finding, from a folder (``shards_dir`` is ``None``) or from
    shards. ``table`` names where the labels come from; ``table_format`` is ``"nih"`` (the
    NIH table: class names NO FINDING / the finding) or ``"simple"`` (a ``path,label`` CSV:
    NORMAL / PNEUMONIA); ``data_dir`` is the image folder (``None`` for complete shards read
    alone: the label-table summaries need it)."""

    finding: str
    data_dir: Path | None
    shards_dir: Path | None
    table: str
    table_format: str
    split_rule: dict = field(default_factory=dict)
    steps: pd.DataFrame | None = None
    missing_images: int | None = None

    @property
    def class_names(self) -> tuple[str, str]:
        """Label 0 and label 1, in order."""
        if self.table_format == "nih":
            return ("NO FINDING", self.finding.upper())
        return tuple(CLASS_NAMES)

    @property
    def balanced(self) -> bool:
        """Whether the negatives were downsampled to the positives (always for a folder)."""
        return self.shards_dir is None or bool(self.split_rule.get("balance"))

    def index(self, *, test_fraction: float, val_fraction: float, seed: int) -> pd.DataFrame:
        """One row per image (``path``, ``label``, ``patient``, ``split``; ``row`` for shards),
        split by patient: made here for a folder, read as written for shards (the same rule,
        made once). The fractions and seed apply to a folder only. Sets ``steps`` (the
        loader's steps, table rows to images, for a folder), ``missing_images`` (table rows
        without an image file; ``None`` for shards, whose writer reported them) and
        ``split_rule``."""
        if self.shards_dir is None:
            index = nih.load_nih(self.data_dir, finding=self.finding, balance=True, seed=seed)
            self.steps = nih.load_steps(index)
            self.missing_images = int(index.attrs["load_summary"].get("dropped: image not on disk", 0))
            self.split_rule = {"test_fraction": test_fraction, "val_fraction": val_fraction, "seed": seed,
                               "balance": True}
            return splits.patient_split(index, test_fraction=test_fraction, val_fraction=val_fraction,
                                        seed=seed)
        index, self.split_rule = shard_reader.read_split_index(self.shards_dir, finding=self.finding)
        return index

    def images(self, rows: pd.DataFrame, image_size: int) -> np.ndarray:
        """The images of some index rows, ``(n, image_size, image_size, 3)`` float32 in 0-255."""
        if self.shards_dir is not None:
            return shard_reader.read_images(self.shards_dir, rows["row"], image_size=image_size)[0]
        return pipelines.load_images(rows["path"].tolist(), image_size)

    def split_features(self, model, index: pd.DataFrame, strategy, batch_size: int,
                       cache_dir: str | Path) -> dict[str, np.ndarray]:
        """Pooled backbone features of each split's rows of ``index``, in index order,
        ``{split: (n, channels) float32}``, cached under ``cache_dir`` by content.
        ``batch_size`` is the global batch; shards are read by every replica of
        ``strategy``."""
        if self.shards_dir is None:
            paths, _ = splits.split_files(index)
            return features.extract_split_features(model, paths, batch_size=batch_size, cache_dir=cache_dir)
        return {
            split: shard_reader.extract_features_from_shards(
                model, self.shards_dir, split, strategy,
                batch_size=batch_size // strategy.num_replicas_in_sync, cache_dir=cache_dir,
            ).of_rows(index.loc[index["split"] == split, "row"]).outputs
            for split in ("train", "val", "test")
        }


def open_nih(*, data_dir: str | Path | None, shards_dir: str | Path | None, finding: str,
             image_size: int, test_fraction: float, val_fraction: float, seed: int) -> ImageSource:
    """The NIH images for ``finding``: the folder ``data_dir`` (found by :func:`fetch.find`
    when ``None``), or the shards in ``shards_dir`` (relative to the project folder).

    Shards not yet complete there are written first from the folder, with this finding,
    ``image_size`` and the patient split by ``test_fraction``/``val_fraction``/``seed`` (a
    rerun after an interruption resumes); complete shards are read alone, and a ``data_dir``
    given must be the folder they were written from (:func:`shard_manifest.check_source`).
    """
    if shards_dir is None:
        folder = fetch.find("nih", data_dir)
        table = nih.find_labels_csv(folder)
        _, table_format = nih.read_labels_table(table)
        return ImageSource(finding, folder, None, str(table), table_format)
    shards_dir, folder = fetch.in_project(shards_dir), None
    if not shard_manifest.is_complete(shards_dir):
        folder = fetch.find("nih", data_dir)
        source_index, split_rule = shard_writer.load_index(
            folder, kind="nih", finding=finding, balance=True, val_fraction=val_fraction,
            test_fraction=test_fraction, seed=seed,
        )
        shard_writer.write_shards(source_index, shards_dir, data_root=folder, image_size=image_size,
                                  split_rule=split_rule)
    else:
        shard_manifest.check_source(shards_dir, data_dir)
    manifest = shard_manifest.read_manifest(shards_dir)
    table_format = "nih" if manifest["source"] == ["nih"] else "simple"
    return ImageSource(finding, folder, Path(shards_dir),
                       f"{shards_dir} (TFRecord shards of {manifest['data_root']})", table_format)
