"""pytest plugin (`-p scripts.file_durations`): wall time per test file or notebook, slowest first.

The notebooks' nbval items are their cells; a notebook's time is the sum over its cells (setup,
call and teardown, so the kernel's start is counted). Under pytest-xdist the reports reach the
controller, so the table covers every worker.
"""

from __future__ import annotations

from collections import defaultdict

import pytest

_seconds: defaultdict[str, float] = defaultdict(float)


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    _seconds[report.nodeid.split("::")[0]] += report.duration


def pytest_terminal_summary(terminalreporter) -> None:
    if not _seconds:
        return
    terminalreporter.write_sep("=", "seconds per file (setup + tests + teardown, summed)")
    for path, seconds in sorted(_seconds.items(), key=lambda item: -item[1]):
        terminalreporter.write_line(f"{seconds:8.1f} s  {path}")
