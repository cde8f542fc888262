"""Shared fixtures: small generated data sets, so tests need neither network nor ../shared."""

from __future__ import annotations

import gc
import os
import resource
from collections.abc import Callable
from pathlib import Path

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


@pytest.fixture(scope="session")
def kermany_root(tmp_path_factory) -> Path:
    """A Kermany-layout synthetic data set (64 px), generated once per session."""
    from synthetic import make_kermany_like

    return make_kermany_like(tmp_path_factory.mktemp("kermany"), seed=0)


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """The read-only ../shared folder; tests using it skip with a message when it is absent."""
    if not (SHARED / "data").is_dir():
        pytest.skip(f"{SHARED} not found: shared data/weights tests need ../shared beside the repo")
    return SHARED


@pytest.fixture()
def error_line(capsys) -> Callable[[], str]:
    """Reads what a command printed on stderr and returns its one ``error: ...`` line,
    asserting there is exactly one and no traceback."""

    def read() -> str:
        captured = capsys.readouterr()
        lines = captured.err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
        assert "Traceback" not in captured.err
        return lines[0]

    return read


@pytest.fixture(autouse=True, scope="module")
def release_models():
    """Drops the Keras graphs and models a test module built once it is done: TensorFlow keeps
    every model ever built reachable from its global state, and a whole test session would
    otherwise hold them all at once."""
    yield
    import sys

    if "keras" in sys.modules:
        sys.modules["keras"].backend.clear_session(free_memory=True)
    gc.collect()


def pytest_terminal_summary(terminalreporter) -> None:
    """Ends the run with the peak resident memory of the test process (and of its children,
    e.g. notebook kernels): the suite should fit a 7 GB CI runner with room to spare."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    terminalreporter.write_line(f"peak resident memory: tests {own:,.0f} MB, largest child process {children:,.0f} MB")
