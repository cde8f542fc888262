"""Probabilities and their temperature: the sigmoid, logit and softmax maths that metrics,
calibration and prediction share (``scipy.special``, imported when called so that a command
reads calibrated probabilities without loading scikit-learn)."""

from __future__ import annotations

import numpy as np


def apply_temperature(proba: np.ndarray, temperature: float) -> np.ndarray:
    """Rescale probabilities with a temperature from
    :func:`pneumo_utils.evaluation.metrics.fit_temperature`: ``sigmoid(logit(p) / T)``, with
    ``scipy.special`` (imported when called, so that prediction reads calibrated
    probabilities without loading scikit-learn)."""
    return sigmoid(logit(np.asarray(proba, dtype=float)) / temperature)


def apply_softmax_temperature(proba: np.ndarray, temperature: float) -> np.ndarray:
    """Rescale softmax probabilities ``(n, K)`` with a temperature from
    :func:`pneumo_utils.evaluation.metrics.fit_softmax_temperature`: ``softmax(log(p) / T)``.

    ``log(p)`` differs from the model's logits by a constant per row, which softmax ignores,
    so this equals dividing the logits by ``T``; the most probable class never changes."""
    proba = np.clip(np.asarray(proba, dtype=float), 1e-12, 1.0)
    return softmax(np.log(proba) / temperature)


def softmax(z: np.ndarray) -> np.ndarray:
    """``scipy.special.softmax`` along the last axis (one distribution per row)."""
    from scipy.special import softmax as scipy_softmax

    return scipy_softmax(np.asarray(z, dtype=float), axis=-1)


def logit(p: np.ndarray) -> np.ndarray:
    """``scipy.special.logit`` of ``p`` clipped to ``[1e-7, 1 - 1e-7]``: a float32 sigmoid
    reaches exactly 0 and 1, whose logits would be infinite."""
    from scipy.special import logit as scipy_logit

    return scipy_logit(np.clip(p, 1e-7, 1 - 1e-7))


def sigmoid(z: np.ndarray) -> np.ndarray:
    """``scipy.special.expit``: ``1 / (1 + exp(-z))`` without overflow warnings."""
    from scipy.special import expit

    return expit(z)
