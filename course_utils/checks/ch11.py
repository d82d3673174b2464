"""Checks and the marking rubric for chapter 11, the capstone feature analysis.

Two kinds of check:

- the learner's four functions against the references of chapters 03 and 06 (the same check
  bodies, the same ``Mistake`` hints: one source of truth for each criterion);
- the hand-in: the required results under the documented names (:data:`REQUIRED`), computed on
  held-out data, the neurons of the right layer, and numerically consistent with the learner's
  own functions. Each is called with the notebook's ``globals()``.

:func:`marking_summary` turns ``course check 11``'s results into the rubric (:data:`RUBRIC`): the
points a program can award, then the checklist a person marks, with a total.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

from course_utils.checks import ch03, ch06
from course_utils.checks.core import CheckFailed, exercise

# ----------------------------------------------------------------------------- 1.x the functions
# The same check bodies as chapters 03 and 06 (``__wrapped__`` is the body under @exercise).

specificity_sensitivity = exercise("1.1", "specificity_sensitivity")(
    ch03.specificity_sensitivity.__wrapped__
)
ablation_effect = exercise("1.2", "ablation_effect")(ch06.ablation_effect.__wrapped__)
logit_weights = exercise("1.3", "logit_weights")(ch03.logit_weights.__wrapped__)
max_neuron_correlation = exercise("1.4", "max_neuron_correlation")(
    ch03.max_neuron_correlation.__wrapped__
)
SS_MISTAKES, EFFECT_MISTAKES = ch03.SS_MISTAKES, ch06.EFFECT_MISTAKES
LOGIT_MISTAKES, CORR_MISTAKES = ch03.LOGIT_MISTAKES, ch03.CORR_MISTAKES

# ----------------------------------------------------------------------------- 2.x the hand-in

#: Every required result: name -> (what it is, the step of the notebook that produces it).
REQUIRED: dict[str, tuple[str, str]] = {
    "SAE_NAME": ("the dictionary you analyse (a shipped name or a folder)", "Step 1"),
    "HOOK_NAME": ("the hook it reads", "Step 1"),
    "eval_tokens": ("the held-out windows every number is computed on, [windows, pos]", "Step 1"),
    "proxies": ("concept -> a function of the tokens returning a boolean mask", "Step 2"),
    "features": ("concept -> the feature index you chose", "Step 2"),
    "NEURON_HOOK": ("the MLP neurons you compare features with", "Step 5"),
    "OTHER_SAE_NAME": ("the second dictionary (another seed or layer)", "Step 6"),
    "OTHER_HOOK_NAME": ("the hook the second dictionary reads", "Step 6"),
    "results": ("concept -> dict of the numbers below", "Steps 3-7"),
}
#: Every key of ``results[concept]``: key -> (what it is, the step that produces it).
RESULT_KEYS: dict[str, tuple[str, str]] = {
    "specificity": ("activation mass on proxy tokens / all mass", "Step 3"),
    "sensitivity": ("fraction of proxy tokens where the feature fires", "Step 3"),
    "ablation": ("mean change in log p(next token) where the feature fires, ablated", "Step 4"),
    "top_logit_tokens": (
        "the 10 token ids with the largest logit weight (decoder rows through FA.residual_decoder)",
        "Step 4",
    ),
    "neuron": ("the most correlated neuron at NEURON_HOOK", "Step 5"),
    "neuron_corr": ("its Pearson correlation with the feature", "Step 5"),
    "neuron_specificity": ("that neuron's own specificity for the proxy", "Step 5"),
    "match": ("the most correlated feature of the second dictionary", "Step 6"),
    "match_corr": ("its Pearson correlation with the feature", "Step 6"),
    "verdict": ("your written verdict, with the numbers", "Step 7"),
}
MIN_EVAL_TOKENS = 10_000
MIN_CONCEPTS = 3
ABLATION_CHUNK = 32
#: The ablation is the slow part (two forward passes per chunk and feature): ``consistent``
#: recomputes it for the first two concepts only, so that ``course check 11`` stays short.
ABLATION_CONCEPTS = 2


def _missing_message(missing: list[str], table: dict, where: str = "") -> str:
    parts = [
        f"`{where}{name}` ({table[name][0]}; {table[name][1]} produces it)" for name in missing
    ]
    return "missing " + "; ".join(parts) + "."


def _hand_in(ns: dict) -> dict:
    """The required results, validated; NotImplementedError when none exists yet."""
    if not isinstance(ns, dict):
        raise CheckFailed("pass the notebook's namespace: `check.hand_in(globals())`.")
    missing = [name for name in REQUIRED if name not in ns]
    if len(missing) == len(REQUIRED):
        error = NotImplementedError()
        error.not_attempted = (
            "not attempted yet: none of the required results exists (Steps 1-7 define them; "
            "the table under the brief lists them)."
        )
        raise error
    if missing:
        raise CheckFailed(_missing_message(missing, REQUIRED))
    results, features, proxies = ns["results"], ns["features"], ns["proxies"]
    for name, value in (("results", results), ("features", features), ("proxies", proxies)):
        if not isinstance(value, dict):
            raise CheckFailed(
                f"`{name}` should be a dict keyed by concept, got {type(value).__name__}."
            )
    if len(results) < MIN_CONCEPTS:
        raise CheckFailed(
            f"`results` has {len(results)} concept(s); the brief asks for at least {MIN_CONCEPTS}."
        )
    for concept, row in results.items():
        for name, table in (("features", features), ("proxies", proxies)):
            if concept not in table:
                raise CheckFailed(
                    f"`results` has {concept!r} but `{name}` does not ({REQUIRED[name][1]})."
                )
        if not isinstance(row, dict):
            raise CheckFailed(f"`results[{concept!r}]` should be a dict, got {type(row).__name__}.")
        gone = [k for k in RESULT_KEYS if k not in row]
        if gone:
            raise CheckFailed(_missing_message(gone, RESULT_KEYS, f"results[{concept!r}]."))
        if not callable(proxies[concept]):
            raise CheckFailed(
                f"`proxies[{concept!r}]` is a {type(proxies[concept]).__name__}: it must be a "
                "function of the tokens (tokens -> boolean mask), defined from the concept alone, "
                "so that it can be applied to any text, not a mask computed on some examples."
            )
    tokens = ns["eval_tokens"]
    if not isinstance(tokens, torch.Tensor) or tokens.ndim != 2:
        raise CheckFailed("`eval_tokens` should be a [windows, pos] tensor of token ids.")
    return ns


@functools.lru_cache(maxsize=1)
def _model():
    from course_utils.science.models import load_model

    return load_model("course-2l", device="cpu")


def _sae(name: str, hook_name: str):
    from course_utils.science.feature_analysis import load_analysis_sae

    try:
        return load_analysis_sae(_model(), name, hook_name)
    except (KeyError, ValueError, FileNotFoundError) as error:
        raise CheckFailed(f"cannot load {name!r} at {hook_name!r}: {error}") from None


def _proxy(ns: dict, concept: str) -> torch.Tensor:
    from course_utils.science.feature_analysis import check_proxy

    tokens = ns["eval_tokens"]
    try:
        return check_proxy(ns["proxies"][concept](tokens.clone()), tokens, concept)
    except ValueError as error:
        raise CheckFailed(str(error)) from None


@exercise("2.1", "hand_in")
def hand_in(ns: dict) -> str:
    """Every required result present and well formed; the dictionaries load at their hooks;
    every proxy is a function of the tokens that matches at least one held-out token."""
    ns = _hand_in(ns)
    _sae(ns["SAE_NAME"], ns["HOOK_NAME"])
    _sae(ns["OTHER_SAE_NAME"], ns["OTHER_HOOK_NAME"])
    for concept in ns["results"]:
        _proxy(ns, concept)
        feature = ns["features"][concept]
        if isinstance(feature, bool) or not isinstance(feature, int):
            raise CheckFailed(f"`features[{concept!r}]` should be an int, got {feature!r}.")
    return f"all {len(REQUIRED)} results present for {len(ns['results'])} concepts; proxies match"


@exercise("2.2", "held_out")
def held_out(ns: dict) -> str:
    """eval_tokens come from the validation split (the SAEs never saw it) and are enough."""
    from course_utils.science.feature_analysis import held_out_fraction, split_stream

    ns = _hand_in(ns)
    tokens = ns["eval_tokens"]
    inside = held_out_fraction(tokens, split_stream(_model(), "validation"))
    n_tokens = tokens[:, 1:].numel()
    if not inside.all():
        raise CheckFailed(
            f"{int((~inside).sum())} of {len(tokens)} windows of `eval_tokens` are not from the "
            "validation split (the shipped SAEs were trained on the training split: numbers "
            "measured there flatter them). Use `corpus_windows(model, 'validation')` (Step 1)."
        )
    if n_tokens < MIN_EVAL_TOKENS:
        raise CheckFailed(
            f"`eval_tokens` holds {n_tokens:,} tokens; use at least {MIN_EVAL_TOKENS:,} so that "
            "a rare concept occurs often enough to measure."
        )
    return f"all {len(tokens)} windows ({n_tokens:,} tokens) are from the validation split"


@exercise("2.3", "neuron_layer")
def neuron_layer(ns: dict) -> str:
    """NEURON_HOOK holds the neurons whose output the analysed dictionary reads."""
    from course_utils.science.feature_analysis import neuron_hook_for

    ns = _hand_in(ns)
    try:
        right = neuron_hook_for(_model(), ns["HOOK_NAME"])
    except (KeyError, ValueError) as error:
        raise CheckFailed(str(error)) from None
    if ns["NEURON_HOOK"] != right:
        raise CheckFailed(
            f"NEURON_HOOK is {ns['NEURON_HOOK']!r} but the SAE reads {ns['HOOK_NAME']!r}: the "
            f"neurons that could carry its features are {right!r} (the MLP whose output it reads). "
            "A later layer's neurons see the feature's effects, not the feature (Step 5)."
        )
    return f"features compared with {right}"


def _close(stored, mine: float, atol: float, rtol: float) -> bool:
    try:
        stored = float(stored)
    except (TypeError, ValueError):
        return False
    return abs(stored - mine) <= atol + rtol * abs(mine)


def _ablation_mean(fn: Callable, model, sae, tokens, hook_name, feature, acts) -> float:
    """Mean over firing positions of the learner's ablation effect, in chunks of windows."""
    total, count = 0.0, 0
    for start in range(0, len(tokens), ABLATION_CHUNK):
        chunk = tokens[start : start + ABLATION_CHUNK]
        fires = acts[start : start + ABLATION_CHUNK, :-1] > 0
        fires[:, 0] = False
        if fires.any():
            with torch.no_grad():
                effect = fn(model, sae, chunk, hook_name, feature)
            total += float(effect[fires].sum())
            count += int(fires.sum())
    return total / max(count, 1)


def _vocab_set(ids) -> set:
    vocab = _vocab()
    out = set()
    for i in list(ids):
        out.add(vocab[int(i)] if not isinstance(i, str) else i)
    return out


@functools.lru_cache(maxsize=1)
def _vocab() -> tuple[str, ...]:
    from course_utils.science.feature_analysis import vocab_strings

    return tuple(vocab_strings(_model().tokenizer))


def _learner_fn(ns: dict, name: str) -> Callable:
    fn = ns.get(name)
    if not callable(fn):
        raise CheckFailed(f"your function `{name}` is not defined (Exercise 1.x defines it).")
    return fn


@exercise("2.4", "consistent")
def consistent(ns: dict) -> str:
    """Each stored number equals what the learner's own functions give on all of eval_tokens
    (positions 1:, BOS dropped), with the stated SAEs, proxies, features and neurons (the
    ablation for the first :data:`ABLATION_CONCEPTS` concepts)."""
    from course_utils.science import lm_saes as L
    from course_utils.science.feature_analysis import residual_decoder

    ns = _hand_in(ns)
    ss = _learner_fn(ns, "specificity_sensitivity")
    effect_fn = _learner_fn(ns, "ablation_effect")
    lw = _learner_fn(ns, "logit_weights")
    corr_fn = _learner_fn(ns, "max_neuron_correlation")
    model, tokens = _model(), ns["eval_tokens"]
    sae = _sae(ns["SAE_NAME"], ns["HOOK_NAME"])
    other = _sae(ns["OTHER_SAE_NAME"], ns["OTHER_HOOK_NAME"])
    acts = L.feature_acts_on(model, sae, tokens, ns["HOOK_NAME"])
    other_acts = L.feature_acts_on(model, other, tokens, ns["OTHER_HOOK_NAME"])[:, 1:]
    other_acts = other_acts.reshape(-1, other_acts.shape[-1])
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=ns["NEURON_HOOK"])
        weights = lw(residual_decoder(model, sae, ns["HOOK_NAME"]), model.W_U.detach())
    neurons = cache[ns["NEURON_HOOK"]][:, 1:].reshape(-1, model.cfg.d_mlp)
    problems = []
    for k, (concept, row) in enumerate(ns["results"].items()):
        f = ns["features"][concept]
        proxy = _proxy(ns, concept)[:, 1:].flatten()
        a = acts[:, 1:, f].flatten()
        spec, sens = ss(a, proxy)
        corr, n = corr_fn(a, neurons)
        n_spec, _ = ss(neurons[:, int(row["neuron"])], proxy)
        m_corr, m = corr_fn(a, other_acts)
        top = weights[f].topk(10).indices.tolist()
        mine = {
            "specificity": spec, "sensitivity": sens, "neuron_corr": corr, "neuron": n,
            "neuron_specificity": n_spec, "match_corr": m_corr, "match": m,
        }  # fmt: skip
        if k < ABLATION_CONCEPTS:  # the slow one: the first concepts only
            mine["ablation"] = _ablation_mean(
                effect_fn, model, sae, tokens, ns["HOOK_NAME"], f, acts[..., f]
            )
        for key, value in mine.items():
            tol = (1e-4, 0.02) if key == "ablation" else (2e-3, 0.0)
            if not _close(row[key], float(value), *tol):
                problems.append(
                    f"{concept!r} {key}: stored {row[key]!r:.10}, your own functions give "
                    f"{value:.4g} on all of eval_tokens"
                )
        if _vocab_set(row["top_logit_tokens"]) != _vocab_set(top):
            problems.append(f"{concept!r} top_logit_tokens differ from your logit_weights' top 10")
        if not isinstance(row["verdict"], str) or len(row["verdict"].split()) < 8:
            problems.append(f"{concept!r} verdict: write a sentence or more, with the numbers")
    if problems:
        shown = "; ".join(problems[:6]) + (
            f"; ... ({len(problems)} in all)" if len(problems) > 6 else ""
        )
        raise CheckFailed(
            f"{shown}. Every number must be computed with your functions over every held-out "
            "token (positions 1: of all of eval_tokens), not over a subset such as the "
            "feature's activating examples or top contexts; the neuron and match correlations "
            "over the same positions (BOS dropped)."
        )
    return (
        f"{len(ns['results'])} concepts x {len(RESULT_KEYS)} results reproduced by your functions"
    )


# ----------------------------------------------------------------------------- the rubric

#: (criterion, evidence a marker looks for, points, the automatic check that awards it or None).
RUBRIC: tuple[tuple[str, str, int, str | None], ...] = (
    ("Functions", "specificity_sensitivity passes its check", 4, "specificity_sensitivity"),
    ("Functions", "ablation_effect passes its check", 4, "ablation_effect"),
    ("Functions", "logit_weights passes its check", 4, "logit_weights"),
    ("Functions", "max_neuron_correlation passes its check", 4, "max_neuron_correlation"),
    (
        "Hand-in",
        "every required result present; proxies are functions that match tokens",
        6,
        "hand_in",
    ),
    (
        "Held-out data",
        "every number on validation windows (never the SAE's training data)",
        6,
        "held_out",
    ),
    ("Not a neuron", "compared with the neurons of the layer the SAE reads", 6, "neuron_layer"),
    (
        "Consistency",
        "stored numbers reproduced by the learner's own functions on all of eval_tokens",
        6,
        "consistent",
    ),
    (
        "Proxies",
        "each proxy written down in words BEFORE looking at the feature, defined from the "
        "tokens alone; its limits named (e.g. windows that start inside a docstring)",
        6,
        None,
    ),
    (
        "Choosing features",
        "candidates chosen on a different slice of held-out data than the one "
        "measured; the rule for choosing stated; at least 3 concepts",
        6,
        None,
    ),
    (
        "Specificity",
        "the number AND the activation histogram split by proxy; what the feature "
        "does on the non-proxy tokens (a few examples read); specificity at high activation",
        8,
        None,
    ),
    (
        "Sensitivity",
        "the number AND examples of proxy tokens where the feature does not fire, with a reason",
        5,
        None,
    ),
    (
        "Downstream: ablation",
        "effect where the feature fires vs elsewhere, sign interpreted; "
        "which next tokens lose most",
        6,
        None,
    ),
    (
        "Downstream: logit weights",
        "top tokens read against the hypothesis; the direct-path "
        "caveat (later layers ignored) stated",
        5,
        None,
    ),
    (
        "Not a neuron",
        "best neuron's correlation AND that neuron's own specificity for the "
        "proxy; the most specific neuron of all",
        6,
        None,
    ),
    (
        "Universality",
        "the matching feature in the second SAE, its correlation, and whether it "
        "fits the same proxy",
        6,
        None,
    ),
    (
        "Verdict",
        "per feature: each criterion pass/fail against thresholds fixed in advance, "
        "with the numbers; failures reported as failures",
        8,
        None,
    ),
    (
        "Reproducible",
        "the notebook runs top to bottom in a fresh kernel, seeds fixed; the time "
        "the project took is stated",
        4,
        None,
    ),
)


def rubric_markdown() -> str:
    """The rubric as a markdown table (the notebook shows it; a teaching assistant prints it)."""
    lines = ["| criterion | evidence | points | marked by |", "| --- | --- | ---: | --- |"]
    for criterion, evidence, points, auto in RUBRIC:
        who = f"`course check` ({auto})" if auto else "a person"
        lines.append(f"| {criterion} | {evidence} | {points} | {who} |")
    total = sum(r[2] for r in RUBRIC)
    lines.append(f"| **total** | | **{total}** | |")
    return "\n".join(lines)


def marking_summary(results) -> str:
    """``course check 11``'s rubric: automatic points from the check results, then the
    checklist a person fills in, and the total so far."""
    status = {r.name: r.status for r in results}
    auto = [r for r in RUBRIC if r[3]]
    human = [r for r in RUBRIC if not r[3]]
    earned = sum(p for _, _, p, name in auto if status.get(name) == "passed")
    auto_total = sum(r[2] for r in auto)
    human_total = sum(r[2] for r in human)
    lines = [
        "",
        "Marking (rubric of chapter 11)",
        f"  marked by the program: {earned}/{auto_total}",
    ]
    for criterion, evidence, points, name in auto:
        got = points if status.get(name) == "passed" else 0
        lines.append(f"    {got:>2}/{points:<2} {criterion}: {evidence}")
    lines.append(f"  for a person to mark (read the notebook): __/{human_total}")
    for criterion, evidence, points, _ in human:
        lines.append(f"    [ ] __/{points:<2} {criterion}: {evidence}")
    lines.append(f"  total: {earned} + __ (person) of {auto_total + human_total}")
    return "\n".join(lines)
