"""Move our SAEs into the SAELens ecosystem (chapter 03; reused by 04-05).

- :func:`to_saelens` turns one instance of a :mod:`course_utils.science.saes` SAE (or a plain state dict
  with SAELens names) into a SAELens ``StandardSAE`` / ``TopKSAE`` / ``JumpReLUSAE``;
- :func:`export_sae` writes it as ``cfg.json`` + ``sae_weights.safetensors`` (``save_model``),
  which ``SAE.load_from_disk`` and :func:`course_utils.science.models.load_sae` read back (no pickle);
- :func:`hooked_sae_transformer` rebuilds a course model as a SAELens ``HookedSAETransformer`` so
  that ``run_with_saes`` works on it.

Our SAEs and SAELens's agree on the forward pass: ``acts = act((x - b_dec) @ W_enc + b_enc)``,
``x_hat = acts @ W_dec + b_dec`` (SAELens: ``apply_b_dec_to_input=True``).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor
from transformer_lens import HookedTransformer

from course_utils.science import saes as S
from course_utils.science.hooks import check_hook_name

SAELENS_NAMES = ("W_enc", "b_enc", "W_dec", "b_dec")


def hook_width(model: HookedTransformer, hook_name: str) -> int:
    """The size of the last dimension of the activation at ``hook_name`` (e.g. d_model, d_mlp)."""
    check_hook_name(model, hook_name)
    store: dict[str, int] = {}

    def grab(activation: Tensor, hook) -> None:
        store["width"] = activation.shape[-1]

    layer = hook_name.split(".")
    stop = int(layer[1]) + 1 if layer[0] == "blocks" and layer[1].isdigit() else None
    with torch.no_grad():
        model.run_with_hooks(
            torch.zeros(1, 2, dtype=torch.long, device=model.cfg.device),
            fwd_hooks=[(hook_name, grab)],
            stop_at_layer=stop,
            return_type=None,
        )
    return store["width"]


def check_sae_fits(model: HookedTransformer, hook_name: str, d_in: int) -> None:
    """A clear error when an SAE's d_in does not match the width of the hook it is spliced at."""
    width = hook_width(model, hook_name)
    if width != d_in:
        raise ValueError(
            f"the SAE has d_in={d_in} but the activation at {hook_name!r} has width {width}: "
            "this SAE was trained on a different hook (or model). Use the hook it was trained on "
            "(sae.cfg.metadata.hook_name for a SAELens SAE)."
        )


def _architecture(sae) -> str:
    if isinstance(sae, S.TopKSAE):
        return "topk"
    if isinstance(sae, S.JumpReLUSAE):
        return "jumprelu"
    if isinstance(sae, S.DecoderNormL1SAE):
        return "standard"  # SAELens runs it as a plain ReLU SAE: the forward pass is the same
    if isinstance(sae, S.SAE):
        return "standard"
    raise TypeError(f"expected a course_utils.science.saes SAE, got {type(sae).__name__}.")


def to_saelens(
    sae: S.SAE,
    instance: int = 0,
    hook_name: str = "blocks.0.hook_resid_post",
    model_name: str = "course-2l",
    model: HookedTransformer | None = None,
    extra_metadata: dict | None = None,
):
    """One instance of ``sae`` as a SAELens inference SAE (identical encode/decode).

    With ``model``, the hook name and the SAE's width are checked against it first.
    """
    from sae_lens import (
        JumpReLUSAE,
        JumpReLUSAEConfig,
        StandardSAE,
        StandardSAEConfig,
        TopKSAE,
        TopKSAEConfig,
    )
    from sae_lens.saes.sae import SAEMetadata

    architecture = _architecture(sae)
    if model is not None:
        check_hook_name(model, hook_name)
        check_sae_fits(model, hook_name, sae.d_in)
    state = sae.instance_state_dict(instance)
    layer = hook_name.split(".")
    metadata = SAEMetadata(
        hook_name=hook_name,
        model_name=model_name,
        hook_layer=int(layer[1]) if layer[0] == "blocks" and layer[1].isdigit() else None,
        **(extra_metadata or {}),
    )
    common = dict(d_in=sae.d_in, d_sae=sae.d_sae, apply_b_dec_to_input=True, metadata=metadata)
    if architecture == "topk":
        k = int(sae.k[instance])
        out = TopKSAE(TopKSAEConfig(k=k, **common))
    elif architecture == "jumprelu":
        out = JumpReLUSAE(JumpReLUSAEConfig(**common))
    else:
        out = StandardSAE(StandardSAEConfig(**common))
    out.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    out.eval()
    return out


def export_sae(
    sae, folder, instance: int = 0, weights_dtype: torch.dtype | None = None, **kwargs
) -> Path:
    """Write one instance as a SAELens folder (cfg.json + sae_weights.safetensors); returns it.

    ``sae`` may also already be a SAELens SAE (then ``instance`` and ``kwargs`` are ignored).
    ``weights_dtype`` (e.g. ``torch.float16``) stores the weights in that type to halve the file;
    the config keeps float32, so ``SAE.load_from_disk`` loads them back as float32.
    """
    from sae_lens import SAE as SaeLensSAE

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lens_sae = sae if isinstance(sae, SaeLensSAE) else to_saelens(sae, instance, **kwargs)
    if weights_dtype is not None:
        dtype = lens_sae.cfg.dtype
        lens_sae = lens_sae.to(weights_dtype)
        lens_sae.cfg.dtype = dtype  # the dtype it is loaded (and computed) in
    lens_sae.save_model(folder)
    return folder


def hooked_sae_transformer(model: HookedTransformer):
    """The same model (same weights, tokenizer) as a SAELens ``HookedSAETransformer``."""
    from sae_lens import HookedSAETransformer

    out = HookedSAETransformer(model.cfg, tokenizer=model.tokenizer, move_to_device=True)
    missing, unexpected = out.load_state_dict(model.state_dict(), strict=False)
    if unexpected or any(not name.endswith("hook_in") for name in missing):
        raise RuntimeError(f"weights did not transfer: missing {missing}, unexpected {unexpected}.")
    out.eval()
    return out
