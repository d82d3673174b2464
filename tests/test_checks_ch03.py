"""Every chapter-03 check passes the reference, flags the stub, and rejects known wrong answers."""

from __future__ import annotations

import pytest
import torch

from course_utils import lm_saes as L
from course_utils.checks import ch03 as check
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
contract_tests(check, CHECKS, globals())


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
        return (acts[proxy].sum() / acts.sum()).item(), (acts[proxy] > threshold).float().mean().item()

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
    from course_utils import saes as S

    sae = S.ReLUSAE(5, 7, n_instances=2, seed=0)
    one = L.single(sae, instance=1)
    assert torch.equal(one.b_enc, sae.b_enc[1]) and torch.equal(one.b_dec, sae.b_dec[1])
    x = torch.randn(3, 5)
    manual = torch.relu((x - one.b_dec) @ one.W_enc + one.b_enc)
    assert torch.allclose(manual, one.encode(x), atol=1e-6)
