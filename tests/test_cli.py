"""The `course` command: listing, grading notebooks, and one-line errors on bad input."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from tests.conftest import ROOT


def course(*args: str, cwd=ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "course_utils.machinery.cli", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_list_shows_every_chapter():
    result = course("list")
    assert result.returncode == 0
    for title in ("Setup and tools", "Toy models of superposition", "Transcoders"):
        assert title in result.stdout


@pytest.mark.parametrize(
    "target, words",
    [
        ("42", "unknown chapter '42'"),
        ("toy_modles_of_superposition", "Did you mean 'toy_models_of_superposition'"),
        ("missing/00_setup_and_tools.ipynb", "does not exist"),
        ("README.md", "is not a notebook"),
        ("x.ipynb", "does not exist"),
    ],
)
def test_bad_targets_give_one_line_errors(target, words):
    result = course("check", target)
    assert result.returncode == 2
    assert words in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_corrupt_and_non_notebook_json(tmp_path):
    broken = tmp_path / "00_broken.ipynb"
    broken.write_text('{"cells": [')
    result = course("check", str(broken))
    assert result.returncode == 2 and "not a Jupyter notebook" in result.stderr

    not_a_notebook = tmp_path / "00_data.ipynb"
    not_a_notebook.write_text(json.dumps({"hello": "world"}))
    result = course("check", str(not_a_notebook))
    assert result.returncode == 2 and "Traceback" not in result.stderr


def _copy_for_checking(tmp_path, folder: str):
    target = tmp_path / "00_setup_and_tools.ipynb"
    shutil.copy(ROOT / folder / "00_setup_and_tools.ipynb", target)
    return target


def test_untouched_exercise_notebook_reports_nothing_attempted(tmp_path):
    result = course("check", str(_copy_for_checking(tmp_path, "notebooks")), "--no-save")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "0 passed, 0 failed, 3 not attempted" in result.stdout


def test_solutions_copy_passes_every_exercise(tmp_path):
    result = course("check", str(_copy_for_checking(tmp_path, "solutions")), "--no-save")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "3 passed, 0 failed, 0 not attempted" in result.stdout


def test_one_wrong_answer_fails_with_its_hint(tmp_path):
    import nbformat

    path = _copy_for_checking(tmp_path, "notebooks")
    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code" and "def cosine_similarity_matrix" in cell.source:
            cell.source = cell.source.replace(
                "raise NotImplementedError()", "return vectors @ vectors.T"
            )
    nbformat.write(nb, path)
    result = course("check", str(path), "--no-save")
    assert result.returncode == 1
    assert "✗ 0.1" in result.stdout and "raw dot products" in result.stdout
    assert "0 passed, 1 failed, 2 not attempted" in result.stdout


def test_doctor_reports_versions_and_offline_status(monkeypatch):
    result = subprocess.run(
        [sys.executable, "-m", "course_utils.machinery.cli", "doctor"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 0, result.stderr
    assert "transformer_lens" in result.stdout and "offline by request" in result.stdout
    assert "kernel" in result.stdout


def test_unreleased_chapter_and_non_notebook_file(tmp_path):
    import course_utils.machinery.chapters as chapters

    unreleased = [c for c in chapters.CHAPTERS if not chapters.solution_path(c, ROOT).exists()]
    if unreleased:
        result = course("check", unreleased[-1].number)
        assert result.returncode == 2 and "not released yet" in result.stderr
    text_file = tmp_path / "notes.txt"
    text_file.write_text("hello")
    result = course("check", str(text_file))
    assert result.returncode == 2 and "is not a notebook" in result.stderr


def test_chapter_number_with_a_typo_after_it_still_resolves():
    from course_utils.machinery.chapters import get_chapter

    assert get_chapter("00_setup_and_tool").number == "00"
