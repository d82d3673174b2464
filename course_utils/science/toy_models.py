"""Toy models of superposition (Elhage et al. 2022): data, models, loss, training, geometry.

Reference implementations for chapter 01; chapter 02 reuses them (the hidden activations of a
trained toy model are the data of its first SAE).

Shape convention (one for the whole course):
- a batch of inputs is ``[batch, inst, feats]``: ``inst`` independent models ("instances") are
  trained side by side in one run, so a sweep over sparsity or importance is a single call;
- ``W`` is ``[inst, d_hidden, feats]``: ``W[k]`` is the paper's m x n matrix for instance ``k``
  and its column ``W[k, :, i]`` is feature ``i``'s direction in the hidden space;
- ``h = W x`` is ``[batch, inst, d_hidden]``; ``x' = ReLU(W^T h + b)`` is ``[batch, inst, feats]``.

Sparsity ``S`` is the probability that a feature is zero; the code takes the *feature
probability* (density) ``1 - S``, which must lie in ``(0, 1]``.
"""

from __future__ import annotations

import math
from typing import Literal

import einops
import torch
from jaxtyping import Float
from torch import Tensor, nn

#: One value per instance / per feature (named aliases keep single-axis shapes lint-clean).
PerInstance = Float[Tensor, "inst"]  # noqa: F821
PerFeature = Float[Tensor, "feats"]  # noqa: F821

BatchKind = Literal["independent", "correlated", "anticorrelated"]

# ----------------------------------------------------------------------------- argument checks


def _check_count(name: str, value: object, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}.")
    return value


def feature_probability_tensor(
    feature_probability: float | Tensor, n_instances: int, what: str = "feature_probability"
) -> PerInstance:
    """``feature_probability`` (a float, or one value per instance) as a float tensor ``[inst]``.

    Raises a clear ValueError for a density outside (0, 1] (i.e. a sparsity outside [0, 1)) or a
    tensor whose length is not ``n_instances``.
    """
    p = torch.as_tensor(feature_probability, dtype=torch.float32)
    if p.ndim == 0:
        p = p.expand(n_instances)
    if p.ndim != 1 or p.shape[0] != n_instances:
        raise ValueError(
            f"{what} must be a float or a tensor of shape [n_instances] = [{n_instances}], "
            f"got shape {tuple(p.shape)}."
        )
    if torch.isnan(p).any() or (p <= 0).any() or (p > 1).any():
        bad = p[torch.isnan(p) | (p <= 0) | (p > 1)][0].item()
        raise ValueError(
            f"{what} (the density 1 - S) must lie in (0, 1], i.e. sparsity S in [0, 1); "
            f"got {bad:g}. "
            "Did you pass the sparsity S instead of the feature probability 1 - S?"
        )
    return p.contiguous()


def importance_tensor(
    importance: float | Tensor, n_instances: int, n_features: int
) -> Float[Tensor, "inst feats"]:
    """Importances (a float, ``[feats]`` or ``[inst, feats]``) broadcast to ``[inst, feats]``."""
    imp = torch.as_tensor(importance, dtype=torch.float32)
    if imp.ndim == 0:
        imp = imp.expand(n_features)
    if imp.ndim == 1:
        imp = imp.expand(n_instances, -1)
    if imp.shape != (n_instances, n_features):
        raise ValueError(
            "importance must be a float, a tensor [n_features] or [n_instances, n_features] = "
            f"[{n_instances}, {n_features}], got shape {tuple(torch.as_tensor(importance).shape)}."
        )
    if (imp < 0).any() or torch.isnan(imp).any():
        raise ValueError("importance must be non-negative (and not NaN).")
    return imp.contiguous()


def geometric_importance(n_features: int, decay: float) -> PerFeature:
    """I_i = decay ** i: feature 0 matters most. ``decay = 1`` gives equal importance."""
    _check_count("n_features", n_features)
    if not 0 < decay <= 1:
        raise ValueError(f"decay must lie in (0, 1], got {decay!r}.")
    return decay ** torch.arange(n_features, dtype=torch.float32)


def density_sweep(n_instances: int, min_density: float = 0.05) -> PerInstance:
    """Feature probabilities from 1 down to ``min_density``, evenly spaced in log (the paper's
    ``20 ** -linspace(0, 1, n)`` for ``min_density = 0.05``)."""
    _check_count("n_instances", n_instances)
    if not 0 < min_density <= 1:
        raise ValueError(f"min_density must lie in (0, 1], got {min_density!r}.")
    return min_density ** torch.linspace(0, 1, n_instances)


# ----------------------------------------------------------------------------- data


def generate_batch(
    n_batch: int,
    feature_probability: float | PerInstance,
    n_instances: int,
    n_features: int,
    *,
    generator: torch.Generator | None = None,
) -> Float[Tensor, "batch inst feats"]:
    """Reference for exercise 1.1: each feature is 0 with probability S = 1 - feature_probability
    (independently for every batch row, instance and feature), else uniform on [0, 1]."""
    _check_count("n_batch", n_batch)
    _check_count("n_instances", n_instances)
    _check_count("n_features", n_features)
    p = feature_probability_tensor(feature_probability, n_instances)
    shape = (n_batch, n_instances, n_features)
    values = torch.rand(shape, generator=generator)
    active = torch.rand(shape, generator=generator) < p[:, None]
    return torch.where(active, values, torch.zeros(()))


def generate_correlated_batch(
    n_batch: int,
    feature_probability: float | PerInstance,
    n_instances: int,
    n_pairs: int,
    *,
    generator: torch.Generator | None = None,
) -> Float[Tensor, "batch inst feats"]:
    """Reference for exercise 1.6: ``2 * n_pairs`` features; features ``2k`` and ``2k + 1`` are
    a correlated pair: they are zero or non-zero *together* (one draw with probability
    ``feature_probability``), with independent U[0, 1] values."""
    _check_count("n_batch", n_batch)
    _check_count("n_instances", n_instances)
    _check_count("n_pairs", n_pairs)
    p = feature_probability_tensor(feature_probability, n_instances)
    values = torch.rand((n_batch, n_instances, 2 * n_pairs), generator=generator)
    pair_active = torch.rand((n_batch, n_instances, n_pairs), generator=generator) < p[:, None]
    active = einops.repeat(pair_active, "b i p -> b i (p two)", two=2)
    return torch.where(active, values, torch.zeros(()))


def generate_anticorrelated_batch(
    n_batch: int,
    feature_probability: float | PerInstance,
    n_instances: int,
    n_pairs: int,
    *,
    generator: torch.Generator | None = None,
) -> Float[Tensor, "batch inst feats"]:
    """Reference for exercise 1.7: features ``2k`` and ``2k + 1`` are never active together. Each
    pair is active with probability ``2 * feature_probability`` and then exactly one member (a
    fair coin) takes a U[0, 1] value, so every feature is still active with probability
    ``feature_probability`` (which must therefore be at most 1/2)."""
    _check_count("n_batch", n_batch)
    _check_count("n_instances", n_instances)
    _check_count("n_pairs", n_pairs)
    p = feature_probability_tensor(feature_probability, n_instances)
    if (p > 0.5).any():
        raise ValueError(
            "anticorrelated pairs need feature_probability <= 0.5 (two features that are never "
            f"active together cannot each be active more than half the time); "
            f"got {p.max().item():g}."
        )
    shape = (n_batch, n_instances, n_pairs)
    values = torch.rand((n_batch, n_instances, 2 * n_pairs), generator=generator)
    pair_active = torch.rand(shape, generator=generator) < 2 * p[:, None]
    first = torch.rand(shape, generator=generator) < 0.5
    active = torch.stack([pair_active & first, pair_active & ~first], dim=-1)
    active = einops.rearrange(active, "b i p two -> b i (p two)")
    return torch.where(active, values, torch.zeros(()))


def generate_signed_batch(
    n_batch: int,
    feature_probability: float | PerInstance,
    n_instances: int,
    n_features: int,
    *,
    generator: torch.Generator | None = None,
) -> Float[Tensor, "batch inst feats"]:
    """Data of the absolute-value model: 0 with probability S, else uniform on [-1, 1]."""
    x = generate_batch(n_batch, feature_probability, n_instances, n_features, generator=generator)
    sign = torch.rand(x.shape, generator=generator) < 0.5
    return torch.where(sign, -x, x)


def _check_input(x: Tensor, n_instances: int, n_features: int, who: str) -> None:
    if not isinstance(x, Tensor) or x.ndim != 3 or tuple(x.shape[1:]) != (n_instances, n_features):
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(
            f"{who} expects x of shape [batch, n_instances, n_features] = "
            f"[batch, {n_instances}, {n_features}], got {shape}."
        )


# ----------------------------------------------------------------------------- models


class _InstancedModel(nn.Module):
    """What every toy model shares: sizes, a per-instance output bias ``b_final`` (zeros) and the
    sweep buffers ``feature_probability`` ``[inst]`` and ``importance`` ``[inst, feats]``."""

    b_final: Tensor
    feature_probability: Tensor
    importance: Tensor

    def __init__(
        self,
        n_instances: int,
        n_features: int,
        d_hidden: int,
        feature_probability: float | Tensor,
        importance: float | Tensor,
    ):
        super().__init__()
        self.n_instances = _check_count("n_instances", n_instances)
        self.n_features = _check_count("n_features", n_features)
        self.d_hidden = _check_count("d_hidden", d_hidden)
        # b_final is zeros (no random draw), so the weights' random stream is as before.
        self.b_final = nn.Parameter(torch.zeros(n_instances, n_features))
        self.register_buffer(
            "feature_probability", feature_probability_tensor(feature_probability, n_instances)
        )
        self.register_buffer("importance", importance_tensor(importance, n_instances, n_features))


class ToyModel(_InstancedModel):
    """Reference for exercise 1.2: ``h = W x``, ``x' = ReLU(W^T h + b)``, ``n_instances`` at once.

    ``W``: ``[inst, d_hidden, feats]`` (Xavier-normal per instance); ``b_final``: ``[inst, feats]``
    (zeros). ``feature_probability`` (``[inst]``) and ``importance`` (``[inst, feats]``) are
    buffers, so one model object carries a whole sweep.
    """

    W: Tensor

    def __init__(
        self,
        n_instances: int,
        n_features: int,
        d_hidden: int,
        feature_probability: float | Tensor = 1.0,
        importance: float | Tensor = 1.0,
        batch_kind: BatchKind = "independent",
    ):
        super().__init__(n_instances, n_features, d_hidden, feature_probability, importance)
        if batch_kind not in ("independent", "correlated", "anticorrelated"):
            raise ValueError(
                f"batch_kind must be independent, correlated or anticorrelated, got {batch_kind!r}."
            )
        if batch_kind != "independent" and n_features % 2:
            raise ValueError(
                f"{batch_kind} features come in pairs: n_features must be even, got {n_features}."
            )
        self.batch_kind = batch_kind
        self.W = nn.Parameter(
            nn.init.xavier_normal_(torch.empty(n_instances, d_hidden, n_features))
        )

    def forward(self, x: Float[Tensor, "batch inst feats"]) -> Float[Tensor, "batch inst feats"]:
        _check_input(x, self.n_instances, self.n_features, type(self).__name__)
        h = einops.einsum(self.W, x, "inst hid feats, batch inst feats -> batch inst hid")
        out = einops.einsum(self.W, h, "inst hid feats, batch inst hid -> batch inst feats")
        return torch.relu(out + self.b_final)

    def generate_batch(self, n_batch: int) -> Float[Tensor, "batch inst feats"]:
        if self.batch_kind == "correlated":
            fn = generate_correlated_batch
        elif self.batch_kind == "anticorrelated":
            fn = generate_anticorrelated_batch
        else:
            return generate_batch(
                n_batch, self.feature_probability, self.n_instances, self.n_features
            )
        return fn(n_batch, self.feature_probability, self.n_instances, self.n_features // 2)

    def target(self, x: Float[Tensor, "batch inst feats"]) -> Float[Tensor, "batch inst feats"]:
        """What the model should output for input x: x itself (an autoencoder)."""
        return x

    @torch.no_grad()
    def hidden(self, x: Float[Tensor, "batch inst feats"]) -> Float[Tensor, "batch inst hid"]:
        """The hidden activations h (chapter 02 trains SAEs on these)."""
        _check_input(x, self.n_instances, self.n_features, type(self).__name__)
        return einops.einsum(self.W, x, "inst hid feats, batch inst feats -> batch inst hid")


class LinearToyModel(ToyModel):
    """The linear baseline ``x' = W^T W x + b`` (no ReLU): it can only keep the top-m features."""

    def forward(self, x: Float[Tensor, "batch inst feats"]) -> Float[Tensor, "batch inst feats"]:
        _check_input(x, self.n_instances, self.n_features, type(self).__name__)
        h = einops.einsum(self.W, x, "inst hid feats, batch inst feats -> batch inst hid")
        return (
            einops.einsum(self.W, h, "inst hid feats, batch inst hid -> batch inst feats")
            + self.b_final
        )


class NeuronModel(ToyModel):
    """Reference for exercise 1.8 (a privileged basis): h = ReLU(W x), x' = ReLU(W^T h + b)."""

    def forward(self, x: Float[Tensor, "batch inst feats"]) -> Float[Tensor, "batch inst feats"]:
        _check_input(x, self.n_instances, self.n_features, type(self).__name__)
        h = torch.relu(
            einops.einsum(self.W, x, "inst hid feats, batch inst feats -> batch inst hid")
        )
        out = einops.einsum(self.W, h, "inst hid feats, batch inst hid -> batch inst feats")
        return torch.relu(out + self.b_final)

    @torch.no_grad()
    def hidden(self, x: Float[Tensor, "batch inst feats"]) -> Float[Tensor, "batch inst hid"]:
        return torch.relu(super().hidden(x))


class AbsValueModel(_InstancedModel):
    """Reference for exercise 1.9, computation in superposition: learn ``y = |x|`` through
    ``h = ReLU(W1 x)``, ``y' = ReLU(W2 h + b)`` with untied ``W1 [inst, hid, feats]`` and
    ``W2 [inst, feats, hid]``; x is 0 with probability S, else uniform on [-1, 1]."""

    W1: Tensor
    W2: Tensor

    def __init__(
        self,
        n_instances: int,
        n_features: int,
        d_hidden: int,
        feature_probability: float | Tensor = 1.0,
        importance: float | Tensor = 1.0,
    ):
        super().__init__(n_instances, n_features, d_hidden, feature_probability, importance)
        self.W1 = nn.Parameter(
            nn.init.xavier_normal_(torch.empty(n_instances, d_hidden, n_features))
        )
        self.W2 = nn.Parameter(
            nn.init.xavier_normal_(torch.empty(n_instances, n_features, d_hidden))
        )

    def forward(self, x: Float[Tensor, "batch inst feats"]) -> Float[Tensor, "batch inst feats"]:
        _check_input(x, self.n_instances, self.n_features, type(self).__name__)
        h = torch.relu(
            einops.einsum(self.W1, x, "inst hid feats, batch inst feats -> batch inst hid")
        )
        out = einops.einsum(self.W2, h, "inst feats hid, batch inst hid -> batch inst feats")
        return torch.relu(out + self.b_final)

    def generate_batch(self, n_batch: int) -> Float[Tensor, "batch inst feats"]:
        return generate_signed_batch(
            n_batch, self.feature_probability, self.n_instances, self.n_features
        )

    def target(self, x: Float[Tensor, "batch inst feats"]) -> Float[Tensor, "batch inst feats"]:
        return x.abs()


# ----------------------------------------------------------------------------- loss and training


def importance_weighted_mse(
    x_hat: Float[Tensor, "batch inst feats"],
    x: Float[Tensor, "batch inst feats"],
    importance: Float[Tensor, "inst feats"],
) -> PerInstance:
    """Reference for exercise 1.3: per instance, the batch mean of ``sum_i I_i (x_i - x'_i)^2``."""
    if x_hat.shape != x.shape or x.ndim != 3:
        raise ValueError(
            f"x_hat and x must both be [batch, inst, feats]; got {tuple(x_hat.shape)} and "
            f"{tuple(x.shape)}."
        )
    if importance.shape != x.shape[1:]:
        raise ValueError(
            f"importance must be [inst, feats] = {list(x.shape[1:])}, "
            f"got {tuple(importance.shape)}."
        )
    return ((x - x_hat) ** 2 * importance).sum(-1).mean(0)


def warmup_cosine_lr(step: int, n_steps: int, lr: float, warmup_steps: int) -> float:
    """Learning rate at ``step`` (0-based): linear warm-up from lr/warmup_steps to lr over
    ``warmup_steps`` steps, then cosine decay to 0 at the end of training."""
    if not 0 <= step < n_steps:
        raise ValueError(f"step must lie in [0, n_steps) = [0, {n_steps}), got {step}.")
    if not 0 <= warmup_steps < n_steps:
        raise ValueError(
            f"warmup_steps must lie in [0, n_steps), got {warmup_steps} for n_steps={n_steps}."
        )
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, n_steps - warmup_steps)
    return lr * 0.5 * (1 + math.cos(math.pi * progress))


def train_toy_model(
    model: nn.Module,
    n_steps: int = 5_000,
    batch_size: int = 1024,
    lr: float = 1e-3,
    warmup_frac: float = 0.05,
    progress: bool = True,
) -> dict[str, Tensor]:
    """Reference for exercise 1.4: train every instance of ``model`` in one loop.

    Each step: set the learning rate from :func:`warmup_cosine_lr`, draw a fresh batch with
    ``model.generate_batch(batch_size)``, compute ``importance_weighted_mse(model(x),
    model.target(x), model.importance)`` (one loss per instance), and step AdamW on their *sum*
    (instances share no parameters, so the sum trains each one on its own loss).
    Returns ``{"loss": [n_steps, inst], "lr": [n_steps]}``.
    """
    from tqdm.auto import tqdm

    _check_count("n_steps", n_steps)
    _check_count("batch_size", batch_size)
    if not 0 <= warmup_frac < 1:
        raise ValueError(f"warmup_frac must lie in [0, 1), got {warmup_frac!r}.")
    warmup_steps = int(warmup_frac * n_steps)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    losses, lrs = [], []
    for step in tqdm(range(n_steps), disable=not progress, desc="training", mininterval=1.0):
        step_lr = warmup_cosine_lr(step, n_steps, lr, warmup_steps)
        for group in optimizer.param_groups:
            group["lr"] = step_lr
        x = model.generate_batch(batch_size)
        loss = importance_weighted_mse(model(x), model.target(x), model.importance)
        optimizer.zero_grad()
        loss.sum().backward()
        optimizer.step()
        losses.append(loss.detach())
        lrs.append(step_lr)
    return {"loss": torch.stack(losses), "lr": torch.tensor(lrs)}


@torch.no_grad()
def evaluate(model: nn.Module, n_batch: int = 10_000, seed: int = 0) -> PerInstance:
    """Per-instance loss on a fresh batch drawn under its own seed (global RNG left untouched)."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        x = model.generate_batch(n_batch)
    return importance_weighted_mse(model(x), model.target(x), model.importance)


# ----------------------------------------------------------------------------- geometry


def _check_W(W: Tensor, who: str) -> None:
    if not isinstance(W, Tensor) or W.ndim != 3:
        shape = tuple(W.shape) if isinstance(W, Tensor) else type(W).__name__
        raise ValueError(f"{who} expects W of shape [inst, d_hidden, feats], got {shape}.")


def feature_dimensionality(
    W: Float[Tensor, "inst hid feats"], eps: float = 1e-8
) -> Float[Tensor, "inst feats"]:
    """Reference for exercise 1.5: ``D_i = ||W_i||^2 / sum_j (W_hat_i . W_j)^2`` per instance.

    A feature with its own dimension has D = 1, an antipodal pair 1/2 each, an unlearned feature
    (||W_i|| = 0) gets 0 (instead of 0/0).
    """
    _check_W(W, "feature_dimensionality")
    norms = W.norm(dim=1)  # [inst, feats]
    W_hat = W / norms[:, None, :].clamp_min(eps)
    overlaps = einops.einsum(W_hat, W, "inst hid fi, inst hid fj -> inst fi fj")
    return norms**2 / (overlaps**2).sum(-1).clamp_min(eps)


def dimensions_per_feature(W: Float[Tensor, "inst hid feats"]) -> PerInstance:
    """The paper's D* = m / ||W||_F^2: hidden dimensions spent per (norm-weighted) feature."""
    _check_W(W, "dimensions_per_feature")
    return W.shape[1] / W.pow(2).sum((1, 2))


def superposition_interference(
    W: Float[Tensor, "inst hid feats"], eps: float = 1e-8
) -> Float[Tensor, "inst feats"]:
    """``sum_{j != i} (W_hat_i . W_j)^2``: how much of feature i's direction others share."""
    _check_W(W, "superposition_interference")
    W_hat = W / W.norm(dim=1, keepdim=True).clamp_min(eps)
    overlaps = einops.einsum(W_hat, W, "inst hid fi, inst hid fj -> inst fi fj")
    return (overlaps**2).sum(-1) - torch.diagonal(overlaps, dim1=-2, dim2=-1) ** 2


def best_instances(loss: PerInstance, groups: int) -> Tensor:
    """Indices of the lowest-loss instance in each of ``groups`` equal consecutive blocks (the
    instances of one setting trained from different seeds)."""
    if loss.ndim != 1 or loss.shape[0] % groups:
        raise ValueError(
            f"loss must be [inst] with inst divisible by groups={groups}, got {tuple(loss.shape)}."
        )
    per = loss.shape[0] // groups
    return loss.view(groups, per).argmin(-1) + torch.arange(groups) * per


__all__ = [
    "AbsValueModel",
    "LinearToyModel",
    "NeuronModel",
    "ToyModel",
    "best_instances",
    "density_sweep",
    "dimensions_per_feature",
    "evaluate",
    "feature_dimensionality",
    "feature_probability_tensor",
    "generate_anticorrelated_batch",
    "generate_batch",
    "generate_correlated_batch",
    "generate_signed_batch",
    "geometric_importance",
    "importance_tensor",
    "importance_weighted_mse",
    "superposition_interference",
    "train_toy_model",
    "warmup_cosine_lr",
]
