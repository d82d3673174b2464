"""Every chapter-10 check passes the reference, flags the stub, rejects known and invented wrong
answers, and accepts different correct ones (tests/check_contract.py)."""

from __future__ import annotations

import pytest
import torch

from course_utils.checks import ch10 as check
from course_utils.science import sae_eval as E
from tests.check_contract import contract_tests

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest.py


def _unit(t):
    return t / t.norm(dim=-1, keepdim=True)


# (check, reference, mistakes, an extra wrong answer not in the mistakes list)
CHECKS = [
    (
        check.match_latents,
        E.match_latents,
        check.MATCH_MISTAKES,
        lambda W, F: tuple(t[:-1] for t in E.match_latents(W, F)),  # drops the last pair
    ),
    (
        check.latent_f1,
        E.latent_f1,
        check.F1_MISTAKES,
        lambda a, f, W, F: tuple(t.clamp(max=0.9) for t in E.latent_f1(a, f, W, F)),
    ),
    (
        check.batchtopk,
        E.batchtopk,
        check.BATCHTOPK_MISTAKES,
        lambda pre, k: E.batchtopk(pre, k) * 0.5,
    ),
    (
        check.update_threshold,
        E.update_threshold,
        check.THRESHOLD_MISTAKES,
        lambda th, acts, lr=0.01: E.update_threshold(th, acts, 0.01),  # ignores lr
    ),
    (
        check.matryoshka_loss,
        E.matryoshka_loss,
        check.MATRYOSHKA_MISTAKES,
        lambda x, a, W, b, p: E.matryoshka_loss(x, a, W, b, [W.shape[1]]),  # full width only
    ),
    (
        check.top_k_by_mean_difference,
        E.top_k_by_mean_difference,
        check.SELECT_MISTAKES,
        lambda acts, labels, k: E.top_k_by_mean_difference(acts, labels, k).flip(0),
    ),
    (
        check.coactivation_cosine,
        E.coactivation_cosine,
        check.COACT_MISTAKES,
        lambda a, b: E.coactivation_cosine(a, b).clamp(max=0.95),
    ),
]


# ------------------------------------------------------------ correct alternatives
def coact_loop(a, b):
    """One pair at a time, with explicit masks."""
    out = torch.zeros(a.shape[1], b.shape[1])
    for i in range(a.shape[1]):
        for j in range(b.shape[1]):
            best = 0.0
            for mask in (a[:, i] > 0, b[:, j] > 0):
                u, v = a[mask, i], b[mask, j]
                if u.norm() > 0 and v.norm() > 0:
                    best = max(best, float(u @ v / (u.norm() * v.norm())))
            out[i, j] = best
    return out


def coact_masked_float64(a, b):
    a, b = a.double(), b.double()
    fa, fb = (a > 0).double(), (b > 0).double()
    dot = torch.einsum("ni,nj->ij", a, b)
    on_a = dot / torch.sqrt(
        torch.einsum("ni,nj->ij", a**2, torch.ones_like(b)) * torch.einsum("ni,nj->ij", fa, b**2)
    )
    on_b = dot / torch.sqrt(
        torch.einsum("ni,nj->ij", a**2, fb) * torch.einsum("ni,nj->ij", torch.ones_like(a), b**2)
    )
    return torch.maximum(on_a.nan_to_num(0), on_b.nan_to_num(0))


def coact_float32_nonzero(a, b):
    """Float32 throughout, "fires" read as a nonzero activation (the same for ReLU'd codes)."""
    a, b = a.float(), b.float()
    dot = a.T @ b
    on_a = dot / (a.norm(dim=0)[:, None] * ((a != 0).float().T @ b.square()).sqrt()).clamp_min(
        1e-12
    )
    on_b = dot / ((a.square().T @ (b != 0).float()).sqrt() * b.norm(dim=0)[None, :]).clamp_min(
        1e-12
    )
    return torch.maximum(on_a, on_b)


def coact_cosine_similarity(a, b):
    """torch's cosine_similarity on masked copies, one latent of each side at a time."""
    a, b = a.double(), b.double()
    on_a = torch.stack(
        [
            torch.nn.functional.cosine_similarity(
                a[:, [i]] * (a[:, [i]] > 0), b * (a[:, [i]] > 0), dim=0, eps=1e-12
            )
            for i in range(a.shape[1])
        ]
    )
    on_b = torch.stack(
        [
            torch.nn.functional.cosine_similarity(
                a * (b[:, [j]] > 0), b[:, [j]] * (b[:, [j]] > 0), dim=0, eps=1e-12
            )
            for j in range(b.shape[1])
        ],
        dim=1,
    )
    return torch.maximum(on_a, on_b)


def coact_any_latent_fires(a, b):
    """Restricts to the tokens where *any* latent of the dictionary fires, not latent i."""
    a, b = a.double(), b.double()
    dot = a.T @ b
    fa = (a > 0).any(-1, keepdim=True).double().expand_as(a)
    fb = (b > 0).any(-1, keepdim=True).double().expand_as(b)
    on_a = dot / (a.norm(dim=0)[:, None] * (fa.T @ b.square()).sqrt()).clamp_min(1e-12)
    on_b = dot / ((a.square().T @ fb).sqrt() * b.norm(dim=0)[None, :]).clamp_min(1e-12)
    return torch.maximum(on_a, on_b)


def coact_rare_omitted(a, b):
    """Bricken et al. leave out ultralow-density features; the exercise does not: zeroing the
    links of latents that fire fewer than 3 times is wrong here."""
    out = E.coactivation_cosine(a, b).clone()
    out[(a > 0).sum(0) < 3] = 0
    out[:, (b > 0).sum(0) < 3] = 0
    return out


def coact_fires_above_threshold(a, b):
    """Reads "fires" as an activation above 0.1 and drops the smaller activations."""
    return E.coactivation_cosine(a * (a > 0.1), b * (b > 0.1))


def coact_mean_of_two(a, b):
    a, b = a.double(), b.double()
    dot = a.T @ b
    on_a = dot / (a.norm(dim=0)[:, None] * ((a > 0).double().T @ b**2).sqrt()).clamp_min(1e-12)
    on_b = (
        dot
        / ((a**2).T @ (b > 0).double()).sqrt().clamp_min(1e-12)
        / b.norm(dim=0)[None, :].clamp_min(1e-12)
    )
    return (on_a + on_b) / 2


def coact_dead_is_one(a, b):
    a, b = a.double(), b.double()
    dot = a.T @ b
    on_a = dot / (a.norm(dim=0)[:, None] * ((a > 0).double().T @ b**2).sqrt())
    on_b = dot / ((a**2).T @ (b > 0).double()).sqrt() / b.norm(dim=0)[None, :]
    return torch.maximum(on_a, on_b).nan_to_num(nan=1.0)


def coact_no_guard(a, b):
    a, b = a.double(), b.double()
    dot = a.T @ b
    on_a = dot / (a.norm(dim=0)[:, None] * ((a > 0).double().T @ b**2).sqrt())
    on_b = dot / ((a**2).T @ (b > 0).double()).sqrt() / b.norm(dim=0)[None, :]
    return torch.maximum(on_a, on_b)


def match_maximize(W_dec, features):
    from scipy.optimize import linear_sum_assignment

    cos = (
        torch.nn.functional.normalize(W_dec, dim=-1)
        @ torch.nn.functional.normalize(features, dim=-1).T
    )
    rows, cols = linear_sum_assignment(cos.abs().numpy(), maximize=True)
    rows, cols = torch.as_tensor(rows), torch.as_tensor(cols)
    return rows, cols, cos.abs()[rows, cols]


def match_transposed_latent_order(W_dec, features):
    """Matches on the [feat, d_sae] matrix and returns pairs in latent order."""
    from scipy.optimize import linear_sum_assignment

    cos = (_unit(features) @ _unit(W_dec).T).abs()  # [feat, d_sae]
    feats, latents = linear_sum_assignment(-cos.numpy())
    feats, latents = torch.as_tensor(feats), torch.as_tensor(latents)
    order = latents.argsort()
    return latents[order], feats[order], cos[feats[order], latents[order]]


def f1_loop(latent_acts, feature_acts, W_dec, features):
    cos = (_unit(W_dec) @ _unit(features).T).abs()
    p, r, f = [], [], []
    for j in range(W_dec.shape[0]):
        fires = latent_acts[:, j] > 0
        truth = feature_acts[:, int(cos[j].argmax())] > 0
        tp = (fires & truth).sum().item()
        pj = tp / fires.sum().item() if fires.any() else 0.0
        rj = tp / truth.sum().item() if truth.any() else 0.0
        p.append(pj)
        r.append(rj)
        f.append(2 * pj * rj / (pj + rj) if pj + rj > 0 else 0.0)
    return torch.tensor(p), torch.tensor(r), torch.tensor(f)


def f1_nan_to_num(latent_acts, feature_acts, W_dec, features):
    best = torch.einsum("sd,fd->sf", _unit(W_dec), _unit(features)).abs().argmax(-1)
    fires = (latent_acts > 0).float()
    truth = (feature_acts[:, best] > 0).float()
    tp = (fires * truth).sum(0)
    precision = (tp / fires.sum(0)).nan_to_num(0.0)
    recall = (tp / truth.sum(0)).nan_to_num(0.0)
    f1 = (2 * tp / (fires.sum(0) + truth.sum(0))).nan_to_num(0.0)
    return precision, recall, f1


def batchtopk_threshold_by_kth(pre, k):
    batch, inst, _ = pre.shape
    ks = torch.as_tensor(k, dtype=torch.float64).flatten().expand(inst)
    acts = pre.clamp(min=0)
    out = []
    for i in range(inst):
        n = int(ks[i] * batch)
        flat = acts[:, i].flatten()
        order = flat.argsort(descending=True)
        keep = torch.zeros_like(flat, dtype=torch.bool)
        keep[order[:n]] = True
        out.append(torch.where(keep, flat, 0.0).view(batch, -1))
    return torch.stack(out, dim=1)


def batchtopk_einops(pre, k):
    import einops

    batch, inst, d_sae = pre.shape
    ks = [float(k)] * inst if not torch.is_tensor(k) else k.double().flatten().expand(inst).tolist()
    flat = einops.rearrange(torch.relu(pre), "b i s -> i (b s)")
    kept = torch.zeros_like(flat)
    for i, kk in enumerate(ks):
        values, idx = flat[i].topk(int(kk * batch))
        kept[i, idx] = values
    return einops.rearrange(kept, "i (b s) -> b i s", b=batch)


def threshold_loop(threshold, acts, lr=0.01):
    new = threshold.clone()
    for i in range(acts.shape[1]):
        positive = acts[:, i][acts[:, i] > 0]
        if len(positive):
            new[i] = threshold[i] + lr * (positive.min().to(threshold.dtype) - threshold[i])
    return new


def threshold_inf_fill(threshold, acts, lr=0.01):
    masked = torch.where(acts > 0, acts, torch.inf)
    m = masked.flatten(start_dim=2).transpose(0, 1).reshape(acts.shape[1], -1).min(-1).values
    fired = torch.isfinite(m)
    return torch.where(fired, (1 - lr) * threshold + lr * m.to(threshold.dtype), threshold)


def matryoshka_masks(x, acts, W_dec, b_dec, prefixes):
    total = 0
    for m in prefixes:
        mask = (torch.arange(acts.shape[-1]) < m).to(acts.dtype)
        x_hat = torch.einsum("bis,isd->bid", acts * mask, W_dec) + b_dec
        total = total + torch.nn.functional.mse_loss(x_hat, x, reduction="none").sum(-1).mean(0)
    return total


def matryoshka_cumulative(x, acts, W_dec, b_dec, prefixes):
    """Builds each prefix's reconstruction from the previous one (as SAELens does)."""
    losses, x_hat, start = [], b_dec.expand_as(x), 0
    for m in prefixes:
        x_hat = x_hat + torch.einsum("bis,isd->bid", acts[..., start:m], W_dec[:, start:m])
        losses.append(((x - x_hat) ** 2).sum(-1).mean(0))
        start = m
    return torch.stack(losses).sum(0)


def select_argsort(acts, labels, k):
    diff = acts[labels].mean(0) - acts[~labels].mean(0)
    return diff.abs().argsort(descending=True)[:k]


def select_masked_means(acts, labels, k):
    y = labels.float()[:, None]
    pos = (acts * y).sum(0) / y.sum()
    neg = (acts * (1 - y)).sum(0) / (1 - y).sum()
    return torch.topk((pos - neg).abs(), k).indices


CORRECT = {
    check.match_latents: [match_maximize, match_transposed_latent_order],
    check.latent_f1: [f1_loop, f1_nan_to_num],
    check.batchtopk: [batchtopk_threshold_by_kth, batchtopk_einops],
    check.update_threshold: [threshold_loop, threshold_inf_fill],
    check.matryoshka_loss: [matryoshka_masks, matryoshka_cumulative],
    check.top_k_by_mean_difference: [select_argsort, select_masked_means],
    check.coactivation_cosine: [
        coact_loop,
        coact_masked_float64,
        coact_float32_nonzero,
        coact_cosine_similarity,
    ],
}


# ------------------------------------------------------------ invented wrong answers
def match_sorted_by_cos(W_dec, features):
    """Hungarian, then the pairs re-sorted by |cos| with the feature column left behind."""
    latents, feats, cos = E.match_latents(W_dec, features)
    order = cos.argsort()
    return latents[order], feats, cos[order]


def batchtopk_threshold_at_mean(pre, k):
    acts = torch.relu(pre)
    return acts * (acts > acts.mean())


def threshold_max(threshold, acts, lr=0.01):
    m = acts.amax(dim=(0, 2)).to(threshold.dtype)
    return torch.where((acts > 0).any(0).any(-1), (1 - lr) * threshold + lr * m, threshold)


WRONG = {
    check.match_latents: [
        match_sorted_by_cos,
        lambda W, F: (
            (torch.arange(min(len(W), len(F))),) * 2
            + ((_unit(W[: len(F)]) @ _unit(F[: len(W)]).T).diagonal().abs(),)
        ),
    ],
    check.latent_f1: [
        lambda a, f, W, F: E.latent_f1(a, f, W, F)[:2] + (E.latent_f1(a, f, W, F)[2] * 0,),
        lambda a, f, W, F: E.latent_f1((a > 0.5).float(), f, W, F),
    ],
    check.batchtopk: [batchtopk_threshold_at_mean, lambda pre, k: torch.relu(pre)],
    check.update_threshold: [threshold_max, lambda th, acts, lr=0.01: th],
    check.matryoshka_loss: [
        lambda x, a, W, b, p: E.matryoshka_loss(x, a, W, b, p) / len(p),
        lambda x, a, W, b, p: E.matryoshka_loss(x, a, W, b, p) ** 0.5,
    ],
    check.coactivation_cosine: [
        lambda a, b: E.coactivation_cosine(b, a),  # [b, a]: transposed
        lambda a, b: E.coactivation_cosine(a, b).nan_to_num(0) * 0 + 1,  # everything linked
        coact_no_guard,
        coact_any_latent_fires,
        coact_rare_omitted,
        coact_fires_above_threshold,
        coact_mean_of_two,
        coact_dead_is_one,
    ],
    check.top_k_by_mean_difference: [
        lambda acts, labels, k: torch.arange(k),
        lambda acts, labels, k: acts[labels].mean(0).abs().topk(k).indices,
    ],
}


contract_tests(check, CHECKS, globals(), correct=CORRECT, wrong=WRONG)


# ------------------------------------------------------------ a newcomer's wrong answers, each
# with the message it must get (the hint of its own mistake, or the gradient / type / dtype note)
def batchtopk_detached(pre, k):
    return E.batchtopk(pre, k).detach()


def batchtopk_no_grad(pre, k):
    with torch.no_grad():
        return E.batchtopk(pre, k)


def _batchtopk_keeping(count):
    """A per-instance BatchTopK loop that keeps ``count(k, batch)`` activations (k in float32)."""

    def batchtopk(pre, k):
        batch, inst, d_sae = pre.shape
        ks = torch.as_tensor(k, dtype=torch.float32).flatten().expand(inst)
        out = torch.zeros_like(pre)
        for i in range(inst):
            flat = torch.relu(pre[:, i]).flatten()
            values, indices = flat.topk(count(ks[i], batch))
            out[:, i] = torch.zeros_like(flat).scatter(0, indices, values).view(batch, d_sae)
        return out

    return batchtopk


batchtopk_float32_k = _batchtopk_keeping(lambda k, batch: int(k.item() * batch))
batchtopk_ceil = _batchtopk_keeping(lambda k, batch: int(torch.ceil(k * batch)))
batchtopk_plus_one = _batchtopk_keeping(lambda k, batch: int(k * batch) + 1)


def matryoshka_detached(x, acts, W_dec, b_dec, prefixes):
    return E.matryoshka_loss(x, acts, W_dec, b_dec, prefixes).detach()


def matryoshka_sum_batch(x, acts, W_dec, b_dec, prefixes):
    total = 0
    for m in prefixes:
        x_hat = torch.einsum("bis,isd->bid", acts[..., :m], W_dec[:, :m]) + b_dec
        total = total + (x_hat - x).pow(2).sum(-1).sum(0)
    return total


def match_cos_as_list(W, F):
    latents, feats, cos = E.match_latents(W, F)
    return latents, feats, cos.tolist()


def match_no_abs(W, F):
    from scipy.optimize import linear_sum_assignment

    cos = _unit(W) @ _unit(F).T
    r, c = linear_sum_assignment(-cos.numpy())
    return torch.as_tensor(r), torch.as_tensor(c), cos[r, c].abs()


def match_greedy_argmax(W, F):
    cos = (_unit(W) @ _unit(F).T).abs()
    c = cos.argmax(-1)
    r = torch.arange(len(W))
    return r, c, cos[r, c]


def f1_hungarian(la, fa, W, F):
    lat, feat, _ = E.match_latents(W, F)
    best = torch.zeros(len(W), dtype=torch.long)
    best[lat] = feat
    fired, on = la > 0, fa[:, best] > 0
    tp, nf, na = (fired & on).sum(0).float(), fired.sum(0).float(), on.sum(0).float()
    p = torch.where(nf > 0, tp / nf.clamp_min(1), 0.0)
    r = torch.where(na > 0, tp / na.clamp_min(1), 0.0)
    return p, r, torch.where(p + r > 0, 2 * p * r / (p + r).clamp_min(1e-12), 0.0)


def threshold_float32(th, acts, lr=0.01):
    return E.update_threshold(th, acts, lr).float()


def threshold_min_all(th, acts, lr=0.01):
    return ((1 - lr) * th + lr * acts.amin(dim=(0, 2))).to(th.dtype)


def threshold_silent_inf(th, acts, lr=0.01):
    m = acts.masked_fill(acts <= 0, float("inf")).amin(dim=(0, 2))
    return (1 - lr) * th + lr * m.to(th.dtype)


def threshold_mean_token_minima(th, acts, lr=0.01):
    a = acts.masked_fill(acts <= 0, float("inf")).amin(-1)
    a = a.masked_fill(a.isinf(), float("nan")).nanmean(0)
    fired = (acts > 0).any(0).any(-1)
    return torch.where(fired, (1 - lr) * th + lr * a.to(th.dtype), th)


NEWCOMER = [
    (check.batchtopk, batchtopk_detached, "no gradient flows back to `pre`"),
    (check.batchtopk, batchtopk_no_grad, "no gradient flows back to `pre`"),
    (check.batchtopk, batchtopk_float32_k, "compute k × batch in float64"),
    (check.batchtopk, batchtopk_ceil, "`ceil` keeps one too many"),
    (check.batchtopk, batchtopk_plus_one, "yours keeps one more"),
    (check.matryoshka_loss, matryoshka_detached, "no gradient flows back to `x`"),
    (check.matryoshka_loss, matryoshka_sum_batch, "(`.mean(0)`), do not sum it"),
    (check.match_latents, match_cos_as_list, "return three torch tensors, got list"),
    (check.match_latents, match_no_abs, "take |cos| *before* matching"),
    (check.match_latents, match_greedy_argmax, "the matching must be one-to-one"),
    (check.latent_f1, f1_hungarian, "each latent takes its own argmax feature"),
    (check.update_threshold, threshold_float32, "keep its dtype"),
    (check.update_threshold, threshold_min_all, "*positive* activations only"),
    (check.update_threshold, threshold_silent_inf, "keeps its threshold unchanged"),
    (check.update_threshold, threshold_mean_token_minima, "not the mean of each token's minimum"),
    (check.coactivation_cosine, coact_no_guard, "your result has NaN"),
    (check.coactivation_cosine, coact_mean_of_two, "not their mean"),
    (check.coactivation_cosine, coact_dead_is_one, "its 0/0 is no evidence of a link"),
    (
        check.coactivation_cosine,
        lambda a, b: (
            torch.nn.functional.normalize(a, dim=0).T @ torch.nn.functional.normalize(b, dim=0)
        ),
        "restrict each cosine to the tokens where one latent fires",
    ),
    (
        check.top_k_by_mean_difference,
        lambda a, y, k: a[y].mean(0).abs().topk(k).indices,
        "rank by the *difference* between the classes",
    ),
    (
        check.top_k_by_mean_difference,
        lambda a, y, k: (a[y].mean(0) - a[~y].mean(0)).abs().topk(k).indices.sort().values,
        "largest difference first",
    ),
]


@pytest.mark.parametrize(
    "check_fn, wrong, expected",
    NEWCOMER,
    ids=[f"{c.__name__}-{i}" for i, (c, _, _) in enumerate(NEWCOMER)],
)
def test_newcomer_wrong_answer_gets_its_own_message(check_fn, wrong, expected):
    from course_utils.checks.core import FAILED, outcome

    status, message = outcome(check_fn, wrong)
    assert status == FAILED, message
    assert expected in message, message
