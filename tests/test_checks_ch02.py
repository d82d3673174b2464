"""Every chapter-02 check passes the reference, flags the stub, and rejects known wrong answers."""

from __future__ import annotations

import pytest
import torch

from course_utils.checks import ch02 as check
from course_utils.checks.core import FAILED, outcome
from course_utils.science import sae_metrics as M
from course_utils.science import saes as S
from tests.check_contract import contract_tests

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest.py


def _extra_training_step(sae, optimizer, x, l1_coeff):
    """Normalises the decoder *before* the step (so the stored decoder is not unit-norm)."""
    with torch.no_grad():
        sae.W_dec.data = sae.W_dec.data / sae.W_dec.data.norm(dim=-1, keepdim=True)
    acts, x_hat = sae(x)
    loss = S.sae_loss(x, acts, x_hat, l1_coeff)
    optimizer.zero_grad()
    loss.sum().backward()
    optimizer.step()
    return loss.detach()


def _extra_resample(W_enc, b_enc, W_dec, dead, x, x_hat, encoder_scale=0.2):
    """Forgets to touch the encoder."""
    _, b_new, W_dec_new = S.resample_dead_latents(
        W_enc, b_enc, W_dec, dead, x, x_hat, encoder_scale
    )
    return W_enc.clone(), b_new, W_dec_new


# (check, reference, mistakes, an extra wrong answer not in the mistakes list)
CHECKS = [
    (
        check.sae_forward,
        S.sae_forward,
        check.FORWARD_MISTAKES,
        lambda x, W_enc, b_enc, W_dec, b_dec: S.sae_forward(x, W_enc, b_enc * 0, W_dec, b_dec),
    ),
    (
        check.remove_parallel_grad,
        S.remove_parallel_grad,
        check.PARALLEL_MISTAKES,
        lambda W_dec, grad: grad * 0.5,
    ),
    (
        check.sae_loss,
        S.sae_loss,
        check.LOSS_MISTAKES,
        lambda x, acts, x_hat, l1: S.sae_loss(x, acts, x_hat, l1) / x.shape[-1],
    ),
    (check.training_step, S.relu_training_step, check.TRAINING_STEP_MISTAKES, _extra_training_step),
    (check.l0, M.l0, check.L0_MISTAKES, lambda acts: (acts > 0.5).float().sum(-1).mean(0)),
    (
        check.fvu,
        M.fvu,
        check.FVU_MISTAKES,
        lambda x, x_hat: (x - x_hat).pow(2).sum((0, 2)) / x.var(0).sum(-1),
    ),
    (check.dead_latents, M.dead_latents, check.DEAD_MISTAKES, lambda acts: acts.sum(0) < 0.1),
    (
        check.mmcs,
        M.mmcs,
        check.MMCS_MISTAKES,
        lambda learned, true: M.mmcs(learned, true).clamp(max=0.9),
    ),
    (
        check.resample_dead_latents,
        S.resample_dead_latents,
        check.RESAMPLE_MISTAKES,
        _extra_resample,
    ),
    (check.topk_activation, S.topk_activation, check.TOPK_MISTAKES, lambda pre, k: torch.relu(pre)),
    (
        check.jumprelu_backward,
        S.jumprelu_backward,
        check.JUMPRELU_MISTAKES,
        lambda z, th, eps, g: (g * (z > th), (g * (z > th)).sum(0)),
    ),
    (
        check.decoder_norm_weighted_l1,
        S.decoder_norm_weighted_l1,
        check.WEIGHTED_L1_MISTAKES,
        lambda acts, W_dec: (acts * W_dec.norm(dim=-1)).sum(-1).mean(0) * 2,
    ),
]


# ------------------------------------------------------------ correct alternatives (issue 13)
def forward_matmul(x, W_enc, b_enc, W_dec, b_dec):
    pre = ((x - b_dec).unsqueeze(-2) @ W_enc).squeeze(-2) + b_enc
    acts = pre.clamp(min=0)
    return acts, (acts.unsqueeze(-2) @ W_dec).squeeze(-2) + b_dec


def forward_einops(x, W_enc, b_enc, W_dec, b_dec):
    import einops

    acts = torch.nn.functional.relu(
        einops.einsum(x - b_dec, W_enc, "b i d, i d s -> b i s") + b_enc
    )
    return acts, einops.einsum(acts, W_dec, "b i s, i s d -> b i d") + b_dec


def parallel_einsum(W_dec, grad):
    unit = torch.nn.functional.normalize(W_dec, dim=-1)
    return grad - torch.einsum("isd,isd->is", grad, unit).unsqueeze(-1) * unit


def parallel_projection_formula(W_dec, grad):
    dots = (grad * W_dec).sum(-1, keepdim=True)
    return grad - dots / W_dec.pow(2).sum(-1, keepdim=True) * W_dec


def loss_functional(x, acts, x_hat, l1_coeff):
    recon = torch.nn.functional.mse_loss(x_hat, x, reduction="none").sum(-1).mean(0)
    return recon + l1_coeff * acts.norm(p=1, dim=-1).mean(0)


def loss_einsum(x, acts, x_hat, l1_coeff):
    d = x_hat - x
    return torch.einsum("bid,bid->bi", d, d).mean(0) + l1_coeff * acts.abs().sum(-1).mean(0)


def step_in_place_normalise(sae, optimizer, x, l1_coeff):
    optimizer.zero_grad(set_to_none=True)
    acts, x_hat = sae(x)
    loss = S.sae_loss(x, acts, x_hat, l1_coeff)
    loss.sum().backward()
    with torch.no_grad():
        unit = sae.W_dec / sae.W_dec.norm(dim=-1, keepdim=True)
        sae.W_dec.grad -= (sae.W_dec.grad * unit).sum(-1, keepdim=True) * unit
    optimizer.step()
    with torch.no_grad():
        sae.W_dec /= sae.W_dec.norm(dim=-1, keepdim=True)
    return loss.detach()


def step_F_normalize(sae, optimizer, x, l1_coeff):
    acts, x_hat = sae(x)
    loss = ((x_hat - x) ** 2).sum(-1).mean(0) + l1_coeff * acts.sum(-1).mean(0)
    optimizer.zero_grad()
    loss.sum().backward()
    sae.W_dec.grad = S.remove_parallel_grad(sae.W_dec.detach(), sae.W_dec.grad)
    optimizer.step()
    sae.W_dec.data = torch.nn.functional.normalize(sae.W_dec.data, dim=-1)
    return loss.detach()


def dead_all_zero(acts):
    return (acts == 0).all(dim=0)


def dead_max(acts):
    return acts.amax(0) <= 0


def mmcs_normalize_matmul(learned, true):
    L = torch.nn.functional.normalize(learned, dim=-1)
    T = torch.nn.functional.normalize(true, dim=-1)
    return (T @ L.transpose(-1, -2)).amax(-1).mean(-1)


def mmcs_loop(learned, true):
    out = []
    for i in range(learned.shape[0]):
        cos = torch.nn.functional.cosine_similarity(true[:, None], learned[i][None], dim=-1)
        out.append(cos.max(dim=1).values.mean())
    return torch.stack(out)


def resample_own(W_enc, b_enc, W_dec, dead, x, x_hat, encoder_scale=0.2):
    W_enc, b_enc, W_dec = W_enc.clone(), b_enc.clone(), W_dec.clone()
    residual = x - x_hat
    for i in range(W_dec.shape[0]):
        dead_idx = torch.where(dead[i])[0]
        if dead_idx.numel() == 0:
            continue
        order = torch.argsort(residual[:, i].norm(dim=-1), descending=True)
        picks = order.repeat(dead_idx.numel() // len(order) + 1)[: dead_idx.numel()]
        directions = torch.nn.functional.normalize(residual[picks, i], dim=-1, eps=1e-8)
        alive_norm = W_enc[i][:, ~dead[i]].norm(dim=0).mean() if (~dead[i]).any() else 1.0
        W_dec[i, dead_idx] = directions
        W_enc[i][:, dead_idx] = encoder_scale * alive_norm * directions.T
        b_enc[i, dead_idx] = 0
    return W_enc, b_enc, W_dec


def topk_mask(pre_acts, k):
    idx = pre_acts.topk(k, dim=-1).indices
    mask = torch.zeros_like(pre_acts, dtype=torch.bool).scatter(-1, idx, True)
    return torch.relu(pre_acts) * mask


def topk_kth_threshold(pre_acts, k):
    kth = pre_acts.topk(k, dim=-1).values[..., -1:]
    return torch.where(pre_acts >= kth, pre_acts.clamp_min(0), torch.zeros_like(pre_acts))


def jump_explicit(z, threshold, bandwidth, grad_output):
    above = (z > threshold).float()
    inside = ((z - threshold).abs() < bandwidth / 2).float()
    return above * grad_output, -(threshold / bandwidth * inside * grad_output).sum(dim=0)


def jump_via_rectangle(z, threshold, bandwidth, grad_output):
    k = S.rectangle((z - threshold) / bandwidth)
    return torch.where(z > threshold, grad_output, 0.0), (
        -threshold * k * grad_output / bandwidth
    ).sum(0)


def weighted_l1_einsum(acts, W_dec):
    return torch.einsum("bis,is->bi", acts.abs(), torch.linalg.norm(W_dec, dim=-1)).mean(0)


def weighted_l1_sqrt(acts, W_dec):
    return (acts * W_dec.pow(2).sum(-1).sqrt()).sum(-1).mean(0)


CORRECT = {
    check.sae_forward: [forward_matmul, forward_einops],
    check.remove_parallel_grad: [parallel_einsum, parallel_projection_formula],
    check.sae_loss: [loss_functional, loss_einsum],
    check.training_step: [step_in_place_normalise, step_F_normalize],
    check.l0: [
        lambda acts: (acts > 0).sum(-1).float().mean(0),
        lambda acts: acts.bool().sum(dim=2).float().mean(dim=0),
    ],
    check.fvu: [
        lambda x, x_hat: (x - x_hat).pow(2).sum((0, 2)) / (x - x.mean(0)).pow(2).sum((0, 2)),
        lambda x, x_hat: ((x - x_hat) ** 2).mean((0, 2)) / x.var(0, unbiased=False).mean(-1),
    ],
    check.dead_latents: [dead_all_zero, dead_max],
    check.mmcs: [mmcs_normalize_matmul, mmcs_loop],
    check.resample_dead_latents: [resample_own, check._resample_variant()],
    check.topk_activation: [topk_mask, topk_kth_threshold],
    check.jumprelu_backward: [jump_explicit, jump_via_rectangle],
    check.decoder_norm_weighted_l1: [weighted_l1_einsum, weighted_l1_sqrt],
}


# ------------------------------------------------- wrong answers a learner writes (issue 13)
def forward_detached(x, W_enc, b_enc, W_dec, b_dec):
    acts, x_hat = S.sae_forward(x, W_enc.detach(), b_enc.detach(), W_dec.detach(), b_dec.detach())
    return acts, x_hat


def forward_tied(x, W_enc, b_enc, W_dec, b_dec):
    acts = torch.relu(torch.einsum("bid,ids->bis", x - b_dec, W_enc) + b_enc)
    return acts, torch.einsum("bis,ids->bid", acts, W_enc) + b_dec


def forward_unit_decoder(x, W_enc, b_enc, W_dec, b_dec):
    return S.sae_forward(x, W_enc, b_enc, W_dec / W_dec.norm(dim=-1, keepdim=True) * 1.5, b_dec)


def parallel_in_place(W_dec, grad):
    unit = W_dec / W_dec.norm(dim=-1, keepdim=True)
    grad -= (grad * unit).sum(-1, keepdim=True) * unit
    return grad


def parallel_normalize_dim1(W_dec, grad):
    unit = torch.nn.functional.normalize(W_dec, dim=1)
    return grad - (grad * unit).sum(-1, keepdim=True) * unit


def loss_item_rewrapped(x, acts, x_hat, l1_coeff):
    return torch.tensor(S.sae_loss(x, acts, x_hat, l1_coeff).tolist())


def loss_detached_acts(x, acts, x_hat, l1_coeff):
    return S.sae_loss(x, acts.detach(), x_hat, l1_coeff)


def loss_l1_coeff_mean(x, acts, x_hat, l1_coeff):
    return S.sae_loss(x, acts, x_hat, l1_coeff.mean())


def loss_l1_squared(x, acts, x_hat, l1_coeff):
    return (x_hat - x).pow(2).sum(-1).mean(0) + l1_coeff * acts.pow(2).sum(-1).mean(0)


def _step(sae, optimizer, x, l1_coeff, *, between=False, before=False, after=False):
    acts, x_hat = sae(x)
    loss = S.sae_loss(x, acts, x_hat, l1_coeff)
    if not between:
        optimizer.zero_grad()
    loss.sum().backward()
    if between:
        optimizer.zero_grad()
    if before:
        with torch.no_grad():
            sae.W_dec.data = sae.W_dec.data / sae.W_dec.data.norm(dim=-1, keepdim=True)
    if not after:
        sae.W_dec.grad = S.remove_parallel_grad(sae.W_dec.data, sae.W_dec.grad)
    optimizer.step()
    if after:
        sae.W_dec.grad = S.remove_parallel_grad(sae.W_dec.data, sae.W_dec.grad)
    if not before:
        with torch.no_grad():
            sae.W_dec.data = sae.W_dec.data / sae.W_dec.data.norm(dim=-1, keepdim=True)
    return loss.detach()


def step_zero_grad_between(sae, optimizer, x, l1_coeff):
    return _step(sae, optimizer, x, l1_coeff, between=True)


def step_normalise_before(sae, optimizer, x, l1_coeff):
    return _step(sae, optimizer, x, l1_coeff, before=True)


def step_projection_after(sae, optimizer, x, l1_coeff):
    return _step(sae, optimizer, x, l1_coeff, after=True)


def step_mean_loss(sae, optimizer, x, l1_coeff):
    acts, x_hat = sae(x)
    loss = S.sae_loss(x, acts, x_hat, l1_coeff)
    optimizer.zero_grad()
    loss.mean().backward()
    sae.W_dec.grad = S.remove_parallel_grad(sae.W_dec.data, sae.W_dec.grad)
    optimizer.step()
    with torch.no_grad():
        sae.W_dec.data = sae.W_dec.data / sae.W_dec.data.norm(dim=-1, keepdim=True)
    return loss.sum().detach()


def topk_detached(pre_acts, k):
    return S.topk_activation(pre_acts.detach(), k)


def topk_relu_before(pre_acts, k):
    """ReLU first, then the top k: the same values (the extra kept entries are zeros)."""
    acts = torch.relu(pre_acts)
    values, idx = acts.topk(k, dim=-1)
    return torch.zeros_like(acts).scatter(-1, idx, values)


CORRECT[check.topk_activation].append(topk_relu_before)  # looked wrong; it is not


def weighted_l1_detached_norm(acts, W_dec):
    return (acts.abs() * W_dec.norm(dim=-1).detach()).sum(-1).mean(0)


def weighted_l1_item(acts, W_dec):
    return torch.tensor(S.decoder_norm_weighted_l1(acts, W_dec).tolist())


def l0_threshold(acts):
    return (acts > 1e-6).float().sum(-1).mean(0)


def dead_threshold(acts):
    return acts.max(0).values < 1e-6


def resample_ignores_encoder_scale(W_enc, b_enc, W_dec, dead, x, x_hat, encoder_scale=0.2):
    return S.resample_dead_latents(W_enc, b_enc, W_dec, dead, x, x_hat)


def fvu_unbiased_var(x, x_hat):
    return (x - x_hat).pow(2).sum((0, 2)) / (x.var(0).sum(-1) * x.shape[0])


def mmcs_median(learned, true):
    return check._cos(learned, true).max(-1).values.median(-1).values


def jump_no_sum(z, threshold, bandwidth, grad_output):
    g_z, _ = S.jumprelu_backward(z, threshold, bandwidth, grad_output)
    k = S.rectangle((z - threshold) / bandwidth)
    return g_z, (-(threshold / bandwidth) * k * grad_output).mean(0)


WRONG = {
    check.sae_forward: [forward_detached, forward_tied, forward_unit_decoder],
    check.remove_parallel_grad: [parallel_in_place, parallel_normalize_dim1],
    check.sae_loss: [loss_item_rewrapped, loss_detached_acts, loss_l1_coeff_mean, loss_l1_squared],
    check.training_step: [
        step_zero_grad_between,
        step_normalise_before,
        step_projection_after,
        step_mean_loss,
        _extra_training_step,
    ],
    check.l0: [l0_threshold, lambda acts: (acts > 0.5).float().sum(-1).mean(0)],
    check.fvu: [
        fvu_unbiased_var,
        lambda x, x_hat: (x - x_hat).pow(2).sum((0, 2)) / x.var(0).sum(-1),
    ],
    check.dead_latents: [dead_threshold, lambda acts: acts.sum(0) < 0.1],
    check.mmcs: [mmcs_median, lambda learned, true: M.mmcs(learned, true).clamp(max=0.9)],
    check.resample_dead_latents: [resample_ignores_encoder_scale, _extra_resample],
    check.topk_activation: [topk_detached, lambda pre, k: torch.relu(pre)],
    check.jumprelu_backward: [
        jump_no_sum,
        lambda z, th, eps, g: (g * (z > th), (g * (z > th)).sum(0)),
    ],
    check.decoder_norm_weighted_l1: [weighted_l1_detached_norm, weighted_l1_item],
}
contract_tests(check, CHECKS, globals(), correct=CORRECT, wrong=WRONG)


@pytest.mark.parametrize(
    "wrong, phrase",
    [(step_zero_grad_between, "BEFORE `loss.backward()`"), (step_projection_after, "W_dec")],
)
def test_training_step_divergence_names_step_and_quantity(wrong, phrase):
    status, message = outcome(check.training_step, wrong)
    assert status == FAILED and phrase in message, message


def test_crashing_answer_names_the_line():
    def crashes(x, W_enc, b_enc, W_dec, b_dec):
        return x @ W_enc  # wrong shapes for matmul

    status, message = outcome(check.sae_forward, crashes)
    assert status == FAILED and "RuntimeError" in message


def _resample_without_cycling(W_enc, b_enc, W_dec, dead, x, x_hat, encoder_scale=0.2):
    """A learner's version that takes `order[:n]`: fine until dead latents outnumber examples."""
    W_enc, b_enc, W_dec = W_enc.clone(), b_enc.clone(), W_dec.clone()
    residual = x - x_hat
    losses = residual.pow(2).sum(-1)
    for i in range(W_dec.shape[0]):
        idx = dead[i].nonzero().flatten()
        if len(idx) == 0:
            continue
        chosen = losses[:, i].argsort(descending=True)[: len(idx)]
        directions = residual[chosen, i]
        directions = directions / directions.norm(dim=-1, keepdim=True).clamp_min(1e-8)
        alive = ~dead[i]
        scale = W_enc[i][:, alive].norm(dim=0).mean() if alive.any() else torch.tensor(1.0)
        W_dec[i, idx] = directions
        W_enc[i][:, idx] = directions.T * encoder_scale * scale
        b_enc[i, idx] = 0.0
    return W_enc, b_enc, W_dec


def test_resampling_without_cycling_is_rejected_with_a_hint():
    status, message = outcome(check.resample_dead_latents, _resample_without_cycling)
    assert status == FAILED, message
    assert "more dead latents than examples" in message
    assert "order[torch.arange(n) % len(order)]" in message


def test_case_names_have_no_commas():
    """The pass message lists case names separated by commas; a comma inside a name misleads."""
    case_lists = [
        check._forward_cases(),
        check._parallel_cases(),
        check._loss_cases(),
        check._acts_cases(),
        check._fvu_cases(),
        check._mmcs_cases(),
        check._resample_cases(),
        check._topk_cases(),
        check._jump_cases(),
        check._weighted_cases(),
    ]
    names = [case.name for cases in case_lists for case in cases]
    assert not [n for n in names if "," in n]
