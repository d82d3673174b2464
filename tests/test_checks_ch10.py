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
        lambda acts, labels, k: E.top_k_by_mean_difference(acts, labels, k).sort().values,
    ),
]


# ------------------------------------------------------------ correct alternatives
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
    ks = torch.as_tensor(k, dtype=torch.float32).flatten().expand(inst)
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
    ks = torch.as_tensor(k, dtype=torch.float32).flatten().expand(inst).tolist()
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
    check.top_k_by_mean_difference: [
        lambda acts, labels, k: torch.arange(k),
        lambda acts, labels, k: acts[labels].mean(0).abs().topk(k).indices,
    ],
}


contract_tests(check, CHECKS, globals(), correct=CORRECT, wrong=WRONG)
