"""``course report FOLDER``: grade a cohort's submitted notebooks and write one table.

Every ``*.ipynb`` under FOLDER is one submission, whatever its name. Its chapter is read from its
contents (the ``from course_utils.checks import chNN as check`` line every course notebook has,
else its ``# NN — Title`` heading), not from its file name. Each submission is graded exactly as
``course check`` grades one (:mod:`course_utils.machinery.grading`): a fresh kernel runs it top to
bottom and its exercises are tabulated. Submissions run in parallel, one kernel per worker process.

The learner of a submission is its first folder under FOLDER (``FOLDER/alice/ch01.ipynb``), or,
for a flat folder, its file name without ``.ipynb``.

Output (``--out``, default ``course-report/``): ``report.csv`` (one row per submission, one column
per exercise), ``report.html`` (self-contained: inline CSS, no scripts, no network) and
``.cache/``: one JSON file per graded notebook, keyed by a hash of its bytes and of the grader
(the checks and the reference implementations). A second run grades only what changed, and a
run that was interrupted picks up where it stopped. A notebook that is not valid JSON, or is not a course
notebook, is one row with an error; it never stops the run.
"""

from __future__ import annotations

import csv
import hashlib
import html
import json
import os
import re
import signal
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterable
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from multiprocessing import get_context
from pathlib import Path

from course_utils.machinery.chapters import CHAPTERS, Chapter, get_chapter

#: Bump when the cached record's meaning changes; old cache entries are then ignored.
CACHE_FORMAT = 1
PASSED, FAILED, NOT_ATTEMPTED = "passed", "failed", "not attempted"
NOT_RUN = "not run"  # the grader could not reach it: the kernel died or a cell ran out of time

_CHECKS_IMPORT = re.compile(r"from\s+course_utils\.checks\s+import\s+ch(\d\d)\s+as\s+check\b")
_HEADING = re.compile(r"^#\s+(\d\d)\s+[—-]", re.MULTILINE)


@dataclass
class Submission:
    """One submitted notebook and what grading it gave (results, or an error)."""

    file: str  # relative to the submissions folder
    learner: str
    chapter: str = ""  # "01"; empty when it could not be told
    error: str = ""
    results: list[dict] = field(default_factory=list)  # grading.ExerciseResult as dicts
    seconds: float = 0.0
    cached: bool = False
    key: str = ""

    def counts(self) -> dict[str, int]:
        found = Counter(r["status"] for r in self.results)
        return {s: found.get(s, 0) for s in (PASSED, FAILED, NOT_ATTEMPTED, NOT_RUN)}


class NotACourseNotebook(ValueError):
    pass


# ----------------------------------------------------------------------------- finding


def available_cores() -> int:
    """Cores this process may use (its CPU affinity), not merely how many the machine has."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def learner_of(relative: Path) -> str:
    return relative.parts[0] if len(relative.parts) > 1 else relative.stem


def find_submissions(folder: Path, exclude: Path | None = None) -> list[Path]:
    """Every notebook under ``folder`` (sorted), skipping checkpoints and the report's own folder."""
    found = []
    for path in sorted(folder.rglob("*.ipynb")):
        if ".ipynb_checkpoints" in path.parts:
            continue
        if exclude is not None and exclude.resolve() in path.resolve().parents:
            continue
        found.append(path)
    return found


def identify_chapter(text: str) -> Chapter:
    """The chapter of a notebook, from its contents; raises NotACourseNotebook with the reason."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise NotACourseNotebook(f"not valid notebook JSON ({error})") from None
    cells = data.get("cells") if isinstance(data, dict) else None
    if not isinstance(cells, list):
        raise NotACourseNotebook("not a Jupyter notebook (no list of cells)")

    def source(cell) -> str:
        text = cell.get("source", "") if isinstance(cell, dict) else ""
        return "".join(text) if isinstance(text, list) else str(text)

    code = "\n".join(
        source(c) for c in cells if isinstance(c, dict) and c.get("cell_type") == "code"
    )
    markdown = "\n".join(
        source(c) for c in cells if isinstance(c, dict) and c.get("cell_type") == "markdown"
    )
    number = next(iter(_CHECKS_IMPORT.findall(code)), None) or next(
        iter(_HEADING.findall(markdown)), None
    )
    if number is None:
        raise NotACourseNotebook(
            "not a course notebook: no `from course_utils.checks import chNN as check` cell"
        )
    try:
        return get_chapter(number)
    except ValueError:
        raise NotACourseNotebook(
            f"names chapter {number}, which this course does not have"
        ) from None


@lru_cache(maxsize=1)
def grader_fingerprint() -> str:
    """Hash of what decides a grade: the checks and the reference implementations they compare
    against (``course_utils/checks`` and ``course_utils/science``), and the cache format."""
    package = Path(__file__).resolve().parents[1]
    digest = hashlib.sha256(f"format {CACHE_FORMAT}".encode())
    for path in sorted([*package.glob("checks/*.py"), *package.glob("science/*.py")]):
        digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()


def cache_key(data: bytes, chapter: Chapter) -> str:
    """Hash of the notebook's bytes, its chapter, and the grader (:func:`grader_fingerprint`):
    an upgraded course regrades everything; an unchanged notebook is never run twice."""
    digest = hashlib.sha256(data)
    digest.update(f"{chapter.number} {grader_fingerprint()}".encode())
    return digest.hexdigest()[:32]


# ----------------------------------------------------------------------------- grading


def grade_one(path: str, chapter_number: str, cell_timeout: int, notebook_timeout: float) -> dict:
    """Grade one notebook in a fresh kernel (runs in a worker process); never raises. A run that
    stopped early carries its ``fault`` (:func:`grading.fault_sentence`)."""
    from course_utils.machinery.grading import grade_notebook

    start = time.perf_counter()
    try:
        # A folder of its own: a submission cannot see (or litter) the others.
        with tempfile.TemporaryDirectory(prefix="course-report-") as workdir:
            grading = grade_notebook(
                Path(path),
                get_chapter(chapter_number),
                cell_timeout=cell_timeout,
                workdir=Path(workdir),
                notebook_timeout=notebook_timeout,
            )
        seconds = round(time.perf_counter() - start, 1)
        return {
            "results": [asdict(r) for r in grading.results],
            "error": "",
            "seconds": seconds,
            "fault": grading.fault,
        }
    except Exception as error:  # the grader itself failed on this file: one row, not a crash
        return {"results": [], "error": f"could not grade: {type(error).__name__}: {error}"[:300]}


def _exit_with(parent: int) -> None:
    """Leave when the process that started us is gone (killed, or its terminal closed): an
    orphaned worker would grade its queued notebooks for nobody. Its kernel follows it out."""
    while os.getppid() == parent:
        time.sleep(1)
    os._exit(1)


def _worker_init(threads: int) -> None:
    """Each worker's kernels share the cores: without this, every kernel's torch takes them all."""
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(name, str(threads))
    os.environ.setdefault("COURSE_HEADLESS", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    signal.signal(signal.SIGTERM, _worker_stop)  # how the parent stops us
    threading.Thread(target=_exit_with, args=(os.getppid(),), daemon=True).start()


def _worker_stop(signum, frame) -> None:
    """SIGTERM from the parent (it was interrupted): end our kernel, then leave at once."""
    from course_utils.machinery.grading import stop_kernels

    stop_kernels(grace=0.1)
    os._exit(143)


def _stop_workers(pool: ProcessPoolExecutor) -> None:
    """SIGTERM to every worker (each ends its kernel and leaves), SIGKILL to any still there 1 s
    later."""
    processes = list(getattr(pool, "_processes", {}).values())
    for process in processes:
        process.terminate()
    deadline = time.monotonic() + 1
    for process in processes:
        process.join(max(0.0, deadline - time.monotonic()))
        if process.is_alive():
            process.kill()


def _cacheable(record: dict) -> bool:
    """Not a grading error, nor a kernel killed by a signal: SIGKILL is most often the machine out
    of memory (too many kernels at once, -j), which the next run may not be."""
    fault = record.get("fault") or {}
    return not record["error"] and not (
        fault.get("kind") == "died" and (fault.get("returncode") or 0) < 0
    )


def _timed_out(record: dict) -> bool:
    fault = record.get("fault") or {}
    if fault.get("kind") in ("cell-timeout", "notebook-timeout"):
        return True
    return any(
        "Timeout" in r["message"] and "not reached" in r["message"] for r in record["results"]
    )


def _read_cache(cache: Path, key: str, notebook_timeout: float) -> dict | None:
    path = cache / f"{key}.json"
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    # A notebook that ran out of time is graded again when it is given more.
    if _timed_out(record) and notebook_timeout > record.get("notebook_timeout", 0):
        return None
    return record


def _write_cache(cache: Path, key: str, record: dict) -> None:
    """Atomic: an interrupted run leaves whole entries or none, never half a file."""
    cache.mkdir(parents=True, exist_ok=True)
    partial = cache / f".{key}.{os.getpid()}.tmp"
    partial.write_text(json.dumps(record, indent=1), encoding="utf-8")
    partial.replace(cache / f"{key}.json")


def grade_folder(
    folder: Path,
    out: Path,
    jobs: int | None = None,
    cell_timeout: int = 600,
    notebook_timeout: float = 1800,
    progress: bool = True,
) -> list[Submission]:
    """Grade every submission under ``folder`` (cached in ``out/.cache``) and return them all."""
    from tqdm.auto import tqdm

    cache = out / ".cache"
    submissions: list[Submission] = []
    todo: dict[str, tuple[Path, Chapter]] = {}  # one grading per distinct notebook
    waiting: dict[str, list[Submission]] = {}
    for path in find_submissions(folder, exclude=out):
        relative = path.relative_to(folder)
        sub = Submission(file=relative.as_posix(), learner=learner_of(relative))
        submissions.append(sub)
        try:
            data = path.read_bytes()
            chapter = identify_chapter(data.decode("utf-8"))
        except (NotACourseNotebook, UnicodeDecodeError, OSError) as error:
            sub.error = (
                str(error) if isinstance(error, NotACourseNotebook) else f"unreadable: {error}"
            )
            continue
        sub.chapter, sub.key = chapter.number, cache_key(data, chapter)
        record = _read_cache(cache, sub.key, notebook_timeout)
        if record is not None:
            sub.results, sub.error, sub.cached = record["results"], record["error"], True
            sub.seconds = record.get("seconds", 0.0)
            continue
        todo.setdefault(sub.key, (path, chapter))
        waiting.setdefault(sub.key, []).append(sub)

    jobs = max(1, min(jobs or available_cores(), len(todo) or 1))
    threads = max(1, available_cores() // jobs)
    bar = tqdm(
        total=len(todo),
        desc=f"grading ({sum(s.cached for s in submissions)} from the cache)",
        unit="notebook",
        disable=not progress or not todo,
        file=sys.stderr,
    )
    if todo:
        pool = ProcessPoolExecutor(
            max_workers=jobs,
            mp_context=get_context("spawn"),  # never fork a process that holds torch's threads
            initializer=_worker_init,
            initargs=(threads,),
        )
        futures = {
            pool.submit(grade_one, str(path), ch.number, cell_timeout, notebook_timeout): key
            for key, (path, ch) in todo.items()
        }
        try:
            for future in as_completed(futures):
                key = futures[future]
                try:
                    record = future.result()
                except BrokenProcessPool as error:  # a worker died: report it, cache nothing
                    record = {"results": [], "error": f"grader crashed: {error}"[:300]}
                else:
                    record["notebook_timeout"] = notebook_timeout
                    if _cacheable(record):
                        _write_cache(cache, key, record)
                for sub in waiting[key]:
                    sub.results, sub.error = record["results"], record["error"]
                    sub.seconds = record.get("seconds", 0.0)
                bar.update()
        except KeyboardInterrupt:
            # Ctrl-C or SIGTERM: every finished notebook is cached already. Stop the ones in
            # flight now (the workers ignore Ctrl-C themselves): each ends its own kernel.
            bar.close()
            _stop_workers(pool)
            pool.shutdown(wait=True, cancel_futures=True)
            raise
        pool.shutdown()
    bar.close()
    return submissions


# ----------------------------------------------------------------------------- the table


def chapter_exercises(submissions: Iterable[Submission]) -> dict[str, list[tuple[str, str]]]:
    """{chapter: [(number, name), ...]} for every chapter with a graded notebook.

    Read from the results (grading lists every exercise of the chapter, in order), so that a run
    served from the cache never imports the checks, and with them torch.
    """
    found: dict[str, list[tuple[str, str]]] = {}
    for sub in submissions:
        if sub.chapter and sub.results and sub.chapter not in found:
            found[sub.chapter] = [(r["number"], r["name"]) for r in sub.results]
    return dict(sorted(found.items()))


def exercise_columns(submissions: Iterable[Submission]) -> list[tuple[str, str, str]]:
    """(chapter, number, name) of every exercise of every chapter that was graded, in order."""
    return [
        (chapter, number, name)
        for chapter, exercises in chapter_exercises(submissions).items()
        for number, name in exercises
    ]


def cell_text(result: dict | None) -> str:
    if result is None:
        return ""
    if result["status"] == FAILED:
        return f"failed: {result['message']}"
    if result["status"] == NOT_RUN:
        return result["message"]  # "not run: " and why
    return result["status"]


def write_csv(submissions: list[Submission], path: Path) -> None:
    columns = exercise_columns(submissions)
    header = ["learner", "file", "chapter", "passed", "failed", "not attempted", "not run"]
    header += ["error"]
    header += [f"ch{c} {n} {name}" for c, n, name in columns]
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        for sub in submissions:
            by_name = {(sub.chapter, r["name"]): r for r in sub.results}
            counts = sub.counts()
            row = [sub.learner, sub.file, sub.chapter, *counts.values(), sub.error]
            row += [cell_text(by_name.get((c, name))) for c, _, name in columns]
            writer.writerow(row)


def hint_of(message: str) -> str:
    """The targeted hint of a failure message when it has one, else the message itself."""
    return message.split("Hint: ", 1)[1] if "Hint: " in message else message


_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:1.5rem;color:#1f2328;
max-width:100%}
h1{font-size:1.4rem}h2{font-size:1.15rem;margin-top:2rem}
table{border-collapse:collapse;font-size:.85rem;margin:.5rem 0}
th,td{border:1px solid #d0d7de;padding:.3rem .45rem;vertical-align:top;text-align:left}
th{background:#f6f8fa;position:sticky;top:0}
td.passed{background:#dafbe1;color:#1a7f37;text-align:center}
td.failed{background:#ffebe9;color:#a40e26;max-width:16rem}
td.notattempted{background:#fff8c5;color:#7d4e00;text-align:center}
td.notrun{background:#eaeef2;color:#57606a;text-align:center}
td.absent{background:#fff}
td.score{text-align:right;white-space:nowrap}
tr.total td{font-weight:600;background:#f6f8fa}
.hint{display:block;font-size:.75rem;color:#57606a;margin-top:.15rem}
.scroll{overflow-x:auto}
.legend span{display:inline-block;padding:.1rem .4rem;margin-right:.4rem;border-radius:3px}
.error{color:#a40e26}
ol li{margin-bottom:.3rem}
"""


def _cell_html(result: dict | None) -> str:
    if result is None:
        return '<td class="absent" title="not in this notebook">—</td>'
    status = result["status"]
    if status == PASSED:
        return '<td class="passed" title="passed">✓</td>'
    if status == NOT_ATTEMPTED:
        return '<td class="notattempted" title="not attempted">…</td>'
    if status == NOT_RUN:
        full = html.escape(result["message"], quote=True)
        return f'<td class="notrun" title="{full}">–</td>'
    full = html.escape(result["message"], quote=True)
    short = html.escape(hint_of(result["message"])[:140])
    return f'<td class="failed" title="{full}">✗<span class="hint">{short}</span></td>'


def _chapter_section(number: str, subs: list[Submission]) -> str:
    chapter = get_chapter(number)
    exercises = chapter_exercises(subs)[number]  # [(number, name)]
    head = "".join(
        f"<th>{html.escape(num)}<br><code>{html.escape(name)}</code></th>"
        for num, name in exercises
    )
    rows = []
    failures: Counter[str] = Counter()
    passes: Counter[str] = Counter()
    hints: dict[str, Counter[str]] = {name: Counter() for _, name in exercises}
    for sub in sorted(subs, key=lambda s: (s.learner, s.file)):
        by_name = {r["name"]: r for r in sub.results}
        cells = "".join(_cell_html(by_name.get(name)) for _, name in exercises)
        for r in sub.results:
            if r["status"] == FAILED:
                failures[r["name"]] += 1
                hints.setdefault(r["name"], Counter())[hint_of(r["message"])[:200]] += 1
            elif r["status"] == PASSED:
                passes[r["name"]] += 1
        score = f"{sub.counts()[PASSED]}/{len(exercises)}"
        rows.append(
            f"<tr><td>{html.escape(sub.learner)}</td><td><code>{html.escape(sub.file)}</code></td>"
            f'<td class="score">{score}</td>{cells}</tr>'
        )
    fail_row = "".join(f"<td>{failures[name]}</td>" for _, name in exercises)
    pass_row = "".join(f"<td>{passes[name]}</td>" for _, name in exercises)
    common = "".join(
        f"<li><b>{html.escape(num)} <code>{html.escape(name)}</code></b>: "
        + "; ".join(f"{html.escape(h)} (×{n})" for h, n in hints[name].most_common(3))
        + "</li>"
        for num, name in exercises
        if hints[name]
    )
    return (
        f'<h2 id="ch{number}">Chapter {number}: {html.escape(chapter.title)} '
        f"({len(subs)} notebook{'s' if len(subs) != 1 else ''})</h2>"
        f'<div class="scroll"><table><thead><tr><th>learner</th><th>file</th><th>passed</th>'
        f"{head}</tr></thead>"
        f"<tbody>{''.join(rows)}"
        f'<tr class="total"><td colspan="3">failed (learners)</td>{fail_row}</tr>'
        f'<tr class="total"><td colspan="3">passed (learners)</td>{pass_row}</tr>'
        f"</tbody></table></div>"
        + (f"<p>Most frequent failures, with their hints:</p><ol>{common}</ol>" if common else "")
    )


def write_html(submissions: list[Submission], path: Path, folder: Path, seconds: float) -> None:
    graded = [s for s in submissions if s.chapter and not s.error]
    broken = [s for s in submissions if not s.chapter or s.error]
    sections = [
        _chapter_section(c.number, [s for s in graded if s.chapter == c.number])
        for c in CHAPTERS
        if any(s.chapter == c.number for s in graded)
    ]
    error_rows = "".join(
        f"<tr><td>{html.escape(s.learner)}</td><td><code>{html.escape(s.file)}</code></td>"
        f'<td>{s.chapter or "?"}</td><td class="error">{html.escape(s.error)}</td></tr>'
        for s in broken
    )
    errors = (
        "<h2 id='errors'>Could not be graded</h2><table><thead><tr><th>learner</th><th>file</th>"
        f"<th>chapter</th><th>why</th></tr></thead><tbody>{error_rows}</tbody></table>"
        if broken
        else ""
    )
    stamp = time.strftime("%Y-%m-%d %H:%M")
    cached = len({s.key for s in submissions if s.cached})
    fresh = len({s.key for s in submissions if s.key and not s.cached})
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Cohort report: {html.escape(folder.name)}</title><style>{_CSS}</style></head>
<body><h1>Cohort report: <code>{html.escape(folder.name)}</code></h1>
<p>{len(submissions)} notebooks: {len(graded)} with results, {len(broken)} could not be graded.
Generated {stamp} by <code>course report</code> ({fresh} graded now, {cached} from the cache,
{seconds:.0f} s).</p>
<p class="legend"><span class="passed" style="background:#dafbe1">✓ passed</span>
<span style="background:#ffebe9">✗ failed (with the hint; hover for the full message)</span>
<span style="background:#fff8c5">… not attempted</span>
<span style="background:#eaeef2">– not run (the kernel died or a cell ran out of time before it;
hover for why)</span></p>
{"".join(sections)}{errors}
</body></html>
"""
    path.write_text(page, encoding="utf-8")


def run_report(
    folder: Path,
    out: Path,
    jobs: int | None = None,
    cell_timeout: int = 600,
    notebook_timeout: float = 1800,
    progress: bool = True,
) -> tuple[list[Submission], float]:
    """Grade ``folder`` and write ``out/report.csv`` and ``out/report.html``; (rows, seconds)."""
    start = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    subs = grade_folder(folder, out, jobs, cell_timeout, notebook_timeout, progress)
    seconds = time.perf_counter() - start
    write_csv(subs, out / "report.csv")
    write_html(subs, out / "report.html", folder, seconds)
    return subs, seconds
