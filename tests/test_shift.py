"""The acquisition-shift stress test: perturbations do what they say, metrics move the right way."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from pneumo_utils import shift
from pneumo_utils.datasets import load_kermany, paths_and_labels


def _gradient(side: int = 224) -> np.ndarray:
    """A left-to-right ramp with a bright square in it (edges for the blur to soften)."""
    image = np.tile(np.linspace(20, 200, side, dtype=np.float32), (side, 1))
    image[side // 4: side // 2, side // 4: side // 2] = 250
    return np.repeat(image[..., None], 3, axis=-1)


@pytest.mark.parametrize("kind", list(shift.PERTURBATIONS))
def test_each_perturbation_changes_the_image_and_keeps_its_shape_and_range(kind):
    image = _gradient()
    out = shift.perturb(image, kind)
    assert out.shape == image.shape and out.dtype == np.float32
    assert out.min() >= 0 and out.max() <= 255
    assert np.abs(out - image).max() > 5.0, f"{kind} left the image almost unchanged"


def test_perturbations_change_what_their_names_say():
    image = _gradient()
    assert shift.perturb(image, "gamma_dark").mean() < image.mean() < shift.perturb(image, "gamma_bright").mean()
    assert shift.perturb(image, "low_contrast").std() == pytest.approx(0.7 * image.std(), rel=0.01)
    steepest = np.abs(np.diff(image[80, :, 0])).max()
    assert np.abs(np.diff(shift.perturb(image, "blur")[80, :, 0])).max() < 0.5 * steepest, "edges softened"
    zoomed_out = shift.perturb(image, "zoom_out")
    assert zoomed_out[0].max() == 0 and zoomed_out[:, 0].max() == 0, "a black border around the shrunk image"
    np.testing.assert_array_equal(shift.perturb(image, "noise"), shift.perturb(image, "noise"))
    with pytest.raises(ValueError, match="unknown perturbation 'flip'.*gamma_dark"):
        shift.perturb(image, "flip")


def _brightness_model(side: int, centre: float) -> keras.Model:
    """P(PNEUMONIA) rises with mean brightness: sigmoid(0.2 * (mean - centre))."""
    inputs = keras.Input((side, side, 3))
    x = keras.layers.GlobalAveragePooling2D()(inputs)
    out = keras.layers.Dense(1, activation="sigmoid")(x)
    model = keras.Model(inputs, out)
    model.layers[-1].set_weights([np.full((3, 1), 0.2 / 3, "float32"), np.array([-0.2 * centre], "float32")])
    return model


def test_stress_test_scores_every_condition_at_one_threshold(kermany_root):
    paths, labels = paths_and_labels(load_kermany(kermany_root), "test")
    images = shift.load_images(paths, 64)
    centre = float(np.median(images.mean(axis=(1, 2, 3))))
    model = _brightness_model(64, centre)
    table = shift.stress_test(model, paths, labels, threshold=0.5)
    assert list(table.index) == ["clean", *shift.PERTURBATIONS, "mean shift"]
    assert list(table.columns) == ["auc", "accuracy", "fpr", "fnr"]
    assert ((table >= 0) & (table <= 1)).all().all()
    # Brighter images push a brightness model towards PNEUMONIA: more normals over-called.
    assert table.loc["gamma_bright", "fpr"] > table.loc["clean", "fpr"] > table.loc["gamma_dark", "fpr"]
    assert table.loc["gamma_bright", "fnr"] < table.loc["gamma_dark", "fnr"]
    perturbed = table.drop(index=["clean", "mean shift"])
    np.testing.assert_allclose(table.loc["mean shift"], perturbed.mean())
    sample = shift.stress_test(model, paths, labels, threshold=0.5, kinds=["blur"], max_images=6, seed=1)
    assert list(sample.index) == ["clean", "blur", "mean shift"]
    with pytest.raises(ValueError, match="both classes"):
        shift.stress_test(model, paths[:2], np.zeros(2), 0.5)
