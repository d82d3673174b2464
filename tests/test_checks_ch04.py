"""Every chapter-04 check passes the reference, flags the stub, and rejects known wrong answers."""

from __future__ import annotations

import pytest
import torch

from course_utils.checks import ch04 as check
from course_utils.checks.core import FAILED, PASSED, outcome
from course_utils.science import e2e_saes as E
from tests.check_contract import contract_tests

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest.py


def _splice_at_resid_post(model, sae, tokens, hook_name, downstream_hooks=()):
    return E.splice_sae(
        model, sae, tokens, hook_name.replace("resid_pre", "resid_mid"), downstream_hooks
    )


def _train_without_clipping_and_half_lr(model, sae, cfg, batches):
    from dataclasses import replace

    return E.train_sae(model, sae, replace(cfg, lr=cfg.lr / 2), batches, progress=False)


# (check, reference, mistakes, an extra wrong answer not in the mistakes list)
CHECKS = [
    (check.splice_sae, E.splice_sae, check.SPLICE_MISTAKES, _splice_at_resid_post),
    (
        check.kl_spliced_vs_original,
        E.kl_spliced_vs_original,
        check.KL_MISTAKES,
        lambda new_logits, orig_logits: (new_logits - orig_logits).pow(2).mean(),
    ),
    (
        check.loss_local,
        E.loss_local,
        check.LOCAL_MISTAKES,
        lambda x, x_hat, c, lam: (x_hat - x).pow(2).mean() + lam * c.abs().mean(),
    ),
    (
        check.loss_e2e,
        E.loss_e2e,
        check.E2E_MISTAKES,
        lambda new_logits, orig_logits, c, lam, d_in: (
            E.loss_e2e(new_logits, orig_logits, c, lam, d_in) * 0.5
        ),
    ),
    (
        check.loss_e2e_ds,
        E.loss_e2e_ds,
        check.DS_MISTAKES,
        lambda new_logits, orig_logits, c, lam, d_in, new_downstream, orig_downstream, beta, kl_coeff=0.5: (
            E.loss_e2e(new_logits, orig_logits, c, lam, d_in)
        ),
    ),
    (
        check.train_sae,
        check._reference_train,
        check.TRAIN_MISTAKES,
        _train_without_clipping_and_half_lr,
    ),
    (
        check.max_cosine_within,
        E.max_cosine_within,
        check.COS_MISTAKES,
        lambda W_dec: (W_dec @ W_dec.T).mean(-1),
    ),
]


# ------------------------------------------------------------ correct alternatives (issue 13)
def splice_hooks_context(model, sae, tokens, hook_name, downstream_hooks=()):
    got = {}

    def splice(act, hook):
        got["c"] = sae.encode(act)
        return sae.decode(got["c"])

    def keep(act, hook):
        got[hook.name] = act

    hooks = [(hook_name, splice)] + [(name, keep) for name in downstream_hooks]
    with model.hooks(fwd_hooks=hooks):
        logits = model(tokens)
    return logits, got["c"], [got[name] for name in downstream_hooks]


def splice_add_hook_and_reset(model, sae, tokens, hook_name, downstream_hooks=()):
    c_box, acts = [], {}
    model.add_hook(
        hook_name, lambda act, hook: sae.decode(c_box.append(sae.encode(act)) or c_box[-1])
    )
    for name in downstream_hooks:
        model.add_hook(name, lambda act, hook: acts.__setitem__(hook.name, act))
    try:
        logits = model(tokens)
    finally:
        model.reset_hooks()
    return logits, c_box[-1], [acts[n] for n in downstream_hooks]


def kl_functional(new_logits, orig_logits):
    vocab = new_logits.shape[-1]
    return torch.nn.functional.kl_div(
        new_logits.log_softmax(-1).reshape(-1, vocab),
        orig_logits.log_softmax(-1).reshape(-1, vocab),
        log_target=True,
        reduction="batchmean",
    )


def kl_einsum(new_logits, orig_logits):
    log_p = torch.log_softmax(orig_logits, dim=-1)
    log_q = torch.log_softmax(new_logits, dim=-1)
    per_token = torch.einsum("btv,btv->bt", log_p.exp(), log_p - log_q)
    return per_token.sum() / per_token.numel()


def local_functional(x, x_hat, c, lam):
    return torch.nn.functional.mse_loss(x_hat, x) + lam / x.shape[-1] * c.norm(p=1, dim=-1).mean()


def local_flat(x, x_hat, c, lam):
    d = x.shape[-1]
    c2 = c.reshape(-1, c.shape[-1])
    return ((x - x_hat) ** 2).sum() / x.numel() + (lam / d) * c2.abs().sum() / c2.shape[0]


def e2e_manual(new_logits, orig_logits, c, lam, d_in):
    return kl_einsum(new_logits, orig_logits) + lam / d_in * c.abs().sum(-1).mean()


def e2e_reuse(new_logits, orig_logits, c, lam, d_in):
    return E.kl_spliced_vs_original(new_logits, orig_logits) + E.sparsity_penalty(c, lam, d_in)


def ds_loop(
    new_logits, orig_logits, c, lam, d_in, new_downstream, orig_downstream, beta, kl_coeff=0.5
):
    mse = 0.0
    for a_hat, a in zip(new_downstream, orig_downstream, strict=False):
        mse = mse + torch.nn.functional.mse_loss(a_hat, a)
    return (
        kl_coeff * kl_functional(new_logits, orig_logits)
        + lam / d_in * c.abs().sum(-1).mean()
        + beta / len(new_downstream) * mse
    )


def ds_stack(
    new_logits, orig_logits, c, lam, d_in, new_downstream, orig_downstream, beta, kl_coeff=0.5
):
    mses = torch.stack(
        [(a - b).pow(2).mean() for a, b in zip(new_downstream, orig_downstream, strict=False)]
    )
    return (
        kl_coeff * e2e_reuse(new_logits, orig_logits, c, 0.0, d_in)
        + E.sparsity_penalty(c, lam, d_in)
        + beta * mses.mean()
    )


def cos_masked(W_dec):
    unit = torch.nn.functional.normalize(W_dec, dim=-1)
    cos = unit @ unit.T
    eye = torch.eye(len(W_dec), dtype=torch.bool)
    return cos.masked_fill(eye, float("-inf")).amax(dim=1)


def cos_loop(W_dec):
    out = []
    for i in range(len(W_dec)):
        others = torch.cat([W_dec[:i], W_dec[i + 1 :]])
        out.append(torch.nn.functional.cosine_similarity(W_dec[i : i + 1], others, dim=-1).max())
    return torch.stack(out)


CORRECT = {
    check.splice_sae: [splice_hooks_context, splice_add_hook_and_reset],
    check.kl_spliced_vs_original: [kl_functional, kl_einsum],
    check.loss_local: [local_functional, local_flat],
    check.loss_e2e: [e2e_manual, e2e_reuse],
    check.loss_e2e_ds: [ds_loop, ds_stack],
    check.train_sae: [check._manual_loop(), check._reference_train],
    check.max_cosine_within: [cos_masked, cos_loop],
}


# ------------------------------------------------- wrong answers a learner writes (issue 13)
def splice_hook_left_behind(model, sae, tokens, hook_name, downstream_hooks=()):
    store = {}

    def splice(act, hook):
        store["c"] = sae.encode(act)
        return sae.decode(store["c"])

    model.add_hook(hook_name, splice)
    with model.hooks(
        fwd_hooks=[(n, lambda a, hook: store.__setitem__(hook.name, a)) for n in downstream_hooks]
    ):
        logits = model(tokens)
    return logits, store["c"], [store[n] for n in downstream_hooks]


def splice_c_detached(model, sae, tokens, hook_name, downstream_hooks=()):
    logits, c, ds = E.splice_sae(model, sae, tokens, hook_name, downstream_hooks)
    return logits, c.detach(), ds


def kl_item_rewrapped(new_logits, orig_logits):
    return torch.tensor(E.kl_spliced_vs_original(new_logits, orig_logits).item())


def kl_detached_new(new_logits, orig_logits):
    return E.kl_spliced_vs_original(new_logits.detach(), orig_logits)


def kl_default_reduction(new_logits, orig_logits):
    return torch.nn.functional.kl_div(
        new_logits.log_softmax(-1), orig_logits.log_softmax(-1), log_target=True, reduction="mean"
    )


def local_detached(x, x_hat, c, lam):
    return E.loss_local(x, x_hat.detach(), c, lam)


def e2e_no_grad(new_logits, orig_logits, c, lam, d_in):
    with torch.no_grad():
        return E.loss_e2e(new_logits, orig_logits, c, lam, d_in)


def e2e_float(new_logits, orig_logits, c, lam, d_in):
    return torch.tensor(float(E.loss_e2e(new_logits, orig_logits, c, lam, d_in)))


def ds_kl_coeff_fixed(
    new_logits, orig_logits, c, lam, d_in, new_downstream, orig_downstream, beta, kl_coeff=0.5
):
    return E.loss_e2e_ds(
        new_logits, orig_logits, c, lam, d_in, new_downstream, orig_downstream, beta
    )


def ds_detached_downstream(
    new_logits, orig_logits, c, lam, d_in, new_downstream, orig_downstream, beta, kl_coeff=0.5
):
    return E.loss_e2e_ds(
        new_logits,
        orig_logits,
        c,
        lam,
        d_in,
        [a.detach() for a in new_downstream],
        orig_downstream,
        beta,
        kl_coeff,
    )


def ds_beta_not_divided_and_kl_full(
    new_logits, orig_logits, c, lam, d_in, new_downstream, orig_downstream, beta, kl_coeff=0.5
):
    mse = sum((a - b).pow(2).mean() for a, b in zip(new_downstream, orig_downstream, strict=False))
    return (
        E.kl_spliced_vs_original(new_logits, orig_logits)
        + E.sparsity_penalty(c, lam, d_in)
        + beta * mse
    )


def train_default_kl_coeff(model, sae, cfg, batches):
    """Forgets to pass cfg.kl_coeff (and cfg.min_lr_frac) on: the defaults 0.5 and 0.1 are used."""
    from dataclasses import replace

    return E.train_sae(
        model, sae, replace(cfg, kl_coeff=0.5, min_lr_frac=0.1), batches, progress=False
    )


def train_returns_nothing(model, sae, cfg, batches):
    check._manual_loop()(model, sae, cfg, batches)


def train_returns_tensors_of_the_graph(model, sae, cfg, batches):
    return (
        [torch.tensor(0.0) for _ in range(cfg.steps)]
        if check._manual_loop()(model, sae, cfg, batches)
        else None
    )


WRONG = {
    check.splice_sae: [splice_hook_left_behind, splice_c_detached, _splice_at_resid_post],
    check.kl_spliced_vs_original: [kl_item_rewrapped, kl_detached_new, kl_default_reduction],
    check.loss_local: [local_detached, CHECKS[2][3]],
    check.loss_e2e: [e2e_no_grad, e2e_float, CHECKS[3][3]],
    check.loss_e2e_ds: [ds_kl_coeff_fixed, ds_detached_downstream, ds_beta_not_divided_and_kl_full],
    check.train_sae: [
        check._manual_loop(late_lr=True),
        check._manual_loop(zero_grad_between=True),
        check._manual_loop(clip="by value"),
        check._manual_loop(reuse_batch=True),
        _train_without_clipping_and_half_lr,
        train_default_kl_coeff,
        train_returns_nothing,
        train_returns_tensors_of_the_graph,
    ],
    check.max_cosine_within: [
        lambda W_dec: (
            (
                torch.nn.functional.normalize(W_dec, dim=-1)
                @ torch.nn.functional.normalize(W_dec, dim=-1).T
            )
            .sort(-1)
            .values[:, -2]
            .abs()
        ),
        CHECKS[6][3],
    ],
}
contract_tests(check, CHECKS, globals(), correct=CORRECT, wrong=WRONG)


@pytest.mark.parametrize(
    "wrong, phrase",
    [
        (check._manual_loop(late_lr=True), "one step late"),
        (check._manual_loop(zero_grad_between=True), "between backward() and step()"),
        (check._manual_loop(reuse_batch=True), "reused"),
    ],
    ids=["lr one step late", "zero_grad between", "batch reused"],
)
def test_training_divergence_names_step_and_cause(wrong, phrase):
    status, message = outcome(check.train_sae, wrong)
    assert status == FAILED and phrase in message and "step " in message, message


# ------------- messages a newcomer's browser run found wrong or missing (chapter 04, B and G)


@pytest.mark.parametrize("clip", ["none", "after step", "by value"])
def test_unclipped_gradients_are_not_blamed_on_clipping_by_value(clip):
    """On the first case every gradient entry is below grad_clip = 1, so no clipping, clipping
    after step() and clip_grad_value_ all reach step() unclipped: none of them clipped by value
    in a way that shows, and the message says the norm was not clipped (it used to say "by
    VALUE" to all three)."""
    status, message = outcome(check.train_sae, check._manual_loop(clip=clip))
    assert status == FAILED and "not clipped before the step" in message, message
    assert "clip_grad_norm_(params, grad_clip) between backward() and step()" in message
    assert "by VALUE" not in message, message
    if clip == "by value":
        assert "by value would change nothing" in message, message


def test_clipping_the_norm_before_the_step_passes():
    assert outcome(check.train_sae, check._manual_loop(clip="before step")) == (PASSED, "")


def local_l1_mean_as_written(x, x_hat, c, lam):
    return torch.nn.functional.mse_loss(x_hat, x) + lam / x.shape[-1] * c.abs().mean()


def local_l1_torch_mean(x, x_hat, c, lam):
    return ((x - x_hat) ** 2).mean() + (lam / x.shape[-1]) * torch.mean(torch.abs(c))


def local_mean_times_d_sae(x, x_hat, c, lam):
    """Right: the mean over the dictionary times its size is the per-token sum."""
    return (x_hat - x).pow(2).mean() + lam / x.shape[-1] * (c.abs().mean(-1) * c.shape[-1]).mean()


def local_vector_norm(x, x_hat, c, lam):
    l1 = torch.linalg.vector_norm(c, ord=1, dim=-1)
    return torch.nn.functional.mse_loss(x_hat, x) + lam / x.shape[-1] * l1.mean()


@pytest.mark.parametrize("wrong", [local_l1_mean_as_written, local_l1_torch_mean])
def test_l1_as_a_mean_over_the_dictionary_is_named(wrong):
    status, message = outcome(check.loss_local, wrong)
    assert status == FAILED and "c.abs().mean() averages |c| over the dictionary" in message


@pytest.mark.parametrize("right", [local_mean_times_d_sae, local_vector_norm])
def test_l1_written_another_right_way_passes(right):
    assert outcome(check.loss_local, right) == (PASSED, "")


def ds_kl_coeff_on_sparsity(
    new_logits, orig_logits, c, lam, d_in, new_downstream, orig_downstream, beta, kl_coeff=0.5
):
    n = len(new_downstream)
    mse = sum((a - b).pow(2).mean() for a, b in zip(new_downstream, orig_downstream, strict=True))
    kl = kl_einsum(new_logits, orig_logits)
    return kl_coeff * (kl + lam / d_in * c.abs().sum(-1).mean()) + beta / n * mse


def ds_kl_coeff_on_e2e_loss(
    new_logits, orig_logits, c, lam, d_in, new_downstream, orig_downstream, beta, kl_coeff=0.5
):
    """Scales the chapter's e2e loss (KL + sparsity) by kl_coeff."""
    pairs = zip(new_downstream, orig_downstream, strict=True)
    mses = [torch.nn.functional.mse_loss(a, b) for a, b in pairs]
    return kl_coeff * E.loss_e2e(new_logits, orig_logits, c, lam, d_in) + beta * sum(mses) / len(
        mses
    )


def ds_kl_coeff_on_everything(
    new_logits, orig_logits, c, lam, d_in, new_downstream, orig_downstream, beta, kl_coeff=0.5
):
    return kl_coeff * E.loss_e2e_ds(
        new_logits, orig_logits, c, lam, d_in, new_downstream, orig_downstream, beta, 1.0
    )


def ds_from_e2e_loss(
    new_logits, orig_logits, c, lam, d_in, new_downstream, orig_downstream, beta, kl_coeff=0.5
):
    """Right: the e2e loss with its KL rescaled, plus the downstream term."""
    kl = E.kl_spliced_vs_original(new_logits, orig_logits)
    pairs = zip(new_downstream, orig_downstream, strict=True)
    mses = torch.stack([(a - b).pow(2).mean() for a, b in pairs])
    return (
        E.loss_e2e(new_logits, orig_logits, c, lam, d_in) - (1 - kl_coeff) * kl + beta * mses.mean()
    )


@pytest.mark.parametrize(
    "wrong", [ds_kl_coeff_on_sparsity, ds_kl_coeff_on_e2e_loss, ds_kl_coeff_on_everything]
)
def test_kl_coeff_on_more_than_the_kl_is_named(wrong):
    status, message = outcome(check.loss_e2e_ds, wrong)
    assert status == FAILED and "kl_coeff multiplies the KL term only" in message, message


@pytest.mark.parametrize("right", [ds_from_e2e_loss, ds_loop])
def test_kl_coeff_on_the_kl_only_passes(right):
    assert outcome(check.loss_e2e_ds, right) == (PASSED, "")


def cos_diagonal_filled_with_zero(W_dec):
    unit = torch.nn.functional.normalize(W_dec, dim=-1)
    cos = unit @ unit.T
    cos.fill_diagonal_(0)
    return cos.max(dim=-1).values


def cos_minus_identity(W_dec):
    unit = torch.nn.functional.normalize(W_dec, dim=-1)
    return (unit @ unit.T - torch.eye(len(W_dec))).max(dim=-1).values  # self: 1 - 1 = 0


def cos_minus_three_identity(W_dec):
    """Right: a cosine is at least -1, so the self-cosine pushed to -2 can never be the max."""
    unit = torch.nn.functional.normalize(W_dec, dim=-1)
    return (unit @ unit.T - 3 * torch.eye(len(W_dec))).max(dim=-1).values


@pytest.mark.parametrize("wrong", [cos_diagonal_filled_with_zero, cos_minus_identity])
def test_a_diagonal_of_zeros_is_named(wrong):
    status, message = outcome(check.max_cosine_within, wrong)
    assert status == FAILED and "case 'two elements'" in message, message
    assert "Fill the diagonal with -inf" in message, message


@pytest.mark.parametrize("right", [cos_minus_three_identity, cos_masked])
def test_a_diagonal_below_every_cosine_passes(right):
    assert outcome(check.max_cosine_within, right) == (PASSED, "")
