"""The notebook runner with hostile metrics files and parameter values.

Each case runs ``python -m pneumo_utils.runner --profile none`` on a one-cell notebook written
under the case's folder. The metrics cases' notebook copies a prepared file to its metrics
JSON, so the time is the index page's reading it; the value cases must be refused before a
kernel starts.
"""

from __future__ import annotations

import json
from pathlib import Path

from hostile_inputs import Case

NOTEBOOK = """\
# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% tags=["parameters"]
reports_dir = "reports"
models_dir = "saved_models"
run_name = "01_hostile"
epochs = 1
max_images_per_class = None
image_size = 224

# %%
import shutil
from pathlib import Path

Path(reports_dir).mkdir(parents=True, exist_ok=True)
shutil.copyfile({source!r}, Path(reports_dir, f"{{run_name}}.metrics.json"))
"""


def _runner(folder: Path, *options: str, metrics: str = "{}") -> list[str]:
    """The runner's argv on a notebook that leaves ``metrics`` as its metrics JSON."""
    (folder / "nbs").mkdir()
    source = folder / "prepared.metrics.json"
    source.write_text(metrics, encoding="utf-8")
    (folder / "nbs" / "01_hostile.py").write_text(NOTEBOOK.format(source=str(source)), encoding="utf-8")
    return ["-m", "pneumo_utils.runner", "--profile", "none", "--notebooks-dir", str(folder / "nbs"),
            "--reports-dir", str(folder / "reports"), *options]


def _many_models(folder: Path) -> list[str]:
    roc = {"fpr": [i / 100 for i in range(101)], "tpr": [min(1.0, i / 50) for i in range(101)]}
    models = [{"name": f"model {i}", "task": "kermany", "validation": {"auc": 0.9},
               "test": {"auc": 0.9, "roc": roc}} for i in range(10_000)]
    return _runner(folder, metrics=json.dumps({"task": "kermany", "models": models}))


def _nested(folder: Path) -> list[str]:
    return _runner(folder, metrics="[" * 100_000 + "]" * 100_000)


def _value(setting: str):
    def build(folder: Path) -> list[str]:
        if setting.startswith("models_dir="):
            (folder / "taken").write_text("a file", encoding="utf-8")
            return _runner(folder, "--set", f"models_dir={folder / 'taken'}")
        return _runner(folder, "--set", setting)
    return build


CASES = [
    Case("runner", "metrics JSON with 10,000 models", _many_models),
    Case("runner", "metrics JSON of 100,000 nested arrays", _nested),
    *(Case("runner", f"--set {setting}", _value(setting))
      for setting in ("epochs=-1", "max_images_per_class=0", "image_size=16", "models_dir=<a file>",
                      "run_name=../../../outside/x")),
]
