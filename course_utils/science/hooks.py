"""Hook helpers shared by every chapter that reads or edits a TransformerLens model's activations."""

from __future__ import annotations

import difflib

import torch
from jaxtyping import Float
from torch import Tensor
from transformer_lens import HookedTransformer
from transformer_lens.hook_points import HookPoint


class UnknownHookError(KeyError):
    def __str__(self) -> str:  # KeyError would wrap the message in quotes
        return str(self.args[0])


def check_hook_name(model: HookedTransformer, hook_name: str) -> str:
    """Return ``hook_name`` if the model has it; otherwise raise a clear error listing valid names."""
    names = list(model.hook_dict)
    if hook_name in model.hook_dict:
        return hook_name
    close = difflib.get_close_matches(hook_name, names, n=3, cutoff=0.6)
    suggestion = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
    shown = ", ".join(names[:12]) + (f", ... ({len(names)} in all)" if len(names) > 12 else "")
    raise UnknownHookError(
        f"the model has no hook named {hook_name!r}.{suggestion} Valid hook names: {shown}. "
        "List them all with `list(model.hook_dict)`."
    )


def record_norm_hook(
    activation: Float[Tensor, "batch pos *rest d"], hook: HookPoint, store: dict
) -> None:
    """Reference for exercise 0.2: store the L2 norm over the last dimension; change nothing."""
    store[hook.name] = activation.detach().norm(dim=-1)


def zero_ablation_hook(activation: Tensor, hook: HookPoint) -> Tensor:
    return torch.zeros_like(activation)


def ablation_loss_change(model: HookedTransformer, tokens: Tensor, hook_name: str) -> float:
    """Reference for exercise 0.3: mean next-token loss with ``hook_name`` zeroed, minus clean."""
    check_hook_name(model, hook_name)
    with torch.no_grad():
        clean = model(tokens, return_type="loss")
        ablated = model.run_with_hooks(
            tokens, return_type="loss", fwd_hooks=[(hook_name, zero_ablation_hook)]
        )
    return (ablated - clean).item()
