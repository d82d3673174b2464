"""A one-layer transformer with a bilinear MLP and its GELU twin (chapter 08, section 4).

Both are TransformerLens ``HookedTransformer``s trained on the course corpus with the course
tokenizer (``course-2l``'s ``tokenizer.json``) by the course model's own training loop
(``course_model.train_model``), same data order, steps and seed; only the MLP differs:

- ``bilinear``: ``gated_mlp=True`` with the gate's activation replaced by the identity, so the MLP
  is ``W_out^T ((W_gate^T z) * (W_in^T z)) + b_out`` with ``z = ln2(resid_mid)``; ``d_mlp`` 342
  (three matrices, so 2/3 of the GELU width, as Shazeer 2020 matches parameters). ``b_in`` (which
  TransformerLens adds after the product, a constant) is frozen at zero.
- ``gelu``: the usual ``W_out^T GELU(W_in^T z + b_in) + b_out``, ``d_mlp`` 512 (as course-2l).

TransformerLens has no identity activation, so the config says ``act_fn="relu"`` as a placeholder
and :func:`make_bilinear` swaps the function after construction; always load with
:func:`load_bilinear_lm`, which does it (and checks it). Hook names are TransformerLens's:
``blocks.0.mlp.hook_pre`` (gate), ``blocks.0.mlp.hook_pre_linear``, ``blocks.0.mlp.hook_post``.

Shipped files (``course_utils/assets/bilinear-lm/``, written by
``python -m course_utils.assets build-bilinear-lm``): ``<kind>/config.json`` and
``<kind>/model.safetensors`` (float16 on disk, float32 in memory) for each kind, ``metadata.json``
(settings, losses, timings) and ``README.md``.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens import HookedTransformer, HookedTransformerConfig

from course_utils.science import bilinear as bl
from course_utils.science import course_model as cm

ASSET_NAME = "bilinear-lm"
KINDS = ("bilinear", "gelu")
REBUILD_COMMAND = "python -m course_utils.assets build-bilinear-lm"
METADATA_FILE = "metadata.json"

#: Shared by both twins (course-2l's sizes, one layer instead of two).
BASE_ARCHITECTURE = {
    "n_layers": 1,
    "d_model": 128,
    "n_heads": 4,
    "d_head": 32,
    "n_ctx": 128,
    "normalization_type": "LN",
    "positional_embedding_type": "standard",
    "tokenizer_prepends_bos": True,
    "default_prepend_bos": True,
}
#: What differs. Bilinear: 3 x 128 x 342 = 131,328 MLP weights; GELU: 2 x 128 x 512 + 512 biases
#: = 131,584 (both + 128 for b_out).
MLP_ARCHITECTURE = {
    "bilinear": {"d_mlp": 342, "act_fn": "relu", "gated_mlp": True},  # act_fn: placeholder
    "gelu": {"d_mlp": 512, "act_fn": "gelu", "gated_mlp": False},
}


@dataclass
class BilinearLMConfig:
    """Everything that decides the shipped weights.

    Recipe (issue 26): both twins train side by side, step by step, on the same batches, from the
    same seed: AdamW (betas 0.9/0.95, weight decay 0.1 on matrices), linear warm-up then cosine
    to 10% of the peak, gradient-norm clipping at 1.0. Held-out loss is measured on
    ``checkpoint_windows`` validation windows at every step in ``checkpoints`` (points of ONE run
    with one cosine schedule, not separate shorter runs), next to add-k bigram tables.
    """

    seed: int = 0
    steps: int = 4800
    batch_size: int = 8
    lr: float = 5e-3
    warmup_steps: int = 50
    min_lr_fraction: float = 0.1
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    threads: int = 1  # on a shared 2-core machine one thread was 2x faster per step than two
    log_every: int = 50
    record_first_steps: int = 10
    checkpoints: tuple[int, ...] = (100, 200, 400, 800, 1200, 1600, 2400, 3200, 4000, 4800)
    checkpoint_windows: int = 128  # the first windows of the validation split
    validation_windows: int | None = None  # None: the whole validation split
    kinds: tuple[str, ...] = KINDS
    base: dict = field(default_factory=lambda: dict(BASE_ARCHITECTURE))

    def course_build_config(self, kind: str) -> cm.BuildConfig:
        """The same settings in the form ``course_model``'s batches and schedule read."""
        return cm.BuildConfig(
            seed=self.seed,
            steps=self.steps,
            batch_size=self.batch_size,
            lr=self.lr,
            warmup_steps=self.warmup_steps,
            min_lr_fraction=self.min_lr_fraction,
            weight_decay=self.weight_decay,
            grad_clip=self.grad_clip,
            threads=self.threads,
            log_every=self.log_every,
            record_first_steps=self.record_first_steps,
            architecture=architecture(kind, self.base),
        )


class BilinearLMFileError(FileNotFoundError):
    """A shipped file of the bilinear LM (or its GELU twin) is missing or unreadable."""


def asset_dir() -> Path:
    return Path(__file__).resolve().parents[1] / "assets" / ASSET_NAME


def architecture(kind: str, base: dict | None = None) -> dict:
    if kind not in MLP_ARCHITECTURE:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}.")
    return {**(BASE_ARCHITECTURE if base is None else base), **MLP_ARCHITECTURE[kind]}


def _identity(x: Tensor) -> Tensor:
    return x


def make_bilinear(model: HookedTransformer) -> HookedTransformer:
    """Turn every gated MLP of ``model`` into a bilinear one: identity gate, ``b_in`` = 0, frozen."""
    if not model.cfg.gated_mlp:
        raise ValueError("make_bilinear needs a model built with gated_mlp=True.")
    for block in model.blocks:
        block.mlp.act_fn = _identity
        with torch.no_grad():
            block.mlp.b_in.zero_()
        block.mlp.b_in.requires_grad_(False)
    return model


def is_bilinear(model: HookedTransformer) -> bool:
    return bool(model.cfg.gated_mlp) and all(b.mlp.act_fn is _identity for b in model.blocks)


def new_model(kind: str, d_vocab: int, tokenizer=None, seed: int = 0, base: dict | None = None):
    cfg = HookedTransformerConfig(
        **architecture(kind, base),
        d_vocab=d_vocab,
        seed=seed,
        device="cpu",
        model_name=f"{kind}-1l",
    )
    model = HookedTransformer(cfg, tokenizer=tokenizer)
    return make_bilinear(model) if kind == "bilinear" else model


def n_trainable(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# ----------------------------------------------------------------------------- save / load


def _missing(path: Path) -> str:
    return (
        f"the bilinear-LM file {path} is missing. Rebuild it with `{REBUILD_COMMAND}` "
        "(about 10-20 min on 2 CPU cores), or restore it with `git checkout -- "
        f"course_utils/assets/{ASSET_NAME}`."
    )


def _corrupt(path: Path, error: Exception) -> str:
    return (
        f"the bilinear-LM file {path} is unreadable ({type(error).__name__}: {error}). Restore "
        f"it with `git checkout -- course_utils/assets/{ASSET_NAME}` or rebuild it with "
        f"`{REBUILD_COMMAND}`."
    )


def save_model(model: HookedTransformer, kind: str, directory: Path) -> None:
    """``directory/kind/config.json`` and ``model.safetensors`` (weights stored as float16)."""
    from safetensors.torch import save_file

    folder = Path(directory) / kind
    folder.mkdir(parents=True, exist_ok=True)
    arch = {key: getattr(model.cfg, key) for key in architecture(kind)}
    config = {"kind": kind, "architecture": arch, "d_vocab": model.cfg.d_vocab}
    (folder / cm.CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    weights = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}
    save_file(weights, str(folder / cm.WEIGHTS_FILE), metadata={"format": "pt"})


def load_bilinear_lm(kind: str = "bilinear", directory: Path | None = None) -> HookedTransformer:
    """The shipped one-layer model of ``kind`` ("bilinear" or "gelu"), float32, eval mode, with
    the course tokenizer. Missing or broken files give one error naming the rebuild command."""
    from safetensors.torch import load_file

    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}.")
    folder = (asset_dir() if directory is None else Path(directory)) / kind
    config_path, weights_path = folder / cm.CONFIG_FILE, folder / cm.WEIGHTS_FILE
    for path in (config_path, weights_path):
        if not path.is_file():
            raise BilinearLMFileError(_missing(path))
    try:
        config = json.loads(config_path.read_text())
        if config["kind"] != kind:
            raise ValueError(f"config.json says kind {config['kind']!r}")
        cfg = HookedTransformerConfig(
            **config["architecture"],
            d_vocab=config["d_vocab"],
            device="cpu",
            model_name=f"{kind}-1l",
        )
    except (ValueError, KeyError, TypeError) as error:
        raise BilinearLMFileError(_corrupt(config_path, error)) from None
    try:
        state = {k: v.float() for k, v in load_file(str(weights_path)).items()}
    except Exception as error:  # SafetensorError, OSError
        raise BilinearLMFileError(_corrupt(weights_path, error)) from None
    tokenizer = cm.wrap_tokenizer(cm.asset_dir() / cm.TOKENIZER_FILE)
    model = HookedTransformer(cfg, tokenizer=tokenizer)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise BilinearLMFileError(_corrupt(weights_path, error)) from None
    if kind == "bilinear":
        make_bilinear(model)
    model.eval()
    return model


def files_sha256(directory: Path, kinds: tuple[str, ...] = KINDS) -> dict[str, str]:
    """SHA-256 of each model's files and of the SAE folders' files (those present)."""
    directory = Path(directory)
    out = {
        f"{kind}/{name}": cm.sha256_file(directory / kind / name)
        for kind in kinds
        for name in (cm.CONFIG_FILE, cm.WEIGHTS_FILE)
    }
    for name in SAE_SITES:
        if (directory / name).is_dir():
            for f in sorted((directory / name).iterdir()):
                out[f"{name}/{f.name}"] = cm.sha256_file(f)
    return out


def read_metadata(directory: Path | None = None) -> dict:
    path = (asset_dir() if directory is None else Path(directory)) / METADATA_FILE
    if not path.is_file():
        raise BilinearLMFileError(_missing(path))
    return json.loads(path.read_text())


# ----------------------------------------------------------------------------- data and build


def validation_windows(model: HookedTransformer, limit: int | None = None) -> Tensor:
    """The validation split in course-2l's windows (``model_loss`` scores every position)."""
    from course_utils.science.activations import corpus_windows

    windows = corpus_windows(model, "validation")
    return windows if limit is None else windows[:limit]


def _optimizer(model: HookedTransformer, config: BilinearLMConfig) -> torch.optim.AdamW:
    decay = [
        p for n, p in model.named_parameters() if p.requires_grad and p.ndim >= 2 and "W_" in n
    ]
    no_decay = [
        p
        for n, p in model.named_parameters()
        if p.requires_grad and not (p.ndim >= 2 and "W_" in n)
    ]
    return torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": config.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=config.lr,
        betas=(0.9, 0.95),
    )


def train_side_by_side(
    models: dict[str, HookedTransformer],
    stream: Tensor,
    config: BilinearLMConfig,
    heldout: Tensor,
    log=print,
) -> dict:
    """Train every model on the SAME batch at each step (course-2l's batches and schedule), and
    measure held-out loss on ``heldout`` at ``config.checkpoints``. Returns per kind: first
    losses, training-loss curve, checkpoint losses and seconds spent training it."""
    schedule = config.course_build_config(next(iter(models)))
    optimizers = {kind: _optimizer(m, config) for kind, m in models.items()}
    bos = next(iter(models.values())).tokenizer.bos_token_id
    batches = cm.training_batches(stream, schedule, bos)
    out = {
        k: {"first_losses": [], "loss_curve": [], "checkpoints": [], "train_seconds": 0.0}
        for k in models
    }
    running = {k: 0.0 for k in models}
    start = time.perf_counter()
    for m in models.values():
        m.train()
    for step in range(config.steps):
        lr = cm.learning_rate(step, schedule)
        tokens = next(batches)
        for kind, model in models.items():
            t0 = time.perf_counter()
            for group in optimizers[kind].param_groups:
                group["lr"] = lr
            loss = model(tokens, return_type="loss")
            optimizers[kind].zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            optimizers[kind].step()
            value = loss.item()
            out[kind]["train_seconds"] += time.perf_counter() - t0
            running[kind] += value
            if step < config.record_first_steps:
                out[kind]["first_losses"].append(value)
        done = step + 1
        if done % config.log_every == 0 or done == config.steps:
            count = (step % config.log_every) + 1
            for kind in models:
                out[kind]["loss_curve"].append((done, running[kind] / count))
                running[kind] = 0.0
            log(
                f"step {done:5d}/{config.steps}  "
                + "  ".join(f"{k} {out[k]['loss_curve'][-1][1]:.4f}" for k in models)
                + f"  lr {lr:.2e}  {(time.perf_counter() - start) / 60:.1f} min"
            )
        if done in config.checkpoints:
            for kind, model in models.items():
                model.eval()
                held = cm.model_loss(model, heldout)
                model.train()
                out[kind]["checkpoints"].append((done, held))
            log(
                f"  held-out at step {done}: "
                + "  ".join(f"{k} {out[k]['checkpoints'][-1][1]:.4f}" for k in models)
            )
    for m in models.values():
        m.eval()
    for kind in models:
        out[kind]["train_seconds"] = round(out[kind]["train_seconds"], 1)
    return out


DOSE_RESPONSE_FILE = "dose_response.csv"


def write_dose_response(metadata: dict, path: Path) -> None:
    """The committed table the notebook plots: one row per (step, model) plus the bigrams."""
    rows = ["step,tokens,lr,model,heldout_loss,train_loss"]
    cfg = metadata["build_config"]
    schedule = cm.BuildConfig(
        **{k: cfg[k] for k in ("seed", "steps", "batch_size", "lr", "warmup_steps")},
        min_lr_fraction=cfg["min_lr_fraction"],
        architecture=dict(cfg["base"]),
    )
    per_step = cfg["batch_size"] * cfg["base"]["n_ctx"]
    for kind, rec in metadata["models"].items():
        train = dict((int(s), v) for s, v in rec["loss_curve"])
        for step, held in rec["checkpoints"]:
            rows.append(
                f"{step},{step * per_step},{cm.learning_rate(step - 1, schedule):.6g},{kind},"
                f"{held:.5f},{train.get(int(step), float('nan')):.5f}"
            )
    for name, loss in metadata["heldout_baselines"].items():
        rows.append(f",,,{name},{loss:.5f},")
    Path(path).write_text("\n".join(rows) + "\n")


def read_dose_response(directory: Path | None = None) -> list[dict]:
    """Rows of ``dose_response.csv`` (numbers as floats; blank cells as None)."""
    import csv

    path = (asset_dir() if directory is None else Path(directory)) / DOSE_RESPONSE_FILE
    if not path.is_file():
        raise BilinearLMFileError(_missing(path))
    rows = []
    with path.open() as f:
        for row in csv.DictReader(f):
            rows.append(
                {
                    k: (v if k == "model" else (float(v) if v != "" else None))
                    for k, v in row.items()
                }
            )
    return rows


RUNS_FILE = "runs.json"


@torch.no_grad()
def window_losses(model: HookedTransformer, windows: Tensor, batch_size: int = 64) -> Tensor:
    """Mean next-token loss (nats) of each window. Every window has the same length, so the mean of
    these is ``course_model.model_loss`` on the same windows."""
    rows = []
    for start in range(0, len(windows), batch_size):
        batch = windows[start : start + batch_size]
        rows.append(model(batch, return_type="loss", loss_per_token=True).mean(-1))
    return torch.cat(rows)


def window_sources(
    windows: Int[Tensor, "n_windows n_ctx"], bos_token_id: int
) -> Int[Tensor, " n_windows"]:
    """The source file (0, 1, ...) each window starts in.

    ``make_windows`` cuts one token stream, in which every file begins with BOS, into consecutive
    ``[BOS, body]`` windows; a window's file is the number of file starts up to its first body token.
    Neighbouring windows share a file, so they are not independent samples of the split.
    """
    starts = (windows[:, 1:].flatten() == bos_token_id).long().cumsum(0)
    # the number of files started up to each window's first body token
    first = starts.view(windows.shape[0], -1)[:, 0]
    return torch.unique(first, return_inverse=True)[1]  # relabelled 0 .. n_files - 1


def _file_sums(
    values: Float[Tensor, " n"], files: Int[Tensor, " n"]
) -> tuple[Float[Tensor, " n_files"], Float[Tensor, " n_files"]]:
    """Per-file sum of ``values`` and number of windows (``files`` labels 0 .. n_files - 1)."""
    n_files = int(files.max()) + 1
    sums = torch.zeros(n_files, dtype=values.dtype).index_add_(0, files, values)
    return sums, torch.bincount(files, minlength=n_files).to(values.dtype)


def file_means(values: Float[Tensor, " n"], files: Int[Tensor, " n"]) -> Float[Tensor, " n_files"]:
    """The mean of ``values`` within each file (``files`` labels 0 .. n_files - 1)."""
    sums, counts = _file_sums(values, files)
    return sums / counts


def file_bootstrap_se(
    values: Float[Tensor, " n"], files: Int[Tensor, " n"], n_boot: int = 2000, seed: int = 0
) -> float:
    """Standard error of ``values.mean()`` when whole files are resampled with replacement.

    Windows of one file are correlated, so resampling windows would understate the error; resampling
    files keeps each file's windows together (a cluster bootstrap, ratio of resampled sums).
    """
    sums, counts = _file_sums(values, files)
    picks = torch.randint(
        0, len(sums), (n_boot, len(sums)), generator=torch.Generator().manual_seed(seed)
    )
    return (sums[picks].sum(-1) / counts[picks].sum(-1)).std().item()


def file_jackknife_se(values: Float[Tensor, " n"], files: Int[Tensor, " n"]) -> float:
    """Leave-one-file-out jackknife standard error of ``values.mean()``.

    A second file-level estimate next to ``file_bootstrap_se``: drop each file in turn, recompute
    the mean of the remaining windows, and scale the spread of those means by ``(n_files - 1)``.
    """
    sums, counts = _file_sums(values, files)
    n_files = len(sums)
    left_out = (sums.sum() - sums) / (counts.sum() - counts)  # the mean without each file
    return ((n_files - 1) / n_files * (left_out - left_out.mean()).pow(2).sum()).sqrt().item()


def _train_split_tokens() -> int:
    from course_utils.science.activations import _cached_stream, _plain_tokenizer_json

    tokenizer = cm.wrap_tokenizer(cm.asset_dir() / cm.TOKENIZER_FILE)
    return len(_cached_stream(_plain_tokenizer_json(tokenizer.backend_tokenizer), "train"))


def run_record(directory: Path | list[Path], label: str, note: str = "") -> dict:
    """A compact record of one finished build in ``directory`` (its metadata and weights): the
    settings that differ between runs, held-out checkpoints, whole-split validation losses, and
    each twin's loss on every validation window (for bootstrap standard errors without shipping
    the weights). Measured on the weights as saved (float16).

    A list of folders records ONE run whose twins were trained in separate processes
    (``build-bilinear-lm --kinds``): their settings must agree except for the kinds."""
    directories = [Path(d) for d in ([directory] if isinstance(directory, str | Path) else directory)]
    metas = [read_metadata(d) for d in directories]
    meta = _merge_metadata(metas, directories)
    cfg = meta["build_config"]
    record = {
        "label": label,
        "note": note,
        "seed": cfg["seed"],
        "steps": cfg["steps"],
        "tokens_trained": meta["tokens_trained"],
        "schedule": (
            f"AdamW lr {cfg['lr']}, {cfg['warmup_steps']} warm-up steps, cosine to "
            f"{cfg['min_lr_fraction']:.0%} at step {cfg['steps']}, batch {cfg['batch_size']} x "
            f"{cfg['base']['n_ctx']}"
        ),
        "train_split_tokens": _train_split_tokens(),
        "checkpoint_windows": cfg["checkpoint_windows"],
        "heldout_baselines": meta["heldout_baselines"],
        "bigram_add_0.1_validation_loss": meta["bigram_add_0.1_validation_loss"],
        "models": {},
    }
    for kind in KINDS:
        rec = meta["models"][kind]
        model = load_bilinear_lm(kind, meta["folders"][kind])
        losses = window_losses(model, validation_windows(model, cfg["validation_windows"]))
        record["models"][kind] = {
            "checkpoints": [[int(s), round(v, 5)] for s, v in rec["checkpoints"]],
            "validation_loss": round(rec["validation_loss"], 5),
            "validation_window_losses": [round(v, 4) for v in losses.tolist()],
        }
    return record


def _merge_metadata(metas: list[dict], directories: list[Path]) -> dict:
    """One build's metadata from folders that each trained some of the twins; refuses folders
    whose settings (other than ``kinds``) differ, a twin trained twice, or a twin missing."""
    settings = [{k: v for k, v in m["build_config"].items() if k != "kinds"} for m in metas]
    if any(s != settings[0] for s in settings[1:]):
        raise ValueError(
            f"the folders {[str(d) for d in directories]} were built with different settings "
            "(seed, steps, schedule or checkpoints): they are not one run; record them separately"
        )
    merged = dict(metas[0], models={}, folders={})
    for m, d in zip(metas, directories, strict=True):
        for kind, rec in m["models"].items():
            if kind in merged["models"]:
                raise ValueError(f"{kind} appears in more than one of {[str(x) for x in directories]}")
            merged["models"][kind] = rec
            merged["folders"][kind] = d
    missing = [k for k in KINDS if k not in merged["models"]]
    if missing:
        raise ValueError(
            f"no {', '.join(missing)} in {[str(d) for d in directories]}: a run records both "
            f"twins; train the missing one with build-bilinear-lm --kinds {','.join(missing)}"
        )
    return merged


def record_run(
    run_dir: Path | list[Path], label: str, note: str = "", directory: Path | None = None
) -> dict:
    """Add (or replace) the record of the build in ``run_dir`` (one folder, or one per twin when
    the twins trained in separate processes) under ``label`` in ``runs.json``."""
    path = (asset_dir() if directory is None else Path(directory)) / RUNS_FILE
    runs = json.loads(path.read_text()) if path.is_file() else []
    record = run_record(run_dir, label, note)
    runs = [r for r in runs if r["label"] != label] + [record]
    path.write_text("[\n" + ",\n".join(json.dumps(r) for r in runs) + "\n]\n")
    return record


def read_runs(directory: Path | None = None) -> dict[str, dict]:
    """The runs recorded in ``runs.json`` (label -> record; see :func:`run_record`)."""
    path = (asset_dir() if directory is None else Path(directory)) / RUNS_FILE
    if not path.is_file():
        raise BilinearLMFileError(_missing(path))
    return {r["label"]: r for r in json.loads(path.read_text())}


def build(config: BilinearLMConfig, out_dir: Path, log=print) -> dict:
    """Train the kinds in ``config.kinds`` side by side from the same seed on the same batches;
    save, evaluate (after the float16 round trip, i.e. the weights as shipped) and write
    ``metadata.json`` and ``dose_response.csv``."""
    from course_utils.science.activations import _cached_stream, _plain_tokenizer_json

    start = time.perf_counter()
    torch.set_num_threads(config.threads)
    tokenizer = cm.wrap_tokenizer(cm.asset_dir() / cm.TOKENIZER_FILE)
    # the same cached stream corpus_windows uses: tokenised once per process
    train_stream = _cached_stream(_plain_tokenizer_json(tokenizer.backend_tokenizer), "train")
    log(f"train tokens {len(train_stream):,} (course-2l tokenizer)")
    out_dir = Path(out_dir)
    metadata: dict = {
        "name": ASSET_NAME,
        "build_command": REBUILD_COMMAND,
        "build_config": asdict(config),
        "torch": torch.__version__,
        "tokenizer_sha256": cm.sha256_file(cm.asset_dir() / cm.TOKENIZER_FILE),
        "tokens_trained": config.steps * config.batch_size * config.base["n_ctx"],
        "models": {},
    }
    models = {}
    for kind in config.kinds:
        torch.manual_seed(config.seed)
        models[kind] = new_model(kind, tokenizer.vocab_size, tokenizer, config.seed, config.base)
        log(f"{kind}: {n_trainable(models[kind]):,} trainable parameters; {config.steps} steps")
    first = next(iter(models.values()))
    heldout = validation_windows(first, config.checkpoint_windows)
    whole = validation_windows(first, config.validation_windows)
    metadata["heldout_tokens_scored"] = int(heldout[:, 1:].numel())
    baselines = {}
    for add_k in (0.1,):
        table = cm.bigram_table(train_stream, tokenizer.vocab_size, add_k)
        baselines[f"bigram add-{add_k}"] = cm.bigram_loss(table, heldout)
        metadata[f"bigram_add_{add_k}_validation_loss"] = cm.bigram_loss(table, whole)
    best = cm.best_bigram(train_stream, heldout, tokenizer.vocab_size)
    baselines[f"bigram best add-k ({best['add_k']})"] = best["loss"]
    metadata["heldout_baselines"] = baselines
    log("held-out baselines: " + ", ".join(f"{k} {v:.4f}" for k, v in baselines.items()))
    trained = train_side_by_side(models, train_stream, config, heldout, log)
    for kind, model in models.items():
        save_model(model, kind, out_dir)
        shipped = load_bilinear_lm(kind, out_dir)  # measure the float16 weights as shipped
        metadata["models"][kind] = {
            "parameters_trainable": n_trainable(model),
            "mlp_parameters": sum(
                p.numel() for p in model.blocks[0].mlp.parameters() if p.requires_grad
            ),
            **trained[kind],
            "validation_loss": cm.model_loss(shipped, whole),
            "validation_loss_float32": cm.model_loss(model, whole),
            "validation_tokens_scored": int(whole[:, 1:].numel()),
        }
        log(f"{kind}: validation loss {metadata['models'][kind]['validation_loss']:.4f}")
    metadata["build_seconds"] = round(time.perf_counter() - start, 1)
    metadata["files_sha256"] = files_sha256(out_dir, config.kinds)
    (out_dir / METADATA_FILE).write_text(json.dumps(metadata, indent=2) + "\n")
    write_dose_response(metadata, out_dir / DOSE_RESPONSE_FILE)
    return metadata


# ----------------------------------------------------------------------------- analysis


def mlp_interaction_matrix(
    W_gate: Float[Tensor, "d_model d_mlp"],
    W_in: Float[Tensor, "d_model d_mlp"],
    W_out: Float[Tensor, "d_mlp d_model"],
    u: Float[Tensor, "d_model"],  # noqa: F821
) -> Float[Tensor, "d_model d_model"]:
    """The interaction matrix of residual direction ``u`` for a bilinear MLP in TransformerLens
    shapes: ``u . (mlp_out(z) - b_out) = z^T Q z`` with ``z`` the MLP's input (after ln2).

    TransformerLens multiplies from the right (``z @ W_in``), so in chapter-08 notation
    ``W1 = W_gate^T``, ``W2 = W_in^T``, ``P = W_out^T``.
    """
    if u.ndim != 1 or u.shape[0] != W_out.shape[-1]:
        raise ValueError(
            f"the output direction u must be a vector of length d_model = {W_out.shape[-1]} (a "
            f"direction in the residual stream the MLP writes to), got shape {tuple(u.shape)}."
        )
    B = bl.bilinear_tensor(W_gate.T, W_in.T, W_out.T)
    return bl.interaction_matrix(B, u)


def logit_direction(model: HookedTransformer, token: int) -> Float[Tensor, "d_model"]:  # noqa: F821
    """The residual direction that reads token ``token``'s logit minus the mean logit, through
    the final LayerNorm with its scale frozen: ``logit_t - mean logit = (u . resid) / scale``.

    Softmax ignores a shift shared by all logits, so the mean is subtracted; LayerNorm centres
    the residual and multiplies by ``ln_final.w``, which fold into ``u``.
    """
    W_U = model.W_U.detach()
    w = model.ln_final.w.detach()
    u = w * (W_U[:, token] - W_U.mean(1))
    return u - u.mean()


@torch.no_grad()
def mlp_inputs(
    model: HookedTransformer, tokens: Int[Tensor, "batch pos"]
) -> tuple[Float[Tensor, "batch pos d_model"], Float[Tensor, "batch pos d_model"], Tensor]:
    """(z, mlp_out, ln_final scale): the MLP's input ``ln2(resid_mid)``, its output, and the
    final LayerNorm's scale, from one forward pass with TransformerLens hooks."""
    names = ("blocks.0.hook_resid_mid", "blocks.0.hook_mlp_out", "ln_final.hook_scale")
    _, cache = model.run_with_cache(tokens, names_filter=lambda n: n in names)
    z = model.blocks[0].ln2(cache["blocks.0.hook_resid_mid"])
    return z, cache["blocks.0.hook_mlp_out"], cache["ln_final.hook_scale"]


@torch.no_grad()
def token_inputs(model: HookedTransformer) -> Float[Tensor, "d_vocab d_model"]:
    """What the MLP would see if attention added nothing: ``ln2(W_E[t] + mean_p W_pos[p])``."""
    return model.blocks[0].ln2(model.W_E + model.W_pos.mean(0))


def explained_by_top_k(
    values: Float[Tensor, "d"],  # noqa: F821
    vectors: Float[Tensor, "d d"],
    z: Float[Tensor, "n d"],
    ks: list[int],
) -> dict[int, float]:
    """Fraction of the variance of ``z^T Q z`` over the rows of ``z`` that the top-k
    eigenvectors' terms ``sum_{i<k} l_i (v_i . z)^2`` explain: ``1 - mean((full - top_k)^2) /
    var(full)`` for each k (k = d gives 1; an offset counts as an error)."""
    terms = (z @ vectors).pow(2) * values  # [n, d]
    full = terms.sum(-1)
    var = full.var(unbiased=False).clamp_min(1e-30)
    return {k: 1 - ((full - terms[:, :k].sum(-1)).pow(2).mean() / var).item() for k in ks}


def top_terms_of_sign(
    values: Float[Tensor, "n d"],
    vectors: Float[Tensor, "n d d"],
    z: Float[Tensor, "p d"],
    sign: Float[Tensor, " n"],
    k: int = 2,
) -> Float[Tensor, "p n"]:
    """``sum lambda_i (v_i . z)^2`` over the ``k`` largest eigenvalues of sign ``sign[j]``, for each
    of ``n`` interaction matrices (eigenvectors as columns, as ``eigen_decompose`` returns them).

    The top of a quadratic form's positive tail is driven by its largest positive eigenvalues (of its
    negative tail, by its most negative ones), so to score a tail, keep the terms of the tail's sign.
    """
    which = (sign[:, None] * values).topk(k, dim=-1).indices  # [n, k]
    lam = values.gather(-1, which)
    vecs = vectors.gather(-1, which[:, None, :].expand(-1, vectors.shape[1], -1))  # [n, d, k]
    return (torch.einsum("pd,ndk->pnk", z, vecs).pow(2) * lam[None]).sum(-1)


# ----------------------------------------------------------------------------- dictionaries

#: The two SAEs on the bilinear model (issue 26): an OUTPUT dictionary on what the MLP writes
#: (its encoder rows are output directions u, as Pearce et al. section 3.1 use them) and an INPUT
#: dictionary on the residual stream the MLP reads (before ln2), to name eigenvectors by features.
SAE_SITES = {"sae-mlp-out": "blocks.0.hook_mlp_out", "sae-resid-mid": "blocks.0.hook_resid_mid"}
REBUILD_SAES_COMMAND = "python -m course_utils.assets build-bilinear-lm --saes-only"


@dataclass
class BilinearSAEConfig:
    """TopK SAEs (SAELens format) on the shipped bilinear model; activations from train windows."""

    d_sae: int = 512
    k: int = 8  # k / d_model = 1/16, about Pearce et al.'s 30 / 512
    steps: int = 3000
    batch_size: int = 256
    lr: float = 3e-3
    windows: int = 512  # train windows of 128 tokens whose activations are sampled
    seed: int = 0
    threads: int = 1


@torch.no_grad()
def _site_activations(model: HookedTransformer, windows: Tensor, hook: str) -> Tensor:
    rows = []
    for start in range(0, len(windows), 32):
        _, cache = model.run_with_cache(windows[start : start + 32], names_filter=hook)
        rows.append(cache[hook][:, 1:].flatten(0, 1))  # skip the BOS position
    return torch.cat(rows)


def build_saes(config: BilinearSAEConfig, out_dir: Path, log=print) -> dict:
    """Train one TopK SAE per site in ``SAE_SITES`` on the bilinear model in ``out_dir`` and write
    them as SAELens folders ``out_dir/<name>/``; records go into ``metadata.json["saes"]``."""
    from course_utils.science import saes as S
    from course_utils.science.activations import corpus_windows
    from course_utils.science.sae_eval import train_dictionary
    from course_utils.science.saelens_io import export_sae

    torch.set_num_threads(config.threads)
    out_dir = Path(out_dir)
    model = load_bilinear_lm("bilinear", out_dir)
    train = corpus_windows(model, "train")
    g = torch.Generator().manual_seed(config.seed)
    windows = train[torch.randperm(len(train), generator=g)[: config.windows]]
    heldout = validation_windows(model, 64)
    records = {}
    for name, hook in SAE_SITES.items():
        t0 = time.perf_counter()
        acts = _site_activations(model, windows, hook)
        order = torch.randint(0, len(acts), (config.steps, config.batch_size), generator=g)
        sae = S.TopKSAE(model.cfg.d_model, config.d_sae, k=config.k, seed=config.seed)
        stats = train_dictionary(sae, [acts[i] for i in order], lr=config.lr)
        export_sae(sae, out_dir / name, hook_name=hook, model_name="bilinear-1l", model=model)
        val = _site_activations(model, heldout, hook)
        with torch.no_grad():
            recon = sae(val)[1][:, 0]  # (acts, x_hat), one instance
        fvu = ((val - recon).pow(2).sum() / (val - val.mean(0)).pow(2).sum()).item()
        records[name] = {
            "hook_name": hook,
            "d_sae": config.d_sae,
            "k": config.k,
            "train_positions": int(len(acts)),
            "heldout_fvu": fvu,
            "dead": int(stats["dead"].sum()),
            "seconds": round(time.perf_counter() - t0, 1),
        }
        log(f"{name} ({hook}): held-out FVU {fvu:.3f}, dead {records[name]['dead']}")
    meta_path = out_dir / METADATA_FILE
    metadata = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    metadata["saes"] = {"build_config": asdict(config), "dictionaries": records}
    metadata["files_sha256"] = files_sha256(out_dir, tuple(metadata.get("models", KINDS)))
    meta_path.write_text(json.dumps(metadata, indent=2) + "\n")
    return records


def load_bilinear_sae(name: str = "sae-mlp-out", directory: Path | None = None):
    """One of the shipped SAELens dictionaries of the bilinear model (``SAE_SITES``)."""
    from course_utils.science.models import load_sae_folder

    if name not in SAE_SITES:
        raise ValueError(f"name must be one of {tuple(SAE_SITES)}, got {name!r}.")
    folder = (asset_dir() if directory is None else Path(directory)) / name
    return load_sae_folder(folder, rebuild=REBUILD_SAES_COMMAND)
