"""Run-to-run spread of the recommended recipe: notebook 03 (MobileNetV2 fine-tuned, the full
profile's settings) for each Kermany task with several seeds, scored on external validation A.

A seed moves the patient-grouped split of train into train and validation, the head's initial
weights, the shuffling and the augmentation; a headline figure from one run says nothing of how
much of it is luck. Each run executes ``notebooks/03_mobilenetv2_finetune.py`` with papermill,
exactly as ``./run_all.sh`` runs it (the full profile's parameters for notebook 03, plus ``task``
and ``seed``), writing its model and metrics under ``--out`` (never into ``saved_models/`` or
``reports/``); finished runs are read back, so the script resumes where it stopped. A run of the
full profile (``reports/<run>.metrics.json``, seed 42) is used instead of running that seed again
when ``--reuse-full`` names the reports folder.

Prints, per task and seed, external validation A's AUC (the phase chosen on A, then zero-shot at
the validation threshold or argmax), its accuracy, the hold-out AUC, and per task the mean and
range of the external AUC.

    python benchmarks/seed_spread.py --seeds 42 43 44 --reuse-full reports
    python benchmarks/seed_spread.py --tasks pneumonia --set ema_momentum=0.99 --out build/seed-spread-ema

``--set KEY=VALUE`` (YAML values, as the runner's) changes the recipe; give such a variant its own
``--out`` folder, and leave ``--reuse-full`` out, since the full profile ran the recipe as it is.

About 6-8 minutes per run on 2 CPU cores (pneumonia and three classes; bacterial vs viral less).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

FULL_RUNS = {"pneumonia": "03_mobilenetv2_finetune", "bacterial_vs_viral": "03_finetune_bacterial_vs_viral",
             "three_class": "03_finetune_three_class"}
"""The full profile's run of notebook 03 for each task (pneumo_utils/runner/profiles/full.yaml)."""


def notebook_parameters(task: str, seed: int, out: Path, changes: dict | None = None) -> dict:
    """The full profile's parameters of notebook 03 with ``changes``, the task, seed and output
    folders."""
    from pneumo_utils.data import fetch
    from pneumo_utils.runner import plan

    profile = plan.load_profile("full")
    parameters = {**(profile.get("default") or {}), **(profile.get("03_mobilenetv2_finetune") or {}), **(changes or {})}
    run = f"seed_{task}_{seed}"
    parameters.update(task=task, seed=seed, run_name=run, data_dir=str(fetch.find("kermany")),
                      external_dir=str(fetch.find("external", required=False)),
                      reports_dir=str(out / "reports"), models_dir=str(out / "models"))
    return parameters


def run_once(task: str, seed: int, out: Path, changes: dict | None = None) -> dict:
    """The metrics JSON of notebook 03 for ``task`` and ``seed``, running it when absent."""
    metrics = out / "reports" / f"seed_{task}_{seed}.metrics.json"
    if not metrics.is_file():
        import jupytext
        import papermill

        source = Path(__file__).resolve().parents[1] / "notebooks" / "03_mobilenetv2_finetune.py"
        (out / "notebooks").mkdir(parents=True, exist_ok=True)
        notebook = out / "notebooks" / f"seed_{task}_{seed}.ipynb"
        jupytext.write(jupytext.read(source), notebook)
        papermill.execute_notebook(str(notebook), str(notebook), parameters=notebook_parameters(task, seed, out, changes),
                                   cwd=str(source.parents[1]), progress_bar=False)
    return json.loads(metrics.read_text())


def figures(metrics: dict) -> dict:
    """External AUC and accuracy and the hold-out AUC of a notebook 03 metrics JSON."""
    entry = metrics["models"][0]
    external = entry.get("external") or {}
    return {"external_auc": external.get("auc"), "external_accuracy": external.get("accuracy"),
            "holdout_auc": entry["test"]["auc"], "kept": entry.get("name")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", nargs="+", default=list(FULL_RUNS), choices=list(FULL_RUNS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[42, 43, 44])
    parser.add_argument("--out", type=Path, default=Path("build/seed-spread"), help="runs' models and metrics")
    parser.add_argument("--reuse-full", type=Path, help="reports folder of a full-profile run: its seed-42 runs are used")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                        help="a notebook 03 parameter changed from the full profile's (repeatable)")
    args = parser.parse_args(argv)
    from pneumo_utils.runner import plan

    changes = {key: value for _, key, value in plan.parse_sets(args.sets)}
    for key, value in changes.items():
        if plan.value_problem(key, value):
            parser.error(plan.value_problem(key, value))
    if changes and args.reuse_full:
        parser.error("--set changes the recipe: the full profile's runs are not runs of it; leave --reuse-full out")
    rows = []
    for task in args.tasks:
        for seed in args.seeds:
            full = args.reuse_full / f"{FULL_RUNS[task]}.metrics.json" if args.reuse_full else None
            if seed == 42 and full is not None and full.is_file():
                metrics, source = json.loads(full.read_text()), f"full profile ({full})"
            else:
                metrics, source = run_once(task, seed, args.out, changes), "this script"
            rows.append({"task": task, "seed": seed, **figures(metrics), "source": source})
            r = rows[-1]
            print(f"{task:<20} seed {seed}: external A AUC {r['external_auc']:.4f}, accuracy "
                  f"{r['external_accuracy']:.3f}; hold-out AUC {r['holdout_auc']:.4f}; {r['kept']} ({source})",
                  flush=True)
    print("\nexternal validation A, AUC over seeds (phase chosen on A; zero-shot decision rule):")
    for task in args.tasks:
        aucs = np.array([r["external_auc"] for r in rows if r["task"] == task], dtype=float)
        print(f"  {task:<20} mean {aucs.mean():.4f}, range {aucs.min():.4f}-{aucs.max():.4f} "
              f"({len(aucs)} seeds: {', '.join(f'{a:.4f}' for a in aucs)})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
