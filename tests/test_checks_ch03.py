"""Every chapter-03 check passes the reference, flags the stub, and rejects known wrong answers."""

from __future__ import annotations

import pytest
import torch

from course_utils.checks import ch03 as check
from course_utils.science import lm_saes as L
from tests.check_contract import contract_tests

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest.py


def _splice_mean_ablation(model, sae, tokens, hook_name):
    """Splices the mean activation instead of the reconstruction."""

    def hook(act, hook):
        return act.mean((0, 1), keepdim=True).expand_as(act)

    with torch.no_grad():
        return model.run_with_hooks(
            tokens, return_type="loss", fwd_hooks=[(hook_name, hook)]
        ).item()


# (check, reference, mistakes, an extra wrong answer not in the mistakes list)
CHECKS = [
    (
        check.l1_coefficient,
        L.l1_coefficient,
        check.L1_MISTAKES,
        lambda step, total_steps, final_coeff, warmup_frac=0.05: final_coeff * min(1, step / 50),
    ),
    (
        check.lr_schedule,
        L.lr_schedule,
        check.LR_MISTAKES,
        lambda step, total_steps, peak_lr, warmup_steps=0, decay_frac=0.2: peak_lr * 0.5,
    ),
    (
        check.normalise_decoder_rows,
        L.normalise_decoder_rows,
        check.NORMALISE_MISTAKES,
        lambda W_dec: W_dec.clamp(-1, 1),
    ),
    (check.ce_loss_with_sae, L.ce_loss_with_sae, check.SPLICE_MISTAKES, _splice_mean_ablation),
    (
        check.ce_loss_recovered,
        L.ce_loss_recovered,
        check.RECOVERED_MISTAKES,
        lambda clean, spliced, ablated: (ablated - spliced) / ablated,
    ),
    (
        check.top_activating,
        L.top_activating,
        check.TOP_MISTAKES,
        lambda feature_acts, k=10: L.top_activating(feature_acts, k + 1),
    ),
    (
        check.logit_weights,
        L.logit_weights,
        check.LOGIT_MISTAKES,
        lambda W_dec, W_U: W_dec @ W_U - (W_dec @ W_U).mean(-1, keepdim=True),
    ),
    (
        check.specificity_sensitivity,
        L.specificity_sensitivity,
        check.SS_MISTAKES,
        lambda feature_acts, proxy, threshold=0.0: (1.0, 1.0),
    ),
    (
        check.max_neuron_correlation,
        L.max_neuron_correlation,
        check.CORR_MISTAKES,
        lambda feature_acts, neuron_acts: (0.5, 0),
    ),
]


# ------------------------------------------------------------ correct alternatives (issue 13)
def l1_branches(step, total_steps, final_coeff, warmup_frac=0.05):
    if warmup_frac == 0 or step >= warmup_frac * total_steps:
        return float(final_coeff)
    return final_coeff * step / (warmup_frac * total_steps)


def l1_clip(step, total_steps, final_coeff, warmup_frac=0.05):
    ramp = step / max(warmup_frac * total_steps, 1e-12) if warmup_frac > 0 else 1.0
    return float(final_coeff * max(0.0, min(ramp, 1.0)))


def lr_branches(step, total_steps, peak_lr, warmup_steps=0, decay_frac=0.2):
    decay = decay_frac * total_steps
    if warmup_steps and step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    if step >= (1 - decay_frac) * total_steps and decay > 0:
        return peak_lr * (total_steps - step) / decay
    return peak_lr


def lr_min_of_ramps(step, total_steps, peak_lr, warmup_steps=0, decay_frac=0.2):
    if step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    remaining = (total_steps - step) / (decay_frac * total_steps) if decay_frac > 0 else 1.0
    return peak_lr * min(1.0, remaining)


def splice_with_hooks_context(model, sae, tokens, hook_name):
    with (
        torch.no_grad(),
        model.hooks(fwd_hooks=[(hook_name, lambda a, hook: sae.decode(sae.encode(a)))]),
    ):
        return model(tokens, return_type="loss").item()


def splice_add_hook_then_reset(model, sae, tokens, hook_name):
    model.add_hook(hook_name, lambda a, hook: sae.decode(sae.encode(a)))
    try:
        loss = model(tokens, return_type="loss")
    finally:
        model.reset_hooks()
    return float(loss)


def top_argsort(feature_acts, k=10):
    flat = feature_acts.reshape(-1)
    order = flat.argsort(descending=True)[:k]
    return order // feature_acts.shape[1], order % feature_acts.shape[1], flat[order]


def top_unravel(feature_acts, k=10):
    values, index = torch.topk(feature_acts.flatten(), min(k, feature_acts.numel()))
    window, pos = torch.unravel_index(index, feature_acts.shape)
    return window, pos, values


def ss_loop(feature_acts, proxy, threshold=0.0):
    acts, proxy = feature_acts.flatten().tolist(), proxy.flatten().tolist()
    mass = [max(a, 0.0) for a in acts]
    spec = (
        sum(m for m, p in zip(mass, proxy, strict=False) if p) / sum(mass) if sum(mass) > 0 else 0.0
    )
    on_proxy = [a for a, p in zip(acts, proxy, strict=False) if p]
    sens = sum(a > threshold for a in on_proxy) / len(on_proxy) if on_proxy else 0.0
    return spec, sens


def ss_relu(feature_acts, proxy, threshold=0.0):
    mass = torch.relu(feature_acts.float().flatten())
    proxy = proxy.flatten().bool()
    return (mass * proxy).sum().item() / mass.sum().item(), (
        (feature_acts.flatten()[proxy] > threshold).sum() / proxy.sum()
    ).item()


def corr_corrcoef(feature_acts, neuron_acts):
    stacked = torch.cat([feature_acts.float().reshape(-1, 1), neuron_acts.float()], dim=1)
    corr = torch.corrcoef(stacked.T)[0, 1:].nan_to_num(0.0)
    return corr.max().item(), int(corr.argmax())


def corr_zscores(feature_acts, neuron_acts):
    f, n = feature_acts.float(), neuron_acts.float()
    zf = (f - f.mean()) / f.std(unbiased=False)
    sd = n.std(0, unbiased=False)
    zn = (n - n.mean(0)) / torch.where(sd > 0, sd, torch.ones_like(sd))
    corr = torch.where(sd > 0, (zf @ zn) / len(f), torch.zeros_like(sd))
    value, index = corr.max(dim=0)
    return float(value), int(index)


CORRECT = {
    check.l1_coefficient: [l1_branches, l1_clip],
    check.lr_schedule: [lr_branches, lr_min_of_ramps],
    check.normalise_decoder_rows: [
        lambda W_dec: torch.nn.functional.normalize(W_dec, dim=-1),
        lambda W_dec: W_dec / torch.linalg.vector_norm(W_dec, dim=2, keepdim=True).clamp(min=1e-12),
    ],
    check.ce_loss_with_sae: [splice_with_hooks_context, splice_add_hook_then_reset],
    check.ce_loss_recovered: [
        lambda clean, spliced, ablated: 1 - (spliced - clean) / (ablated - clean),
        lambda clean, spliced, ablated: (spliced - ablated) / (clean - ablated),
    ],
    check.top_activating: [top_argsort, top_unravel],
    check.logit_weights: [
        lambda W_dec, W_U: torch.einsum("sd,dv->sv", W_dec, W_U),
        lambda W_dec, W_U: (W_U.T @ W_dec.T).T,
    ],
    check.specificity_sensitivity: [ss_loop, ss_relu],
    check.max_neuron_correlation: [corr_corrcoef, corr_zscores],
}


# ------------------------------------------------- wrong answers a learner writes (issue 13)
def l1_never_stops_with_guard(step, total_steps, final_coeff, warmup_frac=0.05):
    if warmup_frac == 0:
        return float(final_coeff)
    return final_coeff * step / (warmup_frac * total_steps)


def l1_returns_tensor(step, total_steps, final_coeff, warmup_frac=0.05):
    return torch.tensor(L.l1_coefficient(step, total_steps, final_coeff, warmup_frac))


def l1_off_by_one(step, total_steps, final_coeff, warmup_frac=0.05):
    w = warmup_frac * total_steps
    return float(final_coeff) if w == 0 else final_coeff * min(1.0, (step + 1) / w)


def lr_decay_off_by_one(step, total_steps, peak_lr, warmup_steps=0, decay_frac=0.2):
    if step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    if step >= total_steps - decay_frac * total_steps:
        return peak_lr * (total_steps - step - 1) / (decay_frac * total_steps)
    return peak_lr


def lr_decay_ignores_decay_frac(step, total_steps, peak_lr, warmup_steps=0, decay_frac=0.2):
    return L.lr_schedule(step, total_steps, peak_lr, warmup_steps, 0.2)


def splice_hook_left_behind(model, sae, tokens, hook_name):
    model.add_hook(hook_name, lambda a, hook: sae.decode(sae.encode(a)))
    with torch.no_grad():
        return model(tokens, return_type="loss").item()


def splice_fixed_layer(model, sae, tokens, hook_name):
    return L.ce_loss_with_sae(model, sae, tokens, "blocks.0.hook_resid_post")


def splice_skips_bos(model, sae, tokens, hook_name):
    def hook(a, hook):
        out = sae.decode(sae.encode(a))
        return torch.cat([a[:, :1], out[:, 1:]], dim=1)

    with torch.no_grad():
        return model.run_with_hooks(
            tokens, return_type="loss", fwd_hooks=[(hook_name, hook)]
        ).item()


def top_unsorted(feature_acts, k=10):
    w, p, v = L.top_activating(feature_acts, k)
    order = (w * feature_acts.shape[1] + p).argsort()
    return w[order], p[order], v[order]


def ss_zero_threshold_always(feature_acts, proxy, threshold=0.0):
    return L.specificity_sensitivity(feature_acts, proxy, 0.0)


def ss_ge_threshold(feature_acts, proxy, threshold=0.0):
    spec, _ = L.specificity_sensitivity(feature_acts, proxy, threshold)
    on = feature_acts.flatten()[proxy.flatten().bool()]
    return spec, (on >= threshold).float().mean().item()


def corr_first_dead_is_nan_skipped_wrongly(feature_acts, neuron_acts):
    corr = torch.corrcoef(torch.cat([feature_acts.reshape(1, -1), neuron_acts.T]))[0, 1:]
    value, index = corr.max(0)
    return value.item(), int(index)


WRONG = {
    check.l1_coefficient: [
        l1_never_stops_with_guard,
        l1_returns_tensor,
        l1_off_by_one,
        CHECKS[0][3],
    ],
    check.lr_schedule: [lr_decay_off_by_one, lr_decay_ignores_decay_frac, CHECKS[1][3]],
    check.normalise_decoder_rows: [
        lambda W_dec: W_dec / W_dec.norm(dim=-1, keepdim=True),
        lambda W_dec: W_dec / W_dec.abs().amax(dim=-1, keepdim=True).clamp_min(1e-8),
    ],
    check.ce_loss_with_sae: [splice_hook_left_behind, splice_fixed_layer, splice_skips_bos],
    check.ce_loss_recovered: [
        lambda clean, spliced, ablated: (ablated - spliced) / (spliced - clean),
        lambda clean, spliced, ablated: abs((ablated - spliced) / (ablated - clean)),
    ],
    check.top_activating: [top_unsorted, CHECKS[5][3]],
    check.logit_weights: [
        lambda W_dec, W_U: torch.nn.functional.normalize(W_dec, dim=-1) @ W_U,
        lambda W_dec, W_U: (W_dec @ W_U).log_softmax(-1),
    ],
    check.specificity_sensitivity: [ss_zero_threshold_always, ss_ge_threshold],
    check.max_neuron_correlation: [corr_first_dead_is_nan_skipped_wrongly, CHECKS[8][3]],
}
contract_tests(check, CHECKS, globals(), correct=CORRECT, wrong=WRONG)


def test_l1_hints_fire_for_their_own_mistake_only():
    """Issue 13, class 8: a forgotten warmup_frac=0 guard is not told to clip the ramp."""
    from course_utils.checks.core import outcome

    def no_guard(step, total_steps, final_coeff, warmup_frac=0.05):
        return final_coeff * min(1.0, step / (warmup_frac * total_steps))

    status, message = outcome(check.l1_coefficient, no_guard)
    assert status == "failed" and "min(1, ...)" not in message and "warmup_frac=0" in message


def test_helpers_reject_bad_shapes():
    with pytest.raises(ValueError, match="d_model dimensions differ"):
        L.logit_weights(torch.zeros(3, 4), torch.zeros(5, 6))
    with pytest.raises(ValueError, match="one feature"):
        L.top_activating(torch.zeros(2, 3, 4))
    with pytest.raises(ValueError, match="proxy has"):
        L.specificity_sensitivity(torch.zeros(4), torch.zeros(5, dtype=torch.bool))
    with pytest.raises(ValueError, match="neuron_acts has"):
        L.max_neuron_correlation(torch.zeros(4), torch.zeros(5, 3))
    with pytest.raises(ValueError, match="undefined"):
        L.ce_loss_recovered(3.0, 3.5, 3.0)


def test_review_wrong_answers_get_their_hints():
    """Wrong answers a learner tried in review: each is rejected with a hint that names the fix."""
    from course_utils.checks.core import outcome

    def no_clamp(feature_acts, proxy, threshold=0.0):
        acts, proxy = feature_acts.flatten().float(), proxy.flatten().bool()
        return (acts[proxy].sum() / acts.sum()).item(), (
            acts[proxy] > threshold
        ).float().mean().item()

    def by_n_windows(feature_acts, k=10):
        values, index = feature_acts.flatten().topk(k)
        return index // feature_acts.shape[0], index % feature_acts.shape[0], values

    def unbiased_z(feature_acts, neuron_acts):
        f, n = feature_acts.float(), neuron_acts.float()
        corr = ((f - f.mean()) / f.std()) @ ((n - n.mean(0)) / n.std(0)) / len(f)
        return corr.max().item(), int(corr.argmax())

    def clipped(clean, spliced, ablated):
        return min(1.0, max(0.0, (ablated - spliced) / (ablated - clean)))

    for fn, wrong, hint in [
        (check.specificity_sensitivity, no_clamp, "clamp_min(0)"),
        (check.top_activating, by_n_windows, "i // n_pos"),
        (check.max_neuron_correlation, unbiased_z, "(n-1)/n"),
        (check.ce_loss_recovered, clipped, "do not clip"),
    ]:
        status, message = outcome(fn, wrong)
        assert status == "failed" and hint in message, message


def test_review_edge_cases_are_rejected():
    """warmup_frac=0 must not divide by zero; a zero decoder row must not become NaN."""
    from course_utils.checks.core import outcome

    def divides(step, total_steps, final_coeff, warmup_frac=0.05):
        return final_coeff * min(1.0, step / (warmup_frac * total_steps))

    def unclamped(W_dec):
        return W_dec / W_dec.norm(dim=-1, keepdim=True)

    for fn, wrong in [(check.l1_coefficient, divides), (check.normalise_decoder_rows, unclamped)]:
        status, message = outcome(fn, wrong)
        assert status == "failed", message


def test_single_exposes_one_instance_parameters():
    from course_utils.science import saes as S

    sae = S.ReLUSAE(5, 7, n_instances=2, seed=0)
    one = L.single(sae, instance=1)
    assert torch.equal(one.b_enc, sae.b_enc[1]) and torch.equal(one.b_dec, sae.b_dec[1])
    x = torch.randn(3, 5)
    manual = torch.relu((x - one.b_dec) @ one.W_enc + one.b_enc)
    assert torch.allclose(manual, one.encode(x), atol=1e-6)
