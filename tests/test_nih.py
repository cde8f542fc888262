"""NIH ChestX-ray14: label rule, table formats, missing images, balancing, patient split."""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import synthetic
from PIL import Image

from pneumo_utils.data import datasets, nih, splits
from pneumo_utils.data.datasets import DatasetLayoutError
from pneumo_utils.data.nih import MissingImagesError, MissingImagesWarning

NIH_HEADER = ["Image Index", "Finding Labels", "Follow-up #", "Patient ID"]


@pytest.fixture(scope="session")
def nih_root(tmp_path_factory) -> Path:
    """A synthetic NIH-style set: 60 patients, 3 table rows without an image file."""
    return synthetic.make_nih_like(tmp_path_factory.mktemp("nih"), n_patients=60, seed=0, n_missing=3)


def _write_table(folder: Path, rows: list[tuple[str, str, int]], name: str = "Data_Entry_2017.csv") -> Path:
    """An NIH table with one row per (image name, finding labels, patient id); no images."""
    folder.mkdir(parents=True, exist_ok=True)
    table = pd.DataFrame(
        [(image, labels, 0, patient) for image, labels, patient in rows], columns=NIH_HEADER
    )
    table.to_csv(folder / name, index=False)
    return folder / name


def _quiet_load(*args, **kwargs) -> pd.DataFrame:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MissingImagesWarning)
        return nih.load_nih(*args, **kwargs)


# --------------------------------------------------------------------------- label rule


LABEL_CASES = [
    ("No Finding", 0),
    ("Effusion|Pneumonia", 1),
    ("Pneumonia", 1),
    ("pneumonia", 1),
    ("Mass | PNEUMONIA", 1),
    ("Effusion", -1),
    ("Effusion|Infiltration", -1),
    ("Pneumonia_like", -1),  # a whole-label match, not a substring match
    ("Atelectasis|Pneumonia_like", -1),
    ("", -1),
]


def test_finding_labels_map_to_classes():
    labels = pd.Series([text for text, _ in LABEL_CASES])
    expected = [label for _, label in LABEL_CASES]
    assert nih.map_finding_labels(labels, "Pneumonia").tolist() == expected
    assert nih.map_finding_labels(labels, "  PNEUMONIA ").tolist() == expected
    effusion = nih.map_finding_labels(labels, "Effusion").tolist()
    assert effusion == [0, 1, -1, -1, -1, 1, 1, -1, -1, -1]
    with pytest.raises(ValueError, match="positive finding"):
        nih.map_finding_labels(labels, "No Finding")


def test_loader_applies_the_label_rule_to_a_generated_table(tmp_path):
    rows = [(f"{i + 1:08d}_000.png", text, i + 1) for i, (text, _) in enumerate(LABEL_CASES) if text]
    _write_table(tmp_path, rows)
    index = nih.load_nih(tmp_path, balance=False, require_images=False)
    expected = {f"{i + 1:08d}_000.png": label for i, (text, label) in enumerate(LABEL_CASES) if text and label >= 0}
    assert dict(zip(index["image"], index["label"], strict=True)) == expected
    assert list(index.columns[:5]) == datasets.INDEX_COLUMNS
    assert set(index["split"]) == {nih.UNASSIGNED} and set(index["source"]) == {"nih"}
    assert index["patient"].str.fullmatch(r"\d{8}").all()  # zero-padded like the file names
    assert index.loc[index["image"] == "00000002_000.png", "findings"].item() == "Effusion|Pneumonia"
    assert all(path.endswith(image) for path, image in zip(index["path"], index["image"], strict=True))
    steps = nih.load_steps(index)["rows"]
    assert steps["rows in table"] == 9 and steps["dropped: other findings only"] == 4
    assert steps["in the index"] == 5


def test_unknown_finding_lists_the_findings_in_the_table(tmp_path):
    _write_table(tmp_path, [("00000001_000.png", "No Finding", 1), ("00000002_000.png", "Mass|Effusion", 2)])
    with pytest.raises(ValueError, match=r"Pneumonia.*\['Effusion', 'Mass', 'No Finding'\]"):
        nih.load_nih(tmp_path, require_images=False)


# --------------------------------------------------------------------------- table formats


def test_nih_folder_and_csv_path_are_both_accepted(nih_root):
    from_folder = _quiet_load(nih_root, seed=1)
    from_csv = _quiet_load(nih_root / "Data_Entry_2017.csv", seed=1)
    pd.testing.assert_frame_equal(from_folder, from_csv)
    assert all(Path(p).is_file() for p in from_folder["path"])


def test_simple_path_label_csv_is_detected(tmp_path):
    rng = np.random.default_rng(0)
    (tmp_path / "img").mkdir()
    rows = []
    for i, label in enumerate(["NORMAL", "PNEUMONIA", "pneumonia", "0", "1", "normal"]):
        Image.fromarray(synthetic.synthetic_xray(int(i % 2), rng, 32)).save(tmp_path / "img" / f"x{i}.png")
        rows.append((f"img/x{i}.png", label))
    pd.DataFrame(rows, columns=["path", "label"]).to_csv(tmp_path / "labeled_images.csv", index=False)
    with pytest.warns(UserWarning, match="each image is treated as its own patient"):
        index = nih.load_nih(tmp_path / "labeled_images.csv")
    assert index["label"].tolist() == [0, 1, 1, 0, 1, 0]  # 3 and 3: balancing drops nothing
    assert index["path"].tolist() == [str(tmp_path / "img" / f"x{i}.png") for i in range(6)]
    assert set(index["source"]) == {"csv"} and index["patient"].nunique() == len(index)


def test_simple_csv_labels_and_patient_column(tmp_path):
    rng = np.random.default_rng(0)
    rows = []
    for i, label in enumerate([0, 1, 1, 0, 1, 0]):
        Image.fromarray(synthetic.synthetic_xray(label, rng, 32)).save(tmp_path / f"x{i}.png")
        rows.append((f"x{i}.png", label, f"p{i // 2}"))
    pd.DataFrame(rows, columns=["path", "label", "patient"]).to_csv(tmp_path / "labels.csv", index=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a patient column: no warning
        index = nih.load_nih(tmp_path, balance=False)
    assert index["label"].tolist() == [0, 1, 1, 0, 1, 0]
    assert index["patient"].tolist() == ["p0", "p0", "p1", "p1", "p2", "p2"]
    pd.DataFrame({"path": ["x0.png"], "label": ["maybe"]}).to_csv(tmp_path / "labels.csv", index=False)
    with pytest.raises(DatasetLayoutError, match="unknown label value.*maybe"):
        nih.load_nih(tmp_path)


def test_missing_columns_list_expected_and_found(tmp_path):
    pd.DataFrame({"Image Index": ["a.png"], "Finding Labels": ["No Finding"]}).to_csv(tmp_path / "t.csv", index=False)
    with pytest.raises(DatasetLayoutError) as info:
        nih.load_nih(tmp_path / "t.csv")
    message = str(info.value)
    assert "['Patient ID']" in message
    assert "expected ['Image Index', 'Finding Labels', 'Patient ID']" in message
    assert "found ['Image Index', 'Finding Labels']" in message
    pd.DataFrame({"file": ["a.png"], "y": [1]}).to_csv(tmp_path / "t.csv", index=False)
    with pytest.raises(DatasetLayoutError, match=r"expected \['path', 'label'\], found \['file', 'y'\]"):
        nih.load_nih(tmp_path / "t.csv")


def test_folder_without_or_with_ambiguous_csv(tmp_path):
    with pytest.raises(FileNotFoundError, match="fetch nih"):
        nih.load_nih(tmp_path / "nowhere")
    with pytest.raises(DatasetLayoutError, match="no labels CSV"):
        nih.load_nih(tmp_path)
    for name in ("a.csv", "b.csv"):
        pd.DataFrame({"path": ["x.png"], "label": [0]}).to_csv(tmp_path / name, index=False)
    with pytest.raises(DatasetLayoutError, match="several CSV files.*labels_csv"):
        nih.load_nih(tmp_path)


def test_kaggle_layout_images_0nn_folders(nih_root, tmp_path):
    root = tmp_path / "kaggle"
    for k, image in enumerate(sorted((nih_root / "images").iterdir())):
        folder = root / f"images_{k % 2 + 1:03d}" / "images"
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy(image, folder / image.name)
    shutil.copy(nih_root / "Data_Entry_2017.csv", root / "Data_Entry_2017.csv")
    assert _quiet_load(root, seed=0)["image"].tolist() == _quiet_load(nih_root, seed=0)["image"].tolist()


# --------------------------------------------------------------------------- missing images, balance


def test_missing_images_are_counted_in_one_warning(nih_root):
    with pytest.warns(MissingImagesWarning) as caught:
        index = nih.load_nih(nih_root, seed=0)
    assert len(caught) == 1
    message = str(caught[0].message)
    assert message.startswith("3 of ") and "00000061_000.png" in message
    assert nih.load_steps(index)["rows"]["dropped: image not on disk"] == 3
    assert not index["image"].isin(["00000061_000.png", "00000062_000.png", "00000063_000.png"]).any()


def test_missing_images_raise_in_error_mode(nih_root):
    with pytest.raises(MissingImagesError, match="3 of .* not on disk"):
        nih.load_nih(nih_root, on_missing="error")


def test_pure_table_mode_needs_no_images(nih_root):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        index = nih.load_nih(nih_root, balance=False, require_images=False)
    table = pd.read_csv(nih_root / "Data_Entry_2017.csv")
    assert len(index) == (nih.map_finding_labels(table["Finding Labels"]) >= 0).sum()
    assert index["image"].isin(["00000061_000.png"]).any()


def test_unreadable_image_is_reported(nih_root, tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(nih_root, root)
    victim = sorted((root / "images").iterdir())[0]
    victim.write_bytes(b"not a png")
    with pytest.warns(datasets.BadImagesWarning, match=victim.name):
        index = _quiet_load(root, balance=False)
    assert victim.name not in set(index["image"])


def test_balancing_is_seeded_and_balanced(nih_root):
    first = _quiet_load(nih_root, seed=3)
    again = _quiet_load(nih_root, seed=3)
    other = _quiet_load(nih_root, seed=4)
    unbalanced = _quiet_load(nih_root, balance=False)
    counts = first["label"].value_counts()
    assert counts[0] == counts[1] == (unbalanced["label"] == 1).sum()
    pd.testing.assert_frame_equal(first, again)
    assert set(first.loc[first["label"] == 0, "path"]) != set(other.loc[other["label"] == 0, "path"])
    assert set(first.loc[first["label"] == 1, "path"]) == set(other.loc[other["label"] == 1, "path"])


def test_finding_counts_on_disk(nih_root):
    everything = nih.finding_counts(nih_root)
    on_disk = nih.finding_counts(nih_root, on_disk_only=True)
    assert everything.loc["Pneumonia", "images"] == on_disk.loc["Pneumonia", "images"] + 2
    assert (on_disk["patients"] <= on_disk["images"]).all()


# --------------------------------------------------------------------------- patient split


def _toy_index(n_patients: int, positive_every: int = 3, per_patient: int = 3) -> pd.DataFrame:
    rows = []
    for p in range(n_patients):
        for k in range(per_patient):
            label = int(p % positive_every == 0 and k < 2)  # positive patients also have a normal image
            rows.append((f"/x/{p:08d}_{k:03d}.png", label, f"{p:08d}", "unassigned", "toy"))
    return pd.DataFrame(rows, columns=datasets.INDEX_COLUMNS)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_patient_split_is_leak_free_stratified_and_seeded(seed):
    index = _toy_index(300)
    split = splits.patient_split(index, test_fraction=0.2, val_fraction=0.15, seed=seed)
    splits.assert_no_patient_leak(split)
    assert set(split["split"]) == {"train", "val", "test"}
    patients = split.groupby("split")["patient"].nunique() / 300
    assert patients["test"] == pytest.approx(0.2, abs=0.02) and patients["val"] == pytest.approx(0.15, abs=0.02)
    positive_share = split.groupby("split")["label"].mean()
    assert (abs(positive_share - index["label"].mean()) < 0.05).all()
    pd.testing.assert_frame_equal(split, splits.patient_split(index, 0.2, 0.15, seed=seed))


def test_patient_split_on_synthetic_nih(nih_root):
    split = splits.patient_split(_quiet_load(nih_root, seed=0), 0.2, 0.2, seed=0)
    splits.assert_no_patient_leak(split)
    counts = split.groupby(["split", "label"]).size()
    assert (counts >= 2).all() and len(counts) == 6


def test_nih_shards_hold_the_notebooks_split_and_their_finding(nih_root, tmp_path):
    """Notebook 02 reads the same images, labels, patients and splits from shards written by
    shard_writer.load_index as from the folder (load_nih, then patient_split), and refuses shards
    of another finding."""
    pytest.importorskip("tensorflow")
    from pneumo_utils.scale import shard_reader, shard_writer

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MissingImagesWarning)
        source, rule = shard_writer.load_index(nih_root, kind="nih", finding="Pneumonia",
                                               val_fraction=0.2, test_fraction=0.2, seed=3)
    shard_writer.write_shards(source, tmp_path, data_root=nih_root, image_size=32, split_rule=rule, verbose=False)
    read, read_rule = shard_reader.read_split_index(tmp_path, finding="pneumonia")
    assert read_rule == rule
    folder = splits.patient_split(_quiet_load(nih_root, finding="Pneumonia", seed=3), 0.2, 0.2, seed=3)
    columns = ["path", "label", "patient", "split"]
    by_path = folder.assign(path=folder["path"].map(str))[columns].sort_values("path").reset_index(drop=True)
    pd.testing.assert_frame_equal(read[columns].sort_values("path").reset_index(drop=True), by_path,
                                  check_dtype=False)
    kept = splits.subsample(read, 4, seed=3)
    assert sorted(kept["path"]) == sorted(map(str, splits.subsample(folder, 4, seed=3)["path"]))
    with pytest.raises(ValueError, match="hold 'Pneumonia' against No Finding, not 'Effusion'"):
        shard_reader.read_split_index(tmp_path, finding="Effusion")


def test_too_few_positives_is_a_clear_error():
    index = _toy_index(40, positive_every=10)  # 4 positive patients, 8 positive images
    with pytest.raises(splits.TooFewPositivesError) as info:
        splits.patient_split(index, 0.2, 0.15, seed=0)
    message = str(info.value)
    assert "only 8 positive image(s) from 4 patient(s)" in message
    assert "at least 10 positive patients" in message and "Effusion" in message
    index = _toy_index(40, positive_every=3)
    with pytest.raises(splits.TooFewPositivesError, match=r"too few images of a class \(.*positive"):
        splits.patient_split(index, 0.2, 0.15, seed=0, min_per_split=10)
    with pytest.raises(ValueError, match="sum to less than 1"):
        splits.patient_split(index, 0.6, 0.5)


# --------------------------------------------------------------------------- synthetic data


def test_make_nih_like_names_columns_and_signal(nih_root):
    table = pd.read_csv(nih_root / "Data_Entry_2017.csv")
    assert tuple(table.columns) == synthetic.NIH_TABLE_COLUMNS
    assert table["Image Index"].str.fullmatch(r"\d{8}_\d{3}\.png").all()
    assert (table["Image Index"].str[:8].astype(int) == table["Patient ID"]).all()
    labels = set(table["Finding Labels"])
    assert {"No Finding", "Effusion"} <= labels and any("|" in s and "Pneumonia" in s for s in labels)
    on_disk = {p.name for p in (nih_root / "images").iterdir()}
    assert len(table) - len(on_disk) == 3
    # the planted opacity: Pneumonia images are brighter inside SIGNAL_BOX than outside it
    y0, x0, y1, x1 = (int(v * 64) for v in synthetic.SIGNAL_BOX)
    contrast = {0: [], 1: []}
    for name, text in zip(table["Image Index"], table["Finding Labels"], strict=True):
        if name in on_disk:
            gray = np.asarray(Image.open(nih_root / "images" / name).convert("L"), dtype=float)
            label = int("Pneumonia" in text.split("|"))
            contrast[label].append(gray[y0:y1, x0:x1].mean() - gray[y0:y1, 64 - x1:64 - x0].mean())
    assert np.mean(contrast[1]) > np.mean(contrast[0]) + 5


def test_synthetic_cli_nih(tmp_path, capsys):
    assert synthetic.main([str(tmp_path / "n"), "--kind", "nih", "--patients", "10", "--seed", "1"]) == 0
    assert "row(s) without an image file" in capsys.readouterr().out
    assert (tmp_path / "n" / "Data_Entry_2017.csv").is_file()
    assert len(list((tmp_path / "n" / "images").glob("*.png"))) >= 10


# --------------------------------------------------------------------------- the real NIH table


@pytest.fixture(scope="module")
def nih_table(shared_dir) -> Path:
    path = shared_dir / "data" / "nih" / "Data_Entry_2017_v2020.csv.gz"
    if not path.is_file():
        pytest.skip(f"{path} not found")
    return path


def test_full_table_counts_match_pandas(nih_table):
    table = pd.read_csv(nih_table)
    assert len(table) == 112_120
    lists = table["Finding Labels"].str.split("|")
    pneumonia = lists.map(lambda labels: "Pneumonia" in labels)
    normal = table["Finding Labels"] == "No Finding"
    assert pneumonia.sum() == 1_431 and normal.sum() == 60_361

    index = nih.load_nih(nih_table, balance=False, require_images=False)
    counts = index["label"].value_counts()
    assert counts[1] == pneumonia.sum() and counts[0] == normal.sum()
    patients = index.groupby("label")["patient"].nunique()
    assert patients[1] == table.loc[pneumonia, "Patient ID"].nunique()
    assert patients[0] == table.loc[normal, "Patient ID"].nunique()
    rule = nih.label_rule_counts(nih_table, ["Pneumonia"]).loc["Pneumonia"]
    assert rule["positive images"] == 1_431 and rule["No Finding images"] == 60_361

    split = splits.patient_split(index, test_fraction=0.2, val_fraction=0.15, seed=0)
    splits.assert_no_patient_leak(split)
    assert split.groupby("patient")["split"].nunique().max() == 1
    share = split.groupby("split")["patient"].nunique() / index["patient"].nunique()
    assert share["test"] == pytest.approx(0.2, abs=0.01)


def test_real_images_too_few_pneumonia_but_enough_effusion(nih_table):
    root = nih_table.parent
    with pytest.warns(MissingImagesWarning, match="not on disk"):
        pneumonia = nih.load_nih(root, seed=0, check_images=False)
    assert (pneumonia["label"] == 1).sum() == 11
    with pytest.raises(splits.TooFewPositivesError, match="only 11 positive image"):
        splits.patient_split(pneumonia, 0.2, 0.15, seed=42)
    effusion = _quiet_load(root, finding="Effusion", seed=42, check_images=False)
    assert (effusion["label"] == 1).sum() == (effusion["label"] == 0).sum() == 170
    splits.assert_no_patient_leak(splits.patient_split(effusion, 0.2, 0.15, seed=42))
