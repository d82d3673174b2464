"""Every chapter-06 check passes the reference and two other correct answers, flags the stub, and
rejects known wrong answers (hooks left attached among them: compare_function rejects those
itself, with its own message)."""

from __future__ import annotations

import pytest
import torch

from course_utils.checks import ch06 as check
from course_utils.checks.core import FAILED, outcome
from course_utils.science import interventions as I
from tests.check_contract import contract_tests

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest.py


# ---------------------------------------------------------------- extra wrong answers


def _edit_in_place(acts, feature, mode, value=0.0):
    acts[..., feature] = {"ablate": 0.0, "clamp": value}.get(mode, 0.0)
    return acts


def _splice_reconstruction_only_when_edited(model, sae, tokens, hook_name, edit, keep_error=True):
    # the spliced model with the error DROPPED for an identity edit (a - dec(f) forgotten)
    return model.run_with_hooks(
        tokens, fwd_hooks=[(hook_name, lambda a, hook: sae.decode(edit(sae.encode(a))))]
    )


def _effect_whole_loss(model, sae, tokens, hook_name, feature):
    return I.ablation_effect(model, sae, tokens, hook_name, feature).mean(-1)


def _steer_once_per_batch(model, tokens, hook_name, direction, coeff):
    return I.run_with_steering(model, tokens, hook_name, direction, coeff / tokens.shape[0])


def _md_normalised(acts, positive):
    v = I.mean_difference_vector(acts, positive)
    return v / v.norm()


def _atp_gradient_wrt_activation(model, sae, tokens, hook_name, metric):
    store = {}

    def grab(a, hook):
        a = a.detach().requires_grad_(True)
        store["a"] = a
        return a

    with torch.enable_grad():
        metric(model.run_with_hooks(tokens, fwd_hooks=[(hook_name, grab)])).sum().backward()
    f = sae.encode(store["a"]).detach()
    return f, -(store["a"].grad @ sae.W_dec.T) * 0.5


def _cc_global_hook(model, sae, clean, corrupt, hook_name, metric):
    """Ignores its hook_name argument in favour of the notebook's global HOOK."""
    return I.clean_corrupt_attribution(model, sae, clean, corrupt, check.HOOK, metric)


def _ig_midpoints(model, sae, tokens, hook_name, metric, steps=10):
    return check._ig_general(model, sae, tokens, hook_name, metric, steps, shift=0.5)


CHECKS = [
    (check.edit_feature, I.edit_feature, check.EDIT_MISTAKES, _edit_in_place),
    (
        check.run_with_feature_edit,
        I.run_with_feature_edit,
        check.SPLICE_MISTAKES,
        _splice_reconstruction_only_when_edited,
    ),
    (check.ablation_effect, I.ablation_effect, check.EFFECT_MISTAKES, _effect_whole_loss),
    (check.run_with_steering, I.run_with_steering, check.STEER_MISTAKES, _steer_once_per_batch),
    (
        check.mean_difference_vector,
        I.mean_difference_vector,
        check.MD_MISTAKES,
        _md_normalised,
    ),
    (
        check.attribution_patching,
        I.attribution_patching,
        check.ATP_MISTAKES,
        _atp_gradient_wrt_activation,
    ),
    (check.integrated_gradients, I.integrated_gradients, check.IG_MISTAKES, _ig_midpoints),
    (
        check.clean_corrupt_attribution,
        I.clean_corrupt_attribution,
        check.CC_MISTAKES,
        _cc_global_hook,
    ),
]

# ---------------------------------------------------------------- other correct answers


def _edit_with_mask(acts, feature, mode, value=0.0):
    mask = torch.zeros(acts.shape[-1], dtype=acts.dtype)
    mask[feature] = 1.0
    col = acts[..., feature : feature + 1]
    if mode == "ablate":
        new = torch.zeros_like(col)
    elif mode == "clamp":
        new = torch.full_like(col, value)
    elif mode == "scale":
        new = col * value
    else:
        new = col + value
    return acts * (1 - mask) + new * mask


def _splice_delta_form(model, sae, tokens, hook_name, edit, keep_error=True):
    def hook(a, hook):
        f = sae.encode(a)
        if keep_error:
            return a + sae.decode(edit(f)) - sae.decode(f)
        return sae.decode(edit(f))

    with model.hooks(fwd_hooks=[(hook_name, hook)]):
        return model(tokens)


def _effect_by_subtraction(model, sae, tokens, hook_name, feature):
    def hook(a, hook):
        f = sae.encode(a)[..., feature : feature + 1]
        return a - f * sae.W_dec[feature]

    with torch.no_grad():
        clean = model(tokens).log_softmax(-1)
        abl = model.run_with_hooks(tokens, fwd_hooks=[(hook_name, hook)]).log_softmax(-1)
    idx = tokens[:, 1:, None]
    return (abl[:, :-1].gather(-1, idx) - clean[:, :-1].gather(-1, idx))[..., 0]


def _steer_with_cat(model, tokens, hook_name, direction, coeff):
    def hook(a, hook):
        return torch.cat([a[:, :1], a[:, 1:] + coeff * direction], dim=1)

    with model.hooks(fwd_hooks=[(hook_name, hook)]):
        return model(tokens)


def _md_with_weights(acts, positive):
    acts = acts.reshape(-1, acts.shape[-1])
    w = positive.flatten().to(acts.dtype)
    return (w @ acts) / w.sum() - ((1 - w) @ acts) / (1 - w).sum()


def _atp_autograd_grad(model, sae, tokens, hook_name, metric):
    store = {}

    def splice(a, hook):
        f = sae.encode(a).detach().requires_grad_(True)
        store["f"] = f
        return a.detach() + sae.decode(f) - sae.decode(f).detach()

    with torch.enable_grad(), model.hooks(fwd_hooks=[(hook_name, splice)]):
        m = metric(model(tokens)).sum()
        (grad,) = torch.autograd.grad(m, store["f"])
    return store["f"].detach(), -(store["f"] * grad).detach()


def _ig_batched(model, sae, tokens, hook_name, metric, steps=10):
    """All alphas in one batch: the prompts repeated `steps` times."""
    alphas = 1 - torch.arange(steps, dtype=torch.float32) / steps
    big = tokens.repeat(steps, 1)
    scale = alphas.repeat_interleave(len(tokens))[:, None, None]
    store = {}

    def splice(a, hook):
        f = sae.encode(a).detach()
        err = (a - sae.decode(f)).detach()
        s = (scale * f).requires_grad_(True)
        store["f"], store["s"] = f, s
        return sae.decode(s) + err

    with torch.enable_grad(), model.hooks(fwd_hooks=[(hook_name, splice)]):
        metric(model(big)).sum().backward()
    grad = store["s"].grad.reshape(steps, len(tokens), *store["s"].shape[1:]).mean(0)
    return -(store["f"][: len(tokens)] * grad).detach()


def _edit_where(acts, feature, mode, value=0.0):
    col = acts[..., feature : feature + 1]
    new = {
        "ablate": lambda: torch.zeros_like(col),
        "clamp": lambda: torch.full_like(col, value),
        "scale": lambda: value * col,
        "add": lambda: col + value,
    }[mode]()
    onehot = torch.arange(acts.shape[-1]) == feature
    return torch.where(onehot, new, acts)


def _splice_add_then_reset(model, sae, tokens, hook_name, edit, keep_error=True):
    """add_hook is fine when the function removes the hook itself before returning."""

    def hook(a, hook):
        f = sae.encode(a)
        out = sae.decode(edit(f))
        return out + (a - sae.decode(f)) if keep_error else out

    model.add_hook(hook_name, hook)
    try:
        return model(tokens)
    finally:
        model.reset_hooks()


def _effect_cross_entropy(model, sae, tokens, hook_name, feature):
    def ablate(f):
        f = f.clone()
        f[..., feature] = 0
        return f

    def logprob(logits):
        return -torch.nn.functional.cross_entropy(
            logits[:, :-1].transpose(1, 2), tokens[:, 1:], reduction="none"
        )

    with torch.no_grad():
        clean = model(tokens)
        ablated = I.run_with_feature_edit(model, sae, tokens, hook_name, ablate)
    return logprob(ablated) - logprob(clean)


def _steer_position_mask(model, tokens, hook_name, direction, coeff):
    mask = torch.ones(tokens.shape[1], 1)
    mask[0] = 0.0
    return model.run_with_hooks(
        tokens, fwd_hooks=[(hook_name, lambda a, hook: a + mask * (coeff * direction))]
    )


def _md_index_select(acts, positive):
    flat = acts.flatten(0, -2)
    p = positive.flatten() != 0
    pos, neg = p.nonzero().squeeze(1), (~p).nonzero().squeeze(1)
    return flat.index_select(0, pos).mean(0) - flat.index_select(0, neg).mean(0)


def _atp_chain_rule(model, sae, tokens, hook_name, metric):
    """dm/df = dm/da @ W_dec.T: the spliced output equals a, and dec is affine."""
    store = {}

    def grab(a, hook):
        a = a.detach().requires_grad_(True)
        store["a"] = a
        return a

    with torch.enable_grad():
        metric(model.run_with_hooks(tokens, fwd_hooks=[(hook_name, grab)])).sum().backward()
    with torch.no_grad():
        f = sae.encode(store["a"])
        return f, -f * (store["a"].grad @ sae.W_dec.T)


def _ig_at_alphas(model, sae, tokens, hook_name, metric, alphas):
    grads, store = [], {}
    for alpha in alphas:

        def splice(a, hook, alpha=alpha):
            f = sae.encode(a).detach()
            err = (a - sae.decode(f)).detach()
            s = (alpha * f).requires_grad_(True)
            store["f"], store["s"] = f, s
            return sae.decode(s) + err

        with torch.enable_grad(), model.hooks(fwd_hooks=[(hook_name, splice)]):
            m = metric(model(tokens)).sum()
            grads.append(torch.autograd.grad(m, store["s"])[0])
    return (-store["f"] * torch.stack(grads).mean(0)).detach()


def _ig_linspace_autograd(model, sae, tokens, hook_name, metric, steps=10):
    alphas = (1 - torch.linspace(0, 1, steps + 1)[:-1]).tolist()
    return _ig_at_alphas(model, sae, tokens, hook_name, metric, alphas)


def _cc_chain_rule(model, sae, clean, corrupt, hook_name, metric):
    """dm/df = dm/da @ W_dec.T on the corrupt run (the spliced output equals a, dec is affine)."""
    store = {}

    def grab(a, hook):
        a = a.detach().requires_grad_(True)
        store["a"] = a
        return a

    with torch.enable_grad():
        metric(model.run_with_hooks(corrupt, fwd_hooks=[(hook_name, grab)])).sum().backward()
    with torch.no_grad():
        _, cache = model.run_with_cache(clean, names_filter=hook_name)
        diff = sae.encode(cache[hook_name]) - sae.encode(store["a"])
        return diff * (store["a"].grad @ sae.W_dec.T)


def _cc_autograd_grad(model, sae, clean, corrupt, hook_name, metric):
    store = {}

    def splice(a, hook):
        f = sae.encode(a).detach().requires_grad_(True)
        store["f"] = f
        return a.detach() + sae.decode(f) - sae.decode(f).detach()

    with torch.no_grad(), model.hooks(fwd_hooks=[(hook_name, splice)]):
        model(clean)
        f_clean = store["f"].detach()
    with torch.enable_grad(), model.hooks(fwd_hooks=[(hook_name, splice)]):
        (grad,) = torch.autograd.grad(metric(model(corrupt)).sum(), store["f"])
    return ((f_clean - store["f"]) * grad).detach()


CORRECT = {
    check.edit_feature: [_edit_with_mask, _edit_where],
    check.run_with_feature_edit: [_splice_delta_form, _splice_add_then_reset],
    check.ablation_effect: [_effect_by_subtraction, _effect_cross_entropy],
    check.run_with_steering: [_steer_with_cat, _steer_position_mask],
    check.mean_difference_vector: [_md_with_weights, _md_index_select],
    check.attribution_patching: [_atp_autograd_grad, _atp_chain_rule],
    check.integrated_gradients: [_ig_batched, _ig_linspace_autograd],
    check.clean_corrupt_attribution: [_cc_chain_rule, _cc_autograd_grad],
}


# ------------------------------------------------- wrong answers a learner writes (issue 13)


def _edit_scale_everything(acts, feature, mode, value=0.0):
    if mode == "scale":
        return acts * value
    return I.edit_feature(acts, feature, mode, value)


def _edit_clamp_as_torch_clamp(acts, feature, mode, value=0.0):
    if mode == "clamp":
        out = acts.clone()
        out[..., feature] = acts[..., feature].clamp(max=value)
        return out
    return I.edit_feature(acts, feature, mode, value)


def _splice_hook_left(model, sae, tokens, hook_name, edit, keep_error=True):
    model.add_hook(hook_name, I.feature_edit_hook(sae, edit, keep_error))
    return model(tokens)


def _splice_edit_ignored(model, sae, tokens, hook_name, edit, keep_error=True):
    return I.run_with_feature_edit(model, sae, tokens, hook_name, lambda f: f, keep_error)


def _effect_hook_left(model, sae, tokens, hook_name, feature):
    clean = model(tokens)
    edit = I.feature_edit_hook(sae, lambda f: I.edit_feature(f, feature, "ablate"))
    model.add_hook(hook_name, edit)
    ablated = model(tokens)
    return I.next_token_logprobs(ablated, tokens) - I.next_token_logprobs(clean, tokens)


def _effect_next_feature(model, sae, tokens, hook_name, feature):
    return I.ablation_effect(model, sae, tokens, hook_name, (feature + 1) % sae.W_dec.shape[0])


def _steer_hook_left(model, tokens, hook_name, direction, coeff):
    model.add_hook(hook_name, I.steering_hook(direction, coeff))
    return model(tokens)


def _steer_position_one_only(model, tokens, hook_name, direction, coeff):
    def hook(a, hook):
        out = a.clone()
        out[:, 1] = out[:, 1] + coeff * direction
        return out

    return model.run_with_hooks(tokens, fwd_hooks=[(hook_name, hook)])


def _md_medians(acts, positive):
    acts = acts.reshape(-1, acts.shape[-1])
    p = positive.bool().flatten()
    return acts[p].median(0).values - acts[~p].median(0).values


def _md_positive_mean_only(acts, positive):
    acts = acts.reshape(-1, acts.shape[-1])
    return acts[positive.bool().flatten()].mean(0)


def _atp_hook_left(model, sae, tokens, hook_name, metric):
    model.add_hook(hook_name, lambda a, hook: a)
    return I.attribution_patching(model, sae, tokens, hook_name, metric)


def _atp_magnitude(model, sae, tokens, hook_name, metric):
    f, attr = I.attribution_patching(model, sae, tokens, hook_name, metric)
    return f, attr.abs()


def _ig_hook_left(model, sae, tokens, hook_name, metric, steps=10):
    out = I.integrated_gradients(model, sae, tokens, hook_name, metric, steps)
    model.add_hook(hook_name, lambda a, hook: a)
    return out


def _edit_ablate_to_value(acts, feature, mode, value=0.0):
    return I.edit_feature(acts, feature, "clamp" if mode == "ablate" else mode, value)


def _effect_global_hook(model, sae, tokens, hook_name, feature):
    return I.ablation_effect(model, sae, tokens, check.HOOK, feature)


def _atp_attached(model, sae, tokens, hook_name, metric):
    f, attr = I.attribution_patching(model, sae, tokens, hook_name, metric)
    return f.requires_grad_(True) * 1.0, attr


def _ig_old_mirrored_grid(model, sae, tokens, hook_name, metric, steps=10):
    """The grid this course used before issue 25: k / steps, the mirror image of Marks et al."""
    return check._ig_general(model, sae, tokens, hook_name, metric, steps, shift=0)


def _atp_global_hook(model, sae, tokens, hook_name, metric):
    return I.attribution_patching(model, sae, tokens, check.HOOK, metric)


def _steer_global_hook(model, tokens, hook_name, direction, coeff):
    return I.run_with_steering(model, tokens, check.HOOK, direction, coeff)


def _ig_global_hook(model, sae, tokens, hook_name, metric, steps=10):
    return I.integrated_gradients(model, sae, tokens, check.HOOK, metric, steps)


def _ig_attached(model, sae, tokens, hook_name, metric, steps=10):
    return I.integrated_gradients(model, sae, tokens, hook_name, metric, steps).requires_grad_(True)


def _cc_grad_on_clean(model, sae, clean, corrupt, hook_name, metric):
    return check._cc_grad_on_clean(model, sae, clean, corrupt, hook_name, metric)


def _cc_attached(model, sae, clean, corrupt, hook_name, metric):
    out = I.clean_corrupt_attribution(model, sae, clean, corrupt, hook_name, metric)
    return out.requires_grad_(True) * 1.0


def _cc_corrupt_minus_clean(model, sae, clean, corrupt, hook_name, metric):
    return -I.clean_corrupt_attribution(model, sae, clean, corrupt, hook_name, metric)


def _cc_no_difference(model, sae, clean, corrupt, hook_name, metric):
    return check._cc_grad_on(model, sae, corrupt, hook_name, metric)


def _ig_linspace_both_ends(model, sae, tokens, hook_name, metric, steps=10):
    alphas = torch.linspace(1, 0, steps).tolist()
    return _ig_at_alphas(model, sae, tokens, hook_name, metric, alphas)


WRONG = {
    check.edit_feature: [
        _edit_scale_everything,
        _edit_clamp_as_torch_clamp,
        _edit_in_place,
        _edit_ablate_to_value,
    ],
    check.run_with_feature_edit: [
        _splice_hook_left,
        _splice_edit_ignored,
        _splice_reconstruction_only_when_edited,
    ],  # fmt: skip
    check.ablation_effect: [
        _effect_hook_left,
        _effect_next_feature,
        _effect_whole_loss,
        _effect_global_hook,
    ],
    check.run_with_steering: [
        _steer_hook_left,
        _steer_position_one_only,
        _steer_once_per_batch,
        _steer_global_hook,
    ],
    check.mean_difference_vector: [
        _md_medians,
        _md_positive_mean_only,
        _md_normalised,
    ],
    check.attribution_patching: [
        _atp_hook_left,
        _atp_magnitude,
        _atp_gradient_wrt_activation,
        _atp_attached,
        _atp_global_hook,
    ],
    check.integrated_gradients: [
        _ig_hook_left,
        _ig_linspace_both_ends,
        _ig_midpoints,
        _ig_old_mirrored_grid,
        _ig_attached,
        _ig_global_hook,
    ],
    check.clean_corrupt_attribution: [
        _cc_grad_on_clean,
        _cc_attached,
        _cc_corrupt_minus_clean,
        _cc_no_difference,
        _cc_global_hook,
    ],
}
contract_tests(check, CHECKS, globals(), correct=CORRECT, wrong=WRONG)


def test_hook_left_behind_gets_the_generic_message():
    """The chapter's own "hook left attached" Mistakes are gone: compare_function rejects any
    hook left on the model, and names it."""
    for check_fn, impl in [
        (check.run_with_feature_edit, _splice_hook_left),
        (check.run_with_steering, _steer_hook_left),
        (check.attribution_patching, _atp_hook_left),
    ]:
        status, message = outcome(check_fn, impl)
        assert status == FAILED and "left a hook registered" in message, message
        assert "Hint:" not in message, message
