"""The tf.data image pipeline: graph decoding of plain JPEG/PNG files next to the Python
reader, in the order of the paths, with the pixels of ``read_resized``."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from dicom_files import write_dicom
from PIL import Image

from pneumo_utils.data import image_checks, images, pipelines

SIZE = 64

TOLERANCE = 1
"""Largest difference (grey levels) allowed between the pipeline and ``read_resized``: OpenCV
resizes with fixed-point and float arithmetic of its own, so an exact half can round the other
way; on downscaled JPEG and PNG files the two agree exactly."""


@pytest.fixture(autouse=True)
def check_cache(tmp_path, monkeypatch) -> Path:
    """A fresh verdict cache of ``image_checks.check_images`` for each test."""
    path = tmp_path / "checks.sqlite"
    monkeypatch.setenv(image_checks.CHECK_CACHE_ENV, str(path))
    return path


def _picture(height: int, width: int, seed: int) -> np.ndarray:
    """A smooth gray picture with noise, ``(height, width)`` uint8 (resizing changes it)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width] / max(height, width)
    shade = 120 + 70 * np.sin(9 * xx + seed) * np.cos(7 * yy) + rng.normal(0, 12, (height, width))
    return np.clip(shade, 0, 255).astype(np.uint8)


def _colour(gray: np.ndarray) -> np.ndarray:
    return np.stack([gray, np.roll(gray, 7, axis=0), 255 - gray], axis=-1)


def _mixed_files(folder: Path) -> dict[str, bool]:
    """Files of every kind, each mapped to whether TensorFlow should decode it."""
    folder.mkdir(parents=True, exist_ok=True)
    gray = _picture(300, 260, 1)
    rotated = Image.fromarray(_picture(200, 240, 3))
    exif = rotated.getexif()
    exif[0x0112] = 6
    files = {
        "gray.jpeg": (Image.fromarray(gray), {"quality": 90}, True),
        "colour.jpg": (Image.fromarray(_colour(_picture(380, 500, 2))), {"quality": 85}, True),
        "big.jpeg": (Image.fromarray(_picture(1100, 1300, 4)), {"quality": 90}, True),  # 1/8 scale
        "gray8.png": (Image.fromarray(gray), {}, True),  # 2 x 2 block average before resizing
        "colour8.png": (Image.fromarray(_colour(_picture(389, 517, 5))), {}, True),
        "small.png": (Image.fromarray(_picture(40, 50, 6)), {}, True),  # enlarged
        "deep16.png": (Image.fromarray(gray.astype(np.uint16) * 257), {}, False),
        "palette.png": (Image.fromarray(gray).convert("P"), {}, False),
        "alpha.png": (Image.fromarray(_colour(gray)).convert("RGBA"), {}, False),
        "rotated.jpg": (rotated, {"quality": 90, "exif": exif}, False),
        "cmyk.jpg": (Image.fromarray(_colour(gray)).convert("CMYK"), {"quality": 90}, False),
    }
    for name, (image, options, _) in files.items():
        image.save(folder / name, **options)
    write_dicom(folder / "chest.dcm", gray.astype(np.uint16) * 16)
    return {**{name: graph for name, (_, _, graph) in files.items()}, "chest.dcm": False}


def test_plain_files_are_decoded_in_the_graph_and_others_by_read_resized(tmp_path):
    expected = _mixed_files(tmp_path)
    chosen = {name: image_checks.graph_decode(tmp_path / name, SIZE) is not None for name in expected}
    assert chosen == expected
    big = image_checks.graph_decode(tmp_path / "big.jpeg", SIZE)
    assert (big.format, big.channels, big.jpeg_ratio, big.box) == ("JPEG", 1, 8, 1)
    assert image_checks.graph_decode(tmp_path / "gray8.png", SIZE).box == 2
    assert image_checks.graph_decode(tmp_path / "missing.png", SIZE) is None


def test_mixed_list_keeps_order_labels_and_pixels(tmp_path):
    names = list(_mixed_files(tmp_path))
    paths = [str(tmp_path / name) for name in names]
    labels = np.arange(len(paths)) % 2
    batches = list(pipelines.image_dataset(paths, labels, image_size=SIZE, batch_size=5, cache=False))
    x = np.concatenate([b[0].numpy() for b in batches])
    np.testing.assert_array_equal(np.concatenate([b[1].numpy() for b in batches]), labels)
    assert x.shape == (len(paths), SIZE, SIZE, 3) and x.dtype == np.float32
    for name, path, image in zip(names, paths, x, strict=True):
        diff = np.abs(image - images.read_resized(path, SIZE))
        assert diff.max() <= TOLERANCE, f"{name}: differs by up to {diff.max():.0f} grey levels"
        assert diff.mean() < 0.2, f"{name}: differs by {diff.mean():.3f} grey levels on average"
        if name.endswith(("jpeg", "jpg", "8.png")):
            assert diff.max() == 0, f"{name}: downscaled plain file not decoded exactly"


def test_shuffled_labels_stay_with_their_images(tmp_path):
    """Each file is one flat grey level that encodes its label, half JPEG, half 16-bit PNG
    (graph and Python branches); shuffling must keep every image with its label."""
    paths, labels = [], []
    for i in range(12):
        label = i % 2
        level = np.full((48, 48), 60 + 120 * label + i, np.uint8)
        if i % 3:
            path = tmp_path / f"{i}.jpeg"
            Image.fromarray(level).save(path, quality=95)
        else:
            path = tmp_path / f"{i}.png"
            Image.fromarray(level.astype(np.uint16) * 257).save(path)
        paths.append(str(path))
        labels.append(label)
    ds = pipelines.image_dataset(paths, np.array(labels), image_size=32, batch_size=4, shuffle=True)
    seen = [(float(img.mean()), float(y)) for x, ys in ds for img, y in zip(x.numpy(), ys.numpy(), strict=True)]
    assert sorted(round(level) for level, _ in seen) == sorted(60 + 120 * (i % 2) + i for i in range(12))
    assert all((level > 150) == bool(y) for level, y in seen)


@pytest.mark.parametrize("damage", ["truncated", "overwritten"])
def test_damaged_jpeg_fails_naming_the_file(tmp_path, damage):
    """TensorFlow decodes a JPEG with corrupt data to a wrong picture without an error, so the
    file must reach read_resized, whose error names it."""
    Image.fromarray(_picture(200, 240, 7)).save(tmp_path / "good.jpeg", quality=90)
    data = bytearray((tmp_path / "good.jpeg").read_bytes())
    if damage == "truncated":
        data = data[: len(data) // 2]
    else:
        data[len(data) // 2: len(data) // 2 + 40] = np.random.default_rng(1).bytes(40)
    bad = tmp_path / "bad.jpeg"
    bad.write_bytes(bytes(data))
    assert image_checks.check_image(bad) is not None
    ds = pipelines.image_dataset([str(tmp_path / "good.jpeg"), str(bad)], np.array([0, 1]),
                                 image_size=SIZE, batch_size=2, cache=False)
    with pytest.raises(tf.errors.OpError, match=rf"ImageReadError: cannot read {re.escape(str(bad))}: "
                                                r"(truncated|damaged) JPEG data"):
        list(ds)


def test_files_checked_before_skip_the_damage_check(tmp_path):
    """Files that check_images found readable, unchanged since, are not decoded again at
    pipeline build time; a changed file is."""
    path = tmp_path / "a.jpeg"
    Image.fromarray(_picture(100, 120, 10)).save(path, quality=90)
    assert image_checks.checked_readable([path]) == [False]
    assert image_checks.check_images([path]) == [None]
    assert image_checks.checked_readable([path, tmp_path / "missing.png"]) == [True, False]
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    assert image_checks.checked_readable([path]) == [False]
    assert image_checks.graph_decode(path, SIZE) is None


def test_plain_files_need_no_python_function(tmp_path):
    """A pipeline over plain JPEG/PNG files holds no Python function (it can be traced and
    shipped to tf.data workers); one with a 16-bit PNG does."""
    gray = _picture(100, 120, 8)
    Image.fromarray(gray).save(tmp_path / "a.jpeg")
    Image.fromarray(gray).save(tmp_path / "b.png")
    Image.fromarray(gray.astype(np.uint16) * 257).save(tmp_path / "c.png")
    plain = pipelines.image_dataset([str(tmp_path / "a.jpeg"), str(tmp_path / "b.png")], cache=False)
    mixed = pipelines.image_dataset([str(tmp_path / "a.jpeg"), str(tmp_path / "c.png")], cache=False)
    assert b"PyFunc" not in plain._as_serialized_graph().numpy()
    assert b"PyFunc" in mixed._as_serialized_graph().numpy()


def test_images_over_the_pixel_budget_use_read_resized(tmp_path, monkeypatch):
    path = tmp_path / "large.jpeg"
    Image.fromarray(_picture(300, 400, 9)).save(path, quality=90)
    monkeypatch.setattr(images, "PIXEL_BUDGET", 200 * 200)
    monkeypatch.setattr(image_checks, "PIXEL_BUDGET", 200 * 200)
    assert image_checks.graph_decode(path, 32) is None
    x = next(iter(pipelines.image_dataset([str(path)], image_size=32, cache=False))).numpy()
    np.testing.assert_array_equal(x[0], images.read_resized(path, 32))


def test_feature_cache_key_names_the_decoder(monkeypatch, tmp_path):
    from pneumo_utils.model import features

    (tmp_path / "a.png").write_bytes(b"x")
    paths = [str(tmp_path / "a.png")]
    key = features.cache_key("weights", 224, paths)
    monkeypatch.setattr(features, "DECODER", "another-decoder")
    assert features.cache_key("weights", 224, paths) != key


def test_empty_path_list_yields_nothing():
    assert list(pipelines.image_dataset([], np.array([]), image_size=SIZE, cache=False)) == []
