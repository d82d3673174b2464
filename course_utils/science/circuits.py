"""Feature circuits through transcoders (chapter 05).

With every MLP replaced by a transcoder, the pre-activation of a transcoder feature is a sum of
terms, one per upstream component, that can be read off a single forward pass:

- input-invariant connections between features: ``f_dec^(0,i) . f_enc^(1,j)``
  (:func:`input_invariant_connections`), scaled by the source activation to get the
  input-dependent attribution ``z_i^(0)(x) * (f_dec . f_enc)`` (:func:`feature_attributions`);
- de-embeddings ``W_E @ f_enc`` (:func:`de_embedding`), also through one head
  (:func:`de_embedding_through_head`);
- through an attention head with the pattern held fixed:
  ``pattern(t, s) * ((W_V W_O) f) . x_pre(s)`` (:func:`head_attribution`), with ``x_pre`` ln1's
  full output (``ln1.hook_normalized * w_ln1 + b_ln1``: the course model is not ``fold_ln``);
- :class:`Circuit`: the exact decomposition of a feature's pre-activation into embedding, position,
  attention-head (per source position), transcoder-feature, transcoder-error and bias terms, and a
  greedy path search (:meth:`Circuit.greedy_paths`) that returns a small graph as plain dicts.

LayerNorm is treated as a constant: its scale (the cached ``hook_scale`` of this very forward pass)
divides the direction, and its centring is applied to the direction (``f . (r - mean r) =
(f - mean f) . r``, exact). Because the scale is the cached one, the decomposition is exact for
this input: attributions + error + bias terms sum to the feature's actual pre-activation. (The
paper also freezes LayerNorm; "input-invariant" numbers here therefore use the centred encoder and
ignore the scale, which is input-dependent.) LayerNorm weights and biases of ln1 are applied
explicitly (ln1's bias gives a bias node); a transcoder reads ``ln2.hook_normalized``, i.e. before
ln2's weight and bias, so none are needed there.
"""

from __future__ import annotations

import torch
from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens import HookedTransformer

from course_utils.science import transcoders as T


def centre(v: Tensor, dim: int = -1) -> Tensor:
    """v minus its mean along ``dim`` (what LayerNorm's centring does to a dot product)."""
    return v - v.mean(dim, keepdim=True)


def _weights(tc):
    tc = T.as_single(tc)
    skip = getattr(tc, "W_skip", None)
    return (
        tc.W_enc.detach(),
        tc.b_enc.detach(),
        tc.W_dec.detach(),
        tc.b_dec.detach(),
        None if skip is None else skip.detach(),
    )


def _trained_layer(tc) -> int | None:
    """The layer a dictionary was trained on, from ``cfg.metadata.hook_name`` when it has one."""
    import re

    hook = getattr(getattr(getattr(tc, "cfg", None), "metadata", None), "hook_name", None)
    match = re.match(r"blocks\.(\d+)\.", hook) if isinstance(hook, str) else None
    return int(match.group(1)) if match else None


# ----------------------------------------------------------------------------- weight-based


def input_invariant_connections(tc0, tc1, centred: bool = True) -> Float[Tensor, "d_sae0 d_sae1"]:
    """``[i, j] = f_dec^(0,i) . f_enc^(1,j)``: how much feature i of the earlier transcoder writes
    along the direction that feature j of the later one reads (the same for every input).

    ``centred`` centres the encoder columns (LayerNorm's centring, exact); the LayerNorm scale is
    input-dependent and is left out (divide by it to get the actual per-token effect).
    """
    layers = (_trained_layer(tc0), _trained_layer(tc1))
    if None not in layers and layers[0] >= layers[1]:
        raise ValueError(
            f"tc0 must be the EARLIER transcoder: got layer {layers[0]} then layer {layers[1]} "
            "(from their cfg.metadata). Pass (earlier, later), e.g. (tc0, tc1)."
        )
    W_enc1 = _weights(tc1)[0]
    W_dec0 = _weights(tc0)[2]
    if W_dec0.shape[-1] != W_enc1.shape[0]:
        raise ValueError(
            f"the earlier transcoder writes d_out={W_dec0.shape[-1]} but the later one reads "
            f"d_in={W_enc1.shape[0]}: both must live in the model's residual stream (d_model)."
        )
    enc = centre(W_enc1, dim=0) if centred else W_enc1
    return W_dec0 @ enc


def feature_attributions(
    z0: Float[Tensor, "*pos d_sae0"],
    tc0,
    tc1,
    feature: int,
    scale: Float[Tensor, "*pos 1"] | float = 1.0,
) -> Float[Tensor, "*pos d_sae0"]:
    """Input-dependent attribution ``z_i^(0)(x) * (f_dec^(0,i) . f_enc^(1,j)) / scale``.

    ``scale`` is ln2's ``hook_scale`` of the later layer at the same positions (LayerNorm frozen).
    """
    d_sae1 = _weights(tc1)[0].shape[-1]
    if not 0 <= feature < d_sae1:
        raise ValueError(f"feature {feature} out of range for d_sae={d_sae1}.")
    conn = input_invariant_connections(tc0, tc1)[:, feature]
    if z0.shape[-1] != conn.shape[0]:
        raise ValueError(
            f"z0 has {z0.shape[-1]} latents in its last dimension but the earlier transcoder has "
            f"d_sae={conn.shape[0]}."
        )
    return z0 * conn / scale


def de_embedding(model: HookedTransformer, tc, feature: int) -> Float[Tensor, " d_vocab"]:
    """``W_E @ centre(f_enc)``: how much each token's embedding directly excites the feature
    (ignoring position embeddings, attention, and LayerNorm's scale)."""
    f = _enc_direction(tc, feature)
    return model.W_E.detach() @ f


@torch.no_grad()
def extended_de_embedding(
    model: HookedTransformer, tc0, tc, feature: int
) -> Float[Tensor, " d_vocab"]:
    """``(x + tc0(normalise(x))) @ centre(f_enc)`` with ``x = W_E + mean(W_pos)``: how much each
    token, alone at an average position, excites ``feature`` of a later-layer transcoder ``tc``
    directly AND through MLP 0 (replaced by its transcoder ``tc0``, which reads ln2's normalised
    output, before ln2's weight and bias). Attention and the later LayerNorm's scale are ignored,
    as in :func:`de_embedding`. It reads MLP 0 as part of the embedding (an "extended
    embedding"), a common reading of small transformers."""
    f = _enc_direction(tc, feature)
    x = model.W_E.detach() + model.W_pos.detach().mean(0)  # [d_vocab, d_model]
    return (x + T.as_single(tc0)(ln_normalise(x, model.cfg.eps))) @ f


def ln_normalise(x: Float[Tensor, "... d"], eps: float = 1e-5) -> Float[Tensor, "... d"]:
    """LayerNorm without its weight and bias (TransformerLens's ``hook_normalized``): centre each
    row, divide by its root-mean-square plus ``eps`` under the square root (biased variance)."""
    centred = x - x.mean(-1, keepdim=True)
    return centred / (centred.pow(2).mean(-1, keepdim=True) + eps).sqrt()


def de_embedding_through_head(
    model: HookedTransformer, tc, feature: int, layer: int, head: int
) -> Float[Tensor, " d_vocab"]:
    """``W_E @ diag(w_ln1) W_V W_O @ centre(f_enc)``: tokens that excite the feature when moved by
    head (layer, head), per unit of attention (ln1's scale and bias ignored)."""
    f = _enc_direction(tc, feature)
    w1, _ = _ln1_affine(model, layer)
    g = model.W_V[layer, head].detach() @ (model.W_O[layer, head].detach() @ f)
    return model.W_E.detach() @ (w1 * g)


def head_attribution(
    pattern: Float[Tensor, "dest src"],
    x_pre: Float[Tensor, "src d_model"],
    W_V: Float[Tensor, "d_model d_head"],
    W_O: Float[Tensor, "d_head d_model"],
    f: Float[Tensor, " d_model"],
    dest: int,
) -> Float[Tensor, " src"]:
    """Contribution of each source position to ``f . head_output(dest)``, pattern held fixed:
    ``pattern[dest, s] * ((W_V W_O) f) . x_pre[s]`` (the b_V term is separate: it sums to
    ``(b_V W_O) . f`` because each pattern row sums to 1)."""
    if pattern.ndim != 2 or x_pre.ndim != 2 or pattern.shape[1] != x_pre.shape[0]:
        raise ValueError(
            f"pattern must be [dest, src] and x_pre [src, d_model] with matching src; got "
            f"{tuple(pattern.shape)} and {tuple(x_pre.shape)}."
        )
    if not 0 <= dest < pattern.shape[0]:
        raise ValueError(f"dest {dest} out of range for {pattern.shape[0]} positions.")
    return pattern[dest] * (x_pre @ (W_V @ (W_O @ f)))


def _enc_direction(tc, feature: int) -> Tensor:
    W_enc = _weights(tc)[0]
    if not 0 <= feature < W_enc.shape[-1]:
        raise ValueError(f"feature {feature} out of range for d_sae={W_enc.shape[-1]}.")
    return centre(W_enc[:, feature])


def _ln1_affine(model: HookedTransformer, layer: int) -> tuple[Tensor, Tensor]:
    return _ln_affine(model.blocks[layer].ln1, model.cfg.d_model)


def _ln_affine(ln, d: int) -> tuple[Tensor, Tensor]:
    w = getattr(ln, "w", None)
    b = getattr(ln, "b", None)
    return (torch.ones(d) if w is None else w.detach(), torch.zeros(d) if b is None else b.detach())


def keep_top(terms: list[dict], top_k: int) -> tuple[list[dict], float]:
    """Reference for exercise 3.5, one step of the greedy path search: the ``top_k`` terms with the
    largest ``|value|`` (largest first) and the summed value of all the others (the "pruned" error
    node), so that ``sum(kept values) + pruned == sum(all values)``."""
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}.")
    ranked = sorted(terms, key=lambda t: -abs(t["value"]))
    return ranked[:top_k], float(sum(t["value"] for t in ranked[top_k:]))


# ----------------------------------------------------------------------------- exact decomposition


class Circuit:
    """One prompt, one forward pass, every MLP given a transcoder: exact attributions.

    >>> circuit = Circuit(model, tokens, {0: tc0, 1: tc1})
    >>> nodes = circuit.decompose_feature(1, 123, pos=7)    # sums to circuit.pre_activation(...)
    >>> graph = circuit.greedy_paths(1, 123, pos=7, top_k=4, depth=2)
    """

    def __init__(
        self, model: HookedTransformer, tokens: Int[Tensor, "1 pos"] | Tensor, transcoders: dict
    ):
        if model.cfg.attn_only or model.cfg.positional_embedding_type != "standard":
            raise ValueError(
                "Circuit needs attention + MLP blocks and learned position embeddings."
            )
        tokens = torch.as_tensor(tokens)
        if tokens.ndim == 1:
            tokens = tokens[None]
        if tokens.ndim != 2 or tokens.shape[0] != 1:
            raise ValueError(
                f"Circuit analyses one prompt: tokens must be [1, pos], got {tuple(tokens.shape)}."
            )
        for layer, tc in transcoders.items():
            if not 0 <= layer < model.cfg.n_layers:
                raise ValueError(f"layer {layer} out of range for {model.cfg.n_layers} layers.")
            T.check_fits(model, tc, layer)
        self.model, self.tokens = model, tokens
        self.tcs = {layer: _weights(tc) for layer, tc in transcoders.items()}
        with torch.no_grad():
            _, cache = model.run_with_cache(tokens)
        self.cache = {k: v[0].detach() for k, v in cache.items()}

    # -- actual values
    def feature_acts(self, layer: int) -> Float[Tensor, "pos d_sae"]:
        return torch.relu(self.pre_activations(layer))

    def pre_activations(self, layer: int) -> Float[Tensor, "pos d_sae"]:
        W_enc, b_enc, *_ = self._tc(layer)
        return self.cache[f"blocks.{layer}.ln2.hook_normalized"] @ W_enc + b_enc

    def pre_activation(self, layer: int, feature: int, pos: int) -> float:
        return self.pre_activations(layer)[pos, feature].item()

    def _tc(self, layer):
        if layer not in self.tcs:
            raise ValueError(f"no transcoder for layer {layer}; have {sorted(self.tcs)}.")
        return self.tcs[layer]

    def _check_pos(self, pos: int) -> None:
        if not 0 <= pos < self.tokens.shape[1]:
            raise ValueError(f"pos {pos} out of range for a prompt of {self.tokens.shape[1]}.")

    # -- one level of decomposition
    def residual_terms(self, d: Tensor, layer: int, point: str, pos: int) -> list[dict]:
        """Terms whose sum is ``d . resid`` with resid = ``blocks.layer.hook_resid_{point}[pos]``
        (point "pre" or "mid"). Each term: {kind, layer, pos, index, src, value, [expand]}."""
        self._check_pos(pos)
        if point not in ("pre", "mid"):
            raise ValueError(f"point must be 'pre' or 'mid', got {point!r}.")
        m = self.model
        tok = int(self.tokens[0, pos])
        terms = [
            {"kind": "embed", "pos": pos, "index": tok, "value": (m.W_E[tok].detach() @ d).item()},
            {
                "kind": "pos_embed",
                "pos": pos,
                "index": pos,
                "value": (m.W_pos[pos].detach() @ d).item(),
            },
        ]
        attn_layers = range(layer + 1) if point == "mid" else range(layer)
        for lay in range(layer + 1):
            if lay in attn_layers:
                terms += self._attention_terms(d, lay, pos)
            if lay < layer:
                terms += self._mlp_terms(d, lay, pos)
        return terms

    def _attention_terms(self, d: Tensor, layer: int, pos: int) -> list[dict]:
        m, c = self.model, self.cache
        pattern = c[f"blocks.{layer}.attn.hook_pattern"]  # [head, dest, src]
        w1, b1 = _ln1_affine(m, layer)
        x_pre = c[f"blocks.{layer}.ln1.hook_normalized"] * w1 + b1  # [src, d_model]
        terms = []
        bias = (m.b_O[layer].detach() @ d).item()
        for h in range(m.cfg.n_heads):
            g_unit = m.W_V[layer, h].detach() @ (m.W_O[layer, h].detach() @ d)
            bias += (m.b_V[layer, h].detach() @ (m.W_O[layer, h].detach() @ d)).item()
            contrib = head_attribution(
                pattern[h], x_pre, m.W_V[layer, h].detach(), m.W_O[layer, h].detach(), d, pos
            )
            for s in range(pos + 1):
                terms.append(
                    {
                        "kind": "head",
                        "layer": layer,
                        "index": h,
                        "pos": pos,
                        "src": s,
                        "value": contrib[s].item(),
                        "expand": ("head", layer, s, pattern[h, pos, s] * g_unit),
                    }
                )
        terms.append({"kind": "attn_bias", "layer": layer, "pos": pos, "value": bias})
        return terms

    def _mlp_terms(self, d: Tensor, layer: int, pos: int) -> list[dict]:
        c = self.cache
        mlp_out = c[f"blocks.{layer}.hook_mlp_out"][pos]
        if layer not in self.tcs:
            return [{"kind": "mlp", "layer": layer, "pos": pos, "value": (mlp_out @ d).item()}]
        W_enc, b_enc, W_dec, b_dec, W_skip = self.tcs[layer]
        x = c[f"blocks.{layer}.ln2.hook_normalized"][pos]
        z = torch.relu(x @ W_enc + b_enc)
        prediction = z @ W_dec + b_dec + (0 if W_skip is None else W_skip @ x)
        per_feature = z * (W_dec @ d)
        terms = [
            {
                "kind": "feature",
                "layer": layer,
                "index": int(i),
                "pos": pos,
                "value": per_feature[i].item(),
                "activation": z[i].item(),
            }
            for i in torch.nonzero(z > 0).flatten().tolist()
        ]
        terms.append(
            {
                "kind": "tc_error",
                "layer": layer,
                "pos": pos,
                "value": ((mlp_out - prediction) @ d).item(),
            }
        )
        terms.append({"kind": "tc_bias", "layer": layer, "pos": pos, "value": (b_dec @ d).item()})
        if W_skip is not None:
            terms.append(
                {"kind": "tc_skip", "layer": layer, "pos": pos, "value": ((W_skip @ x) @ d).item()}
            )
        return terms

    def decompose_feature(self, layer: int, feature: int, pos: int) -> list[dict]:
        """Terms (embedding, positions, heads x sources, earlier features, errors, biases, the
        feature's own b_enc) summing exactly to its pre-activation at ``pos``."""
        self._check_pos(pos)
        W_enc, b_enc, *_ = self._tc(layer)
        if not 0 <= feature < W_enc.shape[-1]:
            raise ValueError(f"feature {feature} out of range for d_sae={W_enc.shape[-1]}.")
        scale = self.cache[f"blocks.{layer}.ln2.hook_scale"][pos]
        d = centre(W_enc[:, feature]) / scale
        terms = self.residual_terms(d, layer, "mid", pos)
        terms.append(
            {
                "kind": "enc_bias",
                "layer": layer,
                "index": feature,
                "pos": pos,
                "value": b_enc[feature].item(),
            }
        )
        return terms

    def decompose_head_term(self, term: dict) -> list[dict]:
        """Terms summing to a head term's value: the source residual stream (through ln1, frozen
        scale) plus ln1's bias."""
        _, layer, src, g = term["expand"]
        w1, b1 = _ln1_affine(self.model, layer)
        scale = self.cache[f"blocks.{layer}.ln1.hook_scale"][src]
        terms = self.residual_terms(centre(w1 * g) / scale, layer, "pre", src)
        terms.append({"kind": "ln1_bias", "layer": layer, "pos": src, "value": (g @ b1).item()})
        return terms

    def logit_direction(
        self, token: int, baseline: int | str | None = "mean"
    ) -> tuple[Tensor, float]:
        """(direction in ln_final's output space, bias) of a logit start: the logit of ``token``
        minus the mean logit (``baseline="mean"``, the default: what moves this token's
        probability), minus the logit of token ``baseline`` (a logit difference), or raw (None)."""
        m = self.model
        for t in (token, baseline):
            if isinstance(t, int) and not 0 <= t < m.cfg.d_vocab:
                raise ValueError(f"token {t} out of range for d_vocab={m.cfg.d_vocab}.")
        W_U, b_U = m.W_U.detach(), m.b_U.detach()
        w_u, b_u = W_U[:, token], b_U[token]
        if baseline == "mean":
            w_u, b_u = w_u - W_U.mean(1), b_u - b_U.mean()
        elif isinstance(baseline, int):
            w_u, b_u = w_u - W_U[:, baseline], b_u - b_U[baseline]
        elif baseline is not None:
            raise ValueError(f"baseline must be 'mean', a token id or None, got {baseline!r}.")
        return w_u, b_u.item()

    def decompose_logit(
        self, token: int, pos: int, baseline: int | str | None = "mean"
    ) -> list[dict]:
        """Terms summing exactly to :meth:`logit` (same ``baseline``) at ``pos``; ln_final's scale
        is frozen at its cached value, its bias and the unembedding bias form "unembed_bias"."""
        self._check_pos(pos)
        m = self.model
        w_u, b_u = self.logit_direction(token, baseline)
        w_f, b_f = _ln_affine(m.ln_final, m.cfg.d_model)
        scale = self.cache["ln_final.hook_scale"][pos]
        terms = self.residual_terms(centre(w_f * w_u) / scale, m.cfg.n_layers, "pre", pos)
        bias = (b_f @ w_u).item() + b_u
        terms.append({"kind": "unembed_bias", "pos": pos, "index": token, "value": bias})
        return terms

    def logit(self, token: int, pos: int, baseline: int | str | None = "mean") -> float:
        """The model's logit of ``token`` at ``pos`` minus the baseline (see
        :meth:`logit_direction`)."""
        self._check_pos(pos)
        with torch.no_grad():
            logits = self.model(self.tokens)[0, pos]
        value = logits[token]
        if baseline == "mean":
            value = value - logits.mean()
        elif isinstance(baseline, int):
            value = value - logits[baseline]
        return value.item()

    # -- greedy path search
    def greedy_paths(
        self,
        layer: int,
        feature: int,
        pos: int,
        top_k: int = 5,
        depth: int = 2,
    ) -> dict[str, object]:
        """A small attribution graph rooted at a feature, as plain dicts.

        At every expanded node the ``top_k`` terms by |value| are kept (:func:`keep_top`); the rest
        are summed into a "pruned" node, so each node's incoming edge weights still sum to its value
        (pre-activation for a feature, contribution for a head). Features and heads are expanded
        up to ``depth`` levels. Returns {"nodes": {id: {...}}, "edges": [{src, dst, weight}],
        "root": id}; an edge's weight is the source's contribution to the destination.
        """
        root = f"tc{layer}[{feature}]@{pos}"
        info = {
            "kind": "feature",
            "layer": layer,
            "index": feature,
            "pos": pos,
            "value": self.pre_activation(layer, feature, pos),
        }
        return self._greedy(root, info, self.decompose_feature(layer, feature, pos), top_k, depth)

    def greedy_logit_paths(
        self,
        token: int,
        pos: int,
        top_k: int = 5,
        depth: int = 2,
        baseline: int | str | None = "mean",
    ) -> dict[str, object]:
        """The same graph rooted at a logit direction: the logit of ``token`` at ``pos`` minus the
        mean logit by default (see :meth:`logit_direction`)."""
        terms = self.decompose_logit(token, pos, baseline)
        root = f"logit[{token}]@{pos}"
        value = self.logit(token, pos, baseline)
        info = {"kind": "logit", "index": token, "pos": pos, "value": value}
        return self._greedy(root, info, terms, top_k, depth)

    def _greedy(self, root: str, root_info: dict, terms: list[dict], top_k, depth) -> dict:
        if top_k < 1 or depth < 1:
            raise ValueError(f"need top_k >= 1 and depth >= 1, got {top_k}, {depth}.")
        nodes: dict[str, dict] = {root: root_info}
        edges: list[dict] = []
        expanded: set[str] = set()

        def node_id(term: dict, parent: str) -> str:
            k = term["kind"]
            if k == "feature":
                return f"tc{term['layer']}[{term['index']}]@{term['pos']}"
            if k == "embed":
                return f"embed[{term['index']}]@{term['pos']}"
            if k == "pos_embed":
                return f"pos@{term['pos']}"
            if k == "head":  # path-specific: its value depends on the direction it is read along
                return f"{parent}/L{term['layer']}H{term['index']}:{term['pos']}<-{term['src']}"
            return f"{parent}/{k}{term.get('layer', '')}"

        def expand(nid: str, terms: list[dict], level: int) -> None:
            if nid in expanded:
                return
            expanded.add(nid)
            kept, pruned = keep_top(terms, top_k)
            for term in kept:
                cid = node_id(term, nid)
                info = {k: v for k, v in term.items() if k != "expand"}
                if term["kind"] == "feature":
                    info["value"] = self.pre_activation(term["layer"], term["index"], term["pos"])
                nodes.setdefault(cid, info)
                edges.append({"src": cid, "dst": nid, "weight": term["value"]})
                if level < depth:
                    if term["kind"] == "feature":
                        expand(
                            cid,
                            self.decompose_feature(term["layer"], term["index"], term["pos"]),
                            level + 1,
                        )
                    elif term["kind"] == "head":
                        expand(cid, self.decompose_head_term(term), level + 1)
            if len(terms) > len(kept):
                pid = f"{nid}/pruned"
                nodes[pid] = {"kind": "pruned", "value": pruned, "n_terms": len(terms) - len(kept)}
                edges.append({"src": pid, "dst": nid, "weight": pruned})

        expand(root, terms, 1)
        return {"nodes": nodes, "edges": edges, "root": root}


# ----------------------------------------------------------------------------- drawing

#: Node kinds that are not features, heads or embeddings: what the graph does not explain.
ERROR_KINDS = ("tc_error", "pruned", "tc_bias", "tc_skip", "enc_bias", "attn_bias", "ln1_bias",
               "unembed_bias", "mlp")  # fmt: skip


def graph_column(node: dict, n_layers: int = 2) -> float:
    """x position of a node: embeddings 0, then per layer attention (2L+1) and MLP (2L+2), the
    logit last; error nodes sit half a column left of what they feed."""
    kind = node["kind"]
    if kind in ("embed", "pos_embed"):
        return 0.0
    if kind == "logit":
        return 2.0 * n_layers + 1
    if kind in ("head", "attn_bias", "ln1_bias"):
        return 2.0 * node.get("layer", 0) + 1
    if kind in ("feature", "tc_error", "tc_bias", "tc_skip", "mlp"):
        return 2.0 * node.get("layer", 0) + 2
    return float("nan")  # pruned, enc_bias, unembed_bias: placed next to their destination


def node_label(nid: str, node: dict, token_str=None) -> str:
    kind = node["kind"]
    if kind == "feature":
        return f"tc{node['layer']}[{node['index']}]@{node['pos']}"
    if kind == "head":
        return f"L{node['layer']}H{node['index']} {node['pos']}←{node['src']}"
    if kind == "embed":
        tok = token_str(node["index"]) if token_str else node["index"]
        return f"embed {tok!r}@{node['pos']}"
    if kind == "logit":
        tok = token_str(node["index"]) if token_str else node["index"]
        return f"logit {tok!r}@{node['pos']}"
    if kind == "pos_embed":
        return f"pos {node['pos']}"
    at = f"@{node['pos']}" if "pos" in node else ""  # two tc_error0 nodes differ by position
    return f"{kind}{node.get('layer', '')}{at}"


def plot_graph(graph: dict, n_layers: int = 2, token_str=None, title: str | None = None):
    """A plotly drawing of :meth:`Circuit.greedy_paths`'s graph: columns by layer (embeddings,
    attention, MLP features, ...), edges coloured by sign (blue +, red -) with width by |weight|,
    error nodes (transcoder error, pruned mass, biases) as grey squares."""
    import plotly.graph_objects as go

    nodes, edges = graph["nodes"], graph["edges"]
    dst_of = {e["src"]: e["dst"] for e in edges}
    xs: dict[str, float] = {}

    def column(nid: str) -> float:
        if nid not in xs:
            x = graph_column(nodes[nid], n_layers)
            if x != x:  # NaN: next to the node it feeds
                x = column(dst_of[nid]) - 0.5 if nid in dst_of else 0.0
            xs[nid] = x
        return xs[nid]

    for nid in nodes:
        column(nid)
    ys: dict[str, float] = {}
    by_column: dict[float, list[str]] = {}
    for nid in nodes:
        by_column.setdefault(xs[nid], []).append(nid)
    # A small offset per column, so that a straight edge between two columns does not run through
    # the nodes of a column in between (they would otherwise share the middle row).
    stagger = (0.0, 0.3, -0.3, 0.15, -0.15)
    for x, ids in by_column.items():
        if x != int(x):
            continue
        ids.sort(key=lambda n: -abs(nodes[n]["value"]))
        for k, nid in enumerate(ids):
            ys[nid] = (k - (len(ids) - 1) / 2) * 1.0 + stagger[int(round(2 * x)) % len(stagger)]
    ys[graph["root"]] = 0.0
    # Half columns (pruned mass, encoder / unembedding biases): just below the node they feed.
    below: dict[str, int] = {}
    for nid in nodes:
        if xs[nid] != int(xs[nid]):
            dst = dst_of.get(nid)
            below[dst] = below.get(dst, 0) + 1
            ys[nid] = ys.get(dst, 0.0) - 0.45 * below[dst]

    def text_position(nid: str) -> str:
        """Half-column labels go left of their square, unless a node of the column to the left
        sits on the same row (the label would cover it); then below."""
        x, y = xs[nid], ys[nid]
        if x == int(x):
            return "top center"
        if any(xs[m] == x - 0.5 and abs(ys[m] - y) < 0.35 for m in nodes):
            return "bottom center"
        return "middle left"

    biggest = max((abs(e["weight"]) for e in edges), default=1.0) or 1.0
    fig = go.Figure()
    for e in edges:
        w = e["weight"]
        fig.add_scatter(
            x=[xs[e["src"]], xs[e["dst"]]],
            y=[ys[e["src"]], ys[e["dst"]]],
            mode="lines",
            line={"width": 0.5 + 7 * abs(w) / biggest, "color": "#2b6cb0" if w >= 0 else "#c53030"},
            opacity=0.6,
            hoverinfo="text",
            text=f"{e['src']} → {e['dst']}: {w:+.3f}",
            showlegend=False,
        )
    for is_error in (False, True):
        ids = [n for n in nodes if (nodes[n]["kind"] in ERROR_KINDS) == is_error]
        if not ids:
            continue
        fig.add_scatter(
            x=[xs[n] for n in ids],
            y=[ys[n] for n in ids],
            mode="markers+text",
            marker={
                "size": 14,
                "symbol": "square" if is_error else "circle",
                "color": "#a0aec0" if is_error else "#2d3748",
            },
            text=[f"{node_label(n, nodes[n], token_str)} {nodes[n]['value']:+.2f}" for n in ids],
            textposition=[text_position(n) for n in ids],
            cliponaxis=False,
            textfont={"size": 10},
            hovertext=[
                f"{n}: value {nodes[n]['value']:+.3f}"
                + (f" ({nodes[n]['n_terms']} terms)" if "n_terms" in nodes[n] else "")
                for n in ids
            ],
            hoverinfo="text",
            name="error / bias / pruned" if is_error else "feature / head / embedding",
        )
    ticks = {0.0: "embeddings"}
    for layer in range(n_layers):
        ticks[2.0 * layer + 1] = f"attn {layer}"
        ticks[2.0 * layer + 2] = f"MLP {layer} (transcoder)"
    ticks[2.0 * n_layers + 1] = "logit"
    fig.update_xaxes(
        tickvals=list(ticks),
        ticktext=list(ticks.values()),
        title="where the node lives (error nodes sit beside what they feed)",
        range=[-0.7, 2.0 * n_layers + 1.5],
    )
    fig.update_yaxes(visible=False)
    fig.update_layout(
        title=title or f"Attribution graph of {graph['root']}",
        height=600,
        legend={"orientation": "h", "y": -0.15},
    )
    return fig
