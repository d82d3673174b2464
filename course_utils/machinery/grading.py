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
#: Chapters renumbered since progress files were first written: old number -> (new number, slug).
#: A saved entry under the old number without a slug (written before the move) is carried over.
MOVED_CHAPTERS = {"10": ("11", "capstone_feature_analysis")}


@dataclass
class ExerciseResult:
    number: str
    name: str
    status: str
    message: str


def current_env_client(
    notebook: nbformat.NotebookNode,
    workdir: Path,
    cell_timeout: int,
    allow_errors: bool,
    notebook_timeout: float | None = None,
):
    """An nbclient runner whose kernel is THIS Python (the course's .venv), headless and offline.

    Asking for the "python3" kernel by name could start whatever interpreter a user-wide
    kernelspec points at; like nbval's --nbval-current-env, we build the spec from sys.executable.
    """
    import ipykernel.kernelspec
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import KernelManager
    from nbclient import NotebookClient

    class CurrentEnvSpecs(KernelSpecManager):
        def get_kernel_spec(self, kernel_name):
            spec = ipykernel.kernelspec.get_kernel_dict()
            return self.kernel_spec_class(resource_dir=ipykernel.kernelspec.RESOURCES, **spec)

    os.environ.setdefault("COURSE_HEADLESS", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    manager = KernelManager(kernel_name="course-current-env", kernel_spec_manager=CurrentEnvSpecs())
    client = NotebookClient(
        notebook,
        km=manager,
        timeout=cell_timeout,
        allow_errors=allow_errors,
        startup_timeout=120,
        resources={"metadata": {"path": str(workdir)}},
    )
    if notebook_timeout is not None:
        # A whole-notebook deadline: each cell gets what is left of it (at least 1 s; nbclient
        # reads 0 or less as "no timeout"), capped by the per-cell timeout.
        deadline = time.monotonic() + notebook_timeout
        client.timeout_func = lambda cell: max(1, min(cell_timeout, deadline - time.monotonic()))
    return client


def execute(
    notebook: nbformat.NotebookNode,
    workdir: Path,
    cell_timeout: int,
    notebook_timeout: float | None = None,
) -> nbformat.NotebookNode:
    """Run every cell (errors do not stop the run) in a fresh kernel; headless and offline."""
    from nbclient.exceptions import CellTimeoutError, DeadKernelError

    client = current_env_client(
        notebook, workdir, cell_timeout, allow_errors=True, notebook_timeout=notebook_timeout
    )
    try:
        # The kernel's own start-up chatter (e.g. "running over TCP without encryption") is noise
        # in a learner's terminal; what the notebook raised is in the cell outputs anyway.
        client.execute(stderr=subprocess.DEVNULL)
    except (CellTimeoutError, DeadKernelError) as error:
        notebook.metadata["course_check_aborted"] = f"{type(error).__name__}: {str(error)[:300]}"
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
    results = []
    records = {
        r["name"]: r for cell in notebook.cells if cell.cell_type == "code" for r in _records(cell)
    }
    for ex in exercises_of_chapter(chapter):
        if ex.name in records:
            r = records[ex.name]
            results.append(ExerciseResult(ex.number, ex.name, r["status"], r["message"]))
            continue
        call = re.compile(rf"\bcheck\.{re.escape(ex.name)}\(")
        cell = next(
            (c for c in notebook.cells if c.cell_type == "code" and call.search(c.source)), None
        )
        if cell is None:
            message = f"no cell calls `check.{ex.name}(...)` — was the check cell deleted?"
            results.append(ExerciseResult(ex.number, ex.name, FAILED, message))
        elif _error(cell):
            message = f"the check could not run: {_error(cell)}"
            status = NOT_ATTEMPTED if "NotImplementedError" in message else FAILED
            results.append(ExerciseResult(ex.number, ex.name, status, message))
        else:
            aborted = notebook.metadata.get("course_check_aborted", "the cell did not run")
            results.append(ExerciseResult(ex.number, ex.name, FAILED, f"not reached: {aborted}"))
    return results


def render_table(results: list[ExerciseResult]) -> str:
    icon = {PASSED: "✓", FAILED: "✗", NOT_ATTEMPTED: "…"}
    width = max([len(r.name) for r in results] + [8])
    lines = [f"  {'#':5} {'exercise':{width}}  status"]
    for r in results:
        line = f"{icon[r.status]} {r.number:5} {r.name:{width}}  {r.status}"
        if r.status != PASSED and r.message:
            line += f"\n        {r.message}"
        lines.append(line)
    passed = sum(r.status == PASSED for r in results)
    failed = sum(r.status == FAILED for r in results)
    lines.append(
        f"{passed} passed, {failed} failed, {len(results) - passed - failed} not attempted"
    )
    return "\n".join(lines)


def chapter_summary(chapter: Chapter, results: list[ExerciseResult]) -> str | None:
    """A chapter's own summary after the table (e.g. chapter 11's marking rubric): its checks
    module's ``marking_summary(results)``, if it defines one."""
    module = importlib.import_module(chapter.checks_module)
    summary = getattr(module, "marking_summary", None)
    return summary(results) if summary is not None else None


def exit_code(results: list[ExerciseResult]) -> int:
    """0 only when something was attempted and every attempted exercise passed."""
    attempted = [r for r in results if r.status != NOT_ATTEMPTED]
    return 0 if attempted and all(r.status == PASSED for r in attempted) else 1


def check_notebook(
    path: Path,
    chapter: Chapter,
    cell_timeout: int = 600,
    workdir: Path | None = None,
    notebook_timeout: float | None = None,
) -> list[ExerciseResult]:
    """Run the notebook at ``path`` in a fresh kernel (in ``workdir``, by default its own folder)
    and tabulate its exercises."""
    notebook = read_notebook(path)
    executed = execute(notebook, workdir or path.resolve().parent, cell_timeout, notebook_timeout)
    return tabulate(executed, chapter)


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


def save_progress(chapter: Chapter, results: list[ExerciseResult]) -> Path | None:
    """Record this chapter's results; None (nothing saved) when no location is writable."""
    path = progress_path()
    data = load_progress()
    data[chapter.number] = {
        "slug": chapter.slug,
        "checked_at": time.strftime("%Y-%m-%d %H:%M"),
        "results": [asdict(r) for r in results],
    }
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data, indent=1, sort_keys=True), encoding="utf-8")
    except OSError:
        return None
    return path


def load_progress() -> dict:
    path = progress_path()
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        return {}
    return carry_over_moved_chapters(data) if isinstance(data, dict) else {}


def carry_over_moved_chapters(data: dict) -> dict:
    """Progress saved under a chapter's old number (see :data:`MOVED_CHAPTERS`) moves to its new
    number; an entry that already names another slug belongs to the chapter now at that number."""
    for old, (new, slug) in MOVED_CHAPTERS.items():
        entry = data.get(old)
        if isinstance(entry, dict) and entry.get("slug", slug) == slug:
            moved = data.pop(old)
            data.setdefault(new, {**moved, "slug": slug})
    return data
