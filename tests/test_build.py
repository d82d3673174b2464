"""The notebook build: solution markers, tags, byte-stability, and notebooks/ kept in sync."""

from __future__ import annotations

import nbformat
import pytest

from course_utils.machinery.build import (
    BuildError,
    build_all,
    build_exercise_notebook,
    strip_solutions,
)
from course_utils.machinery.chapters import available_chapters, exercise_path
from tests.conftest import ROOT

SOURCE = """def f(x):
    \"\"\"Doc.\"\"\"
    # BEGIN SOLUTION
    y = x + 1
    return y
    # END SOLUTION


check.f(f)"""


def test_solution_region_becomes_an_indented_stub():
    out = strip_solutions(SOURCE)
    assert "y = x + 1" not in out
    assert '    """Doc."""\n    raise NotImplementedError()\n' in out
    assert out.endswith("check.f(f)")


def test_top_level_region_and_two_regions():
    src = "# BEGIN SOLUTION\na = 1\n# END SOLUTION\nb = 2\n    # BEGIN SOLUTION\n    c\n    # END SOLUTION"
    assert (
        strip_solutions(src)
        == "raise NotImplementedError()\nb = 2\n    raise NotImplementedError()"
    )


@pytest.mark.parametrize(
    "bad, words",
    [
        ("# BEGIN SOLUTION\nx", "never closed"),
        ("x\n# END SOLUTION", "without a matching"),
        ("# BEGIN SOLUTION\n# BEGIN SOLUTION\n# END SOLUTION", "nested"),
    ],
)
def test_unbalanced_markers_are_reported_with_a_line(bad, words):
    with pytest.raises(BuildError, match=words):
        strip_solutions(bad, "cell 3")


def test_nbval_directives_are_dropped():
    assert strip_solutions("# NBVAL_SKIP\nx = 1") == "x = 1"


def _notebook() -> nbformat.NotebookNode:
    nb = nbformat.v4.new_notebook()
    nb.cells = [
        nbformat.v4.new_markdown_cell(
            "[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]"
            "(https://colab.research.google.com/github/x/y/blob/main/solutions/09_x.ipynb)"
        ),
        nbformat.v4.new_code_cell(
            SOURCE, execution_count=3, outputs=[nbformat.v4.new_output("stream", text="hi")]
        ),
        nbformat.v4.new_code_cell("secret = 1", metadata={"tags": ["solution-only"]}),
        nbformat.v4.new_code_cell(
            "fig",
            metadata={"tags": ["keep-output"], "collapsed": True},
            outputs=[nbformat.v4.new_output("display_data", data={"text/plain": "figure"})],
        ),
    ]
    for i, cell in enumerate(nb.cells):
        cell.id = f"c{i}"
    return nb


def test_exercise_notebook_drops_solution_only_cells_and_clears_outputs():
    text = build_exercise_notebook(_notebook(), "notebooks/09_x.ipynb")
    nb = nbformat.reads(text, as_version=4)
    sources = [c.source for c in nb.cells]
    assert "secret = 1" not in sources
    code = nb.cells[1]
    assert code.outputs == [] and code.execution_count is None
    assert "raise NotImplementedError()" in code.source
    assert nb.cells[2].outputs[0]["data"]["text/plain"] == "figure"  # keep-output kept
    assert nb.cells[2].metadata == {"tags": ["keep-output"]}  # noise metadata dropped
    assert "blob/main/notebooks/09_x.ipynb" in nb.cells[0].source  # badge points at itself


def test_build_is_byte_stable():
    nb = _notebook()
    assert build_exercise_notebook(nb, "notebooks/09_x.ipynb") == build_exercise_notebook(
        nbformat.reads(nbformat.writes(nb), as_version=4), "notebooks/09_x.ipynb"
    )


def test_exercise_notebooks_are_up_to_date():
    stale = build_all(ROOT, check_only=True)
    assert not stale, f"stale exercise notebooks {stale}: run `course build` and commit"


def test_no_solution_code_leaks_into_exercise_notebooks():
    for chapter in available_chapters(ROOT):
        text = exercise_path(chapter, ROOT).read_text()
        assert "BEGIN SOLUTION" not in text and "END SOLUTION" not in text
