"""Checks for chapter 02, Sparse dictionary learning on toy data.

Shapes everywhere: x, x_hat [batch, inst, d_in]; acts [batch, inst, d_sae];
W_enc [inst, d_in, d_sae]; W_dec [inst, d_sae, d_in]; b_enc [inst, d_sae]; b_dec [inst, d_in].
"""

from __future__ import annotations

import torch

from course_utils.checks.core import (
    Case,
    CheckFailed,
    Mistake,
    StepRecorder,
    compare_differentiable,
    compare_function,
    exercise,
    lifted_mistakes,
    mismatch,
    step_divergence,
    with_options,
)
from course_utils.science import sae_metrics as M
from course_utils.science import saes as S


def _differentiable(learner, reference, cases, mistakes, wrt, what, presence=("acts",)) -> str:
    return compare_differentiable(learner, reference, cases, mistakes, wrt, what, presence)


def _g(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _unit(t: torch.Tensor) -> torch.Tensor:
    return t / t.norm(dim=-1, keepdim=True)


def _params(seed: int, inst: int = 2, d_in: int = 5, d_sae: int = 7, batch: int = 6):
    g = _g(seed)
    x = torch.randn(batch, inst, d_in, generator=g)
    W_enc = torch.randn(inst, d_in, d_sae, generator=g) * 0.5
    b_enc = torch.randn(inst, d_sae, generator=g) * 0.3
    W_dec = _unit(torch.randn(inst, d_sae, d_in, generator=g))
    b_dec = torch.randn(inst, d_in, generator=g) * 0.5
    return x, W_enc, b_enc, W_dec, b_dec


def _enc(x, W_enc, b_enc, b_dec, subtract=True):
    x_in = x - b_dec if subtract else x
    return torch.einsum("bid,ids->bis", x_in, W_enc) + b_enc


def _dec(acts, W_dec, b_dec):
    return torch.einsum("bis,isd->bid", acts, W_dec) + b_dec


# ---------------------------------------------------------------- 2.1 SAE forward

FORWARD_MISTAKES = [
    Mistake(
        "no pre-encoder bias",
        lambda x, W_enc, b_enc, W_dec, b_dec: (
            torch.relu(_enc(x, W_enc, b_enc, b_dec, subtract=False)),
            _dec(torch.relu(_enc(x, W_enc, b_enc, b_dec, subtract=False)), W_dec, b_dec),
        ),
        "the encoder should see `x - b_dec` (the pre-encoder bias), not `x` itself.",
    ),
    Mistake(
        "added b_dec before encoding",
        lambda x, W_enc, b_enc, W_dec, b_dec: (
            a := torch.relu(_enc(x + 2 * b_dec, W_enc, b_enc, b_dec)),
            _dec(a, W_dec, b_dec),
        ),
        "the pre-encoder bias is *subtracted*: the encoder sees `x - b_dec`, not `x + b_dec`.",
    ),
    Mistake(
        "missing ReLU",
        lambda x, W_enc, b_enc, W_dec, b_dec: (
            a := _enc(x, W_enc, b_enc, b_dec),
            _dec(a, W_dec, b_dec),
        ),
        "the latents can be negative: apply `torch.relu` to the pre-activations.",
    ),
    Mistake(
        "decoder bias not added back",
        lambda x, W_enc, b_enc, W_dec, b_dec: (
            a := torch.relu(_enc(x, W_enc, b_enc, b_dec)),
            _dec(a, W_dec, b_dec) - b_dec,
        ),
        "the reconstruction is `acts @ W_dec + b_dec`: you left out `+ b_dec`.",
    ),
    Mistake(
        "reconstruction from the pre-activations",
        lambda x, W_enc, b_enc, W_dec, b_dec: (
            torch.relu(_enc(x, W_enc, b_enc, b_dec)),
            _dec(_enc(x, W_enc, b_enc, b_dec), W_dec, b_dec),
        ),
        "decode the latents *after* the ReLU, not the pre-activations.",
    ),
]


def _forward_cases() -> list[Case]:
    x, W_enc, b_enc, W_dec, b_dec = _params(0)
    one = _params(1, inst=1, batch=1)
    zeros = (torch.zeros_like(x), W_enc, b_enc, W_dec, b_dec)
    long_rows = W_dec * torch.linspace(0.5, 2.0, W_dec.shape[1])[None, :, None]
    return [
        Case("seeded random with 2 instances", (x, W_enc, b_enc, W_dec, b_dec)),
        Case(
            "decoder rows not unit-norm (use W_dec as given)", (x, W_enc, b_enc, long_rows, b_dec)
        ),
        Case("zero input so only biases act", zeros),
        Case("a batch of one with one instance", one),
    ]


@exercise("2.1", "sae_forward")
def sae_forward(learner) -> str:
    if not callable(learner):
        return compare_function(learner, S.sae_forward, [], [])
    return _differentiable(
        learner,
        S.sae_forward,
        _forward_cases(),
        FORWARD_MISTAKES,
        {"W_enc": 1, "b_enc": 2, "W_dec": 3, "b_dec": 4},
        "W_enc, b_enc, W_dec and b_dec",
    )


# ---------------------------------------------------------------- 2.2 remove the parallel gradient


def _parallel_part(W_dec, grad):
    unit = _unit(W_dec)
    return (grad * unit).sum(-1, keepdim=True) * unit


PARALLEL_MISTAKES = [
    Mistake(
        "returned the parallel part",
        _parallel_part,
        "you returned the component *along* each decoder row; return the gradient minus it.",
    ),
    Mistake(
        "dot product over the wrong axis",
        lambda W_dec, grad: (
            grad
            - (grad * W_dec / W_dec.norm(dim=-2, keepdim=True)).sum(-2, keepdim=True)
            * W_dec
            / W_dec.norm(dim=-2, keepdim=True)
        ),
        "each decoder *row* (the last axis, d_in) is a dictionary element: normalise and take "
        "dot products over dim=-1.",
    ),
    Mistake(
        "normalised over the wrong axis",
        lambda W_dec, grad: (
            grad
            - (grad * W_dec / W_dec.norm(dim=1, keepdim=True)).sum(-1, keepdim=True)
            * W_dec
            / W_dec.norm(dim=1, keepdim=True)
        ),
        "check the axis of your `.norm(...)`: a decoder row is `W_dec[i, j, :]`, so its length "
        "is taken over the last axis (dim=-1), the same axis as the dot product.",
    ),
    Mistake(
        "dot product over the wrong axis but normalised correctly",
        lambda W_dec, grad: grad - (grad * _unit(W_dec)).sum(1, keepdim=True) * _unit(W_dec),
        "check the axis of your `.sum(...)`: the dot product of a gradient row with its decoder "
        "row runs over d_in, the last axis.",
    ),
    Mistake(
        "assumed unit-norm rows",
        lambda W_dec, grad: grad - (grad * W_dec).sum(-1, keepdim=True) * W_dec,
        "the rows of W_dec are only unit-norm up to rounding (and not at all here): divide by "
        "their norm before projecting.",
    ),
    Mistake(
        "added the parallel part",
        lambda W_dec, grad: grad + _parallel_part(W_dec, grad),
        "subtract the parallel component, don't add it.",
    ),
]


def _parallel_cases() -> list[Case]:
    g = _g(2)
    W = torch.randn(2, 7, 5, generator=g) * 1.7
    grad = torch.randn(2, 7, 5, generator=g)
    return [
        Case("seeded random rows not unit-norm", (W, grad)),
        Case("gradient already parallel", (W[:1], 3 * W[:1])),
        Case(
            "gradient already perpendicular",
            (torch.eye(3).unsqueeze(0), torch.eye(3).roll(1, 0)[None]),
        ),
    ]


@exercise("2.2", "remove_parallel_grad")
def remove_parallel_grad(learner) -> str:
    return compare_function(learner, S.remove_parallel_grad, _parallel_cases(), PARALLEL_MISTAKES)


# ---------------------------------------------------------------- 2.3 loss


def _recon(x, x_hat):
    return (x_hat - x).pow(2).sum(-1).mean(0)


LOSS_MISTAKES = [
    Mistake(
        "L2 norm instead of squared L2",
        lambda x, acts, x_hat, l1: (
            (x_hat - x).norm(dim=-1).mean(0) + l1 * acts.abs().sum(-1).mean(0)
        ),
        "the reconstruction term is the *squared* L2 error ||x - x_hat||^2, not ||x - x_hat||.",
    ),
    Mistake(
        "mean over d_in (MSE per element)",
        lambda x, acts, x_hat, l1: (
            (x_hat - x).pow(2).mean(-1).mean(0) + l1 * acts.abs().sum(-1).mean(0)
        ),
        "sum the squared error over d_in (dim=-1), don't average it; then average over the batch.",
    ),
    Mistake(
        "L1 divided by the dictionary size",
        lambda x, acts, x_hat, l1: _recon(x, x_hat) + l1 * acts.abs().mean(-1).mean(0),
        "the L1 term is *summed* over latents. Averaging divides it by d_sae, so the same "
        "coefficient means a weaker penalty for a bigger dictionary "
        "(section 4 shows why this hurts).",
    ),
    Mistake(
        "summed over the batch",
        lambda x, acts, x_hat, l1: (
            (x_hat - x).pow(2).sum(-1).sum(0) + l1 * acts.abs().sum(-1).sum(0)
        ),
        "average over the batch (dim 0) so the loss does not grow with the batch size.",
    ),
    Mistake(
        "averaged over the instance axis",
        lambda x, acts, x_hat, l1: (
            (x_hat - x).pow(2).sum(-1).mean(1) + (l1 * acts.abs().sum(-1)).mean(1)
        ),
        "average over the batch (dim 0), not over instances (dim 1): return one loss per instance.",
    ),
    Mistake(
        "no L1 term",
        lambda x, acts, x_hat, l1: _recon(x, x_hat),
        "add the sparsity penalty l1_coeff * sum_i |f_i| (averaged over the batch).",
    ),
]


def _loss_cases() -> list[Case]:
    x, W_enc, b_enc, W_dec, b_dec = _params(3, inst=3, batch=8)
    acts, x_hat = S.sae_forward(x, W_enc, b_enc, W_dec, b_dec)
    l1 = torch.tensor([0.0, 0.1, 2.0])
    return [
        Case("seeded random with 3 L1 coefficients", (x, acts, x_hat, l1)),
        Case("perfect reconstruction", (x, acts, x.clone(), l1)),
        Case("a batch of one", (x[:1], acts[:1], x_hat[:1], l1)),
    ]


@exercise("2.3", "sae_loss")
def sae_loss(learner) -> str:
    if not callable(learner):
        return compare_function(learner, S.sae_loss, [], [])
    return _differentiable(
        learner,
        S.sae_loss,
        _loss_cases(),
        LOSS_MISTAKES,
        {"acts": 1, "x_hat": 2},
        "acts and x_hat (the loss stays differentiable)",
    )


# ---------------------------------------------------------------- 2.4 training step


def _step_no_zero_grad(sae, optimizer, x, l1_coeff):
    acts, x_hat = sae(x)
    loss = S.sae_loss(x, acts, x_hat, l1_coeff)
    loss.sum().backward()
    sae.W_dec.grad = S.remove_parallel_grad(sae.W_dec.data, sae.W_dec.grad)
    optimizer.step()
    with torch.no_grad():
        sae.W_dec.data = _unit(sae.W_dec.data)
    return loss.detach()


def _step_variant(remove_parallel: bool = True, renormalise: bool = True, late_zero: bool = False):
    def step(sae, optimizer, x, l1_coeff):
        acts, x_hat = sae(x)
        loss = S.sae_loss(x, acts, x_hat, l1_coeff)
        if not late_zero:
            optimizer.zero_grad()
        loss.sum().backward()
        if late_zero:
            optimizer.zero_grad()
        if remove_parallel:
            sae.W_dec.grad = S.remove_parallel_grad(sae.W_dec.data, sae.W_dec.grad)
        optimizer.step()
        if renormalise:
            with torch.no_grad():
                sae.W_dec.data = _unit(sae.W_dec.data)
        return loss.detach()

    return step


TRAINING_STEP_MISTAKES = [
    Mistake(
        "zero_grad between backward and step",
        _step_variant(late_zero=True),
        "`optimizer.zero_grad()` after `backward()` throws the gradients away (they are None "
        "now): call it BEFORE `loss.backward()`, so that step() sees this step's gradients.",
    ),
    Mistake(
        "no zero_grad",
        _step_no_zero_grad,
        "gradients accumulate across steps: call `optimizer.zero_grad()` before `backward()`.",
    ),
    Mistake(
        "decoder not normalised after the step",
        _step_variant(renormalise=False),
        "after `optimizer.step()`, divide each decoder row by its norm (under `torch.no_grad()`), "
        "or the SAE can shrink its latents and grow the decoder to dodge the L1 penalty.",
    ),
    Mistake(
        "parallel gradient not removed",
        _step_variant(remove_parallel=False),
        "before `optimizer.step()`, replace `sae.W_dec.grad` with "
        "`remove_parallel_grad(sae.W_dec.data, sae.W_dec.grad)`.",
    ),
]


def _run_training(step_fn):
    def run(seed: int, n_steps: int, batch: int = 16):
        sae = S.ReLUSAE(d_in=5, d_sae=7, n_instances=2, seed=seed)
        optimizer = torch.optim.Adam(sae.parameters(), lr=0.05)
        g = _g(seed + 100)
        l1 = torch.tensor([0.05, 0.5])
        losses = []
        recorder = StepRecorder({id(p): n for n, p in sae.named_parameters()})
        with recorder:
            for _ in range(n_steps):
                x = recorder.saw(torch.rand(batch, 2, 5, generator=g))
                losses.append(step_fn(sae, optimizer, x, l1))
                if losses[-1] is None:
                    return {"losses": None}
        out = {"losses": torch.stack([torch.as_tensor(v).detach() for v in losses])}
        for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
            out[name] = getattr(sae, name).detach().clone()
        out["steps"] = recorder.steps
        return out

    return run


def _compare_training(expected: dict, actual: dict) -> str | None:
    if actual.get("losses") is None:
        return "your step returned None: return the per-instance loss (detached)"
    problem = step_divergence(expected["steps"], actual["steps"])
    if problem:
        return problem
    want = {k: v for k, v in expected.items() if k != "steps"}
    got = {k: v for k, v in actual.items() if k != "steps"}
    return mismatch(want, got, 1e-4, 1e-4)


@exercise("2.4", "training_step")
def training_step(learner) -> str:
    if not callable(learner):
        raise CheckFailed("pass the function itself: `check.training_step(training_step)`.")
    cases = [Case("one step", (0, 1)), Case("five steps", (1, 5)), Case("batch of one", (2, 3, 1))]
    return (
        compare_function(
            _run_training(learner),
            _run_training(S.relu_training_step),
            cases,
            lifted_mistakes(TRAINING_STEP_MISTAKES, _run_training),
            compare=_compare_training,
        )
        + " (gradients at every optimizer.step() agree too)"
    )


# ---------------------------------------------------------------- 3.1 L0

L0_MISTAKES = [
    Mistake(
        "counted every latent",
        lambda acts: (acts >= 0).float().sum(-1).mean(0),
        "`acts >= 0` is true for every ReLU output; count latents that are *nonzero* (`acts > 0` "
        "or `acts != 0`).",
    ),
    Mistake(
        "fraction instead of count",
        lambda acts: (acts != 0).float().mean(-1).mean(0),
        "L0 is the *number* of active latents per example: sum over d_sae, then average over the "
        "batch.",
    ),
    Mistake(
        "L1 instead of L0",
        lambda acts: acts.abs().sum(-1).mean(0),
        "you summed the activation values (L1); L0 counts how many are nonzero.",
    ),
    Mistake(
        "summed over the batch",
        lambda acts: (acts != 0).float().sum(-1).sum(0),
        "average over the batch (dim 0), don't sum.",
    ),
]


def _acts_cases() -> list[Case]:
    x, W_enc, b_enc, W_dec, b_dec = _params(4, inst=3, batch=10)
    acts, _ = S.sae_forward(x, W_enc, b_enc, W_dec, b_dec)
    single = torch.zeros(4, 2, 6)
    single[:, :, 3] = 1.5
    weak = torch.zeros(3, 1, 4)
    weak[1, 0, 2] = 0.01  # fires once, weakly: still alive, still counted by L0
    tiny = torch.zeros(2, 2, 3)
    tiny[0, 1, 0] = 1e-7  # tiny but non-zero: alive (a threshold like > 1e-6 is wrong)
    return [
        Case("seeded random ReLU latents", (acts,)),
        Case("all zero", (torch.zeros(5, 2, 6),)),
        Case("a single active latent", (single,)),
        Case("a latent that fires once (weakly)", (weak,)),
        Case("a latent that fires at 1e-7", (tiny,)),
        Case("a batch of one", (acts[:1],)),
    ]


@exercise("3.1", "l0")
def l0(learner) -> str:
    return compare_function(learner, M.l0, _acts_cases(), L0_MISTAKES)


# ---------------------------------------------------------------- 3.2 FVU

FVU_MISTAKES = [
    Mistake(
        "variance not centred",
        lambda x, x_hat: (x - x_hat).pow(2).sum((0, 2)) / x.pow(2).sum((0, 2)),
        "the denominator is the variance: subtract the batch mean of x (`x.mean(0)`) first.",
    ),
    Mistake(
        "mean over the wrong axis",
        lambda x, x_hat: (
            (x - x_hat).pow(2).sum((0, 2)) / (x - x.mean(-1, keepdim=True)).pow(2).sum((0, 2))
        ),
        "the mean to subtract is over the batch (dim 0), not over d_in.",
    ),
    Mistake(
        "mean of per-example ratios",
        lambda x, x_hat: (
            (x - x_hat).pow(2).sum(-1) / (x - x.mean(0, keepdim=True)).pow(2).sum(-1)
        ).mean(0),
        "sum the errors and the variances over the batch *before* dividing.",
    ),
    Mistake(
        "FVU per dimension then averaged",
        lambda x, x_hat: (
            (x - x_hat).pow(2).sum(0) / (x - x.mean(0, keepdim=True)).pow(2).sum(0)
        ).mean(-1),
        "you computed an FVU for each of the d_in dimensions and averaged them. FVU is one ratio: "
        "sum the squared errors over the batch *and* d_in, do the same for the variance, then "
        "divide once.",
    ),
    Mistake(
        "variance explained",
        lambda x, x_hat: 1 - M.fvu(x, x_hat),
        "that is the fraction of variance *explained*; FVU = 1 - that.",
    ),
    Mistake(
        "L2 instead of squared",
        lambda x, x_hat: (
            (x - x_hat).norm(dim=-1).sum(0) / (x - x.mean(0, keepdim=True)).norm(dim=-1).sum(0)
        ),
        "use squared distances (variances), not norms.",
    ),
]


def _fvu_cases() -> list[Case]:
    g = _g(5)
    x = torch.randn(12, 3, 4, generator=g) + 2.0
    x_hat = x + 0.3 * torch.randn(12, 3, 4, generator=g)
    return [
        Case("seeded random off-centre data", (x, x_hat)),
        Case("perfect reconstruction", (x, x.clone())),
        Case("predicting the mean", (x, x.mean(0, keepdim=True).expand_as(x).clone())),
    ]


@exercise("3.2", "fvu")
def fvu(learner) -> str:
    return compare_function(learner, M.fvu, _fvu_cases(), FVU_MISTAKES)


# ---------------------------------------------------------------- 3.3 dead latents

DEAD_MISTAKES = [
    Mistake(
        "alive instead of dead",
        lambda acts: (acts > 0).any(0),
        "you returned the latents that fire; return the ones that *never* fire (negate it).",
    ),
    Mistake(
        "zero on any example",
        lambda acts: (acts == 0).any(0),
        "a latent is dead only if it is zero on *every* example: "
        "use `.all(0)` (or `~(acts > 0).any(0)`).",
    ),
    Mistake(
        "reduced over the wrong axis",
        lambda acts: ~(acts > 0).any(-1),
        "reduce over the batch (dim 0): the answer has one entry per (instance, latent).",
    ),
]


@exercise("3.3", "dead_latents")
def dead_latents(learner) -> str:
    return compare_function(learner, M.dead_latents, _acts_cases(), DEAD_MISTAKES)


# ---------------------------------------------------------------- 3.4 MMCS


def _cos(learned, true):
    return torch.einsum("isd,fd->ifs", _unit(learned), _unit(true))


MMCS_MISTAKES = [
    Mistake(
        "max over the wrong axis",
        lambda learned, true: _cos(learned, true).max(-2).values.mean(-1),
        "for each *true* feature take the best learned element (max over d_sae), then average over "
        "true features. You took, for each learned element, its best true feature.",
    ),
    Mistake(
        "dot products, not cosines",
        lambda learned, true: torch.einsum("isd,fd->ifs", learned, true).max(-1).values.mean(-1),
        "normalise both dictionaries' rows to unit length before the dot products.",
    ),
    Mistake(
        "absolute cosine",
        lambda learned, true: _cos(learned, true).abs().max(-1).values.mean(-1),
        "don't take |cos|: a latent pointing opposite to a feature (cos = -1) cannot represent it, "
        "because the latents are non-negative.",
    ),
    Mistake(
        "mean instead of max",
        lambda learned, true: _cos(learned, true).mean(-1).mean(-1),
        "for each true feature keep only the *best* match (max), then average.",
    ),
]


def _mmcs_cases() -> list[Case]:
    g = _g(6)
    true = _unit(torch.randn(6, 4, generator=g))
    learned = torch.randn(2, 9, 4, generator=g) * 2
    exact = torch.cat([true, torch.randn(2, 4, generator=g)]).unsqueeze(0) * 3
    return [
        Case("seeded random with d_sae=9 and 6 true features", (learned, true)),
        Case("dictionary contains the true features", (exact, true)),
        Case("negated features", ((-true).unsqueeze(0), true)),
        Case("true rows not unit-norm", (learned, true * torch.linspace(0.3, 3.0, 6)[:, None])),
    ]


@exercise("3.4", "mmcs")
def mmcs(learner) -> str:
    return compare_function(learner, M.mmcs, _mmcs_cases(), MMCS_MISTAKES)


# ---------------------------------------------------------------- 5.1 resampling


def _resample_variant(
    use_residual=True,
    normalise=True,
    worst=True,
    reset_bias=True,
    scale_encoder=True,
    alive_only=True,
    cycle=True,
):
    def impl(W_enc, b_enc, W_dec, dead, x, x_hat, encoder_scale=0.2):
        W_enc, b_enc, W_dec = W_enc.clone(), b_enc.clone(), W_dec.clone()
        residual = x - x_hat
        losses = residual.pow(2).sum(-1)
        source = residual if use_residual else x
        for i in range(W_dec.shape[0]):
            idx = dead[i].nonzero().flatten()
            if len(idx) == 0:
                continue
            order = losses[:, i].argsort(descending=worst)
            chosen = order[torch.arange(len(idx)) % len(order)] if cycle else order[: len(idx)]
            dirs = source[chosen, i]
            if normalise:
                dirs = dirs / dirs.norm(dim=-1, keepdim=True).clamp_min(1e-8)
            mask = ~dead[i] if alive_only else torch.ones_like(dead[i])
            scale = W_enc[i][:, mask].norm(dim=0).mean() if mask.any() else torch.tensor(1.0)
            W_dec[i, idx] = dirs
            W_enc[i][:, idx] = dirs.T * (encoder_scale * scale if scale_encoder else 1.0)
            if reset_bias:
                b_enc[i, idx] = 0.0
        return W_enc, b_enc, W_dec

    return impl


RESAMPLE_MISTAKES = [
    Mistake(
        "decoder row not normalised",
        _resample_variant(normalise=False),
        "divide the residual by its norm: decoder rows must stay unit-norm.",
    ),
    Mistake(
        "used the input, not the residual",
        _resample_variant(use_residual=False),
        "point the dead latent at the *residual* x - x_hat (what the SAE fails to reconstruct), "
        "not at x.",
    ),
    Mistake(
        "best-reconstructed examples",
        _resample_variant(worst=False),
        "take the examples with the *largest* reconstruction error (`argsort(descending=True)`).",
    ),
    Mistake(
        "b_enc not reset",
        _resample_variant(reset_bias=False),
        "set the resampled latents' encoder bias to 0 "
        "(a very negative bias is often why they died).",
    ),
    Mistake(
        "encoder not scaled",
        _resample_variant(scale_encoder=False),
        "scale the new encoder column to encoder_scale x the mean norm of the *alive* encoder "
        "columns, so the revived latent starts small.",
    ),
    Mistake(
        "no cycling when dead latents outnumber examples",
        _resample_variant(cycle=False),
        "with more dead latents than examples, `order[:n]` has fewer entries than there are dead "
        "latents. Cycle through the ranked examples: `order[torch.arange(n) % len(order)]`.",
    ),
    Mistake(
        "mean norm over all latents",
        _resample_variant(alive_only=False),
        "average the encoder norms over the *alive* latents only (`W_enc[i][:, ~dead[i]]`).",
    ),
]


def _resample_cases() -> list[Case]:
    x, W_enc, b_enc, W_dec, b_dec = _params(7, inst=2, batch=5, d_sae=7)
    W_enc = W_enc * torch.linspace(0.5, 2.0, 7)  # encoder columns of different norms
    b_enc = b_enc - 1.0
    acts, x_hat = S.sae_forward(x, W_enc, b_enc, W_dec, b_dec)
    dead = torch.zeros(2, 7, dtype=torch.bool)
    dead[0, [1, 4]] = True
    dead[1, [0, 2, 3, 5, 6]] = True  # more dead latents than examples: cycle through them
    all_dead = torch.ones(1, 7, dtype=torch.bool)
    few = dead.clone()
    few[0, [0, 5]] = True  # instance 0: 4 dead latents, instance 1: 5, but only 2 examples
    return [
        Case("some dead latents", (W_enc, b_enc, W_dec, dead, x, x_hat)),
        Case("no dead latents", (W_enc, b_enc, W_dec, torch.zeros_like(dead), x, x_hat)),
        Case(
            "more dead latents than examples in a batch of two",
            (W_enc, b_enc, W_dec, few, x[:2], x_hat[:2]),
        ),
        Case(
            "all dead on a batch of one",
            (W_enc[:1], b_enc[:1], W_dec[:1], all_dead, x[:1, :1], x_hat[:1, :1]),
        ),
        *with_options(
            Case("some dead latents", (W_enc, b_enc, W_dec, dead, x, x_hat)), encoder_scale=0.7
        ),
    ]


@exercise("5.1", "resample_dead_latents")
def resample_dead_latents(learner) -> str:
    return compare_function(learner, S.resample_dead_latents, _resample_cases(), RESAMPLE_MISTAKES)


# ---------------------------------------------------------------- 7.1 TopK


def _topk_variant(dim=-1, largest=True, relu=True, indicator=False):
    def impl(pre_acts, k):
        values, indices = pre_acts.topk(k, dim=dim, largest=largest)
        if relu:
            values = torch.relu(values)
        if indicator:
            values = torch.ones_like(values)
        return torch.zeros_like(pre_acts).scatter(dim, indices, values)

    return impl


TOPK_MISTAKES = [
    Mistake(
        "no ReLU",
        _topk_variant(relu=False),
        "with fewer than k positive pre-activations, the top k include negatives: apply ReLU "
        "to the kept values.",
    ),
    Mistake(
        "top k over the batch",
        _topk_variant(dim=0),
        "take the top k over the latents (dim=-1) of each example, not over the batch.",
    ),
    Mistake(
        "the k smallest", _topk_variant(largest=False), "keep the k *largest* pre-activations."
    ),
    Mistake(
        "indicator instead of values",
        _topk_variant(indicator=True),
        "keep the values of the top k latents, not 1s.",
    ),
]


def _topk_cases() -> list[Case]:
    g = _g(8)
    pre = torch.randn(6, 2, 9, generator=g)
    mostly_negative = -torch.rand(3, 1, 5, generator=g)
    mostly_negative[:, :, 2] = 0.7
    return [
        Case("seeded random with k=3", (pre, 3)),
        Case("only one positive pre-activation with k=2", (mostly_negative, 2)),
        Case("k=1 on a batch of one", (pre[:1], 1)),
    ]


@exercise("7.1", "topk_activation")
def topk_activation(learner) -> str:
    if not callable(learner):
        return compare_function(learner, S.topk_activation, [], [])
    return _differentiable(
        learner,
        S.topk_activation,
        _topk_cases(),
        TOPK_MISTAKES,
        {"pre_acts": 0},
        "the kept pre-activations",
    )


# ---------------------------------------------------------------- 7.2 JumpReLU backward


def _jump_variant(theta_factor=True, sign=-1.0, half_width=0.5, pass_all=False):
    def impl(z, threshold, bandwidth, grad_output):
        grad_z = grad_output.clone() if pass_all else (z > threshold).to(z.dtype) * grad_output
        kernel = (((z - threshold) / bandwidth).abs() < half_width).to(z.dtype)
        factor = threshold / bandwidth if theta_factor else 1.0 / bandwidth
        return grad_z, (sign * factor * kernel * grad_output).sum(0)

    return impl


JUMPRELU_MISTAKES = [
    Mistake(
        "no theta factor",
        _jump_variant(theta_factor=False),
        "f = z H(z - theta) jumps by theta at the threshold, so the pseudo-derivative is "
        "-(theta / eps) K((z - theta) / eps); -(1/eps) K(...) is the one for H alone (the L0 "
        "term).",
    ),
    Mistake(
        "no 1/eps factor",
        lambda z, threshold, bandwidth, grad_output: (
            (z > threshold).to(z.dtype) * grad_output,
            (-threshold * S.rectangle((z - threshold) / bandwidth) * grad_output).sum(0),
        ),
        "your threshold gradient looks off by a factor eps: the kernel K((z - theta) / eps) has "
        "width eps, so its height in the pseudo-derivative is 1/eps.",
    ),
    Mistake(
        "wrong sign",
        _jump_variant(sign=1.0),
        "raising the threshold switches latents *off*: d f / d theta is negative.",
    ),
    Mistake(
        "kernel twice as wide",
        _jump_variant(half_width=1.0),
        "the rectangle kernel K(u) is 1 for |u| < 1/2 (width 1 in u, i.e. width eps in z).",
    ),
    Mistake(
        "gradient passed to every z",
        _jump_variant(pass_all=True),
        "d f / d z is H(z - theta): no gradient flows to latents below their threshold.",
    ),
]


def _jump_cases() -> list[Case]:
    g = _g(9)
    threshold = torch.rand(2, 6, generator=g) * 0.5 + 0.1
    z = threshold + (torch.rand(40, 2, 6, generator=g) - 0.5) * 0.2
    grad = torch.randn(40, 2, 6, generator=g)
    near = threshold[:1, :1].expand(1, 1, 1) + torch.tensor([0.0004, -0.0003, 0.0008]).view(3, 1, 1)
    return [
        Case("seeded random with eps=0.05", (z, threshold, 0.05, grad)),
        Case(
            "points within and outside eps/2 with eps=0.001",
            (near, threshold[:1, :1], 0.001, torch.ones(3, 1, 1)),
        ),
        Case("a batch of one", (z[:1], threshold, 0.1, grad[:1])),
    ]


@exercise("7.2", "jumprelu_backward")
def jumprelu_backward(learner) -> str:
    return compare_function(learner, S.jumprelu_backward, _jump_cases(), JUMPRELU_MISTAKES)


# ---------------------------------------------------------------- 7.3 decoder-norm-weighted L1

WEIGHTED_L1_MISTAKES = [
    Mistake(
        "plain L1",
        lambda acts, W_dec: acts.abs().sum(-1).mean(0),
        "weight each latent by the L2 norm of its decoder row, `W_dec.norm(dim=-1)`.",
    ),
    Mistake(
        "squared decoder norm",
        lambda acts, W_dec: (acts.abs() * W_dec.pow(2).sum(-1)).sum(-1).mean(0),
        "use the decoder row's norm, not its squared norm.",
    ),
    Mistake(
        "norm over the wrong axis",
        lambda acts, W_dec: (acts.abs() * W_dec.norm(dim=-2)).sum(-1).mean(0),
        "a decoder row is W_dec[i, j, :]: take the norm over the last axis (d_in).",
    ),
    Mistake(
        "summed over the batch",
        lambda acts, W_dec: (acts.abs() * W_dec.norm(dim=-1)).sum(-1).sum(0),
        "is your penalty proportional to the batch size? Average over the batch (dim 0).",
    ),
    Mistake(
        "divided by the dictionary size",
        lambda acts, W_dec: (acts.abs() * W_dec.norm(dim=-1)).mean(-1).mean(0),
        "sum over latents; don't average (that divides the penalty by d_sae).",
    ),
]


def _weighted_cases() -> list[Case]:
    g = _g(10)
    acts = torch.relu(torch.randn(8, 2, 5, generator=g))
    W_dec = torch.randn(2, 5, 5, generator=g)  # square, so a wrong-axis norm still runs
    W_rect = torch.randn(2, 5, 3, generator=g)
    return [
        Case("seeded random with a square decoder", (acts, W_dec)),
        Case("d_in != d_sae", (acts, W_rect)),
        Case("unit-norm decoder (= plain L1)", (acts, _unit(W_rect))),
    ]


@exercise("7.3", "decoder_norm_weighted_l1")
def decoder_norm_weighted_l1(learner) -> str:
    if not callable(learner):
        return compare_function(learner, S.decoder_norm_weighted_l1, [], [])
    return _differentiable(
        learner,
        S.decoder_norm_weighted_l1,
        _weighted_cases(),
        WEIGHTED_L1_MISTAKES,
        {"acts": 0, "W_dec": 1},
        "acts and W_dec (the penalty shrinks decoder norms too)",
    )
