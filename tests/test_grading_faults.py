"""Grading survives faults (issue 30): each fault injected into a tiny chapter-00 notebook.

A dying kernel (``os._exit``, SIGKILL), a kernel over a memory limit, an endless loop under a short
cell timeout, Ctrl-C and SIGTERM sent to the grader, a corrupt and a concurrent progress file, a
read-only checkout. Each test asserts how long the command took to end, the sentence it printed,
that no kernel process is left (every process this test starts carries a marker in its
environment) and what is on disk afterwards.

The notebooks never import torch in their kernel, so a kernel starts in a second or two; the
grader's own start (torch, for the checks) is the bulk of each run.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import nbformat
import pytest

from course_utils.machinery import cli
from course_utils.machinery.grading import PROGRESS_FILE

EXERCISES = ("cosine_similarity_matrix", "record_norm_hook", "ablation_loss_change")
EARLIER = {"01": {"checked_at": "2026-01-01 09:00", "results": [
    {"number": "1.1", "name": "x", "status": "passed", "message": ""}]}}  # fmt: skip


def tiny_notebook(path: Path, fault: str) -> Path:
    """Chapter 00 in three code cells and the three check calls: ``x = 1``, then ``fault``."""
    nb = nbformat.v4.new_notebook()
    nb.cells = [
        nbformat.v4.new_markdown_cell("# 00 — a tiny notebook"),
        nbformat.v4.new_code_cell("x = 1"),
        nbformat.v4.new_code_cell(fault),
        *(nbformat.v4.new_code_cell(f"check.{name}({name})") for name in EXERCISES),
    ]
    nbformat.write(nb, path)
    return path


def kernels_left(marker: str) -> list[int]:
    """Live processes (a kernel or anything it started) whose environment carries ``marker``."""
    found = []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            if f"COURSE_FAULT_TEST={marker}".encode() in environ.read_bytes():
                found.append(int(environ.parent.name))
        except OSError:
            continue
    return [pid for pid in found if pid != os.getpid()]


def wait_for(path: Path, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


@pytest.fixture(autouse=True)
def no_hang():
    """A fault that hangs the grader (as they all did before issue 30) fails the run in 120 s,
    with every thread's stack, instead of stalling CI."""
    import faulthandler

    faulthandler.dump_traceback_later(120, exit=True)
    yield
    faulthandler.cancel_dump_traceback_later()


@pytest.fixture
def place(tmp_path, monkeypatch):
    """A folder outside any checkout, progress kept in COURSE_HOME (never the repository's), a
    marker for this test's processes, and SIGTERM's handler put back after ``cli.main``."""
    marker = uuid.uuid4().hex
    monkeypatch.setenv("COURSE_FAULT_TEST", marker)
    monkeypatch.setenv("COURSE_HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    sigterm = signal.getsignal(signal.SIGTERM)
    yield tmp_path, marker
    signal.signal(signal.SIGTERM, sigterm)
    left = kernels_left(marker)
    assert not left, [Path(f"/proc/{pid}/cmdline").read_bytes() for pid in left]


def check(capsys, *args: str) -> tuple[int, str, float]:
    """``course check`` in this process: (exit code, what it printed, seconds)."""
    start = time.monotonic()
    code = cli.main(["check", *args])
    seconds = time.monotonic() - start
    printed = capsys.readouterr()
    return code, printed.out + printed.err, seconds


def progress(tmp_path: Path) -> dict:
    return json.loads((tmp_path / "home" / PROGRESS_FILE).read_text())


# ----------------------------------------------------------------------------- a kernel that dies


def test_os_exit_names_the_cell_and_the_exit_code(place, capsys):
    tmp_path, marker = place
    stamp = tmp_path / "fault-at"
    fault = f"import os, time\nopen({str(stamp)!r}, 'w').write(repr(time.time()))\nos._exit(3)"
    nb = tiny_notebook(tmp_path / "00_exit.ipynb", fault)
    code, out, seconds = check(capsys, str(nb))
    after = time.time() - float(stamp.read_text())
    print(f"[fault] os._exit: course check ended {after:.1f} s after it (all: {seconds:.1f} s)")
    assert after < 30 and code == 1, out
    assert "The kernel exited with code 3 while running code cell 2 (`import os, time`)" in out
    assert "0 passed, 0 failed, 0 not attempted, 3 not run" in out
    assert not kernels_left(marker)
    saved = progress(tmp_path)["00"]["results"]
    assert [r["status"] for r in saved] == ["not run"] * 3


def test_a_kernel_killed_by_sigkill_is_blamed_on_memory(place, capsys):
    tmp_path, marker = place
    pid_file = tmp_path / "kernel.pid"
    fault = (
        f"import os, time\nopen({str(pid_file)!r}, 'w').write(str(os.getpid()))\ntime.sleep(120)"
    )
    nb = tiny_notebook(tmp_path / "00_killed.ipynb", fault)
    killed_at = []

    def kill_the_kernel():  # as the out-of-memory killer does
        wait_for(pid_file)
        time.sleep(0.2)  # the write is done
        killed_at.append(time.monotonic())
        os.kill(int(pid_file.read_text()), signal.SIGKILL)

    killer = threading.Thread(target=kill_the_kernel, daemon=True)
    killer.start()
    code, out, seconds = check(capsys, str(nb), "--no-save")
    waited = time.monotonic() - killed_at[0]
    print(f"[fault] SIGKILL: course check ended {waited:.1f} s after the kill")
    assert waited < 30 and code == 1, out
    assert "The kernel was killed by SIGKILL while running code cell 2 (`import os, time`)" in out
    assert "most likely the machine ran out of memory" in out and "3 not run" in out
    assert not (tmp_path / "home").exists()  # --no-save


def test_a_kernel_over_its_memory_limit(place, capsys):
    tmp_path, marker = place
    fault = (  # room for 256 MB more than the kernel has mapped now, then ask for 2 GB
        "import resource, re\n"
        "now = int(re.search(r'VmSize:\\s+(\\d+)', open('/proc/self/status').read())[1]) * 1024\n"
        "resource.setrlimit(resource.RLIMIT_AS, (now + 2**28, resource.RLIM_INFINITY))\n"
        "too_much = bytearray(2**31)"
    )
    nb = tiny_notebook(tmp_path / "00_memory.ipynb", fault)
    code, out, seconds = check(capsys, str(nb))
    print(f"[fault] memory limit: course check ended in {seconds:.1f} s")
    assert seconds < 30 and code == 1, out
    assert "Code cell 2 (`import resource, re`) ran out of memory (MemoryError" in out
    assert "0 passed, 3 failed" in out  # the kernel lived on: the checks ran, without `check`
    assert len(progress(tmp_path)["00"]["results"]) == 3


@pytest.mark.parametrize(
    "option, words",
    [
        ("--cell-timeout", "was still running after the 3 s cell timeout, so it was stopped"),
        ("--timeout", "the notebook ran past its 3 s limit in code cell 2"),
    ],
)
def test_an_endless_loop_is_stopped_at_the_timeout(place, capsys, option, words):
    tmp_path, marker = place
    started = tmp_path / "started"
    nb = tiny_notebook(
        tmp_path / "00_loop.ipynb", f"open({str(started)!r}, 'w').close()\nwhile True:\n    pass"
    )
    watcher = []
    threading.Thread(
        target=lambda: (wait_for(started), watcher.append(time.monotonic())), daemon=True
    ).start()
    code, out, seconds = check(capsys, str(nb), option, "3", "--no-save")
    looped = time.monotonic() - watcher[0]
    print(f"[fault] endless loop, {option} 3: course check ended {looped:.1f} s after it began")
    assert looped < 3 + 5 and code == 1, out
    assert words in out and "(`open(" in out and "3 not run" in out


def test_course_execute_does_not_rewrite_a_notebook_whose_kernel_died(place, capsys):
    tmp_path, marker = place
    nb = tiny_notebook(tmp_path / "00_exit.ipynb", "import os; os._exit(1)")
    before = nb.read_bytes()
    start = time.monotonic()
    code = cli.main(["execute", str(nb)])
    err = capsys.readouterr().err
    print(f"[fault] os._exit: course execute ended in {time.monotonic() - start:.1f} s")
    assert time.monotonic() - start < 30 and code == 2
    assert "was not rewritten: the kernel exited with code 1 while running code cell 2" in err
    assert len(err.strip().splitlines()) == 1 and nb.read_bytes() == before


def test_course_report_grades_on_past_a_dead_kernel(place):
    """What a report worker returns for a notebook whose kernel died, and the CSV row it makes; a
    kernel killed by a signal (memory, most likely, under -j) is not cached, one that exited is."""
    from course_utils.machinery import report

    tmp_path, marker = place
    nb = tiny_notebook(tmp_path / "zoe.ipynb", "import os; os._exit(1)")
    start = time.monotonic()
    record = report.grade_one(str(nb), "00", cell_timeout=600, notebook_timeout=1800)
    assert time.monotonic() - start < 30 and not record["error"], record
    sub = report.Submission("zoe.ipynb", "zoe", "00", results=record["results"])
    report.write_csv([sub], tmp_path / "report.csv")
    row = (tmp_path / "report.csv").read_text()
    assert row.count("not run: the kernel exited with code 1 while running code cell 2") == 3
    assert ",0,0,0,3," in row  # passed, failed, not attempted, not run
    assert report._cacheable(record)
    killed = {**record, "fault": {**record["fault"], "returncode": -9}}
    assert not report._cacheable(killed)


# ----------------------------------------------------------------------------- Ctrl-C and SIGTERM


@pytest.mark.parametrize("signum, code, name", [(signal.SIGINT, 130, "Ctrl-C"),
                                                (signal.SIGTERM, 143, "SIGTERM")])  # fmt: skip
def test_ctrl_c_and_sigterm_end_the_check_and_its_kernel(tmp_path, signum, code, name):
    started = tmp_path / "started"
    nb = tiny_notebook(
        tmp_path / "00_busy.ipynb", f"open({str(started)!r}, 'w').close()\nwhile True:\n    pass"
    )
    home = tmp_path / "home"
    home.mkdir()
    (home / PROGRESS_FILE).write_text(json.dumps(EARLIER))
    marker = uuid.uuid4().hex
    env = {**os.environ, "COURSE_FAULT_TEST": marker, "COURSE_HOME": str(home)}
    grader = subprocess.Popen(
        [sys.executable, "-m", "course_utils.machinery.cli", "check", str(nb)],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # as a terminal's foreground job: the signal reaches the grader
    )
    try:
        wait_for(started)
        sent = time.monotonic()
        grader.send_signal(signum)
        out, err = grader.communicate(timeout=30)
        seconds = time.monotonic() - sent
    finally:
        grader.kill()
    print(f"[fault] {name}: course check ended {seconds:.2f} s after the signal")
    assert grader.returncode == code and seconds < 2, (seconds, out, err)
    assert f"course check: interrupted ({name}); the kernel was shut down" in err
    assert not kernels_left(marker)
    assert json.loads((home / PROGRESS_FILE).read_text()) == EARLIER  # nothing half-done
    assert sorted(p.name for p in home.iterdir()) == [PROGRESS_FILE]


def test_sigterm_ends_course_report_and_its_workers_kernels(tmp_path):
    """(Ctrl-C on `course report` is tests/test_report.py's first run.)"""
    folder = tmp_path / "cohort"
    folder.mkdir()
    started = tmp_path / "started"
    tiny_notebook(folder / "zoe.ipynb", f"open({str(started)!r}, 'w').close()\nwhile True: pass")
    marker = uuid.uuid4().hex
    grader = subprocess.Popen(
        [sys.executable, "-m", "course_utils.machinery.cli", "report", str(folder)]
        + ["-o", str(tmp_path / "out"), "-j", "1"],
        cwd=tmp_path,
        env={**os.environ, "COURSE_FAULT_TEST": marker},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        wait_for(started, 90)
        sent = time.monotonic()
        grader.send_signal(signal.SIGTERM)
        out, err = grader.communicate(timeout=30)
        seconds = time.monotonic() - sent
    finally:
        grader.kill()
    print(f"[fault] SIGTERM: course report ended {seconds:.2f} s after the signal")
    assert grader.returncode == 143 and seconds < 2, (seconds, out, err)
    assert "interrupted (SIGTERM): every notebook graded so far is cached" in out
    time.sleep(0.5)  # the worker's own exit
    assert not kernels_left(marker)
    assert not (tmp_path / "out" / "report.csv").exists()


# ----------------------------------------------------------------------------- the progress file


def test_a_corrupt_progress_file_is_kept_aside_and_said(place, capsys):
    tmp_path, marker = place
    home = tmp_path / "home"
    home.mkdir()
    corrupt = json.dumps(EARLIER)[:25]  # cut off, as by a power cut in the middle of a write
    (home / PROGRESS_FILE).write_text(corrupt)
    nb = tiny_notebook(tmp_path / "00_fine.ipynb", "y = 2")
    code, out, seconds = check(capsys, str(nb))
    print(f"[fault] corrupt progress file: course check ended in {seconds:.1f} s")
    assert seconds < 30, out
    kept = list(home.glob(f"{PROGRESS_FILE}.unreadable-*"))
    assert len(kept) == 1 and kept[0].read_text() == corrupt
    assert "Your progress file could not be read (not valid JSON" in out
    assert f"it is kept as {kept[0]} and a new one was started" in out
    assert list(progress(tmp_path)) == ["00"]
    # `course list` says so too, and changes nothing
    (home / PROGRESS_FILE).write_text("[1, 2")
    assert cli.main(["list"]) == 0
    assert "cannot be read" in capsys.readouterr().err
    assert (home / PROGRESS_FILE).read_text() == "[1, 2"


def _save_repeatedly(number: str, ready: Path, go: Path) -> None:
    from course_utils.machinery.chapters import get_chapter
    from course_utils.machinery.grading import ExerciseResult, save_progress

    ready.touch()
    while not go.exists():
        time.sleep(0.002)
    for i in range(25):
        save_progress(get_chapter(number), [ExerciseResult("1", "x", "passed", str(i))])


def test_concurrent_checks_keep_each_others_chapters(tmp_path, monkeypatch):
    """Three processes save their own chapter 25 times each, all at once, beside a chapter saved
    earlier: every chapter is there at the end, with its last save, and no temporary file."""
    import multiprocessing

    home = tmp_path / "home"
    home.mkdir()
    (home / PROGRESS_FILE).write_text(json.dumps(EARLIER))
    monkeypatch.setenv("COURSE_HOME", str(home))
    go = tmp_path / "go"
    context = multiprocessing.get_context("fork")  # starts at once: the modules are loaded
    savers = []
    for number in ("02", "03", "04"):
        ready = tmp_path / f"ready-{number}"
        savers.append(context.Process(target=_save_repeatedly, args=(number, ready, go)))
        savers[-1].start()
    for number in ("02", "03", "04"):
        wait_for(tmp_path / f"ready-{number}", 30)
    start = time.monotonic()
    go.touch()
    for saver in savers:
        saver.join(60)
    print(f"[fault] 3 x 25 concurrent saves: {time.monotonic() - start:.1f} s")
    assert [s.exitcode for s in savers] == [0, 0, 0] and time.monotonic() - start < 30
    data = json.loads((home / PROGRESS_FILE).read_text())
    assert sorted(data) == ["01", "02", "03", "04"], sorted(data)
    assert {data[n]["results"][0]["message"] for n in ("02", "03", "04")} == {"24"}
    assert not list(home.glob(".*.tmp")) and not list(home.glob("*.unreadable-*"))


# ----------------------------------------------------------------------------- read-only checkout


def _read_only(command: list[str], checkout: Path) -> list[str]:
    """``command`` run with ``checkout`` read-only: by its mode for an ordinary user; for root (who
    writes anyway) in a mount namespace of its own with the folder bound read-only."""
    if os.geteuid() != 0:
        for path in [checkout, *checkout.rglob("*")]:
            path.chmod(path.stat().st_mode & ~0o222)
        return command
    if not shutil.which("unshare"):
        pytest.skip("root without unshare(1): cannot make a read-only checkout")
    probe = subprocess.run(["unshare", "-m", "true"], capture_output=True)
    if probe.returncode:
        pytest.skip(f"root, and no mount namespace here: {probe.stderr.decode().strip()}")
    script = f'mount --bind "{checkout}" "{checkout}" && mount -o remount,bind,ro "{checkout}" '
    return ["unshare", "-m", "sh", "-c", script + '&& exec "$@"', "sh", *command]


def test_a_read_only_checkout_saves_progress_in_the_learners_state_folder(tmp_path):
    checkout = tmp_path / "course"
    for folder in ("solutions", "notebooks"):
        (checkout / folder).mkdir(parents=True)
    nb = tiny_notebook(checkout / "notebooks" / "00_setup_and_tools.ipynb", "y = 2")
    state = tmp_path / "state"
    marker = uuid.uuid4().hex
    env = {**os.environ, "COURSE_FAULT_TEST": marker, "XDG_STATE_HOME": str(state)}
    env.pop("COURSE_HOME", None)
    command = [sys.executable, "-m", "course_utils.machinery.cli", "check", str(nb)]
    grader = subprocess.Popen(
        _read_only(command, checkout), cwd=checkout, env=env, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    first = grader.stdout.readline()  # "Checking ...": the grader has started (torch and all)
    start = time.monotonic()
    rest = grader.stdout.read()
    grader.wait(60)
    seconds = time.monotonic() - start
    print(f"[fault] read-only checkout: course check ended {seconds:.1f} s after it began")
    assert first.startswith("Checking") and seconds < 30, first + rest
    saved = state / "mi-course" / PROGRESS_FILE
    assert f"progress saved to {saved}" in rest, rest
    assert "00" in json.loads(saved.read_text())
    assert not (checkout / PROGRESS_FILE).exists()
    assert not kernels_left(marker)


def test_nowhere_to_save_progress_is_said_in_one_sentence(place, capsys, monkeypatch):
    tmp_path, marker = place
    (tmp_path / "a-file").write_text("")
    monkeypatch.delenv("COURSE_HOME")
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "a-file" / "state"))  # cannot be made
    nb = tiny_notebook(tmp_path / "00_fine.ipynb", "y = 2")
    code, out, seconds = check(capsys, str(nb))
    assert seconds < 30, out
    assert "progress not saved: no writable place for it (" in out
    assert "set COURSE_HOME to a folder you can write to" in out
