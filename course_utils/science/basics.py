"""Small tensor utilities used across chapters (cosine similarities, norms)."""

from __future__ import annotations

from jaxtyping import Float
from torch import Tensor


def cosine_similarity_matrix(
    vectors: Float[Tensor, "n d"], eps: float = 1e-8
) -> Float[Tensor, "n n"]:
    """Reference for exercise 0.1: pairwise cosine similarities of the rows; zero rows give 0."""
    if vectors.ndim != 2:
        raise ValueError(f"expected a 2-D tensor [n, d], got shape {tuple(vectors.shape)}")
    unit = vectors / vectors.norm(dim=-1, keepdim=True).clamp_min(eps)
    return unit @ unit.T
