"""Build exercise notebooks from solution notebooks (the one source of truth).

In ``solutions/NN_name.ipynb``:
- solution code sits between ``# BEGIN SOLUTION`` and ``# END SOLUTION`` lines inside a code cell;
  the exercise gets ``raise NotImplementedError()`` at the marker's indentation instead;
- a cell tagged ``solution-only`` is dropped from the exercise notebook;
- a cell tagged ``keep-output`` keeps its outputs (an expected figure to compare against);
- every other output, execution count and non-tag metadata is cleared; ``# NBVAL_*`` lines go.
The result is byte-stable: building twice gives identical files, and a test fails when
``notebooks/`` is out of date.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import nbformat

from course_utils import colab
from course_utils.chapters import (
    Chapter,
    available_chapters,
    exercise_path,
    repo_root,
    solution_path,
)

BEGIN, END = "# BEGIN SOLUTION", "# END SOLUTION"
STUB = "raise NotImplementedError()"
SOLUTION_ONLY, KEEP_OUTPUT = "solution-only", "keep-output"
NOTEBOOK_METADATA = {
    "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
    "language_info": {"name": "python"},
}


class BuildError(ValueError):
    pass


def strip_solutions(source: str, where: str = "cell") -> str:
    """Replace every BEGIN/END SOLUTION region with the stub, indented like the marker."""
    out: list[str] = []
    inside = False
    for number, line in enumerate(source.split("\n"), start=1):
        stripped = line.strip()
        if stripped == BEGIN:
            if inside:
                raise BuildError(
                    f"{where}, line {number}: nested {BEGIN!r}; close the first region."
                )
            inside = True
            indent = line[: len(line) - len(line.lstrip())]
            out.append(indent + STUB)
        elif stripped == END:
            if not inside:
                raise BuildError(f"{where}, line {number}: {END!r} without a matching {BEGIN!r}.")
            inside = False
        elif not inside and not stripped.startswith("# NBVAL_"):
            out.append(line)
    if inside:
        raise BuildError(f"{where}: {BEGIN!r} is never closed by {END!r}.")
    return "\n".join(out)


def _rewrite_badge(source: str, notebook_path: str) -> str:
    pattern = re.compile(r"\[!\[Open In Colab\]\([^)]*\)\]\([^)]*\)")
    return pattern.sub(lambda _: colab.badge(notebook_path), source)


def build_exercise_notebook(solution: nbformat.NotebookNode, exercise_relpath: str) -> str:
    """Return the exercise notebook's file text for a solution notebook."""
    cells = []
    for index, cell in enumerate(solution.cells):
        tags = list(cell.get("metadata", {}).get("tags", []))
        if SOLUTION_ONLY in tags:
            continue
        where = f"cell {index} ({cell.get('id', '?')})"
        new: dict = {
            "cell_type": cell.cell_type,
            "id": cell.get("id") or f"cell-{index}",
            "metadata": {"tags": sorted(tags)} if tags else {},
            "source": cell.source,
        }
        if cell.cell_type == "code":
            new["source"] = strip_solutions(cell.source, where)
            new["execution_count"] = None
            new["outputs"] = _clean_outputs(cell.outputs) if KEEP_OUTPUT in tags else []
        elif cell.cell_type == "markdown":
            new["source"] = _rewrite_badge(cell.source, exercise_relpath)
        cells.append(new)
    notebook = {"cells": cells, "metadata": NOTEBOOK_METADATA, "nbformat": 4, "nbformat_minor": 5}
    # nbformat writes sources as lists of lines with sorted keys: small, stable git diffs.
    return nbformat.writes(nbformat.from_dict(notebook)) + "\n"


def _clean_outputs(outputs: list) -> list:
    cleaned = []
    for output in outputs:
        output = dict(output)
        if "execution_count" in output:
            output["execution_count"] = None
        cleaned.append(output)
    return cleaned


def read_notebook(path: Path) -> nbformat.NotebookNode:
    """Read a notebook or raise a one-line error that names the file and the fix."""
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist.")
    try:
        return nbformat.read(path, as_version=4)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise BuildError(
            f"{path} is not valid notebook JSON ({error}). Restore it with "
            f"`git checkout -- {path.name}` or regenerate it with `course build`."
        ) from None
    except Exception as error:  # nbformat's own validation errors
        raise BuildError(
            f"{path} is not a Jupyter notebook ({type(error).__name__}: {error})."
        ) from None


def expected_exercise_text(chapter: Chapter, root: Path) -> str:
    solution = read_notebook(solution_path(chapter, root))
    return build_exercise_notebook(solution, f"notebooks/{chapter.filename}")


def sync_setup_cell(path: Path, check_only: bool = False) -> bool:
    """Make a solution notebook's first code cell ``colab.setup_cell_source()``; True if it was not.

    The setup cell is generated boilerplate (like the badge): change it in ``colab`` and every
    solution notebook follows on the next ``course build``. Nothing else in the file moves.
    """
    notebook = read_notebook(path)
    first_code = next((c for c in notebook.cells if c.cell_type == "code"), None)
    if first_code is None or first_code.source == colab.setup_cell_source():
        return False
    if not check_only:
        first_code.source = colab.setup_cell_source()
        path.write_text(nbformat.writes(notebook) + "\n", encoding="utf-8")
    return True


def build_all(root: Path | None = None, check_only: bool = False) -> list[Path]:
    """Write (or, with ``check_only``, just compare) every exercise notebook; return the stale ones.

    Solution notebooks whose setup cell is out of date are brought up to date first (and count
    as stale).
    """
    root = root or repo_root()
    stale = []
    for chapter in available_chapters(root):
        if sync_setup_cell(solution_path(chapter, root), check_only):
            stale.append(solution_path(chapter, root))
        target = exercise_path(chapter, root)
        text = expected_exercise_text(chapter, root)
        if not target.exists() or target.read_text(encoding="utf-8") != text:
            stale.append(target)
            if not check_only:
                target.write_text(text, encoding="utf-8")
    return stale
