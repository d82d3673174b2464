"""Attribution graphs (chapter 07): the local replacement model, edges, influence, pruning, scores,
validation by intervention and a plotly view. After Ameisen et al. 2025, "Circuit Tracing".

The local replacement model of one prompt: every MLP is replaced by the CLT's reconstruction plus an
error term (true MLP output minus reconstruction, per position and layer); attention patterns and
LayerNorm denominators are frozen at their values on the prompt. On the prompt it reproduces the
model exactly, and with the feature activations held fixed it is LINEAR in its sources: token
embeddings (``blocks.0.hook_resid_pre``: token + position embedding), feature decoder outputs and
error vectors. So every target -- a feature's pre-activation, a (demeaned) logit -- is a sum of
direct contributions, the edges, plus a constant from the biases:

    A[t, s] = a_s * sum_{l_s <= l < l_t} W_dec^{s, l} . dT/dMLP_out^l[c_s]     (feature source)
    A[t, e] = e . dT/d(source vector)                                            (error, embedding)

``dT/d...`` is the gradient of the target through the frozen model with every MLP output held
constant (a leaf), which is what "stop-gradient on MLP outputs, attention patterns and norm
denominators" means. One backward pass per target; here a batch of copies of the prompt gives a
batch of targets per backward pass.

Node order (as circuit-tracer's ``Graph``): [active features, errors (layer-major, then
position), embeddings (one per position), logits]. ``adjacency[target, source]``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

import torch
from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens import HookedTransformer

from course_utils.science import transcoders as T
from course_utils.science.clt import CrossLayerTranscoder, check_clt_fits, stack_layers

# ----------------------------------------------------------------------------- input checks


def check_prompt(model: HookedTransformer, tokens: Tensor) -> Int[Tensor, " pos"]:
    """One prompt as a 1-D token tensor; clear errors for batches, empty or over-long prompts."""
    if not isinstance(tokens, Tensor) or tokens.dtype not in (torch.int64, torch.int32):
        raise TypeError("tokens must be an integer tensor: use model.to_tokens(prompt)[0].")
    if tokens.ndim == 2 and tokens.shape[0] == 1:
        tokens = tokens[0]
    if tokens.ndim != 1:
        raise ValueError(
            f"an attribution graph is for ONE prompt; got tokens of shape {tuple(tokens.shape)}."
        )
    if len(tokens) < 2:
        raise ValueError("the prompt needs at least 2 tokens (BOS and one more).")
    if len(tokens) > model.cfg.n_ctx:
        raise ValueError(
            f"the prompt has {len(tokens)} tokens but the model's context is n_ctx={model.cfg.n_ctx}: "
            "shorten it (graphs grow with the square of the prompt length; <= 40 tokens is plenty)."
        )
    if int(tokens.max()) >= model.cfg.d_vocab or int(tokens.min()) < 0:
        raise ValueError(f"token ids must lie in [0, {model.cfg.d_vocab}).")
    return tokens.long()


def check_target_tokens(model: HookedTransformer, target_tokens) -> list[int]:
    out = [int(t) for t in target_tokens]
    bad = [t for t in out if not 0 <= t < model.cfg.d_vocab]
    if bad:
        raise ValueError(
            f"target token ids {bad} are outside the vocabulary [0, {model.cfg.d_vocab}); use "
            "model.to_single_token(' word') to get a token id."
        )
    if not out:
        raise ValueError("give at least one target token.")
    return out


# ----------------------------------------------------------------------------- the frozen model


def _ln_names(n_layers: int) -> list[str]:
    return [f"blocks.{i}.{ln}.hook_scale" for i in range(n_layers) for ln in ("ln1", "ln2")] + [
        "ln_final.hook_scale"
    ]


def _pattern_names(n_layers: int) -> list[str]:
    return [f"blocks.{i}.attn.hook_pattern" for i in range(n_layers)]


@torch.no_grad()
def clean_run(model: HookedTransformer, tokens: Int[Tensor, " pos"]) -> dict:
    """The values the local replacement model freezes (patterns, LN scales) and its sources."""
    L = model.cfg.n_layers
    names = set(_ln_names(L) + _pattern_names(L) + ["blocks.0.hook_resid_pre"])
    names |= {n for layer in range(L) for n in T.hook_pair(layer)}
    logits, cache = model.run_with_cache(tokens[None], names_filter=lambda n: n in names)
    return {
        "logits": logits[0],
        "cache": {k: v[0] for k, v in cache.items()},
        "x": stack_layers([cache[T.hook_pair(layer)[0]][0] for layer in range(L)]),  # [pos, L, d]
        "mlp_out": torch.stack(
            [cache[T.hook_pair(layer)[1]][0] for layer in range(L)]
        ),  # [L, pos, d]
        "embed": cache["blocks.0.hook_resid_pre"][0],  # [pos, d]
    }


def freeze_hooks(
    model: HookedTransformer, cache: dict, attention: bool = True, layernorm: bool = True
) -> list:
    """Hooks that replace attention patterns and/or LayerNorm scales by their cached (clean)
    values, broadcast over any batch of copies of the prompt."""
    L = model.cfg.n_layers
    names = (_pattern_names(L) if attention else []) + (_ln_names(L) if layernorm else [])

    def fixed(name: str):
        frozen = cache[name].detach()

        def hook(value, hook):
            return (
                frozen.expand_as(value).clone()
                if frozen.ndim < value.ndim
                else frozen.expand_as(value)
            )

        return hook

    return [(name, fixed(name)) for name in names]


def local_replacement_logits(
    model: HookedTransformer, clt: CrossLayerTranscoder, tokens: Int[Tensor, " pos"]
) -> tuple[Float[Tensor, "pos d_vocab"], Float[Tensor, "n_layers pos d_model"]]:
    """Logits of the local replacement model on ``tokens`` and its error terms.

    Frozen attention and LN scales; each MLP output is the CLT reconstruction computed LIVE from
    the replacement model's own ln2 input, plus the error term of the clean run. Equal to the
    model's logits up to float error."""
    check_clt_fits(model, clt)
    tokens = check_prompt(model, tokens)
    run = clean_run(model, tokens)
    with torch.no_grad():
        _, recon = clt(run["x"])  # [pos, L, d]
        errors = run["mlp_out"] - recon.transpose(0, 1)
    acts: list[Tensor] = []

    def read(layer):
        def hook(value, hook):
            pre = value @ clt.W_enc[layer] + clt.b_enc[layer]
            acts.append(pre * (pre > clt.threshold[layer]))
            return value

        return hook

    def write(layer):
        def hook(value, hook):
            a = torch.stack(acts[: layer + 1], dim=-2)
            return clt.decode_layer(a, layer) + errors[layer]

        return hook

    hooks = freeze_hooks(model, {k: v[None] for k, v in run["cache"].items()})
    for layer in range(clt.n_layers):
        hook_in, hook_out = T.hook_pair(layer)
        hooks += [(hook_in, read(layer)), (hook_out, write(layer))]
    with torch.no_grad():
        logits = model.run_with_hooks(tokens[None], fwd_hooks=hooks)[0]
    return logits, errors


def _frozen_forward(model, run, tokens, resid0, mlp_outs, ln2_store: list):
    """Run copies of the prompt through the frozen model with ``resid0`` [B, pos, d] as the
    embeddings and ``mlp_outs[l]`` [B, pos, d] as MLP l's output; ``ln2_store`` receives each
    layer's ln2.hook_normalized. Returns the logits [B, pos, vocab]."""
    B = resid0.shape[0]
    hooks = freeze_hooks(model, {k: v[None] for k, v in run["cache"].items()})
    hooks.append(("blocks.0.hook_resid_pre", lambda v, hook: resid0))
    for layer in range(model.cfg.n_layers):
        hook_in, hook_out = T.hook_pair(layer)

        def save(value, hook):
            ln2_store.append(value)
            return value

        hooks.append((hook_in, save))
        hooks.append((hook_out, (lambda m: lambda v, hook: m)(mlp_outs[layer])))
    return model.run_with_hooks(tokens[None].expand(B, -1), fwd_hooks=hooks)


# ----------------------------------------------------------------------------- the graph


@dataclass
class Graph:
    """An attribution graph. ``adjacency[target, source]``; node order [features, errors,
    embeddings, logits]. ``active[k] = (layer, pos, feature)`` and ``activations[k]`` describe
    feature node k; ``values[t]`` is each node's actual value (pre-activation for features,
    demeaned logit for logits; 0 for source-only nodes) and ``bias[t]`` its constant term, so
    ``adjacency.sum(1) + bias == values`` for features and logits."""

    tokens: Tensor
    active: Tensor
    activations: Tensor
    adjacency: Tensor
    logit_tokens: Tensor
    logit_probs: Tensor
    values: Tensor
    bias: Tensor
    n_layers: int
    errors: Tensor
    kind: str = "cross-layer transcoder"
    meta: dict = field(default_factory=dict)

    @property
    def n_pos(self) -> int:
        return len(self.tokens)

    @property
    def n_features(self) -> int:
        return len(self.active)

    @property
    def n_errors(self) -> int:
        return self.n_layers * self.n_pos

    @property
    def n_logits(self) -> int:
        return len(self.logit_tokens)

    @property
    def n_nodes(self) -> int:
        return self.n_features + self.n_errors + self.n_pos + self.n_logits

    def slices(self) -> dict[str, slice]:
        """Where each kind of node sits in the node order (rows and columns of ``adjacency``):
        ``"features"`` (one per row of ``active``: layer, position, feature), ``"errors"`` (one
        per layer and position, layer-major), ``"embeddings"`` (one per position) and
        ``"logits"`` (one per entry of ``logit_tokens``), in that order."""
        f, e, p = self.n_features, self.n_errors, self.n_pos
        return {
            "features": slice(0, f),
            "errors": slice(f, f + e),
            "embeddings": slice(f + e, f + e + p),
            "logits": slice(f + e + p, self.n_nodes),
        }

    def logit_weights(self) -> Tensor:
        w = torch.zeros(self.n_nodes)
        w[self.slices()["logits"]] = self.logit_probs
        return w

    def node_kind(self, index: int) -> str:
        for kind, sl in self.slices().items():
            if sl.start <= index < sl.stop:
                return kind[:-1]
        raise IndexError(index)

    def feature_index(self, layer: int, pos: int, feature: int) -> int:
        hit = ((self.active == torch.tensor([layer, pos, feature])).all(-1)).nonzero()
        if len(hit) == 0:
            raise KeyError(f"feature {feature} of layer {layer} is not active at position {pos}.")
        return int(hit[0, 0])


def choose_logits(probs: Tensor, max_n_logits: int = 10, desired_prob: float = 0.95) -> Tensor:
    """The most likely tokens until their probability reaches ``desired_prob`` (at most
    ``max_n_logits``; circuit-tracer's defaults)."""
    top = probs.sort(descending=True)
    cum = top.values.cumsum(0)
    n = int((cum < desired_prob).sum()) + 1
    return top.indices[: min(n, max_n_logits)]


def attribute(
    model: HookedTransformer,
    clt: CrossLayerTranscoder,
    tokens: Int[Tensor, " pos"],
    target_tokens=None,
    max_n_logits: int = 10,
    desired_prob: float = 0.95,
    batch_size: int = 256,
    edges: bool = True,
) -> Graph:
    """The attribution graph of ``tokens`` (next-token prediction at the last position).

    ``target_tokens`` (token ids) overrides the logit nodes; by default the most likely tokens
    covering ``desired_prob`` of the probability, at most ``max_n_logits``. ``edges=False`` gives
    the nodes, values and constants only (``adjacency`` left zero): cheap, for checking rows
    computed one at a time."""
    check_clt_fits(model, clt)
    tokens = check_prompt(model, tokens)
    L, pos = model.cfg.n_layers, len(tokens)
    run = clean_run(model, tokens)
    with torch.no_grad():
        pre = clt.pre_acts(run["x"])  # [pos, L, d_sae]
        acts = pre * (pre > clt.threshold)
        recon = clt.decode(acts).transpose(0, 1)  # [L, pos, d]
        errors = run["mlp_out"] - recon
        probs = run["logits"][-1].softmax(-1)
    if target_tokens is None:
        logit_tokens = choose_logits(probs, max_n_logits, desired_prob)
    else:
        logit_tokens = torch.tensor(check_target_tokens(model, target_tokens))
    nz = (acts > 0).nonzero()  # (pos, layer, feature), sorted by pos
    order = torch.argsort(nz[:, 1] * pos + nz[:, 0], stable=True)  # layer-major, then position
    active = nz[order][:, [1, 0, 2]]  # (layer, pos, feature)
    activations = acts[active[:, 1], active[:, 0], active[:, 2]]
    n_f, n_e, n_l = len(active), L * pos, len(logit_tokens)
    N = n_f + n_e + pos + n_l
    e0, t0, g0 = n_f, n_f + n_e, n_f + n_e + pos
    adjacency = torch.zeros(N, N)

    # targets: every active feature, then every logit
    targets = [("f", int(layer), int(p), int(i)) for layer, p, i in active.tolist()]
    targets += [("l", -1, pos - 1, int(k)) for k in logit_tokens.tolist()]
    rows = list(range(n_f)) + list(range(g0, N))
    # per (source layer, position): which feature nodes sit there
    groups = {}
    for k, (layer, p, _) in enumerate(active.tolist()):
        groups.setdefault((layer, p), []).append(k)
    groups = {key: torch.tensor(v) for key, v in groups.items()}
    W_enc = clt.W_enc.detach()

    for start in range(0, len(targets) if edges else 0, batch_size):
        chunk = targets[start : start + batch_size]
        B = len(chunk)
        resid0 = run["embed"][None].expand(B, -1, -1).clone().requires_grad_(True)
        mlps = [
            run["mlp_out"][layer][None].expand(B, -1, -1).clone().requires_grad_(True)
            for layer in range(L)
        ]
        ln2: list[Tensor] = []
        logits = _frozen_forward(model, run, tokens, resid0, mlps, ln2)
        h = torch.stack(ln2, 1)  # [B, L, pos, d]
        is_feat = torch.tensor([t[0] == "f" for t in chunk])
        lay = torch.tensor([max(t[1], 0) for t in chunk])
        ps = torch.tensor([t[2] for t in chunk])
        idx = torch.tensor([t[3] if t[0] == "f" else 0 for t in chunk])
        b = torch.arange(B)
        feat_val = (h[b, lay, ps] * W_enc[lay, :, idx]).sum(-1)
        last = logits[:, -1]
        tok = torch.tensor([t[3] if t[0] == "l" else 0 for t in chunk])
        logit_val = last[b, tok] - last.mean(-1)
        value = torch.where(is_feat, feat_val, logit_val)
        gE, *gM = torch.autograd.grad(value.sum(), [resid0, *mlps])
        gM = torch.stack(gM, 1)  # [B, L, pos, d]
        r = torch.tensor(rows[start : start + B])
        with torch.no_grad():
            for (layer, p), members in groups.items():
                feats = active[members, 2]
                dec = clt.W_dec[layer].detach()[feats]  # [n, L - layer, d]
                contrib = torch.einsum("bld,nld->bn", gM[:, layer:, p], dec) * activations[members]
                adjacency[r[:, None], members[None, :]] = contrib
            err = torch.einsum("blcd,lcd->blc", gM, errors).reshape(B, n_e)
            adjacency[r, e0:t0] = err
            adjacency[r, t0:g0] = torch.einsum("bcd,cd->bc", gE, run["embed"])

    # values and constants: the frozen model with zero embeddings, MLP outputs = b_dec only
    with torch.no_grad():
        ln2 = []
        zero_logits = _frozen_forward(
            model, run, tokens, torch.zeros(1, pos, model.cfg.d_model),
            [clt.b_dec[layer].detach().expand(1, pos, -1) for layer in range(L)], ln2,
        )[0, -1]  # fmt: skip
        h0 = torch.stack(ln2, 1)[0]  # [L, pos, d]
        values = torch.zeros(N)
        bias = torch.zeros(N)
        values[:n_f] = pre[active[:, 1], active[:, 0], active[:, 2]]
        bias[:n_f] = (h0[active[:, 0], active[:, 1]] * W_enc[active[:, 0], :, active[:, 2]]).sum(-1)
        bias[:n_f] += clt.b_enc.detach()[active[:, 0], active[:, 2]]
        last = run["logits"][-1]
        values[g0:] = last[logit_tokens] - last.mean()
        bias[g0:] = zero_logits[logit_tokens] - zero_logits.mean()
    graph = Graph(
        tokens=tokens, active=active, activations=activations, adjacency=adjacency,
        logit_tokens=logit_tokens, logit_probs=probs[logit_tokens], values=values, bias=bias,
        n_layers=L, errors=errors, kind=getattr(clt, "kind", "cross-layer transcoder"),
    )  # fmt: skip
    return graph


def attribution_row(
    model: HookedTransformer, clt: CrossLayerTranscoder, graph: Graph, target: int
) -> Float[Tensor, " n_nodes"]:
    """Reference for exercise 3.2: row ``target`` of ``graph.adjacency`` (the direct effect of every
    node on node ``target``, an active feature or a logit) from ONE backward pass through the local
    replacement model of ``graph.tokens``. ``attribute`` does the same for a batch of targets.

    Written for reading: the hooks freeze attention patterns and LayerNorm scales at their clean
    values and replace the embeddings and every MLP output by leaf tensors, so the gradient of the
    target reaches each source along linear paths only (never through an MLP or the CLT)."""
    s = graph.slices()
    kind = graph.node_kind(target)
    if kind not in ("feature", "logit"):
        raise ValueError(f"node {target} is a {kind} node: only features and logits have inputs.")
    tokens, n_layers = graph.tokens, model.cfg.n_layers

    # 1. The clean run: the values the local replacement model freezes, and its source vectors.
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens[None])

    # 2. Sources as leaves. A hook that returns a leaf in place of an MLP's output cuts every path
    #    through that MLP: the gradient stops at the leaf.
    embed = cache["blocks.0.hook_resid_pre"].clone().requires_grad_(True)  # [1, pos, d_model]
    mlp_out = [
        cache[f"blocks.{layer}.hook_mlp_out"].clone().requires_grad_(True)
        for layer in range(n_layers)
    ]  # n_layers x [1, pos, d_model]

    def constant(value: Tensor):
        """A hook that replaces the activation by ``value`` (a leaf, or a frozen clean value)."""
        return lambda activation, hook: value

    hooks = [("blocks.0.hook_resid_pre", constant(embed))]
    for layer in range(n_layers):
        # frozen attention pattern: the softmax no longer depends on the residual stream (QK)
        name = f"blocks.{layer}.attn.hook_pattern"
        hooks.append((name, constant(cache[name])))
        # frozen LayerNorm scales: each norm becomes a linear map (centre, divide by a constant)
        for ln in ("ln1", "ln2"):
            name = f"blocks.{layer}.{ln}.hook_scale"
            hooks.append((name, constant(cache[name])))
        hooks.append((f"blocks.{layer}.hook_mlp_out", constant(mlp_out[layer])))
    hooks.append(("ln_final.hook_scale", constant(cache["ln_final.hook_scale"])))
    ln2_out: dict[int, Tensor] = {}  # what each layer's CLT encoder reads

    def save(activation, hook):
        ln2_out[hook.layer()] = activation
        return activation

    hooks += [(f"blocks.{layer}.ln2.hook_normalized", save) for layer in range(n_layers)]
    logits = model.run_with_hooks(tokens[None], fwd_hooks=hooks)[0]  # [pos, d_vocab]

    # 3. The target's value, a linear function of the sources (the biases add a constant).
    if kind == "feature":
        layer, pos, feature = graph.active[target].tolist()
        value = ln2_out[layer][0, pos] @ clt.W_enc[layer, :, feature].detach()  # pre-activation
    else:
        token = graph.logit_tokens[target - s["logits"].start]
        last = logits[-1]
        value = last[token] - last.mean()  # demeaned: the unembedding column minus its mean

    # 4. One backward pass: d value / d source, for every source vector at every position.
    grads = torch.autograd.grad(value, [embed, *mlp_out], allow_unused=True)
    grads = [
        torch.zeros_like(x) if g is None else g
        for x, g in zip([embed, *mlp_out], grads, strict=True)
    ]
    grad_embed = grads[0][0]  # [pos, d_model]
    grad_mlp = torch.stack(grads[1:])[:, 0]  # [n_layers, pos, d_model]

    # 5. Edge = source vector . gradient. A feature's vector is its activation times its decoder
    #    into each MLP it writes to (its own layer and every later one).
    row = torch.zeros(graph.n_nodes)
    with torch.no_grad():
        for layer in range(n_layers):
            nodes = (graph.active[:, 0] == layer).nonzero().flatten()
            pos, feature = graph.active[nodes, 1], graph.active[nodes, 2]
            decoders = clt.W_dec[layer][feature]  # [n, n_layers - layer, d_model]
            grad_at = grad_mlp[layer:, pos].transpose(0, 1)  # [n, n_layers - layer, d_model]
            row[nodes] = graph.activations[nodes] * (decoders * grad_at).sum((-1, -2))
        row[s["errors"]] = (graph.errors * grad_mlp).sum(-1).flatten()  # layer-major, as nodes
        row[s["embeddings"]] = (embed[0] * grad_embed).sum(-1)
    return row


def completeness_residual(graph: Graph) -> float:
    """max |sum of incoming edges + bias - value| over feature and logit nodes (float error)."""
    s = graph.slices()
    keep = torch.cat(
        [torch.arange(graph.n_features), torch.arange(s["logits"].start, graph.n_nodes)]
    )
    total = graph.adjacency[keep].sum(1) + graph.bias[keep]
    return float((total - graph.values[keep]).abs().max())


# ----------------------------------------------------------------------------- influence, pruning


def normalise_adjacency(A: Float[Tensor, "n n"]) -> Float[Tensor, "n n"]:
    """Reference for exercise 4.1: |A| with each row (a node's inputs) scaled to sum to 1; rows
    with no input stay zero."""
    W = A.abs()
    return W / W.sum(1, keepdim=True).clamp(min=1e-10)


def indirect_influence(A_norm: Float[Tensor, "n n"]) -> Float[Tensor, "n n"]:
    """Reference for exercise 4.2: ``B = A + A^2 + A^3 + ... = (I - A)^-1 - I`` (the sum of the
    weights of every path from source to target)."""
    eye = torch.eye(A_norm.shape[0], dtype=A_norm.dtype)
    return torch.linalg.solve(eye - A_norm, eye) - eye


def node_influence(A_norm: Tensor, logit_weights: Tensor, max_iter: int = 1000) -> Tensor:
    """``logit_weights @ B`` without forming B: each node's total influence on the (probability-
    weighted) logits. Exact: a graph is acyclic, so A is nilpotent and the series ends."""
    current = logit_weights @ A_norm
    total = current.clone()
    for _ in range(max_iter):
        if not current.any():
            return total
        current = current @ A_norm
        total += current
    raise RuntimeError("influence did not converge: the adjacency matrix has a cycle.")


def cumulative_threshold(scores: Tensor, fraction: float) -> float:
    """The smallest score among the top-scoring prefix that holds ``fraction`` of the total."""
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}.")
    sorted_scores = scores.flatten().sort(descending=True).values
    total = sorted_scores.sum()
    if total <= 0:
        return float("inf")
    cum = sorted_scores.cumsum(0) / total
    k = int((cum < fraction).sum())
    return float(sorted_scores[min(k, len(sorted_scores) - 1)])


def prune_nodes(influence: Tensor, is_feature: Tensor, threshold: float) -> Tensor:
    """Reference for exercise 4.3: keep the features of the smallest highest-influence prefix holding
    ``threshold`` of the features' total influence; every non-feature node is kept."""
    keep = ~is_feature.clone()
    feat_scores = influence[is_feature]
    if len(feat_scores):
        cut = cumulative_threshold(feat_scores, threshold)
        keep[is_feature] = feat_scores >= cut
    return keep


def prune_graph(
    graph: Graph,
    node_threshold: float = 0.8,
    edge_threshold: float = 0.98,
    edge_influence: str = "pruned",
) -> tuple[Tensor, Tensor]:
    """(node_mask, edge_mask): influence-based node pruning (features only: embeddings, errors and
    logits are kept, as in the paper), then edge pruning on the pruned graph: edge score =
    normalised weight x (influence of its target + the target's logit probability).

    ``edge_influence="pruned"`` (default, as circuit-tracer's ``compute_edge_influence``) normalises
    the node-pruned adjacency and recomputes influence on it, so the edge scores describe the graph
    that is drawn; ``"full"`` reuses the unpruned graph's normalisation and influence."""
    if edge_influence not in ("pruned", "full"):
        raise ValueError(f"edge_influence must be 'pruned' or 'full', got {edge_influence!r}.")
    A_norm = normalise_adjacency(graph.adjacency)
    w = graph.logit_weights()
    infl = node_influence(A_norm, w)
    is_feat = torch.zeros(graph.n_nodes, dtype=torch.bool)
    is_feat[graph.slices()["features"]] = True
    node_mask = prune_nodes(infl, is_feat, node_threshold)
    pruned = graph.adjacency.clone()
    pruned[~node_mask] = 0
    pruned[:, ~node_mask] = 0
    if edge_influence == "pruned":
        pruned_norm = normalise_adjacency(pruned)
        scores = pruned_norm * (node_influence(pruned_norm, w) + w)[:, None]
    else:
        scores = normalise_adjacency(pruned) * (infl + w)[:, None]
    edge_mask = scores >= cumulative_threshold(scores, edge_threshold)
    edge_mask &= pruned != 0
    return node_mask, edge_mask


def graph_scores(graph: Graph, node_mask: Tensor | None = None) -> dict[str, float]:
    """Reference for exercise 4.4: replacement and completeness scores.

    - replacement: of the end-to-end influence on the logits from source nodes (embeddings and
      errors), the fraction from embeddings;
    - completeness: for each node with inputs (features, logits), the fraction of its normalised
      input that comes from non-error nodes, averaged with weights influence + logit probability.

    With ``node_mask``, pruned features count as error nodes (their inputs are dropped)."""
    A = graph.adjacency.clone()
    s = graph.slices()
    is_error = torch.zeros(graph.n_nodes, dtype=torch.bool)
    is_error[s["errors"]] = True
    has_inputs = torch.zeros(graph.n_nodes, dtype=torch.bool)
    has_inputs[s["features"]] = True
    has_inputs[s["logits"]] = True
    if node_mask is not None:
        pruned = ~node_mask & has_inputs
        is_error |= pruned
        has_inputs &= ~pruned
        A[pruned] = 0
    A_norm = normalise_adjacency(A)
    w = graph.logit_weights()
    infl = node_influence(A_norm, w)
    token = infl[s["embeddings"]].sum()
    error = infl[is_error].sum()
    replacement = float(token / (token + error))
    error_share = A_norm[:, is_error].sum(1)
    weight = (infl + w)[has_inputs]
    completeness = float(((1 - error_share[has_inputs]) * weight).sum() / weight.sum())
    return {"replacement": replacement, "completeness": completeness}


# ----------------------------------------------------------------------------- interventions


def intervene(
    model: HookedTransformer,
    clt: CrossLayerTranscoder,
    tokens: Int[Tensor, " pos"],
    features: list[tuple[int, int, int]],
    multiplier: float = 0.0,
    mode: str = "constrained",
    freeze_attention: bool = True,
    freeze_layernorm: bool = False,
) -> dict[str, Tensor]:
    """Steer CLT features in the REAL model and return the new logits [pos, vocab] and the CLT
    pre-activations [pos, L, d_sae] read from the steered run.

    Each feature (layer, pos, index) with clean activation a is set to ``multiplier * a`` (1: no-op,
    0: ablation, -1: sign flip) by adding ``(multiplier - 1) * a * W_dec`` to MLP outputs:

    - ``"constrained"``: to the MLP output of its own AND every later layer (all its decoders), and
      every MLP from the feature's layer on is frozen at its clean output (no knock-on effects
      inside the range: the paper's constrained patching over [layer, L-1]);
    - ``"iterative"``: to its own layer's MLP output only; later MLPs recompute from their (changed)
      inputs -- the real model's own response, with no double counting.

    Attention patterns (and optionally LN scales) are frozen at their clean values."""
    check_clt_fits(model, clt)
    tokens = check_prompt(model, tokens)
    if mode not in ("constrained", "iterative"):
        raise ValueError(f"mode must be 'constrained' or 'iterative', got {mode!r}.")
    L = model.cfg.n_layers
    run = clean_run(model, tokens)
    with torch.no_grad():
        pre = clt.pre_acts(run["x"])
        acts = pre * (pre > clt.threshold)
    delta = torch.zeros(L, len(tokens), model.cfg.d_model)
    first = L
    for layer, p, i in features:
        if not (0 <= layer < L and 0 <= p < len(tokens) and 0 <= i < clt.d_sae):
            raise ValueError(f"feature {(layer, p, i)} is out of range.")
        a = acts[p, layer, i]
        first = min(first, layer)
        targets = range(layer, L) if mode == "constrained" else [layer]
        for t in targets:
            delta[t, p] += (multiplier - 1) * a * clt.W_dec[layer].detach()[i, t - layer]
    hooks = freeze_hooks(
        model, {k: v[None] for k, v in run["cache"].items()}, freeze_attention, freeze_layernorm
    )
    ln2: list[Tensor] = []
    for layer in range(L):
        hook_in, hook_out = T.hook_pair(layer)
        hooks.append((hook_in, lambda v, hook: (ln2.append(v), v)[1]))
        if mode == "constrained" and layer >= first:
            clean_out = run["mlp_out"][layer] + delta[layer]
            hooks.append((hook_out, (lambda c: lambda v, hook: c[None].expand_as(v))(clean_out)))
        else:
            hooks.append((hook_out, (lambda d: lambda v, hook: v + d)(delta[layer])))
    with torch.no_grad():
        logits = model.run_with_hooks(tokens[None], fwd_hooks=hooks)[0]
        new_pre = clt.pre_acts(stack_layers([h[0] for h in ln2]))
    return {"logits": logits, "pre_acts": new_pre}


def demeaned(logits_last: Tensor, token_ids: Tensor) -> Tensor:
    return logits_last[token_ids] - logits_last.mean()


# ----------------------------------------------------------------------------- labels and view


@torch.no_grad()
def top_contexts(
    model: HookedTransformer,
    clt: CrossLayerTranscoder,
    windows: Tensor,
    features: list[tuple[int, int]],
    k: int = 3,
    width: int = 6,
) -> dict[tuple[int, int], list[str]]:
    """For each (layer, feature): its ``k`` top-activating tokens in ``windows`` with ``width``
    tokens of context before them (the token itself in [brackets])."""
    if not features:
        return {}
    x, _ = (lambda xy: xy)(_clt_inputs(model, windows))
    acts = clt.encode(x)  # [n, pos, L, S]
    out = {}
    for layer, f in features:
        a = acts[:, :, layer, f]
        flat = a.flatten().topk(min(k, a.numel()))
        lines = []
        for value, index in zip(flat.values.tolist(), flat.indices.tolist(), strict=True):
            if value <= 0:
                break
            w, p = divmod(index, a.shape[1])
            before = model.to_string(windows[w, max(1, p - width) : p])
            tok = model.to_string(windows[w, p : p + 1])
            lines.append(f"{before!r}[{tok!r}] {value:.2f}")
        out[(layer, f)] = lines
    return out


def _clt_inputs(model, windows):
    from course_utils.science.clt import clt_pairs

    return clt_pairs(model, windows)


def node_label(graph: Graph, index: int, token_str) -> str:
    kind = graph.node_kind(index)
    s = graph.slices()
    if kind == "feature":
        layer, p, f = graph.active[index].tolist()
        return f"L{layer} #{f} @{p}"
    if kind == "error":
        layer, p = divmod(index - s["errors"].start, graph.n_pos)
        return f"error L{layer} @{p}"
    if kind == "embedding":
        p = index - s["embeddings"].start
        return f"emb {token_str(int(graph.tokens[p]))!r} @{p}"
    k = index - s["logits"].start
    return f"logit {token_str(int(graph.logit_tokens[k]))!r} p={graph.logit_probs[k]:.2f}"


def node_position(graph: Graph, index: int) -> tuple[int, float]:
    """(position, row): row 0 = embeddings, 1..L = features/errors of layer row-1, L+1 = logits."""
    kind = graph.node_kind(index)
    s = graph.slices()
    if kind == "feature":
        layer, p, _ = graph.active[index].tolist()
        return p, layer + 1
    if kind == "error":
        layer, p = divmod(index - s["errors"].start, graph.n_pos)
        return p, layer + 1
    if kind == "embedding":
        return index - s["embeddings"].start, 0
    return graph.n_pos - 1, graph.n_layers + 1


def to_json(
    graph: Graph,
    node_mask: Tensor,
    edge_mask: Tensor,
    token_str,
    slug: str = "graph",
    contexts: dict | None = None,
) -> dict:
    """The pruned graph as a dict in circuit-tracer's graph-file layout (``metadata``, ``qParams``,
    ``nodes``, ``links``; node ids as theirs: feature ``{layer}_{feature}_{pos}``, error
    ``{layer}_-1_{pos}``, embedding ``E_{token}_{pos}``, logit ``{L+1}_{token}_{pos}``). Error ids
    carry feature index -1, never a real one: the older ``0_{layer}_{pos}`` collided with the id of
    layer-0 feature ``layer`` at the same position, and one of the two nodes was lost."""
    s = graph.slices()
    infl = node_influence(normalise_adjacency(graph.adjacency), graph.logit_weights())
    # influence is unsigned (|edges|); the signed path sum says whether a node raises or lowers
    # the probability-weighted logits (positive: raises), to first order in the frozen model
    effect = node_influence(graph.adjacency, graph.logit_weights())
    ids, nodes = {}, []
    for i in node_mask.nonzero().flatten().tolist():
        kind = graph.node_kind(i)
        p, _ = node_position(graph, i)
        if kind == "feature":
            layer, _, f = graph.active[i].tolist()
            nid, ftype, act = (
                f"{layer}_{f}_{p}",
                "cross layer transcoder",
                float(graph.activations[i]),
            )
        elif kind == "error":
            layer = (i - s["errors"].start) // graph.n_pos
            nid, ftype, act = f"{layer}_-1_{p}", "mlp reconstruction error", None
        elif kind == "embedding":
            nid, ftype, act = f"E_{int(graph.tokens[p])}_{p}", "embedding", None
        else:
            k = i - s["logits"].start
            nid, ftype, act = (
                f"{graph.n_layers + 1}_{int(graph.logit_tokens[k])}_{p}",
                "logit",
                None,
            )
        if nid in ids.values():  # a collision would silently merge two nodes of the figure
            raise AssertionError(f"node id {nid!r} is used twice in the graph file.")
        ids[i] = nid
        node = {
            "node_id": nid, "feature_type": ftype, "ctx_idx": p, "influence": float(infl[i]),
            "signed_effect": float(effect[i]), "activation": act,
            "clerp": node_label(graph, i, token_str),
        }  # fmt: skip
        if kind == "logit":
            node["token_prob"] = float(graph.logit_probs[i - s["logits"].start])
        if contexts and kind == "feature":
            node["top_contexts"] = contexts.get(tuple(graph.active[i, [0, 2]].tolist()), [])
        nodes.append(node)
    links = [
        {"source": ids[src], "target": ids[tgt], "weight": float(graph.adjacency[tgt, src])}
        for tgt, src in edge_mask.nonzero().tolist()
        if tgt in ids and src in ids
    ]
    return {
        "metadata": {
            "slug": slug, "scan": "course-2l", "transcoder_list": [graph.kind],
            "prompt_tokens": [token_str(int(t)) for t in graph.tokens],
            "prompt": "".join(token_str(int(t)) for t in graph.tokens[1:]),
            "schema_version": 1,
        },
        "qParams": {"pinnedIds": [], "supernodes": [], "linkType": "both", "clickedId": "", "sg_pos": ""},
        "nodes": nodes,
        "links": links,
    }  # fmt: skip


def _layer_row(node_id: str, ftype: str, n_layers: int) -> int:
    """The figure's row of a node: 0 embeddings, 1..n_layers the layers, n_layers + 1 logits."""
    if ftype == "embedding":
        return 0
    if ftype == "logit":
        return n_layers + 1
    return int(node_id.split("_")[0]) + 1


def _merge_supernodes(nodes: dict, links: list, supernodes: dict) -> tuple[dict, list]:
    """Draw each supernode as one node: influence and signed effect summed, edges between the
    same pair of (super)nodes summed, edges inside a supernode dropped."""
    owner = {}
    for name, members in supernodes.items():
        missing = [m for m in members if m not in nodes]
        if missing:
            raise KeyError(f"supernode {name!r}: no node {missing[0]!r} in the graph file.")
        for m in members:
            if m in owner:
                raise ValueError(f"node {m!r} is in two supernodes ({owner[m]!r}, {name!r}).")
            owner[m] = name
    merged = {nid: n for nid, n in nodes.items() if nid not in owner}
    for name, members in supernodes.items():
        parts = [nodes[m] for m in members]
        merged[name] = {
            "node_id": name, "feature_type": "supernode",
            "ctx_idx": max(n["ctx_idx"] for n in parts),
            "layer_row": round(sum(int(m.split("_")[0]) + 1 for m in members) / len(members)),
            "influence": sum(n["influence"] for n in parts),
            "signed_effect": sum(n.get("signed_effect", 0.0) for n in parts),
            "clerp": f"{name} ({len(members)} nodes)",
            "top_contexts": [n["clerp"] for n in parts][:8],
        }  # fmt: skip
    summed: dict[tuple[str, str], float] = {}
    for e in links:
        src, tgt = owner.get(e["source"], e["source"]), owner.get(e["target"], e["target"])
        if src != tgt:
            summed[(src, tgt)] = summed.get((src, tgt), 0.0) + e["weight"]
    return merged, [{"source": a, "target": b, "weight": w} for (a, b), w in summed.items()]


def plot_graph(
    graph_json: dict,
    n_layers: int,
    title: str,
    max_features: int | None = 30,
    max_edges: int = 150,
    supernodes: dict[str, list[str]] | None = None,
):
    """The circuit-tracer-style JSON drawn with plotly: x = token position, y = layer (embeddings at
    the bottom, logits on top). A reading threshold keeps the ``max_features`` most influential
    features (``None``: all) and the error nodes at least as influential as the last of them;
    embeddings and logits are always drawn. Marker size ~ influence; a feature's colour is the sign
    of its effect on the logits (``signed_effect``: blue raises, red lowers; influence itself is
    unsigned); edges blue (excitatory) / red (inhibitory), width ~ |weight|, the ``max_edges``
    strongest among the drawn nodes. ``supernodes`` maps a name to node ids drawn as one node. The
    title says how many features and edges are drawn when not all are. Hover a node for its label,
    influence, effect and top contexts; click a legend entry to hide a node type or edge sign."""
    import plotly.graph_objects as go

    nodes = {n["node_id"]: dict(n) for n in graph_json["nodes"]}
    links = list(graph_json["links"])
    for nid, n in nodes.items():
        n.setdefault("layer_row", _layer_row(nid, n["feature_type"], n_layers))
    if supernodes:
        nodes, links = _merge_supernodes(nodes, links, supernodes)
    feats = sorted((n for n in nodes.values() if n["feature_type"] in ("cross layer transcoder", "supernode")),
                   key=lambda n: -n["influence"])  # fmt: skip
    shown_feats = feats if max_features is None else feats[:max_features]
    cut = shown_feats[-1]["influence"] if shown_feats and len(shown_feats) < len(feats) else -1.0
    keep = {n["node_id"] for n in shown_feats}
    keep |= {nid for nid, n in nodes.items() if n["feature_type"] in ("embedding", "logit")}
    keep |= {nid for nid, n in nodes.items()
             if n["feature_type"] == "mlp reconstruction error" and n["influence"] >= cut}  # fmt: skip
    nodes = {nid: n for nid, n in nodes.items() if nid in keep}
    among = [e for e in links if e["source"] in keep and e["target"] in keep]
    links = sorted(among, key=lambda e: -abs(e["weight"]))[:max_edges]
    # positions: the nodes of one (position, layer) cell spread on a grid inside the cell, most
    # influential first. A crowded position (usually the last, where the prediction is made) gets
    # a wider column, so that its nodes do not pile up: width ~ sqrt(nodes in its fullest cell)
    tokens = graph_json["metadata"]["prompt_tokens"]
    groups: dict[tuple[int, int], list[str]] = {}
    for nid, n in nodes.items():
        groups.setdefault((n["ctx_idx"], n["layer_row"]), []).append(nid)
    fullest = [max([len(m) for (p, _), m in groups.items() if p == pos], default=1)
               for pos in range(len(tokens))]  # fmt: skip
    widths = [min(8.0, max(1.0, 0.8 * math.sqrt(m))) for m in fullest]
    centre = [sum(widths[:pos]) + widths[pos] / 2 for pos in range(len(tokens))]
    coords = {}
    for (pos, y), members in groups.items():
        members.sort(key=lambda m: -nodes[m]["influence"])
        cols = max(1, math.ceil(math.sqrt(2 * len(members))))  # wider than tall: labels are wide
        rows_needed = math.ceil(len(members) / cols)
        for k, nid in enumerate(members):
            dx = (k % cols - (cols - 1) / 2) * (0.84 * widths[pos] / cols)
            dy = (k // cols - (rows_needed - 1) / 2) * (0.7 / max(rows_needed, 1))
            coords[nid] = (centre[pos] + dx, y + dy)
    wmax = max((abs(e["weight"]) for e in links), default=1.0) or 1.0
    fig = go.Figure()
    for sign, colour, name in ((1, "rgba(31,119,180,{a})", "excitatory edge"),
                               (-1, "rgba(214,39,40,{a})", "inhibitory edge")):  # fmt: skip
        # three width classes keep the trace count small and the strong edges visible
        for lo, hi, width, alpha in (
            (0, 0.1, 0.6, 0.25),
            (0.1, 0.4, 1.5, 0.45),
            (0.4, 1.01, 3.0, 0.7),
        ):
            xs, ys = [], []
            for e in links:
                strength = abs(e["weight"]) / wmax
                if (e["weight"] > 0) == (sign > 0) and lo <= strength < hi:
                    (x0, y0), (x1, y1) = coords[e["source"]], coords[e["target"]]
                    xs += [x0, x1, None]
                    ys += [y0, y1, None]
            fig.add_trace(go.Scatter(x=xs, y=ys, mode="lines", hoverinfo="skip",
                                     line={"color": colour.format(a=alpha), "width": width},
                                     name=name, legendgroup=name, showlegend=lo == 0))  # fmt: skip
    styles = {
        "embedding": "square", "cross layer transcoder": "circle", "supernode": "hexagon",
        "mlp reconstruction error": "diamond", "logit": "star",
    }  # fmt: skip
    imax = max((n["influence"] for n in nodes.values()), default=1.0) or 1.0
    for ftype, symbol in styles.items():
        members = [n for n in nodes.values() if n["feature_type"] == ftype]
        if not members:
            continue
        hover = []
        for n in members:
            text = f"{n['clerp']}<br>influence {n['influence']:.3f}"
            if "signed_effect" in n:
                text += f", signed effect on the logits {n['signed_effect']:+.3f}"
            if n.get("activation") is not None:
                text += f"<br>activation {n['activation']:.2f}"
            for line in n.get("top_contexts", []):
                text += "<br>" + str(line).replace("<", "&lt;")
            hover.append(text)
        size = [7 + 18 * math.sqrt(max(n["influence"], 0) / imax) for n in members]
        if ftype == "logit":
            size = [10 + 20 * n.get("token_prob", 0) for n in members]
        if ftype in ("cross layer transcoder", "supernode"):
            colour = ["#1f77b4" if n.get("signed_effect", 0) >= 0 else "#d62728" for n in members]
        else:
            colour = {"embedding": "#7f7f7f", "mlp reconstruction error": "#ff7f0e",
                      "logit": "#9467bd"}[ftype]  # fmt: skip
        fig.add_trace(go.Scatter(
            x=[coords[n["node_id"]][0] for n in members], y=[coords[n["node_id"]][1] for n in members],
            mode="markers+text" if ftype == "supernode" else "markers",
            text=[n["node_id"] for n in members] if ftype == "supernode" else None,
            textposition="top center", hovertext=hover, hovertemplate="%{hovertext}<extra></extra>",
            marker={"color": colour, "symbol": symbol, "size": size,
                    "line": {"width": 0.5, "color": "black"}},
            name={"cross layer transcoder": "feature (blue raises, red lowers the logits)"}.get(ftype, ftype),
        ))  # fmt: skip
    n_feats = sum(
        n["feature_type"] in ("cross layer transcoder", "supernode") for n in nodes.values()
    )
    drawn = []
    if n_feats < len(feats):
        drawn.append(f"the {n_feats} most influential of {len(feats)} features")
    if len(links) < len(graph_json["links"]):
        drawn.append(f"the {len(links)} strongest of {len(graph_json['links'])} edges")
    if drawn:
        title += "<br><sup>drawn: " + "; ".join(drawn) + "</sup>"
    fig.update_layout(
        title=title, height=640, width=900, hovermode="closest",
        xaxis={"title": "token position (a crowded position gets a wider column)",
               "tickmode": "array", "tickvals": centre, "showgrid": False,
               "ticktext": [t.replace("\n", "\\n") for t in tokens], "tickangle": -60,
               "range": [0, sum(widths)]},
        yaxis={"title": "layer", "tickmode": "array", "tickvals": list(range(n_layers + 2)),
               "ticktext": ["embeddings", *[f"layer {i}" for i in range(n_layers)], "logits"]},
        legend={"orientation": "h", "y": -0.35}, margin={"b": 150, "t": 90},
    )  # fmt: skip
    return fig


def save_json(graph_json: dict, path) -> None:
    from pathlib import Path

    Path(path).write_text(json.dumps(graph_json))
