"""What the model does not know, on generated data: the input check learned from training
features, the "uncertain" band, and the site-shift test.

The model is small and fixed (random convolution filters, GAP named ``head_gap``, a sigmoid
on the mean brightness), so the features are those of a real network's structure and the
tests run in seconds. Training images are synthetic grey chest X-rays; the out-of-distribution
inputs are the kinds a user gives by mistake: a colour picture, noise, a blank image."""

from __future__ import annotations

import json
from pathlib import Path

import keras
import numpy as np
import pytest
from PIL import Image
from synthetic import synthetic_xray

from pneumo_utils.deploy import predict
from pneumo_utils.evaluation import calibrate, evaluate, selective, site_shift
from pneumo_utils.model import input_check, saving
from pneumo_utils.sidecar import ModelFileError

SIZE = 64


def _write(folder: Path, name: str, pixels: np.ndarray) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    Image.fromarray(pixels).save(path, quality=95)
    return str(path)


def _xrays(folder: Path, n: int, seed: int, label: int = 0, prefix: str = "IM") -> list[str]:
    rng = np.random.default_rng(seed)
    return [_write(folder, f"{prefix}-{seed:02d}{i:04d}-0001.jpeg" if label == 0 else
                   f"person{seed}{i:03d}_bacteria_{i}.jpeg", synthetic_xray(label, rng, SIZE))
            for i in range(n)]


def _photo(rng: np.random.Generator) -> np.ndarray:
    """A colour 'photograph': smooth coloured blocks and stripes, nothing like a grey X-ray."""
    yy, xx = np.mgrid[0:SIZE, 0:SIZE] / SIZE
    channels = [np.sin(2 * np.pi * (f * xx + g * yy) + p) for f, g, p in rng.uniform(0.5, 4, (3, 3))]
    return (127 + 120 * np.stack(channels, axis=-1)).astype(np.uint8)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict[str, list[str]]:
    root = tmp_path_factory.mktemp("input-check")
    rng = np.random.default_rng(7)
    return {
        "train": _xrays(root / "train", 60, 1) + _xrays(root / "train", 60, 2, label=1),
        "val": _xrays(root / "val", 40, 3) + _xrays(root / "val", 40, 4, label=1),
        "photos": [_write(root / "ood", f"photo{i}.png", _photo(rng)) for i in range(10)],
        "noise": [_write(root / "ood", f"noise{i}.png", rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8))
                  for i in range(10)],
    }


@pytest.fixture(scope="module")
def model() -> keras.Model:
    """Fixed random 3x3 filters -> ReLU -> head_gap -> a sigmoid on the image's brightness."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((SIZE, SIZE, 3), name="image")
    x = keras.layers.Rescaling(1 / 255)(inputs)
    x = keras.layers.Conv2D(48, 5, strides=2, activation="relu", name="conv")(x)
    gap = keras.layers.GlobalAveragePooling2D(name="head_gap")(x)
    brightness = keras.layers.GlobalAveragePooling2D(name="brightness")(keras.layers.Rescaling(1 / 255)(inputs))
    outputs = keras.layers.Dense(1, activation="sigmoid", name="head_output")(
        keras.layers.Concatenate()([brightness, 0.0 * gap[:, :1]]))
    built = keras.Model(inputs, outputs, name="tiny")
    built.get_layer("head_output").set_weights([np.array([[10.0], [10.0], [10.0], [0.0]]), np.array([-12.0])])
    return built


@pytest.fixture(scope="module")
def check(model, images) -> input_check.InputCheck:
    return input_check.fit(model, images["train"], images["val"], components={"features": 8}, seed=0)


def test_training_like_images_pass_and_foreign_ones_are_flagged(model, images, check):
    val = check.scores(input_check.looks_of(model, images["val"]))
    assert set(val) == {"features", "thumbnail"}
    assert 0.3 < np.median(val["features"]) < 3  # a training-like image scores about 1
    assert check.flagged(input_check.looks_of(model, images["val"])).mean() <= 0.03
    assert "99.5% quantile of 80 validation images" in check.limit_rule
    for kind in ("photos", "noise"):
        assert check.flagged(input_check.looks_of(model, images[kind])).all(), kind
    assert check.reference.shape == (80, 9)


def test_the_thumbnail_view_flags_inverted_xrays_without_a_model(model, images, check):
    xrays = np.stack([np.asarray(Image.open(p).convert("RGB"), dtype=np.float32) for p in images["val"][:20]])
    looks = input_check.Looks(None, input_check.thumbnails(xrays))
    assert set(check.scores(looks)) == {"thumbnail"}
    assert check.flagged(input_check.Looks(None, input_check.thumbnails(255 - xrays))).all()
    assert check.flagged(looks).mean() <= 0.1
    graph = input_check.looks_of(model, images["val"][:20]).thumbnails  # the Keras graph's thumbnails
    np.testing.assert_allclose(graph, looks.thumbnails, atol=1.5)  # JPEG decoders agree within a grey level


def test_check_round_trips_through_the_sidecar_and_bad_records_are_refused(check):
    record = json.loads(json.dumps(check.to_dict()))
    again = input_check.InputCheck.from_dict(record)
    rng = np.random.default_rng(0)
    looks = input_check.Looks(rng.normal(size=(5, check.feature_width)), rng.uniform(0, 255, (5, 64)))
    for view, scores in check.scores(looks).items():
        np.testing.assert_allclose(again.scores(looks)[view], scores, rtol=1e-4)
    assert again.limits == pytest.approx(check.limits, rel=1e-6)
    features = record["views"]["features"]
    broken = [
        {**record, "kind": "other"},
        {**record, "views": {"features": features}},
        {**record, "thumbnail_side": 16},
        {**record, "views": {**record["views"], "features": {**features, "components": features["width"]}}},
        {**record, "views": {**record["views"], "features": {**features, "limit": float("nan")}}},
        {**record, "views": {**record["views"], "features": {**features, "limit": -1}}},
        {**record, "views": {**record["views"], "features": {**features, "arrays": {
            **features["arrays"], "mean": "not base64!"}}}},
        {**record, "views": {**record["views"], "features": {**features, "arrays": {
            **features["arrays"], "mean": features["arrays"]["variances"]}}}},
        {k: v for k, v in record.items() if k != "reference"},
    ]
    for bad in broken:
        with pytest.raises(ModelFileError, match="input_check"):
            input_check.InputCheck.from_dict(bad, "sidecar X")


@pytest.fixture(scope="module")
def saved(model, check, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("saved") / "tiny.keras"
    y = np.r_[np.zeros(50), np.ones(50)]
    proba = np.r_[np.linspace(0.01, 0.6, 50), np.linspace(0.4, 0.99, 50)]
    band = selective.choose_band(y, proba, 0.5, target_accuracy=0.97)
    meta = saving.model_metadata(model, threshold=0.5, threshold_rule="fixed 0.5",
                                 input_check=check.to_dict(), uncertain=band)
    saving.save_model(model, path, meta)
    return path


def test_predict_says_not_assessed_with_its_own_exit_status(saved, images, capsys):
    assert predict.main([images["photos"][0], "--model", str(saved)]) == predict.NOT_ASSESSED_STATUS
    out = capsys.readouterr().out
    assert out.startswith("Not assessed: this image does not look like the chest X-rays the model was trained on (score ")
    assert "PNEUMONIA" not in out.splitlines()[0] and "NORMAL" not in out.splitlines()[0]
    assert predict.main([images["photos"][0], "--model", str(saved), "--no-input-check"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("Prediction: ") and "input check OVERRIDDEN" in out
    assert predict.main([images["val"][0], "--model", str(saved), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)[0]
    assert result["input_check"]["beyond_limit"] is False and result["answer"] in ("class", "uncertain")
    assert result["input_check"]["views"] == ["features", "thumbnail"]


def test_predict_json_of_a_folder_marks_each_answer(saved, images, tmp_path, capsys):
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    for source in images["val"][:3] + images["noise"][:2]:
        (mixed / Path(source).name).write_bytes(Path(source).read_bytes())
    assert predict.main([str(mixed), "--model", str(saved), "--json"]) == predict.NOT_ASSESSED_STATUS
    results = json.loads(capsys.readouterr().out)
    answers = {Path(r["image"]).name: r["answer"] for r in results}
    assert [a for n, a in answers.items() if n.startswith("noise")] == ["not assessed"] * 2
    assert all("label" not in r for r in results if r["answer"] == "not assessed")


def test_a_model_without_a_check_still_answers_and_says_so(model, images, tmp_path, capsys):
    path = tmp_path / "plain.keras"
    saving.save_model(model, path, saving.model_metadata(model, threshold=0.5, threshold_rule="fixed 0.5"))
    assert predict.main([images["photos"][0], "--model", str(path)]) == 0
    assert "note: no input check: the model was saved without an input check" in capsys.readouterr().out


def test_band_maximises_coverage_at_the_target_accuracy():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 2000)
    proba = 1 / (1 + np.exp(-(3 * (2 * y - 1) + rng.normal(0, 2.5, 2000))))
    band = selective.choose_band(y, proba, 0.5, target_accuracy=0.97)
    assert band["reachable"] and band["low"] < 0.5 < band["high"]
    decided = ~selective.uncertain(band, proba, 0.5)
    accuracy = ((proba[decided] >= 0.5) == y[decided]).mean()
    assert accuracy >= 0.97 and decided.mean() == pytest.approx(band["coverage"], abs=1e-3)
    wider = {**band, "min_margin": band["min_margin"] * 0.8}  # a narrower band misses the target
    more = ~selective.uncertain(wider, proba, 0.5)
    assert ((proba[more] >= 0.5) == y[more]).mean() < 0.97 or more.sum() == decided.sum()
    curve = selective.risk_coverage(y, proba, 0.5)
    assert curve["coverage"][-1] == 1.0 and curve["accuracy"][0] == 1.0
    perfect = selective.choose_band(y, y * 0.8 + 0.1, 0.5)
    assert perfect["min_margin"] == 0.0 and perfect["coverage"] == 1.0
    hopeless = selective.choose_band(y, rng.uniform(size=2000), 0.5, target_accuracy=0.99)
    assert hopeless["reachable"] is False and hopeless["min_margin"] is None
    softmax = rng.dirichlet([1, 1, 1], 300)
    labels = softmax.argmax(axis=1)
    assert selective.choose_band(labels, softmax)["min_margin"] == 0.0
    with pytest.raises(ValueError, match="target_accuracy"):
        selective.choose_band(y, proba, 0.5, target_accuracy=1.0)


def test_predict_answers_uncertain_inside_the_band(saved, images, capsys):
    model, meta = saving.load_model(saved)
    meta = {**meta, "uncertain": {**meta["uncertain"], "min_margin": 50.0, "low": 0.0, "high": 1.0}}
    result = predict.predict_image(model, meta, images["val"][0])
    assert result["answer"] == "uncertain"
    assert predict._answer(result).startswith("UNCERTAIN: refer to a reader (P(PNEUMONIA) = ")


def _labelled_site(root: Path, images: dict, foreign: int) -> Path:
    for name, label, seed in (("NORMAL", 0, 11), ("PNEUMONIA", 1, 12)):
        _xrays(root / name, 30, seed, label=label)
    for i, source in enumerate(images["noise"][:foreign]):
        (root / "NORMAL" / f"IM-9{i:03d}-0001.png").write_bytes(Path(source).read_bytes())
    return root


def test_evaluate_counts_images_beyond_the_limit_apart(saved, images, tmp_path, capsys):
    site = _labelled_site(tmp_path / "site", images, foreign=3)
    out = tmp_path / "eval.json"
    assert evaluate.main(["--model", str(saved), "--data", str(site), "--n-boot", "50", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["input_check"]["beyond_limit"] == 3
    assert sorted(Path(f).name for f in result["input_check"]["files_beyond_limit"]) == [
        "IM-9000-0001.png", "IM-9001-0001.png", "IM-9002-0001.png"]
    assert result["accepted"]["images"] == 60
    assert {"coverage", "accuracy_confident", "uncertain"} <= set(result["selective"])


def test_calibrate_leaves_foreign_images_out_and_chooses_a_band_on_the_site(saved, images, tmp_path, capsys):
    site = _labelled_site(tmp_path / "site", images, foreign=2)
    out = tmp_path / "tiny.site.keras"
    assert calibrate.main(["--model", str(saved), "--data", str(site), "--out", str(out), "--n-boot", "50"]) == 0
    meta = json.loads(out.with_suffix(".json").read_text())
    record = meta["calibration"]
    assert record["input_check"]["beyond_limit"] == 2 and record["n_images"] == 60
    assert "verdict" in record["site_shift"] and 0 < record["site_shift"]["p_value"] <= 1
    assert meta["uncertain"]["chosen_on"].endswith("in-sample)") and "input_check" in meta
    assert "beyond the input check's limit" in out.with_suffix(".md").read_text()


def test_calibrate_refuses_to_overwrite_the_best_pointer(saved, images, tmp_path, error_line):
    site = _labelled_site(tmp_path / "site", images, foreign=0)
    assert calibrate.main(["--model", str(saved), "--data", str(site), "--out", str(tmp_path / "best.keras")]) == 2
    assert "best.json" in error_line()


def test_mmd_test_tells_a_shifted_sample_from_a_like_one():
    rng = np.random.default_rng(0)
    reference = rng.normal(size=(150, 5))
    _, p_same = site_shift.mmd_test(rng.normal(size=(150, 5)), reference, permutations=200)
    _, p_shifted = site_shift.mmd_test(rng.normal(0.6, 1, size=(150, 5)), reference, permutations=200)
    assert p_same > 0.05 and p_shifted < 0.01


def test_site_shift_command_reports_a_foreign_site(saved, images, tmp_path, capsys):
    folder = tmp_path / "site"
    folder.mkdir()
    for source in images["photos"] + images["noise"]:
        (folder / Path(source).name).write_bytes(Path(source).read_bytes())
    assert site_shift.main(["--model", str(saved), "--data", str(folder), "--json", "--permutations", "99"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["flagged"] == 1.0 and report["p_value"] <= 0.02
    assert "unlike the training images" in report["verdict"]


def test_model_card_writes_replace_a_planted_symlink(saved, images, tmp_path):
    outside = tmp_path / "outside.txt"
    outside.write_text("keep me")
    site = _labelled_site(tmp_path / "site", images, foreign=0)
    out = tmp_path / "copy.keras"
    out.with_suffix(".md").symlink_to(outside)
    assert calibrate.main(["--model", str(saved), "--data", str(site), "--out", str(out), "--n-boot", "20"]) == 0
    assert outside.read_text() == "keep me"
    assert not out.with_suffix(".md").is_symlink() and "## Site calibration" in out.with_suffix(".md").read_text()


def test_run_names_that_leave_their_folder_are_refused(tmp_path):
    from pneumo_utils.explain import report

    with pytest.raises(ValueError, match="no folders"):
        report.save_run([], metrics_path=tmp_path / "m.json", run_name="../../outside/x", title="t", data="d")
