"""Every chapter-05 check passes the reference, flags the stub, and rejects known wrong answers."""

from __future__ import annotations

import pytest
import torch

from course_utils.checks import ch05 as check
from course_utils.checks.core import outcome
from course_utils.science import circuits as C
from course_utils.science import transcoders as T
from tests.check_contract import contract_tests

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest.py


def _forward_leaky(x, W_enc, b_enc, W_dec, b_dec):
    z = torch.nn.functional.leaky_relu(x @ W_enc + b_enc, 0.1)
    return z, z @ W_dec + b_dec


def _pair_resid_pre(model, tokens, layer):
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens)
    return cache[f"blocks.{layer}.hook_resid_pre"], cache[f"blocks.{layer}.hook_mlp_out"]


# (check, reference, mistakes, an extra wrong answer not in the mistakes list)
CHECKS = [
    (check.transcoder_forward, T.transcoder_forward, check.FORWARD_MISTAKES, _forward_leaky),
    (
        check.transcoder_loss,
        T.transcoder_loss,
        check.LOSS_MISTAKES,
        lambda x, y, W_enc, b_enc, W_dec, b_dec, l1_coeff: T.transcoder_loss(
            x, y, W_enc, b_enc, W_dec, b_dec, 2 * l1_coeff + 0.1
        ),
    ),
    (
        check.skip_transcoder_forward,
        T.skip_transcoder_forward,
        check.SKIP_MISTAKES,
        lambda x, W_enc, b_enc, W_dec, b_dec, W_skip: T.transcoder_forward(
            x + x @ W_skip.T, W_enc, b_enc, W_dec, b_dec
        ),
    ),
    (check.transcoder_pair, T.transcoder_pair, check.PAIR_MISTAKES, _pair_resid_pre),
    (
        check.input_invariant_connections,
        lambda tc0, tc1: C.input_invariant_connections(tc0, tc1),
        check.CONNECTION_MISTAKES,
        lambda tc0, tc1: tc0.W_dec @ C.centre(tc1.W_enc, dim=0) / 2,
    ),
    (
        check.feature_attributions,
        C.feature_attributions,
        check.ATTRIBUTION_MISTAKES,
        lambda z0, tc0, tc1, feature, scale: C.feature_attributions(
            (z0 > 0).float(), tc0, tc1, feature, scale
        ),
    ),
    (
        check.head_attribution,
        C.head_attribution,
        check.HEAD_MISTAKES,
        lambda pattern, x_pre, W_V, W_O, f, dest: pattern[dest] * (x_pre @ f),
    ),
    (
        check.de_embedding,
        C.de_embedding,
        check.DE_EMBEDDING_MISTAKES,
        lambda model, tc, feature: -C.de_embedding(model, tc, feature),
    ),
    (
        check.keep_top,
        C.keep_top,
        check.KEEP_MISTAKES,
        lambda terms, top_k: (terms[:top_k], float(sum(t["value"] for t in terms[top_k:]))),
    ),
    (
        check.extended_de_embedding,
        C.extended_de_embedding,
        check.EXTENDED_MISTAKES,
        lambda model, tc0, tc, feature: 2 * C.extended_de_embedding(model, tc0, tc, feature),
    ),
]


# ------------------------------------------------------------ correct alternatives (issue 13)
def forward_einsum(x, W_enc, b_enc, W_dec, b_dec):
    z = torch.einsum("bi,is->bs", x, W_enc).add(b_enc).clamp_min(0)
    return z, torch.einsum("bs,so->bo", z, W_dec) + b_dec


def forward_linear(x, W_enc, b_enc, W_dec, b_dec):
    z = torch.nn.functional.relu(torch.nn.functional.linear(x, W_enc.T, b_enc))
    return z, torch.nn.functional.linear(z, W_dec.T, b_dec)


def loss_reuse_forward(x, y, W_enc, b_enc, W_dec, b_dec, l1_coeff):
    z, y_hat = T.transcoder_forward(x, W_enc, b_enc, W_dec, b_dec)
    return ((y - y_hat) ** 2).sum(dim=1).mean() + l1_coeff * z.norm(p=1, dim=1).mean()


def loss_mse_times_width(x, y, W_enc, b_enc, W_dec, b_dec, l1_coeff):
    z, y_hat = forward_einsum(x, W_enc, b_enc, W_dec, b_dec)
    mse = torch.nn.functional.mse_loss(y_hat, y) * y.shape[-1]
    return mse + l1_coeff * z.abs().sum() / x.shape[0]


def skip_linear(x, W_enc, b_enc, W_dec, b_dec, W_skip):
    z, y_hat = forward_linear(x, W_enc, b_enc, W_dec, b_dec)
    return z, y_hat + torch.nn.functional.linear(x, W_skip)


def skip_einsum(x, W_enc, b_enc, W_dec, b_dec, W_skip):
    z, y_hat = forward_einsum(x, W_enc, b_enc, W_dec, b_dec)
    return z, y_hat + torch.einsum("bi,oi->bo", x, W_skip)


def pair_hooks(model, tokens, layer):
    got = {}
    names = [f"blocks.{layer}.ln2.hook_normalized", f"blocks.{layer}.hook_mlp_out"]
    hooks = [(n, lambda a, hook: got.__setitem__(hook.name, a.detach())) for n in names]
    with torch.no_grad():
        model.run_with_hooks(tokens, fwd_hooks=hooks)
    return got[names[0]], got[names[1]]


def pair_full_cache(model, tokens, layer):
    _, cache = model.run_with_cache(tokens)
    return cache["normalized", layer, "ln2"], cache["mlp_out", layer]


def connections_einsum(tc0, tc1):
    enc = tc1.W_enc - tc1.W_enc.mean(dim=0, keepdim=True)
    return torch.einsum("id,dj->ij", tc0.W_dec, enc)


def connections_centre_decoder(tc0, tc1):
    """Centring either side gives the same numbers: (I - 11^T/d) is symmetric and idempotent."""
    dec = tc0.W_dec - tc0.W_dec.mean(dim=-1, keepdim=True)
    return dec @ tc1.W_enc


def attributions_manual(z0, tc0, tc1, feature, scale):
    f_enc = tc1.W_enc[:, feature]
    f_enc = f_enc - f_enc.mean()
    return z0 * (tc0.W_dec @ f_enc) / scale


def attributions_reuse(z0, tc0, tc1, feature, scale):
    return z0 * connections_einsum(tc0, tc1)[:, feature] / scale


def head_einsum(pattern, x_pre, W_V, W_O, f, dest):
    g = torch.einsum("dh,he,e->d", W_V, W_O, f)
    return pattern[dest] * torch.einsum("sd,d->s", x_pre, g)


def head_forward_then_project(pattern, x_pre, W_V, W_O, f, dest):
    moved = (x_pre @ W_V) @ W_O  # [src, d_model]: what each source position writes
    return pattern[dest, :] * (moved @ f)


def de_embedding_submodule(model, tc, feature):
    f = tc.W_enc[:, feature]
    return model.embed.W_E @ (f - f.mean())


def de_embedding_embed_call(model, tc, feature):
    f = tc.W_enc[:, feature]
    embeddings = model.embed(torch.arange(model.cfg.d_vocab)[None])[0]
    return (embeddings @ (f - f.mean())).detach()


def keep_sorted_reverse(terms, top_k):
    ranked = sorted(terms, key=lambda t: abs(t["value"]), reverse=True)
    kept = ranked[:top_k]
    return kept, sum(t["value"] for t in terms) - sum(t["value"] for t in kept)


def keep_heapq(terms, top_k):
    import heapq

    kept = heapq.nlargest(top_k, terms, key=lambda t: abs(t["value"]))
    ids = {id(t) for t in kept}
    return kept, float(sum(t["value"] for t in terms if id(t) not in ids))


def extended_layer_norm(model, tc0, tc, feature):
    x = model.W_E + model.W_pos.mean(dim=0)
    normed = torch.nn.functional.layer_norm(x, (model.cfg.d_model,), eps=model.cfg.eps)
    f = tc.W_enc[:, feature]
    return ((x + tc0(normed)) @ (f - f.mean())).detach()


def extended_via_latents(model, tc0, tc, feature):
    """Through tc0's latents: direct term + sum_i z_i(token) (f_dec_i . f) + b_dec . f."""
    x = model.embed.W_E + model.pos_embed.W_pos.mean(0, keepdim=True)
    centred = x - x.mean(-1, keepdim=True)
    z = tc0.encode(centred / torch.sqrt(centred.pow(2).mean(-1, keepdim=True) + model.cfg.eps))
    f = C.centre(tc.W_enc[:, feature])
    return (x @ f + z @ (tc0.W_dec @ f) + tc0.b_dec @ f).detach()


CORRECT = {
    check.transcoder_forward: [forward_einsum, forward_linear],
    check.transcoder_loss: [loss_reuse_forward, loss_mse_times_width],
    check.skip_transcoder_forward: [skip_linear, skip_einsum],
    check.transcoder_pair: [pair_hooks, pair_full_cache],
    check.input_invariant_connections: [connections_einsum, connections_centre_decoder],
    check.feature_attributions: [attributions_manual, attributions_reuse],
    check.head_attribution: [head_einsum, head_forward_then_project],
    check.de_embedding: [de_embedding_submodule, de_embedding_embed_call],
    check.keep_top: [keep_sorted_reverse, keep_heapq],
    check.extended_de_embedding: [extended_layer_norm, extended_via_latents],
}


# ------------------------------------------------- wrong answers a learner writes (issue 13)
def forward_detached(x, W_enc, b_enc, W_dec, b_dec):
    return T.transcoder_forward(x, W_enc.detach(), b_enc, W_dec.detach(), b_dec)


def forward_W_dec_transposed(x, W_enc, b_enc, W_dec, b_dec):
    z = torch.relu(x @ W_enc + b_enc)
    return z, z @ W_dec.reshape(W_dec.shape[1], W_dec.shape[0]).T + b_dec


def loss_item(x, y, W_enc, b_enc, W_dec, b_dec, l1_coeff):
    return torch.tensor(T.transcoder_loss(x, y, W_enc, b_enc, W_dec, b_dec, l1_coeff).item())


def loss_no_grad_latents(x, y, W_enc, b_enc, W_dec, b_dec, l1_coeff):
    z, y_hat = T.transcoder_forward(x, W_enc, b_enc, W_dec, b_dec)
    return (y_hat - y).pow(2).sum(-1).mean() + l1_coeff * z.detach().abs().sum(-1).mean()


def skip_detached(x, W_enc, b_enc, W_dec, b_dec, W_skip):
    z, y_hat = T.transcoder_forward(x, W_enc, b_enc, W_dec, b_dec)
    return z, y_hat + x @ W_skip.detach().T


def pair_hook_left_behind(model, tokens, layer):
    got = {}
    names = [f"blocks.{layer}.ln2.hook_normalized", f"blocks.{layer}.hook_mlp_out"]
    for n in names:
        model.add_hook(n, lambda a, hook: got.__setitem__(hook.name, a.detach()))
    with torch.no_grad():
        model(tokens)
    return got[names[0]], got[names[1]]


def pair_mlp_pre(model, tokens, layer):
    _, cache = model.run_with_cache(tokens)
    return cache[f"blocks.{layer}.ln2.hook_normalized"], cache[f"blocks.{layer}.mlp.hook_pre"]


def attributions_connection_transposed(z0, tc0, tc1, feature, scale):
    f_dec = tc0.W_dec[feature % tc0.W_dec.shape[0]]
    return z0 * (C.centre(tc1.W_enc, dim=0).T @ f_dec)[: z0.shape[-1]] / scale


def head_no_dest(pattern, x_pre, W_V, W_O, f, dest):
    return pattern.mean(0) * (x_pre @ (W_V @ (W_O @ f)))


def de_embedding_W_E_transposed(model, tc, feature):
    f = tc.W_enc[:, feature]
    return (f - f.mean()) @ model.W_U


def keep_smallest(terms, top_k):
    ranked = sorted(terms, key=lambda t: abs(t["value"]))
    return ranked[:top_k], float(sum(t["value"] for t in ranked[top_k:]))


def keep_pruned_count(terms, top_k):
    kept, _ = C.keep_top(terms, top_k)
    return kept, float(len(terms) - len(kept))


def extended_real_mlp(model, tc0, tc, feature):
    """MLP 0 itself instead of its transcoder: not what was asked (the score must decompose into
    tc0's features), and not the same numbers."""
    x = model.W_E + model.W_pos.mean(0)
    f = tc.W_enc[:, feature]
    return ((x + model.blocks[0].mlp(model.blocks[0].ln2(x))) @ (f - f.mean())).detach()


def extended_ln1(model, tc0, tc, feature):
    """Layer 0's ln1 (the attention's LayerNorm) with its weight and bias, not ln2's normalisation."""
    x = model.W_E + model.W_pos.mean(0)
    f = tc.W_enc[:, feature]
    return ((x + tc0(model.blocks[0].ln1(x))) @ (f - f.mean())).detach()


def extended_pos_summed(model, tc0, tc, feature):
    """Helper-invented (black box): W_pos summed over positions, not averaged."""
    x = model.W_E + model.W_pos.sum(0)
    f = C.centre(tc.W_enc[:, feature])
    return ((x + tc0(torch.nn.functional.layer_norm(x, (x.shape[-1],)))) @ f).detach()


def extended_later_ln1_weight(model, tc0, tc, feature):
    """Helper-invented: f scaled by layer 1's ln1 weight (passed when that weight was all ones)."""
    x = model.W_E + model.W_pos.mean(0)
    f = C.centre(tc.W_enc[:, feature]) * model.blocks[1].ln1.w
    return ((x + tc0(torch.nn.functional.layer_norm(x, (x.shape[-1],)))) @ f).detach()


def extended_mlp_term_negated(model, tc0, tc, feature):
    x = model.W_E + model.W_pos.mean(0)
    f = C.centre(tc.W_enc[:, feature])
    return ((x - tc0(torch.nn.functional.layer_norm(x, (x.shape[-1],)))) @ f).detach()


WRONG = {
    check.transcoder_forward: [forward_detached, forward_W_dec_transposed, _forward_leaky],
    check.transcoder_loss: [loss_item, loss_no_grad_latents, CHECKS[1][3]],
    check.skip_transcoder_forward: [skip_detached, CHECKS[2][3]],
    check.transcoder_pair: [pair_hook_left_behind, pair_mlp_pre, _pair_resid_pre],
    check.input_invariant_connections: [
        lambda tc0, tc1: tc0.W_dec @ C.centre(tc1.W_enc, dim=0) / 2,
        lambda tc0, tc1: C.centre(tc0.W_dec, dim=0) @ tc1.W_enc,
    ],
    check.feature_attributions: [attributions_connection_transposed, CHECKS[5][3]],
    check.head_attribution: [head_no_dest, CHECKS[6][3]],
    check.de_embedding: [de_embedding_W_E_transposed, CHECKS[7][3]],
    check.keep_top: [keep_smallest, keep_pruned_count, CHECKS[8][3]],
    check.extended_de_embedding: [
        extended_real_mlp,
        extended_ln1,
        extended_pos_summed,
        extended_later_ln1_weight,
        extended_mlp_term_negated,
        CHECKS[9][3],
    ],
}
contract_tests(check, CHECKS, globals(), correct=CORRECT, wrong=WRONG)


def test_keep_top_rejects_the_reviewers_input_order_answer():
    """Review P1.1: kept terms returned in input order, not largest first, used to pass."""

    def keep_in_input_order(terms, top_k):
        r = sorted(terms, key=lambda t: -abs(t["value"]))
        keep = [t for t in terms if t in r[:top_k]]
        return keep, float(sum(t["value"] for t in r[top_k:]))

    status, msg = outcome(check.keep_top, keep_in_input_order)
    assert status == "failed" and "largest |value| first" in msg
