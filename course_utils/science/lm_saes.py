"""SAEs on a language model (chapter 03; reused by chapters 04-05).

Training pieces (L1 warm-up, learning-rate schedule, decoder normalisation, a training loop over an
:class:`~course_utils.science.activations.ActivationStore`), splicing an SAE into the model with a hook,
and the evaluation numbers: CE loss with the SAE spliced, CE loss recovered relative to zero- and
mean-ablation, KL to the original, feature density. Feature-analysis helpers: max-activating
contexts, logit weights, specificity/sensitivity against a token-set proxy, max neuron correlation.

An "SAE" here is anything with ``encode(x) -> acts`` and ``decode(acts) -> x_hat`` on
``[..., d_in]`` tensors: a SAELens SAE, or :func:`single` around one instance of ours.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

import torch
from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens import HookedTransformer

from course_utils.science import saes as S
from course_utils.science.hooks import check_hook_name

# ----------------------------------------------------------------------------- training pieces


def l1_coefficient(step: int, total_steps: int, final_coeff: float, warmup_frac: float = 0.05):
    """Reference for exercise 1.1: L1 warm-up, linear from 0 to ``final_coeff``, then constant.

    At step s the coefficient is ``final_coeff * min(1, s / (warmup_frac * total_steps))``
    (Anthropic, April 2024 update: warm up the sparsity penalty over the first 5% of training).
    """
    warmup = warmup_frac * total_steps
    if warmup <= 0:
        return float(final_coeff)
    return float(final_coeff) * min(1.0, step / warmup)


def lr_schedule(
    step: int, total_steps: int, peak_lr: float, warmup_steps: int = 0, decay_frac: float = 0.2
) -> float:
    """Reference for exercise 1.2: linear warm-up, constant, linear decay to 0 over the end.

    - ``step < warmup_steps``: ``peak_lr * (step + 1) / warmup_steps``;
    - within the last ``decay_frac * total_steps`` steps: linear from ``peak_lr`` to 0 at the end,
      ``peak_lr * (total_steps - step) / (decay_frac * total_steps)``;
    - otherwise ``peak_lr``.
    """
    if step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    decay_steps = decay_frac * total_steps
    decay_start = total_steps - decay_steps
    if decay_steps > 0 and step >= decay_start:
        return peak_lr * (total_steps - step) / decay_steps
    return peak_lr


@torch.no_grad()
def clip_grad_norm_per_instance(params: Iterable[Tensor], max_norm: float) -> Tensor:
    """Scale each instance's gradients so that their joint L2 norm is at most ``max_norm``.

    Every parameter's first dimension is the instance dimension (the :mod:`course_utils.science.saes`
    convention), so instance ``i`` is clipped on the norm of ``[p.grad[i] for p in params]``
    alone: instances of a sweep stay independent (``torch.nn.utils.clip_grad_norm_`` would clip
    them all on one joint norm). With one instance this is ``clip_grad_norm_`` (same formula,
    ``max_norm / (norm + 1e-6)``). Returns the norms before clipping, one per instance.
    """
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        raise ValueError("no parameter has a gradient: call backward() before clipping.")
    n_instances = grads[0].shape[0]
    if any(g.ndim == 0 or g.shape[0] != n_instances for g in grads):
        shapes = [tuple(g.shape) for g in grads]
        raise ValueError(
            f"every parameter needs the instance dimension first; got gradient shapes {shapes}."
        )
    norms = torch.stack([g.reshape(n_instances, -1).pow(2).sum(-1) for g in grads]).sum(0).sqrt()
    scale = (max_norm / (norms + 1e-6)).clamp(max=1.0)
    for g in grads:
        g.mul_(scale.reshape(-1, *([1] * (g.ndim - 1))))
    return norms


@torch.no_grad()
def normalise_decoder_rows(
    W_dec: Float[Tensor, "inst d_sae d_in"],
) -> Float[Tensor, "inst d_sae d_in"]:
    """Reference for exercise 1.3: every decoder row (one latent's direction) scaled to norm 1."""
    return W_dec / W_dec.norm(dim=-1, keepdim=True).clamp_min(1e-8)


def train_lm_sae(
    sae: S.ReLUSAE,
    batches: Callable[[], Tensor],
    steps: int,
    lr: float = 1e-3,
    l1_warmup_frac: float = 0.05,
    lr_warmup_steps: int = 0,
    lr_decay_frac: float = 0.2,
    log_every: int = 25,
    progress: bool = True,
    seed: int = 0,
    l1_schedule: Callable = l1_coefficient,
    lr_fn: Callable = lr_schedule,
    normalise: Callable = normalise_decoder_rows,
    max_grad_norm: float | None = 1.0,
    desc: str = "SAE",
) -> dict[str, list]:
    """Train a :class:`~course_utils.science.saes.ReLUSAE` on LM activations (all instances at once).

    ``batches()`` returns activations [batch, d_in] — or an ``(x, y)`` pair for a dictionary whose
    ``loss(x, y)`` predicts a target, such as a transcoder (chapter 05 reuses this loop); FVU is
    then measured on ``y``. The L1 coefficient of each instance is warmed
    up from 0 to ``sae.l1_coeff`` (its final value); the learning rate follows ``lr_fn``; decoder
    rows are kept at unit norm (gradient projection, then ``normalise``); each instance's gradient
    norm is clipped at ``max_grad_norm`` (as SAELens's trainer and Anthropic's April 2024 recipe
    do; ``None`` turns it off). Clipping matters here: the first gradients are 50-100x larger than
    later ones and, unclipped, they inflate Adam's second-moment estimate (beta2 = 0.999 remembers
    ~1000 steps), which shrinks every later step. The history holds, every
    ``log_every`` steps, the loss, L0, FVU (on the batch) and the number of latents dead for
    the last 1000 steps; plus ``tokens_per_s``. ``desc`` labels the progress bar.
    """
    from tqdm.auto import tqdm

    torch.manual_seed(seed)
    final_l1 = sae.l1_coeff.clone()
    optimizer = torch.optim.Adam(sae.parameters(), lr=lr, betas=(0.9, 0.999))
    history: dict[str, list] = {"step": [], "loss": [], "l0": [], "fvu": [], "dead": []}
    start, tokens = time.perf_counter(), 0
    bar = tqdm(range(steps), disable=not progress, desc=desc, mininterval=2.0)
    for step in bar:
        batch = batches()
        args = batch if isinstance(batch, tuple) else (batch,)
        target = args[-1]  # what the dictionary reconstructs: x for an SAE, y for a transcoder
        tokens += len(args[0])
        sae.l1_coeff.copy_(final_l1 * l1_schedule(step, steps, 1.0, l1_warmup_frac))
        for group in optimizer.param_groups:
            group["lr"] = lr_fn(step, steps, lr, lr_warmup_steps, lr_decay_frac)
        out = sae.loss(*args)
        if not torch.isfinite(out["loss"]).all():
            raise S.TrainingDiverged(f"the loss became non-finite at step {step}; lower lr.")
        optimizer.zero_grad()
        out["loss"].sum().backward()
        sae.remove_parallel_grad()
        if max_grad_norm is not None:
            clip_grad_norm_per_instance(sae.parameters(), max_grad_norm)
        optimizer.step()
        with torch.no_grad():
            sae.W_dec.data = normalise(sae.W_dec.data)
            fired = (out["acts"] > 0).any(0)
            sae.steps_since_fired += 1
            sae.steps_since_fired[fired] = 0
        if step % log_every == 0 or step == steps - 1:
            with torch.no_grad():
                variance = (target - target.mean(0)).pow(2).sum(-1).mean(0)
                fvu = out["reconstruction"] / variance
                l0 = (out["acts"] > 0).float().sum(-1).mean(0)
                history["step"].append(step)
                history["loss"].append(out["loss"].detach().clone())
                history["l0"].append(l0)
                history["fvu"].append(fvu)
                history["dead"].append(sae.dead_mask(1000).float().sum(-1))
            bar.set_postfix(L0=f"{l0.mean():.1f}", FVU=f"{fvu.mean():.3f}", refresh=False)
    sae.l1_coeff.copy_(final_l1)
    result = {k: (torch.stack(v) if k != "step" else v) for k, v in history.items()}
    result["tokens_per_s"] = tokens / (time.perf_counter() - start)
    return result


# ----------------------------------------------------------------------------- one instance


class single(torch.nn.Module):
    """One instance of a :mod:`course_utils.science.saes` SAE with ``encode``/``decode`` on [..., d_in].

    Chapter 02's SAEs carry an instance dimension (``W_enc [inst, d_in, d_sae]``); this wrapper
    picks one instance and exposes its ``W_enc``, ``b_enc``, ``W_dec``, ``b_dec`` without it,
    with SAELens's shapes (``W_enc [d_in, d_sae]``, ``W_dec [d_sae, d_in]``).
    """

    def __init__(self, sae: S.SAE, instance: int = 0):
        super().__init__()
        self.sae, self.instance = sae, instance
        self.d_in, self.d_sae = sae.d_in, sae.d_sae

    def _full(self, x: Tensor) -> Tensor:
        flat = x.reshape(-1, x.shape[-1]).unsqueeze(1).expand(-1, self.sae.n_instances, -1)
        return flat

    def encode(self, x: Tensor) -> Tensor:
        acts = self.sae.encode(self._full(x))[:, self.instance]
        return acts.reshape(*x.shape[:-1], -1)

    def decode(self, acts: Tensor) -> Tensor:
        i = self.instance
        return acts @ self.sae.W_dec[i] + self.sae.b_dec[i]

    def forward(self, x: Tensor) -> Tensor:
        return self.decode(self.encode(x))

    @property
    def W_dec(self) -> Tensor:
        return self.sae.W_dec[self.instance]

    @property
    def W_enc(self) -> Tensor:
        return self.sae.W_enc[self.instance]

    @property
    def b_enc(self) -> Tensor:
        return self.sae.b_enc[self.instance]

    @property
    def b_dec(self) -> Tensor:
        return self.sae.b_dec[self.instance]


def _d_in(sae) -> int:
    cfg = getattr(sae, "cfg", None)
    return int(cfg.d_in) if cfg is not None else int(sae.d_in)


# ----------------------------------------------------------------------------- splicing


def sae_hook(sae) -> Callable:
    """A forward hook that replaces the activation by the SAE's reconstruction."""

    def hook(activation: Tensor, hook) -> Tensor:
        return sae.decode(sae.encode(activation)).to(activation.dtype)

    return hook


def _check(model: HookedTransformer, hook_name: str, sae=None) -> None:
    check_hook_name(model, hook_name)
    if sae is not None:
        from course_utils.science.saelens_io import check_sae_fits

        check_sae_fits(model, hook_name, _d_in(sae))


@torch.no_grad()
def ce_loss_with_sae(
    model: HookedTransformer, sae, tokens: Int[Tensor, "batch pos"], hook_name: str
) -> float:
    """Reference for exercise 2.1: mean next-token CE loss with the SAE spliced in at hook_name."""
    _check(model, hook_name, sae)
    return model.run_with_hooks(
        tokens, return_type="loss", fwd_hooks=[(hook_name, sae_hook(sae))]
    ).item()


@torch.no_grad()
def mean_activation(
    model: HookedTransformer, tokens: Int[Tensor, "batch pos"], hook_name: str
) -> Float[Tensor, " d"]:
    """Mean activation at ``hook_name`` over every position of ``tokens`` except BOS."""
    _, cache = model.run_with_cache(tokens, names_filter=hook_name, return_type=None)
    act = cache[hook_name][:, 1:]
    return act.reshape(-1, act.shape[-1]).mean(0)


def ce_loss_recovered(clean: float, spliced: float, ablated: float) -> float:
    """Reference for exercise 2.2: (ablated - spliced) / (ablated - clean).

    1 means splicing in the SAE costs nothing; 0 means it is as bad as the ablation.
    """
    if ablated == clean:
        raise ValueError("the ablation does not change the loss: CE recovered is undefined.")
    return (ablated - spliced) / (ablated - clean)


@torch.no_grad()
def evaluate_splice(
    model: HookedTransformer,
    sae,
    tokens: Int[Tensor, "batch pos"],
    hook_name: str,
    mean_tokens: Tensor | None = None,
) -> dict[str, float]:
    """Every splice number at once: clean / SAE / zero- / mean-ablation CE loss, CE recovered
    against both ablations, KL(original || with SAE) per token, L0, FVU and dead fraction."""
    _check(model, hook_name, sae)
    clean_logits, cache = model.run_with_cache(tokens, names_filter=hook_name)
    act = cache[hook_name]
    clean = _ce(clean_logits, tokens)
    sae_logits = model.run_with_hooks(tokens, fwd_hooks=[(hook_name, sae_hook(sae))])
    spliced = _ce(sae_logits, tokens)
    zero = model.run_with_hooks(
        tokens, return_type="loss", fwd_hooks=[(hook_name, lambda a, hook: torch.zeros_like(a))]
    ).item()
    mean = mean_activation(model, tokens if mean_tokens is None else mean_tokens, hook_name)
    mean_abl = model.run_with_hooks(
        tokens,
        return_type="loss",
        fwd_hooks=[(hook_name, lambda a, hook: mean.expand_as(a).clone())],
    ).item()
    kl = kl_to_original(clean_logits, sae_logits)
    flat = act[:, 1:].reshape(-1, act.shape[-1])
    acts = sae.encode(flat)
    x_hat = sae.decode(acts)
    fvu = (x_hat - flat).pow(2).sum() / (flat - flat.mean(0)).pow(2).sum()
    return {
        "ce_clean": clean,
        "ce_sae": spliced,
        "ce_zero_ablation": zero,
        "ce_mean_ablation": mean_abl,
        "ce_recovered_zero": ce_loss_recovered(clean, spliced, zero),
        "ce_recovered_mean": ce_loss_recovered(clean, spliced, mean_abl),
        "kl": kl,
        "l0": (acts > 0).float().sum(-1).mean().item(),
        "fvu": fvu.item(),
        "dead_fraction": (~(acts > 0).any(0)).float().mean().item(),
    }


def _ce(logits: Tensor, tokens: Tensor) -> float:
    logprobs = logits[:, :-1].log_softmax(-1)
    return -logprobs.gather(-1, tokens[:, 1:, None]).mean().item()


def kl_to_original(
    clean_logits: Float[Tensor, "batch pos vocab"], new_logits: Float[Tensor, "batch pos vocab"]
) -> float:
    """Mean over positions of KL(p_clean || p_new), in nats."""
    p = clean_logits.log_softmax(-1)
    q = new_logits.log_softmax(-1)
    return (p.exp() * (p - q)).sum(-1).mean().item()


# ----------------------------------------------------------------------------- feature analysis


@torch.no_grad()
def feature_acts_on(
    model: HookedTransformer,
    sae,
    tokens: Int[Tensor, "batch pos"],
    hook_name: str,
    batch_size: int = 64,
) -> Float[Tensor, "batch pos d_sae"]:
    """Latent activations of ``sae`` on every position of ``tokens`` (BOS set to 0)."""
    _check(model, hook_name, sae)
    out = []
    layer = hook_name.split(".")
    stop = int(layer[1]) + 1 if layer[0] == "blocks" and layer[1].isdigit() else None
    for start in range(0, len(tokens), batch_size):
        chunk = tokens[start : start + batch_size]
        _, cache = model.run_with_cache(
            chunk, names_filter=hook_name, stop_at_layer=stop, return_type=None
        )
        acts = sae.encode(cache[hook_name])
        acts[:, 0] = 0.0
        out.append(acts)
    return torch.cat(out)


def feature_density(acts: Float[Tensor, "n d_sae"]) -> Float[Tensor, " d_sae"]:
    """Fraction of tokens on which each latent fires (> 0)."""
    return (acts.reshape(-1, acts.shape[-1]) > 0).float().mean(0)


def top_activating(
    feature_acts: Float[Tensor, "batch pos"], k: int = 10
) -> tuple[Int[Tensor, " k"], Int[Tensor, " k"], Float[Tensor, " k"]]:
    """Reference for exercise 4.1: (window index, position, value) of the k largest activations.

    Ordered from the largest; ties broken by the lower flat index (window-major).
    """
    if feature_acts.ndim != 2:
        raise ValueError(
            f"feature_acts must be [batch, pos] (one feature), got {tuple(feature_acts.shape)}."
        )
    flat = feature_acts.flatten()
    k = min(k, flat.numel())
    values, index = flat.topk(k)
    pos = feature_acts.shape[1]
    return index // pos, index % pos, values


def logit_weights(
    W_dec: Float[Tensor, "d_sae d_model"], W_U: Float[Tensor, "d_model d_vocab"]
) -> Float[Tensor, "d_sae d_vocab"]:
    """Reference for exercise 4.2: each feature's direct effect on the logits, W_dec @ W_U.

    (Valid for a residual-stream SAE; it ignores the final LayerNorm's scale and later layers.)
    """
    if W_dec.shape[-1] != W_U.shape[0]:
        raise ValueError(
            f"W_dec is {tuple(W_dec.shape)} ([d_sae, d_model]) and W_U is {tuple(W_U.shape)} "
            "([d_model, d_vocab]): the d_model dimensions differ. Logit weights need a "
            "residual-stream SAE."
        )
    return W_dec @ W_U


def specificity_sensitivity(
    feature_acts: Float[Tensor, " n"], proxy: Tensor, threshold: float = 0.0
) -> tuple[float, float]:
    """Reference for exercise 4.3: how well a feature and a boolean proxy agree, token by token.

    - specificity = (activation mass on proxy tokens) / (total activation mass): the fraction
      of what the feature does that the proxy explains (Bricken et al. 2023 weight by activation);
    - sensitivity = fraction of proxy tokens on which the feature fires (> threshold).
    """
    acts = feature_acts.flatten().float()
    proxy = proxy.flatten().bool()
    if acts.shape != proxy.shape:
        raise ValueError(f"feature_acts has {acts.numel()} values but proxy has {proxy.numel()}.")
    mass = acts.clamp_min(0)
    total = mass.sum()
    specificity = (mass[proxy].sum() / total).item() if total > 0 else 0.0
    sensitivity = (acts[proxy] > threshold).float().mean().item() if proxy.any() else 0.0
    return specificity, sensitivity


def max_neuron_correlation(
    feature_acts: Float[Tensor, " n"], neuron_acts: Float[Tensor, "n d_mlp"]
) -> tuple[float, int]:
    """Reference for exercise 4.4: the largest Pearson correlation of a feature with any neuron.

    Returns (correlation, neuron index). A feature that is "just a neuron" scores near 1.
    """
    f = feature_acts.flatten().float()
    n = neuron_acts.reshape(-1, neuron_acts.shape[-1]).float()
    if len(f) != len(n):
        raise ValueError(f"feature_acts has {len(f)} tokens but neuron_acts has {len(n)}.")
    fc = f - f.mean()
    nc = n - n.mean(0)
    denom = fc.norm() * nc.norm(dim=0)
    corr = (fc @ nc) / denom.clamp_min(1e-12)
    corr = torch.where(denom > 0, corr, torch.zeros_like(corr))
    value, index = corr.max(0)
    return value.item(), int(index)


def mass_by_token(
    feature_acts: Float[Tensor, " n"],
    tokens: Int[Tensor, " n"],
    top: int = 8,
    group_of: Int[Tensor, " d_vocab"] | None = None,
) -> list[tuple[int, float, float]]:
    """Where a feature's activation mass goes: its ``top`` tokens by share of the mass.

    Returns ``(token id, share of the feature's activation mass, base rate)`` from the largest
    share down; the base rate is the fraction of all ``n`` tokens that are this token, so a
    share far above its base rate means the feature prefers the token. Activation mass is
    ``feature_acts.clamp_min(0)``, as in specificity. With ``group_of`` (a group id per
    vocabulary entry, e.g. tokens equal up to whitespace) the ids returned are group ids.
    """
    acts = feature_acts.flatten().float()
    tokens = tokens.flatten().long()
    if acts.shape != tokens.shape:
        raise ValueError(
            f"feature_acts has {acts.numel()} values but tokens has {tokens.numel()}: pass one "
            "feature's activations and the tokens they were computed on, aligned."
        )
    if group_of is not None:
        if len(tokens) and int(tokens.max()) >= len(group_of):
            raise ValueError(
                f"token id {int(tokens.max())} is outside group_of ({len(group_of)} entries, "
                "one per vocabulary entry)."
            )
        tokens = group_of.long()[tokens]
    n_ids = int(tokens.max()) + 1 if len(tokens) else 0
    mass = torch.zeros(n_ids).index_add_(0, tokens, acts.clamp_min(0))
    count = torch.bincount(tokens, minlength=n_ids).float()
    total = mass.sum()
    if total <= 0:
        return []
    shares, ids = (mass / total).topk(min(top, int((mass > 0).sum())))
    base = count / len(tokens)
    return [(int(i), float(s), float(base[i])) for s, i in zip(shares, ids, strict=True)]


def token_proxy(tokens: Tensor, token_ids: Iterable[int]) -> Tensor:
    """True where the token is one of ``token_ids``."""
    ids = torch.tensor(sorted(set(token_ids)), dtype=tokens.dtype)
    return torch.isin(tokens, ids)


def decoder_cosine_matches(
    W_dec_a: Float[Tensor, "d_sae d_in"], W_dec_b: Float[Tensor, "d_sae d_in"]
) -> Float[Tensor, " d_sae"]:
    """For each latent of A, the best cosine similarity with any decoder row of B."""
    a = W_dec_a / W_dec_a.norm(dim=-1, keepdim=True).clamp_min(1e-8)
    b = W_dec_b / W_dec_b.norm(dim=-1, keepdim=True).clamp_min(1e-8)
    return (a @ b.T).max(-1).values


# ----------------------------------------------------------------------------- shipped SAEs

#: The recipe of the shipped reference SAEs (``python -m course_utils.assets build-saes``).
REFERENCE = {
    "hook_name": "blocks.0.hook_resid_post",
    "d_sae": 1024,
    "l1_coeff": 4.0,
    "lr": 1e-3,
    "steps": 1500,
    "batch_size": 2048,
    "buffer_tokens": 131072,
    "seeds": (0, 1),
    "eval_windows": 64,
    # Clipped at 1 per SAE, as SAELens's trainer and practitioners do: unclipped, Adam's second
    # moment remembers the huge first gradients and the SAE trains worse (chapter 03, section 3).
    "max_grad_norm": 1.0,
}
REFERENCE_NAMES = ("course-2l-res0-seed0", "course-2l-res0-seed1")
#: The capstone's SAEs on the layer-0 MLP neurons (as Towards Monosemanticity trained its
#: dictionaries): the same recipe at ``blocks.0.mlp.hook_post`` (d_in = d_mlp = 512) with d_sae
#: 512 (as many features as neurons: 1,024 would cost ~4x the residual build's CPU time), stored
#: in float16, 1 MB per seed (``python -m course_utils.assets build-mlp-saes``).
MLP_REFERENCE = {**REFERENCE, "hook_name": "blocks.0.mlp.hook_post", "d_sae": 512}
MLP_REFERENCE_NAMES = ("course-2l-mlp0-seed0", "course-2l-mlp0-seed1")
MLP_WEIGHTS_DTYPE = torch.float16


def build_reference_saes(
    out_root,
    recipe: dict | None = None,
    log=print,
    threads: int = 2,
    names: tuple[str, ...] = REFERENCE_NAMES,
    base: dict | None = None,
    weights_dtype: torch.dtype | None = None,
):
    """Train the reference SAEs (one per seed, same activations) and ship them in SAELens format.

    Deterministic on CPU. Writes ``<out_root>/<name>/cfg.json + sae_weights.safetensors`` and
    returns the evaluation numbers of each (also stored in the SAELens metadata). ``base`` is the
    recipe that ``recipe`` overrides (default :data:`REFERENCE`); ``weights_dtype`` (e.g.
    ``torch.float16``) rounds the trained weights to that type before they are evaluated and
    saved, so the recorded numbers are those of the shipped file (loading upcasts to float32).
    """
    from pathlib import Path

    from course_utils.science.activations import ActivationStore, corpus_windows
    from course_utils.science.models import load_model
    from course_utils.science.saelens_io import export_sae

    recipe = {**(REFERENCE if base is None else base), **(recipe or {})}
    if len(names) != len(recipe["seeds"]):
        raise ValueError(f"{len(names)} names for {len(recipe['seeds'])} seeds: give one per seed.")
    torch.set_num_threads(threads)
    start = time.perf_counter()
    model = load_model("course-2l")
    hook = recipe["hook_name"]
    store = ActivationStore(
        model,
        hook,
        corpus_windows(model, "train"),
        batch_size=recipe["batch_size"],
        buffer_tokens=recipe["buffer_tokens"],
        progress=False,
        seed=0,
    )
    d_in = model.cfg.d_model if "resid" in hook else model.cfg.d_mlp
    saes = []
    for seed in recipe["seeds"]:
        saes.append(S.ReLUSAE(d_in, recipe["d_sae"], 1, l1_coeff=recipe["l1_coeff"], seed=seed))
    # One store, every SAE sees the same batches (so they differ only by their seed).
    stacked = S.ReLUSAE(d_in, recipe["d_sae"], len(saes), l1_coeff=recipe["l1_coeff"])
    with torch.no_grad():
        for i, sae in enumerate(saes):
            for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
                getattr(stacked, name).data[i] = getattr(sae, name).data[0]
    history = train_lm_sae(
        stacked,
        store.next_batch,
        recipe["steps"],
        lr=recipe["lr"],
        progress=False,
        log_every=max(1, recipe["steps"] // 10),
        max_grad_norm=recipe["max_grad_norm"],
    )
    for step, loss, l0 in zip(history["step"], history["loss"], history["l0"], strict=True):
        log(f"step {step:5d}  loss {loss.tolist()}  L0 {[round(v, 1) for v in l0.tolist()]}")
    train_time = time.perf_counter() - start
    log(
        f"trained on {store.tokens_seen} tokens in {train_time:.0f} s "
        f"({history['tokens_per_s']:.0f} SAE tokens/s)"
    )
    if weights_dtype is not None:
        with torch.no_grad():
            for param in stacked.parameters():
                param.copy_(param.to(weights_dtype).float())
    tokens = corpus_windows(model, "validation")[: recipe["eval_windows"]]
    results = {}
    for i, (seed, name) in enumerate(zip(recipe["seeds"], names, strict=True)):
        numbers = evaluate_splice(model, single(stacked, i), tokens, hook)
        numbers = {k: round(v, 5) for k, v in numbers.items()}
        log(f"{name}: {numbers}")
        extra = {
            "course_recipe": {**recipe, "seeds": list(recipe["seeds"]), "seed": seed},
            "course_evaluation": numbers,
            "course_train_seconds": round(train_time, 1),
            "course_tokens": store.tokens_seen,
        }
        if weights_dtype is not None:
            extra["course_weights_dtype"] = str(weights_dtype).removeprefix("torch.")
        export_sae(
            stacked,
            Path(out_root) / name,
            instance=i,
            hook_name=hook,
            extra_metadata=extra,
            weights_dtype=weights_dtype,
        )
        results[name] = numbers
    return results


# ----------------------------------------------------------------------------- SAELens's trainer


def saelens_loss(sae, x: Float[Tensor, "n d_in"], l1_coeff: float) -> dict[str, float]:
    """One scoring function for every trainer: loss, MSE, L0, FVU of ``sae`` on ``x``.

    loss = MSE (squared error summed over d_in, averaged over tokens) + ``l1_coeff`` * sum_i f_i
    ||W_dec,i||: SAELens's training loss, and for a unit-norm decoder (ours) exactly our L1 loss.
    """
    with torch.no_grad():
        acts = sae.encode(x)
        x_hat = sae.decode(acts)
        mse = (x_hat - x).pow(2).sum(-1).mean()
        l1 = (acts * sae.W_dec.norm(dim=-1)).sum(-1).mean()
        return {
            "loss": (mse + l1_coeff * l1).item(),
            "mse": mse.item(),
            "l0": (acts > 0).float().sum(-1).mean().item(),
            "fvu": (mse / (x - x.mean(0)).pow(2).sum(-1).mean()).item(),
        }


def compare_with_saelens_trainer(
    activations: Float[Tensor, "n d_in"],
    held_out: Float[Tensor, "m d_in"],
    d_sae: int = 512,
    l1_coeff: float = 4.0,
    lr: float = 1e-3,
    batch_size: int = 1024,
    l1_warmup_frac: float = 0.05,
    seed: int = 0,
    max_grad_norm: float = 1.0,
    unclipped: bool = True,
) -> dict[str, dict[str, float]]:
    """Train the same ReLU SAE with our loop and with SAELens's ``SAETrainer`` on the same batches.

    Matched: the batches and their order, batch size, Adam (betas 0.9, 0.999), lr (constant, then
    linear decay to 0 over the last 20%), L1 coefficient and its linear warm-up, gradient-norm
    clipping at 1 (SAELens hard-codes it; ours uses ``max_grad_norm``), ``b_dec`` = 0.

    Rows:
    - ``ours``: :func:`train_lm_sae` (unit-norm decoder by projection, plain L1);
    - ``saelens (our init)``: SAELens's ``StandardTrainingSAE`` started from *our* initial weights,
      so only the two loops differ: SAELens leaves the decoder free and penalises
      ``sum_i f_i ||W_dec,i||`` instead of constraining the rows;
    - ``saelens (its init)``: SAELens's own initialisation (kaiming-uniform directions, decoder
      rows scaled to norm 0.1, ``W_enc = W_dec^T``): SAELens as a user would run it;
    - with ``unclipped``, ``ours (no clipping)``: our loop with ``max_grad_norm=None``.

    All rows are scored on ``held_out`` by :func:`saelens_loss`. ``seconds`` covers the training
    loop only (activations are in memory); ``tokens_per_s`` = training tokens / seconds.
    """
    import contextlib
    import io

    from sae_lens import StandardTrainingSAE, StandardTrainingSAEConfig
    from sae_lens.config import LoggingConfig
    from sae_lens.training.sae_trainer import SAETrainer, SAETrainerConfig

    n_steps = len(activations) // batch_size
    if n_steps < 10:
        raise ValueError(
            f"{len(activations)} activations make only {n_steps} batches of {batch_size}; "
            "the comparison needs at least 10."
        )
    d_in = activations.shape[-1]

    def batches():
        for i in range(n_steps):
            yield activations[i * batch_size : (i + 1) * batch_size]

    results: dict[str, dict[str, float]] = {}

    def run_ours(name: str, clip: float | None) -> None:
        sae = S.ReLUSAE(d_in, d_sae, 1, l1_coeff=l1_coeff, seed=seed)
        it = batches()
        start = time.perf_counter()
        train_lm_sae(
            sae,
            lambda: next(it),
            n_steps,
            lr=lr,
            l1_warmup_frac=l1_warmup_frac,
            progress=False,
            log_every=n_steps,
            max_grad_norm=clip,
        )
        results[name] = {"seconds": time.perf_counter() - start, "sae": single(sae, 0)}

    def run_saelens(name: str, init_from_ours: bool) -> None:
        torch.manual_seed(seed)
        cfg = StandardTrainingSAEConfig(
            d_in=d_in,
            d_sae=d_sae,
            l1_coefficient=l1_coeff,
            l1_warm_up_steps=int(l1_warmup_frac * n_steps),
            apply_b_dec_to_input=True,
        )
        theirs = StandardTrainingSAE(cfg)
        if init_from_ours:
            init = S.ReLUSAE(d_in, d_sae, 1, l1_coeff=l1_coeff, seed=seed).instance_state_dict(0)
            with torch.no_grad():
                for key, value in init.items():
                    getattr(theirs, key).data.copy_(value)
        trainer_cfg = SAETrainerConfig(
            total_training_samples=n_steps * batch_size,
            train_batch_size_samples=batch_size,
            lr=lr,
            lr_end=0.0,
            lr_scheduler_name="constant",
            lr_decay_steps=int(0.2 * n_steps),
            logger=LoggingConfig(log_to_wandb=False),
            n_checkpoints=0,
            device="cpu",
            dead_feature_window=1000,
            feature_sampling_window=10**9,
        )
        trainer = SAETrainer(trainer_cfg, theirs, batches())
        start = time.perf_counter()
        with contextlib.redirect_stderr(io.StringIO()):
            trainer.fit()
        results[name] = {"seconds": time.perf_counter() - start, "sae": theirs}

    run_ours("ours", max_grad_norm)
    run_saelens("saelens (our init)", True)
    run_saelens("saelens (its init)", False)
    if unclipped:
        run_ours("ours (no clipping)", None)
    for row in results.values():
        sae = row.pop("sae")
        row.update(saelens_loss(sae, held_out, l1_coeff))
        row["tokens_per_s"] = n_steps * batch_size / row["seconds"]
    return results
