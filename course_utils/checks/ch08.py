"""Checks for chapter 08, Bilinear layers.

The algebra (8.1-8.3) is compared with the reference on seeded random weights and hand-made edge
cases (one hidden unit, one output, a logit difference, a 1x1 matrix, a batch of matrices);
8.1 and 8.2 also compare gradients, since the text uses them inside trained models. Eigenvectors
(8.3) are defined only up to sign, so they are compared column by column through |v_ref . v|.
The readout exercises (8.4-8.6) run on shared random spectra, on a trained-looking bilinear
model, and on ReLU/GELU models.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from course_utils.checks.core import (
    Case,
    CheckFailed,
    Mistake,
    compare_differentiable,
    compare_function,
    describe_crash,
    exercise,
    lifted_mistakes,
    mismatch,
)
from course_utils.science import bilinear as ref


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------- 8.1 bilinear_tensor


BILINEAR_TENSOR_MISTAKES = [
    Mistake(
        "W1 and W2 swapped",
        lambda W1, W2, P: torch.einsum("oa,aj,ai->oij", P, W1, W2),
        "your B[o] is the TRANSPOSE of the reference: W1 belongs to the first input axis i and W2 "
        "to the second, B[o, i, j] = sum_a P[o, a] W1[a, i] W2[a, j]. (After symmetrising the two "
        "agree, but B itself does not.)",
    ),
    Mistake(
        "projected each factor with P",
        lambda W1, W2, P: torch.einsum("oi,oj->oij", P @ W1, P @ W2),
        "P acts AFTER the product: the layer is P((W1 x) * (W2 x)), not (P W1 x) * (P W2 x). "
        "Keep the hidden index a shared by P, W1 and W2 and sum over it once.",
    ),
    Mistake(
        "no sum over the hidden units",
        lambda W1, W2, P: torch.einsum("oa,ai,aj->oaij", P, W1, W2),
        "your tensor still has the hidden axis a: each output is a SUM over hidden units, "
        "B[o, i, j] = sum_a P[o, a] W1[a, i] W2[a, j], shape [d_out, d_in, d_in].",
    ),
    Mistake(
        "forgot P",
        lambda W1, W2, P: torch.einsum("ai,aj->aij", W1, W2),
        "this is the tensor of the hidden layer, [d_hidden, d_in, d_in]; fold the "
        "down-projection P in so B has one slice per OUTPUT, [d_out, d_in, d_in].",
    ),
    Mistake(
        "weights read as [d_in, d_hidden] (TransformerLens's layout)",
        lambda W1, W2, P: torch.einsum("oa,ia,ja->oij", P, W1, W2),
        "W1 and W2 are [d_hidden, d_in] here (row a is hidden unit a), as in layer(x) = "
        "P((W1 x) * (W2 x)); you indexed them as [d_in, d_hidden], TransformerLens's "
        "right-multiplying layout. Use W1[a, i] and W2[a, j].",
    ),
    Mistake(
        "P transposed",
        lambda W1, W2, P: torch.einsum("ao,ai,aj->oij", P, W1, W2),
        "P is [d_out, d_hidden]: the output index comes FIRST, B[o, i, j] = sum_a P[o, a] "
        "W1[a, i] W2[a, j]; you used P[a, o].",
    ),
    Mistake(
        "symmetrised",
        lambda W1, W2, P: ref.symmetrize(ref.bilinear_tensor(W1, W2, P)),
        "your B is already symmetric in (i, j). That is right for interaction matrices "
        "(exercise 8.2), but here return B itself: sum_a P[o, a] W1[a, i] W2[a, j].",
    ),
]


def _tensor_cases() -> list[Case]:
    g = _gen(0)
    W1, W2, P = (
        torch.randn(5, 4, generator=g),
        torch.randn(5, 4, generator=g),
        torch.randn(3, 5, generator=g),
    )
    w1, w2 = torch.randn(1, 6, generator=g), torch.randn(1, 6, generator=g)
    return [
        Case("d_in 4, d_hidden 5, d_out 3", (W1, W2, P)),
        Case("one hidden unit (rank-1 slices)", (w1, w2, torch.tensor([[2.0], [-1.0]]))),
        Case(
            "one output, 7 hidden, 3 inputs",
            (
                torch.randn(7, 3, generator=g),
                torch.randn(7, 3, generator=g),
                torch.randn(1, 7, generator=g),
            ),
        ),
        Case("W1 = W2 (a squaring layer)", (W1, W1.clone(), P)),
        Case("P = 0", (W1, W2, torch.zeros(3, 5))),
        # square: a transposed weight gives numbers, not a shape error
        Case(
            "d_in = d_hidden = d_out = 4", tuple(torch.randn(4, 4, generator=g) for _ in range(3))
        ),
        Case("float64 weights", (W1.double(), W2.double(), P.double())),
    ]


_TENSOR_WRT = {"W1": 0, "W2": 1, "P": 2}


@exercise("8.1", "bilinear_tensor")
def bilinear_tensor(learner) -> str:
    return compare_differentiable(
        learner,
        ref.bilinear_tensor,
        _tensor_cases(),
        BILINEAR_TENSOR_MISTAKES,
        _TENSOR_WRT,
        "W1, W2 and P",
    )


# ---------------------------------------------------------------- 8.2 interaction_matrix


INTERACTION_MISTAKES = [
    Mistake(
        "not symmetrised",
        lambda B, u: torch.einsum("o,oij->ij", u, B),
        "your Q is not symmetric. x^T A x only sees the symmetric part of A: return "
        "(M + M.T) / 2 where M = sum_o u[o] B[o].",
    ),
    Mistake(
        "M + M^T without halving",
        lambda B, u: 2 * ref.interaction_matrix(B, u),
        "your Q is twice the reference: the symmetric part is (M + M.T) / 2, not M + M.T "
        "(check: x^T Q x must equal u . layer(x)).",
    ),
    Mistake(
        "u normalised",
        lambda B, u: ref.interaction_matrix(B, u / u.norm()),
        "you normalised u. Use it as given, so that x^T Q x equals u . layer(x) exactly "
        "(a logit difference e_a - e_b has length sqrt 2, and that is part of it).",
    ),
    Mistake(
        "contracted an input axis",
        lambda B, u: ref.symmetrize(torch.einsum("i,oij->oj", u, B)),
        "u weighs the OUTPUTS, the first axis of B: Q = sum_o u[o] B[o, :, :] "
        "(einsum 'o, o i j -> i j'), not an input axis.",
    ),
    Mistake(
        "transpose of the whole tensor",
        lambda B, u: ref.symmetrize(torch.einsum("o,ijo->ij", u, B)),
        "u weighs the OUTPUTS, the first axis of B: Q = sum_o u[o] B[o, :, :] "
        "(einsum 'o, o i j -> i j'), not an input axis.",
    ),
]


def _interaction_cases() -> list[Case]:
    g = _gen(1)
    B = torch.randn(3, 4, 4, generator=g)
    B_sq = torch.randn(5, 5, 5, generator=g)  # d_out = d_in: axis mix-ups give numbers, not crashes
    return [
        Case("d_out 3, d_in 4, random u", (B, torch.randn(3, generator=g))),
        Case("d_out = d_in = 5", (B_sq, torch.randn(5, generator=g))),
        Case("a logit: u = e_2", (B_sq, torch.tensor([0.0, 0.0, 1.0, 0.0, 0.0]))),
        Case("a logit difference e_0 - e_1", (B, torch.tensor([1.0, -1.0, 0.0]))),
        Case("one output", (torch.randn(1, 3, 3, generator=g), torch.tensor([0.5]))),
        Case("float64 B and u", (B.double(), torch.randn(3, generator=g).double())),
    ]


_INTERACTION_WRT = {"B": 0, "u": 1}


@exercise("8.2", "interaction_matrix")
def interaction_matrix(learner) -> str:
    return compare_differentiable(
        learner,
        ref.interaction_matrix,
        _interaction_cases(),
        INTERACTION_MISTAKES,
        _INTERACTION_WRT,
        "B and u",
    )


# ---------------------------------------------------------------- 8.3 eigen_decompose


def _eig_compare(expected: tuple, actual: Any) -> str | None:
    if not isinstance(actual, (tuple, list)) or len(actual) != 2:
        return f"return a tuple (eigenvalues, eigenvectors), got {type(actual).__name__}"
    values, vectors = actual
    problem = mismatch(expected[0], values, 1e-4, 1e-4, "eigenvalues")
    if problem:
        return problem
    if not isinstance(vectors, torch.Tensor) or vectors.shape != expected[1].shape:
        shape = (
            tuple(vectors.shape) if isinstance(vectors, torch.Tensor) else type(vectors).__name__
        )
        return f"eigenvectors should have shape {tuple(expected[1].shape)}, got {shape}"
    if vectors.is_complex():
        return "eigenvectors are complex: use torch.linalg.eigh (for symmetric matrices), not eig"
    # columns agree up to sign: |v_ref_i . v_i| = 1 for every i
    dots = (expected[1].double() * vectors.detach().double()).sum(-2).abs()
    worst = (dots - 1).abs().amax()
    if worst > 1e-3:
        idx = tuple(int(i) for i in torch.unravel_index((dots - 1).abs().argmax(), dots.shape))
        return (
            f"eigenvector (column) {idx[-1]}"
            + (f" of matrix {idx[:-1]}" if len(idx) > 1 else "")
            + f" does not match: |v_ref . v| = {dots[idx].item():.3f}, expected 1 (eigenvectors "
            "are compared up to sign)"
        )
    return None


def _eig_unsorted(Q):
    return tuple(torch.linalg.eigh(Q))


def _eig_signed_desc(Q):
    values, vectors = torch.linalg.eigh(Q)
    return values.flip(-1), vectors.flip(-1)


def _eig_rows(Q):
    values, vectors = ref.eigen_decompose(Q)
    return values, vectors.transpose(-1, -2)


def _eig_values_only_sorted(Q):
    values, vectors = torch.linalg.eigh(Q)
    order = values.abs().argsort(dim=-1, descending=True)
    return values.gather(-1, order), vectors


def _eig_abs_values(Q):
    values, vectors = ref.eigen_decompose(Q)
    return values.abs(), vectors


def _eig_single_matrix(Q):
    # right for one [d, d] matrix; on a batch, values[order] indexes the BATCH axis (IndexError)
    values, vectors = torch.linalg.eigh(Q)
    order = values.abs().argsort(descending=True)
    return values[order], vectors[:, order]


def _eig_sorted_rows(Q):
    values, vectors = torch.linalg.eigh(Q)
    order = values.abs().argsort(dim=-1, descending=True)
    return values.gather(-1, order), vectors.gather(-2, order.unsqueeze(-1).expand_as(vectors))


EIGEN_MISTAKES = [
    Mistake(
        "eigh's ascending order",
        _eig_unsorted,
        "torch.linalg.eigh returns eigenvalues in ASCENDING order (most negative first). Sort by "
        "absolute value, largest first: `order = values.abs().argsort(dim=-1, descending=True)`.",
    ),
    Mistake(
        "sorted by signed value",
        _eig_signed_desc,
        "you sorted by the signed eigenvalue, so large NEGATIVE eigenvalues end up last. They "
        "matter as much as positive ones (they push the output down): sort by |value|.",
    ),
    Mistake(
        "eigenvectors as rows",
        _eig_rows,
        "eigenvectors are the COLUMNS of eigh's matrix (V[:, i] goes with values[i]); you "
        "returned them as rows. Reorder the columns and return the matrix, not its transpose.",
    ),
    Mistake(
        "sorted the eigenvalues but not the eigenvectors",
        _eig_values_only_sorted,
        "your eigenvalues are in the right order but the eigenvectors are still in eigh's order: "
        "apply the SAME permutation to the columns, e.g. `vectors[..., order]` for one matrix "
        "or `vectors.gather(-1, order.unsqueeze(-2).expand_as(vectors))` for a batch.",
    ),
    Mistake(
        "returned |eigenvalues|",
        _eig_abs_values,
        "sort BY |value| but return the signed eigenvalues: the sign says whether an eigenvector "
        "pushes the output up or down.",
    ),
    Mistake(
        "permuted rows instead of columns",
        _eig_sorted_rows,
        "you applied the sort to the ROWS of the eigenvector matrix. Eigenvectors are columns: "
        "permute the last axis (`vectors[..., order]` for one matrix).",
    ),
    Mistake(
        "a single-matrix answer (values[order], vectors[:, order])",
        _eig_single_matrix,
        "this case is a BATCH of matrices, Q of shape [..., d, d] (here [3, 5, 5]; later cells "
        "decompose all ten classes at once), and `values[order]` / `vectors[:, order]` index "
        "the batch axis. Sort along the LAST axis (`order = values.abs().argsort(dim=-1, "
        "descending=True)`) and reorder with `values.gather(-1, order)` and "
        "`torch.take_along_dim(vectors, order.unsqueeze(-2), dim=-1)` (or gather).",
    ),
]


def _sym(M: torch.Tensor) -> torch.Tensor:
    return (M + M.transpose(-1, -2)) / 2


def _eig_cases() -> list[Case]:
    g = _gen(2)
    return [
        Case("random symmetric 6x6", (_sym(torch.randn(6, 6, generator=g)),)),
        Case("diagonal, mixed signs", (torch.diag(torch.tensor([0.5, -3.0, 2.0, -0.1])),)),
        Case("a batch of 3 matrices, 5x5", (_sym(torch.randn(3, 5, 5, generator=g)),)),
        Case(
            "one product unit (w v^T + v w^T)/2",
            (_sym(torch.outer(torch.tensor([1.0, 2.0, 0.0]), torch.tensor([0.5, 0.0, -1.0]))),),
        ),
        Case("1x1", (torch.tensor([[-2.0]]),)),
        Case("float64, 5x5", (_sym(torch.randn(5, 5, generator=g, dtype=torch.float64)),)),
    ]


@exercise("8.3", "eigen_decompose")
def eigen_decompose(learner) -> str:
    return (
        compare_function(
            learner, ref.eigen_decompose, _eig_cases(), EIGEN_MISTAKES, compare=_eig_compare
        )
        + " (eigenvectors compared up to sign)"
    )


# ---------------------------------------------------------------- 8.5 truncated_logits


def _trunc_ascending(values, vectors, x, k):
    # the last k of eigh's ascending order = the k most positive
    return ref.truncated_logits(values.flip(-1), vectors.flip(-1), x, k)


TRUNCATED_MISTAKES = [
    Mistake(
        "not squared",
        lambda lam, V, x, k: torch.einsum(
            "bci,ci->bc", torch.einsum("bd,cdi->bci", x, V[..., :k]), lam[..., :k]
        ),
        "each eigenvector's contribution is QUADRATIC in x: lambda_i (v_i . x)^2. Square the "
        "projections before weighting them.",
    ),
    Mistake(
        "no eigenvalue weights",
        lambda lam, V, x, k: torch.einsum("bd,cdi->bci", x, V[..., :k]).pow(2).sum(-1),
        "weight each squared projection by its eigenvalue: sum_i lambda_i (v_i . x)^2 (negative "
        "eigenvalues vote AGAINST the class).",
    ),
    Mistake(
        "eigenvectors as rows",
        lambda lam, V, x, k: (
            torch.einsum("bd,cid->bci", x, V[:, :k, :]).pow(2).mul(lam[..., :k]).sum(-1)
        ),
        "the eigenvectors are the COLUMNS V[c, :, i] (as eigen_decompose returns them, see "
        "exercise 8.3); you projected onto rows V[c, i, :]. Take `V[..., :k]` (shape "
        "[classes, d, k]) and contract its middle axis with x: 'b i, c i k -> b c k'.",
    ),
    Mistake(
        "the last k instead of the first k",
        lambda lam, V, x, k: ref.truncated_logits(lam.flip(-1), V.flip(-1), x, k),
        "keep the FIRST k eigenvectors: they come sorted by |eigenvalue|, largest first.",
    ),
    Mistake(
        "k + 1 eigenvectors",
        lambda lam, V, x, k: ref.truncated_logits(lam, V, x, min(k + 1, lam.shape[-1])),
        "off by one: keep eigenvectors 0 .. k-1 (`[..., :k]`), so k = 0 gives all-zero logits.",
    ),
    Mistake(
        "|eigenvalues|",
        lambda lam, V, x, k: ref.truncated_logits(lam.abs(), V, x, k),
        "keep the eigenvalues' SIGNS: a negative eigenvalue is evidence against the class.",
    ),
]


def _trunc_cases() -> list[Case]:
    g = _gen(3)
    Q = _sym(torch.randn(4, 6, 6, generator=g))
    values, vectors = ref.eigen_decompose(Q)
    x = torch.randn(5, 6, generator=g)
    Q1 = _sym(torch.randn(1, 3, 3, generator=g))
    v1, V1 = ref.eigen_decompose(Q1)
    return [
        Case("4 classes, d 6, k = 2", (values, vectors, x, 2)),
        Case("k = 1", (values, vectors, x, 1)),
        Case("k = d (exact x^T Q x)", (values, vectors, x, 6)),
        Case("k = 0 (nothing kept)", (values, vectors, x, 0)),
        Case("one class, a batch of one", (v1, V1, torch.randn(1, 3, generator=g), 2)),
    ]


@exercise("8.5", "truncated_logits")
def truncated_logits(learner) -> str:
    return compare_function(
        learner, ref.truncated_logits, _trunc_cases(), TRUNCATED_MISTAKES, atol=1e-4
    )


# ---------------------------------------------------------------- 8.4 effective_rank


EFFECTIVE_RANK_MISTAKES = [
    Mistake(
        "NaN for an all-zero spectrum",
        lambda lam: (lam.abs().sum(-1) / lam.pow(2).sum(-1).sqrt()) ** 2,
        "an all-zero spectrum gives 0 / 0 = NaN. Return 0 there: "
        "`torch.where(l2 > 0, ..., torch.zeros_like(l1))` with `l2.clamp_min(...)` inside.",
    ),
    Mistake(
        "L1 / L2 not squared",
        lambda lam: lam.abs().sum(-1) / lam.pow(2).sum(-1).sqrt(),
        "square the ratio: (L1 / L2)^2. Without the square, d equal eigenvalues give sqrt(d), "
        "not d.",
    ),
    Mistake(
        "signed sum",
        lambda lam: torch.nan_to_num((lam.sum(-1) / lam.pow(2).sum(-1).sqrt()) ** 2),
        "the L1 norm sums ABSOLUTE values; a signed sum lets a +/- pair cancel out "
        "(a product of two features would look like rank 0).",
    ),
    Mistake(
        "divided by d",
        lambda lam: ref.effective_rank(lam) / lam.shape[-1],
        "do not divide by the length: the effective rank is a count of eigenvalues (1 for one "
        "non-zero eigenvalue, d for d equal ones), not a fraction.",
    ),
]


def _rank_cases() -> list[Case]:
    g = _gen(4)
    return [
        Case("random spectra, 3 classes x 8", (torch.randn(3, 8, generator=g),)),
        Case("one non-zero eigenvalue (-> 1)", (torch.tensor([0.0, -2.5, 0.0, 0.0]),)),
        Case("4 equal eigenvalues (-> 4)", (torch.full((4,), 0.7),)),
        Case("a +/- pair (-> 2)", (torch.tensor([1.5, -1.5, 0.0]),)),
        Case("all zero (-> 0)", (torch.zeros(2, 5),)),
    ]


@exercise("8.4", "effective_rank")
def effective_rank(learner) -> str:
    return compare_function(
        learner, ref.effective_rank, _rank_cases(), EFFECTIVE_RANK_MISTAKES, atol=1e-4
    )


# ---------------------------------------------------------------- 8.6 logit_hessian


def _small_models() -> dict[str, nn.Module]:
    with torch.random.fork_rng():
        torch.manual_seed(5)
        models = {
            "bilinear": ref.BilinearClassifier(6, 5, 3),
            "gelu": ref.MLPClassifier(6, 7, 3, activation="gelu"),
            "relu": ref.MLPClassifier(6, 7, 3, activation="relu"),
        }
        for m in models.values():
            for p in m.parameters():
                p.data.normal_(0, 0.7)  # biases non-zero too
    return models


def _run_hessian(fn: Callable) -> Callable:
    def run(kind: str, seed: int, c: int) -> torch.Tensor:
        model = _small_models()[kind]
        x = torch.randn(6, generator=_gen(seed))
        out = fn(model, x, c)
        leftover = [
            n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0
        ]
        if leftover:
            raise CheckFailed(
                f"your function left gradients in the model's parameters ({', '.join(leftover)}). "
                "Differentiate with respect to the INPUT only (torch.func.hessian, or "
                "torch.autograd.grad(..., create_graph=True) on a copy of x), not with .backward()."
            )
        return out.detach() if isinstance(out, torch.Tensor) else out

    return run


def _hess_of(f: Callable) -> Callable:
    return lambda model, x, c: torch.func.hessian(lambda z: f(model, z, c))(x)


HESSIAN_MISTAKES = [
    Mistake(
        "Hessian of the sum of the logits",
        _hess_of(lambda m, z, c: m(z.unsqueeze(0)).sum()),
        "you differentiated the SUM of all logits; take logit c alone: `model(x[None])[0, c]`.",
    ),
    Mistake(
        "Hessian of the log-probability",
        _hess_of(lambda m, z, c: torch.log_softmax(m(z.unsqueeze(0)), -1)[0, c]),
        "that is the Hessian of log p(c | x); the exercise asks for the LOGIT (the model's raw "
        "output), whose Hessian for a bilinear model is the constant 2 Q_c.",
    ),
    Mistake(
        "Hessian of the probability",
        _hess_of(lambda m, z, c: torch.softmax(m(z.unsqueeze(0)), -1)[0, c]),
        "that is the Hessian of the softmax probability; the exercise asks for the raw LOGIT.",
    ),
    Mistake(
        "outer product of the gradient",
        lambda m, x, c: (lambda g: torch.outer(g, g))(
            torch.func.jacrev(lambda z: m(z.unsqueeze(0))[0, c])(x)
        ),
        "g g^T (the outer product of the gradient) is not the Hessian. Differentiate twice: "
        "`torch.func.hessian(f)(x)` with `f = lambda z: model(z[None])[0, c]`.",
    ),
    Mistake(
        "the interaction matrix Q_c, without the 2",
        lambda m, x, c: ref.logit_hessian(m, x, c) / 2,
        "your result is half the Hessian. d^2/dx^2 of x^T Q x is 2 Q (Q symmetric).",
    ),
    Mistake(
        "4 Q_c (the 2 counted twice)",
        lambda m, x, c: ref.logit_hessian(m, x, c) * 2,
        "your result is twice the Hessian. For x^T Q x with Q symmetric the Hessian is 2 Q, "
        "i.e. M + M^T for M = B_c, not 2 (M + M^T).",
    ),
    Mistake(
        "2 B_c from the weights, not symmetrised",
        lambda m, x, c: (
            2 * ref.bilinear_tensor(m.W1, m.W2, m.P)[c].detach()
            if isinstance(m, ref.BilinearClassifier)
            else ref.logit_hessian(m, x, c)
        ),
        "a Hessian is symmetric: the second derivative of x^T M x is M + M^T = 2 sym(M), not "
        "2 M. (Computing it from the weights is fine for the bilinear model; symmetrise B_c.)",
    ),
]


def _hessian_cases() -> list[Case]:
    return [
        Case("bilinear model, class 0", ("bilinear", 0, 0)),
        Case("bilinear model, class 2, another x", ("bilinear", 1, 2)),
        Case("GELU MLP, class 1", ("gelu", 2, 1)),
        Case("GELU MLP, class 1, another x", ("gelu", 3, 1)),
        Case("ReLU MLP (zero almost everywhere)", ("relu", 4, 0)),
    ]


@exercise("8.6", "logit_hessian")
def logit_hessian(learner) -> str:
    if not callable(learner):
        raise CheckFailed(f"pass the function itself, got {type(learner).__name__}.")
    return (
        compare_function(
            _run_hessian(learner),
            _run_hessian(ref.logit_hessian),
            _hessian_cases(),
            lifted_mistakes(HESSIAN_MISTAKES, _run_hessian),
            atol=1e-4,
        )
        + "; no gradients left in the model"
    )


# ---------------------------------------------------------------- 8.7 mlp_interaction_matrix


def _tl_sym(M: torch.Tensor) -> torch.Tensor:
    return (M + M.T) / 2


def _blm_mlp_interaction(W_gate, W_in, W_out, u):
    from course_utils.science import bilinear_lm

    return bilinear_lm.mlp_interaction_matrix(W_gate, W_in, W_out, u)


_U_RESCALED_HINT = (
    "you rescaled u (normalised it, or divided by |u|^2). Use it as given, as in exercise 8.2: "
    "Q_u must give u . (mlp_out(z) - b_out) = z^T Q_u z exactly, and Q_u is linear in u (a "
    "logit direction or a difference of two has its own length, and that is part of it)."
)

TL_TRANSPOSED_HINT = (
    "your function gives the right Q when it is handed W_gate.T, W_in.T and W_out.T: it reads "
    "the weights in section 1's layout (W1, W2 as [d_hidden, d_in], P as [d_out, d_hidden]). "
    "TransformerLens stores the transposes (W_gate and W_in are [d_model, d_mlp], W_out is "
    "[d_mlp, d_model]), so transpose them first: "
    "`interaction_matrix(bilinear_tensor(W_gate.T, W_in.T, W_out.T), u)`."
)

MLP_INTERACTION_MISTAKES = [
    Mistake(
        "not symmetrised",
        lambda W_gate, W_in, W_out, u: (W_gate * (W_out @ u)) @ W_in.T,
        "your matrix is not symmetric: z^T M z only sees the symmetric part, so return "
        "Q = (M + M^T) / 2 with M = sum_a h_a w_gate_a w_in_a^T.",
    ),
    Mistake(
        "W_in used for both factors",
        lambda W_gate, W_in, W_out, u: _tl_sym((W_in * (W_out @ u)) @ W_in.T),
        "the two factors of hidden unit a are DIFFERENT directions: the gate column W_gate[:, a] "
        "and the linear column W_in[:, a]. Use one of each: M = W_gate diag(h) W_in^T.",
    ),
    Mistake(
        "W_gate used for both factors",
        lambda W_gate, W_in, W_out, u: _tl_sym((W_gate * (W_out @ u)) @ W_gate.T),
        "the two factors of hidden unit a are DIFFERENT directions: the gate column W_gate[:, a] "
        "and the linear column W_in[:, a]. Use one of each: M = W_gate diag(h) W_in^T.",
    ),
    Mistake(
        "u not sent through W_out",
        lambda W_gate, W_in, W_out, u: _tl_sym(W_gate @ W_in.T) * u.sum(),
        "each hidden unit a writes W_out[a] to the residual stream, so its weight for direction "
        "u is h_a = W_out[a] . u (h = W_out @ u, one number per hidden unit), not the same "
        "number for all of them.",
    ),
    Mistake(
        "W_out transposed",
        lambda W_gate, W_in, W_out, u: _tl_sym((W_gate * (W_out.T @ u)) @ W_in.T),
        "W_out is [d_mlp, d_model]: hidden unit a writes the ROW W_out[a], so its weight along u "
        "is h = W_out @ u, not W_out.T @ u.",
    ),
    Mistake(
        "the d_mlp x d_mlp matrix (weights transposed)",
        lambda W_gate, W_in, W_out, u: _tl_sym((W_gate.T * (W_out @ u)) @ W_in),
        "TransformerLens multiplies from the right: W_gate and W_in are [d_model, d_mlp], so "
        "hidden unit a's directions are the COLUMNS W_gate[:, a] and W_in[:, a] and Q is "
        "[d_model, d_model]: M = (W_gate * h) @ W_in.T.",
    ),
    Mistake(
        "forgot the 1/2",
        lambda W_gate, W_in, W_out, u: (lambda M: M + M.T)((W_gate * (W_out @ u)) @ W_in.T),
        "your Q is twice the reference: the symmetric part is (M + M^T) / 2.",
    ),
    Mistake(
        "u normalised",
        lambda W_gate, W_in, W_out, u: _blm_mlp_interaction(W_gate, W_in, W_out, u / u.norm()),
        _U_RESCALED_HINT,
    ),
    Mistake(
        "divided by |u|^2",
        lambda W_gate, W_in, W_out, u: _blm_mlp_interaction(W_gate, W_in, W_out, u) / u.norm() ** 2,
        _U_RESCALED_HINT,
    ),
]


def _mlp_interaction_cases() -> list[Case]:
    g = _gen(7)

    def weights(d_model: int, d_mlp: int) -> tuple[torch.Tensor, ...]:
        return (
            torch.randn(d_model, d_mlp, generator=g),
            torch.randn(d_model, d_mlp, generator=g),
            torch.randn(d_mlp, d_model, generator=g),
        )

    small, square = weights(4, 6), weights(5, 5)  # square: axis mix-ups give numbers, not crashes
    return [
        Case("d_model 4, d_mlp 6, random u", (*small, torch.randn(4, generator=g))),
        Case("d_model = d_mlp = 5, random u", (*square, torch.randn(5, generator=g))),
        Case("u = e_1 (one residual coordinate)", (*small, torch.tensor([0.0, 1.0, 0.0, 0.0]))),
        Case("u = e_0 - e_3 (a difference)", (*square, torch.tensor([1.0, 0, 0, -1.0, 0]))),
        Case("one hidden unit", (*weights(3, 1), torch.randn(3, generator=g))),
        Case(
            "float64, d_model 4, d_mlp 6",
            tuple(t.double() for t in (*weights(4, 6), torch.randn(4, generator=g))),
        ),
    ]


_MLP_ATOL, _MLP_RTOL = 1e-4, 1e-4  # compare_function's tolerances for 8.7, used by the probe too


@exercise("8.7", "mlp_interaction_matrix")
def mlp_interaction_matrix(learner) -> str:
    from course_utils.science import bilinear_lm

    cases = _mlp_interaction_cases()
    try:
        return compare_function(
            learner,
            bilinear_lm.mlp_interaction_matrix,
            cases,
            MLP_INTERACTION_MISTAKES,
            atol=_MLP_ATOL,
            rtol=_MLP_RTOL,
        )
    except NotImplementedError:
        raise
    except CheckFailed as failure:
        if "Hint:" in str(failure) or not _right_on_transposed_weights(learner, cases):
            raise
        raise CheckFailed(f"{failure} Hint: {TL_TRANSPOSED_HINT}") from None
    except Exception as error:  # e.g. an einsum shape error from the untransposed weights
        if not _right_on_transposed_weights(learner, cases):
            raise
        raise CheckFailed(f"{describe_crash(error)}. Hint: {TL_TRANSPOSED_HINT}") from None


def _right_on_transposed_weights(learner: Callable, cases: list[Case]) -> bool:
    """True when the learner's function, handed W_gate.T, W_in.T, W_out.T, matches the reference
    on every case: it is written for section 1's [d_hidden, d_in] layout, not TransformerLens's."""
    from course_utils.science import bilinear_lm

    for case in cases:
        W_gate, W_in, W_out, u = copy.deepcopy(case.args)
        try:
            actual = learner(W_gate.T, W_in.T, W_out.T, u)
        except Exception:
            return False
        expected = bilinear_lm.mlp_interaction_matrix(*copy.deepcopy(case.args))
        if mismatch(expected, actual, _MLP_ATOL, _MLP_RTOL) is not None:
            return False
    return True
