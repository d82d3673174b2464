"""Reference sparse autoencoders (chapter 02; reused by chapters 03-05).

Every SAE here trains many *instances* at once: parameters carry a leading instance dimension, so
a sweep over L1 coefficients (or k, or seeds) is one batched run. Names follow SAELens so that
exporting one instance is a matter of indexing:

    W_enc [n_instances, d_in, d_sae]   b_enc [n_instances, d_sae]
    W_dec [n_instances, d_sae, d_in]   b_dec [n_instances, d_in]

    acts  = act_fn((x - b_dec) @ W_enc + b_enc)        # the pre-encoder bias: b_dec is subtracted
    x_hat = acts @ W_dec + b_dec

Variants:
- :class:`ReLUSAE`: ReLU + L1 penalty; decoder rows kept at unit norm (see below).
- :class:`TopKSAE` (Gao et al. 2024): keep the k largest pre-activations; loss = reconstruction
  (+ AuxK: the top ``aux_k`` *dead* latents reconstruct the residual, weight ``aux_coeff``).
- :class:`JumpReLUSAE` (Rajamanoharan et al. 2024): ``z * H(z - theta)`` with a learned threshold
  per latent; loss = reconstruction + lambda * L0, trained with straight-through pseudo-gradients
  through a rectangle kernel of width ``bandwidth``.
- :class:`DecoderNormL1SAE` (Anthropic, April 2024): ReLU; penalty ``sum_i f_i ||W_dec,i||``;
  the decoder is *not* constrained (the penalty itself stops the norm trick).

How the unit-norm decoder is kept (ReLUSAE, TopKSAE, JumpReLUSAE): by projection, as in Bricken
et al. (2023). Before each optimiser step the component of each decoder row's gradient parallel
to the row is removed (:func:`remove_parallel_grad`: a step then moves along the unit sphere to
first order); after the step the rows are divided by their norm (:meth:`SAE.normalise_decoder`).
The stored ``W_dec`` is therefore always unit-norm, which is what SAELens expects on export.
(Sharkey et al. 2022 instead renormalised inside the forward pass; both work.)

Reconstruction loss convention everywhere: squared L2 error summed over ``d_in``, averaged over the
batch, one number per instance. Penalties likewise: summed over latents, averaged over the batch.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from jaxtyping import Bool, Float
from torch import Tensor, nn

# ----------------------------------------------------------------------------- functional pieces


def sae_forward(
    x: Float[Tensor, "batch inst d_in"],
    W_enc: Float[Tensor, "inst d_in d_sae"],
    b_enc: Float[Tensor, "inst d_sae"],
    W_dec: Float[Tensor, "inst d_sae d_in"],
    b_dec: Float[Tensor, "inst d_in"],
) -> tuple[Float[Tensor, "batch inst d_sae"], Float[Tensor, "batch inst d_in"]]:
    """Reference for exercise 2.1: a ReLU SAE's latents and reconstruction."""
    pre = torch.einsum("bid,ids->bis", x - b_dec, W_enc) + b_enc
    acts = torch.relu(pre)
    x_hat = torch.einsum("bis,isd->bid", acts, W_dec) + b_dec
    return acts, x_hat


def remove_parallel_grad(
    W_dec: Float[Tensor, "inst d_sae d_in"], grad: Float[Tensor, "inst d_sae d_in"]
) -> Float[Tensor, "inst d_sae d_in"]:
    """Reference for exercise 2.2: the gradient minus its component along each decoder row."""
    unit = W_dec / W_dec.norm(dim=-1, keepdim=True).clamp_min(1e-8)
    parallel = (grad * unit).sum(-1, keepdim=True) * unit
    return grad - parallel


def reconstruction_loss(
    x: Float[Tensor, "batch inst d_in"], x_hat: Float[Tensor, "batch inst d_in"]
) -> Float[Tensor, " inst"]:
    """Squared L2 error summed over d_in, averaged over the batch."""
    return (x_hat - x).pow(2).sum(-1).mean(0)


def sae_loss(
    x: Float[Tensor, "batch inst d_in"],
    acts: Float[Tensor, "batch inst d_sae"],
    x_hat: Float[Tensor, "batch inst d_in"],
    l1_coeff: Float[Tensor, " inst"],
) -> Float[Tensor, " inst"]:
    """Reference for exercise 2.3: reconstruction + l1_coeff * L1, one loss per instance."""
    return reconstruction_loss(x, x_hat) + l1_coeff * acts.abs().sum(-1).mean(0)


def topk_activation(
    pre_acts: Float[Tensor, "batch inst d_sae"], k: int
) -> Float[Tensor, "batch inst d_sae"]:
    """Reference for exercise 7.1: keep the k largest pre-activations per example (then ReLU)."""
    values, indices = pre_acts.topk(k, dim=-1)
    return torch.zeros_like(pre_acts).scatter(-1, indices, torch.relu(values))


def rectangle(u: Tensor) -> Tensor:
    """The rectangle kernel K(u) = 1 for |u| < 1/2, else 0."""
    return (u.abs() < 0.5).to(u.dtype)


def jumprelu_backward(
    z: Float[Tensor, "batch inst d_sae"],
    threshold: Float[Tensor, "inst d_sae"],
    bandwidth: float,
    grad_output: Float[Tensor, "batch inst d_sae"],
) -> tuple[Float[Tensor, "batch inst d_sae"], Float[Tensor, "inst d_sae"]]:
    """Reference for exercise 7.2: gradients of f = z * H(z - theta) w.r.t. z and theta.

    d f / d z = H(z - theta) (the jump's delta is ignored); the straight-through pseudo-derivative
    d f / d theta = -(theta / eps) * K((z - theta) / eps), summed over the batch.
    """
    grad_z = (z > threshold).to(z.dtype) * grad_output
    pseudo = -(threshold / bandwidth) * rectangle((z - threshold) / bandwidth)
    grad_threshold = (pseudo * grad_output).sum(0)
    return grad_z, grad_threshold


def step_backward(
    z: Float[Tensor, "batch inst d_sae"],
    threshold: Float[Tensor, "inst d_sae"],
    bandwidth: float,
    grad_output: Float[Tensor, "batch inst d_sae"],
) -> tuple[Float[Tensor, "batch inst d_sae"], Float[Tensor, "inst d_sae"]]:
    """Gradients of H(z - theta) (the L0 term).

    0 w.r.t. z; the pseudo-derivative -(1/eps) K((z - theta) / eps) w.r.t. theta.
    """
    pseudo = -(1.0 / bandwidth) * rectangle((z - threshold) / bandwidth)
    return torch.zeros_like(z), (pseudo * grad_output).sum(0)


class JumpReLUFunction(torch.autograd.Function):
    """f = z * H(z - theta) with the straight-through pseudo-gradient for theta."""

    @staticmethod
    def forward(ctx, z, threshold, bandwidth):  # type: ignore[override]
        ctx.save_for_backward(z, threshold)
        ctx.bandwidth = bandwidth
        return z * (z > threshold).to(z.dtype)

    @staticmethod
    def backward(ctx, grad_output):  # type: ignore[override]
        z, threshold = ctx.saved_tensors
        grad_z, grad_threshold = jumprelu_backward(z, threshold, ctx.bandwidth, grad_output)
        return grad_z, grad_threshold, None


class StepFunction(torch.autograd.Function):
    """H(z - theta) with the straight-through pseudo-gradient for theta (for the L0 penalty)."""

    @staticmethod
    def forward(ctx, z, threshold, bandwidth):  # type: ignore[override]
        ctx.save_for_backward(z, threshold)
        ctx.bandwidth = bandwidth
        return (z > threshold).to(z.dtype)

    @staticmethod
    def backward(ctx, grad_output):  # type: ignore[override]
        z, threshold = ctx.saved_tensors
        grad_z, grad_threshold = step_backward(z, threshold, ctx.bandwidth, grad_output)
        return grad_z, grad_threshold, None


def decoder_norm_weighted_l1(
    acts: Float[Tensor, "batch inst d_sae"], W_dec: Float[Tensor, "inst d_sae d_in"]
) -> Float[Tensor, " inst"]:
    """Reference for exercise 7.3: sum_i f_i ||W_dec,i||_2, averaged over the batch."""
    return (acts.abs() * W_dec.norm(dim=-1)).sum(-1).mean(0)


# ----------------------------------------------------------------------------- the modules


def _per_instance(value: float | Tensor | list, n_instances: int, name: str) -> Tensor:
    t = torch.as_tensor(value, dtype=torch.float32).flatten()
    if t.numel() == 1:
        t = t.expand(n_instances).clone()
    if t.shape != (n_instances,):
        raise ValueError(
            f"{name} must be one number or one per instance: got shape {tuple(t.shape)} "
            f"for n_instances={n_instances}."
        )
    return t


class SAE(nn.Module):
    """Base class: parameters, encode/decode, the decoder constraint, export of one instance."""

    unit_norm_decoder = True

    def __init__(
        self,
        d_in: int,
        d_sae: int,
        n_instances: int = 1,
        seed: int | None = 0,
        tied_init: bool = True,
    ):
        super().__init__()
        for name, v in (("d_in", d_in), ("d_sae", d_sae), ("n_instances", n_instances)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}.")
        self.d_in, self.d_sae, self.n_instances = d_in, d_sae, n_instances
        g = torch.Generator().manual_seed(seed) if seed is not None else None
        W_dec = torch.randn(n_instances, d_sae, d_in, generator=g)
        W_dec = W_dec / W_dec.norm(dim=-1, keepdim=True) * self.init_decoder_norm
        # Encoder initialised as the decoder's transpose (Gao et al. 2024; Anthropic 2024), or,
        # with tied_init=False, independently like nn.Linear: U(-1/sqrt(d_in), 1/sqrt(d_in)).
        if tied_init:
            W_enc = W_dec.transpose(-1, -2).clone()
        else:
            W_enc = (torch.rand(n_instances, d_in, d_sae, generator=g) * 2 - 1) / math.sqrt(d_in)
        self.W_enc = nn.Parameter(W_enc)
        self.W_dec = nn.Parameter(W_dec)
        self.b_enc = nn.Parameter(torch.zeros(n_instances, d_sae))
        self.b_dec = nn.Parameter(torch.zeros(n_instances, d_in))
        # Training bookkeeping: how many consecutive steps each latent has not fired.
        self.register_buffer("steps_since_fired", torch.zeros(n_instances, d_sae, dtype=torch.long))

    init_decoder_norm = 1.0

    # -- shapes
    def _as_batch(self, x: Tensor) -> Float[Tensor, "batch inst d_in"]:
        shape = tuple(x.shape)
        if x.ndim == 2 and x.shape[-1] == self.d_in:
            x = x.unsqueeze(1).expand(-1, self.n_instances, -1)
        if x.ndim != 3 or x.shape[-1] != self.d_in or x.shape[1] != self.n_instances:
            raise ValueError(
                f"activations have shape {shape}, but this SAE expects [batch, d_in] = "
                f"[batch, {self.d_in}] or [batch, n_instances, d_in] = "
                f"[batch, {self.n_instances}, {self.d_in}]."
            )
        return x

    # -- forward
    def pre_acts(self, x: Float[Tensor, "batch inst d_in"]) -> Float[Tensor, "batch inst d_sae"]:
        return torch.einsum("bid,ids->bis", x - self.b_dec, self.W_enc) + self.b_enc

    def activation(self, pre: Tensor) -> Tensor:
        return torch.relu(pre)

    def encode(self, x: Tensor) -> Float[Tensor, "batch inst d_sae"]:
        return self.activation(self.pre_acts(self._as_batch(x)))

    def decode(self, acts: Float[Tensor, "batch inst d_sae"]) -> Float[Tensor, "batch inst d_in"]:
        return torch.einsum("bis,isd->bid", acts, self.W_dec) + self.b_dec

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(acts [batch, inst, d_sae], x_hat [batch, inst, d_in]); x may omit the instance dim."""
        acts = self.encode(x)
        return acts, self.decode(acts)

    # -- loss
    def penalty(self, acts: Tensor, pre: Tensor | None = None) -> Float[Tensor, " inst"]:
        return torch.zeros(self.n_instances, device=acts.device)

    def loss(self, x: Tensor) -> dict[str, Tensor]:
        """Per-instance losses: total, reconstruction, sparsity (penalty); plus acts and x_hat."""
        x = self._as_batch(x)
        pre = self.pre_acts(x)
        acts = self.activation(pre)
        x_hat = self.decode(acts)
        recon = reconstruction_loss(x, x_hat)
        sparsity = self.penalty(acts, pre)
        extra = self.auxiliary_loss(x, x_hat, pre)
        return {
            "loss": recon + sparsity + extra,
            "reconstruction": recon,
            "sparsity": sparsity,
            "auxiliary": extra,
            "acts": acts,
            "x_hat": x_hat,
        }

    def auxiliary_loss(self, x: Tensor, x_hat: Tensor, pre: Tensor) -> Float[Tensor, " inst"]:
        return torch.zeros(self.n_instances, device=x.device)

    # -- decoder constraint
    @torch.no_grad()
    def normalise_decoder(self) -> None:
        self.W_dec.data /= self.W_dec.data.norm(dim=-1, keepdim=True).clamp_min(1e-8)

    @torch.no_grad()
    def remove_parallel_grad(self) -> None:
        if self.W_dec.grad is not None:
            self.W_dec.grad = remove_parallel_grad(self.W_dec.data, self.W_dec.grad)

    def dictionary(self) -> Float[Tensor, "inst d_sae d_in"]:
        """Unit-norm dictionary directions (the decoder rows, normalised)."""
        W = self.W_dec.detach()
        return W / W.norm(dim=-1, keepdim=True).clamp_min(1e-8)

    def dead_mask(self, window: int) -> Bool[Tensor, "inst d_sae"]:
        return self.steps_since_fired >= window

    # -- export
    def instance_state_dict(self, instance: int) -> dict[str, Tensor]:
        """One instance's weights under SAELens names (W_enc [d_in, d_sae], W_dec [d_sae, d_in])."""
        if not 0 <= instance < self.n_instances:
            raise ValueError(
                f"instance {instance} out of range for n_instances={self.n_instances}."
            )
        return {
            name: getattr(self, name).detach()[instance].clone()
            for name in ("W_enc", "b_enc", "W_dec", "b_dec")
        }


class ReLUSAE(SAE):
    """ReLU SAE with an L1 penalty ``l1_coeff * sum_i |f_i|`` (one coefficient per instance)."""

    def __init__(self, d_in, d_sae, n_instances=1, l1_coeff=1e-3, seed=0, tied_init=True):
        super().__init__(d_in, d_sae, n_instances, seed, tied_init)
        self.register_buffer("l1_coeff", _per_instance(l1_coeff, n_instances, "l1_coeff"))

    def penalty(self, acts, pre=None):
        return self.l1_coeff * acts.abs().sum(-1).mean(0)


class DecoderNormL1SAE(SAE):
    """ReLU SAE with penalty ``l1_coeff * sum_i f_i ||W_dec,i||``; decoder left unconstrained.

    Decoder rows start with norm 0.1 (as in Anthropic's April 2024 update).
    """

    unit_norm_decoder = False
    init_decoder_norm = 0.1

    def __init__(self, d_in, d_sae, n_instances=1, l1_coeff=1e-3, seed=0, tied_init=True):
        super().__init__(d_in, d_sae, n_instances, seed, tied_init)
        self.register_buffer("l1_coeff", _per_instance(l1_coeff, n_instances, "l1_coeff"))

    def penalty(self, acts, pre=None):
        return self.l1_coeff * decoder_norm_weighted_l1(acts, self.W_dec)


class TopKSAE(SAE):
    """TopK SAE: exactly the k largest pre-activations survive (k may differ per instance).

    With ``aux_k > 0``, AuxK (Gao et al. 2024): the ``aux_k`` largest pre-activations among latents
    that have been dead for ``dead_window`` steps reconstruct the residual ``x - x_hat``; that loss,
    times ``aux_coeff``, is added. It gives dead latents a gradient so they can come back.
    """

    def __init__(
        self, d_in, d_sae, n_instances=1, k=4, aux_k=0, aux_coeff=1 / 32, dead_window=200, seed=0
    ):
        super().__init__(d_in, d_sae, n_instances, seed)
        ks = _per_instance(k, n_instances, "k").long()
        if (ks < 1).any() or (ks > d_sae).any():
            raise ValueError(f"k must be in [1, d_sae={d_sae}], got {ks.tolist()}.")
        self.register_buffer("k", ks)
        self.aux_k, self.aux_coeff, self.dead_window = aux_k, aux_coeff, dead_window

    def activation(self, pre):
        k_max = int(self.k.max())
        values, indices = pre.topk(k_max, dim=-1)
        keep = torch.arange(k_max, device=pre.device) < self.k[:, None]  # [inst, k_max]
        return torch.zeros_like(pre).scatter(-1, indices, torch.relu(values) * keep)

    def auxiliary_loss(self, x, x_hat, pre):
        zero = torch.zeros(self.n_instances, device=x.device)
        if not self.aux_k or not self.training:
            return zero
        dead = self.dead_mask(self.dead_window)
        if not dead.any():
            return zero
        masked = pre.masked_fill(~dead, -math.inf)
        k = min(self.aux_k, self.d_sae)
        values, indices = masked.topk(k, dim=-1)
        values = torch.relu(values.nan_to_num(neginf=0.0))
        aux_acts = torch.zeros_like(pre).scatter(-1, indices, values)
        residual = (x - x_hat).detach()
        residual_hat = torch.einsum("bis,isd->bid", aux_acts, self.W_dec)
        return self.aux_coeff * reconstruction_loss(residual, residual_hat)


class JumpReLUSAE(SAE):
    """JumpReLU SAE: ``f = z * H(z - theta)``, penalty ``l0_coeff * sum_i H(z_i - theta_i)``.

    The threshold is stored as ``log_threshold`` (kept positive); ``bandwidth`` is the width of the
    rectangle kernel of the straight-through estimator. SAELens calls the exported tensor
    ``threshold``.
    """

    def __init__(
        self, d_in, d_sae, n_instances=1, l0_coeff=1e-2, bandwidth=1e-3, init_threshold=1e-3, seed=0
    ):
        super().__init__(d_in, d_sae, n_instances, seed)
        self.register_buffer("l0_coeff", _per_instance(l0_coeff, n_instances, "l0_coeff"))
        self.bandwidth = bandwidth
        self.log_threshold = nn.Parameter(
            torch.full((n_instances, d_sae), math.log(init_threshold))
        )

    @property
    def threshold(self) -> Tensor:
        return self.log_threshold.exp()

    def activation(self, pre):
        return JumpReLUFunction.apply(pre, self.threshold, self.bandwidth)

    def penalty(self, acts, pre=None):
        if pre is None:
            return self.l0_coeff * (acts > 0).float().sum(-1).mean(0)
        l0 = StepFunction.apply(pre, self.threshold, self.bandwidth).sum(-1).mean(0)
        return self.l0_coeff * l0

    def instance_state_dict(self, instance):
        state = super().instance_state_dict(instance)
        state["threshold"] = self.threshold.detach()[instance].clone()
        return state


# ----------------------------------------------------------------------------- training


class TrainingDiverged(FloatingPointError):
    """The loss became NaN or infinite."""


@torch.no_grad()
def resample_dead_latents(
    W_enc: Float[Tensor, "inst d_in d_sae"],
    b_enc: Float[Tensor, "inst d_sae"],
    W_dec: Float[Tensor, "inst d_sae d_in"],
    dead: Bool[Tensor, "inst d_sae"],
    x: Float[Tensor, "batch inst d_in"],
    x_hat: Float[Tensor, "batch inst d_in"],
    encoder_scale: float = 0.2,
) -> tuple[Tensor, Tensor, Tensor]:
    """Reference for exercise 5.1: point dead latents at the worst-reconstructed inputs.

    For each instance, the dead latents take, in order, the examples with the largest
    reconstruction error (cycling if there are more dead latents than examples). For a dead
    latent j given example n with residual r = x_n - x_hat_n:
    - decoder row j = r / ||r||;
    - encoder column j = r / ||r|| * encoder_scale * (mean norm of the *alive* encoder columns,
      or 1 if none is alive);
    - b_enc[j] = 0.
    Returns new tensors (W_enc, b_enc, W_dec); the inputs are not modified.
    (Bricken et al. 2023 *sample* examples with probability proportional to the squared loss;
    taking the worst ones is the deterministic version of the same idea.)
    """
    W_enc, b_enc, W_dec = W_enc.clone(), b_enc.clone(), W_dec.clone()
    residual = x - x_hat
    losses = residual.pow(2).sum(-1)  # [batch, inst]
    for i in range(W_dec.shape[0]):
        dead_idx = dead[i].nonzero().flatten()
        n_dead = len(dead_idx)
        if n_dead == 0:
            continue
        order = losses[:, i].argsort(descending=True)
        chosen = order[torch.arange(n_dead) % len(order)]
        directions = residual[chosen, i]
        directions = directions / directions.norm(dim=-1, keepdim=True).clamp_min(1e-8)
        alive = ~dead[i]
        scale = W_enc[i][:, alive].norm(dim=0).mean() if alive.any() else torch.tensor(1.0)
        W_dec[i, dead_idx] = directions
        W_enc[i][:, dead_idx] = directions.T * encoder_scale * scale
        b_enc[i, dead_idx] = 0.0
    return W_enc, b_enc, W_dec


def _reset_adam_state(optimizer: torch.optim.Optimizer, sae: SAE, dead: Tensor) -> None:
    """Zero Adam's moments for resampled latents (their old statistics no longer apply)."""
    for param in (sae.W_enc, sae.b_enc, sae.W_dec):
        state = optimizer.state.get(param, {})
        for key in ("exp_avg", "exp_avg_sq"):
            if key in state:
                # W_enc is [inst, d_in, d_sae]: view it as [inst, d_sae, d_in] to index latents.
                moments = state[key].transpose(-1, -2) if param is sae.W_enc else state[key]
                moments[dead] = 0.0


def train_sae(
    sae: SAE,
    batch_fn: Callable[[int], Tensor],
    steps: int = 2000,
    batch_size: int = 1024,
    lr: float = 3e-3,
    dead_window: int = 200,
    resample_every: int | None = None,
    resample_until: float = 0.5,
    log_every: int = 50,
    progress: bool = True,
    seed: int = 0,
    resample_fn: Callable | None = None,
) -> dict[str, list]:
    """Train every instance of ``sae`` at once with Adam; returns a history of per-instance metrics.

    ``batch_fn(batch_size)`` returns activations [batch, d_in] (shared by all instances) or
    [batch, n_instances, d_in]. With ``resample_every``, latents that have not fired for
    ``dead_window`` steps are resampled (:func:`resample_dead_latents`) every ``resample_every``
    steps during the first ``resample_until`` fraction of training. A NaN or infinite loss stops
    the run with :class:`TrainingDiverged`. ``resample_fn`` replaces
    :func:`resample_dead_latents` (same signature), e.g. by a learner's own version.
    """
    from tqdm.auto import tqdm

    torch.manual_seed(seed)
    optimizer = torch.optim.Adam(sae.parameters(), lr=lr)
    history: dict[str, list] = {"step": [], "loss": [], "reconstruction": [], "l0": [], "dead": []}
    # mininterval: few display updates, so notebook front ends (and nbval) are not flooded.
    bar = tqdm(range(steps), disable=not progress, desc=type(sae).__name__, mininterval=2.0)
    for step in bar:
        x = sae._as_batch(batch_fn(batch_size))
        out = sae.loss(x)
        loss = out["loss"]
        if not torch.isfinite(loss).all():
            bad = (~torch.isfinite(loss)).nonzero().flatten().tolist()
            raise TrainingDiverged(
                f"the loss became {loss[bad[0]].item()} at step {step} for instance(s) {bad}. "
                f"Usual causes: a learning rate too high (lr={lr}), a sparsity coefficient far "
                "too large, or inputs with huge or non-finite values. Lower lr, check the "
                "coefficient, and check the data (e.g. `torch.isfinite(x).all()`)."
            )
        optimizer.zero_grad()
        loss.sum().backward()
        if sae.unit_norm_decoder:
            sae.remove_parallel_grad()
        optimizer.step()
        if sae.unit_norm_decoder:
            sae.normalise_decoder()
        with torch.no_grad():
            fired = (out["acts"] > 0).any(0)
            sae.steps_since_fired += 1
            sae.steps_since_fired[fired] = 0
        if resample_every and (step + 1) % resample_every == 0 and step < resample_until * steps:
            dead = sae.dead_mask(dead_window)
            if dead.any():
                W_enc, b_enc, W_dec = (resample_fn or resample_dead_latents)(
                    sae.W_enc.data, sae.b_enc.data, sae.W_dec.data, dead, x, out["x_hat"].detach()
                )
                sae.W_enc.data, sae.b_enc.data, sae.W_dec.data = W_enc, b_enc, W_dec
                _reset_adam_state(optimizer, sae, dead)
                sae.steps_since_fired[dead] = 0
        if step % log_every == 0 or step == steps - 1:
            with torch.no_grad():
                history["step"].append(step)
                history["loss"].append(loss.detach().clone())
                history["reconstruction"].append(out["reconstruction"].detach().clone())
                history["l0"].append((out["acts"] > 0).float().sum(-1).mean(0))
                history["dead"].append(sae.dead_mask(dead_window).float().sum(-1))
            bar.set_postfix(loss=f"{loss.mean().item():.4g}", refresh=False)
    return {k: (torch.stack(v) if k != "step" else v) for k, v in history.items()}


def relu_training_step(
    sae: SAE,
    optimizer: torch.optim.Optimizer,
    x: Float[Tensor, "batch inst d_in"],
    l1_coeff: Float[Tensor, " inst"],
) -> Float[Tensor, " inst"]:
    """Reference for exercise 2.4: one Adam step of a ReLU SAE with a unit-norm decoder."""
    acts, x_hat = sae(x)
    loss = sae_loss(x, acts, x_hat, l1_coeff)
    optimizer.zero_grad()
    loss.sum().backward()
    sae.W_dec.grad = remove_parallel_grad(sae.W_dec.data, sae.W_dec.grad)
    optimizer.step()
    with torch.no_grad():
        sae.W_dec.data = sae.W_dec.data / sae.W_dec.data.norm(dim=-1, keepdim=True)
    return loss.detach()
