"""Shortcut audit, counterfactual cue tests and the cue-removing input layers."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from pneumo_utils.data.frames import other_class_references
from pneumo_utils.evaluation import shortcuts
from pneumo_utils.model.preprocessing import HistogramEqualization, cue_removal


def _images(labels: np.ndarray, cue: bool, seed: int = 0, side: int = 48) -> np.ndarray:
    """Grey X-ray-like images; class 1 has a bright blob in the centre (the 'lung' signal).

    With ``cue``, class 0 also gets a black frame and class 1 a grey one (the shortcut).
    """
    rng = np.random.default_rng(seed)
    images = rng.normal(120, 25, (len(labels), side, side)).clip(0, 255)
    c = side // 2
    images[labels == 1, c - 6: c + 6, c - 6: c + 6] += 60
    if cue:
        frame = np.zeros((side, side), bool)
        frame[:4], frame[-4:], frame[:, :4], frame[:, -4:] = True, True, True, True
        images[(labels == 0)[:, None, None] & frame] = 0
        images[(labels == 1)[:, None, None] & frame] = 60
    return np.repeat(images.clip(0, 255)[..., None], 3, axis=-1).astype(np.float32)


def _border_reader(x: np.ndarray) -> np.ndarray:
    """A 'model' that looks only at the frame: bright frame -> class 1."""
    return (x[:, :3, :, 0].mean(axis=(1, 2)) / 80.0).clip(0, 1)


def _centre_reader(x: np.ndarray) -> np.ndarray:
    """A 'model' that looks only at the centre, where the class signal is."""
    c = x.shape[1] // 2
    centre = x[:, c - 6: c + 6, c - 6: c + 6, 0].mean(axis=(1, 2))
    return 1 / (1 + np.exp(-(centre - 150) / 10))


def test_audit_finds_a_planted_border_cue_and_nothing_without_it():
    y = np.tile([0, 1], 60)
    with_cue = shortcuts.audit(shortcuts.image_statistics(_images(y, True, 0)), y,
                               shortcuts.image_statistics(_images(y, True, 1)), y)
    assert with_cue.loc["border intensity", "validation auc"] > 0.95
    no_cue = shortcuts.audit(shortcuts.image_statistics(_images(y, False, 0)), y,
                             shortcuts.image_statistics(_images(y, False, 1)), y)
    assert no_cue.loc["border intensity", "validation auc"] < 0.75


def test_counterfactuals_swap_exactly_the_cue():
    y = np.array([0, 1])
    images = _images(y, True)
    image, reference = images[0], images[1]
    swapped = shortcuts.counterfactual(image, reference, "histogram_swap")
    assert np.allclose(np.sort(swapped[..., 0].ravel()), np.sort(reference[..., 0].ravel()))
    order = np.argsort(image[..., 0].ravel(), kind="stable")
    assert np.all(np.diff(swapped[..., 0].ravel()[order]) >= 0), "grey-level order kept"
    framed = shortcuts.counterfactual(image, reference, "border_swap", border=0.1)
    assert np.array_equal(framed[:4], reference[:4]) and np.array_equal(framed[10:-10, 10:-10], image[10:-10, 10:-10])
    masked = shortcuts.counterfactual(image, reference, "border_mask", border=0.1)
    assert np.all(masked[:4] == 128)
    with pytest.raises(ValueError, match="unknown counterfactual"):
        shortcuts.counterfactual(image, reference, "flip")


def test_references_come_from_the_other_class():
    labels, ref_labels = np.array([0, 1, 1, 0]), np.array([1, 1, 0, 0, 1])
    refs = other_class_references(labels, ref_labels, seed=3)
    assert np.all(ref_labels[refs] != labels)


def test_cue_test_exposes_a_shortcut_model_and_spares_a_lung_model():
    y = np.tile([0, 1], 40)
    images = _images(y, True)
    refs = other_class_references(y, y, seed=0)
    sets = shortcuts.counterfactuals(images, images[refs], border=0.08)
    shortcut = shortcuts.cue_test(_border_reader, sets, y, threshold=0.5)
    honest = shortcuts.cue_test(_centre_reader, sets, y, threshold=0.5)
    assert shortcut.loc["clean", "auc"] > 0.99 and honest.loc["clean", "auc"] > 0.99
    assert shortcut.loc["border_swap", "specificity"] < 0.1 and shortcut.loc["border_swap", "flipped"] > 0.9
    assert honest.loc["border_swap", "flipped"] < 0.05
    assert shortcuts.selection_score(honest) > 0.9 > 0.5 >= shortcuts.selection_score(shortcut)


def _reference_equalisation(image: np.ndarray) -> np.ndarray:
    grey = image.mean(axis=-1).round().astype(int)
    cdf = np.cumsum(np.bincount(grey.ravel(), minlength=256)) / grey.size
    return cdf[grey] * 255


def test_histogram_equalisation_matches_the_textbook_definition_and_ignores_exposure():
    y = np.array([0, 1, 1])
    images = _images(y, True, side=64)
    out = keras.ops.convert_to_numpy(HistogramEqualization()(images))
    assert out.shape == images.shape
    for image, equalised in zip(images, out, strict=True):
        assert np.allclose(equalised[..., 0], _reference_equalisation(image), atol=1e-3)
        assert np.array_equal(equalised[..., 0], equalised[..., 2])
    darker = 255 * (images / 255) ** 1.3
    stats = shortcuts.image_statistics(keras.ops.convert_to_numpy(HistogramEqualization()(darker)))
    assert np.allclose(stats["p50"], shortcuts.image_statistics(out)["p50"], atol=6)


def test_cue_removal_saves_and_loads_inside_a_model(tmp_path):
    inputs = keras.Input((40, 40, 3))
    model = keras.Model(inputs, cue_removal(inputs, crop_fraction=0.8))
    assert model.output.shape[1:] == (40, 40, 3)
    model.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras")
    x = _images(np.array([0, 1]), True, side=40)
    assert np.allclose(model.predict(x, verbose=0), loaded.predict(x, verbose=0))
    with pytest.raises(ValueError, match="crop_fraction"):
        cue_removal(inputs, crop_fraction=0)


def test_frame_swapped_views_keep_the_centre_and_take_the_frame(tmp_path):
    from PIL import Image

    from pneumo_utils.model import features

    rng = np.random.default_rng(0)
    paths = []
    for i in range(4):
        path = tmp_path / f"img{i}.png"
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(path)
        paths.append(str(path))
    keras.utils.set_random_seed(0)
    inputs = keras.Input((32, 32, 3))
    x = keras.layers.Conv2D(3, 1, name="conv")(inputs)
    x = keras.layers.GlobalAveragePooling2D(name="head_gap")(x)
    model = keras.Model(inputs, keras.layers.Dense(1, activation="sigmoid", name="head_output")(x))
    frames = paths[::-1]
    feats = features.extract_split_features(
        model, {"clean": paths, "swapped": paths}, batch_size=2, cache_dir=tmp_path / "cache",
        verbose=False, frame_from={"swapped": frames}, border=0.25,
    )
    images = np.stack([np.asarray(Image.open(p), dtype=np.float32) for p in paths])
    by_hand = images.copy()
    by_hand[:, :8], by_hand[:, -8:], by_hand[:, :, :8], by_hand[:, :, -8:] = (
        images[::-1, :8], images[::-1, -8:], images[::-1, :, :8], images[::-1, :, -8:])
    extractor = keras.Model(model.inputs, model.get_layer("head_gap").output)
    np.testing.assert_allclose(feats["swapped"], extractor.predict(by_hand, verbose=0), atol=1e-4)
    np.testing.assert_allclose(feats["clean"], extractor.predict(images, verbose=0), atol=1e-4)
    cached = features.extract_split_features(
        model, {"swapped": paths}, cache_dir=tmp_path / "cache", verbose=False,
        frame_from={"swapped": frames}, border=0.25,
    )
    np.testing.assert_array_equal(cached["swapped"], feats["swapped"])
    with pytest.raises(ValueError, match="frame_from"):
        features.extract_split_features(model, {"a": paths}, cache_dir=None, frame_from={"b": paths})


def test_validation_cue_test_runs_a_keras_model_on_image_files(tmp_path):
    from PIL import Image

    y = np.tile([0, 1], 10)
    paths = []
    for i, image in enumerate(_images(y, True, side=40)):
        path = tmp_path / f"{i}.png"
        Image.fromarray(image.astype(np.uint8)).save(path)
        paths.append(str(path))
    inputs = keras.Input((40, 40, 3))
    pooled = keras.layers.GlobalAveragePooling2D()(inputs)
    output = keras.layers.Dense(1, activation="sigmoid")(pooled)
    model = keras.Model(inputs, output)
    model.layers[-1].set_weights([np.full((3, 1), 0.1 / 3), np.array([-10.0])])
    table = shortcuts.validation_cue_test(model, paths, y, paths, y, threshold=0.5, max_images=10, seed=1)
    assert list(table.index) == ["clean", *shortcuts.COUNTERFACTUALS]
    assert table.loc["clean", "flipped"] == 0.0
    assert set(table.columns) >= {"auc", "specificity", "balanced accuracy", "flipped"}


def test_training_set_with_frame_swaps_doubles_the_training_images(tmp_path):
    from PIL import Image

    from pneumo_utils.model import features

    rng = np.random.default_rng(2)
    paths = {"train": [], "val": []}
    for split, n in (("train", 6), ("val", 2)):
        for i in range(n):
            path = tmp_path / f"{split}{i}.png"
            Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(path)
            paths[split].append(str(path))
    labels = {"train": np.array([0, 1, 0, 1, 0, 1]), "val": np.array([0, 1])}
    inputs = keras.Input((32, 32, 3))
    x = keras.layers.GlobalAveragePooling2D(name="head_gap")(keras.layers.Conv2D(2, 1)(inputs))
    model = keras.Model(inputs, keras.layers.Dense(1, activation="sigmoid", name="head_output")(x))
    feats, x_train, y_train = features.extract_with_frame_swaps(model, paths, labels, seed=0, cache_dir=None,
                                                                verbose=False)
    assert set(feats) == {"train", "val"} and x_train.shape == (12, 2)
    np.testing.assert_array_equal(y_train, np.tile(labels["train"], 2))
    np.testing.assert_array_equal(x_train[:6], feats["train"])
    assert not np.allclose(x_train[6:], feats["train"]), "the swapped copies differ in their frame"
    _, plain_x, plain_y = features.extract_with_frame_swaps(model, paths, labels, frame_swap=False, cache_dir=None,
                                                            verbose=False)
    assert plain_x.shape == (6, 2) and len(plain_y) == 6


def _three_class_images(labels: np.ndarray) -> np.ndarray:
    """Class k has a centre blob of +60k grey levels and a frame of grey level 60k (the cue)."""
    rng = np.random.default_rng(0)
    side, c = 48, 24
    images = rng.normal(120, 25, (len(labels), side, side)).clip(0, 255)
    for k in (1, 2):
        images[labels == k, c - 6: c + 6, c - 6: c + 6] += 60 * k
    frame = np.zeros((side, side), bool)
    frame[:4], frame[-4:], frame[:, :4], frame[:, -4:] = True, True, True, True
    for k in (0, 1, 2):
        images[(labels == k)[:, None, None] & frame] = 60 * k
    return np.repeat(images.clip(0, 255)[..., None], 3, axis=-1).astype(np.float32)


def _softmax_around(value: np.ndarray, centres: np.ndarray) -> np.ndarray:
    logits = -((value[:, None] - centres[None, :]) / 15.0) ** 2
    return np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)


def test_three_class_cue_test_decides_by_argmax_and_ranks_the_honest_model_first():
    y = np.tile([0, 1, 2], 30)
    images = _three_class_images(y)
    refs = other_class_references(y, y, seed=0)
    sets = shortcuts.counterfactuals(images, images[refs], border=0.08)

    def shortcut(x):
        return _softmax_around(x[:, :3, :, 0].mean(axis=(1, 2)), np.array([0.0, 60.0, 120.0]))

    def honest(x):
        return _softmax_around(x[:, 18:30, 18:30, 0].mean(axis=(1, 2)), np.array([120.0, 180.0, 240.0]))

    cheat = shortcuts.cue_test(shortcut, sets, y, threshold=None)
    fair = shortcuts.cue_test(honest, sets, y, threshold=None)
    assert list(fair.columns) == ["auc", "balanced accuracy", "flipped"]
    assert cheat.loc["clean", "balanced accuracy"] > 0.95 and fair.loc["clean", "balanced accuracy"] > 0.95
    assert cheat.loc["border_swap", "flipped"] > 0.9 and fair.loc["border_swap", "flipped"] < 0.05
    assert fair.loc[["border_swap", "border_mask"], "balanced accuracy"].min() > 0.9
    assert shortcuts.selection_score(cheat) < 0.4  # chance is 1/3
