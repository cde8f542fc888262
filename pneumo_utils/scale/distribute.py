"""Which ``tf.distribute`` strategy to train under, and the global batch size.

Everything that creates variables (building, compiling, training, fine-tuning, feature
extraction) runs inside ``strategy.scope()``; ``model.fit`` then splits each global batch
over the replicas and averages their gradients. The one choice a notebook makes is a name:

========== ==================================================================================
``auto``   a TPU when one is attached (Colab/Kaggle, see :func:`tpu_attached`); else
           ``MultiWorkerMirroredStrategy`` when ``TF_CONFIG`` names several workers; else
           ``MirroredStrategy`` when more than one GPU is visible; else the default strategy
``default`` no distribution: one device, as a plain script
``mirrored`` ``MirroredStrategy`` over all local GPUs (or all logical CPU devices without one)
``multiworker`` ``MultiWorkerMirroredStrategy`` over the hosts listed in ``TF_CONFIG``
``tpu``    ``TPUStrategy`` through ``TPUClusterResolver``
========== ==================================================================================

``MultiWorkerMirroredStrategy`` must be created before any other TensorFlow operation runs
(it configures the collective runtime), so call :func:`strategy` first in a script.
"""

from __future__ import annotations

import glob
import json
import os
from typing import Any

import keras
import tensorflow as tf

STRATEGY_NAMES: tuple[str, ...] = ("auto", "default", "mirrored", "multiworker", "tpu")

_TPU_ENV = ("TPU_NAME", "COLAB_TPU_ADDR", "TPU_ACCELERATOR_TYPE")
_CLASS_NAMES = {
    "default": "default strategy",
    "mirrored": "MirroredStrategy",
    "multiworker": "MultiWorkerMirroredStrategy",
    "tpu": "TPUStrategy",
}


def tf_config_workers(tf_config: str | None = None) -> int:
    """Number of worker tasks (``chief`` and ``worker``) that ``TF_CONFIG`` names; 0 without one.

    ``tf_config`` defaults to the ``TF_CONFIG`` environment variable; a value that is not
    JSON with a ``cluster`` mapping raises ``ValueError`` saying what was found.
    """
    text = os.environ.get("TF_CONFIG", "") if tf_config is None else tf_config
    if not text.strip():
        return 0
    try:
        config = json.loads(text)
        cluster = config.get("cluster", {})
        return len(cluster.get("chief", [])) + len(cluster.get("worker", []))
    except (json.JSONDecodeError, AttributeError, TypeError):
        raise ValueError(
            f"TF_CONFIG is not valid JSON of the form "
            f'{{"cluster": {{"worker": ["host:port", ...]}}, "task": {{"type": "worker", '
            f'"index": 0}}}}; found {text[:200]!r}'
        ) from None


def tpu_attached() -> bool:
    """Whether this machine looks attached to a TPU, judged without any network call.

    True when ``TPU_NAME``, ``COLAB_TPU_ADDR`` or ``TPU_ACCELERATOR_TYPE`` is set (Colab and
    Kaggle TPU runtimes, Cloud TPU VMs) or a TPU device file ``/dev/accel*`` exists.
    ``TPUClusterResolver`` itself is not asked: off Google Cloud it waits on a metadata
    server that is not there.
    """
    return any(os.environ.get(name) for name in _TPU_ENV) or bool(glob.glob("/dev/accel*"))


def resolve_name(name: str = "auto") -> tuple[str, str]:
    """The strategy name that ``name`` stands for, and why: ``("mirrored", "2 GPUs visible")``.

    Forced names are returned as they are; ``"auto"`` is resolved as the module docstring
    says. Nothing is created, so this is cheap and safe to call anywhere.
    """
    key = str(name).strip().lower().replace("-", "").replace("_", "")
    if key not in STRATEGY_NAMES:
        raise ValueError(f"unknown strategy {name!r}; choose one of {list(STRATEGY_NAMES)}")
    if key != "auto":
        return key, "chosen explicitly"
    if tpu_attached():
        return "tpu", "a TPU is attached"
    workers = tf_config_workers()
    if workers > 1:
        return "multiworker", f"TF_CONFIG names {workers} workers"
    gpus = len(tf.config.list_physical_devices("GPU"))
    if gpus > 1:
        return "mirrored", f"{gpus} GPUs visible"
    reasons = ["no TPU", f"{workers or 'no'} TF_CONFIG worker{'s' if workers != 1 else ''}",
               f"{gpus} GPU{'s' if gpus != 1 else ''}"]
    return "default", ", ".join(reasons)


def strategy(name: str = "auto", tpu: str | None = None):
    """A ``tf.distribute.Strategy`` for ``name`` (see :data:`STRATEGY_NAMES` and
    :func:`resolve_name`); :func:`describe` says which one in a line.

    ``tpu`` is the TPU name or gRPC address for ``TPUClusterResolver`` (default:
    ``COLAB_TPU_ADDR``'s when set, else ``"local"``, the TPU of a TPU VM). ``"mirrored"``
    without a GPU mirrors over the logical CPU devices (see
    ``tf.config.set_logical_device_configuration``), which is how the tests exercise it.

    Raises ``RuntimeError`` saying what to check when a TPU is asked for but cannot be
    initialised.
    """
    resolved, _ = resolve_name(name)
    if resolved == "default":
        return tf.distribute.get_strategy()
    if resolved == "mirrored":
        devices = None
        if not tf.config.list_logical_devices("GPU"):
            devices = [d.name for d in tf.config.list_logical_devices("CPU")]
        return tf.distribute.MirroredStrategy(devices=devices)
    if resolved == "multiworker":
        return KerasMultiWorkerMirroredStrategy()
    address = tpu if tpu is not None else ("" if os.environ.get("COLAB_TPU_ADDR") else "local")
    try:
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver.connect(tpu=address)
    except (ValueError, RuntimeError, tf.errors.OpError) as exc:
        raise RuntimeError(
            f"no TPU could be initialised ({' '.join(str(exc).split())[:300]}); on Colab or "
            "Kaggle choose a TPU runtime, elsewhere pass tpu=NAME_OR_ADDRESS, or use "
            "strategy='auto'."
        ) from None
    return tf.distribute.TPUStrategy(resolver)


class KerasMultiWorkerMirroredStrategy(tf.distribute.MultiWorkerMirroredStrategy):
    """``MultiWorkerMirroredStrategy`` whose ``reduce`` takes what Keras 3's ``model.fit``
    gives it.

    Keras 3 reduces the first ``(x, y)`` batch as one nested value to build the model, and
    scalar logs with ``axis=0``; the collective ``reduce`` accepts neither
    (keras-team/keras#20585). Reducing each leaf, scalars without an axis, keeps ``fit``,
    ``evaluate`` and ``predict`` working unchanged. Arguments as for the parent class.
    """

    def reduce(self, reduce_op, value, axis):
        def one(v):
            scalar = getattr(v, "shape", None) is not None and v.shape.rank == 0
            return super(KerasMultiWorkerMirroredStrategy, self).reduce(
                reduce_op, v, None if scalar else axis
            )

        return tf.nest.map_structure(one, value)


def num_workers(strategy) -> int:
    """Number of hosts (worker processes) a strategy spans; 1 unless multi-worker."""
    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return 1
    cluster = strategy.cluster_resolver.cluster_spec().as_dict()
    return max(1, len(cluster.get("chief", [])) + len(cluster.get("worker", [])))


def global_batch_size(per_replica: int, strategy) -> int:
    """The batch a dataset must yield so that each replica sees ``per_replica`` images:
    ``per_replica * strategy.num_replicas_in_sync`` (``model.fit`` splits it)."""
    if int(per_replica) < 1:
        raise ValueError(f"per_replica must be a positive integer, got {per_replica!r}")
    return int(per_replica) * int(strategy.num_replicas_in_sync)


def strategy_kind(strategy) -> str:
    """The short name (:data:`STRATEGY_NAMES`) of a strategy object."""
    if isinstance(strategy, tf.distribute.TPUStrategy):
        return "tpu"
    if isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return "multiworker"
    if isinstance(strategy, tf.distribute.MirroredStrategy):
        return "mirrored"
    return "default"


def strategy_info(strategy) -> dict[str, Any]:
    """What a report and a model sidecar record about the distribution of a run:
    ``{"strategy", "class", "replicas", "workers", "devices", "precision"}``."""
    try:
        devices = list(strategy.extended.worker_devices)
    except (AttributeError, RuntimeError, NotImplementedError):
        devices = []
    if not devices:
        gpus = tf.config.list_logical_devices("GPU")
        devices = [(gpus or tf.config.list_logical_devices("CPU"))[0].name]
    return {
        "strategy": strategy_kind(strategy),
        "class": _CLASS_NAMES[strategy_kind(strategy)],
        "replicas": int(strategy.num_replicas_in_sync),
        "workers": num_workers(strategy),
        "devices": [d.split("/device:")[-1] if "/device:" in d else d for d in devices],
        "precision": keras.config.dtype_policy().name,
    }


def describe(strategy) -> str:
    """One line for a notebook or report: ``"MirroredStrategy: 2 replicas (GPU:0, GPU:1),
    1 worker, precision mixed_float16"``; the default strategy says ``"default strategy (no
    distribution)"``."""
    info = strategy_info(strategy)
    name = info["class"] + (" (no distribution)" if info["strategy"] == "default" else "")
    replicas = f"{info['replicas']} replica{'s' if info['replicas'] != 1 else ''}"
    workers = f"{info['workers']} worker{'s' if info['workers'] != 1 else ''}"
    return (f"{name}: {replicas} ({', '.join(info['devices'])}), {workers}, "
            f"precision {info['precision']}")
