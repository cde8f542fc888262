"""The frame swap: one arithmetic for the shortcut check (NumPy) and the feature cache (tf.data)."""

import numpy as np
import pytest
import tensorflow as tf

from pneumo_utils.data.frames import frame_mask, swap_frame
from pneumo_utils.evaluation import shortcuts


def _pair(size: int = 40, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return (rng.integers(0, 256, (2, size, size, 3)).astype(np.float32),
            rng.integers(0, 256, (2, size, size, 3)).astype(np.float32))


@pytest.mark.parametrize("border", [0.0, 0.1, 0.12, 0.25, 0.5])
def test_numpy_and_tensorflow_swaps_give_the_same_pixels(border):
    images, frames = _pair()
    eager = swap_frame(images, frames, border)
    dataset = tf.data.Dataset.zip((tf.data.Dataset.from_tensor_slices(images).batch(2),
                                   tf.data.Dataset.from_tensor_slices(frames).batch(2)))
    graph = np.concatenate(list(dataset.map(lambda x, f: swap_frame(x, f, border)).as_numpy_iterator()))
    np.testing.assert_array_equal(graph, eager)
    by_hand = frames.copy()
    edge = round(40 * border)
    by_hand[:, edge: 40 - edge, edge: 40 - edge] = images[:, edge: 40 - edge, edge: 40 - edge]
    np.testing.assert_array_equal(eager, by_hand)
    np.testing.assert_array_equal(shortcuts.counterfactual(images[0], frames[0], "border_swap", border), by_hand[0])


def test_frame_mask_of_a_wide_image_rounds_each_side_on_its_own():
    mask = frame_mask(10, 30, 0.1)[..., 0]
    assert mask.shape == (10, 30) and mask.dtype == np.float32
    assert mask.sum() == (10 - 2) * (30 - 6)
    assert mask[0].sum() == 0 and mask[:, :3].sum() == 0 and mask[1, 3] == 1
