"""Reading TFRecord shards: a tf.data pipeline split by file, a few images for figures, the
notebooks' split index, pooled features under a strategy, and ``--verify``.

Every record is checked before its image is decoded: its header (PNG ``IHDR``, JPEG ``SOF``)
must declare the manifest's ``image_size`` (original-size shards: at most
:data:`~pneumo_utils.data.images.PIXEL_BUDGET` pixels), and its label must be the one
``index.csv`` gives its row (``index.csv`` itself matches the manifest's sha256). A record that
fails, or one TensorFlow cannot read, is refused with :class:`CorruptShardError` naming the
shard file and row where the loop is ours (:func:`read_images`,
:func:`extract_features_from_shards`, :func:`verify_shards`), and with an
``InvalidArgumentError`` naming them inside ``Model.fit`` (:func:`read_shards`).
"""

from __future__ import annotations

import hashlib
import io
import re
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd

from pneumo_utils.files import write_bytes_atomic
from pneumo_utils.scale.shard_manifest import (
    CHECK,
    REWRITE,
    CorruptShardError,
    count_classes,
    labels_digest,
    pixel_bound,
    read_index,
    read_manifest,
    shard_files,
)

_SPEC = ("image", "label", "row")
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _spec(tf, names=_SPEC) -> dict:
    kinds = {"image": tf.string, "key": tf.string, "label": tf.int64, "row": tf.int64}
    return {name: tf.io.FixedLenFeature([], kinds[name]) for name in names}


def declared_size(tf, encoded):
    """``[height, width]`` (int32) an encoded image declares in its header, read without
    decoding: PNG ``IHDR`` bytes 16-24, JPEG ``SOF`` (``extract_jpeg_shape``); ``[-1, -1]``
    for anything else. Runs eagerly or in a tf.data graph."""
    long_enough = tf.strings.length(encoded) >= 24
    is_png = tf.logical_and(long_enough, tf.equal(tf.strings.substr(encoded, 0, 8), _PNG_SIGNATURE))
    is_jpeg = tf.equal(tf.strings.substr(encoded, 0, 2), b"\xff\xd8")

    def png():
        width_height = tf.io.decode_raw(tf.strings.substr(encoded, 16, 8), tf.int32, little_endian=False)
        return tf.stack([width_height[1], width_height[0]])

    return tf.case([(is_png, png), (is_jpeg, lambda: tf.image.extract_jpeg_shape(encoded)[:2])],
                   default=lambda: tf.constant([-1, -1], tf.int32), exclusive=True)


def _checked_image(tf, encoded, label, row, path, labels, side: int, budget: int, size: int):
    """A record's image as ``uint8`` ``(size, size, 3)``, decoded only after its header's
    dimensions and its label (``labels[row]``, from ``index.csv``; -1 for rows of other
    splits) are checked; resized in the graph (bilinear, antialiased) when ``size`` is not
    the stored ``side``."""
    height_width = declared_size(tf, encoded)
    pixels = tf.cast(height_width[0], tf.int64) * tf.cast(height_width[1], tf.int64)
    if side:
        size_ok = tf.reduce_all(tf.equal(height_width, side))
        expected = f"the manifest's image_size is {side}"
    else:
        size_ok = tf.logical_and(tf.reduce_all(height_width > 0), pixels <= budget)
        expected = f"original-size shards hold PNG or JPEG images of at most {budget} pixels"
    where = tf.strings.join([path, ": the record of row ", tf.strings.as_string(row)])
    size_message = tf.strings.join([
        where, " declares a ", tf.strings.as_string(height_width[1]), " x ",
        tf.strings.as_string(height_width[0]), f" px image (-1: not PNG or JPEG); {expected}; {CHECK}"])
    in_range = tf.logical_and(row >= 0, row < tf.size(labels, out_type=tf.int64))
    expected_label = tf.where(in_range, tf.gather(labels, tf.clip_by_value(row, 0, tf.size(
        labels, out_type=tf.int64) - 1)), tf.constant(-2, tf.int64))
    label_message = tf.strings.join([
        where, " has label ", tf.strings.as_string(label), ", index.csv gives ",
        tf.strings.as_string(expected_label), f" (-1: another split, -2: no such row); {CHECK}"])
    checks = [tf.debugging.Assert(size_ok, [size_message]),
              tf.debugging.Assert(tf.equal(label, expected_label), [label_message])]
    with tf.control_dependencies(checks):
        image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
    if size != side:
        image = tf.image.resize(image, [size, size], antialias=True)
        image = tf.cast(tf.round(tf.clip_by_value(image, 0.0, 255.0)), tf.uint8)
    return tf.ensure_shape(image, (size, size, 3))


def _records(tf, paths, cycle_length: int = 1, parallel: bool = False):
    """``(path, serialised record)`` of the shard files ``paths`` (a dataset of paths),
    interleaved ``cycle_length`` files at a time (1: one file after the other, row order)."""
    def read(path):
        return tf.data.TFRecordDataset(path, buffer_size=8 << 20).map(lambda record: (path, record))

    if parallel:
        return paths.interleave(read, cycle_length=cycle_length, num_parallel_calls=tf.data.AUTOTUNE,
                                deterministic=False)
    return paths.interleave(read, cycle_length=cycle_length)


def _decoder(tf, folder, manifest: dict, split: str | None, size: int):
    """The map function ``(path, record) -> (image, label, row)`` of :func:`_checked_image`
    for one split's rows (``None``: every split)."""
    index = read_index(folder)
    side, budget = pixel_bound(manifest)
    table = np.full(int(index["row"].max()) + 1 if len(index) else 0, -1, np.int64)
    rows = index if split is None else index[index["split"] == split]
    table[rows["row"].to_numpy(np.int64)] = rows["label"].to_numpy(np.int64)
    labels = tf.constant(table)
    spec = _spec(tf)

    def decode(path, record):
        example = tf.io.parse_single_example(record, spec)
        image = _checked_image(tf, example["image"], example["label"], example["row"], path, labels,
                               side, budget, size)
        return image, example["label"], example["row"]

    return decode


def read_error(tf, exc: Exception, paths: Sequence[str]) -> CorruptShardError:
    """:class:`CorruptShardError` for a TensorFlow error met while reading ``paths``: the
    failed record check's message (it names the file and row), or, for a record TensorFlow
    cannot read (``DataLossError``: bad length or checksum), the first file that fails."""
    text = " ".join(str(getattr(exc, "message", exc)).split())
    failed = re.search(r"assertion failed: \[(.*?)\]", text)
    if failed:
        return CorruptShardError(failed.group(1))
    culprit = "one of " + ", ".join(paths[:3])
    for path in paths:
        try:
            for _ in tf.data.TFRecordDataset(path):
                pass
        except tf.errors.OpError:
            culprit = path
            break
    return CorruptShardError(f"{culprit}: a record cannot be read ({text[:200]}); {CHECK}")


def verify_shards(folder: str | Path) -> dict:
    """Check every shard against the manifest and ``index.csv``; the manifest, else
    :class:`CorruptShardError` naming the bad files.

    Checked: each shard's size and sha256; ``index.csv``'s sha256 and its counts per split
    and class against the manifest's; each shard's records (row, key and label, in order)
    against ``index.csv`` and the shard's labels digest; each record's image header against
    the manifest's ``image_size``. So a shard swapped for another of its split, a label
    flipped in a record or in ``index.csv`` (with the checksums edited to match), or an image
    declaring other dimensions is caught, and no image is decoded.
    """
    import tensorflow as tf

    manifest = read_manifest(folder)
    for split in sorted({e["split"] for e in manifest["shards"].values()}):
        shard_files(folder, split, verify="sha256")
    index = read_index(folder)
    if count_classes(index) != manifest["counts"]:
        raise CorruptShardError(f"index.csv of {folder} counts {count_classes(index)} images per "
                                f"split and class, the manifest {manifest['counts']}; {REWRITE}")
    side, budget = pixel_bound(manifest)
    spec = _spec(tf, ("image", "row", "key", "label"))
    problems = []
    for name, entry in sorted(manifest["shards"].items()):
        path = f"{str(folder).rstrip('/')}/{name}"
        expected = index[index["shard"] == name].sort_values("row")
        found, sizes = [], []
        try:
            for record in tf.data.TFRecordDataset(path):
                parsed = tf.io.parse_single_example(record, spec)
                found.append((int(parsed["row"]), parsed["key"].numpy().decode(), int(parsed["label"])))
                sizes.append(declared_size(tf, parsed["image"]).numpy().tolist())
        except tf.errors.OpError as exc:
            problems.append(f"{path}: cannot be read ({exc.message.splitlines()[0]})")
            continue
        wanted = list(zip(expected["row"].astype(int), expected["key"].astype(str),
                          expected["label"].astype(int), strict=True))
        bad_size = [(row, hw) for (row, _, _), hw in zip(found, sizes, strict=True)
                    if (hw != [side, side] if side else min(hw) <= 0 or hw[0] * hw[1] > budget)]
        if found != wanted or entry["images"] != len(found):
            problems.append(f"{path}: holds {len(found)} records (row, key, label) that are not the "
                            f"{len(wanted)} rows index.csv gives it (manifest: {entry['images']} images)")
        elif labels_digest(label for _, _, label in found) != entry["labels_sha256"]:
            problems.append(f"{path}: its labels do not match the manifest's labels_sha256")
        elif bad_size:
            row, (height, width) = bad_size[0]
            problems.append(f"{path}: the record of row {row} declares a {width} x {height} px image "
                            f"(-1: not PNG or JPEG); the manifest's image_size is {side} "
                            f"({len(bad_size)} such record(s))")
    if problems:
        raise CorruptShardError(
            f"{len(problems)} shard file(s) do not match the index:\n  " + "\n  ".join(problems)
            + "\nRerun the writer on the same --out folder to rewrite them."
        )
    return manifest


def read_split_index(folder: str | Path, finding: str | None = None) -> tuple[pd.DataFrame, dict]:
    """The index of a shards folder in the notebooks' shape, and the split rule it was written with.

    Returns :func:`~pneumo_utils.scale.shard_manifest.read_index` (``row, key, label,
    patient, split, source, shard``, in row order) with ``path``, where each image was read
    from when the shards were written (``data_root/key`` of the manifest; the file need not
    exist any more), so that the split, summary and report helpers of :mod:`pneumo_utils.data`
    take it as they take a folder's index; and the manifest's ``split_rule`` (``{}`` when none
    was recorded). The splits are the ones the shards were written with: a notebook reading
    shards uses them as they are, so that every run on the same shards has the same patients
    in each split.

    With ``finding`` the shards must hold an NIH-style binary task split by patient
    (``load_index(kind="nih")``), and, when written from the NIH table, labels of that finding
    (label 1 = ``finding`` present): otherwise ``ValueError`` says what they hold and how to
    write the right ones.
    """
    manifest = read_manifest(folder)
    rule = dict(manifest.get("split_rule") or {})
    if finding is not None:
        how = str(rule.get("how", "not recorded"))
        if not how.endswith("patient_split"):
            raise ValueError(
                f"the shards in {folder} were split by {how} (source {manifest.get('source')}), not "
                "by patient for an NIH-style task; write NIH shards with python -m "
                "pneumo shards --data-root NIH_DIR --out OTHER_DIR"
            )
        held = str(rule.get("finding", ""))
        if manifest.get("source") == ["nih"] and held.lower() != finding.lower():
            raise ValueError(
                f"the shards in {folder} hold {held!r} against No Finding, not {finding!r}: set "
                f"finding={held!r}, or write {finding!r} shards into another folder with python -m "
                f"pneumo shards --data-root NIH_DIR --out OTHER_DIR --finding {finding!r}"
            )
    index = read_index(folder)
    root = manifest["data_root"].rstrip("/")
    return index.assign(path=[f"{root}/{key}" for key in index["key"]]), rule


def read_shards(
    folder: str | Path,
    split: str,
    image_size: int | None = None,
    batch_size: int = 32,
    shuffle: bool = False,
    seed: int = 0,
    cache: bool | str = False,
    repeat: bool = False,
    drop_remainder: bool = False,
    shuffle_buffer: int = 2048,
    input_context=None,
    verify: str = "size",
    with_rows: bool = False,
):
    """A tf.data pipeline of ``(images, labels)`` batches from the shards of one split.

    Yields ``float32`` images ``(batch, image_size, image_size, 3)`` in 0-255 and ``float32``
    labels ``(batch,)``, as :func:`pneumo_utils.data.pipelines.image_dataset` does, so the same models
    and training code take either. ``image_size`` defaults to the stored size; another size
    is resized in the graph (bilinear with antialiasing).

    The shard files are read in parallel and interleaved (shuffled, when ``shuffle``, then
    records shuffled in a ``shuffle_buffer``, seeded by ``seed``, reshuffled every epoch);
    without ``shuffle`` the records come in row order (``read_index``). Images are
    decoded in parallel in the graph, each after its header and label are checked (see the
    module); ``cache`` keeps the decoded ``uint8`` images in memory (``True``) or in a file
    (a path); ``repeat`` repeats forever (pass ``steps_per_epoch`` to ``fit``); batches are
    prefetched.

    Under a multi-worker strategy the dataset is split between workers by *file*
    (``AutoShardPolicy.FILE``), so each worker reads only its shards; with
    ``input_context`` (from ``strategy.distribute_datasets_from_function``) the files are
    split here instead, and ``batch_size`` should be the per-replica batch size.
    ``verify`` checks the files first (see :func:`~pneumo_utils.scale.shard_manifest.shard_files`).
    ``with_rows`` yields ``((images, rows), labels)``, ``rows`` (int64) being the rows of
    ``read_index``, for loops that must know which image each output belongs to.
    """
    import tensorflow as tf

    manifest = read_manifest(folder)
    size = _output_size(manifest, image_size, folder)
    paths = shard_files(folder, split, verify=verify)
    autotune = tf.data.AUTOTUNE
    files = tf.data.Dataset.from_tensor_slices(paths)
    if input_context is not None:
        files = files.shard(input_context.num_input_pipelines, input_context.input_pipeline_id)
    if shuffle:
        files = files.shuffle(len(paths), seed=seed, reshuffle_each_iteration=True)
        records = _records(tf, files, cycle_length=min(len(paths), 16), parallel=True)
    else:
        records = _records(tf, files)
    ds = records.map(_decoder(tf, folder, manifest, split, size), num_parallel_calls=autotune,
                     deterministic=not shuffle)
    if cache:
        ds = ds.cache("" if cache is True else str(cache))
    if shuffle:
        ds = ds.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
    if repeat:
        ds = ds.repeat()
    ds = ds.batch(batch_size, drop_remainder=drop_remainder)

    def to_float(images, labels, rows):
        images, labels = tf.cast(images, tf.float32), tf.cast(labels, tf.float32)
        return ((images, rows), labels) if with_rows else (images, labels)

    ds = ds.map(to_float, num_parallel_calls=autotune).prefetch(autotune)
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = (
        tf.data.experimental.AutoShardPolicy.OFF if input_context is not None
        else tf.data.experimental.AutoShardPolicy.FILE
    )
    return ds.with_options(options)


def _output_size(manifest: dict, image_size: int | None, folder) -> int:
    """The side images are read at: ``image_size``, else the shards' own; shards that keep
    original sizes need ``image_size``."""
    size = int(image_size or manifest["image_size"])
    if not size:
        raise ValueError(f"the shards in {folder} hold images at their original sizes; pass "
                         "image_size")
    return size


def read_images(
    folder: str | Path,
    rows: Sequence[int] | np.ndarray | pd.Series,
    image_size: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The images and labels of some index rows, in the order of ``rows``, for figures.

    ``rows`` are rows of ``read_index`` (its ``row`` column), from any splits. Returns
    ``float32`` images ``(n, image_size, image_size, 3)`` in 0-255, the pixels
    :func:`read_shards` gives for those rows (``image_size`` defaults to the stored size),
    and their ``int64`` labels ``(n,)``. Grad-CAM and sample grids need a handful of image
    arrays: only the shards that hold them are read, and only their images are decoded.
    Raises ``ValueError`` naming rows the shards do not hold, and :class:`CorruptShardError`
    naming the shard file (and row) that cannot be read or fails its checks.
    """
    import tensorflow as tf

    manifest = read_manifest(folder)
    size = _output_size(manifest, image_size, folder)
    wanted = np.asarray(rows, dtype=np.int64).ravel()
    index = read_index(folder).set_index("row")
    unknown = sorted(set(wanted.tolist()) - set(index.index.tolist()))
    if unknown:
        raise ValueError(f"the shards in {folder} hold no row(s) {unknown[:5]}; rows are the "
                         f"'row' column of read_index ({len(index)} rows)")
    if not len(wanted):
        return np.zeros((0, size, size, 3), np.float32), np.zeros((0,), np.int64)
    held = index.loc[wanted]
    paths = [p for split in sorted(set(held["split"]))
             for p in shard_files(folder, split) if Path(p).name in set(held["shard"])]
    targets = tf.constant(np.unique(wanted))
    spec = _spec(tf, ("row",))
    decode = _decoder(tf, folder, manifest, None, size)
    ds = (_records(tf, tf.data.Dataset.from_tensor_slices(paths))
          .filter(lambda path, record: tf.reduce_any(tf.equal(
              tf.io.parse_single_example(record, spec)["row"], targets)))
          .map(decode))
    found = {}
    try:
        for image, label, row in ds.as_numpy_iterator():
            found[int(row)] = (image, int(label))
    except tf.errors.OpError as exc:
        raise read_error(tf, exc, paths) from None
    lost = sorted(set(wanted.tolist()) - set(found))
    if lost:
        raise CorruptShardError(f"index.csv of {folder} places row(s) {lost[:5]} in shards that do "
                                f"not hold them; {CHECK}")
    images = np.stack([found[int(r)][0] for r in wanted]).astype(np.float32)
    return images, np.array([found[int(r)][1] for r in wanted], dtype=np.int64)


class ShardOutputs(NamedTuple):
    """Model outputs over a split's shards with the index rows they belong to."""

    outputs: np.ndarray
    """``(n, ...)`` float32, in row order."""
    labels: np.ndarray
    """``(n,)`` int64 labels of those rows."""
    rows: np.ndarray
    """``(n,)`` int64 rows of ``read_index``, ascending."""

    def of_rows(self, rows: Sequence[int] | np.ndarray | pd.Series) -> ShardOutputs:
        """The outputs, labels and rows of index rows ``rows``, in that order: e.g. the rows a
        notebook kept after :func:`pneumo_utils.data.splits.subsample`, so that features line up
        with that index's labels and patients. Raises ``ValueError`` naming rows not here."""
        wanted = np.asarray(rows, dtype=np.int64).ravel()
        at = np.searchsorted(self.rows, wanted).clip(0, max(len(self.rows) - 1, 0))
        missing = wanted[self.rows[at] != wanted] if len(self.rows) else wanted
        if len(missing):
            raise ValueError(f"{len(missing)} row(s) are not among these outputs, e.g. "
                             f"{missing[:5].tolist()}; rows must come from the same split's shards")
        return ShardOutputs(self.outputs[at], self.labels[at], self.rows[at])


def _predict(model, folder, split: str, strategy, batch_size: int, verbose: bool) -> ShardOutputs:
    """``model`` over every image of a split's shards under ``strategy``; outputs in row order.

    Each global batch (``batch_size`` per replica times the replicas) is split between the
    replicas (``strategy.run``). Under a multi-worker strategy every worker reads and returns
    only its own shard files (``rows`` says which images).
    """
    import tensorflow as tf

    size = int(model.inputs[0].shape[1])
    global_batch = batch_size * strategy.num_replicas_in_sync
    tpu = isinstance(strategy, tf.distribute.TPUStrategy)
    ds = read_shards(folder, split, image_size=size, batch_size=global_batch, drop_remainder=tpu,
                     with_rows=True)
    distributed = strategy.experimental_distribute_dataset(ds)

    @tf.function
    def step(inputs):
        images, rows = inputs
        return strategy.run(lambda x, r: (tf.cast(model(x, training=False), tf.float32), r),
                            args=(images, rows))

    outputs, rows, labels = [], [], []
    start = time.perf_counter()
    try:
        for inputs, batch_labels in distributed:
            out, out_rows = step(inputs)
            outputs += [t.numpy() for t in strategy.experimental_local_results(out)]
            rows += [t.numpy() for t in strategy.experimental_local_results(out_rows)]
            labels += [t.numpy() for t in strategy.experimental_local_results(batch_labels)]
    except tf.errors.OpError as exc:
        paths = shard_files(folder, split, verify="sha256")
        raise read_error(tf, exc, paths) from None
    order_rows = np.concatenate(rows).astype(np.int64)
    order = np.argsort(order_rows, kind="stable")
    result = ShardOutputs(np.concatenate(outputs)[order], np.concatenate(labels).astype(np.int64)[order],
                          order_rows[order])
    if tpu:
        expected = read_manifest(folder)["counts"][split]["images"]
        if len(result.rows) < expected:
            raise ValueError(f"{expected - len(result.rows)} image(s) of split {split!r} were "
                             "dropped to keep TPU batches full; lower batch_size to a divisor of "
                             f"{expected}")
    if verbose:
        seconds = time.perf_counter() - start
        print(f"{split}: {len(result.rows)} images in {seconds:.0f} s "
              f"({len(result.rows) / max(seconds, 1e-9):.1f} images/s, "
              f"{strategy.num_replicas_in_sync} replica(s))")
    return result


def extract_features_from_shards(
    model,
    folder: str | Path,
    split: str,
    strategy=None,
    batch_size: int = 32,
    cache_dir: str | Path | None = ".cache/pneumo/features",
    verbose: bool = True,
) -> ShardOutputs:
    """Pooled backbone features ``(n, channels)`` of a split's shards, under ``strategy``.

    The frozen-backbone feature cache of :mod:`pneumo_utils.model.features`, read from shards:
    ``model`` is a classifier with a ``head_gap`` layer (its layers up to the pooling run,
    see :func:`pneumo_utils.model.backbones.pooled_features_model`), the replicas share each
    global batch (``batch_size`` per replica; ``strategy.run``), and the result is cached in
    ``cache_dir`` under a key of the extractor's weights, the image size and the shards'
    checksums (``None``: no cache). ``outputs`` are the features, in row order with their
    ``labels`` and ``rows``; under a multi-worker strategy each worker gets the rows of its
    own shard files. Train the head on them with
    :func:`pneumo_utils.model.train.fit_head_on_features`. A record that cannot be read or
    fails its checks raises :class:`CorruptShardError` naming the shard file.
    """
    import tensorflow as tf

    from pneumo_utils.model.backbones import pooled_features_model
    from pneumo_utils.model.features import weights_fingerprint
    from pneumo_utils.scale.distribute import num_workers

    strategy = strategy or tf.distribute.get_strategy()
    with strategy.scope():
        extractor = pooled_features_model(model)
    cache_file = None
    if cache_dir is not None:
        manifest = read_manifest(folder)
        workers = num_workers(strategy)
        worker = strategy.cluster_resolver.task_id if workers > 1 else 0
        parts = [weights_fingerprint(extractor), str(extractor.inputs[0].shape[1]), split,
                 f"{workers}:{worker}", manifest["index_csv_sha256"]]
        parts += sorted(e["sha256"] for e in manifest["shards"].values() if e["split"] == split)
        key = hashlib.sha256("|".join(parts).encode()).hexdigest()[:24]
        cache_file = Path(cache_dir) / f"{model.name}-shards-{split}-{key}.npz"
        if cache_file.is_file():
            try:
                with np.load(cache_file, allow_pickle=False) as stored:
                    cached = ShardOutputs(stored["outputs"], stored["labels"], stored["rows"])
                if verbose:
                    print(f"features: {split} {cached.outputs.shape} loaded from cache {cache_file}")
                return cached
            except (OSError, ValueError, KeyError, EOFError) as exc:
                warnings.warn(f"feature cache file {cache_file} cannot be read "
                              f"({' '.join(str(exc).split())}); the features are recomputed",
                              UserWarning, stacklevel=2)
    result = _predict(extractor, folder, split, strategy, batch_size, verbose)
    if cache_file is not None:
        buffer = io.BytesIO()
        np.savez(buffer, outputs=result.outputs, labels=result.labels, rows=result.rows)
        write_bytes_atomic(cache_file, buffer.getvalue())
    return result
