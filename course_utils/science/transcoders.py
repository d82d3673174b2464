"""Transcoders (chapter 05): sparse, wide replacements for an MLP sublayer.

A transcoder reads what the MLP reads and predicts what the MLP writes (Dunefsky, Chlenski, Nanda
2024):

    z      = ReLU(x @ W_enc + b_enc)              x: ``blocks.L.ln2.hook_normalized``
    y_hat  = z @ W_dec + b_dec  (+ x @ W_skip.T)  target: ``blocks.L.hook_mlp_out``
    loss   = ||y - y_hat||^2 + l1_coeff * ||z||_1

Parameters carry a leading instance dimension (a sweep over L1 coefficients is one batched run) and
SAELens names, like :mod:`course_utils.science.saes`:

    W_enc [inst, d_in, d_sae]   b_enc [inst, d_sae]   W_dec [inst, d_sae, d_out]   b_dec [inst, d_out]
    W_skip [inst, d_out, d_in]  (SkipTranscoder only; initialised to zero, Paulo et al. 2025)

Simplifications relative to the reference code (``transcoder_circuits``), chosen on purpose:

- decoder rows ARE kept at unit norm (gradient component parallel to each row removed before the
  step, rows renormalised after it), as in the reference and in our SAEs; the L1 penalty is then
  meaningful without a decoder-norm weighting;
- NO input-side bias: the reference subtracts a learned bias from x before encoding; we do not
  (this is what SAELens's ``Transcoder`` computes, ``apply_b_dec_to_input=False``);
- MSE NOT normalised by the target norm: squared error summed over d_out, averaged over the batch
  (the course convention of :func:`course_utils.science.saes.reconstruction_loss`);
- biases start at zero (not at the data mean); no ghost gradients, no resampling.

About LayerNorm: ``ln2.hook_normalized`` is the centred, scale-normalised residual stream *before*
LayerNorm's weight and bias. The MLP's actual input is an affine function of it, so a transcoder
on ``hook_normalized`` loses nothing, and the same transcoder works on the model with or without
``fold_ln`` (the value at that hook is identical).
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable
from pathlib import Path

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn
from transformer_lens import HookedTransformer

from course_utils.science import lm_saes as LS
from course_utils.science import saes as S
from course_utils.science.activations import ActivationStore
from course_utils.science.hooks import check_hook_name

# ----------------------------------------------------------------------------- hook names


def hook_pair(layer: int) -> tuple[str, str]:
    """(input hook, target hook) of the transcoder for MLP ``layer``."""
    return f"blocks.{layer}.ln2.hook_normalized", f"blocks.{layer}.hook_mlp_out"


def check_hook_pair(model: HookedTransformer, hook_in: str, hook_out: str) -> int:
    """Validate a (transcoder input, transcoder target) hook pair; return the MLP's layer.

    Both names must exist in ``model`` and be ``blocks.L.ln2.hook_normalized`` and
    ``blocks.L.hook_mlp_out`` for the same L. Anything else (``hook_resid_mid``, ``hook_mlp_in``,
    ``mlp.hook_pre``, a different layer ...) raises a ValueError naming the expected pair.
    """
    check_hook_name(model, hook_in)
    check_hook_name(model, hook_out)
    match = re.fullmatch(r"blocks\.(\d+)\.hook_mlp_out", hook_out)
    layer = int(match.group(1)) if match else None
    if layer is None:
        layer_match = re.match(r"blocks\.(\d+)\.", hook_in)
        layer = int(layer_match.group(1)) if layer_match else 0
    expected = hook_pair(layer)
    if (hook_in, hook_out) != expected:
        raise ValueError(
            f"a transcoder replaces one MLP: it reads the MLP's (normalised) input and predicts "
            f"its output. Got input {hook_in!r} and target {hook_out!r}; expected the pair "
            f"{expected[0]!r} -> {expected[1]!r} (the layer-{layer} MLP). "
            "hook_resid_mid / hook_mlp_in are the residual stream before LayerNorm, mlp.hook_pre "
            "and mlp.hook_post are inside the MLP."
        )
    return layer


# ----------------------------------------------------------------------------- functional references


def transcoder_forward(
    x: Float[Tensor, "batch d_in"],
    W_enc: Float[Tensor, "d_in d_sae"],
    b_enc: Float[Tensor, " d_sae"],
    W_dec: Float[Tensor, "d_sae d_out"],
    b_dec: Float[Tensor, " d_out"],
) -> tuple[Float[Tensor, "batch d_sae"], Float[Tensor, "batch d_out"]]:
    """Reference for exercise 1.1: latents ``z = ReLU(x W_enc + b_enc)`` and the prediction
    ``y_hat = z W_dec + b_dec`` (no pre-encoder bias: input and output live in different spaces)."""
    z = torch.relu(x @ W_enc + b_enc)
    return z, z @ W_dec + b_dec


def transcoder_loss(
    x: Float[Tensor, "batch d_in"],
    y: Float[Tensor, "batch d_out"],
    W_enc: Float[Tensor, "d_in d_sae"],
    b_enc: Float[Tensor, " d_sae"],
    W_dec: Float[Tensor, "d_sae d_out"],
    b_dec: Float[Tensor, " d_out"],
    l1_coeff: float,
) -> Float[Tensor, ""]:
    """Reference for exercise 1.2: ``mean_batch ||y - TC(x)||^2 + l1_coeff * mean_batch ||z||_1``
    (squared error summed over d_out, the course convention)."""
    z, y_hat = transcoder_forward(x, W_enc, b_enc, W_dec, b_dec)
    return (y_hat - y).pow(2).sum(-1).mean() + l1_coeff * z.abs().sum(-1).mean()


def skip_transcoder_forward(
    x: Float[Tensor, "batch d_in"],
    W_enc: Float[Tensor, "d_in d_sae"],
    b_enc: Float[Tensor, " d_sae"],
    W_dec: Float[Tensor, "d_sae d_out"],
    b_dec: Float[Tensor, " d_out"],
    W_skip: Float[Tensor, "d_out d_in"],
) -> tuple[Float[Tensor, "batch d_sae"], Float[Tensor, "batch d_out"]]:
    """Reference for exercise 1.3: the transcoder plus a linear skip, ``y_hat = z W_dec + b_dec +
    x W_skip^T`` (``W_skip`` is [d_out, d_in], SAELens's layout)."""
    z, y_hat = transcoder_forward(x, W_enc, b_enc, W_dec, b_dec)
    return z, y_hat + x @ W_skip.T


@torch.no_grad()
def transcoder_pair(
    model: HookedTransformer, tokens: Int[Tensor, "batch pos"], layer: int
) -> tuple[Float[Tensor, "batch pos d_model"], Float[Tensor, "batch pos d_model"]]:
    """Reference for exercise 1.4: (input, target) of MLP ``layer``'s transcoder from one forward
    pass: ``blocks.L.ln2.hook_normalized`` and ``blocks.L.hook_mlp_out``."""
    if not isinstance(layer, int) or not 0 <= layer < model.cfg.n_layers:
        raise ValueError(f"layer must be an int in [0, {model.cfg.n_layers}), got {layer!r}.")
    hook_in, hook_out = hook_pair(layer)
    check_hook_pair(model, hook_in, hook_out)
    _, cache = model.run_with_cache(
        tokens, names_filter=[hook_in, hook_out], stop_at_layer=layer + 1
    )
    return cache[hook_in], cache[hook_out]


# ----------------------------------------------------------------------------- the modules


class Transcoder(nn.Module):
    """ReLU transcoder with an L1 penalty, ``n_instances`` independent copies at once."""

    has_skip = False

    def __init__(
        self,
        d_in: int,
        d_sae: int,
        d_out: int | None = None,
        n_instances: int = 1,
        l1_coeff: float | Tensor | list = 1e-3,
        seed: int | None = 0,
    ):
        super().__init__()
        d_out = d_in if d_out is None else d_out
        for name, v in (
            ("d_in", d_in),
            ("d_sae", d_sae),
            ("d_out", d_out),
            ("n_instances", n_instances),
        ):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}.")
        self.d_in, self.d_sae, self.d_out, self.n_instances = d_in, d_sae, d_out, n_instances
        g = torch.Generator().manual_seed(seed) if seed is not None else None
        W_dec = torch.randn(n_instances, d_sae, d_out, generator=g)
        W_dec = W_dec / W_dec.norm(dim=-1, keepdim=True)
        # Input and output spaces differ, so no tied init: encoder like nn.Linear.
        W_enc = (torch.rand(n_instances, d_in, d_sae, generator=g) * 2 - 1) / math.sqrt(d_in)
        self.W_enc = nn.Parameter(W_enc)
        self.b_enc = nn.Parameter(torch.zeros(n_instances, d_sae))
        self.W_dec = nn.Parameter(W_dec)
        self.b_dec = nn.Parameter(torch.zeros(n_instances, d_out))
        self.register_buffer("l1_coeff", S._per_instance(l1_coeff, n_instances, "l1_coeff"))
        self.register_buffer("steps_since_fired", torch.zeros(n_instances, d_sae, dtype=torch.long))

    # -- shapes
    def _as_batch(self, t: Tensor, width: int, what: str) -> Float[Tensor, "batch inst d"]:
        shape = tuple(t.shape)
        if t.ndim == 2 and t.shape[-1] == width:
            t = t.unsqueeze(1).expand(-1, self.n_instances, -1)
        if t.ndim != 3 or t.shape[-1] != width or t.shape[1] != self.n_instances:
            raise ValueError(
                f"{what} has shape {shape}, but this transcoder expects [batch, {width}] or "
                f"[batch, n_instances, {width}] = [batch, {self.n_instances}, {width}] "
                f"(d_in={self.d_in}: the width of ln2.hook_normalized = d_model; "
                f"d_out={self.d_out}: the width of hook_mlp_out = d_model)."
            )
        return t

    # -- forward
    def pre_acts(self, x: Float[Tensor, "batch inst d_in"]) -> Float[Tensor, "batch inst d_sae"]:
        return torch.einsum("bid,ids->bis", x, self.W_enc) + self.b_enc

    def encode(self, x: Tensor) -> Float[Tensor, "batch inst d_sae"]:
        return torch.relu(self.pre_acts(self._as_batch(x, self.d_in, "the input x")))

    def decode(self, acts: Float[Tensor, "batch inst d_sae"]) -> Float[Tensor, "batch inst d_out"]:
        return torch.einsum("bis,iso->bio", acts, self.W_dec) + self.b_dec

    def skip(self, x: Float[Tensor, "batch inst d_in"]) -> Float[Tensor, "batch inst d_out"] | int:
        return 0

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(acts [batch, inst, d_sae], y_hat [batch, inst, d_out]); x may omit the instance dim."""
        x = self._as_batch(x, self.d_in, "the input x")
        acts = torch.relu(self.pre_acts(x))
        return acts, self.decode(acts) + self.skip(x)

    def loss(self, x: Tensor, y: Tensor) -> dict[str, Tensor]:
        """Per-instance losses (total, reconstruction, sparsity) plus acts and y_hat."""
        x = self._as_batch(x, self.d_in, "the input x")
        y = self._as_batch(y, self.d_out, "the target y")
        if len(x) != len(y):
            raise ValueError(f"x has {len(x)} rows but y has {len(y)}: they must be paired.")
        acts, y_hat = self.forward(x)
        recon = S.reconstruction_loss(y, y_hat)
        sparsity = self.l1_coeff * acts.abs().sum(-1).mean(0)
        return {
            "loss": recon + sparsity,
            "reconstruction": recon,
            "sparsity": sparsity,
            "acts": acts,
            "y_hat": y_hat,
        }

    # -- decoder constraint
    @torch.no_grad()
    def normalise_decoder(self) -> None:
        self.W_dec.data = LS.normalise_decoder_rows(self.W_dec.data)

    @torch.no_grad()
    def remove_parallel_grad(self) -> None:
        if self.W_dec.grad is not None:
            self.W_dec.grad = S.remove_parallel_grad(self.W_dec.data, self.W_dec.grad)

    def dead_mask(self, window: int) -> Tensor:
        return self.steps_since_fired >= window

    # -- export
    def instance_state_dict(self, instance: int) -> dict[str, Tensor]:
        """One instance's weights under SAELens names."""
        if not 0 <= instance < self.n_instances:
            raise ValueError(
                f"instance {instance} out of range for n_instances={self.n_instances}."
            )
        names = ("W_enc", "b_enc", "W_dec", "b_dec") + (("W_skip",) if self.has_skip else ())
        return {n: getattr(self, n).detach()[instance].clone() for n in names}


class SkipTranscoder(Transcoder):
    """Transcoder with a linear skip connection: ``y_hat = W_dec z + W_skip x + b_dec``.

    ``W_skip`` [inst, d_out, d_in] starts at zero (SAELens's convention and shape).
    """

    has_skip = True

    def __init__(self, d_in, d_sae, d_out=None, n_instances=1, l1_coeff=1e-3, seed=0):
        super().__init__(d_in, d_sae, d_out, n_instances, l1_coeff, seed)
        self.W_skip = nn.Parameter(torch.zeros(n_instances, self.d_out, self.d_in))

    def skip(self, x):
        return torch.einsum("bid,iod->bio", x, self.W_skip)


class single(nn.Module):
    """One instance of a :class:`Transcoder` on [..., d_in] tensors, like a SAELens Transcoder.

    ``encode(x) -> z``, ``decode(z) -> W_dec z + b_dec``, ``forward(x) -> y_hat`` (skip included).
    """

    def __init__(self, tc: Transcoder, instance: int = 0):
        super().__init__()
        if not 0 <= instance < tc.n_instances:
            raise ValueError(f"instance {instance} out of range for n_instances={tc.n_instances}.")
        self.tc, self.instance = tc, instance
        self.d_in, self.d_sae, self.d_out = tc.d_in, tc.d_sae, tc.d_out

    def _check(self, x: Tensor) -> None:
        if x.shape[-1] != self.d_in:
            raise ValueError(
                f"the transcoder reads [..., d_in={self.d_in}] (ln2.hook_normalized), got "
                f"{tuple(x.shape)}."
            )

    def encode(self, x: Tensor) -> Tensor:
        self._check(x)
        return torch.relu(x @ self.W_enc + self.b_enc)

    def decode(self, z: Tensor) -> Tensor:
        return z @ self.W_dec + self.b_dec

    def forward(self, x: Tensor) -> Tensor:
        out = self.decode(self.encode(x))
        if self.W_skip is not None:
            out = out + x @ self.W_skip.T
        return out

    def __getattr__(self, name):
        if name in ("W_enc", "b_enc", "W_dec", "b_dec"):
            return getattr(self.tc, name)[self.instance]
        if name == "W_skip":
            return self.tc.W_skip[self.instance] if self.tc.has_skip else None
        return super().__getattr__(name)


def as_single(tc, instance: int = 0):
    """A transcoder usable on [..., d_in]: ours (wrapped) or a SAELens Transcoder (unchanged)."""
    if isinstance(tc, Transcoder):
        return single(tc, instance)
    for attr in ("encode", "decode", "W_enc", "W_dec"):
        if not hasattr(tc, attr):
            raise TypeError(f"expected a transcoder, got {type(tc).__name__} (no {attr}).")
    return tc


def widths(tc) -> tuple[int, int, int]:
    """(d_in, d_sae, d_out) of ours or a SAELens transcoder."""
    tc = as_single(tc)
    W_enc, W_dec = tc.W_enc, tc.W_dec
    return int(W_enc.shape[-2]), int(W_enc.shape[-1]), int(W_dec.shape[-1])


def check_fits(model: HookedTransformer, tc, layer: int) -> None:
    """Clear error when a transcoder's widths do not match MLP ``layer``'s hooks."""
    from course_utils.science.saelens_io import hook_width

    hook_in, hook_out = hook_pair(layer)
    check_hook_name(model, hook_in)
    d_in, d_sae, d_out = widths(tc)
    w_in, w_out = hook_width(model, hook_in), hook_width(model, hook_out)
    if (d_in, d_out) != (w_in, w_out):
        raise ValueError(
            f"the transcoder maps [.., {d_in}] -> [.., {d_out}] (d_sae={d_sae}), but MLP {layer} "
            f"reads {hook_in!r} of width {w_in} and writes {hook_out!r} of width {w_out}. "
            "It was trained on another model (or is not a transcoder for this MLP)."
        )
    metadata = getattr(getattr(tc, "cfg", None), "metadata", None)
    trained = (getattr(metadata, "hook_name", None), getattr(metadata, "hook_name_out", None))
    if trained[0] is not None and trained[1] is None:
        raise ValueError(
            f"this is an SAE on {trained[0]!r} (its cfg.metadata has no hook_name_out), not a "
            f"transcoder: it reconstructs {trained[0]!r} instead of predicting "
            f"{hook_out!r} from {hook_in!r}. Use the transcoder trained for layer {layer}."
        )
    if trained[0] is not None and trained != (hook_in, hook_out):
        raise ValueError(
            f"this transcoder was trained on {trained[0]!r} -> {trained[1]!r} (its "
            f"cfg.metadata), but you are applying it to MLP {layer}, which needs {hook_in!r} -> "
            f"{hook_out!r}. Use the transcoder trained for layer {layer}."
        )


# ----------------------------------------------------------------------------- paired activations


class PairedActivationStore(ActivationStore):
    """Shuffled (input, target) pairs for a transcoder, both from ONE forward pass.

    The two activations of each token are stored side by side in one buffer (so shuffling keeps
    them paired); :meth:`next_pair` splits them.

    >>> store = PairedActivationStore(model, *hook_pair(0), windows, batch_size=1024)
    >>> x, y = store.next_pair()   # [1024, d_model] each: ln2.hook_normalized, hook_mlp_out
    """

    def __init__(self, model, hook_in: str, hook_out: str, windows, **kwargs):
        self.layer = check_hook_pair(model, hook_in, hook_out)
        self.hook_in, self.hook_out = hook_in, hook_out
        super().__init__(model, hook_out, windows, **kwargs)
        self.d_in = self.d_out = None

    @torch.no_grad()
    def get_activations(self, tokens: Int[Tensor, "batch pos"]) -> Float[Tensor, "batch pos d"]:
        stored: dict[str, Tensor] = {}

        def save(activation: Tensor, hook) -> None:
            stored[hook.name] = activation.detach()

        self.model.run_with_hooks(
            tokens.to(self.device),
            fwd_hooks=[(self.hook_in, save), (self.hook_out, save)],
            stop_at_layer=self.layer + 1,
            return_type=None,
        )
        x, y = stored[self.hook_in], stored[self.hook_out]
        self.d_in, self.d_out = x.shape[-1], y.shape[-1]
        return torch.cat([x, y], dim=-1)

    def next_pair(self) -> tuple[Float[Tensor, "batch d_in"], Float[Tensor, "batch d_out"]]:
        both = self.next_batch()
        return both[:, : self.d_in], both[:, self.d_in :]


# ----------------------------------------------------------------------------- training


def train_transcoder(
    tc: Transcoder,
    pairs: Callable[[], tuple[Tensor, Tensor]],
    steps: int,
    max_grad_norm: float | None = 1.0,
    **options,
) -> dict[str, list]:
    """Train every instance of ``tc`` on ``pairs() -> (x [batch, d_in], y [batch, d_out])``.

    The chapter-03 loop itself, :func:`~course_utils.science.lm_saes.train_lm_sae` (Adam, L1 warm-up, lr
    schedule, unit-norm decoder by projection); ``options`` are its keyword arguments (``lr``,
    ``log_every``, ``progress``, ...), with the same per-instance gradient-norm clipping at 1 by
    default (chapter 03 shows what training without it costs; ``None`` turns it off, which is how
    the shipped transcoders were trained, see ``assets/saes/README.md``). The history holds, every
    ``log_every`` steps, loss, L0, FVU of the target (on the batch) and the number of latents dead
    for the last 1000 steps; plus ``tokens_per_s``.
    """
    options.setdefault("desc", type(tc).__name__)
    return LS.train_lm_sae(tc, pairs, steps, max_grad_norm=max_grad_norm, **options)


# ----------------------------------------------------------------------------- splicing


def transcoder_hooks(model: HookedTransformer, transcoders: dict) -> list[tuple[str, Callable]]:
    """Forward hooks replacing MLP L's output by ``transcoders[L]`` applied to ln2's output.

    ``transcoders`` maps layer -> transcoder (ours, one instance, or a SAELens Transcoder).
    The MLP still runs; only its output is overwritten.
    """
    if not isinstance(transcoders, dict) or not transcoders:
        raise ValueError("transcoders must be a non-empty dict {layer: transcoder}.")
    hooks = []
    for layer, tc in transcoders.items():
        check_fits(model, tc, layer)
        tc1 = as_single(tc)
        hook_in, hook_out = hook_pair(layer)
        stash: dict[str, Tensor] = {}

        def save(act, hook, stash=stash):
            stash["x"] = act

        def replace(act, hook, stash=stash, tc1=tc1):
            return tc1(stash["x"]).to(act.dtype)

        hooks += [(hook_in, save), (hook_out, replace)]
    return hooks


@torch.no_grad()
def ce_loss_with_transcoders(
    model: HookedTransformer, tokens: Int[Tensor, "batch pos"], transcoders: dict
) -> float:
    """Mean next-token CE loss with each MLP in ``transcoders`` replaced by its transcoder."""
    return model.run_with_hooks(
        tokens, return_type="loss", fwd_hooks=transcoder_hooks(model, transcoders)
    ).item()


@torch.no_grad()
def evaluate_transcoders(
    model: HookedTransformer, tokens: Int[Tensor, "batch pos"], transcoders: dict
) -> dict[str, float]:
    """Clean / spliced / MLPs-zero-ablated CE loss, CE recovered, KL; per-layer L0, FVU, dead."""
    hooks = transcoder_hooks(model, transcoders)
    names = [n for layer in transcoders for n in hook_pair(layer)]
    clean_logits, cache = model.run_with_cache(tokens, names_filter=lambda n: n in names)
    clean = LS._ce(clean_logits, tokens)
    new_logits = model.run_with_hooks(tokens, fwd_hooks=hooks)
    spliced = LS._ce(new_logits, tokens)
    zero = model.run_with_hooks(
        tokens,
        return_type="loss",
        fwd_hooks=[
            (hook_pair(layer)[1], lambda a, hook: torch.zeros_like(a)) for layer in transcoders
        ],
    ).item()
    out = {
        "ce_clean": clean,
        "ce_transcoders": spliced,
        "ce_zero_ablation": zero,
        "ce_recovered_zero": LS.ce_loss_recovered(clean, spliced, zero),
        "kl": LS.kl_to_original(clean_logits, new_logits),
    }
    for layer, tc in transcoders.items():
        tc1 = as_single(tc)
        hook_in, hook_out = hook_pair(layer)
        x = cache[hook_in][:, 1:].reshape(-1, cache[hook_in].shape[-1])
        y = cache[hook_out][:, 1:].reshape(-1, cache[hook_out].shape[-1])
        z = tc1.encode(x)
        y_hat = tc1(x)
        out[f"l0_{layer}"] = (z > 0).float().sum(-1).mean().item()
        out[f"fvu_{layer}"] = ((y_hat - y).pow(2).sum() / (y - y.mean(0)).pow(2).sum()).item()
        out[f"dead_fraction_{layer}"] = (~(z > 0).any(0)).float().mean().item()
    return out


# ----------------------------------------------------------------------------- SAELens


def to_saelens(
    tc: Transcoder,
    instance: int = 0,
    layer: int = 0,
    model_name: str = "course-2l",
    model: HookedTransformer | None = None,
    extra_metadata: dict | None = None,
):
    """One instance as a SAELens ``Transcoder`` / ``SkipTranscoder`` (identical outputs)."""
    from sae_lens import SkipTranscoder as LensSkip
    from sae_lens import Transcoder as LensTC
    from sae_lens.saes.sae import SAEMetadata
    from sae_lens.saes.transcoder import SkipTranscoderConfig, TranscoderConfig

    if not isinstance(tc, Transcoder):
        raise TypeError(
            f"expected a course_utils.science.transcoders.Transcoder, got {type(tc).__name__}."
        )
    if model is not None:
        check_fits(model, single(tc, instance), layer)
    hook_in, hook_out = hook_pair(layer)
    metadata = SAEMetadata(
        hook_name=hook_in,
        hook_name_out=hook_out,
        hook_layer=layer,
        hook_layer_out=layer,
        model_name=model_name,
        **(extra_metadata or {}),
    )
    cls, cfg_cls = (LensSkip, SkipTranscoderConfig) if tc.has_skip else (LensTC, TranscoderConfig)
    cfg = cfg_cls(
        d_in=tc.d_in, d_sae=tc.d_sae, d_out=tc.d_out, apply_b_dec_to_input=False, metadata=metadata
    )
    out = cls(cfg)
    out.load_state_dict(
        {k: v.float() for k, v in tc.instance_state_dict(instance).items()}, strict=True
    )
    out.eval()
    return out


def export_transcoder(tc, folder, instance: int = 0, **kwargs) -> Path:
    """Write one instance as a SAELens folder (cfg.json + sae_weights.safetensors)."""
    from sae_lens import SAE as LensSAE

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lens = tc if isinstance(tc, LensSAE) else to_saelens(tc, instance, **kwargs)
    lens.save_model(folder)
    return folder


def load_transcoder(folder, device: str = "cpu"):
    """Read a transcoder folder back with SAELens (``SAE.load_from_disk``)."""
    from sae_lens import SAE as LensSAE
    from sae_lens import Transcoder as LensTC

    folder = Path(folder)
    if not (folder / "cfg.json").is_file():
        raise FileNotFoundError(f"{folder} has no cfg.json: not a SAELens folder.")
    out = LensSAE.load_from_disk(folder, device=device)
    if not isinstance(out, LensTC):
        raise ValueError(f"{folder} holds a {type(out).__name__}, not a transcoder.")
    return out


# ----------------------------------------------------------------------------- shipped transcoders


class MultiHookStore(ActivationStore):
    """Shuffled activations at several hooks of ONE forward pass, kept row-aligned."""

    def __init__(self, model, hook_names: list[str], windows, **kwargs):
        for name in hook_names:
            check_hook_name(model, name)
        self.hook_names = list(hook_names)
        layers = [int(n.split(".")[1]) for n in hook_names]
        super().__init__(model, hook_names[layers.index(max(layers))], windows, **kwargs)
        self.widths: list[int] = []

    @torch.no_grad()
    def get_activations(self, tokens):
        stored: dict[str, Tensor] = {}

        def save(activation, hook):
            stored[hook.name] = activation.detach()

        self.model.run_with_hooks(
            tokens.to(self.device),
            fwd_hooks=[(n, save) for n in self.hook_names],
            stop_at_layer=self._stop_layer(),
            return_type=None,
        )
        acts = [stored[n] for n in self.hook_names]
        self.widths = [a.shape[-1] for a in acts]
        return torch.cat(acts, dim=-1)

    def next_split(self) -> list[Tensor]:
        return list(self.next_batch().split(self.widths, dim=-1))


#: Recipe of the shipped transcoders and of the L1 sweep
#: (``python -m course_utils.assets build-transcoders``). One run trains every (family, layer,
#: coefficient) of ``sweep`` on the same batches (a family is one instance-batched module per
#: layer), writes the sweep table and ships the four dictionaries named in ``shipped``.
REFERENCE = {
    "d_sae": 1024,
    "lr": 1e-3,
    "steps": 600,
    "batch_size": 1024,
    "buffer_tokens": 65536,
    "seed": 0,
    "eval_windows": 64,
    # Each dictionary's gradient norm clipped at 1, as in PARETO below (unclipped they train worse:
    # chapter 03, section 3).
    "max_grad_norm": 1.0,
    # L1 coefficients per family, one list per layer. Layer 1's MLP output is smaller, so the same
    # coefficient gives a much sparser (and partly dead) dictionary there: the grids differ.
    "sweep": {
        "tc": [[1.5, 3.0, 6.0, 12.0], [0.5, 1.0, 2.0, 4.0]],
        "sae": [[1.5, 3.0, 6.0, 12.0], [0.5, 1.0, 2.0, 4.0]],
        "skip": [[], []],
    },
    # shipped name key -> (family, layer, L1 coefficient); must be a point of the sweep
    "shipped": {
        "tc0": ["tc", 0, 3.0],
        "tc1": ["tc", 1, 1.0],
        "sae0": ["sae", 0, 3.0],
        "sae1": ["sae", 1, 1.0],
    },
}
#: Recipe of chapter 05's Pareto comparison (``python -m course_utils.assets build-transcoder-pareto``):
#: transcoders, skip transcoders and MLP-out SAEs trained alike — same batches, steps, schedule,
#: per-instance gradient clipping at 1 — at the shipped sweep's L1 coefficients, once per seed of
#: the initialisation (the batches are the same for every seed). Written to :data:`PARETO_TABLE`.
PARETO = {
    **{k: v for k, v in REFERENCE.items() if k not in ("sweep", "shipped", "seed")},
    "max_grad_norm": 1.0,
    "seeds": [0, 1000],
    # a dose-response in training length for the two families the paper compares
    "dose_response": {"steps": [300, 1200], "families": ["tc", "sae"], "seed": 0},
    "sweep": {
        "tc": [[1.5, 3.0, 6.0, 12.0], [0.5, 1.0, 2.0, 4.0]],
        "sae": [[1.5, 3.0, 6.0, 12.0], [0.5, 1.0, 2.0, 4.0]],
        "skip": [[1.5, 3.0, 6.0, 12.0], [0.5, 1.0, 2.0, 4.0]],
    },
}
PARETO_TABLE = "transcoder_pareto.csv"
REFERENCE_NAMES = {
    "tc0": "course-2l-tc0",
    "tc1": "course-2l-tc1",
    "sae0": "course-2l-mlpout0",
    "sae1": "course-2l-mlpout1",
}
#: The sweep's table, next to the shipped dictionaries (one row per trained dictionary).
SWEEP_TABLE = "transcoder_sweep.csv"
SWEEP_COLUMNS = (
    "family", "layer", "l1_coeff", "l0", "fvu", "ce_clean", "ce_spliced", "ce_increase",
    "ce_recovered_zero", "kl", "dead_fraction",
)  # fmt: skip
PARETO_COLUMNS = ("steps", "seed", *SWEEP_COLUMNS)
FAMILY_NAMES = {"tc": "transcoder", "skip": "skip transcoder", "sae": "MLP-out SAE"}


def make_dictionaries(family: str, d_model: int, d_sae: int, coeffs: list[float], seed: int):
    """One instance-batched module of ``family`` ("tc", "skip" or "sae"), one instance per L1
    coefficient. Transcoders read ln2's output and predict hook_mlp_out; the SAE reads and
    reconstructs hook_mlp_out."""
    n = len(coeffs)
    if family == "tc":
        return Transcoder(d_model, d_sae, d_model, n, l1_coeff=coeffs, seed=seed)
    if family == "skip":
        return SkipTranscoder(d_model, d_sae, d_model, n, l1_coeff=coeffs, seed=seed)
    if family == "sae":
        return S.ReLUSAE(d_model, d_sae, n, l1_coeff=coeffs, seed=seed)
    raise ValueError(f"unknown family {family!r}; expected one of {sorted(FAMILY_NAMES)}.")


def train_on_shared_batches(
    modules: dict,
    next_batch: Callable[[], list[Tensor]],
    steps: int,
    lr: float,
    log=print,
    max_grad_norm: float | None = 1.0,
) -> None:
    """Train several dictionaries on the SAME batches (one model forward pass feeds them all).

    ``modules`` maps a key to ``(module, args)``, where ``args(batch) -> tuple`` gives the module's
    ``loss`` arguments from ``next_batch()``'s tensors. Schedule as :func:`train_transcoder` (L1
    warm-up over 5%, lr decayed over the last 20%, unit-norm decoder by projection).
    ``max_grad_norm`` clips each dictionary's gradient norm: per instance for an instance-batched
    module, the whole module otherwise (a cross-layer transcoder is one dictionary: its leading
    axis is its layer, not an instance). ``None`` trains unclipped (worse: chapter 03).
    """
    opts = {k: torch.optim.Adam(m.parameters(), lr=lr) for k, (m, _) in modules.items()}
    final = {k: m.l1_coeff.clone() for k, (m, _) in modules.items()}
    for step in range(steps):
        batch = next_batch()
        scale = LS.l1_coefficient(step, steps, 1.0)
        this_lr = LS.lr_schedule(step, steps, lr)
        losses = {}
        for key, (m, args) in modules.items():
            m.l1_coeff.copy_(final[key] * scale)
            for group in opts[key].param_groups:
                group["lr"] = this_lr
            out = m.loss(*args(batch))
            if not torch.isfinite(out["loss"]).all():
                raise S.TrainingDiverged(f"{key}: the loss became non-finite at step {step}.")
            opts[key].zero_grad()
            out["loss"].sum().backward()
            m.remove_parallel_grad()
            # one instance (or a CLT, one dictionary over layers): clipping the whole module is
            # clipping that instance
            if max_grad_norm is not None and getattr(m, "n_instances", 1) > 1:
                LS.clip_grad_norm_per_instance(m.parameters(), max_grad_norm)
            elif max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(m.parameters(), max_grad_norm)
            opts[key].step()
            m.normalise_decoder()
            losses[key] = [round(v, 2) for v in out["loss"].detach().tolist()]
        if step % max(1, steps // 10) == 0 or step == steps - 1:
            log(f"step {step:5d}  loss {losses}")
    for key, (m, _) in modules.items():
        m.l1_coeff.copy_(final[key])


@torch.no_grad()
def evaluate_dictionary(model, module, family: str, layer: int, tokens) -> dict[str, float]:
    """Splice one dictionary (a single instance) into ``model``: one row of the sweep table."""
    if family == "sae":
        n = LS.evaluate_splice(model, module, tokens, hook_pair(layer)[1])
        ce, l0, fvu, dead = n["ce_sae"], n["l0"], n["fvu"], n["dead_fraction"]
    else:
        n = evaluate_transcoders(model, tokens, {layer: module})
        ce, l0 = n["ce_transcoders"], n[f"l0_{layer}"]
        fvu, dead = n[f"fvu_{layer}"], n[f"dead_fraction_{layer}"]
    row = {
        "family": family,
        "layer": layer,
        "l1_coeff": float(module.tc.l1_coeff[module.instance] if family != "sae"
                          else module.sae.l1_coeff[module.instance]),
        "l0": l0,
        "fvu": fvu,
        "ce_clean": n["ce_clean"],
        "ce_spliced": ce,
        "ce_increase": ce - n["ce_clean"],
        "ce_recovered_zero": n["ce_recovered_zero"],
        "kl": n["kl"],
        "dead_fraction": dead,
    }  # fmt: skip
    return {k: (round(v, 5) if isinstance(v, float) else v) for k, v in row.items()}


def write_sweep_table(rows: list[dict], path, columns=SWEEP_COLUMNS) -> Path:
    import csv

    path = Path(path)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    return path


def read_sweep_table(path=None) -> list[dict]:
    """The shipped sweep (or ``path``) as a list of dicts with numbers parsed."""
    return _read_table(path, SWEEP_TABLE, "build-transcoders")


def read_pareto_table(path=None) -> list[dict]:
    """Chapter 05's Pareto sweep (:data:`PARETO`; or ``path``): one dict per (seed, family, layer,
    L1 coefficient), numbers parsed."""
    return _read_table(path, PARETO_TABLE, "build-transcoder-pareto")


def _read_table(path, default_name: str, command: str) -> list[dict]:
    import csv

    if path is None:
        from course_utils.assets import ASSETS_DIR
        from course_utils.science.models import SAE_ASSETS

        path = ASSETS_DIR / SAE_ASSETS / default_name
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} does not exist: run `python -m course_utils.assets {command}`."
        )
    with path.open() as f:
        rows = list(csv.DictReader(f))
    ints = ("layer", "seed", "steps")
    return [
        {k: (v if k == "family" else int(v) if k in ints else float(v)) for k, v in r.items()}
        for r in rows
    ]


def _loss_args(family: str, layer: int) -> Callable:
    """From a :class:`MultiHookStore` batch [x0, y0, x1, y1] to the module's ``loss`` arguments:
    (x, y) for a transcoder, (y,) for the SAE on hook_mlp_out."""
    if family == "sae":
        return lambda b: (b[2 * layer + 1],)
    return lambda b: (b[2 * layer], b[2 * layer + 1])


def _sweep_modules(recipe: dict, d_model: int, seed: int, log=print) -> dict:
    """One instance-batched module per (family, layer) of ``recipe["sweep"]``, one instance per L1
    coefficient, initialised from ``seed`` (offset by layer and family so that none share an init)."""
    modules = {}
    for f_index, (family, per_layer) in enumerate(recipe["sweep"].items()):
        for layer, coeffs in enumerate(per_layer):
            if not coeffs:
                continue
            init = seed + 10 * layer + f_index
            m = make_dictionaries(
                family, d_model, recipe["d_sae"], [float(c) for c in coeffs], init
            )
            modules[(family, layer)] = (m, _loss_args(family, layer))
    log(
        f"training {sum(m.n_instances for m, _ in modules.values())} dictionaries "
        f"({', '.join(f'{f}{layer}x{m.n_instances}' for (f, layer), (m, _) in modules.items())})"
    )
    return modules


def build_reference_transcoders(
    out_root, recipe: dict | None = None, log=print, threads: int = 2
) -> dict:
    """Train the L1 sweep (transcoders, skip transcoders and equal-width ReLU SAEs on
    ``hook_mlp_out``, both layers, all on the same batches), write the sweep table
    (:data:`SWEEP_TABLE`) and ship the four dictionaries of ``recipe["shipped"]`` in SAELens format.
    Returns {shipped name: evaluation} plus "both" (both shipped transcoders spliced at once)."""
    from course_utils.science.activations import corpus_windows
    from course_utils.science.models import load_model
    from course_utils.science.saelens_io import export_sae

    recipe = {**REFERENCE, **(recipe or {})}
    torch.set_num_threads(threads)
    start = time.perf_counter()
    model = load_model("course-2l")
    store = MultiHookStore(
        model,
        [*hook_pair(0), *hook_pair(1)],
        corpus_windows(model, "train"),
        batch_size=recipe["batch_size"],
        buffer_tokens=recipe["buffer_tokens"],
        progress=False,
        seed=0,
    )
    modules = _sweep_modules(recipe, model.cfg.d_model, recipe["seed"], log)
    train_on_shared_batches(
        modules, store.next_split, recipe["steps"], recipe["lr"], log, recipe["max_grad_norm"]
    )
    train_time = time.perf_counter() - start
    log(f"trained on {store.tokens_seen} tokens in {train_time:.0f} s")

    tokens = corpus_windows(model, "validation")[: recipe["eval_windows"]]
    rows, singles = [], {}
    for (family, layer), (m, _) in modules.items():
        for i in range(m.n_instances):
            one = LS.single(m, i) if family == "sae" else single(m, i)
            row = evaluate_dictionary(model, one, family, layer, tokens)
            log(", ".join(f"{k} {v}" for k, v in row.items()))
            rows.append(row)
            singles[(family, layer, row["l1_coeff"])] = (one, row)
    Path(out_root).mkdir(parents=True, exist_ok=True)
    write_sweep_table(rows, Path(out_root) / SWEEP_TABLE)

    # no wall-clock time in the files: they must be byte-identical when rebuilt (it is logged)
    common = {"course_recipe": recipe, "course_tokens": store.tokens_seen}
    chosen = {}
    for key, (family, layer, coeff) in recipe["shipped"].items():
        if (family, layer, float(coeff)) not in singles:
            raise ValueError(f"shipped {key} = {family, layer, coeff} is not a point of the sweep.")
        chosen[key] = singles[(family, layer, float(coeff))]
    pair = {layer: chosen[f"tc{layer}"][0] for layer in (0, 1)}
    both = {k: round(v, 5) for k, v in evaluate_transcoders(model, tokens, pair).items()}
    log(f"both shipped transcoders spliced: {both}")
    results = {"both": both}
    for key, (one, row) in chosen.items():
        family, layer = row["family"], row["layer"]
        name = REFERENCE_NAMES[key]
        extra = {**common, "course_evaluation": row}
        if family == "sae":
            export_sae(one.sae, Path(out_root) / name, instance=one.instance,
                       hook_name=hook_pair(layer)[1], extra_metadata=extra)  # fmt: skip
        else:
            extra["course_evaluation_both_spliced"] = both
            export_transcoder(one.tc, Path(out_root) / name, instance=one.instance, layer=layer,
                              extra_metadata=extra)  # fmt: skip
        results[name] = row
    return results


def build_transcoder_pareto(out_csv, recipe: dict | None = None, log=print, threads: int = 1):
    """Chapter 05's fair Pareto sweep: every family of ``recipe["sweep"]`` trained alike (same
    batches, schedule and clipping) for ``recipe["steps"]``, once per initialisation seed; then
    the dose-response runs of ``recipe["dose_response"]`` (other step budgets, some families, one
    seed). Writes one row per dictionary (:data:`PARETO_COLUMNS`) to ``out_csv`` after every run
    and returns the rows. Ships no weights."""
    from course_utils.science.activations import corpus_windows
    from course_utils.science.models import load_model

    recipe = {**PARETO, **(recipe or {})}
    torch.set_num_threads(threads)
    model = load_model("course-2l")
    tokens = corpus_windows(model, "validation")[: recipe["eval_windows"]]
    runs = [(recipe["steps"], seed, list(recipe["sweep"])) for seed in recipe["seeds"]]
    dose = recipe.get("dose_response") or {}
    runs += [(steps, dose["seed"], dose["families"]) for steps in dose.get("steps", [])]
    rows = []
    for steps, seed, families in runs:
        rows += pareto_run(model, tokens, recipe, steps, seed, families, log)
        Path(out_csv).parent.mkdir(parents=True, exist_ok=True)
        write_sweep_table(rows, out_csv, PARETO_COLUMNS)
    return rows


def pareto_run(model, tokens, recipe: dict, steps: int, seed: int, families, log=print) -> list:
    """Train ``families`` of ``recipe["sweep"]`` for ``steps`` from init ``seed`` on the fixed
    batch order, and evaluate each dictionary spliced into ``model`` on ``tokens``."""
    from course_utils.science.activations import corpus_windows

    start = time.perf_counter()
    store = MultiHookStore(  # shuffling seed fixed: every run sees the same batches
        model, [*hook_pair(0), *hook_pair(1)], corpus_windows(model, "train"),
        batch_size=recipe["batch_size"], buffer_tokens=recipe["buffer_tokens"],
        progress=False, seed=0,
    )  # fmt: skip
    # family order (and so each module's init seed) is the recipe's, whatever subset is trained
    sub = {**recipe, "sweep": {f: (c if f in families else [[], []])
                               for f, c in recipe["sweep"].items()}}  # fmt: skip
    modules = _sweep_modules(sub, model.cfg.d_model, seed, log)
    train_on_shared_batches(
        modules, store.next_split, steps, recipe["lr"], log, recipe["max_grad_norm"]
    )
    log(
        f"{steps} steps, seed {seed}: {store.tokens_seen} tokens in {time.perf_counter() - start:.0f} s"
    )
    rows = []
    for (family, layer), (m, _) in modules.items():
        for i in range(m.n_instances):
            one = LS.single(m, i) if family == "sae" else single(m, i)
            row = {"steps": steps, "seed": seed,
                   **evaluate_dictionary(model, one, family, layer, tokens)}  # fmt: skip
            log(", ".join(f"{k} {v}" for k, v in row.items()))
            rows.append(row)
    return rows
