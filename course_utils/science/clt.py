"""Cross-layer transcoders (chapter 07): one dictionary that replaces every MLP at once.

A cross-layer transcoder (CLT; Ameisen et al. 2025, "Circuit Tracing") has one group of features
per layer. A layer-l feature reads what MLP l reads and writes to the outputs of MLP l AND of every
later MLP, with a separate decoder vector per target layer:

    a^l      = JumpReLU_theta(x^l @ W_enc^l + b_enc^l)          x^l: ``blocks.l.ln2.hook_normalized``
    y_hat^l  = b_dec^l + sum_{s <= l} a^s @ W_dec^{s -> l}       target: ``blocks.l.hook_mlp_out``
    loss     = sum_l ||y_hat^l - y^l||^2  +  lambda * sum_l sum_i tanh(c * ||W_dec,i^l|| * a_i^l)
             (+ a small pre-activation term that keeps features from dying; see ``loss``)

``||W_dec,i^l||`` is the norm of ALL of feature i's decoder vectors (every target layer)
concatenated: a feature that writes to three layers pays for all three. The tanh is ~linear near 0
and saturates at 1, so the penalty behaves like a decoder-norm-weighted L0.

Layout (close to circuit-tracer's ``CrossLayerTranscoder``):

    W_enc [L, d_in, d_sae]   b_enc [L, d_sae]   threshold [L, d_sae]   b_dec [L, d_out]
    W_dec[s] [d_sae, L - s, d_out]   (a list: layer s's features decode to layers s, s+1, ..., L-1)

Choices and their reasons (measured in the chapter):

- JumpReLU with the straight-through estimator of Rajamanoharan et al. 2024 (rectangle kernel,
  ``bandwidth``): the forward pass is exactly ``pre * (pre > theta)``; the threshold gets a
  pseudo-gradient from the tokens whose pre-activation lies within ``bandwidth / 2`` of it. The
  paper's bandwidth 1.0 assumes inputs normalised to unit scale per dimension; our pre-activations
  are O(1) with a few-hundredths threshold, so we use 0.1.
- Squared error summed over d_out and layers, mean over the batch (the course convention, also
  chapter 05's per-layer transcoders); no per-layer normalisation of the targets.
- A per-layer transcoder pair (chapter 05) IS a CLT with zero cross-layer decoders and threshold 0
  (JumpReLU with theta = 0 is ReLU): :meth:`CrossLayerTranscoder.from_transcoders`. Every graph
  function in :mod:`course_utils.science.attribution_graphs` therefore runs on both.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn
from transformer_lens import HookedTransformer

from course_utils.science import lm_saes as LS
from course_utils.science import transcoders as T

# ----------------------------------------------------------------------------- functional references


class _JumpReLU(torch.autograd.Function):
    """``pre * (pre > theta)`` with a straight-through pseudo-gradient for ``theta``."""

    @staticmethod
    def forward(ctx, pre: Tensor, theta: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(pre, theta)
        ctx.bandwidth = bandwidth
        return pre * (pre > theta)

    @staticmethod
    def backward(ctx, grad: Tensor):
        pre, theta = ctx.saved_tensors
        eps = ctx.bandwidth
        on = (pre > theta).to(grad.dtype)
        window = ((pre - theta).abs() < eps / 2).to(
            grad.dtype
        )  # rectangle kernel K((pre-theta)/eps)
        grad_theta = -(theta / eps) * window * grad
        # theta broadcasts over the batch: sum the pseudo-gradient back to its shape
        while grad_theta.ndim > theta.ndim:
            grad_theta = grad_theta.sum(0)
        return grad * on, grad_theta, None


def jumprelu(pre: Tensor, threshold: Tensor, bandwidth: float = 0.1) -> Tensor:
    """JumpReLU: ``pre`` where ``pre > threshold``, else 0 (differentiable in both, see above)."""
    return _JumpReLU.apply(pre, threshold, bandwidth)


def clt_forward(
    x: Float[Tensor, "batch n_layers d_in"],
    W_enc: Float[Tensor, "n_layers d_in d_sae"],
    b_enc: Float[Tensor, "n_layers d_sae"],
    threshold: Float[Tensor, "n_layers d_sae"],
    W_dec: list[Tensor],
    b_dec: Float[Tensor, "n_layers d_out"],
) -> tuple[Float[Tensor, "batch n_layers d_sae"], Float[Tensor, "batch n_layers d_out"]]:
    """Reference for exercise 1.1: activations and every layer's reconstruction.

    ``W_dec[s]`` is [d_sae, n_layers - s, d_out]: ``W_dec[s][:, t - s]`` decodes layer s's features
    into MLP t's output (t >= s)."""
    pre = torch.einsum("bld,lds->bls", x, W_enc) + b_enc
    acts = pre * (pre > threshold)
    n_layers = W_enc.shape[0]
    outs = []
    for t in range(n_layers):
        y = b_dec[t].expand(x.shape[0], -1)
        for s in range(t + 1):
            y = y + acts[:, s] @ W_dec[s][:, t - s]
        outs.append(y)
    return acts, torch.stack(outs, dim=1)


def decoder_norms(W_dec: list[Tensor]) -> Float[Tensor, "n_layers d_sae"]:
    """||W_dec,i^s||: the norm of feature i's decoder vectors to every target layer, concatenated."""
    return torch.stack([w.flatten(1).norm(dim=-1) for w in W_dec])


def clt_loss(
    x: Float[Tensor, "batch n_layers d_in"],
    y: Float[Tensor, "batch n_layers d_out"],
    W_enc: Float[Tensor, "n_layers d_in d_sae"],
    b_enc: Float[Tensor, "n_layers d_sae"],
    threshold: Float[Tensor, "n_layers d_sae"],
    W_dec: list[Tensor],
    b_dec: Float[Tensor, "n_layers d_out"],
    sparsity_coeff: float,
    c: float,
) -> Float[Tensor, ""]:
    """Reference for exercise 1.2: ``mean_batch [ sum_l ||y_hat^l - y^l||^2 + lambda * sum_l sum_i
    tanh(c * ||W_dec,i^l|| * a_i^l) ]``."""
    acts, y_hat = clt_forward(x, W_enc, b_enc, threshold, W_dec, b_dec)
    mse = (y_hat - y).pow(2).sum((-1, -2)).mean()
    penalty = torch.tanh(c * decoder_norms(W_dec) * acts).sum((-1, -2)).mean()
    return mse + sparsity_coeff * penalty


# ----------------------------------------------------------------------------- the module


class CrossLayerTranscoder(nn.Module):
    """A JumpReLU cross-layer transcoder for an ``n_layers``-layer model (see the module doc).

    ``cross_layer=False`` uses only each layer's own decoder (a JumpReLU per-layer transcoder
    trained with the same loss: the control that isolates what the cross-layer decoders buy).
    ``l1_coeff`` is the sparsity coefficient lambda of the tanh penalty; it carries chapter 05's
    name so that :func:`course_utils.science.transcoders.train_on_shared_batches` trains CLTs and per-layer
    transcoders side by side on the same batches.
    """

    n_instances = 1

    def __init__(
        self,
        n_layers: int,
        d_model: int,
        d_sae: int,
        l1_coeff: float = 1e-3,
        c: float = 1.0,
        bandwidth: float = 0.1,
        threshold_init: float = 0.03,
        preact_coeff: float = 3e-6,
        seed: int | None = 0,
        cross_layer: bool = True,
    ):
        super().__init__()
        self.cross_layer = bool(cross_layer)
        for name, v in (("n_layers", n_layers), ("d_model", d_model), ("d_sae", d_sae)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}.")
        self.n_layers, self.d_model, self.d_sae = n_layers, d_model, d_sae
        self.d_in = self.d_out = d_model
        self.c, self.bandwidth, self.preact_coeff = float(c), float(bandwidth), float(preact_coeff)
        g = torch.Generator().manual_seed(seed) if seed is not None else None
        bound = 1 / math.sqrt(d_model)
        self.W_enc = nn.Parameter(
            (torch.rand(n_layers, d_model, d_sae, generator=g) * 2 - 1) * bound
        )
        self.b_enc = nn.Parameter(torch.zeros(n_layers, d_sae))
        self.threshold = nn.Parameter(torch.full((n_layers, d_sae), float(threshold_init)))
        # each decoder vector starts with norm 0.1 / sqrt(number of target layers)
        self.W_dec = nn.ParameterList()
        for s in range(n_layers):
            w = torch.randn(d_sae, n_layers - s, d_model, generator=g)
            w = w / w.flatten(1).norm(dim=-1)[:, None, None] * 0.1
            if not self.cross_layer:
                w[:, 1:] = 0  # never used, never trained: stays zero for every other code path
            self.W_dec.append(nn.Parameter(w))
        self.b_dec = nn.Parameter(torch.zeros(n_layers, d_model))
        self.register_buffer("l1_coeff", torch.tensor([float(l1_coeff)]))
        self.register_buffer("steps_since_fired", torch.zeros(n_layers, d_sae, dtype=torch.long))

    # -- construction from per-layer transcoders
    @classmethod
    def from_transcoders(cls, transcoders: Mapping[int, object]) -> CrossLayerTranscoder:
        """The per-layer transcoders {layer: tc} of chapter 05 as a CLT: threshold 0 (ReLU) and zero
        cross-layer decoders. Outputs are identical to the transcoders' own."""
        layers = sorted(transcoders)
        if layers != list(range(len(layers))):
            raise ValueError(f"need one transcoder per layer 0..L-1, got layers {layers}.")
        weights = [T.as_single(transcoders[layer]) for layer in layers]
        for w in weights:
            if getattr(w, "W_skip", None) is not None:
                raise ValueError("skip transcoders are not supported (their W_skip is not a CLT).")
        d_in, d_sae, d_out = T.widths(weights[0])
        if any(T.widths(w) != (d_in, d_sae, d_out) for w in weights):
            raise ValueError("all transcoders must have the same widths.")
        out = cls(len(layers), d_in, d_sae, threshold_init=0.0, seed=None)
        with torch.no_grad():
            for layer, w in enumerate(weights):
                out.W_enc[layer] = w.W_enc.detach()
                out.b_enc[layer] = w.b_enc.detach()
                out.b_dec[layer] = w.b_dec.detach()
                out.W_dec[layer].zero_()
                out.W_dec[layer][:, 0] = w.W_dec.detach()
        out.kind = "per-layer transcoders"
        return out

    # -- shapes
    def _check(self, x: Tensor, what: str = "x") -> None:
        if x.ndim < 2 or tuple(x.shape[-2:]) != (self.n_layers, self.d_model):
            raise ValueError(
                f"{what} has shape {tuple(x.shape)}, but this CLT expects [..., n_layers, d_model] "
                f"= [..., {self.n_layers}, {self.d_model}]: the stacked ln2.hook_normalized of "
                "every layer. A model of another width or depth needs its own CLT."
            )

    # -- forward
    def pre_acts(
        self, x: Float[Tensor, "... n_layers d_in"]
    ) -> Float[Tensor, "... n_layers d_sae"]:
        self._check(x)
        return torch.einsum("...ld,lds->...ls", x, self.W_enc) + self.b_enc

    def encode(self, x: Tensor) -> Float[Tensor, "... n_layers d_sae"]:
        return jumprelu(self.pre_acts(x), self.threshold, self.bandwidth)

    def decode_layer(self, acts: Tensor, layer: int) -> Float[Tensor, "... d_out"]:
        """MLP ``layer``'s reconstruction from the features of layers <= ``layer`` (incl. b_dec)."""
        y = self.b_dec[layer]
        for s in range(layer + 1) if self.cross_layer else [layer]:
            y = y + acts[..., s, :] @ self.W_dec[s][:, layer - s]
        return y

    def decode(
        self, acts: Float[Tensor, "... n_layers d_sae"]
    ) -> Float[Tensor, "... n_layers d_out"]:
        return torch.stack([self.decode_layer(acts, t) for t in range(self.n_layers)], dim=-2)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        acts = self.encode(x)
        return acts, self.decode(acts)

    def decoder_norms(self) -> Float[Tensor, "n_layers d_sae"]:
        if not self.cross_layer:  # only the own-layer decoders are used (and penalised)
            return torch.stack([w[:, 0].norm(dim=-1) for w in self.W_dec])
        return decoder_norms(list(self.W_dec))

    def loss(self, x: Tensor, y: Tensor) -> dict[str, Tensor]:
        """Reconstruction + lambda * tanh penalty + a pre-activation term.

        The pre-activation term ``preact_coeff * sum ReLU(theta - pre) * ||W_dec||`` (Anthropic's
        Jan 2025 update, as re-implemented by third parties) nudges features that never fire back
        towards their threshold; it is zero for active features."""
        self._check(x)
        self._check(y, "the target y")
        pre = self.pre_acts(x)
        acts = jumprelu(pre, self.threshold, self.bandwidth)
        y_hat = self.decode(acts)
        norms = self.decoder_norms()
        recon = (y_hat - y).pow(2).sum((-1, -2)).mean()
        sparsity = self.l1_coeff[0] * torch.tanh(self.c * norms * acts).sum((-1, -2)).mean()
        preact = self.preact_coeff * (torch.relu(self.threshold - pre) * norms).sum((-1, -2)).mean()
        return {
            "loss": (recon + sparsity + preact).reshape(1),
            "reconstruction": recon.reshape(1),
            "sparsity": sparsity.reshape(1),
            "acts": acts,
            "y_hat": y_hat,
        }

    # -- the hooks chapter 05's shared training loop calls after each step
    def remove_parallel_grad(self) -> None:
        """No decoder-norm constraint: the penalty weights activations by decoder norms instead."""

    @torch.no_grad()
    def normalise_decoder(self) -> None:
        """Post-step constraint: keep thresholds non-negative (decoders stay free)."""
        self.threshold.clamp_(min=0.0)

    # -- bookkeeping
    def n_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def stack_layers(tensors: list[Tensor]) -> Tensor:
    """[x^0, x^1, ...] (each [..., d]) -> [..., n_layers, d]: the CLT's input or target layout."""
    return torch.stack(tensors, dim=-2)


# ----------------------------------------------------------------------------- model hooks


def clt_input_hooks(n_layers: int) -> list[str]:
    return [T.hook_pair(layer)[0] for layer in range(n_layers)]


def check_clt_fits(model: HookedTransformer, clt: CrossLayerTranscoder) -> None:
    """Clear error when ``clt`` was not built for ``model``'s depth and width."""
    if not isinstance(clt, CrossLayerTranscoder):
        raise TypeError(
            f"expected a CrossLayerTranscoder, got {type(clt).__name__}. Per-layer transcoders: "
            "wrap them with CrossLayerTranscoder.from_transcoders({0: tc0, 1: tc1})."
        )
    if (clt.n_layers, clt.d_model) != (model.cfg.n_layers, model.cfg.d_model):
        raise ValueError(
            f"this CLT has n_layers={clt.n_layers}, d_model={clt.d_model}, but the model has "
            f"n_layers={model.cfg.n_layers}, d_model={model.cfg.d_model}. A CLT replaces every "
            "MLP of ONE model: train (or load) the CLT built for this model."
        )


@torch.no_grad()
def clt_pairs(
    model: HookedTransformer, tokens: Int[Tensor, "batch pos"]
) -> tuple[Float[Tensor, "batch pos n_layers d"], Float[Tensor, "batch pos n_layers d"]]:
    """(x, y) for a CLT from one forward pass: every layer's ln2.hook_normalized and hook_mlp_out."""
    names = [n for layer in range(model.cfg.n_layers) for n in T.hook_pair(layer)]
    _, cache = model.run_with_cache(tokens, names_filter=names)
    L = model.cfg.n_layers
    x = stack_layers([cache[T.hook_pair(layer)[0]] for layer in range(L)])
    y = stack_layers([cache[T.hook_pair(layer)[1]] for layer in range(L)])
    return x, y


def replacement_hooks(clt: CrossLayerTranscoder, store: dict | None = None) -> list:
    """Hooks that make the (global) replacement model: each MLP output is overwritten by the CLT's
    reconstruction, with layer l's features computed from the replacement model's OWN ln2 input.
    ``store`` (optional) receives the activations per layer under ``"acts"``."""
    store = {} if store is None else store
    acts: list[Tensor | None] = [None] * clt.n_layers

    def read(layer: int) -> Callable:
        def hook(value, hook):
            pre = value @ clt.W_enc[layer] + clt.b_enc[layer]
            acts[layer] = pre * (pre > clt.threshold[layer])
            return value

        return hook

    def write(layer: int) -> Callable:
        def hook(value, hook):
            stacked = torch.stack([a for a in acts[: layer + 1]], dim=-2)
            if layer == clt.n_layers - 1:
                store["acts"] = stacked
            return clt.decode_layer(stacked, layer)

        return hook

    hooks = []
    for layer in range(clt.n_layers):
        hook_in, hook_out = T.hook_pair(layer)
        hooks += [(hook_in, read(layer)), (hook_out, write(layer))]
    return hooks


@torch.no_grad()
def evaluate_replacement(
    model: HookedTransformer, tokens: Int[Tensor, "batch pos"], clt: CrossLayerTranscoder
) -> dict[str, float]:
    """Fidelity of the replacement model (every MLP replaced by ``clt`` at once).

    CE loss clean / replaced / every MLP zero-ablated, CE recovered, KL(clean || replaced), top-1
    agreement of the next-token prediction, and per layer: L0 (active features of that layer, BOS
    excluded) and the FVU of MLP l's output measured on CLEAN inputs."""
    check_clt_fits(model, clt)
    L = model.cfg.n_layers
    clean_logits = model(tokens)
    replaced_logits = model.run_with_hooks(tokens, fwd_hooks=replacement_hooks(clt))
    zero = model.run_with_hooks(
        tokens,
        fwd_hooks=[
            (T.hook_pair(layer)[1], lambda v, hook: torch.zeros_like(v)) for layer in range(L)
        ],
    )
    clean, replaced = LS._ce(clean_logits, tokens), LS._ce(replaced_logits, tokens)
    zero_ce = LS._ce(zero, tokens)
    x, y = clt_pairs(model, tokens)
    x, y = x[:, 1:], y[:, 1:]  # BOS excluded, as in chapter 05
    acts, y_hat = clt(x)
    out = {
        "ce_clean": clean,
        "ce_replaced": replaced,
        "ce_increase": replaced - clean,
        "ce_zero_ablation": zero_ce,
        "ce_recovered_zero": LS.ce_loss_recovered(clean, replaced, zero_ce),
        "kl": LS.kl_to_original(clean_logits, replaced_logits),
        "top1_agreement": (
            (clean_logits[:, :-1].argmax(-1) == replaced_logits[:, :-1].argmax(-1))
            .float()
            .mean()
            .item()
        ),
    }
    total_l0 = 0.0
    for layer in range(L):
        l0 = (acts[..., layer, :] > 0).float().sum(-1).mean().item()
        yl, yh = y[..., layer, :], y_hat[..., layer, :]
        centred = yl - yl.reshape(-1, yl.shape[-1]).mean(0)
        out[f"l0_{layer}"] = l0
        out[f"fvu_{layer}"] = ((yh - yl).pow(2).sum() / centred.pow(2).sum()).item()
        out[f"dead_fraction_{layer}"] = (
            (~(acts[..., layer, :] > 0).flatten(0, -2).any(0)).float().mean().item()
        )
        total_l0 += l0
    out["l0_total"] = total_l0
    return out


# ----------------------------------------------------------------------------- training


def clt_batch_args(batch: list[Tensor]) -> tuple[Tensor, Tensor]:
    """A :class:`~course_utils.science.transcoders.MultiHookStore` batch [x0, y0, x1, y1, ...] -> (x, y)."""
    return stack_layers(list(batch[0::2])), stack_layers(list(batch[1::2]))


def multi_hook_store(model: HookedTransformer, windows, **kwargs) -> T.MultiHookStore:
    """Shuffled, row-aligned (ln2 input, MLP output) pairs of every layer from one forward pass."""
    names = [n for layer in range(model.cfg.n_layers) for n in T.hook_pair(layer)]
    return T.MultiHookStore(model, names, windows, **kwargs)


def train_clt(
    clt: CrossLayerTranscoder,
    next_batch: Callable[[], list[Tensor]],
    steps: int,
    lr: float = 1e-3,
    log: Callable = print,
    max_grad_norm: float | None = 1.0,
) -> None:
    """Train ``clt`` with chapter 05's loop (Adam; lambda warmed up over the first 5%, learning rate
    decayed over the last 20%; thresholds clamped at 0 after each step; the whole CLT's gradient
    norm clipped at ``max_grad_norm``)."""
    T.train_on_shared_batches(
        {"clt": (clt, clt_batch_args)}, next_batch, steps, lr, log, max_grad_norm
    )


# ----------------------------------------------------------------------------- files


WEIGHTS_FILE = "clt_weights.safetensors"
CFG_FILE = "cfg.json"


def save_clt(clt: CrossLayerTranscoder, folder, metadata: dict | None = None) -> Path:
    """Write ``cfg.json`` + ``clt_weights.safetensors`` (tensors W_enc, b_enc, threshold, b_dec,
    W_dec_0 ... W_dec_{L-1}; ``W_dec_s`` is [d_sae, L - s, d_model]). No wall-clock time inside:
    a rebuild writes identical bytes."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {
        "W_enc": clt.W_enc.detach().contiguous(),
        "b_enc": clt.b_enc.detach().contiguous(),
        "threshold": clt.threshold.detach().contiguous(),
        "b_dec": clt.b_dec.detach().contiguous(),
    }
    for s, w in enumerate(clt.W_dec):
        tensors[f"W_dec_{s}"] = w.detach().contiguous()
    save_file(tensors, str(folder / WEIGHTS_FILE))
    cfg = {
        "architecture": "cross_layer_transcoder",
        "activation": "jumprelu",
        "n_layers": clt.n_layers,
        "d_model": clt.d_model,
        "d_sae": clt.d_sae,
        "hook_names_in": clt_input_hooks(clt.n_layers),
        "hook_names_out": [T.hook_pair(layer)[1] for layer in range(clt.n_layers)],
        "l1_coeff": float(clt.l1_coeff[0]),
        "c": clt.c,
        "bandwidth": clt.bandwidth,
        "preact_coeff": clt.preact_coeff,
        "cross_layer": clt.cross_layer,
        "metadata": metadata or {},
    }
    (folder / CFG_FILE).write_text(json.dumps(cfg, indent=1) + "\n")
    return folder


def load_clt(folder=None) -> CrossLayerTranscoder:
    """Read a CLT folder written by :func:`save_clt` (default: the shipped ``course-2l-clt``)."""
    from safetensors.torch import load_file

    if folder is None:
        folder = asset_dir() / SHIPPED_NAME
    folder = Path(folder)
    if not (folder / CFG_FILE).is_file() or not (folder / WEIGHTS_FILE).is_file():
        raise FileNotFoundError(
            f"{folder} has no {CFG_FILE} + {WEIGHTS_FILE}: not a CLT folder. Rebuild the shipped "
            "one with `python -m course_utils.assets build-clt`."
        )
    cfg = json.loads((folder / CFG_FILE).read_text())
    if cfg.get("architecture") != "cross_layer_transcoder":
        raise ValueError(
            f"{folder} holds a {cfg.get('architecture')!r}, not a cross-layer transcoder."
        )
    clt = CrossLayerTranscoder(
        cfg["n_layers"], cfg["d_model"], cfg["d_sae"], l1_coeff=cfg["l1_coeff"], c=cfg["c"],
        bandwidth=cfg["bandwidth"], preact_coeff=cfg["preact_coeff"], seed=None,
        cross_layer=cfg.get("cross_layer", True),
    )  # fmt: skip
    state = load_file(str(folder / WEIGHTS_FILE))
    with torch.no_grad():
        for name in ("W_enc", "b_enc", "threshold", "b_dec"):
            getattr(clt, name).copy_(state[name])
        for s in range(clt.n_layers):
            clt.W_dec[s].copy_(state[f"W_dec_{s}"])
    clt.cfg_dict = cfg
    clt.eval()
    return clt


# ----------------------------------------------------------------------------- the shipped CLT

SHIPPED_NAME = "course-2l-clt"


def asset_dir() -> Path:
    """Where the shipped CLT and its sweep table live (not with the SAELens dictionaries: a CLT
    folder is not a SAELens folder)."""
    from course_utils.assets import ASSETS_DIR

    return ASSETS_DIR / "clt"


SWEEP_TABLE = "clt_sweep.csv"
#: Recipe of ``python -m course_utils.assets build-clt``: CLTs at several lambdas and per-layer
#: transcoder pairs of the SAME width per layer at several L1 coefficients, all trained on the same
#: batches; every one is evaluated as a full replacement model (both MLPs replaced). The shipped CLT
#: is the one whose total L0 is closest to the shipped per-layer transcoders' (chapter 05). Width 512
#: per layer keeps the file at 1.3 MB (the assets' 15 MB limit); 400 steps keep the build to ~15 min
#: on a busy 2-core machine (a short run: the losses are still falling, see the log).
REFERENCE = {
    "d_sae": 512,
    "lr": 1e-3,
    "steps": 400,
    "batch_size": 1024,
    "buffer_tokens": 65536,
    "seed": 0,
    "eval_windows": 64,
    "c": 1.0,
    "bandwidth": 0.1,
    # each dictionary's gradient norm clipped at 1 (the whole CLT; each per-layer transcoder)
    "max_grad_norm": 1.0,
    "clt_lambdas": [0.3, 1.0, 3.0],
    "plt_l1": [[1.5, 3.0, 6.0], [0.5, 1.0, 2.0]],
}
SWEEP_COLUMNS = (
    "family", "coeff0", "coeff1", "l0_0", "l0_1", "l0_total", "fvu_0", "fvu_1", "ce_clean",
    "ce_replaced", "ce_increase", "kl", "top1_agreement", "dead_fraction_0", "dead_fraction_1",
)  # fmt: skip


def build_reference_clt(out_root, recipe: dict | None = None, log=print, threads: int = 2) -> dict:
    """Train the CLT lambda sweep and the equal-width per-layer transcoder sweep on shared batches,
    write :data:`SWEEP_TABLE` and ship the CLT of ``shipped_lambda`` as :data:`SHIPPED_NAME`."""
    import csv

    from course_utils.science.activations import corpus_windows
    from course_utils.science.models import load_model

    recipe = {**REFERENCE, **(recipe or {})}
    torch.set_num_threads(threads)
    start = time.perf_counter()
    model = load_model("course-2l")
    L, d = model.cfg.n_layers, model.cfg.d_model
    store = multi_hook_store(
        model, corpus_windows(model, "train"), batch_size=recipe["batch_size"],
        buffer_tokens=recipe["buffer_tokens"], progress=False, seed=0,
    )  # fmt: skip
    modules: dict = {}
    for k, lam in enumerate(recipe["clt_lambdas"]):
        clt = CrossLayerTranscoder(
            L, d, recipe["d_sae"], l1_coeff=lam, c=recipe["c"], bandwidth=recipe["bandwidth"],
            seed=recipe["seed"] + k,
        )  # fmt: skip
        modules[("clt", lam)] = (clt, clt_batch_args)
    for layer in range(L):
        coeffs = [float(v) for v in recipe["plt_l1"][layer]]
        tc = T.make_dictionaries("tc", d, recipe["d_sae"], coeffs, recipe["seed"] + 100 + layer)
        modules[("plt", layer)] = (tc, T._loss_args("tc", layer))
    log(f"training {len(recipe['clt_lambdas'])} CLTs and {L} x {len(recipe['plt_l1'][0])} PLTs")
    T.train_on_shared_batches(
        modules, store.next_split, recipe["steps"], recipe["lr"], log, recipe["max_grad_norm"]
    )
    log(f"trained on {store.tokens_seen} tokens in {time.perf_counter() - start:.0f} s")

    tokens = corpus_windows(model, "validation")[: recipe["eval_windows"]]
    rows, clts = [], {}
    for (family, key), (m, _) in modules.items():
        if family != "clt":
            continue
        m.eval()
        ev = evaluate_replacement(model, tokens, m)
        rows.append(_row("clt", key, key, ev))
        clts[key] = (m, ev)
        log(", ".join(f"{k} {v}" for k, v in rows[-1].items()))
    for i in range(len(recipe["plt_l1"][0])):
        pair = {layer: T.single(modules[("plt", layer)][0], i) for layer in range(L)}
        ev = evaluate_replacement(model, tokens, CrossLayerTranscoder.from_transcoders(pair))
        rows.append(_row("plt", recipe["plt_l1"][0][i], recipe["plt_l1"][1][i], ev))
        log(", ".join(f"{k} {v}" for k, v in rows[-1].items()))
    shipped = CrossLayerTranscoder.from_transcoders(
        {layer: _shipped_transcoder(layer) for layer in range(L)}
    )
    ev = evaluate_replacement(model, tokens, shipped)
    rows.append(_row("plt-shipped-1024", 3.0, 1.0, ev))
    log(", ".join(f"{k} {v}" for k, v in rows[-1].items()))

    out_root = Path(out_root)
    out_root.mkdir(parents=True, exist_ok=True)
    with (out_root / SWEEP_TABLE).open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=SWEEP_COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    target = rows[-1]["l0_total"]  # the shipped per-layer transcoders' total L0
    lam = min(clts, key=lambda k: abs(clts[k][1]["l0_total"] - target))
    clt, ev = clts[lam]
    log(
        f"shipping the CLT of lambda {lam} (total L0 {ev['l0_total']:.1f}; shipped PLTs {target:.1f})"
    )
    metadata = {
        "model_name": "course-2l",
        "course_recipe": recipe,
        "course_tokens": store.tokens_seen,
        "course_evaluation": {k: round(v, 5) for k, v in ev.items()},
        "course_shipped_lambda": lam,
    }
    save_clt(clt, out_root / SHIPPED_NAME, metadata)
    return {"shipped": metadata["course_evaluation"], "rows": rows}


def _shipped_transcoder(layer: int):
    from course_utils.science.models import load_sae

    return load_sae(T.REFERENCE_NAMES[f"tc{layer}"])


def _row(family: str, coeff0: float, coeff1: float, ev: dict) -> dict:
    row = {"family": family, "coeff0": coeff0, "coeff1": coeff1}
    row.update({k: round(ev[k], 5) for k in SWEEP_COLUMNS[3:]})
    return row


def read_sweep_table(path=None) -> list[dict]:
    """The shipped CLT-vs-PLT sweep (or ``path``) with numbers parsed."""
    import csv

    if path is None:
        path = asset_dir() / SWEEP_TABLE
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} does not exist: run `python -m course_utils.assets build-clt`."
        )
    with path.open() as f:
        return [
            {k: (v if k == "family" else float(v)) for k, v in r.items()} for r in csv.DictReader(f)
        ]
