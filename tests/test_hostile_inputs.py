"""Hostile and broken inputs: each case is refused, skipped and counted, or handled, never
read silently wrong, never a traceback, never code or memory out of bounds.

Sections follow the kinds of fault: security (memory, archives, paths outside a folder),
silent wrong answers (sidecars, outputs, damaged images, orientation, implausible inputs,
evaluation, NIH tables, feature cache), crashes that lose work, and messages.
"""

from __future__ import annotations

import io
import json
import os
import threading
import zipfile
from pathlib import Path

import keras
import numpy as np
import pandas as pd
import pytest
from PIL import Image
from synthetic import synthetic_xray

from pneumo_utils.data import dicom, image_checks, images, nih
from pneumo_utils.data.datasets import BadImagesWarning, DatasetLayoutError
from pneumo_utils.data.images import ImageReadError, read_image, read_resized
from pneumo_utils.data.kermany import NestedImagesWarning, load_class_folder
from pneumo_utils.data.nih import MissingImagesError
from pneumo_utils.deploy import predict
from pneumo_utils.evaluation import evaluate, metrics
from pneumo_utils.files import write_json_atomic
from pneumo_utils.model import backbones, features, saving
from pneumo_utils.sidecar import ModelFileError

SIZE = 64


@pytest.fixture(autouse=True)
def _private_check_cache(tmp_path, monkeypatch):
    """Each test gets its own image-check cache (the verdicts of other tests' files with
    the same name, size and time would otherwise be reused)."""
    monkeypatch.setenv(image_checks.CHECK_CACHE_ENV, str(tmp_path / "checks.sqlite"))


def _xray(label: int = 1, side: int = 256, seed: int = 0) -> np.ndarray:
    return synthetic_xray(label, np.random.default_rng(seed), side)


def _jpeg_bytes(arr: np.ndarray, **kwargs) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(arr).save(buffer, "JPEG", quality=92, **kwargs)
    return buffer.getvalue()


def _class_folder(root: Path, n: int = 3) -> Path:
    for label, cls in enumerate(("NORMAL", "PNEUMONIA")):
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            name = f"IM-{i:04d}-0001.jpeg" if label == 0 else f"person{i}_virus_{i}.jpeg"
            Image.fromarray(_xray(label, SIZE, i)).save(root / cls / name, quality=92)
    return root


def _model(size: int = SIZE, activation: str = "sigmoid", units: int = 1) -> keras.Model:
    inputs = keras.Input((size, size, 3), name="image")
    x = backbones.preprocessing_layer(inputs, "unit")
    x = keras.layers.AveragePooling2D(size // 4)(x)
    x = keras.layers.Flatten()(x)
    out = keras.layers.Dense(units, activation=activation, name="head_output")(x)
    model = keras.Model(inputs, out, name="tiny")
    kernel = np.random.default_rng(0).normal(0, 3, (48, units)).astype("float32")
    model.get_layer("head_output").set_weights([kernel, np.zeros(units, "float32")])
    return model


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("model") / "tiny.keras"
    model = _model()
    saving.save_model(model, path, saving.model_metadata(model, threshold=0.5))
    return path


# --------------------------------------------------------------------------- security


def test_keras_archive_unpacking_to_too_much_is_refused_before_loading(tmp_path, monkeypatch):
    """A small file whose config.json unpacks to 65 MiB (the red team used 1 GiB) is
    refused from the zip directory alone; Keras never opens it."""
    path = tmp_path / "bomb.keras"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("config.json", b" " * (65 * 2**20))
        archive.writestr("metadata.json", b"{}")
    assert path.stat().st_size < 2**20

    def never(*args, **kwargs):
        raise AssertionError("Keras was asked to load the archive")

    monkeypatch.setattr(keras.saving, "load_model", never)
    with pytest.raises(ModelFileError, match=r"config.json unpacks to 65 MiB \(limit 64 MiB\)"):
        saving.load_model(path)


@pytest.mark.parametrize("outside", ["../secret.png", "/etc/hostname", "~/x.png", "a/../../b.png"])
def test_csv_paths_outside_its_folder_are_refused(tmp_path, outside):
    folder = tmp_path / "set"
    folder.mkdir()
    Image.fromarray(_xray(1, SIZE)).save(tmp_path / "secret.png")
    Image.fromarray(_xray(0, SIZE)).save(folder / "inside.png")
    csv = folder / "labels.csv"
    csv.write_text(f"path,label\ninside.png,0\n{outside},1\n")
    with pytest.raises(DatasetLayoutError, match=rf"line 3: {outside}.*allow_outside_paths=True"):
        nih.load_nih(csv, balance=False)
    if outside == "../secret.png":  # the caller may opt in
        with pytest.warns(UserWarning, match="no patient column"):
            index = nih.load_nih(csv, balance=False, allow_outside_paths=True)
        assert sorted(Path(p).name for p in index["path"]) == ["inside.png", "secret.png"]


def test_dicom_above_the_pixel_budget_is_refused_before_decoding(tmp_path, monkeypatch):
    from dicom_files import write_dicom

    path = write_dicom(tmp_path / "big.dcm", (np.arange(300 * 300) % 4096).reshape(300, 300))
    monkeypatch.setattr(dicom, "PIXEL_BUDGET", 200 * 200)
    with pytest.raises(ImageReadError, match=r"300 x 300 px, DICOM.*limit 0 Mpx"):
        read_resized(path, 32)


# --------------------------------------------------------------------------- sidecars and outputs


@pytest.mark.parametrize(
    ("field", "value", "shown"),
    [
        ("threshold", float("nan"), '"NaN"'),
        ("threshold", 5.0, "5.0"),
        ("threshold", -1, "-1"),
        ("threshold", True, "true"),
        ("threshold", None, "null"),
        ("temperature", 0, "0"),
        ("temperature", -2.0, "-2.0"),
        ("temperature", "2", '"2"'),
        ("class_names", ["PNEUMONIA", "NORMAL"], '["PNEUMONIA", "NORMAL"]'),
        ("class_names", ["NORMAL"], '["NORMAL"]'),
    ],
)
def test_bad_sidecar_values_are_refused_naming_file_and_field(saved_model, tmp_path, capsys,
                                                              field, value, shown, error_line):
    copy = tmp_path / "m.keras"
    copy.write_bytes(saved_model.read_bytes())
    meta = json.loads(saving.sidecar_path(saved_model).read_text())
    saving.sidecar_path(copy).write_text(json.dumps({**meta, field: value}))  # NaN as JSON NaN
    with pytest.raises(ModelFileError, match=rf"sidecar {copy.with_suffix('.json')}: field {field} is") as err:
        saving.load_model(copy)
    assert shown in str(err.value) and "\n" not in str(err.value)
    picture = tmp_path / "x.png"
    Image.fromarray(_xray(1, SIZE)).save(picture)
    assert predict.main([str(picture), "--model", str(copy)]) == 2
    assert f"field {field}" in error_line()


def test_sidecar_that_is_not_an_object_is_refused(saved_model, tmp_path):
    copy = tmp_path / "m.keras"
    copy.write_bytes(saved_model.read_bytes())
    saving.sidecar_path(copy).write_text("[0.5, 224]")
    with pytest.raises(ModelFileError, match=r"field \(top level\) is \[0.5, 224\], expected a JSON object"):
        saving.load_model(copy)


@pytest.mark.parametrize(("activation", "units"), [("softmax", 2), ("linear", 1)])
def test_model_without_one_sigmoid_output_is_refused(tmp_path, activation, units):
    path = tmp_path / "odd.keras"
    _model(activation=activation, units=units).save(path)
    with pytest.raises(ModelFileError, match=rf"one sigmoid unit.*activation {activation}"):
        saving.load_model(path)


def test_labels_follow_the_sidecars_class_names(saved_model, tmp_path):
    model, meta = saving.load_model(saved_model)
    picture = tmp_path / "x.png"
    Image.fromarray(_xray(1, SIZE)).save(picture)
    nih = {**{k: v for k, v in meta.items() if k != "task"}, "class_names": ["No Finding", "Effusion"]}
    result = predict.predict_image(model, nih, picture)
    assert result["label"] in ("No Finding", "Effusion") and result["positive_class"] == "Effusion"
    assert set(result["probabilities"]) == {"No Finding", "Effusion"}
    with pytest.raises(ModelFileError, match=r'field class_names .* expected \["NORMAL", "PNEUMONIA"\]'):
        predict.predict_image(model, {**meta, "class_names": ["No Finding", "Effusion"]}, picture)


# --------------------------------------------------------------------------- damaged images


@pytest.fixture
def damaged(tmp_path) -> dict[str, Path]:
    """JPEGs that Pillow decodes without a word: cut in half and given a new end marker, and
    with 200 bytes overwritten in the middle. Both are over 64 KB, with an end marker."""
    good = _jpeg_bytes(_xray(1, 700))
    assert len(good) > 64 * 1024
    noise = bytes(np.random.default_rng(1).integers(0, 256, 200, dtype=np.uint8))
    middle = len(good) // 2
    files = {
        "good": tmp_path / "good.jpeg",
        "truncated_new_eoi": tmp_path / "person101_virus_1.jpeg",
        "overwritten": tmp_path / "person102_virus_2.jpeg",
    }
    files["good"].write_bytes(good)
    files["truncated_new_eoi"].write_bytes(good[:middle] + b"\xff\xd9")
    files["overwritten"].write_bytes(good[:middle] + noise + good[middle + 200:])
    for path in files.values():  # Pillow alone accepts every one of them
        with Image.open(path) as im:
            im.load()
    return files


@pytest.mark.parametrize("kind", ["truncated_new_eoi", "overwritten"])
def test_damaged_jpeg_is_refused(damaged, saved_model, capsys, kind, error_line):
    path = damaged[kind]
    with pytest.raises(ImageReadError, match=r"damaged JPEG data .*libjpeg says 'Corrupt JPEG data"):
        read_resized(path, SIZE)
    assert "damaged JPEG data" in image_checks.check_image(path)
    assert image_checks.check_image(damaged["good"]) is None
    assert predict.main([str(path), "--model", str(saved_model)]) == 2
    line = error_line()
    assert str(path) in line and "damaged JPEG" in line


def test_png_with_overwritten_image_data_is_refused(tmp_path):
    """Pillow stops inflating once it has every row, so overwritten IDAT bytes decode to a
    wrong picture without an error; the chunk checksums catch them."""
    buffer = io.BytesIO()
    Image.fromarray(_xray(1, 600)).save(buffer, "PNG")
    data = bytearray(buffer.getvalue())
    middle = len(data) // 2
    data[middle: middle + 50] = bytes(np.random.default_rng(0).integers(0, 256, 50, dtype=np.uint8))
    path = tmp_path / "overwritten.png"
    path.write_bytes(bytes(data))
    with pytest.raises(ImageReadError, match=r"damaged PNG data .*bad header checksum in b'IDAT'"):
        read_resized(path, SIZE)


def test_damaged_jpegs_in_a_folder_are_skipped_and_listed_by_evaluate(damaged, saved_model, tmp_path, capsys):
    """They pass a header and end-marker check; the index-time check decodes them for real,
    so evaluate leaves them out, counts and names them in its JSON and --out file."""
    folder = _class_folder(tmp_path / "test")
    for kind in ("truncated_new_eoi", "overwritten"):
        damaged[kind].rename(folder / "PNEUMONIA" / damaged[kind].name)
    out = tmp_path / "eval.json"
    with pytest.warns(BadImagesWarning, match="skipped 2 unreadable"):
        rc = evaluate.main(["--model", str(saved_model), "--data", str(folder), "--n-boot", "10",
                            "--out", str(out)])
    assert rc == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["n"] == 6 and printed["skipped"]["count"] == 2
    names = sorted(Path(f["path"]).name for f in printed["skipped"]["files"])
    assert names == ["person101_virus_1.jpeg", "person102_virus_2.jpeg"]
    assert all("damaged JPEG" in f["reason"] for f in printed["skipped"]["files"])
    assert json.loads(out.read_text())["skipped"] == printed["skipped"]


def test_image_checks_are_cached_by_content(damaged, monkeypatch):
    paths = [damaged["good"], damaged["overwritten"]]
    first = image_checks.check_images(paths)
    assert first[0] is None and "damaged" in first[1]

    def no_decode(*args, **kwargs):
        raise AssertionError("decoded again")

    monkeypatch.setattr(images, "_decode", no_decode)
    assert image_checks.check_images(paths) == first  # from the cache
    damaged["overwritten"].write_bytes(damaged["good"].read_bytes())
    os.utime(damaged["overwritten"], ns=(0, 10**18))
    monkeypatch.undo()
    assert image_checks.check_images(paths) == [None, None]  # changed file: checked again


# --------------------------------------------------------------------------- orientation, size, plausibility


def test_exif_orientation_is_applied_and_reported(saved_model, tmp_path, capsys):
    """A picture stored sideways with orientation 6 (rotate 90 degrees clockwise to view)
    is read upright, as the upright file is; predict says so and --json carries it."""
    upright = np.zeros((120, 80), np.uint8)
    upright[:30] = 255  # bright band at the top
    stored = np.rot90(upright, k=1)  # what a camera held sideways stores
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "phone.jpeg"
    Image.fromarray(stored).save(path, quality=95, exif=exif)
    arr = read_image(path)[..., 0]
    assert arr.shape == (120, 80) and arr[:25].mean() > 200 and arr[40:].mean() < 20
    assert images.read_header(path).orientation == 6
    assert read_resized(path, (60, 40))[:12, :, 0].mean() > 200
    assert predict.main([str(path), "--model", str(saved_model)]) == 0
    assert "note: EXIF orientation 6 applied" in capsys.readouterr().out
    assert predict.main([str(path), "--model", str(saved_model), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["exif_orientation"] == 6


@pytest.mark.parametrize("shape", [(1, 1), (20, 300)])
def test_tiny_images_are_refused_and_skipped(saved_model, tmp_path, capsys, shape, error_line):
    path = tmp_path / "tiny.png"
    Image.fromarray(np.full(shape, 128, np.uint8)).save(path)
    assert predict.main([str(path), "--model", str(saved_model)]) == 2
    assert "image too small" in error_line()
    folder = _class_folder(tmp_path / "test")
    (folder / "NORMAL" / "IM-0099-0001.png").write_bytes(path.read_bytes())
    with pytest.warns(BadImagesWarning, match="image too small"):
        assert len(load_class_folder(folder)) == 6


def test_implausible_inputs_are_flagged(saved_model, tmp_path, capsys):
    rng = np.random.default_rng(0)
    pictures = {
        "blank.png": np.full((128, 128), 200, np.uint8),
        "noise.png": (rng.random((128, 128)) * 255).astype(np.uint8),
        "colour.png": np.stack([np.full((128, 128), 220), np.full((128, 128), 40),
                                np.tile(np.arange(128), (128, 1))], axis=-1).astype(np.uint8),
        "xray.png": _xray(1, 128),
    }
    for name, arr in pictures.items():
        Image.fromarray(arr).save(tmp_path / name)
    assert predict.main([str(tmp_path), "--model", str(saved_model), "--json"]) == 0
    results = {Path(r["image"]).name: r for r in json.loads(capsys.readouterr().out)}
    assert "nearly uniform" in results["blank.png"]["warnings"][0]
    assert "noise" in results["noise.png"]["warnings"][0]
    assert "colour image" in results["colour.png"]["warnings"][-1]
    assert results["xray.png"]["warnings"] == []
    assert predict.main([str(tmp_path / "blank.png"), "--model", str(saved_model)]) == 0
    assert "warning: nearly uniform image" in capsys.readouterr().out


# --------------------------------------------------------------------------- predict on many files


def test_predict_on_a_folder_and_several_files_loads_the_model_once(saved_model, tmp_path, capsys, monkeypatch):
    folder = _class_folder(tmp_path / "set")
    (folder / "NORMAL" / "notes.txt").write_text("not an image")
    (folder / "NORMAL" / "IM-0050-0001.jpeg").write_bytes(b"\xff\xd8\xff broken")
    calls = []
    real = keras.saving.load_model
    monkeypatch.setattr(keras.saving, "load_model", lambda *a, **k: calls.append(a) or real(*a, **k))
    extra = folder / "PNEUMONIA" / "person0_virus_0.jpeg"
    assert predict.main([str(folder), str(extra), "--model", str(saved_model)]) == 0
    captured = capsys.readouterr()
    lines = [line for line in captured.out.splitlines() if ".jpeg:" in line]
    assert len(lines) == 7 and all(("NORMAL (" in line) or ("PNEUMONIA (" in line) for line in lines)
    assert "skipped" in captured.err and "IM-0050-0001.jpeg" in captured.err
    assert len(calls) == 1
    assert predict.main([str(extra), str(tmp_path / "absent.png"), "--model", str(saved_model)]) == 2
    assert "absent.png does not exist" in capsys.readouterr().err


# --------------------------------------------------------------------------- evaluate


def test_evaluate_reports_nested_images_and_validates_flags(saved_model, tmp_path, capsys, error_line):
    folder = _class_folder(tmp_path / "test")
    nested = folder / "NORMAL" / "old_export"
    nested.mkdir()
    Image.fromarray(_xray(1, SIZE, 9)).save(nested / "IM-0900-0001.jpeg")
    with pytest.warns(NestedImagesWarning, match=r"NORMAL/old_export \(1\)"):
        assert evaluate.main(["--model", str(saved_model), "--data", str(folder), "--n-boot", "5"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["n"] == 7 and result["nested_images"] == {"NORMAL/old_export": 1}
    assert all(np.isfinite(v) for pair in result["ci"].values() for v in pair)
    for flag in ("--n-boot", "--batch-size"):
        assert evaluate.main(["--model", str(saved_model), "--data", str(folder), flag, "0"]) == 2
        assert f"{flag} must be a positive integer" in error_line()
    with pytest.raises(ValueError, match="n_boot must be a positive"):
        metrics.bootstrap_ci(np.array([0, 1]), np.array([0.2, 0.8]), n_boot=0)


def test_evaluate_on_a_root_with_only_test(saved_model, tmp_path, capsys):
    _class_folder(tmp_path / "root" / "test")
    assert evaluate.main(["--model", str(saved_model), "--data", str(tmp_path / "root"), "--n-boot", "5"]) == 0
    assert json.loads(capsys.readouterr().out)["n"] == 6


# --------------------------------------------------------------------------- NIH tables


def _nih(folder: Path, rows: list[tuple[str, str, str]], images_for=None) -> Path:
    (folder / "images").mkdir(parents=True, exist_ok=True)
    for name, _, _ in rows if images_for is None else images_for:
        Image.fromarray(_xray(0, SIZE)).save(folder / "images" / name)
    table = pd.DataFrame([(n, f, 0, p) for n, f, p in rows],
                         columns=["Image Index", "Finding Labels", "Follow-up #", "Patient ID"])
    table.to_csv(folder / "Data_Entry_2017.csv", index=False)
    return folder / "Data_Entry_2017.csv"


BASE_ROWS = [(f"{i:08d}_000.png", "Pneumonia" if i % 2 else "No Finding", str(i)) for i in range(1, 7)]


def test_nih_duplicate_rows_warn_and_are_kept_once(tmp_path):
    csv = _nih(tmp_path, BASE_ROWS + [BASE_ROWS[0], BASE_ROWS[3]])
    with pytest.warns(UserWarning, match=r"2 duplicate row\(s\) .*line\(s\) 8, 9"):
        index = nih.load_nih(csv.parent, balance=False)
    assert len(index) == 6 and index["image"].is_unique
    assert nih.load_steps(index).loc["dropped: duplicate rows", "rows"] == 2


def test_nih_conflicting_labels_are_refused_naming_lines(tmp_path):
    csv = _nih(tmp_path, BASE_ROWS + [(BASE_ROWS[0][0], "No Finding", BASE_ROWS[0][2])])
    with pytest.raises(DatasetLayoutError, match=r"00000001_000.png \(line 2: 'Pneumonia'; line 8: 'No Finding'\)"):
        nih.load_nih(csv.parent, balance=False)


def test_nih_blank_patient_ids_are_refused_naming_lines(tmp_path):
    rows = [*BASE_ROWS[:3], (BASE_ROWS[3][0], BASE_ROWS[3][1], ""), (BASE_ROWS[4][0], BASE_ROWS[4][1], " ")]
    csv = _nih(tmp_path, rows)
    with pytest.raises(DatasetLayoutError, match=r"2 row\(s\) have no Patient ID \(line\(s\) 5, 6\)"):
        nih.load_nih(csv.parent, balance=False)


def test_nih_without_any_image_on_disk_names_the_table(tmp_path):
    csv = _nih(tmp_path, BASE_ROWS, images_for=[])
    with pytest.raises(MissingImagesError, match=rf"none of the 6 labelled images in {csv} is on disk"):
        nih.load_nih(csv.parent)


@pytest.mark.parametrize(("content", "message"), [("", "is empty"), ("path,label\n", "but no rows")])
def test_empty_labels_csv_names_the_file(tmp_path, content, message):
    csv = tmp_path / "labels.csv"
    csv.write_text(content)
    with pytest.raises(DatasetLayoutError, match=rf"labels CSV {csv} .*{message}"):
        nih.load_nih(csv)


# --------------------------------------------------------------------------- feature cache


@pytest.mark.parametrize("damage", ["zeros", "truncated"])
def test_damaged_feature_cache_is_detected_deleted_and_recomputed(tmp_path, damage):
    folder = _class_folder(tmp_path / "images", n=2)
    paths = sorted(str(p) for p in folder.rglob("*.jpeg"))
    model = backbones.build_scratch_cnn(SIZE, filters=(4,), dense_units=4, seed=0)
    cache = tmp_path / "cache"
    first = features.extract_features(model, paths, cache_dir=cache, verbose=False)
    (cached,) = cache.glob("*.npy")
    if damage == "zeros":
        np.save(cached, np.zeros_like(first))
    else:
        cached.write_bytes(cached.read_bytes()[:100])
    with pytest.warns(UserWarning, match=rf"feature cache file {cached} .*deleted, the features are recomputed"):
        again = features.extract_features(model, paths, cache_dir=cache, verbose=False)
    np.testing.assert_array_equal(again, first)
    assert len(list(cache.glob("*.npy"))) == 1


# --------------------------------------------------------------------------- crashes that lose work


@pytest.mark.parametrize("target", ["folder", "notes.txt", "noext", "file_as_parent/x.png"])
def test_gradcam_target_is_checked_before_predicting(saved_model, tmp_path, capsys, target, error_line):
    picture = tmp_path / "x.png"
    Image.fromarray(_xray(1, SIZE)).save(picture)
    (tmp_path / "folder").mkdir()
    (tmp_path / "file_as_parent").write_text("a file, not a folder")
    assert predict.main([str(picture), "--model", str(saved_model), "--gradcam", str(tmp_path / target)]) == 2
    assert "--gradcam" in error_line()
    assert capsys.readouterr().out == ""


def test_gradcam_write_is_checked(tmp_path, capsys, monkeypatch, error_line):
    picture = tmp_path / "x.png"
    Image.fromarray(_xray(1, SIZE)).save(picture)
    cnn = backbones.build_scratch_cnn(SIZE, filters=(4, 8), dense_units=4, seed=0)
    saved_model = saving.save_model(cnn, tmp_path / "cnn.keras")
    target = tmp_path / "out" / "cam.png"
    assert predict.main([str(picture), "--model", str(saved_model), "--gradcam", str(target)]) == 0
    assert "written" in capsys.readouterr().out
    with Image.open(target) as im:
        assert im.size == (SIZE, SIZE)

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", disk_full)
    assert predict.main([str(picture), "--model", str(saved_model), "--gradcam", str(target)]) == 2
    assert "No space left" in error_line()


def test_concurrent_json_writers_never_fail_or_show_half_a_file(tmp_path):
    path = tmp_path / "index.json"
    write_json_atomic(path, {"writer": -1, "rows": []})
    problems: list[BaseException] = []
    stop = threading.Event()

    def write(writer: int) -> None:
        try:
            for i in range(60):
                write_json_atomic(path, {"writer": writer, "rows": list(range(i * 50))})
        except BaseException as exc:
            problems.append(exc)

    def read() -> None:
        while not stop.is_set():
            try:
                json.loads(path.read_text())
            except BaseException as exc:
                problems.append(exc)

    reader = threading.Thread(target=read)
    reader.start()
    writers = [threading.Thread(target=write, args=(w,)) for w in range(4)]
    for thread in writers:
        thread.start()
    for thread in writers:
        thread.join()
    stop.set()
    reader.join()
    assert problems == []
    assert [p.name for p in tmp_path.iterdir()] == ["index.json"]


def test_temporary_file_of_a_killed_save_is_removed_by_the_next_save(tmp_path):
    model = _model()
    folder = tmp_path / "saved_models"
    folder.mkdir()
    dead = folder / ".tiny.999999999.k2j3.keras"  # no process has this id
    alive = folder / f".tiny.{os.getppid()}.abcd.keras"  # a save still running elsewhere
    for path in (dead, alive):
        path.write_bytes(b"PK\3\4 half a zip")
    saving.save_model(model, folder / "tiny.keras")
    assert not dead.exists() and alive.exists()


# --------------------------------------------------------------------------- messages


def test_what_is_not_an_image_file_is_named_as_such(tmp_path, saved_model, capsys, error_line):
    loop = tmp_path / "loop.png"
    loop.symlink_to(loop)
    with pytest.raises(ImageReadError, match="symbolic link loop"):
        read_image(loop)
    assert predict.main([str(loop), "--model", str(saved_model)]) == 2
    assert "symbolic link loop" in error_line()
    with pytest.raises(ImageReadError, match="not a regular file"):
        read_image("/dev/zero")
    assert predict.main(["/dev/zero", "--model", str(saved_model)]) == 2
    assert "not a regular file" in error_line()
    with pytest.raises(ImageReadError, match="is a directory"):
        read_image(tmp_path)
    empty = tmp_path / "empty_folder"
    empty.mkdir()
    assert predict.main([str(empty), "--model", str(saved_model)]) == 2
    assert "holds no .jpeg/.jpg/.png/.dcm image" in error_line()


def test_safe_mode_refusal_quotes_keras_instead_of_guessing(saved_model, monkeypatch):
    """Safe mode refuses more than Lambda layers; the message quotes what Keras refused."""

    def refuse(*args, **kwargs):
        raise ValueError("Requested the deserialization of a `TorchModuleWrapper` layer, which "
                         "may run arbitrary code. Pass safe_mode=False to allow it.")

    monkeypatch.setattr(keras.saving, "load_model", refuse)
    with pytest.raises(ModelFileError, match="safe mode found Python code inside it") as err:
        saving.load_model(saved_model)
    assert "TorchModuleWrapper" in str(err.value) and "Lambda" not in str(err.value)
    assert "safe_mode=False" not in str(err.value)
