"""TFRecord shards: round trip, worker splits, corrupt files, interrupted writes, features."""

from __future__ import annotations

import json
import shutil
import warnings

import numpy as np
import pandas as pd
import pytest

tf = pytest.importorskip("tensorflow")

from pneumo_utils.data.datasets import BadImagesWarning  # noqa: E402
from pneumo_utils.data.nih import MissingImagesWarning  # noqa: E402
from pneumo_utils.data.pipelines import image_dataset  # noqa: E402
from pneumo_utils.scale import shard_command, shard_manifest, shard_reader, shard_writer  # noqa: E402

SIZE = 32


def _records(folder, split=None) -> pd.DataFrame:
    """Every record of every shard (or of one split), parsed without the reader."""
    manifest = shard_manifest.read_manifest(folder)
    spec = {
        "image": tf.io.FixedLenFeature([], tf.string),
        "label": tf.io.FixedLenFeature([], tf.int64),
        "patient": tf.io.FixedLenFeature([], tf.string),
        "split": tf.io.FixedLenFeature([], tf.string),
        "key": tf.io.FixedLenFeature([], tf.string),
        "row": tf.io.FixedLenFeature([], tf.int64),
    }
    rows = []
    for name, entry in sorted(manifest["shards"].items()):
        if split is not None and entry["split"] != split:
            continue
        for record in tf.data.TFRecordDataset(str(folder / name)):
            example = tf.io.parse_single_example(record, spec)
            rows.append({
                "row": int(example["row"]), "label": int(example["label"]),
                "patient": example["patient"].numpy().decode(), "split": example["split"].numpy().decode(),
                "key": example["key"].numpy().decode(), "shard": name,
                "image": tf.io.decode_image(example["image"], channels=3).numpy(),
            })
    return pd.DataFrame(rows)


@pytest.fixture(scope="module")
def kermany_index(kermany_root):
    return shard_writer.load_index(kermany_root, seed=0)


@pytest.fixture(scope="module")
def shard_dir(kermany_index, tmp_path_factory):
    """The synthetic Kermany set as 32 px PNG shards (lossless: pixels comparable exactly)."""
    index, rule = kermany_index
    out = tmp_path_factory.mktemp("shards")
    shard_writer.write_shards(index, out, image_size=SIZE, image_format="png", min_shards=3,
                        split_rule=rule, verbose=False)
    return out


def test_round_trip_every_image_once_with_label_patient_split(kermany_root, kermany_index, shard_dir):
    index, _ = kermany_index
    manifest = shard_manifest.read_manifest(shard_dir)
    records = _records(shard_dir)
    assert len(records) == len(index) == manifest["images"]
    assert records["row"].is_unique and sorted(records["row"]) == list(range(len(index)))
    expected = index.assign(key=index["path"].map(lambda p: str(p)[len(str(kermany_root)) + 1:]))
    merged = records.merge(expected, on="key", suffixes=("", "_index"), validate="one_to_one")
    assert len(merged) == len(index)
    assert (merged["label"] == merged["label_index"]).all()
    assert (merged["patient"] == merged["patient_index"]).all()
    assert (merged["split"] == merged["split_index"]).all()
    # every split has the shards it was planned with, and its records only
    for split, counts in manifest["counts"].items():
        assert counts["images"] == int((index["split"] == split).sum())
        assert counts["NORMAL"] + counts["PNEUMONIA"] == counts["images"]
        assert (records.loc[records["shard"].str.startswith(split + "-"), "split"] == split).all()
    assert manifest["split_rule"]["how"].endswith("grouped_split")
    # the index file lists the same rows
    listed = shard_manifest.read_index(shard_dir)
    assert listed["row"].tolist() == list(range(len(index)))
    by_row = records.set_index("row")["shard"].sort_index()
    assert (listed.set_index("row")["shard"] == by_row).all()


def test_reader_gives_the_folder_pipelines_pixels_and_labels(shard_dir):
    listed = shard_manifest.read_index(shard_dir)
    test = listed[listed["split"] == "test"]
    ds = shard_reader.read_shards(shard_dir, "test", batch_size=4)
    images, labels = (np.concatenate(parts) for parts in zip(*[(x.numpy(), y.numpy()) for x, y in ds],
                                                              strict=True))
    assert images.dtype == np.float32 and images.shape == (len(test), SIZE, SIZE, 3)
    np.testing.assert_array_equal(labels, test["label"].to_numpy(np.float32))  # row order
    root = shard_manifest.read_manifest(shard_dir)["data_root"]
    folder = image_dataset([f"{root}/{k}" for k in test["key"]], image_size=SIZE, batch_size=64,
                           cache=False)
    np.testing.assert_array_equal(images, np.concatenate([x.numpy() for x in folder]))


def test_reader_shuffles_resizes_and_repeats(shard_dir):
    n = shard_manifest.read_manifest(shard_dir)["counts"]["train"]["images"]
    ds = shard_reader.read_shards(shard_dir, "train", image_size=24, batch_size=5, shuffle=True, seed=1,
                            with_rows=True)
    rows = np.concatenate([r.numpy() for (x, r), _ in ds])
    assert sorted(rows.tolist()) == list(range(n)) and rows.tolist() != list(range(n))
    (x, _), _ = next(iter(ds))
    assert x.shape[1:] == (24, 24, 3)
    repeated = shard_reader.read_shards(shard_dir, "val", batch_size=4, repeat=True)
    assert len(list(repeated.take(10))) == 10


def test_worker_splits_cover_every_image_exactly_once(shard_dir):
    manifest = shard_manifest.read_manifest(shard_dir)
    seen = []
    for worker in range(2):
        context = tf.distribute.InputContext(num_input_pipelines=2, input_pipeline_id=worker,
                                             num_replicas_in_sync=2)
        ds = shard_reader.read_shards(shard_dir, "train", batch_size=8, input_context=context, with_rows=True)
        seen.append({int(r) for (_, rows), _ in ds for r in rows.numpy()})
    assert seen[0] and seen[1] and not seen[0] & seen[1]
    assert len(seen[0] | seen[1]) == manifest["counts"]["train"]["images"]
    options = shard_reader.read_shards(shard_dir, "train").options()
    assert options.experimental_distribute.auto_shard_policy == tf.data.experimental.AutoShardPolicy.FILE


def test_corrupt_shard_gives_an_error_naming_it(shard_dir, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(shard_dir, copy)
    name = sorted(p.name for p in copy.glob("train-*.tfrecord"))[1]
    data = bytearray((copy / name).read_bytes())
    (copy / name).write_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(shard_manifest.CorruptShardError, match=name):
        shard_reader.read_shards(copy, "train")
    data[len(data) // 2] ^= 0xFF  # same size, one byte changed
    (copy / name).write_bytes(bytes(data))
    shard_reader.read_shards(copy, "train")  # the cheap size check passes...
    with pytest.raises(shard_manifest.CorruptShardError, match=name):
        shard_reader.read_shards(copy, "train", verify="sha256")
    with pytest.raises(shard_manifest.CorruptShardError, match=name):
        shard_reader.verify_shards(copy)
    assert shard_command.main(["--out", str(copy), "--verify"]) == 2
    from pneumo_utils.model.backbones import build_scratch_cnn

    model = build_scratch_cnn(image_size=SIZE, filters=(4,), dense_units=4, seed=0)
    with pytest.raises(shard_manifest.CorruptShardError, match=name):  # ...and reading finds it
        shard_reader.extract_features_from_shards(model, copy, "train", cache_dir=None, verbose=False)


def test_interrupted_write_leaves_no_partial_shard_and_resumes(kermany_index, tmp_path, monkeypatch):
    index, _ = kermany_index
    out = tmp_path / "out"
    calls = {"n": 0}
    real = shard_writer.encode_image

    def failing(path, *args):
        calls["n"] += 1
        if calls["n"] == 30:
            raise KeyboardInterrupt
        return real(path, *args)

    monkeypatch.setattr(shard_writer, "encode_image", failing)
    with pytest.raises(KeyboardInterrupt):
        shard_writer.write_shards(index, out, image_size=SIZE, images_per_shard=8, workers=1, verbose=False)
    manifest = json.loads((out / shard_manifest.MANIFEST).read_text())
    files = sorted(p.name for p in out.iterdir())
    done = sorted(manifest["shards"])
    assert done and files == sorted([*done, shard_manifest.MANIFEST])  # no partial or temporary file
    assert not manifest["complete"] and not shard_manifest.is_complete(out)
    with pytest.raises(shard_manifest.CorruptShardError, match="incomplete"):
        shard_manifest.read_manifest(out)
    stamps = {name: (out / name).stat().st_mtime_ns for name in done}
    monkeypatch.setattr(shard_writer, "encode_image", real)
    result = shard_writer.write_shards(index, out, image_size=SIZE, images_per_shard=8, verbose=False)
    assert result["complete"] and result["reused_shards"] == len(done) and shard_manifest.is_complete(out)
    assert all((out / name).stat().st_mtime_ns == stamps[name] for name in done)
    assert sorted(_records(out)["row"]) == list(range(len(index)))
    with pytest.raises(shard_manifest.ShardsMismatchError, match="image_size"):
        shard_writer.write_shards(index, out, image_size=SIZE + 8, verbose=False)


def test_unreadable_image_is_reported_once_and_left_out(kermany_index, tmp_path):
    index, _ = kermany_index
    small = index.groupby("split").head(3).reset_index(drop=True)
    broken = tmp_path / "broken.jpeg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    small.loc[0, "path"] = str(broken)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        manifest = shard_writer.write_shards(small, tmp_path / "out", image_size=SIZE, verbose=False)
    bad = [w for w in caught if issubclass(w.category, BadImagesWarning)]
    assert len(bad) == 1 and str(broken) in str(bad[0].message)
    assert [s["path"] for s in manifest["skipped"]] == [str(broken)]
    assert manifest["images"] == len(small) - 1
    assert len(shard_manifest.read_index(tmp_path / "out")) == len(small) - 1


def test_command_line_writes_kermany_and_nih(kermany_root, tmp_path, capsys):
    from synthetic import make_nih_like

    out = tmp_path / "k"
    assert shard_command.main(["--data-root", str(kermany_root), "--out", str(out), "--image-size", "40",
                        "--shard-mb", "0.01"]) == 0
    manifest = shard_manifest.read_manifest(out)
    assert manifest["source"] == ["kermany"] and manifest["image_size"] == 40
    assert len([e for e in manifest["shards"].values() if e["split"] == "train"]) >= 8
    assert shard_command.main(["--out", str(out), "--verify"]) == 0
    assert "all match the manifest" in capsys.readouterr().out

    nih = make_nih_like(tmp_path / "nih", n_patients=60, image_size=32, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MissingImagesWarning)
        assert shard_command.main(["--data-root", str(nih), "--out", str(tmp_path / "n"),
                            "--image-size", "0", "--seed", "0"]) == 0
    manifest = shard_manifest.read_manifest(tmp_path / "n")
    assert manifest["source"] == ["nih"] and manifest["image_format"] == "original"
    assert set(manifest["counts"]) == {"train", "val", "test"}
    listed = shard_manifest.read_index(tmp_path / "n")
    assert listed.groupby("patient")["split"].nunique().max() == 1  # patients stay in one split
    assert listed["key"].str.startswith("images/").all()
    images, _ = next(iter(shard_reader.read_shards(tmp_path / "n", "test", image_size=16, batch_size=64)))
    assert images.shape[1:] == (16, 16, 3)


def test_features_from_shards_match_the_folder_cache(shard_dir, tmp_path):
    from pneumo_utils.model.backbones import build_scratch_cnn
    from pneumo_utils.model.features import extract_features

    model = build_scratch_cnn(image_size=SIZE, filters=(4, 8), dense_units=4, seed=0)
    got = shard_reader.extract_features_from_shards(model, shard_dir, "val", cache_dir=tmp_path, verbose=False)
    listed = shard_manifest.read_index(shard_dir)
    val = listed[listed["split"] == "val"]
    np.testing.assert_array_equal(got.rows, val["row"].to_numpy())
    np.testing.assert_array_equal(got.labels, val["label"].to_numpy())
    root = shard_manifest.read_manifest(shard_dir)["data_root"]
    expected = extract_features(model, [f"{root}/{k}" for k in val["key"]], cache_dir=None,
                                verbose=False)
    np.testing.assert_allclose(got.outputs, expected, rtol=1e-5, atol=1e-5)
    assert len(list(tmp_path.glob("*.npz"))) == 1
    again = shard_reader.extract_features_from_shards(model, shard_dir, "val", cache_dir=tmp_path,
                                                verbose=False)
    np.testing.assert_array_equal(again.outputs, got.outputs)


def test_is_complete_is_false_for_a_missing_or_empty_folder_and_refuses_a_bad_manifest(tmp_path):
    assert not shard_manifest.is_complete(tmp_path / "not-there")
    assert not shard_manifest.is_complete(tmp_path)
    (tmp_path / shard_manifest.MANIFEST).write_text("{not json")
    with pytest.raises(shard_manifest.CorruptShardError, match="not valid JSON"):
        shard_manifest.is_complete(tmp_path)


def test_read_images_gives_the_readers_pixels_in_the_order_asked(shard_dir):
    listed = shard_manifest.read_index(shard_dir)
    test_rows = listed.loc[listed["split"] == "test", "row"].to_numpy()
    rows = np.array([test_rows[3], listed.loc[listed["split"] == "train", "row"].iloc[5], test_rows[0]])
    for size in (SIZE, 24):
        images, labels = shard_reader.read_images(shard_dir, rows, image_size=size)
        assert images.dtype == np.float32 and images.shape == (3, size, size, 3)
        np.testing.assert_array_equal(labels, listed.set_index("row").loc[rows, "label"].to_numpy())
        read = {}  # row -> the reader's image
        for split in ("test", "train"):
            ds = shard_reader.read_shards(shard_dir, split, image_size=size, batch_size=64, with_rows=True)
            read.update({int(r): x for (xs, rs), _ in ds for x, r in zip(xs.numpy(), rs.numpy(), strict=True)})
        np.testing.assert_array_equal(images, np.stack([read[int(r)] for r in rows]))
    with pytest.raises(ValueError, match="no row"):
        shard_reader.read_images(shard_dir, [len(listed) + 7])


def test_outputs_of_rows_follow_the_rows_given():
    outputs = shard_reader.ShardOutputs(np.arange(8.0).reshape(4, 2), np.array([0, 1, 1, 0]), np.array([2, 5, 9, 11]))
    picked = outputs.of_rows([11, 2, 9])
    np.testing.assert_array_equal(picked.rows, [11, 2, 9])
    np.testing.assert_array_equal(picked.outputs, [[6.0, 7.0], [0.0, 1.0], [4.0, 5.0]])
    np.testing.assert_array_equal(picked.labels, [0, 0, 1])
    for absent in ([3], [12], [0, 5]):
        with pytest.raises(ValueError, match="not among these outputs"):
            outputs.of_rows(absent)


def test_split_index_has_the_source_paths_and_refuses_a_split_not_by_patient(kermany_index, shard_dir):
    index, _ = kermany_index
    read, rule = shard_reader.read_split_index(shard_dir)
    assert rule["how"].endswith("grouped_split")
    assert sorted(read["path"]) == sorted(map(str, index["path"]))
    merged = read.merge(index.assign(path=index["path"].map(str)), on="path", suffixes=("", "_folder"))
    assert (merged["split"] == merged["split_folder"]).all() and (merged["label"] == merged["label_folder"]).all()
    with pytest.raises(ValueError, match="not by patient"):
        shard_reader.read_split_index(shard_dir, finding="Pneumonia")


def test_check_source_refuses_shards_of_another_folder(kermany_root, shard_dir, tmp_path) -> None:
    shard_manifest.check_source(shard_dir, kermany_root)
    shard_manifest.check_source(shard_dir, None)
    with pytest.raises(shard_manifest.ShardsMismatchError, match=r"holds shards of .*, not of .*other"):
        shard_manifest.check_source(shard_dir, tmp_path / "other")
