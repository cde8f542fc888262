"""Training with ``model.fit`` and Keras callbacks.

The notebooks write their ``model.compile`` and ``model.fit`` calls out in the open; this
module holds what is not worth repeating there: a one-line-per-epoch progress callback, so a
run stays quiet (``verbose=0``) and still shows where it is, and the same compile/fit recipe
as functions for code that trains without a notebook (benchmarks, tests): Adam, binary
cross-entropy, ROC AUC as the monitored metric, early stopping that restores the best epoch,
and a learning rate reduced on plateaus.
"""

from __future__ import annotations

import time

import keras
import numpy as np

from pneumo_utils.model.backbones import head_on_features


class EpochLine(keras.callbacks.Callback):
    """Print one line per epoch: epoch, seconds, loss and AUC (train and validation), learning rate.

    For ``model.fit(..., verbose=0)``: a long run shows progress in the notebook and in the
    terminal running papermill, without Keras' per-batch progress bars in the report.
    """

    def __init__(self, keys: tuple[str, ...] = ("loss", "auc", "val_loss", "val_auc")):
        super().__init__()
        self.keys = keys
        self._start = 0.0

    def on_epoch_begin(self, epoch, logs=None):
        self._start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        total = self.params.get("epochs") if self.params else None
        parts = [f"epoch {epoch + 1}" + (f"/{total}" if total else ""),
                 f"{time.perf_counter() - self._start:.0f} s"]
        parts += [f"{key} {logs[key]:.4f}" for key in self.keys if key in logs]
        learning_rate = self.model.optimizer.learning_rate if self.model.optimizer else None
        if learning_rate is not None:
            parts.append(f"lr {float(keras.ops.convert_to_numpy(learning_rate)):.1e}")
        print("  ".join(parts), flush=True)


def compile_binary(
    model: keras.Model, learning_rate: float = 1e-3, label_smoothing: float = 0.0
) -> keras.Model:
    """Adam and binary cross-entropy, tracking ROC AUC, accuracy, precision and recall.

    ``label_smoothing`` (e.g. 0.1) trains towards 0.05/0.95 instead of 0/1 targets.
    """
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate),
        loss=keras.losses.BinaryCrossentropy(label_smoothing=label_smoothing),
        metrics=[
            keras.metrics.AUC(name="auc"),
            keras.metrics.BinaryAccuracy(name="accuracy"),
            keras.metrics.Precision(name="precision"),
            keras.metrics.Recall(name="recall"),
        ],
    )
    return model


def standard_callbacks(
    patience: int = 5, monitor: str = "val_auc", lr_patience: int = 2
) -> list[keras.callbacks.Callback]:
    """EarlyStopping (best weights restored) and ReduceLROnPlateau (x0.3, down to 1e-6).

    Validation ROC AUC rather than loss is monitored: it is what the reports lead with, and
    class weights do not distort it.
    """
    return [
        keras.callbacks.EarlyStopping(
            monitor=monitor, mode="max", patience=patience, restore_best_weights=True
        ),
        keras.callbacks.ReduceLROnPlateau(
            monitor=monitor, mode="max", factor=0.3, patience=lr_patience, min_lr=1e-6
        ),
    ]


def fit(
    model: keras.Model,
    train_data,
    val_data,
    epochs: int = 10,
    class_weight: dict[int, float] | None = None,
    patience: int = 5,
    verbose: int = 0,
    callbacks: list[keras.callbacks.Callback] | None = None,
    **fit_kwargs,
) -> dict[str, list[float]]:
    """``model.fit`` with :func:`standard_callbacks`; returns the history as a plain dict.

    ``train_data``/``val_data`` are tf.data datasets or ``(x, y)`` tuples of arrays; the
    model must be compiled (:func:`compile_binary`). ``callbacks`` run after the standard
    ones (a timer, :class:`EpochLine`). The history maps each metric to one value per epoch.
    """
    if isinstance(train_data, tuple):
        fit_kwargs.update(x=train_data[0], y=train_data[1])
    else:
        fit_kwargs.update(x=train_data, shuffle=False)  # tf.data pipelines shuffle themselves
    history = model.fit(
        validation_data=val_data,
        epochs=epochs,
        class_weight=class_weight,
        callbacks=[*standard_callbacks(patience), *(callbacks or [])],
        verbose=verbose,
        **fit_kwargs,
    )
    return {key: [float(v) for v in values] for key, values in history.history.items()}


def fit_head_on_features(
    model: keras.Model,
    train_features: np.ndarray,
    train_labels: np.ndarray,
    val_features: np.ndarray,
    val_labels: np.ndarray,
    epochs: int = 30,
    class_weight: dict[int, float] | None = None,
    learning_rate: float = 1e-3,
    batch_size: int = 32,
    patience: int = 5,
    seed: int | None = None,
    verbose: int = 0,
    callbacks: list[keras.callbacks.Callback] | None = None,
    label_smoothing: float = 0.0,
) -> dict[str, list[float]]:
    """Train ``model``'s head in place on cached pooled features ``(n, channels)``.

    The head, loss, class weights, callbacks and optimiser are those of training over images
    with a frozen base; only the backbone's forward pass is skipped
    (:func:`pneumo_utils.model.backbones.head_on_features` shares the head's layers). Afterwards
    ``model`` (base and trained head) predicts as a model trained over images would.
    ``seed``, when given, seeds Keras (head initialisation aside: it exists already) so the
    shuffling of the feature rows is reproducible.
    """
    if seed is not None:
        keras.utils.set_random_seed(seed)
    head = compile_binary(head_on_features(model), learning_rate, label_smoothing)
    return fit(
        head,
        (np.asarray(train_features), np.asarray(train_labels, dtype=np.float32)),
        (np.asarray(val_features), np.asarray(val_labels, dtype=np.float32)),
        epochs=epochs,
        class_weight=class_weight,
        patience=patience,
        batch_size=batch_size,
        shuffle=True,
        verbose=verbose,
        callbacks=callbacks,
    )
