"""Count, per chapter, the wrong answers and correct alternatives the check tests hold.

    .venv/bin/python scripts/count_check_answers.py

Wrong answers: every Mistake (rejected with its own hint), the one extra wrong answer per check,
and the invented wrong answers in WRONG that are neither (duplicates by identity counted once). Correct
alternatives: the entries of CORRECT (the reference itself not counted).
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> None:
    print(
        f"{'chapter':8} {'exercises':>9} {'mistakes':>8} {'invented':>8} {'wrong total':>11} "
        f"{'correct alts':>12} {'min alts/ex':>11}"
    )
    totals = [0, 0, 0, 0, 0]
    for path in sorted((ROOT / "tests").glob("test_checks_ch*.py")):
        module = importlib.import_module(f"tests.{path.stem}")
        rows = module.CHECKS
        wrong_ids: set[int] = set()
        mistakes = 0
        for _check, _reference, row_mistakes, extra in rows:
            mistakes += len(row_mistakes)
            wrong_ids.update(id(m.impl) for m in row_mistakes)
            wrong_ids.add(id(extra))
        invented = {id(w) for ws in getattr(module, "WRONG", {}).values() for w in ws}
        invented -= {id(m.impl) for row in rows for m in row[2]} | {id(row[3]) for row in rows}
        wrong_total = len(wrong_ids | invented)
        correct = getattr(module, "CORRECT", {})
        alts = sum(len(v) for v in correct.values())
        least = min((len(correct.get(row[0], ())) for row in rows), default=0)
        chapter = path.stem[-4:]
        print(
            f"{chapter:8} {len(rows):9d} {mistakes:8d} {len(invented):8d} "
            f"{wrong_total:11d} {alts:12d} {least:11d}"
        )
        for i, v in enumerate((len(rows), mistakes, len(invented), wrong_total, alts)):
            totals[i] += v
    print(
        f"{'total':8} {totals[0]:9d} {totals[1]:8d} {totals[2]:8d} {totals[3]:11d} {totals[4]:12d}"
    )


if __name__ == "__main__":
    main()
