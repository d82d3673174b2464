"""course_utils.science.toy_models and plots_superposition: behaviour and clear errors on bad input."""

from __future__ import annotations

import math

import pytest
import torch

from course_utils.science import plots_superposition as plots
from course_utils.science import toy_models as tm

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest.py


# ------------------------------------------------------------------ data


def test_generate_batch_statistics_per_instance():
    g = torch.Generator().manual_seed(0)
    x = tm.generate_batch(40_000, torch.tensor([1.0, 0.5, 0.05]), 3, 4, generator=g)
    assert x.shape == (40_000, 3, 4) and x.min() >= 0 and x.max() <= 1
    density = (x != 0).float().mean((0, 2))
    assert torch.allclose(density, torch.tensor([1.0, 0.5, 0.05]), atol=0.01)


def test_correlated_and_anticorrelated_pairs():
    g = torch.Generator().manual_seed(0)
    c = tm.generate_correlated_batch(20_000, 0.3, 2, 3, generator=g)
    assert c.shape == (20_000, 2, 6)
    assert torch.equal(c[..., 0::2] != 0, c[..., 1::2] != 0)
    a = tm.generate_anticorrelated_batch(20_000, 0.3, 2, 3, generator=g)
    assert not ((a[..., 0::2] != 0) & (a[..., 1::2] != 0)).any()
    assert abs((a != 0).float().mean().item() - 0.3) < 0.01


def test_generate_batch_is_seedable():
    a = tm.generate_batch(8, 0.5, 2, 3, generator=torch.Generator().manual_seed(1))
    b = tm.generate_batch(8, 0.5, 2, 3, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)


@pytest.mark.parametrize("p", [0.0, -0.1, 1.5, float("nan")])
def test_sparsity_outside_range_is_rejected(p):
    with pytest.raises(ValueError, match=r"sparsity S in \[0, 1\)"):
        tm.generate_batch(4, p, 2, 3)


def test_per_instance_probability_of_wrong_length():
    with pytest.raises(ValueError, match=r"shape \[n_instances\] = \[3\], got shape \(2,\)"):
        tm.generate_batch(4, torch.tensor([0.5, 0.5]), 3, 3)


@pytest.mark.parametrize("arg", [0, -1, 2.5, True])
def test_counts_must_be_positive_ints(arg):
    with pytest.raises(ValueError, match="must be an int >= 1"):
        tm.generate_batch(arg, 0.5, 2, 3)


def test_anticorrelated_needs_density_at_most_half():
    with pytest.raises(ValueError, match="<= 0.5"):
        tm.generate_anticorrelated_batch(4, 0.6, 1, 2)


# ------------------------------------------------------------------ models and loss


def test_toy_model_forward_matches_formula():
    torch.manual_seed(0)
    model = tm.ToyModel(3, 5, 2)
    with torch.no_grad():
        model.b_final.normal_()
    x = tm.generate_batch(7, 0.5, 3, 5)
    out = model(x)
    for k in range(3):
        W, b = model.W[k], model.b_final[k]
        expected = torch.relu(x[:, k] @ W.T @ W + b)
        assert torch.allclose(out[:, k], expected, atol=1e-6)


def test_models_reject_wrong_input_shape():
    model = tm.ToyModel(3, 5, 2)
    with pytest.raises(ValueError, match=r"\[batch, 3, 5\], got \(7, 5, 3\)"):
        model(torch.zeros(7, 5, 3))
    with pytest.raises(ValueError, match=r"\[batch, 2, 4\]"):
        tm.AbsValueModel(2, 4, 3)(torch.zeros(4, 2))


def test_model_rejects_bad_importance_and_batch_kind():
    with pytest.raises(ValueError, match=r"importance must be"):
        tm.ToyModel(2, 5, 2, importance=torch.ones(4))
    with pytest.raises(ValueError, match="n_features must be even"):
        tm.ToyModel(2, 5, 2, batch_kind="correlated")
    with pytest.raises(ValueError, match="batch_kind"):
        tm.ToyModel(2, 4, 2, batch_kind="sparse")


def test_importance_weighted_mse_shapes():
    x = torch.rand(4, 2, 3)
    assert tm.importance_weighted_mse(x, x, torch.ones(2, 3)).shape == (2,)
    with pytest.raises(ValueError, match=r"importance must be \[inst, feats\]"):
        tm.importance_weighted_mse(x, x, torch.ones(3))
    with pytest.raises(ValueError, match="x_hat and x"):
        tm.importance_weighted_mse(x, x[:, :1], torch.ones(2, 3))


def test_schedule_warms_up_then_decays_to_zero():
    lrs = [tm.warmup_cosine_lr(t, 100, 1.0, 10) for t in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert lrs[10] == pytest.approx(1.0) and lrs[-1] < 0.01
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:], strict=False))
    with pytest.raises(ValueError, match="warmup_steps"):
        tm.warmup_cosine_lr(0, 10, 1.0, 10)


def test_training_keeps_top_features_when_dense():
    torch.manual_seed(0)
    importance = tm.geometric_importance(4, 0.5)
    model = tm.ToyModel(2, 4, 2, feature_probability=1.0, importance=importance)
    log = tm.train_toy_model(model, n_steps=400, batch_size=256, lr=1e-2, progress=False)
    assert log["loss"].shape == (400, 2) and log["lr"].shape == (400,)
    assert (log["loss"][-50:].mean(0) < 0.6 * log["loss"][:10].mean(0)).all()
    norms = model.W.detach().norm(dim=1)
    assert (norms[:, 0] > 0.9).all() and (norms[:, 3] < norms[:, 0]).all()


# ------------------------------------------------------------------ geometry


def test_feature_dimensionality_named_configurations():
    angles = torch.arange(5) * 2 * math.pi / 5
    pentagon = torch.stack([angles.cos(), angles.sin()])[None]
    assert torch.allclose(tm.feature_dimensionality(pentagon), torch.full((1, 5), 0.4), atol=1e-5)
    pair = torch.tensor([[[1.0, -1.0, 0.0, 0.0]]])
    assert torch.allclose(tm.feature_dimensionality(pair), torch.tensor([[0.5, 0.5, 0.0, 0.0]]))
    assert tm.dimensions_per_feature(pentagon).item() == pytest.approx(2 / 5)


def test_geometry_helpers_reject_2d_W():
    for fn in (tm.feature_dimensionality, tm.dimensions_per_feature, tm.superposition_interference):
        with pytest.raises(ValueError, match=r"\[inst, d_hidden, feats\], got \(2, 5\)"):
            fn(torch.zeros(2, 5))


def test_best_instances():
    loss = torch.tensor([3.0, 1.0, 2.0, 0.5, 0.7, 0.9])
    assert tm.best_instances(loss, groups=2).tolist() == [1, 3]
    with pytest.raises(ValueError, match="divisible"):
        tm.best_instances(loss, groups=4)


# ------------------------------------------------------------------ plots


def test_plots_build_and_reject_bad_shapes():
    W = torch.randn(3, 2, 5)
    b = torch.randn(3, 5)
    assert len(plots.plot_WtW_and_bias(W, b).data) == 6
    fig_2d = plots.plot_features_in_2d(W)
    assert len(fig_2d.data) == 15 + 3  # 5 arrows and a unit circle per instance
    assert sum(t.name == "unit circle (length 1)" for t in fig_2d.data) == 3
    plots.plot_feature_norms(W)
    plots.plot_neuron_weights(W)
    with pytest.raises(ValueError, match=r"arrows in 2 dimensions, but W has d_hidden = 3"):
        plots.plot_features_in_2d(torch.randn(2, 3, 5))
    with pytest.raises(ValueError, match=r"b must be \[inst, feats\]"):
        plots.plot_WtW_and_bias(W, torch.randn(5, 3))
    with pytest.raises(ValueError, match="3 titles for 2 instances"):
        plots.plot_feature_norms(torch.randn(2, 2, 5), titles=["a", "b", "c"])


def test_neuron_plot_names_every_feature_and_scales_panels_separately():
    W = torch.randn(2, 5, 20)
    W[1] *= 10  # one instance with much larger weights must not squash the other panel
    fig = plots.plot_neuron_weights(W)
    legend = [t.name for t in fig.data if t.showlegend]
    assert legend == [f"feature {f}" for f in range(20)]
    assert len({t.marker.color for t in fig.data[:20]}) == 20  # 20 distinct colours
    assert fig.layout.yaxis2.matches is None and fig.layout.yaxis2.anchor == "x2"


def test_phase_diagram_ticks_sit_on_the_grid_values():
    density, importance = 10 ** torch.linspace(0, -2, 4), 10 ** torch.linspace(-1, 1, 3)
    fig = plots.plot_phase_diagram(torch.zeros(3, 4, dtype=torch.long), importance, density)
    assert list(fig.layout.xaxis.tickvals) == [0, 1, 2, 3]
    assert list(fig.layout.xaxis.ticktext) == ["1", "0.22", "0.046", "0.01"]
    assert list(fig.layout.yaxis.ticktext) == ["0.1", "1", "10"]


def test_dimensionality_plot_needs_more_features_than_dims():
    plots.plot_dimensionality(torch.randn(4, 3, 12), torch.tensor([1.0, 0.5, 0.2, 0.1]))
    with pytest.raises(ValueError, match="more features than dimensions"):
        plots.plot_dimensionality(torch.randn(4, 12, 3), torch.tensor([1.0, 0.5, 0.2, 0.1]))
    with pytest.raises(ValueError, match=r"density must be \[inst\]"):
        plots.plot_dimensionality(torch.randn(4, 3, 12), torch.tensor([1.0, 0.5]))


def test_phase_diagram_shape_check():
    plots.plot_phase_diagram(torch.zeros(3, 4, dtype=torch.long), torch.ones(3), torch.ones(4))
    with pytest.raises(ValueError, match=r"phase must be \[importances, densities\]"):
        plots.plot_phase_diagram(torch.zeros(4, 3, dtype=torch.long), torch.ones(3), torch.ones(4))
