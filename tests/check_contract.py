"""The contract every chapter's exercise checks must meet, as reusable pytest tests.

``checks`` rows are ``(check, reference, mistakes, extra_wrong_answer)``; for a class exercise the
reference is the class and "untouched" means its forward still raises NotImplementedError. A test
module gets the five tests (as ``test_*`` functions pytest collects) with one line:

    contract_tests(check_module, CHECKS, globals())
"""

from __future__ import annotations

import pytest

from course_utils.checks.core import FAILED, NOT_ATTEMPTED, PASSED, exercises_of, outcome, stub


def untouched(reference):
    """What the learner's untouched exercise looks like: the stub function, or for a class
    exercise the class whose forward still raises NotImplementedError."""
    if not isinstance(reference, type):
        return stub

    def forward(self, *args, **kwargs):
        raise NotImplementedError()

    return type(reference.__name__, (reference,), {"forward": forward})


def contract_tests(module, checks: list[tuple], namespace: dict | None = None) -> tuple:
    ids = [row[0].exercise.name for row in checks]
    row_params = pytest.mark.parametrize("check_fn, reference, mistakes, extra", checks, ids=ids)

    @row_params
    def test_reference_passes(check_fn, reference, mistakes, extra):
        assert outcome(check_fn, reference) == (PASSED, "")

    @row_params
    def test_stub_not_attempted(check_fn, reference, mistakes, extra):
        status, message = outcome(check_fn, untouched(reference))
        assert status == NOT_ATTEMPTED, message

    @pytest.mark.parametrize(
        "check_fn, mistake",
        [(row[0], m) for row in checks for m in row[2]],
        ids=[f"{row[0].exercise.name}: {m.name}" for row in checks for m in row[2]],
    )
    def test_every_mistake_rejected_with_its_hint(check_fn, mistake):
        status, message = outcome(check_fn, mistake.impl)
        assert status == FAILED
        assert mistake.hint in message, message

    @row_params
    def test_extra_wrong_answer_rejected(check_fn, reference, mistakes, extra):
        status, _ = outcome(check_fn, extra)
        assert status == FAILED

    def test_every_exercise_has_a_test():
        assert {e.name for e in exercises_of(module)} == set(ids)

    tests = (
        test_reference_passes,
        test_stub_not_attempted,
        test_every_mistake_rejected_with_its_hint,
        test_extra_wrong_answer_rejected,
        test_every_exercise_has_a_test,
    )
    if namespace is not None:  # the calling test module's globals(): pytest collects them there
        namespace.update({t.__name__: t for t in tests})
    return tests
