"""The check framework itself: each kind of wrong answer gets a clear, specific message."""

from __future__ import annotations

import torch

from course_utils.checks.core import (
    FAILED,
    NOT_ATTEMPTED,
    PASSED,
    Case,
    Exercise,
    Mistake,
    cmp,
    compare_function,
    exercise,
    exercises_of,
    mismatch,
    outcome,
    stub,
)


def double(x: torch.Tensor) -> torch.Tensor:
    return 2 * x


CASES = [Case("random", (torch.arange(6.0).reshape(2, 3),)), Case("zeros", (torch.zeros(1, 3),))]
MISTAKES = [Mistake("triple", lambda x: 3 * x, "you multiplied by 3")]


@exercise("9.1", "double")
def check_double(learner) -> str:
    return compare_function(learner, double, CASES, MISTAKES)


def test_reference_passes_and_stub_is_not_attempted():
    assert outcome(check_double, double) == (PASSED, "")
    status, message = outcome(check_double, stub)
    assert status == NOT_ATTEMPTED and "raise NotImplementedError()" in message


def test_known_mistake_gets_its_hint():
    status, message = outcome(check_double, lambda x: 3 * x)
    assert status == FAILED and "you multiplied by 3" in message and "case 'random'" in message


def test_unknown_wrong_answer_gets_a_diff_but_no_hint():
    status, message = outcome(check_double, lambda x: x + 1)
    assert status == FAILED and "max abs diff" in message and "Hint" not in message


def test_wrong_signature_names_both_signatures():
    status, message = outcome(check_double, lambda x, y: x)
    assert status == FAILED and "wrong signature" in message and "double(x)" in message


def test_forgotten_return():
    status, message = outcome(check_double, lambda x: None)
    assert status == FAILED and "forget to `return`" in message


def test_wrong_shape_names_both_shapes():
    status, message = outcome(check_double, lambda x: (2 * x).T)
    assert status == FAILED and "(3, 2)" in message and "(2, 3)" in message


def test_in_place_mutation_of_an_input_is_caught():
    def inplace(x):
        x *= 2
        return x

    status, message = outcome(check_double, inplace)
    assert status == FAILED and "in place" in message


def test_crash_names_the_exception_and_the_learners_line():
    def crashes(x):
        return x @ torch.ones(5)

    status, message = outcome(check_double, crashes)
    assert status == FAILED and "RuntimeError" in message and "x @ torch.ones(5)" in message


def test_passing_a_result_instead_of_a_function():
    status, message = outcome(check_double, torch.ones(2))
    assert status == FAILED and "pass the function itself" in message


def test_nan_output_is_named():
    status, message = outcome(check_double, lambda x: x / 0 * 0)
    assert status == FAILED and "NaN" in message


def test_exercises_are_listed_in_numeric_order():
    class Module:
        pass

    @exercise("1.10", "b")
    def b(learner):
        return ""

    @exercise("1.2", "a")
    def a(learner):
        return ""

    module = Module()
    module.__dict__.update(b=b, a=a)
    assert exercises_of(module) == [Exercise("1.2", "a"), Exercise("1.10", "b")]


def test_mismatch_handles_containers_and_numbers():
    assert mismatch({"a": 1.0}, {"a": 1.0}, 1e-6, 0) is None
    assert "keys" in mismatch({"a": 1.0}, {"b": 1.0}, 1e-6, 0)
    assert "is 2, expected 1" in mismatch(1.0, 2.0, 1e-6, 0)
    assert mismatch((torch.ones(2),), [torch.ones(2)], 1e-6, 0) is None


def test_cmp_reports_exact_and_approximate(capsys):
    a = torch.randn(3)
    cmp("same", a, a.clone())
    cmp("double", 2 * a + 1, a)
    cmp("shapes", a, a[:2])
    out = capsys.readouterr().out.splitlines()
    assert "exact: True " in out[0] and "approximate: False" in out[1] and "shapes differ" in out[2]
