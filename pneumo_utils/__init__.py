"""pneumo_utils: the helper package shared by the pneumo notebooks.

Research and teaching use only; the models trained with it are not medical devices and
must not be used for diagnosis.
"""

import os

# Quiet TensorFlow's C++ start-up chatter in notebooks and reports unless the user chose a level.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

__version__ = "0.1.0"

CLASS_NAMES: tuple[str, str] = ("NORMAL", "PNEUMONIA")
"""Class names in label order: label 0 is NORMAL, label 1 is PNEUMONIA."""

TASK_CLASS_NAMES: dict[str, tuple[str, ...]] = {
    "pneumonia": CLASS_NAMES,
    "bacterial_vs_viral": ("BACTERIAL PNEUMONIA", "VIRAL PNEUMONIA"),
    "three_class": ("NORMAL", "BACTERIAL PNEUMONIA", "VIRAL PNEUMONIA"),
}
"""Class names (label order) of each Kermany task, the one place they are written:
:mod:`pneumo_utils.data.tasks` builds its tasks from them, and :mod:`pneumo_utils.sidecar` reads them to
check a sidecar without importing pandas or the data set loaders."""
