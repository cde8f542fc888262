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


_PEAK_GROWTH: dict[str, float] = {}
"""MB by which each test raised the test process's peak resident memory (only tests that did)."""


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """Records how much a test (set-up and tear-down included) raised the peak resident memory."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    yield
    grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    if grown > 0:
        _PEAK_GROWTH[item.nodeid] = grown


def pytest_terminal_summary(terminalreporter) -> None:
    """Ends the run with the peak resident memory of the test process and the tests that raised
    it most: the suite should fit a 7 GB CI runner with room to spare, and a test that needs
    gigabytes should be easy to find."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    top = sorted(_PEAK_GROWTH.items(), key=lambda kv: -kv[1])[:3]
    raised = "; ".join(f"{name} +{mb:,.0f} MB" for name, mb in top)
    terminalreporter.write_line(f"peak resident memory of the test process: {own:,.0f} MB"
                                + (f" (raised most by {raised})" if raised else ""))
