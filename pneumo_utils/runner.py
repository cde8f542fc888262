"""Run the pneumo notebooks with papermill and write HTML reports: the engine of ``run_all.sh``.

    python -m pneumo_utils.runner [--profile full|smoke|PATH.yaml|none] [--notebooks 01 03]
        [--set [NB.]KEY=VALUE ...] [--data-root DIR] [--nih-root DIR] [--weights-dir DIR]
        [--reports-dir DIR] [--offline] [--prepare-only DIR] [--kernel NAME]

Each selected ``notebooks/NN_*.py`` is read with jupytext (what runs is what was edited), run by
papermill with the current folder (the repository root) as working directory, and rendered by
nbconvert into ``<name>.html`` (a summary from its metrics JSON on top, set-up code hidden) and
``<name>.code.html``. ``index.html`` is written before the first kernel starts and after each
notebook. Exit status: 0 all ran, 1 some failed, 2 bad usage, missing data or a busy folder.

A profile's ``runs:`` section names extra runs of a notebook with parameters of their own
(``runs: {01_kermany_bacterial_vs_viral: {notebook: 01_kermany_densenet121, task: ...}}``). Each
runs right after its notebook, under its own name: its reports are ``<run>.html``,
``<run>.code.html`` and ``<run>.ipynb``, and its ``run_name`` parameter (which the notebook must
declare) is set to the run's name, so its metrics JSON and models do not overwrite the
notebook's. ``--notebooks 01`` selects notebook 01 and its runs; a run's name selects the run.

Parameters, lowest to highest precedence: the data folder found (``fetch.find_all``) as
``data_dir``; the profile's ``default:`` section; its section named after the notebook; the
run's own keys; ``--set KEY=VALUE``; ``--set NB.KEY=VALUE`` where NB selects the notebook (and
so its runs); ``--set RUN.KEY=VALUE`` where RUN selects a run by its own name. Keys must be
declared in the notebook's parameters cell; values are YAML literals that papermill writes as
Python literals (``null`` is ``None``). A profile's ``runner:`` section sets ``reports_dir`` and
``record_best``: only a run with ``record_best`` (the full profile) writes, in its models
folder, ``best.json`` for the Kermany pneumonia task and ``best.<task>.json`` for each other
Kermany task.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import datetime as dt
import fnmatch
import functools
import importlib.metadata
import importlib.resources
import json
import math
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pneumo_utils import fetch

PROFILES = importlib.resources.files("pneumo_utils") / "profiles"
"""The shipped profiles (``full.yaml``, ``smoke.yaml``): package data, in the wheel too."""
TEMPLATES = Path(__file__).with_name("templates")
NOTEBOOK_PATTERNS = ("[0-9][0-9]_*.py", "[0-9][0-9]_*.ipynb")
HIDDEN_INPUT_TAGS = ("setup", "parameters", "injected-parameters", "hide-input")
KERNEL_ENV = {"TF_CPP_MIN_LOG_LEVEL": "2", "GRPC_VERBOSITY": "ERROR"}
"""Silences TensorFlow's C++ and gRPC log lines at the source, in kernels and in reports."""
NATIVE_LOG_LINE = re.compile(
    r"^(?:[IWEF]\d{4} \d\d:\d\d:\d+\.\d+ +\d+ [\w.]+:\d+\] .*"
    r"|WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR"
    r"|To enable the following instructions: .* rebuild TensorFlow with the appropriate compiler flags\.)$"
)
"""TensorFlow's C++ log lines printed before its log level applies (start-up, graph warnings
such as ``NodeDef mentions attribute ...``); the HTML reports leave them out."""
BEST_TASK = "kermany"
"""The metrics ``task`` of Kermany pneumonia vs normal; other Kermany tasks are ``kermany:<task>``."""
RUN_NAME = re.compile(r"[A-Za-z0-9][\w.-]*")
"""A run's name becomes file names: letters, digits, ``_``, ``.`` and ``-``."""
RUNNER_FILES = ("index.html", "summary.json", "best.json", "best.*.json")
"""Files the runner writes beside the reports and models (:func:`run_files` must not match)."""
RUNNER_KEYS = {"reports_dir": "reports", "record_best": False}
"""A profile's ``runner:`` section: where reports go, and whether the run sets ``best.json``."""
DISCLAIMER = "Research use only: not for diagnostic use."
TEST_METRICS = ("auc", "sensitivity", "specificity", "accuracy", "balanced_accuracy", "macro_f1")
"""Test metrics on the index: binary tables show the first four; three-class tables the AUC
(macro one-vs-rest), accuracy, balanced accuracy and macro F1."""
LIBRARIES = ("tensorflow", "tensorflow-cpu", "keras", "numpy", "scikit-learn", "papermill")
COLOURS = ("#0969da", "#cf222e", "#1a7f37", "#8250df", "#bf8700", "#57606a")


KERNELS: weakref.WeakSet = weakref.WeakSet()
"""The kernel managers of the notebooks being run, so an interrupted run can stop its kernel."""


class UsageError(ValueError):
    """A bad command line, profile or missing data set: one message, exit status 2."""


@dataclass
class Notebook:
    """One notebook, or one profile run of a notebook (``of`` names that notebook): its source,
    declared parameters, the merged values and what happened."""

    name: str
    path: Path
    node: Any
    declared: dict[str, dict]
    parameters: dict[str, Any] = field(default_factory=dict)
    of: str | None = None
    status: str = "pending"
    seconds: float = 0.0
    error: str | None = None
    metrics: dict | None = None

    def default(self, key: str) -> Any:
        """The notebook's own value of parameter ``key`` (None when not a literal)."""
        try:
            return ast.literal_eval(self.declared[key]["default"])
        except (KeyError, ValueError, SyntaxError):
            return None

    def value(self, key: str) -> Any:
        """The value parameter ``key`` has in this run."""
        return self.parameters[key] if key in self.parameters else self.default(key)

    def selected_by(self, selector: str) -> bool:
        """True when ``selector`` names this notebook, or this run or the notebook it runs."""
        return matches(self.name, selector) or (self.of is not None and matches(self.of, selector))


# --------------------------------------------------------------------------- parameters


def load_profile(name: str) -> dict[str, dict[str, Any]]:
    """:data:`PROFILES` ``/<name>.yaml`` or a YAML path as ``{section: parameters}``;
    ``"none"`` -> {}."""
    if name.lower() == "none":
        return {}
    path = Path(name) if name.endswith((".yaml", ".yml")) else PROFILES / f"{name}.yaml"
    if not path.is_file():
        raise UsageError(f"profile {name!r} not found (looked for {path})")
    try:
        data = read_yaml(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise UsageError(yaml_problem(exc, str(path))) from None
    if not isinstance(data, dict) or not all(isinstance(v, dict | None) for v in data.values()):
        raise UsageError(f"profile {path} must map 'default', notebook names and 'runs' to parameters")
    return {
        str(section): {str(k): literal(v, f"profile {path.name}: {section}.{k}") for k, v in (params or {}).items()}
        for section, params in data.items()
    }


class ProfileLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses anchors, aliases and duplicate keys.

    An alias shares a node, so 382 bytes of nested aliases ("billion laughs") expand to
    gigabytes once :func:`literal` copies them; a profile never needs one, so the first
    anchor or alias is refused where the parser meets it, before anything is built. A key
    given twice would silently keep the last value (two runs of one name: one never runs).
    """

    def compose_node(self, parent, index):
        """Refuse an anchor (``&name``) or an alias (``*name``)."""
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
            raise yaml.composer.ComposerError(
                None, None, f"anchors and aliases (&{event.anchor}, *{event.anchor}) are not allowed; "
                "write each value out", event.start_mark)
        return super().compose_node(parent, index)

    def construct_mapping(self, node, deep=False):
        """The mapping of ``node``, refusing a key given twice."""
        if isinstance(node, yaml.MappingNode):
            lines: dict[Any, int] = {}
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=True)
                try:
                    seen = key in lines
                except TypeError:
                    continue  # an unhashable key: SafeLoader refuses it below
                if seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"{key!r} is given twice (first on line {lines[key]}); keep one",
                        key_node.start_mark)
                lines[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep)


def read_yaml(text: str) -> Any:
    """``text`` parsed by :class:`ProfileLoader`; a nesting too deep to parse is a YAML error."""
    try:
        return yaml.load(text, Loader=ProfileLoader)  # noqa: S506 - a SafeLoader subclass
    except RecursionError:
        raise yaml.YAMLError("nested too deeply; parameters are plain values a few levels deep") from None


def yaml_problem(exc: yaml.YAMLError, where: str) -> str:
    """``WHERE:LINE: problem`` in one line, for a YAML error in a profile or ``--set`` value."""
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    line = f":{mark.line + 1}" if mark is not None and not where.startswith("--set") else ""
    problem = " ".join(str(getattr(exc, "problem", None) or exc).split())
    if "constructor for the tag" in problem:
        problem += "; values are plain numbers, strings, true/false, null, lists and mappings"
    elif isinstance(exc, yaml.scanner.ScannerError | yaml.parser.ParserError):
        problem += "; fix the YAML there"
    return f"{where}{line}: {problem}"


def literal(value: Any, where: str) -> Any:
    """``value`` if it is a literal papermill can write (number, string, bool, None, list, dict)."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, list):
        return [literal(v, where) for v in value]
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return {k: literal(v, where) for k, v in value.items()}
    raise UsageError(f"{where}: {value!r} is not a number, string, true/false, null, list or mapping")


def parse_sets(items: Sequence[str]) -> list[tuple[str | None, str, Any]]:
    """``--set [NB.]KEY=VALUE`` items as ``(notebook selector or None, key, value)``."""
    parsed = []
    for item in items:
        target, sep, raw = item.partition("=")
        selector, dot, key = target.strip().rpartition(".")
        if not sep or not key.isidentifier():
            raise UsageError(f"--set {item!r}: expected KEY=VALUE or NB.KEY=VALUE with KEY a name")
        try:
            value = read_yaml(raw) if raw else ""
        except (yaml.scanner.ScannerError, yaml.parser.ParserError):
            value = raw  # not YAML at all: the text itself, a string
        except yaml.YAMLError as exc:
            raise UsageError(yaml_problem(exc, f"--set {item!r}")) from None
        parsed.append((selector if dot else None, key, literal(value, f"--set {item!r}")))
    return parsed


def matches(name: str, selector: str) -> bool:
    """True when notebook ``name`` is selected by ``selector`` (a prefix, name or file name)."""
    selector = Path(selector).name.removesuffix(".ipynb").removesuffix(".py")
    return bool(selector) and name.startswith(selector)


def read_notebooks(folder: Path) -> list[Notebook]:
    """Every ``NN_*.py`` (else ``.ipynb``) in ``folder``, read with jupytext, sorted by name."""
    import jupytext
    import papermill

    paths: dict[str, Path] = {}
    for pattern in reversed(NOTEBOOK_PATTERNS):  # the .py wins over its paired .ipynb
        paths.update({p.stem: p for p in Path(folder).glob(pattern)})
    if not paths:
        raise UsageError(f"no notebooks named NN_*.py or NN_*.ipynb in {folder}")
    notebooks = []
    for name, path in sorted(paths.items()):
        node = jupytext.read(path)
        notebooks.append(Notebook(name, path, node, papermill.inspect_notebook(node)))
    return notebooks


def add_runs(notebooks: Sequence[Notebook], runs: dict[str, Any]) -> list[Notebook]:
    """``notebooks`` with each of a profile's ``runs`` right after the notebook it runs.

    A run shares its notebook's source and declared parameters; its keys other than
    ``notebook`` are checked by :func:`assign_parameters`.
    """
    names = [nb.name for nb in notebooks]
    extra: dict[str, list[Notebook]] = {}
    for name, keys in runs.items():
        where = f"profile runs.{name}"
        if not RUN_NAME.fullmatch(name) or name in names:
            raise UsageError(f"{where}: a run needs a name of its own made of letters, digits, _ . -")
        taken = [f for f in run_files(name) if any(fnmatch.fnmatch(f, p) for p in RUNNER_FILES)]
        taken += [f"{other}'s {f}" for other in [*names, *runs] if other != name
                  for f in set(run_files(name)) & set(run_files(other))]
        if taken:
            raise UsageError(f"{where}: its outputs would overwrite {', '.join(sorted(taken))}; "
                             "give the run another name")
        target = keys.get("notebook") if isinstance(keys, dict) else None
        if isinstance(target, str) and (os.sep in target or "/" in target):
            folder = notebooks[0].path.parent.resolve()
            if Path(target).expanduser().resolve().parent != folder:
                raise UsageError(f"{where}: 'notebook:' {target} is not in the notebooks folder {folder}; "
                                 f"name one of {', '.join(names)}")
        hits = [nb for nb in notebooks if isinstance(target, str) and matches(nb.name, target)]
        if len(hits) != 1:
            raise UsageError(f"{where}: 'notebook:' must name one notebook ({', '.join(names)}); got {target!r}")
        nb = hits[0]
        extra.setdefault(nb.name, []).append(Notebook(name, nb.path, nb.node, nb.declared, of=nb.name))
    return [x for nb in notebooks for x in (nb, *extra.get(nb.name, []))]


def run_files(name: str) -> list[str]:
    """The file names a run called ``name`` writes (reports, metrics, model, sidecar, card),
    lower-cased since folders may not tell case apart."""
    return [f"{name}{suffix}".lower()
            for suffix in (".html", ".code.html", ".ipynb", ".metrics.json", ".keras", ".json", ".md")]


def assign_parameters(
    notebooks: Sequence[Notebook],
    profile: dict[str, dict[str, Any]],
    sets: Sequence[tuple[str | None, str, Any]],
    data: dict[str, Path],
) -> None:
    """Merge data folder, profile and ``--set`` values into each notebook's and run's
    ``parameters`` (precedence in the module docstring); a run's ``run_name`` is its name.

    Raises :class:`UsageError` naming the known parameters when a key is not declared.
    """
    runs = profile.get("runs") or {}
    profile = {k: v for k, v in profile.items() if k not in ("runner", "runs")}
    names = [nb.name for nb in notebooks]
    plain = [nb.name for nb in notebooks if nb.of is None]
    everywhere = sorted(set().union(*(nb.declared for nb in notebooks)))
    for section in profile:
        if section != "default" and section not in plain:
            raise UsageError(f"profile section {section!r} matches no notebook (have: {', '.join(plain)})")
    shared = [(key, f"profile default.{key}") for key in profile.get("default", {})]
    shared += [(key, f"--set {key}") for nb, key, _ in sets if nb is None]
    for key, where in shared:
        if key not in everywhere:
            raise UsageError(f"{where}: no notebook declares {key!r}; known: {', '.join(everywhere)}")
    for selector, key, _ in sets:
        if selector is not None and not any(matches(n, selector) for n in names):
            raise UsageError(f"--set {selector}.{key}: {selector!r} matches no notebook or run ({', '.join(names)})")
    for nb in notebooks:
        home = nb.of or nb.name
        mine = {k: v for k, v in (runs.get(nb.name) or {}).items() if k != "notebook"} if nb.of else {}
        via = [(s, k, v) for s, k, v in sets if s is not None and matches(home, s)]
        direct = [(s, k, v) for s, k, v in sets if s is not None and nb.of and matches(nb.name, s)]
        own = [(key, f"profile {home}.{key}") for key in profile.get(home, {})]
        own += [(key, f"profile runs.{nb.name}.{key}") for key in mine]
        own += [("run_name", f"profile runs.{nb.name} (a run's outputs are named by run_name)")] if nb.of else []
        own += [(key, f"--set {s}.{key}") for s, key, _ in via + direct]
        for key, where in own:
            if key not in nb.declared:
                raise UsageError(
                    f"{where}: {home} declares no {key!r}; known: {', '.join(nb.declared)}"
                )
        params: dict[str, Any] = {}
        if "data_dir" in nb.declared and need_of(nb) in data:
            params["data_dir"] = str(data[need_of(nb)])
        if "external_dir" in nb.declared and "external" in data:
            params["external_dir"] = str(data["external"])
        params.update(profile.get("default", {}))
        params.update(profile.get(home, {}))
        params.update(mine)
        params.update({k: v for s, k, v in sets if s is None})
        params.update({k: v for _, k, v in via + direct})
        if nb.of:
            params["run_name"] = nb.name
        nb.parameters = {k: v for k, v in params.items() if k in nb.declared}


def need_of(nb: Notebook) -> str:
    """Which data set a notebook (or its run) reads: ``"nih"`` for notebooks named ``*nih*``, else Kermany."""
    return "nih" if "nih" in (nb.of or nb.name).lower() else "kermany"


# --------------------------------------------------------------------------- execution


def _section_engine() -> str:
    """Register (once) a papermill engine that prints each markdown heading as it is reached."""
    from papermill.engines import NBClientEngine, papermill_engines
    from tqdm import tqdm

    class SectionEngine(NBClientEngine):
        @classmethod
        def execute_managed_notebook(cls, nb_man, kernel_name, **kwargs):
            started, cell_start = time.monotonic(), nb_man.cell_start

            def announce(cell, cell_index=None, **kw):
                if cell.cell_type == "markdown":
                    lines = [line for line in cell.source.splitlines() if line.startswith("#")]
                    if lines:
                        heading = lines[0].lstrip("#").strip()
                        tqdm.write(f"    {time.monotonic() - started:6.0f} s  {heading}")
                return cell_start(cell, cell_index, **kw)

            nb_man.cell_start = announce
            # The kernel listens on localhost only; its start-up warning about unencrypted
            # TCP says nothing a user of a report can act on, so the kernel logs errors only.
            kwargs.setdefault("extra_arguments", ["--IPKernelApp.log_level=ERROR"])
            return super().execute_managed_notebook(nb_man, kernel_name, **kwargs)

    papermill_engines.register("pneumo-sections", SectionEngine)
    return "pneumo-sections"


def describe_error(exc: BaseException) -> str:
    """One line saying what failed (papermill's cell error, or the exception)."""
    ename, evalue = getattr(exc, "ename", None), getattr(exc, "evalue", None)
    if ename:
        cell = getattr(exc, "exec_count", None)
        return f"{ename}: {evalue}" + (f" (cell In [{cell}])" if cell is not None else "")
    text = (str(exc).strip().splitlines() or [""])[0]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` through a unique temporary file and a rename: all of it or nothing."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except OSError as exc:
        exc.filename = exc.filename or str(path)  # a full disk fails in write(), which names no file
        raise
    finally:
        Path(tmp).unlink(missing_ok=True)


@functools.cache
def _kernel_manager_class() -> type:
    """nbclient's kernel manager, keeping each instance in :data:`KERNELS`."""
    from jupyter_client import AsyncKernelManager

    class TrackedKernelManager(AsyncKernelManager):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            KERNELS.add(self)

    return TrackedKernelManager


def kill_kernels() -> None:
    """Kill the kernels of :data:`KERNELS` at once (their process groups): an interrupted
    run needs nothing more from them, and a kernel killed says nothing on the console."""
    for manager in list(KERNELS):
        provisioner = getattr(manager, "provisioner", None)
        process = getattr(provisioner, "process", None)
        if process is None or process.poll() is not None:
            continue
        with contextlib.suppress(OSError):
            if getattr(provisioner, "pgid", None) and hasattr(os, "killpg"):
                os.killpg(provisioner.pgid, signal.SIGKILL)
            else:
                process.kill()


def outputs(nb: Notebook, reports_dir: Path) -> dict[str, Path]:
    """The files a notebook's run leaves in ``reports_dir``."""
    run_name = str(nb.value("run_name") or nb.name)
    return {
        "ipynb": reports_dir / f"{nb.name}.ipynb",
        "html": reports_dir / f"{nb.name}.html",
        "code_html": reports_dir / f"{nb.name}.code.html",
        "metrics": reports_dir / f"{run_name}.metrics.json",
    }


def run_notebook(nb: Notebook, reports_dir: Path, kernel: str | None, engine: str) -> None:
    """Execute ``nb`` with papermill, then render its reports; failures go into ``nb.error``."""
    import papermill

    files = outputs(nb, reports_dir)
    started = time.monotonic()
    try:
        papermill.execute_notebook(
            nb.node,
            str(files["ipynb"]),
            parameters=nb.parameters,
            kernel_name=kernel,
            engine_name=engine,
            cwd=str(Path.cwd()),
            progress_bar=sys.stderr.isatty(),
            kernel_manager_class=_kernel_manager_class(),
        )
    except Exception as exc:  # a cell error, a dead or missing kernel, a full disk
        nb.error = describe_error(exc)
    nb.seconds = time.monotonic() - started
    nb.metrics = read_metrics(files["metrics"])
    try:
        render_reports(nb, files)
    except Exception as exc:  # a full disk, an unreadable partial notebook
        nb.error = "; ".join(filter(None, [nb.error, f"report not written: {describe_error(exc)}"]))
    nb.status = "failed" if nb.error else "ok"


def read_metrics(path: Path) -> dict | None:
    """The notebook's metrics JSON (written by ``report.write_metrics``), or None."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def render_reports(nb: Notebook, files: dict[str, Path]) -> None:
    """Write ``<name>.html`` (summary on top, set-up inputs hidden) and ``<name>.code.html``."""
    import nbformat
    from nbconvert import HTMLExporter
    from traitlets.config import Config

    if files["ipynb"].is_file():
        notebook = nbformat.read(str(files["ipynb"]), as_version=4)
    else:
        notebook = nbformat.from_dict(nb.node)  # the kernel never started: show the source
    drop_native_log_lines(notebook)
    for cell in notebook.cells:  # set-up: every code cell up to the parameters cell
        tags = cell.setdefault("metadata", {}).setdefault("tags", [])
        if cell.cell_type == "code":
            tags.append("setup")
        if "parameters" in tags:
            break
    for key, hide, other in (("html", True, "code_html"), ("code_html", False, "html")):
        config = Config({"TagRemovePreprocessor": {"enabled": hide, "remove_input_tags": set(HIDDEN_INPUT_TAGS)}})
        exporter = HTMLExporter(
            config=config, template_name="pneumo_report", extra_template_basedirs=[str(TEMPLATES)]
        )
        summary = report_summary(nb)
        summary.update(other_href=files[other].name, other_label="all code" if hide else "short version")
        body, _ = exporter.from_notebook_node(
            notebook, resources={"metadata": {"name": nb.name}, "pneumo": summary}
        )
        write_atomic(files[key], body)


def drop_native_log_lines(notebook) -> None:
    """Remove :data:`NATIVE_LOG_LINE` lines from every stream output, in place (the executed
    ``.ipynb`` beside the report keeps them)."""
    for cell in notebook.cells:
        outputs = []
        for output in cell.get("outputs", []):
            if output.get("output_type") == "stream":
                lines = [line for line in output["text"].splitlines(keepends=True)
                         if not NATIVE_LOG_LINE.match(line.rstrip("\r\n"))]
                if not lines:
                    continue
                output["text"] = "".join(lines)
            outputs.append(output)
        if "outputs" in cell:
            cell["outputs"] = outputs


# --------------------------------------------------------------------------- metrics


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
    from pneumo_utils.tasks import DEFAULT_TASK, TASKS

    text = str(value or BEST_TASK)
    name = text.removeprefix(f"{BEST_TASK}:")
    if name in TASKS:
        return BEST_TASK if name == DEFAULT_TASK else f"{BEST_TASK}:{name}"
    return text


def task_title(task: str) -> str:
    """A task key in words, the title of its table on the index."""
    from pneumo_utils.tasks import DEFAULT_TASK, TASKS

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
        "best": False,
    }


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
    pneumo_utils.calibrate``, in its own process: TensorFlow stays out of the runner).

    Writes ``<stem>.calibrated.keras`` beside the model (threshold and temperature fitted on
    ``external``, the weights unchanged) and returns the calibration record, or ``None``
    (with one line on stderr) when calibration failed; the pointer then names the model as
    trained.
    """
    model = Path(str(best["model_path"]))
    out = model.with_name(f"{model.stem}.calibrated.keras")
    done = subprocess.run([sys.executable, "-m", "pneumo_utils.calibrate", "--model", str(model), "--data",
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
    write_atomic(path, json.dumps(pointer, indent=2) + "\n")
    return path


# --------------------------------------------------------------------------- index


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


def roc_curves(rows: Sequence[dict]) -> list[dict]:
    """SVG polylines (300 px square) for rows whose metrics carry ROC points."""
    curves = []
    for row in rows:
        roc = row["roc"]
        if not isinstance(roc, dict) or not isinstance(roc.get("fpr"), list) or not isinstance(roc.get("tpr"), list):
            continue
        pairs = [(f, t) for f, t in zip(roc["fpr"], roc["tpr"], strict=False) if number(f) is not None and number(t) is not None]
        step = max(1, len(pairs) // 200)
        points = " ".join(f"{300 * f:.1f},{300 * (1 - t):.1f}" for f, t in pairs[::step] + pairs[-1:])
        if points:
            colour = COLOURS[len(curves) % len(COLOURS)]
            curves.append({"label": f"{row['name']} (AUC {row['test']['auc'].split(' ')[0]})", "points": points, "colour": colour})
    return curves


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
            "roc": roc_curves(mine),
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
        files = outputs(nb, reports_dir)
        listing.append({
            "name": nb.name,
            "of": nb.of,
            "status": nb.status,
            "seconds": f"{nb.seconds:.0f}" if nb.status in ("ok", "failed") else "",
            "error": nb.error or "",
            "parameters": {k: json.dumps(v) for k, v in nb.parameters.items()},
            **{k: files[k].name if files[k].is_file() else None for k in ("html", "code_html", "ipynb")},
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
    rules = {chosen["rule"] for chosen in best.values()}
    picks = [
        f"{task_title(task)}: {chosen['name']} (test {'macro AUC' if chosen['argmax'] else 'AUC'} "
        f"{chosen['test']['auc']}" + (f"; by {chosen['rule']})" if len(rules) > 1 else ")")
        for task, chosen in best.items()
    ]
    if picks:
        summary += (" Best per task" + (f", by {rules.pop()}" if len(rules) == 1 else "") + ": "
                    + "; ".join(picks) + ".")
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(TEMPLATES)), autoescape=True)
    page = env.get_template("index.html.j2").render(
        run={**run, "summary": summary},
        notebooks=listing,
        tables=model_tables(rows, best),
        best_note=run.get("best_note"),
        settings=run["settings"],
        versions=library_versions(),
        disclaimer=DISCLAIMER,
    )
    write_atomic(reports_dir / "index.html", page)
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
                      "parameters": nb.parameters, "metrics": nb.metrics}
            for nb in notebooks
        },
    }
    write_atomic(reports_dir / "summary.json", json.dumps(record, indent=2, default=str))


# --------------------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m pneumo_utils.runner`` (and ``run_all.sh``)."""
    env = os.environ.get
    p = argparse.ArgumentParser(
        prog="python -m pneumo_utils.runner",
        description="Execute the pneumo notebooks with papermill and write HTML reports.",
    )
    p.add_argument("--profile", default=env("PNEUMO_PROFILE", "full"),
                   help="profiles/NAME.yaml, a YAML path, or 'none' (default: %(default)s)")
    p.add_argument("--notebooks", nargs="+", metavar="NB",
                   help="prefixes (01) or names of notebooks (with their runs) or of runs; default: all")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="[NB.]KEY=VALUE",
                   help="override a declared parameter; VALUE is a YAML literal (null = None)")
    p.add_argument("--data-root", default=env("PNEUMO_DATA_ROOT"), help="Kermany folder")
    p.add_argument("--nih-root", default=env("PNEUMO_NIH_ROOT"), help="NIH ChestX-ray14 folder")
    p.add_argument("--weights-dir", default=env("PNEUMO_WEIGHTS_DIR"), help="ImageNet .h5 files")
    p.add_argument("--external-dir", default=env("PNEUMO_EXTERNAL_DIR"),
                   help="labelled external validation folder {NORMAL,PNEUMONIA}/ (default: "
                        "data/chest_xray_external, then ../shared/data/chest_xray_official_test_a)")
    p.add_argument("--reports-dir", help="default: the profile's reports_dir, else reports")
    p.add_argument("--notebooks-dir", default="notebooks", help="default: %(default)s")
    p.add_argument("--offline", action="store_true", default=env("PNEUMO_OFFLINE") == "1",
                   help="never download data; fail at once when it is missing")
    p.add_argument("--prepare-only", metavar="DIR",
                   help="write the parameterised notebooks and runs to DIR (for nbval); execute nothing")
    p.add_argument("--kernel", help="kernel name (default: each notebook's kernelspec)")
    return p


def locks(folders: Sequence[Path]) -> contextlib.ExitStack:
    """Hold ``.runner.lock`` in each folder; :class:`UsageError` when another run holds one."""
    from filelock import FileLock, Timeout

    stack = contextlib.ExitStack()
    for folder in dict.fromkeys(f.resolve() for f in folders):
        folder.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(folder / ".runner.lock"), timeout=0)
        try:
            stack.enter_context(lock)
        except Timeout:
            stack.close()
            raise UsageError(
                f"another run is writing to {folder} (its lock {folder / '.runner.lock'} is held); "
                "wait for it to finish, or give this run other folders (--reports-dir, "
                "--set models_dir=...)"
            ) from None
    return stack


def raise_interrupt(signum: int, frame: Any) -> None:
    """SIGINT and SIGTERM: kill the kernel (:func:`kill_kernels`), raise ``KeyboardInterrupt``.

    The kernel goes first because nbclient, unwinding, asks a live kernel to shut down
    while its cell still runs, and the kernel then prints ZMQ tracebacks to the console."""
    kill_kernels()
    raise KeyboardInterrupt(signal.Signals(signum).name)


def mark_summary(reports_dir: Path, state: str, error: str) -> bool:
    """Set ``state`` and ``error`` in ``reports_dir/summary.json``; False when that fails.

    On a full disk a new file may not fit, so the last try rewrites the old one in place
    with the compact record, which is never longer than the indented one it replaces.
    """
    path = reports_dir / "summary.json"
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        record.update(state=state, error=error)
        try:
            write_atomic(path, json.dumps(record, indent=2, default=str))
        except OSError:
            compact = json.dumps(record, separators=(",", ":"), default=str).encode()
            if len(compact) > path.stat().st_size:
                return False
            with path.open("r+b") as handle:
                handle.write(compact)
                handle.truncate()
    except (OSError, ValueError, AttributeError):
        return False
    return True


def interrupted(notebooks: Sequence[Notebook], reports_dir: Path, run: dict) -> None:
    """After Ctrl-C or SIGTERM: kill the kernel, mark what did not finish, write the index.

    Further signals are ignored meanwhile (they are restored by :class:`RunGuard`), so a
    second Ctrl-C cannot leave the index half-written."""
    with contextlib.suppress(ValueError):  # signals can only be set in the main thread
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)
    kill_kernels()
    for nb in notebooks:
        if nb.status in ("running", "pending"):
            nb.status = "interrupted"
    run.update(state="interrupted", finished=dt.datetime.now().astimezone().strftime("%H:%M"))
    write_index(notebooks, reports_dir, run, {})
    print(f"interrupted: {reports_dir / 'index.html'} says which notebooks finished", file=sys.stderr)


class RunGuard(contextlib.AbstractContextManager):
    """Around the notebooks' loop and the final records: SIGINT and SIGTERM interrupt
    (:func:`raise_interrupt`, then :func:`interrupted`, status 130), and an ``OSError`` from
    writing the index, ``summary.json`` or ``best.json`` (a full disk) is one line naming
    the folder, status 1, and a last try at marking ``summary.json`` (:func:`mark_summary`),
    instead of a traceback that leaves the run "running". ``status`` is None when neither
    happened."""

    def __init__(self, notebooks: Sequence[Notebook], reports_dir: Path, run: dict) -> None:
        self.notebooks, self.reports_dir, self.run = notebooks, reports_dir, run
        self.status: int | None = None
        self.handlers: dict[int, Any] = {}

    def __enter__(self) -> RunGuard:
        with contextlib.suppress(ValueError):
            self.handlers = {sig: signal.signal(sig, raise_interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, kind, exc, traceback) -> bool:
        try:
            if isinstance(exc, KeyboardInterrupt):
                self.status = 130
                interrupted(self.notebooks, self.reports_dir, self.run)
            elif isinstance(exc, OSError):
                self.write_failed(exc)
            return isinstance(exc, KeyboardInterrupt | OSError)
        except OSError as error:
            self.write_failed(error)
            return True
        finally:
            for sig, handler in self.handlers.items():
                signal.signal(sig, handler)

    def write_failed(self, exc: OSError) -> None:
        """One line naming the folder that could not be written; ``summary.json`` marked."""
        folder = Path(exc.filename).parent if exc.filename else self.reports_dir
        self.status = self.status or 1
        state = "interrupted" if self.status == 130 else "failed"
        marked = mark_summary(self.reports_dir, state, f"could not write the run's records: {describe_error(exc)}")
        print(f"error: could not write the run's records in {folder} ({exc.strerror or exc}); free space "
              "there or choose other folders, then run again"
              + ("" if marked else f"; {self.reports_dir / 'summary.json'} may still say running"),
              file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the selected notebooks; 0 when all ran, 1 when any failed, 2 on bad usage or data."""
    args = build_parser().parse_args(argv)
    try:
        profile = load_profile(args.profile)
        sets = parse_sets(args.sets)
        everything = add_runs(read_notebooks(Path(args.notebooks_dir)), profile.get("runs") or {})
        for selector in args.notebooks or []:
            if not any(matches(nb.name, selector) for nb in everything):
                raise UsageError(f"--notebooks {selector}: no such notebook or run ({', '.join(nb.name for nb in everything)})")
        selected = [nb for nb in everything if not args.notebooks or any(nb.selected_by(s) for s in args.notebooks)]
        assign_parameters(everything, profile, sets, {})  # checks every key before looking for data
        needs: dict[str, list[str]] = {}
        for nb in selected:
            if "data_dir" in nb.declared and "data_dir" not in nb.parameters:
                needs.setdefault(need_of(nb), []).append(nb.name)
        roots = {"kermany": args.data_root, "nih": args.nih_root}
        data = fetch.find_all(needs, roots, offline=args.offline)
        if any("external_dir" in nb.declared for nb in selected):
            external = fetch.locate("external", args.external_dir)
            if external is not None:
                data["external"] = external
        assign_parameters(everything, profile, sets, data)
        settings = {**RUNNER_KEYS, **profile.get("runner", {})}
        if set(settings) != set(RUNNER_KEYS):
            raise UsageError(f"profile runner section: known keys are {', '.join(RUNNER_KEYS)}")
        reports_dir = Path(args.reports_dir or settings["reports_dir"])
        for nb in selected:
            if "reports_dir" in nb.declared:
                nb.parameters["reports_dir"] = str(reports_dir)
        if args.prepare_only:
            return prepare(selected, Path(args.prepare_only), args.kernel)
        models_dirs = sorted({Path(str(nb.value("models_dir"))) for nb in selected if "models_dir" in nb.declared})
        lock = locks([reports_dir, *models_dirs])
    except (UsageError, fetch.FetchError) as exc:
        print(f"error: {str(exc).removeprefix('error: ')}", file=sys.stderr)
        return 2

    weights_dir = args.weights_dir or fetch.weights_dir()
    if weights_dir:
        os.environ["PNEUMO_WEIGHTS_DIR"] = str(Path(weights_dir).resolve())
    for key, value in KERNEL_ENV.items():
        os.environ.setdefault(key, value)
    run = {
        "state": "running",
        "profile": args.profile,
        "commit": git_commit(),
        "started": dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        "finished": None,
        "settings": {
            "command": "python -m pneumo_utils.runner " + " ".join(sys.argv[1:] if argv is None else argv),
            **{f"data ({k})": str(v) for k, v in data.items()},
            **({} if "external" in data else {
                "data (external)": "none found: models are not scored on external validation"}),
            "ImageNet weights folder": os.environ.get("PNEUMO_WEIGHTS_DIR", "(Keras download)"),
            "reports": str(reports_dir),
            "models": ", ".join(map(str, models_dirs)) or "–",
        },
    }
    if settings["record_best"] and len(models_dirs) > 1:
        run["best_note"] = (f"its notebooks write models to {len(models_dirs)} folders "
                            f"({', '.join(map(str, models_dirs))}); best.json needs one models_dir")
    engine = _section_engine()
    with lock, RunGuard(selected, reports_dir, run) as guard:
        for nb in selected:
            for path in outputs(nb, reports_dir).values():
                path.unlink(missing_ok=True)
        write_index(selected, reports_dir, run, {})
        for i, nb in enumerate(selected, start=1):
            nb.status = "running"
            write_index(selected, reports_dir, run, {})
            print(f"[{i}/{len(selected)}] {nb.name} ...", flush=True)
            run_notebook(nb, reports_dir, args.kernel, engine)
            verdict = "ok" if nb.status == "ok" else f"FAILED: {nb.error}"
            print(f"[{i}/{len(selected)}] {nb.name} {verdict} ({nb.seconds:.0f} s)", flush=True)
            write_index(selected, reports_dir, run, {})
        best = choose_best_per_task(selected) if settings["record_best"] and len(models_dirs) == 1 else {}
        for chosen in best.values():
            if "external" in data:
                chosen["calibration"] = calibrate_best(chosen, data["external"])
            chosen["pointer"] = str(write_best(chosen, models_dirs[0]))
        if not settings["record_best"]:
            run["best_note"] = "best.json and best.<task>.json are only set by a full run"
        run.update(state="finished", finished=dt.datetime.now().astimezone().strftime("%H:%M"))
        write_index(selected, reports_dir, run, best)
    if guard.status is not None:
        return guard.status
    failed = [nb.name for nb in selected if nb.status != "ok"]
    print(f"\nreports: {reports_dir / 'index.html'}")
    for task, chosen in best.items():
        print(f"best model ({task_title(task)}): {chosen['pointer']}")
    if settings["record_best"] and len(models_dirs) > 1:
        print(f"warning: no best.json written: {run['best_note']}", file=sys.stderr)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


def prepare(notebooks: Sequence[Notebook], out_dir: Path, kernel: str | None) -> int:
    """Write each notebook with its parameters injected to ``out_dir`` (nothing executed)."""
    import papermill

    out_dir.mkdir(parents=True, exist_ok=True)
    for nb in notebooks:
        target = out_dir / f"{nb.name}.ipynb"
        papermill.execute_notebook(nb.node, str(target), parameters=nb.parameters,
                                   kernel_name=kernel, prepare_only=True, progress_bar=False)
        print(f"prepared {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
