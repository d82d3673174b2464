"""Replication claims as records: every number the course sets beside a paper's, with what makes
the comparison fair or not, in one table (``course claims``, ``docs/replications.md``).

A notebook's replication-check cell keeps its asserts and adds a record::

    from course_utils.machinery.claims import claim
    claim(
        "01", "pentagon",
        paper="Elhage et al. 2022 (Toy Models of Superposition), fig. 1 and section 'Superposition as a phase change'",
        quantity="5 features in 2 dimensions at high sparsity: ratio of largest to smallest feature norm; adjacent angles",
        paper_value="regular pentagon (equal norms, 72 degrees)", paper_setting="n=5, m=2, equal importance, 1-S=0.05",
        ours=f"norm ratio {ratio:.3f}, angles within {gap:.1f} degrees of 72", our_setting="same model, 1-S = 0.097/0.070/0.050",
        sample="3 sparsities, best of 10 instances each", baseline="at 1-S = 1 (dense) only 2 features are kept",
        same_quantity="yes", verdict="replicated",
    )

The record is checked against the Claims checklist (``CONVENTIONS.md``) when it is made, so a
record that breaks it fails the cell with a sentence saying which rule; it is then displayed
with its own MIME type (JupyterLab shows it as a small table) and so lives in the executed
solution notebook, where ``collect`` finds it.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

MIME = "application/vnd.course.claim+json"
SAME_QUANTITY = ("yes", "partly", "no")
VERDICTS = (
    "replicated",
    "replicated in direction, not size",
    "not at our budget",
    "differs",
)


class ClaimError(ValueError):
    """A record that breaks the Claims checklist: the message names the rule."""


@dataclass(frozen=True)
class Claim:
    chapter: str  # "05"
    key: str  # short and unique within the chapter: "tc-vs-sae-pareto"
    paper: str  # who, which paper, and where in it: "Dunefsky et al. 2024, fig. 3"
    quantity: str  # what is measured, and how it is defined
    paper_value: str  # the paper's number ("" if it gives none: say so in paper_setting)
    paper_setting: str  # model, layer, width, tokens
    ours: str  # our number
    our_setting: str  # model, layer, width, tokens, steps
    sample: str  # what the number is measured on, with n
    baseline: str  # the baseline's value, or why none applies
    same_quantity: str  # "yes" | "partly" | "no"
    verdict: str  # one of VERDICTS
    differs: str = ""  # what differs, when same_quantity is "partly" or "no"
    reason: str = ""  # what the verdict rests on (required unless "replicated")
    budgets_tried: tuple[str, ...] = field(default_factory=tuple)  # for "not at our budget"

    def problems(self) -> list[str]:
        """Every Claims-checklist rule this record breaks, as sentences (empty when none)."""
        out = []
        for name in ("chapter", "key", "paper", "quantity", "ours", "our_setting", "sample"):
            if not str(getattr(self, name)).strip():
                out.append(f"{name} is empty")
        if not self.baseline.strip():
            out.append("no baseline: give the baseline's value or say why none applies")
        if self.same_quantity not in SAME_QUANTITY:
            out.append(f"same_quantity must be one of {SAME_QUANTITY}, not {self.same_quantity!r}")
        if self.verdict not in VERDICTS:
            out.append(f"verdict must be one of {VERDICTS}, not {self.verdict!r}")
        if self.same_quantity in ("partly", "no") and not self.differs.strip():
            out.append(f"same_quantity is {self.same_quantity!r}: say what differs (differs=...)")
        if self.same_quantity == "no" and self.verdict.startswith("replicated"):
            out.append("a different quantity cannot replicate the paper's: use 'differs'")
        if self.paper_value.strip() and not self.paper.strip():
            out.append("a paper value needs its source (paper=...)")
        if self.verdict == "not at our budget" and len(self.budgets_tried) < 2:
            out.append("'not at our budget' needs at least two budgets tried (budgets_tried=...)")
        if self.verdict != "replicated" and not self.reason.strip():
            out.append(f"verdict {self.verdict!r} needs what it rests on (reason=...)")
        return out

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["budgets_tried"] = list(self.budgets_tried)
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Claim:
        return cls(**{**data, "budgets_tried": tuple(data.get("budgets_tried", ()))})

    def markdown(self) -> str:
        same = self.same_quantity + (f" ({self.differs})" if self.differs else "")
        rows = [
            ("paper", self.paper),
            ("quantity", self.quantity),
            ("paper's value", f"{self.paper_value or '—'} ({self.paper_setting})"),
            ("ours", f"{self.ours} ({self.our_setting})"),
            ("sample", self.sample),
            ("baseline", self.baseline),
            ("same quantity", same),
            ("verdict", self.verdict + (f": {self.reason}" if self.reason else "")),
        ]
        if self.budgets_tried:
            rows.append(("budgets tried", "; ".join(self.budgets_tried)))
        body = "\n".join(f"| {name} | {_cell(value)} |" for name, value in rows)
        return f"**Claim {self.chapter}/{self.key}**\n\n| | |\n|---|---|\n{body}\n"


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def make_claim(chapter: str, key: str, **fields: Any) -> Claim:
    """A replication record, checked against the Claims checklist: ClaimError names every rule
    it breaks (and an unknown or missing field)."""
    fields["budgets_tried"] = tuple(fields.get("budgets_tried", ()))
    try:
        record = Claim(chapter=str(chapter), key=key, **fields)
    except TypeError as error:
        raise ClaimError(f"claim {chapter}/{key}: {error}") from None
    problems = record.problems()
    if problems:
        raise ClaimError(
            f"claim {chapter}/{key} breaks the Claims checklist: " + "; ".join(problems)
        )
    return record


def claim(chapter: str, key: str, **fields: Any) -> None:
    """Record a replication claim in the notebook: checked (``make_claim``), then shown as a small
    table and stored in the cell's output under its own MIME type, where ``collect`` finds it.
    Returns nothing, so a claim as a cell's last line shows its table only."""
    record = make_claim(chapter, key, **fields)
    try:
        from IPython import get_ipython
        from IPython.display import display
    except ImportError:  # outside IPython there is nothing to display on
        return
    if get_ipython() is not None:
        display({MIME: record.to_json(), "text/markdown": record.markdown()}, raw=True)


def collect(notebook_path: Path) -> list[Claim]:
    """Every claim recorded in an executed notebook's outputs, in order."""
    data = json.loads(Path(notebook_path).read_text(encoding="utf-8"))
    found = []
    for cell in data.get("cells", []):
        for output in cell.get("outputs", []):
            record = output.get("data", {}).get(MIME)
            if record is not None:
                found.append(Claim.from_json(record))
    return found


def collect_course(root: Path) -> dict[str, list[Claim]]:
    """Claims per chapter number, from every executed solution notebook in a checkout."""
    from course_utils.machinery.chapters import available_chapters, solution_path

    return {c.number: collect(solution_path(c, root)) for c in available_chapters(root)}


def summary(claims: dict[str, list[Claim]]) -> dict[str, int]:
    counts = dict.fromkeys(VERDICTS, 0)
    for records in claims.values():
        for record in records:
            counts[record.verdict] += 1
    return counts


COLUMNS = (
    "claim", "paper", "quantity", "paper's value (setting)", "ours (setting)", "sample",
    "baseline", "same quantity", "verdict",
)  # fmt: skip


def _row(record: Claim) -> list[str]:
    same = record.same_quantity + (f": {record.differs}" if record.differs else "")
    verdict = record.verdict + (f": {record.reason}" if record.reason else "")
    if record.budgets_tried:
        verdict += f" (budgets tried: {'; '.join(record.budgets_tried)})"
    return [
        record.key,
        record.paper,
        record.quantity,
        f"{record.paper_value or '—'} ({record.paper_setting})",
        f"{record.ours} ({record.our_setting})",
        record.sample,
        record.baseline,
        same,
        verdict,
    ]


#: Chapters whose notebooks make no replication claim (so an empty table is complete).
NO_PAPER_CLAIMS = frozenset({"00"})

#: How to read a verdict (docs/replications.md prints it under the counts).
LEGEND = (
    "How to read the verdicts: **replicated** — our number agrees with the paper's, and \"same "
    "quantity\" says how close the two quantities are (never \"no\"); **replicated in direction, "
    "not size** — the paper's sign or ordering, not its magnitude; **not at our budget** — not "
    "reproduced at two or more budgets, listed in the verdict; **differs** — the verdict cell says "
    "which: our measurement disagrees, or the quantities are not comparable (\"same quantity: "
    "no\"), or the result is inconclusive. A verdict whose reason cites an issue (\"issue 24\") "
    "rests on an independent review's measurement made outside the notebook and awaits "
    "re-measurement there; a reason that says \"outside the notebook\" rests on runs the notebook "
    "does not repeat.",
)


def markdown_report(claims: dict[str, list[Claim]]) -> str:
    """docs/replications.md: a course-wide summary, then one table per chapter."""
    from course_utils.machinery.chapters import get_chapter

    total = sum(len(r) for r in claims.values())
    lines = [
        "# What the course replicates",
        "",
        "Generated by `course build` from the executed solution notebooks (`course claims` prints "
        "the same table in a terminal); do not edit. Each row is a record made beside a notebook's "
        "replication asserts (`course_utils/machinery/claims.py`), checked against the Claims "
        "checklist of the course's conventions when it is made: a baseline or why none applies, "
        "whether the two numbers are the same quantity, and what the verdict rests on.",
        "",
        f"**{total} claims.** " + " · ".join(f"{v}: {n}" for v, n in summary(claims).items()),
        "",
        *LEGEND,
        "",
    ]
    for number, records in sorted(claims.items()):
        title = get_chapter(number).title
        lines += [f"## {number} — {title}", ""]
        if not records and number in NO_PAPER_CLAIMS:
            lines += ["No records: this chapter sets up the tools and puts no number beside a "
                      "paper's.", ""]  # fmt: skip
            continue
        if not records:
            notebook = f"solutions/{get_chapter(number).filename}"
            lines += [f"Not recorded here yet: its replication checks are the assert cells of "
                      f"`{notebook}`.", ""]  # fmt: skip
            continue
        lines.append("| " + " | ".join(COLUMNS) + " |")
        lines.append("|" + "---|" * len(COLUMNS))
        lines += ["| " + " | ".join(_cell(v) for v in _row(r)) + " |" for r in records]
        lines.append("")
    return "\n".join(lines)


def text_report(claims: dict[str, list[Claim]]) -> str:
    """``course claims``: one block per claim, readable in an 80-column terminal."""
    out = []
    for number, records in sorted(claims.items()):
        for record in records:
            out.append(f"{number}/{record.key}  [{record.verdict}]")
            for name, value in zip(COLUMNS[1:], _row(record)[1:], strict=True):
                out.append(f"    {name + ':':<26}{value}")
            out.append("")
    counts = summary(claims)
    out.append(
        f"{sum(counts.values())} claims. " + " · ".join(f"{v}: {n}" for v, n in counts.items())
    )
    return "\n".join(out)
