"""Reference SAEs, metrics and data generators: bad input, divergence, invariants."""

from __future__ import annotations

import pytest
import torch

from course_utils.science import sae_metrics as M
from course_utils.science import saes as S
from course_utils.science.sparse_data import (
    SparseDictionaryData,
    decaying_probabilities,
    random_dictionary,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest.py


def _data(seed=0, n=12, d=6):
    D = random_dictionary(n, d, seed=seed)
    return D, SparseDictionaryData(D, decaying_probabilities(n, 2.0), seed=seed)


def test_wrong_d_in_names_both_shapes():
    sae = S.ReLUSAE(d_in=6, d_sae=8, n_instances=2)
    with pytest.raises(ValueError, match=r"\(4, 5\).*\[batch, 6\]"):
        sae(torch.zeros(4, 5))
    with pytest.raises(ValueError, match=r"\(4, 3, 6\)"):
        sae(torch.zeros(4, 3, 6))  # wrong number of instances


def test_instance_dim_optional():
    sae = S.ReLUSAE(d_in=6, d_sae=8, n_instances=3)
    acts, x_hat = sae(torch.randn(5, 6))
    assert acts.shape == (5, 3, 8) and x_hat.shape == (5, 3, 6)


def test_per_instance_hyperparameters_validated():
    with pytest.raises(ValueError, match="one per instance"):
        S.ReLUSAE(d_in=6, d_sae=8, n_instances=3, l1_coeff=[0.1, 0.2])
    with pytest.raises(ValueError, match="k must be"):
        S.TopKSAE(d_in=6, d_sae=8, n_instances=1, k=9)
    with pytest.raises(ValueError, match="positive int"):
        S.ReLUSAE(d_in=0, d_sae=8)


def test_mmcs_dimension_mismatch_names_both_shapes():
    with pytest.raises(ValueError, match=r"\(2, 8, 6\).*\(12, 5\)"):
        M.mmcs(torch.randn(2, 8, 6), torch.randn(12, 5))


def test_metric_shape_mismatch():
    with pytest.raises(ValueError, match=r"\(4, 2, 6\).*\(4, 2, 5\)"):
        M.fvu(torch.zeros(4, 2, 6), torch.zeros(4, 2, 5))


def test_data_generator_bad_input():
    D = random_dictionary(10, 4)
    with pytest.raises(ValueError, match=r"\(9,\)"):
        SparseDictionaryData(D, torch.full((9,), 0.1))
    with pytest.raises(ValueError, match="too large"):
        decaying_probabilities(4, mean_active=10.0)


def test_correlated_data_keeps_marginals():
    D = random_dictionary(8, 4)
    p = torch.full((8,), 0.2)
    from course_utils.science.sparse_data import random_correlation

    data = SparseDictionaryData(D, p, correlation=random_correlation(8, strength=2.0), seed=1)
    _, c = data.sample_with_coefficients(20000)
    freq = (c > 0).float().mean(0)
    assert torch.allclose(freq, p, atol=0.02)
    active = (c > 0).float()
    corr = torch.corrcoef(active.T)
    assert corr[~torch.eye(8, dtype=torch.bool)].abs().max() > 0.1  # really correlated


def test_nan_loss_stops_with_advice():
    sae = S.ReLUSAE(d_in=6, d_sae=8, n_instances=2)
    with pytest.raises(S.TrainingDiverged, match=r"learning rate.*lr=0.001"):
        S.train_sae(
            sae,
            lambda b: torch.full((b, 6), float("nan")),
            steps=5,
            batch_size=4,
            lr=1e-3,
            progress=False,
        )


def test_overflow_stops_too():
    sae = S.ReLUSAE(d_in=6, d_sae=8, n_instances=1)
    with pytest.raises(S.TrainingDiverged, match="inf"):
        S.train_sae(sae, lambda b: torch.full((b, 6), 1e30), steps=3, batch_size=4, progress=False)


@pytest.mark.parametrize("cls", [S.ReLUSAE, S.TopKSAE, S.JumpReLUSAE])
def test_decoder_stays_unit_norm(cls):
    _, data = _data()
    sae = cls(d_in=6, d_sae=12, n_instances=2)
    S.train_sae(
        sae,
        data.sample,
        steps=30,
        batch_size=64,
        lr=1e-2,
        progress=False,
        resample_every=10,
        dead_window=5,
    )
    norms = sae.W_dec.detach().norm(dim=-1)
    assert torch.allclose(norms, torch.ones_like(norms), atol=1e-5)


def test_decoder_norm_l1_sae_is_unconstrained():
    _, data = _data()
    sae = S.DecoderNormL1SAE(d_in=6, d_sae=12, n_instances=1, l1_coeff=0.01)
    S.train_sae(sae, data.sample, steps=30, batch_size=64, lr=1e-2, progress=False)
    norms = sae.W_dec.detach().norm(dim=-1)
    assert not torch.allclose(norms, torch.ones_like(norms), atol=1e-2)


def test_training_is_deterministic_and_learns():
    D, _ = _data()
    runs = []
    for _ in range(2):
        data = SparseDictionaryData(D, decaying_probabilities(12, 2.0), seed=3)
        sae = S.ReLUSAE(d_in=6, d_sae=12, n_instances=1, l1_coeff=0.1)
        h = S.train_sae(sae, data.sample, steps=150, batch_size=128, lr=1e-2, progress=False)
        runs.append(h["loss"])
    assert torch.equal(runs[0], runs[1])
    assert runs[0][-1].item() < 0.5 * runs[0][0].item()


def test_topk_has_exactly_k_active_per_instance():
    sae = S.TopKSAE(d_in=6, d_sae=12, n_instances=3, k=[1, 2, 5])
    acts, _ = sae(torch.randn(50, 6) * 3)
    assert ((acts > 0).sum(-1) <= torch.tensor([1, 2, 5])).all()


def test_jumprelu_gradients_match_the_formula():
    z = torch.tensor([[[0.50, 0.52, 0.9]]], requires_grad=True)
    threshold = torch.tensor([[0.51, 0.51, 0.51]], requires_grad=True)
    out = S.JumpReLUFunction.apply(z, threshold, 0.05)
    out.sum().backward()
    assert torch.equal(out.detach(), torch.tensor([[[0.0, 0.52, 0.9]]]))
    assert torch.allclose(z.grad, torch.tensor([[[0.0, 1.0, 1.0]]]))
    assert torch.allclose(threshold.grad, torch.tensor([[-0.51 / 0.05, -0.51 / 0.05, 0.0]]))


def test_resampling_revives_dead_latents_and_keeps_inputs():
    sae = S.ReLUSAE(d_in=6, d_sae=8, n_instances=1)
    dead = torch.zeros(1, 8, dtype=torch.bool)
    dead[0, :3] = True
    x = torch.randn(10, 1, 6)
    x_hat = torch.zeros_like(x)
    W_enc = sae.W_enc.detach().clone()
    new = S.resample_dead_latents(
        sae.W_enc.detach(), sae.b_enc.detach(), sae.W_dec.detach(), dead, x, x_hat
    )
    assert torch.equal(sae.W_enc.detach(), W_enc)  # not modified in place
    assert torch.allclose(new[2][0, :3].norm(dim=-1), torch.ones(3))
    assert torch.equal(new[2][0, 3:], sae.W_dec.detach()[0, 3:])


def test_export_uses_saelens_names():
    sae = S.JumpReLUSAE(d_in=6, d_sae=8, n_instances=2)
    state = sae.instance_state_dict(1)
    assert state["W_enc"].shape == (6, 8) and state["W_dec"].shape == (8, 6)
    assert set(state) == {"W_enc", "b_enc", "W_dec", "b_dec", "threshold"}
    with pytest.raises(ValueError, match="out of range"):
        sae.instance_state_dict(2)


def test_metrics_on_known_values():
    x = torch.randn(100, 1, 4)
    assert torch.allclose(M.fvu(x, x), torch.zeros(1))
    assert torch.allclose(M.shrinkage_ratio(x, 0.7 * x), torch.tensor([0.7]))
    D = random_dictionary(5, 4)
    assert torch.allclose(M.mmcs(D.unsqueeze(0), D), torch.ones(1))
    c = torch.zeros(3, 5)
    c[0, 1], c[1, 2], c[2, 3] = 0.5, 0.2, 0.4
    x_hat = (0.5 * c @ D).unsqueeze(1)
    assert torch.allclose(M.coefficient_ratio(x_hat, c, D), torch.tensor([0.5]))


def test_resampling_in_training_resets_adam_moments():
    _, data = _data()
    sae = S.ReLUSAE(d_in=6, d_sae=12, n_instances=1, l1_coeff=0.1)
    optimizer = torch.optim.Adam(sae.parameters(), lr=1e-2)
    x = data.sample(64)
    loss = sae.loss(x)["loss"].sum()
    loss.backward()
    optimizer.step()
    dead = torch.zeros(1, 12, dtype=torch.bool)
    dead[0, [2, 7]] = True
    S._reset_adam_state(optimizer, sae, dead)
    for param in (sae.W_enc, sae.b_enc, sae.W_dec):
        m = optimizer.state[param]["exp_avg"]
        m = m.transpose(-1, -2) if param is sae.W_enc else m
        assert (m[dead] == 0).all() and (m[~dead] != 0).any()
