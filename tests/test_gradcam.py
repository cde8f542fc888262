"""Grad-CAM on a tiny convolutional model: the decision threshold picks the class explained."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from pneumo_utils.explain import gradcam


def _tiny_model() -> keras.Model:
    keras.utils.set_random_seed(0)
    inputs = keras.Input((16, 16, 3))
    x = keras.layers.Conv2D(4, 3, padding="same", activation="relu", name="conv")(inputs)
    x = keras.layers.GlobalAveragePooling2D(name="head_gap")(x)
    outputs = keras.layers.Dense(1, activation="sigmoid", name="head_output")(x)
    return keras.Model(inputs, outputs)


def test_threshold_chooses_the_class_explained():
    model = _tiny_model()
    images = np.random.default_rng(0).uniform(0, 255, (2, 16, 16, 3)).astype(np.float32)
    assert gradcam.find_last_conv_layer(model) == "conv"
    pneumonia = gradcam.grad_cam(model, images, target="pneumonia")
    # every output is >= 0: "predicted" explains class 1 for all, exactly as target="pneumonia"
    np.testing.assert_allclose(gradcam.grad_cam(model, images, threshold=0.0), pneumonia, atol=1e-6)
    # no output reaches 1.01: "predicted" explains class 0, the opposite evidence
    normal = gradcam.grad_cam(model, images, threshold=1.01)
    assert normal.shape == pneumonia.shape == (2, 16, 16)
    assert not np.allclose(normal, pneumonia)
    assert 0.0 <= normal.min() and normal.max() <= 1.0


def test_maps_of_a_cropping_model_line_up_with_the_whole_image():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((20, 20, 3))
    x = keras.layers.CenterCrop(16, 16)(inputs)
    x = keras.layers.Conv2D(4, 3, padding="same", activation="relu", name="conv")(x)
    x = keras.layers.GlobalAveragePooling2D(name="head_gap")(x)
    model = keras.Model(inputs, keras.layers.Dense(1, activation="sigmoid", name="head_output")(x))
    images = np.random.default_rng(1).uniform(0, 255, (2, 20, 20, 3)).astype(np.float32)
    heat = gradcam.grad_cam(model, images, target="pneumonia")
    assert heat.shape == (2, 20, 20)
    assert np.all(heat[:, :2] == 0) and np.all(heat[:, :, -2:] == 0), "the cropped-away frame has no heat"
    assert heat[:, 2:18, 2:18].max() > 0


def test_class_index_targets_of_a_binary_model():
    model = _tiny_model()
    images = np.random.default_rng(0).uniform(0, 255, (2, 16, 16, 3)).astype(np.float32)
    np.testing.assert_allclose(gradcam.grad_cam(model, images, target=1),
                               gradcam.grad_cam(model, images, target="pneumonia"), atol=1e-6)
    np.testing.assert_allclose(gradcam.grad_cam(model, images, target=0),
                               gradcam.grad_cam(model, images, threshold=1.01), atol=1e-6)
    with pytest.raises(ValueError, match=r"class index 0..1 \('pneumonia' is class 1\), got 2"):
        gradcam.grad_cam(model, images, target=2)
