"""Shards altered after writing are refused with one error naming the file: a record declaring
a huge image, corrupted records, an edited manifest, flipped labels (in a record or in
index.csv, checksums edited to match), a hostile --image-size, a relative --data-root."""

from __future__ import annotations

import hashlib
import json
import struct
import zlib

import numpy as np
import pandas as pd
import pytest
from PIL import Image

tf = pytest.importorskip("tensorflow")

from pneumo_utils.scale import shard_command, shard_manifest, shard_reader, shard_writer  # noqa: E402


@pytest.fixture()
def shard_folder(tmp_path):
    """Twelve 32 px PNG images in train and val, three shards each."""
    rows = []
    for i in range(12):
        path = tmp_path / "images" / f"{i}.png"
        path.parent.mkdir(exist_ok=True)
        Image.fromarray(np.full((40, 40), 20 * i, np.uint8)).save(path)
        rows.append({"path": str(path), "label": i % 2, "patient": f"p{i}",
                     "split": "train" if i < 6 else "val"})
    out = tmp_path / "shards"
    shard_writer.write_shards(pd.DataFrame(rows), out, image_size=32, image_format="png",
                              images_per_shard=2, verbose=False)
    return out


def _first_shard(folder):
    return sorted(folder.glob("train-*.tfrecord"))[0]


def _rewrite_first_record(folder, change) -> None:
    """Apply ``change`` to the first record of the first train shard and edit the manifest's
    size and sha256 to match, as someone covering their tracks would."""
    path = _first_shard(folder)
    records = [bytes(r.numpy()) for r in tf.data.TFRecordDataset(str(path))]
    example = tf.train.Example.FromString(records[0])
    change(example.features.feature)
    records[0] = example.SerializeToString()
    with tf.io.TFRecordWriter(str(path)) as writer:
        for record in records:
            writer.write(record)
    data = path.read_bytes()
    _edit_manifest(folder, lambda m: m["shards"][path.name].update(
        bytes=len(data), sha256=hashlib.sha256(data).hexdigest()))


def _edit_manifest(folder, change) -> None:
    path = folder / shard_manifest.MANIFEST
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest))


def _png_declaring(side: int) -> bytes:
    """A grey PNG whose header declares ``side`` x ``side`` pixels (its data holds one row)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * (side + 1)))
            + chunk(b"IEND", b""))


def _all_rows(folder):
    return shard_manifest.read_index(folder)["row"]


def test_a_record_declaring_a_huge_image_is_refused_before_decoding(shard_folder, error_line):
    _rewrite_first_record(shard_folder, lambda f: f["image"].bytes_list.value.__setitem__(
        0, _png_declaring(20_000)))
    name = _first_shard(shard_folder).name
    assert shard_command.main(["--out", str(shard_folder), "--verify"]) == 2
    line = error_line()
    assert name in line and "20000 x 20000" in line and "image_size is 32" in line
    with pytest.raises(shard_manifest.CorruptShardError, match=rf"{name}: the record of row 0 declares a 20000 x 20000"):
        shard_reader.read_images(shard_folder, _all_rows(shard_folder))
    with pytest.raises(tf.errors.InvalidArgumentError, match=name):  # inside Model.fit
        list(shard_reader.read_shards(shard_folder, "train"))


@pytest.mark.parametrize("flips", [1, 64])
def test_corrupted_records_name_the_shard_file(shard_folder, flips, error_line):
    path = _first_shard(shard_folder)
    data = bytearray(path.read_bytes())
    for i in range(len(data) // 2, len(data) // 2 + flips):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(shard_manifest.CorruptShardError, match=rf"{path.name}: a record cannot be read.*--verify"):
        shard_reader.read_images(shard_folder, _all_rows(shard_folder))
    assert shard_command.main(["--out", str(shard_folder), "--verify"]) == 2
    assert path.name in error_line()


@pytest.mark.parametrize(("value", "expected"), [
    (64, "declares a 32 x 32 px image.*image_size is 64"),
    ("abc", 'image_size is "abc", expected 0 .original sizes. or an integer from 32 to 512'),
    (30000, "image_size is 30000, expected 0"),
    (True, "image_size is true"),
])
def test_an_edited_manifest_image_size_is_refused(shard_folder, value, expected, error_line):
    _edit_manifest(shard_folder, lambda m: m.update(image_size=value))
    with pytest.raises(shard_manifest.CorruptShardError, match=expected):
        shard_reader.read_images(shard_folder, _all_rows(shard_folder))
    assert shard_command.main(["--out", str(shard_folder), "--verify"]) == 2
    assert "image_size" in error_line()


def test_manifest_fields_are_checked_when_read(shard_folder):
    for change, field in [(lambda m: m.update(complete="yes"), "complete"),
                          (lambda m: m.update(format="pneumo-shards/1"), "pneumo-shards/1"),
                          (lambda m: next(iter(m["shards"].values())).update(images=-3), "images"),
                          (lambda m: m.pop("index_csv_sha256"), "index_csv_sha256")]:
        backup = (shard_folder / shard_manifest.MANIFEST).read_text()
        _edit_manifest(shard_folder, change)
        with pytest.raises(shard_manifest.CorruptShardError, match=field):
            shard_manifest.read_manifest(shard_folder)
        (shard_folder / shard_manifest.MANIFEST).write_text(backup)
    assert shard_manifest.is_complete(shard_folder)


def test_a_label_flipped_in_a_record_is_caught(shard_folder, error_line):
    def flip(features):
        features["label"].int64_list.value[0] = 1 - features["label"].int64_list.value[0]

    _rewrite_first_record(shard_folder, flip)
    name = _first_shard(shard_folder).name
    assert shard_command.main(["--out", str(shard_folder), "--verify"]) == 2
    assert name in error_line()
    with pytest.raises(shard_manifest.CorruptShardError, match=rf"{name}: the record of row 0 has label 1, index.csv gives 0"):
        shard_reader.read_images(shard_folder, _all_rows(shard_folder))
    from pneumo_utils.model.backbones import build_scratch_cnn

    model = build_scratch_cnn(image_size=32, filters=(4,), dense_units=4, seed=0)
    with pytest.raises(shard_manifest.CorruptShardError, match=name):
        shard_reader.extract_features_from_shards(model, shard_folder, "train", cache_dir=None, verbose=False)


def test_a_label_flipped_in_a_record_and_its_digest_is_caught_by_the_reader(shard_folder, error_line):
    """Even with the manifest's labels digest edited too, --verify and the reader compare each
    record's label with index.csv's."""
    def flip(features):
        features["label"].int64_list.value[0] = 1

    _rewrite_first_record(shard_folder, flip)
    name = _first_shard(shard_folder).name
    _edit_manifest(shard_folder, lambda m: m["shards"][name].update(
        labels_sha256=shard_manifest.labels_digest([1, 1])))
    assert shard_command.main(["--out", str(shard_folder), "--verify"]) == 2
    assert name in error_line()
    with pytest.raises(tf.errors.InvalidArgumentError, match="index.csv gives 0"):
        list(shard_reader.read_shards(shard_folder, "train"))


def test_an_edited_index_csv_is_refused(shard_folder, error_line):
    index = pd.read_csv(shard_folder / "index.csv")
    index.loc[0, "label"] = 1 - index.loc[0, "label"]
    index.to_csv(shard_folder / "index.csv", index=False)
    for read in (shard_manifest.read_index, shard_reader.read_split_index,
                 lambda folder: shard_reader.read_shards(folder, "train")):
        with pytest.raises(shard_manifest.CorruptShardError, match="index.csv does not match the sha256"):
            read(shard_folder)
    assert shard_command.main(["--out", str(shard_folder), "--verify"]) == 2
    assert "index.csv" in error_line()


@pytest.mark.parametrize("size", ["100000", "16", "-1"])
def test_image_size_option_is_bounded(tmp_path, size, error_line):
    assert shard_command.main(["--data-root", str(tmp_path), "--out", str(tmp_path / "o"),
                               "--image-size", size]) == 2
    assert "outside 32-512" in error_line()
    with pytest.raises(ValueError, match="32-512"):
        shard_writer.write_shards(pd.DataFrame({"path": ["x.png"], "label": [0], "patient": ["p"],
                                                "split": ["train"]}), tmp_path / "o", image_size=int(size))


def test_a_relative_data_root_is_recorded_absolute(kermany_root, tmp_path, monkeypatch):
    monkeypatch.chdir(kermany_root.parent)
    assert shard_command.main(["--data-root", kermany_root.name, "--out", str(tmp_path / "s"),
                               "--image-size", "32", "--min-shards", "1"]) == 0
    manifest = shard_manifest.read_manifest(tmp_path / "s")
    assert manifest["data_root"] == str(kermany_root.resolve())
    monkeypatch.chdir(tmp_path)
    shard_manifest.check_source(tmp_path / "s", kermany_root)
    read, _ = shard_reader.read_split_index(tmp_path / "s")
    assert all((kermany_root / key).is_file() for key in read["key"])
    assert read["path"].map(lambda p: p.startswith(str(kermany_root.resolve()))).all()
