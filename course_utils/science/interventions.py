"""Intervening on dictionary features (chapter 06): ablation, clamping, steering, attribution.

Every intervention here runs through TransformerLens hooks (``run_with_hooks``), which removes its
hooks when the forward pass ends, even when it raises; :func:`hooks_left` proves it.

Notation: at a hook the model holds activation ``a``; the dictionary gives features
``f = enc(a)``, reconstruction ``dec(f)`` and error ``eps = a - dec(f)``, so ``a = dec(f) + eps``.
An *edit* maps ``f`` to ``f'``; spliced **with the error kept**, downstream layers see
``dec(f') + eps``, which equals ``a`` when ``f' = f`` (to float precision) and moves by exactly
``dec(f') - dec(f) = (f' - f) @ W_dec`` otherwise (the decoder is affine). Spliced without the
error they see ``dec(f')``: the whole reconstruction error becomes part of the "edit".

- :func:`edit_feature`, :func:`run_with_feature_edit`: ablate / clamp / scale / add one feature;
- :func:`ablation_effect`, :func:`vocab_ablation_effect`, :func:`tokens_html`: a feature's
  downstream effect on next-token log-probabilities (Bricken et al. 2023, "Feature ablations");
- :func:`run_with_steering`, :func:`generate`, :func:`mean_difference_vector`: steering by adding
  a direction to the residual stream (Templeton et al. 2024; Turner et al. 2023);
- :func:`attribution_patching`, :func:`integrated_gradients`, :func:`exact_ablation_effects`:
  gradient x activation estimates of every feature's ablation effect against the real thing;
- :class:`FeatureCircuit`: feature and error nodes at several spliced dictionaries, node
  effects by attribution, faithfulness and completeness under mean ablation (Marks et al. 2024);
- :func:`graph_node_ablations`: chapter 05's transcoder path graph tested by ablation.
"""

from __future__ import annotations

import html
from collections.abc import Callable, Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens import HookedTransformer

from course_utils.science.hooks import check_hook_name

EDIT_MODES = ("ablate", "clamp", "scale", "add")


# ----------------------------------------------------------------------------- validation


def hooks_left(model: HookedTransformer) -> list[str]:
    """Names of the hook points that still carry a forward or backward hook (should be [])."""
    return [
        name
        for name, hp in model.hook_dict.items()
        if hp._forward_hooks or hp._backward_hooks or hp._forward_pre_hooks
    ]


def d_sae_of(sae) -> int:
    return int(sae.W_dec.shape[0])


def trained_hook(sae) -> str | None:
    """The hook a SAELens dictionary was trained on (``cfg.metadata.hook_name``), if recorded."""
    meta = getattr(getattr(sae, "cfg", None), "metadata", None)
    name = getattr(meta, "hook_name", None)
    return name if isinstance(name, str) else None


def check_feature(sae, feature: int) -> int:
    """``feature`` as an int, or a clear error naming the valid range."""
    d_sae = d_sae_of(sae)
    if isinstance(feature, bool) or not isinstance(feature, int | torch.Tensor):
        raise TypeError(f"feature must be an int index into the dictionary, got {feature!r}.")
    feature = int(feature)
    if not 0 <= feature < d_sae:
        raise ValueError(
            f"feature {feature} is out of range: this dictionary has d_sae={d_sae} features, "
            f"so valid indices are 0..{d_sae - 1}."
        )
    return feature


def check_splice(model: HookedTransformer, sae, hook_name: str) -> str:
    """A dictionary may only be spliced at the hook it was trained on: a clear error otherwise."""
    check_hook_name(model, hook_name)
    trained = trained_hook(sae)
    if trained is not None and trained != hook_name:
        raise ValueError(
            f"this dictionary was trained on {trained!r}, not {hook_name!r}: its features mean "
            f"nothing elsewhere. Use hook_name={trained!r} (sae.cfg.metadata.hook_name)."
        )
    width = int(sae.W_dec.shape[1])
    if width != model.cfg.d_model and hook_name.endswith(("resid_pre", "resid_mid", "resid_post")):
        raise ValueError(
            f"the dictionary has d_in={width} but {hook_name!r} has width d_model="
            f"{model.cfg.d_model}."
        )
    return hook_name


def check_finite(logits: Tensor, what: str) -> Tensor:
    if not torch.isfinite(logits).all():
        raise FloatingPointError(
            f"{what} made the forward pass non-finite (inf/NaN logits). Try a smaller "
            "coefficient (a few times the feature's maximum activation is usually enough)."
        )
    return logits


# ----------------------------------------------------------------------------- part 1: edits


def edit_feature(
    acts: Float[Tensor, "... d_sae"], feature: int, mode: str, value: float = 0.0
) -> Float[Tensor, "... d_sae"]:
    """Reference for exercise 1.1: a copy of ``acts`` with one feature edited at every position.

    ``mode``: "ablate" (set to 0), "clamp" (set to ``value``), "scale" (multiply by ``value``),
    "add" (add ``value``). Every other feature is unchanged.
    """
    if mode not in EDIT_MODES:
        raise ValueError(f"mode must be one of {EDIT_MODES}, got {mode!r}.")
    if not 0 <= feature < acts.shape[-1]:
        raise ValueError(
            f"feature {feature} out of range: valid indices are 0..{acts.shape[-1] - 1}."
        )
    out = acts.clone()
    column = acts[..., feature]
    new = {
        "ablate": torch.zeros_like(column),
        "clamp": torch.full_like(column, value),
        "scale": column * value,
        "add": column + value,
    }[mode]
    out[..., feature] = new
    return out


def feature_edit_hook(sae, edit: Callable[[Tensor], Tensor], keep_error: bool = True) -> Callable:
    """A forward hook: encode, edit the features, decode, and (by default) add back the error."""

    def hook(activation: Tensor, hook) -> Tensor:
        f = sae.encode(activation)
        new = sae.decode(edit(f))
        if keep_error:
            new = new + (activation - sae.decode(f))
        return new.to(activation.dtype)

    return hook


def run_with_feature_edit(
    model: HookedTransformer,
    sae,
    tokens: Int[Tensor, "batch pos"],
    hook_name: str,
    edit: Callable[[Tensor], Tensor],
    keep_error: bool = True,
) -> Float[Tensor, "batch pos d_vocab"]:
    """Reference for exercise 1.2: logits with ``sae`` spliced at ``hook_name`` and its features
    replaced by ``edit(f)``; downstream sees ``dec(edit(f)) + (a - dec(f))`` when ``keep_error``,
    else ``dec(edit(f))``."""
    return model.run_with_hooks(
        tokens, fwd_hooks=[(hook_name, feature_edit_hook(sae, edit, keep_error))]
    )


def edited_logits(
    model: HookedTransformer,
    sae,
    tokens: Int[Tensor, "batch pos"],
    hook_name: str,
    feature: int,
    mode: str = "ablate",
    value: float = 0.0,
    keep_error: bool = True,
) -> Float[Tensor, "batch pos d_vocab"]:
    """:func:`run_with_feature_edit` with validation (hook, feature index, finiteness)."""
    check_splice(model, sae, hook_name)
    feature = check_feature(sae, feature)
    with torch.no_grad():
        logits = run_with_feature_edit(
            model,
            sae,
            tokens,
            hook_name,
            lambda f: edit_feature(f, feature, mode, value),
            keep_error,
        )
    return check_finite(logits, f"{mode} of feature {feature} with value {value}")


# ----------------------------------------------------------------------------- part 2: effects


def next_token_logprobs(
    logits: Float[Tensor, "batch pos d_vocab"], tokens: Int[Tensor, "batch pos"]
) -> Float[Tensor, "batch pos_minus_1"]:
    """log p(token[t+1] | ..t) at every position but the last."""
    return logits[:, :-1].log_softmax(-1).gather(-1, tokens[:, 1:, None])[..., 0]


@torch.no_grad()
def ablation_effect(
    model: HookedTransformer,
    sae,
    tokens: Int[Tensor, "batch pos"],
    hook_name: str,
    feature: int,
) -> Float[Tensor, "batch pos_minus_1"]:
    """Reference for exercise 2.1: ablated minus clean log-probability of each actual next token
    when ``feature`` is zeroed at every position (error kept). Entry ``[b, t]`` is the effect on
    predicting ``tokens[b, t + 1]``; negative = the feature helped predict it."""
    clean = model(tokens)
    ablated = run_with_feature_edit(
        model, sae, tokens, hook_name, lambda f: edit_feature(f, feature, "ablate")
    )
    return next_token_logprobs(ablated, tokens) - next_token_logprobs(clean, tokens)


@torch.no_grad()
def vocab_ablation_effect(
    model: HookedTransformer,
    sae,
    tokens: Int[Tensor, "batch pos"],
    hook_name: str,
    feature: int,
    batch_size: int = 32,
) -> tuple[Float[Tensor, " d_vocab"], int]:
    """Mean over the positions where ``feature`` fires of (clean - ablated) log-probabilities of
    every vocabulary token: positive = the feature promotes the token there. Returns the effect
    and the number of firing positions it averages over."""
    check_splice(model, sae, hook_name)
    feature = check_feature(sae, feature)
    total = torch.zeros(model.cfg.d_vocab)
    count = 0
    for start in range(0, len(tokens), batch_size):
        chunk = tokens[start : start + batch_size]
        store: dict[str, Tensor] = {}

        def grab(activation, hook, store=store):
            store["f"] = sae.encode(activation)[..., feature]

        clean = model.run_with_hooks(chunk, fwd_hooks=[(hook_name, grab)])
        fires = store["f"] > 0
        fires[:, 0] = False
        if not fires.any():
            continue
        ablated = run_with_feature_edit(
            model, sae, chunk, hook_name, lambda f: edit_feature(f, feature, "ablate")
        )
        diff = clean.log_softmax(-1) - ablated.log_softmax(-1)
        total += diff[fires].sum(0)
        count += int(fires.sum())
    return total / max(count, 1), count


def tokens_html(
    strings: Sequence[str],
    values: Sequence[float],
    underline: Sequence[float] | None = None,
    scale: float | None = None,
    title: str = "",
) -> str:
    """One context as HTML: each token's background by ``values`` (orange = positive), and an
    optional coloured underline by ``underline`` (blue = positive, red = negative), as in
    Towards Monosemanticity's feature browser. Hover a token to read both numbers."""
    values = [float(v) for v in values]
    if len(values) != len(strings):
        raise ValueError(f"{len(strings)} tokens but {len(values)} values.")
    under = [float(u) for u in underline] if underline is not None else None
    if under is not None and len(under) != len(strings):
        raise ValueError(f"{len(strings)} tokens but {len(under)} underline values.")
    top = max([abs(v) for v in values] + [1e-9])
    utop = scale or max([abs(u) for u in (under or [])] + [1e-9])
    spans = []
    for i, s in enumerate(strings):
        alpha = max(0.0, values[i]) / top
        style = f"background: rgba(255,140,0,{alpha:.2f});"
        tip = f"activation {values[i]:.3f}"
        if under is not None:
            u = max(-1.0, min(1.0, under[i] / utop))
            colour = f"rgba(43,108,176,{abs(u):.2f})" if u > 0 else f"rgba(207,34,46,{abs(u):.2f})"
            style += f" border-bottom: 3px solid {colour};"
            tip += f"; ablation effect on this token {under[i]:+.3f}"
        text = html.escape(s).replace("\n", "⏎<br>").replace(" ", "&nbsp;")
        spans.append(f'<span style="{style}" title="{tip}">{text}</span>')
    head = f"<div><b>{html.escape(title)}</b></div>" if title else ""
    return head + '<div style="font-family:monospace;line-height:1.9">' + "".join(spans) + "</div>"


# ----------------------------------------------------------------------------- part 3: steering


def steering_hook(direction: Float[Tensor, " d_model"], coeff: float) -> Callable:
    """Add ``coeff * direction`` at every position except the first of the sequence (BOS)."""

    def hook(activation: Tensor, hook) -> Tensor:
        out = activation.clone()
        out[:, 1:] = out[:, 1:] + coeff * direction.to(activation.dtype)
        return out

    return hook


def run_with_steering(
    model: HookedTransformer,
    tokens: Int[Tensor, "batch pos"],
    hook_name: str,
    direction: Float[Tensor, " d_model"],
    coeff: float,
) -> Float[Tensor, "batch pos d_vocab"]:
    """Reference for exercise 3.1: logits with ``coeff * direction`` added to the activation at
    ``hook_name`` at every position except position 0 (BOS, whose residual norm is huge and
    which every later token attends to)."""
    return model.run_with_hooks(tokens, fwd_hooks=[(hook_name, steering_hook(direction, coeff))])


def steering_direction(sae, feature: int, unit: bool = True) -> Float[Tensor, " d_model"]:
    """The feature's decoder row (unit norm by default: the coefficient is then in residual units)."""
    feature = check_feature(sae, feature)
    d = sae.W_dec[feature].detach()
    return d / d.norm() if unit else d


@torch.no_grad()
def steered_logits(
    model: HookedTransformer,
    tokens: Int[Tensor, "batch pos"],
    hook_name: str,
    direction: Tensor,
    coeff: float,
    sae=None,
) -> Float[Tensor, "batch pos d_vocab"]:
    """:func:`run_with_steering` with validation: the hook exists (and is the SAE's own when the
    direction comes from ``sae``), the direction has width d_model, the output is finite."""
    check_hook_name(model, hook_name)
    if sae is not None:
        check_splice(model, sae, hook_name)
    if direction.shape != (model.cfg.d_model,):
        raise ValueError(
            f"direction must have shape ({model.cfg.d_model},) (d_model), got "
            f"{tuple(direction.shape)}."
        )
    logits = run_with_steering(model, tokens, hook_name, direction, coeff)
    return check_finite(logits, f"steering with coefficient {coeff}")


@torch.no_grad()
def generate(
    model: HookedTransformer,
    tokens: Int[Tensor, "batch pos"],
    n_new: int,
    fwd_hooks: Sequence[tuple[str, Callable]] = (),
    temperature: float = 0.0,
    seed: int = 0,
) -> Int[Tensor, "batch pos_plus_n_new"]:
    """Greedy (``temperature=0``) or sampled continuation, re-running the whole sequence with
    ``fwd_hooks`` at every step (no KV cache: every position is steered, every step)."""
    if n_new < 0:
        raise ValueError(f"n_new must be >= 0, got {n_new}.")
    g = torch.Generator().manual_seed(seed)
    out = tokens.clone()
    for _ in range(n_new):
        logits = model.run_with_hooks(out[:, -model.cfg.n_ctx :], fwd_hooks=list(fwd_hooks))
        last = check_finite(logits[:, -1], "the steering hook")
        if temperature == 0:
            nxt = last.argmax(-1)
        else:
            nxt = torch.multinomial((last / temperature).softmax(-1), 1, generator=g)[:, 0]
        out = torch.cat([out, nxt[:, None]], dim=1)
    return out


def mean_difference_vector(
    acts: Float[Tensor, "n d_model"], positive: Tensor
) -> Float[Tensor, " d_model"]:
    """Activation addition from data: mean activation where ``positive`` minus mean elsewhere."""
    positive = positive.bool().flatten()
    acts = acts.reshape(-1, acts.shape[-1])
    if len(positive) != len(acts):
        raise ValueError(f"{len(acts)} activations but {len(positive)} labels.")
    if positive.all() or not positive.any():
        raise ValueError("need both positive and negative examples for a difference of means.")
    return acts[positive].mean(0) - acts[~positive].mean(0)


def ce_loss(model: HookedTransformer, tokens: Tensor, fwd_hooks=()) -> float:
    with torch.no_grad():
        return model.run_with_hooks(tokens, return_type="loss", fwd_hooks=list(fwd_hooks)).item()


# ----------------------------------------------------------------------------- part 4: attribution


def attribution_patching(
    model: HookedTransformer,
    sae,
    tokens: Int[Tensor, "batch pos"],
    hook_name: str,
    metric: Callable[[Tensor], Tensor],
) -> tuple[Float[Tensor, "batch pos d_sae"], Float[Tensor, "batch pos d_sae"]]:
    """Reference for exercise 4.1: (features, estimated effect of zero-ablating each one).

    One forward and one backward pass. The SAE is spliced with its error kept as a constant
    (detached), so the output is the clean model's and the gradient reaches the features:
    ``effect ~= -f * dm/df``. ``metric(logits)`` returns one number per prompt; they are summed
    before the backward pass (a mean would divide every prompt's gradient by the batch size).
    """
    store: dict[str, Tensor] = {}

    def splice(activation, hook):
        f = sae.encode(activation.detach()).detach().requires_grad_(True)
        store["f"] = f
        error = (activation - sae.decode(f)).detach()
        return sae.decode(f) + error

    with torch.enable_grad():
        logits = model.run_with_hooks(tokens, fwd_hooks=[(hook_name, splice)])
        metric(logits).sum().backward()
    f = store["f"]
    return f.detach(), (-f * f.grad).detach()


def integrated_gradients(
    model: HookedTransformer,
    sae,
    tokens: Int[Tensor, "batch pos"],
    hook_name: str,
    metric: Callable[[Tensor], Tensor],
    steps: int = 10,
) -> Float[Tensor, "batch pos d_sae"]:
    """Reference for exercise 4.2: integrated gradients for zero-ablating the features.

    The path runs from the clean features (t = 0) to every feature ablated (t = 1); the
    features at step k are ``(1 - t_k) f`` with ``t_k = k / steps``, k = 0..steps-1: the clean
    end is included and the ablated end left out, as in Marks et al.'s code (``_pe_ig`` in
    saprmarks/feature-circuits, ``alpha = step / steps``, ``(1 - alpha) * clean + alpha *
    patch``). The error is kept fixed; the estimate is ``-f * mean_k dm/df ((1 - t_k) f)``.
    ``steps`` forward and backward passes.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}.")
    store: dict[str, Tensor] = {}
    total = None
    for k in range(steps):
        alpha = 1.0 - k / steps  # the fraction of each feature kept: 1 (clean) .. 1/steps

        def splice(activation, hook, alpha=alpha):
            f = sae.encode(activation.detach()).detach()
            error = (activation - sae.decode(f)).detach()
            scaled = (alpha * f).requires_grad_(True)
            store["f"], store["scaled"] = f, scaled
            return sae.decode(scaled) + error

        with torch.enable_grad():
            logits = model.run_with_hooks(tokens, fwd_hooks=[(hook_name, splice)])
            metric(logits).sum().backward()
        grad = store["scaled"].grad
        total = grad if total is None else total + grad
    return (-store["f"] * total / steps).detach()


def _one_edit_per_row(
    model: HookedTransformer,
    tokens: Int[Tensor, "batch pos"],
    hook_name: str,
    metric: Callable[[Tensor], Tensor],
    base: Float[Tensor, " batch"],
    rows: Int[Tensor, "n 3"],
    coeff: Float[Tensor, " n"],
    W_dec: Float[Tensor, "d_sae d_in"],
    batch_size: int,
) -> Float[Tensor, " n"]:
    """For each (prompt, position, feature) row, add ``coeff * d_feature`` to the activation at
    that one position of that prompt and return the change of ``metric``; rows are batched, one
    edit per row (a copy of its prompt), the rest of the activation (the error) untouched."""
    effects = []
    for start in range(0, len(rows), batch_size):
        b, p, i = rows[start : start + batch_size].unbind(1)
        delta = coeff[start : start + batch_size, None] * W_dec[i]  # [n, d_in]
        ar = torch.arange(len(b))

        def edit(activation, hook, p=p, delta=delta, ar=ar):
            out = activation.clone()
            out[ar, p] = out[ar, p] + delta.to(activation.dtype)
            return out

        m = metric(model.run_with_hooks(tokens[b], fwd_hooks=[(hook_name, edit)]))
        effects.append(m - base[b])
    return torch.cat(effects) if effects else torch.zeros(0)


@torch.no_grad()
def exact_ablation_effects(
    model: HookedTransformer,
    sae,
    tokens: Int[Tensor, "batch pos"],
    hook_name: str,
    metric: Callable[[Tensor], Tensor],
    batch_size: int = 256,
    min_pos: int = 1,
) -> tuple[Int[Tensor, "n 3"], Float[Tensor, " n"]]:
    """The true effect on ``metric`` of zeroing each active feature at one position, one at a
    time: returns ``(index [n, 3] of (prompt, position, feature), effect [n])`` for every active
    feature at positions >= ``min_pos``. Each ablation subtracts ``f_i d_i`` from the native
    activation (the error is kept); rows are batched, one ablation per row."""
    check_splice(model, sae, hook_name)
    store: dict[str, Tensor] = {}

    def grab(activation, hook):
        store["f"] = sae.encode(activation)

    base = metric(model.run_with_hooks(tokens, fwd_hooks=[(hook_name, grab)]))
    f = store["f"]
    active = (f > 0).nonzero()
    active = active[active[:, 1] >= min_pos]
    b, p, i = active.unbind(1)
    W_dec = sae.W_dec.detach()
    return active, _one_edit_per_row(
        model, tokens, hook_name, metric, base, active, -f[b, p, i], W_dec, batch_size
    )


def single_feature_ig(
    model: HookedTransformer,
    sae,
    tokens: Int[Tensor, "batch pos"],
    hook_name: str,
    metric: Callable[[Tensor], Tensor],
    index: Int[Tensor, "n 3"],
    steps: int = 10,
    batch_size: int = 256,
    grid: str = "left",
) -> Float[Tensor, " n"]:
    """Integrated gradients along each feature's OWN path: for every ``(prompt, position,
    feature)`` row of ``index``, only that feature moves from its value (t = 0) to 0 (t = 1),
    its value ``(1 - t) f``, while everything else stays clean. By the completeness axiom the
    exact path integral IS the single ablation :func:`exact_ablation_effects` measures; what
    remains is quadrature error. ``grid`` picks the points: "left" ``t = k / steps`` (Marks et
    al.'s ``_pe_ig``: clean end in, ablated end out), "right" ``t = (k + 1) / steps`` (the
    mirror image), "midpoint" ``t = (k + 1/2) / steps``; k = 0..steps-1. ``metric`` must treat
    every prompt alike (it sees the rows of ``tokens[index[:, 0]]``)."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}.")
    offsets = {"left": 0.0, "right": 1.0, "midpoint": 0.5}
    if grid not in offsets:
        raise ValueError(f"grid must be one of {sorted(offsets)}, got {grid!r}.")
    ts = [(k + offsets[grid]) / steps for k in range(steps)]
    store: dict[str, Tensor] = {}

    def grab(activation, hook):
        store["f"] = sae.encode(activation).detach()

    with torch.no_grad():
        model.run_with_hooks(tokens, fwd_hooks=[(hook_name, grab)])
    f, W_dec = store["f"], sae.W_dec.detach()
    out = []
    for start in range(0, len(index), batch_size):
        b, p, i = index[start : start + batch_size].unbind(1)
        value = f[b, p, i]
        ar = torch.arange(len(b))
        total = torch.zeros(len(b))
        for t in ts:
            s = (value * (1.0 - t)).requires_grad_(True)

            def move(activation, hook, s=s, b=b, p=p, i=i, value=value, ar=ar):
                shift = torch.zeros_like(activation)
                shift[ar, p] = (s - value)[:, None] * W_dec[i]
                return activation + shift

            with torch.enable_grad():
                logits = model.run_with_hooks(tokens[b], fwd_hooks=[(hook_name, move)])
                (grad,) = torch.autograd.grad(metric(logits).sum(), s)
            total += grad
        out.append(-value * total / steps)
    return torch.cat(out) if out else torch.zeros(0)


def clean_corrupt_attribution(
    model: HookedTransformer,
    sae,
    clean_tokens: Int[Tensor, "batch pos"],
    corrupt_tokens: Int[Tensor, "batch pos"],
    hook_name: str,
    metric: Callable[[Tensor], Tensor],
) -> Float[Tensor, "batch pos d_sae"]:
    """Reference for exercise 4.3: attribution patching in its clean/corrupt form (Nanda 2023's
    demo): the estimated change of ``metric`` on the CORRUPT run when one feature at one position
    is patched to its clean value, ``(f_clean - f_corrupt) * dm/df`` with the gradient taken on
    the corrupt run (SAE spliced there with its error kept as a constant). Detached."""
    check_splice(model, sae, hook_name)
    store: dict[str, Tensor] = {}

    def grab(activation, hook):
        store["clean"] = sae.encode(activation).detach()

    with torch.no_grad():
        model.run_with_hooks(clean_tokens, fwd_hooks=[(hook_name, grab)])

    def splice(activation, hook):
        f = sae.encode(activation.detach()).detach().requires_grad_(True)
        store["corrupt"] = f
        return sae.decode(f) + (activation - sae.decode(f)).detach()

    with torch.enable_grad():
        logits = model.run_with_hooks(corrupt_tokens, fwd_hooks=[(hook_name, splice)])
        metric(logits).sum().backward()
    f = store["corrupt"]
    return ((store["clean"] - f.detach()) * f.grad).detach()


@torch.no_grad()
def exact_patch_effects(
    model: HookedTransformer,
    sae,
    clean_tokens: Int[Tensor, "batch pos"],
    corrupt_tokens: Int[Tensor, "batch pos"],
    hook_name: str,
    metric: Callable[[Tensor], Tensor],
    batch_size: int = 256,
    min_pos: int = 1,
) -> tuple[Int[Tensor, "n 3"], Float[Tensor, " n"]]:
    """Activation patching, one feature at a time: for every ``(prompt, position, feature)``
    whose value differs between the clean and the corrupt run (positions >= ``min_pos``), the
    change of ``metric`` on the corrupt run when that one feature is set to its clean value
    (the corrupt run's error kept). Returns ``(index [n, 3], effect [n])``; rows batched."""
    check_splice(model, sae, hook_name)
    store: dict[str, Tensor] = {}

    def grab(activation, hook):
        store["f"] = sae.encode(activation)

    model.run_with_hooks(clean_tokens, fwd_hooks=[(hook_name, grab)])
    f_clean = store["f"]
    base = metric(model.run_with_hooks(corrupt_tokens, fwd_hooks=[(hook_name, grab)]))
    f_corrupt = store["f"]
    differ = ((f_clean - f_corrupt).abs() > 0).nonzero()
    differ = differ[differ[:, 1] >= min_pos]
    b, p, i = differ.unbind(1)
    coeff = f_clean[b, p, i] - f_corrupt[b, p, i]
    W_dec = sae.W_dec.detach()
    return differ, _one_edit_per_row(
        model, corrupt_tokens, hook_name, metric, base, differ, coeff, W_dec, batch_size
    )


def rank(x: Tensor) -> Tensor:
    """Ranks 0..n-1 (average ranks for ties) as floats."""
    x = x.flatten().double()
    order = x.argsort()
    ranks = torch.empty_like(x)
    ranks[order] = torch.arange(len(x), dtype=torch.double)
    values, inverse = torch.unique(x, return_inverse=True)
    if len(values) < len(x):  # average tied ranks
        sums = torch.zeros(len(values), dtype=torch.double).index_add_(0, inverse, ranks)
        counts = torch.bincount(inverse, minlength=len(values)).double()
        ranks = (sums / counts)[inverse]
    return ranks


def pearson(x: Tensor, y: Tensor) -> float:
    x, y = x.flatten().double(), y.flatten().double()
    if len(x) != len(y) or len(x) < 2:
        raise ValueError(f"need two equal-length series of at least 2 values ({len(x)}, {len(y)}).")
    xc, yc = x - x.mean(), y - y.mean()
    denom = xc.norm() * yc.norm()
    return float((xc @ yc) / denom) if denom > 0 else float("nan")


def spearman(x: Tensor, y: Tensor) -> float:
    """Spearman rank correlation (Pearson correlation of the ranks)."""
    return pearson(rank(x), rank(y))


# ----------------------------------------------------------------------------- part 5: circuits


class FeatureCircuit:
    """Feature and error nodes at several spliced dictionaries, for one batch of prompts.

    ``saes`` maps hook name -> dictionary (every one spliced at once, error kept, so the spliced
    model equals the clean one). A node is ``(hook, position, feature)`` with ``feature = -1`` for
    the error node of that hook and position. :meth:`node_effects` estimates, for each node, the
    change in ``metric`` when the node is set to its mean over the batch (its "mean ablation"),
    by attribution patching or integrated gradients; :meth:`run` evaluates the metric with a
    chosen set of nodes kept and all others mean-ablated (Marks et al. 2024's faithfulness).
    """

    def __init__(
        self,
        model: HookedTransformer,
        saes: dict[str, object],
        tokens: Int[Tensor, "batch pos"],
        metric: Callable[[Tensor], Tensor],
    ):
        if not saes:
            raise ValueError("saes must map at least one hook name to a dictionary.")
        for name, sae in saes.items():
            check_splice(model, sae, name)
        order = {name: i for i, name in enumerate(model.hook_dict)}
        self.hooks = sorted(saes, key=order.__getitem__)
        self.model, self.saes, self.tokens, self.metric = model, saes, tokens, metric
        store: dict[str, Tensor] = {}

        def grab(activation, hook):
            sae = saes[hook.name]
            f = sae.encode(activation)
            store[hook.name] = (f, activation - sae.decode(f))
            return activation

        with torch.no_grad():
            self.clean = metric(model.run_with_hooks(tokens, fwd_hooks=[(h, grab) for h in saes]))
        self.acts = {h: store[h][0] for h in self.hooks}  # [batch, pos, d_sae]
        self.errors = {h: store[h][1] for h in self.hooks}  # [batch, pos, d_in]
        self.mean_acts = {h: a.mean(0, keepdim=True) for h, a in self.acts.items()}
        self.mean_errors = {h: e.mean(0, keepdim=True) for h, e in self.errors.items()}

    def _masks(self, keep: dict[str, Tensor] | None, fill: bool) -> dict[str, Tensor]:
        pos = self.tokens.shape[1]
        out = {}
        for h in self.hooks:
            width = self.acts[h].shape[-1] + 1  # the last column is the error node
            if keep is None or h not in keep:
                out[h] = torch.full((pos, width), fill)
            else:
                if keep[h].shape != (pos, width):
                    raise ValueError(f"keep[{h!r}] must be [pos, d_sae + 1] = {(pos, width)}.")
                out[h] = keep[h].bool()
        return out

    def run(self, keep: dict[str, Tensor] | None, default: bool = False) -> Float[Tensor, " batch"]:
        """The metric with the nodes in ``keep`` (bool [pos, d_sae + 1] per hook; last column =
        error node) at their actual values and every other node at its batch mean. Hooks missing
        from ``keep`` are all kept (``default=True``) or all ablated (``default=False``)."""
        masks = self._masks(keep, default)

        def splice(activation, hook):
            h, sae = hook.name, self.saes[hook.name]
            f = sae.encode(activation)
            err = activation - sae.decode(f)
            m = masks[h]
            f2 = torch.where(m[None, :, :-1], f, self.mean_acts[h])
            e2 = torch.where(m[None, :, -1:], err, self.mean_errors[h])
            return sae.decode(f2) + e2

        with torch.no_grad():
            logits = self.model.run_with_hooks(
                self.tokens, fwd_hooks=[(h, splice) for h in self.hooks]
            )
        return self.metric(logits)

    def node_effects(
        self, method: str = "ig", steps: int = 10, joint: bool = False
    ) -> dict[str, Tensor]:
        """Estimated effect on the batch-mean metric of mean-ablating each node, per hook a
        [pos, d_sae + 1] tensor (last column: the error node), summed over the batch then divided
        by it. ``method``: "atp" (one backward pass) or "ig" (``steps`` passes per dictionary).

        IG follows Marks et al.'s code (``_pe_ig`` in saprmarks/feature-circuits): ONE dictionary
        at a time moves on the straight line from its actual values (t = 0) to the batch mean
        (t = 1) at ``t = k / steps``, k = 0..steps-1 (clean end in, mean end out), while every
        other dictionary is left clean. ``joint=True`` moves every dictionary together instead
        (one set of ``steps`` passes), the course's earlier variant."""
        if method not in ("atp", "ig"):
            raise ValueError(f"method must be 'atp' or 'ig', got {method!r}.")
        ts = [0.0] if method == "atp" else [k / steps for k in range(steps)]
        groups = [list(self.hooks)] if (joint or method == "atp") else [[h] for h in self.hooks]
        grads = {h: None for h in self.hooks}
        for group in groups:
            for t in ts:
                leaves: dict[str, tuple[Tensor, Tensor]] = {}

                def splice(activation, hook, t=t, leaves=leaves):
                    h, sae = hook.name, self.saes[hook.name]
                    f = (self.acts[h] + t * (self.mean_acts[h] - self.acts[h])).detach()
                    e = (self.errors[h] + t * (self.mean_errors[h] - self.errors[h])).detach()
                    f.requires_grad_(True)
                    e.requires_grad_(True)
                    leaves[h] = (f, e)
                    # the upstream activation only passes its gradient through the identity
                    return sae.decode(f) + e + (activation - activation.detach())

                with torch.enable_grad():
                    logits = self.model.run_with_hooks(
                        self.tokens, fwd_hooks=[(h, splice) for h in group]
                    )
                    self.metric(logits).sum().backward()
                for h, (f, e) in leaves.items():
                    g_f = f.grad * (self.mean_acts[h] - self.acts[h])
                    g_e = (e.grad * (self.mean_errors[h] - self.errors[h])).sum(-1, keepdim=True)
                    g = torch.cat([g_f, g_e], dim=-1)
                    grads[h] = g if grads[h] is None else grads[h] + g
        n = self.tokens.shape[0] * len(ts)
        return {h: (g.sum(0) / n).detach() for h, g in grads.items()}

    def top_nodes(self, effects: dict[str, Tensor], n: int, errors: bool = True) -> dict:
        """Keep-masks of the ``n`` nodes with the largest |effect| (error nodes excluded from the
        ranking and always ablated when ``errors=False``)."""
        flat = []
        for h in self.hooks:
            e = effects[h].abs().clone()
            if not errors:
                e[:, -1] = -1.0
            flat.append(e.flatten())
        scores = torch.cat(flat)
        keep_flat = torch.zeros_like(scores, dtype=torch.bool)
        if n > 0:
            keep_flat[scores.topk(min(n, len(scores))).indices] = True
        keep_flat &= scores >= 0
        out, start = {}, 0
        for h in self.hooks:
            size = effects[h].numel()
            out[h] = keep_flat[start : start + size].reshape(effects[h].shape)
            start += size
        return out

    def faithfulness(self, keep: dict[str, Tensor]) -> tuple[float, float]:
        """(faithfulness, completeness) of the circuit ``keep``, on the batch-mean metric:
        F(C) = (m(C) - m(empty)) / (m(model) - m(empty)); completeness is F of the complement
        (near 0 = the circuit holds everything that matters)."""
        full = self.clean.mean().item()
        empty = self.run(None, default=False).mean().item()
        if abs(full - empty) < 1e-9:
            raise ValueError("mean-ablating every node does not change the metric.")
        kept = self.run(keep).mean().item()
        complement = self.run({h: ~keep[h] for h in self.hooks}).mean().item()
        return (kept - empty) / (full - empty), (complement - empty) / (full - empty)

    def n_nodes(self) -> int:
        return sum(a.shape[1] * (a.shape[2] + 1) for a in self.acts.values())


# ----------------------------------------------------------------------------- part 5: ch05 graph


def _mlp_edit_hook(layer_pos: int, delta: Tensor) -> Callable:
    def hook(activation, hook):
        out = activation.clone()
        out[:, layer_pos] = out[:, layer_pos] + delta
        return out

    return hook


@torch.no_grad()
def graph_node_ablations(circuit, graph: dict, transcoders: dict) -> list[dict]:
    """Test a :meth:`course_utils.science.circuits.Circuit.greedy_paths` graph by ablation.

    For every node feeding the root directly that is a transcoder feature, the transcoder error
    at a position, or a head's contribution from one source position, ablate it in the real
    model and measure the root feature's new pre-activation (everything downstream recomputed:
    LayerNorm scales, attention patterns, later layers). The graph's prediction for the drop is
    the edge weight (exact with LayerNorm and attention frozen). Returns one dict per node:
    ``{node, kind, predicted, predicted_total, actual}``, all changes of the root's
    pre-activation: ``predicted`` is minus the edge weight (the direct path only);
    ``predicted_total`` adds, for a feature or error node, its paths through every later head
    that reads its position (attention and LayerNorm frozen: the linear model's exact answer);
    ``predicted_ln`` applies the node's direct change to the root's residual stream and
    recomputes LayerNorm (attention still frozen).
    """
    from course_utils.science import transcoders as T

    model, tokens = circuit.model, circuit.tokens
    root = graph["nodes"][graph["root"]]
    if root["kind"] != "feature":
        raise ValueError("graph_node_ablations needs a graph rooted at a transcoder feature.")
    layer, feature, pos = root["layer"], root["index"], root["pos"]
    tc = T.as_single(transcoders[layer])
    hook_in = f"blocks.{layer}.ln2.hook_normalized"
    base = circuit.pre_activation(layer, feature, pos)
    head_terms = [t for t in circuit.decompose_feature(layer, feature, pos) if t["kind"] == "head"]

    def via_heads(node: dict) -> float:
        total = 0.0
        for term in head_terms:
            if term["src"] != node["pos"] or term["layer"] <= node["layer"]:
                continue
            for sub in circuit.decompose_head_term(term):
                same = sub["kind"] == node["kind"] and sub.get("layer") == node["layer"]
                if same and sub.get("index") == node.get("index") and sub["pos"] == node["pos"]:
                    total += sub["value"]
        return total

    out = []
    for edge in graph["edges"]:
        if edge["dst"] != graph["root"]:
            continue
        node = graph["nodes"][edge["src"]]
        kind, hooks = node["kind"], None
        if kind == "feature":
            src_tc = T.as_single(transcoders[node["layer"]])
            delta = -node["activation"] * src_tc.W_dec[node["index"]].detach()
            hooks = [(f"blocks.{node['layer']}.hook_mlp_out", _mlp_edit_hook(node["pos"], delta))]
        elif kind == "tc_error":
            lay, p = node["layer"], node["pos"]
            src_tc = T.as_single(transcoders[lay])
            x = circuit.cache[f"blocks.{lay}.ln2.hook_normalized"][p]
            delta = src_tc(x[None])[0].detach() - circuit.cache[f"blocks.{lay}.hook_mlp_out"][p]
            hooks = [(f"blocks.{lay}.hook_mlp_out", _mlp_edit_hook(p, delta))]
        elif kind == "head":
            lay, h, dest, src = node["layer"], node["index"], node["pos"], node["src"]
            ln1 = model.blocks[lay].ln1
            x_pre = circuit.cache[f"blocks.{lay}.ln1.hook_normalized"][src] * ln1.w + ln1.b
            weight = circuit.cache[f"blocks.{lay}.attn.hook_pattern"][h, dest, src]
            delta = -weight * (x_pre @ model.W_V[lay, h] @ model.W_O[lay, h]).detach()

            def zero_edge(pattern, hook, h=h, dest=dest, src=src):
                pattern = pattern.clone()
                pattern[:, h, dest, src] = 0.0
                return pattern

            hooks = [(f"blocks.{lay}.attn.hook_pattern", zero_edge)]
        if hooks is None:
            continue
        store: dict[str, Tensor] = {}

        def grab(activation, hook, store=store):
            store["x"] = activation

        model.run_with_hooks(tokens, fwd_hooks=[*hooks, (hook_in, grab)])
        new = (store["x"][0, pos] @ tc.W_enc[:, feature] + tc.b_enc[feature]).item()
        direct = -edge["weight"]
        total = direct - via_heads(node) if kind in ("feature", "tc_error") else direct
        resid = circuit.cache[f"blocks.{layer}.hook_resid_mid"][pos] + delta
        centred = resid - resid.mean()
        scale = (centred.pow(2).mean() + model.cfg.eps).sqrt()
        with_ln = (centred / scale) @ tc.W_enc[:, feature] + tc.b_enc[feature]
        out.append(
            {
                "node": edge["src"],
                "kind": kind,
                "predicted": direct,
                "predicted_total": total,
                "predicted_ln": with_ln.item() - base,
                "actual": new - base,
            }
        )
    return out


# ----------------------------------------------------------------------------- part 6: online


@torch.no_grad()
def concept_feature(model: HookedTransformer, sae, text: str) -> tuple[int, float]:
    """The dictionary feature most active on the last token of ``text`` and its activation."""
    hook_name = trained_hook(sae)
    if hook_name is None:
        raise ValueError("the SAE does not record its hook (sae.cfg.metadata.hook_name).")
    check_splice(model, sae, hook_name)
    _, cache = model.run_with_cache(model.to_tokens(text), names_filter=hook_name)
    acts = sae.encode(cache[hook_name][0, -1])
    value, feature = acts.max(-1)
    if value <= 0:
        raise ValueError(f"no feature of this dictionary fires on the last token of {text!r}.")
    return int(feature), float(value)


def steering_demo(
    model: HookedTransformer,
    sae,
    prompt: str,
    concept: str,
    multiples: Sequence[float] = (0.0, 4.0, 8.0),
    n_new: int = 24,
    temperature: float = 0.0,
    seed: int = 0,
) -> dict:
    """Find the feature most active on ``concept`` and steer ``prompt``'s continuation with its
    decoder row at the SAE's hook, ``coeff = multiple x its activation on the concept``.
    Works for any HookedTransformer with a tokenizer and a SAELens SAE (GPT-2 small online)."""
    feature, activation = concept_feature(model, sae, concept)
    hook_name = trained_hook(sae)
    direction = sae.W_dec[feature].detach()
    tokens = model.to_tokens(prompt)
    texts = {}
    for k in multiples:
        hooks = [(hook_name, steering_hook(direction, k * activation))]
        out = generate(model, tokens, n_new, hooks, temperature=temperature, seed=seed)
        texts[k] = model.to_string(out[0, tokens.shape[1] :])
    return {"feature": feature, "activation": activation, "hook_name": hook_name, "texts": texts}
