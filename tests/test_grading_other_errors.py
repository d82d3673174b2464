"""`course check` names the first error outside the check cells: a replication assert that fails
although the exercises passed their checks (a newcomer's detached BatchTopK did exactly this in
chapter 10, and the table alone said "6 passed")."""

from __future__ import annotations

import nbformat

from course_utils.machinery import cli
from course_utils.machinery.chapters import get_chapter
from course_utils.machinery.grading import first_error_outside_checks
from tests.test_grading_faults import EXERCISES, tiny_notebook

CH00 = get_chapter("00")


def _ran(cells: list[tuple[str, str | None]]) -> nbformat.NotebookNode:
    """A chapter-00 notebook as if executed: each (source, error name or None)."""
    nb = nbformat.v4.new_notebook()
    for source, ename in cells:
        cell = nbformat.v4.new_code_cell(source)
        if ename:
            cell.outputs = [
                nbformat.v4.new_output("error", ename=ename, evalue="boom", traceback=[])
            ]
        nb.cells.append(cell)
    return nb


def test_the_first_error_outside_the_checks_is_named_with_its_cell():
    nb = _ran([("x = 1", None), (f"check.{EXERCISES[0]}(f)", "AssertionError"),
               ("assert fvu < 0.2, 'trains worse'", "AssertionError"), ("y = z", "NameError")])  # fmt: skip
    said = first_error_outside_checks(nb, CH00)
    assert said.startswith("code cell 3 (`assert fvu < 0.2, 'trains worse'`), not a check cell")
    assert "AssertionError: boom" in said


def test_nothing_is_said_after_an_unfinished_exercise_or_without_errors():
    unfinished = _ran([("raise NotImplementedError()", "NotImplementedError"),
                       ("assert x", "NameError")])  # fmt: skip
    assert first_error_outside_checks(unfinished, CH00) is None
    assert first_error_outside_checks(_ran([("x = 1", None)]), CH00) is None
    only_checks = _ran([(f"check.{name}({name})", "NameError") for name in EXERCISES])
    assert first_error_outside_checks(only_checks, CH00) is None


def test_course_check_prints_it_after_the_table(tmp_path, capsys):
    path = tiny_notebook(tmp_path / "00_setup_and_tools.ipynb", "assert 1 == 2, 'replication'")
    cli.main(["check", str(path), "--no-save", "--cell-timeout", "60"])
    out = capsys.readouterr().out
    assert "! Code cell 2 (`assert 1 == 2, 'replication'`), not a check cell, raised " in out
    assert out.index("! Code cell 2") > out.index("not attempted")  # after the table
