"""Tokens and activations for chapters 03-05: context windows, batches, an activation store.

- ``make_windows`` cuts a token stream into fixed-length context windows, each starting with the
  BOS token (as the course model was trained and as ``model.to_tokens`` prepends it).
- ``iterate_batches`` yields shuffled (seeded) or ordered batches of windows.
- ``corpus_windows`` tokenises a split of the course corpus (cached per process).
- ``ActivationStore`` runs the model with a hook, keeps a bounded, shuffled buffer of the
  activations at that hook and hands them out in batches: the data loader of SAE training.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from functools import lru_cache

import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer

from course_utils.science.hooks import check_hook_name


def make_windows(
    stream: Int[Tensor, " n_tokens"], n_ctx: int, bos_token_id: int, offset: int = 0
) -> Int[Tensor, "n_windows n_ctx"]:
    """Non-overlapping windows ``[BOS, t_i, ..., t_{i+n_ctx-2}]`` of a 1-D token stream.

    ``offset`` drops the first tokens so that different epochs see different window boundaries.
    The incomplete tail is dropped.
    """
    if not isinstance(stream, Tensor) or stream.ndim != 1:
        shape = tuple(stream.shape) if isinstance(stream, Tensor) else type(stream).__name__
        raise ValueError(f"make_windows needs a 1-D token tensor, got shape {shape}.")
    if n_ctx < 2:
        raise ValueError(f"n_ctx must be at least 2 (BOS plus one token), got {n_ctx}.")
    if offset < 0:
        raise ValueError(f"offset must be >= 0, got {offset}.")
    body = n_ctx - 1
    usable = (len(stream) - offset) // body
    if usable < 1:
        raise ValueError(
            f"a stream of {len(stream)} tokens (offset {offset}) is too short for one window of "
            f"{n_ctx} tokens."
        )
    chunks = stream[offset : offset + usable * body].reshape(usable, body)
    bos = torch.full((usable, 1), bos_token_id, dtype=stream.dtype)
    return torch.cat([bos, chunks], dim=1)


def iterate_batches(
    windows: Int[Tensor, "n_windows n_ctx"],
    batch_size: int,
    shuffle: bool = True,
    seed: int = 0,
    drop_last: bool = False,
) -> Iterator[Int[Tensor, "batch n_ctx"]]:
    """Batches of windows; shuffled with a seeded generator (same seed, same order)."""
    if windows.ndim != 2:
        raise ValueError(f"windows must be 2-D [n_windows, n_ctx], got {tuple(windows.shape)}.")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    n = len(windows)
    if shuffle:
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    else:
        order = torch.arange(n)
    stop = n - n % batch_size if drop_last else n
    for start in range(0, stop, batch_size):
        yield windows[order[start : start + batch_size]]


@lru_cache(maxsize=4)
def _cached_stream(tokenizer_json: str, split: str) -> Tensor:
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_str(tokenizer_json)
    return corpus_stream(tokenizer, split)


def _plain_tokenizer_json(backend) -> str:
    """The backend tokenizer's JSON without truncation or padding.

    ``model.to_tokens`` (transformers) switches truncation to n_ctx on the shared backend
    tokenizer; tokenising the corpus with it would silently cut every file to n_ctx tokens.
    """
    from tokenizers import Tokenizer

    plain = Tokenizer.from_str(backend.to_str())
    plain.no_truncation()
    plain.no_padding()
    return plain.to_str()


def corpus_stream(tokenizer, split: str) -> Int[Tensor, " n_tokens"]:
    """The split as one token stream: each file is preceded by the end-of-text token."""
    from course_utils.science import corpus

    if getattr(tokenizer, "truncation", None) or getattr(tokenizer, "padding", None):
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_str(_plain_tokenizer_json(tokenizer))  # never cut files short
    eot = tokenizer.token_to_id(corpus.END_OF_TEXT)
    if eot is None:
        raise ValueError(f"the tokenizer has no {corpus.END_OF_TEXT!r} token.")
    texts = list(corpus.iter_texts(split))
    encodings = tokenizer.encode_batch(texts, add_special_tokens=False)
    pieces = []
    for encoding in encodings:
        pieces.append(eot)
        pieces.extend(encoding.ids)
    return torch.tensor(pieces, dtype=torch.long)


def corpus_windows(
    model: HookedTransformer, split: str = "train", n_ctx: int | None = None, offset: int = 0
) -> Int[Tensor, "n_windows n_ctx"]:
    """Context windows of the course corpus, tokenised with ``model``'s tokenizer (cached)."""
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is None or not hasattr(tokenizer, "backend_tokenizer"):
        raise ValueError("corpus_windows needs a model with a fast (tokenizers-backed) tokenizer.")
    stream = _cached_stream(_plain_tokenizer_json(tokenizer.backend_tokenizer), split)
    n_ctx = model.cfg.n_ctx if n_ctx is None else n_ctx
    return make_windows(stream, n_ctx, tokenizer.bos_token_id, offset)


class ActivationStore:
    """A shuffled buffer of activations at one hook, refilled by running the model.

    Memory is bounded by ``buffer_tokens`` activations (x d floats). Each refill runs the model on
    enough windows to fill the buffer, shuffles it with a seeded generator and serves half of it
    before refilling, so consecutive batches mix many windows and positions.

    >>> store = ActivationStore(model, "blocks.0.hook_resid_post", windows, batch_size=1024)
    >>> acts = store.next_batch()   # [1024, d_model]
    """

    def __init__(
        self,
        model: HookedTransformer,
        hook_name: str,
        windows: Int[Tensor, "n_windows n_ctx"],
        batch_size: int = 1024,
        buffer_tokens: int = 32768,
        model_batch_size: int = 32,
        skip_bos: bool = True,
        seed: int = 0,
        progress: bool = True,
        device: torch.device | str | None = None,
    ) -> None:
        check_hook_name(model, hook_name)
        if windows.ndim != 2:
            raise ValueError(f"windows must be 2-D [n_windows, n_ctx], got {tuple(windows.shape)}.")
        if windows.shape[1] > model.cfg.n_ctx:
            raise ValueError(
                f"windows of {windows.shape[1]} tokens are longer than the model's n_ctx "
                f"({model.cfg.n_ctx})."
            )
        if batch_size < 1 or buffer_tokens < 2 * batch_size:
            raise ValueError(
                f"need batch_size >= 1 and buffer_tokens >= 2 * batch_size, got batch_size="
                f"{batch_size}, buffer_tokens={buffer_tokens}."
            )
        self.model = model
        self.hook_name = hook_name
        self.windows = windows
        self.batch_size = batch_size
        self.buffer_tokens = buffer_tokens
        self.model_batch_size = model_batch_size
        self.skip_bos = skip_bos
        self.device = (
            torch.device(device) if device is not None else next(model.parameters()).device
        )
        self.generator = torch.Generator().manual_seed(seed)
        self.progress = progress
        self._window_order = torch.randperm(len(windows), generator=self.generator)
        self._next_window = 0
        self.epochs = 0
        self.tokens_seen = 0
        self._buffer: Tensor | None = None
        self._position = 0
        self._bar = None

    # -- model side -------------------------------------------------------------------------
    def _take_windows(self, count: int) -> Tensor:
        picked = []
        while count > 0:
            if self._next_window >= len(self._window_order):
                self.epochs += 1
                self._window_order = torch.randperm(len(self.windows), generator=self.generator)
                self._next_window = 0
            chunk = self._window_order[self._next_window : self._next_window + count]
            self._next_window += len(chunk)
            count -= len(chunk)
            picked.append(self.windows[chunk])
        return torch.cat(picked)

    @torch.no_grad()
    def get_activations(self, tokens: Int[Tensor, "batch pos"]) -> Float[Tensor, "batch pos *d"]:
        """Activations at ``hook_name`` for a batch of tokens (the model stops after that hook)."""
        stored: dict[str, Tensor] = {}

        def save(activation: Tensor, hook) -> None:
            stored["act"] = activation.detach()

        layer = self._stop_layer()
        self.model.run_with_hooks(
            tokens.to(self.device),
            fwd_hooks=[(self.hook_name, save)],
            stop_at_layer=layer,
            return_type=None,
        )
        return stored["act"]

    def _stop_layer(self) -> int | None:
        parts = self.hook_name.split(".")
        if parts[0] == "blocks" and len(parts) > 1 and parts[1].isdigit():
            return int(parts[1]) + 1
        return None

    def _flatten(self, acts: Tensor) -> Tensor:
        if self.skip_bos:
            acts = acts[:, 1:]
        return (
            acts.reshape(-1, *acts.shape[2:]).flatten(1)
            if acts.ndim > 3
            else acts.reshape(-1, acts.shape[-1])
        )

    def _fill(self, keep: Tensor | None) -> None:
        have = 0 if keep is None else len(keep)
        parts = [] if keep is None else [keep]
        tokens_per_window = self.windows.shape[1] - (1 if self.skip_bos else 0)
        if self.progress and self._bar is None:
            self._bar = tqdm(
                total=self.buffer_tokens,
                desc=f"activations @ {self.hook_name}",
                unit="tok",
                leave=False,
            )
        while have < self.buffer_tokens:
            needed_windows = -(-(self.buffer_tokens - have) // tokens_per_window)
            count = min(self.model_batch_size, needed_windows)
            acts = self._flatten(self.get_activations(self._take_windows(count)))
            parts.append(acts)
            have += len(acts)
            self.tokens_seen += len(acts)
            if self._bar is not None:
                self._bar.update(min(len(acts), max(0, self.buffer_tokens - self._bar.n)))
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        buffer = torch.cat(parts)[: self.buffer_tokens]
        order = torch.randperm(len(buffer), generator=self.generator).to(buffer.device)
        self._buffer = buffer[order]
        self._position = 0

    # -- consumer side ----------------------------------------------------------------------
    def next_batch(self) -> Float[Tensor, "batch d"]:
        """``batch_size`` shuffled activation vectors (refilling the buffer when half is used)."""
        if self._buffer is None:
            self._fill(None)
        elif self._position + self.batch_size > self.buffer_tokens // 2:
            self._fill(self._buffer[self._position :])
        assert self._buffer is not None
        batch = self._buffer[self._position : self._position + self.batch_size]
        self._position += self.batch_size
        return batch

    def __iter__(self) -> Iterator[Tensor]:
        while True:
            yield self.next_batch()

    def measure_throughput(self, n_tokens: int = 65536) -> float:
        """Tokens per second of the model side (running the model and filling the buffer)."""
        start_seen = self.tokens_seen
        start = time.perf_counter()
        while self.tokens_seen - start_seen < n_tokens:
            self._fill(None)
        return (self.tokens_seen - start_seen) / (time.perf_counter() - start)
