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


CORRECT = {
    check.clt_forward: [_fwd_loop, _fwd_einsum],
    check.clt_loss: [_loss_explicit, _loss_loop],
    check.feature_edges: [_edges_loop, _edges_flat],
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


WRONG = {
    check.indirect_influence: [_infl_first_order_only, _infl_includes_identity],
    check.normalise_adjacency: [_norm_no_abs],
    check.prune_nodes: [_prune_keeps_everything, _prune_drops_ties],
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
    (check.normalise_adjacency, AG.normalise_adjacency, check.NORMALISE_MISTAKES,
     lambda A: torch.softmax(A.abs(), dim=1)),
    (check.indirect_influence, AG.indirect_influence, check.INFLUENCE_MISTAKES,
     lambda A: torch.linalg.matrix_exp(A) - torch.eye(len(A))),
    (check.prune_nodes, AG.prune_nodes, check.PRUNE_MISTAKES,
     lambda influence, is_feature, threshold: ~is_feature | (influence > influence.median())),
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
