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
