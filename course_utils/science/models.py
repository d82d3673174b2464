"""Models the course runs on. Chapter 00 uses a tiny randomly initialised transformer (no download)."""

from __future__ import annotations

import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig


def tiny_random_model(seed: int = 0, n_layers: int = 2, d_vocab: int = 50) -> HookedTransformer:
    """A 2-layer attention+MLP transformer with random weights: instant, offline, deterministic."""
    cfg = HookedTransformerConfig(
        n_layers=n_layers,
        d_model=32,
        n_heads=4,
        d_head=8,
        d_mlp=64,
        d_vocab=d_vocab,
        n_ctx=16,
        act_fn="gelu",
        normalization_type="LN",
        seed=seed,
        device="cpu",
    )
    model = HookedTransformer(cfg)
    model.eval()
    return model


def random_tokens(
    model: HookedTransformer, batch: int = 4, seq: int = 12, seed: int = 0
) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.cfg.d_vocab, (batch, seq), generator=generator)


# ------------------------------------------------------------------------------------------------
# One loader for models and dictionaries: shipped (offline) by default, real ones when online.
# ------------------------------------------------------------------------------------------------
#: Models that ship with the course (no network needed).
SHIPPED_MODELS = ("course-2l",)
#: Models fetched through TransformerLens from the Hugging Face Hub (network needed once).
ONLINE_MODELS = {"gelu-1l": "gelu-1l", "gpt2-small": "gpt2-small"}
#: Where shipped dictionaries (SAELens format: cfg.json + sae_weights.safetensors) live.
SAE_ASSETS = "saes"
SAE_CONFIG_FILE = "cfg.json"
SAE_WEIGHTS_FILE = "sae_weights.safetensors"
#: Shipped dictionaries and the command that rebuilds each one.
REBUILT_BY = {
    "course-2l-res0-seed0": "python -m course_utils.assets build-saes",
    "course-2l-res0-seed1": "python -m course_utils.assets build-saes",
    "course-2l-mlp0-seed0": "python -m course_utils.assets build-mlp-saes",
    "course-2l-mlp0-seed1": "python -m course_utils.assets build-mlp-saes",
    "course-2l-e2e-local": "python -m course_utils.assets build-e2e",
    "course-2l-e2e-e2e": "python -m course_utils.assets build-e2e",
    "course-2l-e2e-e2eds": "python -m course_utils.assets build-e2e",
}


class NetworkRequiredError(RuntimeError):
    """An online-only model or dictionary was requested on a machine without network access."""


def _require_network(what: str, offline_choice: str) -> None:
    """Raise one clear NetworkRequiredError when offline (one bounded probe, no retries)."""
    from course_utils.machinery.env import network_available, offline_forced

    if offline_forced():
        reason = "HF_HUB_OFFLINE=1 or COURSE_OFFLINE=1 is set"
    elif not network_available():
        reason = "huggingface.co cannot be reached from this machine"
    else:
        return
    raise NetworkRequiredError(
        f"{what} is downloaded from the Hugging Face Hub and needs a network connection, but "
        f"{reason}. To stay offline, use {offline_choice}, which ships with the course; to use "
        f"{what}, run once with a network (and HF_HUB_OFFLINE unset) so it is cached."
    )


def load_model(name: str = "course-2l", device: str | None = None) -> HookedTransformer:
    """The course model by default; ``gelu-1l`` / ``gpt2-small`` through TransformerLens online.

    ``name`` may also be a folder holding a model saved in the course format
    (tokenizer.json, config.json, model.safetensors), e.g. one you rebuilt yourself.
    """
    from pathlib import Path

    from course_utils.science import course_model

    if not isinstance(name, (str, Path)):
        raise TypeError(f"load_model takes a model name or a folder, got {type(name).__name__}.")
    if device is None:
        from course_utils.machinery.env import get_device

        device = str(get_device())  # the CPU unless the learner set COURSE_DEVICE=cuda
    if name in SHIPPED_MODELS:
        return course_model.load_course_model(course_model.asset_dir(str(name)), device=device)
    if Path(name).is_dir():
        return course_model.load_course_model(Path(name), device=device)
    if name in ONLINE_MODELS:
        _require_network(repr(name), "load_model('course-2l') (the default)")
        return _from_pretrained(ONLINE_MODELS[name], device)
    raise ValueError(
        f"unknown model {name!r}. Shipped (offline): {', '.join(SHIPPED_MODELS)}; online: "
        f"{', '.join(ONLINE_MODELS)}; or a folder with a model saved in the course format."
    )


def _from_pretrained(tl_name: str, device: str | None) -> HookedTransformer:
    try:
        model = HookedTransformer.from_pretrained(tl_name, device=device or "cpu")
    except OSError as error:  # connection dropped mid-download, or a partial cache
        raise NetworkRequiredError(
            f"could not download {tl_name!r} ({type(error).__name__}: {error}). Check the network "
            "or use load_model('course-2l'), which ships with the course."
        ) from None
    model.eval()
    return model


def shipped_dictionaries() -> list[str]:
    """Names of the dictionaries (SAEs, transcoders) shipped in course_utils/assets/saes/."""
    from course_utils.assets import ASSETS_DIR

    folder = ASSETS_DIR / SAE_ASSETS
    if not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir() if (p / SAE_CONFIG_FILE).is_file())


def load_sae(name: str, sae_id: str | None = None, device: str = "cpu"):
    """A dictionary by name: shipped with the course, a local SAELens folder, or a SAELens release.

    - a shipped name (``shipped_dictionaries()``) or a folder in SAELens format
      (``cfg.json`` + ``sae_weights.safetensors``, as written by ``SAE.save_model``): offline;
    - a SAELens release name plus ``sae_id`` (e.g. ``"gpt2-small-res-jb"``,
      ``"blocks.8.hook_resid_pre"``): downloaded from the Hugging Face Hub, so online only.
    """
    from pathlib import Path

    from course_utils.assets import ASSETS_DIR

    if not isinstance(name, (str, Path)):
        raise TypeError(f"load_sae takes a name or a folder, got {type(name).__name__}.")
    shipped = ASSETS_DIR / SAE_ASSETS / str(name)
    if str(name) in shipped_dictionaries() or str(name) in REBUILT_BY:
        return load_sae_folder(shipped, device, rebuild=REBUILT_BY.get(str(name)))
    if Path(name).is_dir():
        return load_sae_folder(Path(name), device)
    from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

    releases = get_pretrained_saes_directory()  # a YAML file inside sae_lens: no network
    if name not in releases:
        available = ", ".join(shipped_dictionaries()) or "none yet"
        raise ValueError(
            f"unknown dictionary {name!r}: not shipped with the course (shipped: {available}), "
            "not a folder, and not a SAELens release name."
        )
    sae_ids = list(releases[name].saes_map)
    if sae_id is None or sae_id not in sae_ids:
        shown = ", ".join(map(repr, sae_ids[:8])) + (" ..." if len(sae_ids) > 8 else "")
        raise ValueError(
            f"the SAELens release {name!r} needs sae_id=, one of: {shown} (got {sae_id!r})."
        )
    _require_network(f"the SAELens release {name!r}", "a shipped dictionary or a local folder")
    from sae_lens import SAE

    try:
        return SAE.from_pretrained(name, sae_id, device=device)
    except OSError as error:
        raise NetworkRequiredError(
            f"could not download {name!r}/{sae_id!r} ({type(error).__name__}: {error})."
        ) from None


def _in_git_checkout(path) -> bool:
    """True when ``path`` lies inside a git working tree (so `git checkout -- path` can work)."""
    from pathlib import Path

    return any((parent / ".git").exists() for parent in Path(path).resolve().parents)


def load_sae_folder(folder, device: str = "cpu", rebuild: str | None = None):
    """Load an SAE saved by SAELens's ``save_model`` (JSON + safetensors; nothing unpickled).

    ``rebuild``: the command that re-creates this folder (shipped dictionaries), named first in
    every error about a missing or broken file.
    """
    import json
    from pathlib import Path

    from sae_lens import SAE
    from safetensors import safe_open

    folder = Path(folder)
    config_path, weights_path = folder / SAE_CONFIG_FILE, folder / SAE_WEIGHTS_FILE

    def fix(path) -> str:
        if rebuild is not None:
            text = f"Rebuild it with `{rebuild}` (8-13 min on a CPU)"
        else:
            text = "Re-create the folder with SAELens's SAE.save_model(folder)"
        if _in_git_checkout(path):
            text += f", or restore it with `git checkout -- {path}`"
        return text + "."

    for path in (config_path, weights_path):
        if not path.is_file():
            raise FileNotFoundError(
                f"the dictionary file {path} is missing (a SAELens folder holds "
                f"{SAE_CONFIG_FILE} and {SAE_WEIGHTS_FILE}). {fix(path)}"
            )

    def unreadable(path, error: Exception) -> ValueError:
        return ValueError(
            f"the dictionary file {path} is unreadable ({type(error).__name__}: {error}). "
            f"{fix(path)}"
        )

    try:
        config = json.loads(config_path.read_text())
    except ValueError as error:
        raise unreadable(config_path, error) from None
    try:
        with safe_open(str(weights_path), framework="pt") as handle:
            shapes = {key: handle.get_slice(key).get_shape() for key in handle.keys()}
    except Exception as error:  # SafetensorError is not an OSError/ValueError subclass
        raise unreadable(weights_path, error) from None
    cfg_d_in = config.get("d_in") if isinstance(config, dict) else None
    weights_d_in = shapes.get("W_enc", [None])[0] if "W_enc" in shapes else None
    if "W_enc" not in shapes and "b_dec" in shapes:
        weights_d_in = shapes["b_dec"][-1]
    if cfg_d_in is not None and weights_d_in is not None and int(cfg_d_in) != int(weights_d_in):
        raise ValueError(
            f"{config_path} says d_in={cfg_d_in} but the weights in {weights_path} have "
            f"d_in={weights_d_in} (W_enc {shapes.get('W_enc')}): the two files do not belong "
            f"together. {fix(config_path)}"
        )
    return SAE.load_from_disk(folder, device=device)
