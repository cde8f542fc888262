"""A notebook's set-up in one call: its data found, its folders resolved, the seed set and the
``tf.distribute`` strategy chosen, each said in a line (:func:`setup`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pneumo_utils.data import fetch, pipelines
from pneumo_utils.scale import distribute


@dataclass(frozen=True)
class Session:
    """What a notebook's set-up resolved.

    ``data_dir`` and ``external_dir`` are ``None`` when not asked for (or, for the external
    validation set, not found); folders are absolute; ``batch_size`` is the global batch, images
    per step over all replicas of ``strategy``.
    """

    data_dir: Path | None
    external_dir: Path | None
    reports_dir: Path
    models_dir: Path
    cache_dir: Path
    strategy: Any
    batch_size: int


def setup(*, data: str | None, data_dir: str | Path | None = None, external: bool = False,
          external_dir: str | Path | None = None, reports_dir: str | Path = "reports",
          models_dir: str | Path = "saved_models", cache_dir: str | Path = ".cache/pneumo",
          seed: int = 42, strategy: str = "auto", batch_size: int = 32) -> Session:
    """Find data set ``data`` (``"kermany"``, ``"nih"``; ``None``: find none, the notebook reads
    its data another way) at ``data_dir`` or by :func:`fetch.find`'s search list, and the
    labelled external validation set when ``external`` (absent is fine); resolve the output
    folders from the project folder (:func:`fetch.in_project`); seed Python, NumPy and
    TensorFlow; choose the ``tf.distribute`` strategy by name. ``batch_size`` is per replica;
    the session's is per step.

    Prints the data found (when ``data`` or ``external``) and the strategy, one line each.
    """
    found = fetch.find(data, data_dir) if data is not None else None
    other = fetch.find("external", external_dir, required=False) if external else None
    reports, models, cache = (fetch.in_project(p) for p in (reports_dir, models_dir, cache_dir))
    if data is not None or external:
        print(f"data: {found}" + (f"; external validation: {other or 'none found'}" if external else ""))
    pipelines.set_seed(seed)
    chosen = distribute.strategy(strategy)  # the default strategy (one device) on a plain CPU machine
    print(distribute.describe(chosen))
    return Session(data_dir=found, external_dir=other, reports_dir=reports, models_dir=models, cache_dir=cache,
                   strategy=chosen, batch_size=distribute.global_batch_size(batch_size, chosen))
