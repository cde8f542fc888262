"""Measure the project's speed claims: one printed line per figure, all of them in a JSON file.

    python benchmarks/bench.py --quick                     # a few minutes: checks the plumbing
    python benchmarks/bench.py --full --data-root ../shared/data/chest_xray \\
        --weights-dir ../shared/weights --out benchmarks/results.json

Figures (method and results: ``benchmarks/README.md``):

(a) head training over images vs on cached features: seconds per epoch, speed-up, one-off
    feature extraction, test AUC of each way;
(b) wall time of ``./run_all.sh --full`` per notebook (full mode only);
(c) the ``predict`` command on one image (model load included) and batch-prediction
    throughput against a bare ``model.predict``;
(d) peak resident memory of this process and everything it starts (psutil, sampled);
(e) backbone forward pass with the ``float32`` and ``mixed_bfloat16`` policies.

Stdout holds only the figure lines (``name: value unit``, with ``[target ...: met | NOT MET]``
where the project sets a target); progress goes to stderr. Exit status 0 when every figure was
measured, 1 when one failed (the others are still written), 2 on bad usage.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import operator
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import keras
import numpy as np
import psutil
from sklearn.metrics import roc_auc_score

from pneumo_utils.data import datasets, kermany, pipelines, splits
from pneumo_utils.model import backbones, features, inference, saving

ROOT = Path(__file__).resolve().parents[1]

MODES = {
    "quick": {"backbone": "mobilenet_v2", "image_size": 96, "max_images_per_class": 40,
              "throughput_images": 64, "repeats": 1, "cli_runs": 1,
              "bf16_backbone": "mobilenet_v2", "bf16_image_size": None, "bf16_images": 32},
    "full": {"backbone": "densenet121", "image_size": 224, "max_images_per_class": None,
             "throughput_images": 256, "repeats": 3, "cli_runs": 3,
             "bf16_backbone": "mobilenet_v2", "bf16_image_size": 224, "bf16_images": 64},
}
"""Settings per mode; the full mode trains notebook 01's backbone at its image size on every
image. ``bf16_image_size`` ``None`` means the image size of (a)."""

TARGETS = {
    "a_epoch_speedup": (">=", 20.0),
    "a_test_auc_abs_diff": ("<=", 0.005),
    "b_all_notebooks_s": ("<=", 20 * 60.0),
    "c_predict_cli_s": ("<=", 5.0),
    "c_throughput_ratio": (">=", 0.9),
    "d_peak_rss_mib": ("<", 8 * 1024.0),
}
"""The targets the project states, as ``figure name -> (comparison, bound)``."""

_COMPARE = {">=": operator.ge, "<=": operator.le, "<": operator.lt}
SPLITS = ("train", "val", "test")
_STARTED = time.monotonic()


def progress(message: str) -> None:
    """Progress, with elapsed seconds, on stderr (stdout holds only the figure lines)."""
    print(f"[bench {time.monotonic() - _STARTED:6.0f} s] {message}", file=sys.stderr, flush=True)


class Figures(dict):
    """The measured figures by name, each printed the moment it is added."""

    def add(self, name: str, value: float, unit: str = "", note: str = "", met: bool | None = None) -> None:
        """Record one figure; its verdict comes from :data:`TARGETS` unless ``met`` is given."""
        target = None
        if name in TARGETS:
            comparison, bound = TARGETS[name]
            target = f"{comparison} {bound:g} {unit}".rstrip()
            if met is None:
                met = bool(_COMPARE[comparison](value, bound))
        self[name] = {"value": value, "unit": unit, "target": target, "met": met, "note": note}
        text = f"{value:.4f}" if isinstance(value, float) and abs(value) < 1 else f"{value:.4g}"
        line = f"{name}: {text} {unit}".rstrip()
        if target is not None:
            line += f"  [target {target}: {'met' if met else 'NOT MET'}]"
        print(line, flush=True)


class MemorySampler(threading.Thread):
    """Samples the resident memory of a process and all its descendants with psutil.

    Keeps the largest total seen at one moment and each process's largest RSS. Sampling
    every ``interval`` seconds can miss a spike shorter than that.
    """

    def __init__(self, pid: int, interval: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.root, self.interval = psutil.Process(pid), interval
        self.max_total_mib = 0.0
        self.peaks: dict[int, tuple[float, str]] = {}
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            total = 0.0
            for process in [self.root, *self.root.children(recursive=True)]:
                try:
                    rss = process.memory_info().rss / 2**20
                    command = " ".join(process.cmdline())[:200]
                except psutil.Error:  # the process ended between listing and reading
                    continue
                total += rss
                if rss > self.peaks.get(process.pid, (0.0, ""))[0]:
                    self.peaks[process.pid] = (rss, command)
            self.max_total_mib = max(self.max_total_mib, total)
            self._halt.wait(self.interval)

    def stop(self) -> None:
        self._halt.set()
        self.join()


class EpochTimer(keras.callbacks.Callback):
    """Wall seconds of every epoch: training pass, validation pass and callbacks."""

    def __init__(self) -> None:
        super().__init__()
        self.seconds: list[float] = []

    def on_epoch_begin(self, epoch, logs=None):
        self._start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.seconds.append(time.perf_counter() - self._start)


def machine() -> dict[str, Any]:
    """CPU model and bf16-related flags, cores, RAM, library versions and load average."""
    import tensorflow as tf

    cpu_model, flags = platform.processor() or "unknown", []
    if Path("/proc/cpuinfo").is_file():
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                cpu_model = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = [f for f in value.split() if "bf16" in f or f.startswith("amx")]
    return {
        "cpu_model": cpu_model, "cpu_bf16_flags": sorted(flags),
        "cpu_cores_logical": psutil.cpu_count(),
        "cpu_cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "ram_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(), "platform": platform.platform(),
        "tensorflow": tf.__version__, "keras": keras.__version__,
        "load_average_at_start": [round(x, 2) for x in psutil.getloadavg()],
    }


def load_split(data_root: str, max_per_class: int | None, seed: int) -> tuple[dict, dict]:
    """Paths and labels per split; validation carved from train by patient, as in notebook 01."""
    index = kermany.load_kermany(data_root)
    index = splits.grouped_split(index, 0.15, seed)
    index = splits.subsample(index, max_per_class, seed)
    splits.assert_no_patient_leak(index)
    pairs = {split: datasets.paths_and_labels(index, split) for split in SPLITS}
    return {s: p for s, (p, _) in pairs.items()}, {s: y for s, (_, y) in pairs.items()}


def fit_timed(model: keras.Model, x, y, validation_data, epochs: int, class_weight: dict,
              batch_size: int | None = None) -> list[float]:
    """Compile and fit as the notebooks do; returns the seconds of each epoch.

    ``EarlyStopping(restore_best_weights=True)`` keeps the best validation-AUC epoch; its
    patience equals ``epochs``, so both ways run every epoch.
    """
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="binary_crossentropy",
                  metrics=[keras.metrics.AUC(name="auc")])
    timer = EpochTimer()
    stop = keras.callbacks.EarlyStopping(monitor="val_auc", mode="max", patience=epochs,
                                         restore_best_weights=True)
    model.fit(x, y, validation_data=validation_data, epochs=epochs, batch_size=batch_size,
              class_weight=class_weight, callbacks=[stop, timer], verbose=0)
    return timer.seconds


def bench_head_training(args, paths: dict, labels: dict, figures: Figures) -> keras.Model:
    """(a) One frozen-base classifier; the same initial head trained over images, then on features."""
    weights = None if args.weights == "none" else backbones.resolve_weights(args.backbone, "imagenet", fallback="random")
    model = backbones.build_classifier(args.backbone, args.image_size, weights, seed=args.seed)
    head = [layer for layer in model.layers if layer.name.startswith(backbones.HEAD_PREFIX)]
    initial = [layer.get_weights() for layer in head]
    weight_of = pipelines.class_weights(labels["train"])
    size, batch = args.image_size, args.batch_size

    progress(f"(a) {args.backbone} at {size} px, weights {weights or 'random'}: head over images")
    keras.utils.set_random_seed(args.seed)
    train_ds = pipelines.image_dataset(paths["train"], labels["train"], image_size=size,
                                  batch_size=batch, shuffle=True, seed=args.seed)
    val_ds = pipelines.image_dataset(paths["val"], labels["val"], image_size=size, batch_size=batch)
    images_epochs = fit_timed(model, train_ds, None, val_ds, args.epochs, weight_of)
    auc_images = roc_auc_score(labels["test"], inference.predict_paths(model, paths["test"], batch))

    progress("(a) features once, then the same initial head on them")
    for layer, values in zip(head, initial, strict=True):
        layer.set_weights(values)
    start = time.perf_counter()
    feats = features.extract_split_features(model, paths, batch, cache_dir=None, verbose=False)
    extraction = time.perf_counter() - start
    keras.utils.set_random_seed(args.seed)
    head_model = backbones.head_on_features(model)
    feature_epochs = fit_timed(head_model, feats["train"], labels["train"].astype("float32"),
                               (feats["val"], labels["val"].astype("float32")), args.epochs,
                               weight_of, batch_size=batch)
    auc_features = roc_auc_score(labels["test"], head_model.predict(feats["test"], verbose=0).ravel())

    later = f"mean of epochs 2-{args.epochs}"
    n_images = sum(len(p) for p in paths.values())
    figures.add("a_images_epoch_s", statistics.fmean(images_epochs[1:]), "s", f"over images, {later}")
    figures.add("a_images_first_epoch_s", images_epochs[0], "s", "tracing + decoding and caching the images")
    figures.add("a_features_epoch_s", statistics.fmean(feature_epochs[1:]), "s", f"on cached features, {later}")
    figures.add("a_features_first_epoch_s", feature_epochs[0], "s", "includes tracing")
    figures.add("a_feature_extraction_s", extraction, "s", f"one-off, train+val+test, {n_images} images")
    figures.add("a_feature_extraction_images_per_s", n_images / extraction, "images/s")
    figures.add("a_epoch_speedup", figures["a_images_epoch_s"]["value"] / figures["a_features_epoch_s"]["value"],
                "x", f"per epoch, {later}")
    figures.add("a_epoch_speedup_incl_first", sum(images_epochs) / sum(feature_epochs), "x", "all epochs")
    figures.add("a_test_auc_images", float(auc_images))
    figures.add("a_test_auc_features", float(auc_features))
    figures.add("a_test_auc_abs_diff", abs(float(auc_images) - float(auc_features)), "",
                f"after the same {args.epochs} epochs")
    return model


def run_notebooks(args, workdir: Path, figures: Figures) -> None:
    """(b) ``./run_all.sh --full`` in a subprocess with a fresh feature cache, or a summary read back."""
    if args.from_summary:
        summary_path = Path(args.from_summary)
    else:
        command = [str(ROOT / "run_all.sh"), "--full", "--data-root", args.data_root,
                   "--nih-root", args.nih_root, "--set", f"cache_dir={workdir / 'notebook_cache'}"]
        if args.weights_dir:
            command += ["--weights-dir", args.weights_dir]
        log = ROOT / "reports" / "bench_run_all.log"
        log.parent.mkdir(exist_ok=True)
        progress(f"(b) {' '.join(command)}  (log: {log})")
        with open(log, "w", encoding="utf-8") as handle:
            subprocess.run(command, cwd=ROOT, stdout=handle, stderr=subprocess.STDOUT, check=False)
        summary_path = ROOT / "reports" / "summary.json"
    notebooks = json.loads(summary_path.read_text())["notebooks"]
    for name, entry in notebooks.items():
        figures.add(f"b_{name}_s", float(entry["seconds"]), "s", f"status {entry.get('status')}")
    all_ok = all(entry.get("status") == "ok" for entry in notebooks.values())
    total = sum(float(entry["seconds"]) for entry in notebooks.values())
    figures.add("b_all_notebooks_s", total, "s", f"{len(notebooks)} notebooks from {summary_path}",
                met=all_ok and total <= TARGETS["b_all_notebooks_s"][1])


def median_seconds(step: Callable[[], object], repeats: int) -> float:
    """Median wall seconds of ``step`` over ``repeats`` runs after one warm-up run."""
    step()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_prediction(args, model: keras.Model | None, paths: dict, workdir: Path, figures: Figures) -> None:
    """(c) The predict command on one image, and batch throughput against bare ``model.predict``."""
    if args.model:
        model_path = Path(args.model)
    elif model is not None:
        model_path = saving.save_model(model, workdir / "bench.keras", saving.model_metadata(model))
    else:
        raise RuntimeError("no model to measure: (a) failed and no --model was given")
    image = paths["test"][0]
    progress(f"(c) predict command x{args.cli_runs} and throughput with {model_path}")

    def timed(command: list[str]) -> float:
        start = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed: {done.stderr.strip()[-500:]}")
        return time.perf_counter() - start

    cli = [timed([sys.executable, "-m", "pneumo_utils.deploy.predict", image, "--model", str(model_path)])
           for _ in range(args.cli_runs)]
    tf_import = [timed([sys.executable, "-c", "import tensorflow"]) for _ in range(args.cli_runs)]
    model, _ = saving.load_model(model_path)
    test = paths["test"][: args.throughput_images]
    size, batch, n = int(model.inputs[0].shape[1]), args.batch_size, len(test)
    start = time.perf_counter()
    pixels = pipelines.load_images(test, size)
    decode = time.perf_counter() - start
    project = median_seconds(lambda: inference.predict_paths(model, test, batch), args.repeats)
    bare = median_seconds(lambda: model.predict(pixels, batch_size=batch, verbose=0), args.repeats)

    figures.add("c_predict_cli_s", statistics.median(cli), "s",
                f"whole process incl. imports and model load, median of {len(cli)}")
    figures.add("c_tensorflow_import_s", statistics.median(tf_import), "s", "python -c 'import tensorflow'")
    figures.add("c_predict_paths_images_per_s", n / project, "images/s", f"{n} files, decoding included")
    figures.add("c_bare_predict_images_per_s", n / bare, "images/s", "pre-decoded array")
    figures.add("c_bare_predict_with_decode_images_per_s", n / (bare + decode), "images/s",
                "sequential decoding loop + model.predict")
    figures.add("c_throughput_ratio", bare / project, "", "predict_paths / bare model.predict")
    figures.add("c_throughput_ratio_vs_bare_with_decode", (bare + decode) / project, "")


def bench_bf16(args, paths: dict, figures: Figures) -> None:
    """(e) Pooled-feature extraction under the float32 and the mixed_bfloat16 policy.

    A Keras dtype policy applies when a layer is built, so both extractors are built first,
    then timed in turns (drifting load on a shared machine hits both alike).
    """
    size = args.bf16_image_size or args.image_size
    pool = paths["test"] + paths["val"] + paths["train"]
    pixels = pipelines.load_images((pool * (args.bf16_images // len(pool) + 1))[: args.bf16_images], size)
    weights = None if args.weights == "none" else backbones.resolve_weights(args.bf16_backbone, "imagenet", fallback="random")
    progress(f"(e) float32 vs mixed_bfloat16, {args.bf16_backbone} at {size} px, {len(pixels)} images")
    extractors = {}
    for policy in ("float32", "mixed_bfloat16"):
        keras.mixed_precision.set_global_policy(policy)
        classifier = backbones.build_classifier(args.bf16_backbone, size, weights, seed=0)
        extractors[policy] = backbones.pooled_features_model(classifier)
    keras.mixed_precision.set_global_policy("float32")
    outputs = {p: np.asarray(e.predict(pixels, batch_size=args.batch_size, verbose=0), np.float32)
               for p, e in extractors.items()}
    times: dict[str, list[float]] = {p: [] for p in extractors}
    for _ in range(args.repeats):
        for policy, extractor in extractors.items():
            start = time.perf_counter()
            extractor.predict(pixels, batch_size=args.batch_size, verbose=0)
            times[policy].append(time.perf_counter() - start)
    fp32, bf16 = (len(pixels) / statistics.median(times[p]) for p in extractors)
    what = f"{args.bf16_backbone} at {size} px, {len(pixels)} pre-decoded images"
    figures.add("e_fp32_images_per_s", fp32, "images/s", what)
    figures.add("e_bf16_images_per_s", bf16, "images/s", what)
    figures.add("e_bf16_speedup", bf16 / fp32, "x", "the code stays fp32 unless this is clearly above 1")
    difference = outputs["mixed_bfloat16"] - outputs["float32"]
    figures.add("e_bf16_feature_relative_difference",
                float(np.linalg.norm(difference) / max(np.linalg.norm(outputs["float32"]), 1e-12)),
                "", "||f_bf16 - f_fp32|| / ||f_fp32||")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Command-line options, with the per-mode settings of :data:`MODES` filled in."""
    parser = argparse.ArgumentParser(prog="python benchmarks/bench.py", description=__doc__.split("\n")[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", dest="mode", action="store_const", const="quick",
                      help="mobilenet_v2 at 96 px, 40 images per class, no notebooks (default)")
    mode.add_argument("--full", dest="mode", action="store_const", const="full",
                      help="notebook 01's densenet121 at 224 px on every image, plus ./run_all.sh --full")
    parser.set_defaults(mode="quick")
    parser.add_argument("--data-root", default=os.environ.get("PNEUMO_DATA_ROOT", "data/chest_xray"),
                        help="Kermany folder (default: $PNEUMO_DATA_ROOT or %(default)s)")
    parser.add_argument("--nih-root", help="(b) NIH folder (default: DATA_ROOT/../nih)")
    parser.add_argument("--weights-dir", default=os.environ.get("PNEUMO_WEIGHTS_DIR"),
                        help="folder of ImageNet .h5 files under Keras' names; random weights when absent")
    parser.add_argument("--weights", choices=("imagenet", "none"), default="imagenet")
    parser.add_argument("--out", default="benchmarks/results.json", help="default: %(default)s")
    parser.add_argument("--image-size", type=int, help="(a, c) quick: 96, full: 224")
    parser.add_argument("--max-images-per-class", type=int, help="per split; quick: 40, full: all")
    parser.add_argument("--epochs", type=int, default=2, help="(a) epochs each way, >= 2 (default 2)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=42, help="notebook 01's seed (%(default)s)")
    parser.add_argument("--model", help="(c) a saved .keras model (default: the one trained in (a))")
    parser.add_argument("--from-summary", metavar="PATH", help="(b) read a reports/summary.json instead of running")
    args = parser.parse_args(argv)
    if args.epochs < 2:
        parser.error("--epochs must be at least 2 (the first epoch is reported apart)")
    for key, value in MODES[args.mode].items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    args.nih_root = args.nih_root or str(Path(args.data_root).parent / "nih")
    if args.weights_dir:
        args.weights_dir = os.environ["PNEUMO_WEIGHTS_DIR"] = str(Path(args.weights_dir).resolve())
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run every figure's measurement; 0 when all were measured, 1 when one failed, 2 on bad usage."""
    args = parse_args(argv)
    if not Path(args.data_root).is_dir():
        print(f"error: data root {args.data_root} does not exist; pass --data-root", file=sys.stderr)
        return 2
    started = dt.datetime.now().astimezone()
    result: dict[str, Any] = {"date": started.isoformat(timespec="seconds"), "mode": args.mode,
                              "command": "python benchmarks/bench.py " + " ".join(sys.argv[1:]),
                              "machine": machine(), "settings": vars(args).copy()}
    try:
        paths, labels = load_split(args.data_root, args.max_images_per_class, args.seed)
    except (datasets.DatasetLayoutError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    result["data"] = {s: {"images": len(paths[s]), "pneumonia": int(labels[s].sum())} for s in SPLITS}
    figures, failures = Figures(), []
    sampler = MemorySampler(os.getpid())
    sampler.start()

    def attempt(key: str, step: Callable[..., Any], *step_args: Any) -> Any:
        try:
            return step(*step_args)
        except Exception as exc:  # one figure failing must not lose the others
            failures.append(f"({key}) {type(exc).__name__}: {exc}")
            progress(f"({key}) FAILED: {type(exc).__name__}: {exc}")
            return None

    with tempfile.TemporaryDirectory(prefix="pneumo-bench-") as tmp:
        if args.mode == "full" or args.from_summary:
            attempt("b", run_notebooks, args, Path(tmp), figures)
        model = attempt("a", bench_head_training, args, paths, labels, figures)
        attempt("c", bench_prediction, args, model, paths, Path(tmp), figures)
        attempt("e", bench_bf16, args, paths, figures)
    sampler.stop()
    figures.add("d_peak_rss_mib", sampler.max_total_mib, "MiB",
                "largest total RSS of this process and all it started, sampled every 0.5 s")
    largest = max(sampler.peaks.values())
    figures.add("d_peak_rss_largest_process_mib", largest[0], "MiB", largest[1])
    result.update(seconds=round(time.monotonic() - _STARTED, 1), figures=figures, failures=failures,
                  targets_met=f"{sum(bool(f['met']) for f in figures.values() if f['target'])}"
                              f"/{sum(bool(f['target']) for f in figures.values())}")
    result["machine"]["load_average_at_end"] = [round(x, 2) for x in psutil.getloadavg()]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    progress(f"wrote {args.out}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
