"""Checks for chapter 10, Evaluating and comparing SAEs.

Shapes: one dictionary ``W_dec [d_sae, d]``, true ``features [n_features, d]``, ``latent_acts
[n, d_sae]``, ``feature_acts [n, n_features]``; the architecture exercises keep chapter 02's
instance dimension, ``pre``/``acts [batch, inst, d_sae]``, ``W_dec [inst, d_sae, d_in]``.
"""

from __future__ import annotations

import math

import torch

from course_utils.checks.core import (
    Case,
    Mistake,
    compare_differentiable,
    compare_function,
    exercise,
    mismatch,
    with_options,
)
from course_utils.science import sae_eval as E


def _g(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _unit(t: torch.Tensor) -> torch.Tensor:
    return t / t.norm(dim=-1, keepdim=True)


# ---------------------------------------------------------------- 1.1 match latents


def _by_feature(out):
    """(latents, features, cos) sorted by feature index, whatever order the learner used."""
    latents, feats, cos = (torch.as_tensor(t) for t in out)
    order = feats.argsort()
    return latents[order].long(), feats[order].long(), cos[order].double()


def _compare_matching(expected, actual) -> str | None:
    if not isinstance(actual, (tuple, list)) or len(actual) != 3:
        return "return a tuple (latent indices, feature indices, |cos| of each pair)"
    kinds = [type(t).__name__ for t in actual if not isinstance(t, torch.Tensor)]
    if kinds:
        return (
            f"return three torch tensors, got {', '.join(kinds)} among them (later cells call "
            "`.mean()` and index with them): wrap with `torch.as_tensor(...)`"
        )
    try:
        actual = _by_feature(actual)
    except Exception:  # not three tensors of equal length
        return "return three 1-D tensors of equal length: (latents, features, |cos|)"
    return mismatch(_by_feature(expected), actual, 1e-5, 1e-4)


def _assignment(cost: torch.Tensor, maximise: bool = False):
    from scipy.optimize import linear_sum_assignment

    rows, cols = linear_sum_assignment(cost.double().numpy(), maximize=maximise)
    return torch.as_tensor(rows), torch.as_tensor(cols)


def _match_with(cos: torch.Tensor, maximise: bool = False, score=None):
    rows, cols = _assignment(cos if maximise else 1 - cos, maximise)
    score = cos if score is None else score
    return rows.long(), cols.long(), score[rows, cols]


def _minimised(W_dec, features):
    cos = (_unit(W_dec) @ _unit(features).T).abs()
    rows, cols = _assignment(cos)
    return rows.long(), cols.long(), cos[rows, cols]


def _greedy_best_latent(W_dec, features):
    """Each feature takes its best latent, even one another feature already took."""
    cos = (_unit(W_dec) @ _unit(features).T).abs()
    if W_dec.shape[0] < features.shape[0]:
        latents = torch.arange(W_dec.shape[0])
        feats = cos.argmax(-1)
        return latents, feats, cos[latents, feats]
    feats = torch.arange(features.shape[0])
    latents = cos.argmax(0)
    return latents, feats, cos[latents, feats]


def _each_latent_argmax(W_dec, features):
    """Each latent takes its best feature (not one-to-one)."""
    cos = (_unit(W_dec) @ _unit(features).T).abs()
    latents = torch.arange(W_dec.shape[0])
    feats = cos.argmax(-1)
    return latents, feats, cos[latents, feats]


def _signed_match_abs_score(W_dec, features):
    cos = _unit(W_dec) @ _unit(features).T
    return _match_with(cos, score=cos.abs())


MATCH_MISTAKES = [
    Mistake(
        "signed cosine, |cos| reported",
        _signed_match_abs_score,
        "take |cos| *before* matching: a flipped decoder row is the same direction, so the "
        "Hungarian algorithm must see |cos|, not cos.",
    ),
    Mistake(
        "each latent takes its argmax feature",
        _each_latent_argmax,
        "the matching must be one-to-one: each feature gets at most one latent and each latent "
        "at most one feature. Use `scipy.optimize.linear_sum_assignment` on the |cos| matrix, "
        "not an argmax.",
    ),
    Mistake(
        "signed cosine",
        lambda W_dec, features: _match_with(_unit(W_dec) @ _unit(features).T),
        "a decoder row pointing the opposite way is the same feature (an SAE latent's sign is "
        "arbitrary in this metric): match on |cos|, not cos.",
    ),
    Mistake(
        "best latent per feature, shared",
        _greedy_best_latent,
        "the matching is one-to-one: two features may not share a latent. Use the Hungarian "
        "algorithm (`scipy.optimize.linear_sum_assignment`) on the whole |cos| matrix.",
    ),
    Mistake(
        "unnormalised dot products",
        lambda W_dec, features: _match_with((W_dec @ features.T).abs()),
        "normalise the decoder rows and the features before the dot products: the rows you are "
        "given are not unit-norm.",
    ),
    Mistake(
        "minimised |cos|",
        lambda W_dec, features: _minimised(W_dec, features),
        "`linear_sum_assignment` *minimises* its cost: pass `1 - |cos|` (or `maximize=True`), "
        "not |cos| itself.",
    ),
]


def _match_cases() -> list[Case]:
    g = _g(0)
    features = torch.randn(6, 5, generator=g)
    W_more = torch.randn(8, 5, generator=g) * 3
    W_fewer = torch.randn(4, 5, generator=g) * 0.5
    # greedy-vs-Hungarian: latent 0 is the best match of both features; Hungarian gives it to one
    f2 = _unit(torch.tensor([[1.0, 0.0, 0.0], [0.8, 0.6, 0.0]]))
    W2 = torch.tensor([[0.9, 0.3, 0.0], [0.0, 1.0, 0.2], [0.1, -0.2, 1.0]])
    flipped = W_more.clone()
    flipped[::2] *= -1
    return [
        Case("8 latents, 6 features, rows not unit-norm", (W_more, features)),
        Case("4 latents, 6 features (fewer latents than features)", (W_fewer, features)),
        Case("two features whose best latent is the same one", (W2, f2)),
        Case("every other decoder row flipped in sign", (flipped, features)),
        Case("one latent, one feature", (W_more[:1], features[:1])),
    ]


@exercise("1.1", "match_latents")
def match_latents(learner) -> str:
    return compare_function(
        learner, E.match_latents, _match_cases(), MATCH_MISTAKES, compare=_compare_matching
    )


# ---------------------------------------------------------------- 1.2 per-latent F1


_f1_parts = E.f1_from_firing  # the reference's own arithmetic, for the mistakes below


def _f1_with(best_fn, nan=False, swap=False):
    def f(latent_acts, feature_acts, W_dec, features):
        best = best_fn(W_dec, features)
        fires = (latent_acts > 0).float()
        truth = (feature_acts[:, best] > 0).float()
        if nan:
            tp = (fires * truth).sum(0)
            precision, recall = tp / fires.sum(0), tp / truth.sum(0)
            return precision, recall, 2 * precision * recall / (precision + recall)
        p, r, f1 = _f1_parts(fires, truth)
        return (r, p, f1) if swap else (p, r, f1)

    return f


def _abs_best(W_dec, features):
    return (_unit(W_dec) @ _unit(features).T).abs().argmax(-1)


def _f1_one_to_one(latent_acts, feature_acts, W_dec, features, unmatched="argmax"):
    """Scores each latent against its Hungarian partner instead of its own best feature
    (an unmatched latent keeps its argmax, or feature 0 as a zero-initialised index would)."""
    cos = (_unit(W_dec) @ _unit(features).T).abs()
    rows, cols = _assignment(1 - cos)
    best = cos.argmax(-1) if unmatched == "argmax" else torch.zeros(len(cos), dtype=torch.long)
    best[rows] = cols
    fires = (latent_acts > 0).float()
    truth = (feature_acts[:, best] > 0).float()
    return _f1_parts(fires, truth)


F1_MISTAKES = [
    Mistake(
        "one-to-one matching instead of each latent's best feature",
        _f1_one_to_one,
        "each latent takes its own argmax feature (`|cos|.argmax(-1)`), even one another latent "
        "also takes: F1 is not the one-to-one Hungarian matching of exercise 1.1.",
    ),
    Mistake(
        "one-to-one matching, unmatched latents on feature 0",
        lambda a, f, W, F: _f1_one_to_one(a, f, W, F, unmatched="zero"),
        "each latent takes its own argmax feature (`|cos|.argmax(-1)`), even one another latent "
        "also takes: F1 is not the one-to-one Hungarian matching of exercise 1.1.",
    ),
    Mistake(
        "signed cosine for the best feature",
        _f1_with(lambda W, F: (_unit(W) @ _unit(F).T).argmax(-1)),
        "choose each latent's feature by |cos| (a flipped decoder row still matches it), as "
        "SynthSAEBench does.",
    ),
    Mistake(
        "NaN for a latent that never fires",
        _f1_with(_abs_best, nan=True),
        "a latent that never fires (or whose feature is never active) has an undefined ratio: "
        "count it as 0, so that dead latents lower the mean F1 instead of making it NaN.",
    ),
    Mistake(
        "precision and recall swapped",
        _f1_with(_abs_best, swap=True),
        "precision = true positives / times the latent fired; recall = true positives / times "
        "its feature was active. Yours are the other way round.",
    ),
    Mistake(
        "raw dot products for the best feature",
        _f1_with(lambda W, F: (W @ F.T).abs().argmax(-1)),
        "normalise the decoder rows and the features before taking cosines: the largest raw "
        "dot product is not the largest |cos|.",
    ),
]


def _f1_cases() -> list[Case]:
    g = _g(1)
    features = torch.randn(5, 4, generator=g)
    W = torch.randn(7, 4, generator=g) * torch.linspace(0.2, 3, 7)[:, None]
    W[2] = -W[2]
    W[4] = features[3] * 0.3 + 0.05 * torch.randn(4, generator=g)
    feature_acts = torch.relu(torch.randn(40, 5, generator=g)) * (
        torch.rand(40, 5, generator=g) < 0.4
    )
    latent_acts = torch.relu(torch.randn(40, 7, generator=g) - 0.3)
    latent_acts[:, 5] = 0.0  # a dead latent
    latent_acts[:, 4] = feature_acts[:, 3] * 0.7  # a perfect latent for feature 3 (F1 = 1)
    never = feature_acts.clone()
    never[:, _abs_best(W, features)[0]] = 0.0  # latent 0's feature never active
    return [
        Case("7 latents, 5 features, a dead latent, a flipped row", (latent_acts, feature_acts, W, features)),
        Case("a latent whose feature is never active", (latent_acts, never, W, features)),
        Case("a batch of one", (latent_acts[:1], feature_acts[:1], W, features)),
    ]  # fmt: skip


@exercise("1.2", "latent_f1")
def latent_f1(learner) -> str:
    return compare_function(learner, E.latent_f1, _f1_cases(), F1_MISTAKES)


# ---------------------------------------------------------------- 2.1 BatchTopK


def _per_token_topk(pre, k):
    ks = torch.as_tensor(k, dtype=torch.float64).flatten().expand(pre.shape[1])
    out = torch.zeros_like(pre)
    for i in range(pre.shape[1]):
        kk = int(ks[i])
        v, idx = pre[:, i].topk(kk, dim=-1)
        out[:, i] = torch.zeros_like(pre[:, i]).scatter(-1, idx, torch.relu(v))
    return out


def _batchtopk_variant(relu=True, pooled=False, rounding=int, dtype=torch.float64, detach=False):
    def f(pre, k):
        if detach:
            pre = pre.detach()
        batch, inst, d_sae = pre.shape
        ks = torch.as_tensor(k, dtype=dtype).flatten().expand(inst)
        acts = torch.relu(pre) if relu else pre
        if pooled:
            flat = acts.flatten()
            n = rounding(float(ks.sum()) * batch)
            v, idx = flat.topk(n)
            return torch.zeros_like(flat).scatter(0, idx, v).view_as(pre)
        out = torch.zeros_like(acts)
        for i in range(inst):
            flat = acts[:, i].flatten()
            v, idx = flat.topk(rounding(float(ks[i]) * batch))
            out[:, i] = torch.zeros_like(flat).scatter(0, idx, v).view(batch, d_sae)
        return out

    return f


BATCHTOPK_MISTAKES = [
    Mistake(
        "k per token (TopK)",
        _per_token_topk,
        "that is TopK, k latents on every token. BatchTopK keeps the k × batch largest "
        "activations of the whole batch (flatten batch and latents together), so one token may "
        "keep more than k and another fewer.",
    ),
    Mistake(
        "no ReLU",
        _batchtopk_variant(relu=False),
        "apply the ReLU first: when fewer than k × batch pre-activations are positive, the "
        "negative ones must become 0, not survive the top-k.",
    ),
    Mistake(
        "one top-k over all instances",
        _batchtopk_variant(pooled=True),
        "each instance is its own SAE: take the top int(k[i] × batch) within instance i only.",
    ),
    Mistake(
        "one more than k × batch",
        _batchtopk_variant(rounding=lambda v: int(v) + 1),
        "keep exactly int(k × batch) activations; yours keeps one more.",
    ),
    Mistake(
        "ceil of k × batch",
        _batchtopk_variant(rounding=math.ceil),
        "round k × batch *down* with `int(...)`, as SAELens does; `ceil` keeps one too many when "
        "k × batch is fractional.",
    ),
    Mistake(
        "k in float32",
        _batchtopk_variant(dtype=torch.float32),
        "compute k × batch in float64, as SAELens does with a Python float "
        "(`int(self.k * num_samples)`): 0.7 in float32 is 0.69999999, and int(0.69999999 × 10) "
        "keeps 6, not 7. Use `float(k_i) * batch` with k in float64.",
    ),
    Mistake(
        "rounded k × batch",
        _batchtopk_variant(rounding=round),
        "keep int(k × batch) activations (rounding down), as SAELens does: with a fractional k "
        "`round` keeps one too many.",
    ),
]


def _batchtopk_cases() -> list[Case]:
    g = _g(2)
    pre = torch.randn(6, 2, 7, generator=g)
    negative = torch.randn(4, 1, 6, generator=g) - 1.5
    return [
        Case("6 tokens, 2 instances, k = [2, 3]", (pre, torch.tensor([2.0, 3.0]))),
        Case("fractional k = [1.5, 2.5] on 3 tokens", (pre[:3], torch.tensor([1.5, 2.5]))),
        Case("mostly negative pre-activations, k = 3", (negative, torch.tensor([3.0]))),
        Case("a batch of one token, k = 4 (a plain float)", (pre[:1], 4.0)),
        Case(
            "k = 0.7 (a plain float, not exact in binary) on 10 tokens",
            (torch.randn(10, 1, 5, generator=g), 0.7),
        ),  # SAELens keeps int(0.7 * 10) = 7
        Case("k = d_sae keeps every positive value", (pre, torch.tensor([7.0, 7.0]))),
    ]


@exercise("2.1", "batchtopk")
def batchtopk(learner) -> str:
    return compare_differentiable(
        learner, E.batchtopk, _batchtopk_cases(), BATCHTOPK_MISTAKES, {"pre": 0},
        "`pre` at the kept positions (training backpropagates through them)",
    )  # fmt: skip


# ---------------------------------------------------------------- 2.2 inference threshold


def _threshold_variant(positive_only=True, swapped=False, keep_empty=True, reduce="min",
                       pooled=False):  # fmt: skip
    def f(threshold, acts, lr=0.01):
        positive = acts > 0
        if reduce == "min":
            big = torch.finfo(acts.dtype).max
            source = acts.masked_fill(~positive, big) if positive_only else acts
            m = source.amin(dim=(0, 1, 2) if pooled else (0, 2))
        else:
            m = (acts * positive).sum((0, 2)) / positive.sum((0, 2)).clamp_min(1)
        m = m.to(threshold.dtype).expand_as(threshold)
        new = lr * threshold + (1 - lr) * m if swapped else (1 - lr) * threshold + lr * m
        if keep_empty:
            return torch.where(positive.any(0).any(-1), new, threshold)
        return new

    return f


def _threshold_inf_for_silent(threshold, acts, lr=0.01):
    m = acts.masked_fill(acts <= 0, float("inf")).amin(dim=(0, 2))
    return (1 - lr) * threshold + lr * m.to(threshold.dtype)


def _threshold_mean_of_token_minima(threshold, acts, lr=0.01):
    per_token = acts.masked_fill(acts <= 0, float("inf")).amin(-1)  # [batch, inst]
    m = per_token.masked_fill(per_token.isinf(), float("nan")).nanmean(0)
    fired = (acts > 0).any(0).any(-1)
    return torch.where(fired, (1 - lr) * threshold + lr * m.to(threshold.dtype), threshold)


_POSITIVE_ONLY = (
    "take the minimum over the *positive* activations only (the smallest activation BatchTopK "
    "kept): almost every latent is 0 on a token, so the plain minimum is 0 and the threshold "
    "decays to nothing."
)

_KEEPS = (
    "an instance with no positive activation in this batch keeps its threshold unchanged (its "
    "minimum over an empty set is inf, or 0 over the zeros): use `torch.where` on "
    "`(acts > 0).any(0).any(-1)`."
)

THRESHOLD_MISTAKES = [
    Mistake(
        "minimum over zeros too, silent instance updated",
        _threshold_variant(positive_only=False, keep_empty=False),
        _POSITIVE_ONLY,
    ),
    Mistake("silent instance goes to inf", _threshold_inf_for_silent, _KEEPS),
    Mistake(
        "mean of per-token minima",
        _threshold_mean_of_token_minima,
        "take one minimum per instance over the whole batch (dims 0 and 2 together), not the "
        "mean of each token's minimum.",
    ),
    Mistake(
        "minimum over zeros too",
        _threshold_variant(positive_only=False),
        _POSITIVE_ONLY,
    ),
    Mistake(
        "EMA weights swapped",
        _threshold_variant(swapped=True),
        "the update keeps (1 - lr) of the old threshold and adds lr × the new minimum; yours does "
        "the opposite.",
    ),
    Mistake(
        "mean instead of minimum",
        _threshold_variant(reduce="mean"),
        "the threshold follows the *smallest* positive activation BatchTopK kept (the cut-off), "
        "not their mean.",
    ),
    Mistake(
        "empty batch updates the threshold",
        _threshold_variant(keep_empty=False),
        _KEEPS,
    ),
    Mistake(
        "one minimum over all instances",
        _threshold_variant(pooled=True),
        "each instance has its own threshold: take the minimum within each instance (reduce over "
        "batch and latents, dims 0 and 2).",
    ),
]


def _threshold_cases() -> list[Case]:
    g = _g(3)
    acts = torch.relu(torch.randn(5, 3, 4, generator=g)) + 0.0
    acts[:, 2] = 0.0  # instance 2 fired nothing
    theta = torch.tensor([0.1, 0.2, 0.3], dtype=torch.float64)
    base = Case("3 instances, one silent", (theta, acts))
    one = torch.relu(torch.randn(1, 2, 6, generator=g)) + 0.05 * (
        torch.rand(1, 2, 6, generator=g) > 0.5
    )
    return [
        base,
        *with_options(base, lr=0.3),
        Case("a batch of one, float32 threshold", (torch.tensor([0.5, 0.0]), one), {"lr": 0.05}),
    ]  # fmt: skip


def _compare_threshold(expected, actual) -> str | None:
    if isinstance(actual, torch.Tensor) and actual.dtype != expected.dtype:
        return (
            f"the new threshold has dtype {str(actual.dtype).replace('torch.', '')}, but `threshold` "
            f"was {str(expected.dtype).replace('torch.', '')}: keep its dtype (SAELens keeps it in "
            "float64), e.g. convert the minimum with `.to(threshold.dtype)` before the update"
        )
    return mismatch(expected, actual, 1e-5, 1e-4)


@exercise("2.2", "update_threshold")
def update_threshold(learner) -> str:
    return compare_function(
        learner, E.update_threshold, _threshold_cases(), THRESHOLD_MISTAKES,
        compare=_compare_threshold,
    )  # fmt: skip


# ---------------------------------------------------------------- 2.3 Matryoshka loss


def _matryoshka_variant(bias=True, reduce="sum", inner_only=False, off_by_one=False,
                        per_dim=False, batch_sum=False):  # fmt: skip
    def f(x, acts, W_dec, b_dec, prefixes):
        widths = list(prefixes)[:-1] if inner_only else list(prefixes)
        terms = []
        for m in widths:
            m = m + 1 if off_by_one and m < W_dec.shape[1] else m
            x_hat = torch.einsum("bis,isd->bid", acts[..., :m], W_dec[:, :m])
            x_hat = x_hat + b_dec if bias else x_hat
            err = (x_hat - x).pow(2)
            if batch_sum:
                terms.append(err.sum(-1).sum(0))
            else:
                terms.append(err.mean(-1).mean(0) if per_dim else err.sum(-1).mean(0))
        if not terms:
            return torch.zeros(x.shape[1])
        stacked = torch.stack(terms)
        return stacked.mean(0) if reduce == "mean" else stacked.sum(0)

    return f


MATRYOSHKA_MISTAKES = [
    Mistake(
        "sum over the batch",
        _matryoshka_variant(batch_sum=True),
        "average each prefix's squared error over the batch (`.mean(0)`), do not sum it: the "
        "loss must not grow with the batch size.",
    ),
    Mistake(
        "no b_dec in the prefix reconstructions",
        _matryoshka_variant(bias=False),
        "every prefix reconstruction is b_dec + (first m latents) @ (first m decoder rows): you "
        "left out b_dec.",
    ),
    Mistake(
        "mean over the prefixes",
        _matryoshka_variant(reduce="mean"),
        "sum the prefix losses (SAELens adds them unweighted); yours averages them.",
    ),
    Mistake(
        "inner prefixes only",
        _matryoshka_variant(inner_only=True),
        "the last prefix is the full width: its loss (the ordinary reconstruction) is part of "
        "the sum too.",
    ),
    Mistake(
        "prefix one latent too long",
        _matryoshka_variant(off_by_one=True),
        "prefix m means latents 0 .. m-1: slice with `[..., :m]`, not `[..., :m + 1]`.",
    ),
    Mistake(
        "mean over d_in",
        _matryoshka_variant(per_dim=True),
        "sum the squared error over d_in (then average over the batch), as chapter 02's loss "
        "does; yours averages over d_in.",
    ),
]


def _matryoshka_cases() -> list[Case]:
    g = _g(4)
    x = torch.randn(6, 2, 5, generator=g)
    acts = torch.relu(torch.randn(6, 2, 8, generator=g))
    W_dec = _unit(torch.randn(2, 8, 5, generator=g)) * 1.3
    b_dec = torch.randn(2, 5, generator=g)
    return [
        Case("prefixes [2, 5, 8]", (x, acts, W_dec, b_dec, [2, 5, 8])),
        Case("prefixes [1, 8]", (x, acts, W_dec, b_dec, [1, 8])),
        Case("one prefix, the full width [8]", (x, acts, W_dec, b_dec, [8])),
        Case("a batch of one, prefixes (3, 4, 8) as a tuple", (x[:1], acts[:1], W_dec, b_dec, (3, 4, 8))),
    ]  # fmt: skip


@exercise("2.3", "matryoshka_loss")
def matryoshka_loss(learner) -> str:
    return compare_differentiable(
        learner, E.matryoshka_loss, _matryoshka_cases(), MATRYOSHKA_MISTAKES,
        {"x": 0, "acts": 1, "W_dec": 2, "b_dec": 3}, "`x`, `acts`, `W_dec` and `b_dec`",
    )  # fmt: skip


# ---------------------------------------------------------------- 4.1 sparse-probe selection


def _selection(score_fn, largest=True):
    def f(acts, labels, k):
        labels = labels.bool()
        return score_fn(acts, labels).topk(k, largest=largest).indices

    return f


def _diff(acts, labels):
    return acts[labels].mean(0) - acts[~labels].mean(0)


SELECT_MISTAKES = [
    Mistake(
        "positive mean only",
        _selection(lambda a, y: a[y].mean(0).abs()),
        "rank by the *difference* between the classes, `acts[labels].mean(0) - "
        "acts[~labels].mean(0)`, then its absolute value: a dimension that is large on every row "
        "separates nothing.",
    ),
    Mistake(
        "indices sorted by index",
        lambda acts, labels, k: _diff(acts, labels.bool()).abs().topk(k).indices.sort().values,
        "return the indices in ranking order, largest difference first (as `topk` gives them), "
        "not sorted by index.",
    ),
    Mistake(
        "signed difference",
        _selection(_diff),
        "a dimension that is *lower* on the positives separates them just as well: rank by the "
        "absolute difference |mean_pos - mean_neg|.",
    ),
    Mistake(
        "smallest differences",
        _selection(lambda a, y: _diff(a, y).abs(), largest=False),
        "you picked the k *least* different dimensions: take the largest (`topk`, or argsort "
        "descending).",
    ),
    Mistake(
        "t-statistic",
        _selection(lambda a, y: _diff(a, y).abs() / a.std(0).clamp_min(1e-8)),
        "rank by the raw mean difference (SAEBench's selection), not divided by the spread.",
    ),
]


def _select_cases() -> list[Case]:
    g = _g(5)
    acts = torch.randn(40, 9, generator=g) * torch.linspace(0.5, 3, 9)
    labels = torch.rand(40, generator=g) < 0.4
    acts[labels, 2] += 1.5
    acts[labels, 6] -= 2.5
    acts[labels, 4] += 0.8
    return [
        Case("40 rows, 9 dims, k = 3", (acts, labels, 3)),
        Case("k = 1", (acts, labels, 1)),
        Case("k = every dimension (largest first)", (acts, labels, 9)),
        Case("two rows, one of each class", (acts[[0, 1]], torch.tensor([True, False]), 2)),
    ]


def _compare_selection(expected, actual) -> str | None:
    if not isinstance(actual, torch.Tensor):
        return f"return a tensor of k dimension indices, got {type(actual).__name__}"
    if actual.dtype.is_floating_point or actual.dtype == torch.bool:
        return "return the *indices* of the k dimensions (an integer tensor), not scores or a mask"
    return mismatch(expected.long(), actual.long(), 0, 0)


@exercise("4.1", "top_k_by_mean_difference")
def top_k_by_mean_difference(learner) -> str:
    return compare_function(
        learner,
        E.top_k_by_mean_difference,
        _select_cases(),
        SELECT_MISTAKES,
        compare=_compare_selection,
    )


# ---------------------------------------------------------------- 6.1 co-activation cosine


def _masked_cos(a, b, mask_a=True, mask_b=True, reduce=torch.maximum):
    a, b = a.double(), b.double()
    dot = a.T @ b
    cos_a = dot / (a.norm(dim=0)[:, None] * ((a > 0).double().T @ b.square()).sqrt()).clamp_min(
        1e-12
    )
    cos_b = dot / ((a.square().T @ (b > 0).double()).sqrt() * b.norm(dim=0)[None, :]).clamp_min(
        1e-12
    )
    if mask_a and mask_b:
        return reduce(cos_a, cos_b)
    return cos_a if mask_a else cos_b


def _plain_cos(a, b):
    a, b = a.double(), b.double()
    return (a.T @ b) / (a.norm(dim=0)[:, None] * b.norm(dim=0)[None, :]).clamp_min(1e-12)


def _both_fire_cos(a, b):
    a, b = a.double(), b.double()
    both = ((a > 0).double().T @ (b > 0).double()) > 0
    na = (a.square().T @ (b > 0).double()).sqrt()
    nb = ((a > 0).double().T @ b.square()).sqrt()
    return torch.where(both, (a.T @ b) / (na * nb).clamp_min(1e-12), 0.0)


def _pearson(a, b):
    return _plain_cos(a - a.mean(0), b - b.mean(0))


def _dead_linked(a, b):
    """No guard, and the 0/0 of a silent latent turned into a perfect link."""
    a, b = a.double(), b.double()
    dot = a.T @ b
    cos_a = dot / (a.norm(dim=0)[:, None] * ((a > 0).double().T @ b.square()).sqrt())
    cos_b = dot / ((a.square().T @ (b > 0).double()).sqrt() * b.norm(dim=0)[None, :])
    return torch.maximum(cos_a, cos_b).nan_to_num(nan=1.0)


COACT_MISTAKES = [
    Mistake(
        "cosine over every token",
        _plain_cos,
        "restrict each cosine to the tokens where one latent fires: over *all* tokens a rare latent "
        "looks unrelated to a common one that covers it (Bricken et al.'s point).",
    ),
    Mistake(
        "only latent i's tokens",
        lambda a, b: _masked_cos(a, b, mask_b=False),
        "compute the cosine twice, once over the tokens where latent i fires and once over those "
        "where latent j fires, and keep the larger: you kept only the first.",
    ),
    Mistake(
        "only latent j's tokens",
        lambda a, b: _masked_cos(a, b, mask_a=False),
        "compute the cosine twice, once over the tokens where latent i fires and once over those "
        "where latent j fires, and keep the larger: you kept only the second.",
    ),
    Mistake(
        "minimum of the two",
        lambda a, b: _masked_cos(a, b, reduce=torch.minimum),
        "keep the *larger* of the two cosines (a child that fires on part of its parent's tokens "
        "is linked through the child's tokens), not the smaller.",
    ),
    Mistake(
        "mean of the two",
        lambda a, b: _masked_cos(a, b, reduce=lambda x, y: (x + y) / 2),
        "keep the *larger* of the two cosines, not their mean: a child that fires on part of "
        "its parent's tokens is linked through the child's tokens alone.",
    ),
    Mistake(
        "a silent latent linked to everything",
        _dead_linked,
        "a latent that never fires has link 0 with everything: its 0/0 is no evidence of a link "
        "(guard the division with `.clamp_min(1e-12)` rather than filling NaN with 1).",
    ),
    Mistake(
        "tokens where both fire",
        _both_fire_cos,
        "restrict to the tokens where *one* latent fires (its own zeros stay out, the other's "
        "zeros stay in), not to the tokens where both fire: there every pair looks alike.",
    ),
    Mistake(
        "firing indicators",
        lambda a, b: _masked_cos((a > 0).double(), (b > 0).double()),
        "use the activation values, not whether each latent fires.",
    ),
    Mistake(
        "Pearson correlation",
        _pearson,
        "a cosine of the raw activations (no mean subtracted), restricted to one latent's tokens.",
    ),
]


def _coact_cases() -> list[Case]:
    g = _g(11)
    a = torch.relu(torch.randn(60, 5, generator=g) - 0.3)
    b = torch.relu(torch.randn(60, 7, generator=g) - 0.6)
    b[:, 0] = a[:, 1] * (torch.rand(60, generator=g) < 0.5)  # a child: half of latent 1's tokens
    b[:, 1] = 2.0 * a[:, 3]  # the same latent, rescaled
    b[:, 6] = 0.0  # a dead latent
    a[:, 4] = 0.0
    a[:5, 4] = torch.rand(5, generator=g)  # a rare latent
    return [
        Case("60 tokens, 5 and 7 latents (a child, a copy, a dead and a rare latent)", (a, b)),
        Case("the same dictionary twice", (a, a.clone())),
        Case("a single token", (a[:1], b[:1])),
    ]


def _compare_coact(expected, actual) -> str | None:
    if not isinstance(actual, torch.Tensor):
        return f"return a tensor of shape [a, b], got {type(actual).__name__}"
    if actual.isnan().any():
        return (
            "your result has NaN: a latent that never fires has link 0 with everything "
            "(guard the division, e.g. `.clamp_min(1e-12)` on the norms' product)"
        )
    return mismatch(expected.double(), actual.double(), 1e-5, 1e-4)


@exercise("6.1", "coactivation_cosine")
def coactivation_cosine(learner) -> str:
    return compare_function(
        learner,
        E.coactivation_cosine,
        _coact_cases(),
        COACT_MISTAKES,
        compare=_compare_coact,
    )
