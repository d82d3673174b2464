"""Checks for chapter 07, attribution graphs with cross-layer transcoders.

References live in :mod:`course_utils.science.clt` and :mod:`course_utils.science.attribution_graphs`.
"""

from __future__ import annotations

import functools

import torch

from course_utils.checks.core import (
    Case,
    CheckFailed,
    Mistake,
    compare_function,
    exercise,
    mismatch,
)
from course_utils.science import attribution_graphs as AG
from course_utils.science import clt as CLT


def _g(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _clt_weights(seed: int, n_layers: int = 3, d_in: int = 5, d_sae: int = 7, batch: int = 6):
    """x, W_enc, b_enc, threshold, W_dec (list), b_dec: thresholds positive and varied, biases
    non-zero, so a forgotten threshold, bias or decoder shows."""
    g = _g(seed)
    x = torch.randn(batch, n_layers, d_in, generator=g)
    W_enc = torch.randn(n_layers, d_in, d_sae, generator=g) / d_in**0.5
    b_enc = torch.randn(n_layers, d_sae, generator=g) * 0.3
    threshold = torch.rand(n_layers, d_sae, generator=g) * 0.5
    W_dec = [
        torch.randn(d_sae, n_layers - s, d_in, generator=g) / d_sae**0.5 for s in range(n_layers)
    ]
    b_dec = torch.randn(n_layers, d_in, generator=g) * 0.5
    return x, W_enc, b_enc, threshold, W_dec, b_dec


# ---------------------------------------------------------------- 1.1 CLT forward


def _acts(x, W_enc, b_enc, threshold):
    pre = torch.einsum("bld,lds->bls", x, W_enc) + b_enc
    return pre * (pre > threshold)


def _decode(acts, W_dec, b_dec, same_layer_only=False, skip_bias=False):
    outs = []
    for t in range(len(W_dec)):
        y = torch.zeros_like(b_dec[t]).expand(acts.shape[0], -1) if skip_bias else b_dec[t]
        sources = [t] if same_layer_only else range(t + 1)
        for s in sources:
            y = y + acts[:, s] @ W_dec[s][:, t - s]
        outs.append(y.expand(acts.shape[0], -1))
    return torch.stack(outs, 1)


def _fwd_per_layer(x, W_enc, b_enc, threshold, W_dec, b_dec):
    a = _acts(x, W_enc, b_enc, threshold)
    return a, _decode(a, W_dec, b_dec, same_layer_only=True)


def _fwd_relu(x, W_enc, b_enc, threshold, W_dec, b_dec):
    a = torch.relu(torch.einsum("bld,lds->bls", x, W_enc) + b_enc)
    return a, _decode(a, W_dec, b_dec)


def _fwd_shifted(x, W_enc, b_enc, threshold, W_dec, b_dec):
    a = torch.relu(torch.einsum("bld,lds->bls", x, W_enc) + b_enc - threshold)
    return a, _decode(a, W_dec, b_dec)


def _fwd_no_bias(x, W_enc, b_enc, threshold, W_dec, b_dec):
    a = _acts(x, W_enc, b_enc, threshold)
    return a, _decode(a, W_dec, b_dec, skip_bias=True)


def _fwd_target_index(x, W_enc, b_enc, threshold, W_dec, b_dec):
    a = _acts(x, W_enc, b_enc, threshold)
    outs = []
    for t in range(len(W_dec)):
        y = b_dec[t]
        for s in range(t + 1):
            y = y + a[:, s] @ W_dec[s][:, t]
        outs.append(y)
    return a, torch.stack(outs, 1)


def _fwd_all_sources(x, W_enc, b_enc, threshold, W_dec, b_dec):
    """Later layers' features also write to earlier MLPs (decoder t - s read modulo its length)."""
    a = _acts(x, W_enc, b_enc, threshold)
    outs = []
    for t in range(len(W_dec)):
        y = b_dec[t]
        for s in range(len(W_dec)):
            y = y + a[:, s] @ W_dec[s][:, abs(t - s) % W_dec[s].shape[1]]
        outs.append(y)
    return a, torch.stack(outs, 1)


FORWARD_MISTAKES = [
    Mistake(
        "per-layer transcoders",
        _fwd_per_layer,
        "MLP t's reconstruction sums the decoders of features from EVERY layer s <= t: "
        "y_hat^t = b_dec[t] + sum_{s <= t} acts[:, s] @ W_dec[s][:, t - s]. Using only layer t's own "
        "features is a per-layer transcoder.",
    ),
    Mistake(
        "ReLU, no threshold",
        _fwd_relu,
        "JumpReLU keeps a pre-activation only when it exceeds its threshold: pre * (pre > threshold). "
        "A ReLU lets every small positive value through.",
    ),
    Mistake(
        "threshold subtracted",
        _fwd_shifted,
        "JumpReLU does not shift the value: an active feature outputs its full pre-activation "
        "(pre * (pre > threshold)), not ReLU(pre - threshold).",
    ),
    Mistake(
        "forgot the decoder bias",
        _fwd_no_bias,
        "each layer's reconstruction starts from its decoder bias b_dec[t].",
    ),
    Mistake(
        "target layer used as the decoder index",
        _fwd_target_index,
        "W_dec[s] only holds decoders to layers s, s+1, ...: layer s's decoder into MLP t is "
        "W_dec[s][:, t - s], not W_dec[s][:, t].",
    ),
    Mistake(
        "later features write to earlier MLPs",
        _fwd_all_sources,
        "a layer-s feature cannot affect an earlier MLP: sum over s <= t only.",
    ),
]


def _forward_cases() -> list[Case]:
    x, W_enc, b_enc, threshold, W_dec, b_dec = _clt_weights(0)
    one = _clt_weights(1, n_layers=2, d_in=4, d_sae=3, batch=1)
    zero_theta = list(_clt_weights(2, n_layers=2))
    zero_theta[3] = torch.zeros_like(zero_theta[3])
    return [
        Case("3 layers, seeded", (x, W_enc, b_enc, threshold, W_dec, b_dec)),
        Case("zero input", (torch.zeros_like(x), W_enc, b_enc, threshold, W_dec, b_dec)),
        Case("2 layers, batch of one", one),
        Case("threshold 0 (a ReLU CLT)", tuple(zero_theta)),
    ]


@exercise("1.1", "clt_forward")
def clt_forward(learner) -> str:
    return compare_function(learner, CLT.clt_forward, _forward_cases(), FORWARD_MISTAKES)


# ---------------------------------------------------------------- 1.2 CLT loss


def _loss_with(norm_fn=None, penalty=None, mse_mean=False):
    def loss(x, y, W_enc, b_enc, threshold, W_dec, b_dec, sparsity_coeff, c):
        acts, y_hat = CLT.clt_forward(x, W_enc, b_enc, threshold, W_dec, b_dec)
        err = (y_hat - y).pow(2)
        mse = err.mean((-1, -2)).mean() if mse_mean else err.sum((-1, -2)).mean()
        norms = norm_fn(W_dec) if norm_fn else CLT.decoder_norms(W_dec)
        pen = penalty(c, norms, acts) if penalty else torch.tanh(c * norms * acts)
        return mse + sparsity_coeff * pen.sum((-1, -2)).mean()

    return loss


LOSS_MISTAKES = [
    Mistake(
        "own-layer decoder norm only",
        _loss_with(norm_fn=lambda W_dec: torch.stack([w[:, 0].norm(dim=-1) for w in W_dec])),
        "||W_dec,i|| is the norm of ALL of feature i's decoder vectors concatenated (every target "
        "layer): W_dec[s][i].flatten().norm(). A feature pays for every layer it writes to.",
    ),
    Mistake(
        "sum of per-layer norms",
        _loss_with(norm_fn=lambda W_dec: torch.stack([w.norm(dim=-1).sum(-1) for w in W_dec])),
        "take the norm of the concatenated decoder vectors (sqrt of the summed squares), not the sum "
        "of the per-layer norms.",
    ),
    Mistake(
        "no decoder norm",
        _loss_with(penalty=lambda c, norms, acts: torch.tanh(c * acts)),
        "the penalty is tanh(c * ||W_dec,i|| * a_i): without the decoder norm, the CLT shrinks "
        "activations and grows decoders to dodge it.",
    ),
    Mistake(
        "L1 instead of tanh",
        _loss_with(penalty=lambda c, norms, acts: c * norms * acts),
        "apply tanh: tanh(c * ||W_dec,i|| * a_i) saturates at 1, so large activations are not "
        "punished more than small ones (an L0-like penalty).",
    ),
    Mistake(
        "MSE averaged over d_model and layers",
        _loss_with(mse_mean=True),
        "sum the squared error over d_model and over layers, then average over the batch.",
    ),
]


def _loss_cases() -> list[Case]:
    x, W_enc, b_enc, threshold, W_dec, b_dec = _clt_weights(3)
    y = torch.randn(x.shape, generator=_g(4))
    two = _clt_weights(5, n_layers=2, batch=1)
    y2 = torch.randn(two[0].shape, generator=_g(6))
    return [
        Case("3 layers, lambda 0.7, c 2", (x, y, W_enc, b_enc, threshold, W_dec, b_dec, 0.7, 2.0)),
        Case("lambda 0: pure reconstruction", (x, y, W_enc, b_enc, threshold, W_dec, b_dec, 0.0, 1.0)),
        Case("2 layers, batch of one, c 0.3", (two[0], y2, *two[1:], 1.5, 0.3)),
        Case("perfect reconstruction target", (x, CLT.clt_forward(x, W_enc, b_enc, threshold, W_dec, b_dec)[1],
                                               W_enc, b_enc, threshold, W_dec, b_dec, 1.0, 1.0)),
    ]  # fmt: skip


@exercise("1.2", "clt_loss")
def clt_loss(learner) -> str:
    summary = compare_function(learner, CLT.clt_loss, _loss_cases(), LOSS_MISTAKES)
    # differentiable: gradients must reach the decoders through the penalty's norm
    x, W_enc, b_enc, threshold, W_dec, b_dec = _clt_weights(7)
    W_dec = [w.clone().requires_grad_(True) for w in W_dec]
    y = torch.randn(x.shape, generator=_g(8))
    out = learner(x, y, W_enc, b_enc, threshold, W_dec, b_dec, 0.5, 1.0)
    if not isinstance(out, torch.Tensor) or not out.requires_grad:
        from course_utils.checks.core import CheckFailed

        raise CheckFailed(
            "the loss must stay differentiable in W_dec (no .item(), no torch.no_grad)."
        )
    return summary + "; differentiable in W_dec"


# ---------------------------------------------------------------- 3.1 feature edges


def feature_edges_reference(grad_mlp_out, W_dec_s, activations, layer):
    """edges[b, n] = a_n * sum_{l >= layer} W_dec_s[n, l - layer] . grad_mlp_out[b, l]."""
    return torch.einsum("bld,nld->bn", grad_mlp_out[:, layer:], W_dec_s) * activations


def _edges_own_layer(grad_mlp_out, W_dec_s, activations, layer):
    return (grad_mlp_out[:, layer] @ W_dec_s[:, 0].T) * activations


def _edges_no_activation(grad_mlp_out, W_dec_s, activations, layer):
    return torch.einsum("bld,nld->bn", grad_mlp_out[:, layer:], W_dec_s)


def _edges_misaligned(grad_mlp_out, W_dec_s, activations, layer):
    n = W_dec_s.shape[1]
    return torch.einsum("bld,nld->bn", grad_mlp_out[:, :n], W_dec_s) * activations


EDGE_MISTAKES = [
    Mistake(
        "own layer's decoder only",
        _edges_own_layer,
        "a CLT feature writes to its own layer AND every later MLP output; its out-edge sums all of "
        "them: sum_{l >= layer} W_dec_s[:, l - layer] . grad[:, l].",
    ),
    Mistake(
        "forgot the activation",
        _edges_no_activation,
        "an edge is activation x weight: A_{s->t} = a_s w_{s->t}. Without a_s it is a virtual "
        "weight, the same on every prompt.",
    ),
    Mistake(
        "decoder l matched with gradient l instead of layer + l",
        _edges_misaligned,
        "W_dec_s[:, k] decodes into MLP layer + k, so pair it with grad_mlp_out[:, layer + k] "
        "(grad_mlp_out[:, layer:]).",
    ),
]


def _edge_case(seed: int, batch: int, n_layers: int, layer: int, n: int, d: int = 6) -> Case:
    g = _g(seed)
    grad = torch.randn(batch, n_layers, d, generator=g)
    W = torch.randn(n, n_layers - layer, d, generator=g)
    a = torch.rand(n, generator=g) * 3 + 0.1
    return Case(f"{n_layers} layers, source layer {layer}, {n} features", (grad, W, a, layer))


def _edge_cases() -> list[Case]:
    return [
        _edge_case(0, 4, 3, 0, 5),
        _edge_case(1, 3, 3, 1, 4),
        _edge_case(2, 1, 2, 0, 1),
        _edge_case(3, 2, 4, 2, 3),
    ]


@exercise("3.1", "feature_edges")
def feature_edges(learner) -> str:
    return compare_function(learner, feature_edges_reference, _edge_cases(), EDGE_MISTAKES)


# ---------------------------------------------------------------- 3.2 one row of the graph

CHECK_PROMPT = "for key, value in sorted(d.items()):\n    print(key,"  # the chapter's prompt
OTHER_PROMPT = "if x is None:\n    return"  # a second prompt, read with another dictionary


def _row_variant(
    model,
    clt,
    graph,
    target,
    *,
    freeze_attention=True,
    freeze_layernorm=True,
    freeze_ln_final=True,
    leaf_mlp=True,
    demean=True,
    activation=True,
    all_decoders=True,
    sources=("features", "errors", "embeddings"),
    sign=1.0,
    errors_layer_major=True,
):
    """``AG.attribution_row`` with one step done wrong: the known mistakes of exercise 3.2."""
    s = graph.slices()
    tokens, n_layers = graph.tokens, model.cfg.n_layers
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens[None])
    embed = cache["blocks.0.hook_resid_pre"].clone().requires_grad_(True)
    leaves = [
        cache[f"blocks.{i}.hook_mlp_out"].clone().requires_grad_(True) for i in range(n_layers)
    ]
    live_mlp: dict[int, torch.Tensor] = {}
    ln2: dict[int, torch.Tensor] = {}

    def const(v):
        return lambda a, hook: v

    def keep_live(a, hook):
        live_mlp[hook.layer()] = a
        return a

    def save(a, hook):
        ln2[hook.layer()] = a
        return a

    hooks = [("blocks.0.hook_resid_pre", const(embed))]
    for i in range(n_layers):
        if freeze_attention:
            hooks.append(
                (f"blocks.{i}.attn.hook_pattern", const(cache[f"blocks.{i}.attn.hook_pattern"]))
            )
        if freeze_layernorm:
            for ln in ("ln1", "ln2"):
                hooks.append(
                    (f"blocks.{i}.{ln}.hook_scale", const(cache[f"blocks.{i}.{ln}.hook_scale"]))
                )
        hooks.append((f"blocks.{i}.hook_mlp_out", const(leaves[i]) if leaf_mlp else keep_live))
        hooks.append((f"blocks.{i}.ln2.hook_normalized", save))
    if freeze_layernorm and freeze_ln_final:
        hooks.append(("ln_final.hook_scale", const(cache["ln_final.hook_scale"])))
    logits = model.run_with_hooks(tokens[None], fwd_hooks=hooks)[0]
    if graph.node_kind(target) == "feature":
        layer, pos, feature = graph.active[target].tolist()
        value = ln2[layer][0, pos] @ clt.W_enc[layer, :, feature].detach()
    else:
        last = logits[-1]
        value = last[graph.logit_tokens[target - s["logits"].start]]
        value = value - last.mean() if demean else value
    wrt = [embed] + (leaves if leaf_mlp else [live_mlp[i] for i in range(n_layers)])
    grads = torch.autograd.grad(value, wrt, allow_unused=True)
    grads = [torch.zeros_like(x) if g is None else g for x, g in zip(wrt, grads, strict=True)]
    g_embed, g_mlp = grads[0][0], torch.stack(grads[1:])[:, 0]
    row = torch.zeros(graph.n_nodes)
    with torch.no_grad():
        if "features" in sources:
            for layer in range(n_layers):
                nodes = (graph.active[:, 0] == layer).nonzero().flatten()
                pos, feature = graph.active[nodes, 1], graph.active[nodes, 2]
                dec = clt.W_dec[layer][feature]
                if not all_decoders:
                    dec = dec[:, :1]
                at = g_mlp[layer : layer + dec.shape[1], pos].transpose(0, 1)
                a = graph.activations[nodes] if activation else 1.0
                row[nodes] = a * (dec * at).sum((-1, -2))
        if "errors" in sources:
            errors = (graph.errors * g_mlp).sum(-1)  # [n_layers, n_pos]
            row[s["errors"]] = (errors if errors_layer_major else errors.T).flatten()
        if "embeddings" in sources:
            row[s["embeddings"]] = (cache["blocks.0.hook_resid_pre"][0] * g_embed).sum(-1)
    return sign * row


def _variant(**wrong):
    def row(model, clt, graph, target):
        return _row_variant(model, clt, graph, target, **wrong)

    return row


ROW_MISTAKES = [
    Mistake(
        "LayerNorm left live",
        _variant(freeze_layernorm=False),
        "freeze every LayerNorm scale at its clean value: a hook on each `hook_scale` (ln1, ln2 of "
        "every block and `ln_final`) that returns the cached value. A live scale divides by the "
        "residual's norm, which depends on every source, so the gradient is not the local "
        "replacement model's.",
    ),
    Mistake(
        "ln_final left live",
        _variant(freeze_ln_final=False),
        "only the logit rows differ: freeze `ln_final.hook_scale` too (a hook that returns the "
        "cached scale). Feature targets never pass through the final LayerNorm; logits do.",
    ),
    Mistake(
        "error nodes in position-major order",
        _variant(errors_layer_major=False),
        "error nodes are layer-major: error (l, pos) is node slices()['errors'].start + "
        "l * n_pos + pos, the order of graph.errors.flatten(0, 1).",
    ),
    Mistake(
        "attention left live",
        _variant(freeze_attention=False),
        "freeze the attention patterns: a hook on `blocks.L.attn.hook_pattern` that returns the "
        "cached pattern. The edges carry what attention moved (OV), never why it looked there (QK).",
    ),
    Mistake(
        "gradient taken through the MLPs",
        _variant(leaf_mlp=False),
        "the MLP outputs must be leaves: replace `blocks.L.hook_mlp_out` by a clone of the clean "
        "value with requires_grad (a hook that returns it), and differentiate with respect to those "
        "leaves. Reading the gradient at a live MLP output lets it flow back through the later MLPs "
        "(and into the embeddings through MLP 0): those paths belong to features and error nodes.",
    ),
    Mistake(
        "logits not demeaned",
        _variant(demean=False),
        "a logit node's value is the demeaned logit: logits[-1, token] - logits[-1].mean() (the "
        "unembedding column minus its vocabulary mean, as in the paper).",
    ),
    Mistake(
        "wrong sign",
        _variant(sign=-1.0),
        "an edge is + (source vector . gradient of the target): no minus sign (it is not a loss "
        "being minimised).",
    ),
    Mistake(
        "forgot the activation",
        _variant(activation=False),
        "a feature's source vector is its activation times its decoders: edge = a_s * sum_l "
        "W_dec[layer][feature, l - layer] . grad_mlp[l, pos]. Without a_s it is a virtual weight.",
    ),
    Mistake(
        "own layer's decoder only",
        _variant(all_decoders=False),
        "a CLT feature writes to its own MLP AND every later one: sum W_dec[layer][feature, k] . "
        "grad_mlp[layer + k, pos] over every k.",
    ),
    Mistake(
        "error and embedding nodes left at zero",
        _variant(sources=("features",)),
        "errors and embeddings are sources too: error (layer, pos) gets graph.errors[layer, pos] . "
        "grad_mlp[layer, pos] (entries graph.slices()['errors'], layer-major) and embedding pos gets "
        "the clean `blocks.0.hook_resid_pre` vector . its gradient.",
    ),
]


@functools.lru_cache(maxsize=1)
def _default_setup():
    from course_utils.science.models import load_model

    model = load_model("course-2l")
    clt = CLT.load_clt()
    graph = AG.attribute(model, clt, model.to_tokens(CHECK_PROMPT)[0])
    return model, clt, graph


@functools.lru_cache(maxsize=1)
def _plt_pair():
    from course_utils.science.models import load_sae

    return CLT.CrossLayerTranscoder.from_transcoders(
        {layer: load_sae(f"course-2l-tc{layer}") for layer in (0, 1)}
    )


_OTHER_GRAPHS: dict = {}


def _other_graph(model, clt):
    key = (id(model), id(clt))
    if key not in _OTHER_GRAPHS:
        _OTHER_GRAPHS.clear()
        _OTHER_GRAPHS[key] = AG.attribute(model, clt, model.to_tokens(OTHER_PROMPT)[0], edges=False)
    return _OTHER_GRAPHS[key]


def _blanked(graph: AG.Graph) -> AG.Graph:
    """The graph without its answers: the learner's function must compute the row."""
    import dataclasses

    return dataclasses.replace(graph, adjacency=torch.full_like(graph.adjacency, float("nan")))


def _row_targets(graph: AG.Graph) -> dict[str, int]:
    """The targets the check asks for (a fixed rule): the layer-0 and the layer-1 feature with the
    largest activation at the last position, and the most likely token's logit node."""
    last = graph.active[:, 1] == graph.n_pos - 1
    out = {}
    for layer in (0, 1):
        nodes = (last & (graph.active[:, 0] == layer)).nonzero().flatten()
        out[f"layer-{layer} feature"] = int(nodes[graph.activations[nodes].argmax()])
    out["top logit"] = graph.slices()["logits"].start
    return out


def _row_compare_for(graph: AG.Graph):
    """Compare rows; a mismatch names the node where the difference is largest (which kind, which
    layer and position), since a bare index into a row of ~1,700 nodes tells a learner nothing."""

    def compare(expected, actual):
        if isinstance(actual, torch.Tensor) and actual.requires_grad:
            return (
                "your row still requires grad: return it detached (compute the dot products under "
                "torch.no_grad(), or call .detach())"
            )
        problem = mismatch(expected, actual, atol=1e-4, rtol=1e-3)
        if problem and isinstance(actual, torch.Tensor) and actual.shape == expected.shape:
            node = int((actual.double() - expected.double()).abs().nan_to_num(float("inf")).argmax())
            problem += f" (largest difference at {_node_name(graph, node)})"
        return problem

    return compare


def _node_name(graph: AG.Graph, node: int) -> str:
    kind, s = graph.node_kind(node), graph.slices()
    if kind == "feature":
        layer, pos, feature = graph.active[node].tolist()
        return f"node {node}: feature {feature} of layer {layer} at position {pos}"
    if kind == "error":
        layer, pos = divmod(node - s["errors"].start, graph.n_pos)
        return f"node {node}: the error of layer {layer} at position {pos}"
    if kind == "embedding":
        return f"node {node}: the embedding at position {node - s['embeddings'].start}"
    return f"node {node}: a logit"


@exercise("3.2", "attribution_row")
def attribution_row(learner, model=None, clt=None, graph=None) -> str:
    """Rows of the chapter's graph (``graph.adjacency``) and of a second prompt's graph built with
    chapter 05's per-layer transcoders (so notebook globals cannot stand in for the arguments)."""
    if model is None or clt is None or graph is None:
        model, clt, graph = _default_setup()
    hidden = _blanked(graph)
    cases = [
        Case(f"{name} (node {t})", (model, clt, hidden, t))
        for name, t in _row_targets(graph).items()
    ]
    adjacency = graph.adjacency

    def attribution_row(model, clt, graph, target):  # the answer: the row AG.attribute built
        return adjacency[target].clone()

    summary = compare_function(
        learner,
        attribution_row,
        cases,
        ROW_MISTAKES,
        compare=_row_compare_for(graph),
    )
    plt = _plt_pair()
    other = _other_graph(model, plt)
    others = [
        Case(
            f"another prompt, per-layer transcoders as the CLT: {name} (node {t})",
            (model, plt, other, t),
        )
        for name, t in _row_targets(other).items()
        if name != "layer-0 feature"
    ]
    try:
        compare_function(
            learner, AG.attribution_row, others, ROW_MISTAKES, compare=_row_compare_for(other)
        )
    except (CheckFailed, NotImplementedError):
        raise
    except Exception as error:  # a crash only on the second prompt: globals stood in for arguments
        raise CheckFailed(
            f"the chapter's prompt passed, but on another prompt ({other.n_pos} tokens, chapter "
            f"05's per-layer transcoders as `clt`) your function raised {type(error).__name__}: "
            f"{error}. Hint: use the arguments (`graph.tokens`, `clt`, `model`), not the "
            "notebook's globals such as `tokens` or `graph`."
        ) from None
    return (
        summary.replace("matches the reference", "matches graph.adjacency")
        + f"; and {len(others)} rows of another prompt's graph with another dictionary"
    )


# ---------------------------------------------------------------- 4.1 normalise adjacency


def _norm_signed(A):
    return A / A.sum(1, keepdim=True).clamp(min=1e-10)


def _norm_columns(A):
    W = A.abs()
    return W / W.sum(0, keepdim=True).clamp(min=1e-10)


def _norm_no_clamp(A):
    W = A.abs()
    return W / W.sum(1, keepdim=True)


def _norm_max(A):
    W = A.abs()
    return W / W.max(1, keepdim=True).values.clamp(min=1e-10)


NORMALISE_MISTAKES = [
    Mistake("signed", _norm_signed,
            "take absolute values first: influence counts inhibitory edges too, and signed rows can "
            "sum to ~0."),
    Mistake("columns", _norm_columns,
            "normalise each ROW (a target's incoming edges; adjacency is [target, source]) to sum 1."),
    Mistake("division by zero", _norm_no_clamp,
            "nodes with no inputs (embeddings, errors) have all-zero rows: guard the division "
            "(.clamp(min=1e-10)) so they stay 0 instead of NaN."),
    Mistake("divided by the max", _norm_max,
            "divide by the row SUM so each node's input fractions add up to 1."),
]  # fmt: skip


def _dag(seed: int, n: int, sources: int = 2, density: float = 0.6) -> torch.Tensor:
    """A random signed DAG adjacency [target, source]: node j may feed node i > j; the first
    ``sources`` nodes have no inputs."""
    g = _g(seed)
    A = torch.randn(n, n, generator=g) * (torch.rand(n, n, generator=g) < density)
    A = torch.tril(A, diagonal=-1)
    A[:sources] = 0
    return A


def _normalise_cases() -> list[Case]:
    return [
        Case("random DAG with source rows", (_dag(0, 7),)),
        Case("all negative edges", (-_dag(1, 5).abs(),)),
        Case("a single edge", (torch.tensor([[0.0, 0.0], [-2.0, 0.0]]),)),
    ]


@exercise("4.1", "normalise_adjacency")
def normalise_adjacency(learner) -> str:
    return compare_function(learner, AG.normalise_adjacency, _normalise_cases(), NORMALISE_MISTAKES)


# ---------------------------------------------------------------- 4.2 indirect influence


def _infl_no_minus_identity(A):
    eye = torch.eye(A.shape[0])
    return torch.linalg.inv(eye - A)


def _infl_direct(A):
    return A.clone()


def _infl_two_hops(A):
    return A + A @ A


def _infl_plus(A):
    eye = torch.eye(A.shape[0])
    return torch.linalg.inv(eye + A) - eye


INFLUENCE_MISTAKES = [
    Mistake("kept the identity", _infl_no_minus_identity,
            "(I - A)^-1 = I + A + A^2 + ...: subtract I, a node's influence on itself is not a path."),
    Mistake("direct effects only", _infl_direct,
            "indirect influence sums paths of EVERY length: A + A^2 + A^3 + ... = (I - A)^-1 - I."),
    Mistake("paths of length <= 2", _infl_two_hops,
            "longer paths count too (embedding -> layer 0 -> layer 1 -> logit has 3 edges): "
            "use (I - A)^-1 - I."),
    Mistake("I + A", _infl_plus,
            "the geometric series sum_k A^k is (I - A)^-1, with a minus sign."),
]  # fmt: skip


def _influence_cases() -> list[Case]:
    return [
        Case("normalised DAG of 6", (AG.normalise_adjacency(_dag(2, 6)),)),
        Case("chain of 4 (3 hops)", (torch.diag(torch.tensor([1.0, 0.5, 1.0]), -1),)),
        Case("normalised DAG of 9", (AG.normalise_adjacency(_dag(3, 9, sources=3)),)),
    ]


@exercise("4.2", "indirect_influence")
def indirect_influence(learner) -> str:
    return compare_function(learner, AG.indirect_influence, _influence_cases(), INFLUENCE_MISTAKES)


# ---------------------------------------------------------------- 4.3 prune nodes


def _prune_relative_max(influence, is_feature, threshold):
    keep = ~is_feature.clone()
    f = influence[is_feature]
    keep[is_feature] = f >= (1 - threshold) * f.max()
    return keep


def _prune_one_short(influence, is_feature, threshold):
    keep = ~is_feature.clone()
    f = influence[is_feature]
    order = f.sort(descending=True)
    cum = order.values.cumsum(0) / f.sum()
    chosen = torch.zeros_like(f, dtype=torch.bool)
    chosen[order.indices[cum < threshold]] = True
    keep[is_feature] = chosen
    return keep


def _prune_everything(influence, is_feature, threshold):
    all_nodes = torch.ones_like(is_feature)
    return AG.prune_nodes(influence, all_nodes, threshold)


def _prune_ascending(influence, is_feature, threshold):
    keep = ~is_feature.clone()
    f = influence[is_feature]
    order = f.sort()
    cum = order.values.cumsum(0) / f.sum()
    k = int((cum < threshold).sum())
    chosen = torch.zeros_like(f, dtype=torch.bool)
    chosen[order.indices[: k + 1]] = True
    keep[is_feature] = chosen
    return keep


PRUNE_MISTAKES = [
    Mistake("relative to the max", _prune_relative_max,
            "keep the smallest set of top features whose influences SUM to `threshold` of the "
            "features' total (sort descending, cumulative sum), not those above a fraction of the max."),
    Mistake("one node short", _prune_one_short,
            "include the node at which the cumulative share first reaches the threshold: the kept "
            "prefix must hold AT LEAST `threshold` of the influence."),
    Mistake("pruned non-feature nodes", _prune_everything,
            "only features are pruned: embeddings, errors and logits are always kept (is_feature "
            "False -> keep True), and the threshold is a share of the FEATURES' total influence."),
    Mistake("ascending order", _prune_ascending,
            "sort by influence in DESCENDING order: keep the most influential features."),
]  # fmt: skip


def _prune_cases() -> list[Case]:
    g = _g(9)
    infl = torch.rand(12, generator=g) ** 3
    is_f = torch.tensor([True] * 8 + [False] * 4)
    infl2 = torch.tensor([0.5, 0.3, 0.1, 0.05, 0.05, 0.9, 0.2])
    is_f2 = torch.tensor([True, True, True, True, True, False, False])
    return [
        Case("12 nodes, threshold 0.8", (infl, is_f, 0.8)),
        Case("hand-made, threshold 0.8 (exactly reached)", (infl2, is_f2, 0.8)),
        Case("threshold 0.5", (infl, is_f, 0.5)),
        Case("threshold 1.0 keeps every feature with influence", (infl2, is_f2, 1.0)),
        # 0.4 + 0.2 + 0.2 is the first prefix past 0.6 of 1.1: the cut-off is 0.2, and the third
        # feature tied at it is kept too
        Case("a tie at the cut-off (threshold 0.6)",
             (torch.tensor([0.2, 0.4, 0.2, 0.2, 0.1]), torch.ones(5, dtype=torch.bool), 0.6)),
    ]  # fmt: skip


@exercise("4.3", "prune_nodes")
def prune_nodes(learner) -> str:
    return compare_function(learner, AG.prune_nodes, _prune_cases(), PRUNE_MISTAKES)


# ---------------------------------------------------------------- 4.4 graph scores


def toy_graph(
    seed: int, n_features: int = 6, n_pos: int = 2, n_layers: int = 2, n_logits: int = 2
) -> AG.Graph:
    """A small random graph with the real node layout: features get inputs from embeddings, errors
    and earlier features; logits from everything before them."""
    g = _g(seed)
    n_e = n_layers * n_pos
    N = n_features + n_e + n_pos + n_logits
    A = torch.zeros(N, N)
    src_other = list(range(n_features, n_features + n_e + n_pos))
    for t in range(n_features):
        for s in list(range(t)) + src_other:
            if torch.rand(1, generator=g) < 0.6:
                A[t, s] = torch.randn(1, generator=g)
    for t in range(N - n_logits, N):
        for s in range(N - n_logits):
            if torch.rand(1, generator=g) < 0.5:
                A[t, s] = torch.randn(1, generator=g)
    probs = torch.rand(n_logits, generator=g)
    probs = probs / probs.sum() * 0.9
    active = torch.stack([torch.zeros(n_features, dtype=torch.long),
                          torch.arange(n_features) % n_pos, torch.arange(n_features)], 1)  # fmt: skip
    return AG.Graph(
        tokens=torch.arange(n_pos), active=active, activations=torch.ones(n_features), adjacency=A,
        logit_tokens=torch.arange(n_logits), logit_probs=probs, values=torch.zeros(N),
        bias=torch.zeros(N), n_layers=n_layers, errors=torch.zeros(n_layers, n_pos, 1),
    )  # fmt: skip


def _scores_with(replacement_fn=None, completeness_fn=None, respect_mask=True):
    def scores(graph, node_mask=None):
        ref = AG.graph_scores(graph, node_mask if respect_mask else None)
        return {
            "replacement": replacement_fn(graph, node_mask)
            if replacement_fn
            else ref["replacement"],
            "completeness": completeness_fn(graph, node_mask)
            if completeness_fn
            else ref["completeness"],
        }

    return scores


def _replacement_over_all(graph, node_mask):
    s = graph.slices()
    infl = AG.node_influence(AG.normalise_adjacency(graph.adjacency), graph.logit_weights())
    return float(infl[s["embeddings"]].sum() / infl.sum())


def _completeness_unweighted(graph, node_mask):
    s = graph.slices()
    A_norm = AG.normalise_adjacency(graph.adjacency)
    rows = torch.cat(
        [torch.arange(graph.n_features), torch.arange(s["logits"].start, graph.n_nodes)]
    )
    return float((1 - A_norm[rows][:, s["errors"]].sum(1)).mean())


def _completeness_influence_only(graph, node_mask):
    s = graph.slices()
    A_norm = AG.normalise_adjacency(graph.adjacency)
    infl = AG.node_influence(A_norm, graph.logit_weights())
    rows = torch.arange(graph.n_features)
    w = infl[rows]
    return float(((1 - A_norm[rows][:, s["errors"]].sum(1)) * w).sum() / w.sum())


SCORE_MISTAKES = [
    Mistake("replacement over all nodes", _scores_with(replacement_fn=_replacement_over_all),
            "the replacement score compares SOURCE nodes only: embedding influence / (embedding + "
            "error influence). Feature influence is already counted inside the embeddings' paths."),
    Mistake("unweighted completeness", _scores_with(completeness_fn=_completeness_unweighted),
            "weight each node's non-error share by how much it matters: its logit influence plus "
            "(for logit nodes) its probability."),
    Mistake("logit nodes left out", _scores_with(completeness_fn=_completeness_influence_only),
            "logit nodes have inputs too (and zero influence on themselves): weight by influence + "
            "logit probability so they count."),
    Mistake("pruned nodes ignored", _scores_with(respect_mask=False),
            "with a node mask, pruned features count as ERROR nodes: drop their inputs and treat them "
            "as error sources."),
]  # fmt: skip


def _score_cases() -> list[Case]:
    g1 = toy_graph(0)
    g2 = toy_graph(1, n_features=9, n_pos=3)
    mask = torch.ones(g2.n_nodes, dtype=torch.bool)
    mask[[1, 4, 7]] = False
    no_err = toy_graph(2)
    no_err.adjacency[:, no_err.slices()["errors"]] = 0
    return [
        Case("unpruned", (g1,)),
        Case("3 of 9 features pruned", (g2, mask)),
        Case("no error edges (scores 1)", (no_err,)),
        Case("no features pruned, mask given", (g1, torch.ones(g1.n_nodes, dtype=torch.bool))),
    ]


@exercise("4.4", "graph_scores")
def graph_scores(learner) -> str:
    return compare_function(learner, AG.graph_scores, _score_cases(), SCORE_MISTAKES, atol=1e-5)


# ---------------------------------------------------------------- 7.1 supernode effect


def _layered(seed: int, n0: int, n1: int, dtype=torch.float32, strength: float = 0.4):
    """A random two-layer feature graph: activations a > 0, the feature block A [target, source]
    (layer-0 features feed layer-1 features; each edge scales with its source's activation) and
    signed direct edges c into the target."""
    g = _g(seed)
    n = n0 + n1
    a = torch.rand(n, generator=g) * 2 + 0.5
    w = torch.randn(n, n, generator=g) * strength
    A = torch.zeros(n, n)
    A[n0:, :n0] = w[n0:, :n0] * a[:n0]
    c = torch.randn(n, generator=g) * 0.5
    return A.to(dtype), a.to(dtype), c.to(dtype)


def _effect_case(name: str, seed: int, n0: int, n1: int, members, dtype=torch.float32,
                 grad: bool = False, strength: float = 0.4) -> Case:  # fmt: skip
    A, a, c = _layered(seed, n0, n1, dtype, strength)
    if grad:
        c = c.clone().requires_grad_(True)
    return Case(name, (A, a, c, members))


def _effect_cases() -> list[Case]:
    return [
        _effect_case("layer-0 and layer-1 members joined by edges, both signs", 0, 4, 3, [0, 2, 4, 5]),
        _effect_case("one member", 1, 3, 3, [1]),
        _effect_case("members given as a tensor, float64", 2, 5, 4,
                     torch.tensor([1, 3, 4, 7]), dtype=torch.float64),
        _effect_case("direct edges that require grad", 3, 4, 4, [0, 2, 5], grad=True),
        _effect_case("layer-1 members only", 4, 3, 4, [3, 5]),
        # strong edges: a mistake in how paths combine (orientation, signs) shows clearly
        _effect_case("strong edges, members in both layers", 5, 4, 4, [1, 4, 6], strength=1.5),
    ]  # fmt: skip


def _effect_compare(expected, actual):
    if isinstance(actual, torch.Tensor) and actual.requires_grad:
        return (
            "your function returned a tensor that still requires grad (attached to the autograd "
            "graph of its inputs). Return a detached 0-d tensor (`.detach()`, or compute under "
            "`torch.no_grad()`)"
        )
    return mismatch(expected, actual, 1e-5, 1e-4)


def _effects_of(A, a, c, divide_by_source=False, clear=None):
    A, a, c = A.detach(), a.detach(), c.detach()
    R = A / (a[None, :] if divide_by_source else a[:, None])
    if clear is not None:
        R[clear] = 0.0
    return torch.linalg.solve((torch.eye(len(a), dtype=R.dtype) - R).T, c)


def _effect_sum_of_singles(A, a, c, members):
    return -_effects_of(A, a, c)[torch.as_tensor(members)].sum()


def _effect_direct_only(A, a, c, members):
    return -c.detach()[torch.as_tensor(members)].sum()


def _effect_unsigned(A, a, c, members):
    m = torch.as_tensor(members)
    return -_effects_of(A.abs(), a, c.abs(), clear=m)[m].sum()


def _effect_excitatory_only(A, a, c, members):
    m = torch.as_tensor(members)
    effect = _effects_of(A, a, c, clear=m)[m]
    return -effect[effect > 0].sum()


def _effect_source_activation(A, a, c, members):
    m = torch.as_tensor(members)
    return -_effects_of(A, a, c, divide_by_source=True, clear=m)[m].sum()


def _effect_abs_edges(A, a, c, members):
    m = torch.as_tensor(members)
    return -_effects_of(A.abs(), a, c, clear=m)[m].sum()


def _effect_not_negated(A, a, c, members):
    m = torch.as_tensor(members)
    return _effects_of(A, a, c, clear=m)[m].sum()


EFFECT_MISTAKES = [
    Mistake("sum of single-feature effects", _effect_sum_of_singles,
            "ablating a group is not the sum of ablating each member: a path s -> t with both in "
            "the group is counted twice. Set the members' rows of R to zero before solving (an "
            "ablated feature no longer responds to its inputs)."),
    Mistake("direct edges only", _effect_direct_only,
            "your answer equals the members' direct edges alone. A feature also acts through later "
            "features: T = c (I - R)^-1. If you did solve, check the orientation: T and c are ROW "
            "vectors (A is indexed [target, source]), so use solve((I - R).T, c) or "
            "c @ torch.linalg.inv(I - R); solve(I - R, c) solves for a column and, with the "
            "members' rows of R zeroed, gives back c for every member."),
    Mistake("unsigned", _effect_unsigned,
            "keep the signs: influence is unsigned, an effect is not. Inhibitory edges and features "
            "(negative A or c) lower the target."),
    Mistake("inhibitory members dropped", _effect_excitatory_only,
            "every member is ablated, including those whose effect is negative (inhibitory "
            "features): sum over all members."),
    Mistake("divided by the source's activation", _effect_source_activation,
            "R[t, s] = A[t, s] / a_t: the TARGET's activation, since t's own effect scales with "
            "a_t (divide row t, `A / a[:, None]`)."),
    Mistake("|A| in place of A", _effect_abs_edges,
            "keep the edges' signs: an inhibitory edge (A[t, s] < 0) lowers its target, so a path "
            "through it carries the opposite sign. Influence uses |A|; an effect does not."),
    Mistake("sign of the change", _effect_not_negated,
            "an ablation removes the members' effect: the change is -sum_s T^G_s."),
]  # fmt: skip


@exercise("7.1", "supernode_effect")
def supernode_effect(learner) -> str:
    return (
        compare_function(learner, AG.supernode_effect, _effect_cases(), EFFECT_MISTAKES,
                         compare=_effect_compare)
        + "; output detached"
    )  # fmt: skip
