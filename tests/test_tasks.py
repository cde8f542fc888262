"""Tasks on the Kermany index: subtypes from file names, labels, splits stratified by task."""

from __future__ import annotations

import numpy as np
import pytest
from synthetic import make_kermany_like

from pneumo_utils.data import datasets, kermany, pipelines, splits, tasks
from pneumo_utils.data.datasets import DatasetLayoutError
from pneumo_utils.data.kermany import kermany_subtype


@pytest.fixture(scope="module")
def kermany_root(tmp_path_factory):
    return make_kermany_like(tmp_path_factory.mktemp("tasks"), n_train_per_class=40, n_val_per_class=4,
                             n_test_per_class=12, image_size=32, subtype_signal=True)


@pytest.mark.parametrize(("name", "label", "subtype"), [
    ("person1946_bacteria_4874.jpeg", 1, "bacteria"),
    ("person1_virus_6.jpeg", 1, "virus"),
    ("PERSON12_VIRUS_3.JPEG", 1, "virus"),
    ("IM-0117-0001.jpeg", 0, "normal"),
    ("person1_bacteria_1.jpeg", 0, "normal"),
    ("IM-0117-0001.jpeg", 1, None),
    ("scan.png", 1, None),
])
def test_subtype_from_class_and_file_name(name, label, subtype):
    assert kermany_subtype(name, label) == subtype


def test_index_carries_subtypes(kermany_root):
    index = kermany.load_kermany(kermany_root)
    assert set(index.loc[index["label"] == 0, "subtype"]) == {"normal"}
    pneumonia = index[index["label"] == 1]
    assert set(pneumonia["subtype"]) == {"bacteria", "virus"}
    assert (pneumonia["subtype"] == pneumonia["path"].str.extract(r"_(bacteria|virus)_")[0]).all()


def test_pneumonia_task_leaves_the_index_alone(kermany_root):
    index = kermany.load_kermany(kermany_root)
    assert tasks.task_index(index, "pneumonia") is index


def test_bacterial_vs_viral_keeps_pneumonia_images_and_labels_virus_1(kermany_root):
    index = kermany.load_kermany(kermany_root)
    out = tasks.task_index(index, "bacterial_vs_viral")
    assert len(out) == int((index["label"] == 1).sum())
    assert (out["pneumonia_label"] == 1).all()
    assert (out["label"] == (out["subtype"] == "virus").astype(int)).all()


def test_three_class_labels_follow_class_names(kermany_root):
    index = kermany.load_kermany(kermany_root)
    out = tasks.task_index(index, "three_class")
    task = tasks.get_task("three_class")
    assert len(out) == len(index)
    names = out["label"].map(dict(enumerate(task.class_names)))
    expected = out["subtype"].map(
        {"normal": "NORMAL", "bacteria": "BACTERIAL PNEUMONIA", "virus": "VIRAL PNEUMONIA"})
    assert (names == expected).all()
    assert task.output_units == 3 and task.activation == "softmax" and task.decision == "argmax"
    assert task.positive_class is None


def test_split_is_patient_grouped_and_stratified_by_task_classes(kermany_root):
    index = tasks.task_index(kermany.load_kermany(kermany_root), "three_class")
    split = splits.grouped_split(index, val_fraction=0.25, seed=0)
    splits.assert_no_patient_leak(split)
    val = split[split["split"] == "val"]
    assert set(val["label"]) == {0, 1, 2}
    table = datasets.summarize(split, tasks.get_task("three_class").class_names)
    assert list(table["images"].columns) == ["BACTERIAL PNEUMONIA", "NORMAL", "VIRAL PNEUMONIA"]
    assert int(table["images"].to_numpy().sum()) == len(split)


def test_unknown_pneumonia_file_name_is_an_error_naming_it(kermany_root, tmp_path):
    import shutil

    root = tmp_path / "data"
    shutil.copytree(kermany_root, root)
    src = next((root / "train" / "PNEUMONIA").glob("*_virus_*"))
    src.rename(src.with_name("scan_0001.jpeg"))
    index = kermany.load_kermany(root)
    assert tasks.task_index(index, "pneumonia") is index
    for name in ("bacterial_vs_viral", "three_class"):
        with pytest.raises(DatasetLayoutError, match=r"scan_0001\.jpeg.*task 'pneumonia'"):
            tasks.task_index(index, name)


def test_index_without_subtypes_and_unknown_task_are_errors():
    import pandas as pd

    nih_like = pd.DataFrame({"path": ["a.png"], "label": [1], "patient": ["1"], "split": ["train"],
                             "source": ["nih"]})
    with pytest.raises(DatasetLayoutError, match="no subtype column"):
        tasks.task_index(nih_like, "three_class")
    with pytest.raises(ValueError, match="unknown task 'viral'.*bacterial_vs_viral"):
        tasks.get_task("viral")


def test_task_of_a_sidecar_defaults_to_pneumonia():
    assert tasks.task_of({}).name == "pneumonia"
    assert tasks.task_of({"task": "three_class"}).n_classes == 3


def test_class_weights_balance_three_classes():
    labels = np.array([0] * 6 + [1] * 3 + [2] * 1)
    weights = pipelines.class_weights(labels)
    assert sorted(weights) == [0, 1, 2]
    per_class_total = [weights[c] * np.sum(labels == c) for c in (0, 1, 2)]
    assert np.allclose(per_class_total, per_class_total[0])


def test_viral_pattern_is_bilateral_and_bacterial_focal():
    from synthetic import synthetic_xray

    size = 64
    normal, bacterial, viral = (
        synthetic_xray(label, np.random.default_rng(5), size, subtype)[..., 0].astype(float)
        for label, subtype in ((0, "bacteria"), (1, "bacteria"), (1, "virus"))
    )
    left, right = slice(0, size // 2), slice(size // 2, size)
    bacterial_excess, viral_excess = bacterial - normal, viral - normal
    assert bacterial_excess[:, right].sum() < 0.05 * bacterial_excess[:, left].sum()
    assert viral_excess[:, right].sum() > 0.5 * viral_excess[:, left].sum()
    assert viral_excess.max() < bacterial_excess.max()


def test_split_sentence_names_every_class_of_three(kermany_root):
    from pneumo_utils.explain import report

    index = splits.grouped_split(tasks.task_index(kermany.load_kermany(kermany_root), "three_class"),
                               val_fraction=0.25, seed=0)
    sentence = report.describe_split(index, class_names=tasks.get_task("three_class").class_names)
    test = index[index["split"] == "test"]
    counts = [int((test["label"] == k).sum()) for k in range(3)]
    assert (f"test: {len(test)} images ({counts[0]} NORMAL, {counts[1]} BACTERIAL PNEUMONIA, "
            f"{counts[2]} VIRAL PNEUMONIA) from {test['patient'].nunique()} patients") in sentence


def test_predicted_labels_threshold_or_argmax():
    assert tasks.predicted_labels(np.array([0.2, 0.7]), 0.5).tolist() == [0, 1]
    assert tasks.predicted_labels(np.array([[0.2], [0.7]]), 0.75).tolist() == [0, 0]
    assert tasks.predicted_labels(np.array([[0.2, 0.5, 0.3], [0.6, 0.3, 0.1]]), None).tolist() == [1, 0]
    with pytest.raises(ValueError, match="threshold"):
        tasks.predicted_labels(np.array([0.2]), None)
