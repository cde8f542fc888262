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
import contextlib
import datetime as dt
import functools
import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

from pneumo_utils import files
from pneumo_utils.data import fetch
from pneumo_utils.runner.index_page import (
    TEMPLATES,
    git_commit,
    report_summary,
    task_title,
    write_index,
)
from pneumo_utils.runner.plan import (
    RUNNER_KEYS,
    Notebook,
    UsageError,
    add_runs,
    assign_parameters,
    load_profile,
    matches,
    need_of,
    outputs,
    parse_sets,
    read_notebooks,
)
from pneumo_utils.runner.selection import calibrate_best, choose_best_per_task, write_best

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


KERNELS: weakref.WeakSet = weakref.WeakSet()
"""The kernel managers of the notebooks being run, so an interrupted run can stop its kernel."""


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


@functools.cache
def _kernel_manager_class() -> type:
    """nbclient's kernel manager, keeping each instance in :data:`KERNELS`, whose shutdown
    sends the kernel no SIGINT.

    ``jupyter_client``'s ``shutdown_kernel`` interrupts the kernel before asking it to shut
    down, to stop a running cell. A notebook's kernel is shut down only when papermill has
    every cell's reply (an interrupted run kills it, :func:`kill_kernels`), so there is no cell
    to stop; the SIGINT lands in whatever message the kernel still handles, and ipykernel
    prints ``[IPKernelApp] ERROR | KeyboardInterrupt caught in kernel.`` on the console.
    """
    from jupyter_client import AsyncKernelManager

    class TrackedKernelManager(AsyncKernelManager):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            KERNELS.add(self)

        async def _async_interrupt_kernel(self) -> None:
            if not self.shutting_down:
                await super()._async_interrupt_kernel()

        async def _async_launch_kernel(self, kernel_cmd: list[str], **kw: Any) -> None:
            kw["stderr"] = subprocess.PIPE
            await super()._async_launch_kernel(kernel_cmd, **kw)
            threading.Thread(target=forward_stderr, args=(self.provisioner.process.stderr,),
                             daemon=True).start()

    return TrackedKernelManager


def forward_stderr(stream: IO[bytes], to: IO[str] | None = None) -> None:
    """Copy a kernel's own stderr (C-level writes; what its cells print reaches the notebook)
    to ``to`` (default: the runner's stderr), less TensorFlow's native log lines
    (:data:`NATIVE_LOG_LINE`), which would otherwise fill the console of a run."""
    with stream:
        for raw in iter(stream.readline, b""):
            line = raw.decode(errors="replace").rstrip("\n")
            if not NATIVE_LOG_LINE.match(line):
                print(line, file=to or sys.stderr, flush=True)


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


def _settled_parameters(record: logging.LogRecord) -> bool:
    """Drop papermill's "Passed unknown parameter" warning: papermill looks only at the cell
    tagged ``parameters``, while a notebook's ``settings`` cell declares the rest, and
    :mod:`pneumo_utils.runner.plan` has checked every key against both cells already."""
    return not record.getMessage().startswith("Passed unknown parameter")


def _quiet_settled_parameters() -> None:
    """Attach :func:`_settled_parameters` to papermill's logger (once)."""
    papermill_log = logging.getLogger("papermill")
    if _settled_parameters not in papermill_log.filters:
        papermill_log.addFilter(_settled_parameters)


def run_notebook(nb: Notebook, reports_dir: Path, kernel: str | None, engine: str) -> None:
    """Execute ``nb`` with papermill, then render its reports; failures go into ``nb.error``."""
    import papermill

    _quiet_settled_parameters()

    paths = outputs(nb, reports_dir)
    started = time.monotonic()
    try:
        papermill.execute_notebook(
            nb.node,
            str(paths["ipynb"]),
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
    nb.metrics, nb.metrics_problem = read_metrics(paths["metrics"])
    try:
        render_reports(nb, paths)
    except Exception as exc:  # a full disk, an unreadable partial notebook
        nb.error = "; ".join(filter(None, [nb.error, f"report not written: {describe_error(exc)}"]))
    nb.status = "failed" if nb.error else "ok"


MAX_METRICS_BYTES = 2 * 2**20
"""Largest metrics JSON the index reads: a real one is tens of KB (two models with their ROC
points and bootstrap intervals are under 150 KB)."""

MAX_METRICS_DEPTH = 32
"""Deepest nesting of a metrics JSON the index reads (a real one is 7 deep), checked before
parsing so that the parser never recurses into a hostile file."""

MAX_METRICS_MODELS = 50
"""Most model entries in one metrics JSON (a notebook writes one to a few): each is a row of a
table on the index."""


def read_metrics(path: Path) -> tuple[dict | None, str | None]:
    """The notebook's metrics JSON (written by ``report.save_run``) and why it is not shown.

    ``(None, None)`` when there is no file; ``(None, reason)`` when the file is beyond
    :data:`MAX_METRICS_BYTES`, :data:`MAX_METRICS_DEPTH` or :data:`MAX_METRICS_MODELS`, or is not
    a JSON object: the index says so and the run goes on.
    """
    try:
        with path.open("rb") as handle:
            raw = handle.read(MAX_METRICS_BYTES + 1)
    except FileNotFoundError:
        return None, None
    except OSError as exc:
        return None, f"{path.name} cannot be read ({exc.strerror or exc})"
    if len(raw) > MAX_METRICS_BYTES:
        return None, f"{path.name} is larger than {MAX_METRICS_BYTES // 2**20} MiB"
    text = raw.decode("utf-8", errors="replace")
    if files.json_depth(text) > MAX_METRICS_DEPTH:
        return None, f"{path.name} is nested deeper than {MAX_METRICS_DEPTH} levels"
    try:
        data = json.loads(text)
    except ValueError as exc:
        return None, f"{path.name} is not JSON ({exc})"
    if not isinstance(data, dict):
        return None, f"{path.name} is not a JSON object"
    models = data.get("models")
    if isinstance(models, list) and len(models) > MAX_METRICS_MODELS:
        return None, f"{path.name} lists {len(models):,} models, more than {MAX_METRICS_MODELS}"
    return data, None


def render_reports(nb: Notebook, paths: dict[str, Path]) -> None:
    """Write ``<name>.html`` (summary on top, set-up inputs hidden) and ``<name>.code.html``."""
    import nbformat
    from nbconvert import HTMLExporter
    from traitlets.config import Config

    if paths["ipynb"].is_file():
        notebook = nbformat.read(str(paths["ipynb"]), as_version=4)
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
        config = Config({"TagRemovePreprocessor": {"enabled": hide, "remove_input_tags": set(HIDDEN_INPUT_TAGS)},
                         "NbConvertBase": {"display_data_priority": REPORT_DATA_PRIORITY}})
        exporter = HTMLExporter(
            config=config, template_name="pneumo_report", extra_template_basedirs=[str(TEMPLATES)]
        )
        summary = report_summary(nb)
        summary.update(other_href=paths[other].name, other_label="all code" if hide else "short version")
        body, _ = exporter.from_notebook_node(
            notebook, resources={"metadata": {"name": nb.name}, "pneumo": summary}
        )
        files.write_text_atomic(paths[key], body)


REPORT_DATA_PRIORITY = ["text/html", "text/markdown", "image/svg+xml", "image/png", "image/jpeg",
                        "text/latex", "text/plain"]
"""What a report shows of an output, first match wins: nbconvert's order without widget views
and JavaScript. A report has no kernel to drive a widget, so an output that carries a static
``text/html`` version (the explorer, :mod:`pneumo_utils.explain.explorer`) shows that."""


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
            files.write_text_atomic(path, json.dumps(record, indent=2, default=str))
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

    _quiet_settled_parameters()
    out_dir.mkdir(parents=True, exist_ok=True)
    for nb in notebooks:
        target = out_dir / f"{nb.name}.ipynb"
        papermill.execute_notebook(nb.node, str(target), parameters=nb.parameters,
                                   kernel_name=kernel, prepare_only=True, progress_bar=False)
        print(f"prepared {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
