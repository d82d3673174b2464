"""End-to-end sparse dictionary learning (chapter 04; Braun, Taylor, Goldowsky-Dill, Sharkey 2024).

Three ways to train the same SAE at one hook of a frozen model:

- ``local``:  MSE(a, SAE(a)) + phi * ||c||_1                      (reconstruct the activation)
- ``e2e``:    KL(original || spliced) + phi * ||c||_1              (keep the output distribution)
- ``e2e_ds``: kl_coeff * KL + phi * ||c||_1 + beta / (L - l) * sum_k MSE(a_hat^(k), a^(k))
              (also keep the activations at the later hooks k close to the original ones)

with ``c = Enc(a)`` and ``phi = lam / d_in`` (L1 per token, averaged over tokens, divided by the
*input* dimension). Conventions follow the authors' library ``e2e_sae``:

- every MSE is an element mean (``((a_hat - a) ** 2).mean()``, i.e. also divided by d);
- KL is computed per token from log-softmax logits and averaged over batch x position. Its
  direction is KL(p_original || p_spliced): the library calls
  ``F.kl_div(log_softmax(new), log_softmax(orig), log_target=True)``, which is KL(orig || new),
  and it is the same direction as :func:`course_utils.science.lm_saes.kl_to_original`;
- ``beta`` is divided evenly over the downstream hooks;
- the SAE is ``c = ReLU(a W_enc + b_enc)``, ``a_hat = c D + b_dec`` with unit-norm dictionary
  rows ``D``. Unit norm is a *reparametrisation*: the forward pass normalises ``W_dec`` on every
  call (no projection step after the optimiser); the input is not centred by ``b_dec``;
  ``W_dec`` starts orthogonal, the encoder is untied;
- only the SAE trains: the model is frozen (``requires_grad_(False)``) and the training loop
  asserts that no gradient reaches it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn
from transformer_lens import HookedTransformer

from course_utils.science.hooks import check_hook_name
from course_utils.science.saes import TrainingDiverged

VARIANTS = ("local", "e2e", "e2e_ds")

# ----------------------------------------------------------------------------- the SAE


class E2ESAE(nn.Module):
    """The paper's SAE: ``c = ReLU(x W_enc + b_enc)``, ``x_hat = c normalise(W_dec) + b_dec``.

    Parameter names and shapes follow SAELens (``W_enc [d_in, d_sae]``, ``W_dec [d_sae, d_in]``);
    :func:`export_e2e_sae` writes it as a SAELens ``StandardSAE`` with
    ``apply_b_dec_to_input=False`` and the normalised dictionary.
    """

    def __init__(self, d_in: int, d_sae: int, seed: int = 0):
        super().__init__()
        for name, v in (("d_in", d_in), ("d_sae", d_sae)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}.")
        self.d_in, self.d_sae = d_in, d_sae
        g = torch.Generator().manual_seed(seed)
        W_dec = torch.empty(d_sae, d_in)
        # orthogonal init (as in the library); torch's orthogonal_ has no generator argument
        q, r = torch.linalg.qr(torch.randn(max(d_sae, d_in), min(d_sae, d_in), generator=g))
        q = q * torch.sign(torch.diagonal(r))
        W_dec.copy_(q if d_sae >= d_in else q.T)
        bound = 1 / math.sqrt(d_in)  # nn.Linear's default range, untied from the decoder
        self.W_enc = nn.Parameter((torch.rand(d_in, d_sae, generator=g) * 2 - 1) * bound)
        self.b_enc = nn.Parameter(torch.zeros(d_sae))
        self.W_dec = nn.Parameter(W_dec)
        self.b_dec = nn.Parameter(torch.zeros(d_in))

    @property
    def dictionary(self) -> Float[Tensor, "d_sae d_in"]:
        """The unit-norm dictionary elements (rows), recomputed from ``W_dec`` on every call."""
        return self.W_dec / self.W_dec.norm(dim=-1, keepdim=True).clamp_min(1e-8)

    def encode(self, x: Float[Tensor, "... d_in"]) -> Float[Tensor, "... d_sae"]:
        if x.shape[-1] != self.d_in:
            raise ValueError(
                f"the SAE expects inputs of width d_in={self.d_in}, got shape {tuple(x.shape)}."
            )
        return torch.relu(x @ self.W_enc + self.b_enc)

    def decode(self, c: Float[Tensor, "... d_sae"]) -> Float[Tensor, "... d_in"]:
        return c @ self.dictionary + self.b_dec

    def forward(
        self, x: Float[Tensor, "... d_in"]
    ) -> tuple[Float[Tensor, "... d_in"], Float[Tensor, "... d_sae"]]:
        c = self.encode(x)
        return self.decode(c), c


def export_e2e_sae(
    sae: E2ESAE, folder, hook_name: str, model_name: str = "course-2l", extra_metadata=None
):
    """Write ``sae`` as a SAELens folder (``cfg.json`` + ``sae_weights.safetensors``)."""
    from pathlib import Path

    from sae_lens import StandardSAE, StandardSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    layer = hook_name.split(".")
    metadata = SAEMetadata(
        hook_name=hook_name,
        model_name=model_name,
        hook_layer=int(layer[1]) if layer[0] == "blocks" and layer[1].isdigit() else None,
        **(extra_metadata or {}),
    )
    cfg = StandardSAEConfig(
        d_in=sae.d_in, d_sae=sae.d_sae, apply_b_dec_to_input=False, metadata=metadata
    )
    out = StandardSAE(cfg)
    with torch.no_grad():
        state = {
            "W_enc": sae.W_enc.detach().clone(),
            "b_enc": sae.b_enc.detach().clone(),
            "W_dec": sae.dictionary.detach().clone(),
            "b_dec": sae.b_dec.detach().clone(),
        }
    out.load_state_dict(state, strict=True)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    out.save_model(folder)
    return folder


# ----------------------------------------------------------------------------- splicing


def _check_width(sae, activation: Tensor, hook_name: str) -> None:
    d_in = getattr(sae, "d_in", None)
    if d_in is None and getattr(sae, "cfg", None) is not None:
        d_in = sae.cfg.d_in
    if d_in is not None and activation.shape[-1] != d_in:
        raise ValueError(
            f"the SAE has d_in={d_in} but the activation at {hook_name!r} has width "
            f"{activation.shape[-1]}: it was trained on a different hook (or model)."
        )


def splice_sae(
    model: HookedTransformer,
    sae,
    tokens: Int[Tensor, "batch pos"],
    hook_name: str,
    downstream_hooks: Sequence[str] = (),
) -> tuple[Float[Tensor, "batch pos vocab"], Float[Tensor, "batch pos d_sae"], list[Tensor]]:
    """Reference for exercise 2.1: run ``model`` with ``sae`` spliced in at ``hook_name``.

    Returns the spliced logits, the SAE's latents ``c`` at every position, and the (spliced)
    activations at each of ``downstream_hooks``, in order. Gradients flow from the outputs to
    the SAE's parameters (nothing is run under ``no_grad`` or detached).
    """
    check_hook_name(model, hook_name)
    for name in downstream_hooks:
        check_hook_name(model, name)
    store: dict[str, Tensor] = {}

    def splice(activation: Tensor, hook) -> Tensor:
        _check_width(sae, activation, hook_name)
        c = sae.encode(activation)
        store["c"] = c
        return sae.decode(c)

    def record(activation: Tensor, hook) -> None:
        store[hook.name] = activation

    hooks = [(hook_name, splice)] + [(name, record) for name in downstream_hooks]
    logits = model.run_with_hooks(tokens, fwd_hooks=hooks)
    return logits, store["c"], [store[name] for name in downstream_hooks]


# ----------------------------------------------------------------------------- the losses


def kl_spliced_vs_original(
    new_logits: Float[Tensor, "batch pos vocab"], orig_logits: Float[Tensor, "batch pos vocab"]
) -> Float[Tensor, ""]:
    """Reference for exercise 2.2: KL(p_original || p_spliced) per token, averaged over
    batch x position (nats), from log-softmax of both logits."""
    if new_logits.shape != orig_logits.shape:
        raise ValueError(
            f"new_logits {tuple(new_logits.shape)} and orig_logits {tuple(orig_logits.shape)} "
            "must have the same shape [batch, pos, vocab]."
        )
    log_p = orig_logits.log_softmax(-1)
    log_q = new_logits.log_softmax(-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1).mean()


def sparsity_penalty(c: Float[Tensor, "... d_sae"], lam: float, d_in: int) -> Float[Tensor, ""]:
    """phi * ||c||_1 with phi = lam / d_in: L1 per token, averaged over tokens."""
    return (lam / d_in) * c.abs().sum(-1).mean()


def loss_local(
    x: Float[Tensor, "... d_in"],
    x_hat: Float[Tensor, "... d_in"],
    c: Float[Tensor, "... d_sae"],
    lam: float,
) -> Float[Tensor, ""]:
    """Reference for exercise 2.3: element-mean MSE + (lam / d_in) * mean per-token L1."""
    if x.shape != x_hat.shape:
        raise ValueError(f"x {tuple(x.shape)} and x_hat {tuple(x_hat.shape)} differ in shape.")
    return (x_hat - x).pow(2).mean() + sparsity_penalty(c, lam, x.shape[-1])


def loss_e2e(
    new_logits: Float[Tensor, "batch pos vocab"],
    orig_logits: Float[Tensor, "batch pos vocab"],
    c: Float[Tensor, "batch pos d_sae"],
    lam: float,
    d_in: int,
) -> Float[Tensor, ""]:
    """Reference for exercise 2.4: KL(original || spliced) + (lam / d_in) * mean per-token L1."""
    return kl_spliced_vs_original(new_logits, orig_logits) + sparsity_penalty(c, lam, d_in)


def loss_e2e_ds(
    new_logits: Float[Tensor, "batch pos vocab"],
    orig_logits: Float[Tensor, "batch pos vocab"],
    c: Float[Tensor, "batch pos d_sae"],
    lam: float,
    d_in: int,
    new_downstream: Sequence[Tensor],
    orig_downstream: Sequence[Tensor],
    beta: float,
    kl_coeff: float = 0.5,
) -> Float[Tensor, ""]:
    """Reference for exercise 2.5: kl_coeff * KL + sparsity + beta / n * sum of element-mean MSEs
    at the n downstream hooks (the paper's beta / (L - l))."""
    if len(new_downstream) != len(orig_downstream) or not new_downstream:
        raise ValueError(
            f"need the same, non-zero number of spliced and original downstream activations, got "
            f"{len(new_downstream)} and {len(orig_downstream)}."
        )
    n = len(new_downstream)
    mse = sum((a - b).pow(2).mean() for a, b in zip(new_downstream, orig_downstream, strict=True))
    kl = kl_spliced_vs_original(new_logits, orig_logits)
    return kl_coeff * kl + sparsity_penalty(c, lam, d_in) + (beta / n) * mse


# ----------------------------------------------------------------------------- training


@dataclass(frozen=True)
class TrainConfig:
    """One training run (frozen, like the library's pydantic configs)."""

    variant: str  # "local", "e2e" or "e2e_ds"
    lam: float  # sparsity coefficient lambda; phi = lam / d_in
    hook_name: str = "blocks.1.hook_resid_pre"
    downstream_hooks: tuple[str, ...] = ("blocks.1.hook_resid_mid", "blocks.1.hook_resid_post")
    beta: float = 2.5  # e2e_ds: total weight of the downstream MSEs (paper: 2.5 at layers 2, 6)
    kl_coeff: float = 0.5  # e2e_ds: weight of the KL term (paper: 0.5)
    lr: float = 1e-3
    steps: int = 400
    warmup_steps: int = 20
    min_lr_frac: float = 0.1  # cosine decay to 10% of lr
    # Clipping at 1 fires for every objective: the first steps of all three (norms 5-18), ~4% of
    # local's steps, and 10-100% of e2e / e2e+ds steps (more at larger lam; the shipped sweep
    # records the fraction per run). At 10 it never fired.
    grad_clip: float = 1.0
    log_every: int = 10
    extra: dict = field(default_factory=dict, compare=False)

    def __post_init__(self):
        if self.variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {self.variant!r}.")
        if self.variant == "e2e_ds" and not self.downstream_hooks:
            raise ValueError("variant 'e2e_ds' needs at least one downstream hook.")
        if not self.lam >= 0:
            raise ValueError(f"lam must be >= 0, got {self.lam}.")
        here = _resid_position(self.hook_name)
        for name in self.downstream_hooks if self.variant == "e2e_ds" else ():
            there = _resid_position(name)
            if here is not None and there is not None and there <= here:
                raise ValueError(
                    f"downstream hook {name!r} is not after the SAE's hook {self.hook_name!r}: "
                    "the e2e+ds loss compares activations *later* in the spliced run."
                )


def _resid_position(hook_name: str) -> tuple[int, int] | None:
    """(layer, 0/1/2 for resid_pre/mid/post) of a residual-stream hook; None for other hooks."""
    import re

    m = re.fullmatch(r"blocks\.(\d+)\.hook_resid_(pre|mid|post)", hook_name)
    return None if m is None else (int(m.group(1)), ("pre", "mid", "post").index(m.group(2)))


def lr_at(step: int, steps: int, lr: float, warmup_steps: int, min_lr_frac: float = 0.1) -> float:
    """Linear warm-up over ``warmup_steps``, then cosine decay from lr to ``min_lr_frac * lr``."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    span = max(1, steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return lr * (min_lr_frac + (1 - min_lr_frac) * 0.5 * (1 + math.cos(math.pi * progress)))


def _stop_layer(hook_names: Sequence[str]) -> int | None:
    layers = []
    for name in hook_names:
        parts = name.split(".")
        if parts[0] != "blocks":
            return None
        layers.append(int(parts[1]))
    return max(layers) + 1


def sae_loss(
    model: HookedTransformer, sae, tokens: Tensor, cfg: TrainConfig, clean: dict | None = None
) -> tuple[Tensor, dict]:
    """The loss of one variant on one batch of tokens (the shared core of the training loop).

    ``clean`` may hold the frozen model's outputs on ``tokens`` (``"logits"`` and every hook's
    activation) so that several SAEs share one clean forward pass; it is computed when absent.
    Returns the loss and the latents ``c``.
    """
    if clean is None:
        clean = clean_run(model, tokens, cfg)
    d_in = sae.d_in
    if cfg.variant == "local":
        x = clean[cfg.hook_name]
        x_hat, c = sae(x)
        return loss_local(x, x_hat, c, cfg.lam), {"c": c}
    ds = cfg.downstream_hooks if cfg.variant == "e2e_ds" else ()
    logits, c, new_ds = splice_sae(model, sae, tokens, cfg.hook_name, ds)
    # the same sums as loss_e2e / loss_e2e_ds, with the KL computed once (it is also logged)
    kl = kl_spliced_vs_original(logits, clean["logits"])
    sparsity = sparsity_penalty(c, cfg.lam, d_in)
    if cfg.variant == "e2e":
        loss = kl + sparsity
    else:
        n = len(ds)
        mse = sum((a - clean[name]).pow(2).mean() for a, name in zip(new_ds, ds, strict=True))
        loss = cfg.kl_coeff * kl + sparsity + (cfg.beta / n) * mse
    return loss, {"c": c, "kl": kl.item()}


@torch.no_grad()
def clean_run(model: HookedTransformer, tokens: Tensor, cfg: TrainConfig) -> dict[str, Tensor]:
    """The frozen model's logits and activations at the SAE hook and the downstream hooks."""
    names = [cfg.hook_name, *cfg.downstream_hooks]
    logits, cache = model.run_with_cache(tokens, names_filter=lambda n: n in names)
    return {"logits": logits, **{n: cache[n] for n in names}}


def freeze(model: HookedTransformer) -> HookedTransformer:
    """requires_grad False on every parameter of the model (only the SAE trains)."""
    model.requires_grad_(False)
    return model


def _assert_frozen(model: HookedTransformer) -> None:
    leaked = [name for name, p in model.named_parameters() if p.grad is not None]
    if leaked:
        raise RuntimeError(
            f"gradients reached the frozen model ({len(leaked)} parameters, e.g. {leaked[0]}): "
            "call model.requires_grad_(False) before training."
        )


def train_saes(
    model: HookedTransformer,
    saes: Sequence[nn.Module],
    cfgs: Sequence[TrainConfig],
    batches: Callable[[], Tensor],
    progress: bool = True,
    desc: str = "SAE",
    state_file=None,
    save_every: int = 200,
) -> list[dict[str, list]]:
    """Train several SAEs in lockstep on the same token batches (one clean forward per batch).

    Each SAE has its own Adam optimiser, learning-rate schedule (:func:`lr_at`) and gradient
    clipping; all must share ``hook_name`` and ``steps``. A non-finite loss stops the run with
    :class:`~course_utils.science.saes.TrainingDiverged` naming the step. Histories hold, every
    ``log_every`` steps, ``loss``, ``l0`` (positions > 0) and ``kl`` (e2e variants).

    ``state_file`` makes a long run resumable (a CPU build that outlasts one sitting): every
    ``save_every`` steps the SAEs, optimisers and histories are saved there; a later call with the
    same arguments loads it, draws (and skips) the batches already used, and goes on, so the result
    equals one uninterrupted run.
    """
    from tqdm.auto import tqdm

    if len(saes) != len(cfgs) or not saes:
        raise ValueError(f"got {len(saes)} SAEs and {len(cfgs)} configs: need one config each.")
    steps = cfgs[0].steps
    if any(c.steps != steps or c.hook_name != cfgs[0].hook_name for c in cfgs):
        raise ValueError("SAEs trained in lockstep must share steps and hook_name.")
    from course_utils.science.saelens_io import check_sae_fits

    for cfg in cfgs:
        check_hook_name(model, cfg.hook_name)
        for name in cfg.downstream_hooks:
            check_hook_name(model, name)
    for sae in saes:
        check_sae_fits(model, cfgs[0].hook_name, sae.d_in)
    freeze(model)
    union = TrainConfig(
        "local",
        0.0,
        cfgs[0].hook_name,
        tuple(dict.fromkeys(h for c in cfgs for h in c.downstream_hooks)),
    )
    opts = [
        torch.optim.Adam(sae.parameters(), lr=cfg.lr) for sae, cfg in zip(saes, cfgs, strict=False)
    ]
    histories: list[dict[str, list]] = [
        {"step": [], "loss": [], "l0": [], "kl": [], "grad_norm": [], "clipped": 0} for _ in saes
    ]
    start, tokens_seen, first = time.perf_counter(), 0, 0
    if state_file is not None and Path(state_file).is_file():
        first, tokens_seen = _load_train_state(state_file, saes, opts, histories, cfgs)
        for _ in range(first):  # the batch supply is seeded: replay it to where the run stopped
            batches()
    bar = tqdm(range(first, steps), disable=not progress, desc=desc, mininterval=2.0)
    for step in bar:
        tokens = batches()
        tokens_seen += tokens.numel()
        clean = clean_run(model, tokens, union)
        for sae, cfg, opt, hist in zip(saes, cfgs, opts, histories, strict=False):
            for group in opt.param_groups:
                group["lr"] = lr_at(step, steps, cfg.lr, cfg.warmup_steps, cfg.min_lr_frac)
            loss, info = sae_loss(model, sae, tokens, cfg, clean)
            if not torch.isfinite(loss):
                raise TrainingDiverged(
                    f"the {cfg.variant} loss (lam={cfg.lam}) became {loss.item()} at step {step}: "
                    "try a lower learning rate (lr), a smaller lam, or check the inputs for "
                    "NaN/inf."
                )
            opt.zero_grad()
            loss.backward()
            if step == 0:
                _assert_frozen(model)
            # the norm before clipping: how often the clip fires is part of the recipe's record
            grad_norm = torch.nn.utils.clip_grad_norm_(sae.parameters(), cfg.grad_clip).item()
            hist["clipped"] += grad_norm > cfg.grad_clip
            opt.step()
            if step % cfg.log_every == 0 or step == steps - 1:
                hist["step"].append(step)
                hist["grad_norm"].append(grad_norm)
                hist["loss"].append(loss.item())
                hist["l0"].append((info["c"][:, 1:] > 0).float().sum(-1).mean().item())
                hist["kl"].append(info.get("kl", float("nan")))
        if progress and histories[0]["l0"]:
            h = histories[-1]
            bar.set_postfix(L0=f"{h['l0'][-1]:.1f}", KL=f"{h['kl'][-1]:.3f}", refresh=False)
        if state_file is not None and ((step + 1) % save_every == 0 or step == steps - 1):
            _save_train_state(state_file, step + 1, tokens_seen, saes, opts, histories, cfgs)
    seconds = time.perf_counter() - start
    for hist in histories:
        hist["tokens"] = tokens_seen
        hist["seconds"] = seconds
    return histories


def train_sae(
    model: HookedTransformer,
    sae: nn.Module,
    cfg: TrainConfig,
    batches: Callable[[], Tensor],
    progress: bool = True,
) -> dict[str, list]:
    """Train one SAE with ``cfg`` (see :func:`train_saes`)."""
    return train_saes(model, [sae], [cfg], batches, progress, desc=cfg.variant)[0]


def _save_train_state(path, done, tokens_seen, saes, opts, histories, cfgs) -> None:
    state = {
        "done": done,
        "tokens_seen": tokens_seen,
        "cfgs": [repr(c) for c in cfgs],
        "saes": [sae.state_dict() for sae in saes],
        "opts": [opt.state_dict() for opt in opts],
        "histories": histories,
    }
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(path).with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)  # never leave a half-written state behind


def _load_train_state(path, saes, opts, histories, cfgs) -> tuple[int, int]:
    state = torch.load(path, weights_only=False)
    if state["cfgs"] != [repr(c) for c in cfgs] or len(state["saes"]) != len(saes):
        raise ValueError(
            f"{path} was saved by a run with other settings; delete it to start afresh, or "
            "resume with the settings it was saved with."
        )
    for sae, opt, sd, od in zip(saes, opts, state["saes"], state["opts"], strict=True):
        sae.load_state_dict(sd)
        opt.load_state_dict(od)
    for hist, saved in zip(histories, state["histories"], strict=True):
        hist.update(saved)
    return state["done"], state["tokens_seen"]


def token_batches(windows: Tensor, batch_size: int, seed: int = 0) -> Callable[[], Tensor]:
    """An endless, seeded supply of shuffled batches of windows (a new order every epoch)."""
    from course_utils.science.activations import iterate_batches

    state = {"epoch": 0, "it": iterate_batches(windows, batch_size, True, seed, drop_last=True)}

    def next_batch() -> Tensor:
        try:
            return next(state["it"])
        except StopIteration:
            state["epoch"] += 1
            state["it"] = iterate_batches(
                windows, batch_size, True, seed + state["epoch"], drop_last=True
            )
            return next(state["it"])

    return next_batch


# ----------------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate_sae(
    model: HookedTransformer,
    sae,
    tokens: Int[Tensor, "batch pos"],
    hook_name: str,
    downstream_hooks: Sequence[str] = (),
    batch_size: int = 32,
) -> dict[str, float]:
    """Every number of the comparison on held-out ``tokens`` (the SAE spliced at all positions).

    ``ce_clean``, ``ce_sae``, ``ce_increase``, ``kl`` (KL(original || spliced), per token);
    ``l0`` and ``alive`` (elements that fire at least once) on positions > 0;
    ``mse`` at the SAE's hook and ``mse_<hook>`` at each downstream hook (element mean, positions
    > 0, spliced run vs clean run); ``norm_ratio`` = mean over positions > 0 of
    ||a_hat|| / ||a||, and ``norm_ratio_<hook>`` likewise downstream.
    """
    from course_utils.science.lm_saes import _ce

    check_hook_name(model, hook_name)
    names = [hook_name, *downstream_hooks]
    sums: dict[str, float] = {}
    fired = None
    n_batches = 0
    for start in range(0, len(tokens), batch_size):
        chunk = tokens[start : start + batch_size]
        clean_logits, cache = model.run_with_cache(chunk, names_filter=lambda n: n in names)
        logits, c, new_ds = splice_sae(model, sae, chunk, hook_name, downstream_hooks)
        a = cache[hook_name][:, 1:]
        a_hat = sae.decode(c[:, 1:])
        f = (c[:, 1:] > 0).reshape(-1, c.shape[-1])
        fired = f.any(0) if fired is None else fired | f.any(0)
        numbers = {
            "ce_clean": _ce(clean_logits, chunk),
            "ce_sae": _ce(logits, chunk),
            "kl": kl_spliced_vs_original(logits, clean_logits).item(),
            "l0": f.float().sum(-1).mean().item(),
            "mse": (a_hat - a).pow(2).mean().item(),
            "norm_ratio": (a_hat.norm(dim=-1) / a.norm(dim=-1)).mean().item(),
        }
        for name, new in zip(downstream_hooks, new_ds, strict=True):
            orig = cache[name][:, 1:]
            numbers[f"mse_{name}"] = (new[:, 1:] - orig).pow(2).mean().item()
            numbers[f"norm_ratio_{name}"] = (
                (new[:, 1:].norm(dim=-1) / orig.norm(dim=-1)).mean().item()
            )
        for k, v in numbers.items():
            sums[k] = sums.get(k, 0.0) + v * len(chunk)
        n_batches += len(chunk)
    out = {k: v / n_batches for k, v in sums.items()}
    out["ce_increase"] = out["ce_sae"] - out["ce_clean"]
    out["alive"] = float(fired.sum().item())
    return out


def max_cosine_within(W_dec: Float[Tensor, "d_sae d_in"]) -> Float[Tensor, " d_sae"]:
    """For each dictionary element, its largest cosine similarity with any *other* element."""
    if W_dec.ndim != 2 or W_dec.shape[0] < 2:
        raise ValueError(
            f"W_dec must be [d_sae, d_in] with at least two elements, got {tuple(W_dec.shape)}."
        )
    if (W_dec.norm(dim=-1) == 0).any():
        raise ValueError("W_dec has an all-zero row: its cosine with other elements is undefined.")
    unit = W_dec / W_dec.norm(dim=-1, keepdim=True).clamp_min(1e-8)
    cos = unit @ unit.T
    cos.fill_diagonal_(-float("inf"))
    return cos.max(-1).values


def max_cosine_across(
    W_dec_a: Float[Tensor, "d_sae_a d_in"], W_dec_b: Float[Tensor, "d_sae_b d_in"]
) -> Float[Tensor, " d_sae_a"]:
    """For each element of A, its largest cosine similarity with any element of B."""
    from course_utils.science.lm_saes import decoder_cosine_matches

    if W_dec_a.shape[-1] != W_dec_b.shape[-1]:
        raise ValueError(
            f"dictionaries of different widths: {tuple(W_dec_a.shape)} vs {tuple(W_dec_b.shape)}."
        )
    return decoder_cosine_matches(W_dec_a, W_dec_b)


# ----------------------------------------------------------------------------- the shipped sweep

#: The recipe of ``python -m course_utils.assets build-e2e`` (the lambda sweep of chapter 04).
SWEEP = {
    "hook_name": "blocks.1.hook_resid_pre",
    "downstream_hooks": ["blocks.1.hook_resid_mid", "blocks.1.hook_resid_post"],
    "d_sae": 512,
    "steps": 800,
    "batch_windows": 4,
    "lr": 2e-3,
    "warmup_steps": 40,
    "beta": 2.5,
    "kl_coeff": 0.5,
    "grad_clip": 1.0,
    "lams": {
        "local": [0.25, 0.5, 1.0, 2.0, 4.0, 8.0],
        "e2e": [0.5, 1.0, 2.0, 4.0, 8.0],
        "e2e_ds": [0.5, 1.0, 2.0, 4.0, 8.0],
    },
    "stability_seed": 1,
    "seed": 0,
    "eval_windows": 64,
}
#: Recipe of ``python -m course_utils.assets build-e2e-plateau``: is the e2e/local gap in the
#: paper's regime (L0/d ~0.09, L0 ~12 here) a property of the objectives, or of a short run? Local
#: at two lambdas that bracket e2e's L0 and e2e at one, every run in two initialisation seeds (same
#: batches), each trained for every entry of ``steps`` (its own schedule: warm-up, cosine decay).
PLATEAU = {
    **{k: v for k, v in SWEEP.items() if k not in ("lams", "stability_seed", "steps")},
    "lams": {"local": [4.0, 8.0], "e2e": [8.0]},
    "seeds": [0, 1],
    "steps": [800, 3200, 12800],
}
PLATEAU_FILE = "e2e_plateau.json"
#: Shipped checkpoints: one per variant, matched on CE-loss increase (see ``select_matched``).
SHIPPED = {
    "local": "course-2l-e2e-local",
    "e2e": "course-2l-e2e-e2e",
    "e2e_ds": "course-2l-e2e-e2eds",
}
TABLE_FILE = "e2e_sweep.json"


def select_matched(rows: list[dict]) -> dict[str, dict]:
    """Pick one run per variant matched on CE-loss increase.

    Rule: the target is the median CE increase of the e2e runs; for every variant, the run whose
    CE increase is closest to it (ties -> the smaller lambda).
    """
    e2e = sorted(r["ce_increase"] for r in rows if r["variant"] == "e2e")
    target = e2e[len(e2e) // 2]
    out = {}
    for variant in VARIANTS:
        runs = [r for r in rows if r["variant"] == variant]
        out[variant] = min(runs, key=lambda r: (abs(r["ce_increase"] - target), r["lam"]))
    return out


def build_e2e(out_root, table_path, recipe: dict | None = None, log=print, threads: int = 1):
    """Run the lambda sweep for the three variants (same batches for all), evaluate every run on
    validation windows, write the table (JSON) and ship the matched checkpoints in SAELens format.
    """
    import json
    from pathlib import Path

    from course_utils.science.activations import corpus_windows
    from course_utils.science.models import load_model

    recipe = {**SWEEP, **(recipe or {})}
    torch.set_num_threads(threads)
    start = time.perf_counter()
    model = load_model("course-2l")
    windows = corpus_windows(model, "train")
    hook, ds = recipe["hook_name"], tuple(recipe["downstream_hooks"])
    saes, cfgs = [], []
    for variant in VARIANTS:
        for lam in recipe["lams"][variant]:
            cfgs.append(
                TrainConfig(
                    variant,
                    float(lam),
                    hook,
                    ds,
                    recipe["beta"],
                    recipe["kl_coeff"],
                    recipe["lr"],
                    recipe["steps"],
                    recipe["warmup_steps"],
                    grad_clip=recipe["grad_clip"],
                    log_every=max(1, recipe["steps"] // 10),
                )
            )
            saes.append(E2ESAE(model.cfg.d_model, recipe["d_sae"], seed=recipe["seed"]))
    batches = token_batches(windows, recipe["batch_windows"], seed=recipe["seed"])
    histories = train_saes(model, saes, cfgs, batches, progress=False)
    for hist in histories:
        hist["clipped_fraction"] = hist["clipped"] / recipe["steps"]
    train_seconds = time.perf_counter() - start
    log(
        f"trained {len(saes)} SAEs on {histories[0]['tokens']} tokens each in {train_seconds:.0f} s"
    )
    val = corpus_windows(model, "validation")[: recipe["eval_windows"]]
    rows = []
    for sae, cfg, hist in zip(saes, cfgs, histories, strict=True):
        numbers = evaluate_sae(model, sae, val, hook, ds)
        within = max_cosine_within(sae.dictionary.detach()).mean().item()
        row = {
            "variant": cfg.variant,
            "lam": cfg.lam,
            **numbers,
            "mean_max_cos_within": within,
            "clipped_fraction": hist["clipped_fraction"],
        }
        row = {k: (round(v, 5) if isinstance(v, float) else v) for k, v in row.items()}
        rows.append(row)
        log(
            f"{cfg.variant:7s} lam {cfg.lam:<5g} L0 {row['l0']:6.1f}  alive {row['alive']:4.0f}  "
            f"CE +{row['ce_increase']:.4f}  KL {row['kl']:.4f}  final train loss "
            f"{hist['loss'][-1]:.4f}"
        )
    matched = select_matched(rows)
    shipped = {}
    for variant, row in matched.items():
        index = rows.index(row)
        name = SHIPPED[variant]
        shipped[variant] = {"name": name, "lam": row["lam"]}
        extra = {
            "course_recipe": {**recipe, "variant": variant, "lam": row["lam"]},
            "course_evaluation": row,
        }
        export_e2e_sae(saes[index], Path(out_root) / name, hook, extra_metadata=extra)
        log(f"shipped {name}: {variant} lam {row['lam']} (CE +{row['ce_increase']:.4f})")
    stability = {}
    if recipe.get("stability_seed") is not None:
        # a second seed of each matched run, same batches, to measure cross-seed stability
        picked = [rows.index(matched[v]) for v in VARIANTS]
        twins = [
            E2ESAE(model.cfg.d_model, recipe["d_sae"], seed=recipe["stability_seed"])
            for _ in picked
        ]
        batches = token_batches(windows, recipe["batch_windows"], seed=recipe["seed"])
        train_saes(model, twins, [cfgs[i] for i in picked], batches, progress=False)
        for variant, i, twin in zip(VARIANTS, picked, twins, strict=True):
            a, b = saes[i].dictionary.detach(), twin.dictionary.detach()
            numbers = evaluate_sae(model, twin, val, hook, ds)
            stability[variant] = {
                "lam": cfgs[i].lam,
                "seed": recipe["stability_seed"],
                "mean_max_cos_to_seed0": round(max_cosine_across(b, a).mean().item(), 5),
                "frac_above_0.9": round((max_cosine_across(b, a) > 0.9).float().mean().item(), 5),
                "l0": round(numbers["l0"], 5),
                "ce_increase": round(numbers["ce_increase"], 5),
            }
            log(f"cross-seed {variant}: {stability[variant]}")
        # cross-type similarity free of the shared initialisation: seed-0 e2e / e2e+ds elements
        # against the seed-1 local dictionary (the sweep starts every run from the same init)
        local_twin = twins[0].dictionary.detach()
        for variant, i in zip(VARIANTS[1:], picked[1:], strict=True):
            best = max_cosine_across(saes[i].dictionary.detach(), local_twin)
            stability[f"{variant}_to_local_seed1"] = {
                "mean_max_cos": round(best.mean().item(), 5),
                "frac_above_0.9": round((best > 0.9).float().mean().item(), 5),
            }
            log(
                f"cross-type {variant} -> local (other seed): {stability[f'{variant}_to_local_seed1']}"
            )
        init = E2ESAE(model.cfg.d_model, recipe["d_sae"], seed=recipe["seed"]).dictionary.detach()
        for variant, i in zip(VARIANTS, picked, strict=True):
            to_init = (saes[i].dictionary.detach() * init).sum(-1)
            stability[variant]["median_cos_to_own_init"] = round(to_init.median().item(), 5)
    total_seconds = time.perf_counter() - start
    table = {
        "recipe": recipe,
        "stability": stability,
        "total_seconds": round(total_seconds, 1),
        "rows": rows,
        "shipped": shipped,
        "train_seconds": round(train_seconds, 1),
        "tokens_per_sae": histories[0]["tokens"],
        "torch_threads": threads,
    }
    Path(table_path).parent.mkdir(parents=True, exist_ok=True)
    Path(table_path).write_text(json.dumps(table, indent=1) + "\n")
    log(format_table(rows))
    return table


def build_plateau(
    table_path, recipe: dict | None = None, log=print, threads: int = 1, state_dir=None
) -> dict:
    """Train :data:`PLATEAU`'s runs (every lambda x seed, once per training length; the runs of one
    length train in lockstep on the same batches), evaluate each on the validation windows and
    write the rows to ``table_path`` (JSON). No weights are kept.

    With ``state_dir`` the build can be stopped and restarted (same command): each length's
    training state is saved there every 200 steps and each finished length's rows once done."""
    import json

    from course_utils.science.activations import corpus_windows
    from course_utils.science.models import load_model

    recipe = {**PLATEAU, **(recipe or {})}
    torch.set_num_threads(threads)
    start = time.perf_counter()
    model = load_model("course-2l")
    windows = corpus_windows(model, "train")
    val = corpus_windows(model, "validation")[: recipe["eval_windows"]]
    hook, ds = recipe["hook_name"], tuple(recipe["downstream_hooks"])
    rows = []
    done_file = Path(state_dir) / "rows.json" if state_dir is not None else None
    for earlier in (Path(table_path), done_file):  # lengths already measured with this recipe
        if earlier is not None and earlier.is_file():
            saved = json.loads(earlier.read_text())
            if _same_but_steps(saved["recipe"], recipe):
                rows += [r for r in saved["rows"] if r["steps"] in recipe["steps"]
                         and not any(r["steps"] == d["steps"] for d in rows)]  # fmt: skip
    for steps in recipe["steps"]:
        if any(r["steps"] == steps for r in rows):
            log(f"{steps} steps: rows measured earlier with this recipe, kept")
            continue
        runs = [(v, float(lam), seed) for v in VARIANTS if v in recipe["lams"]
                for lam in recipe["lams"][v] for seed in recipe["seeds"]]  # fmt: skip
        cfgs = [
            TrainConfig(v, lam, hook, ds, recipe["beta"], recipe["kl_coeff"], recipe["lr"], steps,
                        recipe["warmup_steps"], grad_clip=recipe["grad_clip"],
                        log_every=max(1, steps // 10))
            for v, lam, _ in runs
        ]  # fmt: skip
        saes = [E2ESAE(model.cfg.d_model, recipe["d_sae"], seed=seed) for _, _, seed in runs]
        batches = token_batches(windows, recipe["batch_windows"], seed=recipe["seed"])
        state = Path(state_dir) / f"train_{steps}steps.pt" if state_dir is not None else None
        histories = train_saes(model, saes, cfgs, batches, progress=False, state_file=state)
        for (variant, lam, seed), sae, hist in zip(runs, saes, histories, strict=True):
            numbers = evaluate_sae(model, sae, val, hook, ds)
            row = {"variant": variant, "lam": lam, "seed": seed, "steps": steps,
                   "tokens": hist["tokens"], **numbers,
                   "clipped_fraction": hist["clipped"] / steps,
                   "final_train_loss": hist["loss"][-1]}  # fmt: skip
            rows.append({k: (round(v, 5) if isinstance(v, float) else v) for k, v in row.items()})
            log(f"{steps} steps, {variant} lam {lam:g} seed {seed}: L0 {row['l0']:.1f}, "
                f"CE +{row['ce_increase']:.4f}, clipped {row['clipped_fraction']:.0%}")  # fmt: skip
        log(f"{steps} steps done at {time.perf_counter() - start:.0f} s")
        if done_file is not None:
            done_file.write_text(json.dumps({"recipe": recipe, "rows": rows}, indent=1) + "\n")
            state.unlink(missing_ok=True)
    rows.sort(key=lambda r: r["steps"])
    table = {"recipe": recipe, "rows": rows, "total_seconds": round(time.perf_counter() - start, 1),
             "torch_threads": threads}  # fmt: skip
    Path(table_path).parent.mkdir(parents=True, exist_ok=True)
    Path(table_path).write_text(json.dumps(table, indent=1) + "\n")
    return table


def _same_but_steps(a: dict, b: dict) -> bool:
    import json

    def strip(r: dict) -> dict:
        return json.loads(json.dumps({k: v for k, v in r.items() if k != "steps"}))

    return strip(a) == strip(b)


def _load_committed(path, file_name: str, command: str) -> dict:
    """A committed JSON table under ``course_utils/assets/e2e`` (or ``path``), or a clear error
    naming the asset command that rebuilds it."""
    import json
    from pathlib import Path

    from course_utils.assets import ASSETS_DIR

    path = Path(path) if path is not None else ASSETS_DIR / "e2e" / file_name
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing: rebuild it with `python -m course_utils.assets {command}`."
        )
    return json.loads(path.read_text())


def load_plateau_table(path=None) -> dict:
    """The committed plateau study (``course_utils/assets/e2e/e2e_plateau.json``)."""
    return _load_committed(path, PLATEAU_FILE, "build-e2e-plateau")


def format_table(rows: list[dict]) -> str:
    """The sweep table as fixed-width text (what the build prints and the notebook shows)."""
    head = f"{'variant':8s}{'lambda':>8s}{'L0':>8s}{'alive':>7s}{'CE incr':>9s}{'KL':>8s}"
    head += f"{'MSE':>9s}{'norm':>7s}{'cos':>7s}"
    lines = [head]
    for r in rows:
        lines.append(
            f"{r['variant']:8s}{r['lam']:8g}{r['l0']:8.1f}{r['alive']:7.0f}{r['ce_increase']:9.4f}"
            f"{r['kl']:8.4f}{r['mse']:9.4f}{r['norm_ratio']:7.3f}{r['mean_max_cos_within']:7.3f}"
        )
    return "\n".join(lines)


def load_sweep_table(path=None) -> dict:
    """The committed sweep table (``course_utils/assets/e2e/e2e_sweep.json``)."""
    return _load_committed(path, TABLE_FILE, "build-e2e")
