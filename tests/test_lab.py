"""`make lab-no-browser` installs nothing new, registers the kernel, and its JupyterLab answers."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.request

import pytest

from tests.conftest import ROOT


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_make_lab_no_browser_serves_on_localhost(tmp_path):
    if shutil.which("make") is None or not (ROOT / ".venv" / ".installed").exists():
        pytest.skip("needs make and the .venv that `make test` / `make lab` create")
    port = _free_port()
    args = f"--port={port} --ip=127.0.0.1 --ServerApp.token=course-test"
    server = subprocess.Popen(
        ["make", "-s", "lab-no-browser", f"ARGS={args}"],
        cwd=ROOT,
        env={**os.environ, "JUPYTER_RUNTIME_DIR": str(tmp_path)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.time() + 90
        while time.time() < deadline:
            assert server.poll() is None, "make lab-no-browser exited early"
            try:
                url = f"http://127.0.0.1:{port}/api/status?token=course-test"
                with urllib.request.urlopen(url, timeout=2) as response:
                    assert response.status == 200
                    return
            except OSError:
                time.sleep(0.5)
        pytest.fail("JupyterLab did not answer on localhost within 90 s")
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
