"""Notebook 08 in a real JupyterLab, rendered by headless Chromium (Debian's chromium and chromium-driver;
`.ci/run` installs them): every cell runs, every demo's live widgets show result images, and a query typed
into the text demo re-ranks. A screenshot is left in the test's temporary folder (and, with
``DEMO_SCREENSHOT=path``, copied there: that is how figures/08_text_demo.png was made)."""
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _make_lab(venv: Path, uid: int, tmp_path: Path, extra_env: dict | None = None) -> subprocess.CompletedProcess:
    """``make lab`` with ``venv`` standing in for .venv and a PATH on which ``id -u`` says ``uid``."""
    fake = tmp_path / f"bin-{uid}"
    fake.mkdir(exist_ok=True)
    (fake / "id").write_text(f"#!/bin/sh\necho {uid}\n")
    (fake / "id").chmod(0o755)
    env = {**os.environ, "PATH": f"{fake}:{os.environ['PATH']}", **(extra_env or {})}
    return subprocess.run(["make", "-s", "-C", str(ROOT), "lab", f"VENV={venv}"], env=env, capture_output=True, text=True, timeout=60)


def test_make_lab_allows_root_and_sets_the_project_defaults(tmp_path):
    """As root (containers, cloud notebooks) JupyterLab refuses to start without --allow-root: `make lab` passes
    it then, and only then; and it points JupyterLab at tools/jupyter, whose setting defaults turn the news off."""
    if not shutil.which("make"):
        pytest.skip("no make")
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "jupyter").write_text('#!/bin/sh\necho "ARGS: $*"\necho "CONFIG: $JUPYTER_CONFIG_PATH"\n')
    (venv / "bin" / "jupyter").chmod(0o755)
    (venv / ".installed").touch()  # newer than pyproject.toml: no setup
    root, user = _make_lab(venv, 0, tmp_path), _make_lab(venv, 1000, tmp_path, {"JUPYTER_CONFIG_PATH": "/elsewhere"})
    assert root.returncode == 0 and user.returncode == 0, root.stderr + user.stderr
    assert "ARGS: lab --allow-root notebooks/" in root.stdout, root.stdout
    assert "ARGS: lab notebooks/" in user.stdout and "--allow-root" not in user.stdout, user.stdout
    assert f"CONFIG: {ROOT / 'tools' / 'jupyter'}\n" in root.stdout and f"CONFIG: {ROOT / 'tools' / 'jupyter'}:/elsewhere" in user.stdout
    import json

    defaults = json.loads((ROOT / "tools" / "jupyter" / "labconfig" / "default_setting_overrides.json").read_text())
    assert defaults["@jupyterlab/apputils-extension:notification"] == {"fetchNews": "false", "checkForUpdates": False}


def test_jupyterlab_started_by_make_lab_shows_no_news_toast(tmp_path):
    """The real `make lab` (as whoever runs the tests, root included): the server starts and the notification
    setting it serves is fetchNews "false" (with the default, "none", JupyterLab asks about the news in a toast
    that covers the generation demo's seed box)."""
    import json
    import signal
    import urllib.request

    if not shutil.which("make"):
        pytest.skip("no make")
    port, token = _free_port(), "pr-make-lab-test"
    args = (f"--no-browser --port={port} --ip=127.0.0.1 --IdentityProvider.token={token} "
            f"--LabApp.user_settings_dir={tmp_path / 'user-settings'} --LabApp.workspaces_dir={tmp_path / 'ws'}")
    log = open(tmp_path / "lab.log", "w")
    proc = subprocess.Popen(["make", "-s", "-C", str(ROOT), "-o", ".venv/.installed", "lab", f"LAB_ARGS={args}"], stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, "JUPYTER_CONFIG_DIR": str(tmp_path / "jupyter"), "JUPYTER_CONFIG_PATH": ""})
    url = f"http://127.0.0.1:{port}/lab/api/settings/@jupyterlab/apputils-extension:notification?token={token}"
    try:
        for _ in range(240):
            if proc.poll() is not None:
                pytest.fail("make lab stopped: " + (tmp_path / "lab.log").read_text()[-2000:])
            try:
                with urllib.request.urlopen(url, timeout=2) as r:
                    setting = json.loads(r.read())
                break
            except OSError:
                time.sleep(0.5)
        else:
            pytest.fail("JupyterLab did not start: " + (tmp_path / "lab.log").read_text()[-2000:])
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()
    # the page computes the setting from the schema's defaults (here overridden) and the user's own (none yet)
    props = setting["schema"]["properties"]
    assert props["fetchNews"]["default"] == "false" and props["checkForUpdates"]["default"] is False, props
    assert "fetchNews" not in json.loads(setting.get("raw") or "{}"), setting.get("raw")


def _browser():
    try:
        import selenium  # noqa: F401
    except ImportError:
        return None, "selenium is not installed (pip install -e '.[dev]')"
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not chromium or not driver:
        return None, "no chromium / chromedriver on PATH (Debian: apt-get install chromium chromium-driver)"
    return (chromium, driver), ""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def lab(tmp_path):
    """A JupyterLab server on localhost serving notebook 08 parameterized for scale tiny."""
    import papermill as pm

    found, why = _browser()
    if found is None:
        pytest.skip(why)
    nb = tmp_path / "demos.ipynb"
    pm.execute_notebook(str(ROOT / "notebooks" / "08_demos.ipynb"), str(nb), parameters={"scale": "tiny", "seed": 0},
                        prepare_only=True, progress_bar=False)
    port, token = _free_port(), "pr-browser-test"
    settings = tmp_path / "lab-settings" / "@jupyterlab" / "notebook-extension"
    settings.mkdir(parents=True)
    (settings / "tracker.jupyterlab-settings").write_text('{"windowingMode": "none"}')  # every cell in the page, scrolled or not
    log = open(tmp_path / "lab.log", "w")
    # make lab's setting defaults (tools/jupyter): no news toast over the screenshot, no request to a website
    env = {**os.environ, "JUPYTER_CONFIG_DIR": str(tmp_path / "jupyter"), "JUPYTER_CONFIG_PATH": str(ROOT / "tools" / "jupyter")}
    proc = subprocess.Popen([sys.executable, "-m", "jupyter", "lab", "--no-browser", f"--port={port}", "--ip=127.0.0.1",
                             f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={tmp_path}", "--ServerApp.open_browser=False", "--allow-root",
                             "--LabApp.expose_app_in_browser=True",
                             f"--LabApp.user_settings_dir={tmp_path / 'lab-settings'}"],
                            stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path, env=env)
    try:
        for _ in range(120):
            if proc.poll() is not None:
                break
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.5)
        else:
            pytest.fail("JupyterLab did not start: " + (tmp_path / "lab.log").read_text()[-2000:])
        yield found, f"http://127.0.0.1:{port}/lab/tree/demos.ipynb?token={token}", tmp_path
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def test_the_demos_run_and_answer_in_jupyterlab(lab):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    (chromium, driver_path), url, tmp = lab
    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for a in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,2200", "--disable-gpu"):
        opts.add_argument(a)
    driver = webdriver.Chrome(service=Service(driver_path), options=opts)
    try:
        _drive(driver, url, tmp, By, EC, WebDriverWait)
    except Exception:
        driver.save_screenshot(str(tmp / "failure.png"))  # what the page showed, for the failure's reader
        raise
    finally:
        driver.quit()


def _drive(driver, url, tmp, By, EC, WebDriverWait):
    """Open the notebook, run every cell, check the demos, type a query, take the screenshot."""
    driver.get(url)
    wait = WebDriverWait(driver, 120)
    wait.until(EC.presence_of_element_located((By.CSS_SELECTOR, ".jp-Notebook .jp-Cell")))
    wait.until(lambda d: d.execute_script("return !!(window.jupyterapp && window.jupyterapp.shell.currentWidget"
                                          " && window.jupyterapp.shell.currentWidget.sessionContext"
                                          " && window.jupyterapp.shell.currentWidget.sessionContext.session)"))
    driver.execute_script("window.jupyterapp.commands.execute('notebook:run-all-cells')")  # Run > Run All Cells

    def live(css):  # result images inside live widget outputs (not the static snapshots)
        return driver.find_elements(By.CSS_SELECTOR, f".widget-html {css}")

    # every cell ran: the four demos' live widgets show their images (text 10, composed 3 x 10, chat 5 and 5
    # with MTI, generation 8), or a cell failed
    failed = lambda d: "most recent call last" in d.page_source  # noqa: E731
    WebDriverWait(driver, 600, poll_frequency=2).until(lambda d: failed(d) or len(live("figure.pr-hit")) >= 10 + 30 + 10 + 8)
    assert not failed(driver), driver.find_element(By.CSS_SELECTOR, ".jp-Notebook").text[-3000:]
    # no button label cut short (ipywidgets' default width ellipsizes a long one), no news toast over the demos
    cut = driver.execute_script("return Array.from(document.querySelectorAll('.jp-OutputArea button.jupyter-button'))"
                                ".filter(b => b.offsetWidth > 0 && b.scrollWidth > b.clientWidth + 1).map(b => b.textContent)")
    assert not cut, f"button labels cut short: {cut}"
    assert "official Jupyter news" not in driver.page_source, "JupyterLab's news toast is showing"
    boxes = driver.find_elements(By.CSS_SELECTOR, ".widget-textarea textarea")
    assert boxes, "no text box rendered"
    query = boxes[0]  # the text demo's query
    driver.execute_script("arguments[0].scrollIntoView()", query)
    query.clear()
    query.send_keys("A man in red shoes.")
    next(b for b in driver.find_elements(By.CSS_SELECTOR, "button.jupyter-button") if b.text == "Search").click()
    WebDriverWait(driver, 60).until(lambda d: "shoes_color = red" in d.page_source)
    assert "your own query" in driver.page_source  # a typed query: no person to find, no right or wrong
    first = driver.find_elements(By.CSS_SELECTOR, ".widget-html figure.pr-hit img")[0]
    assert first.get_attribute("src").startswith("data:image/png;base64,") and first.size["height"] > 0
    # the model picker re-ranks by itself: CECA (which ranks over its summaries gallery) answers the same query
    from selenium.webdriver.support.ui import Select
    picker = Select(driver.find_elements(By.CSS_SELECTOR, ".widget-dropdown select")[1])  # dataset, then model
    assert "CECA" in [o.text for o in picker.options], [o.text for o in picker.options]
    picker.select_by_visible_text("CECA")
    WebDriverWait(driver, 60).until(lambda d: "CECA on cuhk_pedes" in d.page_source)
    demo = driver.execute_script("return arguments[0].closest('.jp-OutputArea-output')", query)
    driver.execute_script("arguments[0].scrollIntoView()", demo)  # the whole text demo, its picker on top
    shot = tmp / "text_demo.png"
    driver.save_screenshot(str(shot))
    assert shot.stat().st_size > 10_000
    if os.environ.get("DEMO_SCREENSHOT"):
        shutil.copy(shot, os.environ["DEMO_SCREENSHOT"])
