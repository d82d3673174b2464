"""Generated cohorts of submitted notebooks, for ``course report`` tests and measurements.

Kinds of submission:
- ``right``: the solution notebook;
- ``wrong``: the solution notebook with one exercise replaced by a known wrong answer (one of the
  check's Mistakes, so the report should show its hint);
- ``untouched``: the exercise notebook as generated;
- ``partial``: the exercise notebook handed in early, cut after its first check cell;
- ``corrupt``: a notebook cut off half way (invalid JSON);
- ``foreign``: a valid notebook that is not part of the course.
File names never say the chapter (``learner07.ipynb``), so the report must read it from the
contents.

    python -m tests.cohort FOLDER 30          # 30 submissions over the cheap chapters
"""

from __future__ import annotations

import json
import random
import re
import sys
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parent.parent

#: (function name, wrong body, words of the hint the report should show) per chapter.
WRONG = {
    "00": (
        "record_norm_hook",
        "store[hook.name] = (activation**2).sum(-1)",
        "these are squared norms",
    ),
    "09": ("spline_code", "return layer_codes(model, x)[-1]", "concatenates EVERY hidden layer"),
}
#: Chapters whose notebooks run in under a minute on 2 busy cores (`course execute` times).
CHEAP = ("00", "09")


def _chapter_file(folder: str, number: str) -> Path:
    return next((ROOT / folder).glob(f"{number}_*.ipynb"))


def right(number: str) -> str:
    return _chapter_file("solutions", number).read_text(encoding="utf-8")


def untouched(number: str) -> str:
    return _chapter_file("notebooks", number).read_text(encoding="utf-8")


def wrong(number: str) -> str:
    """The solution with one exercise's solution region replaced by a known wrong answer."""
    name, body, _ = WRONG[number]
    notebook = nbformat.reads(right(number), as_version=4)
    region = re.compile(r"( *)# BEGIN SOLUTION\n.*?# END SOLUTION", re.DOTALL)
    for cell in notebook.cells:
        if cell.cell_type == "code" and re.search(rf"^def {name}\(", cell.source, re.MULTILINE):
            cell.source = region.sub(lambda m: m.group(1) + body, cell.source, count=1)
            return nbformat.writes(notebook)
    raise ValueError(f"no exercise cell defines {name} in chapter {number}")


def partial(number: str) -> str:
    """The exercise notebook handed in early: cut after its first check cell."""
    notebook = nbformat.reads(untouched(number), as_version=4)
    calls_check = re.compile(r"^check\.\w+\(", re.MULTILINE)
    first = next(i for i, c in enumerate(notebook.cells) if calls_check.search(c.source))
    notebook.cells = notebook.cells[: first + 1]
    return nbformat.writes(notebook)


def corrupt(number: str = "00") -> str:
    text = right(number)
    return text[: len(text) // 2]


def foreign() -> str:
    notebook = nbformat.v4.new_notebook()
    notebook.cells = [
        nbformat.v4.new_markdown_cell("# My holiday photos"),
        nbformat.v4.new_code_cell("print('not a course notebook')"),
    ]
    return nbformat.writes(notebook)


def make(kind: str, number: str) -> str:
    if kind == "corrupt":
        return corrupt(number)
    if kind == "foreign":
        return foreign()
    return {"right": right, "wrong": wrong, "untouched": untouched, "partial": partial}[kind](
        number
    )


def write_cohort(folder: Path, n: int, seed: int = 0) -> dict[str, tuple[str, str]]:
    """``n`` submissions ``learnerNN.ipynb`` mixing every kind over the cheap chapters, each file
    different; returns {file name: (kind, chapter)}. The mix is fixed by ``seed``."""
    rng = random.Random(seed)
    kinds = ["right", "wrong", "untouched", "untouched", "right", "wrong", "corrupt", "foreign"]
    folder.mkdir(parents=True, exist_ok=True)
    made = {}
    for i in range(n):
        kind = kinds[i % len(kinds)]
        number = rng.choice(CHEAP)
        name = f"learner{i:02d}.ipynb"
        text = make(kind, number)
        if kind != "corrupt":  # every learner's file differs, as in a real cohort (no cache hits)
            notebook = nbformat.reads(text, as_version=4)
            notebook.cells.append(nbformat.v4.new_markdown_cell(f"Submitted by {name[:-6]}."))
            text = nbformat.writes(notebook)
        (folder / name).write_text(text, encoding="utf-8")
        made[name] = (kind, "" if kind == "foreign" else number)
    return made


if __name__ == "__main__":
    target, count = Path(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 30
    print(json.dumps(write_cohort(target, count), indent=1))
