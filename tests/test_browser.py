"""The quickstart notebook in a real JupyterLab, driven by headless Chromium (``make browser-test``).

Starts JupyterLab on 127.0.0.1 (a free port, a random token) in a temporary folder holding the quickstart with the
smoke pipeline's sizes injected by papermill, opens it, runs Run → Run All Cells, waits for an ipywidgets slider (the
Eigen-CAM explorer) and a rendered figure, saves a screenshot into the run folder, and stops the server.
Needs Debian's chromium (/usr/bin/chromium) and the playwright Python package; never `playwright install`.
"""
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.browser

CHROMIUM = os.environ.get("MCMI_LAB_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_server(url: str, proc: subprocess.Popen, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"jupyter lab exited with status {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"jupyter lab did not answer {url} within {timeout:.0f} s")


@pytest.fixture
def lab(tmp_path):
    """(base URL, token, folder, run folder) of a JupyterLab serving the parameterised quickstart."""
    pytest.importorskip("playwright.sync_api", reason="pip install playwright (the test extra)")
    if not Path(CHROMIUM).is_file():
        pytest.skip(f"no chromium at {CHROMIUM} (apt-get install chromium)")
    import nbformat
    from papermill.iorw import load_notebook_node
    from papermill.parameterize import parameterize_notebook

    from mcmi_lab.cli.commands import notebooks_dir
    from mcmi_lab.study.pipelines import resolve_parameters

    run_dir = tmp_path / "run"
    smoke = resolve_parameters("smoke")
    params = {k: smoke[k] for k in ("train_size", "test_size", "batch_size", "teacher_epochs", "finetune_epochs",
                                    "student_epochs", "cam_images")}
    nb = load_notebook_node(str(notebooks_dir() / "00_quickstart.ipynb"))
    nb = parameterize_notebook(nb, {**params, "run_dir": str(run_dir), "interactive": True})
    nbformat.write(nb, tmp_path / "quickstart.ipynb")

    port, token = _free_port(), secrets.token_hex(16)
    env = dict(os.environ, OMP_NUM_THREADS="1", JUPYTER_CONFIG_DIR=str(tmp_path / ".jupyter"))
    log = open(tmp_path / "jupyter.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
                             f"--IdentityProvider.token={token}", "--allow-root", f"--ServerApp.root_dir={tmp_path}",
                             "--LabApp.news_url=", "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"],
                            cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        base = f"http://127.0.0.1:{port}"
        _wait_for_server(f"{base}/api/status?token={token}", proc)
        yield base, token, tmp_path, run_dir
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def test_quickstart_runs_in_jupyterlab(lab):
    from playwright.sync_api import sync_playwright

    base, token, folder, run_dir = lab
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(f"{base}/lab/tree/quickstart.ipynb?token={token}")
            page.wait_for_selector(".jp-Notebook", timeout=90_000)  # cells queue until the kernel is up
            for attempt in range(3):  # a first start can swallow the click (a dialog, a kernel still starting)
                _run_all_cells(page)
                try:
                    page.wait_for_selector(".widget-slider", timeout=100_000)
                    break
                except Exception:
                    page.screenshot(path=str(folder / f"attempt{attempt}.png"))
                    if attempt == 2:
                        raise
            page.wait_for_selector(".jp-RenderedImage img", timeout=60_000)
            results = run_dir / "results" / "00_quickstart.json"  # the last cell: every cell before it ran
            deadline = time.monotonic() + 120
            while not results.is_file() and time.monotonic() < deadline:
                page.wait_for_timeout(500)
            page.locator(".widget-slider").first.scroll_into_view_if_needed()  # the explorer in the screenshot
            errors = page.locator(".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.error']").count()
            run_dir.mkdir(parents=True, exist_ok=True)
            shot = run_dir / "quickstart_jupyterlab.png"
            page.screenshot(path=str(shot), full_page=True)
        finally:
            browser.close()
    assert errors == 0 and results.is_file()
    assert shot.is_file() and shot.stat().st_size > 10_000
    keep = os.environ.get("MCMI_LAB_SCREENSHOT_DIR")  # e.g. to look at it after a CI run
    if keep:
        shutil.copy(shot, Path(keep) / shot.name)


EXPLORERS = [
    """import torch
from torch import nn
from IPython.display import display
from mcmi_lab import from_tensors
from mcmi_lab.explorers.widgets import concentration_explorer, results_explorer, teacher_explorer

g = torch.Generator().manual_seed(0)
labels = torch.arange(60) % 4
images = torch.randint(0, 255, (60, 1, 12, 12), generator=g, dtype=torch.uint8)
data = from_tensors(images, labels, ["a", "b", "c", "d"])
teachers = {}
for i, name in enumerate(("mll", "control", "mcmi")):
    torch.manual_seed(i)
    teachers[name] = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 8, 3, padding=1), nn.ReLU(),
                                   nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)).eval()""",
    "display(teacher_explorer(teachers, data))",
    "display(concentration_explorer(teachers, data))",
    "display(results_explorer(RUN))",
]


def _run_all_cells(page) -> None:
    """Menu Run → Run All Cells, after accepting the "Select Kernel" dialog JupyterLab may open over the notebook
    (seen when a second notebook opens in the same server: Escape does not close it, and it swallows the click)."""
    page.keyboard.press("Escape")
    page.wait_for_timeout(1000)  # the dialog comes up a moment after the notebook
    accept = page.locator(".jp-Dialog .jp-mod-accept")
    if accept.count():
        accept.first.click()
    page.locator(".lm-MenuBar-itemLabel", has_text="Run").first.click()
    page.locator(".lm-Menu-itemLabel", has_text="Run All Cells").first.click()


def test_each_explorer_redraws_when_a_control_changes_in_jupyterlab(lab):
    """One notebook with the three explorers of issue 19 on tiny teachers and a two-seed results folder: for each,
    pick another option of its first dropdown (class, class, view) and wait for its figure to change."""
    import nbformat
    from playwright.sync_api import sync_playwright

    from mcmi_lab.study.runs import write_results

    base, token, folder, run_dir = lab
    results = folder / "results_run"
    for seed in (0, 1):
        write_results(results / f"seed_{seed}", "01_teachers", {"teachers": [
            {"teacher": t, "test_acc": 0.8 + 0.01 * i + 0.02 * seed, "train_cmi": 0.1 * i, "test_cmi": 0.2,
             "test_ncmi": 0.05, "test_ece": 0.03} for i, t in enumerate(("mll", "control", "mcmi"))]}, {"seed": seed})
    nb = nbformat.v4.new_notebook()
    nb.metadata.kernelspec = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.metadata.language_info = {"name": "python"}
    nb.cells = [nbformat.v4.new_code_cell(src.replace("RUN", repr(str(results)))) for src in EXPLORERS]
    nbformat.write(nb, folder / "explorers.ipynb")
    changed = {}
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(f"{base}/lab/tree/explorers.ipynb?token={token}")
            page.wait_for_selector(".jp-Notebook", timeout=90_000)
            cells = page.locator(".jp-CodeCell")
            figure = lambda i: cells.nth(i).locator(".widget-output img").first  # noqa: E731
            for attempt in range(3):  # a first start can swallow the click (a dialog, a kernel still starting)
                _run_all_cells(page)
                try:
                    figure(3).wait_for(timeout=150_000)
                    break
                except Exception:
                    page.screenshot(path=str(folder / f"explorers_attempt{attempt}.png"))
                    if attempt == 2:
                        raise
            for i, option in ((1, 2), (2, 1), (3, 1)):  # teacher: class b; concentration: class b; results: a view
                figure(i).wait_for(timeout=60_000)
                before = figure(i).get_attribute("src")
                cells.nth(i).locator(".widget-dropdown select").first.select_option(index=option)
                deadline = time.monotonic() + 60
                while figure(i).get_attribute("src") == before and time.monotonic() < deadline:
                    page.wait_for_timeout(250)
                changed[i] = figure(i).get_attribute("src") != before
            errors = page.locator(".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.error']").count()
            shot = run_dir.parent / "explorers_jupyterlab.png"
            page.screenshot(path=str(shot), full_page=True)
        finally:
            browser.close()
    assert errors == 0
    assert changed == {1: True, 2: True, 3: True}
    keep = os.environ.get("MCMI_LAB_SCREENSHOT_DIR")
    if keep:
        shutil.copy(shot, Path(keep) / shot.name)
