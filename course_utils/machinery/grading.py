"""``course check``: execute a learner's notebook headless and tabulate every exercise.

Each check call in a notebook leaves a small JSON record in its cell output (see
``checks.core.RESULT_MIME``). We run the notebook with nbclient, continuing past errors, then
read those records back. An exercise whose check never produced a record reports the error of
the cell that should have run it.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import nbformat

from course_utils.checks.core import (
    FAILED,
    NOT_ATTEMPTED,
    PASSED,
    RESULT_MIME,
    Exercise,
    exercises_of,
)
from course_utils.machinery.build import read_notebook
from course_utils.machinery.chapters import Chapter, working_checkout

PROGRESS_FILE = ".course-progress.json"
#: An exercise the grader could not reach: the kernel died or a cell ran out of time before it.
NOT_RUN = "not run"
#: Chapters renumbered since progress files were first written: old number -> (new number, slug).
#: A saved entry under the old number without a slug (written before the move) is carried over.
MOVED_CHAPTERS = {"10": ("11", "capstone_feature_analysis")}


@dataclass
class ExerciseResult:
    number: str
    name: str
    status: str
    message: str


class GradingTerminated(KeyboardInterrupt):
    """SIGTERM reached a course command; raised in the main thread by :func:`raise_on_sigterm`.
    A KeyboardInterrupt, so that every path that cleans up after Ctrl-C cleans up after it too;
    Ctrl-C itself stays a plain KeyboardInterrupt (exit 130)."""

    exit_code = 143
    signal_name = "SIGTERM"


def raise_on_sigterm() -> None:
    """Turn SIGTERM into :class:`GradingTerminated` (a KeyboardInterrupt), so that ``timeout``, a
    closed terminal or a job scheduler ends a course command the way Ctrl-C does: the kernel is
    shut down and nothing half-written is left. Main thread only."""
    import signal

    def handler(signum, frame):
        raise GradingTerminated()

    signal.signal(signal.SIGTERM, handler)


#: Kernel processes this process has started and not yet seen end (see :func:`stop_kernels`).
_LIVE_KERNELS: dict[int, subprocess.Popen] = {}


def stop_kernels(grace: float = 0.2) -> None:
    """End every kernel this process started, with its process group (a kernel runs in a session of
    its own, so whatever it started goes with it): SIGTERM, then SIGKILL after ``grace`` seconds;
    reap each, so that no zombie is left."""
    import signal

    processes = [p for p in list(_LIVE_KERNELS.values()) if p.poll() is None]
    for process in processes:
        _signal_group(process, signal.SIGTERM)
    deadline = time.monotonic() + grace
    for process in processes:
        try:
            process.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            _signal_group(process, signal.SIGKILL)
            try:
                process.wait(2)
            except subprocess.TimeoutExpired:
                pass
    for pid, process in list(_LIVE_KERNELS.items()):
        if process.poll() is not None:
            _LIVE_KERNELS.pop(pid, None)


def _signal_group(process: subprocess.Popen, signum: int) -> None:
    try:
        os.killpg(os.getpgid(process.pid), signum)
    except (ProcessLookupError, PermissionError, AttributeError):
        try:
            process.send_signal(signum)
        except ProcessLookupError:
            pass


def _first_line(source: str) -> str:
    line = next((x.strip() for x in source.splitlines() if x.strip()), "")
    return line if len(line) <= 60 else line[:57] + "..."


def _describe_exit(returncode: int | None) -> str:
    import signal

    if returncode is None:
        return "the kernel stopped answering"
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"the kernel was killed by {name}"
    return f"the kernel exited with code {returncode}"


def fault_sentence(fault: dict) -> str:
    """One sentence: what stopped the run, in which cell, and what to do."""
    where = (
        f"code cell {fault['code_cell']} (`{fault['first_line']}`)"
        if fault.get("code_cell")
        else "the notebook before its first cell ran"
    )
    kind = fault["kind"]
    if kind == "cell-timeout":
        return (
            f"{where} was still running after the {fault['limit']:.0f} s cell timeout, so it was "
            "stopped: look for an endless loop there, or give it more time with --cell-timeout."
        )
    if kind == "notebook-timeout":
        return (
            f"the notebook ran past its {fault['limit']:.0f} s limit in {where}, so it was stopped: "
            "give it more time with --timeout."
        )
    code = fault.get("returncode")
    died = (
        f"{_describe_exit(code)} while running {where}"
        if fault.get("code_cell")
        else f"{_describe_exit(code)} before the first cell ran"
    )
    if code == -9:  # what Linux's out-of-memory killer (and a cgroup's memory limit) sends
        return (
            f"{died}: most likely the machine ran out of memory, so close other programs (with "
            "`course report`, grade fewer notebooks at once with -j) or make that cell use less "
            "memory, and run again."
        )
    if code is not None and code < 0:
        return f"{died}: a crash in native code (torch, numpy) or a signal sent to it; run again."
    return (
        f"{died}: something in that cell ended the Python process (such as `os._exit` or a "
        "crashing library); remove it and run again."
    )


def memory_sentence(notebook: nbformat.NotebookNode) -> str | None:
    """One sentence when a cell ran out of memory without the kernel dying (MemoryError, e.g. under
    a ``ulimit -v``, or torch's "can't allocate memory")."""
    code_cell = 0
    for cell in notebook.cells:
        if cell.cell_type != "code":
            continue
        code_cell += 1
        error = _error(cell) or ""
        if error.startswith("MemoryError") or "can't allocate memory" in error:
            return (
                f"code cell {code_cell} (`{_first_line(cell.source)}`) ran out of memory "
                f"({error[:80]}): close other programs or make that cell use less memory, then "
                "run again."
            )
    return None


def current_env_client(
    notebook: nbformat.NotebookNode,
    workdir: Path,
    cell_timeout: float,
    allow_errors: bool,
    notebook_timeout: float | None = None,
):
    """An nbclient runner whose kernel is THIS Python (the course's .venv), headless and offline.

    Asking for the "python3" kernel by name could start whatever interpreter a user-wide
    kernelspec points at; like nbval's --nbval-current-env, we build the spec from sys.executable.

    The manager is jupyter_client's *async* one, as nbclient expects: with the blocking manager,
    nbclient's wait for a cell's output blocks its event loop, so neither its dead-kernel check
    (once a second) nor its cell timeout ever runs, and a kernel that dies mid-cell hangs the
    grader for good. ``client.course_state`` records the running cell, the limit that applies to
    it and the kernel's process (for its exit code).
    """
    import ipykernel.kernelspec
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import AsyncKernelManager
    from nbclient import NotebookClient

    class CurrentEnvSpecs(KernelSpecManager):
        def get_kernel_spec(self, kernel_name):
            spec = ipykernel.kernelspec.get_kernel_dict()
            return self.kernel_spec_class(resource_dir=ipykernel.kernelspec.RESOURCES, **spec)

    state: dict = {"cell_index": None, "limit": None, "process": None}

    class TrackedKernelManager(AsyncKernelManager):
        async def _async_launch_kernel(self, kernel_cmd, **kw):
            await super()._async_launch_kernel(kernel_cmd, **kw)
            process = getattr(self.provisioner, "process", None)
            if process is not None:
                state["process"] = process
                _LIVE_KERNELS[process.pid] = process

    os.environ.setdefault("COURSE_HEADLESS", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    manager = TrackedKernelManager(
        kernel_name="course-current-env", kernel_spec_manager=CurrentEnvSpecs()
    )

    def on_cell_execute(cell, cell_index):
        state["cell_index"] = cell_index

    def on_cell_executed(cell, cell_index, execute_reply):
        state["cell_index"] = None

    client = NotebookClient(
        notebook,
        km=manager,
        timeout=cell_timeout,
        allow_errors=allow_errors,
        startup_timeout=120,
        # a kernel that is stopped (timeout, interrupt) is killed at once, not asked and waited for
        shutdown_kernel="immediate",
        on_cell_execute=on_cell_execute,
        on_cell_executed=on_cell_executed,
        resources={"metadata": {"path": str(workdir)}},
    )
    deadline = None if notebook_timeout is None else time.monotonic() + notebook_timeout

    def timeout_func(cell):
        # A whole-notebook deadline: each cell gets what is left of it (at least 1 s; nbclient
        # reads 0 or less as "no timeout"), capped by the per-cell timeout.
        if deadline is None or cell_timeout <= deadline - time.monotonic():
            state["limit"] = ("cell-timeout", cell_timeout)
            return cell_timeout
        state["limit"] = ("notebook-timeout", notebook_timeout)
        return max(1, deadline - time.monotonic())

    client.timeout_func = timeout_func
    client.course_state = state
    return client


def _fault(notebook: nbformat.NotebookNode, state: dict, kind: str) -> dict:
    index = state["cell_index"]
    code_cell = None
    first_line = ""
    if index is not None:
        code_cell = sum(c.cell_type == "code" for c in notebook.cells[: index + 1])
        first_line = _first_line(notebook.cells[index].source)
    process = state["process"]
    fault = {
        "kind": kind,
        "cell_index": index,
        "code_cell": code_cell,
        "first_line": first_line,
        "returncode": process.poll() if process is not None else None,
        "limit": (state["limit"] or (kind, None))[1],
    }
    fault["sentence"] = fault_sentence(fault)
    return fault


def run_notebook(
    notebook: nbformat.NotebookNode,
    workdir: Path,
    cell_timeout: float,
    allow_errors: bool,
    notebook_timeout: float | None = None,
) -> dict | None:
    """Run the notebook in a fresh kernel; the fault that stopped it early (see
    :func:`fault_sentence`), or None when every cell ran.

    nbclient runs in a thread of its own: in the main thread it would install SIGINT and SIGTERM
    handlers that only schedule the kernel's shutdown, so Ctrl-C and ``kill`` would not end the
    command. Here the main thread waits; on Ctrl-C or SIGTERM (see :func:`raise_on_sigterm`) it
    ends the kernel itself and lets the KeyboardInterrupt (or :class:`GradingTerminated`) go on. A cell that raises, with
    ``allow_errors`` False, raises nbclient's CellExecutionError here.
    """
    import asyncio
    import signal
    import threading

    from nbclient.exceptions import CellTimeoutError, DeadKernelError

    client = current_env_client(notebook, workdir, cell_timeout, allow_errors, notebook_timeout)
    state, manager = client.course_state, client.km
    outcome: dict = {}

    def target():
        try:
            # The kernel's own start-up chatter (e.g. "running over TCP without encryption") is
            # noise in a learner's terminal; what the notebook raised is in the cell outputs.
            # cleanup_kc: shut the kernel down at the end even though we made its manager (nbclient
            # leaves alone a kernel whose manager it was given, and it would live on, idle or
            # still running a timed-out cell, until this process ends).
            asyncio.run(client.async_execute(cleanup_kc=True, stderr=subprocess.DEVNULL))
        except BaseException as error:  # handed to the waiting thread
            outcome["error"] = error

    worker = threading.Thread(target=target, name="course-kernel", daemon=True)
    worker.start()
    try:
        while worker.is_alive():
            worker.join(0.2)
    except KeyboardInterrupt:
        # Ctrl-C or SIGTERM: end the kernel (the worker then sees it dead and unwinds).
        stop_kernels()
        deadline = time.monotonic() + 0.3
        while worker.is_alive() and time.monotonic() < deadline:
            worker.join(0.1)
            stop_kernels(grace=0.1)  # one that was still starting
        try:
            manager.cleanup_connection_file()  # what nbclient's clean-up would have removed
        except Exception:
            pass
        raise
    finally:
        process = state["process"]
        if process is not None:
            if process.poll() is None and not worker.is_alive():  # never left running
                _signal_group(process, signal.SIGKILL)
                process.wait(5)
            _LIVE_KERNELS.pop(process.pid, None)
    error = outcome.get("error")
    if error is None:
        return None
    if isinstance(error, CellTimeoutError):
        kind = (state["limit"] or ("cell-timeout", cell_timeout))[0]
        return _fault(notebook, state, kind)
    if isinstance(error, DeadKernelError) or (
        isinstance(error, RuntimeError) and "Kernel died" in str(error)
    ):
        return _fault(notebook, state, "died")
    raise error


def execute(
    notebook: nbformat.NotebookNode,
    workdir: Path,
    cell_timeout: float,
    notebook_timeout: float | None = None,
) -> nbformat.NotebookNode:
    """Run every cell (errors do not stop the run) in a fresh kernel; headless and offline.
    A run that stopped early (dead kernel, timeout) is described in the notebook's metadata
    ``course_check_fault`` (see :func:`fault_sentence`)."""
    # Outputs the learner saved are not results: only what this run prints counts.
    for cell in notebook.cells:
        if cell.cell_type == "code":
            cell.outputs = []
    fault = run_notebook(notebook, workdir, cell_timeout, True, notebook_timeout)
    if fault is not None:
        notebook.metadata["course_check_fault"] = fault
    return notebook


def _records(cell: nbformat.NotebookNode) -> list[dict]:
    return [
        o["data"][RESULT_MIME] for o in cell.get("outputs", []) if RESULT_MIME in o.get("data", {})
    ]


def _error(cell: nbformat.NotebookNode) -> str | None:
    for output in cell.get("outputs", []):
        if output.get("output_type") == "error":
            return f"{output['ename']}: {output['evalue']}"[:300]
    return None


def exercises_of_chapter(chapter: Chapter) -> list[Exercise]:
    """The chapter's exercises, from its checks module, in exercise-number order."""
    return exercises_of(importlib.import_module(chapter.checks_module))


def tabulate(notebook: nbformat.NotebookNode, chapter: Chapter) -> list[ExerciseResult]:
    """One result per exercise of the chapter. When the run stopped early (``course_check_fault``
    in the notebook's metadata), the exercise whose check cell was running then failed with the
    fault's sentence, and those whose check cells come later are "not run": the grader could not
    reach them, which says nothing about the learner's answer."""
    results = []
    records = {
        r["name"]: r for cell in notebook.cells if cell.cell_type == "code" for r in _records(cell)
    }
    fault = notebook.metadata.get("course_check_fault")
    stopped_at = None
    if fault:
        stopped_at = fault["cell_index"] if fault["cell_index"] is not None else -1
    for ex in exercises_of_chapter(chapter):
        if ex.name in records:
            r = records[ex.name]
            results.append(ExerciseResult(ex.number, ex.name, r["status"], r["message"]))
            continue
        call = re.compile(rf"\bcheck\.{re.escape(ex.name)}\(")
        index, cell = next(
            (
                (i, c)
                for i, c in enumerate(notebook.cells)
                if c.cell_type == "code" and call.search(c.source)
            ),
            (None, None),
        )
        if cell is None:
            message = f"no cell calls `check.{ex.name}(...)` — was the check cell deleted?"
            results.append(ExerciseResult(ex.number, ex.name, FAILED, message))
        elif _error(cell):
            message = f"the check could not run: {_error(cell)}"
            status = NOT_ATTEMPTED if "NotImplementedError" in message else FAILED
            results.append(ExerciseResult(ex.number, ex.name, status, message))
        elif stopped_at is not None and index == stopped_at:
            results.append(ExerciseResult(ex.number, ex.name, FAILED, fault["sentence"]))
        elif stopped_at is not None and index > stopped_at:
            message = f"not run: {fault['sentence']}"
            results.append(ExerciseResult(ex.number, ex.name, NOT_RUN, message))
        else:
            message = "the check cell ran but reported nothing: is the call inside an `if`?"
            results.append(ExerciseResult(ex.number, ex.name, FAILED, message))
    return results


def render_table(results: list[ExerciseResult]) -> str:
    icon = {PASSED: "✓", FAILED: "✗", NOT_ATTEMPTED: "…", NOT_RUN: "-"}
    width = max([len(r.name) for r in results] + [8])
    lines = [f"  {'#':5} {'exercise':{width}}  status"]
    shown = set()
    for r in results:
        line = f"{icon[r.status]} {r.number:5} {r.name:{width}}  {r.status}"
        # the reason a run stopped is said once, not under every exercise it kept from running
        if r.status != PASSED and r.message and (r.status != NOT_RUN or r.message not in shown):
            line += f"\n        {r.message}"
        shown.add(r.message)
        lines.append(line)
    counts = {s: sum(r.status == s for r in results) for s in (PASSED, FAILED, NOT_ATTEMPTED)}
    summary = (
        f"{counts[PASSED]} passed, {counts[FAILED]} failed, {counts[NOT_ATTEMPTED]} not attempted"
    )
    not_run = sum(r.status == NOT_RUN for r in results)
    if not_run:
        summary += f", {not_run} not run"
    lines.append(summary)
    return "\n".join(lines)


def chapter_summary(chapter: Chapter, results: list[ExerciseResult]) -> str | None:
    """A chapter's own summary after the table (e.g. chapter 11's marking rubric): its checks
    module's ``marking_summary(results)``, if it defines one."""
    module = importlib.import_module(chapter.checks_module)
    summary = getattr(module, "marking_summary", None)
    return summary(results) if summary is not None else None


def exit_code(results: list[ExerciseResult]) -> int:
    """0 only when something was attempted and every attempted exercise passed (an exercise that
    was not run counts against: the grade is incomplete)."""
    attempted = [r for r in results if r.status != NOT_ATTEMPTED]
    return 0 if attempted and all(r.status == PASSED for r in attempted) else 1


@dataclass
class Grading:
    """What grading one notebook gave: a result per exercise, the fault that stopped the run early
    (None when every cell ran) and the one sentence to print about it, if any, and the first error
    in a cell that is not a check cell (see :func:`first_error_outside_checks`)."""

    results: list[ExerciseResult]
    fault: dict | None = None
    sentence: str | None = None
    other_error: str | None = None


def first_error_outside_checks(notebook: nbformat.NotebookNode, chapter: Chapter) -> str | None:
    """The first error raised by a cell that is not a check call, as one sentence, when nothing
    before it was left unfinished: a replication assert that fails although every exercise passed
    its check (a learner's function subtly wrong in a way the check does not see). Errors after a
    ``NotImplementedError`` are the unfinished exercise's consequences and are not reported."""
    names = "|".join(re.escape(ex.name) for ex in exercises_of_chapter(chapter))
    call = re.compile(rf"\bcheck\.({names})\(") if names else None
    number = 0
    for cell in notebook.cells:
        if cell.cell_type != "code":
            continue
        number += 1
        error = _error(cell)
        if error is None:
            continue
        if "NotImplementedError" in error:
            return None
        if call is not None and call.search(cell.source):
            continue  # a check cell: its exercise's row already says what went wrong
        return (
            f"code cell {number} (`{_first_line(cell.source)}`), not a check cell, raised "
            f"{error.splitlines()[0]}: a cell that uses your work failed although its checks may "
            "pass, so look there first (cells after it may fail because of it)."
        )
    return None


def grade_notebook(
    path: Path,
    chapter: Chapter,
    cell_timeout: float = 600,
    workdir: Path | None = None,
    notebook_timeout: float | None = None,
) -> Grading:
    """Run the notebook at ``path`` in a fresh kernel (in ``workdir``, by default its own folder)
    and tabulate its exercises."""
    notebook = read_notebook(path)
    # The checks first (their imports take seconds): after a kernel dies, only the table is left.
    exercises_of_chapter(chapter)
    executed = execute(notebook, workdir or path.resolve().parent, cell_timeout, notebook_timeout)
    fault = executed.metadata.get("course_check_fault")
    sentence = fault["sentence"] if fault else memory_sentence(executed)
    other = None if fault else first_error_outside_checks(executed, chapter)
    return Grading(tabulate(executed, chapter), fault, sentence, other)


def check_notebook(
    path: Path,
    chapter: Chapter,
    cell_timeout: float = 600,
    workdir: Path | None = None,
    notebook_timeout: float | None = None,
) -> list[ExerciseResult]:
    """The results of :func:`grade_notebook`."""
    return grade_notebook(path, chapter, cell_timeout, workdir, notebook_timeout).results


def state_dir() -> Path:
    """The learner's own folder for course state when their checkout cannot hold it:
    ``$COURSE_HOME``, else ``$XDG_STATE_HOME/mi-course``, else ``~/.local/state/mi-course``."""
    if os.environ.get("COURSE_HOME"):
        return Path(os.environ["COURSE_HOME"]).expanduser()
    xdg = os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state"
    return Path(xdg) / "mi-course"


def progress_path() -> Path:
    """Where ``course check`` records progress: ``$COURSE_HOME`` when set; else the learner's
    checkout (found from the working directory, never from where the package is installed: on a
    shared hub that is everyone's read-only copy) when it is writable; else :func:`state_dir`."""
    if os.environ.get("COURSE_HOME"):
        return state_dir() / PROGRESS_FILE
    root = working_checkout()
    if root is not None and os.access(root, os.W_OK):
        return root / PROGRESS_FILE
    return state_dir() / PROGRESS_FILE


class ProgressUnreadable(Exception):
    """The progress file exists but is not a progress record (truncated, corrupt, foreign)."""


@dataclass
class SavedProgress:
    """Where :func:`save_progress` wrote (None: nowhere writable) and, when the old file could not
    be read, where it was kept aside and why."""

    path: Path | None
    kept_aside: Path | None = None
    why: str = ""
    error: str = ""


def read_progress(path: Path) -> dict:
    """The progress record at ``path`` ({} when there is none); raises ProgressUnreadable."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError) as error:
        raise ProgressUnreadable(f"{type(error).__name__}: {error}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise ProgressUnreadable(f"not valid JSON ({error})") from None
    if not isinstance(data, dict) or not all(
        isinstance(v, dict) and isinstance(v.get("results"), list) for v in data.values()
    ):
        raise ProgressUnreadable("not a progress record")
    return carry_over_moved_chapters(data)  # progress saved under a renumbered chapter's old number


class _Locked:
    """An exclusive lock on ``path`` (a file of its own beside the progress file, which is
    replaced on every save): concurrent ``course check``s take turns to read, merge and write.
    Gives up after ``timeout`` seconds (TimeoutError). Where fcntl is missing, no lock."""

    def __init__(self, path: Path, timeout: float = 10):
        self.path, self.timeout, self.handle = path, timeout, None

    def __enter__(self):
        try:
            import fcntl
        except ImportError:  # Windows: no advisory locks here; saves are still atomic
            return self
        self.handle = open(self.path, "a+")  # noqa: SIM115 (held until __exit__)
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                fcntl.flock(self.handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return self
            except BlockingIOError:
                if time.monotonic() > deadline:
                    self.handle.close()
                    raise TimeoutError(f"{self.path} is held by another course command") from None
                time.sleep(0.05)

    def __exit__(self, *exc):
        if self.handle is not None:
            self.handle.close()  # releases the lock


def _write_atomically(path: Path, text: str) -> None:
    """A temporary file beside ``path``, flushed to disk, then renamed over it: a reader, a crash
    or a Ctrl-C sees the old file or the new one, never half of one."""
    partial = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(partial, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(partial, path)
    finally:
        if partial.exists():
            partial.unlink()


def save_progress(chapter: Chapter, results: list[ExerciseResult]) -> SavedProgress:
    """Record this chapter's results, merged under a lock with what is on disk now (so that two
    checks at once keep each other's chapters), written atomically. An unreadable progress file is
    renamed ``.course-progress.json.unreadable-<time>`` and a new one started, never overwritten.
    Tries the checkout, then :func:`state_dir`; ``path`` None when neither is writable."""
    entry = {
        "slug": chapter.slug,
        "checked_at": time.strftime("%Y-%m-%d %H:%M"),
        "results": [asdict(r) for r in results],
    }
    candidates = [progress_path()]
    if candidates[0].parent != state_dir():
        candidates.append(state_dir() / PROGRESS_FILE)
    errors = []
    for path in candidates:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with _Locked(path.with_name(path.name + ".lock")):
                saved = SavedProgress(path)
                try:
                    data = read_progress(path)
                except ProgressUnreadable as why:
                    aside = path.with_name(
                        f"{path.name}.unreadable-{time.strftime('%Y%m%d-%H%M%S')}"
                    )
                    os.replace(path, aside)
                    saved.kept_aside, saved.why, data = aside, str(why), {}
                data[chapter.number] = entry
                _write_atomically(path, json.dumps(data, indent=1, sort_keys=True))
                return saved
        except (OSError, TimeoutError) as error:
            errors.append(f"{path.parent}: {getattr(error, 'strerror', None) or error}")
    return SavedProgress(None, error="; ".join(errors))


def load_progress() -> dict:
    """The learner's progress ({} when none, or when the file cannot be read: see
    :func:`read_progress`, and `course check`, which keeps such a file aside)."""
    try:
        return read_progress(progress_path())
    except ProgressUnreadable:
        return {}


def carry_over_moved_chapters(data: dict) -> dict:
    """Progress saved under a chapter's old number (see :data:`MOVED_CHAPTERS`) moves to its new
    number; an entry that already names another slug belongs to the chapter now at that number."""
    for old, (new, slug) in MOVED_CHAPTERS.items():
        entry = data.get(old)
        if isinstance(entry, dict) and entry.get("slug", slug) == slug:
            moved = data.pop(old)
            data.setdefault(new, {**moved, "slug": slug})
    return data
