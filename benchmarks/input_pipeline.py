"""Input pipeline throughput: JPEG/PNG decoded in the TensorFlow graph vs the Python reader.

``python benchmarks/input_pipeline.py --data-root ../shared/data/chest_xray`` prints, for a
seeded sample of ``--images`` training images:

* images/s of one pass (batch ``--batch-size``, no cache) at each ``--sizes`` entry, ``--runs``
  times in turns: ``python`` decodes every file with
  :func:`pneumo_utils.data.images.read_resized` in a ``tf.numpy_function`` (the Python reader
  that ``image_dataset`` keeps for files TensorFlow cannot decode, built here for every file),
  ``graph`` is :func:`pneumo_utils.data.pipelines.image_dataset`, whose plain JPEG/PNG files
  are decoded by TensorFlow ops. The pass is timed from the first batch requested to the last
  one; the seconds spent building the pipeline (``graph``: reading every file's header,
  tracing) are printed apart, and folded into a second images/s figure. The files are checked with :func:`pneumo_utils.data.image_checks.check_images` first, as
  the data set loaders do, so the ``graph`` build finds their verdicts in the cache; the build
  without that cache (every JPEG verified by a strict 1/8-scale decode) is timed once too;
* how far the ``graph`` pixels are from ``read_resized``'s at each ``--compare-sizes`` entry
  (largest and mean absolute difference in grey levels, images with any difference).

The files are read once beforehand, so every pass finds them in the page cache.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def sample_paths(data_root: str, n: int, seed: int = 0) -> list[str]:
    """``n`` training images of the Kermany layout (``train/CLASS/file``), a seeded sample."""
    import numpy as np

    from pneumo_utils.data.images import is_image_file

    found = sorted(str(p) for p in Path(data_root, "train").glob("*/*") if is_image_file(p))
    if len(found) < n:
        raise SystemExit(f"error: {data_root}/train holds {len(found)} images, fewer than --images {n}")
    picked = np.random.default_rng(seed).choice(len(found), size=n, replace=False)
    return [found[i] for i in sorted(picked)]


def python_reader_dataset(paths: list[str], image_size: int, batch_size: int):
    """The pipeline with every file decoded by ``read_resized`` in a ``tf.numpy_function``."""
    import tensorflow as tf

    from pneumo_utils.data.images import read_resized

    def load(path):
        image = tf.numpy_function(lambda p: read_resized(p.decode(), image_size), [path], tf.uint8,
                                  stateful=False)
        image.set_shape((image_size, image_size, 3))
        return image

    autotune = tf.data.AUTOTUNE
    ds = tf.data.Dataset.from_tensor_slices(paths).map(load, num_parallel_calls=autotune)
    return ds.batch(batch_size).map(lambda x: tf.cast(x, tf.float32), num_parallel_calls=autotune).prefetch(autotune)


def timed_pass(build, n: int) -> tuple[float, float]:
    """``(seconds to build, images/s of one full pass)`` of the data set ``build()`` returns."""
    start = time.perf_counter()
    ds = build()
    built = time.perf_counter()
    seen = sum(int(batch.shape[0]) for batch in ds)
    if seen != n:
        raise RuntimeError(f"the pass yielded {seen} images, expected {n}")
    return built - start, n / (time.perf_counter() - built)


def pixel_agreement(paths: list[str], image_size: int, batch_size: int) -> dict:
    """Absolute differences (grey levels) of the pipeline's pixels from ``read_resized``'s."""
    import numpy as np

    from pneumo_utils.data.images import read_resized
    from pneumo_utils.data.pipelines import image_dataset

    largest, total, differing = 0.0, 0.0, 0
    decoded = np.concatenate([b.numpy() for b in image_dataset(paths, image_size=image_size,
                                                                 batch_size=batch_size, cache=False)])
    for path, image in zip(paths, decoded, strict=True):
        diff = np.abs(image - read_resized(path, image_size))
        largest, total = max(largest, float(diff.max())), total + float(diff.mean())
        differing += bool(diff.max())
    return {"max": largest, "mean": total / len(paths), "images_differing": differing}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-root", default="../shared/data/chest_xray")
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--sizes", type=int, nargs="+", default=[224, 160])
    parser.add_argument("--compare-sizes", type=int, nargs="*", default=[224, 160, 64])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    from pneumo_utils.data.image_checks import CHECK_CACHE_ENV, check_images, graph_decode
    from pneumo_utils.data.pipelines import image_dataset

    paths = sample_paths(args.data_root, args.images, args.seed)
    for path in paths:
        Path(path).read_bytes()
    start = time.perf_counter()
    problems = [p for p, problem in zip(paths, check_images(paths), strict=True) if problem]
    if problems:
        raise SystemExit(f"error: {len(problems)} unreadable images, e.g. {problems[0]}")
    in_graph = sum(graph_decode(p, max(args.sizes)) is not None for p in paths)
    print(f"images: {len(paths)} from {args.data_root}/train, {in_graph} decoded in the graph, "
          f"batch {args.batch_size}, no cache, cpus {os.cpu_count()}; check_images "
          f"{time.perf_counter() - start:.2f} s (verdicts cached from earlier runs are reused)",
          flush=True)
    ways = {
        "python": lambda size: python_reader_dataset(paths, size, args.batch_size),
        "graph": lambda size: image_dataset(paths, image_size=size, batch_size=args.batch_size, cache=False),
    }
    for size in args.sizes:
        for way in ways.values():  # trace both once
            next(iter(way(size)))
        for run in range(1, args.runs + 1):
            speeds = {}
            for name, way in ways.items():
                build_s, speeds[name] = timed_pass(lambda way=way, size=size: way(size), len(paths))
                with_build = len(paths) / (build_s + len(paths) / speeds[name])
                print(f"{size} px run {run} {name}: {speeds[name]:.1f} images/s (pipeline built in "
                      f"{build_s:.2f} s; {with_build:.1f} images/s with the build)", flush=True)
            print(f"{size} px run {run} graph / python: {speeds['graph'] / speeds['python']:.2f} x",
                  flush=True)
    saved = os.environ.get(CHECK_CACHE_ENV)
    os.environ[CHECK_CACHE_ENV] = ""
    start = time.perf_counter()
    ways["graph"](args.sizes[0])
    print(f"{args.sizes[0]} px graph pipeline built without the check cache in "
          f"{time.perf_counter() - start:.2f} s", flush=True)
    if saved is None:
        del os.environ[CHECK_CACHE_ENV]
    else:
        os.environ[CHECK_CACHE_ENV] = saved
    for size in args.compare_sizes:
        found = pixel_agreement(paths, size, args.batch_size)
        print(f"{size} px graph vs read_resized: max {found['max']:.0f} grey levels, mean "
              f"{found['mean']:.4f}, {found['images_differing']} of {len(paths)} images differ",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
