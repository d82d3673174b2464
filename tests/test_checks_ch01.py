"""Every chapter-01 check passes the reference, calls the stub "not attempted", and rejects every
known mistake (with its hint) plus one wrong answer that is not in its list."""

from __future__ import annotations

import pytest
import torch

from course_utils import toy_models as ref
from course_utils.checks import ch01 as check
from course_utils.checks.core import FAILED, outcome
from tests.check_contract import contract_tests

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest.py


def _values_in_minus_one_one(n, p, i, f):
    return ref.generate_batch(n, p, i, f) * 2 - 1


def _anticorrelated_as_correlated(n, p, i, k):
    return ref.generate_anticorrelated_batch(
        n, min(p, 0.5) if isinstance(p, float) else p.clamp(max=0.5), i, k
    )


def _scaled_forward(self, x):
    return 2 * ref.ToyModel.forward(self, x)


def _abs_wrong_target_layout(self, x):
    h = torch.relu(torch.einsum("ihf,bif->bih", self.W1, x))
    return torch.relu(torch.einsum("ifh,bih->bif", self.W2, h) - self.b_final)


def _train_no_return(model, n_steps, batch_size, lr, warmup_frac):
    ref.train_toy_model(model, n_steps, batch_size, lr, warmup_frac, progress=False)


# (check, reference, known mistakes, one more wrong answer that is not in the list)
CHECKS = [
    (
        check.generate_batch,
        lambda n, p, i, f: ref.generate_batch(n, p, i, f),
        check.GENERATE_BATCH_MISTAKES,
        _values_in_minus_one_one,
    ),
    (
        check.generate_correlated_batch,
        lambda n, p, i, k: ref.generate_correlated_batch(n, p, i, k),
        check.CORRELATED_MISTAKES,
        _anticorrelated_as_correlated,
    ),
    (
        check.generate_anticorrelated_batch,
        lambda n, p, i, k: ref.generate_anticorrelated_batch(n, p, i, k),
        check.ANTICORRELATED_MISTAKES,
        lambda n, p, i, k: ref.generate_correlated_batch(n, p, i, k),
    ),
    (
        check.ToyModel,
        ref.ToyModel,
        check.TOY_MODEL_MISTAKES,
        type("ToyModel", (ref.ToyModel,), {"forward": _scaled_forward}),
    ),
    (check.NeuronModel, ref.NeuronModel, check.NEURON_MODEL_MISTAKES, ref.ToyModel),
    (
        check.AbsValueModel,
        ref.AbsValueModel,
        check.ABS_MODEL_MISTAKES,
        type("AbsValueModel", (ref.AbsValueModel,), {"forward": _abs_wrong_target_layout}),
    ),
    (
        check.importance_weighted_mse,
        ref.importance_weighted_mse,
        check.MSE_MISTAKES,
        lambda x_hat, x, imp: ((x - x_hat) ** 2 * imp).mean(0).mean(-1),
    ),
    (
        check.feature_dimensionality,
        ref.feature_dimensionality,
        check.DIMENSIONALITY_MISTAKES,
        lambda W: ref.feature_dimensionality(W) / W.norm(dim=1).clamp_min(1e-8),
    ),
    (
        check.train_toy_model,
        lambda m, **kw: ref.train_toy_model(m, progress=False, **kw),
        check.TRAIN_MISTAKES,
        _train_no_return,
    ),
]
contract_tests(check, CHECKS, globals())


# ------------------------------------------------------------------ wrong answers not in the lists


def test_generate_batch_rejects_values_in_minus_one_one():
    def wrong(n, p, i, f):
        return ref.generate_batch(n, p, i, f) * 2 - 1

    status, message = outcome(check.generate_batch, wrong)
    assert status == FAILED and "[0, 1]" in message


def test_generate_batch_crash_without_trailing_axis_shows_hint():
    """The learner's own code (not the Mistake's) crashes with torch's raw size-mismatch error;
    the check must still name the fix."""

    def learner(n_batch, feature_probability, n_instances, n_features):
        p = torch.as_tensor(feature_probability, dtype=torch.float32).expand(n_instances)
        shape = (n_batch, n_instances, n_features)
        values = torch.rand(shape)
        return torch.where(torch.rand(shape) < p, values, 0.0)

    status, message = outcome(check.generate_batch, learner)
    assert status == FAILED
    assert "must match the size of tensor" in message  # the learner sees torch's own error...
    assert "p[:, None]" in message and "trailing axis" in message  # ...and the fix


def test_generate_batch_rejects_wrong_shape_and_sparsity():
    status, message = outcome(
        check.generate_batch, lambda n, p, i, f: ref.generate_batch(n, p, f, i)
    )
    assert status == FAILED and "shape" in message
    status, message = outcome(
        check.generate_batch, lambda n, p, i, f: ref.generate_batch(n, 0.5, i, f)
    )
    assert status == FAILED and "fraction of non-zero entries" in message


def test_correlated_rejects_anticorrelated_and_vice_versa():
    status, message = outcome(
        check.generate_correlated_batch,
        lambda n, p, i, k: ref.generate_anticorrelated_batch(
            n, min(p, 0.5) if isinstance(p, float) else p.clamp(max=0.5), i, k
        ),
    )
    assert status == FAILED and "pair" in message
    status, message = outcome(
        check.generate_anticorrelated_batch,
        lambda n, p, i, k: ref.generate_correlated_batch(n, p, i, k),
    )
    assert status == FAILED and "pair" in message


def test_models_reject_wrong_forward_and_wrong_init():
    scaled = type(
        "ToyModel", (ref.ToyModel,), {"forward": lambda self, x: 2 * ref.ToyModel.forward(self, x)}
    )
    status, message = outcome(check.ToyModel, scaled)
    assert status == FAILED and "differs from the reference" in message
    # the neuron model's forward is not the toy model's, and vice versa
    assert outcome(check.NeuronModel, ref.ToyModel)[0] == FAILED
    assert outcome(check.ToyModel, ref.NeuronModel)[0] == FAILED

    class Renamed(torch.nn.Module):
        def __init__(self, n_instances, n_features, d_hidden):
            super().__init__()
            self.weights = torch.nn.Parameter(torch.zeros(n_instances, d_hidden, n_features))

    status, message = outcome(check.ToyModel, Renamed)
    assert status == FAILED and "no tensor attribute `W`" in message
    status, message = outcome(check.ToyModel, ref.ToyModel(2, 3, 1))
    assert status == FAILED and "pass the class itself" in message


def test_abs_model_rejects_wrong_target_layout():
    def forward(self, x):
        h = torch.relu(torch.einsum("ihf,bif->bih", self.W1, x))
        return torch.relu(torch.einsum("ifh,bih->bif", self.W2, h) - self.b_final)

    status, message = outcome(
        check.AbsValueModel, type("AbsValueModel", (ref.AbsValueModel,), {"forward": forward})
    )
    assert status == FAILED


def test_mse_rejects_mean_over_everything():
    status, message = outcome(
        check.importance_weighted_mse,
        lambda x_hat, x, imp: ((x - x_hat) ** 2 * imp).mean(0).mean(-1),
    )
    assert status == FAILED


def test_dimensionality_rejects_norm_not_squared():
    def wrong(W):
        return ref.feature_dimensionality(W) / W.norm(dim=1).clamp_min(1e-8)

    status, message = outcome(check.feature_dimensionality, wrong)
    assert status == FAILED and "differs" in message


def test_training_rejects_wrong_return_and_warmup_only():
    def no_return(model, n_steps, batch_size, lr, warmup_frac):
        ref.train_toy_model(model, n_steps, batch_size, lr, warmup_frac, progress=False)

    status, message = outcome(check.train_toy_model, no_return)
    assert status == FAILED and "returned None" in message

    def warmup_only(model, n_steps, batch_size, lr, warmup_frac):
        out = ref.train_toy_model(model, n_steps, batch_size, lr, warmup_frac, progress=False)
        warm = int(warmup_frac * n_steps)
        out["lr"] = torch.tensor([lr * min(1.0, (t + 1) / warm) for t in range(n_steps)])
        return out

    status, message = outcome(check.train_toy_model, warmup_only)
    assert status == FAILED and "learning-rate schedule" in message
