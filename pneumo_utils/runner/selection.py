"""Choosing the best model of each Kermany task, calibrating it on external validation, and
``best.json``.
"""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from pneumo_utils import files
from pneumo_utils.runner.index_page import BEST_TASK, git_commit, model_rows
from pneumo_utils.runner.plan import Notebook

EXTERNAL_RULE = ("highest AUC on the labelled external validation set (no weights or thresholds were "
                 "fitted on it; a notebook may have used it to choose between its own phases)")
"""How the best model is chosen when the models were scored on external validation. The
training-side selection score did not rank models the way a new site does (``RESULTS.md``),
so a labelled sample of the new site decides; the threshold is then calibrated on it."""


def choose_best(notebooks: Sequence[Notebook], task: str = BEST_TASK) -> dict | None:
    """The best model row of ``task``: highest AUC on external validation when the rows carry
    it (:data:`EXTERNAL_RULE`), else the highest ``selection_score``, else validation AUC
    (scores of different tasks do not compare, so each task has its own best). Rows whose
    weights are random (a fallback) or not recorded are out when the notebook asked for
    ImageNet weights. The row's ``rule`` and ``rule_data`` say what chose it, on which data."""
    notebook = {nb.name: nb for nb in notebooks}
    rows = [
        row
        for row in model_rows(notebooks)
        if row["task"] == task
        and row["model_path"]
        and Path(str(row["model_path"])).is_file()
        and not (row["weights"] in ("random initialisation", "not recorded")
                 and str(notebook[row["notebook"]].value("weights")).lower() == "imagenet")
    ]
    for key, rule, data in (
        ("external_auc", EXTERNAL_RULE, "external validation"),
        ("score", None, "validation images and their counterfactual copies"),
        ("val_auc_value", "validation AUC", "validation split"),
    ):
        ranked = [r for r in rows if r[key] is not None]
        if ranked:
            best = max(ranked, key=lambda r: r[key])
            best["best"] = True
            best["rule"] = rule or best["selection_rule"] or "selection score"
            best["rule_data"] = best["external_data"] if key == "external_auc" else data
            best["rule_value"] = best[key]
            return best
    return None


def choose_best_per_task(notebooks: Sequence[Notebook]) -> dict[str, dict]:
    """:func:`choose_best` for every Kermany task with a model, by task key."""
    tasks = sorted({row["task"] for row in model_rows(notebooks)})
    chosen = {task: choose_best(notebooks, task) for task in tasks if task.partition(":")[0] == BEST_TASK}
    return {task: best for task, best in chosen.items() if best is not None}


def best_file(task: str) -> str:
    """The pointer's file name: ``best.json`` for pneumonia vs normal, else ``best.<task>.json``."""
    return "best.json" if task == BEST_TASK else f"best.{task.partition(':')[2]}.json"


def calibrate_best(best: dict, external: Path) -> dict | None:
    """Calibrate the chosen model to the external validation set (``python -m
    pneumo_utils.evaluation.calibrate``, in its own process: TensorFlow stays out of the runner).

    Writes ``<stem>.calibrated.keras`` beside the model (threshold and temperature fitted on
    ``external``, the weights unchanged) and returns the calibration record, or ``None``
    (with one line on stderr) when calibration failed; the pointer then names the model as
    trained.
    """
    model = Path(str(best["model_path"]))
    out = model.with_name(f"{model.stem}.calibrated.keras")
    done = subprocess.run([sys.executable, "-m", "pneumo_utils.evaluation.calibrate", "--model", str(model), "--data",
                           str(external), "--out", str(out), "--json"], capture_output=True, text=True)
    if done.returncode != 0:
        reason = (done.stderr.strip().splitlines() or ["no message"])[-1]
        print(f"warning: {model.name} not calibrated to {external}: {reason}", file=sys.stderr)
        return None
    return {**json.loads(done.stdout), "model": str(out)}


def write_best(best: dict, models_dir: Path) -> Path:
    """``models_dir/`` :func:`best_file`: a small pointer to the chosen model (not a symlink).

    When ``best`` carries a ``calibration`` (:func:`calibrate_best`), the pointer names the
    calibrated copy and says what it was calibrated on; ``trained_model`` names the original.
    """
    calibration = best.get("calibration")
    model = Path(str(calibration["model"] if calibration else best["model_path"])).resolve()
    try:
        relative = model.relative_to(models_dir.resolve()).as_posix()
    except ValueError:
        relative = str(model)
    pointer = {
        "model": relative,
        "sidecar": str(Path(relative).with_suffix(".json")),
        "model_card": str(Path(relative).with_suffix(".md")),
        "name": best["name"],
        "task": best["task"],
        "notebook": best["notebook"],
        "weights": best["weights"],
        "selection_rule": best["rule"],
        "selection_data": best["rule_data"],
        "selection_value": best["rule_value"],
        **({"trained_model": Path(str(best["model_path"])).name,
            "calibration": {k: calibration[k] for k in ("data", "counts", "rule", "threshold", "temperature",
                                                          "after", "note", "warning") if k in calibration}}
           if calibration else {}),
        "chosen": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "commit": git_commit(),
    }
    path = models_dir / best_file(best["task"])
    if path.is_symlink():
        path.unlink()
    files.write_text_atomic(path, json.dumps(pointer, indent=2) + "\n")
    return path
