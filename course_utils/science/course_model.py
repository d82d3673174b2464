"""The course model ``course-2l``: tokenizer, architecture, training, evaluation, save and load.

A 2-layer attention+MLP TransformerLens model (d_model 128) trained on the Python standard
library's sources (``course_utils.science.corpus``) with a 4096-token byte-level BPE. The shipped files in
``course_utils/assets/course-2l/`` are the output of ``python -m course_utils.assets build``:

- ``tokenizer.json``     the ``tokenizers`` BPE (end-of-text token ``<|endoftext|>`` = id 0)
- ``config.json``        the HookedTransformerConfig fields (plain JSON)
- ``model.safetensors``  the weights (safetensors: no pickle)
- ``metadata.json``      how it was built and the numbers it reached
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import Tensor
from transformer_lens import HookedTransformer, HookedTransformerConfig

from course_utils.science import corpus
from course_utils.science.activations import iterate_batches, make_windows

MODEL_NAME = "course-2l"
TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
METADATA_FILE = "metadata.json"
REBUILD_COMMAND = "python -m course_utils.assets build"

#: The HookedTransformerConfig fields that define the architecture (everything else is default).
ARCHITECTURE = {
    "n_layers": 2,
    "d_model": 128,
    "n_heads": 4,
    "d_head": 32,
    "d_mlp": 512,
    "n_ctx": 128,
    "act_fn": "gelu",
    "normalization_type": "LN",
    "positional_embedding_type": "standard",
    "tokenizer_prepends_bos": True,
    "default_prepend_bos": True,
}


@dataclass
class BuildConfig:
    """Everything that decides the shipped tokenizer and weights."""

    seed: int = 0
    vocab_size: int = 4096
    steps: int = 2000
    batch_size: int = 32
    lr: float = 3e-3
    warmup_steps: int = 100
    min_lr_fraction: float = 0.1
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    threads: int = 1
    log_every: int = 100
    record_first_steps: int = 10
    architecture: dict = field(default_factory=lambda: dict(ARCHITECTURE))


class CourseModelFileError(FileNotFoundError):
    """A shipped file of the course model is missing or unreadable."""


def asset_dir(name: str = MODEL_NAME) -> Path:
    return Path(__file__).resolve().parents[1] / "assets" / name


# --------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------
def train_tokenizer(texts: list[str], vocab_size: int = 4096):
    """Byte-level BPE on ``texts`` with ``<|endoftext|>`` as token 0 (deterministic)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[corpus.END_OF_TEXT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=2,
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def wrap_tokenizer(tokenizer_or_path):
    """A transformers fast tokenizer around a ``tokenizers`` BPE, as TransformerLens expects.

    ``add_bos_token=True`` makes it prepend ``<|endoftext|>`` itself, so TransformerLens neither
    tries to download a BOS variant nor prepends a second one.
    """
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    if isinstance(tokenizer_or_path, (str, Path)):
        tokenizer = _read_tokenizer(Path(tokenizer_or_path))
    else:
        tokenizer = tokenizer_or_path
    if not isinstance(tokenizer, Tokenizer):
        raise TypeError(f"expected a tokenizers.Tokenizer or a path, got {type(tokenizer)}.")
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=corpus.END_OF_TEXT,
        eos_token=corpus.END_OF_TEXT,
        pad_token=corpus.END_OF_TEXT,
        add_bos_token=True,
        name_or_path=MODEL_NAME,
        model_max_length=ARCHITECTURE["n_ctx"],
    )


def _read_tokenizer(path: Path):
    from tokenizers import Tokenizer

    if not path.is_file():
        raise CourseModelFileError(_missing(path))
    try:
        return Tokenizer.from_file(str(path))
    except Exception as error:  # tokenizers raises a bare Exception on bad JSON
        raise CourseModelFileError(_corrupt(path, error)) from None


# --------------------------------------------------------------------------------------------
# Save / load
# --------------------------------------------------------------------------------------------
def _missing(path: Path) -> str:
    return f"the course model file {path} is missing. Rebuild it with `{REBUILD_COMMAND}`."


def _corrupt(path: Path, error: Exception) -> str:
    return (
        f"the course model file {path} is unreadable ({type(error).__name__}: {error}). "
        f"Restore it with `git checkout -- {path.name}` in its folder or rebuild with "
        f"`{REBUILD_COMMAND}`."
    )


def hooked_config(architecture: dict, d_vocab: int, seed: int = 0, device: str = "cpu"):
    return HookedTransformerConfig(
        **architecture, d_vocab=d_vocab, seed=seed, device=device, model_name=MODEL_NAME
    )


def save_course_model(
    model: HookedTransformer, directory: Path, metadata: dict | None = None
) -> None:
    """Write tokenizer.json, config.json, model.safetensors (and metadata.json) to ``directory``."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if model.tokenizer is None or not hasattr(model.tokenizer, "backend_tokenizer"):
        raise ValueError("save_course_model needs a model with a fast tokenizer.")
    model.tokenizer.backend_tokenizer.save(str(directory / TOKENIZER_FILE))
    arch = {key: getattr(model.cfg, key) for key in ARCHITECTURE}
    config = {"architecture": arch, "d_vocab": model.cfg.d_vocab}
    (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    weights = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(weights, str(directory / WEIGHTS_FILE), metadata={"format": "pt"})
    if metadata is not None:
        (directory / METADATA_FILE).write_text(json.dumps(metadata, indent=2) + "\n")


def load_course_model(directory: Path | None = None, device: str | None = None):
    """Load a model saved by ``save_course_model`` (the shipped ``course-2l`` by default)."""
    from safetensors.torch import load_file

    directory = asset_dir() if directory is None else Path(directory)
    config_path = directory / CONFIG_FILE
    weights_path = directory / WEIGHTS_FILE
    for path in (config_path, weights_path, directory / TOKENIZER_FILE):
        if not path.is_file():
            raise CourseModelFileError(_missing(path))
    try:
        config = json.loads(config_path.read_text())
        cfg = hooked_config(config["architecture"], config["d_vocab"], device=device or "cpu")
    except (ValueError, KeyError, TypeError) as error:
        raise CourseModelFileError(_corrupt(config_path, error)) from None
    tokenizer = wrap_tokenizer(directory / TOKENIZER_FILE)
    try:
        state = load_file(str(weights_path), device=str(cfg.device))
    except Exception as error:  # SafetensorError, OSError
        raise CourseModelFileError(_corrupt(weights_path, error)) from None
    model = HookedTransformer(cfg, tokenizer=tokenizer, move_to_device=True)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise CourseModelFileError(_corrupt(weights_path, error)) from None
    model.eval()
    return model


def read_metadata(directory: Path | None = None) -> dict:
    path = (asset_dir() if directory is None else Path(directory)) / METADATA_FILE
    if not path.is_file():
        raise CourseModelFileError(_missing(path))
    return json.loads(path.read_text())


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------
def learning_rate(step: int, config: BuildConfig) -> float:
    """Linear warm-up then cosine decay to ``min_lr_fraction`` of the peak."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return config.lr * (config.min_lr_fraction + (1 - config.min_lr_fraction) * cosine)


def training_batches(stream: Tensor, config: BuildConfig, bos: int):
    """Endless batches: each epoch shifts the window boundaries and reshuffles (seeded)."""
    n_ctx = config.architecture["n_ctx"]
    epoch = 0
    while True:
        offset = (epoch * 37) % (n_ctx - 1)
        windows = make_windows(stream, n_ctx, bos, offset)
        seed = config.seed * 1000 + epoch
        yield from iterate_batches(windows, config.batch_size, True, seed, drop_last=True)
        epoch += 1


def train_model(model: HookedTransformer, stream: Tensor, config: BuildConfig, log=print):
    """AdamW on next-token loss; returns the list of (step, loss) it logged plus first steps."""
    torch.manual_seed(config.seed)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "W_" in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "W_" in n)]
    optimizer = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": config.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=config.lr,
        betas=(0.9, 0.95),
    )
    bos = model.tokenizer.bos_token_id
    batches = training_batches(stream, config, bos)
    first_losses: list[float] = []
    curve: list[tuple[int, float]] = []
    running = 0.0
    start = time.perf_counter()
    model.train()
    for step in range(config.steps):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, config)
        tokens = next(batches)
        loss = model(tokens, return_type="loss")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        value = loss.item()
        running += value
        if step < config.record_first_steps:
            first_losses.append(value)
        if (step + 1) % config.log_every == 0 or step + 1 == config.steps:
            count = (step % config.log_every) + 1
            curve.append((step + 1, running / count))
            elapsed = time.perf_counter() - start
            log(
                f"step {step + 1:5d}/{config.steps}  loss {running / count:.4f}  "
                f"lr {learning_rate(step, config):.2e}  {elapsed / 60:.1f} min"
            )
            running = 0.0
    model.eval()
    return first_losses, curve


# --------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------
@torch.no_grad()
def model_loss(model: HookedTransformer, windows: Tensor, batch_size: int = 64) -> float:
    """Mean next-token cross-entropy (nats) over every position of ``windows``."""
    total, count = 0.0, 0
    for start in range(0, len(windows), batch_size):
        batch = windows[start : start + batch_size]
        loss = model(batch, return_type="loss", loss_per_token=True)
        total += loss.sum().item()
        count += loss.numel()
    return total / count


def bigram_table(stream: Tensor, d_vocab: int, add_k: float) -> Tensor:
    """log P(next | current) from train counts with add-k smoothing: [d_vocab, d_vocab]."""
    counts = torch.zeros(d_vocab * d_vocab, dtype=torch.float32)
    counts.index_add_(0, stream[:-1] * d_vocab + stream[1:], torch.ones(len(stream) - 1))
    counts = counts.view(d_vocab, d_vocab) + add_k
    return (counts / counts.sum(dim=1, keepdim=True)).log()


def bigram_loss(table: Tensor, windows: Tensor) -> float:
    """Mean cross-entropy of the bigram table on the same positions as ``model_loss``."""
    return -table[windows[:, :-1], windows[:, 1:]].mean().item()


def unigram_loss(stream: Tensor, d_vocab: int, windows: Tensor) -> float:
    counts = torch.bincount(stream, minlength=d_vocab).float() + 1.0
    log_p = (counts / counts.sum()).log()
    return -log_p[windows[:, 1:]].mean().item()


def best_bigram(train_stream: Tensor, val_windows: Tensor, d_vocab: int) -> dict:
    """Add-k bigram on train, the best k of a small grid on validation (generous to it)."""
    results = {}
    for add_k in (0.01, 0.03, 0.1, 0.3, 1.0):
        results[add_k] = bigram_loss(bigram_table(train_stream, d_vocab, add_k), val_windows)
    best_k = min(results, key=results.get)
    return {
        "add_k": best_k,
        "loss": results[best_k],
        "grid": {str(k): v for k, v in results.items()},
    }


@torch.no_grad()
def probes(
    model: HookedTransformer, val_windows: Tensor, table: Tensor, batch_size: int = 32
) -> dict:
    """Simple behavioural probes on the validation split, for the model and the bigram baseline.

    - indent: after a token ending in ':' whose true successor is a newline token, is the top-1
      prediction exactly that token (the newline plus the right indentation)?
    - close: where the true next token starts with ')', ']' or '}', does the model put more
      probability on tokens starting with the right closer than on each other closer?
    - import: after 'import' / ' import', is the true next token (a module name) in the top 5?
    - overall top-1 accuracy.
    """
    tokenizer = model.tokenizer
    vocab = tokenizer.convert_ids_to_tokens(list(range(model.cfg.d_vocab)))
    strings = [tokenizer.convert_tokens_to_string([t]) for t in vocab]

    def is_id(predicate) -> Tensor:
        return torch.tensor([bool(predicate(s)) for s in strings])

    ends_colon = is_id(lambda s: s.endswith(":"))
    newline = is_id(lambda s: s.startswith("\n"))
    import_ids = is_id(lambda s: s in ("import", " import"))
    starts = torch.stack([is_id(lambda s, c=c: s.startswith(c)) for c in ")]}"]).float()
    closer_of = torch.full((len(vocab),), -1)
    for index in range(3):
        closer_of[starts[index].bool()] = index

    names = ("indent", "close", "import", "overall")
    hits = {(n, who): 0.0 for n in names for who in ("model", "bigram")}
    counts = dict.fromkeys(names, 0)
    for begin in range(0, len(val_windows), batch_size):
        windows = val_windows[begin : begin + batch_size]
        current = windows[:, :-1].reshape(-1)
        target = windows[:, 1:].reshape(-1)
        all_logits = {
            "model": model(windows)[:, :-1].reshape(len(current), -1).float(),
            "bigram": table[current],
        }
        masks = {
            "indent": ends_colon[current] & newline[target],
            "close": closer_of[target] >= 0,
            "import": import_ids[current] & ~newline[target],
            "overall": torch.ones_like(target, dtype=torch.bool),
        }
        for name, mask in masks.items():
            counts[name] += int(mask.sum())
        for who, logits in all_logits.items():
            top1 = logits.argmax(-1)
            for name in ("indent", "overall"):
                hits[(name, who)] += (top1 == target)[masks[name]].sum().item()
            mask = masks["close"]
            mass = logits[mask].softmax(-1) @ starts.T
            hits[("close", who)] += (mass.argmax(-1) == closer_of[target[mask]]).sum().item()
            mask = masks["import"]
            top5 = logits[mask].topk(5, dim=-1).indices
            hits[("import", who)] += (top5 == target[mask, None]).any(-1).sum().item()

    def rate(name: str, who: str) -> float:
        return hits[(name, who)] / max(1, counts[name])

    return {
        "indent_after_colon": {
            "positions": counts["indent"],
            "model_top1": rate("indent", "model"),
            "bigram_top1": rate("indent", "bigram"),
        },
        "close_bracket": {
            "positions": counts["close"],
            "model_accuracy": rate("close", "model"),
            "bigram_accuracy": rate("close", "bigram"),
        },
        "import_top5": {
            "positions": counts["import"],
            "model_top5": rate("import", "model"),
            "bigram_top5": rate("import", "bigram"),
        },
        "overall": {
            "model_top1": rate("overall", "model"),
            "bigram_top1": rate("overall", "bigram"),
        },
    }


SAMPLE_PROMPTS = (
    "def __init__(self, name",
    "import os\nimport",
    "from collections import",
    "    for i in range(len(",
    "class Error(Exception):",
    '    """Return the',
    "if __name__ ==",
    "x = {'a': [1, 2",
)


@torch.no_grad()
def sample_completions(model: HookedTransformer, prompts=SAMPLE_PROMPTS, new_tokens: int = 24):
    """Greedy completions (deterministic) of a few prompts."""
    out = {}
    for prompt in prompts:
        tokens = model.to_tokens(prompt)
        for _ in range(new_tokens):
            logits = model(tokens[:, -model.cfg.n_ctx :])
            tokens = torch.cat([tokens, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
        out[prompt] = model.to_string(tokens[0, 1:])
    return out


# --------------------------------------------------------------------------------------------
# The build
# --------------------------------------------------------------------------------------------
def sha256_file(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def evaluate(model: HookedTransformer, train_stream: Tensor, val_stream: Tensor) -> dict:
    n_ctx = model.cfg.n_ctx
    bos = model.tokenizer.bos_token_id
    val_windows = make_windows(val_stream, n_ctx, bos)
    bigram = best_bigram(train_stream, val_windows, model.cfg.d_vocab)
    table = bigram_table(train_stream, model.cfg.d_vocab, bigram["add_k"])
    return {
        "validation_tokens_scored": int(val_windows[:, 1:].numel()),
        "validation_loss": model_loss(model, val_windows),
        "bigram_validation_loss": bigram["loss"],
        "bigram": bigram,
        "unigram_validation_loss": unigram_loss(train_stream, model.cfg.d_vocab, val_windows),
        "probes": probes(model, val_windows, table),
        "samples": sample_completions(model),
    }


def build(config: BuildConfig, out_dir: Path, log=print, evaluate_model: bool = True) -> dict:
    """Rebuild tokenizer and model from the corpus; write them to ``out_dir``; return metadata."""
    from course_utils.science.activations import corpus_stream

    start = time.perf_counter()
    torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    files = corpus.list_files()
    stats = corpus.corpus_stats()
    log(f"corpus: {stats}")
    train_texts = list(corpus.iter_texts("train"))
    tokenizer = train_tokenizer(train_texts, config.vocab_size)
    log(
        f"tokenizer: byte-level BPE, {tokenizer.get_vocab_size()} tokens "
        f"({time.perf_counter() - start:.0f} s)"
    )
    train_stream = corpus_stream(tokenizer, "train")
    val_stream = corpus_stream(tokenizer, "validation")
    log(f"tokens: train {len(train_stream):,}, validation {len(val_stream):,}")
    wrapped = wrap_tokenizer(tokenizer)
    cfg = hooked_config(config.architecture, tokenizer.get_vocab_size(), seed=config.seed)
    model = HookedTransformer(cfg, tokenizer=wrapped)
    n_params = sum(p.numel() for p in model.parameters())
    log(
        f"model: {n_params:,} parameters; training {config.steps} steps of "
        f"{config.batch_size} x {cfg.n_ctx} tokens on {config.threads} threads"
    )
    train_start = time.perf_counter()
    first_losses, curve = train_model(model, train_stream, config, log)
    train_seconds = time.perf_counter() - train_start
    metadata = {
        "name": MODEL_NAME,
        "build_command": REBUILD_COMMAND,
        "build_config": asdict(config),
        "python": ".".join(map(str, __import__("sys").version_info[:3])),
        "torch": torch.__version__,
        "corpus": {
            "files": stats.files,
            "characters": stats.characters,
            "tokens": {"train": len(train_stream), "validation": len(val_stream)},
            "fingerprint": corpus.corpus_fingerprint(),
            "n_files": len(files),
        },
        "parameters": n_params,
        "tokens_trained": config.steps * config.batch_size * cfg.n_ctx,
        "first_losses": first_losses,
        "loss_curve": curve,
        "train_seconds": round(train_seconds, 1),
    }
    save_course_model(model, out_dir, metadata)  # save before evaluating: nothing is lost
    if not evaluate_model:
        return metadata
    log("evaluating...")
    metadata["evaluation"] = evaluate(model, train_stream, val_stream)
    metadata["build_seconds"] = round(time.perf_counter() - start, 1)
    metadata["files_sha256"] = {
        name: sha256_file(out_dir / name) for name in (TOKENIZER_FILE, CONFIG_FILE, WEIGHTS_FILE)
    }
    (Path(out_dir) / METADATA_FILE).write_text(json.dumps(metadata, indent=2) + "\n")
    log(format_report(metadata))
    return metadata


def format_report(metadata: dict) -> str:
    c = metadata["corpus"]
    e = metadata.get("evaluation", {})
    lines = [
        f"corpus characters: train {c['characters']['train']:,}, "
        f"validation {c['characters']['validation']:,}",
        f"corpus tokens:     train {c['tokens']['train']:,}, "
        f"validation {c['tokens']['validation']:,}",
        f"parameters {metadata['parameters']:,}, tokens trained {metadata['tokens_trained']:,}, "
        f"training {metadata['train_seconds'] / 60:.1f} min",
    ]
    if e:
        p = e["probes"]
        lines += [
            f"validation loss {e['validation_loss']:.4f} nats/token "
            f"(bigram {e['bigram_validation_loss']:.4f} with add-k {e['bigram']['add_k']}, "
            f"unigram {e['unigram_validation_loss']:.4f})",
            f"top-1 accuracy: model {p['overall']['model_top1']:.3f}, "
            f"bigram {p['overall']['bigram_top1']:.3f}",
            f"indent after ':' (top-1, {p['indent_after_colon']['positions']} positions): "
            f"model {p['indent_after_colon']['model_top1']:.3f}, "
            f"bigram {p['indent_after_colon']['bigram_top1']:.3f}",
            f"closing bracket type ({p['close_bracket']['positions']} positions): "
            f"model {p['close_bracket']['model_accuracy']:.3f}, "
            f"bigram {p['close_bracket']['bigram_accuracy']:.3f}",
            f"module after 'import' (top-5, {p['import_top5']['positions']} positions): "
            f"model {p['import_top5']['model_top5']:.3f}, bigram {p['import_top5']['bigram_top5']:.3f}",
            "samples (greedy):",
        ]
        lines += [
            f"  {prompt!r} -> {text[len(prompt) :]!r}" for prompt, text in e["samples"].items()
        ]
    if "build_seconds" in metadata:
        lines.append(f"build time {metadata['build_seconds'] / 60:.1f} min")
    return "\n".join(lines)
