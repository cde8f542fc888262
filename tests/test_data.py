"""Grouped splits, subsampling, class weights and the tf.data pipeline."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from pneumo_utils.data import pipelines, splits
from pneumo_utils.data.kermany import load_kermany


def _toy_index(n_patients: int = 60, per_patient: int = 3) -> pd.DataFrame:
    rows = []
    for p in range(n_patients):
        label = int(p % 3 != 0)
        for k in range(per_patient):
            rows.append((f"/x/p{p}_{k}.png", label, f"p{p}", "train", "toy"))
    return pd.DataFrame(rows, columns=["path", "label", "patient", "split", "source"])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_grouped_split_never_leaks_and_is_stratified(seed):
    index = splits.grouped_split(_toy_index(), val_fraction=0.2, seed=seed)
    splits.assert_no_patient_leak(index)
    val = index[index["split"] == "val"]
    assert 0.1 < len(val) / len(index) < 0.3
    assert abs(val["label"].mean() - index["label"].mean()) < 0.15
    again = splits.grouped_split(_toy_index(), val_fraction=0.2, seed=seed)
    pd.testing.assert_frame_equal(index, again)


def test_official_val_is_merged_unless_kept(kermany_root):
    index = load_kermany(kermany_root)
    official = set(index.loc[index["split"] == "val", "path"])
    merged = splits.grouped_split(index, 0.25, seed=0)
    kept = splits.grouped_split(index, 0.25, seed=0, keep_official_val=True)
    assert official <= set(kept.loc[kept["split"] == "val", "path"])
    assert not official <= set(merged.loc[merged["split"] == "val", "path"])
    assert (merged["split"] == "test").sum() == (index["split"] == "test").sum()


def test_leak_is_detected():
    index = _toy_index()
    index.loc[0, "split"] = "test"
    with pytest.raises(splits.PatientLeakError, match="p0"):
        splits.assert_no_patient_leak(index)


def test_subsample_caps_each_split_and_class():
    index = splits.subsample(_toy_index(), 10, seed=0)
    assert index.groupby(["split", "label"]).size().max() == 10
    assert splits.subsample(_toy_index(), None) is not None


def test_class_weights_balance_the_loss():
    labels = np.array([0] * 25 + [1] * 75)
    weights = pipelines.class_weights(labels)
    assert weights[0] == pytest.approx(2.0) and weights[1] == pytest.approx(2 / 3)
    assert weights[0] * 25 == pytest.approx(weights[1] * 75)


def test_image_dataset_shapes_and_dtypes(kermany_root):
    index = load_kermany(kermany_root)
    paths = index["path"].tolist()[:10]
    labels = index["label"].to_numpy()[:10]
    ds = pipelines.image_dataset(paths, labels, image_size=48, batch_size=4)
    batches = list(ds)
    assert [b[0].shape[0] for b in batches] == [4, 4, 2]
    x, y = batches[0]
    assert x.shape == (4, 48, 48, 3) and x.dtype.name == "float32" and y.dtype.name == "float32"
    assert 0.0 <= float(np.min(x)) and float(np.max(x)) <= 255.0 and float(np.max(x)) > 50
    np.testing.assert_array_equal(np.concatenate([b[1] for b in batches]), labels)
    unlabeled = next(iter(pipelines.image_dataset(paths, image_size=48, batch_size=4)))
    np.testing.assert_array_equal(unlabeled.numpy(), x.numpy())


def test_kermany_split_and_split_files_follow_the_index(kermany_root):
    index = splits.kermany_split(kermany_root, val_fraction=0.25, seed=0, max_images_per_class=5)
    splits.assert_no_patient_leak(index)
    assert (index.groupby(["split", "label"]).size() <= 5).all()
    paths, labels = splits.split_files(index)
    assert set(paths) == {"train", "val", "test"}
    for name in paths:
        part = index[index["split"] == name]
        assert paths[name] == part["path"].tolist()
        np.testing.assert_array_equal(labels[name], part["label"].to_numpy())
        assert set(labels[name]) == {0, 1}
    only_train, _ = splits.split_files(index, ("train",))
    assert list(only_train) == ["train"]
