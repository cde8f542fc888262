"""Calibrate refuses operating points no one can use."""

from __future__ import annotations

from pathlib import Path

from hostile_inputs import Case


def _rule(rule: str):
    def build(folder: Path) -> list[str]:
        return ["-m", "pneumo_utils", "calibrate", "--model", str(folder / "absent.keras"),
                "--data", str(folder), "--rule", rule, "--out", str(folder / "x.keras")]
    return build


CASES = [Case("calibrate", f"--rule {rule}", _rule(rule)) for rule in ("fixed:5", "fixed:nan")]
