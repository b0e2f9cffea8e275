"""A real browser: JupyterLab on a free localhost port, headless Chromium driven by
Playwright, opens ``04_senses.ipynb`` (pointed at the session's tiny Backpack), runs all cells
and checks that the SenseBrowser widget rendered and reacts to typing a word. A screenshot is
kept under ``$TEST_ARTIFACTS`` (default ``.cache/test-artifacts/``)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
ARTIFACTS = Path(os.environ.get("TEST_ARTIFACTS", ROOT / ".cache" / "test-artifacts"))

pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists(),
    reason=f"{CHROMIUM} is missing: install Debian's chromium (apt-get install -y chromium; .ci/run does)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def api(url: str, method: str = "GET") -> object:
    req = urllib.request.Request(url, method=method)
    with urllib.request.urlopen(req, timeout=5) as resp:
        body = resp.read()
    return json.loads(body) if body else None


@pytest.fixture()
def lab(tmp_path, tiny_backpack_run):
    """JupyterLab serving a folder that holds 04_senses.ipynb with its parameters pointed at
    a copy of the session's tiny Backpack; stopped by its PID afterwards."""
    import nbformat
    from papermill.iorw import load_notebook_node
    from papermill.parameterize import parameterize_notebook

    from backpack_nb import reports

    reports.ensure_kernel()
    run = tmp_path / "run"
    run.mkdir()
    for name in ("best.pt", "run.json", "training_log.json"):
        shutil.copy2(tiny_backpack_run["out_dir"] / name, run / name)
    root = tmp_path / "lab"
    root.mkdir()
    nb = load_notebook_node(str(ROOT / "notebooks" / "04_senses.ipynb"))  # papermill's view: tags on every cell
    nb = parameterize_notebook(nb, {"out_dir": str(run), "words": ["Parliament", "vote"],
                                    "top": 5, "browser_words": ["Parliament", "vote", "Commission"]})
    nbformat.write(nb, root / "04_senses.ipynb")

    port, token = free_port(), "bnb-test-" + os.urandom(8).hex()
    env = {**os.environ,
           "JUPYTER_RUNTIME_DIR": str(tmp_path / "runtime"),
           "JUPYTER_CONFIG_DIR": str(tmp_path / "config"),
           "JUPYTERLAB_SETTINGS_DIR": str(tmp_path / "settings"),
           "JUPYTERLAB_WORKSPACES_DIR": str(tmp_path / "workspaces")}
    log = open(tmp_path / "jupyterlab.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
         "--port-retries=0", f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}",
         "--LabApp.news_url=", "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"]
        + (["--allow-root"] if hasattr(os, "geteuid") and os.geteuid() == 0 else []),  # CI containers
        cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                api(f"{base}/api/status?token={token}")
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("JupyterLab did not start:\n"
                                       + (tmp_path / "jupyterlab.log").read_text()[-3000:])
                time.sleep(0.5)
        yield {"base": base, "token": token, "root": root, "tmp": tmp_path}
    finally:
        try:  # shut the kernels down cleanly first, so none outlives the server
            for k in api(f"{base}/api/kernels?token={token}") or []:
                api(f"{base}/api/kernels/{k['id']}?token={token}", method="DELETE")
        except Exception:
            pass
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


def test_sense_browser_in_jupyterlab(lab):
    pytest.importorskip("playwright", reason="pip install playwright (the test extra)")
    from playwright.sync_api import TimeoutError as PlaywrightTimeout
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTIFACTS / "sense_browser.png"
    with sync_playwright() as p:
        ctx = p.chromium.launch_persistent_context(
            str(lab["tmp"] / "chromium-profile"), executable_path=str(CHROMIUM), headless=True,
            args=CHROMIUM_ARGS, viewport={"width": 1400, "height": 1000})
        try:
            page = ctx.pages[0] if ctx.pages else ctx.new_page()
            page.set_default_timeout(120_000)
            page.goto(f"{lab['base']}/lab/tree/04_senses.ipynb?token={lab['token']}")
            page.wait_for_selector(".jp-NotebookPanel .jp-Notebook")
            page.wait_for_selector(".jp-NotebookPanel .jp-Notebook-ExecutionIndicator[data-status='idle']")

            # The kernel must be connected, not only the indicator idle, or Run All is dropped.
            page.wait_for_function(
                "() => document.body.innerText.includes('(backpack-nb) | Idle')")
            for attempt in range(3):  # on a loaded machine the first click can still be lost
                page.locator(".lm-MenuBar-itemLabel", has_text="Run").first.click()
                page.locator(".lm-Menu-itemLabel", has_text="Run All Cells").first.click()
                try:
                    page.wait_for_function(
                        "() => [...document.querySelectorAll('.jp-InputPrompt')]"
                        ".some(e => /\\[(\\d+|\\*)\\]/.test(e.textContent))", timeout=30_000)
                    break
                except PlaywrightTimeout:
                    if attempt == 2:
                        raise

            word = page.locator("input[placeholder='type a word']")
            word.wait_for(state="visible")
            # the controls: word box, sense selector, comparison box, prompt, scale slider
            browser = page.locator(".widget-vbox", has=word).last
            assert browser.locator("select").count() >= 1
            assert browser.locator(".widget-slider, .widget-hslider").count() >= 1
            assert page.locator("input[placeholder='second word']").count() == 1
            table = page.locator(".bnb-table").first
            page.wait_for_function("() => document.querySelector('.bnb-table') !== null")
            before = table.inner_text()
            assert "Parliament" in before

            word.fill("Commission")
            word.press("Enter")
            page.wait_for_function(
                "() => { const t = document.querySelector('.bnb-table');"
                " return t && t.innerText.includes('Commission'); }")
            after = table.inner_text()
            assert after != before and "Parliament" not in after
            table.scroll_into_view_if_needed()
            page.screenshot(path=str(shot), full_page=True)
        except Exception:
            page.screenshot(path=str(ARTIFACTS / "sense_browser_failure.png"), full_page=True)
            raise
        finally:
            ctx.close()
    assert shot.stat().st_size > 10_000
