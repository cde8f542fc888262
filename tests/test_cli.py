"""The ``pneumo`` command: every command reachable by name, in its own process as a user runs
it (``python -m pneumo_utils COMMAND``, the same entry point as the ``pneumo`` script)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from pneumo_utils import cli


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pneumo_utils", *args], capture_output=True,
                          text=True, timeout=120)


def test_help_lists_every_command_and_a_wrong_name_is_one_line() -> None:
    shown = _run("--help")
    assert shown.returncode == 0
    assert all(f"  {name}" in shown.stdout for name in cli.COMMANDS)
    wrong = _run("predictt")
    assert wrong.returncode == 2 and wrong.stderr.strip().splitlines() == [
        "error: unknown command 'predictt'; one of: " + ", ".join(cli.COMMANDS) + " (pneumo --help)"]
    assert _run().returncode == 2


@pytest.mark.parametrize("name", sorted(cli.COMMANDS))
def test_each_command_answers_its_help(name: str) -> None:
    done = _run(name, "--help")
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("usage:")


def test_a_command_answers_bad_input_in_one_line(tmp_path) -> None:
    done = _run("shards", "--data-root", str(tmp_path), "--out", str(tmp_path / "s"),
                "--image-size", "100000")
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].startswith("error: --image-size 100000 px")
