"""Run the pneumo notebooks with papermill and collect HTML reports: the engine behind run_all.sh.

Usage::

    python -m pneumo_utils.runner [--profile smoke|full|PATH.yaml] [--data-root DIR]
        [--nih-root DIR] [--weights-dir DIR] [--notebooks 01 03 ...] [--set NB.key=value ...]
        [--reports-dir reports] [--notebooks-dir notebooks] [--prepare-only OUTDIR] [--kernel NAME]

For every selected notebook (default: all ``notebooks/[0-9][0-9]_*.ipynb``, sorted) the runner
injects parameters, executes it into ``<reports_dir>/<name>.ipynb``, renders
``<reports_dir>/<name>.html`` (also after a failure: papermill marks the failing cell), then writes
``<reports_dir>/index.html`` and ``<reports_dir>/summary.json`` and exits with status 1 when any
notebook failed (0 otherwise, 2 on a usage error).

Parameters, lowest to highest precedence:

1. injected by the runner: ``data_dir`` (``--data-root``, env ``PNEUMO_DATA_ROOT``, default
   ``data/chest_xray``; for notebooks whose name contains ``nih``: ``--nih-root``, env
   ``PNEUMO_NIH_ROOT``, default ``data/nih``) and ``reports_dir`` (``--reports-dir``);
2. the profile's ``default:`` section, then its section named after the notebook;
3. ``--set key=value`` (every notebook), then ``--set NB.key=value`` (NB: a prefix such as
   ``01`` or the full name). Values are parsed as YAML (``3``, ``null``, ``true``, ``abc``).

Placeholders: in any *string* value from a profile or ``--set``, the tokens ``{data_root}``,
``{nih_root}``, ``{weights_dir}``, ``{reports_dir}`` and ``{notebook}`` are replaced by the
runner's values (plain text replacement, no other brace is touched), e.g.
``data_dir: "{data_root}/../chest_xray_small"``.

``--weights-dir`` (env ``PNEUMO_WEIGHTS_DIR``) is exported to the kernels as the environment
variable ``PNEUMO_WEIGHTS_DIR``. Kernels run with the runner's working directory as their
working directory, so relative paths mean the same thing to the runner and the notebooks
(run it from the repository root).

``--prepare-only OUTDIR`` only writes the parameterised notebooks to ``OUTDIR/<name>.ipynb`` (no
execution, no HTML), for nbval. There the conventional path parameters (``data_dir``,
``reports_dir``, ``models_dir``, ``cache_dir``) are made absolute, because nbval runs each
notebook with its own folder as working directory.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import html
import json
import logging
import math
import os
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import yaml

DEFAULT_PROFILE = "full"
DEFAULT_DATA_ROOT = "data/chest_xray"
DEFAULT_NIH_ROOT = "data/nih"
NOTEBOOK_GLOB = "[0-9][0-9]_*.ipynb"
PATH_PARAMETERS = ("data_dir", "reports_dir", "models_dir", "cache_dir")
"""Parameters that hold paths; made absolute by ``--prepare-only``."""
PATH_DEFAULTS = {"models_dir": "saved_models", "cache_dir": ".cache/pneumo"}
"""The notebooks' own defaults for path parameters the runner does not inject otherwise."""
DISCLAIMER = "Research use only — not for diagnostic use."
PLACEHOLDERS = ("data_root", "nih_root", "weights_dir", "reports_dir", "notebook")

log = logging.getLogger("pneumo.runner")


class UsageError(ValueError):
    """A bad command line or profile; reported in one line, exit status 2."""


@dataclass
class RunResult:
    """What happened to one notebook."""

    name: str
    status: str  # "ok" or "failed"
    seconds: float
    parameters: dict[str, Any]
    output_path: Path
    html_path: Path | None = None
    error: str | None = None
    metrics: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when the notebook ran to the end."""
        return self.status == "ok"

    @property
    def error_line(self) -> str:
        """The first non-empty line of the error, or an empty string."""
        lines = [line for line in (self.error or "").splitlines() if line.strip()]
        return lines[0].strip() if lines else ""


# --------------------------------------------------------------------------- parameters


def load_profile(name: str | None, profiles_dir: Path | str = "profiles") -> dict[str, Any]:
    """Load a profile: ``profiles/<name>.yaml`` or a path to a YAML file; ``None``/"none" -> {}.

    The result maps ``"default"`` and notebook names to parameter dicts (empty sections -> {}).
    Relative profile names are looked up in ``profiles_dir`` and then next to this package.
    """
    if name is None or name.lower() == "none":
        return {}
    candidates: list[Path] = []
    if name.endswith((".yaml", ".yml")) or os.sep in name or "/" in name:
        candidates.append(Path(name))
    else:
        candidates.append(Path(profiles_dir) / f"{name}.yaml")
        candidates.append(Path(__file__).resolve().parent.parent / "profiles" / f"{name}.yaml")
    path = next((c for c in candidates if c.is_file()), None)
    if path is None:
        raise UsageError(f"profile {name!r} not found (looked for {candidates[0]})")
    with path.open(encoding="utf-8") as handle:
        data = yaml.safe_load(handle) or {}
    if not isinstance(data, dict):
        raise UsageError(f"profile {path} must be a mapping of notebook name -> parameters")
    profile: dict[str, Any] = {}
    for section, params in data.items():
        params = params or {}
        if not isinstance(params, dict):
            raise UsageError(f"profile {path}: section {section!r} must be a mapping")
        profile[str(section)] = dict(params)
    return profile


def parse_value(text: str) -> Any:
    """Parse a ``--set`` value as YAML (``3`` -> 3, ``null`` -> None); ``""`` stays ``""``."""
    if text == "":
        return ""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def parse_sets(items: Sequence[str]) -> list[tuple[str | None, str, Any]]:
    """Parse ``--set`` items into ``(notebook_or_None, key, value)`` triples."""
    parsed = []
    for item in items:
        target, sep, raw = item.partition("=")
        if not sep or not target.strip():
            raise UsageError(f"--set {item!r}: expected key=value or NB.key=value")
        notebook, dot, key = target.strip().rpartition(".")
        if not key:
            raise UsageError(f"--set {item!r}: empty parameter name")
        parsed.append((notebook if dot else None, key, parse_value(raw)))
    return parsed


def matches(name: str, selector: str) -> bool:
    """True when notebook ``name`` is selected by ``selector`` (full name, prefix, or path)."""
    selector = Path(selector).name.removesuffix(".ipynb").removesuffix(".py")
    return bool(selector) and name.startswith(selector)


def expand_placeholders(value: Any, context: dict[str, str]) -> Any:
    """Replace ``{data_root}``-style tokens in strings (recursively in lists and dicts)."""
    if isinstance(value, str):
        for key, replacement in context.items():
            value = value.replace("{" + key + "}", replacement)
        return value
    if isinstance(value, list):
        return [expand_placeholders(v, context) for v in value]
    if isinstance(value, dict):
        return {k: expand_placeholders(v, context) for k, v in value.items()}
    return value


def notebook_parameters(
    name: str,
    profile: dict[str, Any],
    sets: Sequence[tuple[str | None, str, Any]] = (),
    data_root: str = DEFAULT_DATA_ROOT,
    nih_root: str = DEFAULT_NIH_ROOT,
    reports_dir: str = "reports",
    weights_dir: str | None = None,
) -> dict[str, Any]:
    """The parameters injected into notebook ``name`` (see the module docstring for precedence)."""
    params: dict[str, Any] = {
        "data_dir": nih_root if "nih" in name.lower() else data_root,
        "reports_dir": reports_dir,
    }
    params.update(profile.get("default", {}))
    params.update(profile.get(name, {}))
    params.update({key: value for nb, key, value in sets if nb is None})
    params.update({key: value for nb, key, value in sets if nb is not None and matches(name, nb)})
    context = {
        "data_root": str(data_root),
        "nih_root": str(nih_root),
        "weights_dir": str(weights_dir or ""),
        "reports_dir": str(reports_dir),
        "notebook": name,
    }
    return {key: expand_placeholders(value, context) for key, value in params.items()}


def absolute_paths(params: dict[str, Any], base: Path) -> dict[str, Any]:
    """Copy of ``params`` with the conventional path parameters made absolute against ``base``."""
    out = {**{k: v for k, v in PATH_DEFAULTS.items() if k not in params}, **params}
    for key in PATH_PARAMETERS:
        value = out.get(key)
        if isinstance(value, str) and value and not Path(value).is_absolute():
            out[key] = str((base / value).resolve())
    return out


def discover_notebooks(notebooks_dir: Path, selectors: Sequence[str] | None = None) -> list[Path]:
    """The ``NN_*.ipynb`` notebooks in ``notebooks_dir`` (sorted), filtered by ``selectors``."""
    found = sorted(Path(notebooks_dir).glob(NOTEBOOK_GLOB))
    if not found:
        raise UsageError(f"no notebooks matching {NOTEBOOK_GLOB} in {notebooks_dir}")
    if not selectors:
        return found
    for selector in selectors:
        if not any(matches(path.stem, selector) for path in found):
            names = ", ".join(path.stem for path in found)
            raise UsageError(f"--notebooks {selector!r} matches no notebook (have: {names})")
    return [path for path in found if any(matches(path.stem, s) for s in selectors)]


# --------------------------------------------------------------------------- execution


@contextlib.contextmanager
def environment(**values: str | None) -> Iterator[None]:
    """Set environment variables (None: leave alone) for the duration of the block."""
    saved = {key: os.environ.get(key) for key in values}
    try:
        for key, value in values.items():
            if value is not None:
                os.environ[key] = value
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def describe_error(exc: BaseException) -> str:
    """A readable error text whose first line says what failed."""
    ename, evalue = getattr(exc, "ename", None), getattr(exc, "evalue", None)
    if ename:
        cell = getattr(exc, "exec_count", None)
        where = f" (cell In [{cell}])" if cell is not None else ""
        return f"{ename}: {evalue}{where}"
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _has_error_output(notebook: Any) -> bool:
    """True when some code cell of ``notebook`` has an error output (papermill's marker)."""
    return any(
        output.get("output_type") == "error"
        for cell in notebook.cells
        for output in cell.get("outputs", [])
    )


def render_html(notebook_path: Path, html_path: Path, error: str | None = None) -> Path:
    """Render ``notebook_path`` to ``html_path`` with nbconvert's HTMLExporter (inputs shown).

    When the notebook is missing or cannot be rendered, a small page with ``error`` (and the
    rendering problem) is written instead, so there is always an HTML report.
    """
    html_path.parent.mkdir(parents=True, exist_ok=True)
    try:
        import nbformat
        from nbconvert import HTMLExporter

        notebook = nbformat.read(str(notebook_path), as_version=4)
        if error and not _has_error_output(notebook):
            # failed outside a cell (kernel missing or dead, timeout): say so on top
            text = "\n".join("    " + line for line in error.splitlines())
            banner = f"**The runner stopped this notebook with an error:**\n\n{text}"
            notebook.cells.insert(0, nbformat.v4.new_markdown_cell(banner))
        body, _ = HTMLExporter().from_notebook_node(notebook)
    except Exception as exc:  # missing partial notebook, broken JSON, template trouble
        problems = [p for p in (error, f"report could not be rendered: {describe_error(exc)}") if p]
        items = "".join(f"<pre>{html.escape(p)}</pre>" for p in problems)
        body = (
            "<!DOCTYPE html><html><head><meta charset='utf-8'>"
            f"<title>{html.escape(notebook_path.stem)}</title></head><body>"
            f"<h1>{html.escape(notebook_path.stem)}: no executed notebook</h1>{items}</body></html>"
        )
    html_path.write_text(body, encoding="utf-8")
    return html_path


def read_metrics(path: Path, not_before: float | None = None) -> tuple[dict[str, Any] | None, str]:
    """Read a metrics.json; returns ``(metrics or None, note)``.

    Files older than ``not_before`` (a ``time.time()`` value) are from an earlier run: ignored.
    """
    if not path.is_file():
        return None, ""
    if not_before is not None and path.stat().st_mtime < not_before - 1.0:
        return None, f"ignored {path.name}: older than this run"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        return None, f"could not read {path.name}: {exc}"
    if not isinstance(data, dict):
        return None, f"ignored {path.name}: not a JSON object"
    return data, ""


def run_notebook(
    notebook: Path,
    parameters: dict[str, Any],
    reports_dir: Path,
    kernel: str | None = None,
    cwd: Path | None = None,
) -> RunResult:
    """Execute one notebook with papermill into ``reports_dir`` and render its HTML report.

    Never raises for a failing notebook: the error goes into the returned ``RunResult`` and
    the partial executed notebook (with papermill's error marker) is kept and rendered.
    """
    import papermill

    name = notebook.stem
    reports_dir.mkdir(parents=True, exist_ok=True)
    output_path = reports_dir / f"{name}.ipynb"
    html_path = reports_dir / f"{name}.html"
    for stale in (output_path, html_path):
        stale.unlink(missing_ok=True)
    started_wall, started = time.time(), time.monotonic()
    error: str | None = None
    try:
        papermill.execute_notebook(
            str(notebook),
            str(output_path),
            parameters=parameters,
            kernel_name=kernel,
            cwd=str(cwd or Path.cwd()),
            log_output=True,
            progress_bar=True,
        )
    except Exception as exc:  # PapermillExecutionError, dead kernel, missing kernel, ...
        error = describe_error(exc)
    seconds = time.monotonic() - started
    result = RunResult(
        name=name,
        status="ok" if error is None else "failed",
        seconds=seconds,
        parameters=parameters,
        output_path=output_path,
        error=error,
    )
    result.html_path = render_html(output_path, html_path, error)
    run_name = str(parameters.get("run_name") or name)
    result.metrics, note = read_metrics(reports_dir / f"{run_name}.metrics.json", started_wall)
    if note:
        result.notes.append(note)
    return result


def prepare_notebook(
    notebook: Path, parameters: dict[str, Any], out_dir: Path, kernel: str | None = None
) -> Path:
    """Write ``out_dir/<name>.ipynb`` with the parameters injected, without executing it."""
    import papermill

    out_dir.mkdir(parents=True, exist_ok=True)
    output_path = out_dir / notebook.name
    papermill.execute_notebook(
        str(notebook),
        str(output_path),
        parameters=parameters,
        kernel_name=kernel,
        prepare_only=True,
        progress_bar=False,
    )
    return output_path


# --------------------------------------------------------------------------- reporting


def metric_rows(result: RunResult) -> list[dict[str, Any]]:
    """One row per model in a notebook's metrics (the ``models`` list, else the top level)."""
    metrics = result.metrics
    if not metrics:
        return []
    models = metrics.get("models")
    if isinstance(models, list) and any(isinstance(m, dict) for m in models):
        shared = {k: metrics[k] for k in ("data", "threshold_rule", "run_name", "task") if k in metrics}
        return [{**shared, **m} for m in models if isinstance(m, dict)]
    return [metrics]


def _number(value: Any) -> float | None:
    """``value`` as a finite float, else None."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def _fmt(value: Any, digits: int = 3) -> str:
    """Format a metric for HTML: numbers rounded, strings escaped, missing as an en dash."""
    if value is None:
        return "–"
    number = _number(value)
    if number is not None:
        return f"{number:.{digits}f}"
    return html.escape(str(value))


def _fmt_ci(value: Any, ci: Any) -> str:
    """``0.960 <small>(0.940–0.980)</small>`` when a two-number CI is present."""
    text = _fmt(value)
    if isinstance(ci, list | tuple) and len(ci) == 2:
        text += f" <small>({_fmt(ci[0])}–{_fmt(ci[1])})</small>"
    return text


BEST_TASK = "kermany"
"""The task the best model is picked for: notebook 02's NIH model answers another question."""


def best_row_key(results: Sequence[RunResult], task: str = BEST_TASK) -> tuple[str, int] | None:
    """``(notebook name, row index)`` of the ``task`` model with the highest validation AUC.

    Rows without a ``task`` (metrics written before it was recorded) count as Kermany rows.
    """
    best: tuple[float, tuple[str, int]] | None = None
    for result in results:
        for index, row in enumerate(metric_rows(result)):
            if row.get("task", BEST_TASK) != task:
                continue
            auc = _number(row.get("val_auc"))
            if auc is not None and (best is None or auc > best[0]):
                best = (auc, (result.name, index))
    return best[1] if best else None


INDEX_CSS = """
body{font-family:-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;margin:2rem auto;
max-width:1200px;padding:0 1rem;color:#1f2328;line-height:1.45}
h1{margin-bottom:.2rem}h2{margin-top:2rem;border-bottom:1px solid #d0d7de;padding-bottom:.3rem}
.meta{color:#57606a}.disclaimer{background:#fff8c5;border:1px solid #d4a72c;padding:.6rem 1rem;
border-radius:6px;font-weight:600}
table{border-collapse:collapse;width:100%;margin:.5rem 0;font-size:.92rem}
th,td{border:1px solid #d0d7de;padding:.35rem .55rem;text-align:left;vertical-align:top}
th{background:#f6f8fa}tr.best{background:#dafbe1}
.ok{color:#1a7f37;font-weight:600}.failed{color:#cf222e;font-weight:600}
.tag{background:#1a7f37;color:#fff;border-radius:4px;padding:0 .35rem;font-size:.8rem;
white-space:nowrap}small{color:#57606a}code{background:#f6f8fa;padding:0 .2rem}
details{margin:.4rem 0}summary{cursor:pointer;font-weight:600}
"""


def _link(path: Path | None, label: str, base: Path) -> str:
    """An ``<a>`` to ``path`` relative to ``base`` (or the escaped label when no path)."""
    if path is None:
        return html.escape(label)
    try:
        href = path.resolve().relative_to(base.resolve()).as_posix()
    except ValueError:
        href = path.resolve().as_uri()
    return f'<a href="{html.escape(quote(href))}">{html.escape(label)}</a>'


def write_index(
    results: Sequence[RunResult],
    reports_dir: Path,
    profile_name: str | None = None,
    settings: dict[str, Any] | None = None,
) -> Path:
    """Write ``reports_dir/index.html`` (self-contained) and ``reports_dir/summary.json``."""
    reports_dir.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now().astimezone()
    best = best_row_key(results)
    esc = html.escape

    run_rows = []
    for r in results:
        status = '<span class="ok">ok</span>' if r.ok else '<span class="failed">FAILED</span>'
        details = esc(r.error_line) if not r.ok else ""
        if r.notes:
            details += "".join(f"<br><small>{esc(n)}</small>" for n in r.notes)
        run_rows.append(
            f"<tr><td>{_link(r.html_path, r.name, reports_dir)}</td><td>{status}</td>"
            f"<td>{r.seconds:.1f}</td><td>{details}</td>"
            f"<td>{_link(r.output_path, 'ipynb', reports_dir)}</td></tr>"
        )

    metric_html = []
    for r in results:
        for index, row in enumerate(metric_rows(r)):
            test = row.get("test") if isinstance(row.get("test"), dict) else {}
            is_best = best == (r.name, index)
            label = row.get("name") or row.get("title") or row.get("backbone") or row.get("run_name") or r.name
            threshold = _fmt(row.get("threshold"))
            if row.get("threshold_rule"):
                threshold += f"<br><small>{esc(str(row['threshold_rule']))}</small>"
            tag = ' <span class="tag">best (by validation AUC)</span>' if is_best else ""
            cells = [
                f"{_link(r.html_path, r.name, reports_dir)}",
                f"{esc(str(label))}{tag}<br><small>{_fmt(row.get('backbone'))}</small>",
                _fmt(row.get("data")),
                _fmt_ci(test.get("auc"), test.get("auc_ci")),
                _fmt_ci(test.get("accuracy"), test.get("accuracy_ci")),
                _fmt_ci(test.get("sensitivity"), test.get("sensitivity_ci")),
                _fmt_ci(test.get("specificity"), test.get("specificity_ci")),
                _fmt_ci(test.get("f1"), test.get("f1_ci")),
                threshold,
                _fmt(row.get("val_auc")),
            ]
            css = ' class="best"' if is_best else ""
            metric_html.append(f"<tr{css}>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    if not metric_html:
        metric_html.append('<tr><td colspan="10">No metrics were written.</td></tr>')

    param_html = []
    for r in results:
        rows = "".join(
            f"<tr><td><code>{esc(k)}</code></td><td><code>{esc(json.dumps(v))}</code></td></tr>"
            for k, v in r.parameters.items()
        )
        param_html.append(
            f"<details><summary>{esc(r.name)}</summary><table><tr><th>parameter</th>"
            f"<th>value</th></tr>{rows}</table></details>"
        )
    settings_html = "".join(
        f"<li>{esc(str(k))}: <code>{esc(str(v))}</code></li>" for k, v in (settings or {}).items()
    )

    n_failed = sum(not r.ok for r in results)
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>pneumo reports</title><style>{INDEX_CSS}</style></head>
<body>
<h1>pneumo: pneumonia detection on chest X-rays</h1>
<p class="meta">Generated {esc(now.strftime("%Y-%m-%d %H:%M %Z"))} · profile
<code>{esc(profile_name or "none")}</code> · {len(results)} notebook(s), {n_failed} failed</p>
<p class="disclaimer">{esc(DISCLAIMER)}</p>
<h2>Notebooks</h2>
<table><tr><th>notebook</th><th>status</th><th>seconds</th><th>error / notes</th>
<th>executed</th></tr>
{"".join(run_rows)}
</table>
<h2>Test-set metrics</h2>
<p class="meta">Point estimates with 95% confidence intervals in parentheses where the
notebook reports them. The highlighted model has the highest <em>validation</em> AUC among the
Kermany models (the NIH model answers another question on other data, so it is not ranked with
them); test metrics were not used to choose it.</p>
<table><tr><th>notebook</th><th>model</th><th>data</th><th>test AUC (95% CI)</th><th>accuracy (95% CI)</th>
<th>sensitivity</th><th>specificity</th><th>F1</th><th>threshold</th><th>val AUC</th></tr>
{"".join(metric_html)}
</table>
<h2>Parameters</h2>
<ul>{settings_html}</ul>
{"".join(param_html)}
<p class="disclaimer">{esc(DISCLAIMER)}</p>
</body></html>
"""
    index_path = reports_dir / "index.html"
    index_path.write_text(page, encoding="utf-8")

    summary = {
        "generated": now.isoformat(timespec="seconds"),
        "profile": profile_name,
        "settings": settings or {},
        "disclaimer": DISCLAIMER,
        "best_by_val_auc": {"notebook": best[0], "model_index": best[1]} if best else None,
        "notebooks": {
            r.name: {
                "status": r.status,
                "seconds": round(r.seconds, 2),
                "error": r.error,
                "metrics": r.metrics,
                "parameters": r.parameters,
                "html": r.html_path.name if r.html_path else None,
                "notes": r.notes,
            }
            for r in results
        },
    }
    (reports_dir / "summary.json").write_text(
        json.dumps(summary, indent=2, default=str), encoding="utf-8"
    )
    return index_path


def link_best_model(results: Sequence[RunResult]) -> Path | None:
    """Point ``best.keras`` (and its ``best.json`` sidecar, ``best.md`` card) at the saved
    model with the highest validation AUC, as relative symlinks beside it.

    Test metrics play no part in the choice. Returns the link, or ``None`` when no model
    with a validation AUC was saved.
    """
    key = best_row_key(results)
    if key is None:
        return None
    result = next(r for r in results if r.name == key[0])
    model_path = metric_rows(result)[key[1]].get("model_path")
    if not model_path or not Path(model_path).is_file():
        return None
    model_path = Path(model_path)
    for suffix in (".keras", ".json", ".md"):
        target = model_path.with_suffix(suffix)
        link = model_path.parent / f"best{suffix}"
        if link.is_symlink() or link.exists():
            link.unlink()
        if target.is_file():
            link.symlink_to(target.name)
    return model_path.parent / "best.keras"


def print_summary(results: Sequence[RunResult], stream: Any = None) -> None:
    """Print a plain-text table of name, status and seconds."""
    stream = stream or sys.stdout
    width = max([len(r.name) for r in results] + [8])
    print(f"\n{'notebook':<{width}}  {'status':<6}  {'seconds':>8}", file=stream)
    print(f"{'-' * width}  {'-' * 6}  {'-' * 8}", file=stream)
    for r in results:
        status = "ok" if r.ok else "FAILED"
        print(f"{r.name:<{width}}  {status:<6}  {r.seconds:>8.1f}", file=stream)
        if r.error_line:
            print(f"{'':<{width}}    {r.error_line}", file=stream)


# --------------------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface of ``python -m pneumo_utils.runner``."""
    p = argparse.ArgumentParser(
        prog="python -m pneumo_utils.runner",
        description="Execute the pneumo notebooks with papermill and write HTML reports.",
    )
    p.add_argument(
        "--profile",
        default=os.environ.get("PNEUMO_PROFILE", DEFAULT_PROFILE),
        help="profiles/<NAME>.yaml, a path to a YAML file, or 'none' (default: %(default)s)",
    )
    p.add_argument(
        "--data-root",
        default=os.environ.get("PNEUMO_DATA_ROOT", DEFAULT_DATA_ROOT),
        help="Kermany data folder, injected as data_dir (default: %(default)s)",
    )
    p.add_argument(
        "--nih-root",
        default=os.environ.get("PNEUMO_NIH_ROOT", DEFAULT_NIH_ROOT),
        help="NIH data folder, data_dir of notebooks named *nih* (default: %(default)s)",
    )
    p.add_argument(
        "--weights-dir",
        default=os.environ.get("PNEUMO_WEIGHTS_DIR"),
        help="folder of pretrained weights, exported to kernels as PNEUMO_WEIGHTS_DIR",
    )
    p.add_argument("--notebooks", nargs="+", metavar="NB", help="prefixes (01) or full names")
    p.add_argument("--notebooks-dir", default="notebooks", help="default: %(default)s")
    p.add_argument(
        "--set",
        dest="sets",
        action="append",
        default=[],
        metavar="[NB.]KEY=VALUE",
        help="override a parameter (value parsed as YAML); repeatable",
    )
    p.add_argument("--reports-dir", default="reports", help="default: %(default)s")
    p.add_argument(
        "--prepare-only",
        metavar="OUTDIR",
        help="only write parameterised notebooks to OUTDIR (no execution, no HTML)",
    )
    p.add_argument("--kernel", help="kernel name (default: each notebook's kernelspec)")
    return p


def _configure_logging() -> None:
    """Show papermill's progress and cell output (log_output) on the terminal."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("papermill").setLevel(logging.INFO)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the selected notebooks; returns 0 if all succeeded, 1 if any failed, 2 on bad usage."""
    args = build_parser().parse_args(argv)
    try:
        profile = load_profile(args.profile)
        sets = parse_sets(args.sets)
        notebooks = discover_notebooks(Path(args.notebooks_dir), args.notebooks)
        names = [nb.stem for nb in sorted(Path(args.notebooks_dir).glob(NOTEBOOK_GLOB))]
        for target, key, _ in sets:
            if target is not None and not any(matches(n, target) for n in names):
                raise UsageError(f"--set {target}.{key}: {target!r} matches no notebook")
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for section in profile:
        if section != "default" and section not in names:
            print(f"note: profile section {section!r} matches no notebook", file=sys.stderr)

    weights_dir = str(Path(args.weights_dir).resolve()) if args.weights_dir else None

    def params_for(nb: Path) -> dict[str, Any]:
        return notebook_parameters(
            nb.stem,
            profile,
            sets,
            data_root=args.data_root,
            nih_root=args.nih_root,
            reports_dir=args.reports_dir,
            weights_dir=weights_dir,
        )

    if args.prepare_only:
        out_dir = Path(args.prepare_only)
        for nb in notebooks:
            params = absolute_paths(params_for(nb), Path.cwd())
            path = prepare_notebook(nb, params, out_dir, kernel=args.kernel)
            print(f"prepared {path}")
        return 0

    _configure_logging()
    reports_dir = Path(args.reports_dir)
    results: list[RunResult] = []
    total = len(notebooks)
    with environment(PNEUMO_WEIGHTS_DIR=weights_dir):
        for i, nb in enumerate(notebooks, start=1):
            print(f"\n[{i}/{total}] {nb.stem} ...", flush=True)
            try:
                result = run_notebook(nb, params_for(nb), reports_dir, kernel=args.kernel)
            except KeyboardInterrupt:
                print(f"[{i}/{total}] {nb.stem} interrupted", flush=True)
                results.append(
                    RunResult(
                        nb.stem,
                        "failed",
                        0.0,
                        params_for(nb),
                        reports_dir / nb.name,
                        error="KeyboardInterrupt: run interrupted",
                    )
                )
                break
            results.append(result)
            verdict = "ok" if result.ok else f"FAILED: {result.error_line}"
            print(f"[{i}/{total}] {nb.stem} {verdict} ({result.seconds:.1f} s)", flush=True)
    settings = {
        "data root": args.data_root,
        "NIH root": args.nih_root,
        "weights dir": weights_dir or "(not set)",
        "kernel": args.kernel or "(notebook kernelspec)",
        "command": "python -m pneumo_utils.runner "
        + " ".join(sys.argv[1:] if argv is None else argv),
    }
    index = write_index(results, reports_dir, args.profile, settings)
    print_summary(results)
    print(f"\nreports: {index}")
    best = link_best_model(results)
    if best is not None:
        print(f"best model by validation AUC: {best} -> {best.resolve().name}")
    return 1 if any(not r.ok for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
