"""Indexing Kermany-layout folders: patient ids, layout errors, skipped files."""

from __future__ import annotations

import shutil

import pytest

from pneumo_utils.data.datasets import BadImagesWarning, DatasetLayoutError, require_columns
from pneumo_utils.data.kermany import (
    find_kermany_root,
    kermany_patient_id,
    load_class_folder,
    load_kermany,
)


@pytest.mark.parametrize(
    ("name", "patient"),
    [
        ("person1946_bacteria_4874.jpeg", "person1946"),
        ("person1004_virus_1686.jpeg", "person1004"),
        ("IM-0117-0001.jpeg", "IM-0117"),
        ("NORMAL2-IM-1427-0001.jpeg", "NORMAL2-IM-1427"),
        ("/a/b/NORMAL2-IM-1427-0002.jpeg", "NORMAL2-IM-1427"),
        ("scan_42.png", "scan_42"),
    ],
)
def test_kermany_patient_id(name, patient):
    assert kermany_patient_id(name) == patient


def test_normal_and_normal2_are_different_patients():
    assert kermany_patient_id("IM-0001-0001.jpeg") != kermany_patient_id("NORMAL2-IM-0001-0001.jpeg")


def test_load_kermany_index(kermany_root):
    index = load_kermany(kermany_root)
    assert list(index.columns) == ["path", "label", "patient", "split", "source", "subtype"]
    assert set(index["split"]) == {"train", "val", "test"}
    assert set(index["label"]) == {0, 1}
    assert (index[index["path"].str.contains("/PNEUMONIA/")]["label"] == 1).all()
    assert index["patient"].str.match(r"^(person\d+|IM-\d+|NORMAL2-IM-\d+)$").all()


def test_nested_download_root_is_found(kermany_root, tmp_path):
    nested = tmp_path / "download" / "chest_xray" / "chest_xray"
    shutil.copytree(kermany_root, nested)
    (tmp_path / "download" / "__MACOSX" / "train").mkdir(parents=True)
    assert find_kermany_root(tmp_path / "download") == nested


def test_missing_root_says_what_to_do(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist.*fetch"):
        load_kermany(tmp_path / "nowhere")


def test_missing_split_names_the_folder(kermany_root, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(kermany_root, root)
    shutil.rmtree(root / "val")
    with pytest.raises(DatasetLayoutError, match=r"missing split folder .*val"):
        load_kermany(root)


def test_empty_class_folder_names_the_folder(kermany_root, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(kermany_root, root)
    shutil.rmtree(root / "test" / "NORMAL")
    (root / "test" / "NORMAL").mkdir()
    (root / "test" / "NORMAL" / ".DS_Store").write_bytes(b"\0\0")
    with pytest.raises(DatasetLayoutError, match=r"test/NORMAL has no readable images"):
        load_kermany(root)


def test_unknown_class_folder_is_an_error(kermany_root, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(kermany_root, root)
    (root / "train" / "COVID").mkdir()
    with pytest.raises(DatasetLayoutError, match=r"unknown class folder.*COVID"):
        load_kermany(root)


def test_non_image_and_corrupt_files_are_skipped_and_counted(kermany_root, tmp_path):
    folder = tmp_path / "test"
    shutil.copytree(kermany_root / "test", folder)
    n_before = len(load_class_folder(folder))
    for name in (".DS_Store", "Thumbs.db", "notes.txt"):
        (folder / "NORMAL" / name).write_text("x")
    (folder / "PNEUMONIA" / "person9999_virus_1.jpeg").write_bytes(b"")
    with pytest.warns(UserWarning) as caught:
        index = load_class_folder(folder)
    messages = [str(w.message) for w in caught]
    assert len(index) == n_before
    assert any("skipped 3 non-image file(s)" in m for m in messages)
    assert any(issubclass(w.category, BadImagesWarning) and "person9999_virus_1.jpeg" in str(w.message)
               for w in caught)
    with pytest.raises(DatasetLayoutError, match="1 unreadable image"):
        load_class_folder(folder, on_bad_image="error")


def test_require_columns_lists_expected_and_found():
    import pandas as pd

    with pytest.raises(DatasetLayoutError, match=r"missing column\(s\) \['Patient ID'\].*found \['a'\]"):
        require_columns(pd.DataFrame({"a": [1]}), ["a", "Patient ID"], "labels.csv")


def test_patients_of_follows_paths_and_labels_order(kermany_root):
    from pneumo_utils.data.datasets import paths_and_labels, patients_of

    index = load_kermany(kermany_root)
    paths, _ = paths_and_labels(index, "test")
    patients = patients_of(index, "test")
    assert [kermany_patient_id(p) for p in paths] == list(patients)
