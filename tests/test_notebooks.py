"""Every notebook: Colab badge + setup cell, size, plotly as JSON, checks wired to exercises."""

from __future__ import annotations

import importlib
import re

import nbformat
import pytest

from course_utils.checks.core import exercises_of
from course_utils.machinery import colab
from course_utils.machinery.chapters import available_chapters, exercise_path, solution_path
from tests.conftest import ROOT

CHAPTERS = available_chapters(ROOT)
NOTEBOOKS = [p for c in CHAPTERS for p in (solution_path(c, ROOT), exercise_path(c, ROOT))]
IDS = [str(p.relative_to(ROOT)) for p in NOTEBOOKS]


def test_there_is_at_least_one_chapter():
    assert CHAPTERS, "no solution notebooks found"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_colab_badge_points_at_the_notebook_itself(path):
    nb = nbformat.read(path, as_version=4)
    first = nb.cells[0]
    assert first.cell_type == "markdown"
    assert colab.badge(str(path.relative_to(ROOT))) in first.source


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_first_code_cell_is_the_colab_setup_cell(path):
    nb = nbformat.read(path, as_version=4)
    first_code = next(c for c in nb.cells if c.cell_type == "code")
    assert first_code.source == colab.setup_cell_source(), (
        "the first code cell must be colab.setup_cell_source() verbatim (run `course new` to see it)"
    )


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_notebook_is_small_and_stores_plotly_as_json(path):
    text = path.read_text()
    assert len(text.encode()) < 2 * 1024 * 1024, f"{path.name} is over 2 MB"
    assert "cdn.plot.ly" not in text and "window.PlotlyConfig" not in text, "plotly.js embedded"


@pytest.mark.parametrize("chapter", CHAPTERS, ids=[c.number for c in CHAPTERS])
def test_every_exercise_has_a_check_call_and_every_call_an_exercise(chapter):
    module = importlib.import_module(chapter.checks_module)
    names = {e.name for e in exercises_of(module)}
    cells = nbformat.read(exercise_path(chapter, ROOT), as_version=4).cells
    source = "\n".join(c.source for c in cells if c.cell_type == "code")
    called = set(re.findall(r"\bcheck\.(\w+)\(", source))
    assert called == names, f"check calls {sorted(called)} vs exercises {sorted(names)}"


@pytest.mark.parametrize("chapter", CHAPTERS, ids=[c.number for c in CHAPTERS])
def test_exercise_notebook_has_one_stub_per_exercise_and_no_outputs(chapter):
    nb = nbformat.read(exercise_path(chapter, ROOT), as_version=4)
    stubs = sum(
        c.source.count("raise NotImplementedError()") for c in nb.cells if c.cell_type == "code"
    )
    module = importlib.import_module(chapter.checks_module)
    assert stubs >= len(exercises_of(module))
    for cell in nb.cells:
        if cell.cell_type == "code" and "keep-output" not in cell.metadata.get("tags", []):
            assert cell.outputs == [] and cell.execution_count is None


@pytest.mark.parametrize("chapter", CHAPTERS, ids=[c.number for c in CHAPTERS])
def test_solution_notebook_is_executed_and_has_replication_checks(chapter):
    nb = nbformat.read(solution_path(chapter, ROOT), as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.execution_count is not None for c in code), "run `course execute NN` and commit"
    assert any(re.search(r"^\s*assert ", c.source, re.M) for c in code), "no assertion cell"
    errors = [o for c in code for o in c.outputs if o.output_type == "error"]
    assert not errors, f"solution notebook has error outputs: {errors[0]['ename']}"
