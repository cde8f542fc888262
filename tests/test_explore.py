"""Original image sizes from file headers (explore.py), on generated files."""

from __future__ import annotations

import numpy as np
from PIL import Image

from pneumo_utils.data import explore
from pneumo_utils.explain import plots


def _write(path, size, mode="L"):
    width, height = size
    channels = {"L": (height, width), "RGB": (height, width, 3)}[mode]
    Image.fromarray(np.zeros(channels, dtype=np.uint8), mode=mode).save(path)
    return str(path)


def test_image_size_table_reads_headers(tmp_path):
    paths = [
        _write(tmp_path / "a.jpeg", (300, 200)),
        _write(tmp_path / "b.png", (64, 128), "RGB"),
    ]
    broken = tmp_path / "c.jpeg"
    broken.write_bytes(b"not an image")
    table = explore.image_size_table(paths + [str(broken)], labels=[0, 1, 1])
    assert list(table.columns) == ["path", "width", "height", "mode", "aspect", "class"]
    assert table.loc[0, ["width", "height", "mode"]].tolist() == [300, 200, "L"]
    assert table.loc[1, ["width", "height", "mode"]].tolist() == [64, 128, "RGB"]
    assert table.loc[0, "aspect"] == 1.5
    assert table.loc[2, "mode"] == "error" and np.isnan(table.loc[2, "width"])
    assert table["class"].tolist() == ["NORMAL", "PNEUMONIA", "PNEUMONIA"]


def test_size_summary_per_class_and_overall(tmp_path):
    paths = [_write(tmp_path / f"{i}.png", (100 + 10 * i, 100)) for i in range(4)]
    per_class = explore.size_summary(explore.image_size_table(paths, [0, 0, 1, 1]))
    assert list(per_class.index) == ["NORMAL", "PNEUMONIA"]
    assert per_class.loc["NORMAL", ("images", "count")] == 2
    assert per_class.loc["PNEUMONIA", ("width", "max")] == 130
    overall = explore.size_summary(explore.image_size_table(paths))
    assert overall.loc["all", ("images", "count")] == 4
    assert overall.loc["all", ("mode", "values")] == "L"
    figure = plots.image_size_histogram(explore.image_size_table(paths))
    assert figure.axes[0].get_xlabel() == "width (px)"


def test_image_size_table_on_kermany_layout(kermany_root):
    from pneumo_utils.data.kermany import load_kermany

    index = load_kermany(kermany_root)
    table = explore.image_size_table(index["path"], index["label"])
    assert len(table) == len(index)
    assert (table["mode"] != "error").all()
    assert (table["width"] > 0).all()
