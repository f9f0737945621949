"""Real-browser end-to-end test: the quickstart notebook's Explorer in JupyterLab, driven by Chromium.

Runs a copy of ``notebooks/quickstart.ipynb`` in a JupyterLab server started here, selects a test
example, checks the proponent gallery follows, flags a proponent and reads the flag back from the
notebook's SQLite flag store. Saves screenshots to ``assets/``.

Run only these tests with ``pytest -m browser``; they are skipped when ``/usr/bin/chromium`` is missing
(``make test`` installs it).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
NOTEBOOK = REPO / "notebooks" / "quickstart.ipynb"
UX_NOTEBOOK = "newcomer.ipynb"
ASSETS = REPO / "assets"
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
VIEWPORT = {"width": 1400, "height": 1000}
NOTEBOOK_TIMEOUT_S = 180  # generous: the notebook takes ~20 s on an idle 2-core machine, ~60 s on a busy one
CAPTION = re.compile(r"#(\S+) · ([+-]?[0-9.eE+-]+)")

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not CHROMIUM.exists(), reason=f"{CHROMIUM} is missing (make browser-deps installs it)"),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


#: A newcomer's session: string ids, k = 10, the explorer asked to open on the second computed method.
UX_CELLS = [
    "from tda_explorer.data import AttributionDataset\n"
    "from tda_explorer.experiments import build_experiment\n"
    "from tda_explorer.session import Session\n"
    "from tda_explorer.widgets import Explorer\n"
    "exp = build_experiment('mlp', noise=0.1, n_train=400, n_test=60, epochs=15)\n"
    "def named(data, prefix):\n"
    "    return AttributionDataset(data.inputs, data.labels, [f'{prefix}-image-{i:05d}' for i in range(len(data))],\n"
    "                              data.class_names, data.renderer, f'{prefix}-named')\n"
    "session = Session(named(exp.split.train, 'train'), named(exp.split.test, 'test'), exp.task(), 'ux_session')\n"
    "session.compute('grad-dot')\n"
    "session.compute('tracin')",
    "explorer = Explorer(session, method='tracin', k=10)\nexplorer",
]


@pytest.fixture
def notebook_dir(tmp_path: Path, request) -> Path:
    """A scratch folder holding a copy of the quickstart notebook, or (``"ux"``) the newcomer's notebook above."""
    work = tmp_path / "nb"
    work.mkdir()
    if getattr(request, "param", None) == "ux":
        import nbformat

        nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in UX_CELLS])
        nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3 (ipykernel)", "language": "python"}
        nbformat.write(nb, work / UX_NOTEBOOK)
    else:
        shutil.copy(NOTEBOOK, work / NOTEBOOK.name)
    return work


@pytest.fixture
def jupyter_lab(notebook_dir: Path, tmp_path: Path):
    """A JupyterLab server over ``notebook_dir``; yields its base URL and token."""
    port, token = _free_port(), "tda-browser-test"
    # Settings of our own: no "get notified about Jupyter news?" toast, no update checks.
    settings = tmp_path / "lab-user-settings"
    (settings / "@jupyterlab" / "apputils-extension").mkdir(parents=True)
    (settings / "@jupyterlab" / "apputils-extension" / "notification.jupyterlab-settings").write_text(
        json.dumps({"fetchNews": "false", "checkForUpdates": False}))
    env = dict(os.environ,
               JUPYTER_CONFIG_DIR=str(tmp_path / "jupyter-config"),
               JUPYTER_RUNTIME_DIR=str(tmp_path / "jupyter-runtime"),
               PYTHONUNBUFFERED="1")
    log = open(tmp_path / "jupyter.log", "w")  # noqa: SIM115 - closed in finally
    proc = subprocess.Popen(
        [sys.executable, "-m", "jupyter", "lab", "--no-browser", "--allow-root",
         "--ip=127.0.0.1", f"--port={port}", "--port-retries=0",
         f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={notebook_dir}",
         f"--LabApp.user_settings_dir={settings}", f"--LabApp.workspaces_dir={tmp_path / 'lab-workspaces'}"],
        cwd=notebook_dir, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                pytest.fail(f"jupyter lab exited ({proc.returncode}):\n{(tmp_path / 'jupyter.log').read_text()}")
            try:
                with urllib.request.urlopen(f"{base}/api?token={token}", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"jupyter lab did not answer in 60 s:\n{(tmp_path / 'jupyter.log').read_text()}")
            time.sleep(0.25)
        yield base, token
    finally:
        proc.terminate()  # the server shuts its kernels down on SIGTERM
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # its own process group (start_new_session): server + kernels
            proc.wait(timeout=10)
        log.close()


def _captions(page, gallery: str) -> list[tuple[str, float]]:
    """(id, score) of the visible cards of a gallery, read from their captions."""
    texts = page.locator(f"{gallery} .tda-card").evaluate_all(
        "cards => cards.filter(c => c.offsetParent !== null).map(c => c.innerText)")
    out = []
    for text in texts:
        m = CAPTION.search(text)
        assert m, f"unexpected card caption {text!r}"
        out.append((m.group(1), float(m.group(2))))
    return out


def _wait_flagged(db: Path, train_id: str, timeout_s: float = 10) -> bool:
    """Poll the flag store until ``train_id`` is flagged (the kernel writes it asynchronously)."""
    deadline = time.monotonic() + timeout_s
    while _flag_row(db, train_id) != 1 and time.monotonic() < deadline:
        time.sleep(0.2)
    return _flag_row(db, train_id) == 1


def _flag_row(db: Path, train_id: str):
    """The ``flagged`` value stored for ``train_id`` (as the caption shows it), or None."""
    keys = [json.dumps(train_id)]
    if re.fullmatch(r"-?\d+", train_id):
        keys.insert(0, json.dumps(int(train_id)))
    if not db.exists():
        return None
    conn = sqlite3.connect(db, timeout=5)
    try:
        row = conn.execute(f"SELECT flagged FROM flags WHERE train_id IN ({','.join('?' * len(keys))})",
                           keys).fetchone()
    except sqlite3.OperationalError:  # table not there yet
        return None
    finally:
        conn.close()
    return None if row is None else row[0]


def _wait_images(page, scope: str, timeout_s: float = 15) -> None:
    """Wait until the visible thumbnails under ``scope`` have decoded."""
    page.wait_for_function(
        """scope => {
            const imgs = [...document.querySelectorAll(scope + ' img')].filter(i => i.offsetParent !== null);
            return imgs.length > 0 && imgs.every(i => i.complete && i.naturalWidth > 0);
        }""", arg=scope, timeout=timeout_s * 1000)


def _run_all_cells(page) -> None:
    """Run > Run All Cells, then check the first code cell was queued (retried once if not)."""
    first_prompt = page.locator(".jp-CodeCell .jp-InputPrompt").first
    for _attempt in range(2):
        page.locator(".lm-MenuBar-itemLabel", has_text=re.compile(r"^Run$")).click()
        page.locator(".lm-Menu-itemLabel", has_text=re.compile(r"^Run All Cells$")).click()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if re.search(r"\[(\*|\d+)\]", first_prompt.inner_text()):
                return
            time.sleep(0.2)
    pytest.fail("Run All Cells did not start the notebook")


def _open_and_run(page, base: str, token: str, name: str):
    """Open notebook ``name`` in JupyterLab, run every cell and wait for the explorer; returns its locator."""
    page.set_default_timeout(30_000)
    page.goto(f"{base}/lab/tree/{name}?token={token}")
    page.wait_for_selector(".jp-Notebook")
    # Kernel connected and idle before running everything: Run All before that clears the cells
    # without running them. (The toolbar indicator reads "idle" before it connects; the status bar
    # reads "No Kernel | Initializing", then "Python 3 (ipykernel) | Idle".)
    page.wait_for_function(
        """() => [...document.querySelectorAll('.jp-StatusBar-TextItem')]
                 .some(e => /\\| Idle$/.test(e.innerText.trim()) && !/^No Kernel/.test(e.innerText.trim()))""",
        timeout=60_000)
    # Give the notebook the full width: close the left sidebar when it is open.
    if page.locator("#jp-left-stack").is_visible():
        page.locator(".jp-SideBar.jp-mod-left .lm-TabBar-tab.lm-mod-current").click()

    _run_all_cells(page)

    # Training + TracIn take 20-60 s on a small CPU machine; fail fast on a traceback.
    explorer = page.locator(".tda-explorer")
    errors = page.locator(".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.error']")
    deadline = time.monotonic() + NOTEBOOK_TIMEOUT_S
    while not explorer.is_visible():
        if errors.count():
            pytest.fail(f"the notebook raised:\n{errors.first.inner_text()}")
        if time.monotonic() > deadline:
            pytest.fail(f"no .tda-explorer after {NOTEBOOK_TIMEOUT_S} s of Run All Cells")
        time.sleep(0.5)
    return explorer


def test_explorer_select_and_flag(jupyter_lab, notebook_dir: Path, tmp_path: Path):
    from playwright.sync_api import expect, sync_playwright

    base, token = jupyter_lab
    ASSETS.mkdir(exist_ok=True)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        page = browser.new_page(viewport=VIEWPORT)
        try:
            explorer = _open_and_run(page, base, token, NOTEBOOK.name)
            proponents = ".tda-explorer .tda-proponents"
            page.wait_for_function(
                "sel => [...document.querySelectorAll(sel + ' .tda-card')].some(c => c.offsetParent !== null)",
                arg=proponents)
            before = _captions(page, proponents)
            assert len(before) == 5, before

            # Select the 4th test example; the proponent gallery must follow.
            test_buttons = page.locator(".tda-explorer .tda-test-card .tda-test-card-button")
            expect(test_buttons.nth(3)).to_be_visible()
            test_buttons.nth(3).click()
            deadline = time.monotonic() + 20
            after = before
            while after == before and time.monotonic() < deadline:
                time.sleep(0.2)
                after = _captions(page, proponents)
            assert after != before, f"proponents did not change after selecting test #4: {before}"
            assert len(after) == 5 and all(score > 0 for _, score in after), after

            _wait_images(page, ".tda-explorer .tda-test-picker")
            _wait_images(page, proponents)
            _wait_images(page, ".tda-explorer .tda-opponents")
            explorer.evaluate("el => el.scrollIntoView({block: 'start'})")
            page.wait_for_timeout(300)  # let the scroll settle before the screenshot
            page.screenshot(path=str(ASSETS / "explorer_jupyterlab.png"))

            # Flag the top proponent: the button flips and the store has it.
            train_id = after[0][0]
            flag_button = page.locator(f"{proponents} .tda-proponent-card").first.locator(
                ".tda-proponent-card-flag")
            expect(flag_button).to_have_text("flag")
            flag_button.click()
            expect(flag_button).to_have_text("unflag", timeout=10_000)

            db = notebook_dir / "quickstart_session" / "flags.sqlite"
            assert _wait_flagged(db, train_id), f"train #{train_id} not flagged in {db}"

            explorer.evaluate("el => el.scrollIntoView({block: 'start'})")
            page.wait_for_timeout(300)
            page.screenshot(path=str(ASSETS / "explorer_flagged.png"))

            # The mislabel panel: ranked list with the current row in the detail; Flag from there.
            page.locator(".tda-explorer .lm-TabBar-tab", has_text="Mislabels").first.click()
            table = page.locator(".tda-explorer .tda-mislabel-panel .tda-table").first
            expect(table).to_contain_text("suggested", timeout=20_000)
            page.locator(".tda-explorer .tda-mislabel-next").first.click()
            expect(table.locator("tr.tda-current-row td").first).to_have_text("2", timeout=10_000)
            current = table.locator("tr.tda-current-row td").nth(2).inner_text().lstrip("#")
            page.locator(".tda-explorer .tda-mislabel-panel").first.scroll_into_view_if_needed()
            page.locator(".tda-explorer .tda-detail-flag:visible").first.click()
            assert _wait_flagged(db, current), f"train #{current} not flagged from the mislabel panel"

            page.locator(".tda-explorer .lm-TabBar-tab", has_text="Compare").first.click()
            expect(page.locator(".tda-explorer .tda-compare-panel").first).to_contain_text("overlap",
                                                                                           timeout=20_000)
        except BaseException:
            page.screenshot(path=str(tmp_path / "failure.png"))  # for a post-mortem; not in assets/
            raise
        finally:
            browser.close()


#: Every visible button whose label is wider than the button (clipped to "Fl…"), as "text (width < scroll)".
CLIPPED_BUTTONS_JS = """root => [...root.querySelectorAll('button')]
    .filter(b => b.offsetParent !== null && b.innerText.trim() && b.scrollWidth > b.clientWidth + 1)
    .map(b => `${b.innerText.trim()} (${b.clientWidth} < ${b.scrollWidth})`)"""

#: For every visible plotly chart: its x axis title, how many points it draws, the points outside its axes, and how
#: many pixels of it lie beyond the right edge of the panel (cut off from view).
CHARTS_JS = """root => [...root.querySelectorAll('.js-plotly-plot')].filter(g => g.offsetParent !== null).map(g => {
    const full = g._fullLayout || {}, xr = (full.xaxis || {}).range, yr = (full.yaxis || {}).range;
    let points = 0, outside = [];
    for (const tr of (g._fullData || [])) {
        const xs = tr.x ? Array.from(tr.x) : [], ys = tr.y ? Array.from(tr.y) : [];
        points += Math.max(xs.length, ys.length);
        if (!['scatter', 'scattergl'].includes(tr.type) || !xr || !yr) continue;
        if ((full.xaxis || {}).type === 'category' || (full.yaxis || {}).type === 'category') continue;
        xs.forEach((x, i) => {
            const y = ys[i];
            if (x < Math.min(...xr) || x > Math.max(...xr) || y < Math.min(...yr) || y > Math.max(...yr))
                outside.push([tr.name, x, y]);
        });
    }
    const title = ((full.xaxis || {}).title || {}).text || '';
    const cut = Math.round(g.getBoundingClientRect().right - root.getBoundingClientRect().right);
    const where = [];
    for (let e = g; e && e !== root && where.length < 12; e = e.parentElement)
        where.push([...e.classList].filter(c => c.startsWith('tda-') || c.startsWith('lm-mod')).join('.'));
    const traces = (g._fullData || []).map(tr => tr.type + ':' + (tr.name || ''));
    return {title, points, outside: outside.slice(0, 5), n_outside: outside.length, cut,
            where: where.filter(w => w).join(' < '), traces};
})"""


def _check_view(page, scope: str, where: str, timeout_s: float = 15) -> list:
    """No clipped button and no empty chart, point off its axes or chart past the panel's edge under ``scope``
    (polled: plotly draws a figure widget some time after its tab is shown); returns the charts seen."""
    root = page.locator(scope).first
    deadline = time.monotonic() + timeout_s
    while True:
        page.wait_for_timeout(300)
        clipped, charts = root.evaluate(CLIPPED_BUTTONS_JS), root.evaluate(CHARTS_JS)
        drawn = all(c["points"] > 0 and c["n_outside"] == 0 and c["cut"] <= 1 for c in charts)
        if (drawn and not clipped) or time.monotonic() > deadline:
            break
    assert not clipped, f"{where}: buttons with clipped labels: {clipped}"
    for chart in charts:
        assert chart["points"] > 0, f"{where}: a chart is drawn empty: {chart}"
        assert chart["n_outside"] == 0, f"{where}: points outside the axes: {chart}"
        assert chart["cut"] <= 1, f"{where}: a chart reaches {chart['cut']} px past the panel's edge: {chart}"
    return charts


@pytest.mark.parametrize("notebook_dir", ["ux"], indirect=True)
def test_string_ids_at_k10_nothing_clipped_off_axes_or_empty(jupyter_lab, notebook_dir: Path, tmp_path: Path):
    """A newcomer's session (string ids, k = 10, method asked for): what the issue's browser trial found broken."""
    from playwright.sync_api import expect, sync_playwright

    base, token = jupyter_lab
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        page = browser.new_page(viewport=VIEWPORT)
        try:
            explorer = _open_and_run(page, base, token, UX_NOTEBOOK)
            proponents = ".tda-explorer .tda-proponents"
            page.wait_for_function(
                "sel => [...document.querySelectorAll(sel + ' .tda-card')].filter(c => c.offsetParent !== null)"
                ".length === 10", arg=proponents)
            # Explorer(method='tracin') is honoured although grad-dot was computed first.
            method = page.locator(".tda-explorer .tda-influence-browser select").first
            expect(method).to_have_value("tracin")
            # Cards line up: every visible proponent card has the same height (captions never wrap).
            heights = page.locator(f"{proponents} .tda-card").evaluate_all(
                "cards => cards.filter(c => c.offsetParent !== null).map(c => c.offsetHeight)")
            assert len(set(heights)) == 1, f"card heights differ: {heights}"
            _wait_images(page, proponents)
            _check_view(page, ".tda-explorer", "Browse")
            explorer.evaluate("el => el.scrollIntoView({block: 'start'})")
            page.screenshot(path=str(ASSETS / "explorer_string_ids_k10.png"))

            page.locator(".tda-explorer .lm-TabBar-tab", has_text="Mislabels").first.click()
            panel = ".tda-explorer .tda-mislabel-panel"
            expect(page.locator(panel).first).to_contain_text("suggested", timeout=20_000)
            # every ranking beside the training-loss baseline
            expect(page.locator(panel).first).to_contain_text("rank correlation with training loss")
            ranking = page.locator(f"{panel} select").first.input_value()
            charts = _check_view(page, panel, "Mislabels")
            assert len(charts) == 2, charts
            assert any(c["title"].startswith(f"{ranking} score") for c in charts), (ranking, charts)
            page.locator(panel).first.scroll_into_view_if_needed()
            page.screenshot(path=str(ASSETS / "explorer_mislabels.png"))

            page.locator(".tda-explorer .lm-TabBar-tab", has_text="Compare").first.click()
            compare = ".tda-explorer .tda-compare-panel"
            expect(page.locator(compare).first).to_contain_text("overlap", timeout=20_000)
            expect(page.locator(compare).first).to_contain_text("further_training_curve")  # why it has no chart
            _check_view(page, compare, "Compare")
            page.screenshot(path=str(ASSETS / "explorer_compare.png"))
        except BaseException:
            page.screenshot(path=str(tmp_path / "failure.png"))
            raise
        finally:
            browser.close()
