"""Every chapter-06 check passes the reference and other correct answers, flags the stub, and
rejects known wrong answers (including hooks left attached)."""

from __future__ import annotations

import pytest
import torch

from course_utils import interventions as I
from course_utils.checks import ch06 as check
from course_utils.checks.core import FAILED, PASSED, outcome
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
]

contract_tests(check, CHECKS, globals())


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
    w = positive.flatten().float()
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
    alphas = torch.arange(steps, dtype=torch.float32) / steps
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


ALTERNATIVES = [
    (check.edit_feature, [_edit_with_mask]),
    (check.run_with_feature_edit, [_splice_delta_form]),
    (check.ablation_effect, [_effect_by_subtraction]),
    (check.run_with_steering, [_steer_with_cat]),
    (check.mean_difference_vector, [_md_with_weights]),
    (check.attribution_patching, [_atp_autograd_grad]),
    (check.integrated_gradients, [_ig_batched]),
]


@pytest.mark.parametrize(
    "check_fn, answer",
    [(c, a) for c, answers in ALTERNATIVES for a in answers],
    ids=[f"{c.exercise.name}: {a.__name__}" for c, answers in ALTERNATIVES for a in answers],
)
def test_a_second_correct_answer_passes(check_fn, answer):
    assert outcome(check_fn, answer) == (PASSED, "")


def test_hook_left_behind_message_names_the_hook():
    status, message = outcome(check.run_with_steering, check._steer_hook_left)
    assert status == FAILED and "model.add_hook" in message
