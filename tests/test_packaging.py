"""What the package needs at run time ships in its wheel (Colab and other non-editable
installs have no repository around the package)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from pneumo_utils.runner import plan

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "pneumo_utils"


def test_profiles_are_read_from_the_package():
    assert Path(str(plan.PROFILES)).parent == PACKAGE / "runner"
    assert plan.load_profile("smoke")["runner"]["reports_dir"] == "reports/smoke"


@pytest.mark.slow
def test_wheel_holds_the_profiles_and_templates(tmp_path):
    source = tmp_path / "source"  # a copy, so that the build leaves no build/ in the checkout
    shutil.copytree(PACKAGE, source / "pneumo_utils", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    done = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path / "dist"),
         str(source)],
        capture_output=True, text=True, timeout=600,
    )
    if done.returncode != 0 and "matching distribution" in done.stderr:
        pytest.skip(f"the build backend (setuptools) cannot be installed here: {done.stderr[-300:]}")
    assert done.returncode == 0, done.stderr
    (wheel,) = (tmp_path / "dist").glob("pneumo-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    needed = {path.relative_to(ROOT).as_posix() for folder in ("runner/profiles", "runner/templates",
                                                                "model/templates")
              for path in (PACKAGE / folder).rglob("*") if path.is_file()}
    needed |= {path.relative_to(ROOT).as_posix() for path in PACKAGE.rglob("*.py")}
    assert {"pneumo_utils/runner/profiles/full.yaml", "pneumo_utils/runner/profiles/smoke.yaml",
            "pneumo_utils/model/templates/model_card.md.j2"} <= needed
    assert needed <= names, sorted(needed - names)
