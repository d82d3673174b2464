"""Checks for chapter 06, intervening on features.

References live in :mod:`course_utils.science.interventions`. Every check of hook-using code runs it on
a tiny random model with a tiny SAELens SAE; compare_function fails any case after which a hook is
left attached (or the model changed), so no chapter-specific "hook left" Mistake is needed.
"""

from __future__ import annotations

import copy
import functools

import torch

from course_utils.checks.core import (
    Case,
    Mistake,
    compare_function,
    exercise,
)
from course_utils.science import interventions as I

HOOK = "blocks.0.hook_resid_post"


def _g(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def tiny_sae(d_in: int = 32, d_sae: int = 24, hook_name: str = HOOK, seed: int = 1):
    """A SAELens StandardSAE with seeded random weights, about a third of its latents active."""
    from sae_lens import StandardSAE, StandardSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    cfg = StandardSAEConfig(
        d_in=d_in, d_sae=d_sae, apply_b_dec_to_input=True,
        metadata=SAEMetadata(hook_name=hook_name, model_name="tiny"),
    )  # fmt: skip
    sae = StandardSAE(cfg)
    g = _g(seed)
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(d_in, d_sae, generator=g) / d_in**0.5)
        sae.b_enc.copy_(torch.randn(d_sae, generator=g) * 0.3 - 0.2)
        W_dec = torch.randn(d_sae, d_in, generator=g)
        sae.W_dec.copy_(W_dec / W_dec.norm(dim=-1, keepdim=True))
        sae.b_dec.copy_(torch.randn(d_in, generator=g) * 0.1)
    return sae.eval().requires_grad_(False)


@functools.lru_cache(maxsize=1)
def _tiny_parts():
    from course_utils.science.models import random_tokens, tiny_random_model

    model = tiny_random_model(seed=0).requires_grad_(False)
    return model, tiny_sae(), random_tokens(model, batch=3, seq=10, seed=2)


def _tiny():
    model, sae, tokens = _tiny_parts()
    return copy.deepcopy(model), copy.deepcopy(sae), tokens.clone()


def _hooked_check(learner, reference, cases, mistakes, atol=1e-4, rtol=1e-4) -> str:
    """compare_function itself fails any case after which the learner's code left a hook on the
    model (or changed it), with its own message; here only the values are compared."""
    return (
        compare_function(learner, reference, cases, mistakes, atol=atol, rtol=rtol)
        + "; no hook left behind"
    )


def _detached_compare(atol: float = 1e-4, rtol: float = 1e-4):
    """The default comparison, after checking that no returned tensor is still attached to an
    autograd graph (the text asks for detached outputs)."""
    from course_utils.checks.core import mismatch

    def compare(expected, actual):
        outs = actual if isinstance(actual, tuple | list) else (actual,)
        if any(isinstance(t, torch.Tensor) and t.requires_grad for t in outs):
            return (
                "your function returned a tensor that still requires grad (attached to the "
                "autograd graph, holding the whole forward pass in memory). Return "
                "`.detach()`-ed tensors, as the exercise asks"
            )
        return mismatch(expected, actual, atol, rtol)

    return compare


def _hooked_detached_check(learner, reference, cases, mistakes, atol=1e-4, rtol=1e-4) -> str:
    return (
        compare_function(learner, reference, cases, mistakes, compare=_detached_compare(atol, rtol))
        + "; outputs detached; no hook left behind"
    )


# ---------------------------------------------------------------- 1.1 edit_feature


def _edit_position_axis(acts, feature, mode, value=0.0):
    out = acts.clone()
    col = out[:, feature]
    new = {"ablate": 0 * col, "clamp": 0 * col + value, "scale": col * value,
           "add": col + value}[mode]  # fmt: skip
    out[:, feature] = new
    return out


def _clamp_where_active(acts, feature, mode, value=0.0):
    out = I.edit_feature(acts, feature, mode, value)
    if mode == "clamp":
        col = acts[..., feature]
        out[..., feature] = torch.where(col > 0, torch.full_like(col, value), col)
    return out


def _scale_adds(acts, feature, mode, value=0.0):
    return I.edit_feature(acts, feature, "add" if mode == "scale" else mode, value)


def _add_clamps(acts, feature, mode, value=0.0):
    return I.edit_feature(acts, feature, "clamp" if mode == "add" else mode, value)


def _ablate_everything(acts, feature, mode, value=0.0):
    if mode == "ablate":
        return torch.zeros_like(acts)
    return I.edit_feature(acts, feature, mode, value)


EDIT_MISTAKES = [
    Mistake(
        "edited the position axis",
        _edit_position_axis,
        "the feature index is the LAST axis: acts[..., feature], not acts[:, feature] (which on "
        "[batch, pos, d_sae] picks a position).",
    ),
    Mistake(
        "clamped only where active",
        _clamp_where_active,
        "clamping sets the feature to `value` at EVERY position (Templeton et al. 2024), also "
        "where it was 0; only then is it an intervention independent of the input.",
    ),
    Mistake(
        "scale adds",
        _scale_adds,
        "'scale' multiplies the feature by `value` (value=0 ablates, -1 flips the sign); "
        "'add' is the one that adds.",
    ),
    Mistake(
        "add clamps",
        _add_clamps,
        "'add' adds `value` to the feature's current activation; 'clamp' is the one that sets it.",
    ),
    Mistake(
        "ablated every feature",
        _ablate_everything,
        "ablate only column `feature`; every other feature keeps its value.",
    ),
]


def _edit_cases() -> list[Case]:
    g = _g(10)
    acts = torch.relu(torch.randn(2, 5, 7, generator=g))
    acts[0, :, 3] = 0.0  # inactive at some positions
    acts[1, :2, 3] = 0.0
    flat = torch.relu(torch.randn(6, 9, generator=_g(11)))
    return [
        Case("ablate on [batch, pos, d_sae]", (acts, 3, "ablate")),
        Case("clamp to 2.5 where partly inactive", (acts, 3, "clamp", 2.5)),
        Case("scale by -1", (acts, 1, "scale", -1.0)),
        Case("scale by 0.5", (acts, 3, "scale", 0.5)),
        Case("add 1.5", (acts, 6, "add", 1.5)),
        Case("[n, d_sae] input, last feature", (flat, 8, "clamp", -0.7)),
        Case("batch of one", (acts[:1, :1], 0, "ablate")),
        Case("ablate ignores a non-zero value", (acts, 2, "ablate", 2.5)),
        Case("float64 input", (acts.double(), 4, "add", -0.25)),
    ]


@exercise("1.1", "edit_feature")
def edit_feature(learner) -> str:
    return compare_function(learner, I.edit_feature, _edit_cases(), EDIT_MISTAKES)


# ---------------------------------------------------------------- 1.2 run_with_feature_edit


def _error_from_edit(model, sae, tokens, hook_name, edit, keep_error=True):
    def hook(a, hook):
        new = sae.decode(edit(sae.encode(a)))
        return new + (a - new) if keep_error else new

    return model.run_with_hooks(tokens, fwd_hooks=[(hook_name, hook)])


def _never_error(model, sae, tokens, hook_name, edit, keep_error=True):
    return I.run_with_feature_edit(model, sae, tokens, hook_name, edit, keep_error=False)


def _always_error(model, sae, tokens, hook_name, edit, keep_error=True):
    return I.run_with_feature_edit(model, sae, tokens, hook_name, edit, keep_error=True)


def _error_sign(model, sae, tokens, hook_name, edit, keep_error=True):
    def hook(a, hook):
        f = sae.encode(a)
        new = sae.decode(edit(f))
        return new - (a - sae.decode(f)) if keep_error else new

    return model.run_with_hooks(tokens, fwd_hooks=[(hook_name, hook)])


def _hook_returns_none(model, sae, tokens, hook_name, edit, keep_error=True):
    def hook(a, hook):
        f = sae.encode(a)
        a = sae.decode(edit(f)) + (a - sae.decode(f)) if keep_error else sae.decode(edit(f))

    return model.run_with_hooks(tokens, fwd_hooks=[(hook_name, hook)])


SPLICE_MISTAKES = [
    Mistake(
        "error computed after the edit",
        _error_from_edit,
        "compute the error from the UNEDITED features, eps = a - sae.decode(f), then return "
        "sae.decode(edit(f)) + eps. An error taken after the edit cancels it exactly.",
    ),
    Mistake(
        "keep_error ignored (never added)",
        _never_error,
        "with keep_error=True add the reconstruction error back: dec(f') + (a - dec(f)). Only "
        "keep_error=False returns dec(f') alone.",
    ),
    Mistake(
        "keep_error ignored (always added)",
        _always_error,
        "with keep_error=False return only sae.decode(edit(f)): that is the spliced model "
        "without its error term.",
    ),
    Mistake(
        "error subtracted",
        _error_sign,
        "the error is a - dec(f), and it is ADDED: dec(f') + (a - dec(f)) equals a when f' = f.",
    ),
    Mistake(
        "hook returns None",
        _hook_returns_none,
        "a TransformerLens hook edits the activation by RETURNING the new tensor; assigning to the "
        "argument inside the hook changes nothing.",
    ),
]


def _splice_cases() -> list[Case]:
    model, sae, tokens = _tiny()
    sae1 = tiny_sae(hook_name="blocks.1.hook_resid_post", seed=3)

    def ablate(f):
        return I.edit_feature(f, 5, "ablate")

    def clamp(f):
        return I.edit_feature(f, 2, "clamp", 3.0)

    def identity(f):
        return f

    def double_all(f):
        return 2 * f

    return [
        Case("clamp feature 2 to 3, no error term", (model, sae, tokens, HOOK, clamp, False)),
        Case("ablate feature 5, error kept", (model, sae, tokens, HOOK, ablate)),
        Case("clamp feature 2 to 3, error kept", (model, sae, tokens, HOOK, clamp)),
        Case("no edit, no error term", (model, sae, tokens, HOOK, identity, False)),
        Case(
            "every feature doubled at blocks.1.hook_resid_post, batch of one",
            (model, sae1, tokens[:1], "blocks.1.hook_resid_post", double_all),
        ),
    ]


@exercise("1.2", "run_with_feature_edit")
def run_with_feature_edit(learner) -> str:
    return _hooked_check(learner, I.run_with_feature_edit, _splice_cases(), SPLICE_MISTAKES)


# ---------------------------------------------------------------- 2.1 ablation_effect


def _effect_flipped(model, sae, tokens, hook_name, feature):
    return -I.ablation_effect(model, sae, tokens, hook_name, feature)


def _effect_unshifted(model, sae, tokens, hook_name, feature):
    clean = model(tokens)
    abl = I.run_with_feature_edit(
        model, sae, tokens, hook_name, lambda f: I.edit_feature(f, feature, "ablate")
    )

    def lp(logits):
        return logits[:, 1:].log_softmax(-1).gather(-1, tokens[:, 1:, None])[..., 0]

    return lp(abl) - lp(clean)


def _effect_no_error(model, sae, tokens, hook_name, feature):
    clean = model(tokens)
    abl = I.run_with_feature_edit(
        model, sae, tokens, hook_name, lambda f: I.edit_feature(f, feature, "ablate"), False
    )
    return I.next_token_logprobs(abl, tokens) - I.next_token_logprobs(clean, tokens)


def _effect_probs(model, sae, tokens, hook_name, feature):
    clean = model(tokens)
    abl = I.run_with_feature_edit(
        model, sae, tokens, hook_name, lambda f: I.edit_feature(f, feature, "ablate")
    )
    return I.next_token_logprobs(abl, tokens).exp() - I.next_token_logprobs(clean, tokens).exp()


def _effect_logits(model, sae, tokens, hook_name, feature):
    clean = model(tokens)
    abl = I.run_with_feature_edit(
        model, sae, tokens, hook_name, lambda f: I.edit_feature(f, feature, "ablate")
    )

    def lg(logits):
        return logits[:, :-1].gather(-1, tokens[:, 1:, None])[..., 0]

    return lg(abl) - lg(clean)


EFFECT_MISTAKES = [
    Mistake(
        "clean minus ablated",
        _effect_flipped,
        "return ablated MINUS clean: negative where the feature helped predict the next token.",
    ),
    Mistake(
        "predicting the current token",
        _effect_unshifted,
        "the logits at position t predict token t + 1: compare logits[:, :-1] with tokens[:, 1:].",
    ),
    Mistake(
        "error term dropped",
        _effect_no_error,
        "ablate with the error kept (your run_with_feature_edit with keep_error=True): without it "
        "the 'effect' includes the whole reconstruction error and is non-zero everywhere.",
    ),
    Mistake(
        "probabilities",
        _effect_probs,
        "compare log-probabilities (log_softmax), not probabilities.",
    ),
    Mistake(
        "raw logits",
        _effect_logits,
        "take log_softmax of the logits first: a raw logit change ignores what happens to every "
        "other token's logit.",
    ),
]


def _effect_cases() -> list[Case]:
    model, sae, tokens = _tiny()
    return [
        Case("feature 5", (model, sae, tokens, HOOK, 5)),
        Case("feature 0, batch of one", (model, sae, tokens[:1], HOOK, 0)),
        Case("last feature", (model, sae, tokens, HOOK, 23)),
        Case(
            "SAE at blocks.1.hook_resid_post",
            (
                model,
                tiny_sae(hook_name="blocks.1.hook_resid_post", seed=3),
                tokens,
                "blocks.1.hook_resid_post",
                4,
            ),
        ),  # fmt: skip
    ]


@exercise("2.1", "ablation_effect")
def ablation_effect(learner) -> str:
    return _hooked_check(learner, I.ablation_effect, _effect_cases(), EFFECT_MISTAKES)


# ---------------------------------------------------------------- 3.1 run_with_steering


def _steer_with_bos(model, tokens, hook_name, direction, coeff):
    return model.run_with_hooks(
        tokens, fwd_hooks=[(hook_name, lambda a, hook: a + coeff * direction)]
    )


def _steer_normalised(model, tokens, hook_name, direction, coeff):
    return I.run_with_steering(model, tokens, hook_name, direction / direction.norm(), coeff)


def _steer_last_only(model, tokens, hook_name, direction, coeff):
    def hook(a, hook):
        out = a.clone()
        out[:, -1] = out[:, -1] + coeff * direction
        return out

    return model.run_with_hooks(tokens, fwd_hooks=[(hook_name, hook)])


def _steer_subtract(model, tokens, hook_name, direction, coeff):
    return I.run_with_steering(model, tokens, hook_name, direction, -coeff)


STEER_MISTAKES = [
    Mistake(
        "BOS steered too",
        _steer_with_bos,
        "leave position 0 alone: add the vector to activation[:, 1:] only. BOS's residual is "
        "huge and every token attends to it, so steering it changes everything.",
    ),
    Mistake(
        "direction normalised",
        _steer_normalised,
        "add coeff * direction exactly as given; normalising is the caller's choice.",
    ),
    Mistake(
        "last position only",
        _steer_last_only,
        "steer every position after BOS (1:), not only the last: earlier positions feed the "
        "last one through attention.",
    ),
    Mistake(
        "subtracted",
        _steer_subtract,
        "ADD coeff * direction: a positive coefficient pushes towards the direction.",
    ),
]


def _steer_cases() -> list[Case]:
    model, _, tokens = _tiny()
    d = torch.randn(model.cfg.d_model, generator=_g(20)) * 0.7
    return [
        Case("resid_post 0, coeff 3", (model, tokens, HOOK, d, 3.0)),
        Case("resid_post 1, coeff -2", (model, tokens, "blocks.1.hook_resid_post", d, -2.0)),
        Case("coeff 0 changes nothing", (model, tokens[:1], HOOK, d, 0.0)),
        Case("batch of one, coeff 5", (model, tokens[:1], HOOK, d, 5.0)),
    ]


@exercise("3.1", "run_with_steering")
def run_with_steering(learner) -> str:
    return _hooked_check(learner, I.run_with_steering, _steer_cases(), STEER_MISTAKES)


# ---------------------------------------------------------------- 3.2 mean_difference_vector


def _md_reversed(acts, positive):
    return -I.mean_difference_vector(acts, positive)


def _md_global_mean(acts, positive):
    acts = acts.reshape(-1, acts.shape[-1])
    return acts[positive.bool().flatten()].mean(0) - acts.mean(0)


def _md_sum(acts, positive):
    acts = acts.reshape(-1, acts.shape[-1])
    p = positive.bool().flatten()
    return acts[p].sum(0) - acts[~p].sum(0)


MD_MISTAKES = [
    Mistake(
        "negatives minus positives",
        _md_reversed,
        "positive minus negative: adding the vector should move towards the positive examples.",
    ),
    Mistake(
        "minus the overall mean",
        _md_global_mean,
        "subtract the mean of the NEGATIVE examples (where positive is False), not the mean of "
        "all of them.",
    ),
    Mistake(
        "sums instead of means",
        _md_sum,
        "use means: with unequal group sizes, sums measure the group sizes.",
    ),
]


def _md_cases() -> list[Case]:
    g = _g(30)
    acts = torch.randn(4, 6, 5, generator=g) + 1.0
    pos = torch.rand(4, 6, generator=g) < 0.3
    pos[0, 0], pos[0, 1] = True, False
    flat = torch.randn(9, 3, generator=_g(31))
    lab = torch.tensor([1, 0, 0, 0, 1, 0, 0, 0, 0], dtype=torch.bool)
    return [
        Case("[batch, pos, d] with ~30% positive", (acts, pos)),
        Case("[n, d] with 2 of 9 positive", (flat, lab)),
        Case("integer labels", (flat, lab.long())),
        Case("float64 activations", (acts.double(), pos)),
    ]


@exercise("3.2", "mean_difference_vector")
def mean_difference_vector(learner) -> str:
    return compare_function(learner, I.mean_difference_vector, _md_cases(), MD_MISTAKES)


# ---------------------------------------------------------------- 4.1 attribution patching


def _atp_mean(model, sae, tokens, hook_name, metric):
    return I.attribution_patching(model, sae, tokens, hook_name, lambda lg: metric(lg) / len(lg))


def _atp_plus(model, sae, tokens, hook_name, metric):
    f, attr = I.attribution_patching(model, sae, tokens, hook_name, metric)
    return f, -attr


def _atp_error_attached(model, sae, tokens, hook_name, metric):
    store = {}

    def splice(a, hook):
        f = sae.encode(a.detach()).detach().requires_grad_(True)
        store["f"] = f
        return sae.decode(f) + (a - sae.decode(f))

    with torch.enable_grad():
        logits = model.run_with_hooks(tokens, fwd_hooks=[(hook_name, splice)])
        out = metric(logits).sum()
        if out.requires_grad:
            out.backward()
    f = store["f"]
    grad = f.grad if f.grad is not None else torch.zeros_like(f)
    return f.detach(), (-f * grad).detach()


def _atp_gradient_only(model, sae, tokens, hook_name, metric):
    f, attr = I.attribution_patching(model, sae, tokens, hook_name, metric)
    grad = torch.where(f > 0, -attr / f.clamp_min(1e-12), torch.zeros_like(f))
    return f, -grad


ATP_MISTAKES = [
    Mistake(
        "mean over the batch",
        _atp_mean,
        "SUM the per-prompt metrics before .backward(): a mean divides every prompt's gradient "
        "by the batch size, and prompts do not interact.",
    ),
    Mistake(
        "sign flipped",
        _atp_plus,
        "ablating takes f from its value to 0, a change of -f: the estimate is -f * dm/df.",
    ),
    Mistake(
        "error not detached",
        _atp_error_attached,
        "detach the error: with eps = a - dec(f) attached, dec(f) + eps = a whatever f is, so "
        "no gradient reaches the features. Use (a - sae.decode(f)).detach().",
    ),
    Mistake(
        "gradient without the activation",
        _atp_gradient_only,
        "multiply the gradient by the change the ablation makes, -f: a large gradient on a "
        "feature that is 0 means nothing for its ablation.",
    ),
]


def _logit_diff(a: int, b: int):
    def metric(logits):
        return logits[:, -1, a] - logits[:, -1, b]

    metric.__name__ = f"logit[{a}] - logit[{b}]"
    return metric


def _mean_logprob(logits):
    return logits.log_softmax(-1)[:, -3:, 7].mean(-1)


def _atp_cases() -> list[Case]:
    model, sae, tokens = _tiny()
    sae1 = tiny_sae(hook_name="blocks.1.hook_resid_post", seed=3)
    return [
        Case(
            "logit difference at the last position", (model, sae, tokens, HOOK, _logit_diff(3, 9))
        ),
        Case("log-prob over three positions", (model, sae, tokens, HOOK, _mean_logprob)),
        Case(
            "SAE at blocks.1.hook_resid_post, batch of one",
            (model, sae1, tokens[:1], "blocks.1.hook_resid_post", _logit_diff(0, 1)),
        ),
    ]


@exercise("4.1", "attribution_patching")
def attribution_patching(learner) -> str:
    return _hooked_detached_check(
        learner, I.attribution_patching, _atp_cases(), ATP_MISTAKES, atol=1e-4
    )


# ---------------------------------------------------------------- 4.2 integrated gradients


def _ig_endpoint(model, sae, tokens, hook_name, metric, steps=10):
    f, attr = I.attribution_patching(model, sae, tokens, hook_name, metric)
    return attr


def _ig_alpha_shift(model, sae, tokens, hook_name, metric, steps=10):
    return _ig_general(model, sae, tokens, hook_name, metric, steps, shift=1)


def _ig_mirrored(model, sae, tokens, hook_name, metric, steps=10):
    return _ig_general(model, sae, tokens, hook_name, metric, steps, shift=0)


def _ig_no_average(model, sae, tokens, hook_name, metric, steps=10):
    return I.integrated_gradients(model, sae, tokens, hook_name, metric, steps) * steps


def _ig_scale_error(model, sae, tokens, hook_name, metric, steps=10):
    return _ig_general(model, sae, tokens, hook_name, metric, steps, scale_error=True)


def _ig_general(model, sae, tokens, hook_name, metric, steps, shift=0, scale_error=False):
    """alpha = (k + shift) / steps, the fraction of each feature kept (the reference uses
    1 - k / steps)."""
    store, total = {}, None
    for k in range(steps):
        alpha = (k + shift) / steps

        def splice(a, hook, alpha=alpha):
            f = sae.encode(a.detach()).detach()
            err = (a - sae.decode(f)).detach()
            s = (alpha * f).requires_grad_(True)
            store["f"], store["s"] = f, s
            return sae.decode(s) + (alpha * err if scale_error else err)

        with torch.enable_grad():
            logits = model.run_with_hooks(tokens, fwd_hooks=[(hook_name, splice)])
            metric(logits).sum().backward()
        total = store["s"].grad if total is None else total + store["s"].grad
    return (-store["f"] * total / steps).detach()


IG_MISTAKES = [
    Mistake(
        "plain attribution",
        _ig_endpoint,
        "integrated gradients averages the gradient over `steps` points (1 - t) * f with "
        "t = k / steps, k = 0..steps-1, not just at the clean point (t = 0).",
    ),
    Mistake(
        "grid from the ablated end",
        _ig_mirrored,
        "the grid is mirrored: Marks et al. step t = k / steps from the CLEAN end, features "
        "(1 - t) * f, so the clean point (t = 0) is in and the all-ablated point (t = 1) out; "
        "yours scales by k / steps, which includes the ablated point and leaves out the clean one.",
    ),
    Mistake(
        "summed, not averaged",
        _ig_no_average,
        "divide the summed gradients by `steps`: the integral is a mean over the path.",
    ),
    Mistake(
        "error scaled too",
        _ig_scale_error,
        "scale only the features; keep the error term fixed at its clean value (it is not part "
        "of the ablation).",
    ),
]


def _ig_cases() -> list[Case]:
    model, sae, tokens = _tiny()
    return [
        Case("10 steps, logit difference", (model, sae, tokens, HOOK, _logit_diff(3, 9), 10)),
        Case("3 steps, log-prob metric", (model, sae, tokens, HOOK, _mean_logprob, 3)),
        Case("1 step, batch of one", (model, sae, tokens[:1], HOOK, _logit_diff(4, 2), 1)),
        Case(
            "4 steps, SAE at blocks.1.hook_resid_post",
            (
                model,
                tiny_sae(hook_name="blocks.1.hook_resid_post", seed=3),
                tokens,
                "blocks.1.hook_resid_post",
                _logit_diff(3, 9),
                4,
            ),
        ),  # fmt: skip
    ]


@exercise("4.2", "integrated_gradients")
def integrated_gradients(learner) -> str:
    return _hooked_detached_check(
        learner, I.integrated_gradients, _ig_cases(), IG_MISTAKES, atol=1e-4
    )


# ---------------------------------------------------------------- 4.3 clean/corrupt attribution


def _cc_parts(model, sae, clean, corrupt, hook_name):
    store = {}

    def grab(a, hook):
        store["f"] = sae.encode(a).detach()

    with torch.no_grad():
        model.run_with_hooks(clean, fwd_hooks=[(hook_name, grab)])
        f_clean = store["f"]
        model.run_with_hooks(corrupt, fwd_hooks=[(hook_name, grab)])
    return f_clean, store["f"]


def _cc_grad_on(model, sae, tokens, hook_name, metric, error: str = "detached"):
    """The gradient of the summed metric with respect to the features on ``tokens``' run; the
    splice keeps the error term detached (the reference), attached, or drops it ("none")."""
    store = {}

    def splice(a, hook):
        f = sae.encode(a.detach()).detach().requires_grad_(True)
        store["f"] = f
        if error == "none":
            return sae.decode(f)
        err = a - sae.decode(f)
        return sae.decode(f) + (err.detach() if error == "detached" else err)

    with torch.enable_grad():
        logits = model.run_with_hooks(tokens, fwd_hooks=[(hook_name, splice)])
        metric(logits).sum().backward()
    return store["f"].grad


def _cc_grad_on_clean(model, sae, clean, corrupt, hook_name, metric):
    f_clean, f_corrupt = _cc_parts(model, sae, clean, corrupt, hook_name)
    return (f_clean - f_corrupt) * _cc_grad_on(model, sae, clean, hook_name, metric)


def _cc_sign(model, sae, clean, corrupt, hook_name, metric):
    return -I.clean_corrupt_attribution(model, sae, clean, corrupt, hook_name, metric)


def _cc_gradient_only(model, sae, clean, corrupt, hook_name, metric):
    return _cc_grad_on(model, sae, corrupt, hook_name, metric)


def _cc_clean_times_grad(model, sae, clean, corrupt, hook_name, metric):
    f_clean, _ = _cc_parts(model, sae, clean, corrupt, hook_name)
    return f_clean * _cc_grad_on(model, sae, corrupt, hook_name, metric)


def _cc_batch_mean(model, sae, clean, corrupt, hook_name, metric):
    return I.clean_corrupt_attribution(model, sae, clean, corrupt, hook_name, metric) / len(clean)


def _cc_error_attached(model, sae, clean, corrupt, hook_name, metric):
    f_clean, f_corrupt = _cc_parts(model, sae, clean, corrupt, hook_name)
    return (f_clean - f_corrupt) * _cc_grad_on(model, sae, corrupt, hook_name, metric, "attached")


def _cc_no_error(model, sae, clean, corrupt, hook_name, metric):
    f_clean, f_corrupt = _cc_parts(model, sae, clean, corrupt, hook_name)
    return (f_clean - f_corrupt) * _cc_grad_on(model, sae, corrupt, hook_name, metric, "none")


def _cc_global_hook(model, sae, clean, corrupt, hook_name, metric):
    f_clean, f_corrupt = _cc_parts(model, sae, clean, corrupt, HOOK)
    return (f_clean - f_corrupt) * _cc_grad_on(model, sae, corrupt, HOOK, metric)


CC_MISTAKES = [
    Mistake(
        "metric averaged over the batch",
        _cc_batch_mean,
        "back-propagate the SUM of the metric over the prompts (`metric(logits).sum()`): each "
        "prompt's features only affect its own metric, and `.mean()` divides every gradient by "
        "the batch size.",
    ),
    Mistake(
        "error term not detached",
        _cc_error_attached,
        "detach the error term: `sae.decode(f) + (a - sae.decode(f)).detach()`. Left attached, "
        "the gradient through the error cancels the one through the decoder, and every "
        "attribution is 0.",
    ),
    Mistake(
        "no error term",
        _cc_no_error,
        "keep the error term in the splice (`sae.decode(f) + (a - sae.decode(f)).detach()`), so "
        "the forward pass is the real model's and the gradient is taken at the real run.",
    ),
    Mistake(
        "the notebook's HOOK, not the hook_name argument",
        _cc_global_hook,
        "use the `hook_name` argument, not the notebook's global HOOK: the check also runs an SAE "
        "that sits at another hook.",
    ),
    Mistake(
        "gradient on the clean run",
        _cc_grad_on_clean,
        "take the gradient on the CORRUPT run: the estimate is of patching clean values INTO "
        "the corrupt run, so the linearisation is around the corrupt point (Nanda's form).",
    ),
    Mistake(
        "corrupt minus clean",
        _cc_sign,
        "the patch moves each feature from its corrupt value to its clean value: multiply the "
        "gradient by f_clean - f_corrupt.",
    ),
    Mistake(
        "gradient without the difference",
        _cc_gradient_only,
        "multiply the gradient by the change the patch makes, f_clean - f_corrupt: a feature "
        "that is the same in both runs cannot change anything when patched.",
    ),
    Mistake(
        "clean activation, not the difference",
        _cc_clean_times_grad,
        "use the DIFFERENCE f_clean - f_corrupt, not f_clean alone (that is the ablation form, "
        "exercise 4.1, with the sign flipped).",
    ),
]


def _cc_cases() -> list[Case]:
    model, sae, tokens = _tiny()
    corrupt = tokens.roll(1, dims=0).clone()
    corrupt[:, :3] = tokens[:, :3]  # a shared prefix: those positions do not differ
    sae1 = tiny_sae(hook_name="blocks.1.hook_resid_post", seed=3)
    return [
        Case(
            "logit difference, 3 prompt pairs",
            (model, sae, tokens, corrupt, HOOK, _logit_diff(3, 9)),
        ),
        Case("log-prob metric", (model, sae, tokens, corrupt, HOOK, _mean_logprob)),
        Case(
            "SAE at blocks.1.hook_resid_post, one pair",
            (model, sae1, tokens[:1], corrupt[:1], "blocks.1.hook_resid_post", _logit_diff(0, 1)),
        ),
        Case(
            "clean = corrupt gives zeros",
            (model, sae, tokens[:2], tokens[:2].clone(), HOOK, _logit_diff(3, 9)),
        ),
    ]


@exercise("4.3", "clean_corrupt_attribution")
def clean_corrupt_attribution(learner) -> str:
    return _hooked_detached_check(
        learner, I.clean_corrupt_attribution, _cc_cases(), CC_MISTAKES, atol=1e-4
    )
