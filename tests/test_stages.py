"""scripts/test_stages.py, what `make test` runs: stages of a group run at the same time and are
timed one by one, a failed group stops the run, and the closing line adds up pytest's counts."""

from __future__ import annotations

import sys

from scripts import test_stages as ts

PY = sys.executable


def _stage(name: str, group: int, code: str) -> ts.Stage:
    return ts.Stage(name, group, [PY, "-c", code])


def test_a_group_runs_at_once_and_each_stage_keeps_its_own_time(capsys):
    short = _stage("short", 1, "import time; time.sleep(0.2); print('3 passed in 0.2s')")
    long = _stage("long", 1, "import time; time.sleep(1.5); print('1 failed, 7 passed in 1.5s')")
    ts.run_group([long, short])  # the first-listed ends last: the old code timed both at its end
    assert short.returncode == 0 and long.returncode == 0
    assert short.seconds < 1.0 < long.seconds < 3.0  # not the group's end for both
    out = capsys.readouterr().out
    assert "[short] 3 passed" in out and "[long ] 1 failed, 7 passed" in out
    assert long.counts() == {"failed": 1, "passed": 7}


def test_a_failed_group_stops_the_run_and_the_table_says_so(monkeypatch, capsys):
    stages = [
        _stage("first", 1, "print('2 passed in 0.1s')"),
        _stage("broken", 2, "import sys; print('1 failed in 0.1s'); sys.exit(3)"),
        _stage("later", 3, "print('never')"),
    ]
    monkeypatch.setattr(ts, "stages", lambda: stages)
    assert ts.main([]) == 3
    out = capsys.readouterr().out
    assert "never" not in out
    assert "broken          2" in out and "FAILED (exit 3)" in out and "not run" in out
    assert "course: 2 passed, 1 failed, 0 skipped" in out


def test_only_and_unknown_stages(monkeypatch, capsys):
    monkeypatch.setattr(ts, "stages", lambda: [_stage("a", 1, "pass"), _stage("b", 2, "pass")])
    assert ts.main(["--only", "b"]) == 0
    out = capsys.readouterr().out
    assert "== b:" in out and "== a:" not in out
    assert "course:" not in out  # no pytest ran: no closing line that claims "0 passed"
    try:
        ts.main(["--only", "c"])
    except SystemExit as stop:
        assert stop.code == 2
    assert "unknown stage(s) ['c']" in capsys.readouterr().err
