"""`course check 11` end to end: the worked solution earns every automatic point, and a flawed
submission, generated from it with the three usual mistakes, is caught on each one.

The flawed notebook is the solution with three edits (each asserted to apply exactly once, so a
change to the solution cannot silently disarm this test):

1. specificity on training data: ``eval_tokens`` cut from the training split;
2. the proxy evaluated on the activating examples only: specificity and sensitivity computed over
   the tokens where the feature fires;
3. the neuron comparison at the wrong layer: layer 1's neurons for a layer-0 SAE.
"""

from __future__ import annotations

import subprocess
import sys
import time

import nbformat

from course_utils.checks import ch11
from course_utils.machinery.build import read_notebook
from course_utils.machinery.chapters import get_chapter, solution_path
from course_utils.machinery.grading import tabulate
from tests.conftest import ROOT

MISTAKES = {
    "training data": (
        "eval_tokens = val_windows[order[128:288]]",
        'eval_tokens = corpus_windows(model, "train")[:160]',
    ),
    "activating examples only": (
        "spec, sens = specificity_sensitivity(a, mask)",
        "spec, sens = specificity_sensitivity(a[a > 0], mask[a > 0])",
    ),
    "wrong layer": (
        "NEURON_HOOK = FA.neuron_hook_for(model, HOOK_NAME)",
        'NEURON_HOOK = "blocks.1.mlp.hook_post"',
    ),
}


def flawed_notebook(path) -> None:
    """Write the solution with the three mistakes to ``path``."""
    nb = nbformat.read(solution_path(get_chapter("11"), ROOT), as_version=4)
    for name, (right, wrong) in MISTAKES.items():
        hits = [c for c in nb.cells if c.cell_type == "code" and right in c.source]
        assert len(hits) == 1 and hits[0].source.count(right) == 1, f"{name}: {right!r} not unique"
        hits[0].source = hits[0].source.replace(right, wrong)
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    nbformat.write(nb, path)


def test_the_worked_solution_earns_every_automatic_point():
    chapter = get_chapter("11")
    results = tabulate(read_notebook(solution_path(chapter, ROOT)), chapter)
    assert [r.status for r in results] == ["passed"] * 8, results
    summary = ch11.marking_summary(results)
    assert "marked by the program: 40/40" in summary and "total: 40 + __ (person) of 100" in summary


def test_course_check_catches_each_mistake_of_the_flawed_submission(tmp_path):
    path = tmp_path / "11_flawed_submission.ipynb"
    flawed_notebook(path)
    start = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", "course_utils.machinery.cli", "check", str(path), "--no-save"],
        cwd=ROOT, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    seconds = time.perf_counter() - start
    out = result.stdout
    assert result.returncode == 1, out + result.stderr
    for n in ("1.1", "1.2", "1.3", "1.4", "2.1"):
        assert f"✓ {n}" in out, out
    assert "✗ 2.2" in out and "not from the validation split" in out  # training data
    assert "✗ 2.3" in out and "'blocks.0.mlp.hook_post'" in out  # wrong layer
    assert "✗ 2.4" in out and "sensitivity: stored 1" in out  # activating examples only
    assert "activating examples" in out
    assert "marked by the program: 22/40" in out and "for a person to mark" in out
    print(f"course check on the flawed submission: {seconds:.0f} s\n{out}")
