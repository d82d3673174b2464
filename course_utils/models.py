"""Models the course runs on. Chapter 00 uses a tiny randomly initialised transformer (no download)."""

from __future__ import annotations

import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig


def tiny_random_model(seed: int = 0, n_layers: int = 2, d_vocab: int = 50) -> HookedTransformer:
    """A 2-layer attention+MLP transformer with random weights: instant, offline, deterministic."""
    cfg = HookedTransformerConfig(
        n_layers=n_layers,
        d_model=32,
        n_heads=4,
        d_head=8,
        d_mlp=64,
        d_vocab=d_vocab,
        n_ctx=16,
        act_fn="gelu",
        normalization_type="LN",
        seed=seed,
        device="cpu",
    )
    model = HookedTransformer(cfg)
    model.eval()
    return model


def random_tokens(
    model: HookedTransformer, batch: int = 4, seq: int = 12, seed: int = 0
) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.cfg.d_vocab, (batch, seq), generator=generator)
