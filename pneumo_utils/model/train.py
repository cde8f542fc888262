"""The notebooks' compile/fit recipe as functions, for code that trains without a notebook
(benchmarks, the distributed test worker).

The notebooks write their ``model.compile`` and ``model.fit`` calls out in the open (with
``verbose=2``: one summary line per epoch, no progress bar in the reports); this is the same
recipe: Adam, binary cross-entropy, ROC AUC as the monitored metric, early stopping that
restores the best epoch, and a learning rate reduced on plateaus.
"""

from __future__ import annotations

import keras
import numpy as np

from pneumo_utils.model.backbones import head_on_features


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
    """Train ``model``'s head in place on cached pooled features ``(n, channels)``; returns the
    history, each metric with one value per epoch.

    The head, loss, class weights and optimiser are those of training over images with a
    frozen base; only the backbone's forward pass is skipped
    (:func:`pneumo_utils.model.backbones.head_on_features` shares the head's layers). Early
    stopping on validation ROC AUC (``patience`` epochs; the best epoch's weights restored)
    and a learning rate cut to 0.3x after 2 epochs without gain (down to 1e-6) run before
    ``callbacks``. Afterwards ``model`` (base and trained head) predicts as a model trained
    over images would. ``seed``, when given, seeds Keras (head initialisation aside: it
    exists already) so the shuffling of the feature rows is reproducible.
    """
    if seed is not None:
        keras.utils.set_random_seed(seed)
    head = compile_binary(head_on_features(model), learning_rate, label_smoothing)
    history = head.fit(
        np.asarray(train_features), np.asarray(train_labels, dtype=np.float32),
        validation_data=(np.asarray(val_features), np.asarray(val_labels, dtype=np.float32)),
        epochs=epochs,
        batch_size=batch_size,
        class_weight=class_weight,
        shuffle=True,
        verbose=verbose,
        callbacks=[
            keras.callbacks.EarlyStopping(monitor="val_auc", mode="max", patience=patience,
                                          restore_best_weights=True),
            keras.callbacks.ReduceLROnPlateau(monitor="val_auc", mode="max", factor=0.3, patience=2,
                                              min_lr=1e-6),
            *(callbacks or []),
        ],
    )
    return {key: [float(v) for v in values] for key, values in history.history.items()}
