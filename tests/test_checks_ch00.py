"""Chapter 00's checks accept the reference and reject the stub and every plausible wrong answer."""

from __future__ import annotations

import pytest
import torch

from course_utils import basics, hooks
from course_utils.checks import ch00
from course_utils.checks.core import FAILED, outcome
from tests.check_contract import contract_tests


# Wrong answers that are not in the hint lists: the checks must still reject them.
def cosine_without_transpose(vectors, eps=1e-8):
    unit = vectors / vectors.norm(dim=-1, keepdim=True).clamp_min(eps)
    return unit * unit  # elementwise, not a matrix product


def cosine_with_large_eps(vectors, eps=1e-8):
    unit = vectors / (vectors.norm(dim=-1, keepdim=True) + 0.5)
    return unit @ unit.T


def norm_hook_keeps_grad_but_wrong_name(activation, hook, store):
    store["norm"] = activation.norm(dim=-1)


def norm_hook_mean_not_norm(activation, hook, store):
    store[hook.name] = activation.abs().mean(-1)


def ablation_without_no_grad_but_random_ablation(model, tokens, hook_name):
    noise = lambda act, hook: torch.randn_like(act)  # noqa: E731
    clean = model(tokens, return_type="loss")
    return (
        model.run_with_hooks(tokens, return_type="loss", fwd_hooks=[(hook_name, noise)]) - clean
    ).item()


def ablation_per_token_sum(model, tokens, hook_name):
    zero = lambda act, hook: torch.zeros_like(act)  # noqa: E731
    with torch.no_grad():
        clean = model(tokens, return_type="loss", loss_per_token=True).sum()
        ablated = model.run_with_hooks(
            tokens, return_type="loss", loss_per_token=True, fwd_hooks=[(hook_name, zero)]
        ).sum()
    return (ablated - clean).item()


def ablation_returns_a_tensor(model, tokens, hook_name):
    return torch.tensor(hooks.ablation_loss_change(model, tokens, hook_name))


CHECKS = [
    (
        ch00.cosine_similarity_matrix,
        basics.cosine_similarity_matrix,
        ch00.COSINE_MISTAKES,
        cosine_without_transpose,
    ),
    (
        ch00.record_norm_hook,
        hooks.record_norm_hook,
        ch00.NORM_HOOK_MISTAKES,
        norm_hook_keeps_grad_but_wrong_name,
    ),
    (
        ch00.ablation_loss_change,
        hooks.ablation_loss_change,
        ch00.ABLATION_MISTAKES,
        ablation_per_token_sum,
    ),
]
contract_tests(ch00, CHECKS, globals())


@pytest.mark.parametrize(
    "check, wrong",
    [
        (ch00.cosine_similarity_matrix, cosine_without_transpose),
        (ch00.cosine_similarity_matrix, cosine_with_large_eps),
        (ch00.record_norm_hook, norm_hook_keeps_grad_but_wrong_name),
        (ch00.record_norm_hook, norm_hook_mean_not_norm),
        (ch00.ablation_loss_change, ablation_without_no_grad_but_random_ablation),
        (ch00.ablation_loss_change, ablation_per_token_sum),
        (ch00.ablation_loss_change, ablation_returns_a_tensor),
    ],
)
def test_other_wrong_answers_are_rejected(check, wrong):
    assert outcome(check, wrong)[0] == FAILED
