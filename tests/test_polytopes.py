"""course_utils.science.polytopes: codes, local affine maps, region counts, exact crossings, bad input."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from course_utils.science import polytopes as P

pytestmark = pytest.mark.usefixtures("one_thread")


def _points(n: int, d: int, seed: int, scale: float = 1.5) -> torch.Tensor:
    return (
        torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        * scale
    )


@pytest.mark.parametrize("sizes", [[2, 16, 2], [2, 16, 16, 2], [2, 8, 8, 8, 2], [64, 20, 10]])
def test_local_affine_map_reproduces_the_network_in_float64(sizes):
    model = P.make_mlp(sizes, seed=3).double()
    x = _points(200, sizes[0], 0)
    A, c = P.local_affine_map(model, x)
    with torch.no_grad():
        assert ((A @ x[:, :, None]).squeeze(-1) + c - model(x)).abs().max() < 1e-10


def test_local_affine_map_is_the_jacobian():
    model = P.make_mlp([3, 7, 5, 2], seed=1).double()
    x = _points(5, 3, 1)
    A, _ = P.local_affine_map(model, x)
    for i in range(5):
        J = torch.autograd.functional.jacobian(lambda p: model(p[None])[0], x[i])
        assert torch.allclose(A[i], J, atol=1e-12)


def test_codes_and_spline_code_shapes_and_convention():
    model = P.make_mlp([2, 4, 3, 2], seed=0)
    with torch.no_grad():
        for layer in model:
            if isinstance(layer, nn.Linear):
                layer.bias.zero_()
    codes = P.layer_codes(model, torch.zeros(2, 2))
    assert [c.shape for c in codes] == [(2, 4), (2, 3)]
    assert not any(c.any() for c in codes)  # pre-activation exactly 0 counts as off
    assert P.spline_code(model, torch.zeros(1, 2)).shape == (1, 7)


def test_region_ids_and_counts():
    codes = torch.tensor([[1, 0, 1], [1, 0, 1], [0, 0, 0], [1, 1, 1]], dtype=torch.bool)
    ids = P.region_ids(codes)
    assert ids[0] == ids[1] and len(set(ids.tolist())) == 3
    assert P.count_regions(codes) == 3
    wide = torch.zeros(3, 130, dtype=torch.bool)
    wide[1, 129] = True  # differs only in the third 62-bit word
    wide[2, 0] = True
    assert P.count_regions(wide) == 3


def test_arrangement_bound():
    assert P.arrangement_bound(16, 2) == 137
    assert P.arrangement_bound(3, 2) == 7
    assert P.arrangement_bound(3, 5) == 8  # fewer hyperplanes than dimensions: 2^n
    assert P.arrangement_bound(0, 2) == 1


def test_one_layer_region_count_equals_the_bound_on_a_large_window():
    """Lines in general position whose intersections all lie in the window: exactly 1+n+C(n,2)."""
    W = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [1.0, -0.5]])
    b = torch.tensor([0.1, -0.2, 0.3, 0.05])
    model = nn.Sequential(nn.Linear(2, 4), nn.ReLU(), nn.Linear(4, 2))
    with torch.no_grad():
        model[0].weight.copy_(W)
        model[0].bias.copy_(b)
    ids, n = P.region_map(model, -3, 3, 600)
    assert n == P.arrangement_bound(4, 2) == 11
    assert ids.shape == (600, 600)


def test_sampled_changes_never_exceed_exact_and_converge():
    model = P.make_mlp([2, 8, 8, 2], seed=2)
    x0, x1 = _points(10, 2, 3).float(), _points(10, 2, 4).float()
    exact = torch.tensor([len(P.line_crossings(model, a, b)) for a, b in zip(x0, x1, strict=False)])
    coarse = P.code_changes_along_path(model, x0, x1, 20)
    fine = P.code_changes_along_path(model, x0, x1, 20000)
    assert (coarse <= fine).all() and (fine <= exact).all()
    assert fine.sum() >= exact.sum() - 1


def test_line_crossings_matches_hyperplane_crossings_for_one_layer():
    model = P.make_mlp([5, 12, 3], seed=4)
    a, b = _points(1, 5, 5)[0].float(), _points(1, 5, 6)[0].float()
    exact = P.line_crossings(model, a, b)
    one = P.hyperplane_crossings(
        model[0].weight.detach().double(), model[0].bias.detach().double(), a.double(), b.double()
    )
    assert torch.allclose(exact, one, atol=1e-7)


def test_line_crossings_lie_on_boundaries():
    model = P.make_mlp([2, 6, 6, 6, 2], seed=5).double()
    a, b = (
        torch.tensor([-2.0, -1.0], dtype=torch.float64),
        torch.tensor([2.5, 1.5], dtype=torch.float64),
    )
    ts = P.line_crossings(model, a, b)
    assert len(ts) > 3 and (ts[1:] > ts[:-1]).all()
    for t in ts:
        before = P.spline_code(model, (a + (t - 1e-7) * (b - a))[None])
        after = P.spline_code(model, (a + (t + 1e-7) * (b - a))[None])
        assert (before != after).any()


def test_no_bias_means_scaling_never_changes_the_code():
    model = P.make_mlp([4, 10, 10, 3], seed=6, bias=False)
    x = _points(20, 4, 7).float()
    for a in (0.01, 0.5, 3.0, 100.0):
        assert torch.equal(P.spline_code(model, a * x), P.spline_code(model, x))


def test_hyperplane_crossings_parallel_and_empty():
    W = torch.tensor([[0.0, 1.0]])
    assert (
        P.hyperplane_crossings(
            W, torch.tensor([0.5]), torch.zeros(2), torch.tensor([1.0, 0])
        ).numel()
        == 0
    )


def test_cluster_purity_values():
    labels = torch.tensor([0, 0, 1, 1, 1, 2])
    assert P.cluster_purity(labels, torch.tensor([5, 5, 5, 9, 9, 9])) == pytest.approx(4 / 6)
    assert P.cluster_purity(labels, torch.zeros(6, dtype=torch.int64)) == pytest.approx(3 / 6)
    assert P.cluster_purity(labels, torch.arange(6)) == 1.0
    with pytest.raises(ValueError, match="same length"):
        P.cluster_purity(labels, torch.zeros(5, dtype=torch.int64))


def test_train_classifier_learns_moons_and_keeps_checkpoints():
    X, y = P.moons(200, noise=0.1, seed=0)
    model = P.make_mlp([2, 16, 2], seed=0)
    run = P.train_classifier(model, X, y, epochs=60, seed=0, checkpoints=[0, 30])
    assert run["accuracy"] > 0.9 and set(run["states"]) == {0, 30}
    assert run["loss"][-1] < run["loss"][0]


def test_digits_split():
    X_train, X_test, y_train, y_test = P.digits()
    assert X_train.shape == (1347, 64) and X_test.shape == (450, 64)
    assert 0 <= X_train.min() and X_train.max() <= 1
    assert torch.equal(torch.bincount(y_test).clamp(max=1), torch.ones(10, dtype=torch.int64))


# ----------------------------------------------------------------------------- bad input


def test_smooth_activation_is_refused_with_a_pointer_to_sign_codes():
    gelu = nn.Sequential(nn.Linear(2, 4), nn.GELU(), nn.Linear(4, 2))
    with pytest.raises(P.NotPiecewiseLinearError, match="sign_codes"):
        P.layer_codes(gelu, torch.zeros(1, 2))
    with pytest.raises(TypeError, match="ReLU"):
        P.local_affine_map(
            nn.Sequential(nn.Linear(2, 4), nn.LeakyReLU(), nn.Linear(4, 2)), torch.zeros(1, 2)
        )
    assert torch.equal(
        P.sign_codes(torch.tensor([-1.0, 0.0, 2.0])), torch.tensor([False, False, True])
    )


def test_wrong_dimension_and_wrong_structure_are_refused():
    model = P.make_mlp([2, 4, 2])
    with pytest.raises(ValueError, match=r"\[batch, 2\]"):
        P.spline_code(model, torch.zeros(3, 5))
    with pytest.raises(ValueError, match="single point is x\\[None\\]"):
        P.spline_code(model, torch.zeros(2))
    with pytest.raises(ValueError, match="one point"):
        P.line_crossings(model, torch.zeros(1, 2), torch.ones(1, 2))
    with pytest.raises(TypeError, match="nn.Sequential"):
        P.layer_codes(nn.Linear(2, 2), torch.zeros(1, 2))
    with pytest.raises(TypeError, match="end with an nn.Linear"):
        P.layer_codes(nn.Sequential(nn.Linear(2, 2), nn.ReLU()), torch.zeros(1, 2))
    with pytest.raises(ValueError, match="2-D"):
        P.region_map(P.make_mlp([3, 4, 2]), -1, 1, 10)
    with pytest.raises(ValueError, match="sizes"):
        P.make_mlp([2])


def test_too_fine_a_grid_is_refused_before_allocating():
    model = P.make_mlp([2, 64, 64, 2])
    with pytest.raises(MemoryError, match="resolution of at most"):
        P.region_map(model, -1, 1, 100_000)
    limit = int(math.sqrt(P.MAX_GRID_BYTES / ((128 + 4) * 8)))
    assert limit > 300
