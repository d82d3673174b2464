"""The capstone (chapter 11): a Towards-Monosemanticity feature analysis, end to end.

Everything a learner needs around the five criteria, and nothing that decides them: the
criteria's references are chapter 03's (:func:`~course_utils.science.lm_saes.specificity_sensitivity`,
:func:`~course_utils.science.lm_saes.logit_weights`,
:func:`~course_utils.science.lm_saes.max_neuron_correlation`) and chapter 06's
(:func:`~course_utils.science.interventions.ablation_effect`). This module adds:

- :func:`vocab_strings`, :func:`lexical_state`, :func:`concept_proxy`: proxies for the concepts
  the brief suggests (full stop, ``for``, ``else``, ``import``, an open string, a decorator),
  as functions of the tokens alone, with one clear error when a proxy matches no token;
- :func:`neuron_hook_for`: the MLP neurons an SAE's hook can be compared with (the layer whose
  output it reads), so the not-a-neuron test is not run against the wrong layer;
- :func:`load_analysis_sae`: a dictionary and the hook it reads, checked against the model;
- :func:`held_out_fraction`: which context windows come from the validation split;
- :func:`load_gelu_1l_sae`: the public one-layer model's public MLP SAEs (online only).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence

import torch
from jaxtyping import Bool, Int
from torch import Tensor
from transformer_lens import HookedTransformer

from course_utils.science.hooks import check_hook_name

#: The concepts the brief suggests, each with a proxy in :func:`concept_proxy`.
CONCEPTS = ("full stop", "for", "else", "import", "open string", "decorator")

#: The public one-layer SAEs (Nanda 2023): two runs on gelu-1l's MLP neurons, different seeds.
GELU_1L_REPO = "NeelNanda/sparse_autoencoder"
GELU_1L_RUNS = {"run1": 25, "run2": 47}
GELU_1L_HOOK = "blocks.0.mlp.hook_post"


class EmptyProxyError(ValueError):
    """A proxy that matches no token: specificity and sensitivity would mean nothing."""


# ----------------------------------------------------------------------------- proxies


def vocab_strings(tokenizer) -> list[str]:
    """The text of every vocabulary entry, decoded one token at a time (index = token id)."""
    return [tokenizer.decode([i]) for i in range(len(tokenizer))]


def lexical_state(
    tokens: Int[Tensor, "batch pos"], vocab: Sequence[str]
) -> dict[str, Bool[Tensor, "batch pos"]]:
    """Where each token starts: inside a string literal, inside a comment, or in code.

    A small scanner of Python's lexical rules (quotes ' " and triple quotes, backslash escapes,
    ``#`` comments to the end of the line) run over each window's decoded text. A token is "in a
    string" when its first character lies after an opening quote that is not yet closed; the
    opening quote itself is not inside. A window starts in the middle of a file: when its first
    triple quote looks like a docstring's *closing* one (see :func:`_starts_in_docstring`), the
    window is taken to start inside that docstring. A window wholly inside a long docstring, with
    no triple quote, is still read as code.
    Returns ``{"string": ..., "comment": ...}``, boolean masks shaped like ``tokens``.
    """
    if tokens.ndim != 2:
        raise ValueError(f"tokens must be [batch, pos], got shape {tuple(tokens.shape)}.")
    in_string = torch.zeros(tokens.shape, dtype=torch.bool)
    in_comment = torch.zeros(tokens.shape, dtype=torch.bool)
    for b, row in enumerate(tokens.tolist()):
        # the open quote ('', ', ", ''' or """): a window that starts inside a docstring starts
        # with it open (see _starts_in_docstring)
        quote = _starts_in_docstring("".join(vocab[i] for i in row[1:]))  # after the BOS
        comment, escaped = False, False
        for t, token_id in enumerate(row):
            text, i = vocab[token_id], 0
            if text == "<|endoftext|>" and t > 0:  # a new file starts in code (t = 0 is BOS)
                quote, comment, escaped, text = "", False, False, ""
            in_string[b, t], in_comment[b, t] = bool(quote), comment
            while i < len(text):
                ch = text[i]
                if comment:
                    comment = ch != "\n"
                elif quote:
                    if escaped:
                        escaped = False
                    elif ch == "\\":
                        escaped = True
                    elif text.startswith(quote, i) or (len(quote) == 1 and ch == "\n"):
                        i += len(quote) - 1 if ch != "\n" else 0
                        quote = ""
                elif ch == "#":
                    comment = True
                elif ch in "'\"":
                    triple = text.startswith(ch * 3, i)
                    quote = ch * 3 if triple else ch
                    i += 2 if triple else 0
                i += 1
    return {"string": in_string, "comment": in_comment}


def _starts_in_docstring(text: str) -> str:
    r"""The triple quote a window starts inside of, or '' when it starts in code.

    The window's first triple quote decides: an *opening* one is followed by text on its own line
    (a summary line), or follows a line ending in '=', '(', '[' or ',', a line ending in ':' (a
    docstring on its own line), or the start of a file; otherwise it *closes* a docstring that
    was opened before the window began, so the window starts inside it.
    """
    hits = [(text.find(q), q) for q in ('"""', "'''") if q in text]
    if not hits:
        return ""
    at, q = min(hits)
    after = text[at + 3 :].split("\n", 1)[0].strip()
    before = text[:at].rstrip(" \t")
    line_before = before.split("\n")[-1].strip()
    if after and not after.startswith((")", ",")):
        return ""  # """Summary line...: an opener
    if line_before.endswith(("=", "(", "[", ",")) or before.endswith("<|endoftext|>"):
        return ""  # x = """ / f(""" / start of a file: an opener
    if line_before == "" and before.rstrip().endswith(":"):
        return ""  # def f():\n    """: an opener on its own line
    return q


def _word(tokens: Tensor, vocab: Sequence[str], words: Iterable[str]) -> Tensor:
    wanted = set(words)
    ids = [i for i, s in enumerate(vocab) if s.strip() in wanted]
    return torch.isin(tokens, torch.tensor(ids, dtype=tokens.dtype))


def _whole_word(tokens: Tensor, vocab: Sequence[str], word: str) -> Tensor:
    """The word's token, not a piece of a longer name: it starts with whitespace, or the token
    before it ends with whitespace or opens the window (so '__import__' is not 'import')."""
    found = _word(tokens, vocab, [word])
    starts = torch.tensor([s[:1].isspace() for s in vocab])[tokens]
    prev_ends = torch.tensor([s[-1:].isspace() or s == "<|endoftext|>" for s in vocab])[tokens]
    prev_ends = torch.cat([torch.ones_like(prev_ends[:, :1]), prev_ends[:, :-1]], dim=1)
    return found & (starts | prev_ends)


_FOR_TARGET = re.compile(r"^[ \t]+[\w \t,()\[\]*.]+?[ \t]in\b")


def _inside_bracket(text: str) -> bool:
    """Whether the end of ``text`` sits inside a bracket opened in it (scanning backwards, so
    closers without their opener before the window's start are ignored)."""
    depth = 0
    for ch in reversed(text):
        if ch in ")]}":
            depth += 1
        elif ch in "([{":
            if depth == 0:
                return True
            depth -= 1
    return False


def _for_syntax(tokens: Tensor, vocab: Sequence[str]) -> Bool[Tensor, "batch pos"]:
    """True where a ``for`` token is followed by Python's loop syntax: a target list, then
    ``in``; and either it opens a statement (only whitespace before it on its line, the line
    ending in ``:`` or continued by an open bracket, a comma or a backslash) or it sits inside
    an open bracket (a comprehension). A ``for`` that opens a line at the very end of a window
    (nothing after it to read) counts. This keeps the English preposition out where the string
    scanner cannot see prose (a window that starts inside a long docstring)."""
    out = torch.zeros(tokens.shape, dtype=torch.bool)
    for b, row in enumerate(tokens.tolist()):
        texts = [vocab[i] for i in row]
        for t, text in enumerate(texts):
            if text.strip() != "for" or t == 0:
                continue
            before = "".join(texts[1:t]) + text[: len(text) - len(text.lstrip())]
            after = "".join(texts[t + 1 : t + 24])
            line = after.split("\n", 1)
            opens_line = before.split("\n")[-1].strip() == ""
            if after.strip() == "":
                out[b, t] = opens_line
                continue
            if not _FOR_TARGET.match(line[0]):
                continue
            end = line[0].split("#")[0].rstrip()
            ends_statement = len(line) == 1 or end.endswith((":", "(", "[", "{", ",", "\\"))
            out[b, t] = (opens_line and ends_statement) or _inside_bracket(before)
    return out


def concept_proxy(
    tokens: Int[Tensor, "batch pos"], vocab: Sequence[str], concept: str
) -> Bool[Tensor, "batch pos"]:
    """The course's proxy for one of :data:`CONCEPTS`: a function of the tokens alone.

    - "full stop": a ``.`` token followed by whitespace (not the one of ``from . import``);
    - "for", "else", "import": the keyword's token, a whole word, in code (not in prose); for
      "for", also followed by loop syntax (see :func:`_for_syntax`);
    - "open string": every token that starts inside an unclosed string literal;
    - "decorator": the ``@`` token that opens a line (only whitespace before it on the line).
    """
    state = lexical_state(tokens, vocab)
    prose = state["string"] | state["comment"]
    if concept == "full stop":
        # A "." followed by whitespace ends a sentence; an attribute or a decimal dot is followed
        # by a name or a digit, and "from . import" is excluded. No prose test: the scanner can
        # misread a window that starts inside a docstring. (The next token is part of the
        # definition: the model has to anticipate it.)
        space_next = torch.tensor([s[:1].isspace() for s in vocab])[tokens]
        space_next = torch.cat([space_next[:, 1:], torch.zeros_like(space_next[:, :1])], dim=1)
        after_from = _word(tokens, vocab, ["from"])
        after_from = torch.cat([torch.zeros_like(after_from[:, :1]), after_from[:, :-1]], dim=1)
        return _word(tokens, vocab, ["."]) & space_next & ~after_from
    if concept == "for":
        return _whole_word(tokens, vocab, concept) & ~prose & _for_syntax(tokens, vocab)
    if concept in ("else", "import"):
        return _whole_word(tokens, vocab, concept) & ~prose
    if concept == "open string":
        return state["string"].clone()
    if concept == "decorator":
        at = _word(tokens, vocab, ["@"]) & ~prose
        before = torch.zeros_like(at)
        for b, t in at.nonzero().tolist():
            prev = "".join(vocab[i] for i in tokens[b, max(0, t - 3) : t].tolist())
            # the line so far is whitespace only (a window that starts here counts as a line start)
            before[b, t] = t <= 1 or prev.split("\n")[-1].strip() == "" and "\n" in prev
        return at & before
    raise ValueError(f"unknown concept {concept!r}: the course defines {', '.join(CONCEPTS)}.")


def check_proxy(proxy: Tensor, tokens: Tensor, concept: str) -> Bool[Tensor, "batch pos"]:
    """A proxy mask as bool, or one clear error: wrong shape, or no token matches it."""
    if not isinstance(proxy, Tensor) or tuple(proxy.shape) != tuple(tokens.shape):
        shape = tuple(proxy.shape) if isinstance(proxy, Tensor) else type(proxy).__name__
        raise ValueError(
            f"the proxy for {concept!r} must be a boolean mask shaped like the tokens "
            f"{tuple(tokens.shape)}, got {shape}."
        )
    proxy = proxy.bool()
    if not proxy[:, 1:].any():
        raise EmptyProxyError(
            f"the proxy for {concept!r} matches none of the {tokens[:, 1:].numel():,} tokens: "
            "specificity and sensitivity would be 0/0. Check the proxy (print a few matches of "
            "it on text where the concept occurs), or use more held-out windows."
        )
    return proxy


# ----------------------------------------------------------------------------- the dictionary


def load_analysis_sae(model: HookedTransformer, name: str, hook_name: str):
    """A shipped dictionary (or a SAELens folder) checked against the hook it will be read at.

    One clear error each: a hook the model does not have (with suggestions), a dictionary
    trained on another hook, or one whose width does not fit the hook.
    """
    from course_utils.science.interventions import check_splice
    from course_utils.science.models import load_sae
    from course_utils.science.saelens_io import check_sae_fits

    check_hook_name(model, hook_name)
    sae = load_sae(name)
    check_splice(model, sae, hook_name)
    check_sae_fits(model, hook_name, int(sae.W_dec.shape[1]))
    return sae


def neuron_hook_for(model: HookedTransformer, hook_name: str) -> str:
    """The MLP neurons whose output a dictionary at ``hook_name`` reads: the not-a-neuron test
    compares features with these, never with a later layer's neurons (which see the feature's
    effect, not its input) nor an earlier one's (whose output is only part of the stream).

    ``blocks.L.hook_resid_post``, ``blocks.L.hook_mlp_out``, ``blocks.L.mlp.*``: layer L's
    ``blocks.L.mlp.hook_post``; ``blocks.L.hook_resid_pre``: layer L-1's (an error for L = 0,
    where no MLP has run yet).
    """
    check_hook_name(model, hook_name)
    parts = hook_name.split(".")
    if parts[0] != "blocks" or not parts[1].isdigit():
        raise ValueError(f"{hook_name!r} is not inside a block: no MLP neurons precede it.")
    layer = int(parts[1])
    if (
        hook_name.endswith("hook_resid_pre")
        or ".attn." in hook_name
        or "hook_resid_mid" in (hook_name)
    ):
        layer -= 1
    if layer < 0:
        raise ValueError(f"no MLP has run before {hook_name!r}: there are no neurons to compare.")
    return f"blocks.{layer}.mlp.hook_post"


def residual_decoder(model: HookedTransformer, sae, hook_name: str) -> Tensor:
    """The dictionary's decoder directions as the residual stream receives them, [d_sae, d_model].

    A dictionary on ``blocks.L.mlp.hook_post`` (the MLP neurons, as Towards Monosemanticity)
    writes through the MLP's output matrix: ``W_dec @ W_out[L]``; one on the residual stream or
    an MLP's output already lives there (``W_dec``). Feed it to ``logit_weights(..., model.W_U)``.
    """
    check_hook_name(model, hook_name)
    W_dec = sae.W_dec.detach()
    parts = hook_name.split(".")
    if len(parts) == 4 and parts[2] == "mlp" and parts[3] == "hook_post":
        return W_dec @ model.W_out[int(parts[1])].detach()
    if W_dec.shape[-1] != model.cfg.d_model:
        raise ValueError(
            f"the dictionary at {hook_name!r} has decoder rows of width {W_dec.shape[-1]}, not "
            f"d_model={model.cfg.d_model}: only SAEs on the residual stream, an MLP's output or "
            "blocks.L.mlp.hook_post have a direct path to the logits here."
        )
    return W_dec


# ----------------------------------------------------------------------------- held-out data


def held_out_fraction(
    windows: Int[Tensor, "batch pos"], split_stream: Int[Tensor, " n"], span: int = 16
) -> Tensor:
    """For each window, whether its first ``span`` tokens after BOS occur in ``split_stream``.

    A fingerprint test, fast enough for ``course check``: every ``span``-gram of the split is
    hashed once. ``split_stream`` is :func:`~course_utils.science.activations.corpus_stream` of
    the validation split; a window cut from the training split almost never matches.
    Returns a boolean per window.
    """
    if windows.ndim != 2 or windows.shape[1] <= span:
        raise ValueError(
            f"windows must be [batch, pos] with more than {span} positions, got "
            f"{tuple(windows.shape)}."
        )
    grams = split_stream.unfold(0, span, 1)
    known = set(map(tuple, grams.tolist()))
    return torch.tensor([tuple(row) in known for row in windows[:, 1 : 1 + span].tolist()])


# ----------------------------------------------------------------------------- online variant


def _gelu_1l_sae_from_files(cfg_path, weights_path, run: str):
    """A SAELens StandardSAE from the public run's JSON config and state dict (read with
    ``weights_only=True``: tensors only, no code from the file is run)."""
    from sae_lens import StandardSAE, StandardSAEConfig

    cfg = json.loads(open(cfg_path, encoding="utf-8").read())
    state = torch.load(weights_path, map_location="cpu", weights_only=True)
    d_in, d_sae = state["W_enc"].shape
    sae = StandardSAE(
        StandardSAEConfig(d_in=int(d_in), d_sae=int(d_sae), apply_b_dec_to_input=True)
    )
    with torch.no_grad():
        for key in ("W_enc", "b_enc", "W_dec", "b_dec"):
            getattr(sae, key).copy_(state[key].float())
    sae.cfg.metadata.hook_name = GELU_1L_HOOK
    sae.cfg.metadata.model_name = "gelu-1l"
    sae.cfg.metadata.public_run = f"{run} ({GELU_1L_REPO} {GELU_1L_RUNS[run]}.pt, l1 "
    sae.cfg.metadata.public_run += f"{cfg.get('l1_coeff', '?')}, seed {cfg.get('seed', '?')})"
    return sae


def load_gelu_1l_sae(run: str = "run1"):
    """One of the two public SAEs on gelu-1l's 2048 MLP neurons (``blocks.0.mlp.hook_post``,
    16,384 features), downloaded from the Hugging Face Hub: online only, one
    :class:`~course_utils.science.models.NetworkRequiredError` offline."""
    from course_utils.science.models import NetworkRequiredError, _require_network

    if run not in GELU_1L_RUNS:
        raise ValueError(f"run must be one of {sorted(GELU_1L_RUNS)}, got {run!r}.")
    _require_network(f"the public gelu-1l SAE {run!r}", "a shipped dictionary (load_sae)")
    from huggingface_hub import hf_hub_download

    version = GELU_1L_RUNS[run]
    try:
        cfg_path = hf_hub_download(GELU_1L_REPO, f"{version}_cfg.json")
        weights_path = hf_hub_download(GELU_1L_REPO, f"{version}.pt")
    except OSError as error:
        raise NetworkRequiredError(
            f"could not download {GELU_1L_REPO} {version}.pt ({type(error).__name__}: {error})."
        ) from None
    return _gelu_1l_sae_from_files(cfg_path, weights_path, run)


def split_stream(model: HookedTransformer, split: str) -> Int[Tensor, " n"]:
    """The whole ``split`` of the course corpus as one token stream, with ``model``'s tokenizer
    (cached after the first call)."""
    from course_utils.science import activations as A

    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is None or not hasattr(tokenizer, "backend_tokenizer"):
        raise ValueError("split_stream needs a model with a fast (tokenizers-backed) tokenizer.")
    return A._cached_stream(A._plain_tokenizer_json(tokenizer.backend_tokenizer), split)
