"""Training helpers: compile, fit with the standard callbacks, head-on-features, fine-tuning.

All of them return a plain ``dict`` history (metric name -> list per epoch) that is also
saved as JSON, so curves can be redrawn without re-training.
"""

from __future__ import annotations

from pathlib import Path

import keras
import numpy as np

from pneumo_utils.data import class_weights, image_dataset
from pneumo_utils.features import DEFAULT_CACHE_DIR, extract_split_features
from pneumo_utils.models import head_on_features, predict_paths, unfreeze_top, write_json_atomic


def compile_binary(
    model: keras.Model, learning_rate: float = 1e-3, label_smoothing: float = 0.0
) -> keras.Model:
    """Adam + binary cross-entropy, tracking ROC AUC, accuracy, precision and recall."""
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
    patience: int = 3,
    checkpoint_path: str | Path | None = None,
    monitor: str = "val_auc",
    lr_patience: int = 2,
) -> list[keras.callbacks.Callback]:
    """EarlyStopping (best weights restored), ReduceLROnPlateau, optional ModelCheckpoint.

    Monitoring validation ROC AUC rather than loss matches what we report and is not thrown
    off by class weights. The checkpoint keeps the best model so far should a long run be
    interrupted; the final model is saved separately, atomically, with its sidecar.
    """
    callbacks = [
        keras.callbacks.EarlyStopping(
            monitor=monitor, mode="max", patience=patience, restore_best_weights=True
        ),
        keras.callbacks.ReduceLROnPlateau(
            monitor=monitor, mode="max", factor=0.3, patience=lr_patience, min_lr=1e-6
        ),
    ]
    if checkpoint_path is not None:
        Path(checkpoint_path).parent.mkdir(parents=True, exist_ok=True)
        callbacks.append(
            keras.callbacks.ModelCheckpoint(
                str(checkpoint_path), monitor=monitor, mode="max", save_best_only=True
            )
        )
    return callbacks


def fit(
    model: keras.Model,
    train_data,
    val_data,
    epochs: int = 10,
    class_weight: dict[int, float] | None = None,
    patience: int = 3,
    checkpoint_path: str | Path | None = None,
    history_path: str | Path | None = None,
    initial_epoch: int = 0,
    verbose: int = 2,
    callbacks: list[keras.callbacks.Callback] | None = None,
    **fit_kwargs,
) -> dict[str, list[float]]:
    """``model.fit`` with :func:`standard_callbacks`; returns (and optionally saves) the history.

    ``train_data``/``val_data`` are tf.data datasets or ``(x, y)`` tuples of arrays. The
    model must be compiled (:func:`compile_binary`). ``callbacks`` are added after the
    standard ones (e.g. a timer in ``pneumo_utils.bench``).
    """
    if isinstance(train_data, tuple):
        fit_kwargs.update(x=train_data[0], y=train_data[1])
    else:
        fit_kwargs.update(x=train_data, shuffle=False)  # tf.data pipelines shuffle themselves
    history = model.fit(
        validation_data=val_data,
        epochs=initial_epoch + epochs,
        initial_epoch=initial_epoch,
        class_weight=class_weight,
        callbacks=[*standard_callbacks(patience, checkpoint_path), *(callbacks or [])],
        verbose=verbose,
        **fit_kwargs,
    )
    record = {k: [float(v) for v in values] for k, values in history.history.items()}
    record["epoch"] = [int(e) for e in history.epoch]
    if history_path is not None:
        write_json_atomic(history_path, record)
    return record


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
    history_path: str | Path | None = None,
    seed: int = 0,
    verbose: int = 2,
    callbacks: list[keras.callbacks.Callback] | None = None,
    label_smoothing: float = 0.0,
) -> dict[str, list[float]]:
    """Train ``model``'s head on cached pooled features ``(n, channels)``, in place.

    The same head, loss, class weights, callbacks and optimiser as training over images
    with a frozen base; only the backbone forward pass is skipped. Afterwards ``model``
    (base + trained head) predicts exactly as a model trained over images would.
    ``label_smoothing`` (e.g. 0.1) trains towards 0.05/0.95 instead of 0/1 targets.
    """
    head = compile_binary(head_on_features(model), learning_rate, label_smoothing)
    return fit(
        head,
        (np.asarray(train_features), np.asarray(train_labels, dtype=np.float32)),
        (np.asarray(val_features), np.asarray(val_labels, dtype=np.float32)),
        epochs=epochs,
        class_weight=class_weight,
        patience=patience,
        history_path=history_path,
        batch_size=batch_size,
        shuffle=True,
        verbose=verbose,
        callbacks=callbacks,
    )


def fine_tune(
    model: keras.Model,
    train_data,
    val_data,
    unfreeze_layers: int = 30,
    learning_rate: float = 1e-5,
    epochs: int = 5,
    initial_epoch: int = 0,
    label_smoothing: float = 0.0,
    **fit_args,
) -> dict[str, list[float]]:
    """Phase 2 of transfer learning: unfreeze the top backbone layers and train on slowly.

    BatchNormalization layers stay in inference mode (see :func:`unfreeze_top`); the low
    learning rate keeps the pretrained features from being destroyed by the first updates.
    ``initial_epoch`` continues the epoch count of phase 1 so both phases share one curve.
    """
    unfreeze_top(model, unfreeze_layers)
    compile_binary(model, learning_rate, label_smoothing)
    return fit(model, train_data, val_data, epochs=epochs, initial_epoch=initial_epoch, **fit_args)


def concat_histories(*histories: dict[str, list[float]]) -> dict[str, list[float]]:
    """Join the histories of successive phases; ``phase`` records which phase each epoch was."""
    out: dict[str, list[float]] = {"phase": []}
    for phase, history in enumerate(histories, start=1):
        n = len(history.get("loss", []))
        out["phase"] += [phase] * n
        for key, values in history.items():
            out.setdefault(key, []).extend(values)
    return out


def train_frozen_head(
    model: keras.Model,
    paths: dict[str, list[str]],
    labels: dict[str, np.ndarray],
    epochs: int = 30,
    learning_rate: float = 1e-3,
    batch_size: int = 32,
    patience: int = 5,
    use_feature_cache: bool = True,
    cache_dir: str | Path | None = DEFAULT_CACHE_DIR,
    history_path: str | Path | None = None,
    checkpoint_path: str | Path | None = None,
    verbose: int = 2,
    label_smoothing: float = 0.0,
) -> tuple[dict[str, list[float]], dict[str, np.ndarray]]:
    """Train the head of a frozen-base ``model`` on ``train``, early-stopping on ``val``.

    With ``use_feature_cache`` the backbone runs once per image (features cached on disk, see
    :mod:`pneumo_utils.features`) and the head trains on the features; otherwise the seeds'
    way, ``model.fit`` over decoded images every epoch. Class weights are balanced on the
    train labels; ``label_smoothing`` goes to the binary cross-entropy. ``paths``/``labels``
    map split names to file lists and label arrays.

    Returns the history and PNEUMONIA probabilities ``(n,)`` for every split given.
    """
    weights = class_weights(labels["train"])
    if use_feature_cache:
        feats = extract_split_features(model, paths, batch_size, cache_dir, verbose=bool(verbose))
        history = fit_head_on_features(
            model, feats["train"], labels["train"], feats["val"], labels["val"], epochs,
            weights, learning_rate, batch_size, patience, history_path, verbose=verbose,
            label_smoothing=label_smoothing,
        )
        head = head_on_features(model)
        return history, {s: head.predict(f, verbose=0).reshape(-1) for s, f in feats.items()}
    size = int(model.inputs[0].shape[1])
    train_ds = image_dataset(paths["train"], labels["train"], size, batch_size, shuffle=True)
    val_ds = image_dataset(paths["val"], labels["val"], size, batch_size)
    compile_binary(model, learning_rate, label_smoothing)
    history = fit(model, train_ds, val_ds, epochs, weights, patience, checkpoint_path,
                  history_path, verbose=verbose)
    return history, {s: predict_paths(model, p, batch_size) for s, p in paths.items()}
