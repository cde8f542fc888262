"""Training over images (fine-tuning or from scratch) and the two-phase transfer recipe.

Phase 1 of transfer learning trains only the head on a frozen backbone; the backbone
features never change, so :func:`pneumo_utils.train.train_frozen_head` computes them once
and trains on the cache. Phase 2 unfreezes the top of the backbone and trains on the
*images* again, slowly, with augmentation: the features now change with every step, so
nothing can be cached. :func:`train_on_images` runs such a phase (or trains a model from
scratch), :func:`keep_best` compares phases on **validation** AUC and keeps the better
weights, and :func:`two_phase` chains all of it for notebooks that compare models.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np
import pandas as pd
from sklearn import metrics as skm

from pneumo_utils.augment import training_dataset
from pneumo_utils.data import class_weights
from pneumo_utils.features import DEFAULT_CACHE_DIR
from pneumo_utils.models import base_layers, predict_paths, unfreeze_top, write_json_atomic
from pneumo_utils.train import compile_binary, concat_histories, train_frozen_head


def train_on_images(
    model: keras.Model,
    paths: Mapping[str, list[str]],
    labels: Mapping[str, np.ndarray],
    epochs: int = 5,
    learning_rate: float = 1e-3,
    unfreeze_layers: int | None = None,
    initial_epoch: int = 0,
    batch_size: int = 32,
    augment_layers: keras.Sequential | None = None,
    images_per_epoch: int | None = None,
    patience: int = 3,
    seed: int = 0,
    history_path: str | Path | None = None,
    verbose: int = 2,
    label_smoothing: float = 0.0,
) -> tuple[dict[str, list[float]], np.ndarray]:
    """Train ``model`` on the ``train`` images, early-stopping on ``val`` AUC; in place.

    With ``unfreeze_layers`` the top that many backbone layers are made trainable first
    (BatchNorm stays frozen, in inference mode: :func:`pneumo_utils.models.unfreeze_top`);
    with ``None`` whatever is trainable now is trained (a model from scratch: everything).
    Training images go through ``augment_layers`` (:mod:`pneumo_utils.augment`);
    ``images_per_epoch`` makes each epoch a random share of the training set. The loss is
    class-weighted (balanced), with optional ``label_smoothing``; Adam at ``learning_rate``
    (:func:`pneumo_utils.train.compile_binary`).

    After every epoch the model predicts the validation images once; those predictions give
    the epoch's ``val_*`` metrics (ROC AUC from scikit-learn, unweighted log loss, and
    accuracy/precision/recall at 0.5) and are kept for the best epoch, so no second pass over
    the validation images is needed afterwards. Training stops after ``patience`` epochs
    without a better validation AUC, and the best epoch's weights are restored.

    Returns the history (``epoch`` numbers continue from ``initial_epoch``, also written to
    ``history_path``) and the validation probabilities of the restored (best) epoch.
    """
    size = int(model.inputs[0].shape[1])
    train_ds, steps = training_dataset(
        paths["train"], labels["train"], size, batch_size, augment_layers, seed, images_per_epoch
    )
    if unfreeze_layers is not None:
        unfreeze_top(model, unfreeze_layers)
    compile_binary(model, learning_rate, label_smoothing)
    weights = class_weights(labels["train"])
    y_val = np.asarray(labels["val"])
    history: dict[str, list[float]] = {}
    best = (-np.inf, None, None)  # (val AUC, weights, val probabilities)
    waited = 0
    for epoch in range(initial_epoch, initial_epoch + epochs):
        fitted = model.fit(train_ds, epochs=epoch + 1, initial_epoch=epoch, steps_per_epoch=steps,
                           class_weight=weights, shuffle=False, verbose=verbose)
        proba_val = predict_paths(model, paths["val"], batch_size)
        record = {k: float(v[-1]) for k, v in fitted.history.items()}
        record.update({f"val_{k}": v for k, v in validation_metrics(y_val, proba_val).items()})
        record["epoch"] = epoch
        for key, value in record.items():
            history.setdefault(key, []).append(value)
        if verbose:
            print(f"epoch {epoch + 1}: val_auc {record['val_auc']:.4f} - val_loss {record['val_loss']:.4f}")
        score = record["val_auc"] if np.isfinite(record["val_auc"]) else -1.0
        if score > best[0]:
            best, waited = (score, model.get_weights(), proba_val), 0
        else:
            waited += 1
            if waited >= patience:
                break
    model.set_weights(best[1])
    if history_path is not None:
        write_json_atomic(history_path, history)
    return history, best[2]


def validation_metrics(y_true: np.ndarray, proba: np.ndarray) -> dict[str, float]:
    """Loss (unweighted binary cross-entropy), ROC AUC and accuracy/precision/recall at 0.5,
    named like Keras' training metrics so train and validation curves line up."""
    y_true = np.asarray(y_true).astype(int)
    proba = np.clip(np.asarray(proba, dtype=float), 1e-7, 1 - 1e-7)
    predicted = (proba >= 0.5).astype(int)
    both = len(np.unique(y_true)) == 2
    return {
        "loss": float(skm.log_loss(y_true, proba, labels=[0, 1])),
        "auc": float(skm.roc_auc_score(y_true, proba)) if both else float("nan"),
        "accuracy": float(skm.accuracy_score(y_true, predicted)),
        "precision": float(skm.precision_score(y_true, predicted, zero_division=0)),
        "recall": float(skm.recall_score(y_true, predicted, zero_division=0)),
    }


def predict_splits(
    model: keras.Model,
    paths: Mapping[str, list[str]],
    splits: tuple[str, ...] = ("val", "test"),
    batch_size: int = 32,
) -> dict[str, np.ndarray]:
    """PNEUMONIA probabilities of the model for the images of each split in ``splits``."""
    return {split: predict_paths(model, paths[split], batch_size) for split in splits}


def trainable_backbone_layers(model: keras.Model) -> int:
    """How many backbone layers are trainable now (0 for a frozen base)."""
    return sum(layer.trainable for layer in base_layers(model))


@dataclass
class Phase:
    """One training phase's outcome: its weights and its predictions per split."""

    name: str
    weights: list[np.ndarray]
    proba: dict[str, np.ndarray]
    epochs: int = 0
    trainable_layers: int = 0


def snapshot(model: keras.Model, name: str, proba: Mapping[str, np.ndarray], epochs: int = 0) -> Phase:
    """Record the model's current weights and predictions as a :class:`Phase`."""
    return Phase(name, model.get_weights(), dict(proba), epochs, trainable_backbone_layers(model))


def compare_phases(y_val: np.ndarray, phases: list[Phase]) -> pd.DataFrame:
    """Validation ROC AUC and PR AUC per phase, and which one is kept (highest val AUC).

    On a tie the earlier (simpler) phase is kept. The test split plays no part.
    """
    rows = [
        {
            "phase": p.name,
            "epochs": p.epochs,
            "trainable backbone layers": p.trainable_layers,
            "validation AUC": skm.roc_auc_score(y_val, p.proba["val"]),
            "validation PR AUC": skm.average_precision_score(y_val, p.proba["val"]),
        }
        for p in phases
    ]
    table = pd.DataFrame(rows).set_index("phase")
    best = int(np.argmax(table["validation AUC"].to_numpy()))  # first maximum: earlier phase
    table["kept"] = ["yes" if i == best else "" for i in range(len(table))]
    return table.round(5)


def keep_best(
    model: keras.Model,
    y_val: np.ndarray,
    phases: list[Phase],
    paths: Mapping[str, list[str]] | None = None,
    splits: tuple[str, ...] = ("val", "test"),
    batch_size: int = 32,
) -> tuple[Phase, pd.DataFrame]:
    """Load the weights of the phase with the highest validation AUC into ``model``.

    Phases need only validation predictions to be compared. When ``paths`` is given, the
    kept phase's predictions are completed for every split in ``splits`` it lacks (usually
    ``test``), so the test images are predicted once, by the kept model only.

    Returns that phase (its predictions are the model's from now on) and the comparison
    table of :func:`compare_phases`.
    """
    table = compare_phases(y_val, phases)
    best = phases[list(table["kept"]).index("yes")]
    model.set_weights(best.weights)
    if paths is not None:
        missing = tuple(s for s in splits if s not in best.proba)
        best.proba.update(predict_splits(model, paths, missing, batch_size))
    return best, table


@dataclass
class TwoPhaseResult:
    """What :func:`two_phase` returns: the joint history, the kept phase and the table."""

    history: dict[str, list[float]]
    kept: Phase
    table: pd.DataFrame

    @property
    def proba(self) -> dict[str, np.ndarray]:
        """Probabilities per split of the model as kept."""
        return self.kept.proba


def two_phase(
    model: keras.Model,
    paths: Mapping[str, list[str]],
    labels: Mapping[str, np.ndarray],
    epochs: int = 10,
    learning_rate: float = 1e-3,
    fine_tune_epochs: int = 2,
    fine_tune_learning_rate: float = 1e-5,
    unfreeze_layers: int = 30,
    augment_layers: keras.Sequential | None = None,
    images_per_epoch: int | None = None,
    batch_size: int = 32,
    patience: int = 5,
    use_feature_cache: bool = True,
    cache_dir: str | Path | None = DEFAULT_CACHE_DIR,
    seed: int = 0,
    verbose: int = 2,
    label_smoothing: float = 0.0,
) -> TwoPhaseResult:
    """Transfer learning in two phases, keeping whichever validates better.

    1. Frozen base: the head trains on cached backbone features
       (:func:`pneumo_utils.train.train_frozen_head`).
    2. Fine-tuning: the top ``unfreeze_layers`` backbone layers train on augmented images
       at ``fine_tune_learning_rate`` for ``fine_tune_epochs`` (0 skips this phase).

    Both phases use ``label_smoothing`` in the loss (0 = plain binary cross-entropy).
    The model ends up with the weights of the phase with the higher validation AUC.
    ``paths``/``labels`` hold ``train``, ``val`` and ``test``; only ``val`` guides choices.
    """
    history1, proba1 = train_frozen_head(
        model, paths, labels, epochs=epochs, learning_rate=learning_rate, batch_size=batch_size,
        patience=patience, use_feature_cache=use_feature_cache, cache_dir=cache_dir,
        verbose=verbose, label_smoothing=label_smoothing,
    )
    phases = [snapshot(model, "1: frozen base, head only", proba1, len(history1["loss"]))]
    histories = [history1]
    if fine_tune_epochs > 0:
        history2, proba2_val = train_on_images(
            model, paths, labels, fine_tune_epochs, fine_tune_learning_rate, unfreeze_layers,
            initial_epoch=len(history1["loss"]), batch_size=batch_size,
            augment_layers=augment_layers, images_per_epoch=images_per_epoch,
            patience=patience, seed=seed, verbose=verbose, label_smoothing=label_smoothing,
        )
        phases.append(snapshot(model, f"2: top {unfreeze_layers} layers fine-tuned",
                               {"val": proba2_val}, len(history2["loss"])))
        histories.append(history2)
    kept, table = keep_best(model, labels["val"], phases, paths, batch_size=batch_size)
    return TwoPhaseResult(concat_histories(*histories), kept, table)
