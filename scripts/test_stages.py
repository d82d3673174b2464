"""`make test`: every stage of the course's test suite, timed, using both cores.

    python scripts/test_stages.py [--only NAME ...] [--list]

Stages (what each runs is in STAGES below):
  lint         ruff
  tests        unit, exercise-check and browser tests, two pytest-xdist workers (one file each)
  notebooks    every solution notebook under nbval, natively          } at the same time: every
  other-cpu    the training chapters again on a simulated AVX2 CPU    } notebook kernel uses one
                                                                        thread, so two share 2 cores
Stages in one group run at the same time, each printing its lines with its name in front; groups
run one after another, and a failed group stops the run. The table of wall times is printed at the
end, failed or not, and the exit code is the first failure's.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent  # the .venv's bin/, when make runs this with .venv/bin/python

NBVAL = [
    "-p", "no:cacheprovider", "--nbval-lax", "--nbval-sanitize-with", "nbval_sanitize.cfg",
    "--nbval-cell-timeout=900", "--nbval-kernel-startup-timeout=120", "--nbval-current-env",
]  # fmt: skip
OFFLINE = {"HF_HUB_OFFLINE": "1", "COURSE_HEADLESS": "1"}
# Notebooks must not reach the internet: course_utils refuses it in every kernel (env.py).
NOTEBOOK_ENV = {**OFFLINE, "COURSE_BLOCK_NETWORK": "1"}
# Another CPU, simulated: a laptop-class AVX2 machine (torch kernels and MKL without AVX-512).
OTHER_CPU = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}


def solutions() -> list[str]:
    return sorted(str(p.relative_to(ROOT)) for p in (ROOT / "solutions").glob("*.ipynb"))


def training_chapters() -> list[str]:
    """The chapters whose numbers move with the CPU: all but 00-01, which only draw and check."""
    return [p for p in solutions() if not Path(p).name.startswith(("00_", "01_"))]


@dataclass
class Stage:
    name: str
    group: int
    command: list[str]
    env: dict[str, str] = field(default_factory=dict)
    seconds: float | None = None
    returncode: int | None = None
    last_lines: list[str] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        """pytest's closing line ("3 failed, 1200 passed, 2 skipped in 61.2s"), as numbers."""
        for line in reversed(self.last_lines):
            found = dict(
                (w, int(n)) for n, w in re.findall(r"(\d+) (passed|failed|skipped|errors?)", line)
            )
            if found:
                return found
        return {}


def pytest(*args: str) -> list[str]:
    return [str(BIN / "python"), "-m", "pytest", "-q", "-p", "scripts.file_durations", *args]


def stages() -> list[Stage]:
    return [
        Stage("lint", 1, [str(BIN / "ruff"), "check", "course_utils", "tests", "scripts"]),
        # loadfile: a file's tests stay on one worker, so its module fixtures are built once.
        Stage("tests", 2, pytest("-n", "2", "--dist", "loadfile", "--durations=15", "tests"),
              OFFLINE),
        Stage("notebooks", 3, pytest(*NBVAL, *solutions()), NOTEBOOK_ENV),
        Stage("other-cpu", 3, pytest(*NBVAL, *training_chapters()),
              {**NOTEBOOK_ENV, **OTHER_CPU}),
    ]  # fmt: skip


def run_group(group: list[Stage]) -> None:
    """Run the stages of one group at the same time, each line prefixed with the stage's name."""
    width = max(len(s.name) for s in group)
    lock = threading.Lock()

    def pump(stage: Stage, process: subprocess.Popen, start: float) -> None:
        assert process.stdout is not None
        for line in process.stdout:
            stage.last_lines = [*stage.last_lines[-4:], line]
            with lock:
                prefix = f"[{stage.name:<{width}}] " if len(group) > 1 else ""
                sys.stdout.write(prefix + line)
                sys.stdout.flush()
        # each stage's own end: stages of a group finish at different times
        stage.returncode = process.wait()
        stage.seconds = time.perf_counter() - start

    running = []
    for stage in group:
        print(f"== {stage.name}: {' '.join(stage.command)}", flush=True)
        start = time.perf_counter()
        process = subprocess.Popen(
            stage.command,
            cwd=ROOT,
            env={**os.environ, **stage.env},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
        )
        thread = threading.Thread(target=pump, args=(stage, process, start))
        thread.start()
        running.append(thread)
    for thread in running:
        thread.join()


def table(all_stages: list[Stage], total: float) -> str:
    lines = ["", "stage       group  wall time  result"]
    for s in all_stages:
        if s.seconds is None:
            lines.append(f"{s.name:<11} {s.group:>5}  {'':>9}  not run")
        else:
            result = "passed" if s.returncode == 0 else f"FAILED (exit {s.returncode})"
            lines.append(f"{s.name:<11} {s.group:>5}  {s.seconds:>7.0f} s  {result}")
    lines.append(f"{'total':<11} {'':>5}  {total:>7.0f} s")
    counts = [s.counts() for s in all_stages]
    passed = sum(c.get("passed", 0) for c in counts)
    failed = sum(c.get("failed", 0) + c.get("error", 0) + c.get("errors", 0) for c in counts)
    skipped = sum(c.get("skipped", 0) for c in counts)
    if any(counts):  # pytest ran: one closing line for the whole run
        lines.append(f"course: {passed} passed, {failed} failed, {skipped} skipped")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="+", metavar="NAME", help="run only these stages")
    parser.add_argument("--list", action="store_true", help="print the stages and exit")
    args = parser.parse_args(argv)
    chosen = stages()
    if args.list:
        for s in chosen:
            print(f"{s.name:<11} group {s.group}: {' '.join(s.command)}")
        return 0
    if args.only:
        unknown = set(args.only) - {s.name for s in chosen}
        if unknown:
            parser.error(f"unknown stage(s) {sorted(unknown)}; see --list")
        chosen = [s for s in chosen if s.name in args.only]
    start = time.perf_counter()
    try:
        for group_number in sorted({s.group for s in chosen}):
            group = [s for s in chosen if s.group == group_number]
            run_group(group)
            if any(s.returncode for s in group):
                break
    finally:
        print(table(chosen, time.perf_counter() - start), flush=True)
    failed = [s for s in chosen if s.returncode]
    return failed[0].returncode if failed else 0  # type: ignore[return-value]


if __name__ == "__main__":
    sys.exit(main())
