"""Drive JupyterLab in headless Chromium the way a learner uses it (the browser tests' harness).

JupyterLab is started with ``make lab-no-browser`` (what the README tells a learner to run) in a
throwaway copy of the repository, so tests may type into and save notebooks freely. Chromium is
Debian's (``/usr/bin/chromium``; ``.ci/run`` installs it), driven by Playwright's Python client.
Every page load outside 127.0.0.1 is refused: the course must work offline, and the Colab badge
must degrade when its image cannot load.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

from tests.conftest import ROOT

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
TOKEN = "course-browser-test"
#: A laptop screen with the file browser open: the notebook's output area is about 900 px wide.
VIEWPORT = {"width": 1400, "height": 900}
#: Console messages that are not errors of the course: the refused offline requests.
EXPECTED_CONSOLE = re.compile(r"ERR_FAILED|ERR_BLOCKED|ERR_INTERNET_DISCONNECTED|favicon|403")


def skip_reason() -> str | None:
    """One sentence saying why the browser tests cannot run here, or None."""
    if not CHROMIUM.exists():
        return (
            "browser tests need Debian's Chromium at /usr/bin/chromium "
            "(apt-get install chromium; .ci/run installs it)."
        )
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "browser tests need the playwright Python package (pip install -e '.[dev]')."
    if shutil.which("make") is None or not (ROOT / ".venv" / ".installed").exists():
        return "browser tests need make and the .venv that `make test` / `make lab` create."
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def copy_repository(target: Path) -> Path:
    """A copy of what a fresh clone has (tracked files), with the repository's .venv linked in."""
    files = subprocess.run(
        ["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True
    ).stdout.split(b"\0")
    for name in filter(None, files):
        source = ROOT / name.decode()
        if source.is_file():
            (target / name.decode()).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name.decode())  # keep mtimes: make sees .venv up to date
    (target / ".venv").symlink_to(ROOT / ".venv")
    return target


class LabServer:
    """``make lab-no-browser`` in ``repo`` on a free port, with private Jupyter state dirs."""

    def __init__(self, repo: Path, state: Path) -> None:
        self.repo, self.port = repo, free_port()
        env = {
            k: v
            for k, v in os.environ.items()
            # `make test` runs headless; the learner's kernel is not.
            if k not in ("COURSE_HEADLESS", "COURSE_BLOCK_NETWORK", "PYTEST_CURRENT_TEST")
        }
        # Test-only setting: render every cell (no windowing), so the DOM holds every output.
        tracker = state / "settings" / "@jupyterlab" / "notebook-extension"
        tracker.mkdir(parents=True, exist_ok=True)
        (tracker / "tracker.jupyterlab-settings").write_text('{"windowingMode": "none"}')
        env.update(
            JUPYTER_RUNTIME_DIR=str(state / "runtime"),
            JUPYTERLAB_SETTINGS_DIR=str(state / "settings"),
            JUPYTERLAB_WORKSPACES_DIR=str(state / "workspaces"),
            HF_HUB_OFFLINE="1",
        )
        args = f"--port={self.port} --ip=127.0.0.1 --ServerApp.token={TOKEN} --LabApp.expose_app_in_browser=True"
        self.log = (state / "lab.log").open("w")
        self.process = subprocess.Popen(
            # -o: the copy shares this checkout's .venv; never let make reinstall the package
            # from the throwaway copy into it (that would point the editable install there).
            ["make", "-s", "-o", ".venv/.installed", "lab-no-browser", f"ARGS={args}"],
            cwd=repo,
            env=env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.time() + 120
        while time.time() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"make lab-no-browser exited; see {state / 'lab.log'}")
            try:
                with urllib.request.urlopen(f"{self.url}/api/status?token={TOKEN}", timeout=2):
                    return
            except OSError:
                time.sleep(0.5)
        raise RuntimeError("JupyterLab did not answer within 120 s")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
        self.log.close()


class LabPage:
    """One Chromium tab on JupyterLab, with helpers that act through Lab's own commands."""

    def __init__(self, page, server: LabServer, shots: Path) -> None:
        self.page, self.server, self.shots = page, server, shots
        self.errors: list[str] = []
        page.on("pageerror", lambda error: self.errors.append(f"pageerror: {error}"))
        page.on(
            "console",
            lambda m: (
                m.type == "error"
                and not EXPECTED_CONSOLE.search(m.text)
                and self.errors.append(f"console: {m.text}")
            ),
        )
        page.route(re.compile(r"^https?://(?!127\.0\.0\.1[:/]).*"), lambda route: route.abort())

    # -- navigation -----------------------------------------------------------------------------
    def goto(self, path: str = "") -> None:
        """Open JupyterLab (at ``lab/tree/path`` if given) and wait until it is ready."""
        self.page.goto(f"{self.server.url}/lab/{'tree/' + path if path else ''}?token={TOKEN}")
        self.page.wait_for_function(
            "() => window.jupyterapp && window.jupyterapp.shell", timeout=90_000
        )
        self.page.wait_for_selector(".jp-DirListing-item", timeout=60_000)

    def js(self, code: str, arg=None):
        return self.page.evaluate(code, arg)

    def command(self, name: str, args: dict | None = None):
        # Not awaited: a command that opens a dialog would otherwise wait on it forever; every
        # caller waits for the command's effect with a timeout instead.
        self.js("([n, a]) => { window.jupyterapp.commands.execute(n, a); }", [name, args or {}])
        self.page.wait_for_timeout(200)
        if self.page.locator(".jp-Dialog").count():
            self.screenshot(f"dialog_after_{name.replace(':', '_')}")
            raise AssertionError(
                f"{name} opened a dialog: {self.page.locator('.jp-Dialog').inner_text()[:300]}"
            )

    def open(self, path: str) -> None:
        """Open a notebook as the file browser's double-click does, and wait for its kernel."""
        self.command("docmanager:open", {"path": path})
        self.wait_for_notebook(path)

    def wait_for_notebook(self, path: str, timeout: float = 120) -> None:
        self.page.wait_for_function(
            """(p) => { const w = window.jupyterapp && window.jupyterapp.shell.currentWidget;
                 return w && w.context && w.context.path === p && w.context.isReady
                   && w.sessionContext.session && w.sessionContext.session.kernel
                   && w.sessionContext.session.kernel.status === 'idle'; }""",
            arg=path,
            timeout=timeout * 1000,
        )

    # -- the current notebook -------------------------------------------------------------------
    def dirty(self) -> bool:
        return self.js("() => window.jupyterapp.shell.currentWidget.context.model.dirty")

    def n_cells(self) -> int:
        return self.js("() => window.jupyterapp.shell.currentWidget.content.widgets.length")

    def cell(self, index: int):
        """A locator for cell ``index`` of the notebook in front."""
        self.js(
            """(i) => { document.querySelectorAll('[data-course-cell]')
                   .forEach(n => n.removeAttribute('data-course-cell'));
                 window.jupyterapp.shell.currentWidget.content.widgets[i].node
                   .setAttribute('data-course-cell', String(i)); }""",
            index,
        )
        return self.page.locator(f'[data-course-cell="{index}"]')

    def find_cell(self, text: str) -> int:
        """Index of the first cell whose source contains ``text``."""
        index = self.js(
            """(t) => window.jupyterapp.shell.currentWidget.content.widgets
                 .findIndex(c => c.model.sharedModel.getSource().includes(t))""",
            text,
        )
        assert index >= 0, f"no cell contains {text!r}"
        return index

    def set_source(self, index: int, source: str) -> None:
        """Replace a cell's text, as select-all + typing in its editor would."""
        self.js(
            """([i, s]) => window.jupyterapp.shell.currentWidget.content.widgets[i]
                 .model.sharedModel.setSource(s)""",
            [index, source],
        )

    def run_cell(self, index: int, timeout: float = 120) -> None:
        """Select cell ``index``, press Shift+Enter's command and wait until the kernel is idle."""
        self.js(
            """(i) => { const nb = window.jupyterapp.shell.currentWidget.content;
                 nb.activeCellIndex = i; nb.mode = 'command'; }""",
            index,
        )
        self.command("notebook:run-cell")
        self.wait_idle(timeout)

    def run_all(self, timeout: float = 300) -> None:
        self.command("notebook:run-all-cells")
        self.wait_idle(timeout)

    def wait_idle(self, timeout: float = 120) -> None:
        """Wait until no cell is queued or running and the kernel is idle."""
        self.page.wait_for_timeout(300)
        self.page.wait_for_function(
            """() => { const w = window.jupyterapp.shell.currentWidget;
                 const k = w.sessionContext.session && w.sessionContext.session.kernel;
                 const busy = [...w.content.node.querySelectorAll('.jp-InputPrompt')]
                   .some(p => p.textContent.includes('*'));
                 return k && k.status === 'idle' && !busy; }""",
            timeout=timeout * 1000,
        )
        self.page.wait_for_timeout(500)  # let renderers (plotly, widgets) draw

    def save(self) -> None:
        self.command("docmanager:save")
        self.page.wait_for_function(
            "() => !window.jupyterapp.shell.currentWidget.context.model.dirty", timeout=30_000
        )

    def close_all(self) -> None:
        """Close every tab without saving (the tests save explicitly where they mean to)."""
        self.js(
            """() => { for (const w of window.jupyterapp.shell.widgets('main')) {
                   if (w.context) { w.context.model.dirty = false; } } }"""
        )
        self.command("application:close-all")
        self.page.wait_for_timeout(500)

    def shutdown_kernels(self) -> None:
        """Shut every kernel down (fired, then waited for with a timeout: never hangs)."""
        self.js(
            """() => { const m = window.jupyterapp.serviceManager;
                 m.sessions.refreshRunning().then(() => Promise.all(
                   [...m.sessions.running()].map(s => m.sessions.shutdown(s.id)))); }"""
        )
        self.page.wait_for_function(
            "() => [...window.jupyterapp.serviceManager.sessions.running()].length === 0",
            timeout=60_000,
        )

    # -- what the learner sees ------------------------------------------------------------------
    def screenshot(self, name: str) -> Path:
        path = self.shots / f"{name}.png"
        self.page.screenshot(path=str(path))
        return path

    def scroll_to(self, index: int) -> None:
        self.cell(index).scroll_into_view_if_needed()
        self.page.wait_for_timeout(300)

    def output_text(self, index: int) -> str:
        return self.cell(index).locator(".jp-OutputArea").inner_text()

    def plots_in(self, index: int):
        return self.cell(index).locator(".js-plotly-plot")

    def plot_title(self, index: int, which: int = 0) -> str:
        return self.plots_in(index).nth(which).locator(".gtitle").text_content() or ""

    def screen_problems(self) -> list[str]:
        """Error text that a learner could see in the notebook in front."""
        text = self.js("() => window.jupyterapp.shell.currentWidget.node.innerText")
        bad = [
            "No renderer could be found",
            "Error displaying widget",
            "Loading widget",
            "model not found",
            "Javascript Error",
        ]
        return [b for b in bad if b in text]
