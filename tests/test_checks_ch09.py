"""Every chapter-09 check passes the reference and other correct answers, flags the stub, and
rejects known wrong answers."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from course_utils.checks import ch09 as check
from course_utils.checks.core import FAILED, PASSED, outcome
from course_utils.science import polytopes as P
from tests.check_contract import contract_tests

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest.py


# ------------------------------------------------------------- extra wrong answers


def _codes_of_a_shifted_input(model, x):
    return [c for c in P.layer_codes(model, x + 1e-3)]  # a shifted input: wrong codes near edges


def _codes_float(model, x):
    return [c.float() for c in P.layer_codes(model, x)]


def _affine_no_bias_at_all(model, x):
    A, c = P.local_affine_map(model, x)
    return A, torch.zeros_like(c)


def _changes_per_unit_length(model, x0, x1, n_steps):
    return P.code_changes_along_path(model, x0, x1, n_steps) / (x1 - x0).norm(dim=-1)


def _crossings_points(W, b, x0, x1):
    t = P.hyperplane_crossings(W, b, x0, x1)
    return x0 + t[:, None] * (x1 - x0)


def _purity_of_biggest_cluster(labels, clusters):
    biggest = clusters.bincount().argmax() if clusters.min() >= 0 else clusters[0]
    members = labels[clusters == biggest]
    return members.bincount().max().item() / members.shape[0]


def _bound_pairs_with_self(n_hyperplanes, d):
    """Counts ordered pairs: 1 + n + n(n-1) in 2-D."""
    return sum(math.perm(n_hyperplanes, k) for k in range(d + 1))


def _count_by_popcount_and_first(codes):
    """Hashes a code by (number on, first neuron on): different codes can tie."""
    first = codes.long().argmax(-1)
    return int(torch.unique(codes.sum(-1) * 1000 + first).shape[0])


# (check, reference, mistakes, an extra wrong answer not in the mistakes list)
CHECKS = [
    (check.layer_codes, P.layer_codes, check.CODE_MISTAKES, _codes_float),
    (
        check.spline_code,
        P.spline_code,
        check.SPLINE_MISTAKES,
        lambda model, x: torch.cat([c.flip(-1) for c in P.layer_codes(model, x)], dim=-1),
    ),
    (check.local_affine_map, P.local_affine_map, check.AFFINE_MISTAKES, _affine_no_bias_at_all),
    (
        check.code_changes_along_path,
        P.code_changes_along_path,
        check.PATH_MISTAKES,
        _changes_per_unit_length,
    ),
    (check.hyperplane_crossings, P.hyperplane_crossings, check.CROSS_MISTAKES, _crossings_points),
    (check.cluster_purity, P.cluster_purity, check.PURITY_MISTAKES, _purity_of_biggest_cluster),
    (check.arrangement_bound, P.arrangement_bound, check.BOUND_MISTAKES, _bound_pairs_with_self),
    (check.count_regions, P.count_regions, check.COUNT_MISTAKES, _count_by_popcount_and_first),
]

# ------------------------------------------------------------- a second correct answer each


def _codes_by_forward_hooks(model, x):
    """Correct, differently: record each ReLU's input with forward hooks, then remove them."""
    seen = []
    handles = [
        m.register_forward_hook(lambda mod, inp, out: seen.append(inp[0] > 0))
        for m in model
        if isinstance(m, nn.ReLU)
    ]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return seen


def _codes_from_activations(model, x):
    """Correct: ReLU(z) > 0 exactly when z > 0."""
    out, h = [], x
    for m in model:
        h = m(h)
        if isinstance(m, nn.ReLU):
            out.append(h > 0)
    return out


def _spline_by_hooks(model, x):
    return torch.cat(_codes_by_forward_hooks(model, x), dim=1)


def _spline_from_activations(model, x):
    return torch.cat(_codes_from_activations(model, x), -1)


def _affine_by_jacobian(model, x):
    """Correct: A is the Jacobian at x (the map is affine around x), c = f(x) - A x."""
    A = torch.func.vmap(torch.func.jacrev(lambda p: model(p[None])[0]))(x)
    with torch.no_grad():
        c = model(x) - (A @ x[:, :, None]).squeeze(-1)
    return A.detach(), c


def _affine_by_masked_weights(model, x):
    """Correct: loop over points, fold each mask into the weights."""
    layers = P.linear_layers(model)
    codes = P.layer_codes(model, x)
    As, cs = [], []
    for i in range(x.shape[0]):
        A, c = layers[0].weight, layers[0].bias
        for code, layer in zip(codes, layers[1:], strict=False):
            D = torch.diag(code[i].to(A.dtype))
            A, c = layer.weight @ D @ A, layer.weight @ D @ c + layer.bias
        As.append(A)
        cs.append(c)
    return torch.stack(As).detach(), torch.stack(cs).detach()


def _changes_by_unique(model, x0, x1, n_steps):
    """Correct: spline-code regions are convex, so a straight path never re-enters one and the
    number of changes is (distinct codes visited) - 1."""
    t = torch.linspace(0, 1, n_steps + 1)
    out = []
    for a, b in zip(x0, x1, strict=False):
        codes = P.spline_code(model, a + t[:, None] * (b - a))
        out.append(torch.unique(codes, dim=0).shape[0] - 1)
    return torch.tensor(out)


def _changes_raw_layers(model, x0, x1, n_steps):
    """Correct, as the notebook writes it: its own codes from the raw layers (no dtype casting),
    with a float32 t that promotes to float64 inputs."""
    t = torch.linspace(0, 1, n_steps + 1)
    h = (x0[:, None, :] + t[None, :, None] * (x1 - x0)[:, None, :]).reshape(-1, x0.shape[1])
    codes = []
    with torch.no_grad():
        for layer in P.linear_layers(model)[:-1]:
            z = layer(h)
            codes.append(z > 0)
            h = torch.relu(z)
    codes = torch.cat(codes, -1).view(x0.shape[0], n_steps + 1, -1)
    return (codes[:, 1:] != codes[:, :-1]).any(-1).sum(-1)


def _changes_loop(model, x0, x1, n_steps):
    out = []
    for a, b in zip(x0, x1, strict=False):
        prev, n = None, 0
        for k in range(n_steps + 1):
            code = P.spline_code(model, (a + (k / n_steps) * (b - a))[None])[0]
            if prev is not None and not torch.equal(prev, code):
                n += 1
            prev = code
        out.append(n)
    return torch.tensor(out)


def _crossings_loop(W, b, x0, x1):
    ts = []
    for w, bias in zip(W, b, strict=False):
        denom = torch.dot(w, x1 - x0)
        if denom == 0:
            continue
        t = -(torch.dot(w, x0) + bias) / denom
        if 0 < t < 1:
            ts.append(t)
    return torch.stack(sorted(ts)) if ts else torch.zeros(0)


def _crossings_where(W, b, x0, x1):
    z0, z1 = W @ x0 + b, W @ x1 + b
    crosses = (z0 > 0) != (z1 > 0)
    t = z0[crosses] / (z0[crosses] - z1[crosses])
    return t.sort().values


def _purity_loop(labels, clusters):
    total = 0
    for c in set(clusters.tolist()):
        members = labels[clusters == c].tolist()
        total += max(members.count(v) for v in set(members))
    return total / len(labels)


def _purity_float32(labels, clusters):
    """A newcomer's float32 fraction (0.6499999761581421 for 0.65) is right; it was refused."""
    total = torch.zeros((), dtype=torch.float32)
    for c in clusters.unique():
        total += labels[clusters == c].bincount().max().float()
    return float(total / len(labels))


def _purity_sklearn(labels, clusters):
    from sklearn.metrics.cluster import contingency_matrix

    table = contingency_matrix(labels.numpy(), clusters.numpy())
    return float(table.max(axis=0).sum() / table.sum())


def _bound_recursive(n_hyperplanes, d):
    """Correct: adding one hyperplane splits the regions its own (d-1)-D arrangement makes."""
    if d == 0 or n_hyperplanes == 0:
        return 1
    return _bound_recursive(n_hyperplanes - 1, d) + _bound_recursive(n_hyperplanes - 1, d - 1)


def _bound_pascal_row(n_hyperplanes, d):
    """Correct: the first d + 1 entries of Pascal's row n, built by integer products."""
    total, term = 0, 1
    for k in range(min(d, n_hyperplanes) + 1):
        total += term
        term = term * (n_hyperplanes - k) // (k + 1)
    return total


def _count_set_of_tuples(codes):
    return len({tuple(row) for row in codes.tolist()})


def _count_sorted_rows(codes):
    """Correct: sort the rows as bytes and count where neighbours differ."""
    rows = sorted(bytes(row) for row in codes.to(torch.uint8).tolist())
    return 1 + sum(a != b for a, b in zip(rows, rows[1:], strict=False)) if rows else 0


CORRECT = {
    check.layer_codes: [_codes_by_forward_hooks, _codes_from_activations],
    check.spline_code: [_spline_by_hooks, _spline_from_activations],
    check.local_affine_map: [_affine_by_jacobian, _affine_by_masked_weights],
    check.code_changes_along_path: [_changes_by_unique, _changes_loop, _changes_raw_layers],
    check.hyperplane_crossings: [_crossings_loop, _crossings_where],
    check.cluster_purity: [_purity_loop, _purity_sklearn, _purity_float32],
    check.arrangement_bound: [_bound_recursive, _bound_pascal_row],
    check.count_regions: [_count_set_of_tuples, _count_sorted_rows],
}


# ------------------------------------------------- wrong answers a learner writes (issue 13)


def _codes_sigmoid_half(model, x):
    """Thresholds the ReLU OUTPUT at a small positive value: misses barely-on neurons."""
    out, h = [], x
    for layer in P.linear_layers(model)[:-1]:
        h = torch.relu(layer(h))
        out.append(h > 1e-2)
    return out


def _codes_input_not_relu(model, x):
    """Feeds the next layer the codes (0/1) instead of the activations."""
    out, h = [], x
    for layer in P.linear_layers(model)[:-1]:
        z = layer(h)
        out.append(z > 0)
        h = (z > 0).to(z.dtype)
    return out


def _spline_stack_not_cat(model, x):
    return torch.stack([c.any(-1) for c in P.layer_codes(model, x)], dim=-1)


def _spline_thresholded_output(model, x):
    return torch.cat(_codes_sigmoid_half(model, x), dim=-1)


def _affine_first_layer_only(model, x):
    layers = P.linear_layers(model)
    W, b = layers[0].weight, layers[0].bias
    return W.expand(x.shape[0], -1, -1).detach(), b.expand(x.shape[0], -1).detach()


def _affine_mask_after_weight(model, x):
    """Masks the rows of the NEXT layer's output instead of the current layer's."""
    layers = P.linear_layers(model)
    codes = P.layer_codes(model, x)
    A = layers[0].weight.expand(x.shape[0], -1, -1)
    c = layers[0].bias.expand(x.shape[0], -1)
    for code, layer in zip(codes, layers[1:], strict=True):
        A = layer.weight @ A
        c = c @ layer.weight.T + layer.bias
        if A.shape[1] == code.shape[1]:
            A = A * code[:, :, None]
            c = c * code
    return A.detach(), c.detach()


def _changes_linspace_n_steps_minus_one(model, x0, x1, n_steps):
    return P.code_changes_along_path(model, x0, x1, max(n_steps - 1, 1))


def _changes_total_over_batch(model, x0, x1, n_steps):
    return P.code_changes_along_path(model, x0, x1, n_steps).sum().expand(x0.shape[0])


def _crossings_closed_interval(W, b, x0, x1):
    z0, slope = W @ x0 + b, W @ (x1 - x0)
    moving = slope != 0
    t = -z0[moving] / slope[moving]
    return torch.sort(t[(t >= 0) & (t <= 1)]).values


def _crossings_descending(W, b, x0, x1):
    return P.hyperplane_crossings(W, b, x0, x1).flip(0)


def _purity_mode_of_all(labels, clusters):
    return (labels == labels.mode().values).float().mean().item()


def _purity_n_clusters(labels, clusters):
    total = 0
    for c in clusters.unique():
        total += labels[clusters == c].bincount().max().item()
    return total / clusters.unique().numel() / 100


def _codes_with_tolerance(model, x):
    """Treats |z| < 1e-6 as a tie broken towards off: wrong for tiny but positive pre-activations."""
    out, h = [], x
    for layer in P.linear_layers(model)[:-1]:
        z = layer(h)
        out.append(z > 1e-6)
        h = torch.relu(z)
    return out


def _bound_off_by_one_top(n_hyperplanes, d):
    return sum(math.comb(n_hyperplanes, k) for k in range(d + 2))


def _bound_one_plus_n_squared(n_hyperplanes, d):
    return 1 + n_hyperplanes + n_hyperplanes**2 // 2


def _bound_numpy_int(n_hyperplanes, d):
    import numpy as np

    return np.int64(sum(math.comb(n_hyperplanes, k) for k in range(d + 1)))


def _purity_table_by_raw_ids(labels, clusters):
    """Indexes a contingency table by the raw cluster ids: id -1 lands in the LAST row."""
    table = torch.zeros(int(clusters.max()) + 1, int(labels.max()) + 1, dtype=torch.int64)
    table.index_put_((clusters, labels), torch.ones_like(labels), accumulate=True)
    return table.max(dim=1).values.sum().item() / labels.shape[0]


def _count_float64_hash(codes):
    """float64 holds 53 bits: codes past neuron 53 tie."""
    powers = 2.0 ** torch.arange(codes.shape[1], dtype=torch.float64)
    return int(torch.unique(codes.double() @ powers).shape[0])


def _count_unique_consecutive(codes):
    """unique_consecutive only merges neighbours: repeats that are not adjacent count twice."""
    return int(torch.unique_consecutive(codes, dim=0).shape[0])


def _count_minus_one(codes):
    return int(torch.unique(codes, dim=0).shape[0]) - 1


WRONG = {
    check.layer_codes: [
        _codes_with_tolerance,
        _codes_sigmoid_half,
        _codes_input_not_relu,
        _codes_of_a_shifted_input,
        _codes_float,
    ],  # fmt: skip
    check.spline_code: [_spline_stack_not_cat, _spline_thresholded_output, CHECKS[1][3]],
    check.local_affine_map: [
        _affine_first_layer_only,
        _affine_mask_after_weight,
        _affine_no_bias_at_all,
    ],  # fmt: skip
    check.code_changes_along_path: [
        _changes_linspace_n_steps_minus_one,
        _changes_total_over_batch,
        _changes_per_unit_length,
    ],  # fmt: skip
    check.hyperplane_crossings: [
        _crossings_closed_interval,
        _crossings_descending,
        _crossings_points,
    ],  # fmt: skip
    check.cluster_purity: [
        _purity_mode_of_all,
        _purity_n_clusters,
        _purity_of_biggest_cluster,
        _purity_table_by_raw_ids,
    ],
    check.arrangement_bound: [_bound_off_by_one_top, _bound_one_plus_n_squared, _bound_numpy_int],
    check.count_regions: [_count_float64_hash, _count_unique_consecutive, _count_minus_one],
}
contract_tests(check, CHECKS, globals(), correct=CORRECT, wrong=WRONG)


def test_hooks_left_behind_do_not_matter_but_are_not_left_by_the_alternative():
    model = P.make_mlp([2, 4, 2])
    _codes_by_forward_hooks(model, torch.zeros(1, 2))
    assert all(not m._forward_hooks for m in model)


def test_shifted_codes_are_rejected():
    status, _ = outcome(check.layer_codes, _codes_of_a_shifted_input)
    assert status == FAILED


def test_affine_check_rejects_an_answer_right_in_float32_only():
    """The float64 property test catches a map built in float32 inside."""

    def float32_inside(model, x):
        A, c = P.local_affine_map(model.float(), x.float())
        model.to(x.dtype)
        return A.to(x.dtype), c.to(x.dtype)

    status, message = outcome(check.local_affine_map, float32_inside)
    assert status == FAILED and "float64" in message


def test_a_tensor_count_is_told_how_to_return_an_int_not_about_math_comb():
    status, message = outcome(
        check.count_regions,
        lambda codes: torch.unique(codes, dim=0).shape[0] * torch.ones((), dtype=torch.int64),
    )
    assert status == FAILED and "return a Python int" in message
    assert "math.comb" not in message and ".item()" in message


# ------------------------- mistakes a newcomer met without a hint (browser run, issue 26)


def _affine_bias_masked_at_the_first_layer_only(model, x):
    """Masks the propagated bias after hidden layer 1 only: right for one hidden layer."""
    layers, codes = P.linear_layers(model), P.layer_codes(model, x)
    A = layers[0].weight.expand(x.shape[0], -1, -1)
    c = layers[0].bias.expand(x.shape[0], -1)
    for i, (code, layer) in enumerate(zip(codes, layers[1:], strict=True)):
        mask = code.to(A.dtype)
        A = layer.weight @ (mask[:, :, None] * A)
        c = (mask * c if i == 0 else c) @ layer.weight.T + layer.bias
    return A.detach(), c.detach()


def _affine_bias_added_after_the_mask(model, x):
    """Builds A and c from the identity; adds each hidden bias after masking, so it leaks."""
    layers, codes = P.linear_layers(model), P.layer_codes(model, x)
    A = torch.eye(x.shape[1], dtype=x.dtype).expand(x.shape[0], -1, -1)
    c = torch.zeros_like(x)
    for code, layer in zip(codes, layers[:-1], strict=True):
        mask = code.to(x.dtype)
        A = mask[:, :, None] * (layer.weight @ A)
        c = mask * (c @ layer.weight.T) + layer.bias
    return (layers[-1].weight @ A).detach(), (c @ layers[-1].weight.T + layers[-1].bias).detach()


@pytest.mark.parametrize(
    "wrong", [_affine_bias_masked_at_the_first_layer_only, _affine_bias_added_after_the_mask]
)
def test_a_right_A_with_a_wrong_bias_is_pointed_at_c(wrong):
    status, message = outcome(check.local_affine_map, wrong)
    assert status == FAILED and "A is right, so the bias term c is the problem" in message


def test_a_wrong_A_is_not_told_that_A_is_right():
    status, message = outcome(check.local_affine_map, check._affine_transposed)
    assert status == FAILED and "A is right" not in message


@pytest.mark.parametrize("shift", [-1, 1])
def test_an_off_by_one_region_count_is_named(shift):
    status, message = outcome(
        check.count_regions, lambda codes: int(torch.unique(codes, dim=0).shape[0]) + shift
    )
    assert status == FAILED and "no +1 or -1" in message


@pytest.mark.parametrize("closed", [(True, True), (True, False), (False, True)])
def test_a_closed_or_half_open_interval_is_named(closed):
    status, message = outcome(check.hyperplane_crossings, check._cross_interval(*closed))
    assert status == FAILED and "strict inequalities" in message


@pytest.mark.parametrize(
    "wrong",
    [_purity_table_by_raw_ids, check._purity_noise_dropped, check._purity_noise_counted_wrong],
)
def test_the_noise_cluster_mistakes_are_named(wrong):
    status, message = outcome(check.cluster_purity, wrong)
    assert status == FAILED and "-1 (DBSCAN's name for its noise points)" in message


# ------------- a mistake a newcomer met without a hint (chapter-04 browser run, finding G)


def _changes_t_one_dropped(model, x0, x1, n_steps):
    t = torch.linspace(0, 1, n_steps + 1)[:-1]  # drops t = 1
    points = x0[:, None, :] + t[None, :, None] * (x1 - x0)[:, None, :]
    codes = P.spline_code(model, points.reshape(-1, x0.shape[1])).view(len(x0), len(t), -1)
    return (codes[:, 1:] != codes[:, :-1]).any(-1).sum(-1)


def _changes_arange_over_n(model, x0, x1, n_steps):
    t = torch.arange(n_steps, dtype=x0.dtype) / n_steps  # 0 .. (n-1)/n: t = 1 missing too
    points = x0[:, None, :] + t[None, :, None] * (x1 - x0)[:, None, :]
    codes = P.spline_code(model, points.reshape(-1, x0.shape[1])).view(len(x0), n_steps, -1)
    return (codes[:, 1:] != codes[:, :-1]).any(-1).sum(-1)


def _changes_arange_inclusive(model, x0, x1, n_steps):
    """Right: t = k / n_steps for k = 0 .. n_steps, both ends included."""
    t = torch.arange(n_steps + 1, dtype=x0.dtype) / n_steps
    points = x0[:, None, :] + t[None, :, None] * (x1 - x0)[:, None, :]
    codes = P.spline_code(model, points.reshape(-1, x0.shape[1])).view(len(x0), n_steps + 1, -1)
    return (codes[:, 1:] != codes[:, :-1]).any(-1).sum(-1)


@pytest.mark.parametrize("wrong", [_changes_t_one_dropped, _changes_arange_over_n])
def test_a_path_without_its_last_point_is_named(wrong):
    status, message = outcome(check.code_changes_along_path, wrong)
    assert status == FAILED and "the path ends at t = 1" in message, message


@pytest.mark.parametrize("right", [_changes_arange_inclusive, _changes_by_unique])
def test_a_path_with_both_ends_passes(right):
    assert outcome(check.code_changes_along_path, right) == (PASSED, "")
