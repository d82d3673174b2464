"""List each chapter's exercises with the Mistake hints their checks give: where learners get stuck.

    .venv/bin/python scripts/exercise_hints.py            # every chapter, as Markdown
    .venv/bin/python scripts/exercise_hints.py 00 09      # some chapters

The hints are read from ``course_utils/checks/chNN.py``: for each exercise check, every list of
``Mistake`` objects that its body (or a helper of the same module that it calls) names. The
facilitator's guide (docs/teaching.md, "Where learners get stuck") was written from this output.
"""

from __future__ import annotations

import importlib
import sys
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from course_utils.checks.core import Exercise, Mistake, exercises_of  # noqa: E402
from course_utils.machinery.chapters import CHAPTERS, get_chapter  # noqa: E402


def _names(code: types.CodeType) -> set[str]:
    """Global names a code object (and the lambdas and comprehensions inside it) refers to."""
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _names(const)
    return names


def mistakes_of(module: types.ModuleType, check) -> list[Mistake]:
    """The Mistakes a check can hint at: module-level Mistake lists its code reaches."""
    found: list[Mistake] = []
    seen: set[str] = set()
    todo = [getattr(check, "__wrapped__", check).__code__]
    while todo:
        for name in sorted(_names(todo.pop())):
            if name in seen:
                continue
            seen.add(name)
            value = getattr(module, name, None)
            if isinstance(value, (list, tuple)) and value and isinstance(value[0], Mistake):
                found += [m for m in value if m not in found]
            elif isinstance(value, types.FunctionType) and value.__module__ == module.__name__:
                todo.append(value.__code__)  # a helper of this checks module
    return found


def hints_by_exercise(number: str) -> list[tuple[Exercise, list[Mistake]]]:
    module = importlib.import_module(get_chapter(number).checks_module)
    checks = {obj.exercise.name: obj for obj in vars(module).values() if hasattr(obj, "exercise")}
    return [(ex, mistakes_of(module, checks[ex.name])) for ex in exercises_of(module)]


def markdown(number: str) -> str:
    chapter = get_chapter(number)
    lines = [f"### {chapter.number} {chapter.title}", ""]
    for ex, mistakes in hints_by_exercise(number):
        lines.append(f"- **{ex.number} `{ex.name}`** ({len(mistakes)} known mistakes)")
        lines += [f"  - {m.name}: {m.hint}" for m in mistakes]
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> None:
    numbers = argv or [c.number for c in CHAPTERS]
    for number in numbers:
        try:
            print(markdown(number))
        except ModuleNotFoundError:
            print(f"### {number}: no checks module yet\n")


if __name__ == "__main__":
    main(sys.argv[1:])
