"""TFRecord shards: records and manifests edited after writing, and a hostile ``--image-size``.

Each case writes a small synthetic Kermany set into PNG shards with this checkout's command,
then alters them the way a damaged disk or a careless edit would (a record swapped for a PNG
declaring 20000 x 20000 pixels, a flipped label with the checksums edited to match, a
corrupted record, an edited ``manifest.json`` or ``index.csv``), and runs ``--verify`` or a
small reader script that works against either checkout's module layout.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import hostile_inputs
from hostile_inputs import ROOT, Case

_READ = """
import sys
try:
    from pneumo_utils.scale.shard_reader import read_images, read_index
except ImportError:
    from pneumo_utils.scale.shards import read_images, read_index
rows = read_index(sys.argv[1])["row"]
images, labels = read_images(sys.argv[1], rows)
print(images.shape, labels.sum())
"""

_RELATIVE = """
import os, sys
from pneumo_utils.scale.shard_command import main
try:
    from pneumo_utils.scale.shard_manifest import check_source
except ImportError:
    from pneumo_utils.scale.shards import check_source
assert main(["--data-root", "data", "--out", "shards", "--image-size", "32", "--min-shards", "1"]) == 0
os.makedirs("elsewhere", exist_ok=True)
os.chdir("elsewhere")
check_source(os.path.abspath("../shards"), os.path.abspath("../data"))
print("the shards are recognised as the data folder's")
"""


def _data(folder: Path) -> Path:
    sys.path.insert(0, str(ROOT / "tests"))
    from synthetic import make_kermany_like

    return make_kermany_like(folder / "data", n_train_per_class=12, n_val_per_class=2,
                             n_test_per_class=4, image_size=40)


def _shards(folder: Path) -> Path:
    """PNG shards (32 px, 2 per split) of a small synthetic set, written with this checkout."""
    out = folder / "shards"
    subprocess.run([sys.executable, *hostile_inputs.command("shards"), "--data-root", str(_data(folder)),
                    "--out", str(out), "--image-size", "32", "--format", "png", "--min-shards", "2"],
                   check=True, capture_output=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    return out


def _first_train_shard(out: Path) -> Path:
    return sorted(out.glob("train-*.tfrecord"))[0]


def _rewrite_first_record(out: Path, change) -> None:
    """Rewrite the first train shard with ``change(example)`` applied to its first record, and
    edit the manifest's size and sha256 to match (so the checksums pass)."""
    import hashlib

    import tensorflow as tf

    path = _first_train_shard(out)
    records = [bytes(r.numpy()) for r in tf.data.TFRecordDataset(str(path))]
    example = tf.train.Example.FromString(records[0])
    change(example)
    records[0] = example.SerializeToString()
    with tf.io.TFRecordWriter(str(path)) as writer:
        for record in records:
            writer.write(record)
    manifest = json.loads((out / "manifest.json").read_text())
    data = path.read_bytes()
    manifest["shards"][path.name].update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    (out / "manifest.json").write_text(json.dumps(manifest))


def _huge_png(side: int = 20_000) -> bytes:
    """A grey PNG declaring ``side`` x ``side`` pixels, all black: a few hundred KB."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    pack = zlib.compressobj(9)
    row = b"\x00" * (side + 1)
    body = b"".join(pack.compress(row) for _ in range(side)) + pack.flush()
    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", body) + chunk(b"IEND", b"")


def _huge(folder: Path) -> Path:
    out = _shards(folder)
    image = _huge_png()
    _rewrite_first_record(out, lambda e: e.features.feature["image"].bytes_list.value.__setitem__(0, image))
    return out


def _flipped_label(folder: Path) -> Path:
    out = _shards(folder)

    def flip(example):
        labels = example.features.feature["label"].int64_list.value
        labels[0] = 1 - labels[0]

    _rewrite_first_record(out, flip)
    return out


def _corrupt(flips: int):
    def build(folder: Path) -> Path:
        out = _shards(folder)
        path = _first_train_shard(out)
        data = bytearray(path.read_bytes())
        start = len(data) // 2
        for i in range(start, min(start + flips, len(data))):
            data[i] ^= 0xFF
        path.write_bytes(bytes(data))
        return out
    return build


def _manifest_image_size(value):
    def build(folder: Path) -> Path:
        out = _shards(folder)
        manifest = json.loads((out / "manifest.json").read_text())
        manifest["image_size"] = value
        (out / "manifest.json").write_text(json.dumps(manifest))
        return out
    return build


def _edited_index(folder: Path) -> Path:
    out = _shards(folder)
    lines = (out / "index.csv").read_text().splitlines()
    header = lines[0].split(",")
    at = header.index("label")
    fields = lines[1].split(",")
    fields[at] = str(1 - int(fields[at]))
    lines[1] = ",".join(fields)
    (out / "index.csv").write_text("\n".join(lines) + "\n")
    return out


def _verify(make):
    def build(folder: Path) -> list[str]:
        return [*hostile_inputs.command("shards"), "--out", str(make(folder)), "--verify"]
    return build


def _read(make):
    def build(folder: Path) -> list[str]:
        return ["-c", _READ, str(make(folder))]
    return build


def _image_size(folder: Path) -> list[str]:
    return [*hostile_inputs.command("shards"), "--data-root", str(_data(folder)), "--out",
            str(folder / "shards"), "--image-size", "100000"]


def _relative_root(folder: Path) -> list[str]:
    _data(folder)
    return ["-c", _RELATIVE]


CASES = [
    Case("shards", "record declaring a 20000 px PNG: --verify", _verify(_huge)),
    Case("shards", "record declaring a 20000 px PNG: read", _read(_huge)),
    Case("shards", "corrupted record (1 byte): read", _read(_corrupt(1))),
    Case("shards", "64 flipped bytes: read", _read(_corrupt(64))),
    Case("shards", "64 flipped bytes: --verify", _verify(_corrupt(64))),
    *[Case("shards", f"manifest image_size {v!r}: {how}", make(_manifest_image_size(v)))
      for v in (64, "abc", 30000) for how, make in (("--verify", _verify), ("read", _read))],
    Case("shards", "--image-size 100000", _image_size),
    Case("shards", "label flipped in a record: --verify", _verify(_flipped_label)),
    Case("shards", "label flipped in a record: read", _read(_flipped_label)),
    Case("shards", "label flipped in index.csv: --verify", _verify(_edited_index)),
    Case("shards", "label flipped in index.csv: read", _read(_edited_index)),
    Case("shards", "relative --data-root, read from elsewhere", _relative_root),
]
