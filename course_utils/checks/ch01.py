"""Checks for chapter 01, Toy models of superposition.

Random data generators (1.1, 1.6, 1.7) are compared by their *statistics* (shape, range, how
often features are active, which features are active together, the value distribution), since a
learner's random draws cannot equal ours. Models (1.2, 1.8, 1.9) are compared on shared weights.
The training loop (1.4) is compared by what it does: its learning-rate schedule, how many batches
it draws, which parameters move, and the loss it reaches.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from course_utils.checks.core import (
    GRAD_PREFIX,
    Case,
    CheckFailed,
    Mistake,
    StepRecorder,
    compare_function,
    dependence_problem,
    dtype_problem,
    exercise,
    frequency_problem,
    fresh_randomness_problem,
    gradient_compare,
    lifted_mistakes,
    mismatch,
    step_divergence,
    with_gradients,
    with_options,
    z_for,
)
from course_utils.science import toy_models as ref

# A correct generator fails one statistical case with probability at most FALSE_ALARM per test.
FALSE_ALARM = 1e-6

# ============================================================================ random generators


def _as_p(p: Any, n_instances: int) -> torch.Tensor:
    return torch.as_tensor(p, dtype=torch.float32).expand(n_instances)


def _basic_problem(expected: torch.Tensor, actual: Any, low: float = 0.0) -> str | None:
    if actual is None:
        return "your function returned None — did you forget to `return` the batch?"
    if not isinstance(actual, torch.Tensor):
        return f"expected a torch.Tensor, got {type(actual).__name__}"
    if actual.shape != expected.shape:
        return (
            f"the batch has shape {tuple(actual.shape)}, expected {tuple(expected.shape)} "
            "= [n_batch, n_instances, n_features]"
        )
    if not actual.dtype.is_floating_point:
        return f"the batch has dtype {actual.dtype}; features are real numbers (use a float tensor)"
    if torch.isnan(actual).any():
        return "the batch contains NaN"
    in_range = expected.min() >= low - 1e-6 and expected.max() <= 1 + 1e-6
    if in_range and (actual.min() < low - 1e-6 or actual.max() > 1 + 1e-6):
        lo = "0" if low == 0 else "-1"
        return (
            f"values should lie in [{lo}, 1], but yours range from {actual.min().item():.3g} "
            f"to {actual.max().item():.3g}"
        )
    return None


Stats = dict[str, tuple[float, int]]  # name -> (value, how many draws it averages)


def _masked_mean(values: torch.Tensor, keep: torch.Tensor) -> tuple[float, int]:
    """Mean of ``values`` over the entries ``keep`` marks ([n_batch, ...] each) and how many
    independent draws it is worth: the kept count divided by the design effect of the rows
    (ratio-estimator variance against the entries' own variance), between n_batch and the count.
    Same reason as `_row_mean`: a wrong generator that shares values makes entries move together."""
    v = values.reshape(len(values), -1).double() * keep.reshape(len(keep), -1)
    m = keep.reshape(len(keep), -1).double().sum(1)
    n = int(m.sum().item())
    mean = (v.sum() / n).item()
    entry_var = ((values[keep].double() - mean) ** 2).mean().item()
    rows = int((m > 0).sum().item())
    if rows < 2 or entry_var == 0:
        return mean, n
    residual = v.sum(1) - mean * m  # ratio estimator: var(mean) ~ var(residual) / (N mean(m)^2)
    var_mean = residual.var().item() * len(m) / n**2
    n_eff = entry_var / var_mean if var_mean > 0 else n
    return mean, int(min(max(n_eff, min(rows, n)), n))


def _value_stats(x: torch.Tensor) -> Stats:
    active = x != 0
    nonzero = x.abs()
    if int(active.sum()) < 200:
        return {}
    return {
        "fraction of non-zero values that are negative": _masked_mean((x < 0).float(), active),
        "fraction of non-zero values above 1 in size": _masked_mean((nonzero > 1).float(), active),
        "mean of the non-zero values": _masked_mean(nonzero, active),
        "fraction of non-zero values below 0.25": _masked_mean((nonzero < 0.25).float(), active),
        "fraction of non-zero values equal to 1": _masked_mean((nonzero == 1).float(), active),
    }


def _row_mean(indicator: torch.Tensor) -> tuple[float, int]:
    """Mean of a [n_batch, k] indicator and how many independent draws it is worth.

    Rows are independent; entries within a row are so only for a correct generator. A wrong one
    (one mask per row, say) makes them move together, and its sample mean then varies as if it
    averaged n_batch draws, not n_batch * k. The design effect var(row mean) / (p (1 - p) / k),
    measured on the sample and kept between 1 and k, sets the count, so comparing two samples
    of the same wrong generator (the diagnosis of a hint) keeps the stated false-alarm rate."""
    n_batch, k = indicator.shape
    p = indicator.mean().item()
    row_var = indicator.mean(1).var().item() if n_batch > 1 else 0.0
    if k == 1 or p * (1 - p) == 0 or row_var == 0:
        return p, n_batch * k
    n_eff = n_batch * p * (1 - p) / row_var
    return p, int(min(max(n_eff, n_batch), n_batch * k))


def _compare_stats(exp: Stats, act: Stats) -> str | None:
    """Each statistic is a mean of values in [0, 1] (variance <= 1/4); the tolerance for the
    difference of two such means is z * sqrt(1/4 (1/n_exp + 1/n_act)), with z set so that a
    correct generator fails one of them with probability < FALSE_ALARM."""
    z = z_for(FALSE_ALARM, max(len(exp), 1))
    for key, (e, n_exp) in exp.items():
        a, n_act = act.get(key, (None, 0))
        tol = z * math.sqrt(0.25 * (1 / max(n_exp, 1) + 1 / max(n_act, 1)))
        if a is None or math.isnan(a) or abs(a - e) > tol:
            shown = "undefined" if a is None or math.isnan(a) else f"{a:.3f}"
            return f"{key} is {shown}, expected about {e:.3f} (± {tol:.3f})"
    return None


def _independent_stats(x: torch.Tensor) -> Stats:
    active = (x != 0).float()
    n_batch, n_inst, n_feat = x.shape
    stats = {
        f"fraction of non-zero entries in instance {i}": _row_mean(active[:, i])
        for i in range(n_inst)
    }
    if n_feat > 1:
        stats["P(features 0 and 1 both non-zero), instance 0"] = (
            (active[:, 0, 0] * active[:, 0, 1]).mean().item(),
            n_batch,
        )
    if n_inst > 1:
        stats["P(feature 0 non-zero in instances 0 and 1 at once)"] = (
            (active[:, 0, 0] * active[:, 1, 0]).mean().item(),
            n_batch,
        )
        both = (x[:, 0] != 0) & (x[:, 1] != 0)
        if both.sum() > 50:
            stats["fraction of equal non-zero values in instances 0 and 1"] = (
                (x[:, 0][both] == x[:, 1][both]).float().mean().item(),
                int(both.sum()),
            )
    stats.update(_value_stats(x))
    return stats


def _draw_problem(expected: torch.Tensor, actual: torch.Tensor, pair_layout: bool) -> str | None:
    """Per-coordinate marginals and pairwise (in)dependence, each with a stated false-alarm rate.

    Two samples are compared (the reference's and the learner's): the frequency with which each
    [instance, feature] coordinate is non-zero, the correlations of those activity indicators
    between every two coordinates (masks shared across instances or features, pairs laid out
    wrongly, a coupling lost), and the correlations of the values themselves (values shared).
    """
    n, n_inst, n_feat = expected.shape
    act_exp, act_got = (expected != 0).double(), (actual != 0).double()

    def coord(i: int) -> str:
        return f"[instance {i // n_feat}, feature {i % n_feat}]"

    p_exp = act_exp.mean(0)
    problem = frequency_problem(
        "the fraction of draws in which [instance, feature] {index} is non-zero",
        act_got.mean(0),
        p_exp,
        n,
        FALSE_ALARM,
        n_expected=n,
    )
    if problem:
        return problem
    problem = dependence_problem(
        "which features are non-zero together",
        act_exp.reshape(n, -1),
        act_got.reshape(n, -1),
        coord,
        FALSE_ALARM,
    )
    if problem:
        return (
            problem
            + (" (pairs are ADJACENT features 2k, 2k+1)" if pair_layout else "")
            + "; every instance (and every feature) needs masks of its own"
        )
    problem = dependence_problem(
        "the values", expected.reshape(n, -1), actual.reshape(n, -1), coord, FALSE_ALARM
    )
    if problem:
        return problem + "; draw a separate value for every entry"
    return None


def _stat_compare(
    stats: Callable[[torch.Tensor], Stats], low: float = 0.0, pairs: bool = False
) -> Callable:
    memo: dict[int, tuple[torch.Tensor, Stats]] = {}

    def cached(x: torch.Tensor) -> Stats:  # diagnosis compares one answer many times
        if id(x) not in memo or memo[id(x)][0] is not x:
            memo[id(x)] = (x, stats(x))
        return memo[id(x)][1]

    def compare(expected: torch.Tensor, actual: Any) -> str | None:
        problem = _basic_problem(expected, actual, low) or dtype_problem(
            expected, actual, "the batch"
        )
        if problem or expected.shape[0] < 1000:
            return problem
        return _compare_stats(stats(expected), cached(actual)) or _draw_problem(
            expected, actual, pairs
        )

    return compare


def _generator_check(learner: Callable, reference: Callable, cases, mistakes, pairs: bool) -> str:
    summary = compare_function(
        learner,
        reference,
        cases,
        mistakes,
        compare=_stat_compare(_pair_stats if pairs else _independent_stats, pairs=pairs),
    )
    problem = fresh_randomness_problem(learner, 2000, 0.5, 2, 4)
    if problem:
        raise CheckFailed(problem + ".")
    return (
        summary
        + "; per-coordinate frequencies, (in)dependence across instances and features, values "
        "and dtype agree, and every call draws fresh randomness (each statistical test false-"
        f"alarms with probability < {FALSE_ALARM:g})"
    )


def _masked(values: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
    return torch.where(active, values, torch.zeros(()))


# ---------------------------------------------------------------- 1.1 generate_batch

GENERATE_BATCH_MISTAKES = [
    Mistake(
        "zero with probability feature_probability",
        lambda n, p, i, f: _masked(
            torch.rand(n, i, f), torch.rand(n, i, f) >= _as_p(p, i)[:, None]
        ),
        "your features are non-zero with probability 1 - feature_probability. feature_probability "
        "is the DENSITY 1 - S: keep a value when `torch.rand(...) < feature_probability`.",
    ),
    Mistake(
        "one mask per row, shared by all features",
        lambda n, p, i, f: _masked(torch.rand(n, i, f), torch.rand(n, i, 1) < _as_p(p, i)[:, None]),
        "all features of a row are zero or non-zero together. Draw the mask with the full shape "
        "[n_batch, n_instances, n_features] so every feature is zeroed independently.",
    ),
    Mistake(
        "one draw shared by all instances",
        lambda n, p, i, f: _masked(torch.rand(n, 1, f), torch.rand(n, 1, f) < _as_p(p, i)[:, None]),
        "every instance sees the same numbers. Draw a separate value for each instance "
        "(shape [n_batch, n_instances, n_features]); instances are independent models.",
    ),
    Mistake(
        "no mask",
        lambda n, p, i, f: torch.rand(n, i, f),
        "no feature is ever zero: multiply (or `torch.where`) the uniform values by a mask that "
        "is 1 with probability feature_probability.",
    ),
    Mistake(
        "returned the mask itself",
        lambda n, p, i, f: (torch.rand(n, i, f) < _as_p(p, i)[:, None]).float(),
        "your non-zero features are all exactly 1. Active features take a value uniform on [0, 1] "
        "(`torch.rand`), the mask only decides which ones are zero.",
    ),
    Mistake(
        "per-instance probability broadcast over features",
        lambda n, p, i, f: _masked(torch.rand(n, i, f), torch.rand(n, i, f) < torch.as_tensor(p)),
        "feature_probability has one value per INSTANCE (shape [n_instances]); `rand(...) < p` "
        "lines it up with the last dimension (features). Use `p[:, None]` to broadcast over "
        "features.",
    ),
    Mistake(
        "per-instance probability without a trailing axis (crashes)",
        lambda n, p, i, f: _masked(torch.rand(n, i, f), torch.rand(n, i, f) < _as_p(p, i)),
        "`p` has one value per instance, shape [n_instances]. Compared with a [n_batch, "
        "n_instances, n_features] tensor, it is lined up with the LAST axis (features), hence the "
        "size mismatch. Give it a trailing axis: `p[:, None]` has shape [n_instances, 1] and "
        "broadcasts over batch and features.",
    ),
    Mistake(
        "Gaussian values",
        lambda n, p, i, f: _masked(
            torch.randn(n, i, f), torch.rand(n, i, f) < _as_p(p, i)[:, None]
        ),
        "values should be uniform on [0, 1] (`torch.rand`), not Gaussian (`torch.randn`).",
    ),
]


def _generate_batch_cases() -> list[Case]:
    return [
        Case("density 0.3, 4 instances x 6 features", (10_000, 0.3, 4, 6)),
        Case(
            "one density per instance [1, 0.5, 0.1]", (10_000, torch.tensor([1.0, 0.5, 0.1]), 3, 3)
        ),
        Case("dense (S = 0)", (5_000, 1.0, 2, 5)),
        Case("one instance, one feature", (10_000, 0.25, 1, 1)),
        Case("a batch of one", (1, 0.5, 2, 3)),
    ]


@exercise("1.1", "generate_batch")
def generate_batch(learner) -> str:
    return _generator_check(
        learner,
        lambda n, p, i, f: ref.generate_batch(n, p, i, f),
        _generate_batch_cases(),
        GENERATE_BATCH_MISTAKES,
        pairs=False,
    )


# ---------------------------------------------------------------- 1.6 / 1.7 correlated batches


def _pair_stats(x: torch.Tensor) -> Stats:
    active = x != 0
    a, b = active[..., 0::2], active[..., 1::2]
    n_batch, n_inst, n_pairs = a.shape
    per_pair = (n_batch, n_inst * n_pairs)  # the two members of a pair are not independent draws
    stats = {}
    for i in range(n_inst):
        p, n_eff = _row_mean(active[:, i].float())
        # two members per pair: at most n_batch * n_pairs independent draws
        stats[f"fraction of non-zero entries in instance {i}"] = (p, min(n_eff, n_batch * n_pairs))
    stats["P(both members of a pair non-zero)"] = _row_mean((a & b).float().reshape(per_pair))
    stats["P(exactly one member of a pair non-zero)"] = _row_mean((a ^ b).float().reshape(per_pair))
    if n_pairs > 1:
        stats["P(pairs 0 and 1 both have an active member)"] = (
            ((a[..., 0] | b[..., 0]) & (a[..., 1] | b[..., 1])).float().mean().item(),
            n_batch,
        )
    both = a & b
    if both.sum() > 50:
        stats["fraction of pairs whose two non-zero values are equal"] = (
            (x[..., 0::2][both] == x[..., 1::2][both]).float().mean().item(),
            int(both.sum()),
        )
    stats.update(_value_stats(x))
    return stats


def _interleave(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    return torch.stack([first, second], dim=-1).flatten(-2)


def _corr_shared_value(n, p, i, k):
    pair = torch.rand(n, i, k) < _as_p(p, i)[:, None]
    v = torch.rand(n, i, k)
    return _interleave(_masked(v, pair), _masked(v, pair))


def _corr_blocks(n, p, i, k):
    pair = torch.rand(n, i, k) < _as_p(p, i)[:, None]
    return _masked(torch.rand(n, i, 2 * k), torch.cat([pair, pair], dim=-1))


CORRELATED_MISTAKES = [
    Mistake(
        "independent masks",
        lambda n, p, i, k: ref.generate_batch(n, p, i, 2 * k),
        "the two members of a pair are zeroed independently. Draw ONE mask per pair "
        "([n_batch, n_instances, n_pairs]) and use it for both members.",
    ),
    Mistake(
        "the same value for both members",
        _corr_shared_value,
        "both members of a pair get the same value. They share whether they are active, not their "
        "value: draw a separate U[0, 1] value for each feature.",
    ),
    Mistake(
        "pairs laid out as two blocks",
        _corr_blocks,
        "your pairs are features k and k + n_pairs. The pairs here are ADJACENT: features 2k and "
        "2k + 1 (e.g. `einops.repeat(mask, 'b i p -> b i (p two)', two=2)`).",
    ),
]


def _anti_half(n, p, i, k):
    pair = torch.rand(n, i, k) < _as_p(p, i)[:, None]
    first = torch.rand(n, i, k) < 0.5
    return _masked(torch.rand(n, i, 2 * k), _interleave(pair & first, pair & ~first))


def _anti_always_one(n, p, i, k):
    first = torch.rand(n, i, k) < 0.5
    return _masked(torch.rand(n, i, 2 * k), _interleave(first, ~first))


ANTICORRELATED_MISTAKES = [
    Mistake(
        "independent masks",
        lambda n, p, i, k: ref.generate_batch(n, p, i, 2 * k),
        "both members of a pair can be active at once. Draw whether the PAIR is active, then "
        "pick exactly one member with a fair coin.",
    ),
    Mistake(
        "pair active with probability p",
        _anti_half,
        "each feature is active only half as often as asked: if the pair is active with "
        "probability p and then one member is chosen, each member gets p / 2. Make the pair "
        "active with probability 2 * feature_probability.",
    ),
    Mistake(
        "one member always active",
        _anti_always_one,
        "every pair always has one active member. The pair itself must be inactive with "
        "probability 1 - 2 * feature_probability.",
    ),
]


def _pair_cases(max_density: float) -> list[Case]:
    return [
        Case("density 0.2, 3 instances x 2 pairs", (10_000, 0.2, 3, 2)),
        Case("one density per instance", (10_000, torch.tensor([max_density, 0.1]), 2, 3)),
        Case("one pair", (10_000, 0.3, 1, 1)),
        Case("a batch of one", (1, 0.3, 2, 2)),
    ]


@exercise("1.6", "generate_correlated_batch")
def generate_correlated_batch(learner) -> str:
    return _generator_check(
        learner,
        lambda n, p, i, k: ref.generate_correlated_batch(n, p, i, k),
        _pair_cases(1.0),
        CORRELATED_MISTAKES,
        pairs=True,
    )


@exercise("1.7", "generate_anticorrelated_batch")
def generate_anticorrelated_batch(learner) -> str:
    return _generator_check(
        learner,
        lambda n, p, i, k: ref.generate_anticorrelated_batch(n, p, i, k),
        _pair_cases(0.5),
        ANTICORRELATED_MISTAKES,
        pairs=True,
    )


# ============================================================================ models


def _load(model: Any, name: str, value: torch.Tensor, cls_name: str) -> None:
    param = getattr(model, name, None)
    if not isinstance(param, torch.Tensor):
        raise CheckFailed(
            f"your {cls_name} has no tensor attribute `{name}`; keep the `__init__` the notebook "
            "gives you."
        )
    if param.shape != value.shape:
        raise CheckFailed(
            f"`{cls_name}.{name}` has shape {tuple(param.shape)}, expected {tuple(value.shape)}; "
            "keep the `__init__` the notebook gives you."
        )
    with torch.no_grad():
        param.copy_(value)


def _run_model(cls: Callable, reference_cls: type, signed: bool = False) -> Callable:
    """Turn a model class into a function of (seed, sizes) -> output on shared random weights."""

    def run(seed: int, n_instances: int, n_features: int, d_hidden: int, n_batch: int, x_kind: str):
        with (
            torch.random.fork_rng()
        ):  # building models draws from the global RNG: leave it as it was
            return _run(seed, n_instances, n_features, d_hidden, n_batch, x_kind)

    def _run(
        seed: int, n_instances: int, n_features: int, d_hidden: int, n_batch: int, x_kind: str
    ):
        g = torch.Generator().manual_seed(seed)
        shapes = reference_cls(n_instances, n_features, d_hidden)
        model = cls(n_instances, n_features, d_hidden)
        # weights before biases, whatever order the classes register them in
        params = sorted(shapes.named_parameters(), key=lambda item: item[0].startswith("b"))
        for name, param in params:
            scale = 0.3 if name.startswith("b") else 1.0
            _load(model, name, scale * torch.randn(param.shape, generator=g), cls.__name__)
        x = _input(g, n_instances, n_features, n_batch, x_kind)
        out = model(x)
        result = {"output": out}
        if isinstance(out, torch.Tensor) and out.requires_grad:
            (out * torch.linspace(0.5, 1.5, out.numel()).reshape(out.shape)).sum().backward()
        for name, _ in params:
            grad = getattr(model, name).grad
            result[GRAD_PREFIX + name] = None if grad is None else grad.detach().clone()
        return result

    def _input(g, n_instances, n_features, n_batch, x_kind):
        if x_kind == "zeros":
            x = torch.zeros(n_batch, n_instances, n_features)
        elif x_kind == "one active feature":
            x = torch.zeros(n_batch, n_instances, n_features)
            x[..., n_features // 2] = 0.8 * (-1 if signed else 1)
        else:
            gen = ref.generate_signed_batch if signed else ref.generate_batch
            x = gen(n_batch, 0.4, n_instances, n_features, generator=g)
        return x

    return run


def _model_cases(shapes: list[tuple[int, int, int]]) -> list[Case]:
    (i1, f1, h1), (i2, f2, h2) = shapes
    return [
        Case(f"{i1} instances, {f1} features in {h1} dims", (0, i1, f1, h1, 16, "random")),
        Case(f"{i2} instances, {f2} features in {h2} dims", (1, i2, f2, h2, 8, "random")),
        Case("all-zero input (output = ReLU(b))", (2, i1, f1, h1, 4, "zeros")),
        Case("a single active feature", (3, i1, f1, h1, 2, "one active feature")),
        Case("a batch of one", (4, i2, f2, h2, 1, "random")),
    ]


def _model_check(
    learner: Any, reference_cls: type, mistakes: list[Mistake], shapes, signed=False
) -> str:
    if not isinstance(learner, type):
        name = reference_cls.__name__
        raise CheckFailed(
            f"pass the class itself (e.g. `check.{name}({name})`), "
            f"not an instance or a function; got {type(learner).__name__}."
        )
    summary = compare_function(
        _run_model(learner, reference_cls, signed),
        _run_model(reference_cls, reference_cls, signed),
        _model_cases(shapes),
        lifted_mistakes(mistakes, lambda cls: _run_model(cls, reference_cls, signed)),
        compare=gradient_compare(atol=1e-5, rtol=1e-4),
    )
    return "forward " + summary + ", and gradients reach every weight"


def _h(model, x):
    import einops

    return einops.einsum(model.W, x, "inst hid feats, batch inst feats -> batch inst hid")


def _out(model, h):
    import einops

    return einops.einsum(model.W, h, "inst hid feats, batch inst hid -> batch inst feats")


def _variant(base: type, forward: Callable) -> type:
    return type(base.__name__, (base,), {"forward": forward})


# ---------------------------------------------------------------- 1.2 ToyModel

TOY_MODEL_MISTAKES = [
    Mistake(
        "no ReLU",
        _variant(ref.ToyModel, lambda self, x: _out(self, _h(self, x)) + self.b_final),
        "negative outputs survive: apply ReLU to W^T h + b (that is what lets the model filter "
        "out interference).",
    ),
    Mistake(
        "no bias",
        _variant(ref.ToyModel, lambda self, x: torch.relu(_out(self, _h(self, x)))),
        "the bias b_final is missing: x' = ReLU(W^T h + b).",
    ),
    Mistake(
        "bias after the ReLU",
        _variant(ref.ToyModel, lambda self, x: torch.relu(_out(self, _h(self, x))) + self.b_final),
        "you added b after the ReLU; add it before: ReLU(W^T h + b), so the bias can push small "
        "interference below zero.",
    ),
    Mistake(
        "ReLU on the hidden layer",
        _variant(
            ref.ToyModel,
            lambda self, x: torch.relu(_out(self, torch.relu(_h(self, x))) + self.b_final),
        ),
        "this model has no ReLU on h = W x (that is exercise 1.8's NeuronModel); only the output "
        "has one.",
    ),
]


@exercise("1.2", "ToyModel")
def ToyModel(learner) -> str:
    return _model_check(learner, ref.ToyModel, TOY_MODEL_MISTAKES, [(3, 5, 2), (2, 4, 6)])


# ---------------------------------------------------------------- 1.8 NeuronModel

NEURON_MODEL_MISTAKES = [
    Mistake(
        "no ReLU on the hidden layer",
        _variant(
            ref.NeuronModel, lambda self, x: torch.relu(_out(self, _h(self, x)) + self.b_final)
        ),
        "this is the ToyModel's forward. The neuron model applies ReLU to the hidden layer too: "
        "h = ReLU(W x).",
    ),
    Mistake(
        "no ReLU on the output",
        _variant(
            ref.NeuronModel, lambda self, x: _out(self, torch.relu(_h(self, x))) + self.b_final
        ),
        "keep the output ReLU as well: x' = ReLU(W^T h + b) with h = ReLU(W x).",
    ),
    Mistake(
        "no bias",
        _variant(ref.NeuronModel, lambda self, x: torch.relu(_out(self, torch.relu(_h(self, x))))),
        "the bias b_final is missing: x' = ReLU(W^T h + b).",
    ),
]


@exercise("1.8", "NeuronModel")
def NeuronModel(learner) -> str:
    return _model_check(learner, ref.NeuronModel, NEURON_MODEL_MISTAKES, [(3, 6, 3), (2, 4, 5)])


# ---------------------------------------------------------------- 1.9 AbsValueModel


def _abs_forward(
    hidden_relu: bool = True, out_relu: bool = True, bias: bool = True, tied: bool = False
):
    import einops

    def forward(self, x):
        h = einops.einsum(self.W1, x, "inst hid feats, batch inst feats -> batch inst hid")
        if hidden_relu:
            h = torch.relu(h)
        if tied:
            out = einops.einsum(self.W1, h, "inst hid feats, batch inst hid -> batch inst feats")
        else:
            out = einops.einsum(self.W2, h, "inst feats hid, batch inst hid -> batch inst feats")
        if bias:
            out = out + self.b_final
        return torch.relu(out) if out_relu else out

    return forward


ABS_MODEL_MISTAKES = [
    Mistake(
        "tied weights",
        _variant(ref.AbsValueModel, _abs_forward(tied=True)),
        "you read out with W1 transposed. This model is untied: the output is ReLU(W2 h + b) with "
        "its own W2 [inst, feats, hid].",
    ),
    Mistake(
        "no ReLU on the hidden layer",
        _variant(ref.AbsValueModel, _abs_forward(hidden_relu=False)),
        "h = ReLU(W1 x): without that ReLU the model is linear before the last ReLU and cannot "
        "compute |x| for negative inputs.",
    ),
    Mistake(
        "no ReLU on the output",
        _variant(ref.AbsValueModel, _abs_forward(out_relu=False)),
        "keep the output ReLU: y' = ReLU(W2 h + b).",
    ),
    Mistake(
        "no bias",
        _variant(ref.AbsValueModel, _abs_forward(bias=False)),
        "the bias b_final is missing: y' = ReLU(W2 h + b).",
    ),
]


@exercise("1.9", "AbsValueModel")
def AbsValueModel(learner) -> str:
    return _model_check(
        learner, ref.AbsValueModel, ABS_MODEL_MISTAKES, [(3, 4, 6), (2, 5, 3)], signed=True
    )


# ============================================================================ 1.3 loss

MSE_MISTAKES = [
    Mistake(
        "mean over features",
        lambda x_hat, x, imp: ((x - x_hat) ** 2 * imp).mean(-1).mean(0),
        "you averaged over features; the loss SUMS over features, sum_i I_i (x_i - x'_i)^2, and "
        "averages over the batch only.",
    ),
    Mistake(
        "sum over the batch",
        lambda x_hat, x, imp: ((x - x_hat) ** 2 * imp).sum(-1).sum(0),
        "you summed over the batch; take the MEAN over the batch (dim 0) so the loss does not "
        "grow with the batch size.",
    ),
    Mistake(
        "importance squared",
        lambda x_hat, x, imp: ((imp * (x - x_hat)) ** 2).sum(-1).mean(0),
        "you squared the importance too, (I_i (x_i - x'_i))^2. Weight the squared error: "
        "I_i (x_i - x'_i)^2.",
    ),
    Mistake(
        "no importance",
        lambda x_hat, x, imp: ((x - x_hat) ** 2).sum(-1).mean(0),
        "the importance weights are missing: multiply each squared error by I_i.",
    ),
    Mistake(
        "absolute error",
        lambda x_hat, x, imp: ((x - x_hat).abs() * imp).sum(-1).mean(0),
        "you used |x_i - x'_i|; the loss uses the SQUARED error (x_i - x'_i)^2.",
    ),
    Mistake(
        "L2 norm, not squared",
        lambda x_hat, x, imp: ((x - x_hat) ** 2 * imp).sum(-1).sqrt().mean(0),
        "you took a square root (an L2 norm). The loss is the squared error, no square root.",
    ),
    Mistake(
        "averaged over instances too",
        lambda x_hat, x, imp: ((x - x_hat) ** 2 * imp).sum(-1).mean(),
        "return one loss per instance, shape [inst]: average over the batch only (dim 0), not "
        "over instances. The training loop sums them.",
    ),
]


def _mse_cases() -> list[Case]:
    g = torch.Generator().manual_seed(0)
    x = ref.generate_batch(32, 0.5, 3, 6, generator=g)
    x_hat = torch.rand(32, 3, 6, generator=g)
    imp = ref.importance_tensor(ref.geometric_importance(6, 0.7), 3, 6)
    per_inst = torch.rand(2, 4, generator=g) + 0.1
    x2 = torch.rand(5, 2, 4, generator=g)
    return [
        Case("random batch, importance 0.7^i", (x_hat, x, imp)),
        Case(
            "a different importance per instance", (torch.rand(5, 2, 4, generator=g), x2, per_inst)
        ),
        Case("perfect reconstruction (loss 0)", (x.clone(), x, imp)),
        Case("a batch of one", (x_hat[:1], x[:1], imp)),
        Case("one feature", (x_hat[..., :1], x[..., :1], imp[:, :1])),
    ]


@exercise("1.3", "importance_weighted_mse")
def importance_weighted_mse(learner) -> str:
    return (
        compare_function(
            with_gradients(learner, {"x_hat": 0}),
            with_gradients(ref.importance_weighted_mse, {"x_hat": 0}),
            _mse_cases(),
            lifted_mistakes(MSE_MISTAKES, lambda f: with_gradients(f, {"x_hat": 0})),
            compare=gradient_compare(atol=1e-5),
        )
        + ", and the loss stays differentiable in x_hat"
    )


# ============================================================================ 1.4 training loop

# every argument differs from the notebook's defaults (2000, 512, 1e-2, 0.05)
TRAIN_STEPS, TRAIN_BATCH, TRAIN_LR, TRAIN_WARMUP = 40, 64, 2e-2, 0.1


def _run_train(train_fn: Callable) -> Callable:
    """Turn a training function into (seed, density, kind) -> a summary of what training did,
    with a per-step record (lr applied, batch seen, gradient norms) of every optimizer.step()."""

    def run(seed: int, density: float, kind: str = "toy") -> dict[str, Any]:
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            probability = torch.tensor([1.0, density, density, density])
            if kind == "abs":  # the target is |x|, not x: model.target(x) must be used
                model = ref.AbsValueModel(4, 5, 6, probability, ref.geometric_importance(5, 0.8))
            else:
                model = ref.ToyModel(4, 5, 2, probability, ref.geometric_importance(5, 0.9))
            start = {n: p.detach().clone() for n, p in model.named_parameters()}
            sizes: list[int] = []
            recorder = StepRecorder({id(p): n for n, p in model.named_parameters()})
            draw = model.generate_batch

            def generate_batch(n):
                sizes.append(n)
                return recorder.saw(draw(n))

            model.generate_batch = generate_batch  # type: ignore[method-assign]
            with recorder:
                result = train_fn(
                    model,
                    n_steps=TRAIN_STEPS,
                    batch_size=TRAIN_BATCH,
                    lr=TRAIN_LR,
                    warmup_frac=TRAIN_WARMUP,
                )
            model.generate_batch = draw  # type: ignore[method-assign]
            weight = "W1" if kind == "abs" else "W"
            return {
                "result": result,
                "sizes": sizes,
                "steps": recorder.steps,
                "W moved": (getattr(model, weight).detach() - start[weight]).flatten(1).norm(dim=1)
                > 1e-4,
                "b moved": (model.b_final.detach() - start["b_final"]).norm(dim=1) > 1e-5,
                "eval loss": ref.evaluate(model, 4096, seed=123),
            }

    return run


def _train_compare(expected: dict, actual: dict) -> str | None:
    """Compare what two training runs did; phrased for `expected` = the reference's run."""
    result = actual["result"]
    if result is None:
        return "your function returned None — return {'loss': ..., 'lr': ...}"
    if not isinstance(result, dict) or not {"loss", "lr"} <= set(result):
        return f"return a dict with keys 'loss' and 'lr', got {type(result).__name__}"
    loss, lrs = torch.as_tensor(result["loss"]), torch.as_tensor(result["lr"], dtype=torch.float64)
    n_inst = expected["eval loss"].shape[0]
    if tuple(loss.shape) != (TRAIN_STEPS, n_inst):
        return (
            f"result['loss'] has shape {tuple(loss.shape)}, expected [n_steps, n_instances] = "
            f"[{TRAIN_STEPS}, {n_inst}] (one loss per instance per step)"
        )
    want_lr = torch.as_tensor(expected["result"]["lr"], dtype=torch.float64)
    problem = mismatch(want_lr, lrs.reshape(-1), atol=1e-7, rtol=1e-5, path="result['lr']")
    applied = step_divergence(expected["steps"], actual["steps"], scale_free=True)
    if applied and not problem and "learning rate" in applied:
        return (
            "result['lr'] records the right schedule, but the rate APPLIED at optimizer.step() "
            f"differs: {applied}. Recording the rate is not enough: set it on the optimizer"
        )
    if applied:
        return applied
    if problem:
        return (
            f"the learning-rate schedule is off: {problem}. Set every param group's lr to "
            "`warmup_cosine_lr(step, n_steps, lr, warmup_steps)` at the start of each step"
        )
    want_sizes, sizes = expected["sizes"], actual["sizes"]
    if len(sizes) != len(want_sizes) or sorted(set(sizes)) != sorted(set(want_sizes)):
        return (
            f"model.generate_batch was called {len(sizes)} times (sizes {sorted(set(sizes))}); "
            f"expected {len(want_sizes)} calls with batch_size {sorted(set(want_sizes))}"
        )
    differ = actual["W moved"] != expected["W moved"]
    if differ.any():
        idle = [int(i) for i in torch.nonzero(~actual["W moved"]).flatten()]
        if idle:
            return f"W did not change in instance(s) {idle}"
        return "W changed in instances where it should not"
    if actual["b moved"].ne(expected["b moved"]).any():
        return (
            "b_final did not change"
            if not actual["b moved"].all()
            else "b_final changed unexpectedly"
        )
    want, got = expected["eval loss"], actual["eval loss"]
    far = (got - want).abs() > 0.25 * want + 2e-3
    if far.any():
        i = int(torch.nonzero(far).flatten()[0])
        return (
            f"after training, instance {i} has loss {got[i].item():.4f} on fresh data; the "
            "reference "
            f"reaches {want[i].item():.4f}"
        )
    return None


def _loop(
    model,
    n_steps,
    batch_size,
    lr,
    warmup_frac,
    *,
    schedule=True,
    zero_grad=True,
    first_only=False,
    fixed_batch=False,
    step=True,
    target=True,
    importance=True,
):
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    warmup = int(warmup_frac * n_steps)
    losses, lrs = [], []
    x = model.generate_batch(batch_size) if fixed_batch else None
    for t in range(n_steps):
        this_lr = ref.warmup_cosine_lr(t, n_steps, lr, warmup) if schedule else lr
        for group in opt.param_groups:
            group["lr"] = this_lr
        batch = x if fixed_batch else model.generate_batch(batch_size)
        loss = ref.importance_weighted_mse(
            model(batch),
            model.target(batch) if target else batch,
            model.importance if importance else torch.ones_like(model.importance),
        )
        if zero_grad:
            opt.zero_grad()
        (loss[0] if first_only else loss.sum()).backward()
        if step:
            opt.step()
        losses.append(loss.detach())
        lrs.append(this_lr)
    return {"loss": torch.stack(losses), "lr": torch.tensor(lrs)}


def _loop_variant(**kw) -> Callable:
    return lambda model, n_steps, batch_size, lr, warmup_frac: _loop(
        model, n_steps, batch_size, lr, warmup_frac, **kw
    )


TRAIN_MISTAKES = [
    Mistake(
        "constant learning rate",
        _loop_variant(schedule=False),
        "your learning rate never changes. Before each step set `group['lr'] = "
        "warmup_cosine_lr(step, n_steps, lr, warmup_steps)` for every group in "
        "`optimizer.param_groups`.",
    ),
    Mistake(
        "no zero_grad",
        _loop_variant(zero_grad=False),
        "gradients pile up across steps: call `optimizer.zero_grad()` before `backward()`.",
    ),
    Mistake(
        "only instance 0 trained",
        _loop_variant(first_only=True),
        "only one instance learns. Backpropagate the SUM of the per-instance losses, "
        "`loss.sum().backward()` (instances share no weights, so each gets its own gradient).",
    ),
    Mistake(
        "one batch reused",
        _loop_variant(fixed_batch=True),
        "draw a FRESH batch every step (`model.generate_batch(batch_size)` inside the loop); "
        "one fixed batch is memorised, not learned from.",
    ),
    Mistake(
        "the input as the target",
        _loop_variant(target=False),
        "you compared model(x) with x itself; compare it with `model.target(x)` (the same as x "
        "for the ToyModel, |x| for the AbsValueModel).",
    ),
    Mistake(
        "importance ignored",
        _loop_variant(importance=False),
        "every feature counts equally in your loss: pass `model.importance` as the weights of "
        "importance_weighted_mse.",
    ),
    Mistake(
        "no optimizer step",
        _loop_variant(step=False),
        "the weights never change: call `optimizer.step()` after `backward()`.",
    ),
]


@exercise("1.4", "train_toy_model")
def train_toy_model(learner) -> str:
    if not callable(learner):
        raise CheckFailed(
            "pass the training function itself, e.g. `check.train_toy_model(train_toy_model)`."
        )
    cases = [
        Case(f"4 instances (density 1 and 0.3), {TRAIN_STEPS} steps", (0, 0.3)),
        Case("another seed, density 1 and 0.1", (1, 0.1)),
        Case("an AbsValueModel: the target |x| is not the input", (2, 0.3, "abs")),
    ]
    summary = compare_function(
        _run_train(learner),
        _run_train(lambda m, **kw: ref.train_toy_model(m, progress=False, **kw)),
        cases,
        lifted_mistakes(TRAIN_MISTAKES, _run_train),
        compare=_train_compare,
    )
    return (
        summary
        + ": schedule, fresh batches, every instance trained, final loss as good as the reference"
    )


# ============================================================================ 1.5 dimensionality


def _pentagon(scale: float = 1.0) -> torch.Tensor:
    angles = torch.arange(5) * 2 * math.pi / 5
    return scale * torch.stack([angles.cos(), angles.sin()])[None]


DIMENSIONALITY_MISTAKES = [
    Mistake(
        "W_i . W_j without normalising W_i",
        lambda W, eps=1e-8: (
            W.norm(dim=1) ** 2 / (torch.einsum("ihf,ihg->ifg", W, W) ** 2).sum(-1).clamp_min(1e-8)
        ),
        "the numerator is ||W_i||^2 but the denominator must use the UNIT vector W_hat_i = W_i / "
        "||W_i|| dotted with the raw W_j: sum_j (W_hat_i . W_j)^2.",
    ),
    Mistake(
        "cosine similarities (both normalised)",
        lambda W, eps=1e-8: (
            W.norm(dim=1) ** 2
            / (
                torch.einsum(
                    "ihf,ihg->ifg", *(2 * [W / W.norm(dim=1, keepdim=True).clamp_min(1e-8)])
                )
                ** 2
            )
            .sum(-1)
            .clamp_min(1e-8)
        ),
        "you normalised W_j too. Only W_i is normalised: sum_j (W_hat_i . W_j)^2 keeps each W_j's "
        "length.",
    ),
    Mistake(
        "dot products not squared",
        lambda W, eps=1e-8: (
            W.norm(dim=1) ** 2
            / torch.einsum("ihf,ihg->ifg", W / W.norm(dim=1, keepdim=True).clamp_min(1e-8), W)
            .abs()
            .sum(-1)
            .clamp_min(1e-8)
        ),
        "square each dot product before summing: sum_j (W_hat_i . W_j)^2.",
    ),
    Mistake(
        "no guard for unlearned features",
        lambda W, eps=1e-8: (
            W.norm(dim=1) ** 2
            / (torch.einsum("ihf,ihg->ifg", W / W.norm(dim=1, keepdim=True), W) ** 2).sum(-1)
        ),
        "a feature with ||W_i|| = 0 gives 0/0 = NaN. Clamp the norm (and the denominator) with "
        "`.clamp_min(eps)` so an unlearned feature gets D_i = 0.",
    ),
    Mistake(
        "sum over j != i only",
        lambda W, eps=1e-8: (
            W.norm(dim=1) ** 2
            / (
                (
                    torch.einsum("ihf,ihg->ifg", W / W.norm(dim=1, keepdim=True).clamp_min(1e-8), W)
                    ** 2
                ).sum(-1)
                - W.norm(dim=1) ** 2
            ).clamp_min(1e-8)
        ),
        "the sum in the denominator runs over ALL j, including j = i (which contributes "
        "||W_i||^2): a feature alone in its dimension has D_i = 1.",
    ),
]


def _dimensionality_cases() -> list[Case]:
    g = torch.Generator().manual_seed(0)
    with_zero = torch.randn(2, 3, 6, generator=g)
    with_zero[:, :, 4] = 0
    antipodal = torch.tensor([[[1.0, -1.0, 0.0], [0.0, 0.0, 1.0]]])
    return [
        Case("random W [3 inst, 4 hid, 10 feats]", (torch.randn(3, 4, 10, generator=g),)),
        Case("orthonormal features (D = 1)", (torch.eye(3)[None],)),
        Case("an antipodal pair + a dedicated feature (1/2, 1/2, 1)", (antipodal,)),
        Case("a regular pentagon (D = 2/5)", (_pentagon(1.1),)),
        Case("an unlearned feature (D = 0)", (with_zero,)),
        Case("more hidden dims than features", (torch.randn(1, 5, 3, generator=g),)),
        # a short feature (||W_i|| = 0.05) next to a unit one: eps = 0.1 clamps its norm
        *with_options(
            Case("a feature shorter than eps", (torch.tensor([[[0.05, 0.0], [0.0, 1.0]]]),)),
            eps=0.1,
        ),
    ]


@exercise("1.5", "feature_dimensionality")
def feature_dimensionality(learner) -> str:
    return compare_function(
        learner,
        ref.feature_dimensionality,
        _dimensionality_cases(),
        DIMENSIONALITY_MISTAKES,
        atol=1e-4,
    )
