"""Benchmark that puts a number beside every speed claim the project makes.

Usage::

    python -m pneumo_utils.bench [--quick|--full] [--data-root DIR] [--weights-dir DIR]
        [--out benchmarks/results.json] [--backbone NAME] [--image-size N]
        [--max-images-per-class N] [--skip-run-all] [--from-summary reports/summary.json]

Prints one line per figure (``name: value unit``, with ``[target ...: met | NOT MET]`` where
the project states a target) and writes every figure, the machine (CPU model, cores, RAM,
TensorFlow version, load average) and the date to a JSON file. The method behind each figure
is written up in ``benchmarks/README.md``.

Figures
-------
(a) **Head training over images vs on cached features.** One frozen-base classifier, one
    patient-grouped split, the same head (identical initial weights), epochs, seed, class
    weights, optimiser and callbacks. The images way is the seeds' way: ``data.image_dataset``
    (decoded images cached in memory after the first epoch), ``train.compile_binary`` and
    ``train.fit`` (``model.fit`` with the base inside). The features way is
    ``features.extract_features`` once per split, then ``train.fit_head_on_features``
    (``models.head_on_features`` + ``model.fit`` on arrays). An epoch is what ``model.fit``
    calls one: the training pass, the validation pass and the callbacks. The first epoch
    (graph tracing and, over images, decoding and filling the cache) is reported apart; the
    per-epoch figures and the speed-up are the mean of the later epochs. Test AUCs come from
    the weights each way ends with (``EarlyStopping(restore_best_weights=True)`` keeps the
    best validation-AUC epoch in both).
(b) **Wall time of the full profile** (what ``run_all.sh`` runs), per notebook, from the
    runner's ``summary.json``: the runner is run in a subprocess, or an existing summary is
    read with ``--from-summary``. Full mode only.
(c) **Prediction.** ``python -m pneumo_utils.predict IMAGE --model M`` as a whole subprocess
    (interpreter start, imports and model load included; median of runs), and batch
    throughput of ``models.predict_paths`` (decoding included) against a bare
    ``model.predict`` on an array decoded beforehand (decoding excluded), and against the
    bare way with a simple decoding loop included.
(d) **Peak resident memory.** Full mode with the runner: the runner and its notebook
    kernels (per-process peaks ``VmHWM`` polled from ``/proc``, plus the kernel's
    ``RUSAGE_CHILDREN`` figure as a cross-check). Otherwise: this benchmark process.
(e) **bf16 mixed precision** for the backbone forward pass, in a subprocess: pooled-feature
    extraction images/s with the ``float32`` and the ``mixed_bfloat16`` policies on the same
    pre-decoded images, and how far the bf16 features are from the fp32 ones. The code base
    uses bf16 only if this shows it helps.

Timings depend on the machine and on whatever else runs on it; the JSON records the load
average before and after.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import keras
import numpy as np

from pneumo_utils import data, datasets, features, models, train

# Targets the project states; "met" is printed beside each figure that has one.
TARGET_EPOCH_SPEEDUP = 20.0  # (a) features way at least this many times faster per epoch
TARGET_AUC_DIFF = 0.005  # (a) test AUCs of both ways equal within this
TARGET_ALL_NOTEBOOKS_SECONDS = 20 * 60  # (b) all four notebooks, full profile, within 20 min
TARGET_PREDICT_CLI_SECONDS = 5.0  # (c) one image, model load included
TARGET_THROUGHPUT_RATIO = 0.9  # (c) predict_paths vs bare model.predict
TARGET_PEAK_MIB = 8 * 1024  # (d) below 8 GiB

MODES = {
    "quick": {"backbone": "mobilenet_v2", "image_size": 96, "max_images_per_class": 40,
              "throughput_images": 64},
    "full": {"backbone": "densenet121", "image_size": 224, "max_images_per_class": None,
             "throughput_images": 256},
}
"""Per-mode defaults; the full mode uses notebook 01's backbone and image size."""

SPLITS = ("train", "val", "test")

Paths = dict[str, list[str]]
"""Image files per split."""
Labels = dict[str, np.ndarray]
"""Labels (0 NORMAL, 1 PNEUMONIA) per split, in the order of :data:`Paths`."""


# --------------------------------------------------------------------------- figures


@dataclass
class Figure:
    """One measured number, its unit, and the target it is held against (if any)."""

    name: str
    value: float | int | str | None
    unit: str = ""
    target: str | None = None
    met: bool | None = None
    note: str = ""

    def line(self) -> str:
        """``name: value unit`` plus the verdict, e.g. ``a_epoch_speedup: 41.3 x [target >= 20 x: met]``."""
        if self.value is None:
            return f"{self.name}: {self.note or 'not measured'}"
        text = f"{self.name}: {format_value(self.value)} {self.unit}".rstrip()
        if self.target is not None:
            verdict = "met" if self.met else "NOT MET"
            text += f"  [target {self.target}: {verdict}]"
        return text


def format_value(value: float | int | str) -> str:
    """Four significant digits for numbers of 1 and more, four decimals below 1."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return str(value)
    if isinstance(value, int):
        return str(value)
    return f"{value:.4f}" if abs(value) < 1 else f"{value:.4g}"


def emit(figure: Figure, figures: list[Figure]) -> None:
    """Record ``figure`` and print its line at once (long runs show results as they come)."""
    figures.append(figure)
    print(figure.line(), flush=True)


_STARTED = time.monotonic()


def progress(message: str) -> None:
    """Progress (with elapsed seconds) goes to stderr; stdout holds only the figure lines."""
    print(f"[bench {time.monotonic() - _STARTED:6.0f} s] {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- configuration


@dataclass
class Config:
    """Everything one benchmark run depends on (written to the JSON as ``settings``)."""

    mode: str
    data_root: str
    weights_dir: str | None
    weights: str
    out: str
    backbone: str
    image_size: int
    max_images_per_class: int | None
    epochs: int
    batch_size: int
    learning_rate: float
    seed: int
    val_fraction: float
    model: str | None
    cli_runs: int
    throughput_images: int
    throughput_repeats: int
    bf16_backbone: str
    bf16_image_size: int
    bf16_images: int
    run_all: bool
    from_summary: str | None
    nih_root: str
    reports_dir: str
    profile: str
    sets: list[str]
    warm_feature_cache: bool
    notes: list[str] = field(default_factory=list)


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface of ``python -m pneumo_utils.bench``."""
    p = argparse.ArgumentParser(
        prog="python -m pneumo_utils.bench",
        description="Measure the project's speed claims; one line per figure, all in a JSON file.",
    )
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", dest="mode", action="store_const", const="quick",
                      help="small and fast (default): mobilenet_v2 at 96 px, 40 images per class")
    mode.add_argument("--full", dest="mode", action="store_const", const="full",
                      help="notebook 01's backbone at 224 px on all images, plus run_all (long)")
    p.set_defaults(mode="quick")
    p.add_argument("--data-root", default=os.environ.get("PNEUMO_DATA_ROOT", "data/chest_xray"),
                   help="Kermany folder (default: $PNEUMO_DATA_ROOT or %(default)s)")
    p.add_argument("--weights-dir", default=os.environ.get("PNEUMO_WEIGHTS_DIR"),
                   help="ImageNet .h5 files under Keras' names (exported as PNEUMO_WEIGHTS_DIR)")
    p.add_argument("--weights", default="imagenet",
                   help="imagenet (random if not found, as the full profile does), none, or a path")
    p.add_argument("--out", default="benchmarks/results.json", help="default: %(default)s")
    p.add_argument("--backbone", help="quick: mobilenet_v2; full: densenet121 (notebook 01)")
    p.add_argument("--image-size", type=int, help="quick: 96; full: 224")
    p.add_argument("--max-images-per-class", type=int,
                   help="per split and class; quick: 40; full: all (0 = all)")
    p.add_argument("--epochs", type=int, default=2, help="head epochs each way, >= 2 (default 2)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--learning-rate", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=42, help="notebook 01's seed (default %(default)s)")
    p.add_argument("--model", help="(c) a saved .keras model; full mode default: "
                   "saved_models/best.keras, else the best by validation AUC, else one built here")
    p.add_argument("--cli-runs", type=int, default=3, help="(c) predict CLI runs (median)")
    p.add_argument("--throughput-images", type=int, help="(c) test images; quick 64, full 256")
    p.add_argument("--throughput-repeats", type=int, default=3, help="(c) timed passes (median)")
    p.add_argument("--bf16-backbone", default="mobilenet_v2", help="(e) default: %(default)s")
    p.add_argument("--bf16-image-size", type=int, default=224, help="(e) default: %(default)s")
    p.add_argument("--bf16-images", type=int, default=64, help="(e) default: %(default)s")
    p.add_argument("--skip-run-all", action="store_true", help="(b, d) do not run the notebooks")
    p.add_argument("--from-summary", metavar="PATH",
                   help="(b) read an existing reports/summary.json instead of running the notebooks")
    p.add_argument("--nih-root", help="(b) NIH folder (default: DATA_ROOT/../nih if present)")
    p.add_argument("--reports-dir", default="reports",
                   help="(b) the runner's reports folder, as run_all.sh (default: %(default)s)")
    p.add_argument("--profile", default="full",
                   help="(b) the runner's profile (default: %(default)s, as run_all.sh)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="[NB.]KEY=VALUE",
                   help="(b) passed on to the runner, as run_all.sh does; repeatable")
    p.add_argument("--warm-feature-cache", action="store_true",
                   help="(b) let the notebooks reuse .cache/pneumo (default: a fresh, empty cache)")
    p.add_argument("--bf16-worker", metavar="SPEC.json", help=argparse.SUPPRESS)
    return p


def make_config(args: argparse.Namespace) -> Config:
    """Fill the per-mode defaults into the parsed arguments."""
    defaults = MODES[args.mode]
    max_per_class = args.max_images_per_class
    if max_per_class is None:
        max_per_class = defaults["max_images_per_class"]
    nih_root = args.nih_root
    if nih_root is None:
        sibling = Path(args.data_root).parent / "nih"
        nih_root = str(sibling) if sibling.is_dir() else "data/nih"
    return Config(
        mode=args.mode,
        data_root=args.data_root,
        weights_dir=args.weights_dir,
        weights=args.weights,
        out=args.out,
        backbone=args.backbone or defaults["backbone"],
        image_size=args.image_size or defaults["image_size"],
        max_images_per_class=max_per_class or None,
        epochs=args.epochs,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        seed=args.seed,
        val_fraction=0.15,
        model=args.model,
        cli_runs=max(1, args.cli_runs),
        throughput_images=args.throughput_images or defaults["throughput_images"],
        throughput_repeats=max(1, args.throughput_repeats),
        bf16_backbone=args.bf16_backbone,
        bf16_image_size=args.bf16_image_size,
        bf16_images=args.bf16_images,
        run_all=args.mode == "full" and not args.skip_run_all,
        from_summary=args.from_summary,
        nih_root=nih_root,
        reports_dir=args.reports_dir,
        profile=args.profile,
        sets=list(args.sets),
        warm_feature_cache=args.warm_feature_cache,
    )


# --------------------------------------------------------------------------- machine


def machine_info() -> dict[str, Any]:
    """CPU model, cores, RAM, bf16-relevant CPU flags, library versions, load average."""
    import tensorflow as tf

    cpu_model, flags = platform.processor() or "unknown", set()
    with contextlib.suppress(OSError), open("/proc/cpuinfo", encoding="utf-8") as handle:
        for line in handle:
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                cpu_model = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    ram_gib = None
    with contextlib.suppress(OSError, ValueError), open("/proc/meminfo", encoding="utf-8") as handle:
        for line in handle:
            if line.startswith("MemTotal:"):
                ram_gib = round(int(line.split()[1]) / 2**20, 1)
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        usable = os.cpu_count()
    return {
        "cpu_model": cpu_model,
        "cpu_cores_logical": os.cpu_count(),
        "cpu_cores_usable": usable,
        "cpu_bf16_flags": sorted(f for f in flags if "bf16" in f or f.startswith("amx")),
        "ram_gib": ram_gib,
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "load_average_at_start": _load_average(),
    }


def _load_average() -> list[float] | None:
    """The 1, 5 and 15 minute load averages (other work on the machine inflates timings)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def peak_rss_self_mib() -> float:
    """Peak resident memory of this process so far (Linux reports ``ru_maxrss`` in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# --------------------------------------------------------------------------- data


def load_split(cfg: Config) -> tuple[Paths, Labels, str]:
    """Paths and labels per split: patient-grouped validation carved from train, as notebook 01.

    Returns ``(paths, labels, description)``.
    """
    index = datasets.load_kermany(cfg.data_root)  # every file decode-checked, as notebook 01
    index = data.grouped_split(index, cfg.val_fraction, cfg.seed)
    index = data.subsample(index, cfg.max_images_per_class, cfg.seed)
    data.assert_no_patient_leak(index)
    pairs = {s: datasets.paths_and_labels(index, s) for s in SPLITS}
    paths = {s: p for s, (p, _) in pairs.items()}
    labels = {s: y for s, (_, y) in pairs.items()}
    description = "; ".join(
        f"{s}: {len(paths[s])} images ({int(labels[s].sum())} PNEUMONIA)" for s in SPLITS
    )
    return paths, labels, description


def resolve_weights(cfg: Config, backbone: str) -> str | None:
    """The weights file to build ``backbone`` with (``None``: random, and said so in the notes)."""
    if cfg.weights.lower() in ("none", "random", "null"):
        return None
    found = models.resolve_weights(backbone, cfg.weights, fallback="random")
    if found is None:
        cfg.notes.append(f"no ImageNet weights for {backbone}: random initialisation")
    return found


# --------------------------------------------------------------------------- (a) head training


class EpochTimer(keras.callbacks.Callback):
    """Records the wall time of every epoch (training pass, validation pass, callbacks)."""

    def __init__(self) -> None:
        super().__init__()
        self.seconds: list[float] = []
        self._start = 0.0

    def on_epoch_begin(self, epoch, logs=None):
        self._start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.seconds.append(time.perf_counter() - self._start)


def train_over_images(
    model: keras.Model, paths: Paths, labels: Labels, cfg: Config
) -> tuple[list[float], np.ndarray, float]:
    """The seeds' way: ``model.fit`` with the frozen base inside, over cached tf.data images.

    Returns the per-epoch seconds, the test probabilities (``models.predict_paths``) and the
    seconds that test prediction took.
    """
    data.set_seed(cfg.seed)
    size, batch = cfg.image_size, cfg.batch_size
    train_ds = data.image_dataset(paths["train"], labels["train"], size, batch, shuffle=True,
                                  seed=cfg.seed)
    val_ds = data.image_dataset(paths["val"], labels["val"], size, batch)
    train.compile_binary(model, cfg.learning_rate)
    timer = EpochTimer()
    train.fit(model, train_ds, val_ds, epochs=cfg.epochs, class_weight=data.class_weights(labels["train"]),
              patience=cfg.epochs, verbose=0, callbacks=[timer])
    start = time.perf_counter()
    proba = models.predict_paths(model, paths["test"], batch)
    return timer.seconds, proba, time.perf_counter() - start


def train_on_features(
    model: keras.Model, paths: Paths, labels: Labels, cfg: Config
) -> tuple[list[float], np.ndarray, dict[str, float]]:
    """The cached-features way: extract pooled features once, train the same head on arrays.

    Returns the per-epoch seconds, the test probabilities and the extraction seconds (one pass over all splits).
    """
    start = time.perf_counter()
    feats = features.extract_split_features(model, paths, cfg.batch_size, cache_dir=None, verbose=False)
    extraction = {"all splits": time.perf_counter() - start}
    data.set_seed(cfg.seed)
    timer = EpochTimer()
    train.fit_head_on_features(
        model, feats["train"], labels["train"], feats["val"], labels["val"],
        epochs=cfg.epochs, class_weight=data.class_weights(labels["train"]),
        learning_rate=cfg.learning_rate, batch_size=cfg.batch_size, patience=cfg.epochs,
        seed=cfg.seed, verbose=0, callbacks=[timer],
    )
    proba = models.head_on_features(model).predict(feats["test"], verbose=0).reshape(-1)
    return timer.seconds, proba, extraction


def head_weights(model: keras.Model) -> list[list[np.ndarray]]:
    """The head layers' weights, to start both ways from the same head."""
    return [layer.get_weights() for layer in model.layers if layer.name.startswith(models.HEAD_PREFIX)]


def set_head_weights(model: keras.Model, weights: list[list[np.ndarray]]) -> None:
    """Undo :func:`head_weights`."""
    head = [layer for layer in model.layers if layer.name.startswith(models.HEAD_PREFIX)]
    for layer, values in zip(head, weights, strict=True):
        layer.set_weights(values)


def bench_head_training(
    cfg: Config, paths: Paths, labels: Labels, figures: list[Figure]
) -> tuple[keras.Model, dict]:
    """Figure (a): per-epoch time and test AUC of head training over images vs on features.

    Returns the model (trained the features way; (c) may save and reuse it) and details.
    """
    from sklearn.metrics import roc_auc_score

    weights = resolve_weights(cfg, cfg.backbone)
    model = models.build_classifier(cfg.backbone, cfg.image_size, weights, seed=cfg.seed)
    initial_head = head_weights(model)

    progress(f"(a) {cfg.backbone} at {cfg.image_size} px: head over images, {cfg.epochs} epochs")
    image_epochs, image_proba, image_test_s = train_over_images(model, paths, labels, cfg)
    set_head_weights(model, initial_head)
    progress("(a) features once, then the same head on them")
    feature_epochs, feature_proba, extraction = train_on_features(model, paths, labels, cfg)

    auc_images = float(roc_auc_score(labels["test"], image_proba))
    auc_features = float(roc_auc_score(labels["test"], feature_proba))
    images_epoch = statistics.fmean(image_epochs[1:])
    features_epoch = statistics.fmean(feature_epochs[1:])
    speedup = images_epoch / features_epoch
    extract_s = sum(extraction.values())
    n_images = sum(len(p) for p in paths.values())
    later = f"mean of epochs 2-{cfg.epochs}"
    diff = abs(auc_images - auc_features)
    for figure in (
        Figure("a_images_epoch_s", images_epoch, "s", note=f"over images, {later}"),
        Figure("a_images_first_epoch_s", image_epochs[0], "s",
               note="tracing + decoding and caching the images"),
        Figure("a_features_epoch_s", features_epoch, "s", note=f"on cached features, {later}"),
        Figure("a_features_first_epoch_s", feature_epochs[0], "s", note="includes tracing"),
        Figure("a_feature_extraction_s", extract_s, "s",
               note=f"one-off, train+val+test, {n_images} images"),
        Figure("a_feature_extraction_images_per_s", n_images / extract_s, "images/s"),
        Figure("a_epoch_speedup", speedup, "x", f">= {TARGET_EPOCH_SPEEDUP:g} x",
               speedup >= TARGET_EPOCH_SPEEDUP, note=f"per epoch, {later}"),
        Figure("a_epoch_speedup_incl_first", sum(image_epochs) / sum(feature_epochs), "x",
               note="all epochs, first included"),
        Figure("a_test_auc_images", auc_images, ""),
        Figure("a_test_auc_features", auc_features, ""),
        Figure("a_test_auc_abs_diff", diff, "", f"<= {TARGET_AUC_DIFF:g}",
               diff <= TARGET_AUC_DIFF + 1e-9,  # 0.005 exactly is "equal within 0.005"
               note=f"after the same {cfg.epochs} epochs"),
    ):
        emit(figure, figures)
    details = {
        "backbone": cfg.backbone,
        "image_size": cfg.image_size,
        "weights": weights or "random initialisation",
        "epochs": cfg.epochs,
        "images_epoch_seconds": image_epochs,
        "features_epoch_seconds": feature_epochs,
        "feature_extraction_seconds": extraction,
        "images_test_prediction_seconds": image_test_s,
        "images_total_seconds": sum(image_epochs),
        "features_total_seconds": extract_s + sum(feature_epochs),
        "method": "same initial head weights, seed, split, class weights, optimiser and "
        "callbacks; epoch = training + validation pass; best validation-AUC epoch restored "
        "in both ways (EarlyStopping restore_best_weights), no early stop (patience = epochs)",
    }
    return model, details


# --------------------------------------------------------------------------- (c) prediction


def choose_model(cfg: Config, trained: keras.Model | None, workdir: Path) -> tuple[Path, str]:
    """The model (c) measures: ``--model``; in full mode the project's best saved model;
    otherwise the model trained in (a), saved to ``workdir``. Returns ``(path, origin)``."""
    if cfg.model:
        return Path(cfg.model), "--model"
    if cfg.mode == "full":
        best = best_saved_model(Path("saved_models"))
        if best is not None:
            return best, "best saved model"
    if trained is None:
        raise RuntimeError("no model to measure: (a) failed and no --model was given")
    path = workdir / "bench_model.keras"
    models.save_model(trained, path, models.model_metadata(trained, backbone=cfg.backbone))
    return path, f"trained in (a): {cfg.backbone} at {cfg.image_size} px"


def best_saved_model(folder: Path) -> Path | None:
    """``folder/best.keras`` (the runner's link), else the model whose sidecar has the highest
    validation AUC, else ``None``."""
    if (folder / "best.keras").is_file():
        return folder / "best.keras"
    scored = []
    for path in sorted(folder.glob("*.keras")):
        with contextlib.suppress(OSError, ValueError, AttributeError):
            meta = json.loads(path.with_suffix(".json").read_text())
            scored.append((float(meta["metrics"]["validation"]["auc"]), path))
    return max(scored)[1] if scored else None


def time_predict_cli(model_path: Path, image: str, runs: int) -> list[float]:
    """Wall seconds of ``python -m pneumo_utils.predict IMAGE --model MODEL``, one per run."""
    command = [sys.executable, "-m", "pneumo_utils.predict", image, "--model", str(model_path)]
    seconds = []
    for _ in range(runs):
        start = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        seconds.append(time.perf_counter() - start)
        if done.returncode != 0 or "Prediction:" not in done.stdout:
            raise RuntimeError(f"predict CLI failed ({done.returncode}): {done.stderr.strip()[-500:]}")
    return seconds


def time_tensorflow_import(runs: int) -> list[float]:
    """Wall seconds of ``python -c "import tensorflow"``: the floor under any CLI's start-up."""
    seconds = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import tensorflow"], capture_output=True, check=True)
        seconds.append(time.perf_counter() - start)
    return seconds


def time_throughput(model: keras.Model, paths: list[str], batch_size: int, repeats: int) -> dict[str, float]:
    """Images/s of ``models.predict_paths`` vs a bare ``model.predict`` on decoded images.

    Each way is warmed up once (tracing) and then timed ``repeats`` times; medians are kept.
    """
    size = int(model.inputs[0].shape[1])
    n = len(paths)

    def median_seconds(step: Callable[[], object]) -> float:
        step()  # warm-up: tracing, thread pools
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    start = time.perf_counter()
    pixels = data.load_images(paths, size)
    decode_s = time.perf_counter() - start
    project_s = median_seconds(lambda: models.predict_paths(model, paths, batch_size))
    bare_s = median_seconds(lambda: model.predict(pixels, batch_size=batch_size, verbose=0))
    return {
        "images": n,
        "project_images_per_s": n / project_s,
        "bare_images_per_s": n / bare_s,
        "bare_with_decode_images_per_s": n / (bare_s + decode_s),
        "decode_loop_seconds": decode_s,
    }


def bench_prediction(
    cfg: Config, trained: keras.Model | None, paths: Paths, workdir: Path, figures: list[Figure]
) -> dict:
    """Figure (c): the predict CLI on one image, and batch inference throughput."""
    model_path, origin = choose_model(cfg, trained, workdir)
    progress(f"(c) predict CLI x{cfg.cli_runs} and batch throughput with {model_path} ({origin})")
    test_paths = paths["test"][: cfg.throughput_images]
    cli = time_predict_cli(model_path, test_paths[0], cfg.cli_runs)
    tf_import = time_tensorflow_import(cfg.cli_runs)
    model, _ = models.load_model(model_path)
    speed = time_throughput(model, test_paths, cfg.batch_size, cfg.throughput_repeats)
    cli_s = statistics.median(cli)
    ratio = speed["project_images_per_s"] / speed["bare_images_per_s"]
    n = speed["images"]
    for figure in (
        Figure("c_predict_cli_s", cli_s, "s", f"<= {TARGET_PREDICT_CLI_SECONDS:g} s",
               cli_s <= TARGET_PREDICT_CLI_SECONDS,
               note=f"whole subprocess incl. imports and model load, median of {len(cli)}"),
        Figure("c_tensorflow_import_s", statistics.median(tf_import), "s",
               note=f"python -c 'import tensorflow' alone, median of {len(tf_import)}"),
        Figure("c_predict_paths_images_per_s", speed["project_images_per_s"], "images/s",
               note=f"models.predict_paths on {n} files, decoding included"),
        Figure("c_bare_predict_images_per_s", speed["bare_images_per_s"], "images/s",
               note="model.predict on a pre-decoded array, decoding excluded"),
        Figure("c_bare_predict_with_decode_images_per_s", speed["bare_with_decode_images_per_s"],
               "images/s", note="decoding loop + model.predict"),
        Figure("c_throughput_ratio", ratio, "", f">= {TARGET_THROUGHPUT_RATIO:g}",
               ratio >= TARGET_THROUGHPUT_RATIO,
               note="predict_paths / bare model.predict (decoding excluded from bare)"),
        Figure("c_throughput_ratio_vs_bare_with_decode",
               speed["project_images_per_s"] / speed["bare_with_decode_images_per_s"], ""),
    ):
        emit(figure, figures)
    return {"model": str(model_path), "model_origin": origin, "image_size":
            int(model.inputs[0].shape[1]), "cli_seconds": cli, "tensorflow_import_seconds": tf_import, **speed}


# --------------------------------------------------------------------------- (e) bf16


def bf16_worker(spec_path: str) -> int:
    """Subprocess side of (e): forward-pass images/s with the fp32 and the bf16 policy.

    Both extractors are built first (a Keras dtype policy applies when a layer is built),
    warmed up, then timed in turns so drifting load on a shared machine hits both alike.
    """
    spec = json.loads(Path(spec_path).read_text())
    pixels = data.load_images(spec["paths"], spec["image_size"])
    extractors = {}
    for policy in ("float32", "mixed_bfloat16"):
        keras.mixed_precision.set_global_policy(policy)
        model = models.build_classifier(spec["backbone"], spec["image_size"], spec["weights"], seed=0)
        extractors[policy] = models.pooled_features_model(model)
    keras.mixed_precision.set_global_policy("float32")
    batch = spec["batch_size"]
    feats = {p: e.predict(pixels, batch_size=batch, verbose=0) for p, e in extractors.items()}
    times: dict[str, list[float]] = {p: [] for p in extractors}
    for _ in range(spec["repeats"]):
        for policy, extractor in extractors.items():
            start = time.perf_counter()
            feats[policy] = extractor.predict(pixels, batch_size=batch, verbose=0)
            times[policy].append(time.perf_counter() - start)
    fp32 = np.asarray(feats["float32"], np.float32)
    bf16 = np.asarray(feats["mixed_bfloat16"], np.float32)
    result = {
        "images": len(pixels),
        "seconds": times,
        "fp32_images_per_s": len(pixels) / statistics.median(times["float32"]),
        "bf16_images_per_s": len(pixels) / statistics.median(times["mixed_bfloat16"]),
        "relative_difference": float(np.linalg.norm(bf16 - fp32) / max(np.linalg.norm(fp32), 1e-12)),
    }
    Path(spec["out"]).write_text(json.dumps(result))
    return 0


def bench_bf16(cfg: Config, paths: Paths, workdir: Path, figures: list[Figure]) -> dict:
    """Figure (e): does ``mixed_bfloat16`` speed up the backbone forward pass on this CPU?"""
    pool = paths["test"] + paths["val"] + paths["train"]
    chosen = (pool * (cfg.bf16_images // max(len(pool), 1) + 1))[: cfg.bf16_images]
    spec = {
        "paths": chosen,
        "backbone": cfg.bf16_backbone,
        "image_size": cfg.bf16_image_size,
        "weights": resolve_weights(cfg, cfg.bf16_backbone),
        "batch_size": cfg.batch_size,
        "repeats": 3,
        "out": str(workdir / "bf16.json"),
    }
    spec_path = workdir / "bf16_spec.json"
    spec_path.write_text(json.dumps(spec))
    progress(f"(e) fp32 vs bf16 forward pass, {cfg.bf16_backbone} at {cfg.bf16_image_size} px, "
             f"{len(chosen)} images (subprocess)")
    done = subprocess.run([sys.executable, "-m", "pneumo_utils.bench", "--bf16-worker",
                           str(spec_path)], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"bf16 worker failed ({done.returncode}): {done.stderr.strip()[-800:]}")
    result = json.loads(Path(spec["out"]).read_text())
    speedup = result["bf16_images_per_s"] / result["fp32_images_per_s"]
    what = f"{cfg.bf16_backbone} at {cfg.bf16_image_size} px, {result['images']} pre-decoded images"
    for figure in (
        Figure("e_fp32_images_per_s", result["fp32_images_per_s"], "images/s", note=what),
        Figure("e_bf16_images_per_s", result["bf16_images_per_s"], "images/s", note=what),
        Figure("e_bf16_speedup", speedup, "x",
               note="bf16 / fp32; the code base stays fp32 unless this is clearly above 1"),
        Figure("e_bf16_feature_relative_difference", result["relative_difference"], "",
               note="||f_bf16 - f_fp32|| / ||f_fp32|| over the pooled features"),
    ):
        emit(figure, figures)
    return {**result, "backbone": cfg.bf16_backbone, "image_size": cfg.bf16_image_size,
            "weights": spec["weights"] or "random initialisation"}


# --------------------------------------------------------------------------- (b, d) run_all

_RUSAGE_WRAPPER = """\
import json, resource, subprocess, sys
rc = subprocess.call(sys.argv[2:])
peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
with open(sys.argv[1], "w") as handle:
    json.dump({"returncode": rc, "children_max_rss_kib": peak}, handle)
sys.exit(rc)
"""
"""Runs a command and records ``RUSAGE_CHILDREN.ru_maxrss``: the largest peak RSS of any
process in the tree below it that was waited for (Linux folds grandchildren in on wait)."""


class TreeMemoryPoller(threading.Thread):
    """Polls ``/proc`` for every process below ``root_pid`` and keeps each one's peak RSS.

    ``VmHWM`` is the kernel's own high-water mark of a process, so a poll only has to come
    while the process lives; nothing between polls is missed except the growth in the last
    interval before a process exits.
    """

    def __init__(self, root_pid: int, interval: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.root_pid, self.interval = root_pid, interval
        self.peaks_kib: dict[int, int] = {}
        self.commands: dict[int, str] = {}
        self.max_total_kib = 0
        self._halt = threading.Event()

    def stop(self) -> None:
        self._halt.set()
        self.join()

    def run(self) -> None:
        while not self._halt.is_set():
            total = 0
            for pid in _descendants(self.root_pid):
                status = _proc_status(pid)
                if not status:
                    continue
                total += status.get("VmRSS", 0)
                self.peaks_kib[pid] = max(self.peaks_kib.get(pid, 0), status.get("VmHWM", 0))
                # re-read: a child seen between fork and exec still shows its parent's command
                self.commands[pid] = _proc_command(pid) or self.commands.get(pid, "")
            self.max_total_kib = max(self.max_total_kib, total)
            self._halt.wait(self.interval)


def _descendants(root: int) -> list[int]:
    """PIDs of every process below ``root`` (``root`` excluded), from ``/proc/*/stat``."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        with contextlib.suppress(OSError, IndexError, ValueError):
            stat = Path(f"/proc/{entry}/stat").read_text()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry))
    found, queue = [], [root]
    while queue:
        for child in children.get(queue.pop(), []):
            found.append(child)
            queue.append(child)
    return found


def _proc_status(pid: int) -> dict[str, int]:
    """``VmRSS`` and ``VmHWM`` (KiB) of a process, or ``{}`` when it has gone."""
    values = {}
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                values[key] = int(rest.split()[0])
    return values


def _proc_command(pid: int) -> str:
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:300]
    return ""


def run_notebooks(cfg: Config, workdir: Path) -> tuple[dict, dict]:
    """Run the notebooks (full profile) with the runner in a subprocess, watching its memory.

    Returns the runner's ``summary.json`` and the memory details. Unless
    ``warm_feature_cache``, the notebooks get a fresh, empty feature cache, so the time is
    that of a first run.
    """
    reports = Path(cfg.reports_dir)
    runner = [sys.executable, "-m", "pneumo_utils.runner", "--profile", cfg.profile,
              "--data-root", cfg.data_root, "--nih-root", cfg.nih_root,
              "--reports-dir", str(reports)]
    if cfg.weights_dir:
        runner += ["--weights-dir", cfg.weights_dir]
    if not cfg.warm_feature_cache:
        runner += ["--set", f"cache_dir={workdir / 'notebook_cache'}"]
    for item in cfg.sets:
        runner += ["--set", item]
    rusage_file = workdir / "rusage.json"
    log_path = reports / "bench_runner.log"
    reports.mkdir(parents=True, exist_ok=True)
    progress(f"(b) {' '.join(runner)}  (log: {log_path})")
    with open(log_path, "w", encoding="utf-8") as log:
        process = subprocess.Popen([sys.executable, "-c", _RUSAGE_WRAPPER, str(rusage_file),
                                    *runner], stdout=log, stderr=subprocess.STDOUT)
        poller = TreeMemoryPoller(process.pid)
        poller.start()
        returncode = process.wait()
        poller.stop()
    summary = json.loads((reports / "summary.json").read_text())
    rusage = json.loads(rusage_file.read_text()) if rusage_file.is_file() else {}
    processes = [
        {"pid": pid, "peak_mib": kib / 1024, "command": poller.commands.get(pid, "")}
        for pid, kib in sorted(poller.peaks_kib.items())
    ]
    runner_peak = max((p["peak_mib"] for p in processes if "pneumo_utils.runner" in p["command"]),
                      default=0.0)
    kernel_peak = max((p["peak_mib"] for p in processes if "kernel" in p["command"]), default=0.0)
    concurrent = poller.max_total_kib / 1024
    memory = {
        "runner_returncode": returncode,
        "runner_peak_mib": runner_peak,
        "kernel_peak_mib": kernel_peak,
        "peak_mib": max(concurrent, runner_peak + kernel_peak),
        "max_process_peak_mib": max((p["peak_mib"] for p in processes), default=0.0),
        "polled_max_concurrent_total_mib": concurrent,
        "rusage_children_max_mib": rusage.get("children_max_rss_kib", 0) / 1024,
        "processes": processes,
    }
    return summary, memory


def bench_run_all(cfg: Config, workdir: Path, figures: list[Figure]) -> tuple[dict, dict | None]:
    """Figure (b): seconds per notebook of the full profile (and memory for (d) when run here)."""
    memory = None
    if cfg.from_summary:
        summary = json.loads(Path(cfg.from_summary).read_text())
        source = f"read from {cfg.from_summary}"
    else:
        summary, memory = run_notebooks(cfg, workdir)
        source = f"runner run by the benchmark, reports in {cfg.reports_dir}"
    notebooks = summary.get("notebooks", {})
    total = 0.0
    for name, entry in notebooks.items():
        seconds, status = float(entry["seconds"]), entry.get("status", "?")
        total += seconds
        emit(Figure(f"b_{name}_s", seconds, "s", note=f"status {status}"), figures)
    all_ok = all(e.get("status") == "ok" for e in notebooks.values())
    emit(Figure("b_all_notebooks_s", total, "s", f"<= {TARGET_ALL_NOTEBOOKS_SECONDS / 60:g} min",
                all_ok and total <= TARGET_ALL_NOTEBOOKS_SECONDS,
                note=f"{len(notebooks)} notebook(s), profile {summary.get('profile')}"), figures)
    if len(notebooks) != 4:
        cfg.notes.append(f"(b) the summary has {len(notebooks)} notebook(s), not 4")
    return {"source": source, "profile": summary.get("profile"), "generated":
            summary.get("generated"), "notebooks": {n: {"seconds": e["seconds"], "status":
            e.get("status")} for n, e in notebooks.items()}}, memory


def bench_memory(memory: dict | None, scope: str, figures: list[Figure]) -> dict:
    """Figure (d): peak resident memory of the notebook run, or of this process."""
    target = f"< {TARGET_PEAK_MIB / 1024:g} GiB"
    if memory is not None:
        peak = memory["peak_mib"]
        emit(Figure("d_peak_rss_mib", peak, "MiB", target, peak < TARGET_PEAK_MIB,
                    note="the larger of: runner peak + largest kernel peak (VmHWM), and the "
                    "largest total of all processes below the runner seen by polling"), figures)
        emit(Figure("d_peak_rss_kernel_mib", memory["kernel_peak_mib"], "MiB",
                    note="largest notebook kernel"), figures)
        emit(Figure("d_peak_rss_runner_mib", memory["runner_peak_mib"], "MiB"), figures)
        emit(Figure("d_peak_rss_bench_mib", peak_rss_self_mib(), "MiB",
                    note="this benchmark process ((a) keeps the decoded images in memory)"), figures)
        return {**memory, "scope": "run_all: runner + notebook kernels"}
    peak = peak_rss_self_mib()
    emit(Figure("d_peak_rss_mib", peak, "MiB", target, peak < TARGET_PEAK_MIB, note=scope),
         figures)
    return {"scope": scope, "peak_mib": peak}


# --------------------------------------------------------------------------- main


def write_results(cfg: Config, figures: list[Figure], machine: dict, details: dict,
                  failures: list[str], started: dt.datetime) -> Path:
    """Write the JSON: figures by name, machine, date, settings, details and notes."""
    machine = {**machine, "load_average_at_end": _load_average()}
    targets = [f for f in figures if f.target is not None]
    result = {
        "date": started.isoformat(timespec="seconds"),
        "seconds": round((dt.datetime.now().astimezone() - started).total_seconds(), 1),
        "mode": cfg.mode,
        "command": "python -m pneumo_utils.bench " + " ".join(sys.argv[1:]),
        "machine": machine,
        "settings": {k: v for k, v in asdict(cfg).items() if k != "notes"},
        "figures": {f.name: {k: v for k, v in asdict(f).items() if k != "name"} for f in figures},
        "targets_met": f"{sum(bool(f.met) for f in targets)}/{len(targets)}",
        "details": details,
        "notes": cfg.notes,
        "failures": failures,
    }
    out = Path(cfg.out)
    models.write_json_atomic(out, result)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; 0 when every figure was measured, 1 otherwise, 2 on bad usage."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.bf16_worker:
        return bf16_worker(args.bf16_worker)
    if args.epochs < 2:
        parser.error("--epochs must be at least 2 (the first epoch is reported apart)")
    cfg = make_config(args)
    if cfg.weights_dir:
        os.environ["PNEUMO_WEIGHTS_DIR"] = str(Path(cfg.weights_dir).resolve())
        cfg.weights_dir = os.environ["PNEUMO_WEIGHTS_DIR"]
    if not Path(cfg.data_root).is_dir():
        print(f"error: data root {cfg.data_root} does not exist", file=sys.stderr)
        return 2
    if cfg.mode == "quick":
        cfg.notes.append(
            "quick mode: few, small images, so fixed per-epoch and start-up overheads dominate "
            "the timings; the targets are meant for the full mode"
        )
    started = dt.datetime.now().astimezone()
    machine = machine_info()
    figures: list[Figure] = []
    details: dict[str, Any] = {}
    failures: list[str] = []

    def attempt(key: str, step: Callable[..., Any], *step_args: Any) -> Any:
        try:
            return step(*step_args)
        except Exception as exc:  # one figure failing must not lose the others
            failures.append(f"({key}) {type(exc).__name__}: {exc}")
            emit(Figure(f"{key}_failed", None, note=f"FAILED: {type(exc).__name__}: {exc}"), figures)
            return None

    try:
        paths, labels, description = load_split(cfg)
    except (datasets.DatasetLayoutError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    details["data"] = description
    progress(f"data: {description}")
    with tempfile.TemporaryDirectory(prefix="pneumo-bench-") as tmp:
        workdir = Path(tmp)
        memory = None
        if cfg.run_all or cfg.from_summary:  # first, so that (c) can use the model it saves
            outcome = attempt("b", bench_run_all, cfg, workdir, figures)
            if outcome is not None:
                details["b"], memory = outcome
        else:
            why = "quick mode" if cfg.mode == "quick" else "--skip-run-all"
            emit(Figure("b_all_notebooks_s", None, "s", note=f"skipped ({why})"), figures)
        trained = None
        result = attempt("a", bench_head_training, cfg, paths, labels, figures)
        if result is not None:
            trained, details["a"] = result
        details["c"] = attempt("c", bench_prediction, cfg, trained, paths, workdir, figures)
        details["e"] = attempt("e", bench_bf16, cfg, paths, workdir, figures)
        scope = "this benchmark process (the notebooks were not run by it)"
        details["d"] = bench_memory(memory, scope, figures)
    out = write_results(cfg, figures, machine, details, failures, started)
    progress(f"wrote {out}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
