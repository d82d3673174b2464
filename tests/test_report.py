"""``course report``: a folder of generated submissions graded into one CSV and one HTML page.

The folder holds, under names that never say the chapter: chapter 00 right (the solution), wrong
(the solution with `record_norm_hook` squaring the norm, a Mistake with a hint), untouched (the
exercise notebook, twice: graded once), a chapter 09 exercise notebook handed in after its first
exercise and named as if it were chapter 00, a notebook cut in half (invalid JSON) and a notebook
that is not the course's. The first run is interrupted (Ctrl-C) as soon as one result is cached;
the second must reuse it and finish; the third must reuse everything. Chapter 00 is the cheapest
to run (`course execute`: 18 s); the chapter 09 notebook is cut short so that it costs a kernel
start and its imports only.
"""

from __future__ import annotations

import csv
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests import cohort
from tests.conftest import ROOT

SUBMISSIONS = {
    "alice/chapter-one.ipynb": ("right", "00"),
    "bob/my_work.ipynb": ("wrong", "00"),
    "carol.ipynb": ("untouched", "00"),
    "gina.ipynb": ("untouched", "00"),  # byte-identical to carol's: graded once
    "dave_00.ipynb": ("partial", "09"),  # the name says 00; the contents say 09
    "erin.ipynb": ("corrupt", "00"),
    "frank.ipynb": ("foreign", ""),
}


def course_report(folder: Path, out: Path, *args: str, **popen) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COURSE_HEADLESS": "1"}
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "course_utils.machinery.cli",
            "report",
            str(folder),
            "-o",
            str(out),
            *args,
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **popen,
    )


def finish(process: subprocess.Popen, timeout: float = 600) -> tuple[str, float]:
    start = time.perf_counter()
    out, err = process.communicate(timeout=timeout)
    assert process.returncode == 0, err[-2000:]
    return out, time.perf_counter() - start


def cached(out: Path) -> list[Path]:
    return sorted((out / ".cache").glob("*.json")) if (out / ".cache").exists() else []


def _in_group(pgid: int) -> list[int]:
    """Live (not zombie) processes of a process group."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z" and int(fields[2]) == pgid:
            found.append(int(stat.parent.name))
    return found


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Three runs on one folder: interrupted, resumed, repeated. Returns what each printed."""
    folder = tmp_path_factory.mktemp("cohort")
    for name, (kind, number) in SUBMISSIONS.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(cohort.make(kind, number), encoding="utf-8")
    out = tmp_path_factory.mktemp("report")

    # 1. interrupted by Ctrl-C once the first result is cached
    first = course_report(folder, out, "-j", "2", start_new_session=True)
    deadline = time.monotonic() + 400
    while not cached(out) and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.5)
    assert first.poll() is None, "the first run ended before it could be interrupted"
    os.killpg(first.pid, signal.SIGINT)  # Ctrl-C in its terminal
    printed, _ = first.communicate(timeout=60)
    assert first.returncode == 130 and "run the same command again" in printed, printed
    deadline = time.monotonic() + 20  # its worker processes leave with it (within a few seconds)
    while _in_group(first.pid) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not _in_group(first.pid), "worker processes outlived the interrupted run"
    survived = len(cached(out))
    assert 1 <= survived < 4, survived  # 4 distinct gradable notebooks: not all done
    assert not list((out / ".cache").glob(".*.tmp")), "a half-written cache entry was left"

    # 2. resumed, 3. repeated
    resumed, resumed_s = finish(course_report(folder, out, "-j", "2"))
    repeated, repeated_s = finish(course_report(folder, out))
    return {
        "out": out,
        "survived": survived,
        "resumed": resumed,
        "resumed_s": resumed_s,
        "repeated": repeated,
        "repeated_s": repeated_s,
    }


@pytest.fixture(scope="module")
def table(runs) -> dict[str, dict[str, str]]:
    with (runs["out"] / "report.csv").open(encoding="utf-8") as f:
        return {row["file"]: row for row in csv.DictReader(f)}


def _summary(text: str) -> tuple[int, int]:
    graded, reused = re.search(r"(\d+) graded now, (\d+) reused from the cache", text).groups()
    return int(graded), int(reused)


def test_an_interrupted_run_resumes_from_what_it_had_cached(runs):
    graded, reused = _summary(runs["resumed"])
    assert reused == runs["survived"]
    assert graded == 4 - runs["survived"]  # the rest, and carol/gina's copy only once
    assert len(cached(runs["out"])) == 4


def test_a_second_run_grades_nothing_and_is_fast(runs):
    assert _summary(runs["repeated"]) == (0, 4)
    assert runs["repeated_s"] < 30, runs["repeated_s"]  # startup only (grading takes minutes)


def test_every_submission_is_one_row_with_its_chapter_from_the_contents(table):
    assert set(table) == set(SUBMISSIONS)
    assert table["dave_00.ipynb"]["chapter"] == "09"
    assert table["alice/chapter-one.ipynb"]["learner"] == "alice"
    assert table["carol.ipynb"]["learner"] == "carol"


def test_csv_cells_say_passed_failed_with_hint_or_not_attempted(table):
    ex = [
        "ch00 0.1 cosine_similarity_matrix",
        "ch00 0.2 record_norm_hook",
        "ch00 0.3 ablation_loss_change",
    ]
    assert [table["alice/chapter-one.ipynb"][c] for c in ex] == ["passed"] * 3
    bob = table["bob/my_work.ipynb"]
    assert bob[ex[0]] == bob[ex[2]] == "passed"
    assert bob[ex[1]].startswith("failed: ") and "these are squared norms" in bob[ex[1]]
    assert (bob["passed"], bob["failed"], bob["not attempted"]) == ("2", "1", "0")
    for name in ("carol.ipynb", "gina.ipynb"):
        assert [table[name][c] for c in ex] == ["not attempted"] * 3
    dave = table["dave_00.ipynb"]
    ch09 = [c for c in dave if c.startswith("ch09 ")]
    assert len(ch09) == 8 and dave[ch09[0]] == "not attempted"  # 1.1, the one he reached
    assert all("no cell calls `check." in dave[c] for c in ch09[1:])  # the cells he cut off
    assert all(dave[c] == "" for c in ex)  # not his chapter


def test_corrupt_and_foreign_notebooks_are_rows_with_an_error(table):
    assert "not valid notebook JSON" in table["erin.ipynb"]["error"]
    assert "not a course notebook" in table["frank.ipynb"]["error"]
    graded = [r for name, r in table.items() if name not in ("erin.ipynb", "frank.ipynb")]
    assert all(r["error"] == "" for r in graded)


def test_html_is_self_contained_with_hints_and_failure_counts(runs):
    page = (runs["out"] / "report.html").read_text(encoding="utf-8")
    assert not re.search(r"<script|<link|<img|src=|https?://", page)
    assert "Chapter 00: Setup and tools (4 notebooks)" in page
    assert "Chapter 09: The polytope lens (1 notebook)" in page
    assert "these are squared norms" in page
    assert "Could not be graded" in page and "erin.ipynb" in page and "frank.ipynb" in page
    # the failure-count row of chapter 00: only 0.2 failed, once
    row = re.search(r"failed \(learners\)</td>((?:<td>\d+</td>)+)", page).group(1)
    assert re.findall(r"<td>(\d+)</td>", row) == ["0", "1", "0"]


def test_report_html_renders_in_chromium(runs):
    from tests.browser_lab import CHROMIUM, CHROMIUM_ARGS

    if not CHROMIUM.exists():
        pytest.skip("needs Debian's Chromium at /usr/bin/chromium (apt-get install chromium).")
    playwright = pytest.importorskip("playwright.sync_api")
    shots = ROOT / ".browser-shots"
    shots.mkdir(exist_ok=True)
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        requests: list[str] = []
        page.on("request", lambda r: requests.append(r.url))
        page.goto((runs["out"] / "report.html").as_uri())
        assert page.locator("h2").count() == 3  # two chapters, one error table
        failed = page.locator("td.failed", has_text="squared norms")  # bob's 0.2
        assert failed.count() == 1 and failed.first.is_visible()
        assert page.locator("td.failed").count() == 1 + 7  # and dave's seven cut-off exercises
        colour = failed.first.evaluate("e => getComputedStyle(e).backgroundColor")
        assert colour == "rgb(255, 235, 233)"  # the inline CSS applied
        assert page.locator("td.passed").count() == 3 + 2
        page.screenshot(path=str(shots / "course-report.png"), full_page=True)
        browser.close()
    assert all(url.startswith("file://") for url in requests), requests
