"""Every decoder the pipelines use agrees with the damage check, and the check's cached verdicts
follow the file's content: a PNG with an unknown critical chunk (Pillow skips it, libpng and
TensorFlow refuse it), a JPEG damaged in place with its size and modification time kept, and
files too large for TensorFlow's whole-image decode."""

from __future__ import annotations

import os
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pneumo_utils.data import image_checks, images, pipelines
from pneumo_utils.data.datasets import BadImagesWarning
from pneumo_utils.data.images import ImageReadError, read_resized
from pneumo_utils.data.kermany import load_class_folder


@pytest.fixture(autouse=True)
def check_cache(tmp_path, monkeypatch) -> Path:
    """A fresh verdict cache for each test."""
    path = tmp_path / "checks.sqlite"
    monkeypatch.setenv(image_checks.CHECK_CACHE_ENV, str(path))
    return path


def _picture(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A smooth gray picture with some texture (compresses like a radiograph)."""
    rng = np.random.default_rng(seed)
    rows = np.linspace(0, 200, height)[:, None] + np.linspace(0, 40, width)[None, :]
    return np.clip(rows + rng.normal(0, 8, (height, width)), 0, 255).astype(np.uint8)


def _with_chunk(png: bytes, kind: bytes, data: bytes = b"\x00" * 4) -> bytes:
    """``png`` with a chunk of type ``kind`` (valid length and CRC) right after ``IHDR``."""
    end_of_ihdr = 8 + 8 + 13 + 4
    chunk = struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return png[:end_of_ihdr] + chunk + png[end_of_ihdr:]


def _png_bytes(array: np.ndarray, path: Path) -> bytes:
    Image.fromarray(array).save(path)
    return path.read_bytes()


def test_unknown_critical_png_chunk_is_refused_like_tensorflow_does(tmp_path):
    tf = pytest.importorskip("tensorflow")
    path = tmp_path / "odd.png"
    path.write_bytes(_with_chunk(_png_bytes(_picture(64, 64), path), b"QBAD"))
    with Image.open(path) as im:  # Pillow alone would decode it
        im.load()
    with pytest.raises(tf.errors.InvalidArgumentError):
        tf.io.decode_png(tf.io.read_file(str(path)))
    problem = image_checks.check_image(path)
    assert "unknown critical chunk 'QBAD'" in problem
    with pytest.raises(ImageReadError, match=r"odd\.png.*'QBAD'"):
        read_resized(path, 32)
    assert image_checks.graph_decode(path, 32) is None


def test_unknown_ancillary_png_chunk_is_read_by_every_decoder(tmp_path):
    tf = pytest.importorskip("tensorflow")
    path = tmp_path / "extra.png"
    path.write_bytes(_with_chunk(_png_bytes(_picture(64, 64), path), b"qoka"))
    assert image_checks.check_image(path) is None
    assert tf.io.decode_png(tf.io.read_file(str(path))).shape == (64, 64, 1)
    assert image_checks.graph_decode(path, 32) is not None


def test_folder_loader_skips_and_counts_the_unknown_critical_chunk(tmp_path):
    for label in ("NORMAL", "PNEUMONIA"):
        (tmp_path / label).mkdir()
        for k in range(2):
            Image.fromarray(_picture(64, 64, seed=k)).save(tmp_path / label / f"{k}.png")
    victim = tmp_path / "PNEUMONIA" / "1.png"
    victim.write_bytes(_with_chunk(victim.read_bytes(), b"QBAD"))
    with pytest.warns(BadImagesWarning, match=r"1\.png.*QBAD"):
        index = load_class_folder(tmp_path)
    assert str(victim) not in set(index["path"]) and len(index) == 3
    assert [item["path"] for item in index.attrs["skipped"]] == [str(victim)]


def test_a_file_damaged_in_place_is_checked_again(tmp_path):
    path = tmp_path / "x.jpeg"
    Image.fromarray(_picture(256, 256)).save(path, quality=90)
    assert image_checks.check_images([path]) == [None]
    assert image_checks.checked_readable([path]) == [True]
    info = path.stat()
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 300] = bytes(300)  # same size: zeros over the entropy-coded data
    path.write_bytes(bytes(data))
    os.utime(path, ns=(info.st_atime_ns, info.st_mtime_ns))
    assert (path.stat().st_size, path.stat().st_mtime_ns) == (info.st_size, info.st_mtime_ns)
    assert image_checks.checked_readable([path]) == [False]
    assert "damaged JPEG data" in image_checks.check_images([path])[0]
    assert image_checks.graph_decode(path, 32) is None


def test_identical_files_share_one_verdict(tmp_path, check_cache):
    first, second = tmp_path / "a.png", tmp_path / "b.png"
    Image.fromarray(_picture(64, 64)).save(first)
    second.write_bytes(first.read_bytes())
    image_checks.check_images([first])
    assert image_checks.checked_readable([second, tmp_path / "missing.png"]) == [True, False]


def test_files_above_the_graph_pixel_bound_go_through_read_resized(tmp_path, monkeypatch):
    """A PNG or JPEG above GRAPH_PIXELS decoded pixels is not decoded whole by TensorFlow;
    the pipeline still gives read_resized's pixels."""
    png, jpeg = tmp_path / "big.png", tmp_path / "big.jpeg"
    Image.fromarray(_picture(200, 240)).convert("RGB").save(png)
    Image.fromarray(_picture(200, 240)).save(jpeg, quality=90)
    assert image_checks.graph_decode(png, 32) is not None
    monkeypatch.setattr(image_checks, "GRAPH_PIXELS", 120 * 100)
    assert image_checks.graph_decode(png, 32) is None
    assert image_checks.graph_decode(jpeg, 32) is not None  # decoded at 1/2 scale: 120 x 100
    assert image_checks.graph_decode(jpeg, 80) is None  # at full scale: 240 x 200
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        batch = next(iter(pipelines.image_dataset([str(png)], image_size=32, cache=False))).numpy()
    np.testing.assert_array_equal(batch[0], read_resized(png, 32))
    assert images.PIXEL_BUDGET > image_checks.GRAPH_PIXELS
