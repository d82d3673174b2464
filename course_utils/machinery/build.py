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
from typing import Any

import nbformat

from course_utils.machinery import claims, colab
from course_utils.machinery.chapters import (
    Chapter,
    available_chapters,
    exercise_path,
    repo_root,
    solution_path,
)

BEGIN, END = "# BEGIN SOLUTION", "# END SOLUTION"
STUB = "raise NotImplementedError()"
REPLICATIONS = "docs/replications.md"  # generated: the claims recorded in the executed solutions
SOLUTION_ONLY, KEEP_OUTPUT = "solution-only", "keep-output"
#: Notebook metadata exactly as JupyterLab writes it after starting the course kernel (ipykernel's
#: kernelspec and ``language_info`` for Python 3.11.7, the version CI runs; a kernel on another
#: Python still rewrites ``language_info.version``), so that opening a notebook and saving it
#: changes no byte. tests/test_browser.py checks this in JupyterLab itself.
NOTEBOOK_METADATA = {
    "kernelspec": {"display_name": "Python 3 (ipykernel)", "language": "python", "name": "python3"},
    "language_info": {
        "codemirror_mode": {"name": "ipython", "version": 3},
        "file_extension": ".py",
        "mimetype": "text/x-python",
        "name": "python",
        "nbconvert_exporter": "python",
        "pygments_lexer": "ipython3",
        "version": "3.11.7",
    },
    # What JupyterLab's widget manager saves when no widget is alive (`make lab` turns saving
    # widget state on, so that saved sliders reopen as sliders).
    "widgets": {
        "application/vnd.jupyter.widget-state+json": {
            "state": {},
            "version_major": 2,
            "version_minor": 0,
        }
    },
}


def as_javascript_numbers(value: Any) -> Any:
    """``value`` with every whole float written as an int, as a JupyterLab save round trip does.

    JupyterLab parses the notebook in JavaScript, where ``0.0`` and ``0`` are the same number, and
    sends it back as ``0``: a stored plotly figure with ``"x": 0.0`` would change on every save.
    """
    if isinstance(value, float):
        if value.is_integer() and abs(value) < 1e21:  # JavaScript prints 1e21 and up as floats
            return int(value)
        return value
    if isinstance(value, dict):
        return {key: as_javascript_numbers(item) for key, item in value.items()}
    if isinstance(value, list):
        return [as_javascript_numbers(item) for item in value]
    return value


def _stream_text(index: int, text: str, shown: str = "") -> tuple[str, int]:
    """JupyterLab 4's terminal-like stream model: write ``text`` into ``shown`` at ``index``.

    A port of ``processText`` in @jupyterlab/outputarea (4.6): ``\r`` returns to the start of the
    line and the next characters overwrite it (a tqdm bar keeps only its last state), ``\b``
    deletes, ``\n`` starts a new line. Returns the new text and the cursor.
    """
    if not any(c in text for c in "\b\r\n"):
        return shown[:index] + text + shown[index + len(text) :], index + len(text)
    cursor, start = index, 0
    while True:
        stop = next((k for k in range(start, len(text)) if text[k] in "\n\b\r"), -1)
        chunk = text[start : len(text) if stop == -1 else stop]
        shown = shown[:cursor] + chunk + shown[cursor + len(chunk) :]
        start, cursor = stop + 1, cursor + len(chunk)
        if stop == -1:
            return shown, cursor
        if text[stop] == "\b":
            if cursor > 0 and shown[cursor - 1] != "\n":
                shown, cursor = shown[: cursor - 1] + shown[cursor + 1 :], cursor - 1
        elif text[stop] == "\r":
            while cursor > 0 and shown[cursor - 1] != "\n":
                cursor -= 1
        else:
            shown += "\n"
            cursor = len(shown)


def as_jupyterlab_streams(outputs: list[dict]) -> list[dict]:
    """``outputs`` as JupyterLab holds them: consecutive stream outputs of one name merged into
    one, carriage returns and backspaces applied (so a progress bar stores its final state)."""
    merged: list[dict] = []
    last_name, cursor = "", 0
    for output in outputs:
        if output.get("output_type") != "stream":
            merged.append(output)
            last_name = ""
            continue
        text = output["text"] if isinstance(output["text"], str) else "".join(output["text"])
        if output["name"] == last_name and merged:
            merged[-1]["text"], cursor = _stream_text(cursor, text, merged[-1]["text"])
        else:
            shown, cursor = _stream_text(0, text)
            merged.append({**output, "text": shown})
            last_name = output["name"]
    return merged


def notebook_text(notebook: Any) -> str:
    """The file text JupyterLab would save for ``notebook``: kernel metadata, JavaScript numbers,
    streams as its output model holds them, nbformat's sorted keys and line-split sources, a
    final newline."""
    data = as_javascript_numbers(json.loads(json.dumps(notebook)))
    data["metadata"] = {**data.get("metadata", {}), **NOTEBOOK_METADATA}
    for cell in data.get("cells", []):
        if "outputs" in cell:
            cell["outputs"] = as_jupyterlab_streams(cell["outputs"])
    return nbformat.writes(nbformat.from_dict(data)) + "\n"


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


#: A Colab link in any of the forms the course has written: [![alt](badge image) text](colab
#: url) or [Open in Colab](colab url).
BADGE_PATTERN = re.compile(
    r"\[(?:!\[[^\]]*\]\([^)]*colab-badge[^)]*\)[^\]]*|Open in Colab)\]"
    r"\(https://colab\.research\.google\.com/[^)]*\)"
)


def _rewrite_badge(source: str, notebook_path: str) -> str:
    return BADGE_PATTERN.sub(lambda _: colab.badge(notebook_path), source)


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
    return notebook_text(notebook)


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
    """Make a solution notebook's badge ``colab.badge`` and its first code cell
    ``colab.setup_cell_source()``; True if either was out of date.

    Both are generated boilerplate: change them in ``colab`` and every solution notebook follows on
    the next ``course build``. Nothing else in the file moves.
    """
    notebook = read_notebook(path)
    changed = False
    relpath = f"solutions/{path.name}"
    first_md = next((c for c in notebook.cells if c.cell_type == "markdown"), None)
    if first_md is not None and _rewrite_badge(first_md.source, relpath) != first_md.source:
        first_md.source, changed = _rewrite_badge(first_md.source, relpath), True
    first_code = next((c for c in notebook.cells if c.cell_type == "code"), None)
    if first_code is not None and first_code.source != colab.setup_cell_source():
        first_code.source, changed = colab.setup_cell_source(), True
    if changed and not check_only:
        path.write_text(notebook_text(notebook), encoding="utf-8")
    return changed


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
    # The replication table, from the claims recorded in the executed solutions.
    report = root / REPLICATIONS
    text = claims.markdown_report(claims.collect_course(root))
    if not report.exists() or report.read_text(encoding="utf-8") != text:
        stale.append(report)
        if not check_only:
            report.write_text(text, encoding="utf-8")
    return stale
