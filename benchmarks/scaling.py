"""Scaling figures: shard writing, shard vs JPEG-folder reading, 1 vs 2 logical CPU devices.

``python benchmarks/scaling.py --data-root ../shared/data/chest_xray --out /tmp/shards``
prints

* shard writing speed (images/s) for the data set at ``--image-size`` (JPEG shards);
* tf.data read throughput (images/s, decoded to the same size) from those shards and from
  the image folders through :func:`pneumo_utils.data.pipelines.image_dataset`, one pass each over
  ``--read-images`` training images (the same images: the shards in row order), no cache,
  timed from the second batch on;
* training throughput of a small CNN (images/s) under the default strategy on one device
  and under ``MirroredStrategy`` on the CPU split into 2 logical devices, and their ratio
  (on a CPU both share the same cores: the ratio shows the plumbing costs little, not a
  speed-up). This part runs in a subprocess, since logical devices must be configured
  before TensorFlow starts.

``--max-images`` writes a subset (per split, the first N in index order) for a quick run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def write_speed(data_root: str, out: str, image_size: int, max_images: int | None) -> dict:
    from pneumo_utils.scale import shard_writer

    index, rule = shard_writer.load_index(data_root)
    if max_images:
        index = index.groupby("split", sort=False).head(max_images)
    start = time.perf_counter()
    manifest = shard_writer.write_shards(index, out, data_root=data_root, image_size=image_size,
                                         split_rule=rule, verbose=False)
    seconds = time.perf_counter() - start
    encoded = manifest["images"] if not manifest["reused_shards"] else None
    return {"images": manifest["images"], "shards": len(manifest["shards"]),
            "megabytes": round(sum(e["bytes"] for e in manifest["shards"].values()) / 1e6, 1),
            "seconds": round(seconds, 1),
            "images_per_s": round(encoded / seconds, 1) if encoded else "reused (delete --out to time)"}


def read_speed(out: str, image_size: int, n: int, batch_size: int = 32) -> dict:
    from pneumo_utils.data.pipelines import image_dataset
    from pneumo_utils.scale import shard_manifest, shard_reader

    listed = shard_manifest.read_index(out)
    train = listed[listed["split"] == "train"]
    root = shard_manifest.read_manifest(out)["data_root"]
    paths = [f"{root}/{k}" for k in train["key"].iloc[:n]]
    n = len(paths)

    def timed(ds) -> float:
        """Images/s after the first batch (pipeline start-up and tracing left out)."""
        start, seen = None, 0
        for images, _ in ds:
            if start is None:
                start = time.perf_counter()
                continue
            seen += int(images.shape[0])
        return seen / (time.perf_counter() - start)

    from_shards = timed(shard_reader.read_shards(out, "train", image_size=image_size, batch_size=batch_size)
                        .take(n // batch_size))
    from_folders = timed(image_dataset(paths, train["label"].iloc[:n].to_numpy(), image_size=image_size,
                                       batch_size=batch_size, cache=False))
    return {"images": n, "shards_images_per_s": round(from_shards, 1),
            "folders_images_per_s": round(from_folders, 1),
            "ratio": round(from_shards / from_folders, 2)}


def train_speed(devices: int, steps: int, image_size: int = 64, per_replica: int = 16) -> dict:
    """Run in a fresh process: images/s of a small CNN fit on random images."""
    import tensorflow as tf

    if devices > 1:
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * devices)
    import numpy as np

    from pneumo_utils.model.backbones import build_scratch_cnn
    from pneumo_utils.model.train import compile_binary
    from pneumo_utils.scale import distribute

    strategy = distribute.strategy("mirrored" if devices > 1 else "default")
    batch = distribute.global_batch_size(per_replica * 2 // devices, strategy)
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 255, size=(batch * 4, image_size, image_size, 3)).astype(np.float32)
    y = (rng.random(batch * 4) > 0.5).astype(np.float32)
    data = tf.data.Dataset.from_tensor_slices((x, y)).repeat().batch(batch).prefetch(2)
    with strategy.scope():
        model = build_scratch_cnn(image_size=image_size, filters=(16, 32, 64), seed=0)
        compile_binary(model)
    model.fit(data, epochs=1, steps_per_epoch=3, verbose=0)  # trace and warm up
    start = time.perf_counter()
    model.fit(data, epochs=1, steps_per_epoch=steps, verbose=0)
    seconds = time.perf_counter() - start
    return {"strategy": distribute.describe(strategy), "global_batch": batch,
            "images_per_s": round(steps * batch / seconds, 1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-root", default="../shared/data/chest_xray")
    parser.add_argument("--out", default="/tmp/pneumo-shards")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--max-images", type=int, default=None, help="per split, for a quick run")
    parser.add_argument("--read-images", type=int, default=1024)
    parser.add_argument("--train-steps", type=int, default=20)
    parser.add_argument("--only", choices=("write", "read", "train"), action="append")
    parser.add_argument("--train-devices", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.train_devices:
        print(json.dumps(train_speed(args.train_devices, args.train_steps)))
        return 0
    parts = args.only or ["write", "read", "train"]
    results: dict = {}
    if "write" in parts:
        results["write"] = write_speed(args.data_root, args.out, args.image_size, args.max_images)
        print("shard writing:", results["write"], flush=True)
    if "read" in parts:
        results["read"] = read_speed(args.out, args.image_size, args.read_images)
        print("reading (one pass, no cache):", results["read"], flush=True)
    if "train" in parts:
        runs = {}
        for devices in (1, 2):
            done = subprocess.run([sys.executable, __file__, "--train-devices", str(devices),
                                   "--train-steps", str(args.train_steps)],
                                  capture_output=True, text=True, check=True)
            runs[devices] = json.loads(done.stdout.strip().splitlines()[-1])
            print(f"training on {devices} logical device(s):", runs[devices], flush=True)
        ratio = runs[2]["images_per_s"] / runs[1]["images_per_s"]
        results["train"] = {**{f"{d}_devices": r for d, r in runs.items()}, "ratio_2_to_1": round(ratio, 2)}
        print(f"training throughput, 2 logical devices / 1 device: {ratio:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
