"""Robustness: bad input and the clinical formats; nothing lost, same result twice.

One section per row of the issue's table. What other files already cover is named here
instead of repeated (file::test):

* bad images in a data set:
  test_datasets.py::test_non_image_and_corrupt_files_are_skipped_and_counted;
  each broken kind decoded: test_images.py::test_truncated_jpeg, test_truncated_png,
  test_truncated_large_jpeg_found_by_check_image, test_zero_byte_file,
  test_text_file_named_png; predict CLI on a truncated JPEG (slow):
  test_learning.py::test_predict_cli_bad_inputs_exit_2
* layout errors: test_datasets.py::test_missing_split_names_the_folder,
  test_empty_class_folder_names_the_folder, test_unknown_class_folder_is_an_error
* image modes one by one: test_images.py (grayscale, RGBA, LA, 16-bit, palette, CMYK, ...)
* huge JPEG decode memory: test_images.py::test_huge_jpeg_peak_memory_is_bounded
* DICOM photometric and windowing: test_images.py::test_dicom_*
* not a model file: test_models.py::test_not_a_model_file_is_a_clear_error
* NIH table with missing columns or images: test_nih.py::test_missing_columns_list_expected_and_found,
  test_missing_images_are_counted_in_one_warning, test_missing_images_raise_in_error_mode
* missing data root: test_datasets.py::test_missing_root_says_what_to_do; offline download:
  test_runner.py::test_fetch_offline_exits_2_with_one_message
* a failing notebook under run_all.sh:
  test_runner.py::test_failing_notebook_keeps_partial_outputs_and_next_runs
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import textwrap
import warnings
import zipfile
from pathlib import Path

import keras
import numpy as np
import pytest
from dicom_files import write_dicom
from PIL import Image
from synthetic import synthetic_xray

from pneumo_utils.data import image_checks, images, pipelines
from pneumo_utils.data.datasets import BadImagesWarning, DatasetLayoutError
from pneumo_utils.data.images import ImageReadError, read_resized
from pneumo_utils.data.kermany import load_class_folder, load_kermany
from pneumo_utils.deploy import predict
from pneumo_utils.evaluation import evaluate
from pneumo_utils.files import file_digest, write_json_atomic
from pneumo_utils.model import backbones, features, saving
from pneumo_utils.sidecar import signed

ROOT = Path(__file__).resolve().parents[1]
SIZE = 224  # input side of the prediction model used here


# --------------------------------------------------------------------------- helpers


def _picture(side: int = 256, seed: int = 0) -> np.ndarray:
    """A synthetic chest X-ray (uint8 gray, stretched to 0-255) with the PNEUMONIA blob."""
    picture = synthetic_xray(1, np.random.default_rng(seed), side)
    picture = (picture[..., 0] if picture.ndim == 3 else picture).astype(float)
    return np.rint((picture - picture.min()) * (255.0 / np.ptp(picture))).astype(np.uint8)


def _encoded(arr: np.ndarray, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(arr).save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def _save(arr: np.ndarray, path: Path, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, **kwargs)
    return path


def _content_model(size: int = SIZE, seed: int = 0) -> keras.Model:
    """A tiny deterministic model whose output depends on the image layout: mean of each
    28x28 block (0-1), then a seeded linear map and a sigmoid. No training needed."""
    inputs = keras.Input((size, size, 3), name="image")
    x = backbones.preprocessing_layer(inputs, "unit")
    x = keras.layers.AveragePooling2D(size // 8, name="blocks")(x)
    x = keras.layers.Flatten(name="flat")(x)
    out = keras.layers.Dense(1, activation="sigmoid", name="head_output")(x)
    model = keras.Model(inputs, out, name="content")
    kernel = np.random.default_rng(seed).normal(0.0, 3.0, (8 * 8 * 3, 1)).astype("float32")
    model.get_layer("head_output").set_weights([kernel, np.zeros(1, "float32")])
    return model


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory) -> Path:
    """The content model, its bias set so that the test picture gets P(PNEUMONIA) ~ 0.73."""
    path = tmp_path_factory.mktemp("model") / "content.keras"
    model = _content_model()
    picture = np.asarray(Image.fromarray(_picture(512)).resize((SIZE, SIZE), Image.Resampling.BOX))
    rgb = np.repeat(picture[None, ..., None], 3, axis=-1).astype("float32")
    block_means = keras.Model(model.inputs, model.get_layer("flat").output).predict(rgb, verbose=0)[0]
    kernel, _ = model.get_layer("head_output").get_weights()
    bias = np.array([1.0 - block_means @ kernel[:, 0]], "float32")  # logit 1 for the picture
    model.get_layer("head_output").set_weights([kernel, bias])
    saving.save_model(model, path, saving.model_metadata(model, threshold=0.5))
    return path


@pytest.fixture(scope="module")
def loaded(saved_model):
    return saving.load_model(saved_model)


def _bad_files(folder: Path) -> dict[str, Path]:
    """One file of each broken kind: truncated JPEG and PNG, zero bytes, not an image."""
    noisy = (np.random.default_rng(1).random((256, 256)) * 255).astype(np.uint8)  # > 64 KB
    good_jpeg, good_png = _encoded(noisy, "JPEG", quality=95), _encoded(noisy, "PNG")
    folder.mkdir(parents=True, exist_ok=True)
    files = {
        "truncated_jpeg": folder / "person900_bacteria_1.jpeg",
        "truncated_png": folder / "person901_bacteria_2.png",
        "zero_bytes": folder / "person902_virus_3.jpeg",
        "not_an_image": folder / "person903_virus_4.png",
    }
    files["truncated_jpeg"].write_bytes(good_jpeg[: len(good_jpeg) // 2])
    files["truncated_png"].write_bytes(good_png[: len(good_png) // 2])
    files["zero_bytes"].write_bytes(b"")
    files["not_an_image"].write_text("this is a text file, not a PNG\n")
    return files


def _class_folder(root: Path, n: int = 3, side: int = 64) -> Path:
    """``root/{NORMAL,PNEUMONIA}`` with ``n`` good JPEGs each (Kermany-style names)."""
    for label, cls in enumerate(("NORMAL", "PNEUMONIA")):
        for i in range(n):
            name = f"IM-{i:04d}-0001.jpeg" if label == 0 else f"person{i}_virus_{i}.jpeg"
            _save(synthetic_xray(label, np.random.default_rng(i), side), root / cls / name)
    return root


# --------------------------------------------------------------------------- row 1: corrupt images


def test_corrupt_images_in_training_data_are_listed_once(tmp_path):
    """Truncated JPEG/PNG, zero-byte and non-image content: skipped, counted, one warning
    naming every file and its problem; ``on_bad_image="error"`` raises instead."""
    folder = _class_folder(tmp_path / "test")
    bad = _bad_files(folder / "PNEUMONIA")
    with pytest.warns(BadImagesWarning) as caught:
        index = load_class_folder(folder)
    assert len(index) == 6 and not set(map(str, bad.values())) & set(index["path"])
    bad_warnings = [w for w in caught if issubclass(w.category, BadImagesWarning)]
    assert len(bad_warnings) == 1
    message = str(bad_warnings[0].message)
    assert "skipped 4 unreadable image(s)" in message and "on_bad_image='error'" in message
    for path in bad.values():
        assert message.count(path.name) == 1, message
    assert "empty file (0 bytes)" in message and "truncated" in message
    with pytest.raises(DatasetLayoutError, match="4 unreadable image") as err:
        load_class_folder(folder, on_bad_image="error")
    assert all(path.name in str(err.value) for path in bad.values())


def test_corrupt_images_in_a_kermany_root(tmp_path):
    """The training entry point: one warning per split folder holding unreadable files,
    listing each of them; ``on_bad_image="error"`` raises instead."""
    root = tmp_path / "data"
    for split in ("train", "val", "test"):
        _class_folder(root / split, n=2)
    bad = _bad_files(root / "train" / "NORMAL")
    with pytest.warns(BadImagesWarning) as caught:
        index = load_kermany(root)
    assert len(index) == 12
    listed = [str(w.message) for w in caught if issubclass(w.category, BadImagesWarning)]
    assert len(listed) == 1 and all(p.name in listed[0] for p in bad.values())
    with pytest.raises(DatasetLayoutError, match="unreadable"):
        load_kermany(root, on_bad_image="error")


def test_evaluate_cli_skips_corrupt_images(saved_model, tmp_path, capsys):
    folder = _class_folder(tmp_path / "test")
    _bad_files(folder / "NORMAL")
    with pytest.warns(BadImagesWarning, match="skipped 4 unreadable"):
        rc = evaluate.main(["--model", str(saved_model), "--data", str(folder), "--n-boot", "20"])
    assert rc == 0
    assert json.loads(capsys.readouterr().out)["n"] == 6


@pytest.mark.parametrize("kind", ["truncated_jpeg", "truncated_png", "zero_bytes", "not_an_image"])
def test_predict_cli_bad_image_exits_2_with_one_line(saved_model, tmp_path, capsys, kind):
    path = _bad_files(tmp_path)[kind]
    assert predict.main([str(path), "--model", str(saved_model)]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert captured.out == "" and len(err.splitlines()) == 1, err
    assert err.startswith("error: cannot read") and str(path) in err and "Traceback" not in err


def test_predict_cli_process_exit_code_and_stderr(saved_model, tmp_path):
    """The real command line: exit status 2, one stderr line, no traceback."""
    path = _bad_files(tmp_path)["truncated_png"]
    out = subprocess.run(
        [sys.executable, "-m", "pneumo_utils.deploy.predict", str(path), "--model", str(saved_model)],
        capture_output=True, text=True, cwd=ROOT, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
    )
    assert out.returncode == 2, out.stderr
    lines = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and path.name in lines[0] and "truncated PNG" in lines[0]
    assert "Traceback" not in out.stderr and out.stdout == ""


# --------------------------------------------------------------------------- row 2: non-image files


def test_non_image_files_are_skipped_and_counted(tmp_path):
    """``.DS_Store``, ``Thumbs.db``, ``.txt`` and macOS ``._`` files (which carry a .jpeg
    extension) in class folders, nested too: skipped, counted in one warning, and not
    reported as unreadable images. See also test_datasets.py for load_class_folder."""
    root = tmp_path / "data"
    for split in ("train", "val", "test"):
        _class_folder(root / split, n=2)
    junk = {
        root / "train" / "NORMAL" / ".DS_Store": b"\0\0\0\1Bud1",
        root / "train" / "NORMAL" / "Thumbs.db": b"\xd0\xcf\x11\xe0",
        root / "train" / "PNEUMONIA" / "notes.txt": b"ask radiology",
        root / "train" / "PNEUMONIA" / "._person0_virus_0.jpeg": b"\0\5\x16\7AppleDouble",
        root / "train" / "PNEUMONIA" / "sub" / "desktop.ini": b"[.ShellClassInfo]",
    }
    for path, content in junk.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
    with pytest.warns(UserWarning) as caught:
        index = load_kermany(root)
    assert len(index) == 12
    messages = [str(w.message) for w in caught]
    assert not any(issubclass(w.category, BadImagesWarning) for w in caught), messages
    assert sum("skipped 5 non-image file(s)" in m for m in messages) == 1, messages


# --------------------------------------------------------------------------- row 3: layout errors


def test_missing_class_folder_names_the_path(tmp_path):
    """(missing split, empty and unknown class folders: see test_datasets.py)"""
    folder = _class_folder(tmp_path / "test")
    for path in (folder / "PNEUMONIA").iterdir():
        path.unlink()
    (folder / "PNEUMONIA").rmdir()
    with pytest.raises(DatasetLayoutError, match=r"missing class folder .*test/PNEUMONIA"):
        load_class_folder(folder)
    with pytest.raises(FileNotFoundError, match=r"nowhere does not exist; expected .*NORMAL,PNEUMONIA"):
        load_class_folder(tmp_path / "nowhere")


def test_evaluate_cli_on_a_missing_or_bad_folder_exits_2(saved_model, tmp_path, capsys):
    assert evaluate.main(["--model", str(saved_model), "--data", str(tmp_path / "absent")]) == 2
    assert "does not exist" in capsys.readouterr().err
    folder = _class_folder(tmp_path / "test")
    (folder / "COVID").mkdir()
    assert evaluate.main(["--model", str(saved_model), "--data", str(folder)]) == 2
    err = capsys.readouterr().err
    assert "unknown class folder" in err and str(folder) in err and "Traceback" not in err


# --------------------------------------------------------------------------- row 4: image modes


def _modes(picture: np.ndarray) -> dict[str, Image.Image]:
    """The same gray picture in every mode we expect in the wild."""
    gray = Image.fromarray(picture)
    rgba = gray.convert("RGBA")
    rgba.putalpha(Image.fromarray((np.arange(picture.size) % 256).astype(np.uint8).reshape(picture.shape)))
    return {
        "L.png": gray,
        "L.jpeg": gray,
        "RGB.png": gray.convert("RGB"),
        "RGBA.png": rgba,  # alpha must be dropped, not blended
        "LA.png": gray.convert("LA"),
        "P.png": gray.convert("RGB").convert("P", palette=Image.Palette.ADAPTIVE, colors=256),
        "I16.png": Image.fromarray(picture.astype(np.uint16) * 257),  # full 16-bit range
        "I16_12bit.png": Image.fromarray(picture.astype(np.uint16) * 16),  # 12-bit detector data
    }


def test_every_image_mode_through_the_pipeline(tmp_path):
    """Gray, RGB, RGBA, LA, palette, 16-bit (full range and 12-bit) files in one data set:
    indexed without warnings, and the tf.data pipeline yields the same picture for each."""
    picture = _picture(96)  # full 0-255 range: min-max stretching (12-bit data) is exact
    folder = tmp_path / "test"
    (folder / "NORMAL").mkdir(parents=True)
    for i, (name, im) in enumerate(_modes(picture).items()):
        im.save(folder / "NORMAL" / f"IM-{i:04d}-0001-{name}", quality=95)
    _save(picture, folder / "PNEUMONIA" / "person1_virus_1.png")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing skipped, nothing unreadable
        index = load_class_folder(folder)
    assert len(index) == 9
    paths, labels = index["path"].tolist(), index["label"].to_numpy()
    batch, _ = next(iter(pipelines.image_dataset(paths, labels, image_size=64, batch_size=16, cache=False)))
    reference = read_resized(folder / "PNEUMONIA" / "person1_virus_1.png", 64).astype(float)
    for path, image in zip(paths, batch.numpy(), strict=True):
        assert image.shape == (64, 64, 3)
        diff = np.abs(image - reference).mean()
        assert diff < 2.5, f"{Path(path).name}: mean difference {diff:.2f} grey levels"


# --------------------------------------------------------------------------- row 5: huge images


@pytest.fixture(scope="module")
def huge(tmp_path_factory) -> dict[str, Path]:
    """One picture as an 8000 x 8000 JPEG, a 5000 x 5000 gray PNG (within the pixel
    budget), and at 224 px as PNG."""
    folder = tmp_path_factory.mktemp("huge")
    big = Image.fromarray(_picture(512)).resize((8000, 8000), Image.Resampling.BICUBIC)
    paths = {
        "jpeg": folder / "big.jpeg",
        "png_gray": folder / "big_gray.png",
        "224": folder / "small.png",
    }
    big.save(paths["jpeg"], quality=90)
    big.resize((5000, 5000), Image.Resampling.BOX).save(paths["png_gray"], compress_level=1)
    big.resize((SIZE, SIZE), Image.Resampling.BOX).save(paths["224"])
    return paths


def test_huge_images_predict_like_the_small_picture(loaded, huge):
    """8000 x 8000 JPEG and 5000 x 5000 PNG: same input array (to ~2 grey levels), same
    class and probability as the same picture saved at 224 px."""
    model, meta = loaded
    reference = predict.predict_image(model, meta, huge["224"])
    flipped = reference["image_array"][::-1]
    p_flipped = float(model.predict(flipped[None], verbose=0)[0, 0])
    assert abs(p_flipped - reference["probability"]) > 0.05, "model is blind to layout"
    for kind in ("jpeg", "png_gray"):
        result = predict.predict_image(model, meta, huge[kind])
        assert np.abs(result["image_array"] - reference["image_array"]).mean() < 2.0, kind
        assert result["label"] == reference["label"], kind
        assert result["probability"] == pytest.approx(reference["probability"], abs=0.01)


def test_predict_cli_on_a_huge_png(saved_model, huge, loaded, capsys):
    model, meta = loaded
    expected = predict.predict_image(model, meta, huge["224"])
    assert predict.main([str(huge["png_gray"]), "--model", str(saved_model)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"Prediction: {expected['label']} (")


_MEMORY_PROBE = textwrap.dedent(
    """
    import json, resource, sys
    import numpy as np
    from pneumo_utils.deploy import predict
    from pneumo_utils.data.images import ImageReadError

    class Model:  # stands in for Keras: its memory does not depend on the image file
        inputs = [type("T", (), {"shape": (None, 224, 224, 3)})]
        input_shape = (None, 224, 224, 3)
        def predict(self, x, verbose=0):
            return np.full((len(x), 1), x.mean() / 255.0)

    meta = {"image_size": 224, "threshold": 0.5}
    predict.predict_image(Model(), meta, sys.argv[1])  # warm up: imports, small allocations
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    try:
        outcome = predict.predict_image(Model(), meta, sys.argv[2])["label"]
    except ImageReadError as exc:
        outcome = exc.reason
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    print(json.dumps({"grown_mb": grown / 1024, "outcome": outcome}))
    """
)


def _probe_memory(reference: Path, image: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", _MEMORY_PROBE, str(reference), str(image)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)


def _png_header_only(path: Path, width: int, height: int, depth: int, colour_type: int,
                     interlace: int = 0) -> Path:
    """A PNG whose header claims ``width x height`` (one tiny IDAT): small on disk, and a
    decoder that trusted the header would allocate the full image."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, depth, colour_type, 0, 0, interlace)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
                     + chunk(b"IDAT", zlib.compress(b"\0" * 4096)) + chunk(b"IEND", b""))
    return path


def test_huge_images_predict_with_bounded_memory(huge, tmp_path):
    """Peak RSS growth of ``predict.predict_image``, each file in a fresh process after a
    warm-up on the 224 px picture (the model is a stand-in: Keras always receives the same
    (1, 224, 224, 3) array, so only reading the file can grow with its size).

    * an 8000 x 8000 JPEG is decoded by libjpeg at 1/8 scale: a few MB (a full decode
      needs 64 MB gray, 192 MB RGB);
    * 20000 x 20000 PNGs (1-bit, 16-bit RGB, interlaced: 2.3-4.6 GB if decoded in full)
      are refused from their header, above images.PIXEL_BUDGET, before any pixel is
      decoded."""
    hostile = {
        "png_1bit": _png_header_only(tmp_path / "bits.png", 20000, 20000, 1, 0),
        "png_rgb16": _png_header_only(tmp_path / "rgb16.png", 20000, 20000, 16, 2),
        "png_interlaced": _png_header_only(tmp_path / "adam7.png", 20000, 20000, 8, 2, interlace=1),
    }
    procs = {kind: _probe_memory(huge["224"], path) for kind, path in {"jpeg": huge["jpeg"], **hostile}.items()}
    for kind, proc in procs.items():
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        result = json.loads(out.strip().splitlines()[-1])
        assert result["grown_mb"] < 24, f"{kind}: peak RSS grew by {result['grown_mb']:.0f} MB"
        if kind == "jpeg":
            assert result["outcome"] in ("NORMAL", "PNEUMONIA")
        else:
            assert "too large to decode safely" in result["outcome"] and "20000 x 20000" in result["outcome"]


def test_progressive_jpeg_above_the_budget_is_refused(tmp_path, monkeypatch):
    """libjpeg keeps a progressive JPEG's coefficients for the whole image whatever the
    output scale, so the draft reduction does not bound its memory: it is measured at full
    size against the budget (a baseline JPEG of the same size is decoded at 1/8 scale)."""
    picture = np.asarray(Image.fromarray(_picture(256)).resize((800, 800)))
    progressive = _save(picture, tmp_path / "progressive.jpeg", progressive=True, quality=90)
    baseline = _save(picture, tmp_path / "baseline.jpeg", quality=90)
    monkeypatch.setattr(images, "PIXEL_BUDGET", 200 * 200)  # 800 x 800 / 8 = 100 x 100 fits
    assert read_resized(baseline, 32).shape == (32, 32, 3)
    with pytest.raises(ImageReadError, match=r"800 x 800 px, JPEG, progressive"):
        read_resized(progressive, 32)
    monkeypatch.setattr(images, "PIXEL_BUDGET", 800 * 800)
    assert np.abs(read_resized(progressive, 32).astype(int) - read_resized(baseline, 32)).mean() < 2


def test_images_above_the_budget_are_skipped_and_counted_in_folders(tmp_path, monkeypatch):
    folder = _class_folder(tmp_path / "test")
    big = _save(np.asarray(Image.fromarray(_picture(256)).resize((300, 300))),
                folder / "NORMAL" / "IM-0100-0001.png")
    monkeypatch.setattr(images, "PIXEL_BUDGET", 200 * 200)
    monkeypatch.setenv(image_checks.CHECK_CACHE_ENV, "")
    with pytest.warns(BadImagesWarning, match="too large to decode safely"):
        index = load_class_folder(folder)
    assert str(big) not in set(index["path"]) and len(index) == 6
    assert index.attrs["skipped"] == [{"path": str(big), "reason": image_checks.check_image(big)}]


# --------------------------------------------------------------------------- row 6: DICOM


def _raw12(picture: np.ndarray) -> np.ndarray:
    return picture.astype(np.uint16) * 16  # 0..4080: 12-bit detector values


def test_dicom_folder_through_index_and_pipeline(tmp_path):
    """A class folder of .dcm files (MONOCHROME1 + window, MONOCHROME2 + VOI LUT) goes
    through load_class_folder and image_dataset like any JPEG, inverted and windowed."""
    picture = _picture(80)
    folder = tmp_path / "test"
    mono1 = write_dicom(folder / "NORMAL" / "IM-0001-0001.dcm", 4080 - _raw12(picture),
                         "MONOCHROME1", window=(2040, 4080))
    step = np.where(np.arange(4096) < 2048, 0, 65535)  # VOI LUT: a hard threshold at 2048
    lut = write_dicom(folder / "PNEUMONIA" / "person1_virus_1.dcm", _raw12(picture), voi_lut=step)
    _save(picture, folder / "NORMAL" / "IM-0002-0001.png")
    index = load_class_folder(folder)
    assert sorted(Path(p).suffix for p in index["path"]) == [".dcm", ".dcm", ".png"]
    paths, labels = index["path"].tolist(), index["label"].to_numpy()
    batch, _ = next(iter(pipelines.image_dataset(paths, labels, image_size=80, batch_size=8, cache=False)))
    decoded = dict(zip(paths, batch.numpy(), strict=True))
    png = decoded[str(folder / "NORMAL" / "IM-0002-0001.png")]
    # MONOCHROME1 stored inverted: after inversion it shows the original picture (bone bright)
    assert np.abs(decoded[str(mono1)] - png).max() <= 2
    # the VOI LUT was applied: pure black/white, white exactly where the raw value >= 2048
    binary = decoded[str(lut)][..., 0]
    assert set(np.unique(binary)) <= {0.0, 255.0}
    np.testing.assert_array_equal(binary == 255, _raw12(picture) >= 2048)


def test_predict_cli_on_a_dicom(saved_model, loaded, tmp_path, capsys):
    model, meta = loaded
    picture = _picture(300)
    dcm = write_dicom(tmp_path / "chest.dcm", 4080 - _raw12(picture), "MONOCHROME1")
    png = _save(picture, tmp_path / "chest.png")
    expected = predict.predict_image(model, meta, png)
    assert predict.predict_image(model, meta, dcm)["probability"] == pytest.approx(
        expected["probability"], abs=0.01)
    assert predict.main([str(dcm), "--model", str(saved_model)]) == 0
    assert capsys.readouterr().out.startswith(f"Prediction: {expected['label']} (")


# --------------------------------------------------------------------------- row 7: model files


def test_lambda_layer_is_refused_by_safe_mode(tmp_path, capsys):
    inputs = keras.Input((32, 32, 3))
    outputs = keras.layers.Dense(1, activation="sigmoid")(
        keras.layers.Flatten()(keras.layers.Lambda(lambda x: x / 255.0)(inputs)))
    path = tmp_path / "lambda.keras"
    keras.Model(inputs, outputs).save(path)
    with pytest.raises(saving.ModelFileError, match="refusing to load .*Lambda") as err:
        saving.load_model(path)
    assert "safe_mode=False" not in str(err.value)  # we do not suggest turning safety off
    image = _save(_picture(32), tmp_path / "x.png")
    assert predict.main([str(image), "--model", str(path)]) == 2
    err_text = capsys.readouterr().err
    assert len(err_text.strip().splitlines()) == 1 and "Lambda" in err_text


def test_models_are_loaded_in_safe_mode_never_unpickled(saved_model, monkeypatch):
    import pickle

    calls = []
    real = keras.saving.load_model
    monkeypatch.setattr(keras.saving, "load_model", lambda *a, **k: calls.append(k) or real(*a, **k))

    def no_pickle(*args, **kwargs):
        raise AssertionError("a model file was unpickled")

    monkeypatch.setattr(pickle, "load", no_pickle)
    monkeypatch.setattr(pickle, "loads", no_pickle)
    saving.load_model(saved_model)
    assert calls and all(k.get("safe_mode") is True for k in calls)


def test_pickle_disguised_as_keras_is_refused(tmp_path):
    import pickle

    path = tmp_path / "model.keras"
    path.write_bytes(pickle.dumps({"not": "a model"}))
    with pytest.raises(saving.ModelFileError, match="not a Keras .keras model file"):
        saving.load_model(path)
    fake = tmp_path / "fake.keras"  # a zip, but holding a pickle instead of a Keras config
    with zipfile.ZipFile(fake, "w") as archive:
        archive.writestr("model.pkl", pickle.dumps(object))
    with pytest.raises(saving.ModelFileError, match="cannot load"):
        saving.load_model(fake)


@pytest.mark.parametrize("shape", [(64, 64, 1), (64, 48, 3), (64, 64, 4)])
def test_model_without_square_rgb_input_is_a_clear_error(tmp_path, shape):
    inputs = keras.Input(shape)
    outputs = keras.layers.Dense(1, activation="sigmoid")(keras.layers.GlobalAveragePooling2D()(inputs))
    path = tmp_path / "odd.keras"
    keras.Model(inputs, outputs).save(path)
    with pytest.raises(saving.ModelFileError, match=r"expects \(h, w, 3\) RGB input") as err:
        saving.load_model(path)
    assert str(shape[:2])[1:-1].replace(" ", "") in str(err.value).replace(" ", "")


def test_sidecar_image_size_disagreeing_with_the_model(saved_model, tmp_path, capsys):
    copy = tmp_path / "copy.keras"
    copy.write_bytes(saved_model.read_bytes())
    meta = json.loads(saving.sidecar_path(saved_model).read_text())
    edited = {k: v for k, v in meta.items() if k not in ("sha256", "fingerprint")}
    write_json_atomic(saving.sidecar_path(copy),  # re-signed: the size check, not the fingerprint
                      signed({**edited, "image_size": 128}, {"keras": file_digest(copy)}))
    with pytest.raises(saving.ModelFileError, match=r"image_size 128 but .*takes 224x224"):
        saving.load_model(copy)
    image = _save(_picture(64), tmp_path / "x.png")
    assert predict.main([str(image), "--model", str(copy)]) == 2
    assert "image_size 128" in capsys.readouterr().err
    saving.sidecar_path(copy).write_text("{not json")
    with pytest.raises(saving.ModelFileError, match="not valid JSON"):
        saving.load_model(copy)


def test_images_of_another_size_are_resized_to_the_model(loaded, tmp_path):
    """Any image size works (resized to the model's input); a metadata dict that claims
    another input size is refused before Keras would fail on the shape."""
    model, meta = loaded
    for shape in ((37, 100), (640, 512), (224, 224)):
        path = _save(np.asarray(Image.fromarray(_picture(256)).resize(shape[::-1])), tmp_path / f"{shape}.png")
        result = predict.predict_image(model, meta, path)
        assert result["image_array"].shape == (SIZE, SIZE, 3) and 0 <= result["probability"] <= 1
    with pytest.raises(saving.ModelFileError, match="image_size 64 does not match"):
        predict.predict_image(model, {**meta, "image_size": 64}, path)


def test_evaluate_on_images_of_another_size(saved_model, tmp_path, capsys):
    folder = _class_folder(tmp_path / "test", side=50)  # the model takes 224 px
    assert evaluate.main(["--model", str(saved_model), "--data", str(folder), "--n-boot", "20"]) == 0
    assert json.loads(capsys.readouterr().out)["n"] == 6


# --------------------------------------------------------------------------- nothing lost


def test_interrupted_model_save_keeps_the_previous_model(tmp_path, monkeypatch):
    model = _content_model(32)
    path = tmp_path / "saved_models" / "x.keras"
    saving.save_model(model, path, saving.model_metadata(model, threshold=0.3))
    before = {p.name: p.read_bytes() for p in path.parent.iterdir()}
    assert set(before) == {"x.keras", "x.json"}

    def crash(self, filepath, *args, **kwargs):
        Path(filepath).write_bytes(b"PK\3\4 half a zip")
        raise OSError("No space left on device")

    monkeypatch.setattr(keras.Model, "save", crash)
    with pytest.raises(OSError, match="No space left"):
        saving.save_model(model, path, saving.model_metadata(model, threshold=0.9))
    after = {p.name: p.read_bytes() for p in path.parent.iterdir()}
    assert after == before, "the old model or sidecar changed, or a temporary file was left"
    monkeypatch.undo()
    assert saving.load_model(path)[1]["threshold"] == 0.3


def test_interrupted_json_write_keeps_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "metrics.json"
    write_json_atomic(path, {"auc": 0.9})

    def crash(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError):
        write_json_atomic(path, {"auc": 0.1})
    monkeypatch.undo()
    assert json.loads(path.read_text()) == {"auc": 0.9}
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


def test_interrupted_feature_cache_write_leaves_no_partial_file(tmp_path, monkeypatch):
    folder = _class_folder(tmp_path / "images", n=2, side=32)
    paths = sorted(str(p) for p in folder.rglob("*.jpeg"))
    model = backbones.build_scratch_cnn(32, filters=(4,), dense_units=4, seed=0)
    cache = tmp_path / "cache"
    first = features.extract_features(model, paths[:2], cache_dir=cache, verbose=False)
    cached = {p.name: p.read_bytes() for p in cache.iterdir()}
    assert len(cached) == 1

    def crash(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(np, "save", crash)
    with pytest.raises(OSError):
        features.extract_features(model, paths, cache_dir=cache, verbose=False)
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in cache.iterdir()} == cached  # no partial file
    np.testing.assert_array_equal(features.extract_features(model, paths[:2], cache_dir=cache,
                                                            verbose=False), first)


# --------------------------------------------------------------------------- same result twice


@pytest.mark.slow
def test_notebook_01_smoke_profile_is_repeatable(tmp_path):
    """Two runs of notebook 01 (smoke profile, same seed, separate model and feature-cache
    folders so nothing is reused) give identical metrics. To stay near a minute on two CPU
    cores the runs go in parallel with n_boot=100 and image_size=32. (Random-init
    DenseNet121 is kept: a random MobileNetV2 gives the same output for every image, which
    would make any two runs agree.)"""
    dest = tmp_path / "data"
    subprocess.run([sys.executable, "tests/synthetic.py", str(dest), "--per-class", "16",
                    "--image-size", "64", "--seed", "0"], check=True, cwd=ROOT, capture_output=True)
    runs = []
    for i in (1, 2):
        run = tmp_path / f"run{i}"
        command = [
            sys.executable, "-m", "pneumo_utils.runner", "--profile", "smoke", "--notebooks", "01",
            "--data-root", str(dest), "--reports-dir", str(run / "reports"),
            "--set", f"models_dir={run / 'models'}", "--set", f"cache_dir={run / 'cache'}",
            "--set", "n_boot=100", "--set", "image_size=32",
        ]
        runs.append((run, subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE,
                                           stderr=subprocess.STDOUT, text=True)))
    metrics = []
    for run, proc in runs:
        out, _ = proc.communicate(timeout=900)
        assert proc.returncode == 0, out[-3000:]
        assert list((run / "cache" / "features").glob("*.npy")), "features were not computed"
        metrics.append(json.loads((run / "reports" / "01_kermany_densenet121.metrics.json").read_text()))
    first, second = metrics
    # the model's outputs differ between images (a constant output would agree trivially)
    assert 0.0 < first["threshold"] < 1.0 and first["test"]["auc"] != 0.5
    assert first["test"] == second["test"]  # every test metric and CI, bit for bit
    assert (first["threshold"], first["val_auc"]) == (second["threshold"], second["val_auc"])
