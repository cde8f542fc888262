"""Tests for tests/synthetic.py: the Kermany-like generated data set used by other tests."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import roc_auc_score
from synthetic import SIGNAL_BOX, main, make_kermany_like, synthetic_xray

from pneumo_utils.data.images import read_image

SPLITS = ("train", "val", "test")
CLASSES = ("NORMAL", "PNEUMONIA")
NORMAL_NAME = re.compile(r"^(?:NORMAL2-)?IM-(?P<patient>\d{4})-(?P<image>\d{4})\.jpeg$")
PNEUMONIA_NAME = re.compile(r"^person(?P<patient>\d+)_(?P<kind>bacteria|virus)_(?P<image>\d+)\.jpeg$")


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return make_kermany_like(tmp_path_factory.mktemp("kermany"))


def _files(root: Path, split: str, cls: str) -> list[Path]:
    return sorted((root / split / cls).iterdir())


def _patient(path: Path) -> int:
    match = NORMAL_NAME.match(path.name) or PNEUMONIA_NAME.match(path.name)
    assert match, path.name
    return int(match["patient"])


def _box_mask(n: int) -> np.ndarray:
    y0, x0, y1, x1 = SIGNAL_BOX
    mask = np.zeros((n, n), bool)
    mask[round(y0 * n) : round(y1 * n), round(x0 * n) : round(x1 * n)] = True
    return mask


def test_layout_and_counts(root):
    assert sorted(p.name for p in root.iterdir()) == sorted(SPLITS)
    expected = {"train": 24, "val": 4, "test": 8}
    for split in SPLITS:
        assert sorted(p.name for p in (root / split).iterdir()) == list(CLASSES)
        for cls in CLASSES:
            files = _files(root, split, cls)
            assert len(files) == expected[split], (split, cls)
            assert all(p.is_file() and p.suffix == ".jpeg" for p in files)


def test_file_names_follow_kermany(root):
    normal = [p.name for s in SPLITS for p in _files(root, s, "NORMAL")]
    pneumonia = [p.name for s in SPLITS for p in _files(root, s, "PNEUMONIA")]
    assert all(NORMAL_NAME.match(n) for n in normal), normal
    assert all(PNEUMONIA_NAME.match(n) for n in pneumonia), pneumonia
    assert any(n.startswith("NORMAL2-IM-") for n in normal)
    assert any(n.startswith("IM-") for n in normal)
    assert any("_bacteria_" in n for n in pneumonia) and any("_virus_" in n for n in pneumonia)
    # like the original, the image number counts per kind over the whole set: never repeats
    keys = [(m["kind"], m["image"]) for m in map(PNEUMONIA_NAME.match, pneumonia)]
    assert len(set(keys)) == len(keys)


def test_images_per_patient_and_no_patient_in_two_splits(root):
    splits_of = defaultdict(set)
    images_of = defaultdict(int)
    for split in SPLITS:
        for cls in CLASSES:
            for path in _files(root, split, cls):
                splits_of[_patient(path)].add(split)
                images_of[_patient(path)] += 1
    assert all(len(s) == 1 for s in splits_of.values()), splits_of
    assert set(images_of.values()) == {2}
    # patient numbers are unique across classes too (NORMAL IM-0007 is not person7)
    normal = {_patient(p) for s in SPLITS for p in _files(root, s, "NORMAL")}
    pneumonia = {_patient(p) for s in SPLITS for p in _files(root, s, "PNEUMONIA")}
    assert not normal & pneumonia


def test_uneven_images_per_patient(tmp_path):
    root = make_kermany_like(tmp_path, 7, 1, 2, image_size=32, images_per_patient=3)
    counts = defaultdict(int)
    for path in _files(root, "train", "PNEUMONIA"):
        counts[_patient(path)] += 1
    assert sorted(counts.values()) == [1, 3, 3]


def test_images_are_readable_and_mixed_modes(root):
    modes = set()
    for split in SPLITS:
        for cls in CLASSES:
            for path in _files(root, split, cls):
                with Image.open(path) as im:
                    modes.add(im.mode)
                    assert im.size == (64, 64)
                arr = read_image(path)
                assert arr.shape == (64, 64, 3) and arr.dtype == np.uint8
    assert modes == {"L", "RGB"}


def test_deterministic_and_seed_dependent(tmp_path):
    def contents(root: Path) -> dict[str, bytes]:
        return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*.jpeg"))}

    a = contents(make_kermany_like(tmp_path / "a", seed=3))
    b = contents(make_kermany_like(tmp_path / "b", seed=3))
    c = contents(make_kermany_like(tmp_path / "c", seed=4))
    assert a == b
    assert a.keys() == c.keys() and a != c


def test_png_format_and_argument_checks(tmp_path):
    root = make_kermany_like(tmp_path, 2, 1, 1, image_size=32, fmt="png")
    files = sorted(root.rglob("*.*"))
    assert len(files) == 8 and all(p.suffix == ".png" for p in files)
    assert read_image(files[0]).shape == (32, 32, 3)
    with pytest.raises(ValueError, match="fmt"):
        make_kermany_like(tmp_path / "x", fmt="gif")
    with pytest.raises(ValueError, match="images_per_patient"):
        make_kermany_like(tmp_path / "x", images_per_patient=0)


def test_default_set_is_fast(tmp_path):
    start = time.perf_counter()
    make_kermany_like(tmp_path)
    assert time.perf_counter() - start < 2.0


def test_synthetic_xray_shape_and_arguments():
    rng = np.random.default_rng(0)
    for size in (32, 64, 100):
        img = synthetic_xray(1, rng, size)
        assert img.shape == (size, size, 3) and img.dtype == np.uint8
        assert np.array_equal(img[..., 0], img[..., 2])
    with pytest.raises(ValueError, match="label"):
        synthetic_xray(2, rng)
    with pytest.raises(ValueError, match="image_size"):
        synthetic_xray(0, rng, 4)


def test_same_draws_differ_only_inside_signal_box():
    """With the same generator state the two classes share anatomy, jitter and noise, so
    their difference is the planted opacity alone."""
    n = 64
    normal = synthetic_xray(0, np.random.default_rng(7), n)[..., 0].astype(int)
    pneumonia = synthetic_xray(1, np.random.default_rng(7), n)[..., 0].astype(int)
    diff = pneumonia - normal
    inside = _box_mask(n)
    assert diff.min() >= 0
    assert diff[inside].max() > 80
    # outside only the faded tail just past the box edge (<= exp(-2) of the peak)
    assert diff[~inside].max() <= 0.2 * diff[inside].max()


def test_classes_differ_inside_signal_box_much_more_than_outside():
    n, count = 64, 150
    rng = np.random.default_rng(11)
    normal = np.stack([synthetic_xray(0, rng, n)[..., 0] for _ in range(count)]).astype(float)
    pneumonia = np.stack([synthetic_xray(1, rng, n)[..., 0] for _ in range(count)]).astype(float)
    diff = np.abs(pneumonia.mean(0) - normal.mean(0))
    inside = _box_mask(n)
    assert diff[inside].mean() > 8 * diff[~inside].mean(), (
        diff[inside].mean(), diff[~inside].mean()
    )


def test_mean_brightness_alone_is_a_poor_classifier():
    rng = np.random.default_rng(5)
    labels = np.arange(300) % 2
    means = [synthetic_xray(int(y), rng).mean() for y in labels]
    auc = roc_auc_score(labels, means)
    assert 0.5 <= auc < 0.8, auc


def test_main_prints_counts(tmp_path, capsys):
    assert main([str(tmp_path / "out"), "--per-class", "12", "--image-size", "32", "--seed", "2"]) == 0
    out = capsys.readouterr().out
    assert "wrote 36 synthetic images" in out  # val gets 12/6 = 2, test 12/3 = 4 per class
    assert "train: NORMAL 12, PNEUMONIA 12" in out
    assert "val: NORMAL 2, PNEUMONIA 2" in out
    assert "test: NORMAL 4, PNEUMONIA 4" in out
    with Image.open(next((tmp_path / "out" / "test" / "NORMAL").iterdir())) as im:
        assert im.size == (32, 32)


def test_script_cli(tmp_path):
    root = Path(__file__).resolve().parents[1]
    dest = tmp_path / "cli"
    result = subprocess.run(
        [sys.executable, "tests/synthetic.py", str(dest), "--per-class", "6"],
        capture_output=True, text=True, cwd=root, check=True,
    )
    assert "train: NORMAL 6, PNEUMONIA 6" in result.stdout
    assert len(list(dest.rglob("*.jpeg"))) == 2 * (6 + 1 + 2)
