"""Prediction speed and size of the .keras model and its LiteRT/ONNX exports.

    python benchmarks/predict_latency.py --data-root ../shared/data/chest_xray \\
        --weights-dir ../shared/weights --out benchmarks/predict_latency.json

For MobileNetV2 and ResNet50 at 224 px (ImageNet backbone, head trained for a few epochs on
cached features of ``--train-images`` training images, so that AUCs mean something):

- ``predict`` on one image, process start to answer (median of ``--repeats`` runs of
  ``pneumo predict IMAGE --model FILE``), for ``.keras``, ``.tflite``,
  ``.onnx`` and the quantised exports;
- batch throughput on ``--images`` hold-out images: the project's path from files
  (``inference.predict_paths``, for Keras models and exports) against a bare
  ``predict`` on the same images decoded beforehand;
- file sizes per format and quantisation, the ``.keras`` file with and without optimizer
  state (``export.slim``);
- hold-out AUC of each export and its change against the ``.keras`` model.

Stdout holds one ``name: value unit`` line per figure; everything goes to ``--out`` too.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from pneumo_utils.model import backbones, saving

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = (("keras", None, "none"), ("tflite", "tflite", "none"), ("tflite-fp16", "tflite", "fp16"),
            ("tflite-int8", "tflite", "int8"), ("onnx", "onnx", "none"), ("onnx-int8", "onnx", "int8"))
TARGET_ONE_IMAGE_S = 1.5
TARGET_THROUGHPUT_RATIO = 0.9


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", required=True, help="Kermany layout with train/ and test/")
    parser.add_argument("--weights-dir", required=True, help="folder with the ImageNet .h5 files")
    parser.add_argument("--work", default="build/predict-latency", help="models are written here")
    parser.add_argument("--out", default="benchmarks/predict_latency.json")
    parser.add_argument("--backbones", nargs="+", default=["mobilenet_v2", "resnet50"])
    parser.add_argument("--images", type=int, default=128, help="hold-out images for throughput")
    parser.add_argument("--auc-images", type=int, default=200, help="hold-out images for the AUCs")
    parser.add_argument("--train-images", type=int, default=300, help="images to train the head on")
    parser.add_argument("--repeats", type=int, default=3, help="runs of the one-image command")
    args = parser.parse_args(argv)

    os.environ["PNEUMO_WEIGHTS_DIR"] = str(Path(args.weights_dir).resolve())
    import keras

    from pneumo_utils.data.datasets import paths_and_labels
    from pneumo_utils.data.images import read_resized
    from pneumo_utils.data.kermany import load_kermany
    from pneumo_utils.deploy import export
    from pneumo_utils.model import features, inference, train

    index = load_kermany(args.data_root, splits=("train", "test"))
    rng = np.random.default_rng(0)
    train_paths, train_labels = _sample(*paths_and_labels(index, "train"), args.train_images, rng)
    test_paths, test_labels = _sample(*paths_and_labels(index, "test"), args.auc_images, rng)
    calibration = Path(args.data_root) / "train"
    work = Path(args.work)
    figures: dict = {"load_average_at_start": os.getloadavg()[0]}
    for backbone in args.backbones:
        print(f"[{backbone}] building and training the head", file=sys.stderr)
        model = backbones.build_classifier(backbone, 224, weights=backbones.resolve_weights(backbone), seed=0)
        cached = features.extract_features(model, train_paths, cache_dir=work / "cache", verbose=False)
        head = backbones.head_on_features(model)
        train.compile_binary(head, 1e-3)
        head.fit(cached, train_labels, epochs=15, batch_size=32, verbose=0)
        path = work / f"{backbone}.keras"
        saving.save_model(model, path, saving.model_metadata(model, backbone=backbone))
        sizes = {"keras": path.stat().st_size}
        heavy = work / f"{backbone}-with-optimizer.keras"
        for layer in model.layers:
            layer.trainable = True
        train.compile_binary(model, 1e-4)
        x = np.stack([read_resized(p, 224) for p in train_paths[:4]]).astype(np.float32)
        model.train_on_batch(x, train_labels[:4].astype(np.float32))
        saving.save_model(model, heavy, saving.model_metadata(model, backbone=backbone))
        sizes["keras_with_adam_state_all_layers_trainable"] = heavy.stat().st_size
        sizes["keras_slimmed"] = export.slim(heavy).stat().st_size
        model = keras.models.load_model(path)
        files = {"keras": path}
        for name, fmt, quantize in VARIANTS[1:]:
            print(f"[{backbone}] exporting {name}", file=sys.stderr)
            entry = export.export_model(path, fmt, quantize,
                                        calibration=calibration if quantize == "int8" else None)
            files[name] = path.with_name(entry["file"])
            sizes[name] = entry["bytes"]
        sizes["savedmodel"] = export.export_model(path, "savedmodel")["bytes"]
        result = {"sizes_bytes": sizes}

        print(f"[{backbone}] one-image predict command", file=sys.stderr)
        image = test_paths[0]
        result["one_image_s"] = {
            name: _command_seconds(image, file, args.repeats) for name, file in files.items()
        }

        print(f"[{backbone}] throughput", file=sys.stderr)
        batch_paths = test_paths[: args.images]
        decoded = np.stack([read_resized(p, 224) for p in batch_paths]).astype(np.float32)
        throughput = {}
        start = time.perf_counter()
        inference.predict_paths(model, batch_paths)
        path_s = time.perf_counter() - start
        start = time.perf_counter()
        model.predict(decoded, batch_size=32, verbose=0)
        bare_s = time.perf_counter() - start
        throughput["keras"] = _rates(len(batch_paths), path_s, bare_s)
        for name in ("tflite", "onnx"):
            exported = inference.ExportedModel(files[name])
            exported.predict(decoded[:32])  # allocate once
            start = time.perf_counter()
            inference.predict_paths(exported, batch_paths)
            path_s = time.perf_counter() - start
            start = time.perf_counter()
            exported.predict(decoded, batch_size=32)
            throughput[name] = _rates(len(batch_paths), path_s, time.perf_counter() - start)
        result["throughput"] = throughput

        print(f"[{backbone}] hold-out AUCs", file=sys.stderr)
        from sklearn.metrics import roc_auc_score

        aucs = {"keras": float(roc_auc_score(test_labels, inference.predict_paths(model, test_paths)))}
        for name in files:
            if name != "keras":
                proba = inference.predict_paths(inference.ExportedModel(files[name]), test_paths)
                aucs[name] = float(roc_auc_score(test_labels, proba))
        result["holdout_auc"] = aucs
        figures[backbone] = result
        _print(backbone, result)
        figures["load_average_at_end"] = os.getloadavg()[0]
        figures["settings"] = vars(args)
        Path(args.out).write_text(json.dumps(figures, indent=2))  # after each backbone
    return 0


def _sample(paths, labels, n, rng):
    """A seeded sample of ``n`` (path, label) pairs, both classes kept in proportion."""
    labels = np.asarray(labels)
    keep = np.sort(rng.choice(len(paths), size=min(n, len(paths)), replace=False))
    return [paths[i] for i in keep], labels[keep]


def _command_seconds(image: str, model: Path, repeats: int) -> float:
    """Median wall time of ``pneumo predict IMAGE --model MODEL``."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "pneumo_utils.deploy.predict", image, "--model", str(model)],
                              capture_output=True, text=True, cwd=ROOT)
        times.append(time.perf_counter() - start)
        if done.returncode != 0:
            raise RuntimeError(f"predict failed on {model}: {done.stderr.strip()[-300:]}")
    return statistics.median(times)


def _rates(n: int, path_s: float, bare_s: float) -> dict:
    return {"path_images_per_s": n / path_s, "bare_images_per_s": n / bare_s,
            "ratio": bare_s / path_s}


def _print(backbone: str, result: dict) -> None:
    for name, size in result["sizes_bytes"].items():
        print(f"{backbone}.size.{name}: {size / 2**20:.1f} MB")
    for name, seconds in result["one_image_s"].items():
        verdict = "" if name == "keras" else (
            f" [target <= {TARGET_ONE_IMAGE_S} s: {'met' if seconds <= TARGET_ONE_IMAGE_S else 'NOT MET'}]")
        print(f"{backbone}.one_image.{name}: {seconds:.2f} s{verdict}")
    for name, rates in result["throughput"].items():
        met = "met" if rates["ratio"] >= TARGET_THROUGHPUT_RATIO else "NOT MET"
        print(f"{backbone}.throughput.{name}: {rates['path_images_per_s']:.1f} images/s from files, "
              f"{rates['bare_images_per_s']:.1f} bare, ratio {rates['ratio']:.2f} "
              f"[target >= {TARGET_THROUGHPUT_RATIO}: {met}]")
    keras_auc = result["holdout_auc"]["keras"]
    for name, auc in result["holdout_auc"].items():
        print(f"{backbone}.holdout_auc.{name}: {auc:.4f} (change {auc - keras_auc:+.4f})")


if __name__ == "__main__":
    sys.exit(main())
