"""Chapter renumbering: progress saved for the capstone as chapter 10 carries over to 11."""

from __future__ import annotations

import json

from course_utils.machinery import grading
from course_utils.machinery.chapters import Chapter, get_chapter
from course_utils.machinery.grading import ExerciseResult, load_progress, save_progress


def _write(tmp_path, data):
    (tmp_path / grading.PROGRESS_FILE).write_text(json.dumps(data), encoding="utf-8")


def test_old_capstone_progress_moves_to_11(tmp_path, monkeypatch):
    monkeypatch.setenv("COURSE_HOME", str(tmp_path))
    old = {"checked_at": "2026-11-01 10:00", "results": [{"number": "1.1", "status": "passed"}]}
    _write(tmp_path, {"03": {"checked_at": "x", "results": []}, "10": old})
    progress = load_progress()
    assert "10" not in progress
    assert progress["11"]["results"] == old["results"]
    assert progress["11"]["slug"] == "capstone_feature_analysis"
    assert progress["03"] == {"checked_at": "x", "results": []}


def test_new_chapter_10_progress_stays(tmp_path, monkeypatch):
    monkeypatch.setenv("COURSE_HOME", str(tmp_path))
    chapter = Chapter("10", "evaluating_saes", "Evaluating and comparing SAEs", "4 h", 480)
    save_progress(chapter, [ExerciseResult("1.1", "match_latents", "passed", "")])
    progress = load_progress()
    assert progress["10"]["slug"] == chapter.slug and "11" not in progress


def test_saving_after_carry_over_keeps_both(tmp_path, monkeypatch):
    monkeypatch.setenv("COURSE_HOME", str(tmp_path))
    _write(tmp_path, {"10": {"checked_at": "old", "results": []}})
    save_progress(Chapter("10", "evaluating_saes", "Evaluating SAEs", "4 h", 480), [])
    on_disk = json.loads((tmp_path / grading.PROGRESS_FILE).read_text(encoding="utf-8"))
    assert on_disk["11"]["checked_at"] == "old"
    assert on_disk["10"]["slug"] == "evaluating_saes"
    assert get_chapter("11").slug == "capstone_feature_analysis"


def test_newer_capstone_entry_wins(tmp_path, monkeypatch):
    monkeypatch.setenv("COURSE_HOME", str(tmp_path))
    _write(
        tmp_path,
        {
            "10": {"checked_at": "old", "results": []},
            "11": {"slug": "capstone_feature_analysis", "checked_at": "new", "results": []},
        },
    )
    assert load_progress() == {
        "11": {"slug": "capstone_feature_analysis", "checked_at": "new", "results": []}
    }


def test_a_notebook_saved_under_the_old_number_is_checked_as_the_capstone(tmp_path):
    from course_utils.machinery.cli import _chapter_and_path

    old = tmp_path / "10_capstone_feature_analysis.ipynb"
    old.write_text("{}", encoding="utf-8")
    chapter, path = _chapter_and_path(str(old))
    assert chapter.number == "11" and path == old
