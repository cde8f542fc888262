"""``index.html``: one models table per task, ROC curves, the run's facts; kept true after
each notebook.
"""

from __future__ import annotations

import datetime as dt
import importlib.metadata
import importlib.resources
import json
import math
import re
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pneumo_utils import files
from pneumo_utils.runner.plan import Notebook, outputs

BEST_TASK = "kermany"
"""The metrics ``task`` of Kermany pneumonia vs normal; other Kermany tasks are ``kermany:<task>``."""
TEMPLATES = Path(__file__).with_name("templates")


DISCLAIMER = "Research use only: not for diagnostic use."


TEST_METRICS = ("auc", "sensitivity", "specificity", "accuracy", "balanced_accuracy", "macro_f1")
"""Test metrics on the index: binary tables show the first four; three-class tables the AUC
(macro one-vs-rest), accuracy, balanced accuracy and macro F1."""


LIBRARIES = ("tensorflow", "tensorflow-cpu", "keras", "numpy", "scikit-learn", "papermill")


MAX_ROC_POINTS = 500
"""Most points drawn per ROC curve on the index (about two per pixel of its axes)."""

MAX_ROC_CURVES = 20
"""Most ROC curves in one figure: the first rows of its table (the legend of more is
unreadable, and each curve costs scikit-learn's display about 50 ms)."""


def number(value: Any) -> float | None:
    """``value`` as a finite float, else None."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def fmt(value: Any, ci: Any = None) -> str:
    """``0.900 (0.850-0.940)`` for a metric with its CI; a dash when missing."""
    x = number(value)
    if x is None:
        return "–" if value is None else str(value)
    text = f"{x:.3f}"
    if isinstance(ci, list | tuple) and len(ci) == 2 and all(number(c) is not None for c in ci):
        text += f" ({ci[0]:.3f}–{ci[1]:.3f})"
    return text


def model_entries(metrics: dict | None) -> list[dict]:
    """The model entries of a metrics JSON (its ``models`` list, else the record itself)."""
    if not isinstance(metrics, dict):
        return []
    models = metrics.get("models")
    if isinstance(models, list):
        return [m for m in models if isinstance(m, dict)]
    return [metrics]


def task_key(value: Any) -> str:
    """A metrics ``task`` as the index groups it: ``kermany`` (pneumonia vs normal),
    ``kermany:<task>``, or as written (``nih:<finding>``); a bare Kermany task name, as a
    sidecar writes it, counts as that Kermany task."""
    from pneumo_utils.data.tasks import DEFAULT_TASK, TASKS

    text = str(value or BEST_TASK)
    name = text.removeprefix(f"{BEST_TASK}:")
    if name in TASKS:
        return BEST_TASK if name == DEFAULT_TASK else f"{BEST_TASK}:{name}"
    return text


def task_title(task: str) -> str:
    """A task key in words, the title of its table on the index."""
    from pneumo_utils.data.tasks import DEFAULT_TASK, TASKS

    source, _, name = task.partition(":")
    if source == BEST_TASK and (name or DEFAULT_TASK) in TASKS:
        return f"Kermany: {TASKS[name or DEFAULT_TASK].description}"
    if source == "nih" and name:
        return f"NIH ChestX-ray14: {name} vs no {name}"
    return task


def weights_label(weights: Any) -> str:
    """How a model entry's ``weights`` reads on the index: random, ImageNet (file) or as given."""
    text = str(weights).strip()
    if weights is None or text.lower().startswith(("random", "none")):
        return "random initialisation"
    return f"ImageNet ({Path(text).name})" if text.endswith(".h5") else text


def model_row(nb: Notebook, entry: dict) -> dict[str, Any]:
    """One model entry, formatted for the index and the report summary."""
    metrics = nb.metrics or {}
    test = entry.get("test") if isinstance(entry.get("test"), dict) else {}
    validation = entry.get("validation") if isinstance(entry.get("validation"), dict) else {}
    external = entry.get("external") if isinstance(entry.get("external"), dict) else {}
    classes = entry.get("class_names") or metrics.get("class_names")
    positive = entry.get("positive_class") or (" / ".join(map(str, classes)) if classes else "–")
    weights = weights_label(entry["weights"]) if "weights" in entry else "not recorded"
    return {
        "notebook": nb.name,
        "name": str(entry.get("name") or entry.get("title") or entry.get("backbone") or nb.name),
        "backbone": str(entry.get("backbone") or metrics.get("backbone") or ""),
        "weights": weights,
        "random_weights": weights == "random initialisation",
        "positive_class": str(positive),
        "task": task_key(entry.get("task") or metrics.get("task")),
        "argmax": (entry.get("decision") or metrics.get("decision")) == "argmax",
        "test": {m: fmt(test.get(m), test.get(f"{m}_ci")) for m in TEST_METRICS},
        "external": {m: fmt(external.get(m), external.get(f"{m}_ci")) for m in TEST_METRICS} if external else None,
        "external_auc": number(external.get("auc")),
        "test_auc_value": number(test.get("auc")),
        "external_data": str(external.get("data") or ""),
        "threshold": fmt(entry.get("threshold")),
        "threshold_rule": str(entry.get("threshold_rule") or metrics.get("threshold_rule") or ""),
        "val_auc": fmt(validation.get("auc", entry.get("val_auc"))),
        "score": number(entry.get("selection_score")),
        "selection_score": fmt(entry.get("selection_score")) if number(entry.get("selection_score")) is not None else "",
        "selection_rule": str(entry.get("selection_rule") or ""),
        "val_auc_value": number(validation.get("auc", entry.get("val_auc"))),
        "model_path": entry.get("model_path"),
        "roc": test.get("roc") or entry.get("roc"),
        "external_roc": external.get("roc"),
        "external_figures": external,
        "test_figures": test,
        "external_cells": figures_line(external, TEST_METRICS),
        "screening": screening_cell(entry, external),
        "best": False,
    }


def screening_cell(entry: dict, external: dict) -> list[str]:
    """What a model entry says about what it does not know, one short line each: the share of
    each set beyond its input check's limits, the site-shift test of the external validation
    set, and what its uncertain band does there. Empty for a model without them."""
    lines = []
    screening = entry.get("screening") if isinstance(entry.get("screening"), dict) else {}
    flagged = screening.get("flagged") if isinstance(screening.get("flagged"), dict) else {}
    shares = [f"{str(name)[:40]} {flagged[name]:.1%}" for name in list(flagged)[:6] if number(flagged[name]) is not None]
    if shares:
        lines.append("beyond the input check: " + ", ".join(shares))
    elif "screening" in entry:
        lines.append("no input check")
    shift = screening.get("site_shift") if isinstance(screening.get("site_shift"), dict) else {}
    if number(shift.get("p_value")) is not None:
        lines.append(f"site shift of external validation: p = {shift['p_value']:.3g}; {str(shift.get('verdict', ''))[:200]}")
    selective = external.get("selective") if isinstance(external.get("selective"), dict) else {}
    if number(selective.get("coverage")) is not None and number(selective.get("accuracy_confident")) is not None:
        lines.append(f"uncertain band (chosen on validation) on external validation: {selective['coverage']:.1%} "
                     f"decided, {selective['accuracy_confident']:.3f} accurate")
    return lines


HEADLINE_METRICS = ("auc", "accuracy", "sensitivity", "specificity")
HEADLINE_ARGMAX = ("auc", "accuracy", "balanced_accuracy", "macro_f1")


def figures_line(figures: Any, names: Sequence[str]) -> list[dict[str, str]]:
    """``[{name, value, ci}]`` for the metrics of ``figures`` that are numbers: compact cells
    with the 95% CI for a tooltip."""
    if not isinstance(figures, dict):
        return []
    cells = []
    for name in names:
        value = number(figures.get(name))
        if value is None:
            continue
        ci = figures.get(f"{name}_ci")
        ci_text = (f"95% CI {ci[0]:.3f}–{ci[1]:.3f}" if isinstance(ci, list | tuple) and len(ci) == 2
                   and all(number(c) is not None for c in ci) else "")
        cells.append({"name": name.replace("_", " "), "value": f"{value:.3f}", "ci": ci_text})
    return cells


def headlines(rows: Sequence[dict], best: dict[str, dict]) -> list[dict[str, Any]]:
    """What the index opens with, per task: the recommended model (the task's best, else the
    model with the highest external-validation AUC) and its external-validation figures first,
    zero-shot at its own decision rule and, when the runner calibrated it on that set, after
    calibration (in-sample), then its same-source test figures, labelled as such."""
    out = []
    for task in sorted({row["task"] for row in rows}):
        mine = [row for row in rows if row["task"] == task]
        chosen = best.get(task)
        row = next((r for r in mine if chosen and (r["notebook"], r["name"]) == (chosen["notebook"], chosen["name"])), None)
        how = f"best by {chosen['rule']}" if row is not None else ""
        if row is None:
            scored = [r for r in mine if r["external_auc"] is not None]
            row = max(scored, key=lambda r: r["external_auc"]) if scored else max(
                mine, key=lambda r: r["val_auc_value"] if r["val_auc_value"] is not None else -1)
            how = ("the highest external-validation AUC of this run" if scored
                   else "the highest validation AUC (no external validation set)")
        names = HEADLINE_ARGMAX if row["argmax"] else HEADLINE_METRICS
        calibration = (chosen or {}).get("calibration") if row is not None else None
        out.append({
            "title": task_title(task),
            "name": row["name"], "notebook": row["notebook"], "how": how,
            "external": figures_line(row["external_figures"], names),
            "external_data": row["external_data"],
            "decision": "argmax" if row["argmax"] else f"threshold {row['threshold']} chosen on validation",
            "calibrated": figures_line(calibration.get("after"), names) if isinstance(calibration, dict) else [],
            "calibrated_rule": str(calibration.get("rule", "")) if isinstance(calibration, dict) else "",
            "test": figures_line(row["test_figures"], names),
        })
    return out


def model_rows(notebooks: Sequence[Notebook]) -> list[dict[str, Any]]:
    """Every model entry of the notebooks' metrics, as :func:`model_row` rows."""
    return [model_row(nb, e) for nb in notebooks for e in model_entries(nb.metrics)]


def report_summary(nb: Notebook) -> dict[str, Any]:
    """What a notebook report opens with: title, data split, each model's headline numbers."""
    metrics = nb.metrics or {}
    return {
        "title": str(metrics.get("title") or nb.name),
        "data": str(metrics.get("data") or ""),
        "models": model_rows([nb]),
        "error": nb.error,
        "index_href": "index.html",
        "disclaimer": DISCLAIMER,
    }


def git_commit() -> str:
    """The repository's commit (``+`` when the tree has changes), or ``unknown``."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + ("+" if dirty else "")


def library_versions() -> dict[str, str]:
    """Versions of Python and the libraries that shape the results."""
    versions = {"python": sys.version.split()[0]}
    for name in LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


ROC_SPLITS = {"test": ("roc", "test_auc_value", "test split"),
              "external": ("external_roc", "external_auc", "external validation")}
"""Per split: the rows' key of its ROC points, the key of its AUC, and its axis label."""


def roc_figure(rows: Sequence[dict], key: str, split: str = "test") -> str | None:
    """The ROC curves of ``rows`` on ``split`` (``"test"`` or ``"external"``, see
    :data:`ROC_SPLITS`) as one inline SVG figure, or None when no row carries ROC points.

    Each row's ROC points hold ``fpr`` and ``tpr``, lists of rates in 0..1 of equal length;
    pairs with a missing or non-finite rate are dropped, and a curve of more than
    :data:`MAX_ROC_POINTS` points keeps every k-th (the figure is 3 inches wide, so more
    points only lengthen ``index.html``). The first :data:`MAX_ROC_CURVES` rows with points
    are drawn. Curves are drawn by scikit-learn's
    ``RocCurveDisplay`` with the chance diagonal, each labelled with the row's name and
    AUC on that split. The figure is a ``matplotlib.figure.Figure`` that pyplot never holds, so no
    backend is chosen and nothing stays open; text stays text (``svg.fonttype: none``), and
    ``key`` (the table's task) and ``split`` seed the ids that the figure's elements refer to, so that
    several figures on one page share none; the XML prologue and the ids of groups (numbered
    alike in every figure, referred to by nothing) are dropped for inlining in HTML.
    """
    points, auc, label = ROC_SPLITS[split]
    curves = []
    for row in rows:
        if len(curves) == MAX_ROC_CURVES:
            break
        roc = row.get(points)
        if not isinstance(roc, dict) or not isinstance(roc.get("fpr"), list) or not isinstance(roc.get("tpr"), list):
            continue
        pairs = [(f, t) for f, t in zip(roc["fpr"], roc["tpr"], strict=False) if number(f) is not None and number(t) is not None]
        if pairs:
            step = -(-len(pairs) // MAX_ROC_POINTS)
            curves.append((pairs[::step] + pairs[-1:] if step > 1 else pairs, row))
    if not curves:
        return None
    from io import StringIO

    import matplotlib
    import numpy as np
    from matplotlib.figure import Figure
    from sklearn.metrics import RocCurveDisplay

    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": f"roc-{key}-{split}",
                                "font.sans-serif": ["DejaVu Sans", "Helvetica", "Arial"]}):
        figure = Figure(figsize=(7, 3.2))
        ax = figure.add_subplot()
        for i, (pairs, row) in enumerate(curves):
            fpr, tpr = np.array(pairs, dtype=np.float64).T
            name = row["name"].replace("$", r"\$")  # a $ pair would be read as mathematics
            RocCurveDisplay(fpr=fpr, tpr=tpr, roc_auc=row.get(auc),
                            name=f" {name}" if name.startswith("_") else name,  # legends skip "_" names
                            ).plot(ax=ax, plot_chance_level=i == 0)
        ax.set(xlabel=f"false positive rate ({label})", ylabel="true positive rate",
               xlim=(-0.01, 1.01), ylim=(-0.01, 1.01), aspect="equal")
        ax.legend(loc="center left", bbox_to_anchor=(1.03, 0.5), frameon=False)
        svg = StringIO()
        figure.savefig(svg, format="svg", bbox_inches="tight",
                       metadata={"Date": None, "Creator": None, "Format": None, "Type": None})
    text = svg.getvalue()
    return re.sub(r'<g id="[^"]*"', "<g", text[text.index("<svg"):])


def model_tables(rows: Sequence[dict], best: dict[str, dict]) -> list[dict]:
    """The index's models tables: one per task, ordered by task key (Kermany's first), the
    best row of each marked; a table is three-class when any of its models decides by argmax."""
    tables = []
    for task in sorted({row["task"] for row in rows}):
        mine = [row for row in rows if row["task"] == task]
        chosen = best.get(task)
        for row in mine:
            row["best"] = chosen is not None and (row["notebook"], row["name"]) == (chosen["notebook"], chosen["name"])
        tables.append({
            "title": task_title(task),
            "argmax": any(row["argmax"] for row in mine),
            "models": mine,
            "best": chosen and {"rule": chosen["rule"], "pointer": chosen["pointer"],
                                "data": chosen.get("rule_data", ""),
                                "calibrated": Path(chosen["calibration"]["model"]).name
                                if chosen.get("calibration") else None},
            "roc": roc_figure(mine, task),
            "external_roc": roc_figure(mine, task, split="external"),
        })
    return tables


def write_index(notebooks: Sequence[Notebook], reports_dir: Path, run: dict, best: dict[str, dict]) -> None:
    """Write ``index.html`` and ``summary.json`` from what is on disk now (atomically).

    ``best`` maps task keys to the rows :func:`write_best` recorded (with their ``pointer``).
    """
    import jinja2

    rows = model_rows(notebooks)
    listing = []
    for nb in notebooks:
        paths = outputs(nb, reports_dir)
        listing.append({
            "name": nb.name,
            "of": nb.of,
            "status": nb.status,
            "seconds": f"{nb.seconds:.0f}" if nb.status in ("ok", "failed") else "",
            "error": "; ".join(filter(None, [nb.error, nb.metrics_problem and f"metrics not shown: {nb.metrics_problem}"])),
            "parameters": {k: json.dumps(v) for k, v in nb.parameters.items()},
            **{k: paths[k].name if paths[k].is_file() else None for k in ("html", "code_html", "ipynb")},
        })
    done = [nb for nb in notebooks if nb.status in ("ok", "failed")]
    runs = sum(nb.of is not None for nb in notebooks)
    summary = (
        f"{len(notebooks) - runs} notebook(s) and {runs} profile run(s) of them: "
        f"{sum(nb.status == 'ok' for nb in notebooks)} ran, "
        f"{sum(nb.status == 'failed' for nb in notebooks)} failed, {len(notebooks) - len(done)} not finished. "
        f"They trained {len(rows)} model(s) "
        f"({sum(r['random_weights'] for r in rows)} of them from random weights) "
        "and tested each once on a held-out split, deciding at a threshold chosen on validation data "
        "(binary tasks) or by the most probable class (three classes)."
    )
    leads = headlines(rows, best) if rows else []
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(TEMPLATES)), autoescape=True)
    page = env.get_template("index.html.j2").render(
        run={**run, "summary": summary},
        notebooks=listing,
        tables=model_tables(rows, best),
        headlines=leads,
        best_note=run.get("best_note"),
        settings=run["settings"],
        versions=library_versions(),
        disclaimer=DISCLAIMER,
    )
    files.write_text_atomic(reports_dir / "index.html", page)
    record = {
        "state": run["state"],
        "generated": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "profile": run["profile"],
        "commit": run["commit"],
        "settings": run["settings"],
        "best": {task: {k: b[k] for k in ("notebook", "name", "rule", "model_path", "pointer")}
                 for task, b in best.items()},
        "notebooks": {
            nb.name: {"of": nb.of, "status": nb.status, "seconds": round(nb.seconds, 2), "error": nb.error,
                      "parameters": nb.parameters, "metrics": nb.metrics,
                      "metrics_problem": nb.metrics_problem}
            for nb in notebooks
        },
    }
    files.write_text_atomic(reports_dir / "summary.json", json.dumps(record, indent=2, default=str))
