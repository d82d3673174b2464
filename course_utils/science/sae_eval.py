"""Evaluating and comparing SAEs (chapter 10).

- Ground truth: :class:`HierarchicalFeatureData`, synthetic activations whose true features are
  known, with correlated roots and parent/child trees (a child fires only when its parent does);
  SynthSAEBench-style metrics: :func:`match_latents` (Hungarian matching of decoder rows to true
  features), :func:`mcc`, :func:`latent_f1` (each latent's best feature by |cos|; precision,
  recall and F1 of "latent fires" against "feature active").
- Architectures beside chapter 02's (``saes.ReLUSAE``, ``TopKSAE``, ``JumpReLUSAE``):
  :func:`batchtopk` and :class:`BatchTopKSAE` (Bussmann et al. 2024; inference threshold from an
  EMA of the batch's minimum positive activation, :func:`update_threshold`, as SAELens does) and
  :class:`MatryoshkaSAE` (Bussmann, Nabeshima et al. 2025; :func:`matryoshka_loss`).
- :func:`train_dictionary`: one loop for every architecture on a fixed list of batches (so two
  implementations see the same data in the same order); :func:`train_saelens` trains SAELens's
  implementation of the same architecture on the same batches.
- Sparse probing (Gurnee et al. 2023; SAEBench; Kantamneni et al. 2025):
  :func:`top_k_by_mean_difference`, :func:`sparse_probe_accuracy`.
- Absorption on the synthetic trees: :func:`absorption_rate`.

Shapes: chapter 02's convention, ``acts [batch, inst, d_sae]``, ``W_dec [inst, d_sae, d_in]``;
the metric functions take one dictionary, ``W_dec [d_sae, d_in]``, ``latent_acts [n, d_sae]``.
"""

from __future__ import annotations

import contextlib
import functools
import io
import math
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from unittest import mock

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from course_utils.science import saes as S
from course_utils.science.lm_saes import clip_grad_norm_per_instance, lr_schedule
from course_utils.science.sparse_data import random_correlation, random_dictionary

# ----------------------------------------------------------------------------- ground truth


@dataclass
class HierarchicalFeatureData:
    """Sparse features with known directions, correlated roots and parent/child trees.

    Features ``0 .. n_parents - 1`` are parents; each has ``children_per_parent`` children (the
    next ``n_parents * children_per_parent`` features, in order); the rest are independent roots.
    Roots (parents and independent features) fire with decaying probabilities, correlated through
    a Gaussian copula of rank 4. A child fires only when its parent fires, and then with
    probability ``child_probability``; siblings are mutually exclusive (at most one per parent).
    A firing feature's magnitude is ``|1 + magnitude_std * N(0, 1)|``. ``x = acts @ directions``.
    """

    n_features: int = 64
    d: int = 32
    n_parents: int = 8
    children_per_parent: int = 2
    mean_active_roots: float = 3.0
    child_probability: float = 0.35
    correlation_strength: float = 0.5
    magnitude_std: float = 0.15
    seed: int = 0

    def __post_init__(self) -> None:
        n_tree = self.n_parents * (1 + self.children_per_parent)
        if n_tree > self.n_features:
            raise ValueError(
                f"{self.n_parents} parents with {self.children_per_parent} children need "
                f"{n_tree} features, more than n_features={self.n_features}."
            )
        if self.children_per_parent * self.child_probability > 1:
            raise ValueError("siblings are exclusive: children_per_parent * child_probability > 1.")
        self.directions = random_dictionary(self.n_features, self.d, seed=self.seed)
        self.roots = torch.tensor(
            list(range(self.n_parents)) + list(range(n_tree, self.n_features)), dtype=torch.long
        )
        p = 0.98 ** torch.arange(len(self.roots), dtype=torch.float32)
        self.root_probability = p * self.mean_active_roots / p.sum()
        corr = random_correlation(len(self.roots), 4, self.correlation_strength, seed=self.seed + 1)
        self._chol = torch.linalg.cholesky(corr)
        self.generator = torch.Generator().manual_seed(self.seed + 2)

    @property
    def parent_child_pairs(self) -> list[tuple[int, int]]:
        """(parent, child) feature indices."""
        c = self.children_per_parent
        return [(p, self.n_parents + p * c + j) for p in range(self.n_parents) for j in range(c)]

    def sample(self, batch: int) -> tuple[Float[Tensor, "batch d"], Float[Tensor, "batch feat"]]:
        """(x, feature_acts): activations and the true feature magnitudes behind them."""
        g = self.generator
        z = torch.randn(batch, len(self.roots), generator=g) @ self._chol.T
        u = 0.5 * (1 + torch.erf(z / math.sqrt(2)))
        active = torch.zeros(batch, self.n_features, dtype=torch.bool)
        active[:, self.roots] = u < self.root_probability
        c = self.children_per_parent
        pick = torch.rand(batch, self.n_parents, generator=g)
        for p in range(self.n_parents):
            for j in range(c):
                lo, hi = j * self.child_probability, (j + 1) * self.child_probability
                chosen = (pick[:, p] >= lo) & (pick[:, p] < hi)
                active[:, self.n_parents + p * c + j] = active[:, p] & chosen
        magnitude = 1 + self.magnitude_std * torch.randn(batch, self.n_features, generator=g)
        feature_acts = magnitude.abs() * active
        return feature_acts @ self.directions, feature_acts


def _unit(t: Tensor) -> Tensor:
    return t / t.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def _same_width(W_dec: Tensor, features: Tensor) -> None:
    if W_dec.ndim != 2 or features.ndim != 2 or W_dec.shape[-1] != features.shape[-1]:
        raise ValueError(
            f"decoder {tuple(W_dec.shape)} and true features {tuple(features.shape)} must be "
            "[d_sae, d] and [n_features, d] with the same d (one dictionary, not an instance "
            "batch: index the instance first)."
        )


def abs_cosines(
    W_dec: Float[Tensor, "d_sae d"], features: Float[Tensor, "feat d"]
) -> Float[Tensor, "d_sae feat"]:
    """|cos| between every decoder row and every true feature direction."""
    _same_width(W_dec, features)
    return (_unit(W_dec) @ _unit(features).T).abs()


def match_latents(
    W_dec: Float[Tensor, "d_sae d"], features: Float[Tensor, "feat d"]
) -> tuple[Int[Tensor, " m"], Int[Tensor, " m"], Float[Tensor, " m"]]:
    """Reference for exercise 1.1: one-to-one matching of latents to true features.

    The Hungarian algorithm (scipy ``linear_sum_assignment``) on the cost ``1 - |cos|`` pairs
    ``m = min(d_sae, n_features)`` latents with distinct features so that the total |cos| is as
    large as possible. Returns (latent index, feature index, |cos|), sorted by feature index.
    """
    from scipy.optimize import linear_sum_assignment

    cos = abs_cosines(W_dec, features)
    rows, cols = linear_sum_assignment((1 - cos).double().numpy())
    order = torch.as_tensor(cols).argsort()
    latents, feats = torch.as_tensor(rows)[order], torch.as_tensor(cols)[order]
    return latents.long(), feats.long(), cos[latents, feats]


def mcc(W_dec: Float[Tensor, "d_sae d"], features: Float[Tensor, "feat d"]) -> float:
    """Mean |cos| over the Hungarian-matched pairs (SynthSAEBench's "MCC")."""
    return match_latents(W_dec, features)[2].mean().item()


def latent_f1(
    latent_acts: Float[Tensor, "n d_sae"],
    feature_acts: Float[Tensor, "n feat"],
    W_dec: Float[Tensor, "d_sae d"],
    features: Float[Tensor, "feat d"],
) -> tuple[Float[Tensor, " d_sae"], Float[Tensor, " d_sae"], Float[Tensor, " d_sae"]]:
    """Reference for exercise 1.2: per-latent precision, recall and F1 against its best feature.

    Each latent's feature is its argmax |cos| (many latents may share one). A latent "fires" when
    its activation is > 0, a feature is "active" when its magnitude is > 0. Undefined ratios (a
    latent that never fires, a feature never active) count as 0, so dead latents score 0.
    """
    _same_width(W_dec, features)
    if latent_acts.shape[0] != feature_acts.shape[0]:
        raise ValueError(
            f"latent_acts has {latent_acts.shape[0]} rows but feature_acts has "
            f"{feature_acts.shape[0]}: both must come from the same samples."
        )
    best = abs_cosines(W_dec, features).argmax(-1)
    return f1_from_firing((latent_acts > 0).float(), (feature_acts[:, best] > 0).float())


def f1_from_firing(fires: Tensor, truth: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per-column precision, recall and F1 of 0/1 ``fires`` against 0/1 ``truth`` ([batch, n]);
    0 where a column never fires (precision), is never true (recall) or both are 0 (F1)."""
    tp = (fires * truth).sum(0)
    precision = torch.where(fires.sum(0) > 0, tp / fires.sum(0).clamp_min(1), 0.0)
    recall = torch.where(truth.sum(0) > 0, tp / truth.sum(0).clamp_min(1), 0.0)
    denom = precision + recall
    f1 = torch.where(denom > 0, 2 * precision * recall / denom.clamp_min(1e-12), 0.0)
    return precision, recall, f1


# ----------------------------------------------------------------------------- architectures


def _check_k(k: Tensor | float | int, d_sae: int) -> Tensor:
    ks = torch.as_tensor(k, dtype=torch.float64).flatten()  # SAELens: int(k * batch), Python floats
    if (ks <= 0).any() or (ks > d_sae).any():
        raise ValueError(f"k must be in (0, d_sae={d_sae}], got {ks.tolist()}.")
    return ks


def batchtopk(
    pre: Float[Tensor, "batch inst d_sae"], k: Float[Tensor, " inst"] | float
) -> Float[Tensor, "batch inst d_sae"]:
    """Reference for exercise 2.1: BatchTopK. Per instance, ReLU the pre-activations, then keep
    the ``int(k * batch)`` largest over the whole batch (a token may keep more or fewer than k),
    with k in float64 as SAELens's Python float (k = 0.7 on 10 tokens keeps 7)."""
    batch, inst, d_sae = pre.shape
    ks = _check_k(k, d_sae).expand(inst)
    acts = torch.relu(pre)
    out = torch.zeros_like(acts)
    for i in range(inst):
        flat = acts[:, i].flatten()
        values, indices = flat.topk(int(ks[i].item() * batch))
        out[:, i] = torch.zeros_like(flat).scatter(0, indices, values).view(batch, d_sae)
    return out


def update_threshold(
    threshold: Float[Tensor, " inst"], acts: Float[Tensor, "batch inst d_sae"], lr: float = 0.01
) -> Float[Tensor, " inst"]:
    """Reference for exercise 2.2: one EMA step of BatchTopK's inference threshold (SAELens).

    Per instance, with ``m`` the smallest *positive* activation in the batch:
    ``threshold <- (1 - lr) * threshold + lr * m``; an instance with no positive activation
    keeps its threshold. Returns a new tensor.
    """
    positive = acts > 0
    big = torch.finfo(acts.dtype).max
    m = acts.masked_fill(~positive, big).amin(dim=(0, 2)).to(threshold.dtype)
    any_positive = positive.any(0).any(-1)
    return torch.where(any_positive, (1 - lr) * threshold + lr * m, threshold)


def check_prefixes(prefixes: Sequence[int], d_sae: int) -> list[int]:
    """Matryoshka prefix widths: positive, strictly increasing, ending at ``d_sae``."""
    widths = [int(m) for m in prefixes]
    if not widths or widths[0] < 1 or any(b <= a for a, b in zip(widths, widths[1:], strict=False)):
        raise ValueError(
            f"Matryoshka prefixes must be positive and strictly increasing, got {widths}."
        )
    if widths[-1] != d_sae:
        raise ValueError(
            f"the last Matryoshka prefix must be the full width d_sae={d_sae}, got {widths}: "
            f"append {d_sae} (SAELens appends it with a warning)."
        )
    return widths


def matryoshka_loss(
    x: Float[Tensor, "batch inst d_in"],
    acts: Float[Tensor, "batch inst d_sae"],
    W_dec: Float[Tensor, "inst d_sae d_in"],
    b_dec: Float[Tensor, "inst d_in"],
    prefixes: Sequence[int],
) -> Float[Tensor, " inst"]:
    """Reference for exercise 2.3: the sum over prefixes m of the squared error of the
    reconstruction from the first m latents only, ``b_dec + acts[:, :, :m] @ W_dec[:, :m]``
    (summed over d_in, averaged over the batch), per instance."""
    widths = check_prefixes(prefixes, W_dec.shape[1])
    total = torch.zeros(x.shape[1], dtype=x.dtype, device=x.device)
    for m in widths:
        x_hat = torch.einsum("bis,isd->bid", acts[..., :m], W_dec[:, :m]) + b_dec
        total = total + (x_hat - x).pow(2).sum(-1).mean(0)
    return total


class BatchTopKSAE(S.TopKSAE):
    """BatchTopK SAE. Training: :func:`batchtopk` (mean L0 over the batch = k); each training
    loss call moves the threshold by :func:`update_threshold`. Inference (``.eval()``): a JumpReLU
    with that one threshold for every latent, so each token's L0 no longer depends on its batch.
    ``k`` may be fractional. AuxK as in :class:`~course_utils.science.saes.TopKSAE`."""

    def __init__(
        self,
        d_in,
        d_sae,
        n_instances=1,
        k=4,
        aux_k=0,
        aux_coeff=1 / 32,
        dead_window=200,
        seed=0,
        threshold_lr=0.01,
    ):
        ks = _check_k(k, d_sae)
        super().__init__(d_in, d_sae, n_instances, 1, aux_k, aux_coeff, dead_window, seed)
        self.k = ks.expand(n_instances).clone()
        self.threshold_lr = threshold_lr
        self.register_buffer("threshold", torch.zeros(n_instances, dtype=torch.float64))

    def activation(self, pre):
        if self.training:
            return batchtopk(pre, self.k)
        theta = self.threshold.to(pre.dtype)[:, None]
        return pre * (pre > theta)

    def loss(self, x):
        out = super().loss(x)
        if self.training:
            with torch.no_grad():
                self.threshold = update_threshold(
                    self.threshold, out["acts"].detach(), self.threshold_lr
                )
        return out


class MatryoshkaSAE(BatchTopKSAE):
    """Matryoshka BatchTopK SAE: the reconstruction loss is :func:`matryoshka_loss` over nested
    prefixes (the last is the full width), so the first latents must reconstruct on their own."""

    def __init__(self, d_in, d_sae, prefixes, n_instances=1, k=4, aux_k=0, aux_coeff=1 / 32,
                 dead_window=200, seed=0, threshold_lr=0.01):  # fmt: skip
        self.prefixes = check_prefixes(prefixes, d_sae)
        super().__init__(
            d_in, d_sae, n_instances, k, aux_k, aux_coeff, dead_window, seed, threshold_lr
        )

    def loss(self, x):
        out = super().loss(x)  # the full-width reconstruction, sparsity and AuxK terms
        nested = matryoshka_loss(self._as_batch(x), out["acts"], self.W_dec, self.b_dec,
                                 self.prefixes)  # fmt: skip
        out["loss"] = out["loss"] - out["reconstruction"] + nested
        return out


# ----------------------------------------------------------------------------- training


def _sparsity_coefficient(sae: S.SAE) -> Tensor | None:
    for name in ("l1_coeff", "l0_coeff"):
        if hasattr(sae, name):
            return getattr(sae, name)
    return None


def train_dictionary(
    sae: S.SAE,
    batches: Sequence[Tensor],
    lr: float = 3e-3,
    max_grad_norm: float | None = 1.0,
    sparsity_warmup_frac: float = 0.05,
    lr_decay_frac: float = 0.2,
    dead_window: int = 200,
    progress: bool = False,
    desc: str = "SAE",
) -> dict[str, Tensor]:
    """Train every instance of ``sae`` on ``batches`` in order (one Adam step each).

    For every architecture: unit-norm decoder rows (gradient projection, then renormalising),
    per-instance gradient clipping at ``max_grad_norm`` (SAELens's trainer clips at 1), lr
    constant then linearly to 0 over the last ``lr_decay_frac``, an L1/L0 coefficient (if the SAE
    has one) warmed up linearly over the first ``sparsity_warmup_frac``. Returns the final
    training L0 and the dead-latent count (latents silent for ``dead_window`` steps).
    """
    from tqdm.auto import tqdm

    coeff = _sparsity_coefficient(sae)
    final = coeff.clone() if coeff is not None else None
    steps = len(batches)
    warm = max(1, int(sparsity_warmup_frac * steps))
    optimizer = torch.optim.Adam(sae.parameters(), lr=lr, betas=(0.9, 0.999))
    sae.train()
    l0 = torch.zeros(sae.n_instances)
    for step in tqdm(range(steps), disable=not progress, desc=desc, mininterval=2.0):
        if final is not None:
            coeff.copy_(final * min(1.0, (step + 1) / warm))
        for group in optimizer.param_groups:
            group["lr"] = lr_schedule(step, steps, lr, 0, lr_decay_frac)
        out = sae.loss(batches[step])
        if not torch.isfinite(out["loss"]).all():
            raise S.TrainingDiverged(f"the loss became non-finite at step {step}; lower lr.")
        optimizer.zero_grad()
        out["loss"].sum().backward()
        sae.remove_parallel_grad()
        if max_grad_norm is not None:
            clip_grad_norm_per_instance(sae.parameters(), max_grad_norm)
        optimizer.step()
        with torch.no_grad():
            sae.normalise_decoder()
            fired = (out["acts"] > 0).any(0)
            sae.steps_since_fired += 1
            sae.steps_since_fired[fired] = 0
            l0 = (out["acts"] > 0).float().sum(-1).mean(0)
    if final is not None:
        coeff.copy_(final)
    sae.eval()
    return {"train_l0": l0, "dead": sae.dead_mask(dead_window).float().sum(-1)}


def _saelens_config(architecture: str, d_in: int, d_sae: int, k: float, prefixes, aux: float):
    from sae_lens.saes.batchtopk_sae import BatchTopKTrainingSAEConfig
    from sae_lens.saes.matryoshka_batchtopk_sae import MatryoshkaBatchTopKTrainingSAEConfig
    from sae_lens.saes.topk_sae import TopKTrainingSAEConfig

    common = {"d_in": d_in, "d_sae": d_sae, "aux_loss_coefficient": aux,
              "apply_b_dec_to_input": True}  # fmt: skip
    if architecture == "topk":
        return TopKTrainingSAEConfig(k=int(k), **common)
    if architecture == "batchtopk":
        return BatchTopKTrainingSAEConfig(k=float(k), **common)
    if architecture == "matryoshka":
        return MatryoshkaBatchTopKTrainingSAEConfig(
            k=float(k), matryoshka_widths=list(check_prefixes(prefixes, d_sae)), **common
        )
    raise ValueError(f"architecture must be topk, batchtopk or matryoshka, got {architecture!r}.")


def train_saelens(
    architecture: str,
    batches: Sequence[Tensor],
    d_sae: int,
    k: float,
    lr: float = 3e-3,
    prefixes: Sequence[int] | None = None,
    init_from: S.SAE | None = None,
    aux_loss_coefficient: float = 0.0,
    lr_decay_frac: float = 0.2,
):
    """Train SAELens's implementation of ``architecture`` with its ``SAETrainer`` on ``batches``
    (same order, batch size, Adam betas, lr schedule and clipping at 1 as :func:`train_dictionary`)
    and return the *inference* SAE SAELens saves (a JumpReLU SAE for BatchTopK and Matryoshka,
    with the learned threshold on every latent), loaded back with ``SAE.load_from_disk``.

    ``init_from``: start from instance 0 of one of our SAEs (same initial weights). AuxK is off by
    default on both sides (``aux_loss_coefficient=0``; ours ``aux_k=0``): SAELens scales it
    differently (k_aux = d_in / 2, coefficient 1, scaled by the dead count).
    """
    from sae_lens import SAE
    from sae_lens.config import LoggingConfig
    from sae_lens.saes.batchtopk_sae import BatchTopKTrainingSAE
    from sae_lens.saes.matryoshka_batchtopk_sae import MatryoshkaBatchTopKTrainingSAE
    from sae_lens.saes.topk_sae import TopKTrainingSAE
    from sae_lens.training.sae_trainer import SAETrainer, SAETrainerConfig
    from tqdm.auto import tqdm

    d_in = batches[0].shape[-1]
    cfg = _saelens_config(architecture, d_in, d_sae, k, prefixes, aux_loss_coefficient)
    cls = {"topk": TopKTrainingSAE, "batchtopk": BatchTopKTrainingSAE,
           "matryoshka": MatryoshkaBatchTopKTrainingSAE}[architecture]  # fmt: skip
    theirs = cls(cfg)
    if init_from is not None:
        with torch.no_grad():
            for key, value in init_from.instance_state_dict(0).items():
                if key in ("W_enc", "b_enc", "W_dec", "b_dec"):
                    getattr(theirs, key).data.copy_(value)
    steps, batch_size = len(batches), batches[0].shape[0]
    trainer_cfg = SAETrainerConfig(
        total_training_samples=steps * batch_size,
        train_batch_size_samples=batch_size,
        lr=lr,
        lr_end=0.0,
        lr_scheduler_name="constant",
        lr_decay_steps=int(lr_decay_frac * steps),
        logger=LoggingConfig(log_to_wandb=False),
        n_checkpoints=0,
        device="cpu",
        dead_feature_window=200,
        feature_sampling_window=10**9,
    )
    trainer = SAETrainer(trainer_cfg, theirs, iter(batches))
    quiet = functools.partial(tqdm, disable=True)  # its bar would stay at 0% in a notebook
    with (
        mock.patch("sae_lens.training.sae_trainer.tqdm", quiet),
        contextlib.redirect_stderr(io.StringIO()),
    ):
        trainer.fit()
    with tempfile.TemporaryDirectory() as folder:
        theirs.save_inference_model(folder)
        return SAE.load_from_disk(folder)


# ----------------------------------------------------------------------------- evaluation


@torch.no_grad()
def ground_truth_scores(
    encode, W_dec: Float[Tensor, "d_sae d"], data_x: Tensor, data_f: Tensor, decode, features
) -> dict[str, float]:
    """L0, FVU, MCC, mean F1 and uniqueness of one dictionary on held-out synthetic samples.

    ``encode(x) -> latent_acts [n, d_sae]``, ``decode(acts) -> x_hat [n, d]``.
    """
    acts = encode(data_x)
    x_hat = decode(acts)
    fvu = (x_hat - data_x).pow(2).sum() / (data_x - data_x.mean(0)).pow(2).sum()
    _, _, f1 = latent_f1(acts, data_f, W_dec, features)
    best = abs_cosines(W_dec, features).argmax(-1)
    return {
        "l0": (acts > 0).float().sum(-1).mean().item(),
        "fvu": fvu.item(),
        "mcc": mcc(W_dec, features),
        "f1": f1.mean().item(),
        "uniqueness": len(best.unique()) / W_dec.shape[0],
        "dead": (~(acts > 0).any(0)).float().mean().item(),
    }


@torch.no_grad()
def parent_latents(
    latent_acts: Float[Tensor, "n d_sae"],
    feature_acts: Float[Tensor, "n feat"],
    parents: Sequence[int],
) -> list[int]:
    """For each parent feature, the latent whose firing best predicts "parent active" (highest
    F1), as Chanin et al. pick the main latent from activations, not from decoder directions."""
    fires = (latent_acts > 0).float()
    chosen = []
    for parent in parents:
        truth = (feature_acts[:, parent] > 0).float()
        tp = (fires * truth[:, None]).sum(0)
        precision = tp / fires.sum(0).clamp_min(1)
        recall = tp / truth.sum().clamp_min(1)
        f1 = 2 * precision * recall / (precision + recall).clamp_min(1e-12)
        chosen.append(int(f1.argmax()))
    return chosen


@torch.no_grad()
def absorption_rate(
    latent_acts: Float[Tensor, "n d_sae"],
    feature_acts: Float[Tensor, "n feat"],
    W_dec: Float[Tensor, "d_sae d"],
    features: Float[Tensor, "feat d"],
    pairs: Sequence[tuple[int, int]],
    absorber_cos: float = 0.5,
) -> dict[str, float]:
    """Absorption where the hierarchy is known (Chanin et al. 2024, on ground truth).

    For each (parent, child) pair, the parent's latent is the one whose firing best predicts the
    parent (:func:`parent_latents`, highest F1). Of the samples where the child is active (so the
    parent is too), the *absorption rate* is the fraction on which the parent's latent is silent
    while another latent whose decoder carries the parent's direction (cos >= ``absorber_cos``,
    far above the 0.14 mean |cos| of random directions in 32 dimensions) fires: Chanin's "false
    negative with an absorber". Baselines: ``miss_rate_without_child``, the parent latent's miss
    rate when the parent fires without a child, and ``matched_excess``, its miss rate with a child
    minus its miss rate without one *at the same number of active features* (alone samples
    reweighted to the with-child distribution of that count; counts with fewer than 5 alone
    samples are skipped). Means over the pairs.
    """
    latent_of = parent_latents(latent_acts, feature_acts, [p for p, _ in pairs])
    cos_parent = _unit(W_dec) @ _unit(features).T  # [d_sae, feat], signed
    n_active = (feature_acts > 0).sum(-1)
    rates, misses, excesses = [], [], []
    for (parent, child), lat in zip(pairs, latent_of, strict=True):
        with_child = feature_acts[:, child] > 0
        alone = (feature_acts[:, parent] > 0) & ~with_child
        silent = latent_acts[:, lat] <= 0
        carriers = (cos_parent[:, parent] >= absorber_cos).clone()
        carriers[lat] = False
        absorbed = silent & (latent_acts[:, carriers] > 0).any(-1)
        if with_child.any():
            rates.append(absorbed[with_child].float().mean().item())
        if alone.any():
            misses.append(silent[alone].float().mean().item())
        num = den = 0.0
        for count in n_active[with_child].unique():
            same = alone & (n_active == count)
            if same.sum() >= 5:
                weight = (with_child & (n_active == count)).sum().item()
                num += weight * silent[same].float().mean().item()
                den += weight
        if den > 0:
            excesses.append(silent[with_child].float().mean().item() - num / den)
    return {
        "absorption_rate": sum(rates) / max(len(rates), 1),
        "miss_rate_without_child": sum(misses) / max(len(misses), 1),
        "matched_excess": sum(excesses) / max(len(excesses), 1),
    }


# ----------------------------------------------------------------------------- sparse probing


def top_k_by_mean_difference(
    acts: Float[Tensor, "n d"], labels: Bool[Tensor, " n"], k: int
) -> Int[Tensor, " k"]:
    """Reference for exercise 4.1: the k dimensions with the largest |mean over positives - mean
    over negatives| (SAEBench's latent selection), largest first."""
    if labels.ndim != 1 or labels.shape[0] != acts.shape[0]:
        raise ValueError(
            f"labels have shape {tuple(labels.shape)} but acts have {acts.shape[0]} rows: "
            "one label per row of acts."
        )
    if not 1 <= k <= acts.shape[-1]:
        raise ValueError(f"k must be in [1, {acts.shape[-1]}] (the number of dimensions), got {k}.")
    labels = labels.bool()
    if labels.all() or not labels.any():
        raise ValueError("labels must contain both classes.")
    diff = acts[labels].mean(0) - acts[~labels].mean(0)
    return diff.abs().topk(k).indices


def sparse_probe_accuracy(
    train_acts: Float[Tensor, "n d"],
    train_labels: Bool[Tensor, " n"],
    test_acts: Float[Tensor, "m d"],
    test_labels: Bool[Tensor, " m"],
    k: int | None,
    select=top_k_by_mean_difference,
) -> float:
    """Balanced test accuracy of a logistic-regression probe on the top-k dimensions (chosen on
    the training split by ``select``); ``k=None`` uses every dimension. Features are standardised
    on the training split; sklearn ``LogisticRegression`` (L2, C 1, balanced class weights)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import balanced_accuracy_score

    if test_labels.shape[0] != test_acts.shape[0]:
        raise ValueError(
            f"test labels have {test_labels.shape[0]} entries for {test_acts.shape[0]} rows."
        )
    dims = torch.arange(train_acts.shape[-1]) if k is None else select(train_acts, train_labels, k)
    a, b = train_acts[:, dims].double(), test_acts[:, dims].double()
    mu, sd = a.mean(0), a.std(0).clamp_min(1e-6)
    probe = LogisticRegression(C=1.0, max_iter=1000, class_weight="balanced")
    probe.fit(((a - mu) / sd).numpy(), train_labels.numpy())
    predicted = probe.predict(((b - mu) / sd).numpy())
    return float(balanced_accuracy_score(test_labels.numpy(), predicted))


# ----------------------------------------------------------------------------- the Pareto sweep

#: The chapter-10 sweep on the course model (``python -m course_utils.assets build-sae-pareto``):
#: five architectures x three sparsities, one layer, the same activation batches for all.
PARETO = {
    "hook_name": "blocks.0.hook_resid_post",
    "d_sae": 512,
    "steps": 600,
    "batch_size": 1024,
    "lr": 1e-3,
    "eval_windows": 64,
    "relu_l1": [2.0, 4.0, 8.0],
    "jumprelu_l0": [0.3, 1.0, 3.0],
    "jumprelu_init_threshold": [1.0, 2.0, 4.0],
    "jumprelu_bandwidth": 1.0,
    "k": [8, 16, 32],
    "matryoshka_prefixes": [32, 128, 512],
    "aux_k": 64,
    "aux_coeff": 1 / 32,
}
PARETO_TABLE = "sae_pareto.csv"
PARETO_COLUMNS = ("architecture", "setting", "l0", "fvu", "ce_recovered_zero", "ce_recovered_mean",
                  "delta_ce", "kl", "dead_fraction", "dense_fraction")  # fmt: skip


def pareto_saes(recipe: dict, d_in: int) -> dict[str, tuple[S.SAE, list[str]]]:
    """The sweep's SAEs, three instances each: architecture -> (SAE, setting labels)."""
    r, m = recipe, recipe["d_sae"]
    aux = {"aux_k": r["aux_k"], "aux_coeff": r["aux_coeff"]}
    jumprelu = S.JumpReLUSAE(d_in, m, 3, l0_coeff=r["jumprelu_l0"], bandwidth=r["jumprelu_bandwidth"],
                             seed=0)  # fmt: skip
    with torch.no_grad():  # one initial threshold per instance (see the chapter: it sets the L0)
        jumprelu.log_threshold.data = (
            torch.tensor(r["jumprelu_init_threshold"]).log()[:, None].expand(3, m).clone()
        )
    return {
        "ReLU-L1": (S.ReLUSAE(d_in, m, 3, l1_coeff=r["relu_l1"], seed=0),
                    [f"l1={v:g}" for v in r["relu_l1"]]),
        "JumpReLU": (jumprelu, [f"l0_coeff={v:g},theta0={t:g}"
                                for v, t in zip(r["jumprelu_l0"], r["jumprelu_init_threshold"], strict=True)]),
        "TopK": (S.TopKSAE(d_in, m, 3, k=r["k"], seed=0, **aux), [f"k={v}" for v in r["k"]]),
        "BatchTopK": (BatchTopKSAE(d_in, m, 3, k=r["k"], seed=0, **aux),
                      [f"k={v}" for v in r["k"]]),
        "Matryoshka": (MatryoshkaSAE(d_in, m, r["matryoshka_prefixes"], 3, k=r["k"], seed=0, **aux),
                       [f"k={v}" for v in r["k"]]),
    }  # fmt: skip


@torch.no_grad()
def dictionary_report(model, sae, tokens: Int[Tensor, "batch pos"], hook_name: str) -> dict:
    """Every number of the chapter's sweep for one dictionary spliced in at ``hook_name``:
    :func:`~course_utils.science.lm_saes.evaluate_splice` (L0, FVU, CE loss with the SAE, CE
    recovered against zero- and mean-ablation, KL, dead fraction) plus ``delta_ce`` (CE with the
    SAE - clean CE) and ``dense_fraction`` (latents firing on more than 10% of the tokens; BOS,
    position 0, excluded). Any SAE with ``encode``/``decode`` works: ours (one instance, via
    ``lm_saes.single``), a shipped or local SAELens folder, or a downloaded SAELens release. An SAE
    whose width does not match the hook is one clear ``ValueError``."""
    from course_utils.science.lm_saes import evaluate_splice

    numbers = evaluate_splice(model, sae, tokens, hook_name)  # checks the SAE fits the hook
    _, cache = model.run_with_cache(tokens, names_filter=hook_name)
    act = cache[hook_name][:, 1:]
    acts = sae.encode(act.reshape(-1, act.shape[-1]))
    return {
        **numbers,
        "delta_ce": numbers["ce_sae"] - numbers["ce_clean"],
        "dense_fraction": ((acts > 0).float().mean(0) > 0.1).float().mean().item(),
    }


def build_pareto_table(out_path, recipe: dict | None = None, log=print, threads: int = 2) -> list:
    """Train the sweep (:data:`PARETO`) and write one CSV row per SAE (:data:`PARETO_COLUMNS`).

    Every SAE sees the same ``steps`` batches of ``batch_size`` activations, in the same order.
    Evaluated with :func:`~course_utils.science.lm_saes.evaluate_splice` on ``eval_windows``
    validation windows; BatchTopK and Matryoshka at inference (their JumpReLU threshold), so
    their L0 is measured, not k. ``dense_fraction``: latents firing on more than 10% of tokens.
    """
    import csv
    import time
    from pathlib import Path

    from course_utils.science.activations import ActivationStore, corpus_windows
    from course_utils.science.lm_saes import single
    from course_utils.science.models import load_model

    recipe = {**PARETO, **(recipe or {})}
    torch.set_num_threads(threads)
    start = time.perf_counter()
    model = load_model("course-2l")
    hook = recipe["hook_name"]
    store = ActivationStore(model, hook, corpus_windows(model, "train"),
                            batch_size=recipe["batch_size"], progress=False, seed=0)  # fmt: skip
    batches = [store.next_batch() for _ in range(recipe["steps"])]
    log(f"{len(batches)} batches of {recipe['batch_size']} activations at {hook} "
        f"({time.perf_counter() - start:.0f} s)")  # fmt: skip
    tokens = corpus_windows(model, "validation")[: recipe["eval_windows"]]
    rows = []
    for name, (sae, labels) in pareto_saes(recipe, batches[0].shape[-1]).items():
        t0 = time.perf_counter()
        train_dictionary(sae, batches, lr=recipe["lr"])
        for i, label in enumerate(labels):
            numbers = dictionary_report(model, single(sae, i), tokens, hook)
            row = {"architecture": name, "setting": label, **numbers}
            rows.append({c: (round(row[c], 5) if isinstance(row[c], float) else row[c])
                         for c in PARETO_COLUMNS})  # fmt: skip
            log(
                f"{name:10} {label:14} "
                + "  ".join(f"{c} {rows[-1][c]}" for c in PARETO_COLUMNS[2:])
            )
        log(f"  {name} trained and evaluated in {time.perf_counter() - t0:.0f} s")
    Path(out_path).parent.mkdir(parents=True, exist_ok=True)
    with open(out_path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=PARETO_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    log(f"wrote {out_path} in {time.perf_counter() - start:.0f} s")
    return rows


def read_pareto_table(path=None) -> list[dict]:
    """The shipped sweep (``course_utils/assets/saes/sae_pareto.csv``), numbers as floats."""
    import csv
    from pathlib import Path

    path = (
        Path(path)
        if path is not None
        else Path(__file__).parents[1] / "assets" / "saes" / PARETO_TABLE
    )
    with open(path, encoding="utf-8") as handle:
        return [{k: (v if k in ("architecture", "setting") else float(v)) for k, v in row.items()}
                for row in csv.DictReader(handle)]  # fmt: skip


# ----------------------------------------------------------------------------- feature splitting


def coactivation_cosine(
    acts_a: Float[Tensor, "n a"], acts_b: Float[Tensor, "n b"]
) -> Float[Tensor, "a b"]:
    """Reference for exercise 6.1: Bricken et al.'s (2023, footnote 32) link between latent i of
    one dictionary and latent j of another, read on the same ``n`` tokens.

    The cosine of their activation vectors over the tokens where i fires, and again over the
    tokens where j fires; the larger of the two. Restricting to one latent's tokens keeps a rare
    latent from looking unrelated to a common one that covers it. A latent that never fires has
    link 0 with everything."""
    if acts_a.ndim != 2 or acts_b.ndim != 2 or acts_a.shape[0] != acts_b.shape[0]:
        raise ValueError(
            f"acts_a {tuple(acts_a.shape)} and acts_b {tuple(acts_b.shape)} must be [n, d_sae] "
            "activations of two dictionaries on the same n tokens."
        )
    a, b = acts_a.clamp_min(0).double(), acts_b.clamp_min(0).double()
    dot = a.T @ b  # [a, b]: zero outside the tokens where both fire, so no mask is needed here
    on_a, on_b = (a > 0).double(), (b > 0).double()
    norm_b_on_a = (on_a.T @ b.square()).sqrt()  # |b_j| over the tokens where i fires
    norm_a_on_b = (a.square().T @ on_b).sqrt()  # |a_i| over the tokens where j fires
    cos_on_a = dot / (a.norm(dim=0)[:, None] * norm_b_on_a).clamp_min(1e-12)
    cos_on_b = dot / (norm_a_on_b * b.norm(dim=0)[None, :]).clamp_min(1e-12)
    return torch.maximum(cos_on_a, cos_on_b).float()


# ----------------------------------------------------------------------------- absorption, probed


def linear_probe(
    acts: Float[Tensor, "n d"], labels: Bool[Tensor, " n"]
) -> tuple[Float[Tensor, " d"], float]:
    """A logistic-regression probe on raw activations (balanced classes, sklearn, C 1): its unit
    direction and intercept. The ground truth of probe-based absorption (Chanin et al.)."""
    from sklearn.linear_model import LogisticRegression

    if labels.ndim != 1 or labels.shape[0] != acts.shape[0]:
        raise ValueError(
            f"labels have shape {tuple(labels.shape)} for {acts.shape[0]} rows of acts: one label per row."
        )
    probe = LogisticRegression(C=1.0, max_iter=2000, class_weight="balanced")
    probe.fit(acts.double().numpy(), labels.numpy())
    w = torch.tensor(probe.coef_[0], dtype=torch.float32)
    return w / w.norm(), float(probe.intercept_[0]) / float(w.norm())


def main_latents(
    train_acts: Float[Tensor, "n d_sae"],
    train_labels: Bool[Tensor, " n"],
    test_acts: Float[Tensor, "m d_sae"],
    test_labels: Bool[Tensor, " m"],
    max_k: int = 10,
    jump: float = 0.03,
    select=top_k_by_mean_difference,
) -> tuple[list[int], list[float]]:
    """The latents that represent a concept, by Chanin et al.'s F1-jump rule (SAEBench's
    ``add_feature_splits_to_metrics_df``): rank latents (here by ``select``, the mean difference
    of exercise 4.1, where SAEBench ranks by an L1 probe's weights), fit a logistic regression on
    the top k, and grow k while test F1 rises by more than ``jump``. Returns the chosen latents
    and the F1 at every k tried."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import f1_score

    max_k = min(max_k, train_acts.shape[-1])
    ranked = select(train_acts, train_labels, max_k).tolist()
    chosen, scores = [], []
    for k in range(1, max_k + 1):
        dims = ranked[:k]
        probe = LogisticRegression(max_iter=1000, class_weight="balanced")
        probe.fit(train_acts[:, dims].double().numpy(), train_labels.numpy())
        scores.append(
            float(f1_score(test_labels.numpy(), probe.predict(test_acts[:, dims].double().numpy())))
        )
        if k > 1 and scores[-1] <= scores[-2] + jump:
            break
        chosen = dims
    return chosen, scores


@torch.no_grad()
def absorption_fraction(
    x: Float[Tensor, "n d"],
    latent_acts: Float[Tensor, "n d_sae"],
    W_dec: Float[Tensor, "d_sae d"],
    probe: Float[Tensor, " d"],
    main: Sequence[int],
    absorber_cos: float = 0.1,
    min_share: float = 0.4,
    max_absorbers: int = 3,
) -> Float[Tensor, " n"]:
    """SAEBench's absorption fraction (Chanin et al., with Till's fraction; SAEBench's
    ``calculate_absorption`` since March 2025), one value per row of ``x``: rows the probe calls
    positive.

    Latent i contributes ``a_i cos(d_i, p)`` along the unit probe p; the main latents together M;
    the residual x·p. Absorbers: other latents with cos(d_i, p) >= ``absorber_cos`` and a positive
    contribution; A is their top ``max_absorbers`` contributions. The fraction is 0 when the main
    latents carry all of x·p or the absorbers less than ``min_share`` of it; 1 when the main
    latents carry nothing; otherwise min(A, x·p - M) / (that + M)."""
    if W_dec.shape[0] != latent_acts.shape[-1]:
        raise ValueError(f"W_dec has {W_dec.shape[0]} rows for {latent_acts.shape[-1]} latents.")
    unit = probe / probe.norm()
    cos = _unit(W_dec) @ unit  # [d_sae]
    contribution = latent_acts * cos  # [n, d_sae]
    along = x @ unit  # [n]
    m = contribution[:, list(main)].sum(-1)
    absorber = cos >= absorber_cos
    absorber[list(main)] = False
    candidates = torch.where(
        absorber & (contribution > 0), contribution, torch.zeros_like(contribution)
    )
    a = candidates.topk(min(max_absorbers, candidates.shape[-1]), dim=-1).values.sum(-1)
    taken = torch.minimum(a, along - m)
    fraction = (taken / (taken + m).clamp_min(1e-12)).clamp(0, 1)
    fraction = torch.where(m <= 0, torch.ones_like(fraction), fraction)
    none = (m >= along) | (along <= 0) | (a < min_share * along)
    return torch.where(none, torch.zeros_like(fraction), fraction)
