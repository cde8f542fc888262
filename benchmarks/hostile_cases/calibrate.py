"""Calibrate refuses operating points no one can use and writes only where it should: bad
rules, the runner's ``best.keras`` name, a planted symlink where the copy's model card goes.
Each case saves the tiny model of :mod:`hostile_cases.models` and a site of 12 grey PNGs per
class that the model separates imperfectly."""

from __future__ import annotations

from pathlib import Path

import hostile_inputs
from hostile_inputs import Case

from hostile_cases.models import _model, _site


def _calibrate(folder: Path, *options: str, out: str = "m.site.keras") -> list[str]:
    site = _site(folder / "site", 12, {"NORMAL": 118, "PNEUMONIA": 138})
    return [*hostile_inputs.command("calibrate"), "--model", str(_model(folder / "m.keras")),
            "--data", str(site), "--out", str(folder / out), "--n-boot", "200", *options]


def _rule(rule: str):
    return lambda folder: _calibrate(folder, "--rule", rule)


def _best(folder: Path) -> list[str]:
    (folder / "best.json").write_text('{"model": "m.keras"}', encoding="utf-8")
    return _calibrate(folder, out="best.keras")


def _planted_card(folder: Path) -> list[str]:
    """The copy's card ``m.site.md`` is a symlink to a file outside: it must be replaced, not
    followed (``outside.txt`` keeps its text; tests/test_model_card.py checks the content)."""
    outside = folder / "outside.txt"
    outside.write_text("not a model card\n", encoding="utf-8")
    (folder / "m.site.md").symlink_to(outside)
    return _calibrate(folder)


CASES = [
    *(Case("calibrate", f"--rule {rule}", _rule(rule))
      for rule in ("fixed:5", "fixed:-0.5", "fixed:nan", "sensitivity:2")),
    Case("calibrate", "--out best.keras beside best.json", _best),
    Case("calibrate", "card path is a planted symlink", _planted_card),
]
