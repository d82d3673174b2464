"""Chapter 00's checks accept the reference and reject the stub and every plausible wrong answer."""

from __future__ import annotations

import torch

from course_utils.checks import ch00
from course_utils.checks.core import FAILED, outcome
from course_utils.science import basics, hooks
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


# ------------------------------------------------------------ correct alternatives (issue 13)
def cosine_via_F_normalize(vectors, eps=1e-8):
    unit = torch.nn.functional.normalize(vectors, dim=-1, eps=eps)
    return unit @ unit.T


def cosine_via_einsum_and_outer_norms(vectors, eps=1e-8):
    norms = torch.linalg.vector_norm(vectors, dim=1).clamp(min=eps)
    return torch.einsum("id,jd->ij", vectors, vectors) / torch.outer(norms, norms)


def norm_hook_pow_sqrt(activation, hook, store):
    store[hook.name] = activation.pow(2).sum(dim=-1).sqrt()


def norm_hook_linalg_returns_activation(activation, hook, store):
    store[hook.name] = torch.linalg.vector_norm(activation.detach(), ord=2, dim=activation.ndim - 1)
    return activation


def ablation_add_hook_then_reset(model, tokens, hook_name):
    with torch.no_grad():
        clean = model(tokens, return_type="loss").item()
        model.add_hook(hook_name, lambda act, hook: act * 0)
        ablated = model(tokens, return_type="loss").item()
        model.reset_hooks()
    return ablated - clean


def ablation_context_manager_per_token(model, tokens, hook_name):
    with torch.no_grad():
        clean = model(tokens, return_type="loss", loss_per_token=True).mean()
        with model.hooks(fwd_hooks=[(hook_name, lambda act, hook: torch.zeros_like(act))]):
            ablated = model(tokens, return_type="loss", loss_per_token=True).mean()
    return float(ablated - clean)


CORRECT = {
    ch00.cosine_similarity_matrix: [cosine_via_F_normalize, cosine_via_einsum_and_outer_norms],
    ch00.record_norm_hook: [norm_hook_pow_sqrt, norm_hook_linalg_returns_activation],
    ch00.ablation_loss_change: [ablation_add_hook_then_reset, ablation_context_manager_per_token],
}


# ------------------------------------------------- wrong answers a learner writes (issue 13)
def cosine_eps_added(vectors, eps=1e-8):
    unit = vectors / (vectors.norm(dim=-1, keepdim=True) + eps)
    return unit @ unit.T


def cosine_zero_rows_special_cased(vectors, eps=1e-8):
    norms = vectors.norm(dim=-1, keepdim=True)
    unit = torch.where(norms > 0, vectors / norms, torch.zeros_like(vectors))
    return unit @ unit.T


def cosine_F_normalize_default_eps(vectors, eps=1e-8):
    unit = torch.nn.functional.normalize(vectors, dim=-1)
    return unit @ unit.T


def cosine_clamp_product(vectors, eps=1e-8):
    norms = vectors.norm(dim=-1)
    return (vectors @ vectors.T) / torch.outer(norms, norms).clamp_min(eps)


def cosine_no_keepdim(vectors, eps=1e-8):
    unit = vectors / vectors.norm(dim=-1).clamp_min(eps)
    return unit @ unit.T


def norm_hook_keepdim(activation, hook, store):
    store[hook.name] = activation.norm(dim=-1, keepdim=True)


def norm_hook_list(activation, hook, store):
    store.setdefault(hook.name, []).append(activation.norm(dim=-1))


def norm_hook_normalises_in_place(activation, hook, store):
    store[hook.name] = activation.norm(dim=-1)
    activation /= activation.norm(dim=-1, keepdim=True)


def norm_hook_whole_tensor(activation, hook, store):
    store[hook.name] = activation.norm()


def ablation_hook_left_behind(model, tokens, hook_name):
    with torch.no_grad():
        clean = model(tokens, return_type="loss").item()
        model.add_hook(hook_name, lambda act, hook: torch.zeros_like(act))
        return model(tokens, return_type="loss").item() - clean


def ablation_absolute_change(model, tokens, hook_name):
    return abs(hooks.ablation_loss_change(model, tokens, hook_name))


def ablation_fixed_hook(model, tokens, hook_name):
    return hooks.ablation_loss_change(model, tokens, "blocks.0.hook_mlp_out")


def ablation_ratio(model, tokens, hook_name):
    with torch.no_grad():
        clean = model(tokens, return_type="loss")
        ablated = model.run_with_hooks(
            tokens, return_type="loss", fwd_hooks=[(hook_name, lambda a, h: torch.zeros_like(a))]
        )
    return (ablated / clean).item()


def ablation_ones(model, tokens, hook_name):
    with torch.no_grad():
        clean = model(tokens, return_type="loss")
        ablated = model.run_with_hooks(
            tokens, return_type="loss", fwd_hooks=[(hook_name, lambda a, h: torch.ones_like(a))]
        )
    return (ablated - clean).item()


WRONG = {
    ch00.cosine_similarity_matrix: [
        cosine_without_transpose,
        cosine_with_large_eps,
        cosine_eps_added,
        cosine_zero_rows_special_cased,
        cosine_F_normalize_default_eps,
        cosine_clamp_product,
        cosine_no_keepdim,
    ],
    ch00.record_norm_hook: [
        norm_hook_keeps_grad_but_wrong_name,
        norm_hook_mean_not_norm,
        norm_hook_keepdim,
        norm_hook_list,
        norm_hook_normalises_in_place,
        norm_hook_whole_tensor,
    ],
    ch00.ablation_loss_change: [
        ablation_without_no_grad_but_random_ablation,
        ablation_per_token_sum,
        ablation_returns_a_tensor,
        ablation_hook_left_behind,
        ablation_absolute_change,
        ablation_fixed_hook,
        ablation_ratio,
        ablation_ones,
    ],
}
contract_tests(ch00, CHECKS, globals(), correct=CORRECT, wrong=WRONG)


def test_hook_left_behind_is_named_not_blamed_on_the_hook():
    status, message = outcome(ch00.ablation_loss_change, ablation_hook_left_behind)
    assert status == FAILED and "left a hook" in message and "return` the zeros" not in message
