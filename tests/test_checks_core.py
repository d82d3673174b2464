"""The check framework itself: each kind of wrong answer gets a clear, specific message."""

from __future__ import annotations

import pytest
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


# ------------------------------------------------------------------ issue 13 helpers

from course_utils.checks.core import (  # noqa: E402
    StepRecorder,
    dependence_problem,
    frequency_problem,
    fresh_randomness_problem,
    gradient_compare,
    hooks_left,
    step_divergence,
    with_gradients,
    with_options,
)


def square_loss(x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    return scale * (x**2).sum()


@exercise("9.2", "square_loss")
def check_square_loss(learner) -> str:
    cases = [
        Case("random", (torch.arange(3.0),)),
        *with_options(Case("random", (torch.ones(2),)), scale=3.0),
    ]
    return compare_function(
        with_gradients(learner, {"x": 0}),
        with_gradients(square_loss, {"x": 0}),
        cases,
        compare=gradient_compare(),
    )


def test_options_are_exercised_and_an_ignored_option_fails():
    assert outcome(check_square_loss, square_loss) == (PASSED, "")
    status, message = outcome(check_square_loss, lambda x, scale=1.0: (x**2).sum())
    assert status == FAILED and "scale=3.0" in message


def test_a_cut_graph_is_named():
    status, message = outcome(
        check_square_loss, lambda x, scale=1.0: torch.tensor(square_loss(x, scale).item())
    )
    assert status == FAILED and "no gradient flows back to `x`" in message and ".item()" in message
    status, message = outcome(
        check_square_loss, lambda x, scale=1.0: square_loss(x.detach(), scale)
    )
    assert status == FAILED and "no gradient flows back to `x`" in message


def test_a_wrong_signature_survives_the_gradient_wrapper():
    status, message = outcome(check_square_loss, lambda y: (y**2).sum())
    assert status == FAILED and "wrong signature" in message


def linear_out(layer: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return layer(x).detach()


@exercise("9.3", "linear_out")
def check_linear_out(learner) -> str:
    layer = torch.nn.Linear(3, 2)
    return compare_function(learner, linear_out, [Case("one", (layer, torch.ones(1, 3)))])


def test_hooks_left_behind_and_changed_weights_are_caught():
    assert outcome(check_linear_out, linear_out) == (PASSED, "")

    def leaves_hook(layer, x):
        layer.register_forward_hook(lambda m, i, o: o * 2)
        return linear_out(layer, x)

    status, message = outcome(check_linear_out, leaves_hook)
    assert status == FAILED and "left a hook" in message

    def changes_weight(layer, x):
        out = linear_out(layer, x)
        with torch.no_grad():
            layer.weight.zero_()
        return out

    status, message = outcome(check_linear_out, changes_weight)
    assert status == FAILED and "changed the model's `weight`" in message
    layer = torch.nn.Linear(2, 2)
    handle = layer.register_forward_pre_hook(lambda m, i: None)
    assert hooks_left(layer) == ["Linear"]
    handle.remove()
    assert hooks_left(layer) == []


def test_only_the_right_hint_fires_when_two_mistakes_agree_on_the_failing_case():
    cases = [Case("ones", (torch.ones(2),)), Case("zeros", (torch.zeros(2),))]
    mistakes = [
        Mistake("plus one", lambda x: x + 1, "HINT-PLUS"),  # differs from 2x on ones
        Mistake("times two plus one", lambda x: 2 * x + 1, "HINT-AFFINE"),
    ]

    def learner(x):  # right on 'ones', gives 1 on 'zeros'
        return 2 * x + (x == 0).float()

    @exercise("9.4", "double2")
    def check(learner):
        return compare_function(learner, double, cases, mistakes)

    status, message = outcome(check, learner)
    # on 'zeros' both mistakes give 1, like the learner; on 'ones', which the learner passed,
    # "plus one" gives 2 (right) but "times two plus one" gives 3: only the first can be it
    assert status == FAILED and "HINT-PLUS" in message and "HINT-AFFINE" not in message


def test_step_divergence_names_step_and_cause():
    def rec(lr, norm, batch, big=None):
        return {
            "lr applied": lr,
            "grad norm": norm,
            "max |grad|": big or norm,
            "grad norms": {"w": norm},
            "batch": batch,
            "batch fingerprint": float(batch),
        }

    want = [rec(0.1, 1.0, 0), rec(0.2, 1.0, 1), rec(0.3, 1.0, 2)]
    assert step_divergence(want, want) is None
    late = [rec(0.9, 1.0, 0), rec(0.1, 1.0, 1), rec(0.2, 1.0, 2)]
    assert "one step late" in step_divergence(want, late)
    reused = [rec(0.1, 1.0, 0), rec(0.2, 1.0, 0), rec(0.3, 1.0, 0)]
    assert "reused" in step_divergence(want, reused)
    zeroed = [rec(0.1, 0.0, 0)] + want[1:]
    assert "between backward() and step()" in step_divergence(want, zeroed)
    clipped = [rec(0.1, 0.5, 0)] + want[1:]
    by_value = [rec(0.1, 1.4, 0, big=0.5)] + want[1:]
    assert "by VALUE" in step_divergence([clipped[0]] + want[1:], by_value, grad_clip=0.5)
    assert "not clipped" in step_divergence(clipped, want, grad_clip=0.5)
    assert "never called" in step_divergence(want, [])


def _recorded_clipping(clip: str, grad_clip: float, scale: float) -> list[dict]:
    """Three Adam steps on one weight vector, with its gradient clipped as ``clip`` says."""
    w = torch.nn.Parameter(torch.linspace(-1.0, 1.0, 8))
    opt = torch.optim.Adam([w], lr=0.1)
    recorder = StepRecorder({id(w): "w"})
    with recorder:
        for t in range(3):
            x = recorder.saw(torch.full((8,), float(t + 1)))
            opt.zero_grad()
            (scale * (w * x).pow(2)).sum().backward()
            if clip == "norm":
                torch.nn.utils.clip_grad_norm_([w], grad_clip)
            elif clip == "value":
                torch.nn.utils.clip_grad_value_([w], grad_clip)
            opt.step()
            if clip == "after step":
                torch.nn.utils.clip_grad_norm_([w], grad_clip)
    return recorder.steps


@pytest.mark.parametrize("scale", [0.2, 1.0], ids=["entries below grad_clip", "above"])
def test_only_a_gradient_clipped_by_value_is_said_to_be(scale):
    """Clipping by value is named only when it left its mark (entries at exactly grad_clip); an
    unclipped gradient, or one clipped after the step, is "not clipped" even when every entry is
    small (a newcomer's browser run of chapter 04: all three were told "by VALUE")."""
    grad_clip = 0.5
    want = _recorded_clipping("norm", grad_clip, scale)
    assert step_divergence(want, _recorded_clipping("norm", grad_clip, scale), grad_clip) is None
    for wrong in ("none", "after step", "value"):
        got = _recorded_clipping(wrong, grad_clip, scale)
        message = step_divergence(want, got, grad_clip)
        bit = wrong == "value" and scale == 1.0  # entries above grad_clip: clip_grad_value_ bites
        assert message is not None and message.startswith("at step 0"), (wrong, message)
        assert ("by VALUE" in message) == bit, (wrong, message)
        assert ("not clipped before the step" in message) == (not bit), (wrong, message)


def test_step_recorder_sees_every_optimizer_step():
    w = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.SGD([w], lr=0.5)
    recorder = StepRecorder({id(w): "w"})
    with recorder:
        for t in range(2):
            x = recorder.saw(torch.full((3,), float(t + 1)))
            opt.zero_grad()
            (w * x).sum().backward()
            opt.step()
    assert [s["batch"] for s in recorder.steps] == [0, 1]
    assert abs(recorder.steps[1]["grad norms"]["w"] - 2 * 3**0.5) < 1e-6
    opt.step()  # outside the recorder: not recorded
    assert len(recorder.steps) == 2


def test_statistical_helpers():
    n = 10_000
    g = torch.Generator().manual_seed(0)
    a = (torch.rand(n, 4, generator=g) < 0.3).double()
    b = (torch.rand(n, 4, generator=g) < 0.3).double()
    assert frequency_problem("f", a.mean(0), b.mean(0), n, n_expected=n) is None
    assert "f at [0]" in frequency_problem("f", a.mean(0) * 0 + 0.5, b.mean(0), n, n_expected=n)
    shared = a[:, :1].expand(n, 4)
    assert dependence_problem("masks", b, a, str) is None
    assert "correlation" in dependence_problem("masks", b, shared, str)
    assert fresh_randomness_problem(lambda k: torch.rand(k), 5) is None
    assert "same batch" in fresh_randomness_problem(
        lambda k: torch.rand(k, generator=torch.Generator().manual_seed(0)), 5
    )


def test_mismatch_names_dtype_and_shape():
    message = mismatch(torch.zeros(2, 3), torch.ones(2, 3), 1e-6, 0)
    assert "(2, 3)" in message and "float32" in message
    assert "float" in mismatch(torch.zeros(2), torch.zeros(2, dtype=torch.long), 1e-6, 0)
