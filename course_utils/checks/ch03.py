"""Checks for chapter 03, SAEs on a language model.

References live in :mod:`course_utils.science.lm_saes` (chapters 04-05 reuse them).
"""

from __future__ import annotations

import functools

import torch

from course_utils.checks.core import Case, Mistake, compare_function, exercise, mismatch
from course_utils.science import lm_saes as L
from course_utils.science import saes as S


def _g(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------- 1.1 L1 warm-up

L1_MISTAKES = [
    Mistake(
        "no warm-up",
        lambda step, total_steps, final_coeff, warmup_frac=0.05: float(final_coeff),
        "the coefficient should start at 0 and grow linearly to final_coeff over the first "
        "warmup_frac * total_steps steps.",
    ),
    Mistake(
        "warm-up never stops",
        lambda step, total_steps, final_coeff, warmup_frac=0.05: (
            final_coeff * step / (warmup_frac * total_steps) if warmup_frac else final_coeff
        ),
        "after the warm-up the coefficient stays at final_coeff: clip the ramp with min(1, ...).",
    ),
    Mistake(
        "no guard for warmup_frac=0",
        lambda step, total_steps, final_coeff, warmup_frac=0.05: (
            final_coeff * min(1.0, step / (warmup_frac * total_steps))
        ),
        "with warmup_frac=0 there is no warm-up: return final_coeff straight away instead of "
        "dividing by warmup_frac * total_steps = 0.",
    ),
    Mistake(
        "warm-up length rounded to whole steps",
        lambda step, total_steps, final_coeff, warmup_frac=0.05: (
            final_coeff * min(1.0, step / int(warmup_frac * total_steps))
            if int(warmup_frac * total_steps)
            else float(final_coeff)
        ),
        "the warm-up lasts warmup_frac * total_steps steps, which need not be a whole number: "
        "do not round it with int() (here 0.0125 * 1000 = 12.5 steps).",
    ),
    Mistake(
        "ramp over the whole run",
        lambda step, total_steps, final_coeff, warmup_frac=0.05: final_coeff * step / total_steps,
        "the ramp lasts warmup_frac * total_steps steps, not the whole run.",
    ),
]


def _l1_cases() -> list[Case]:
    return [
        Case("step 0", (0, 1000, 2.0)),
        Case("half-way through the warm-up", (25, 1000, 2.0)),
        Case("end of the warm-up", (50, 1000, 2.0)),
        Case("after the warm-up", (700, 1000, 2.0)),
        Case("a 10% warm-up", (30, 1000, 0.5, 0.1)),
        Case("no warm-up (warmup_frac=0)", (10, 1000, 2.0, 0.0)),
        Case("a warm-up of 12.5 steps", (6, 1000, 1.0, 0.0125)),
    ]


def _python_float(expected, actual) -> str | None:
    if isinstance(actual, torch.Tensor) or not isinstance(actual, (float, int)):
        return f"return a Python float (the text asks for one), got {type(actual).__name__}"
    return mismatch(expected, actual, 1e-9, 1e-9)


@exercise("1.1", "l1_coefficient")
def l1_coefficient(learner) -> str:
    return compare_function(
        learner, L.l1_coefficient, _l1_cases(), L1_MISTAKES, compare=_python_float
    )


# ---------------------------------------------------------------- 1.2 learning-rate schedule


def _no_decay(step, total_steps, peak_lr, warmup_steps=0, decay_frac=0.2):
    if step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    return peak_lr


def _decay_from_start(step, total_steps, peak_lr, warmup_steps=0, decay_frac=0.2):
    if step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    return peak_lr * (total_steps - step) / total_steps


def _warmup_from_zero(step, total_steps, peak_lr, warmup_steps=0, decay_frac=0.2):
    if step < warmup_steps:
        return peak_lr * step / warmup_steps
    return L.lr_schedule(step, total_steps, peak_lr, 0, decay_frac)


def _decay_rounded(step, total_steps, peak_lr, warmup_steps=0, decay_frac=0.2):
    if step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    decay = int(decay_frac * total_steps)
    if decay > 0 and step >= total_steps - decay:
        return peak_lr * (total_steps - step) / decay
    return peak_lr


LR_MISTAKES = [
    Mistake(
        "decay length rounded to whole steps",
        _decay_rounded,
        "the decay lasts decay_frac * total_steps steps, which need not be a whole number "
        "(here 0.2 * 999 = 199.8): do not round it with int(); use the formula as it is.",
    ),
    Mistake(
        "no decay",
        _no_decay,
        "the learning rate decays linearly to 0 over the last decay_frac of the steps.",
    ),
    Mistake(
        "decay over the whole run",
        _decay_from_start,
        "keep the peak rate until the last decay_frac * total_steps steps, then decay.",
    ),
    Mistake(
        "warm-up starts at 0",
        _warmup_from_zero,
        "the first step should already move: use (step + 1) / warmup_steps during warm-up.",
    ),
]


def _lr_cases() -> list[Case]:
    return [
        Case("first warm-up step", (0, 1000, 1e-3, 100)),
        Case("middle of training", (500, 1000, 1e-3, 100)),
        Case("start of the decay", (800, 1000, 1e-3, 100)),
        Case("deep in the decay", (950, 1000, 1e-3, 100)),
        Case("no warm-up and a 50% decay", (600, 1000, 3e-4, 0, 0.5)),
        Case("a decay of 199.8 steps", (900, 999, 1e-3, 10, 0.2)),
        Case("the first step of a 199.8-step decay", (800, 999, 1e-3, 10)),
    ]


@exercise("1.2", "lr_schedule")
def lr_schedule(learner) -> str:
    return compare_function(learner, L.lr_schedule, _lr_cases(), LR_MISTAKES, atol=1e-12)


# ---------------------------------------------------------------- 1.3 decoder normalisation

NORMALISE_MISTAKES = [
    Mistake(
        "normalised columns",
        lambda W_dec: W_dec / W_dec.norm(dim=-2, keepdim=True),
        "each *row* of W_dec [inst, d_sae, d_in] is one latent's direction: take the norm over "
        "the last axis (dim=-1).",
    ),
    Mistake(
        "divided by the squared norm",
        lambda W_dec: W_dec / W_dec.pow(2).sum(-1, keepdim=True),
        "divide by the norm, not the squared norm.",
    ),
    Mistake(
        "one norm for the whole matrix",
        lambda W_dec: W_dec / W_dec.norm(dim=(-2, -1), keepdim=True),
        "every row gets its own norm (keepdim over dim=-1), not one norm per matrix.",
    ),
]


def _normalise_cases() -> list[Case]:
    g = _g(3)
    return [
        Case("seeded random with 2 instances", (torch.randn(2, 6, 4, generator=g) * 3,)),
        Case("rows already unit-norm", (torch.eye(4)[None],)),
        Case("one instance with one latent", (torch.randn(1, 1, 5, generator=g),)),
        Case(
            "a row of zeros (never trained)",
            (torch.cat([torch.zeros(1, 1, 4), torch.randn(1, 2, 4, generator=g)], 1),),
        ),
    ]


@exercise("1.3", "normalise_decoder_rows")
def normalise_decoder_rows(learner) -> str:
    return compare_function(
        learner, L.normalise_decoder_rows, _normalise_cases(), NORMALISE_MISTAKES
    )


# ---------------------------------------------------------------- 2.1 CE loss with the SAE spliced


@functools.lru_cache(maxsize=1)
def _tiny():
    from course_utils.science.models import random_tokens, tiny_random_model

    model = tiny_random_model(seed=0)
    sae = S.ReLUSAE(model.cfg.d_model, 48, 1, seed=1)
    with torch.no_grad():
        sae.b_enc.fill_(0.05)
    return model, L.single(sae, 0), random_tokens(model, batch=3, seq=10, seed=2)


def _clean_loss(model, sae, tokens, hook_name):
    with torch.no_grad():
        return model(tokens, return_type="loss").item()


def _wrong_hook(model, sae, tokens, hook_name):
    return L.ce_loss_with_sae(model, sae, tokens, hook_name.replace("resid_post", "resid_pre"))


def _latents_spliced(model, sae, tokens, hook_name):
    def hook(act, hook):
        return sae.encode(act)[..., : act.shape[-1]]

    with torch.no_grad():
        return model.run_with_hooks(
            tokens, return_type="loss", fwd_hooks=[(hook_name, hook)]
        ).item()


SPLICE_MISTAKES = [
    Mistake(
        "no splice",
        _clean_loss,
        "that is the clean loss: the hook must *return* sae.decode(sae.encode(activation)).",
    ),
    Mistake(
        "spliced at the hook before",
        _wrong_hook,
        "splice at the hook you were given (hook_name), not the one before it.",
    ),
    Mistake(
        "returned the latents",
        _latents_spliced,
        "the hook must return the reconstruction (decode(encode(x))), not the latents.",
    ),
]


def _splice_cases() -> list[Case]:
    model, sae, tokens = _tiny()
    return [
        Case(
            "tiny model at the layer-0 residual", (model, sae, tokens, "blocks.0.hook_resid_post")
        ),
        Case(
            "tiny model at the layer-1 residual",
            (model, sae, tokens[:1], "blocks.1.hook_resid_post"),
        ),
    ]


@exercise("2.1", "ce_loss_with_sae")
def ce_loss_with_sae(learner) -> str:
    return compare_function(
        learner, L.ce_loss_with_sae, _splice_cases(), SPLICE_MISTAKES, atol=1e-4
    )


# ---------------------------------------------------------------- 2.2 CE loss recovered

RECOVERED_MISTAKES = [
    Mistake(
        "one minus the answer",
        lambda clean, spliced, ablated: (spliced - clean) / (ablated - clean),
        "that is the fraction *lost*: use (ablated - spliced) / (ablated - clean).",
    ),
    Mistake(
        "wrong denominator",
        lambda clean, spliced, ablated: (ablated - spliced) / (ablated - clean + spliced - clean),
        "divide by the full gap between the ablation and the clean model: ablated - clean.",
    ),
    Mistake(
        "clipped to [0, 1]",
        lambda clean, spliced, ablated: min(1.0, max(0.0, (ablated - spliced) / (ablated - clean))),
        "do not clip: an SAE that is worse than the ablation really recovers a negative "
        "fraction, and that is worth seeing.",
    ),
    Mistake(
        "ratio of losses",
        lambda clean, spliced, ablated: clean / spliced,
        "compare *gaps* to the ablation, not the losses themselves.",
    ),
]


def _recovered_cases() -> list[Case]:
    return [
        Case("typical", (3.75, 3.9, 7.0)),
        Case("perfect splice", (3.75, 3.75, 7.0)),
        Case("worse than the ablation", (2.0, 6.0, 5.0)),
    ]


@exercise("2.2", "ce_loss_recovered")
def ce_loss_recovered(learner) -> str:
    return compare_function(learner, L.ce_loss_recovered, _recovered_cases(), RECOVERED_MISTAKES)


# ---------------------------------------------------------------- 4.1 max-activating contexts


def _smallest(feature_acts, k=10):
    flat = feature_acts.flatten()
    values, index = flat.topk(min(k, flat.numel()), largest=False)
    return index // feature_acts.shape[1], index % feature_acts.shape[1], values


def _swapped(feature_acts, k=10):
    w, p, v = L.top_activating(feature_acts, k)
    return p, w, v


def _div_by_windows(feature_acts, k=10):
    flat = feature_acts.flatten()
    values, index = flat.topk(min(k, flat.numel()))
    n_windows = feature_acts.shape[0]
    return index // n_windows, index % n_windows, values


def _per_window(feature_acts, k=10):
    best, where = feature_acts.max(1)
    values, windows = best.topk(min(k, len(best)))
    return windows, where[windows], values


TOP_MISTAKES = [
    Mistake(
        "smallest activations", _smallest, "take the *largest* activations (topk, largest=True)."
    ),
    Mistake(
        "window and position swapped",
        _swapped,
        "flat index i is window i // n_pos and position i % n_pos: return (window, position, value).",
    ),
    Mistake(
        "divided by the number of windows",
        _div_by_windows,
        "a row of the flattened [windows, pos] tensor has n_pos entries: window = i // n_pos "
        "(feature_acts.shape[1]), position = i % n_pos.",
    ),
    Mistake(
        "one per window",
        _per_window,
        "rank every (window, position) pair, so one window may appear more than once.",
    ),
]


def _top_cases() -> list[Case]:
    g = _g(4)
    acts = torch.relu(torch.randn(6, 9, generator=g))
    acts[2, 3], acts[2, 5] = 9.0, 8.0  # two top values in the same window
    spiky = torch.zeros(4, 5)
    spiky[1, 4] = 1.0
    spiky[3, 0] = 2.0
    return [
        Case("seeded random", (acts, 5)),
        Case("a window with two peaks", (acts, 3)),
        Case("two nonzero values", (spiky, 2)),
    ]


@exercise("4.1", "top_activating")
def top_activating(learner) -> str:
    return compare_function(learner, L.top_activating, _top_cases(), TOP_MISTAKES)


# ---------------------------------------------------------------- 4.2 logit weights

LOGIT_MISTAKES = [
    Mistake(
        "softmax",
        lambda W_dec, W_U: (W_dec @ W_U).softmax(-1),
        "logit weights are the raw direct effect W_dec @ W_U: no softmax.",
    ),
    Mistake(
        "encoder direction",
        lambda W_dec, W_U: (W_dec / W_dec.norm(dim=0, keepdim=True)) @ W_U,
        "use W_dec as it is: each row is the feature's direction in the residual stream.",
    ),
    Mistake(
        "transposed",
        lambda W_dec, W_U: (W_dec @ W_U).T,
        "the result is [d_sae, d_vocab]: one row of logit effects per feature.",
    ),
]


def _logit_cases() -> list[Case]:
    g = _g(5)
    W_dec = torch.randn(7, 4, generator=g)
    W_U = torch.randn(4, 11, generator=g)
    return [
        Case("seeded random", (W_dec, W_U)),
        Case("one feature", (W_dec[:1], W_U)),
    ]


@exercise("4.2", "logit_weights")
def logit_weights(learner) -> str:
    return compare_function(learner, L.logit_weights, _logit_cases(), LOGIT_MISTAKES)


# ---------------------------------------------------------------- 4.3 specificity and sensitivity


def _by_count(feature_acts, proxy, threshold=0.0):
    fires = feature_acts.flatten() > threshold
    proxy = proxy.flatten().bool()
    spec = (fires & proxy).float().sum() / fires.float().sum()
    return spec.item(), (feature_acts.flatten()[proxy] > threshold).float().mean().item()


def _swapped_ss(feature_acts, proxy, threshold=0.0):
    a, b = L.specificity_sensitivity(feature_acts, proxy, threshold)
    return b, a


def _no_clamp(feature_acts, proxy, threshold=0.0):
    acts = feature_acts.flatten().float()
    proxy = proxy.flatten().bool()
    spec = (acts[proxy].sum() / acts.sum()).item()
    return spec, (acts[proxy] > threshold).float().mean().item()


def _sens_over_all(feature_acts, proxy, threshold=0.0):
    spec, _ = L.specificity_sensitivity(feature_acts, proxy, threshold)
    fires = feature_acts.flatten() > threshold
    return spec, (fires & proxy.flatten().bool()).float().mean().item()


SS_MISTAKES = [
    Mistake(
        "counted tokens instead of activation mass",
        _by_count,
        "weight by activation: specificity = activation mass on proxy tokens / total mass.",
    ),
    Mistake("swapped", _swapped_ss, "return (specificity, sensitivity), in that order."),
    Mistake(
        "sensitivity over all tokens",
        _sens_over_all,
        "sensitivity is over proxy tokens only: the fraction of them on which the feature fires.",
    ),
    Mistake(
        "negative activations counted as mass",
        _no_clamp,
        "activation mass is acts.clamp_min(0): a negative value (a GELU neuron, a pre-ReLU "
        "latent) is not firing and must not add to or cancel the mass.",
    ),
]


def _ss_cases() -> list[Case]:
    g = _g(6)
    acts = torch.relu(torch.randn(40, generator=g))
    proxy = torch.rand(40, generator=g) < 0.3
    acts2 = torch.zeros(10)
    acts2[[0, 1, 5]] = torch.tensor([3.0, 0.5, 1.0])
    proxy2 = torch.zeros(10, dtype=torch.bool)
    proxy2[[0, 2, 5, 7]] = True
    signed = torch.tensor([2.0, -1.5, 0.5, -0.2, 1.0, -3.0])  # e.g. GELU neurons go below 0
    proxy3 = torch.tensor([True, True, False, False, True, False])
    return [
        Case("seeded random", (acts, proxy)),
        Case("hand-made", (acts2, proxy2)),
        Case("a threshold", (acts, proxy, 0.5)),
        Case("negative activations", (signed, proxy3)),
    ]


@exercise("4.3", "specificity_sensitivity")
def specificity_sensitivity(learner) -> str:
    return compare_function(learner, L.specificity_sensitivity, _ss_cases(), SS_MISTAKES)


# ---------------------------------------------------------------- 4.4 max neuron correlation


def _cosine(feature_acts, neuron_acts):
    f = feature_acts.flatten().float()
    n = neuron_acts.reshape(-1, neuron_acts.shape[-1]).float()
    cos = (f @ n) / (f.norm() * n.norm(dim=0))
    value, index = cos.max(0)
    return value.item(), int(index)


def _abs_corr(feature_acts, neuron_acts):
    f = feature_acts.flatten().float()
    n = neuron_acts.reshape(-1, neuron_acts.shape[-1]).float()
    fc, nc = f - f.mean(), n - n.mean(0)
    corr = ((fc @ nc) / (fc.norm() * nc.norm(dim=0))).abs()
    value, index = corr.max(0)
    return value.item(), int(index)


def _covariance(feature_acts, neuron_acts):
    f = feature_acts.flatten().float()
    n = neuron_acts.reshape(-1, neuron_acts.shape[-1]).float()
    cov = (f - f.mean()) @ (n - n.mean(0)) / len(f)
    value, index = cov.max(0)
    return value.item(), int(index)


def _unbiased_z(feature_acts, neuron_acts):
    f = feature_acts.flatten().float()
    n = neuron_acts.reshape(-1, neuron_acts.shape[-1]).float()
    zf = (f - f.mean()) / f.std()
    zn = (n - n.mean(0)) / n.std(0)
    corr = (zf @ zn) / len(f)
    value, index = corr.max(0)
    return value.item(), int(index)


def _nan_for_dead(feature_acts, neuron_acts):
    f = feature_acts.flatten().float()
    n = neuron_acts.reshape(-1, neuron_acts.shape[-1]).float()
    fc, nc = f - f.mean(), n - n.mean(0)
    value, index = ((fc @ nc) / (fc.norm() * nc.norm(dim=0))).max(0)
    return value.item(), int(index)


CORR_MISTAKES = [
    Mistake(
        "NaN for a dead neuron",
        _nan_for_dead,
        "a neuron that never changes (dead) has zero variance, so its correlation is 0/0 = NaN, "
        "and max() returns the NaN. Give such neurons correlation 0 (e.g. "
        "`torch.where(denom > 0, corr, 0)` or `.nan_to_num(0.0)`) before taking the max.",
    ),
    Mistake(
        "cosine, not correlation",
        _cosine,
        "subtract each variable's mean before the dot product (Pearson correlation).",
    ),
    Mistake(
        "absolute value",
        _abs_corr,
        "a neuron that fires *opposite* to the feature is not the feature: take the signed max.",
    ),
    Mistake(
        "covariance", _covariance, "divide by both standard deviations (norms after centring)."
    ),
    Mistake(
        "z-scores with the unbiased std",
        _unbiased_z,
        "torch's .std() divides by n - 1, so mean(z_f * z_n) is the correlation times (n-1)/n: "
        "use .std(unbiased=False), or skip z-scores: (fc @ nc) / (fc.norm() * nc.norm(dim=0)).",
    ),
]


def _corr_cases() -> list[Case]:
    g = _g(7)
    neurons = torch.randn(50, 6, generator=g)
    feature = torch.relu(0.3 * neurons[:, 2] + torch.randn(50, generator=g)) + 0.5
    anti = -3 * neurons[:, 4] + 0.1 * neurons[:, 1] + 2.0
    dead = neurons.clone()
    dead[:, 0] = 0.0  # never fires: its correlation is 0/0; it must not become NaN (or win)
    return [
        Case("seeded random", (feature, neurons)),
        Case("an anti-correlated neuron", (anti, neurons)),
        Case("feature = a scaled neuron", (2 * neurons[:, 3] + 5, neurons)),
        Case("a dead (constant) neuron", (feature, dead)),
    ]


@exercise("4.4", "max_neuron_correlation")
def max_neuron_correlation(learner) -> str:
    return compare_function(
        learner, L.max_neuron_correlation, _corr_cases(), CORR_MISTAKES, atol=1e-4
    )
