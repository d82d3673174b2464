"""Every chapter-08 check passes the reference (and a second, differently written correct answer),
calls the stub "not attempted", and rejects every known mistake (with its hint) plus one more
wrong answer that is not in its list."""

from __future__ import annotations

import math
from dataclasses import replace

import einops
import pytest
import torch

from course_utils.checks import ch08 as check
from course_utils.checks.core import FAILED, PASSED, outcome
from course_utils.science import bilinear as ref
from course_utils.science import bilinear_lm as blm
from tests.check_contract import contract_tests

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest.py


# ------------------------------------------------------------------ wrong answers not in the lists


def _tensor_detached(W1, W2, P):
    return torch.from_numpy(ref.bilinear_tensor(W1, W2, P).detach().numpy().copy())


def _eig_descending_by_signed_then_abs(Q):
    values, vectors = ref.eigen_decompose(Q)
    return values, -vectors[..., :1].expand_as(vectors)  # right values, wrong vectors


def _truncated_k_as_fraction(values, vectors, x, k):
    return ref.truncated_logits(values, vectors, x, values.shape[-1] // 2)


def _hessian_finite_difference(model, x, c, eps=1e-1):
    d = x.shape[0]
    f = lambda z: model(z.unsqueeze(0))[0, c].detach()  # noqa: E731
    H = torch.zeros(d, d)
    for i in range(d):
        for j in range(d):
            ei, ej = torch.zeros(d), torch.zeros(d)
            ei[i], ej[j] = eps, eps
            H[i, j] = (f(x + ei + ej) - f(x + ei) - f(x + ej) + f(x)) / eps**2
    return H


CHECKS = [
    (check.bilinear_tensor, ref.bilinear_tensor, check.BILINEAR_TENSOR_MISTAKES, _tensor_detached),
    (
        check.interaction_matrix,
        ref.interaction_matrix,
        check.INTERACTION_MISTAKES,
        lambda B, u: ref.interaction_matrix(B, u.abs()),
    ),
    (
        check.eigen_decompose,
        ref.eigen_decompose,
        check.EIGEN_MISTAKES,
        _eig_descending_by_signed_then_abs,
    ),
    (
        check.truncated_logits,
        ref.truncated_logits,
        check.TRUNCATED_MISTAKES,
        _truncated_k_as_fraction,
    ),
    (
        check.effective_rank,
        ref.effective_rank,
        check.EFFECTIVE_RANK_MISTAKES,
        lambda values: torch.nan_to_num((values.abs().sum(-1) / values.abs().amax(-1)) ** 2),
    ),
    (check.logit_hessian, ref.logit_hessian, check.HESSIAN_MISTAKES, _hessian_finite_difference),
    (
        check.mlp_interaction_matrix,
        blm.mlp_interaction_matrix,
        check.MLP_INTERACTION_MISTAKES,
        # u / u.norm() is a listed mistake now: |u| instead of u is not
        lambda W_gate, W_in, W_out, u: blm.mlp_interaction_matrix(W_gate, W_in, W_out, u.abs()),
    ),
]


# ------------------------------------------------------------------ second correct implementations


def _tensor_by_loops(W1, W2, P):
    slices = []
    for o in range(P.shape[0]):
        M = torch.zeros(W1.shape[1], W1.shape[1])
        for a in range(W1.shape[0]):
            M = M + P[o, a] * torch.outer(W1[a], W2[a])
        slices.append(M)
    return torch.stack(slices)


def _tensor_by_broadcast(W1, W2, P):
    outer = W1[:, :, None] * W2[:, None, :]  # [a, i, j]
    return (P[:, :, None, None] * outer[None]).sum(1)


def _interaction_by_matmul(B, u):
    M = (u[:, None, None] * B).sum(0)
    return 0.5 * (M + M.T)


def _interaction_by_tensordot(B, u):
    M = torch.tensordot(u, B, dims=1)
    return (M + M.transpose(0, 1)) / 2


def _eig_with_loop(Q):
    if Q.ndim > 2:
        pairs = [_eig_with_loop(q) for q in Q]
        return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])
    values, vectors = torch.linalg.eigh(Q)
    order = torch.argsort(values.abs(), descending=True)
    return values[order], -vectors[:, order]  # flipped signs: still correct


def _eig_via_svd_sign(Q):
    values, vectors = torch.linalg.eigh(Q.double())
    idx = torch.sort(values.abs(), dim=-1, descending=True).indices
    values = torch.take_along_dim(values, idx, dim=-1)
    vectors = torch.take_along_dim(vectors, idx.unsqueeze(-2), dim=-1)
    return values.to(Q.dtype), vectors.to(Q.dtype)


def _truncated_loop(values, vectors, x, k):
    out = torch.zeros(x.shape[0], values.shape[0])
    for c in range(values.shape[0]):
        for i in range(k):
            out[:, c] += values[c, i] * (x @ vectors[c, :, i]) ** 2
    return out


def _truncated_via_lowrank_Q(values, vectors, x, k):
    V = vectors[..., :k]
    Q = V @ torch.diag_embed(values[..., :k]) @ V.transpose(-1, -2)  # [c, d, d]
    return torch.einsum("bi,cij,bj->bc", x, Q, x)


def _rank_norms(values):
    l1 = torch.linalg.vector_norm(values, ord=1, dim=-1)
    l2 = torch.linalg.vector_norm(values, ord=2, dim=-1)
    return torch.where(l2 > 0, l1**2 / l2.clamp_min(1e-30) ** 2, 0.0)


def _rank_normalised(values):
    p = values.abs() / values.abs().sum(-1, keepdim=True)
    return torch.nan_to_num(1 / p.pow(2).sum(-1), nan=0.0)


def _hessian_autograd(model, x, c):
    z = x.detach().clone().requires_grad_(True)
    (g,) = torch.autograd.grad(model(z[None])[0, c], z, create_graph=True)
    rows = [
        torch.autograd.grad(g[i], z, retain_graph=True, allow_unused=True)[0] for i in range(len(g))
    ]
    return torch.stack([torch.zeros_like(x) if r is None else r for r in rows])


def _hessian_jacfwd(model, x, c):
    f = lambda z: model(z.unsqueeze(0)).squeeze(0)[c]  # noqa: E731
    return torch.func.jacfwd(torch.func.jacrev(f))(x)


def _mlp_interaction_via_chapter_tensor(W_gate, W_in, W_out, u):
    return ref.interaction_matrix(ref.bilinear_tensor(W_gate.T, W_in.T, W_out.T), u)


def _mlp_interaction_by_units(W_gate, W_in, W_out, u):
    Q = torch.zeros(W_gate.shape[0], W_gate.shape[0])
    for a in range(W_gate.shape[1]):
        h = W_out[a] @ u
        Q += h * (torch.outer(W_gate[:, a], W_in[:, a]) + torch.outer(W_in[:, a], W_gate[:, a])) / 2
    return Q


def _tensor_in_float64(W1, W2, P):
    # computes in float64 whatever comes in, returns the input's dtype (issue 26)
    B = torch.einsum("oa,ai,aj->oij", P.double(), W1.double(), W2.double())
    return B.to(W1.dtype)


def _hessian_from_weights(model, x, c):
    # bilinear: H = 2 Q_c = B_c + B_c^T, read from the weights; autodiff for the others
    if isinstance(model, ref.BilinearClassifier):
        B = ref.bilinear_tensor(model.W1, model.W2, model.P)[c].detach()
        return B + B.T
    return torch.func.hessian(lambda z: model(z[None])[0, c])(x)


def _mlp_interaction_in_float64(W_gate, W_in, W_out, u):
    h = W_out.double() @ u.double()
    M = (W_gate.double() * h) @ W_in.double().T
    return ((M + M.T) / 2).to(u.dtype)


CORRECT = {
    check.bilinear_tensor: [_tensor_by_loops, _tensor_by_broadcast, _tensor_in_float64],
    check.interaction_matrix: [_interaction_by_matmul, _interaction_by_tensordot],
    check.eigen_decompose: [_eig_with_loop, _eig_via_svd_sign],
    check.truncated_logits: [_truncated_loop, _truncated_via_lowrank_Q],
    check.effective_rank: [_rank_norms, _rank_normalised],
    check.logit_hessian: [_hessian_autograd, _hessian_jacfwd, _hessian_from_weights],
    check.mlp_interaction_matrix: [
        _mlp_interaction_via_chapter_tensor,
        _mlp_interaction_by_units,
        _mlp_interaction_in_float64,
    ],
}


# ------------------------------------------------- wrong answers a learner writes (issue 13)


def _tensor_mean_over_hidden(W1, W2, P):
    return torch.einsum("oa,ai,aj->oij", P, W1, W2) / W1.shape[0]


def _tensor_P_detached(W1, W2, P):
    return torch.einsum("oa,ai,aj->oij", P.detach(), W1, W2)


def _tensor_summed_P(W1, W2, P):
    return P.sum(1)[:, None, None] * (W1.T @ W2)[None]


def _interaction_mean(B, u):
    return ref.symmetrize(torch.einsum("o,oij->ij", u, B)) / u.shape[0]


def _interaction_u_detached(B, u):
    M = torch.einsum("o,oij->ij", u.detach(), B)
    return (M + M.T) / 2


def _interaction_M_MT(B, u):
    M = torch.einsum("o,oij->ij", u, B)
    return M @ M.T / 2


def _eig_abs_ascending(Q):
    values, vectors = torch.linalg.eigh(Q)
    order = values.abs().argsort(dim=-1)
    return values.gather(-1, order), vectors.gather(-1, order.unsqueeze(-2).expand_as(vectors))


def _eig_svd(Q):
    U, S, _ = torch.linalg.svd(Q)
    return S, U


def _eig_vectors_unnormalised(Q):
    values, vectors = ref.eigen_decompose(Q)
    return values, vectors * values.abs().clamp_min(1e-3).unsqueeze(-2)


def _truncated_square_after_weighting(values, vectors, x, k):
    proj = torch.einsum("bd,cdk->bck", x, vectors[..., :k])
    return torch.einsum("bck,ck->bc", proj, values[..., :k]).pow(2)


def _truncated_mean_over_k(values, vectors, x, k):
    return ref.truncated_logits(values, vectors, x, k) / max(k, 1)


def _truncated_all_kept(values, vectors, x, k):
    return ref.truncated_logits(values, vectors, x, values.shape[-1])


def _rank_l2_not_squared(values):
    l1, l2 = values.abs().sum(-1), values.pow(2).sum(-1).sqrt()
    return torch.nan_to_num(l1**2 / l2)


def _rank_flattened(values):
    l1, l2 = values.abs().sum(), values.norm()
    return torch.nan_to_num((l1 / l2) ** 2).expand(values.shape[:-1])


def _rank_count_nonzero(values):
    return (values != 0).sum(-1).float()


def _hessian_at_zero(model, x, c):
    return ref.logit_hessian(model, torch.zeros_like(x), c)


def _hessian_diagonal_only(model, x, c):
    return torch.diag(torch.diagonal(ref.logit_hessian(model, x, c)))


def _hessian_relative_logit(model, x, c):
    f = lambda z: (lambda out: out[0, c] - out[0].mean())(model(z[None]))  # noqa: E731
    return torch.func.hessian(f)(x)


WRONG = {
    check.bilinear_tensor: [
        _tensor_mean_over_hidden,
        _tensor_P_detached,
        _tensor_summed_P,
        _tensor_detached,
        # only W1 read in the [d_in, d_hidden] layout (issue 26: transposed weights)
        lambda W1, W2, P: torch.einsum("oa,ia,aj->oij", P, W1, W2),
    ],  # fmt: skip
    check.interaction_matrix: [
        _interaction_mean,
        _interaction_u_detached,
        _interaction_M_MT,
        CHECKS[1][3],
        # asymmetric: only the lower triangle symmetrised (issue 26)
        lambda B, u: (lambda M: torch.tril(M) + torch.tril(M, -1).T)(
            torch.einsum("o,oij->ij", u, B)
        ),
    ],  # fmt: skip
    check.eigen_decompose: [
        _eig_abs_ascending,
        _eig_svd,
        _eig_vectors_unnormalised,
        _eig_descending_by_signed_then_abs,
    ],  # fmt: skip
    check.truncated_logits: [
        _truncated_square_after_weighting,
        _truncated_mean_over_k,
        _truncated_all_kept,
        _truncated_k_as_fraction,
    ],  # fmt: skip
    check.effective_rank: [
        _rank_l2_not_squared,
        _rank_flattened,
        _rank_count_nonzero,
        CHECKS[4][3],
    ],  # fmt: skip
    check.logit_hessian: [
        _hessian_at_zero,
        _hessian_diagonal_only,
        _hessian_relative_logit,
        _hessian_finite_difference,
        # H vs 2Q (issue 26): Q_c from the weights for the bilinear model
        lambda m, x, c: (
            ref.symmetrize(ref.bilinear_tensor(m.W1, m.W2, m.P))[c].detach()
            if isinstance(m, ref.BilinearClassifier)
            else ref.logit_hessian(m, x, c)
        ),
    ],  # fmt: skip
}
WRONG[check.mlp_interaction_matrix] = [
    # the chapter-08 functions fed TransformerLens shapes without transposing (square case runs)
    lambda W_gate, W_in, W_out, u: ref.interaction_matrix(
        ref.bilinear_tensor(W_gate, W_in, W_out), u
    ),
    # u's coordinates in the wrong order (a residual direction from a different basis)
    lambda W_gate, W_in, W_out, u: _mlp_interaction_by_units(W_gate, W_in, W_out, u.flip(0)),
    # symmetrised by squaring
    lambda W_gate, W_in, W_out, u: (lambda M: M @ M.T)((W_gate * (W_out @ u)) @ W_in.T),
    CHECKS[6][3],
    # the gate and linear factors' hidden units misaligned (a transposed W_in) in the square case
    lambda W_gate, W_in, W_out, u: _tl_sym_test((W_gate * (W_out @ u)) @ W_in),
]


def _tl_sym_test(M):
    return (M + M.T) / 2


contract_tests(check, CHECKS, globals(), correct=CORRECT, wrong=WRONG)


# ------------------------------------------------------------------ targeted messages


def test_detached_tensor_gets_the_gradient_message():
    status, message = outcome(check.bilinear_tensor, _tensor_detached)
    assert status == FAILED and "no gradient flows back to `W1`" in message


def test_hessian_that_leaves_gradients_in_the_model_is_rejected():
    def with_backward(model, x, c):
        H = ref.logit_hessian(model, x, c)
        model(x[None])[0, c].backward()  # pollutes the parameters' .grad
        return H

    status, message = outcome(check.logit_hessian, with_backward)
    assert status == FAILED and "left gradients" in message


def test_hessian_finite_difference_is_not_accepted():
    """A float32 finite difference is off by ~1e-4 even on the exactly quadratic bilinear model,
    and further on GELU: the check asks for the exact Hessian."""
    status, message = outcome(check.logit_hessian, _hessian_finite_difference)
    assert status == FAILED and "differs from the reference" in message


def test_complex_eigenvectors_named():
    def with_eig(Q):
        values, vectors = ref.eigen_decompose(Q)
        return values, vectors.to(torch.complex64)

    status, message = outcome(check.eigen_decompose, with_eig)
    assert status == FAILED and "complex" in message


# ------------------------------------------ hints a newcomer's browser run found missing


# the learner's own section-1 functions, written as the notebook's solution writes them
def _nb_bilinear_tensor(W1, W2, P):
    return einops.einsum(P, W1, W2, "o a, a i, a j -> o i j")


def _nb_interaction_matrix(B, u):
    M = einops.einsum(u, B, "o, o i j -> i j")
    return (M + M.T) / 2


def _hint_of(check_fn, name):
    return next(m.hint for m in check_fn_mistakes(check_fn) if m.name == name)


def check_fn_mistakes(check_fn):
    return {row[0]: row[2] for row in CHECKS}[check_fn]


def test_85_eigenvectors_as_rows_gets_the_columns_hint():
    def rows(eigenvalues, eigenvectors, x, k):  # the browser run's answer
        proj = einops.einsum(x, eigenvectors[:, :k, :], "b i, c k i -> b c k")
        return einops.einsum(proj.pow(2), eigenvalues[..., :k], "b c k, c k -> b c")

    def rows_of_the_transpose(eigenvalues, eigenvectors, x, k):  # correct: rows of V^T
        proj = einops.einsum(x, eigenvectors.transpose(-1, -2)[:, :k, :], "b i, c k i -> b c k")
        return einops.einsum(proj.pow(2), eigenvalues[..., :k], "b c k, c k -> b c")

    status, message = outcome(check.truncated_logits, rows)
    hint = _hint_of(check.truncated_logits, "eigenvectors as rows")
    assert status == FAILED and hint in message and "COLUMNS" in message
    assert outcome(check.truncated_logits, rows_of_the_transpose) == (PASSED, "")


def test_87_untransposed_weights_get_the_transpose_hint():
    def untransposed(W_gate, W_in, W_out, u):  # the browser run's answer: an einsum crash
        return _nb_interaction_matrix(_nb_bilinear_tensor(W_gate, W_in, W_out), u)

    def transposed(W_gate, W_in, W_out, u):  # notebook Hint 1: correct
        return _nb_interaction_matrix(_nb_bilinear_tensor(W_gate.T, W_in.T, W_out.T), u)

    def untransposed_reference(W_gate, W_in, W_out, u):  # crashes with a ValueError instead
        return ref.interaction_matrix(ref.bilinear_tensor(W_gate, W_in, W_out), u)

    for wrong in (untransposed, untransposed_reference):
        status, message = outcome(check.mlp_interaction_matrix, wrong)
        assert status == FAILED and check.TL_TRANSPOSED_HINT in message, message
        assert "W_gate.T, W_in.T, W_out.T" in message
    assert outcome(check.mlp_interaction_matrix, transposed) == (PASSED, "")
    assert outcome(check.mlp_interaction_matrix, _mlp_interaction_via_chapter_tensor) == (
        PASSED,
        "",
    )


def test_87_transpose_hint_is_not_given_to_other_wrong_answers():
    # wrong even with transposed weights: the probe must not claim a layout mix-up
    def untransposed_and_halved(W_gate, W_in, W_out, u):
        return _nb_interaction_matrix(_nb_bilinear_tensor(W_gate, W_in, W_out), u) / 2

    def crashes(W_gate, W_in, W_out, u):
        return W_gate @ W_gate  # [4, 6] @ [4, 6]

    for wrong in (untransposed_and_halved, crashes):
        status, message = outcome(check.mlp_interaction_matrix, wrong)
        assert status == FAILED and check.TL_TRANSPOSED_HINT not in message, message


def test_87_u_rescaled_gets_the_u_hint():
    def by_norm_squared(W_gate, W_in, W_out, u):  # the browser run's answer
        h = W_out @ u
        M = (W_gate * h) @ W_in.T
        return (M + M.T) / 2 / u.norm() ** 2

    def unit_u(W_gate, W_in, W_out, u):
        h = W_out @ (u / u.norm())
        M = (W_gate * h) @ W_in.T
        return (M + M.T) / 2

    def unit_u_scaled_back(W_gate, W_in, W_out, u):  # correct: Q is linear in u
        return unit_u(W_gate, W_in, W_out, u) * u.norm()

    hint = _hint_of(check.mlp_interaction_matrix, "u normalised")
    for wrong in (by_norm_squared, unit_u):
        status, message = outcome(check.mlp_interaction_matrix, wrong)
        assert status == FAILED and hint in message, message
    assert outcome(check.mlp_interaction_matrix, unit_u_scaled_back) == (PASSED, "")


def test_83_single_matrix_answer_is_told_the_case_is_a_batch():
    def single(Q):  # the browser run's answer: IndexError on the batch case
        values, vectors = torch.linalg.eigh(Q)
        order = values.abs().argsort(descending=True)
        return values[order], vectors[:, order]

    def single_vectors_first(Q):  # same mistake, the other order of lines
        values, vectors = torch.linalg.eigh(Q)
        order = torch.argsort(values.abs(), descending=True)
        vectors = vectors[:, order]
        return values[order], vectors

    def single_flattened(Q):  # correct: the one-matrix code, looped over a flattened batch
        flat = Q.reshape(-1, *Q.shape[-2:])
        pairs = [single(q) for q in flat]
        values = torch.stack([p[0] for p in pairs]).reshape(Q.shape[:-1])
        return values, torch.stack([p[1] for p in pairs]).reshape(Q.shape)

    hint = _hint_of(
        check.eigen_decompose, "a single-matrix answer (values[order], vectors[:, order])"
    )
    for wrong in (single, single_vectors_first):
        status, message = outcome(check.eigen_decompose, wrong)
        assert status == FAILED and hint in message, message
        assert "'a batch of 3 matrices, 5x5'" in message and "take_along_dim" in message
    assert outcome(check.eigen_decompose, single_flattened) == (PASSED, "")
    assert outcome(check.eigen_decompose, _eig_via_svd_sign) == (PASSED, "")


# shape mix-ups that crash on a non-square first case on purpose: their hint fires only on a
# byte-identical crash or on a later square case (see the report of branch h08hints)
CRASH_ON_FIRST_CASE = {
    "weights read as [d_in, d_hidden] (TransformerLens's layout)",
    "P transposed",
    "contracted an input axis",
    "transpose of the whole tensor",
    "W_out transposed",
    "the d_mlp x d_mlp matrix (weights transposed)",
}


def test_every_mistake_runs_on_its_first_case():
    """A mistake that crashes matches only a byte-identical crash (8.5's 'eigenvectors as rows'
    crashed on a broadcast, so the learner's einops version got no hint): every listed mistake
    but the shape mix-ups above must give an output on its check's first case."""
    rows = [
        (check.BILINEAR_TENSOR_MISTAKES, check._tensor_cases()),
        (check.INTERACTION_MISTAKES, check._interaction_cases()),
        (check.EIGEN_MISTAKES, check._eig_cases()),
        (check.TRUNCATED_MISTAKES, check._trunc_cases()),
        (check.EFFECTIVE_RANK_MISTAKES, check._rank_cases()),
        (
            check.lifted_mistakes(check.HESSIAN_MISTAKES, check._run_hessian),
            check._hessian_cases(),
        ),
        (check.MLP_INTERACTION_MISTAKES, check._mlp_interaction_cases()),
    ]
    for mistakes, cases in rows:
        for mistake in mistakes:
            if mistake.name not in CRASH_ON_FIRST_CASE:
                mistake.impl(*cases[0].args)  # raises if it cannot run


def test_stub_signature_change_is_named():
    status, message = outcome(check.truncated_logits, lambda values, vectors, x: values)
    assert status == FAILED and "signature" in message


# ------------------------------------------------------------------ the reference module itself


def test_tensor_matches_layer_and_quadratic_form_in_float64():
    g = torch.Generator().manual_seed(0)
    W1, W2 = (
        torch.randn(7, 5, generator=g, dtype=torch.float64),
        torch.randn(7, 5, generator=g, dtype=torch.float64),
    )
    P = torch.randn(3, 7, generator=g, dtype=torch.float64)
    x = torch.randn(11, 5, generator=g, dtype=torch.float64)
    out = ref.bilinear_forward(x, W1, W2, P)
    B = ref.bilinear_tensor(W1, W2, P)
    via_tensor = torch.einsum("oij,bi,bj->bo", B, x, x)
    u = torch.randn(3, generator=g, dtype=torch.float64)
    Q = ref.interaction_matrix(B, u)
    assert torch.allclose(out, via_tensor, rtol=1e-12, atol=1e-12)
    assert torch.allclose(out @ u, torch.einsum("bi,ij,bj->b", x, Q, x), rtol=1e-12, atol=1e-12)
    assert torch.equal(Q, Q.T)
    anti = (B - B.transpose(-1, -2)) / 2
    assert torch.einsum("oij,bi,bj->bo", anti, x, x).abs().max() < 1e-12


def test_unit_eigen_formula():
    g = torch.Generator().manual_seed(1)
    w, v = (
        torch.randn(6, generator=g, dtype=torch.float64),
        torch.randn(6, generator=g, dtype=torch.float64),
    )
    values, vectors = ref.unit_interaction_eigen(w, v)
    Q = (torch.outer(w, v) + torch.outer(v, w)) / 2
    for i in range(2):
        assert torch.allclose(Q @ vectors[:, i], values[i] * vectors[:, i], atol=1e-12)
    assert values[0] > 0 > values[1]
    full, _ = ref.eigen_decompose(Q)
    assert torch.allclose(full[:2].sort().values, values.sort().values, atol=1e-12)
    assert full[2:].abs().max() < 1e-12


def test_eigen_decompose_reconstructs_and_sorts():
    g = torch.Generator().manual_seed(2)
    Q = torch.randn(4, 6, 6, generator=g, dtype=torch.float64)
    Q = (Q + Q.transpose(-1, -2)) / 2
    values, vectors = ref.eigen_decompose(Q)
    assert (values.abs().diff(dim=-1) <= 0).all()
    assert torch.allclose(
        vectors @ torch.diag_embed(values) @ vectors.transpose(-1, -2), Q, atol=1e-12
    )


def test_truncated_logits_full_rank_equals_model():
    torch.manual_seed(0)
    model = ref.BilinearClassifier(8, 6, 4)
    x = torch.randn(5, 8)
    values, vectors = model.decompose()
    assert torch.allclose(ref.truncated_logits(values, vectors, x, 8), model(x).detach(), atol=1e-5)
    assert ref.truncated_logits(values, vectors, x, 0).abs().max() == 0


def test_effective_rank_edge_values():
    assert ref.effective_rank(torch.tensor([0.0, 3.0, 0.0])).item() == pytest.approx(1.0)
    assert ref.effective_rank(torch.ones(5)).item() == pytest.approx(5.0)
    assert ref.effective_rank(torch.zeros(3)).item() == 0.0


def test_hessian_of_bilinear_is_twice_Q_everywhere():
    torch.manual_seed(0)
    model = ref.BilinearClassifier(6, 5, 3)
    Q = model.interaction_matrices().detach()
    for seed in range(3):
        x = torch.randn(6, generator=torch.Generator().manual_seed(seed))
        assert torch.allclose(ref.logit_hessian(model, x, 1), 2 * Q[1], atol=1e-5)


def test_mlp_hidden_for_params_matches_the_bilinear_count():
    bilinear = ref.BilinearClassifier()
    assert ref.n_params(bilinear) == 8832
    h = ref.mlp_hidden_for_params(8832)
    assert h == 118 and ref.n_params(ref.MLPClassifier(d_hidden=h)) == 8860


def test_training_is_repeatable_and_learns():
    split = ref.load_digits_split()
    cfg = ref.TrainConfig(noise_std=0.1, epochs=3, seed=1)
    accs = []
    for _ in range(2):
        torch.manual_seed(0)
        model = ref.BilinearClassifier()
        losses = ref.train_classifier(model, split.X_train, split.y_train, cfg)
        accs.append(ref.accuracy(model, split.X_test, split.y_test))
    assert losses[-1] < losses[0]
    assert accs[0] == accs[1] and accs[0] > 0.5


def test_digits_split_shapes():
    split = ref.load_digits_split()
    assert split.X_train.shape == (1347, 64) and split.X_test.shape == (450, 64)
    assert split.X_train.min() >= 0 and split.X_train.max() <= 1
    assert torch.bincount(split.y_test).min() >= 43  # stratified: 43-46 of each digit


# ------------------------------------------------------------------ bad input


def test_bad_inputs_get_clear_errors():
    with pytest.raises(ValueError, match="same shape"):
        ref.bilinear_tensor(torch.zeros(4, 3), torch.zeros(5, 3))
    with pytest.raises(ValueError, match="P must be"):
        ref.bilinear_tensor(torch.zeros(4, 3), torch.zeros(4, 3), torch.zeros(2, 5))
    with pytest.raises(ValueError, match="length d_out = 3"):
        ref.interaction_matrix(torch.zeros(3, 4, 4), torch.zeros(4))
    with pytest.raises(ValueError, match="not available offline"):
        ref.load_digits_split("mnist")
    with pytest.raises(ValueError, match="not symmetric"):
        ref.eigen_decompose(torch.tensor([[0.0, 1.0], [0.0, 0.0]]))
    with pytest.raises(ValueError, match="k must be"):
        ref.truncated_logits(torch.zeros(2, 3), torch.zeros(2, 3, 3), torch.zeros(1, 3), 4)
    with pytest.raises(ValueError, match="d_in = 3"):
        ref.bilinear_forward(torch.zeros(2, 4), torch.zeros(5, 3), torch.zeros(5, 3))
    with pytest.raises(ValueError, match="activation"):
        ref.MLPClassifier(activation="tanh")


def test_bad_inputs_of_the_transformer_part_get_clear_errors(tmp_path):
    W = torch.zeros(4, 6)
    with pytest.raises(ValueError, match="length d_model = 4"):
        blm.mlp_interaction_matrix(W, W, torch.zeros(6, 4), torch.zeros(6))
    with pytest.raises(ValueError, match="same shape"):
        blm.mlp_interaction_matrix(W, torch.zeros(4, 5), torch.zeros(6, 4), torch.zeros(4))
    with pytest.raises(ValueError, match="kind must be"):
        blm.load_bilinear_lm("relu")
    with pytest.raises(blm.BilinearLMFileError, match="build-bilinear-lm"):
        blm.load_bilinear_lm("bilinear", tmp_path)  # nothing there


def test_corrupt_shipped_checkpoint_names_the_rebuild_command(tmp_path):
    import shutil

    shutil.copytree(blm.asset_dir() / "bilinear", tmp_path / "bilinear")
    (tmp_path / "bilinear" / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(blm.BilinearLMFileError, match="unreadable.*build-bilinear-lm"):
        blm.load_bilinear_lm("bilinear", tmp_path)
    (tmp_path / "bilinear" / "model.safetensors").unlink()
    with pytest.raises(blm.BilinearLMFileError, match="missing.*build-bilinear-lm"):
        blm.load_bilinear_lm("bilinear", tmp_path)


def test_shipped_bilinear_lm_is_a_quadratic_form_of_its_mlp_input():
    model = blm.load_bilinear_lm("bilinear")
    assert blm.is_bilinear(model) and model.blocks[0].mlp.b_in.abs().max() == 0
    tokens = torch.randint(
        1, model.cfg.d_vocab, (2, 16), generator=torch.Generator().manual_seed(0)
    )
    z, mlp_out, _ = blm.mlp_inputs(model, tokens)
    mlp = model.blocks[0].mlp
    u = blm.logit_direction(model, 5)
    Q = blm.mlp_interaction_matrix(mlp.W_gate, mlp.W_in, mlp.W_out, u)
    quad = torch.einsum("bpi,ij,bpj->bp", z, Q, z)
    direct = (mlp_out - mlp.b_out) @ u
    assert (quad - direct).abs().max() < 1e-4 * direct.abs().max()
    twin = blm.load_bilinear_lm("gelu")
    assert not twin.cfg.gated_mlp
    trainable = {k: blm.n_trainable(m) for k, m in (("bilinear", model), ("gelu", twin))}
    assert abs(trainable["bilinear"] - trainable["gelu"]) < 0.001 * trainable["gelu"]


def test_shipped_bilinear_lm_files_match_their_record():
    recorded = blm.read_metadata()["files_sha256"]
    assert recorded == blm.files_sha256(blm.asset_dir())


def test_tiny_build_reproduces_its_own_loss(tmp_path):
    config = blm.BilinearLMConfig(
        steps=2, log_every=1, validation_windows=4, checkpoints=(1, 2), checkpoint_windows=4
    )
    first = blm.build(config, tmp_path / "a", log=lambda line: None)
    second = blm.build(config, tmp_path / "b", log=lambda line: None)
    for kind in blm.KINDS:
        a, b = first["models"][kind], second["models"][kind]
        assert a["first_losses"] == b["first_losses"]
        assert abs(a["validation_loss"] - b["validation_loss"]) < 1e-6
        assert math.isfinite(a["validation_loss"])
        loaded = blm.load_bilinear_lm(kind, tmp_path / "a")
        windows = blm.validation_windows(loaded, 4)
        from course_utils.science.course_model import model_loss

        assert abs(model_loss(loaded, windows) - a["validation_loss"]) < 1e-6
        assert [s for s, _ in a["checkpoints"]] == [1, 2]
    rows = blm.read_dose_response(tmp_path / "a")
    assert {r["model"] for r in rows} >= set(blm.KINDS) and any(
        "bigram" in r["model"] for r in rows
    )
    # a run recorded without its weights: checkpoints, whole-split loss, per-window losses
    (tmp_path / "runs").mkdir()
    blm.record_run(tmp_path / "a", "tiny", "two steps", directory=tmp_path / "runs")
    blm.record_run(tmp_path / "a", "tiny", "recorded again", directory=tmp_path / "runs")
    runs = blm.read_runs(tmp_path / "runs")
    assert list(runs) == ["tiny"] and runs["tiny"]["note"] == "recorded again"
    for kind in blm.KINDS:
        rec = runs["tiny"]["models"][kind]
        assert len(rec["validation_window_losses"]) == 4
        mean = sum(rec["validation_window_losses"]) / 4
        assert abs(mean - first["models"][kind]["validation_loss"]) < 1e-3
    with pytest.raises(blm.BilinearLMFileError, match="build-bilinear-lm"):
        blm.read_runs(tmp_path / "a")  # no runs.json there


def test_shipped_runs_describe_the_shipped_models():
    runs = blm.read_runs()
    meta = blm.read_metadata()
    shipped = [
        r
        for r in runs.values()
        if r["steps"] == meta["build_config"]["steps"] and r["seed"] == meta["build_config"]["seed"]
    ]
    assert len(shipped) == 1 and len(runs) >= 3  # the shipped run, a second seed, a shorter budget
    assert {r["seed"] for r in runs.values()} >= {0, 1}
    assert len({r["steps"] for r in runs.values()}) >= 2
    for kind in blm.KINDS:
        rec = shipped[0]["models"][kind]
        assert abs(rec["validation_loss"] - meta["models"][kind]["validation_loss"]) < 1e-4
        assert rec["checkpoints"] == [
            [s, round(v, 5)] for s, v in meta["models"][kind]["checkpoints"]
        ]


def test_shipped_bilinear_saes_load_and_name_the_rebuild_command(tmp_path):
    sae = blm.load_bilinear_sae("sae-mlp-out")
    assert sae.W_enc.shape == (128, blm.BilinearSAEConfig().d_sae)
    with pytest.raises(ValueError, match="sae-mlp-out"):
        blm.load_bilinear_sae("sae-mlp-in")
    with pytest.raises(FileNotFoundError, match="--saes-only"):
        blm.load_bilinear_sae("sae-mlp-out", tmp_path)


def test_dose_response_table_has_both_models_at_every_checkpoint():
    rows = blm.read_dose_response()
    steps = {int(r["step"]) for r in rows if r["step"] is not None}
    for kind in blm.KINDS:
        assert {int(r["step"]) for r in rows if r["model"] == kind} == steps
    assert any(r["model"].startswith("bigram") for r in rows)


def test_window_sources_follow_file_starts_and_file_bootstrap_is_wider():
    bos = 0
    # a stream of three files (each starts with BOS) cut into [BOS, 3-token body] windows
    windows = torch.tensor(
        [[bos, bos, 5, 6], [bos, 7, 8, bos], [bos, 9, 9, 9], [bos, 9, bos, 4], [bos, 4, 4, 4]]
    )
    assert blm.window_sources(windows, bos).tolist() == [0, 0, 1, 1, 2]
    # files whose windows agree within a file but differ between files: resampling whole files
    # must give a larger standard error than treating the 40 windows as independent
    files = torch.arange(4).repeat_interleave(10)
    values = torch.tensor([0.0, 1.0, 2.0, 3.0]).repeat_interleave(10) + 0.01 * torch.randn(40)
    assert torch.allclose(blm.file_means(values, files), torch.tensor([0.0, 1, 2, 3]), atol=0.05)
    window_se = values.std().item() / math.sqrt(len(values))
    assert blm.file_bootstrap_se(values, files) > 2 * window_se
    # leave-one-file-out jackknife: for a plain mean over equal-sized files it is the usual
    # standard error of the file means
    means = blm.file_means(values, files)
    assert math.isclose(
        blm.file_jackknife_se(values, files),
        (means.std() / math.sqrt(len(means))).item(),
        rel_tol=1e-4,
    )


def test_top_terms_of_sign_keeps_the_largest_eigenvalues_of_that_sign():
    # sorted by |lambda|, as eigen_decompose returns them
    values = torch.tensor([[3.0, -2.5, 1.0, -0.5]])
    vectors = torch.eye(4)[None]
    z = torch.tensor([[1.0, 1.0, 1.0, 1.0], [0.0, 2.0, 0.0, 1.0]])
    pos = blm.top_terms_of_sign(values, vectors, z, torch.tensor([1.0]))
    neg = blm.top_terms_of_sign(values, vectors, z, torch.tensor([-1.0]))
    assert torch.allclose(pos[:, 0], torch.tensor([4.0, 0.0]))  # 3 + 1
    assert torch.allclose(neg[:, 0], torch.tensor([-3.0, -10.5]))  # -2.5 - 0.5; -2.5*4 - 0.5


def test_twins_trained_apart_equal_twins_trained_side_by_side(tmp_path):
    """--kinds: each twin's start and batches depend only on the seed, so two processes (one per
    twin, two cores) give bit-identical weights, and one record of the two folders."""
    from safetensors.torch import load_file

    config = blm.BilinearLMConfig(
        steps=3, log_every=1, validation_windows=4, checkpoints=(3,), checkpoint_windows=4
    )
    quiet = lambda line: None  # noqa: E731
    together = blm.build(config, tmp_path / "both", log=quiet)
    for kind in reversed(blm.KINDS):  # the other order too: nothing depends on which ran first
        blm.build(replace(config, kinds=(kind,)), tmp_path / kind, log=quiet)
    for kind in blm.KINDS:
        a = load_file(tmp_path / "both" / kind / "model.safetensors")
        b = load_file(tmp_path / kind / kind / "model.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), kind
    apart = blm.run_record([tmp_path / k for k in blm.KINDS], "apart")
    assert apart["models"] == blm.run_record(tmp_path / "both", "both")["models"]
    assert round(together["models"]["gelu"]["validation_loss"], 5) == apart["models"]["gelu"]["validation_loss"]
    # folders that are not one run are refused, with what to do
    with pytest.raises(ValueError, match="--kinds gelu"):
        blm.run_record([tmp_path / "bilinear"], "half")
    with pytest.raises(ValueError, match="more than one"):
        blm.run_record([tmp_path / "both", tmp_path / "gelu"], "twice")
    blm.build(replace(config, kinds=("gelu",), seed=1), tmp_path / "seed1", log=quiet)
    with pytest.raises(ValueError, match="different settings"):
        blm.run_record([tmp_path / "bilinear", tmp_path / "seed1"], "mixed")


def test_build_bilinear_lm_cli_refuses_unknown_kinds(capsys):
    from course_utils.assets.__main__ import main

    with pytest.raises(SystemExit):
        main(["build-bilinear-lm", "--kinds", "relu", "--out", "unused"])
    assert "--kinds takes some of bilinear,gelu" in capsys.readouterr().err
