"""Hostile inputs against the commands, each run as its own process under a 3 GiB
address-space cap (``prlimit --as``) and a 120 s limit: exit status, peak resident memory of
the process tree (psutil, polled every 50 ms), seconds, and the last line of stderr.

The cases live in ``benchmarks/hostile_cases/<area>.py`` (a list ``CASES`` of :class:`Case`);
each builds its inputs in a fresh folder and returns the command line to run there.

    python benchmarks/hostile_inputs.py                      # every case, this checkout
    python benchmarks/hostile_inputs.py --area shards        # one area
    python benchmarks/hostile_inputs.py --checkout ../old    # the same inputs, another checkout

``--checkout`` runs the commands with another checkout of pneumo first on ``PYTHONPATH``, so
the same inputs give a before/after table. Prints one Markdown table row per case.
"""

from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
ADDRESS_SPACE_CAP = 3 * 2**30
"""Bytes of virtual memory each command may map (``prlimit --as``)."""
TIME_LIMIT_S = 120.0
"""Seconds before a command is killed (reported as exit ``timeout``)."""


@dataclass(frozen=True)
class Case:
    """One hostile input. ``build(folder)`` writes the inputs under ``folder`` and returns the
    command's arguments after ``python`` (e.g. ``[*command("evaluate"), ...]``)."""

    area: str
    name: str
    build: Callable[[Path], list[str]]


@dataclass(frozen=True)
class Outcome:
    """What a case's command did: exit status (``None`` when killed at the time limit), peak
    resident MB of the process and its children, seconds, last non-empty stderr line."""

    exit: int | None
    peak_mb: float
    seconds: float
    last_line: str


CHECKOUT = ROOT
"""The checkout whose code runs the commands (``--checkout``)."""


def command(name: str) -> list[str]:
    """``python`` arguments that run pneumo command ``name`` in :data:`CHECKOUT`: ``-m
    pneumo_utils NAME``, or ``-m pneumo_utils.NAME`` in a checkout older than the ``pneumo``
    command (so that the same case measures both)."""
    if (CHECKOUT / "pneumo_utils" / "__main__.py").is_file():
        return ["-m", "pneumo_utils", name]
    return ["-m", f"pneumo_utils.{name.replace('-', '_')}"]


def measure(argv: list[str], cwd: Path, checkout: Path = ROOT,
            time_limit_s: float = TIME_LIMIT_S) -> Outcome:
    """Run ``python *argv`` in ``cwd`` with ``checkout`` first on ``PYTHONPATH``, capped."""
    env = dict(os.environ, PYTHONPATH=str(checkout), TF_CPP_MIN_LOG_LEVEL="3")
    cmd = ["prlimit", f"--as={ADDRESS_SPACE_CAP}", sys.executable, *argv]
    start = time.monotonic()
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=err)
        peak, status = 0, None
        parent = psutil.Process(proc.pid)
        while True:
            try:
                tree = [parent, *parent.children(recursive=True)]
                peak = max(peak, sum(p.memory_info().rss for p in tree))
            except psutil.Error:
                pass
            status = proc.poll()
            if status is not None:
                break
            if time.monotonic() - start > time_limit_s:
                proc.kill()
                proc.wait()
                status = None
                break
            time.sleep(0.05)
        seconds = time.monotonic() - start
        err.seek(0)
        lines = [line for line in err.read().decode(errors="replace").splitlines() if line.strip()]
    return Outcome(status, peak / 2**20, seconds, lines[-1].strip() if lines else "")


def all_cases(area: str | None = None) -> list[Case]:
    """Every case of ``benchmarks/hostile_cases`` (or of one ``area``)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    cases = []
    for info in pkgutil.iter_modules([str(Path(__file__).resolve().parent / "hostile_cases")]):
        if area is None or info.name == area:
            cases += importlib.import_module(f"hostile_cases.{info.name}").CASES
    return cases


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--area", help="only the cases of benchmarks/hostile_cases/AREA.py")
    parser.add_argument("--case", help="only cases whose name contains this text")
    parser.add_argument("--checkout", type=Path, default=ROOT,
                        help="pneumo checkout whose code runs the commands (default: this one)")
    args = parser.parse_args(argv)
    global CHECKOUT
    CHECKOUT = args.checkout.resolve()
    sys.modules.setdefault("hostile_inputs", sys.modules[__name__])  # the cases read CHECKOUT
    cases = [c for c in all_cases(args.area) if not args.case or args.case in c.name]
    print(f"checkout {args.checkout}; cap {ADDRESS_SPACE_CAP / 2**30:.0f} GiB address space, "
          f"{TIME_LIMIT_S:.0f} s\n")
    print("| area | case | exit | peak MB | s | last line of stderr |\n|---|---|---|---|---|---|")
    for case in cases:
        with tempfile.TemporaryDirectory(prefix="hostile-") as tmp:
            folder = Path(tmp)
            outcome = measure(case.build(folder), cwd=folder, checkout=args.checkout.resolve())
        status = "timeout" if outcome.exit is None else outcome.exit
        line = outcome.last_line[:140].replace("|", "\\|")
        print(f"| {case.area} | {case.name} | {status} | {outcome.peak_mb:,.0f} | "
              f"{outcome.seconds:.1f} | {line} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
