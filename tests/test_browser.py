"""In a real browser: JupyterLab runs a notebook ``.py`` top to bottom and its explorer widget
responds, and the rendered reports lead with the external-validation figures.

Chromium is Debian's ``chromium`` package, driven by Playwright (its own browser download is not
reachable offline); ``.ci/run`` installs it. Notebook 03 runs with the smoke profile's settings on
generated data, prepared by the runner as ``./run_tests.sh`` prepares nbval's notebooks, then
written back as a jupytext ``.py`` that JupyterLab opens as a notebook. Screenshots go to
``build/browser/``.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "build" / "browser"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
pytestmark = [pytest.mark.slow, pytest.mark.browser]


@pytest.fixture(scope="module")
def chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.skip("Chromium is not installed (apt-get install chromium; .ci/run does it)")
    pytest.importorskip("playwright.sync_api", reason="pip install playwright (the dev extra has it)")
    return path


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> dict[str, Path]:
    """Generated data and notebook 03 prepared with the smoke profile, as a jupytext ``.py``."""
    import jupytext
    from synthetic import make_kermany_like

    work = tmp_path_factory.mktemp("browser")
    data = make_kermany_like(work / "kermany", n_train_per_class=16, n_val_per_class=4, n_test_per_class=8,
                             image_size=64, seed=0)
    external = make_kermany_like(work / "external", n_train_per_class=2, n_val_per_class=2,
                                 n_test_per_class=10, image_size=64, seed=1) / "test"
    shutil.rmtree(OUT, ignore_errors=True)  # no paired .ipynb of an earlier run to take outputs from
    OUT.mkdir(parents=True)
    reports = work / "reports"
    import yaml

    from pneumo_utils.runner import plan

    profile = {k: v for k, v in plan.load_profile("smoke").items() if k != "runs"}  # notebook 03 alone
    (work / "profile.yaml").write_text(yaml.safe_dump(profile))
    common = ["--profile", str(work / "profile.yaml"), "--offline", "--notebooks", "03", "--data-root", str(data),
              "--external-dir", str(external), "--reports-dir", str(reports),
              "--set", f"models_dir={work / 'models'}", "--set", f"cache_dir={work / 'cache'}"]
    subprocess.run([sys.executable, "-m", "pneumo_utils.runner", *common, "--prepare-only", str(work / "nb")],
                   cwd=ROOT, check=True, capture_output=True)
    notebook = work / "nb" / "03_mobilenetv2_finetune.ipynb"
    script = OUT / "03_smoke.py"
    jupytext.write(jupytext.read(notebook), script, fmt="py:percent")
    return {"work": work, "script": script, "common": common, "reports": reports}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def lab(prepared):
    """A JupyterLab server on the project root; yields its base URL with the token."""
    port, token = _free_port(), "pneumo-browser-test"
    settings = prepared["work"] / "lab-settings" / "@jupyterlab" / "notebook-extension"
    settings.mkdir(parents=True, exist_ok=True)
    # Every cell rendered, so every prompt can be read (JupyterLab renders only visible cells by default).
    (settings / "tracker.jupyterlab-settings").write_text(json.dumps({"windowingMode": "none"}))
    log = open(prepared["work"] / "lab.log", "w")  # noqa: SIM115 (closed below)
    server = subprocess.Popen(
        [sys.executable, "-m", "jupyter", "lab", "--no-browser", f"--port={port}", "--ip=127.0.0.1",
         f"--ServerApp.token={token}", f"--ServerApp.root_dir={ROOT}", "--ServerApp.allow_root=True"],
        cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
        env={**os.environ, "JUPYTERLAB_SETTINGS_DIR": str(prepared["work"] / "lab-settings")})
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(120):
            try:
                urllib.request.urlopen(f"{url}/api/status?token={token}", timeout=2)
                break
            except OSError:
                if server.poll() is not None:
                    pytest.fail(f"jupyter lab exited: {(prepared['work'] / 'lab.log').read_text()[-2000:]}")
                time.sleep(0.5)
        yield url, token
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()


def test_jupyterlab_runs_the_notebook_and_the_explorer_responds(chromium, prepared, lab):
    from playwright.sync_api import TimeoutError as PlaywrightTimeout
    from playwright.sync_api import sync_playwright

    url, token = lab
    relative = prepared["script"].relative_to(ROOT).as_posix()
    started = time.perf_counter()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS, headless=True)
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        page.set_default_timeout(60_000)
        page.goto(f"{url}/lab/tree/{relative}?token={token}")
        page.wait_for_selector(".jp-NotebookPanel .jp-Cell", timeout=120_000)  # opened as a notebook
        dialog = page.locator(".jp-Dialog button", has_text="Select")  # a new .py may ask for its kernel
        try:
            dialog.click(timeout=20_000)
        except PlaywrightTimeout:
            pass
        page.wait_for_function("() => document.body.textContent.includes('Kernel status: Idle')",
                               timeout=120_000)
        page.locator(".lm-MenuBar-itemLabel", has_text="Run").first.click()
        page.locator("li.lm-Menu-item[data-command='runmenu:run-all']").click()
        deadline = time.time() + 600
        while time.time() < deadline:
            prompts = page.locator(".jp-CodeCell .jp-InputArea-prompt").all_inner_texts()
            running = any(t.strip() == "[*]:" for t in prompts)
            finished = prompts and prompts[-1].strip()[1:-2].isdigit()
            if finished and not running and page.evaluate("document.body.textContent.includes('Kernel status: Idle')"):
                break
            time.sleep(2)
        prompts = page.locator(".jp-CodeCell .jp-InputArea-prompt").all_inner_texts()
        page.screenshot(path=str(OUT / "jupyterlab-notebook.png"))
        assert prompts and all(t.strip()[1:-2].isdigit() for t in prompts), \
            f"not every cell ran (Run All stops at an error): {prompts}"
        outputs = " ".join(page.locator(".jp-OutputArea-output").all_inner_texts())
        assert "Traceback" not in outputs and "Error" not in outputs.split("Error gallery")[0].replace(
            "WeightsNotFoundError", ""), outputs[-3000:]
        table = page.locator(".jp-OutputArea-output table.pneumo-explorer").first
        table.scroll_into_view_if_needed()
        before = table.inner_text()
        assert page.locator(".widget-slider").count() >= 1
        changed = ("expected => { const t = document.querySelector('.jp-OutputArea-output table.pneumo-explorer');"
                   " return t && t.innerText.includes(expected); }")
        page.locator(".widget-slider .noUi-handle").first.press("Home")  # the slider to 0: every image positive
        page.wait_for_function(changed, arg="threshold 0.0000", timeout=60_000)
        after = table.inner_text()
        assert after != before and "specificity\t0.000" in after
        page.locator("button", has_text="model's own").first.click()  # a marked threshold puts it back
        page.wait_for_function(changed, arg=before.splitlines()[0].split("\t")[0].strip(), timeout=60_000)
        page.locator("button", has_text="show errors").first.click()
        page.wait_for_timeout(3000)
        table.scroll_into_view_if_needed()
        page.screenshot(path=str(OUT / "explorer.png"))
        browser.close()
    (OUT / "browser-test.json").write_text(json.dumps({"jupyterlab_seconds": round(time.perf_counter() - started, 1)}))


def test_reports_lead_with_the_external_figures(chromium, prepared):
    from playwright.sync_api import sync_playwright

    done = subprocess.run([sys.executable, "-m", "pneumo_utils.runner", *prepared["common"]], cwd=ROOT,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    reports = prepared["reports"]
    report = reports / "03_mobilenetv2_finetune.html"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS, headless=True)
        page = browser.new_page(viewport={"width": 1280, "height": 800})
        page.goto((reports / "index.html").as_uri())
        lead = page.locator("#headlines + p + .cards .card").first
        box = lead.bounding_box()
        assert box is not None and box["y"] < 800, box
        text = lead.inner_text()
        assert "External validation" in text and "auc" in text.lower()
        assert text.index("External validation") < text.index("Same-source")
        page.screenshot(path=str(OUT / "index-first-screen.png"))
        page.goto(report.as_uri())
        external = page.locator(".pneumo-external").first
        box = external.bounding_box()
        assert box is not None and box["y"] < 800, box
        assert "External validation" in external.inner_text()
        assert page.locator("table.pneumo-explorer").count() >= 1  # the explorer's static version
        page.screenshot(path=str(OUT / "report-first-screen.png"))
        browser.close()
