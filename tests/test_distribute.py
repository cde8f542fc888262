"""tf.distribute strategies: choice by name, MirroredStrategy on 2 logical CPUs, 2 workers."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")

import keras  # noqa: E402

from pneumo_utils.scale import distribute  # noqa: E402

WORKER = Path(__file__).with_name("distributed_worker.py")
ROOT = Path(__file__).resolve().parents[1]
MIRRORED_TOLERANCE = 1e-4
"""Largest difference in predicted probability between a head trained under the default
strategy and under MirroredStrategy on 2 logical CPUs (same data, weights and batches; only
the order of floating-point sums differs)."""


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TF_CONFIG"}
    env.update(PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]), TF_CPP_MIN_LOG_LEVEL="2",
               **extra)
    return env


def test_auto_resolves_to_the_default_strategy_here_and_says_so(monkeypatch):
    for name in ("TF_CONFIG", "TPU_NAME", "COLAB_TPU_ADDR", "TPU_ACCELERATOR_TYPE"):
        monkeypatch.delenv(name, raising=False)
    if tf.config.list_physical_devices("GPU") or distribute.tpu_attached():
        pytest.skip("this machine has an accelerator")
    name, reason = distribute.resolve_name("auto")
    assert name == "default" and "no TPU" in reason
    strategy = distribute.strategy("auto")
    assert strategy.num_replicas_in_sync == 1
    line = distribute.describe(strategy)
    assert line.startswith("default strategy (no distribution): 1 replica")
    info = distribute.strategy_info(strategy)
    assert info["strategy"] == "default" and info["replicas"] == 1 and info["workers"] == 1
    json.dumps(info)  # goes into sidecars and reports as it is


def test_names_tf_config_and_tpu_signs_choose_the_strategy(monkeypatch):
    for name in ("TF_CONFIG", "TPU_NAME", "COLAB_TPU_ADDR", "TPU_ACCELERATOR_TYPE"):
        monkeypatch.delenv(name, raising=False)
    assert distribute.resolve_name("Multi-Worker") == ("multiworker", "chosen explicitly")
    with pytest.raises(ValueError, match="unknown strategy 'gpu'"):
        distribute.resolve_name("gpu")
    cluster = {"cluster": {"worker": ["127.0.0.1:1", "127.0.0.1:2"]}, "task": {"type": "worker", "index": 1}}
    monkeypatch.setenv("TF_CONFIG", json.dumps(cluster))
    assert distribute.tf_config_workers() == 2
    assert distribute.resolve_name("auto") == ("multiworker", "TF_CONFIG names 2 workers")
    monkeypatch.setenv("TF_CONFIG", "{not json")
    with pytest.raises(ValueError, match="TF_CONFIG is not valid JSON"):
        distribute.resolve_name("auto")
    monkeypatch.delenv("TF_CONFIG")
    monkeypatch.setenv("COLAB_TPU_ADDR", "10.0.0.2:8470")
    assert distribute.resolve_name("auto") == ("tpu", "a TPU is attached")


def test_global_batch_size():
    strategy = tf.distribute.get_strategy()
    assert distribute.global_batch_size(16, strategy) == 16
    with pytest.raises(ValueError, match="positive"):
        distribute.global_batch_size(0, strategy)


def test_describe_reports_the_keras_dtype_policy():
    try:
        keras.mixed_precision.set_global_policy("mixed_bfloat16")
        assert "mixed_bfloat16" in distribute.describe(tf.distribute.get_strategy())
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert "float32" in distribute.describe(tf.distribute.get_strategy())


def test_mirrored_on_two_logical_cpus_predicts_as_the_default_strategy(tmp_path):
    out = tmp_path / "mirrored.json"
    subprocess.run([sys.executable, str(WORKER), "mirrored", str(out)], env=_env(), check=True,
                   timeout=180, cwd=ROOT)
    result = json.loads(out.read_text())
    assert result["describe"]["mirrored"].startswith("MirroredStrategy: 2 replicas (CPU:0, CPU:1)")
    assert result["describe"]["default"].startswith("default strategy")
    default, mirrored = (np.array(result["predictions"][k]) for k in ("default", "mirrored"))
    assert default.std() > 0.01  # the head learned something, so the comparison means something
    np.testing.assert_allclose(mirrored, default, atol=MIRRORED_TOLERANCE, rtol=0)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_two_workers_train_on_shards_and_the_chief_saves(kermany_root, tmp_path):
    from pneumo_utils.model.saving import load_model
    from pneumo_utils.scale import shard_reader, shard_writer

    index, rule = shard_writer.load_index(kermany_root, seed=0)
    shard_dir = tmp_path / "shards"
    shard_writer.write_shards(index, shard_dir, image_size=32, min_shards=4, split_rule=rule, verbose=False)
    workers = [f"127.0.0.1:{_free_port()}" for _ in range(2)]
    processes = []
    for task in range(2):
        config = {"cluster": {"worker": workers}, "task": {"type": "worker", "index": task}}
        log = open(tmp_path / f"worker{task}.log", "w")  # noqa: SIM115 - closed below
        processes.append((subprocess.Popen(
            [sys.executable, str(WORKER), "worker", str(shard_dir), str(tmp_path)],
            env=_env(TF_CONFIG=json.dumps(config)), cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
        ), log))
    try:
        for process, _ in processes:
            process.wait(timeout=240)
    finally:
        for process, log in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
            log.close()
    for task, (process, _) in enumerate(processes):
        assert process.returncode == 0, (tmp_path / f"worker{task}.log").read_text()[-3000:]
    results = [json.loads((tmp_path / f"worker{t}.json").read_text()) for t in range(2)]
    for result in results:
        assert result["describe"].startswith("MultiWorkerMirroredStrategy: 2 replicas")
        assert np.isfinite(result["loss"]).all()
    assert results[0]["loss"] == pytest.approx(results[1]["loss"])  # one model, synchronised
    rows = [set(r["rows"]) for r in results]
    assert rows[0] and rows[1] and not rows[0] & rows[1]  # each worker read its own files
    assert rows[0] | rows[1] == set(range(int((index["split"] == "train").sum())))
    assert sorted(p.name for p in tmp_path.glob("*.keras")) == ["model.keras"]  # the chief's only
    model, meta = load_model(tmp_path / "model.keras")
    assert meta["distribution"]["strategy"] == "multiworker" and meta["distribution"]["workers"] == 2
    images, _ = next(iter(shard_reader.read_shards(shard_dir, "test", batch_size=8)))
    probabilities = model.predict(images, verbose=0).ravel()
    assert probabilities.shape == (8,) and ((probabilities >= 0) & (probabilities <= 1)).all()
