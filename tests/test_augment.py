"""Augmentation layers and the augmented tf.data pipeline, on generated arrays (fast)."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from pneumo_utils.data import augment


def _gradient_images(n: int = 8, size: int = 32) -> np.ndarray:
    """Identical, non-symmetric RGB test images in 0-255 (a diagonal ramp with a bright block)."""
    ramp = np.add.outer(np.arange(size), np.arange(size)).astype(np.float32)
    image = ramp / ramp.max() * 200.0
    image[4:12, 20:28] = 255.0
    return np.repeat(np.repeat(image[None, :, :, None], 3, axis=-1), n, axis=0)


def _run(dataset) -> list:
    return [tuple(np.asarray(part) for part in batch) for batch in dataset]


def test_default_layers_and_no_horizontal_flip():
    layers = augment.augmentation()
    names = [layer.name for layer in layers.layers]
    assert names == ["rotation", "zoom", "shift", "brightness", "contrast"]
    assert "flip" not in names
    flipped = augment.augmentation(horizontal_flip=True)
    assert flipped.layers[0].name == "flip"
    assert flipped.layers[0].get_config()["mode"] == "horizontal"


def test_zero_disables_a_transform_and_all_zero_is_identity():
    layers = augment.augmentation(rotation=0, brightness=0)
    assert [layer.name for layer in layers.layers] == ["zoom", "shift", "contrast"]
    none = augment.augmentation(0, 0, 0, 0, 0)
    assert none.layers == []
    assert augment.describe(none) == "no augmentation"
    assert augment.describe(None) == "no augmentation"
    dataset = tf.data.Dataset.from_tensor_slices(_gradient_images(4)).batch(2)
    assert augment.augment_dataset(dataset, none) is dataset
    assert augment.augment_dataset(dataset, None) is dataset


@pytest.mark.parametrize(
    "kwargs",
    [{"rotation": -1}, {"rotation": 200}, {"zoom": 1.0}, {"shift": -0.1}, {"contrast": 1.5}],
)
def test_invalid_ranges_are_rejected(kwargs):
    with pytest.raises(ValueError):
        augment.augmentation(**kwargs)


def test_describe_names_ranges():
    text = augment.describe(augment.augmentation(rotation=7, zoom=0.1, shift=0.05))
    assert "rotation +-7 deg" in text and "zoom +-10%" in text and "shift +-5%" in text
    assert "contrast +-10%" in text and "flip" not in text


def test_augment_dataset_keeps_shapes_range_and_labels():
    images = _gradient_images(8)
    labels = np.arange(8, dtype=np.float32)
    dataset = tf.data.Dataset.from_tensor_slices((images, labels)).batch(4)
    out = _run(augment.augment_dataset(dataset, augment.augmentation(seed=3)))
    assert [b[0].shape for b in out] == [(4, 32, 32, 3)] * 2
    np.testing.assert_array_equal(np.concatenate([b[1] for b in out]), labels)
    augmented = np.concatenate([b[0] for b in out])
    assert augmented.dtype == np.float32
    assert augmented.min() >= 0.0 and augmented.max() <= 255.0
    assert not np.allclose(augmented, images)
    # every image of a batch gets its own random transform
    assert not np.allclose(augmented[0], augmented[1])


def test_images_only_dataset_passes_through_the_map():
    dataset = tf.data.Dataset.from_tensor_slices(_gradient_images(4)).batch(2)
    out = [np.asarray(batch) for batch in augment.augment_dataset(dataset, augment.augmentation(seed=0))]
    assert [b.shape for b in out] == [(2, 32, 32, 3)] * 2


def test_same_seed_same_augmentation():
    """Reproducible under ``data.set_seed`` (TensorFlow op determinism), as in the notebooks."""
    from pneumo_utils.data.pipelines import set_seed

    set_seed(0)
    images = _gradient_images(6)

    def once(seed):
        dataset = tf.data.Dataset.from_tensor_slices(images).batch(3)
        out = augment.augment_dataset(dataset, augment.augmentation(seed=seed))
        return np.concatenate([np.asarray(batch) for batch in out])

    np.testing.assert_allclose(once(5), once(5))
    assert not np.allclose(once(5), once(6))


def test_contrast_goes_both_ways():
    """Keras reads a scalar contrast factor as 'more contrast only'; ours must also lower it."""
    layers = augment.augmentation(rotation=0, zoom=0, shift=0, brightness=0, contrast=0.5, seed=1)
    images = _gradient_images(64)
    out = np.asarray(layers(images, training=True))
    spread = out.reshape(len(out), -1).std(axis=1) / images[0].std()
    assert spread.min() < 0.95 and spread.max() > 1.05


def test_horizontal_flip_mirrors_when_enabled():
    layers = augment.augmentation(0, 0, 0, 0, 0, horizontal_flip=True, seed=0)
    images = _gradient_images(32)
    out = np.asarray(layers(images, training=True))
    mirrored = [np.allclose(o, images[0][:, ::-1]) for o in out]
    unchanged = [np.allclose(o, images[0]) for o in out]
    assert any(mirrored) and any(unchanged)
    assert all(m or u for m, u in zip(mirrored, unchanged, strict=True))


def test_small_rotation_keeps_most_of_the_picture():
    """Modest defaults: the augmented image stays close to the original (no wild transforms)."""
    images = _gradient_images(16, size=64)
    out = np.asarray(augment.augmentation(seed=2)(images, training=True))
    assert np.mean(np.abs(out - images)) < 0.25 * 255


def test_training_dataset_full_pass_and_images_per_epoch(tmp_path):
    from PIL import Image

    paths = []
    for i in range(10):
        path = tmp_path / f"img{i}.png"
        Image.fromarray(np.full((40, 40), i * 20, dtype=np.uint8)).save(path)
        paths.append(str(path))
    labels = np.array([0, 1] * 5)
    dataset, steps = augment.training_dataset(paths, labels, 32, batch_size=4, seed=0)
    assert steps is None
    batches = _run(dataset)
    assert sum(len(b[1]) for b in batches) == 10
    assert batches[0][0].shape[1:] == (32, 32, 3)

    dataset, steps = augment.training_dataset(paths, labels, 32, 4, augment.augmentation(seed=0), 0,
                                              images_per_epoch=6)
    assert steps == 2
    taken = _run(dataset.take(7))  # repeats past the 3 batches of one pass
    assert len(taken) == 7
    assert sorted(set(np.concatenate([b[1] for b in taken]).tolist())) == [0.0, 1.0]

    _, steps = augment.training_dataset(paths, labels, 32, 4, images_per_epoch=100)
    assert steps is None  # more than the data set: plain full passes


def test_preview_first_is_original():
    image = _gradient_images(1)[0]
    grid = augment.preview(augment.augmentation(seed=0), image, n=5)
    assert grid.shape == (5, 32, 32, 3)
    np.testing.assert_array_equal(grid[0], image)
    assert not np.allclose(grid[1], image)
    same = augment.preview(None, image, n=3)
    assert same.shape == (3, 32, 32, 3) and np.allclose(same, image)
