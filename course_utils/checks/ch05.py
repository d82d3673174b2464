"""Checks for chapter 05, transcoders and feature circuits.

References live in :mod:`course_utils.science.transcoders` and :mod:`course_utils.science.circuits`.
"""

from __future__ import annotations

import functools

import torch

from course_utils.checks.core import (
    Case,
    Mistake,
    compare_differentiable,
    compare_function,
    exercise,
)
from course_utils.science import circuits as C
from course_utils.science import transcoders as T


def _differentiable(learner, reference, cases, mistakes, wrt, what) -> str:
    return compare_differentiable(learner, reference, cases, mistakes, wrt, what)


def _g(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _weights(seed: int, d_in: int = 6, d_sae: int = 10, d_out: int = 6, batch: int = 5):
    """x, W_enc, b_enc, W_dec, b_dec with non-zero biases (so a forgotten bias shows)."""
    g = _g(seed)
    return (
        torch.randn(batch, d_in, generator=g),
        torch.randn(d_in, d_sae, generator=g) / d_in**0.5,
        torch.randn(d_sae, generator=g) * 0.3,
        torch.randn(d_sae, d_out, generator=g) / d_sae**0.5,
        torch.randn(d_out, generator=g) * 0.5,
    )


# ---------------------------------------------------------------- 1.1 transcoder forward


def _no_decoder_bias(x, W_enc, b_enc, W_dec, b_dec):
    z = torch.relu(x @ W_enc + b_enc)
    return z, z @ W_dec


def _pre_encoder_bias(x, W_enc, b_enc, W_dec, b_dec):
    z = torch.relu((x - b_dec) @ W_enc + b_enc)
    return z, z @ W_dec + b_dec


def _no_relu(x, W_enc, b_enc, W_dec, b_dec):
    z = x @ W_enc + b_enc
    return z, z @ W_dec + b_dec


def _gelu(x, W_enc, b_enc, W_dec, b_dec):
    z = torch.nn.functional.gelu(x @ W_enc + b_enc)
    return z, z @ W_dec + b_dec


def _bias_after_relu(x, W_enc, b_enc, W_dec, b_dec):
    z = torch.relu(x @ W_enc) + b_enc
    return z, z @ W_dec + b_dec


FORWARD_MISTAKES = [
    Mistake(
        "GELU instead of ReLU",
        _gelu,
        "the MLP uses GELU, but the transcoder's latents are ReLU(x @ W_enc + b_enc): a ReLU makes "
        "them exactly zero when inactive, which is what makes them sparse and countable (L0).",
    ),
    Mistake(
        "encoder bias after the ReLU",
        _bias_after_relu,
        "add b_enc BEFORE the ReLU: it is a per-latent threshold, and adding it afterwards makes "
        "every latent with a non-zero bias permanently active.",
    ),
    Mistake(
        "forgot the decoder bias",
        _no_decoder_bias,
        "add the decoder bias: y_hat = z @ W_dec + b_dec. The MLP's output has a mean the "
        "features should not have to carry.",
    ),
    Mistake(
        "SAE-style pre-encoder bias",
        _pre_encoder_bias,
        "a transcoder does not subtract b_dec from its input: b_dec lives in the OUTPUT space "
        "(hook_mlp_out), x in the input space (ln2's output). Encode x @ W_enc + b_enc.",
    ),
    Mistake(
        "no ReLU",
        _no_relu,
        "the latents are ReLU(x @ W_enc + b_enc): without the ReLU they are not sparse.",
    ),
]


def _forward_cases() -> list[Case]:
    x, W_enc, b_enc, W_dec, b_dec = _weights(0)
    zeros = torch.zeros_like(x)
    one = torch.zeros(1, 6)
    one[0, 2] = 2.0
    wide = _weights(1, d_in=4, d_sae=12, d_out=7, batch=3)
    return [
        Case("seeded random", (x, W_enc, b_enc, W_dec, b_dec)),
        Case("zero input", (zeros, W_enc, b_enc, W_dec, b_dec)),
        Case("batch of one with one active input", (one, W_enc, b_enc, W_dec, b_dec)),
        Case("d_in 4 d_out 7", wide),
    ]


@exercise("1.1", "transcoder_forward")
def transcoder_forward(learner) -> str:
    return _differentiable(
        learner,
        T.transcoder_forward,
        _forward_cases(),
        FORWARD_MISTAKES,
        {"W_enc": 1, "b_enc": 2, "W_dec": 3, "b_dec": 4},
        "every weight and bias",
    )


# ---------------------------------------------------------------- 1.2 transcoder loss


def _loss_targets_input(x, y, W_enc, b_enc, W_dec, b_dec, l1_coeff):
    return T.transcoder_loss(x, x, W_enc, b_enc, W_dec, b_dec, l1_coeff)


def _loss_not_squared(x, y, W_enc, b_enc, W_dec, b_dec, l1_coeff):
    z, y_hat = T.transcoder_forward(x, W_enc, b_enc, W_dec, b_dec)
    return (y_hat - y).norm(dim=-1).mean() + l1_coeff * z.abs().sum(-1).mean()


def _loss_mean_over_features(x, y, W_enc, b_enc, W_dec, b_dec, l1_coeff):
    z, y_hat = T.transcoder_forward(x, W_enc, b_enc, W_dec, b_dec)
    return (y_hat - y).pow(2).mean() + l1_coeff * z.abs().mean()


def _loss_no_decoder_bias(x, y, W_enc, b_enc, W_dec, b_dec, l1_coeff):
    return T.transcoder_loss(x, y, W_enc, b_enc, W_dec, torch.zeros_like(b_dec), l1_coeff)


def _loss_summed_over_batch(x, y, W_enc, b_enc, W_dec, b_dec, l1_coeff):
    z, y_hat = T.transcoder_forward(x, W_enc, b_enc, W_dec, b_dec)
    return (y_hat - y).pow(2).sum() + l1_coeff * z.abs().sum()


LOSS_MISTAKES = [
    Mistake(
        "summed over the batch",
        _loss_summed_over_batch,
        "average over the batch (sum over d_out and d_sae, then .mean() over rows): a loss summed "
        "over the batch grows with the batch size, and so would the effective learning rate.",
    ),
    Mistake(
        "reconstructs the input",
        _loss_targets_input,
        "a transcoder predicts the MLP's OUTPUT y from its input x: the error is y - TC(x), "
        "not x - TC(x) (that would be an SAE on the MLP's input).",
    ),
    Mistake(
        "L2 instead of squared L2",
        _loss_not_squared,
        "square the error: sum over d_out of (y_hat - y)**2, then the mean over the batch.",
    ),
    Mistake(
        "mean over the feature axis",
        _loss_mean_over_features,
        "sum over the last axis (d_out for the error, d_sae for the L1 term) and average over "
        "the batch only; .mean() over everything divides by the width too.",
    ),
    Mistake(
        "forgot the decoder bias",
        _loss_no_decoder_bias,
        "the prediction is z @ W_dec + b_dec: reuse your transcoder_forward.",
    ),
]


def _loss_cases() -> list[Case]:
    x, W_enc, b_enc, W_dec, b_dec = _weights(2)
    y = torch.randn(x.shape[0], W_dec.shape[1], generator=_g(3))
    wide = _weights(4, d_in=4, d_sae=12, d_out=7, batch=3)
    y_wide = torch.randn(3, 7, generator=_g(5))
    return [
        Case("seeded random", (x, y, W_enc, b_enc, W_dec, b_dec, 0.1)),
        Case("no penalty", (x, y, W_enc, b_enc, W_dec, b_dec, 0.0)),
        Case("d_in 4 d_out 7", (wide[0], y_wide, *wide[1:], 0.5)),
        Case("batch of one", (x[:1], y[:1], W_enc, b_enc, W_dec, b_dec, 1.0)),
    ]


@exercise("1.2", "transcoder_loss")
def transcoder_loss(learner) -> str:
    return _differentiable(
        learner,
        T.transcoder_loss,
        _loss_cases(),
        LOSS_MISTAKES,
        {"W_enc": 2, "b_enc": 3, "W_dec": 4, "b_dec": 5},
        "every weight and bias",
    )


# ---------------------------------------------------------------- 1.3 skip transcoder


def _skip_not_transposed(x, W_enc, b_enc, W_dec, b_dec, W_skip):
    z, y_hat = T.transcoder_forward(x, W_enc, b_enc, W_dec, b_dec)
    return z, y_hat + x @ W_skip


def _skip_missing(x, W_enc, b_enc, W_dec, b_dec, W_skip):
    return T.transcoder_forward(x, W_enc, b_enc, W_dec, b_dec)


def _skip_no_decoder_bias(x, W_enc, b_enc, W_dec, b_dec, W_skip):
    z, y_hat = T.transcoder_forward(x, W_enc, b_enc, W_dec, b_dec)
    return z, y_hat - b_dec + x @ W_skip.T


SKIP_MISTAKES = [
    Mistake(
        "W_skip not transposed",
        _skip_not_transposed,
        "W_skip is [d_out, d_in] (SAELens's layout, like nn.Linear.weight): the skip term is "
        "x @ W_skip.T.",
    ),
    Mistake(
        "no skip term",
        _skip_missing,
        "add the linear skip: y_hat = z @ W_dec + b_dec + x @ W_skip.T.",
    ),
    Mistake(
        "forgot the decoder bias",
        _skip_no_decoder_bias,
        "keep the decoder bias: y_hat = z @ W_dec + b_dec + x @ W_skip.T.",
    ),
]


def _skip_cases() -> list[Case]:
    x, W_enc, b_enc, W_dec, b_dec = _weights(6)
    W_skip = torch.randn(6, 6, generator=_g(7)) * 0.4
    wide = _weights(8, d_in=4, d_sae=12, d_out=7, batch=3)
    W_skip_wide = torch.randn(7, 4, generator=_g(9)) * 0.4
    return [
        Case("seeded random", (x, W_enc, b_enc, W_dec, b_dec, W_skip)),
        Case("zero skip", (x, W_enc, b_enc, W_dec, b_dec, torch.zeros(6, 6))),
        Case("d_in 4 d_out 7", (*wide, W_skip_wide)),
        Case("batch of one", (x[:1], W_enc, b_enc, W_dec, b_dec, W_skip)),
    ]


@exercise("1.3", "skip_transcoder_forward")
def skip_transcoder_forward(learner) -> str:
    return _differentiable(
        learner,
        T.skip_transcoder_forward,
        _skip_cases(),
        SKIP_MISTAKES,
        {"W_enc": 1, "W_dec": 3, "W_skip": 5},
        "W_enc, W_dec and W_skip",
    )


# ---------------------------------------------------------------- 1.4 the hook pair


@functools.lru_cache(maxsize=1)
def _tiny():
    """A tiny random model whose ln2 has a non-trivial weight and bias (so that reading the MLP's
    actual input instead of ln2.hook_normalized shows)."""
    from course_utils.science.models import random_tokens, tiny_random_model

    model = tiny_random_model(seed=0)
    g = _g(11)
    with torch.no_grad():
        for block in model.blocks:
            block.ln2.w.copy_(1 + 0.3 * torch.randn(block.ln2.w.shape, generator=g))
            block.ln2.b.copy_(0.2 * torch.randn(block.ln2.b.shape, generator=g))
    return model, random_tokens(model, batch=2, seq=9, seed=3)


def _pair_from(x_hook: str, y_hook: str, fixed_layer: int | None = None):
    def pair(model, tokens, layer):
        L = layer if fixed_layer is None else fixed_layer
        names = [x_hook.format(L=L), y_hook.format(L=L)]
        with torch.no_grad():
            _, cache = model.run_with_cache(tokens, names_filter=names)
        return cache[names[0]], cache[names[1]]

    return pair


def _pair_after_ln_affine(model, tokens, layer):
    x, y = T.transcoder_pair(model, tokens, layer)
    ln = model.blocks[layer].ln2
    return x * ln.w + ln.b, y


PAIR_MISTAKES = [
    Mistake(
        "un-normalised residual as input",
        _pair_from("blocks.{L}.hook_resid_mid", "blocks.{L}.hook_mlp_out"),
        "the MLP does not read the raw residual stream (hook_resid_mid / hook_mlp_in): it reads "
        "LayerNorm's output. Take x from blocks.{layer}.ln2.hook_normalized.",
    ),
    Mistake(
        "MLP input as target",
        _pair_from("blocks.{L}.ln2.hook_normalized", "blocks.{L}.hook_resid_mid"),
        "the target is what the MLP WRITES, blocks.{layer}.hook_mlp_out, not what it reads.",
    ),
    Mistake(
        "residual after the MLP as target",
        _pair_from("blocks.{L}.ln2.hook_normalized", "blocks.{L}.hook_resid_post"),
        "hook_resid_post is the whole residual stream after the block; the MLP's own "
        "contribution is blocks.{layer}.hook_mlp_out.",
    ),
    Mistake(
        "MLP hidden layer as target",
        _pair_from("blocks.{L}.ln2.hook_normalized", "blocks.{L}.mlp.hook_post"),
        "mlp.hook_post is inside the MLP (its d_mlp neurons); the target is its output in the "
        "residual stream, blocks.{layer}.hook_mlp_out.",
    ),
    Mistake(
        "LayerNorm weight and bias applied",
        _pair_after_ln_affine,
        "use ln2.hook_normalized as it is (before LayerNorm's weight and bias): that is what the "
        "shipped transcoders read, and it is the same whether or not the model was loaded with "
        "fold_ln.",
    ),
    Mistake(
        "ln1 instead of ln2",
        _pair_from("blocks.{L}.ln1.hook_normalized", "blocks.{L}.hook_mlp_out"),
        "ln1 is the LayerNorm in front of the ATTENTION; the MLP reads the second one: take x "
        "from blocks.{layer}.ln2.hook_normalized.",
    ),
    Mistake(
        "attention output as target",
        _pair_from("blocks.{L}.ln2.hook_normalized", "blocks.{L}.hook_attn_out"),
        "hook_attn_out is what the attention layer writes; the transcoder imitates the MLP, whose "
        "output is blocks.{layer}.hook_mlp_out.",
    ),
    Mistake(
        "always layer 0",
        _pair_from("blocks.{L}.ln2.hook_normalized", "blocks.{L}.hook_mlp_out", fixed_layer=0),
        "use the layer you were given: blocks.{layer}..., not blocks.0.",
    ),
]


def _pair_cases() -> list[Case]:
    model, tokens = _tiny()
    return [
        Case("tiny model layer 1", (model, tokens, 1)),
        Case("tiny model layer 0", (model, tokens, 0)),
        Case("batch of one layer 1", (model, tokens[:1], 1)),
    ]


@exercise("1.4", "transcoder_pair")
def transcoder_pair(learner) -> str:
    return compare_function(learner, T.transcoder_pair, _pair_cases(), PAIR_MISTAKES)


# ---------------------------------------------------------------- 3.1 input-invariant connections


def _random_tc(seed: int, d_model: int = 8, d_sae: int = 6):
    tc = T.Transcoder(d_model, d_sae, d_model, 1, seed=seed)
    g = _g(seed + 100)
    with torch.no_grad():
        tc.W_enc.add_(0.3 + 0.2 * torch.randn(tc.W_enc.shape, generator=g))  # non-zero mean
        tc.b_enc.copy_(0.2 * torch.randn(tc.b_enc.shape, generator=g))
        tc.b_dec.copy_(0.2 * torch.randn(tc.b_dec.shape, generator=g))
    return T.single(tc)


CONNECTION_MISTAKES = [
    Mistake(
        "f_enc . f_enc",
        lambda tc0, tc1: tc0.W_enc.T @ C.centre(tc1.W_enc, dim=0),
        "the earlier feature WRITES along its decoder row f_dec = tc0.W_dec[i]; use W_dec of the "
        "earlier transcoder, not its encoder.",
    ),
    Mistake(
        "f_dec . f_dec",
        lambda tc0, tc1: tc0.W_dec @ tc1.W_dec.T,
        "the later feature READS along its encoder column f_enc = tc1.W_enc[:, j]; use W_enc of "
        "the later transcoder, not its decoder.",
    ),
    Mistake(
        "not centred",
        lambda tc0, tc1: tc0.W_dec @ tc1.W_enc,
        "LayerNorm subtracts the mean over d_model before the later transcoder reads: centre each "
        "encoder column, W_enc - W_enc.mean(0, keepdim=True).",
    ),
    Mistake(
        "centred over the features",
        lambda tc0, tc1: tc0.W_dec @ C.centre(tc1.W_enc, dim=-1),
        "centre over d_model (dim 0 of W_enc [d_model, d_sae]), not over the features.",
    ),
    Mistake(
        "transposed",
        lambda tc0, tc1: (tc0.W_dec @ C.centre(tc1.W_enc, dim=0)).T,
        "rows are the EARLIER transcoder's features, columns the later one's: "
        "W_dec0 [d_sae0, d_model] @ W_enc1 [d_model, d_sae1].",
    ),
]


def _connection_cases() -> list[Case]:
    return [
        Case("seeded random", (_random_tc(0), _random_tc(1))),
        Case("different widths", (_random_tc(2, d_sae=5), _random_tc(3, d_sae=7))),
        Case("same transcoder twice", (_random_tc(4), _random_tc(4))),
    ]


def _reference_connections(tc0, tc1):
    return C.input_invariant_connections(tc0, tc1)


@exercise("3.1", "input_invariant_connections")
def input_invariant_connections(learner) -> str:
    return compare_function(
        learner, _reference_connections, _connection_cases(), CONNECTION_MISTAKES
    )


# ---------------------------------------------------------------- 3.2 input-dependent attribution


def _attr_no_activation(z0, tc0, tc1, feature, scale):
    conn = C.input_invariant_connections(tc0, tc1)[:, feature]
    return (conn / scale).expand_as(z0).clone()


def _attr_no_scale(z0, tc0, tc1, feature, scale):
    return C.feature_attributions(z0, tc0, tc1, feature, 1.0)


def _attr_times_scale(z0, tc0, tc1, feature, scale):
    return C.feature_attributions(z0, tc0, tc1, feature, 1.0) * scale


def _attr_enc_enc(z0, tc0, tc1, feature, scale):
    conn = (tc0.W_enc.T @ C.centre(tc1.W_enc, dim=0))[:, feature]
    return z0 * conn / scale


ATTRIBUTION_MISTAKES = [
    Mistake(
        "forgot the activation",
        _attr_no_activation,
        "the input-invariant connection is only half of it: multiply by the earlier feature's "
        "activation z0 on this input (a feature that is off contributes nothing).",
    ),
    Mistake(
        "forgot LayerNorm's scale",
        _attr_no_scale,
        "the later transcoder reads ln2's output = centred residual / scale: divide by scale.",
    ),
    Mistake(
        "multiplied by the scale",
        _attr_times_scale,
        "LayerNorm DIVIDES the residual stream by its scale: divide, do not multiply.",
    ),
    Mistake(
        "f_enc . f_enc",
        _attr_enc_enc,
        "the connection is f_dec (earlier) . f_enc (later): use your input_invariant_connections.",
    ),
]


def _attribution_cases() -> list[Case]:
    tc0, tc1 = _random_tc(10), _random_tc(11, d_sae=7)
    g = _g(12)
    z0 = torch.relu(torch.randn(4, 6, generator=g))
    scale = 0.5 + torch.rand(4, 1, generator=g)
    one = torch.zeros(1, 6)
    one[0, 3] = 1.5
    return [
        Case("seeded random", (z0, tc0, tc1, 2, scale)),
        Case("one active feature", (one, tc0, tc1, 5, scale[:1])),
        Case("all off", (torch.zeros(2, 6), tc0, tc1, 0, scale[:2])),
    ]


@exercise("3.2", "feature_attributions")
def feature_attributions(learner) -> str:
    return compare_function(
        learner, C.feature_attributions, _attribution_cases(), ATTRIBUTION_MISTAKES
    )


# ---------------------------------------------------------------- 3.3 attribution through a head


def _head_transposed(pattern, x_pre, W_V, W_O, f, dest):
    return pattern[dest] * (x_pre @ (W_O.T @ (W_V.T @ f)))


def _head_no_pattern(pattern, x_pre, W_V, W_O, f, dest):
    return x_pre @ (W_V @ (W_O @ f))


def _head_pattern_column(pattern, x_pre, W_V, W_O, f, dest):
    return pattern[:, dest] * (x_pre @ (W_V @ (W_O @ f)))


HEAD_MISTAKES = [
    Mistake(
        "OV circuit transposed",
        _head_transposed,
        "a source vector x moves as x @ W_V @ W_O, so its component along f is "
        "x . (W_V @ W_O @ f): propagate f backwards with W_O first, then W_V (W_OV f, "
        "not W_OV^T f).",
    ),
    Mistake(
        "forgot the attention score",
        _head_no_pattern,
        "each source position is weighted by how much the destination attends to it: multiply "
        "by pattern[dest, s].",
    ),
    Mistake(
        "pattern indexed [src, dest]",
        _head_pattern_column,
        "pattern is [dest, src]: the weights of destination `dest` are the row pattern[dest].",
    ),
]


def _head_cases() -> list[Case]:
    g = _g(20)
    n, d, dh = 5, 8, 3
    scores = torch.randn(n, n, generator=g).masked_fill(
        torch.triu(torch.ones(n, n, dtype=torch.bool), 1), float("-inf")
    )
    pattern = scores.softmax(-1)
    x_pre = torch.randn(n, d, generator=g)
    W_V, W_O = torch.randn(d, dh, generator=g), torch.randn(dh, d, generator=g)
    f = torch.randn(d, generator=g)
    return [
        Case("last position", (pattern, x_pre, W_V, W_O, f, 4)),
        Case("middle position", (pattern, x_pre, W_V, W_O, f, 2)),
        Case("first position", (pattern, x_pre, W_V, W_O, f, 0)),
    ]


@exercise("3.3", "head_attribution")
def head_attribution(learner) -> str:
    return compare_function(learner, C.head_attribution, _head_cases(), HEAD_MISTAKES)


# ---------------------------------------------------------------- 3.4 de-embedding


def _embedding_model(seed: int):
    """A real tiny HookedTransformer, so that every spelling of its API works (model.W_E,
    model.embed.W_E, model.unembed.W_U, model.embed(tokens) ...); its embedding is shifted off
    zero mean so that forgetting to centre f_enc shows."""
    from course_utils.science.models import tiny_random_model

    model = tiny_random_model(seed=seed)
    with torch.no_grad():
        model.embed.W_E.add_(0.5 + 0.3 * torch.randn(model.cfg.d_model, generator=_g(seed)))
    return model


DE_EMBEDDING_MISTAKES = [
    Mistake(
        "used f_dec",
        lambda model, tc, feature: model.W_E @ C.centre(tc.W_dec[feature]),
        "which tokens EXCITE the feature depends on what it reads: its encoder column "
        "tc.W_enc[:, feature], not its decoder row.",
    ),
    Mistake(
        "not centred",
        lambda model, tc, feature: model.W_E @ tc.W_enc[:, feature],
        "the transcoder reads LayerNorm's output, which is centred: centre f_enc (subtract its "
        "mean over d_model) before the dot product.",
    ),
    Mistake(
        "unembedding instead of embedding",
        lambda model, tc, feature: model.W_U.T @ C.centre(tc.W_enc[:, feature]),
        "W_U says which tokens a direction PREDICTS (a logit lens); a de-embedding uses the "
        "embedding matrix W_E [d_vocab, d_model].",
    ),
]


def _de_embedding_reference(model, tc, feature):
    return C.de_embedding(model, tc, feature)


def _de_embedding_cases() -> list[Case]:
    return [
        Case("seeded random", (_embedding_model(30), _random_tc(31, d_model=32), 2)),
        Case("last feature", (_embedding_model(32), _random_tc(33, d_model=32), 5)),
    ]


@exercise("3.4", "de_embedding")
def de_embedding(learner) -> str:
    return compare_function(
        learner, _de_embedding_reference, _de_embedding_cases(), DE_EMBEDDING_MISTAKES
    )


# ---------------------------------------------------------------- 3.5 one greedy step


def _keep_signed(terms, top_k):
    ranked = sorted(terms, key=lambda t: -t["value"])
    return ranked[:top_k], float(sum(t["value"] for t in ranked[top_k:]))


def _keep_no_pruned(terms, top_k):
    return C.keep_top(terms, top_k)[0], 0.0


def _keep_abs_pruned(terms, top_k):
    ranked = sorted(terms, key=lambda t: -abs(t["value"]))
    return ranked[:top_k], float(sum(abs(t["value"]) for t in ranked[top_k:]))


def _keep_input_order(terms, top_k):
    ranked = sorted(terms, key=lambda t: -abs(t["value"]))
    kept = {id(t) for t in ranked[:top_k]}
    return [t for t in terms if id(t) in kept], float(sum(t["value"] for t in ranked[top_k:]))


KEEP_MISTAKES = [
    Mistake(
        "kept terms in input order",
        _keep_input_order,
        "you kept the right terms but in the order they came in: return them largest |value| "
        "first (sort the kept list, not just the selection), so kept[0] is the strongest input.",
    ),
    Mistake(
        "ranked by signed value",
        _keep_signed,
        "rank by |value|: a large NEGATIVE contribution (an inhibiting feature) matters as much "
        "as a large positive one.",
    ),
    Mistake(
        "no pruned node",
        _keep_no_pruned,
        "return the summed value of everything you dropped: without this error node the graph "
        "no longer adds up to the feature's activation.",
    ),
    Mistake(
        "pruned mass as a sum of |values|",
        _keep_abs_pruned,
        "the pruned node stands in for the dropped terms, so its value is their signed sum.",
    ),
]


def _terms(values) -> list[dict]:
    return [{"kind": "feature", "index": i, "value": float(v)} for i, v in enumerate(values)]


def _keep_cases() -> list[Case]:
    return [
        Case("mixed signs", (_terms([0.5, -2.0, 1.25, 0.1, -0.3, 0.75]), 3)),
        Case("keep one", (_terms([0.2, -0.9, 0.4]), 1)),
        Case("keep all", (_terms([1.0, -0.5]), 5)),
        # the top three sit at indices 2, 4, 1: kept in input order they come out 1, 2, 4
        Case("unsorted input", (_terms([0.1, 0.75, -2.0, 0.3, 1.25]), 3)),
    ]


@exercise("3.5", "keep_top")
def keep_top(learner) -> str:
    return compare_function(learner, C.keep_top, _keep_cases(), KEEP_MISTAKES)


# ---------------------------------------------------------------- 4.1 extended de-embedding


def _lone_tokens(model, with_position: bool = True):
    x = model.W_E.detach()
    return x + model.W_pos.detach().mean(0) if with_position else x


def _normalise(x, eps: float = 1e-5):
    return C.ln_normalise(x, eps)


def _after_mlp0(model, tc0, mlp_in=None, x=None):
    """x + tc0(mlp_in): the residual after MLP 0 (defaults: x = the lone tokens, mlp_in = x
    normalised), so that each mistake below changes only the part it gets wrong."""
    x = _lone_tokens(model) if x is None else x
    return x + T.as_single(tc0)(_normalise(x) if mlp_in is None else mlp_in)


def _f(tc, feature: int, centred: bool = True):
    f = tc.W_enc[:, feature].detach()
    return f - f.mean() if centred else f


EXTENDED_MISTAKES = [
    Mistake(
        "the direct de-embedding of 3.4",
        lambda model, tc0, tc, feature: C.de_embedding(model, tc, feature),
        "that is exercise 3.4's direct de-embedding: put the token at an average position "
        "(x = W_E + W_pos.mean(0)) and add what MLP 0 writes for it, tc0 applied to the "
        "normalised x, before reading x + tc0(...) with the centred f_enc.",
    ),
    Mistake(
        "direct path only",
        lambda model, tc0, tc, feature: _lone_tokens(model) @ _f(tc, feature),
        "that is the direct de-embedding (plus a constant): add what MLP 0 writes for the token, "
        "tc0 applied to the normalised x, to x before reading it with the feature's f_enc.",
    ),
    Mistake(
        "MLP-0 path only",
        lambda model, tc0, tc, feature: (
            T.as_single(tc0)(_normalise(_lone_tokens(model))) @ _f(tc, feature)
        ),
        "the token's own embedding stays in the residual stream after MLP 0: the later layer "
        "reads x + tc0(...), not tc0(...) alone.",
    ),
    Mistake(
        "not normalised before tc0",
        lambda model, tc0, tc, feature: (
            _after_mlp0(model, tc0, _lone_tokens(model)) @ _f(tc, feature)
        ),
        "tc0 reads blocks.0.ln2.hook_normalized: centre x and divide it by its RMS, "
        "sqrt(mean(x**2) + model.cfg.eps), before passing it to tc0.",
    ),
    Mistake(
        "ln2's weight and bias applied",
        lambda model, tc0, tc, feature: (
            _after_mlp0(model, tc0, model.blocks[0].ln2(_lone_tokens(model))) @ _f(tc, feature)
        ),
        "model.blocks[0].ln2(x) also multiplies by ln2's weight and adds its bias; the transcoder "
        "was trained on hook_normalized, which comes before them. Normalise by hand.",
    ),
    Mistake(
        "no position embedding",
        lambda model, tc0, tc, feature: (
            _after_mlp0(model, tc0, x=_lone_tokens(model, False)) @ _f(tc, feature)
        ),
        "a token never sits in the residual stream without a position: x = W_E + the mean of "
        "W_pos over positions (LayerNorm makes the shift matter).",
    ),
    Mistake(
        "f_enc not centred",
        lambda model, tc0, tc, feature: _after_mlp0(model, tc0) @ _f(tc, feature, centred=False),
        "the later transcoder reads LayerNorm's centred output: centre f_enc (subtract its mean "
        "over d_model), as in exercise 3.4.",
    ),
    Mistake(
        "unbiased standard deviation",
        lambda model, tc0, tc, feature: (
            _after_mlp0(
                model,
                tc0,
                (_lone_tokens(model) - _lone_tokens(model).mean(-1, keepdim=True))
                / (_lone_tokens(model).var(-1, keepdim=True) + model.cfg.eps).sqrt(),
            )
            @ _f(tc, feature)
        ),
        "LayerNorm divides by the biased variance (mean of the squared centred values, over "
        "d_model), not torch.var's default unbiased one (which divides by d_model - 1).",
    ),
    Mistake(
        "eps left out",
        lambda model, tc0, tc, feature: (
            _after_mlp0(model, tc0, _normalise(_lone_tokens(model), 0.0)) @ _f(tc, feature)
        ),
        "add model.cfg.eps to the mean square under the square root, as LayerNorm does (it "
        "matters: the course model's residual rows have a small variance).",
    ),
    Mistake(
        "the first position only",
        lambda model, tc0, tc, feature: (
            _after_mlp0(model, tc0, x=(model.W_E + model.W_pos[0]).detach()) @ _f(tc, feature)
        ),
        "an AVERAGE position: the mean of W_pos over all positions, W_pos.mean(0), not position 0.",
    ),
    Mistake(
        "MLP 0 itself",
        lambda model, tc0, tc, feature: (
            (
                _lone_tokens(model) + model.blocks[0].mlp(model.blocks[0].ln2(_lone_tokens(model)))
            ).detach()
            @ _f(tc, feature)
        ),
        "use the transcoder tc0 in place of MLP 0: the score must decompose into tc0's latents "
        "(that is what connects it to the connections of 3.1), and tc0 is what the circuits read.",
    ),
    Mistake(
        "the later LayerNorm's weight",
        lambda model, tc0, tc, feature: (
            _after_mlp0(model, tc0) @ (_f(tc, feature) * model.blocks[1].ln2.w.detach())
        ),
        "the later transcoder also reads hook_normalized, before ln2's weight: read with the "
        "centred f_enc alone, without multiplying by any LayerNorm weight.",
    ),
    Mistake(
        "the sum normalised",
        lambda model, tc0, tc, feature: _normalise(_after_mlp0(model, tc0)) @ _f(tc, feature),
        "leave the later LayerNorm's scale out, as the direct de-embedding does: read x + tc0(...) "
        "with the centred f_enc as it is, without normalising the sum.",
    ),
]


def _extended_model(seed: int, small: bool = False):
    """The 3.4 model, with layer 0's LayerNorm weights and biases made non-trivial (so applying
    them, or using ln1's, shows) and position embeddings off zero mean (so leaving them out shows)."""
    model = _embedding_model(seed)
    g = _g(seed + 7)
    with torch.no_grad():
        lns = [b.ln1 for b in model.blocks] + [b.ln2 for b in model.blocks] + [model.ln_final]
        for ln in lns:
            ln.w.copy_(1 + 0.5 * torch.randn(ln.w.shape, generator=g))
            ln.b.copy_(0.5 * torch.randn(ln.b.shape, generator=g))
        model.pos_embed.W_pos.add_(1.0 + 0.5 * torch.randn(model.cfg.d_model, generator=g))
        if small:  # rows with a variance near the course model's (~1e-3): eps then shows
            model.embed.W_E.mul_(0.05)
            model.pos_embed.W_pos.mul_(0.05)
    return model


def _extended_cases() -> list[Case]:
    return [
        Case("seeded random", (_extended_model(40), _random_tc(41, 32), _random_tc(42, 32), 2)),
        Case("last feature", (_extended_model(43), _random_tc(44, 32), _random_tc(45, 32), 5)),
        Case(
            "small residual",
            (_extended_model(46, small=True), _random_tc(47, 32), _random_tc(48, 32), 3),
        ),  # fmt: skip
    ]


@exercise("4.1", "extended_de_embedding")
def extended_de_embedding(learner) -> str:
    return compare_function(learner, C.extended_de_embedding, _extended_cases(), EXTENDED_MISTAKES)
