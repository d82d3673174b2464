"""The chapter table: one row per chapter, and where its notebooks live.

Adding a chapter: add a row here, create ``solutions/NN_slug.ipynb`` (``course new NN slug``),
write ``course_utils/checks/chNN.py``, run ``course build``. See README "Contributing a chapter".
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Chapter:
    number: str  # two digits, "00"
    slug: str  # file stem after the number, "setup_and_tools"
    title: str
    learner_time: str  # what a learner should plan for
    cpu_budget_s: int  # the solution notebook must run top to bottom within this on 2 CPU cores

    @property
    def filename(self) -> str:
        return f"{self.number}_{self.slug}.ipynb"

    @property
    def checks_module(self) -> str:
        return f"course_utils.checks.ch{self.number}"


CHAPTERS: tuple[Chapter, ...] = (
    Chapter("00", "setup_and_tools", "Setup and tools", "45 min", 60),
    Chapter("01", "toy_models_of_superposition", "Toy models of superposition", "3-4 h", 300),
    Chapter(
        "02", "sparse_dictionary_learning", "Sparse dictionary learning on toy data", "3-4 h", 360
    ),
    Chapter("03", "saes_on_a_language_model", "SAEs on a language model", "4-5 h", 480),
    Chapter("04", "end_to_end_saes", "End-to-end SAEs", "3-4 h", 480),
    Chapter("05", "transcoders_and_circuits", "Transcoders and feature circuits", "4 h", 480),
    Chapter("06", "intervening_on_features", "Intervening on features", "4 h", 480),
    Chapter(
        "07", "attribution_graphs", "Attribution graphs with cross-layer transcoders", "4 h", 480
    ),
    Chapter(
        "08",
        "bilinear_layers",
        "Bilinear layers: an MLP you can read from its weights",
        "2.5-3.5 h",
        240,
    ),
    Chapter("09", "polytope_lens", "The polytope lens", "2 h", 240),
    Chapter("10", "evaluating_saes", "Evaluating and comparing SAEs", "4.5 h", 480),
    Chapter(
        "11", "capstone_feature_analysis", "Capstone: a feature analysis, marked", "1 day", 600
    ),
)


class UnknownChapterError(ValueError):
    pass


def get_chapter(key: str | int) -> Chapter:
    """Find a chapter by number ("1", "01", 1) or slug; a clear error lists the valid ones."""
    text = str(key).strip()
    prefix = text.split("_", 1)[0]
    if prefix.isdigit() and text != prefix and any(int(prefix) == int(c.number) for c in CHAPTERS):
        text = prefix  # "00_setup_and_tool" (a typo after the number) still means chapter 00
    for chapter in CHAPTERS:
        if text.isdigit() and int(text) == int(chapter.number) or text == chapter.slug:
            return chapter
    valid = ", ".join(f"{c.number} ({c.title})" for c in CHAPTERS)
    close = difflib.get_close_matches(text, [c.slug for c in CHAPTERS], n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise UnknownChapterError(f"unknown chapter {key!r}.{hint} Valid chapters: {valid}.")


def working_checkout(start: Path | None = None) -> Path | None:
    """The course checkout at or above ``start`` (default: the working directory), or None.

    Unlike :func:`repo_root` this never falls back to where the package is installed: on a
    shared hub that is everyone's read-only copy, not the learner's own.
    """
    here = (start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / "solutions").is_dir() and (folder / "notebooks").is_dir():
            return folder
    return None


def repo_root(start: Path | None = None) -> Path:
    """The course checkout: the nearest folder above ``start`` holding solutions/ and notebooks/."""
    here = (start or Path.cwd()).resolve()
    found = working_checkout(here)
    if found is not None:
        return found
    package_parent = Path(__file__).resolve().parents[2]  # machinery/ -> course_utils/ -> checkout
    if (package_parent / "solutions").is_dir():
        return package_parent
    raise FileNotFoundError(
        f"no course checkout found at or above {here} (looked for solutions/ and notebooks/). "
        "Run this from inside the course repository, or pass --path to a notebook."
    )


def solution_path(chapter: Chapter, root: Path | None = None) -> Path:
    return (root or repo_root()) / "solutions" / chapter.filename


def exercise_path(chapter: Chapter, root: Path | None = None) -> Path:
    return (root or repo_root()) / "notebooks" / chapter.filename


def available_chapters(root: Path | None = None) -> list[Chapter]:
    """Chapters whose solution notebook exists in this checkout."""
    root = root or repo_root()
    return [c for c in CHAPTERS if solution_path(c, root).exists()]
