"""The questions a Kermany model answers, and the labels each one reads from the index.

Kermany et al. (2018) report two tasks on their paediatric chest X-rays: pneumonia vs normal,
and bacterial vs viral pneumonia. The subtype is in every PNEUMONIA file name
(``person1_bacteria_1.jpeg``, ``person3_virus_7.jpeg``); :func:`pneumo_utils.data.kermany.load_kermany`
records it in the index's ``subtype`` column (``normal``, ``bacteria``, ``virus``, or missing
when a PNEUMONIA file name carries neither). A task turns that index into labels:

=======================  ===========================================  ==========================
task                     classes (label order)                        images used
=======================  ===========================================  ==========================
``pneumonia``            NORMAL, PNEUMONIA                            all
``bacterial_vs_viral``   BACTERIAL PNEUMONIA, VIRAL PNEUMONIA         PNEUMONIA images only
``three_class``          NORMAL, BACTERIAL PNEUMONIA, VIRAL PNEUMONIA all
=======================  ===========================================  ==========================

Binary tasks end in one sigmoid unit, the probability of the second class, and decide with a
threshold chosen on validation; ``three_class`` ends in a three-unit softmax and decides by
the most probable class (argmax), with no threshold.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from pneumo_utils import TASK_CLASS_NAMES
from pneumo_utils.data.datasets import DatasetLayoutError

DEFAULT_TASK = "pneumonia"


@dataclass(frozen=True)
class Task:
    """One classification task on the Kermany index.

    ``subtypes`` gives, per label in order, the ``subtype`` values that make that class;
    ``None`` means the task reads the folder label (``label`` column) and needs no subtype.
    """

    name: str
    class_names: tuple[str, ...]
    subtypes: tuple[tuple[str, ...], ...] | None
    description: str

    @property
    def n_classes(self) -> int:
        """Number of classes (2 or 3)."""
        return len(self.class_names)

    @property
    def binary(self) -> bool:
        """True for a two-class task (one sigmoid output and a threshold)."""
        return self.n_classes == 2

    @property
    def positive_class(self) -> str | None:
        """The class a binary model's output is the probability of (``None`` for three classes)."""
        return self.class_names[1] if self.binary else None

    @property
    def output_units(self) -> int:
        """Units of the model's last layer: 1 (sigmoid) for binary tasks, else one per class."""
        return 1 if self.binary else self.n_classes

    @property
    def activation(self) -> str:
        """Activation of the model's last layer: ``sigmoid`` or ``softmax``."""
        return "sigmoid" if self.binary else "softmax"

    @property
    def decision(self) -> str:
        """How a prediction becomes a class: a validation-chosen threshold, or argmax."""
        return "threshold" if self.binary else "argmax"


TASKS: dict[str, Task] = {
    t.name: t
    for t in (
        Task("pneumonia", TASK_CLASS_NAMES["pneumonia"], None, "pneumonia vs normal"),
        Task(
            "bacterial_vs_viral",
            TASK_CLASS_NAMES["bacterial_vs_viral"],
            (("bacteria",), ("virus",)),
            "bacterial vs viral pneumonia (PNEUMONIA images only)",
        ),
        Task(
            "three_class",
            TASK_CLASS_NAMES["three_class"],
            (("normal",), ("bacteria",), ("virus",)),
            "normal vs bacterial vs viral pneumonia",
        ),
    )
}


def get_task(name: str | Task) -> Task:
    """The :class:`Task` called ``name`` (a :class:`Task` is returned as is)."""
    if isinstance(name, Task):
        return name
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose one of {list(TASKS)}")
    return TASKS[name]


def task_of(meta: dict) -> Task:
    """The task a saved model was trained for, from its sidecar (``pneumonia`` when the
    sidecar names none, as models saved before tasks existed are binary pneumonia models)."""
    return get_task(meta.get("task") or DEFAULT_TASK)


def task_index(index: pd.DataFrame, task: str | Task = DEFAULT_TASK) -> pd.DataFrame:
    """The rows of a Kermany index that ``task`` uses, with ``label`` set to the task's class.

    ``pneumonia`` returns the index unchanged. The subtype tasks keep the rows whose
    ``subtype`` belongs to one of their classes (``bacterial_vs_viral`` drops NORMAL images)
    and number the classes in :attr:`Task.class_names` order; the folder label stays in
    ``pneumonia_label``. The split is not touched: call this before
    :func:`pneumo_utils.data.splits.grouped_split`, so that the split is stratified by the task's
    classes.

    Raises :class:`~pneumo_utils.data.datasets.DatasetLayoutError` naming the files when a
    PNEUMONIA image has no subtype in its name (the task cannot label it), or when the index
    has no ``subtype`` column (it did not come from a Kermany-layout folder).
    """
    task = get_task(task)
    if task.subtypes is None:
        return index
    if "subtype" not in index.columns:
        raise DatasetLayoutError(
            f"task {task.name!r} needs the subtype of each image, read from Kermany file names "
            "(personN_bacteria_K.jpeg, personN_virus_K.jpeg); this index has no subtype column. "
            "Load the folder with pneumo_utils.data.kermany.load_kermany or load_class_folder."
        )
    unknown = index[index["subtype"].isna()]
    if len(unknown):
        listing = ", ".join(unknown["path"].head(5))
        raise DatasetLayoutError(
            f"task {task.name!r} needs bacteria or virus in every PNEUMONIA file name "
            f"(personN_bacteria_K.jpeg or personN_virus_K.jpeg); {len(unknown)} file(s) have "
            f"neither: {listing}{', ...' if len(unknown) > 5 else ''}. Rename them, move them "
            "out, or use task 'pneumonia'."
        )
    codes = {subtype: label for label, group in enumerate(task.subtypes) for subtype in group}
    out = index[index["subtype"].isin(codes)].copy()
    if out.empty:
        raise DatasetLayoutError(f"the index has no images for task {task.name!r}")
    out["pneumonia_label"] = out["label"]
    out["label"] = out["subtype"].map(codes).astype(np.int64)
    return out.reset_index(drop=True)



def predicted_labels(proba: np.ndarray, threshold: float | None = 0.5) -> np.ndarray:
    """Class decisions ``(n,)`` int from model outputs.

    ``proba`` of shape ``(n,)`` or ``(n, 1)`` holds a binary model's probability of class 1,
    decided at ``threshold``; ``(n, K)`` with ``K >= 2`` holds one probability per class,
    decided by argmax (``threshold`` is not used).
    """
    proba = np.asarray(proba, dtype=float)
    if proba.ndim == 2 and proba.shape[1] > 1:
        return proba.argmax(axis=1).astype(np.int64)
    if threshold is None:
        raise ValueError("a binary model's outputs need a threshold to become decisions")
    return (proba.reshape(-1) >= threshold).astype(np.int64)
