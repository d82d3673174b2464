"""Every chapter-07 check passes the reference and two other correct answers, flags the stub, and
rejects every known wrong answer plus one more."""

from __future__ import annotations

import pytest
import torch

from course_utils.checks import ch07 as check
from course_utils.checks.core import outcome
from course_utils.science import attribution_graphs as AG
from course_utils.science import clt as CLT
from tests.check_contract import contract_tests

pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------- other correct answers


def _fwd_loop(x, W_enc, b_enc, threshold, W_dec, b_dec):
    L = W_enc.shape[0]
    acts = torch.stack(
        [torch.where(x[:, i] @ W_enc[i] + b_enc[i] > threshold[i], x[:, i] @ W_enc[i] + b_enc[i], 0.0)
         for i in range(L)], 1)  # fmt: skip
    outs = []
    for t in range(L):
        y = sum(acts[:, s] @ W_dec[s][:, t - s] for s in range(t + 1))
        outs.append(y + b_dec[t])
    return acts, torch.stack(outs, 1)


def _fwd_einsum(x, W_enc, b_enc, threshold, W_dec, b_dec):
    pre = torch.einsum("bld,lds->bls", x, W_enc) + b_enc
    acts = pre * (pre > threshold).float()
    y = b_dec.expand(x.shape[0], -1, -1).clone()
    for s, w in enumerate(W_dec):
        y[:, s:] = y[:, s:] + torch.einsum("bs,sld->bld", acts[:, s], w)
    return acts, y


def _loss_explicit(x, y, W_enc, b_enc, threshold, W_dec, b_dec, sparsity_coeff, c):
    acts, y_hat = CLT.clt_forward(x, W_enc, b_enc, threshold, W_dec, b_dec)
    mse = ((y_hat - y) ** 2).sum(-1).sum(-1).mean()
    norms = torch.stack([(w**2).sum((1, 2)).sqrt() for w in W_dec])
    return mse + sparsity_coeff * torch.tanh(c * acts * norms).sum(-1).sum(-1).mean()


def _loss_loop(x, y, W_enc, b_enc, threshold, W_dec, b_dec, sparsity_coeff, c):
    acts, y_hat = _fwd_loop(x, W_enc, b_enc, threshold, W_dec, b_dec)
    total = 0.0
    for layer in range(len(W_dec)):
        norm = W_dec[layer].reshape(W_dec[layer].shape[0], -1).norm(dim=1)
        total = total + (y_hat[:, layer] - y[:, layer]).pow(2).sum(-1)
        total = total + sparsity_coeff * torch.tanh(c * norm * acts[:, layer]).sum(-1)
    return total.mean()


def _edges_loop(grad_mlp_out, W_dec_s, activations, layer):
    out = torch.zeros(grad_mlp_out.shape[0], W_dec_s.shape[0])
    for k in range(W_dec_s.shape[1]):
        out = out + grad_mlp_out[:, layer + k] @ W_dec_s[:, k].T
    return out * activations[None]


def _edges_flat(grad_mlp_out, W_dec_s, activations, layer):
    g = grad_mlp_out[:, layer:].flatten(1)
    return g @ (W_dec_s * activations[:, None, None]).flatten(1).T


def _row_detach_hooks(model, clt, graph, target):
    """circuit-tracer's arrangement: the forward pass stays the real model; patterns and scales are
    detached (frozen for the backward pass only) and each MLP output is swapped for a detached copy
    that requires grad, collected as it goes by."""
    leaves = {}

    def detach(value, hook):
        return value.detach()

    def leaf(value, hook):
        leaves[hook.name] = value.detach().requires_grad_(True)
        return leaves[hook.name]

    ln2 = {}

    def save(value, hook):
        ln2[hook.layer()] = value
        return value

    L = model.cfg.n_layers
    hooks = [("blocks.0.hook_resid_pre", leaf)]
    for i in range(L):
        hooks += [(f"blocks.{i}.attn.hook_pattern", detach), (f"blocks.{i}.ln1.hook_scale", detach),
                  (f"blocks.{i}.ln2.hook_scale", detach), (f"blocks.{i}.hook_mlp_out", leaf),
                  (f"blocks.{i}.ln2.hook_normalized", save)]  # fmt: skip
    hooks.append(("ln_final.hook_scale", detach))
    logits = model.run_with_hooks(graph.tokens[None], fwd_hooks=hooks)[0, -1]
    s = graph.slices()
    if target < graph.n_features:
        layer, pos, feature = graph.active[target].tolist()
        value = ln2[layer][0, pos] @ clt.W_enc[layer, :, feature]
    else:
        value = logits[graph.logit_tokens[target - s["logits"].start]] - logits.mean()
    value.backward()
    g_mlp = [leaves[f"blocks.{i}.hook_mlp_out"].grad for i in range(L)]
    g_mlp = [torch.zeros_like(leaves["blocks.0.hook_resid_pre"]) if g is None else g for g in g_mlp]
    g_mlp = torch.cat(g_mlp)  # [L, pos, d]
    embed = leaves["blocks.0.hook_resid_pre"]
    row = torch.zeros(graph.n_nodes)
    for k, (layer, pos, feature) in enumerate(graph.active.tolist()):
        out = check.feature_edges_reference(
            g_mlp[:, pos][None], clt.W_dec[layer][feature][None].detach(),
            graph.activations[k : k + 1], layer)  # fmt: skip
        row[k] = out[0, 0]
    row[s["errors"]] = torch.einsum("lpd,lpd->lp", graph.errors, g_mlp).reshape(-1)
    row[s["embeddings"]] = (embed.grad[0] * embed[0]).sum(-1)
    return row.detach()


def _row_float64(model, clt, graph, target):
    """The reference's hooks, but every dot product in float64 and a float64 row."""
    with torch.no_grad():
        _, cache = model.run_with_cache(graph.tokens[None])
    L = model.cfg.n_layers
    embed = cache["blocks.0.hook_resid_pre"].clone().requires_grad_(True)
    mlp = [cache[f"blocks.{i}.hook_mlp_out"].clone().requires_grad_(True) for i in range(L)]
    names = [f"blocks.{i}.{n}" for i in range(L)
             for n in ("attn.hook_pattern", "ln1.hook_scale", "ln2.hook_scale")]  # fmt: skip
    hooks = [(n, lambda v, hook: cache[hook.name]) for n in names + ["ln_final.hook_scale"]]
    hooks += [("blocks.0.hook_resid_pre", lambda v, hook: embed)]
    hooks += [(f"blocks.{i}.hook_mlp_out", lambda v, hook: mlp[hook.layer()]) for i in range(L)]
    normalized = {}
    hooks += [(f"blocks.{i}.ln2.hook_normalized",
               lambda v, hook: normalized.setdefault(hook.layer(), v)) for i in range(L)]  # fmt: skip
    logits = model.run_with_hooks(graph.tokens[None], fwd_hooks=hooks)[0, -1]
    s = graph.slices()
    if graph.node_kind(target) == "feature":
        layer, pos, feature = graph.active[target].tolist()
        value = normalized[layer][0, pos] @ clt.W_enc[layer, :, feature]
    else:
        value = logits[graph.logit_tokens[target - s["logits"].start]] - logits.mean()
    grads = torch.autograd.grad(value, [embed, *mlp], allow_unused=True)
    grads = [torch.zeros_like(embed) if g is None else g for g in grads]
    g_mlp = torch.cat(grads[1:]).double()
    row = torch.zeros(graph.n_nodes, dtype=torch.float64)
    with torch.no_grad():
        for k, (layer, pos, feature) in enumerate(graph.active.tolist()):
            dec = clt.W_dec[layer][feature].double()
            row[k] = graph.activations[k].double() * (dec * g_mlp[layer:, pos]).sum()
        row[s["errors"]] = (graph.errors.double() * g_mlp).sum(-1).flatten()
        row[s["embeddings"]] = (embed[0].double() * grads[0][0].double()).sum(-1)
    return row


def _norm_where(A):
    W = A.abs()
    s = W.sum(-1, keepdim=True)
    return torch.where(s > 0, W / torch.where(s > 0, s, 1.0), 0.0)


def _norm_loop(A):
    out = torch.zeros_like(A)
    for i in range(len(A)):
        total = A[i].abs().sum()
        if total > 0:
            out[i] = A[i].abs() / total
    return out


def _infl_series(A):
    total, power = torch.zeros_like(A), A.clone()
    for _ in range(len(A)):
        total = total + power
        power = power @ A
    return total


def _infl_inv(A):
    eye = torch.eye(len(A))
    return torch.linalg.inv(eye - A) - eye


def _prune_loop(influence, is_feature, threshold):
    keep = ~is_feature
    feats = [(float(influence[i]), i) for i in range(len(influence)) if is_feature[i]]
    total = sum(v for v, _ in feats)
    running = 0.0
    keep = keep.clone()
    for v, i in sorted(feats, reverse=True):
        if running >= threshold * total - 1e-12:
            break
        keep[i] = True
        running += v
    # ties with the last kept score are kept too
    kept = [v for v, i in feats if keep[i]]
    if kept:
        low = min(kept)
        for v, i in feats:
            if v >= low:
                keep[i] = True
    return keep


def _prune_threshold_fn(influence, is_feature, threshold):
    keep = ~is_feature.clone()
    f = influence[is_feature]
    cut = AG.cumulative_threshold(f, threshold)
    keep[is_feature] = f >= cut
    return keep


def _scores_dense(graph, node_mask=None):
    A = graph.adjacency.clone()
    s = graph.slices()
    N = graph.n_nodes
    err = torch.zeros(N, dtype=torch.bool)
    err[s["errors"]] = True
    inputs = torch.zeros(N, dtype=torch.bool)
    inputs[s["features"]] = True
    inputs[s["logits"]] = True
    if node_mask is not None:
        gone = inputs & ~node_mask
        A[gone] = 0
        err |= gone
        inputs &= ~gone
    W = A.abs()
    W = W / W.sum(1, keepdim=True).clamp(min=1e-10)
    B = torch.linalg.inv(torch.eye(N) - W) - torch.eye(N)
    w = graph.logit_weights()
    infl = w @ B
    tok, er = infl[s["embeddings"]].sum(), infl[err].sum()
    weight = infl + w
    comp = ((1 - W[:, err].sum(1)) * weight)[inputs].sum() / weight[inputs].sum()
    return {"replacement": float(tok / (tok + er)), "completeness": float(comp)}


def _effect_propagate(A, a, c, members):
    """Push the members' change through the graph, one layer of edges at a time, in float64."""
    A, a, c = A.detach().double(), a.detach().double(), c.detach().double()
    m = torch.as_tensor(members, dtype=torch.long)
    delta = torch.zeros_like(a)
    delta[m] = -a[m]
    clamped = torch.zeros(len(a), dtype=torch.bool)
    clamped[m] = True
    for _ in range(len(a)):
        new = (A / a[None, :]) @ delta  # change of each pre-activation (edges scale with a_s)
        delta = torch.where(clamped, delta, new)
    return ((c / a) * delta).sum().to(c.dtype)


def _effect_inverse(A, a, c, members):
    with torch.no_grad():
        m = list(torch.as_tensor(members).tolist())
        keep = torch.ones(len(a))
        keep[m] = 0.0
        R = keep[:, None].to(A.dtype) * A / a[:, None]
        T = c.double() @ torch.linalg.inv(torch.eye(len(a), dtype=torch.float64) - R.double())
        return -T[m].sum().to(c.dtype)


CORRECT = {
    check.supernode_effect: [_effect_propagate, _effect_inverse],
    check.clt_forward: [_fwd_loop, _fwd_einsum],
    check.clt_loss: [_loss_explicit, _loss_loop],
    check.feature_edges: [_edges_loop, _edges_flat],
    check.attribution_row: [_row_detach_hooks, _row_float64],
    check.normalise_adjacency: [_norm_where, _norm_loop],
    check.indirect_influence: [_infl_series, _infl_inv],
    check.prune_nodes: [_prune_loop, _prune_threshold_fn],
    check.graph_scores: [
        _scores_dense,
        lambda graph, node_mask=None: AG.graph_scores(graph, node_mask),
    ],
}


# -- wrong answers a learner plausibly writes (not in the Mistake lists) -----------------------
def _infl_first_order_only(A):
    return A.clone()  # direct edges only: forgets every path of length 2 and more


def _infl_includes_identity(A):
    return torch.linalg.inv(torch.eye(len(A)) - A)  # (I - A)^-1 counts each node's own 1


def _norm_no_abs(A):
    return A / A.sum(dim=1, keepdim=True).clamp(min=1e-10)  # signed rows: can flip or blow up


def _prune_keeps_everything(influence, is_feature, threshold):
    return torch.ones_like(is_feature)


def _prune_drops_ties(influence, is_feature, threshold):
    """The prefix by sorted position: of several features tied at the cut-off, keeps only some."""
    keep = ~is_feature.clone()
    idx = is_feature.nonzero().flatten()
    f = influence[idx]
    order = f.argsort(descending=True, stable=True)
    k = int((f[order].cumsum(0) / f.sum() < threshold).sum()) + 1
    keep[idx[order[:k]]] = True
    return keep


def _row_transposed(model, clt, graph, target):
    """The column: the target's OUT-edges (adjacency is [target, source])."""
    nb_graph = check._default_setup()[2]
    if torch.equal(nb_graph.tokens, graph.tokens) and nb_graph.n_nodes == graph.n_nodes:
        return nb_graph.adjacency[:, target].clone()
    return AG.attribute(model, clt, graph.tokens).adjacency[:, target]


def _row_notebook_globals(model, clt, graph, target):
    """Ignores the model's prompt and dictionary in favour of the notebook's (graph, clt)."""
    nb_model, nb_clt, nb_graph = check._default_setup()
    return AG.attribution_row(nb_model, nb_clt, nb_graph, min(target, nb_graph.n_nodes - 1))


def _row_attached(model, clt, graph, target):
    row = AG.attribution_row(model, clt, graph, target)
    return row + 0.0 * clt.W_enc.sum()  # still requires grad


def _row_final_ln_live(model, clt, graph, target):
    """Froze ln1 and ln2 of every block but forgot ln_final (only logit rows differ)."""
    if graph.node_kind(target) == "feature":
        return AG.attribution_row(model, clt, graph, target)
    return _final_ln_live_logit(model, clt, graph, target)


def _final_ln_live_logit(model, clt, graph, target):
    with torch.no_grad():
        _, cache = model.run_with_cache(graph.tokens[None])
    L = model.cfg.n_layers
    embed = cache["blocks.0.hook_resid_pre"].clone().requires_grad_(True)
    mlp = [cache[f"blocks.{i}.hook_mlp_out"].clone().requires_grad_(True) for i in range(L)]
    hooks = [(f"blocks.{i}.{n}", lambda v, hook: cache[hook.name]) for i in range(L)
             for n in ("attn.hook_pattern", "ln1.hook_scale", "ln2.hook_scale")]  # fmt: skip
    hooks += [("blocks.0.hook_resid_pre", lambda v, hook: embed)]
    hooks += [(f"blocks.{i}.hook_mlp_out", lambda v, hook: mlp[hook.layer()]) for i in range(L)]
    last = model.run_with_hooks(graph.tokens[None], fwd_hooks=hooks)[0, -1]
    s = graph.slices()
    value = last[graph.logit_tokens[target - s["logits"].start]] - last.mean()
    grads = torch.autograd.grad(value, [embed, *mlp])
    g_mlp = torch.cat(grads[1:])
    row = torch.zeros(graph.n_nodes)
    with torch.no_grad():
        for k, (layer, pos, feature) in enumerate(graph.active.tolist()):
            row[k] = graph.activations[k] * (clt.W_dec[layer][feature] * g_mlp[layer:, pos]).sum()
        row[s["errors"]] = (graph.errors * g_mlp).sum(-1).flatten()
        row[s["embeddings"]] = (embed[0] * grads[0][0]).sum(-1)
    return row


def _effect_not_rescaled(A, a, c, members):
    m = torch.as_tensor(members)
    R = A.detach().clone()  # forgot to divide by the target's activation: R = A
    R[m] = 0.0
    T = torch.linalg.solve((torch.eye(len(a), dtype=R.dtype) - R).T, c.detach())
    return -T[m].sum()


def _effect_attached(A, a, c, members):
    m = torch.as_tensor(members)
    R = (A / a[:, None]).clone()
    R[m] = 0.0
    return -torch.linalg.solve((torch.eye(len(a), dtype=R.dtype) - R).T, c)[m].sum()


def _effect_abs_of_result(A, a, c, members):
    return AG.supernode_effect(A, a, c, members).abs()  # a size, not a signed change


WRONG = {
    check.supernode_effect: [_effect_not_rescaled, _effect_attached, _effect_abs_of_result],
    check.indirect_influence: [_infl_first_order_only, _infl_includes_identity],
    check.normalise_adjacency: [_norm_no_abs],
    check.prune_nodes: [_prune_keeps_everything, _prune_drops_ties],
    check.attribution_row: [
        _row_transposed,
        _row_notebook_globals,
        _row_attached,
        _row_final_ln_live,
    ],
}


# ---------------------------------------------------------------- the contract

CHECKS = [
    (check.clt_forward, CLT.clt_forward, check.FORWARD_MISTAKES,
     lambda x, W_enc, b_enc, threshold, W_dec, b_dec: CLT.clt_forward(
         x, W_enc, b_enc, threshold * 0.5, W_dec, b_dec)),
    (check.clt_loss, CLT.clt_loss, check.LOSS_MISTAKES,
     lambda x, y, W_enc, b_enc, threshold, W_dec, b_dec, sparsity_coeff, c: CLT.clt_loss(
         x, y, W_enc, b_enc, threshold, W_dec, b_dec, sparsity_coeff, 1.0)),
    (check.feature_edges, check.feature_edges_reference, check.EDGE_MISTAKES,
     lambda grad_mlp_out, W_dec_s, activations, layer: check.feature_edges_reference(
         grad_mlp_out, W_dec_s, activations.abs().sqrt(), layer)),
    (check.attribution_row, AG.attribution_row, check.ROW_MISTAKES,
     lambda model, clt, graph, target: AG.attribution_row(model, clt, graph, target) * 1.01),
    (check.normalise_adjacency, AG.normalise_adjacency, check.NORMALISE_MISTAKES,
     lambda A: torch.softmax(A.abs(), dim=1)),
    (check.indirect_influence, AG.indirect_influence, check.INFLUENCE_MISTAKES,
     lambda A: torch.linalg.matrix_exp(A) - torch.eye(len(A))),
    (check.prune_nodes, AG.prune_nodes, check.PRUNE_MISTAKES,
     lambda influence, is_feature, threshold: ~is_feature | (influence > influence.median())),
    (check.supernode_effect, AG.supernode_effect, check.EFFECT_MISTAKES,
     lambda A, a, c, members: AG.supernode_effect(A, a, c, members) * 0.9),
    (check.graph_scores, AG.graph_scores, check.SCORE_MISTAKES,
     lambda graph, node_mask=None: {"replacement": 1.0, "completeness": 1.0}),
]  # fmt: skip

contract_tests(check, CHECKS, globals(), correct=CORRECT, wrong=WRONG)


def test_loss_check_rejects_a_detached_loss():
    def detached(x, y, W_enc, b_enc, threshold, W_dec, b_dec, sparsity_coeff, c):
        with torch.no_grad():
            return CLT.clt_loss(x, y, W_enc, b_enc, threshold, W_dec, b_dec, sparsity_coeff, c)

    status, message = outcome(check.clt_loss, detached)
    assert status == "failed" and "differentiable" in message


def test_row_check_names_the_node_and_the_second_prompt():
    """A mismatch names the node where the row differs most; a crash that happens only on the
    second prompt (a notebook global standing in for an argument) says so, instead of a bare
    traceback."""
    n_pos = check._default_setup()[2].n_pos

    def crashes_elsewhere(model, clt, graph, target):
        if graph.n_pos != n_pos:  # what `tokens` from the notebook does on another prompt
            return torch.zeros(n_pos) + torch.zeros(graph.n_pos)
        return AG.attribution_row(model, clt, graph, target)

    status, message = outcome(check.attribution_row, crashes_elsewhere)
    assert status == "failed" and "another prompt" in message and "globals" in message

    def errors_pos_major(model, clt, graph, target):
        return check._row_variant(model, clt, graph, target, errors_layer_major=False)

    status, message = outcome(check.attribution_row, errors_pos_major)
    assert status == "failed" and "layer-major" in message and "the error of layer" in message


def test_supernode_solve_without_transpose_gets_the_orientation_hint():
    """solve(I - R, c) solves for a column: with the members' rows of R zeroed it returns c for
    every member, i.e. the direct edges; the hint must name the orientation (a newcomer's attempt)."""

    def not_transposed(A, a, c, members):
        A, a, c = A.detach(), a.detach(), c.detach()
        m = torch.as_tensor(members)
        R = A / a[:, None]
        R[m] = 0.0
        return -torch.linalg.solve(torch.eye(len(a), dtype=R.dtype) - R, c)[m].sum()

    status, message = outcome(check.supernode_effect, not_transposed)
    assert status == "failed" and "solve((I - R).T, c)" in message
