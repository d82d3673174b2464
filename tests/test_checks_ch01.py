"""Every chapter-01 check passes the reference, calls the stub "not attempted", and rejects every
known mistake (with its hint) plus one wrong answer that is not in its list."""

from __future__ import annotations

import pytest
import torch

from course_utils import toy_models as ref
from course_utils.checks import ch01 as check
from course_utils.checks.core import FAILED, NOT_ATTEMPTED, PASSED, outcome, stub


@pytest.fixture(autouse=True)
def one_thread():
    """Small tensors: one thread is faster and immune to a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def stub_class(base):
    def forward(self, x):
        raise NotImplementedError()

    return type(base.__name__, (base,), {"forward": forward})


REFERENCES = [
    (check.generate_batch, lambda n, p, i, f: ref.generate_batch(n, p, i, f), stub),
    (
        check.generate_correlated_batch,
        lambda n, p, i, k: ref.generate_correlated_batch(n, p, i, k),
        stub,
    ),
    (
        check.generate_anticorrelated_batch,
        lambda n, p, i, k: ref.generate_anticorrelated_batch(n, p, i, k),
        stub,
    ),
    (check.ToyModel, ref.ToyModel, stub_class(ref.ToyModel)),
    (check.NeuronModel, ref.NeuronModel, stub_class(ref.NeuronModel)),
    (check.AbsValueModel, ref.AbsValueModel, stub_class(ref.AbsValueModel)),
    (check.importance_weighted_mse, ref.importance_weighted_mse, stub),
    (check.feature_dimensionality, ref.feature_dimensionality, stub),
]


@pytest.mark.parametrize(
    "fn, reference, untouched", REFERENCES, ids=lambda x: getattr(x, "__name__", "")
)
def test_reference_passes_and_stub_not_attempted(fn, reference, untouched):
    status, message = outcome(fn, reference)
    assert status == PASSED, message
    status, message = outcome(fn, untouched)
    assert status == NOT_ATTEMPTED, message


def test_training_reference_passes_and_stub_not_attempted():
    status, message = outcome(
        check.train_toy_model, lambda m, **kw: ref.train_toy_model(m, progress=False, **kw)
    )
    assert status == PASSED, message
    status, _ = outcome(
        check.train_toy_model, lambda model, n_steps, batch_size, lr, warmup_frac: stub()
    )
    assert status == NOT_ATTEMPTED


MISTAKE_LISTS = [
    (check.generate_batch, check.GENERATE_BATCH_MISTAKES),
    (check.generate_correlated_batch, check.CORRELATED_MISTAKES),
    (check.generate_anticorrelated_batch, check.ANTICORRELATED_MISTAKES),
    (check.ToyModel, check.TOY_MODEL_MISTAKES),
    (check.NeuronModel, check.NEURON_MODEL_MISTAKES),
    (check.AbsValueModel, check.ABS_MODEL_MISTAKES),
    (check.importance_weighted_mse, check.MSE_MISTAKES),
    (check.feature_dimensionality, check.DIMENSIONALITY_MISTAKES),
    (check.train_toy_model, check.TRAIN_MISTAKES),
]
ALL_MISTAKES = [(fn, m) for fn, mistakes in MISTAKE_LISTS for m in mistakes]


@pytest.mark.parametrize(
    "fn, mistake", ALL_MISTAKES, ids=[f"{f.__name__}-{m.name}" for f, m in ALL_MISTAKES]
)
def test_every_mistake_is_rejected_with_its_hint(fn, mistake):
    status, message = outcome(fn, mistake.impl)
    assert status == FAILED, f"{mistake.name} was not rejected"
    assert mistake.hint in message, f"{mistake.name}: hint missing from {message!r}"


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
