"""SAE metrics (chapter 02 onwards): L0, FVU, dead latents, MMCS, shrinkage.

Every metric takes tensors with an instance dimension and returns one value per instance, so a
whole sweep is evaluated in one call. Shapes: x, x_hat [batch, inst, d_in]; acts
[batch, inst, d_sae]; dictionaries [inst, d_sae, d_in] (learned) and [n_features, d_in] (true).
"""

from __future__ import annotations

import torch
from jaxtyping import Bool, Float
from torch import Tensor


def _same_shape(a: Tensor, b: Tensor, what_a: str, what_b: str) -> None:
    if a.shape != b.shape:
        raise ValueError(
            f"{what_a} has shape {tuple(a.shape)} but {what_b} has shape {tuple(b.shape)}."
        )


def l0(acts: Float[Tensor, "batch inst d_sae"]) -> Float[Tensor, " inst"]:
    """Reference for exercise 3.1: mean number of nonzero latents per example."""
    return (acts != 0).float().sum(-1).mean(0)


def fvu(
    x: Float[Tensor, "batch inst d_in"], x_hat: Float[Tensor, "batch inst d_in"]
) -> Float[Tensor, " inst"]:
    """Reference for exercise 3.2: fraction of variance unexplained.

    FVU = sum_n ||x_n - x_hat_n||^2 / sum_n ||x_n - mean(x)||^2, the mean taken over the batch.
    0 is a perfect reconstruction; 1 is no better than predicting the mean.
    """
    _same_shape(x, x_hat, "x", "x_hat")
    residual = (x - x_hat).pow(2).sum(-1).sum(0)
    variance = (x - x.mean(0, keepdim=True)).pow(2).sum(-1).sum(0)
    return residual / variance.clamp_min(1e-12)


def dead_latents(acts: Float[Tensor, "batch inst d_sae"]) -> Bool[Tensor, "inst d_sae"]:
    """Reference for exercise 3.3: True for latents that never fire (never > 0) on the batch."""
    return ~(acts > 0).any(0)


def mmcs(
    learned: Float[Tensor, "inst d_sae d_in"], true: Float[Tensor, "n_features d_in"]
) -> Float[Tensor, " inst"]:
    """Reference for exercise 3.4: mean max cosine similarity (Sharkey et al. 2022).

    For each *true* feature, the largest cosine similarity with any learned dictionary element;
    averaged over the true features. 1 means every true feature has an exact copy.
    """
    if learned.ndim == 2:
        learned = learned.unsqueeze(0)
    if learned.ndim != 3 or true.ndim != 2 or learned.shape[-1] != true.shape[-1]:
        raise ValueError(
            f"learned dictionary has shape {tuple(learned.shape)} ([inst, d_sae, d_in]) and the "
            f"true dictionary has shape {tuple(true.shape)} ([n_features, d_in]): their last "
            "dimensions (d_in) must match."
        )
    learned_unit = learned / learned.norm(dim=-1, keepdim=True).clamp_min(1e-8)
    true_unit = true / true.norm(dim=-1, keepdim=True).clamp_min(1e-8)
    cos = torch.einsum("isd,fd->ifs", learned_unit, true_unit)  # [inst, n_features, d_sae]
    return cos.max(-1).values.mean(-1)


def max_cosine_per_feature(
    learned: Float[Tensor, "inst d_sae d_in"], true: Float[Tensor, "n_features d_in"]
) -> tuple[Float[Tensor, "inst n_features"], Tensor]:
    """For each true feature: the best cosine similarity and the index of the matching latent."""
    learned_unit = learned / learned.norm(dim=-1, keepdim=True).clamp_min(1e-8)
    true_unit = true / true.norm(dim=-1, keepdim=True).clamp_min(1e-8)
    best = torch.einsum("isd,fd->ifs", learned_unit, true_unit).max(-1)
    return best.values, best.indices


def shrinkage_ratio(
    x: Float[Tensor, "batch inst d_in"], x_hat: Float[Tensor, "batch inst d_in"]
) -> Float[Tensor, " inst"]:
    """gamma = sum ||x_hat||^2 / sum <x, x_hat>: below 1 means reconstructions are too short.

    If x_hat = s * x exactly, gamma = s.
    """
    _same_shape(x, x_hat, "x", "x_hat")
    return x_hat.pow(2).sum(-1).sum(0) / (x * x_hat).sum(-1).sum(0).clamp_min(1e-12)


def coefficient_ratio(
    x_hat: Float[Tensor, "batch inst d_in"],
    coefficients: Float[Tensor, "batch n_features"],
    true: Float[Tensor, "n_features d_in"],
) -> Float[Tensor, " inst"]:
    """Recovered / true coefficient on examples where exactly one true feature is active.

    For such an example x = c * d_i, the reconstruction's coefficient along d_i is <x_hat, d_i>.
    Returns sum <x_hat, d_i> / sum c over those examples: 1 means magnitudes are recovered,
    below 1 means shrinkage.
    """
    if coefficients.shape[-1] != true.shape[0] or x_hat.shape[-1] != true.shape[-1]:
        raise ValueError(
            f"x_hat {tuple(x_hat.shape)}, coefficients {tuple(coefficients.shape)} and the true "
            f"dictionary {tuple(true.shape)} do not fit: need x_hat [batch, inst, d_in], "
            "coefficients [batch, n_features], true [n_features, d_in]."
        )
    single = (coefficients > 0).sum(-1) == 1
    if not single.any():
        raise ValueError("no example has exactly one active feature; use a larger batch.")
    c = coefficients[single]  # [n, n_features], one nonzero per row
    feature = c.argmax(-1)
    recovered = torch.einsum("nid,nd->ni", x_hat[single], true[feature])
    return recovered.sum(0) / c.sum()
