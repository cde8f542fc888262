"""Data files beyond their bounds: image headers before decoding, DICOM bombs, feature
caches, shard manifests, profiles and fetched folders; small generated inputs only."""

from __future__ import annotations

import numpy as np
import pytest
from dicom_files import write_dicom
from PIL import Image, PngImagePlugin

from pneumo_utils.data import dicom, image_checks, images
from pneumo_utils.data.images import ImageReadError

# --------------------------------------------------------------------------- images


def test_png_over_the_budget_is_refused_without_decoding_it(tmp_path, monkeypatch):
    """getexif() on a PNG decodes the whole image to find a trailing eXIf chunk: a 20000^2
    PNG reached 1.6 GB before the pixel budget refused it."""
    path = tmp_path / "big.png"
    Image.fromarray(np.zeros((200, 200, 3), np.uint8)).save(path)
    monkeypatch.setattr(images, "PIXEL_BUDGET", 100 * 100)

    def never(self):
        raise AssertionError("the PNG was decoded")

    monkeypatch.setattr(PngImagePlugin.PngImageFile, "load", never)
    assert images.read_header(path).orientation == 1
    with pytest.raises(ImageReadError, match="too large to decode safely"):
        images.read_image(path)
    assert "too large" in image_checks.check_image(path)


def test_dicom_frame_over_the_budget_is_refused_from_its_header(tmp_path, monkeypatch):
    """rows x columns x samples x bits is checked before decompressing (6000 x 6000 x 3 at
    32 bits was scored at 3.3 GB)."""
    path = write_dicom(tmp_path / "x.dcm", np.zeros((64, 64), np.uint16))
    monkeypatch.setattr(dicom, "MAX_DICOM_BYTES", 4096)
    with pytest.raises(ImageReadError, match=r"DICOM frame too large .*64 x 64 px, 1 sample\(s\) of 16 bits"):
        images.read_resized(path, 32)


def test_deflated_dicom_inflating_past_the_budget_is_refused(tmp_path, monkeypatch):
    """1 MB of deflated DICOM holding a 1 GiB private element reached 2.8 GB: the inflated
    size is counted in blocks before pydicom reads the file."""
    import pydicom
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    path = write_dicom(tmp_path / "x.dcm", np.zeros((64, 64), np.uint16))
    ds = pydicom.dcmread(path)
    ds.add_new(0x00091010, "OB", b"\0" * (3 * 2**20))
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    ds.save_as(path, enforce_file_format=True)
    assert path.stat().st_size < 2**20
    assert images.read_resized(path, 32).shape == (32, 32, 3)
    monkeypatch.setattr(dicom, "MAX_DICOM_BYTES", 2**20)
    with pytest.raises(ImageReadError, match="inflates to more than 1 MiB"):
        images.read_resized(path, 32)
    assert "inflates" in image_checks.check_image(path)


# --------------------------------------------------------------------------- feature cache


def test_feature_cache_declaring_an_enormous_shape_is_a_damaged_file(tmp_path):
    """A .npy header declaring (2e9, 1024) float32 made np.load raise MemoryError
    ("Unable to allocate 7.45 TiB"); it is deleted and recomputed like any damaged file."""
    from pneumo_utils.model import features

    cached = tmp_path / "key-0123456789abcdef.npy"
    with open(cached, "wb") as handle:
        np.lib.format.write_array_header_1_0(
            handle, {"descr": "<f4", "fortran_order": False, "shape": (2_000_000_000, 1024)})
        handle.write(b"\0" * 4096)
    with pytest.warns(UserWarning, match=r"declares \(2000000000, 1024\) .*deleted"):
        assert features._load_cached(tmp_path / "key.npy", 2_000_000_000) is None
    assert not cached.exists()


# --------------------------------------------------------------------------- shards


@pytest.fixture()
def shard_folder(tmp_path):
    """Eight 32 px images in train and val, four shards each."""
    import pandas as pd

    from pneumo_utils.scale import shard_writer

    rows = []
    for i in range(8):
        path = tmp_path / "images" / f"{i}.png"
        path.parent.mkdir(exist_ok=True)
        Image.fromarray(np.full((40, 40), 30 * i, np.uint8)).save(path)
        rows.append({"path": str(path), "label": i % 2, "patient": f"p{i}",
                     "split": "train" if i < 4 else "val"})
    out = tmp_path / "shards"
    shard_writer.write_shards(pd.DataFrame(rows), out, image_size=32, image_format="png",
                        images_per_shard=2, verbose=False)
    return out


def _edit_manifest(folder, change) -> None:
    import json

    path = folder / "manifest.json"
    manifest = json.loads(path.read_text())
    path.write_text(json.dumps(change(manifest)))


@pytest.mark.parametrize("name", ["../elsewhere/x.tfrecord", "/etc/passwd", "..-00000-of-00001.tfrecord"])
def test_manifest_paths_outside_the_folder_are_refused(shard_folder, name, error_line):
    from pneumo_utils.scale import shard_command, shard_manifest, shard_reader

    def escape(manifest):
        entry = next(iter(manifest["shards"].values()))
        manifest["shards"][name] = dict(entry)
        return manifest

    _edit_manifest(shard_folder, escape)
    with pytest.raises(shard_manifest.CorruptShardError, match="outside"):
        shard_reader.read_shards(shard_folder, "train")
    assert shard_command.main(["--out", str(shard_folder), "--verify"]) == 2
    assert "manifest.json" in error_line()


def test_resumed_plan_with_a_split_outside_the_folder_is_refused(shard_folder):
    import pandas as pd

    from pneumo_utils.scale import shard_manifest, shard_writer

    def escape(manifest):
        manifest["plan"]["../../escape"] = [[0, 1]]
        return manifest

    _edit_manifest(shard_folder, escape)
    index = pd.read_csv(shard_folder / "index.csv")
    with pytest.raises(shard_manifest.CorruptShardError, match="split '../../escape'"):
        shard_writer._resume(shard_folder, {})
    assert not (shard_folder.parent.parent / "escape-00000-of-00001.tfrecord").exists()
    bad = pd.DataFrame({"path": ["x.png"], "label": [0], "patient": ["p"], "split": ["../up"]})
    with pytest.raises(ValueError, match="split name"):
        shard_writer.write_shards(bad, shard_folder.parent / "other", image_size=32, verbose=False)
    assert len(index) == 8


@pytest.mark.parametrize("content", ["[]", '{"complete": true}', "{not json"])
def test_manifest_of_the_wrong_shape_is_one_line(shard_folder, content, error_line):
    from pneumo_utils.scale import shard_command

    (shard_folder / "manifest.json").write_text(content)
    assert shard_command.main(["--out", str(shard_folder), "--verify"]) == 2
    assert "manifest.json" in error_line()


def test_verify_catches_a_shard_swapped_for_another_of_its_split(shard_folder, error_line):
    """Copying train-00001 over train-00000 and editing the checksum passed --verify."""
    from pneumo_utils import files
    from pneumo_utils.scale import shard_command

    first, second = (shard_folder / f"train-0000{i}-of-00004.tfrecord" for i in (0, 1))
    first.write_bytes(second.read_bytes())

    def match(manifest):
        entry = manifest["shards"][first.name]
        entry.update(sha256=files.file_digest(first), bytes=first.stat().st_size)
        return manifest

    _edit_manifest(shard_folder, match)
    assert shard_command.main(["--out", str(shard_folder), "--verify"]) == 2
    line = error_line()
    assert first.name in line and "index.csv" in line
