"""Data folders that are in place but that the loaders would refuse (issue 22): the runner and
``pneumo fetch`` refuse them in one line before any kernel starts. Only file
names are made; nothing is decoded and nothing touches the network."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from pneumo_utils.data import fetch


def kermany(root: Path, empty: tuple[str, ...] = ()) -> Path:
    """A Kermany layout with one (undecodable) image per class folder, except ``empty`` ones."""
    for split in fetch.KERMANY_SPLITS:
        for cls in fetch.KERMANY_CLASSES:
            (root / split / cls).mkdir(parents=True)
            if f"{split}/{cls}" not in empty and "all" not in empty:
                (root / split / cls / "a.jpeg").write_bytes(b"x")
    return root


def nih(root: Path, images: int = 0) -> Path:
    """An NIH-sample layout: the label table and ``images/`` with ``images`` PNG names."""
    (root / "images").mkdir(parents=True)
    (root / "sample_labels.csv").write_text("Image Index,Finding Labels,Patient ID\n")
    for i in range(images):
        (root / "images" / f"{i:08d}_000.png").write_bytes(b"x")
    return root


@pytest.fixture()
def no_download(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any download attempt fails the test."""

    def refuse(handle: str) -> Path:
        raise AssertionError(f"tried to download {handle}")

    monkeypatch.setattr(fetch, "download", refuse)


def test_an_extra_class_folder_is_refused(tmp_path: Path) -> None:
    root = kermany(tmp_path / "k")
    (root / "train" / "COVID").mkdir()
    (root / "train" / "COVID" / "c.jpeg").write_bytes(b"x")
    with pytest.raises(fetch.LayoutError, match=r"train holds class folder\(s\) COVID besides NORMAL and PNEUMONIA"):
        fetch.locate("kermany", root)


@pytest.mark.parametrize(("empty", "message"), [
    (("all",), r"no images in any of \{train,val,test\}/\{NORMAL,PNEUMONIA\}"),
    (("val/NORMAL",), r"no images in val/NORMAL; every split needs both classes"),
])
def test_kermany_class_folders_without_images_are_refused(tmp_path: Path, empty, message) -> None:
    root = kermany(tmp_path / "k", empty)
    (root / "train" / "NORMAL" / ".DS_Store").write_bytes(b"x")  # not an image
    with pytest.raises(fetch.LayoutError, match=message):
        fetch.locate("kermany", root)


def test_nested_images_and_hidden_folders_pass(tmp_path: Path) -> None:
    root = kermany(tmp_path / "k", ("test/NORMAL",))
    (root / "test" / "NORMAL" / "scan1").mkdir()
    (root / "test" / "NORMAL" / "scan1" / "b.PNG").write_bytes(b"x")  # the loader indexes it, warning
    (root / "train" / ".ipynb_checkpoints").mkdir()
    (root / "train" / "__MACOSX").mkdir()
    assert fetch.locate("kermany", root) == root


def test_nih_table_without_images_is_refused(tmp_path: Path) -> None:
    root = nih(tmp_path / "nih_sample")
    (root / "images" / "notes.txt").write_text("x")
    with pytest.raises(fetch.LayoutError, match=r"label table but no images \(\*\.png\)"):
        fetch.locate("nih", root)
    (root / "images" / "00000001_000.png").write_bytes(b"x")
    assert fetch.locate("nih", root) == root


def test_a_broken_folder_in_data_is_refused_not_passed_over(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    kermany(repo / "data" / "chest_xray", ("all",))
    kermany(tmp_path / "shared" / "data" / "chest_xray")
    with pytest.raises(fetch.LayoutError, match=str(repo / "data" / "chest_xray")):
        fetch.locate("kermany", base=repo)


def test_find_all_says_a_layout_fault_in_one_line(tmp_path: Path, no_download) -> None:
    started = time.monotonic()
    with pytest.raises(fetch.LayoutError) as caught:
        fetch.find_all({"kermany": ["01_x"], "nih": ["02_nih"]},
                       {"kermany": str(kermany(tmp_path / "k", ("all",))), "nih": str(nih(tmp_path / "n", 3))})
    assert "\n" not in str(caught.value) and "fix the folder or give another one" in str(caught.value)
    assert time.monotonic() - started < 5


@pytest.mark.parametrize(("dataset", "make", "message"), [
    ("kermany", lambda p: kermany(p / "chest_xray", ("all",)), "holds no images in any of"),
    ("nih-sample", lambda p: nih(p / "nih_sample"), "holds its label table but no images"),
])
def test_fetch_does_not_call_an_empty_folder_in_place(tmp_path: Path, no_download, error_line,
                                                      dataset, make, message) -> None:
    folder = make(tmp_path)
    assert fetch.main([dataset, "--dest", str(tmp_path)]) == 2
    line = error_line()
    assert message in line and f"delete {folder} and run this again" in line


def test_fetch_still_accepts_a_complete_folder(tmp_path: Path, no_download, capsys) -> None:
    kermany(tmp_path / "chest_xray")
    nih(tmp_path / "nih_sample", 2)
    assert fetch.main(["kermany", "--dest", str(tmp_path)]) == 0
    assert fetch.main(["nih-sample", "--dest", str(tmp_path)]) == 0
    assert capsys.readouterr().out.count("already in place") == 2


def test_layout_suffixes_are_the_loaders_image_extensions() -> None:
    from pneumo_utils.data.images import IMAGE_EXTENSIONS

    assert set(fetch.LAYOUT_SUFFIXES) == set(IMAGE_EXTENSIONS)
