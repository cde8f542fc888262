"""One reader for the NIH images, folder or shards (``scale.storage.open_nih``): the same
rows, labels and split, the same pixels, whichever storage the notebook is given."""

from __future__ import annotations

import numpy as np
import pytest
from synthetic import make_nih_like

from pneumo_utils.scale import storage

SPLIT = {"test_fraction": 0.2, "val_fraction": 0.2, "seed": 0}


@pytest.fixture(scope="module")
def nih_root(tmp_path_factory):
    return make_nih_like(tmp_path_factory.mktemp("nih"), n_patients=40, image_size=32, seed=0)


def test_folder_and_shards_give_the_same_index_and_images(nih_root, tmp_path) -> None:
    folder = storage.open_nih(data_dir=nih_root, shards_dir=None, finding="Pneumonia", image_size=32, **SPLIT)
    index = folder.index(**SPLIT)
    assert folder.shards_dir is None and folder.class_names == ("NO FINDING", "PNEUMONIA")
    assert folder.missing_images == 3 and folder.steps is not None and folder.balanced
    assert set(index["split"]) == {"train", "val", "test"}

    shards = storage.open_nih(data_dir=nih_root, shards_dir=tmp_path / "shards", finding="Pneumonia",
                              image_size=32, **SPLIT)  # written from the folder on first use
    rows = shards.index(**SPLIT)
    assert shards.table.startswith(str(tmp_path / "shards")) and shards.missing_images is None
    by_path = index.set_index("path").sort_index()
    read = rows.set_index("path").sort_index()
    assert list(read.index) == list(by_path.index)
    assert (read["label"] == by_path["label"]).all() and (read["split"] == by_path["split"]).all()

    some = rows[rows["split"] == "test"].head(3)
    from_shards = shards.images(some, 32)
    from_files = folder.images(some, 32)
    assert from_shards.shape == (3, 32, 32, 3)
    assert np.abs(from_shards - from_files).mean() < 4.0  # resized once more and re-encoded: a few grey levels
    assert np.corrcoef(from_shards.ravel(), from_files.ravel())[0, 1] > 0.9  # the same pictures

    again = storage.open_nih(data_dir=None, shards_dir=tmp_path / "shards", finding="Pneumonia",
                             image_size=32, **SPLIT)  # complete shards: read alone
    assert again.data_dir is None and len(again.index(**SPLIT)) == len(rows)
