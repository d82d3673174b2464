"""Bilinear layers (Sharkey 2023; Pearce et al. 2025): the tensor, interaction matrices, their
eigenvectors, and small classifiers on scikit-learn's bundled 8x8 digits.

Reference implementations for chapter 08.

Shape convention:
- a bilinear layer has weights ``W1, W2`` of shape ``[d_hidden, d_in]`` and an optional
  down-projection ``P`` of shape ``[d_out, d_hidden]``; it computes ``P((W1 x) * (W2 x))``;
- its third-order tensor is ``B[o, i, j] = sum_a P[o, a] W1[a, i] W2[a, j]``, shape
  ``[d_out, d_in, d_in]`` (``[d_hidden, d_in, d_in]`` without ``P``);
- the interaction matrix of an output direction ``u`` (length ``d_out``) is the symmetric
  ``Q = sym(sum_o u[o] B[o])``, so ``u . layer(x) = x^T Q x``;
- eigenvectors are the COLUMNS of the returned matrix (as ``torch.linalg.eigh`` returns them),
  sorted by ``|eigenvalue|``, largest first.

Data: ``load_digits_split`` reads the 1,797 digits that ship inside scikit-learn (no download).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import einops
import torch
from jaxtyping import Float, Int
from torch import Tensor, nn

#: Data sets this chapter can use with no network. Anything else gets a clear error.
OFFLINE_DATASETS = ("digits",)

# ----------------------------------------------------------------------------- data


@dataclass(frozen=True)
class DigitsSplit:
    """Pixels scaled to [0, 1] (the raw values 0-16 divided by 16), flattened to 64 numbers."""

    X_train: Float[Tensor, "n_train 64"]
    y_train: Int[Tensor, "n_train"]  # noqa: F821
    X_test: Float[Tensor, "n_test 64"]
    y_test: Int[Tensor, "n_test"]  # noqa: F821
    image_shape: tuple[int, int] = (8, 8)


def load_digits_split(
    dataset: str = "digits", test_size: float = 0.25, seed: int = 0
) -> DigitsSplit:
    """scikit-learn's bundled 8x8 digits, split train/test with stratification (no download).

    ``load_digits`` reads ``digits.csv.gz`` from inside the scikit-learn package, so this works
    offline. With the defaults: 1,347 training and 450 test images.
    """
    if dataset not in OFFLINE_DATASETS:
        raise ValueError(
            f"dataset {dataset!r} is not available offline. This chapter uses the 8x8 digits "
            "that ship inside scikit-learn: pass dataset='digits'. (MNIST and Fashion-MNIST, "
            "the paper's data sets, need a download; see 'Going further' in the notebook.)"
        )
    if not 0 < test_size < 1:
        raise ValueError(f"test_size must lie in (0, 1), got {test_size!r}.")
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as error:  # pragma: no cover - the course pins scikit-learn
        raise ImportError(
            "chapter 08 needs scikit-learn for its bundled digits: "
            "`pip install 'scikit-learn>=1.6'` (or `make install` in the course checkout)."
        ) from error
    digits = load_digits()
    X = digits.data.astype("float32") / 16.0
    y = digits.target.astype("int64")
    X_tr, X_te, y_tr, y_te = train_test_split(
        X, y, test_size=test_size, random_state=seed, stratify=y
    )
    return DigitsSplit(
        torch.from_numpy(X_tr),
        torch.from_numpy(y_tr),
        torch.from_numpy(X_te),
        torch.from_numpy(y_te),
    )


# ----------------------------------------------------------------------------- the algebra


def check_bilinear_weights(W1: Tensor, W2: Tensor, P: Tensor | None = None) -> None:
    """Raise a clear ValueError unless W1, W2 (and P) form a bilinear layer."""
    for name, W in (("W1", W1), ("W2", W2)):
        if not isinstance(W, Tensor) or W.ndim != 2:
            shape = tuple(W.shape) if isinstance(W, Tensor) else type(W).__name__
            raise ValueError(f"{name} must be a 2-D tensor [d_hidden, d_in], got {shape}.")
    if W1.shape != W2.shape:
        raise ValueError(
            f"W1 and W2 must have the same shape [d_hidden, d_in] to form a bilinear layer "
            f"(W1 x and W2 x are multiplied elementwise), got W1 {tuple(W1.shape)} and "
            f"W2 {tuple(W2.shape)}."
        )
    if P is not None and (not isinstance(P, Tensor) or P.ndim != 2 or P.shape[1] != W1.shape[0]):
        shape = tuple(P.shape) if isinstance(P, Tensor) else type(P).__name__
        raise ValueError(
            f"P must be a 2-D tensor [d_out, d_hidden] with d_hidden = {W1.shape[0]} "
            f"(the rows of W1), got {shape}."
        )


def bilinear_forward(
    x: Float[Tensor, "batch d_in"],
    W1: Float[Tensor, "d_hidden d_in"],
    W2: Float[Tensor, "d_hidden d_in"],
    P: Float[Tensor, "d_out d_hidden"] | None = None,
) -> Float[Tensor, "batch d_out"]:
    """The layer itself: ``P((W1 x) * (W2 x))`` (no P: the hidden product)."""
    check_bilinear_weights(W1, W2, P)
    if x.shape[-1] != W1.shape[1]:
        raise ValueError(f"x has {x.shape[-1]} features, the layer expects d_in = {W1.shape[1]}.")
    hidden = (x @ W1.T) * (x @ W2.T)
    return hidden if P is None else hidden @ P.T


def bilinear_tensor(
    W1: Float[Tensor, "d_hidden d_in"],
    W2: Float[Tensor, "d_hidden d_in"],
    P: Float[Tensor, "d_out d_hidden"] | None = None,
) -> Float[Tensor, "d_out d_in d_in"]:
    """``B[o, i, j] = sum_a P[o, a] W1[a, i] W2[a, j]`` (without P: ``B[a, i, j] = W1[a, i]
    W2[a, j]``). Not symmetrised: ``B[o]`` is the sum of outer products ``w_a v_a^T``."""
    check_bilinear_weights(W1, W2, P)
    if P is None:
        return einops.einsum(W1, W2, "a i, a j -> a i j")
    return einops.einsum(P, W1, W2, "o a, a i, a j -> o i j")


def symmetrize(B: Float[Tensor, "... d d"]) -> Float[Tensor, "... d d"]:
    """``(B + B^T) / 2`` over the last two axes: the only part a quadratic form sees."""
    return (B + B.transpose(-1, -2)) / 2


def interaction_matrix(
    B: Float[Tensor, "d_out d_in d_in"],
    u: Float[Tensor, "d_out"],  # noqa: F821
) -> Float[Tensor, "d_in d_in"]:
    """The symmetric ``Q = sym(sum_o u[o] B[o])``, so that ``u . layer(x) = x^T Q x``."""
    if B.ndim != 3 or B.shape[1] != B.shape[2]:
        raise ValueError(f"B must have shape [d_out, d_in, d_in], got {tuple(B.shape)}.")
    if u.ndim != 1 or u.shape[0] != B.shape[0]:
        raise ValueError(
            f"the output direction u must be a vector of length d_out = {B.shape[0]} (one weight "
            f"per output of the layer), got shape {tuple(u.shape)}."
        )
    return symmetrize(einops.einsum(u, B, "o, o i j -> i j"))


def eigen_decompose(
    Q: Float[Tensor, "... d d"],
) -> tuple[Float[Tensor, "... d"], Float[Tensor, "... d d"]]:
    """Eigenvalues sorted by |value| (largest first) and the matching eigenvectors as COLUMNS.

    ``Q`` must be symmetric (as :func:`interaction_matrix` returns it); a batch of matrices is
    decomposed matrix by matrix. ``Q == V @ diag(values) @ V.T``.
    """
    if Q.ndim < 2 or Q.shape[-1] != Q.shape[-2]:
        raise ValueError(f"Q must be a square matrix [..., d, d], got {tuple(Q.shape)}.")
    scale = Q.abs().amax().clamp_min(1e-30)
    if ((Q - Q.transpose(-1, -2)).abs().amax() > 1e-4 * scale).item():
        raise ValueError(
            "Q is not symmetric: decompose the symmetric part, `symmetrize(Q)` "
            "(x^T Q x only sees (Q + Q^T) / 2)."
        )
    values, vectors = torch.linalg.eigh(Q)
    order = values.abs().argsort(dim=-1, descending=True, stable=True)
    values = values.gather(-1, order)
    vectors = vectors.gather(-1, order.unsqueeze(-2).expand_as(vectors))
    return values, vectors


def effective_rank(eigenvalues: Float[Tensor, "... d"]) -> Float[Tensor, "..."]:
    """``(sum |l| / sqrt(sum l^2))^2``: 1 for one non-zero eigenvalue, d for d equal ones,
    0 for all zeros (Pearce et al.'s "continuous L0" of a spectrum)."""
    l1 = eigenvalues.abs().sum(-1)
    l2 = eigenvalues.pow(2).sum(-1).sqrt()
    return torch.where(l2 > 0, (l1 / l2.clamp_min(1e-30)) ** 2, torch.zeros_like(l1))


def truncated_logits(
    eigenvalues: Float[Tensor, "classes d"],
    eigenvectors: Float[Tensor, "classes d d"],
    x: Float[Tensor, "batch d"],
    k: int,
) -> Float[Tensor, "batch classes"]:
    """``logit_c(x) ~ sum_{i < k} l_ci (v_ci . x)^2``, keeping each class's top-k eigenvectors
    (inputs sorted as :func:`eigen_decompose` returns them). ``k = d`` gives the exact logits."""
    d = eigenvalues.shape[-1]
    if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= d:
        raise ValueError(f"k must be an int in [0, {d}], got {k!r}.")
    proj = einops.einsum(x, eigenvectors[..., :k], "b i, c i k -> b c k")
    return einops.einsum(proj.pow(2), eigenvalues[..., :k], "b c k, c k -> b c")


def unit_interaction_eigen(w: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """One hidden unit's symmetrised matrix ``(w v^T + v w^T)/2``: its two non-zero eigenvalues
    ``|w||v|(cos t +- 1)/2`` and eigenvectors ``w/|w| +- v/|v|`` (normalised), derived exactly."""
    nw, nv = w.norm(), v.norm()
    cos = (w @ v) / (nw * nv)
    values = torch.stack([nw * nv * (cos + 1) / 2, nw * nv * (cos - 1) / 2])
    plus, minus = w / nw + v / nv, w / nw - v / nv
    return values, torch.stack([plus / plus.norm(), minus / minus.norm()], dim=-1)


# ----------------------------------------------------------------------------- models


def _uniform(fan_out: int, fan_in: int) -> nn.Parameter:
    bound = 1 / math.sqrt(fan_in)
    return nn.Parameter(torch.empty(fan_out, fan_in).uniform_(-bound, bound))


class BilinearClassifier(nn.Module):
    """``logits = P((W1 x) * (W2 x))``: one bilinear layer and a linear head, no biases.

    The input is only 64 pixels, so unlike Pearce et al. (784 pixels -> an embedding) there is no
    embedding: every eigenvector is an 8x8 image as it stands.
    """

    def __init__(self, d_in: int = 64, d_hidden: int = 64, n_classes: int = 10):
        super().__init__()
        self.W1 = _uniform(d_hidden, d_in)
        self.W2 = _uniform(d_hidden, d_in)
        self.P = _uniform(n_classes, d_hidden)

    def forward(self, x: Float[Tensor, "batch d_in"]) -> Float[Tensor, "batch classes"]:
        return bilinear_forward(x, self.W1, self.W2, self.P)

    def stacked_forward(self, params: dict[str, Tensor], x: Tensor) -> Tensor:
        """The same map for a stack of models: params ``[models, ...]``, x ``[models, batch, d_in]``."""
        return ((x @ params["W1"].mT) * (x @ params["W2"].mT)) @ params["P"].mT

    def tensor(self) -> Float[Tensor, "classes d_in d_in"]:
        return bilinear_tensor(self.W1, self.W2, self.P)

    def interaction_matrices(self) -> Float[Tensor, "classes d_in d_in"]:
        """``Q_c`` for every class ``c`` (the output direction is the one-hot ``e_c``)."""
        return symmetrize(self.tensor())

    @torch.no_grad()
    def decompose(self) -> tuple[Float[Tensor, "classes d_in"], Float[Tensor, "classes d_in d_in"]]:
        return eigen_decompose(self.interaction_matrices())


class MLPClassifier(nn.Module):
    """``logits = W_out act(W_in x + b_in) + b_out`` with act = ReLU or GELU (with biases)."""

    def __init__(
        self,
        d_in: int = 64,
        d_hidden: int = 118,
        n_classes: int = 10,
        activation: Literal["relu", "gelu"] = "relu",
    ):
        super().__init__()
        if activation not in ("relu", "gelu"):
            raise ValueError(f"activation must be 'relu' or 'gelu', got {activation!r}.")
        self.activation = activation
        self.W_in = _uniform(d_hidden, d_in)
        self.b_in = nn.Parameter(torch.zeros(d_hidden))
        self.W_out = _uniform(n_classes, d_hidden)
        self.b_out = nn.Parameter(torch.zeros(n_classes))

    def forward(self, x: Float[Tensor, "batch d_in"]) -> Float[Tensor, "batch classes"]:
        pre = x @ self.W_in.T + self.b_in
        act = torch.relu(pre) if self.activation == "relu" else nn.functional.gelu(pre)
        return act @ self.W_out.T + self.b_out

    def stacked_forward(self, params: dict[str, Tensor], x: Tensor) -> Tensor:
        """The same map for a stack of models: params ``[models, ...]``, x ``[models, batch, d_in]``."""
        pre = x @ params["W_in"].mT + params["b_in"][:, None]
        act = torch.relu(pre) if self.activation == "relu" else nn.functional.gelu(pre)
        return act @ params["W_out"].mT + params["b_out"][:, None]


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def mlp_hidden_for_params(n_target: int, d_in: int = 64, n_classes: int = 10) -> int:
    """The MLP width whose parameter count ``(d_in + 1) h + (h + 1) n_classes`` is nearest to
    ``n_target`` (e.g. 8,832 bilinear parameters -> h = 118, 8,860 parameters)."""
    return max(1, round((n_target - n_classes) / (d_in + 1 + n_classes)))


# ----------------------------------------------------------------------------- training


@dataclass(frozen=True)
class TrainConfig:
    """Adam(W) with a cosine schedule to 0; Gaussian input noise of per-pixel sd ``noise_std``
    added to every training batch (Pearce et al.'s regulariser; 0 turns it off)."""

    noise_std: float = 0.0
    weight_decay: float = 0.0
    lr: float = 5e-3
    batch_size: int = 256
    epochs: int = 100
    seed: int = 0

    def __post_init__(self) -> None:
        if self.noise_std < 0 or self.weight_decay < 0 or self.lr <= 0:
            raise ValueError(f"noise_std and weight_decay must be >= 0 and lr > 0, got {self}.")
        if self.batch_size < 1 or self.epochs < 1:
            raise ValueError(f"batch_size and epochs must be >= 1, got {self}.")


def train_classifiers(
    models: list[nn.Module],
    X: Float[Tensor, "n d_in"],
    y: Int[Tensor, "n"],  # noqa: F821
    cfgs: list[TrainConfig],
    progress: bool = True,
) -> Float[Tensor, "models epochs"]:
    """Train several models of one architecture side by side, each with its own config
    (noise_std, weight_decay and seed may differ; lr, batch_size and epochs must agree).

    One optimiser step updates every model at once (batched matmuls over stacked weights), so
    training twelve tiny models costs about as much as training one. Each model gets its own
    shuffling and noise from a generator seeded with its ``cfg.seed``; the trained weights are
    written back into ``models``. Returns the mean training loss of every epoch, per model.
    """
    from tqdm.auto import tqdm

    if len(models) != len(cfgs) or not models:
        raise ValueError(
            f"give one config per model: got {len(models)} models, {len(cfgs)} configs."
        )
    shared = {(c.lr, c.batch_size, c.epochs) for c in cfgs}
    if len(shared) != 1:
        raise ValueError(
            f"lr, batch_size and epochs must be the same for all models, got {shared}."
        )
    kinds = {(type(m), getattr(m, "activation", None)) for m in models}
    if len(kinds) != 1:
        raise ValueError(
            "train models of one architecture together (stack bilinear, ReLU and GELU models "
            f"in separate calls), got {len(kinds)} kinds."
        )
    lr, batch_size, epochs = shared.pop()
    names = [name for name, _ in models[0].named_parameters()]
    params = {
        name: torch.stack([dict(m.named_parameters())[name].detach() for m in models])
        .clone()
        .requires_grad_(True)
        for name in names
    }
    forward = type(models[0]).stacked_forward
    n_models, n = len(models), X.shape[0]
    gens = [torch.Generator().manual_seed(c.seed) for c in cfgs]
    noise = torch.tensor([c.noise_std for c in cfgs]).view(n_models, 1, 1)
    decay = torch.tensor([c.weight_decay for c in cfgs])
    optimizer = torch.optim.Adam(params.values(), lr=lr)
    steps_per_epoch = math.ceil(n / batch_size)
    n_steps = epochs * steps_per_epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * min(step, n_steps) / n_steps))
    )
    history = torch.zeros(n_models, epochs)
    for epoch in tqdm(range(epochs), disable=not progress, desc="epochs", mininterval=2.0):
        orders = torch.stack([torch.randperm(n, generator=g) for g in gens])
        for start in range(0, n, batch_size):
            idx = orders[:, start : start + batch_size]  # [models, batch]
            xb = X[idx]
            eps = torch.stack([torch.randn(xb.shape[1:], generator=g) for g in gens])
            xb = xb + noise * eps
            logits = forward(models[0], params, xb)  # [models, batch, classes]
            losses = (
                nn.functional.cross_entropy(
                    logits.flatten(0, 1), y[idx].flatten(), reduction="none"
                )
                .view(n_models, -1)
                .mean(-1)
            )
            optimizer.zero_grad()
            losses.sum().backward()  # models share nothing: each gets its own gradient
            with torch.no_grad():  # decoupled weight decay (AdamW), one coefficient per model
                step_lr = optimizer.param_groups[0]["lr"]
                for p in params.values():
                    p.mul_((1 - step_lr * decay).view(-1, *[1] * (p.ndim - 1)))
            optimizer.step()
            scheduler.step()
            history[:, epoch] += losses.detach() * idx.shape[1] / n
    with torch.no_grad():
        for i, model in enumerate(models):
            for name, param in model.named_parameters():
                param.copy_(params[name][i])
    return history


def train_classifier(
    model: nn.Module,
    X: Float[Tensor, "n d_in"],
    y: Int[Tensor, "n"],  # noqa: F821
    cfg: TrainConfig = TrainConfig(),
    progress: bool = False,
) -> Float[Tensor, "epochs"]:  # noqa: F821
    """Train one model (see :func:`train_classifiers`); returns its loss per epoch."""
    return train_classifiers([model], X, y, [cfg], progress=progress)[0]


@torch.no_grad()
def accuracy(logits_or_model: Tensor | nn.Module, X: Tensor, y: Tensor) -> float:
    logits = logits_or_model(X) if isinstance(logits_or_model, nn.Module) else logits_or_model
    return (logits.argmax(-1) == y).float().mean().item()


@torch.no_grad()
def test_loss(model: nn.Module, X: Tensor, y: Tensor) -> float:
    return nn.functional.cross_entropy(model(X), y).item()


def truncation_curve(
    model: BilinearClassifier, X: Tensor, y: Tensor, ks: list[int]
) -> dict[int, float]:
    """Accuracy when each class keeps only its top-k eigenvectors, for every k in ``ks``."""
    values, vectors = model.decompose()
    return {k: accuracy(truncated_logits(values, vectors, X, k), X, y) for k in ks}


def logit_hessian(
    model: nn.Module,
    x: Float[Tensor, "d_in"],  # noqa: F821
    c: int,
) -> Float[Tensor, "d_in d_in"]:
    """The Hessian of logit ``c`` with respect to one input ``x``. For a bias-free bilinear
    classifier it is ``2 Q_c`` at every x; for a ReLU/GELU MLP it changes with x."""
    return torch.func.hessian(lambda z: model(z.unsqueeze(0))[0, c])(x)


# ----------------------------------------------------------------------------- toy functions


@torch.no_grad()
def fit_quadratic(
    X: Float[Tensor, "n d"],
    target: Float[Tensor, "n"],  # noqa: F821
    bias: bool = False,
) -> tuple[Float[Tensor, "d d"], float]:
    """Least-squares fit of ``target ~ x^T Q x`` (``bias=True``: append a constant 1 to x, as
    Pearce et al. do, so Q also holds linear and constant terms). Returns (Q, FVU)."""
    Z = torch.cat([X, torch.ones(X.shape[0], 1, dtype=X.dtype)], -1) if bias else X
    d = Z.shape[1]
    iu = torch.triu_indices(d, d)
    feats = (Z[:, :, None] * Z[:, None, :])[:, iu[0], iu[1]]
    coef = torch.linalg.lstsq(feats.double(), target.double()[:, None]).solution[:, 0]
    Q = torch.zeros(d, d, dtype=torch.float64)
    Q[iu[0], iu[1]] = coef
    Q = symmetrize(Q)  # z_i z_j (i < j) has coefficient c: Q[i, j] = Q[j, i] = c / 2
    resid = target.double() - feats.double() @ coef
    fvu = (resid.pow(2).mean() / target.double().var(unbiased=False)).item()
    return Q, fvu


# ----------------------------------------------------------------------------- figures


def plot_images(
    images: Float[Tensor, "n 64"],
    titles: list[str],
    title: str,
    cols: int = 10,
    shape: tuple[int, int] = (8, 8),
):
    """A grid of 8x8 images on a diverging scale (red +, blue -), each scaled to its own max |.|,
    so an eigenvector's sign pattern is visible whatever its norm."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    images = images.detach().float().cpu()
    if images.ndim != 2 or images.shape[1] != shape[0] * shape[1]:
        raise ValueError(f"images must be [n, {shape[0] * shape[1]}], got {tuple(images.shape)}.")
    if len(titles) != images.shape[0]:
        raise ValueError(f"got {len(titles)} titles for {images.shape[0]} images.")
    n = images.shape[0]
    cols = min(cols, n)
    rows = math.ceil(n / cols)
    fig = make_subplots(
        rows=rows, cols=cols, subplot_titles=titles, horizontal_spacing=0.01, vertical_spacing=0.08
    )
    for k in range(n):
        img = images[k].view(*shape)
        img = img / img.abs().max().clamp_min(1e-12)
        fig.add_trace(
            go.Heatmap(
                z=img.numpy(),
                zmin=-1,
                zmax=1,
                colorscale="RdBu",
                reversescale=True,
                showscale=k == 0,
                colorbar=dict(title="value / max |value|", len=0.8),
                hovertemplate="row %{y}, col %{x}: %{z:.2f}<extra></extra>",
            ),
            row=k // cols + 1,
            col=k % cols + 1,
        )
    fig.update_xaxes(showticklabels=False, constrain="domain")
    fig.update_yaxes(
        showticklabels=False, autorange="reversed", scaleanchor="x", constrain="domain"
    )
    for i in range(2, n + 1):
        fig.layout[f"yaxis{i}"].scaleanchor = f"x{i}"
    fig.update_annotations(font_size=11)
    fig.update_layout(title=title, height=120 + 115 * rows, margin=dict(t=90, l=20, r=20, b=20))
    return fig
