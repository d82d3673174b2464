"""Data with a known sparse dictionary (Sharkey, Braun & Millidge 2022), for chapter 02.

x = sum_i c_i d_i, where the d_i are random unit vectors in R^d (more features than dimensions)
and each coefficient c_i is 0 unless feature i is active, when it is U(0, 1). Feature i is active
with probability p_i. Optionally the *activity* of features is correlated: a Gaussian copula draws
z ~ N(0, C) (C a random correlation matrix) and feature i is active when Phi(z_i) < p_i, so every
feature keeps its own probability p_i while features with positive correlation tend to fire
together.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor


def random_dictionary(n_features: int, d: int, seed: int = 0) -> Float[Tensor, "n_features d"]:
    """n_features random unit vectors in R^d (rows)."""
    if n_features < 1 or d < 1:
        raise ValueError(f"need n_features >= 1 and d >= 1, got n_features={n_features}, d={d}.")
    g = torch.Generator().manual_seed(seed)
    D = torch.randn(n_features, d, generator=g)
    return D / D.norm(dim=-1, keepdim=True)


def decaying_probabilities(n_features: int, mean_active: float, decay: float = 0.99) -> Tensor:
    """p_i proportional to decay**i, scaled so that on average ``mean_active`` features fire."""
    p = decay ** torch.arange(n_features, dtype=torch.float32)
    p = p * mean_active / p.sum()
    if p.max() > 1:
        raise ValueError(f"mean_active={mean_active} is too large for {n_features} features.")
    return p


def random_correlation(
    n_features: int, rank: int = 4, strength: float = 1.0, seed: int = 0
) -> Tensor:
    """A random correlation matrix C = normalise(A A^T + I), A [n_features, rank] * strength."""
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(n_features, rank, generator=g) * strength
    C = A @ A.T + torch.eye(n_features)
    s = C.diag().sqrt()
    return C / s[:, None] / s[None, :]


@dataclass
class SparseDictionaryData:
    """A generator of (x, coefficients) with a fixed true dictionary; call ``sample(batch)``."""

    dictionary: Float[Tensor, "n_features d"]
    probabilities: Float[Tensor, " n_features"]
    correlation: Float[Tensor, "n_features n_features"] | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        n = self.dictionary.shape[0]
        if self.probabilities.shape != (n,):
            raise ValueError(
                f"probabilities have shape {tuple(self.probabilities.shape)}, but the dictionary "
                f"has shape {tuple(self.dictionary.shape)}: expected ({n},)."
            )
        self._chol = None
        if self.correlation is not None:
            if self.correlation.shape != (n, n):
                raise ValueError(
                    f"correlation has shape {tuple(self.correlation.shape)}, expected ({n}, {n})."
                )
            self._chol = torch.linalg.cholesky(self.correlation)
        self.generator = torch.Generator().manual_seed(self.seed)

    @property
    def n_features(self) -> int:
        return self.dictionary.shape[0]

    @property
    def d(self) -> int:
        return self.dictionary.shape[1]

    def sample_with_coefficients(self, batch: int) -> tuple[Float[Tensor, "batch d"], Tensor]:
        g, n = self.generator, self.n_features
        if self._chol is None:
            u = torch.rand(batch, n, generator=g)
        else:
            z = torch.randn(batch, n, generator=g) @ self._chol.T
            u = 0.5 * (1 + torch.erf(z / math.sqrt(2)))  # Phi(z): uniform marginals, correlated
        active = u < self.probabilities
        coefficients = torch.rand(batch, n, generator=g) * active
        return coefficients @ self.dictionary, coefficients

    def sample(self, batch: int) -> Float[Tensor, "batch d"]:
        return self.sample_with_coefficients(batch)[0]
