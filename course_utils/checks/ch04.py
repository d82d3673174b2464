"""Checks for chapter 04, end-to-end SAEs (Braun et al. 2024).

References live in :mod:`course_utils.science.e2e_saes`.
"""

from __future__ import annotations

import copy
import functools

import torch

from course_utils.checks.core import (
    Case,
    CheckFailed,
    Mistake,
    StepRecorder,
    compare_differentiable,
    compare_function,
    exercise,
    lifted_mistakes,
    step_divergence,
)
from course_utils.checks.core import mismatch as _mismatch
from course_utils.science import e2e_saes as E


def _differentiable(learner, reference, cases, mistakes, wrt, what, presence=("c",)) -> str:
    return compare_differentiable(learner, reference, cases, mistakes, wrt, what, presence)


HOOK = "blocks.1.hook_resid_pre"
DOWNSTREAM = ("blocks.1.hook_resid_mid", "blocks.1.hook_resid_post")


def _g(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@functools.lru_cache(maxsize=1)
def _tiny_parts():
    from course_utils.science.models import random_tokens, tiny_random_model

    model = tiny_random_model(seed=0).requires_grad_(False)  # frozen, as in training
    sae = E.E2ESAE(model.cfg.d_model, 48, seed=1)
    with torch.no_grad():
        sae.b_enc.fill_(0.05)
    return model, sae, random_tokens(model, batch=3, seq=10, seed=2)


def _tiny():
    model, sae, tokens = _tiny_parts()
    return copy.deepcopy(model), copy.deepcopy(sae), tokens.clone()


# ---------------------------------------------------------------- 2.1 splice


def _grad_pattern(out) -> list[bool]:
    logits, c, ds = out
    return [bool(logits.requires_grad), bool(c.requires_grad)] + [bool(t.requires_grad) for t in ds]


def _compare_splice(expected, actual) -> str | None:
    problem = _mismatch(expected, actual, 1e-4, 1e-4)
    if problem:
        return problem
    want, got = _grad_pattern(expected), _grad_pattern(actual)
    if want != got:
        names = ["logits", "c"] + [f"downstream[{i}]" for i in range(len(want) - 2)]
        cut = [n for n, w, g in zip(names, want, got, strict=True) if w and not g]
        return (
            f"the values are right but no gradient flows from {', '.join(cut)} back to the SAE "
            "(requires_grad is False), so training could not move the SAE."
        )
    return None


def _no_grad_splice(model, sae, tokens, hook_name, downstream_hooks=()):
    with torch.no_grad():
        return E.splice_sae(model, sae, tokens, hook_name, downstream_hooks)


def _detached_output(model, sae, tokens, hook_name, downstream_hooks=()):
    store = {}

    def splice(act, hook):
        store["c"] = sae.encode(act)
        return sae.decode(store["c"]).detach()

    def record(act, hook):
        store[hook.name] = act

    logits = model.run_with_hooks(
        tokens, fwd_hooks=[(hook_name, splice)] + [(n, record) for n in downstream_hooks]
    )
    return logits, store["c"], [store[n] for n in downstream_hooks]


def _clean_downstream(model, sae, tokens, hook_name, downstream_hooks=()):
    logits, c, _ = E.splice_sae(model, sae, tokens, hook_name, ())
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens)
    return logits, c, [cache[n] for n in downstream_hooks]


def _hook_returns_nothing(model, sae, tokens, hook_name, downstream_hooks=()):
    store = {}

    def splice(act, hook):
        store["c"] = sae.encode(act)

    def record(act, hook):
        store[hook.name] = act

    logits = model.run_with_hooks(
        tokens, fwd_hooks=[(hook_name, splice)] + [(n, record) for n in downstream_hooks]
    )
    return logits, store["c"], [store[n] for n in downstream_hooks]


def _execution_order(model, sae, tokens, hook_name, downstream_hooks=()):
    store: dict = {}

    def splice(act, hook):
        store["c"] = sae.encode(act)
        return sae.decode(store["c"])

    def record(act, hook):
        store[hook.name] = act

    logits = model.run_with_hooks(
        tokens, fwd_hooks=[(hook_name, splice)] + [(n, record) for n in downstream_hooks]
    )
    c = store.pop("c")
    return logits, c, list(store.values())


def _unnormalised_decoder(model, sae, tokens, hook_name, downstream_hooks=()):
    store: dict = {}

    def splice(act, hook):
        store["c"] = sae.encode(act)
        return store["c"] @ sae.W_dec + sae.b_dec

    def record(act, hook):
        store[hook.name] = act

    logits = model.run_with_hooks(
        tokens, fwd_hooks=[(hook_name, splice)] + [(n, record) for n in downstream_hooks]
    )
    return logits, store["c"], [store[n] for n in downstream_hooks]


def _bos_not_spliced(model, sae, tokens, hook_name, downstream_hooks=()):
    store: dict = {}

    def splice(act, hook):
        store["c"] = sae.encode(act)
        out = sae.decode(store["c"])
        return torch.cat([act[:, :1], out[:, 1:]], dim=1)

    def record(act, hook):
        store[hook.name] = act

    logits = model.run_with_hooks(
        tokens, fwd_hooks=[(hook_name, splice)] + [(n, record) for n in downstream_hooks]
    )
    return logits, store["c"], [store[n] for n in downstream_hooks]


SPLICE_MISTAKES = [
    Mistake(
        "no splice",
        _hook_returns_nothing,
        "the logits are the clean model's: the splicing hook must *return* sae.decode(c).",
    ),
    Mistake(
        "downstream from the clean run",
        _clean_downstream,
        "record the downstream activations in the *spliced* run (add recording hooks to the "
        "same run_with_hooks call), not from a clean run.",
    ),
    Mistake(
        "run under no_grad",
        _no_grad_splice,
        "do not wrap the spliced run in torch.no_grad(): the e2e loss needs gradients through "
        "the frozen model back to the SAE.",
    ),
    Mistake(
        "reconstruction detached",
        _detached_output,
        "you detached the SAE's output: the KL gradient must reach the SAE through it. (Detaching "
        "the *input* activation is harmless; the model is frozen.)",
    ),
    Mistake(
        "downstream activations in execution order",
        _execution_order,
        "return the downstream activations in the order of downstream_hooks as requested "
        "([store[name] for name in downstream_hooks]), not in the order the forward pass "
        "reached them.",
    ),
    Mistake(
        "decoder not normalised",
        _unnormalised_decoder,
        "use sae.decode(c): it divides each W_dec row by its norm on every call, so c @ W_dec "
        "+ b_dec is not the SAE's reconstruction.",
    ),
    Mistake(
        "BOS left un-spliced",
        _bos_not_spliced,
        "splice at every position, BOS included: the hook returns sae.decode(c) for the whole "
        "[batch, pos, d_in] activation.",
    ),
]


def _splice_cases() -> list[Case]:
    model, sae, tokens = _tiny()
    return [
        Case("tiny model with two downstream hooks", (model, sae, tokens, HOOK, DOWNSTREAM)),
        Case("batch of one and no downstream hooks", (model, sae, tokens[:1], HOOK, ())),
        Case("splice at layer 0", (model, sae, tokens, "blocks.0.hook_resid_post", DOWNSTREAM)),
        Case(
            "downstream hooks requested in reverse order",
            (model, sae, tokens, "blocks.0.hook_resid_post", DOWNSTREAM[::-1]),
        ),
    ]


@exercise("2.1", "splice_sae")
def splice_sae(learner) -> str:
    return compare_function(
        learner, E.splice_sae, _splice_cases(), SPLICE_MISTAKES, compare=_compare_splice
    )


# ---------------------------------------------------------------- 2.2 KL


def _kl_reversed(new_logits, orig_logits):
    return E.kl_spliced_vs_original(orig_logits, new_logits)


def _kl_per_sequence(new_logits, orig_logits):
    log_p, log_q = orig_logits.log_softmax(-1), new_logits.log_softmax(-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1).sum(-1).mean()


def _kl_mean_over_vocab(new_logits, orig_logits):
    log_p, log_q = orig_logits.log_softmax(-1), new_logits.log_softmax(-1)
    return (log_p.exp() * (log_p - log_q)).mean()


def _kl_raw_logits(new_logits, orig_logits):
    p = orig_logits.softmax(-1)
    return (p * (orig_logits - new_logits)).sum(-1).mean()


def _kl_softmax_log(new_logits, orig_logits):
    p, q = orig_logits.softmax(-1), new_logits.softmax(-1)
    return (p * (p.log() - q.log())).sum(-1).mean()


KL_MISTAKES = [
    Mistake(
        "softmax then log",
        _kl_softmax_log,
        "with confident logits softmax underflows to exactly 0, and log(0) = -inf turns the KL "
        "into NaN/inf. Use `log_softmax(-1)` (as the text says): it stays finite.",
    ),
    Mistake(
        "wrong direction",
        _kl_reversed,
        "KL is not symmetric: the library computes KL(p_original || p_spliced) = "
        "sum p_orig (log p_orig - log p_spliced), weighting by the *original* probabilities.",
    ),
    Mistake(
        "per-sequence averaging",
        _kl_per_sequence,
        "average the per-token KL over batch *and* position (mean over both), do not sum over "
        "positions first.",
    ),
    Mistake(
        "mean over the vocabulary too",
        _kl_mean_over_vocab,
        "sum over the vocabulary (that is the KL of one token), then average over tokens "
        "(F.kl_div's reduction='mean' makes this mistake; 'batchmean' on [tokens, vocab] does not).",
    ),
    Mistake(
        "logits used as log-probabilities",
        _kl_raw_logits,
        "take log_softmax of both logits before subtracting: raw logits are not log-probabilities.",
    ),
]


def _kl_cases() -> list[Case]:
    g = _g(11)
    orig = torch.randn(2, 5, 13, generator=g) * 2
    new = orig + torch.randn(2, 5, 13, generator=g)
    shifted = orig.clone()
    shifted[..., 0] += 3.0
    return [
        Case("seeded random", (new, orig)),
        Case("one changed logit", (shifted, orig)),
        Case("batch of one", (new[:1], orig[:1])),
        Case("identical logits", (orig, orig)),
        Case("confident logits (softmax underflows)", (new * 60, orig * 60)),
    ]


@exercise("2.2", "kl_spliced_vs_original")
def kl_spliced_vs_original(learner) -> str:
    return _differentiable(
        learner,
        E.kl_spliced_vs_original,
        _kl_cases(),
        KL_MISTAKES,
        {"new_logits": 0},
        "new_logits (the KL stays differentiable)",
    )


# ---------------------------------------------------------------- 2.3 local loss


def _l1_over_d_sae(x, x_hat, c, lam):
    return (x_hat - x).pow(2).mean() + lam / c.shape[-1] * c.abs().sum(-1).mean()


def _summed_mse(x, x_hat, c, lam):
    return (x_hat - x).pow(2).sum(-1).mean() + E.sparsity_penalty(c, lam, x.shape[-1])


def _phi_is_lambda(x, x_hat, c, lam):
    return (x_hat - x).pow(2).mean() + lam * c.abs().sum(-1).mean()


def _l1_summed_over_tokens(x, x_hat, c, lam):
    return (x_hat - x).pow(2).mean() + lam / x.shape[-1] * c.abs().sum()


def _l1_as_mean(x, x_hat, c, lam):
    return (x_hat - x).pow(2).mean() + lam / x.shape[-1] * c.abs().mean()


LOCAL_MISTAKES = [
    Mistake(
        "L1 divided by the dictionary size",
        _l1_over_d_sae,
        "phi = lambda / d with d the *input* dimension (x.shape[-1]), not the dictionary size: "
        "with d_sae the penalty would change when you change the dictionary size.",
    ),
    Mistake(
        "summed MSE",
        _summed_mse,
        "the library's MSE is an element mean, ((x_hat - x) ** 2).mean(): also divided by d.",
    ),
    Mistake(
        "phi = lambda",
        _phi_is_lambda,
        "the sparsity coefficient is phi = lambda / d_in, not lambda itself.",
    ),
    Mistake(
        "L1 summed over tokens",
        _l1_summed_over_tokens,
        "sum |c| over the dictionary for each token, then *average* over tokens.",
    ),
    Mistake(
        "L1 as c.abs().mean()",
        _l1_as_mean,
        "c.abs().mean() averages |c| over the dictionary as well as the tokens, so it divides "
        "each token's L1 norm by d_sae: the L1 norm of a token's code is the *sum* over the "
        "dictionary, c.abs().sum(-1), and that is what you average over tokens.",
    ),
]


def _local_cases() -> list[Case]:
    g = _g(12)
    x = torch.randn(6, 8, generator=g)
    x_hat = x + 0.3 * torch.randn(6, 8, generator=g)
    c = torch.relu(torch.randn(6, 20, generator=g))
    one = torch.zeros(1, 20)
    one[0, 3] = 2.0
    return [
        Case("seeded random", (x, x_hat, c, 2.0)),
        Case(
            "batch and position axes",
            (x.reshape(2, 3, 8), x_hat.reshape(2, 3, 8), c.reshape(2, 3, 20), 0.5),
        ),
        Case("one active latent", (x[:1], x_hat[:1], one, 4.0)),
    ]


@exercise("2.3", "loss_local")
def loss_local(learner) -> str:
    return _differentiable(
        learner, E.loss_local, _local_cases(), LOCAL_MISTAKES, {"x_hat": 1, "c": 2}, "x_hat and c"
    )


# ---------------------------------------------------------------- 2.4 e2e loss


E2E_MISTAKES = [
    Mistake(
        "KL in the wrong direction",
        lambda new_logits, orig_logits, c, lam, d_in: (
            E.kl_spliced_vs_original(orig_logits, new_logits) + E.sparsity_penalty(c, lam, d_in)
        ),
        "KL(p_original || p_spliced): pass (new_logits, orig_logits) to your KL in that order.",
    ),
    Mistake(
        "L1 divided by the dictionary size",
        lambda new_logits, orig_logits, c, lam, d_in: (
            E.kl_spliced_vs_original(new_logits, orig_logits)
            + lam / c.shape[-1] * c.abs().sum(-1).mean()
        ),
        "phi = lambda / d_in (the input dimension you were given), not lambda / d_sae.",
    ),
    Mistake(
        "no sparsity term",
        lambda new_logits, orig_logits, c, lam, d_in: E.kl_spliced_vs_original(
            new_logits, orig_logits
        ),
        "add the sparsity penalty (lambda / d_in) * mean over tokens of ||c||_1.",
    ),
]


def _e2e_cases() -> list[Case]:
    g = _g(13)
    orig = torch.randn(2, 4, 9, generator=g)
    new = orig + torch.randn(2, 4, 9, generator=g)
    c = torch.relu(torch.randn(2, 4, 24, generator=g))
    return [
        Case("seeded random", (new, orig, c, 1.5, 8)),
        Case("lambda zero", (new, orig, c, 0.0, 8)),
        Case("batch of one", (new[:1], orig[:1], c[:1], 3.0, 16)),
    ]


@exercise("2.4", "loss_e2e")
def loss_e2e(learner) -> str:
    return _differentiable(
        learner,
        E.loss_e2e,
        _e2e_cases(),
        E2E_MISTAKES,
        {"new_logits": 0, "c": 2},
        "new_logits and c",
    )


# ---------------------------------------------------------------- 2.5 e2e + downstream loss


def _ds_variant(spread=True, summed=False, kl_coeff_used=True, extra_count=0, kl_coeff_on="kl"):
    """``kl_coeff_on``: which terms kl_coeff multiplies ("kl", "kl+sparsity" or "all")."""

    def loss(
        new_logits, orig_logits, c, lam, d_in, new_downstream, orig_downstream, beta, kl_coeff=0.5
    ):
        n = len(new_downstream)
        if summed:
            mse = sum(
                (a - b).pow(2).sum(-1).mean()
                for a, b in zip(new_downstream, orig_downstream, strict=False)
            )
        else:
            mse = sum(
                (a - b).pow(2).mean() for a, b in zip(new_downstream, orig_downstream, strict=False)
            )
        weight = beta / (n + extra_count) if spread else beta
        kl = E.kl_spliced_vs_original(new_logits, orig_logits)
        sparsity = E.sparsity_penalty(c, lam, d_in)
        if kl_coeff_on == "kl+sparsity":
            return kl_coeff * (kl + sparsity) + weight * mse
        if kl_coeff_on == "all":
            return kl_coeff * (kl + sparsity + weight * mse)
        return (kl_coeff if kl_coeff_used else 1.0) * kl + sparsity + (weight * mse)

    return loss


_KL_COEFF_ONLY_ON_KL = (
    "kl_coeff multiplies the KL term only: kl_coeff * KL + (lambda / d_in) * L1 + (beta / n) * "
    "sum of the MSEs. The sparsity term and the downstream MSEs keep their own coefficients."
)

DS_MISTAKES = [
    Mistake(
        "beta not spread over the downstream hooks",
        _ds_variant(spread=False),
        "divide beta evenly over the n downstream hooks: beta / n with n = len(new_downstream).",
    ),
    Mistake(
        "summed MSE",
        _ds_variant(summed=True),
        "each downstream MSE is an element mean, ((a_hat - a) ** 2).mean(), as in the library.",
    ),
    Mistake(
        "KL coefficient ignored",
        _ds_variant(kl_coeff_used=False),
        "multiply the KL term by kl_coeff (0.5 in the paper's e2e+ds runs).",
    ),
    Mistake(
        "beta over one hook too many",
        _ds_variant(extra_count=1),
        "n counts the downstream hooks only: divide beta by len(new_downstream).",
    ),
    Mistake(
        "kl_coeff on the sparsity term too",
        _ds_variant(kl_coeff_on="kl+sparsity"),
        _KL_COEFF_ONLY_ON_KL,
    ),
    Mistake("kl_coeff on the whole loss", _ds_variant(kl_coeff_on="all"), _KL_COEFF_ONLY_ON_KL),
]


def _ds_cases() -> list[Case]:
    g = _g(14)
    orig = torch.randn(2, 4, 9, generator=g)
    new = orig + torch.randn(2, 4, 9, generator=g)
    c = torch.relu(torch.randn(2, 4, 24, generator=g))
    a = [torch.randn(2, 4, 8, generator=g) for _ in range(3)]
    a_hat = [
        t + torch.randn(2, 4, 8, generator=g) * s for t, s in zip(a, (0.5, 1.0, 2.0), strict=False)
    ]
    return [
        Case("two downstream hooks", (new, orig, c, 1.0, 8, a_hat[:2], a[:2], 2.5)),
        Case(
            "three hooks and kl_coeff 1", (new, orig, c, 2.0, 8, a_hat, a, 0.05), {"kl_coeff": 1.0}
        ),
        Case("one hook", (new, orig, c, 0.5, 8, a_hat[2:], a[2:], 10.0)),
    ]


@exercise("2.5", "loss_e2e_ds")
def loss_e2e_ds(learner) -> str:
    return _differentiable(
        learner,
        E.loss_e2e_ds,
        _ds_cases(),
        DS_MISTAKES,
        {"new_logits": 0, "c": 2, "new_downstream": 5},
        "new_logits, c and every new_downstream",
    )


# ---------------------------------------------------------------- 2.6 training loop

TRAIN_STEPS = 4


def _train_config(variant: str) -> E.TrainConfig:
    return E.TrainConfig(
        variant,
        2.0,
        HOOK,
        DOWNSTREAM,
        beta=2.5,
        kl_coeff=0.7,  # not the default 0.5: a loop must pass cfg.kl_coeff on
        lr=1e-2,
        steps=TRAIN_STEPS,
        warmup_steps=2,
        min_lr_frac=0.3,  # not the default 0.1: a loop must pass cfg.min_lr_frac on
        log_every=1,
    )


def _batches(seed: int):
    from course_utils.science.models import random_tokens

    model, _, _ = _tiny_parts()
    items = [random_tokens(model, batch=2, seq=8, seed=seed + i) for i in range(TRAIN_STEPS)]
    it = iter(items)
    return lambda: next(it)


NAN_CASE, CLIP_CASE = "nan", "clip"


def _run_training(train_fn):
    def run(variant: str, special: str = "") -> dict:
        from dataclasses import replace

        from course_utils.science.models import tiny_random_model

        model = tiny_random_model(seed=0)  # fresh: requires_grad is True, as loaded
        before = {k: v.clone() for k, v in model.state_dict().items()}
        sae = E.E2ESAE(model.cfg.d_model, 48, seed=3)
        cfg = _train_config(variant)
        if special == NAN_CASE:
            with torch.no_grad():
                sae.W_enc[0, 0] = float("nan")  # the loss is NaN from the first step
            try:
                train_fn(model, sae, cfg, _batches(20))
            except Exception as error:  # which exception stopped the run (if any)
                return {"the run stopped with": type(error).__name__}
            return {"the run stopped with": "nothing (it ran to the end)"}
        if special == CLIP_CASE:
            # so small that clipping freezes Adam's updates (the gradients fall below its eps)
            cfg = replace(cfg, grad_clip=1e-9)
        recorder = StepRecorder({id(p): n for n, p in sae.named_parameters()})
        draw = _batches(20)
        with recorder:
            returned = train_fn(model, sae, cfg, lambda: recorder.saw(draw()))
        grads = sum(p.grad is not None for p in model.parameters())
        changed = sum(not torch.equal(v, model.state_dict()[k]) for k, v in before.items())
        state = {k: v.detach().clone() for k, v in sae.state_dict().items()}
        return {
            **state,
            "model parameters with a .grad": grads,
            "model tensors changed": changed,
            "steps": (recorder.steps, cfg.grad_clip),
            "returned losses": _losses_of(returned),
        }

    return run


def _reference_train(model, sae, cfg, batches):
    return E.train_sae(model, sae, cfg, batches, progress=False)


def _not_frozen(model, sae, cfg, batches):
    """The reference loop without freezing: gradients pile up in the model's .grad."""
    model.requires_grad_(True)
    original = E.freeze
    try:
        E.freeze = lambda m: m  # type: ignore[assignment]
        original_assert = E._assert_frozen
        E._assert_frozen = lambda m: None  # type: ignore[assignment]
        return E.train_sae(model, sae, cfg, batches, progress=False)
    finally:
        E.freeze = original  # type: ignore[assignment]
        E._assert_frozen = original_assert  # type: ignore[assignment]


def _manual_loop(
    zero_grad=True,
    schedule=True,
    clip="before step",
    nan_check=True,
    late_lr=False,
    zero_grad_between=False,
    reuse_batch=False,
):
    def train(model, sae, cfg, batches):
        model.requires_grad_(False)
        opt = torch.optim.Adam(sae.parameters(), lr=cfg.lr)
        tokens = batches() if reuse_batch else None
        losses = []
        for step in range(cfg.steps):
            tokens = tokens if reuse_batch else batches()
            rate = E.lr_at(step, cfg.steps, cfg.lr, cfg.warmup_steps, cfg.min_lr_frac)
            if schedule and not late_lr:
                for group in opt.param_groups:
                    group["lr"] = rate
            loss, _ = E.sae_loss(model, sae, tokens, cfg)
            if nan_check and not torch.isfinite(loss):
                raise E.TrainingDiverged(f"the loss became {loss.item()} at step {step}")
            if zero_grad and not zero_grad_between:
                opt.zero_grad()
            loss.backward()
            if zero_grad_between:
                opt.zero_grad()
            if clip == "before step":
                torch.nn.utils.clip_grad_norm_(sae.parameters(), cfg.grad_clip)
            elif clip == "by value":
                torch.nn.utils.clip_grad_value_(sae.parameters(), cfg.grad_clip)
            opt.step()
            if clip == "after step":
                torch.nn.utils.clip_grad_norm_(sae.parameters(), cfg.grad_clip)
            if late_lr:
                for group in opt.param_groups:
                    group["lr"] = rate
            losses.append(loss.item())
        return losses

    return train


def _nan_to_value_error(model, sae, cfg, batches):
    """Stops on a NaN loss, but with the wrong exception."""
    try:
        return _manual_loop()(model, sae, cfg, batches)
    except E.TrainingDiverged as error:
        raise ValueError(str(error)) from None


_CLIP_HINT = (
    "clip the gradients between loss.backward() and optimizer.step(): "
    "torch.nn.utils.clip_grad_norm_(sae.parameters(), cfg.grad_clip). Without it (or after "
    "step(), when the update is already done) a very small cfg.grad_clip changes nothing."
)


def _spliced_target(model, sae, cfg, batches):
    """KL measured against a second spliced run instead of the clean model."""
    model.requires_grad_(False)
    opt = torch.optim.Adam(sae.parameters(), lr=cfg.lr)
    losses = []
    for step in range(cfg.steps):
        tokens = batches()
        for group in opt.param_groups:
            group["lr"] = E.lr_at(step, cfg.steps, cfg.lr, cfg.warmup_steps, cfg.min_lr_frac)
        clean = E.clean_run(model, tokens, cfg)
        if cfg.variant != "local":
            with torch.no_grad():
                clean["logits"] = E.splice_sae(model, sae, tokens, cfg.hook_name)[0]
        loss, _ = E.sae_loss(model, sae, tokens, cfg, clean)
        if not torch.isfinite(loss):
            raise E.TrainingDiverged(f"the loss became {loss.item()} at step {step}")
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(sae.parameters(), cfg.grad_clip)
        opt.step()
        losses.append(loss.item())
    return losses


TRAIN_MISTAKES = [
    Mistake(
        "model not frozen",
        _not_frozen,
        "gradients leaked into the frozen model (its parameters have a .grad): call "
        "model.requires_grad_(False) before training, so only the SAE gets gradients.",
    ),
    Mistake(
        "no zero_grad",
        _manual_loop(zero_grad=False),
        "call optimizer.zero_grad() every step: otherwise gradients accumulate across steps.",
    ),
    Mistake(
        "constant learning rate",
        _manual_loop(schedule=False),
        "set every param group's lr to lr_at(step, cfg.steps, cfg.lr, cfg.warmup_steps, "
        "cfg.min_lr_frac) at the start of each step (warm-up, then cosine decay).",
    ),
    Mistake(
        "KL against the spliced model",
        _spliced_target,
        "the KL target is the *original* model's logits on the same tokens (a clean run under "
        "torch.no_grad()), not a run with the SAE spliced in.",
    ),
    Mistake(
        "no NaN check",
        _manual_loop(nan_check=False),
        "the run went on with a NaN loss: right after computing the loss, check "
        "torch.isfinite(loss) (before backward()) and raise E.TrainingDiverged naming the step.",
    ),
    Mistake(
        "wrong exception on a NaN loss",
        _nan_to_value_error,
        "raise E.TrainingDiverged (not another exception) when the loss is not finite: "
        "callers catch that class.",
    ),
    Mistake("no gradient clipping", _manual_loop(clip="none"), _CLIP_HINT),
    Mistake("clipping after the step", _manual_loop(clip="after step"), _CLIP_HINT),
]


def _train_cases() -> list[Case]:
    return [
        Case("local", ("local",)),
        Case("e2e", ("e2e",)),
        Case("e2e_ds", ("e2e_ds",)),
        Case("a NaN in the SAE's W_enc (the loss is NaN)", ("e2e", NAN_CASE)),
        Case("grad_clip=1e-9 (clipping must happen)", ("local", CLIP_CASE)),
    ]


def _losses_of(returned) -> object:
    """The list of per-step losses a loop returned (the library's dict of histories counts)."""
    if isinstance(returned, dict) and "loss" in returned:
        returned = returned["loss"]
    if isinstance(returned, (list, tuple)) and all(
        isinstance(v, (int, float)) or (isinstance(v, torch.Tensor) and v.numel() == 1)
        for v in returned
    ):
        return torch.tensor([float(v) for v in returned], dtype=torch.float64)
    return returned


def _compare_training(expected, actual) -> str | None:
    if "steps" in expected and "steps" in actual:
        (want, clip), (got, _) = expected["steps"], actual["steps"]
        problem = step_divergence(want, got, grad_clip=clip)
        if problem:
            return problem
    want = {k: v for k, v in expected.items() if k not in ("steps", "returned losses")}
    got = {k: v for k, v in actual.items() if k not in ("steps", "returned losses")}
    problem = _mismatch(want, got, 1e-4, 1e-3)
    if problem or "returned losses" not in expected:
        return problem
    losses = actual["returned losses"]
    if not isinstance(losses, torch.Tensor):
        return (
            "train_sae trained correctly but returned "
            f"{type(losses).__name__}: return the list of the per-step losses (floats)"
        )
    return _mismatch(expected["returned losses"], losses, 1e-4, 1e-3, path="the returned losses")


@exercise("2.6", "train_sae")
def train_sae(learner) -> str:
    if not callable(learner):
        raise CheckFailed(f"expected a function, got {type(learner).__name__}.")
    return (
        compare_function(
            _run_training(learner),
            _run_training(_reference_train),
            _train_cases(),
            lifted_mistakes(TRAIN_MISTAKES, _run_training),
            compare=_compare_training,
        )
        + f"; {TRAIN_STEPS} steps each on a tiny model, which stayed frozen"
    )


# ---------------------------------------------------------------- 5.1 within-dictionary cosine


def _with_self(W_dec):
    unit = W_dec / W_dec.norm(dim=-1, keepdim=True)
    return (unit @ unit.T).max(-1).values


def _abs_cos(W_dec):
    unit = W_dec / W_dec.norm(dim=-1, keepdim=True)
    cos = (unit @ unit.T).abs()
    cos.fill_diagonal_(-1.0)
    return cos.max(-1).values


def _diagonal_zero(W_dec):
    unit = W_dec / W_dec.norm(dim=-1, keepdim=True)
    cos = unit @ unit.T
    cos.fill_diagonal_(0.0)
    return cos.max(-1).values


def _dots(W_dec):
    cos = W_dec @ W_dec.T
    cos.fill_diagonal_(-float("inf"))
    return cos.max(-1).values


COS_MISTAKES = [
    Mistake(
        "compared with itself",
        _with_self,
        "every element has cosine 1 with itself: exclude the diagonal (e.g. fill it with -inf) "
        "before taking the max.",
    ),
    Mistake(
        "absolute cosine",
        _abs_cos,
        "take the signed cosine: an element pointing the opposite way is not a duplicate.",
    ),
    Mistake(
        "not normalised",
        _dots,
        "normalise the rows to unit length first: cosine, not dot product.",
    ),
    Mistake(
        "diagonal set to 0",
        _diagonal_zero,
        "the diagonal was set to 0, and an element whose cosines with all the others are "
        "negative then reports that 0 as its max. Fill the diagonal with -inf "
        "(cos.fill_diagonal_(-float('inf'))) so an element's own slot can never win.",
    ),
]


def _cos_cases() -> list[Case]:
    g = _g(15)
    W = torch.randn(10, 6, generator=g) * 3
    anti = torch.randn(4, 5, generator=g)
    anti = torch.cat([anti, -anti[:1] * 2], dim=0)
    return [
        Case("seeded random", (W,)),
        Case("an antipodal pair", (anti,)),
        Case("two elements", (W[:2],)),
    ]


@exercise("5.1", "max_cosine_within")
def max_cosine_within(learner) -> str:
    return compare_function(learner, E.max_cosine_within, _cos_cases(), COS_MISTAKES)
