"""Tests for pneumo_utils.data.images: every file kind we expect in the wild, and broken ones."""

from __future__ import annotations

import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from dicom_files import write_dicom
from PIL import Image, ImageFile

from pneumo_utils.data.image_checks import check_image
from pneumo_utils.data.images import (
    IMAGE_EXTENSIONS,
    ImageReadError,
    is_image_file,
    read_image,
    read_resized,
)

pydicom = pytest.importorskip("pydicom")

H, W = 60, 80


def _gradient(h: int = H, w: int = W, hi: int = 255, dtype=np.uint8) -> np.ndarray:
    """Left-to-right ramp 0..hi, the same on every row."""
    row = np.linspace(0, hi, w).round().astype(dtype)
    return np.tile(row, (h, 1))


def _assert_rgb_image(arr: np.ndarray, shape: tuple[int, int] = (H, W)) -> None:
    assert arr.dtype == np.uint8
    assert arr.shape == (*shape, 3)
    assert arr.flags["C_CONTIGUOUS"]


def _assert_increasing_left_to_right(arr: np.ndarray, tol: int = 2) -> None:
    profile = arr[arr.shape[0] // 2, :, 0].astype(int)
    assert np.all(np.diff(profile) >= -tol), profile
    assert profile[0] < 20 and profile[-1] > 235, profile


# --------------------------------------------------------------------------- good files


def test_grayscale_jpeg(tmp_path):
    path = tmp_path / "IM-0001-0001.jpeg"
    Image.fromarray(_gradient()).save(path, quality=95)
    arr = read_image(path)
    _assert_rgb_image(arr)
    assert np.array_equal(arr[..., 0], arr[..., 1]) and np.array_equal(arr[..., 0], arr[..., 2])
    _assert_increasing_left_to_right(arr)


def test_rgb_jpeg_keeps_colour(tmp_path):
    rgb = np.zeros((H, W, 3), np.uint8)
    rgb[..., 0] = 200  # reddish
    rgb[..., 2] = 30
    path = tmp_path / "person1_virus_1.JPG"
    Image.fromarray(rgb).save(path, quality=95)
    arr = read_image(path)
    _assert_rgb_image(arr)
    assert abs(int(arr[..., 0].mean()) - 200) < 5
    assert abs(int(arr[..., 2].mean()) - 30) < 5


def test_rgba_png_drops_alpha(tmp_path):
    rgba = np.zeros((H, W, 4), np.uint8)
    rgba[..., :3] = _gradient()[..., None]
    rgba[..., 3] = 0  # fully transparent: the colour must still come through
    path = tmp_path / "a.png"
    Image.fromarray(rgba, mode="RGBA").save(path)
    arr = read_image(path)
    _assert_rgb_image(arr)
    assert np.array_equal(arr[..., 0], _gradient())


def test_la_png(tmp_path):
    path = tmp_path / "la.png"
    Image.fromarray(_gradient()).convert("LA").save(path)
    arr = read_image(path)
    _assert_rgb_image(arr)
    assert np.array_equal(arr[..., 1], _gradient())


def test_16bit_png_full_range_divides_by_257(tmp_path):
    path = tmp_path / "sixteen.png"
    Image.fromarray(_gradient(hi=65535, dtype=np.uint16)).save(path)
    with Image.open(path) as im:
        assert im.mode.startswith("I")
    arr = read_image(path)
    _assert_rgb_image(arr)
    _assert_increasing_left_to_right(arr, tol=0)
    assert arr[0, 0, 0] == 0 and arr[0, -1, 0] == 255


def test_16bit_png_holding_12bit_data_is_stretched(tmp_path):
    path = tmp_path / "twelve.png"
    Image.fromarray(_gradient(hi=4000, dtype=np.uint16) + 50).save(path)
    arr = read_image(path)
    _assert_increasing_left_to_right(arr, tol=0)
    assert arr[..., 0].min() == 0 and arr[..., 0].max() == 255


def test_16bit_big_endian_and_float_modes(tmp_path):
    # modes that PNG files do not produce but other Pillow plugins (TIFF) do
    from pneumo_utils.data.images import _pil_to_array

    big = Image.fromarray(_gradient(hi=65535, dtype=np.uint16).astype(">u2"))
    assert big.mode == "I;16B"
    _assert_increasing_left_to_right(_pil_to_array(big)[..., None], tol=0)
    flt = Image.fromarray(_gradient().astype(np.float32) / 255 - 0.5)
    assert flt.mode == "F"
    _assert_increasing_left_to_right(_pil_to_array(flt)[..., None])


def test_palette_png(tmp_path):
    path = tmp_path / "p.png"
    Image.fromarray(_gradient()).convert("P", palette=Image.Palette.ADAPTIVE).save(path)
    with Image.open(path) as im:
        assert im.mode == "P"
    arr = read_image(path)
    _assert_rgb_image(arr)
    _assert_increasing_left_to_right(arr, tol=12)


def test_bilevel_png(tmp_path):
    bits = np.zeros((H, W), bool)
    bits[:, W // 2 :] = True
    path = tmp_path / "bits.png"
    Image.fromarray(bits).save(path)
    with Image.open(path) as im:
        assert im.mode == "1"
    arr = read_image(path)
    _assert_rgb_image(arr)
    assert set(np.unique(arr)) == {0, 255}
    assert arr[0, 0, 0] == 0 and arr[0, -1, 0] == 255


def test_cmyk_jpeg(tmp_path):
    path = tmp_path / "cmyk.jpg"
    Image.fromarray(_gradient()).convert("CMYK").save(path, quality=95)
    arr = read_image(path)
    _assert_rgb_image(arr)
    _assert_increasing_left_to_right(arr, tol=6)


def test_jpeg_with_dcm_extension_is_read_as_jpeg(tmp_path):
    path = tmp_path / "export.dcm"
    Image.fromarray(_gradient()).save(path, format="JPEG", quality=95)
    _assert_increasing_left_to_right(read_image(path))


def test_max_side_keeps_aspect(tmp_path):
    path = tmp_path / "wide.png"
    Image.fromarray(_gradient(200, 400)).save(path)
    arr = read_image(path, max_side=100)
    _assert_rgb_image(arr, (50, 100))
    assert read_image(path, max_side=1000).shape == (200, 400, 3)  # never enlarges
    with pytest.raises(ValueError):
        read_image(path, max_side=0)


def test_read_resized_shapes_and_interpolation(tmp_path):
    path = tmp_path / "g.jpeg"
    Image.fromarray(_gradient(300, 500)).save(path, quality=95)
    _assert_rgb_image(read_resized(path, 64), (64, 64))
    _assert_rgb_image(read_resized(path, (32, 48)), (32, 48))  # (height, width)
    up = read_resized(path, (600, 700))  # upscaling: bilinear, still a smooth ramp
    _assert_rgb_image(up, (600, 700))
    _assert_increasing_left_to_right(up)
    area = read_resized(path, 100)
    _assert_increasing_left_to_right(area)


# --------------------------------------------------------------------------- large files


@pytest.fixture(scope="module")
def huge_jpeg(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("huge") / "huge.jpeg"
    im = Image.linear_gradient("L").resize((8000, 8000), Image.Resampling.BILINEAR)
    im.save(path, quality=75)
    return path


def test_huge_jpeg_read_resized(huge_jpeg):
    arr = read_resized(huge_jpeg, 224)
    _assert_rgb_image(arr, (224, 224))
    # linear_gradient is dark at the top, bright at the bottom
    column = arr[:, 112, 0].astype(int)
    assert column[0] < 20 and column[-1] > 235 and np.all(np.diff(column) >= -2)
    small = read_image(huge_jpeg, max_side=500)
    _assert_rgb_image(small, (500, 500))
    assert check_image(huge_jpeg) is None


def test_huge_jpeg_peak_memory_is_bounded(huge_jpeg):
    """Decoding 8000x8000 at full size needs 64 MB (gray) or 192 MB (RGB) and grows peak
    RSS by ~270 MB; the draft decode at 1/8 scale needs about 1 MB. Measured in a fresh
    interpreter, where importing numpy/cv2 already sets the peak."""
    code = textwrap.dedent(
        """
        import resource, sys
        from pneumo_utils.data.images import read_resized
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        assert read_resized(sys.argv[1], 224).shape == (224, 224, 3)
        print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)
        """
    )
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run(
        [sys.executable, "-c", code, str(huge_jpeg)],
        capture_output=True, text=True, check=True, cwd=root,
    )
    extra_mb = int(out.stdout.strip()) / 1024  # ru_maxrss is in KB on Linux
    assert extra_mb < 40, f"reading grew peak RSS by {extra_mb:.0f} MB"


def test_pixel_limit(tmp_path, monkeypatch):
    """Images above Pillow's decompression-bomb limit open up to images.MAX_PIXELS."""
    from pneumo_utils.data import images

    path = tmp_path / "big.png"
    Image.new("L", (300, 200)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # Pillow would refuse 60 000 px
    assert read_image(path).shape == (200, 300, 3)
    assert Image.MAX_IMAGE_PIXELS == 1000  # restored after the call
    monkeypatch.setattr(images, "MAX_PIXELS", 50_000)
    with pytest.raises(ImageReadError, match="too large"):
        read_image(path)


# --------------------------------------------------------------------------- broken files


@pytest.fixture
def good_jpeg(tmp_path) -> Path:
    rng = np.random.default_rng(0)
    noisy = (rng.random((256, 256)) * 255).astype(np.uint8)  # incompressible: ~60 KB
    path = tmp_path / "person7_bacteria_31.jpeg"
    Image.fromarray(noisy).save(path, quality=90)
    return path


def test_truncated_jpeg(good_jpeg, tmp_path):
    assert not ImageFile.LOAD_TRUNCATED_IMAGES
    data = good_jpeg.read_bytes()
    bad = tmp_path / "half.jpeg"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageReadError, match="half.jpeg") as info:
        read_image(bad)
    assert "truncated" in str(info.value)
    with pytest.raises(ImageReadError, match="truncated"):
        read_resized(bad, 32)  # the reduced-scale decode must notice it too
    assert "truncated" in check_image(bad)


def test_truncated_large_jpeg_found_by_check_image(tmp_path):
    rng = np.random.default_rng(1)
    path = tmp_path / "large.jpeg"
    Image.fromarray((rng.random((600, 600)) * 255).astype(np.uint8)).save(path, quality=90)
    data = path.read_bytes()
    assert len(data) > 128 * 1024  # above check_image's full-decode size
    assert check_image(path) is None
    path.write_bytes(data[: len(data) // 2])
    assert "truncated" in check_image(path)


def test_truncated_png(tmp_path):
    path = tmp_path / "t.png"
    Image.fromarray((np.random.default_rng(0).random((300, 300)) * 255).astype(np.uint8)).save(
        path
    )
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageReadError, match="t.png"):
        read_image(path)
    assert check_image(path)


def test_zero_byte_file(tmp_path):
    path = tmp_path / "empty.jpeg"
    path.touch()
    with pytest.raises(ImageReadError, match=r"empty\.jpeg.*0 bytes"):
        read_image(path)
    assert "0 bytes" in check_image(path)


def test_text_file_named_png(tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("this is not an image\n")
    with pytest.raises(ImageReadError, match="notes.png") as info:
        read_image(path)
    assert "\n" not in str(info.value)
    problem = check_image(path)
    assert problem and "\n" not in problem and "not a JPEG, PNG or DICOM" in problem


def test_missing_file(tmp_path):
    path = tmp_path / "nope.jpeg"
    with pytest.raises(FileNotFoundError, match="nope.jpeg"):
        read_image(path)
    with pytest.raises(FileNotFoundError):
        read_resized(path, 10)
    assert check_image(path) == "file not found"


def test_directory_is_not_an_image(tmp_path):
    folder = tmp_path / "dir.jpeg"
    folder.mkdir()
    with pytest.raises(ImageReadError, match="directory"):
        read_image(folder)


def test_check_image_good_files(good_jpeg, tmp_path):
    assert check_image(good_jpeg) is None
    png = tmp_path / "ok.png"
    Image.fromarray(_gradient()).save(png)
    assert check_image(png) is None


def test_image_read_error_is_value_error_and_pickles():
    err = ImageReadError("/x/a.jpeg", "truncated JPEG data (file is 10 bytes)")
    assert isinstance(err, ValueError)
    assert str(err) == "cannot read /x/a.jpeg: truncated JPEG data (file is 10 bytes)"
    again = pickle.loads(pickle.dumps(err))
    assert str(again) == str(err) and again.reason == err.reason


# --------------------------------------------------------------------------- file names


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("X.JPEG", True),
        ("person1_virus_6.jpeg", True),
        ("IM-0001-0001.jpg", True),
        ("scan.PNG", True),
        ("study/1.2.3.dcm", True),
        ("a.DICOM", True),
        (".DS_Store", False),
        ("Thumbs.db", False),
        ("notes.txt", False),
        ("._x.jpeg", False),
        (".hidden.png", False),
        ("jpeg", False),
        ("archive.jpeg.zip", False),
    ],
)
def test_is_image_file(name, expected):
    assert is_image_file(name) is expected
    assert is_image_file(Path("/data/train/NORMAL") / name) is expected


def test_image_extensions():
    assert IMAGE_EXTENSIONS == frozenset({".jpeg", ".jpg", ".png", ".dcm", ".dicom"})


# --------------------------------------------------------------------------- DICOM


def _ramp12() -> np.ndarray:
    return _gradient(hi=4095, dtype=np.uint16)


def test_dicom_monochrome2_without_window_is_minmax(tmp_path):
    arr = read_image(write_dicom(tmp_path / "m2.dcm", _ramp12()))
    _assert_rgb_image(arr)
    _assert_increasing_left_to_right(arr, tol=0)
    assert arr.min() == 0 and arr.max() == 255


def test_dicom_monochrome1_is_inverted(tmp_path):
    m2 = read_image(write_dicom(tmp_path / "m2.dcm", _ramp12(), "MONOCHROME2"))
    m1 = read_image(write_dicom(tmp_path / "m1.dcm", _ramp12(), "MONOCHROME1"))
    assert np.array_equal(m1, 255 - m2)
    m2w = read_image(write_dicom(tmp_path / "m2w.dcm", _ramp12(), "MONOCHROME2", (2048, 1024)))
    m1w = read_image(write_dicom(tmp_path / "m1w.dcm", _ramp12(), "MONOCHROME1", (2048, 1024)))
    assert np.array_equal(m1w, 255 - m2w)


def test_dicom_window_is_applied(tmp_path):
    # window 1536..2560 of a 0..4095 ramp: left third black, right third white
    arr = read_image(write_dicom(tmp_path / "w.dcm", _ramp12(), window=(2048, 1024)))[..., 0]
    x = np.linspace(0, 4095, W)
    assert np.all(arr[:, x < 1500] == 0)
    assert np.all(arr[:, x > 2600] == 255)
    middle = arr[0, (x > 1600) & (x < 2500)].astype(int)
    assert np.all(np.diff(middle) > 0) and 0 < middle.min() and middle.max() < 255


def test_dicom_wide_window_is_not_stretched(tmp_path):
    # data 1000..3000 under a 0..4096 window keeps its mid-grey look (no min-max stretch)
    pixels = _gradient(hi=2000, dtype=np.uint16) + 1000
    arr = read_image(write_dicom(tmp_path / "w.dcm", pixels, window=(2048, 4096)))[..., 0]
    assert 55 <= arr.min() <= 70 and 180 <= arr.max() <= 195


def test_dicom_rescale_and_window_in_rescaled_units(tmp_path):
    # stored 0..4095 -> rescaled -1024..3071 (CT-like units); window 0..1000 in those units
    path = write_dicom(tmp_path / "r.dcm", _ramp12(), window=(500, 1000), rescale=(1, -1024))
    arr = read_image(path)[..., 0]
    rescaled = np.linspace(0, 4095, W) - 1024
    assert np.all(arr[:, rescaled < -10] == 0)
    assert np.all(arr[:, rescaled > 1010] == 255)


def test_dicom_multiframe_uses_first_frame(tmp_path):
    frames = np.stack([_ramp12(), 4095 - _ramp12(), _ramp12()])
    arr = read_image(write_dicom(tmp_path / "mf.dcm", frames))
    _assert_rgb_image(arr)
    _assert_increasing_left_to_right(arr, tol=0)


def test_dicom_detected_by_magic_and_without_preamble(tmp_path):
    no_ext = write_dicom(tmp_path / "1.2.840.99", _ramp12())
    _assert_increasing_left_to_right(read_image(no_ext), tol=0)
    raw = write_dicom(tmp_path / "raw.dcm", _ramp12(), preamble=False)
    assert raw.read_bytes()[128:132] != b"DICM"
    _assert_increasing_left_to_right(read_image(raw), tol=0)
    assert read_resized(raw, 16).shape == (16, 16, 3)
    assert check_image(raw) is None


def test_dicom_without_pixel_data(tmp_path):
    path = write_dicom(tmp_path / "nopix.dcm", _ramp12())
    ds = pydicom.dcmread(path)
    del ds.PixelData
    ds.save_as(path)
    with pytest.raises(ImageReadError, match=r"nopix\.dcm.*no pixel data"):
        read_image(path)
    assert "no pixel data" in check_image(path)


def test_text_file_named_dcm(tmp_path):
    path = tmp_path / "fake.dcm"
    path.write_text("hello, I am not DICOM\n" * 20)
    with pytest.raises(ImageReadError, match="fake.dcm"):
        read_image(path)
    assert check_image(path)


def test_truncated_dicom(tmp_path):
    path = write_dicom(tmp_path / "cut.dcm", np.tile(_ramp12(), (2, 2)))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageReadError, match=r"cut\.dcm.*less than expected"):
        read_image(path)
    assert "less than expected" in check_image(path)
