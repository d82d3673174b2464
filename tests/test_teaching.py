"""The facilitator's guide (docs/teaching.md) agrees with the course it describes."""

from __future__ import annotations

import importlib
import re
import sys

import pytest

from course_utils.machinery.chapters import CHAPTERS
from course_utils.machinery.cli import parser
from tests.conftest import ROOT

GUIDE = (ROOT / "docs" / "teaching.md").read_text(encoding="utf-8")


def test_the_readme_links_the_guide():
    assert "(docs/teaching.md)" in (ROOT / "README.md").read_text()


def test_every_chapter_has_a_row_with_its_learner_time_and_a_section():
    rows = dict(re.findall(r"^\| (\d\d) \| [^|]+ \| ([^|]+?) \|", GUIDE, flags=re.MULTILINE))
    for chapter in CHAPTERS:
        assert rows.get(chapter.number) == chapter.learner_time, chapter.number
        assert re.search(rf"^### {chapter.number} ", GUIDE, flags=re.MULTILINE), chapter.number


def test_every_course_command_the_guide_uses_exists():
    commands = set(parser()._subparsers._group_actions[0].choices)
    blocks = "\n".join(re.findall(r"```\w*\n(.*?)```", GUIDE, flags=re.DOTALL))
    used = set(re.findall(r"`course ([a-z-]+)", GUIDE)) | set(
        re.findall(r"^course ([a-z-]+)", blocks, flags=re.MULTILINE)
    )
    assert used and used <= commands, used - commands


def test_no_placeholder_is_left():
    assert "see below" not in GUIDE and "TODO" not in GUIDE


@pytest.mark.parametrize("number", ["00", "01", "09"])
def test_the_hints_script_finds_exactly_each_checks_mistakes(number):
    """scripts/exercise_hints.py (where the guide's "stuck" lists come from) maps every exercise to
    the same Mistakes the check tests prove are caught (tests/test_checks_chNN.py)."""
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        hints = importlib.import_module("exercise_hints")
    finally:
        sys.path.pop(0)
    found = {ex.name: {m.hint for m in ms} for ex, ms in hints.hints_by_exercise(number)}
    rows = importlib.import_module(f"tests.test_checks_ch{number}").CHECKS
    assert found == {row[0].exercise.name: {m.hint for m in row[2]} for row in rows}


def test_the_guides_links_are_what_the_helpers_print():
    from course_utils.machinery.hub import binder_link, nbgitpuller_link

    assert f"# {nbgitpuller_link('https://hub.example.org')}\n" in GUIDE
    assert f"\n{binder_link()}\n" in GUIDE
