"""Every chapter-02 check passes the reference, flags the stub, and rejects known wrong answers."""

from __future__ import annotations

import pytest
import torch

from course_utils import sae_metrics as M
from course_utils import saes as S
from course_utils.checks import ch02 as check
from course_utils.checks.core import FAILED, outcome
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
contract_tests(check, CHECKS, globals())


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
