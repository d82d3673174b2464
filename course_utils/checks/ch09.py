"""Checks for chapter 09, the polytope lens. References live in :mod:`course_utils.science.polytopes`."""

from __future__ import annotations

import math

import torch
from torch import nn

from course_utils.checks.core import (
    Case,
    CheckFailed,
    Mistake,
    compare_function,
    exercise,
    mismatch,
)
from course_utils.science import polytopes as P


def _g(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _net(sizes, seed: int, bias_scale: float = 1.0, zero_bias: bool = False) -> nn.Sequential:
    model = P.make_mlp(sizes, seed=seed)
    with torch.no_grad():
        for layer in model:
            if isinstance(layer, nn.Linear):
                layer.bias.mul_(0.0 if zero_bias else bias_scale)
    return model


def _x(batch: int, d_in: int, seed: int, scale: float = 1.5) -> torch.Tensor:
    return torch.randn(batch, d_in, generator=_g(seed)) * scale


# ---------------------------------------------------------------- 1.1 layer codes


def _codes_ge(model, x):
    out, h = [], x
    for layer in P.linear_layers(model)[:-1]:
        z = layer(h)
        out.append(z >= 0)
        h = torch.relu(z)
    return out


def _codes_no_bias(model, x):
    out, h = [], x
    for layer in P.linear_layers(model)[:-1]:
        z = h @ layer.weight.T
        out.append(z > 0)
        h = torch.relu(layer(h))
    return out


def _codes_with_output(model, x):
    layers = P.linear_layers(model)
    out, h = [], x
    for layer in layers:
        z = layer(h)
        out.append(z > 0)
        h = torch.relu(z)
    return out


def _codes_no_relu(model, x):
    out, h = [], x
    for layer in P.linear_layers(model)[:-1]:
        h = layer(h)
        out.append(h > 0)
    return out


def _codes_of_inputs(model, x):
    out, h = [], x
    for layer in P.linear_layers(model)[:-1]:
        out.append(h > 0)
        h = torch.relu(layer(h))
    return out


CODE_MISTAKES = [
    Mistake(
        "includes the output layer",
        _codes_with_output,
        "codes belong to the HIDDEN layers only (the ones followed by a ReLU): the output layer "
        "has no ReLU, so it does not cut the input space.",
    ),
    Mistake(
        ">= 0 instead of > 0",
        _codes_ge,
        "the convention is pi(x) = [W x + b > 0]: a neuron whose pre-activation is exactly 0 "
        "outputs 0, so it counts as OFF (strict >).",
    ),
    Mistake(
        "forgot the bias",
        _codes_no_bias,
        "the switching hyperplane is W_i . h + b_i = 0: take the sign of the full pre-activation, "
        "bias included (`layer(h)`, not `h @ layer.weight.T`).",
    ),
    Mistake(
        "no ReLU between layers",
        _codes_no_relu,
        "pass ReLU(z), not z, on to the next layer: the next layer reads the ACTIVATIONS.",
    ),
    Mistake(
        "code of each layer's input",
        _codes_of_inputs,
        "the code of layer l is the sign of layer l's pre-activation (its OUTPUT before the "
        "ReLU), not of the vector it reads.",
    ),
]


def _zero_case():
    """Zero input and zero biases: every pre-activation is exactly 0, so every code is off."""
    return Case(
        "zero input with zero biases", (_net([3, 5, 4, 2], 3, zero_bias=True), torch.zeros(2, 3))
    )


def _tiny_case():
    """Zero input, biases of size ~1e-7: every pre-activation is a tiny nonzero number, so a code
    thresholded at a tolerance (z > 1e-6) or rounded before the sign differs from [z > 0]."""
    model = _net([2, 12, 6, 2], 8)
    with torch.no_grad():
        for layer in P.linear_layers(model):
            layer.bias.mul_(1e-7)
    return Case(
        "pre-activations of size 1e-7 (no tolerance: the sign decides)", (model, torch.zeros(3, 2))
    )


def _code_cases() -> list[Case]:
    return [
        Case("2-16-2 seeded", (_net([2, 16, 2], 0), _x(50, 2, 1))),
        Case("2-8-8-8-2 deep", (_net([2, 8, 8, 8, 2], 1, bias_scale=2.0), _x(50, 2, 2))),
        Case("64-20-12-10 batch of one", (_net([64, 20, 12, 10], 2), _x(1, 64, 3, 0.5))),
        Case("float64 network and input", (_net([3, 9, 7, 2], 5).double(), _x(40, 3, 4).double())),
        _tiny_case(),
        _zero_case(),
    ]


@exercise("1.1", "layer_codes")
def layer_codes(learner) -> str:
    return compare_function(learner, P.layer_codes, _code_cases(), CODE_MISTAKES, atol=0, rtol=0)


# ---------------------------------------------------------------- 1.2 spline code


def _spline_last(model, x):
    return P.layer_codes(model, x)[-1]


def _spline_first(model, x):
    return P.layer_codes(model, x)[0]


def _spline_stacked_output(model, x):
    return torch.cat(_codes_with_output(model, x), dim=-1)


def _spline_reversed(model, x):
    return torch.cat(P.layer_codes(model, x)[::-1], dim=-1)


SPLINE_MISTAKES = [
    Mistake(
        "last hidden layer only",
        _spline_last,
        "the spline code concatenates EVERY hidden layer's code (layer 1 first): one layer's code "
        "alone describes a union of polytopes, not one polytope.",
    ),
    Mistake(
        "first hidden layer only",
        _spline_first,
        "the spline code concatenates EVERY hidden layer's code, not only the first.",
    ),
    Mistake(
        "includes the output layer",
        _spline_stacked_output,
        "leave the output layer out: it has no ReLU.",
    ),
    Mistake(
        "layers in reverse order",
        _spline_reversed,
        "concatenate in forward order: layer 1's code first (`torch.cat(codes, dim=-1)`).",
    ),
]


@exercise("1.2", "spline_code")
def spline_code(learner) -> str:
    return compare_function(learner, P.spline_code, _code_cases(), SPLINE_MISTAKES, atol=0, rtol=0)


# ---------------------------------------------------------------- 1.3 local affine map


def _affine_linear(model, x):
    layers = P.linear_layers(model)
    A, c = layers[0].weight, layers[0].bias
    for layer in layers[1:]:
        A, c = layer.weight @ A, layer.weight @ c + layer.bias
    return A.expand(x.shape[0], -1, -1), c.expand(x.shape[0], -1)


def _affine_last_bias(model, x):
    A, _ = P.local_affine_map(model, x)
    return A, P.linear_layers(model)[-1].bias.expand(x.shape[0], -1)


def _affine_unmasked_bias(model, x):
    A, _ = P.local_affine_map(model, x)
    layers = P.linear_layers(model)
    c = layers[0].bias
    for layer in layers[1:]:
        c = layer.weight @ c + layer.bias
    return A, c.expand(x.shape[0], -1)


def _affine_first_mask(model, x):
    A, c = P.local_affine_map(model, x[:1])
    return A.expand(x.shape[0], -1, -1), c.expand(x.shape[0], -1)


def _affine_transposed(model, x):
    A, c = P.local_affine_map(model, x)
    return A.transpose(1, 2), c


AFFINE_MISTAKES = [
    Mistake(
        "ignores the codes (the linear network)",
        _affine_linear,
        "multiply by D_l = diag(code of layer l) between the weight matrices: an off neuron "
        "passes nothing, so its row of W_l and its bias drop out.",
    ),
    Mistake(
        "c is only the last bias",
        _affine_last_bias,
        "every layer's bias reaches the output: c = W_L D (... (W_2 D_1 b_1 + b_2) ...) + b_L.",
    ),
    Mistake(
        "biases not masked",
        _affine_unmasked_bias,
        "propagate the biases through the same masks as A: c_l = W_l (D_{l-1} c_{l-1}) + b_l.",
    ),
    Mistake(
        "one point's codes for the whole batch",
        _affine_first_mask,
        "every point has its own polytope and so its own A and c: use each row's own codes.",
    ),
    Mistake(
        "A transposed",
        _affine_transposed,
        "A has shape [batch, d_out, d_in] so that model(x) = A @ x + c (as in nn.Linear.weight).",
    ),
]


def _affine_cases() -> list[Case]:
    return [
        Case("2-16-2 seeded", (_net([2, 16, 2], 0), _x(20, 2, 1))),
        Case("2-8-8-8-3 deep", (_net([2, 8, 8, 8, 3], 1, bias_scale=2.0), _x(20, 2, 2))),
        Case("5-12-10-4 batch of one", (_net([5, 12, 10, 4], 4), _x(1, 5, 5))),
        Case(
            "2-6-2 no hidden ReLU active", (_net([2, 6, 2], 6, bias_scale=0.0), torch.zeros(3, 2))
        ),
    ]


def _affine_equal(expected, actual) -> str | None:
    """The default comparison, plus a pointer to c when A is already right: the bias term is where
    most mistakes hide, and they come in more forms than the list above can name."""
    problem = mismatch(expected, actual, 1e-5, 1e-4)
    right_A = isinstance(actual, tuple) and len(actual) == 2 and len(expected) == 2
    if problem is None or not right_A or mismatch(expected[0], actual[0], 1e-5, 1e-4) is not None:
        return problem
    return (
        f"{problem.rstrip('.')}. A is right, so the bias term c is the problem: each layer's "
        "bias must pass through the masks of every hidden layer after it, exactly as A's rows do "
        "(c_l = W_l (D_{l-1} c_{l-1}) + b_l, starting from c_1 = b_1)."
    )


@exercise("1.3", "local_affine_map")
def local_affine_map(learner) -> str:
    summary = compare_function(
        learner, P.local_affine_map, _affine_cases(), AFFINE_MISTAKES, compare=_affine_equal
    )
    # and the property itself, in float64, on a fresh network: A x + c is the network's output
    model = _net([3, 10, 10, 2], 7).double()
    x = _x(30, 3, 8).double()
    A, c = learner(model, x)
    with torch.no_grad():
        error = ((A @ x[:, :, None]).squeeze(-1) + c - model(x)).abs().max().item()
    if error > 1e-10:
        raise CheckFailed(f"in float64, A x + c differs from model(x) by {error:.3g}.")
    return summary + f"; A x + c = model(x) in float64 to {error:.1e}"


# ---------------------------------------------------------------- 2.1 the arrangement bound


def _integer_equal(
    expected, actual, how: str = "exact integer arithmetic, e.g. math.comb"
) -> str | None:
    if type(expected) is not int:  # a known mistake's output, compared with the learner's
        same = type(actual) is type(expected) and actual == expected
        return None if same else f"got {actual!r}, expected {expected!r}"
    if isinstance(actual, bool) or not isinstance(actual, int):
        return (
            f"return a Python int ({how}), got {type(actual).__name__} {actual!r}; "
            f"expected {expected}"
        )
    if actual != expected:
        return f"got {actual}, expected {expected}"
    return None


def _count_equal(expected, actual) -> str | None:
    return _integer_equal(
        expected, actual, "a count: e.g. `len(...)`, or `.item()` of a 0-d tensor"
    )


def _bound_no_one(n_hyperplanes, d):
    return sum(math.comb(n_hyperplanes, k) for k in range(1, d + 1))


def _bound_to_d_minus_one(n_hyperplanes, d):
    return sum(math.comb(n_hyperplanes, k) for k in range(d))


def _bound_powers(n_hyperplanes, d):
    return sum(n_hyperplanes**k for k in range(d + 1))


def _bound_every_code(n_hyperplanes, d):
    return 2**n_hyperplanes


def _bound_2d_float(n_hyperplanes, d):
    return 1 + n_hyperplanes + n_hyperplanes * (n_hyperplanes - 1) / 2


def _bound_2d_always(n_hyperplanes, d):
    return 1 + n_hyperplanes + n_hyperplanes * (n_hyperplanes - 1) // 2


def _bound_top_term(n_hyperplanes, d):
    return math.comb(n_hyperplanes, d)


BOUND_MISTAKES = [
    Mistake(
        "missing the k = 0 term",
        _bound_no_one,
        "start the sum at k = 0: with no hyperplane at all there is already one region, C(n, 0) = 1.",
    ),
    Mistake(
        "sum stops at d - 1",
        _bound_to_d_minus_one,
        "the sum runs over k = 0, 1, ..., d INCLUSIVE: range(d + 1).",
    ),
    Mistake(
        "n^k instead of C(n, k)",
        _bound_powers,
        "each term is a binomial coefficient C(n, k) (math.comb), not n ** k: in 2-D the last "
        "term counts the n(n-1)/2 PAIRS of lines that meet.",
    ),
    Mistake(
        "2^n (every code)",
        _bound_every_code,
        "not every one of the 2^n codes can be realised: in d dimensions only sum_{k<=d} C(n, k) "
        "regions exist.",
    ),
    Mistake(
        "a float from / 2",
        _bound_2d_float,
        "return an exact int: use math.comb (or // for integer division), never / .",
    ),
    Mistake(
        "the 2-D formula for every d",
        _bound_2d_always,
        "1 + n + n(n-1)/2 holds for d = 2 only: use d, sum_{k=0..d} C(n, k).",
    ),
]


def _bound_cases() -> list[Case]:
    return [
        Case("16 lines in the plane", (16, 2)),
        Case("32 lines in the plane", (32, 2)),
        Case("no hyperplane", (0, 2)),
        Case("7 points on a line", (7, 1)),
        Case("10 planes in 3-D", (10, 3)),
        Case("fewer hyperplanes than dimensions", (3, 5)),
        Case("d = 0", (5, 0)),
    ]


@exercise("2.1", "arrangement_bound")
def arrangement_bound(learner) -> str:
    return compare_function(
        learner, P.arrangement_bound, _bound_cases(), BOUND_MISTAKES, compare=_integer_equal
    )


# ---------------------------------------------------------------- 2.2 count regions


def _count_by_active(codes):
    return int(torch.unique(codes.sum(-1)).shape[0])


def _count_by_float_hash(codes):
    powers = 2.0 ** torch.arange(codes.shape[1], dtype=torch.float32)
    return int(torch.unique(codes.float() @ powers).shape[0])


def _count_values(codes):
    return int(torch.unique(codes).shape[0])


def _count_rows(codes):
    return int(codes.shape[0])


def _count_columns(codes):
    return int(torch.unique(codes, dim=1).shape[1])


def _count_int64_hash(codes):
    powers = 2 ** torch.arange(codes.shape[1], dtype=torch.int64)
    return int(torch.unique((codes.long() * powers).sum(-1)).shape[0])


def _count_one_less(codes):
    return P.count_regions(codes) - 1


def _count_one_more(codes):
    return P.count_regions(codes) + 1


_OFF_BY_ONE = (
    "every distinct code is exactly one region, so the count is the number of distinct rows, "
    "torch.unique(codes, dim=0).shape[0], with no +1 or -1 (that arithmetic belongs to counting "
    "boundaries crossed along a path, exercise 3.1, not to counting regions)."
)

COUNT_MISTAKES = [
    Mistake("one less than the distinct codes", _count_one_less, _OFF_BY_ONE),
    Mistake("one more than the distinct codes", _count_one_more, _OFF_BY_ONE),
    Mistake(
        "counts how many neurons are on",
        _count_by_active,
        "two different codes can have the same number of active neurons: compare whole rows, "
        "e.g. torch.unique(codes, dim=0).",
    ),
    Mistake(
        "hashes the code into a float",
        _count_by_float_hash,
        "a float32 holds 24 bits exactly, so codes that differ only in later neurons tie after "
        "rounding: compare the bool rows themselves (torch.unique(codes, dim=0)), no arithmetic.",
    ),
    Mistake(
        "unique values, not unique rows",
        _count_values,
        "torch.unique(codes) returns the distinct VALUES (False, True); pass dim=0 for distinct rows.",
    ),
    Mistake(
        "one region per point",
        _count_rows,
        "points that share a code share a region: count distinct codes, not points.",
    ),
    Mistake(
        "unique columns",
        _count_columns,
        "a code is a ROW (one per point): torch.unique(codes, dim=0).",
    ),
    Mistake(
        "hashes the code into one int64",
        _count_int64_hash,
        "an int64 holds 63 bits, so a code of more neurons overflows and distinct codes collide: "
        "compare the bool rows themselves (torch.unique(codes, dim=0)).",
    ),
]


def _count_cases() -> list[Case]:
    g = _g(40)
    same_count = torch.tensor([[1, 0, 0, 1], [0, 1, 1, 0], [1, 1, 0, 0], [1, 0, 0, 1]]).bool()
    late_bits = torch.zeros(6, 40, dtype=torch.bool)
    late_bits[:, 0] = True
    late_bits[1, 35] = late_bits[2, 36] = late_bits[3, 35] = late_bits[4, 39] = True
    late_bits[5, 0], late_bits[5, 35] = False, True  # float32(1 + 2**35) == 2**35: a tie
    wide = torch.zeros(8, 130, dtype=torch.bool)
    wide[:, 5] = True
    wide[1, 100] = wide[2, 70] = wide[3, 129] = wide[4, 100] = True
    wide[5, 5], wide[5, 100] = False, True  # float64(2**5 + 2**100) == 2**100: a tie
    many = torch.rand(300, 12, generator=g) < 0.2  # repeats are common
    grid_codes = P.spline_code(_net([2, 16, 16, 2], 0), P.grid_points(-2.5, 3.5, 60)[1])
    return [
        Case("300 random codes of 12 neurons, many repeats", (many,)),
        Case("equal numbers of active neurons", (same_count,)),
        Case("40 neurons, codes differing only past neuron 30", (late_bits,)),
        Case("130 neurons, codes differing only past neuron 63", (wide,)),
        Case("a 2-16-16-2 net on a 60x60 grid", (grid_codes,)),
        Case("one point", (torch.ones(1, 5, dtype=torch.bool),)),
    ]


@exercise("2.2", "count_regions")
def count_regions(learner) -> str:
    return compare_function(
        learner, P.count_regions, _count_cases(), COUNT_MISTAKES, compare=_count_equal
    )


# ---------------------------------------------------------------- 3.1 code changes along a path


def _changes_first_layer(model, x0, x1, n_steps):
    t = torch.linspace(0, 1, n_steps + 1)
    pts = x0[:, None] + t[None, :, None] * (x1 - x0)[:, None]
    codes = P.layer_codes(model, pts.reshape(-1, x0.shape[1]))[0].view(x0.shape[0], n_steps + 1, -1)
    return (codes[:, 1:] != codes[:, :-1]).any(-1).sum(-1)


def _changes_hamming(model, x0, x1, n_steps):
    t = torch.linspace(0, 1, n_steps + 1)
    pts = x0[:, None] + t[None, :, None] * (x1 - x0)[:, None]
    codes = P.spline_code(model, pts.reshape(-1, x0.shape[1])).view(x0.shape[0], n_steps + 1, -1)
    return (codes[:, 1:] != codes[:, :-1]).sum(-1).sum(-1)


def _regions_visited(model, x0, x1, n_steps):
    return P.code_changes_along_path(model, x0, x1, n_steps) + 1


def _n_points(model, x0, x1, n_steps):
    t = torch.linspace(0, 1, n_steps)
    pts = x0[:, None] + t[None, :, None] * (x1 - x0)[:, None]
    codes = P.spline_code(model, pts.reshape(-1, x0.shape[1])).view(x0.shape[0], n_steps, -1)
    return (codes[:, 1:] != codes[:, :-1]).any(-1).sum(-1)


def _last_point_dropped(model, x0, x1, n_steps):
    t = torch.linspace(0, 1, n_steps + 1, dtype=x0.dtype)[:-1]
    pts = x0[:, None] + t[None, :, None] * (x1 - x0)[:, None]
    codes = P.spline_code(model, pts.reshape(-1, x0.shape[1])).view(x0.shape[0], n_steps, -1)
    return (codes[:, 1:] != codes[:, :-1]).any(-1).sum(-1)


def _endpoints_only(model, x0, x1, n_steps):
    return (P.spline_code(model, x0) != P.spline_code(model, x1)).any(-1).long()


PATH_MISTAKES = [
    Mistake(
        "first layer's code only",
        _changes_first_layer,
        "compare the whole spline code (every hidden layer): a deeper neuron can switch while "
        "the first layer's code stays the same.",
    ),
    Mistake(
        "counts flipped neurons (Hamming)",
        _changes_hamming,
        "count the steps at which the code CHANGES (any neuron flips), not how many neurons flip: "
        "with codes shaped [batch, n_steps + 1, n_neurons], "
        "`(codes[:, 1:] != codes[:, :-1]).any(-1).sum(-1)`.",
    ),
    Mistake(
        "regions, not changes",
        _regions_visited,
        "return the number of code changes (boundaries crossed), which is one less than the "
        "number of regions visited.",
    ),
    Mistake(
        "n_steps points instead of n_steps + 1",
        _n_points,
        "n_steps steps need n_steps + 1 points: t = torch.linspace(0, 1, n_steps + 1).",
    ),
    Mistake(
        "last point dropped (t = 1 missing)",
        _last_point_dropped,
        "the path ends at t = 1 (x1 itself): keep all n_steps + 1 points of "
        "torch.linspace(0, 1, n_steps + 1). Dropping the last one ([:-1]) leaves out the final "
        "step, and a boundary crossed there is not counted.",
    ),
    Mistake(
        "compares the endpoints only",
        _endpoints_only,
        "sample the path at every t = k / n_steps and compare consecutive points, not just "
        "the two ends.",
    ),
]


def _path_cases() -> list[Case]:
    deep = _net([2, 8, 8, 8, 2], 1, bias_scale=2.0)
    wide = _net([2, 16, 2], 0)
    digits_like = _net([64, 16, 16, 10], 2)
    return [
        Case("2-16-2 fine", (wide, _x(6, 2, 10), _x(6, 2, 11), 400)),
        Case("2-8-8-8-2 coarse", (deep, _x(6, 2, 12, 3.0), _x(6, 2, 13, 3.0), 7)),
        Case("2-8-8-8-2 fine", (deep, _x(4, 2, 14, 3.0), _x(4, 2, 15, 3.0), 1000)),
        Case("64-d batch of one", (digits_like, _x(1, 64, 16), _x(1, 64, 17), 300)),
        Case("one step", (wide, _x(5, 2, 18), _x(5, 2, 19), 1)),
        Case(
            "float64",
            (
                _net([2, 8, 8, 8, 2], 1, bias_scale=2.0).double(),
                _x(4, 2, 20, 3.0).double(),
                _x(4, 2, 21, 3.0).double(),
                500,
            ),
        ),
    ]


@exercise("3.1", "code_changes_along_path")
def code_changes_along_path(learner) -> str:
    return compare_function(
        learner, P.code_changes_along_path, _path_cases(), PATH_MISTAKES, atol=0, rtol=0
    )


# ---------------------------------------------------------------- 3.2 exact crossings, one layer


def _cross_unclipped(W, b, x0, x1):
    z0, slope = W @ x0 + b, W @ (x1 - x0)
    return torch.sort(-z0 / slope).values


def _cross_unsorted(W, b, x0, x1):
    z0, slope = W @ x0 + b, W @ (x1 - x0)
    t = -z0 / slope
    return t[(t > 0) & (t < 1)]


def _cross_no_bias(W, b, x0, x1):
    return P.hyperplane_crossings(W, torch.zeros_like(b), x0, x1)


def _cross_wrong_direction(W, b, x0, x1):
    z0, slope = W @ x0 + b, W @ x1
    t = -z0 / slope
    return torch.sort(t[(t > 0) & (t < 1)]).values


def _cross_sign(W, b, x0, x1):
    z0, slope = W @ x0 + b, W @ (x1 - x0)
    t = z0 / slope
    return torch.sort(t[(t > 0) & (t < 1)]).values


def _cross_interval(closed_at_0: bool, closed_at_1: bool):
    def crossings(W, b, x0, x1):
        z0, slope = W @ x0 + b, W @ (x1 - x0)
        moving = slope != 0
        t = -z0[moving] / slope[moving]
        inside = (t >= 0 if closed_at_0 else t > 0) & (t <= 1 if closed_at_1 else t < 1)
        return torch.sort(t[inside]).values

    return crossings


_OPEN_INTERVAL = (
    "keep 0 < t < 1 with strict inequalities: a hyperplane through an endpoint (t = 0 or t = 1) "
    "is not crossed inside the segment, the endpoint just lies on it. Test (t > 0) & (t < 1)."
)

CROSS_MISTAKES = [
    Mistake("closed interval 0 <= t <= 1", _cross_interval(True, True), _OPEN_INTERVAL),
    Mistake("half-open interval 0 <= t < 1", _cross_interval(True, False), _OPEN_INTERVAL),
    Mistake("half-open interval 0 < t <= 1", _cross_interval(False, True), _OPEN_INTERVAL),
    Mistake(
        "kept crossings outside the segment",
        _cross_unclipped,
        "keep only 0 < t < 1: the hyperplane can cross the LINE outside the segment.",
    ),
    Mistake(
        "not sorted",
        _cross_unsorted,
        "return the crossings sorted by t (the order the path meets them): torch.sort(...).values.",
    ),
    Mistake(
        "forgot the bias",
        _cross_no_bias,
        "the hyperplane is W_i . x + b_i = 0: z_i(t) = (W_i x0 + b_i) + t W_i (x1 - x0).",
    ),
    Mistake(
        "direction x1 instead of x1 - x0",
        _cross_wrong_direction,
        "the path is x0 + t (x1 - x0): its direction is x1 - x0, not x1.",
    ),
    Mistake(
        "sign of t",
        _cross_sign,
        "solve z_i(t) = 0: t = -(W_i x0 + b_i) / (W_i (x1 - x0)) (mind the minus sign).",
    ),
]


def _cross_cases() -> list[Case]:
    g = _g(20)
    W, b = torch.randn(12, 2, generator=g), torch.randn(12, generator=g)
    W64, b64 = torch.randn(30, 64, generator=g) / 8, torch.randn(30, generator=g) * 0.3
    Wp = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    bp = torch.tensor([-0.5, -0.25, 5.0])
    return [
        Case("12 lines in 2-D", (W, b, torch.tensor([-2.0, -1.5]), torch.tensor([2.5, 1.0]))),
        Case(
            "30 hyperplanes in 64-D",
            (W64, b64, torch.randn(64, generator=g), torch.randn(64, generator=g)),
        ),
        Case(
            "a neuron parallel to the path, one never reached",
            (Wp, bp, torch.tensor([0.0, 0.0]), torch.tensor([1.0, 0.0])),
        ),
        Case(
            "hyperplanes through the endpoints (t = 0 and t = 1 are not inside)",
            (
                torch.tensor([[1.0, 0.0], [-1.0, 0.0], [2.0, 0.0], [1.0, -1.0]]),
                torch.tensor([-1.0, 0.0, -1.0, 0.3]),
                torch.tensor([0.0, 0.0]),
                torch.tensor([1.0, 1.0]),
            ),
        ),
        Case(
            "float64",
            (
                W.double(),
                b.double(),
                torch.tensor([-2.0, -1.5]).double(),
                torch.tensor([2.5, 1.0]).double(),
            ),
        ),
    ]


@exercise("3.2", "hyperplane_crossings")
def hyperplane_crossings(learner) -> str:
    return compare_function(learner, P.hyperplane_crossings, _cross_cases(), CROSS_MISTAKES)


# ---------------------------------------------------------------- 4.1 cluster purity


def _purity_unweighted(labels, clusters):
    scores = []
    for c in clusters.unique():
        members = labels[clusters == c]
        scores.append(members.bincount().max().item() / len(members))
    return sum(scores) / len(scores)


def _purity_inverse(labels, clusters):
    return P.cluster_purity(clusters, labels)


def _purity_matching_ids(labels, clusters):
    return (labels == clusters).float().mean().item()


def _purity_count(labels, clusters):
    return P.cluster_purity(labels, clusters) * labels.shape[0]


def _purity_raw_ids(labels, clusters):
    """Rows of the table indexed by the raw cluster ids: id -1 wraps round to the LAST row."""
    table = torch.zeros(int(clusters.max()) + 1, int(labels.max()) + 1, dtype=torch.int64)
    table.index_put_((clusters, labels), torch.ones_like(labels), accumulate=True)
    return table.max(dim=1).values.sum().item() / labels.shape[0]


def _purity_noise_dropped(labels, clusters):
    """Leaves the points of cluster -1 out altogether (numerator and denominator)."""
    kept = clusters >= 0
    return P.cluster_purity(labels[kept], clusters[kept])


def _purity_noise_counted_wrong(labels, clusters):
    """Counts every point of cluster -1 as impure (left out of the numerator only)."""
    kept = clusters >= 0
    return P.cluster_purity(labels[kept], clusters[kept]) * kept.sum().item() / labels.shape[0]


_NOISE = (
    "cluster ids are names, and -1 (DBSCAN's name for its noise points) is one more cluster like "
    "any other: keep its points and give it its own majority label. Before using ids as indices, "
    "map them to 0..k-1 with torch.unique(clusters, return_inverse=True); a raw -1 index wraps "
    "round to the last row."
)

PURITY_MISTAKES = [
    Mistake("id -1 used as an index", _purity_raw_ids, _NOISE),
    Mistake("noise points (-1) left out", _purity_noise_dropped, _NOISE),
    Mistake("noise points (-1) counted as impure", _purity_noise_counted_wrong, _NOISE),
    Mistake(
        "average over clusters, not points",
        _purity_unweighted,
        "weight each cluster by its size: sum the majority counts over clusters, then divide by "
        "the number of POINTS (a 1-point cluster should not count as much as a 100-point one).",
    ),
    Mistake(
        "labels and clusters swapped",
        _purity_inverse,
        "for each CLUSTER take its most common label (not for each label its most common "
        "cluster): purity(labels, clusters).",
    ),
    Mistake(
        "cluster id equals label",
        _purity_matching_ids,
        "cluster ids are arbitrary names: cluster 3 need not hold the digit 3. Count, in each "
        "cluster, how many points carry its majority label.",
    ),
    Mistake(
        "a count, not a fraction",
        _purity_count,
        "divide by the number of points: purity is a fraction in (0, 1].",
    ),
]


def _purity_cases() -> list[Case]:
    g = _g(30)
    labels = torch.randint(0, 10, (200,), generator=g)
    noisy = torch.where(
        torch.rand(200, generator=g) < 0.7, labels, torch.randint(0, 10, (200,), generator=g)
    )
    sizes = torch.tensor([0] * 50 + [1] * 3 + [2] * 7)
    lab_sizes = torch.tensor([0] * 30 + [1] * 20 + [1, 1, 2] + [2] * 7)
    return [
        Case("noisy copy of the labels, permuted ids", (labels, (noisy * 7 + 3) % 10)),
        Case("unequal cluster sizes, ids 0..2", (lab_sizes, sizes)),
        Case("one cluster", (labels, torch.zeros(200, dtype=torch.int64))),
        Case("every point its own cluster", (labels[:40], torch.arange(40) * 5 + 100)),
        Case(
            "a noise cluster with id -1 (as DBSCAN names it)",
            (torch.arange(60) % 4, torch.arange(60) % 4 - 1),
        ),
        Case(
            "a mixed noise cluster -1 beside clean clusters",
            (torch.arange(60) % 4, torch.where(torch.arange(60) < 20, -1, torch.arange(60) % 4)),
        ),
    ]


@exercise("4.1", "cluster_purity")
def cluster_purity(learner) -> str:
    return compare_function(
        # float32 arithmetic is a correct answer (0.6499999761581421 for 0.65); every mistake
        # moves the purity by at least 1 / n_points
        learner,
        P.cluster_purity,
        _purity_cases(),
        PURITY_MISTAKES,
        atol=1e-6,
        rtol=0,
    )
