"""Checks for chapter 00, Setup and tools."""

from __future__ import annotations

from functools import partial

import torch

from course_utils.checks.core import (
    Case,
    CheckFailed,
    Mistake,
    compare_function,
    exercise,
    lifted_mistakes,
    mismatch,
    with_options,
)
from course_utils.science.basics import cosine_similarity_matrix as ref_cosine_similarity_matrix
from course_utils.science.hooks import ablation_loss_change as ref_ablation_loss_change
from course_utils.science.hooks import record_norm_hook as ref_record_norm_hook
from course_utils.science.hooks import zero_ablation_hook
from course_utils.science.models import random_tokens, tiny_random_model

# ---------------------------------------------------------------- 0.1 cosine similarity matrix

COSINE_MISTAKES = [
    Mistake(
        "dot products, not normalised",
        lambda v, eps=1e-8: v @ v.T,
        "these are raw dot products. Divide each row by its L2 norm first.",
    ),
    Mistake(
        "normalised along the wrong dimension",
        lambda v, eps=1e-8: (
            (v / v.norm(dim=0, keepdim=True).clamp_min(1e-8))
            @ (v / v.norm(dim=0, keepdim=True).clamp_min(1e-8)).T
        ),
        "you normalised each column (dim=0); normalise each row (dim=-1) — each row is one vector.",
    ),
    Mistake(
        "L1 norm instead of L2",
        lambda v, eps=1e-8: (
            (v / v.abs().sum(-1, keepdim=True).clamp_min(1e-8))
            @ (v / v.abs().sum(-1, keepdim=True).clamp_min(1e-8)).T
        ),
        "you divided by the L1 norm (sum of |x|); cosine similarity uses the L2 norm.",
    ),
    Mistake(
        "eps ignored",
        lambda v, eps=1e-8: (
            (v / v.norm(dim=-1, keepdim=True).clamp_min(1e-8))
            @ (v / v.norm(dim=-1, keepdim=True).clamp_min(1e-8)).T
        ),
        "your result ignores the `eps` you were given: divide by `max(norm, eps)` with the "
        "argument `eps` (`.clamp_min(eps)`), not a constant of your own.",
    ),
    Mistake(
        "no guard against zero vectors",
        lambda v, eps=1e-8: (
            (v / v.norm(dim=-1, keepdim=True)) @ (v / v.norm(dim=-1, keepdim=True)).T
        ),
        "a zero vector gives 0/0 = NaN. Clamp the norm with `.clamp_min(eps)` before dividing.",
    ),
]


def _cosine_cases() -> list[Case]:
    g = torch.Generator().manual_seed(0)
    unit = torch.eye(3)
    return [
        Case("seeded random 6x5", (torch.randn(6, 5, generator=g),)),
        Case("rows of different lengths", (torch.tensor([[3.0, 4.0], [1.0, 0.0], [-2.0, 0.0]]),)),
        Case("orthonormal basis", (unit,)),
        Case("one zero vector", (torch.tensor([[1.0, 2.0, 2.0], [0.0, 0.0, 0.0]]),)),
        Case("a single vector", (torch.randn(1, 4, generator=g),)),
        # norms 0.5, 0.1 and 2: with eps=1 the two short rows are divided by 1, not their norm
        *with_options(
            Case("short rows", (torch.tensor([[0.3, 0.4], [0.1, 0.0], [0.0, 2.0]]),)), eps=1.0
        ),
    ]


@exercise("0.1", "cosine_similarity_matrix")
def cosine_similarity_matrix(learner) -> str:
    return compare_function(
        learner, ref_cosine_similarity_matrix, _cosine_cases(), COSINE_MISTAKES, atol=1e-5
    )


# ---------------------------------------------------------------- 0.2 a hook that records norms


def _return_the_norm(activation, hook, store):
    store[hook.name] = activation.norm(dim=-1)
    return store[hook.name]


NORM_HOOK_MISTAKES = [
    Mistake(
        "norm over a fixed axis 2",
        lambda activation, hook, store: store.__setitem__(hook.name, activation.norm(dim=2)),
        "take the norm over the LAST dimension (`dim=-1`): `attn.hook_z` has 4 axes "
        "(batch pos head d_head), so axis 2 is `head` there.",
    ),
    Mistake(
        "returns the norm",
        _return_the_norm,
        "your hook returned a tensor, which replaces the activation downstream (and here has the "
        "wrong shape). A recording hook must return None.",
    ),
    Mistake(
        "norm over the batch dimension",
        lambda activation, hook, store: store.__setitem__(hook.name, activation.norm(dim=0)),
        "you took the norm over dim 0 (the batch). Take it over the last dimension, `dim=-1`.",
    ),
    Mistake(
        "squared norm",
        lambda activation, hook, store: store.__setitem__(hook.name, (activation**2).sum(-1)),
        "these are squared norms. Take the square root (or use `.norm(dim=-1)`).",
    ),
    Mistake(
        "stored the activation itself",
        lambda activation, hook, store: store.__setitem__(hook.name, activation),
        "you stored the whole activation; store its L2 norm over the last dimension.",
    ),
    Mistake(
        "changes the activation",
        lambda activation, hook, store: (
            store.__setitem__(hook.name, activation.norm(dim=-1)),
            activation / activation.norm(dim=-1, keepdim=True),
        )[1],
        "your hook returned a new tensor, which replaces the activation and changes the model's "
        "output. A recording hook should return None (or the activation unchanged).",
    ),
]

NORM_HOOK_NAMES = ["blocks.0.hook_resid_post", "blocks.1.attn.hook_z", "blocks.1.mlp.hook_post"]


def _run_norm_hook(hook_fn):
    """Turn a hook into a function of (seed, hook names) -> (stored norms, logits)."""

    def run(seed: int, hook_names: list[str]):
        model = tiny_random_model(seed)
        tokens = random_tokens(model, seed=seed)
        store: dict = {}
        with torch.no_grad():
            logits = model.run_with_hooks(
                tokens, fwd_hooks=[(name, partial(hook_fn, store=store)) for name in hook_names]
            )
        return {"stored norms": store, "logits": logits}

    return run


@exercise("0.2", "record_norm_hook")
def record_norm_hook(learner) -> str:
    if not callable(learner):
        raise CheckFailed(
            "pass the hook function itself, e.g. `check.record_norm_hook(record_norm_hook)`."
        )
    cases = [
        Case("resid_post, layer 0", (0, NORM_HOOK_NAMES[:1])),
        Case("three hooks incl. 4-D attn.hook_z", (1, NORM_HOOK_NAMES)),
    ]
    return compare_function(
        _run_norm_hook(learner),
        _run_norm_hook(ref_record_norm_hook),
        cases,
        lifted_mistakes(NORM_HOOK_MISTAKES, _run_norm_hook),
        atol=1e-5,
    )


# ---------------------------------------------------------------- 0.3 zero-ablation loss change


def _mean_ablation_change(model, tokens, hook_name):
    with torch.no_grad():
        clean = model(tokens, return_type="loss")
        mean_hook = lambda act, hook: act.mean(dim=(0, 1), keepdim=True).expand_as(act)  # noqa: E731
        ablated = model.run_with_hooks(
            tokens, return_type="loss", fwd_hooks=[(hook_name, mean_hook)]
        )
    return (ablated - clean).item()


def _ablated_loss_only(model, tokens, hook_name):
    with torch.no_grad():
        return model.run_with_hooks(
            tokens, return_type="loss", fwd_hooks=[(hook_name, zero_ablation_hook)]
        ).item()


def _hook_forgets_return(model, tokens, hook_name):
    def zero_hook(activation, hook):
        torch.zeros_like(activation)  # computed, but never returned

    with torch.no_grad():
        clean = model(tokens, return_type="loss")
        ablated = model.run_with_hooks(
            tokens, return_type="loss", fwd_hooks=[(hook_name, zero_hook)]
        )
    return (ablated - clean).item()


def _float_then_compare(expected, actual):
    if not isinstance(actual, float):
        return (
            f"output is a {type(actual).__name__}; return a Python float "
            "(call `.item()` on a one-element tensor)"
        )
    return mismatch(expected, actual, atol=1e-4, rtol=1e-4)


ABLATION_MISTAKES = [
    Mistake(
        "hook forgets to return the zeros",
        _hook_forgets_return,
        "the loss did not change at all. Does your hook `return` the zeros? A hook that returns "
        "None leaves the activation as it was.",
    ),
    Mistake(
        "clean minus ablated",
        lambda model, tokens, hook_name: -ref_ablation_loss_change(model, tokens, hook_name),
        "the sign is flipped: report ablated loss minus clean loss (damage is positive).",
    ),
    Mistake(
        "returned the ablated loss itself",
        _ablated_loss_only,
        "you returned the ablated loss; subtract the clean loss to get the change.",
    ),
    Mistake(
        "mean-ablation instead of zero-ablation",
        _mean_ablation_change,
        "you replaced the activation by its mean; this exercise asks for zeros (`torch.zeros_like`).",
    ),
]


def _ablation_cases() -> list[Case]:
    model = tiny_random_model(seed=3)
    tokens = random_tokens(model, batch=3, seq=10, seed=3)
    return [
        Case("layer-0 MLP output", (model, tokens, "blocks.0.hook_mlp_out")),
        Case("layer-1 residual stream", (model, tokens, "blocks.1.hook_resid_mid")),
        Case("a batch of one", (model, tokens[:1], "blocks.0.attn.hook_z")),
    ]


@exercise("0.3", "ablation_loss_change")
def ablation_loss_change(learner) -> str:
    return compare_function(
        learner,
        ref_ablation_loss_change,
        _ablation_cases(),
        ABLATION_MISTAKES,
        compare=_float_then_compare,
    )
