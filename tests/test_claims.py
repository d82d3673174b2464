"""Replication records (course_utils/machinery/claims.py): the Claims checklist is enforced when a
record is made, records survive a notebook's execution, and docs/replications.md is up to date."""

from __future__ import annotations

import json

import nbformat
import pytest

from course_utils.machinery import claims
from course_utils.machinery.build import REPLICATIONS
from course_utils.machinery.cli import main
from tests.conftest import ROOT

GOOD = dict(
    paper="Elhage et al. 2022, fig. 1",
    quantity="norm ratio of 5 features in 2 dimensions",
    paper_value="1.0 (regular pentagon)",
    paper_setting="n=5, m=2, 1-S=0.05",
    ours="1.04",
    our_setting="same, 1-S=0.05",
    sample="3 sparsities, best of 10 instances",
    baseline="dense: 2 features kept",
    same_quantity="yes",
    verdict="replicated",
)


def test_a_complete_record_passes_and_round_trips():
    record = claims.make_claim("01", "pentagon", **GOOD)
    assert claims.claim("01", "pentagon", **GOOD) is None  # a notebook's last line shows no repr
    assert record.problems() == []
    assert claims.Claim.from_json(json.loads(json.dumps(record.to_json()))) == record


@pytest.mark.parametrize(
    "change, rule",
    [
        ({"baseline": " "}, "no baseline"),
        ({"same_quantity": "no", "differs": "per-token vs per-batch"}, "cannot replicate"),
        ({"same_quantity": "no", "verdict": "replicated in direction, not size",
          "differs": "x", "reason": "y"}, "cannot replicate"),
        ({"same_quantity": "partly"}, "say what differs"),
        ({"verdict": "not at our budget", "reason": "gap stays", "budgets_tried": ("300 steps",)},
         "two budgets"),
        ({"verdict": "differs"}, "needs what it rests on"),
        ({"paper": ""}, "paper is empty"),
        ({"verdict": "kind of"}, "verdict must be one of"),
        ({"same_quantity": "maybe"}, "same_quantity must be one of"),
        ({"sample": ""}, "sample is empty"),
        ({"verdict": "differs", "reason": "the gap is 0.3"}, "needs differs_kind"),
        ({"verdict": "differs", "reason": "x", "differs_kind": "kind of"}, "needs differs_kind"),
        ({"differs_kind": "contradicts"}, "only for verdict 'differs'"),
        ({"same_quantity": "no", "differs": "x", "verdict": "differs", "reason": "y",
          "differs_kind": "contradicts"}, "cannot contradict"),
        ({"verdict": "replicated in direction, not size",
          "reason": "an independent review (issue 25) measured 0.9"}, "provisional"),
        ({"verdict": "differs", "differs_kind": "inconclusive",
          "reason": "seeds run outside the notebook disagree"}, "provisional"),
        ({"verdict": "not at our budget", "reason": "gap stays",
          "budgets_tried": ("256 latents", "depth 3")}, "not a width or a depth"),
        ({"kind": "identity"}, "kind must be one of"),
        ({"kind": "check", "verdict": "differs", "differs_kind": "inconclusive", "reason": "r"},
         "a check either holds"),
    ],
)  # fmt: skip
def test_each_checklist_rule_rejects_its_record(change, rule):
    with pytest.raises(claims.ClaimError, match=rule):
        claims.make_claim("01", "bad", **{**GOOD, **change})


def test_the_rules_accept_what_they_allow():
    not_at_budget = dict(
        verdict="not at our budget",
        reason="the gap stays at 0.1 nats",
        budgets_tried=["300 steps", "1200 steps"],
    )
    claims.make_claim("08", "gap", **{**GOOD, **not_at_budget})
    claims.make_claim("03", "x", **{**GOOD, "same_quantity": "no", "differs": "zero-ablates the "
                 "residual, not the MLP", "verdict": "differs", "reason": "other baseline",
                 "differs_kind": "not comparable"})  # fmt: skip
    for kind in claims.DIFFERS_KINDS:
        claims.make_claim("01", kind, **{**GOOD, "verdict": "differs", "reason": "r",
                                         "differs_kind": kind})  # fmt: skip
    provisional = claims.make_claim("06", "p", **{**GOOD, "verdict": "differs",
        "differs_kind": "inconclusive", "reason": "a review (issue 25) measured 0.61",
        "provisional": "issue 25's measurement on 150 random features"})  # fmt: skip
    assert "differs: inconclusive [PROVISIONAL: issue 25's" in provisional.markdown()
    claims.make_claim("03", "no-paper-number", **{**GOOD, "paper_value": ""})


def test_an_unknown_field_is_one_clear_error():
    with pytest.raises(claims.ClaimError, match="unexpected keyword argument 'paper_valu'"):
        claims.make_claim("01", "typo", paper_valu="1", **{k: v for k, v in GOOD.items()})


def _executed_notebook(tmp_path, source: str):
    """A tiny notebook run in a real kernel, as `course execute` runs a solution."""
    from nbclient import NotebookClient

    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(source)])
    NotebookClient(nb, timeout=120, kernel_name="python3").execute()
    path = tmp_path / "nb.ipynb"
    nbformat.write(nb, path)
    return path


def test_records_live_in_the_executed_notebook_and_are_collected(tmp_path):
    source = (
        "from course_utils.machinery.claims import claim\n"
        f"claim('01', 'pentagon', **{GOOD!r})\n"
        f"claim('01', 'second', **{{**{GOOD!r}, 'ours': '1.10'}})\n"
    )
    path = _executed_notebook(tmp_path, source)
    outputs = nbformat.read(path, as_version=4).cells[0].outputs
    assert [o.output_type for o in outputs] == ["display_data", "display_data"]
    assert "text/markdown" in outputs[0].data  # what JupyterLab shows: a small table
    found = claims.collect(path)
    assert [c.key for c in found] == ["pentagon", "second"] and found[1].ours == "1.10"


def test_every_recorded_claim_in_the_course_passes_the_checklist_and_keys_are_unique():
    for number, records in claims.collect_course(ROOT).items():
        keys = [r.key for r in records]
        assert len(keys) == len(set(keys)), f"chapter {number}: duplicate claim keys {keys}"
        for record in records:
            assert record.chapter == number, f"{record.key} is recorded in chapter {number}"
            assert record.problems() == [], (number, record.key, record.problems())


def test_replication_table_is_up_to_date():
    expected = claims.markdown_report(claims.collect_course(ROOT))
    on_disk = (ROOT / REPLICATIONS).read_text(encoding="utf-8")
    assert on_disk == expected, "docs/replications.md is stale: run `course build` and commit it"


def test_course_claims_prints_the_table(capsys):
    assert main(["claims"]) == 0
    assert "claims." in capsys.readouterr().out
    assert main(["claims", "99"]) == 2  # an unknown chapter is one clear error
    assert "unknown chapter" in capsys.readouterr().err


def test_the_report_explains_its_verdicts_and_an_empty_chapter():
    from course_utils.machinery import claims as C

    text = C.markdown_report({"00": [], "05": []})
    assert "How to read the verdicts" in text
    for verdict in C.VERDICTS:
        assert f"**{verdict}" in text or f"**{verdict.split(',')[0]}" in text, verdict
    for kind in C.DIFFERS_KINDS:
        assert f"**differs: {kind}**" in text, kind
    assert "**PROVISIONAL**" in text and "Terms used in the records" in text
    assert "puts no number beside a paper's" in text.split("## 05")[0]  # chapter 00: complete
    assert "Not recorded here yet" in text.split("## 05")[1]  # a chapter without records yet


def test_the_summary_counts_differs_kinds_and_provisional_verdicts_apart():
    records = [
        claims.make_claim("01", "a", **GOOD),
        claims.make_claim("01", "b", **{**GOOD, "verdict": "differs", "reason": "r",
                                        "differs_kind": "contradicts"}),
        claims.make_claim("02", "c", **{**GOOD, "verdict": "differs", "reason": "r",
                                        "differs_kind": "inconclusive", "provisional": "issue 24"}),
    ]  # fmt: skip
    counts = claims.summary({"01": records[:2], "02": records[2:]})
    assert counts["replicated"] == 1 and counts["differs"] == 2
    assert counts["differs: contradicts"] == 1 and counts["differs: inconclusive"] == 1
    assert counts["differs: not comparable"] == 0 and counts["provisional"] == 1
    line = claims.summary_line({"01": records})
    assert line.startswith("3 claims.") and "differs: 2 (contradicts: 1, not comparable: 0" in line
    assert "or a rebuild): 1 of 3" in line
    table = claims.markdown_report({"01": records})
    assert "| differs: contradicts — r |" in table
    assert "differs: inconclusive [PROVISIONAL: issue 24] — r" in table


def test_checks_are_counted_apart_from_claims():
    records = [
        claims.make_claim("03", "a", **GOOD),
        claims.make_claim("03", "identity", **{**GOOD, "kind": "check"}),
    ]
    counts = claims.summary({"03": records})
    assert counts["replicated"] == 1 and counts["checks"] == 1
    line = claims.summary_line({"03": records})
    assert line.startswith("1 claims.") and "1 checks" in line
    assert "| check: holds |" in claims.markdown_report({"03": records})
    assert "checks" not in claims.summary_line({"03": records[:1]})
