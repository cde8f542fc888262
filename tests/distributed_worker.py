"""Processes for tests/test_distribute.py: TensorFlow's devices and cluster must be set up
before it starts, so each case runs in a fresh interpreter.

``python tests/distributed_worker.py mirrored OUT.json``: splits the CPU into 2 logical
devices, trains the same small head on the same generated features and global batches
under the default strategy and under ``MirroredStrategy``, and writes both predictions and
the strategy lines.

``python tests/distributed_worker.py worker SHARDS OUT_DIR`` (with ``TF_CONFIG`` set): one
worker of a ``MultiWorkerMirroredStrategy`` cluster trains a small CNN on the shards, the
chief saves it, and every worker writes the rows it predicted (its own shard files).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def mirrored(out: Path) -> None:
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    import keras
    import numpy as np

    from pneumo_utils.model.train import compile_binary
    from pneumo_utils.scale import distribute

    rng = np.random.default_rng(0)
    x = rng.normal(size=(256, 16)).astype(np.float32)
    y = (x[:, :4].sum(axis=1) + rng.normal(scale=0.5, size=256) > 0).astype(np.float32)
    weights, predictions, lines = None, {}, {}
    for name in ("default", "mirrored"):
        strategy = distribute.strategy(name)
        with strategy.scope():
            head = keras.Sequential([
                keras.Input((16,)),
                keras.layers.Dense(8, activation="relu"),
                keras.layers.Dense(1, activation="sigmoid"),
            ])
            compile_binary(head, learning_rate=1e-2)
        if weights is None:
            weights = head.get_weights()
        head.set_weights(weights)
        # one global batch of 32 for both: 16 per replica under MirroredStrategy
        per_replica = 32 // strategy.num_replicas_in_sync
        head.fit(x, y, batch_size=distribute.global_batch_size(per_replica, strategy), epochs=3,
                 shuffle=False, verbose=0)
        predictions[name] = head.predict(x, batch_size=64, verbose=0).ravel().tolist()
        lines[name] = distribute.describe(strategy)
    out.write_text(json.dumps({"predictions": predictions, "describe": lines}))


def worker(shard_dir: Path, out_dir: Path) -> None:
    from pneumo_utils.scale import distribute  # creates nothing yet

    strategy = distribute.strategy("auto")  # before any other TensorFlow operation
    import keras

    from pneumo_utils.model.backbones import build_scratch_cnn
    from pneumo_utils.model.saving import model_metadata, save_model
    from pneumo_utils.model.train import compile_binary
    from pneumo_utils.scale.shard_reader import extract_features_from_shards, read_shards

    keras.utils.set_random_seed(0)
    data = read_shards(shard_dir, "train", batch_size=distribute.global_batch_size(4, strategy),
                       shuffle=True, seed=0, repeat=True)
    with strategy.scope():
        model = build_scratch_cnn(image_size=32, filters=(4,), dense_units=4, seed=0)
        compile_binary(model)
    history = model.fit(data, epochs=2, steps_per_epoch=3, verbose=0)
    task = json.loads(os.environ["TF_CONFIG"])["task"]["index"]
    if task == 0:  # the chief (worker 0) alone writes the model
        meta = model_metadata(model, distribution=distribute.strategy_info(strategy))
        save_model(model, out_dir / "model.keras", meta)
    seen = extract_features_from_shards(model, shard_dir, "train", strategy=strategy, cache_dir=None,
                                        verbose=False)
    (out_dir / f"worker{task}.json").write_text(json.dumps({
        "describe": distribute.describe(strategy),
        "rows": seen.rows.tolist(),
        "loss": history.history["loss"],
    }))


if __name__ == "__main__":
    if sys.argv[1] == "mirrored":
        mirrored(Path(sys.argv[2]))
    else:
        worker(Path(sys.argv[2]), Path(sys.argv[3]))
