"""The contract every chapter's exercise checks must meet, as reusable pytest tests.

``checks`` rows are ``(check, reference, mistakes, extra_wrong_answer)``; for a class exercise the
reference is the class and "untouched" means its forward still raises NotImplementedError.
``correct`` maps each check to at least two *different* correct implementations (not the
reference); ``wrong`` maps checks to more plausible wrong answers, written as a learner would,
that are not in the check's Mistake list. A test module gets the tests with one line:

    contract_tests(check_module, CHECKS, globals(), correct=CORRECT, wrong=WRONG)
"""

from __future__ import annotations

import inspect

import pytest

from course_utils.checks.core import (
    FAILED,
    NOT_ATTEMPTED,
    PASSED,
    _recorded,
    exercises_of,
    outcome,
    stub,
)


def untouched(reference):
    """What the learner's untouched exercise looks like: the stub function, or for a class
    exercise the class whose forward still raises NotImplementedError."""
    if not isinstance(reference, type):
        return stub

    def forward(self, *args, **kwargs):
        raise NotImplementedError()

    return type(reference.__name__, (reference,), {"forward": forward})


def _options_left_at_default(calls) -> list[str]:
    """Parameters with a default that no recorded reference call set to another value."""
    seen: dict[str, bool] = {}
    for fn, case in calls:
        try:
            sig = inspect.signature(fn)
            bound = sig.bind(*case.args, **case.kwargs)
        except (TypeError, ValueError):
            continue
        for name, param in sig.parameters.items():
            if param.default is inspect.Parameter.empty or name in ("progress",):
                continue
            value = bound.arguments.get(name, param.default)
            try:
                same = bool(value == param.default)
            except Exception:  # tensors: any explicit tensor counts as exercised
                same = False
            seen[name] = seen.get(name, False) or not same
    return sorted(name for name, exercised in seen.items() if not exercised)


def _label(fn, i: int) -> str:
    name = getattr(fn, "__name__", type(fn).__name__)
    return f"{i}:{name}"


def contract_tests(
    module,
    checks: list[tuple],
    namespace: dict | None = None,
    correct: dict | None = None,
    wrong: dict | None = None,
) -> tuple:
    ids = [row[0].exercise.name for row in checks]
    row_params = pytest.mark.parametrize("check_fn, reference, mistakes, extra", checks, ids=ids)
    correct = correct or {}
    wrong = wrong or {}

    @row_params
    def test_reference_passes(check_fn, reference, mistakes, extra):
        token = _recorded.set([])
        try:
            assert outcome(check_fn, reference) == (PASSED, "")
            calls = list(_recorded.get())
        finally:
            _recorded.reset(token)
        # class 1 of issue 13: an argument only ever tested at its default can be ignored
        assert _options_left_at_default(calls) == [], "options never set to a non-default value"

    @row_params
    def test_stub_not_attempted(check_fn, reference, mistakes, extra):
        status, message = outcome(check_fn, untouched(reference))
        assert status == NOT_ATTEMPTED, message

    @pytest.mark.parametrize(
        "check_fn, mistake, others",
        [(row[0], m, row[2]) for row in checks for m in row[2]],
        ids=[f"{row[0].exercise.name}: {m.name}" for row in checks for m in row[2]],
    )
    def test_every_mistake_rejected_with_its_own_hint_only(check_fn, mistake, others):
        status, message = outcome(check_fn, mistake.impl)
        assert status == FAILED
        assert mistake.hint in message, message
        for other in others:
            if other.hint != mistake.hint:
                assert other.hint not in message, f"{other.name}'s hint fired: {message}"

    @row_params
    def test_extra_wrong_answer_rejected(check_fn, reference, mistakes, extra):
        status, _ = outcome(check_fn, extra)
        assert status == FAILED

    @pytest.mark.parametrize(
        "check_fn, alternative",
        [(c, alt) for c, alts in correct.items() for alt in alts],
        ids=[
            f"{c.exercise.name}: {_label(a, i)}"
            for c, alts in correct.items()
            for i, a in enumerate(alts)
        ],
    )
    def test_correct_alternative_accepted(check_fn, alternative):
        assert outcome(check_fn, alternative) == (PASSED, "")

    def test_every_exercise_has_two_correct_alternatives():
        short = [row[0].exercise.name for row in checks if len(correct.get(row[0], ())) < 2]
        assert short == []

    @pytest.mark.parametrize(
        "check_fn, wrong_answer",
        [(c, w) for c, ws in wrong.items() for w in ws],
        ids=[
            f"{c.exercise.name}: {_label(w, i)}"
            for c, ws in wrong.items()
            for i, w in enumerate(ws)
        ],
    )
    def test_invented_wrong_answer_rejected(check_fn, wrong_answer):
        status, message = outcome(check_fn, wrong_answer)
        assert status == FAILED, "a wrong answer passed"

    def test_every_exercise_has_a_test():
        assert {e.name for e in exercises_of(module)} == set(ids)

    tests = (
        test_reference_passes,
        test_stub_not_attempted,
        test_every_mistake_rejected_with_its_own_hint_only,
        test_extra_wrong_answer_rejected,
        test_correct_alternative_accepted,
        test_every_exercise_has_two_correct_alternatives,
        test_invented_wrong_answer_rejected,
        test_every_exercise_has_a_test,
    )
    if namespace is not None:  # the calling test module's globals(): pytest collects them there
        namespace.update({t.__name__: t for t in tests})
    return tests
