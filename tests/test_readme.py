"""The README's promises: the two commands come first, and every notebook it names exists."""

from __future__ import annotations

import re

from tests.conftest import ROOT

README = (ROOT / "README.md").read_text()


def test_first_two_code_blocks_are_make_lab_and_make_test():
    blocks = re.findall(r"```(?:\w+)?\n(.*?)```", README, flags=re.S)
    assert [b.strip() for b in blocks[:2]] == ["make lab", "make test"]


def test_every_notebook_the_readme_names_exists():
    for path in re.findall(r"`((?:notebooks|solutions)/\d\d_\w+\.ipynb)`", README):
        assert (ROOT / path).exists(), f"README names {path}, which does not exist"


def test_ci_runs_the_readme_test_command():
    assert "make test" in (ROOT / ".ci" / "run").read_text()
