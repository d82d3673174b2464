"""Chapter 09: the polytope lens — ReLU networks as partitions of their input space.

A ReLU MLP ``Linear, ReLU, Linear, ReLU, ..., Linear`` (an ``nn.Sequential``) cuts its input space
into convex polytopes: on the inputs that share one *spline code* (which neurons of every hidden
layer are on) the whole network is one affine map ``f(x) = A x + c``. This module has the
reference implementations of the chapter's exercises and the measurements built on them:

- codes: :func:`layer_codes`, :func:`spline_code`, :func:`local_affine_map`, :func:`region_ids`,
  :func:`count_regions`, :func:`arrangement_bound`
- drawing 2-D partitions: :func:`grid_points`, :func:`region_map`
- paths: :func:`code_changes_along_path` (sampled), :func:`hyperplane_crossings` (one layer,
  exact), :func:`line_crossings` (every layer, exact: walks from polytope to polytope)
- data and training: :func:`moons`, :func:`digits`, :func:`make_mlp`, :func:`train_classifier`
- clustering: :func:`cluster_purity`; smooth activations: :func:`sign_codes` (an approximation)

Codes use the convention pi(x) = [W x + b > 0]: a neuron exactly at zero is off.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor, nn

MAX_GRID_BYTES = 2 * 1024**3  # region_map refuses grids whose activations would need more


class NotPiecewiseLinearError(TypeError):
    """Exact polytope codes need ReLU between the linear layers."""


# ----------------------------------------------------------------------------- the network


def make_mlp(sizes: Sequence[int], seed: int = 0, bias: bool = True) -> nn.Sequential:
    """``Linear(sizes[0], sizes[1]), ReLU, ..., Linear(sizes[-2], sizes[-1])`` with PyTorch's
    default initialisation (weights and biases uniform in +-1/sqrt(fan_in)), seeded."""
    sizes = list(sizes)
    if len(sizes) < 2 or any(int(s) < 1 for s in sizes):
        raise ValueError(f"sizes must be at least [d_in, d_out], all positive; got {sizes}.")
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        modules: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(sizes, sizes[1:], strict=False)):
            modules.append(nn.Linear(a, b, bias=bias))
            if i < len(sizes) - 2:
                modules.append(nn.ReLU())
    finally:
        torch.random.set_rng_state(generator_state)
    return nn.Sequential(*modules)


def linear_layers(model: nn.Module) -> list[nn.Linear]:
    """The Linear layers of a ReLU MLP, after checking that it is ``Linear, ReLU, ..., Linear``.

    Raises :class:`NotPiecewiseLinearError` for any other activation (GELU, SiLU, tanh...): such a
    network has no exact polytopes (use :func:`sign_codes` for the sign-of-pre-activation
    approximation, and say that it is one).
    """
    if not isinstance(model, nn.Sequential):
        raise TypeError(
            f"expected an nn.Sequential of Linear and ReLU layers, got {type(model).__name__}; "
            "build one with polytopes.make_mlp([d_in, ..., d_out])."
        )
    mods = list(model)
    for i, m in enumerate(mods):
        want_linear = i % 2 == 0
        if want_linear and not isinstance(m, nn.Linear):
            raise TypeError(f"layer {i} of the MLP is {type(m).__name__}, expected nn.Linear.")
        if not want_linear and type(m) is not nn.ReLU:
            raise NotPiecewiseLinearError(
                f"layer {i} is {type(m).__name__}: exact polytope codes need ReLU between the "
                "linear layers (a smooth activation such as GELU has no polytopes). Use "
                "polytopes.sign_codes for the sign-of-pre-activation approximation instead."
            )
    if not mods or not isinstance(mods[-1], nn.Linear):
        raise TypeError("the MLP must end with an nn.Linear layer (the output layer).")
    return [m for m in mods if isinstance(m, nn.Linear)]


def _check_input(layers: list[nn.Linear], x: Tensor, name: str = "x") -> None:
    d_in = layers[0].in_features
    if not isinstance(x, Tensor) or x.ndim != 2 or x.shape[1] != d_in:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(
            f"{name} must be a [batch, {d_in}] tensor for this network (input dimension {d_in}), "
            f"got {shape}. A single point is x[None]."
        )


# ----------------------------------------------------------------------------- codes


@torch.no_grad()
def layer_codes(
    model: nn.Sequential, x: Float[Tensor, "batch d_in"]
) -> list[Bool[Tensor, "batch n_l"]]:
    """The polytope code of every hidden layer: ``pre-activation > 0``, one bool tensor per layer."""
    layers = linear_layers(model)
    _check_input(layers, x)
    codes = []
    h = x.to(layers[0].weight.dtype)
    for layer in layers[:-1]:
        z = layer(h)
        codes.append(z > 0)
        h = torch.relu(z)
    return codes


def spline_code(model: nn.Sequential, x: Float[Tensor, "batch d_in"]) -> Bool[Tensor, "batch n"]:
    """Every hidden layer's code, concatenated: the code of the input's polytope."""
    return torch.cat(layer_codes(model, x), dim=-1)


@torch.no_grad()
def local_affine_map(
    model: nn.Sequential, x: Float[Tensor, "batch d_in"]
) -> tuple[Float[Tensor, "batch d_out d_in"], Float[Tensor, "batch d_out"]]:
    """A, c with ``model(y) = A y + c`` for every y in x's polytope (A = W_L D_{L-1} ... D_1 W_1)."""
    layers = linear_layers(model)
    _check_input(layers, x)
    codes = layer_codes(model, x)
    batch = x.shape[0]
    dtype = layers[0].weight.dtype
    A = layers[0].weight.expand(batch, -1, -1)
    c = _bias(layers[0]).expand(batch, -1)
    for code, layer in zip(codes, layers[1:], strict=True):
        mask = code.to(dtype)
        A = layer.weight @ (mask[:, :, None] * A)
        c = (mask * c) @ layer.weight.T + _bias(layer)
    return A.detach().to(dtype), c.detach().to(dtype)  # detach: views of parameters keep grad


def _bias(layer: nn.Linear) -> Tensor:
    if layer.bias is None:
        return torch.zeros(layer.out_features, dtype=layer.weight.dtype)
    return layer.bias


def pack_codes(codes: Bool[Tensor, "batch n"]) -> Int[Tensor, "batch words"]:
    """Pack bool codes into int64 words (62 bits each), so equal codes compare as equal rows."""
    batch, n = codes.shape
    words = max(1, math.ceil(n / 62))
    padded = torch.zeros(batch, words * 62, dtype=torch.int64)
    padded[:, :n] = codes.to(torch.int64)
    powers = 2 ** torch.arange(62, dtype=torch.int64)
    return (padded.view(batch, words, 62) * powers).sum(-1)


def region_ids(codes: Bool[Tensor, "batch n"]) -> Int[Tensor, " batch"]:
    """One integer per row, equal for rows with equal codes (0..n_regions-1, sorted by code)."""
    packed = pack_codes(codes)
    if packed.shape[1] == 1:  # up to 62 neurons: one word per row, and a much faster 1-D unique
        return torch.unique(packed[:, 0], return_inverse=True)[1]
    return torch.unique(packed, dim=0, return_inverse=True)[1]


def count_regions(codes: Bool[Tensor, "batch n"]) -> int:
    """The number of distinct codes among the rows."""
    packed = pack_codes(codes)
    if packed.shape[1] == 1:
        return int(torch.unique(packed[:, 0]).shape[0])
    return int(torch.unique(packed, dim=0).shape[0])


def arrangement_bound(n_hyperplanes: int, d: int) -> int:
    """The most regions n hyperplanes can cut R^d into: sum_{k=0..d} C(n, k) (Zaslavsky / Buck).

    Reached when the hyperplanes are in general position; a one-hidden-layer ReLU network of width
    n has at most this many polytopes. In 2-D: 1 + n + n(n-1)/2.
    """
    if n_hyperplanes < 0 or d < 0:
        raise ValueError("n_hyperplanes and d must be non-negative.")
    return sum(math.comb(n_hyperplanes, k) for k in range(d + 1))


# ----------------------------------------------------------------------------- 2-D pictures


def grid_points(
    lo: float, hi: float, resolution: int
) -> tuple[Float[Tensor, " resolution"], Float[Tensor, "points 2"]]:
    """The axis values and the ``resolution**2`` points of a square grid over [lo, hi]^2
    (row-major: y changes slowest, as plotly's heatmap expects)."""
    if resolution < 2:
        raise ValueError(f"resolution must be at least 2, got {resolution}.")
    axis = torch.linspace(lo, hi, resolution)
    yy, xx = torch.meshgrid(axis, axis, indexing="ij")
    return axis, torch.stack([xx.reshape(-1), yy.reshape(-1)], dim=-1)


def region_map(
    model: nn.Sequential, lo: float, hi: float, resolution: int
) -> tuple[Int[Tensor, "resolution resolution"], int]:
    """Region id of every grid point (rows = y, columns = x) and the number of regions seen.

    Sampling: a region thinner than the grid spacing can fall between points, so the count is a
    lower bound on the number of polytopes meeting the square (see the chapter for how much a
    finer grid adds).
    """
    layers = linear_layers(model)
    if layers[0].in_features != 2:
        raise ValueError(
            f"region_map draws 2-D input spaces; this network has input dimension "
            f"{layers[0].in_features}. Restrict it to a 2-D slice first."
        )
    n_neurons = sum(layer.out_features for layer in layers[:-1])
    need = resolution**2 * (n_neurons + 4) * 8
    if need > MAX_GRID_BYTES:
        raise MemoryError(
            f"a {resolution}x{resolution} grid for {n_neurons} neurons needs about "
            f"{need / 1024**3:.1f} GiB; use a resolution of at most "
            f"{int(math.sqrt(MAX_GRID_BYTES / ((n_neurons + 4) * 8)))} (300 draws every region "
            "wider than 1/300 of the square)."
        )
    _, points = grid_points(lo, hi, resolution)
    codes = spline_code(model, points)
    ids = region_ids(codes)
    return ids.view(resolution, resolution), int(ids.max().item()) + 1


# ----------------------------------------------------------------------------- paths


def code_changes_along_path(
    model: nn.Sequential,
    x0: Float[Tensor, "batch d_in"],
    x1: Float[Tensor, "batch d_in"],
    n_steps: int,
) -> Int[Tensor, " batch"]:
    """How often the spline code changes between consecutive points of x0 + t (x1 - x0),
    t = 0, 1/n_steps, ..., 1 (n_steps + 1 points per path)."""
    layers = linear_layers(model)
    _check_input(layers, x0, "x0")
    _check_input(layers, x1, "x1")
    if n_steps < 1:
        raise ValueError(f"n_steps must be at least 1, got {n_steps}.")
    t = torch.linspace(0, 1, n_steps + 1, dtype=x0.dtype)
    points = x0[:, None, :] + t[None, :, None] * (x1 - x0)[:, None, :]
    codes = spline_code(model, points.reshape(-1, x0.shape[1])).view(x0.shape[0], n_steps + 1, -1)
    return (codes[:, 1:] != codes[:, :-1]).any(-1).sum(-1)


def hyperplane_crossings(
    W: Float[Tensor, "n d_in"],
    b: Float[Tensor, " n"],
    x0: Float[Tensor, " d_in"],
    x1: Float[Tensor, " d_in"],
) -> Float[Tensor, " crossings"]:
    """Where the segment x0 + t (x1 - x0), 0 < t < 1, crosses the hyperplanes W_i . x + b_i = 0
    of one ReLU layer: the sorted t values (neurons parallel to the segment never cross)."""
    z0 = W @ x0 + b
    slope = W @ (x1 - x0)
    moving = slope != 0
    t = -z0[moving] / slope[moving]
    return torch.sort(t[(t > 0) & (t < 1)]).values


@torch.no_grad()
def line_crossings(
    model: nn.Sequential,
    x0: Float[Tensor, " d_in"],
    x1: Float[Tensor, " d_in"],
    tol: float = 1e-9,
) -> Float[Tensor, " crossings"]:
    """Exact boundary crossings of the segment x0 -> x1 through every layer: the sorted t in (0, 1)
    where the spline code changes.

    Walks from polytope to polytope in float64. Inside a polytope every pre-activation is affine in
    t (the codes are frozen), so the exit is the first root at which an on neuron turns off or an
    off neuron turns on; at the exit the new code is read with ties (|z| < tol) broken by the
    direction of travel. Simultaneous crossings (one t) count once.
    """
    layers = linear_layers(model)
    d_in = layers[0].in_features
    for name, v in (("x0", x0), ("x1", x1)):
        if not isinstance(v, Tensor) or v.shape != (d_in,):
            raise ValueError(f"{name} must be one point of shape ({d_in},) (not a batch).")
    Ws = [layer.weight.detach().double() for layer in layers[:-1]]
    bs = [_bias(layer).detach().double() for layer in layers[:-1]]
    start, direction = x0.double(), (x1 - x0).double()

    def pre_activations(point: Tensor, codes: list[Tensor] | None):
        """z and dz/dt for every hidden layer; codes None = read them at the point (ties broken
        by the direction of travel)."""
        h, v = point, direction
        zs, dzs, read = [], [], []
        for i, (W, b) in enumerate(zip(Ws, bs, strict=True)):
            z, dz = W @ h + b, W @ v
            if codes is None:
                scale = 1.0 + z.abs().max()
                on = torch.where(z.abs() > tol * scale, z > 0, dz > 0)
            else:
                on = codes[i]
            zs.append(z)
            dzs.append(dz)
            read.append(on)
            h, v = z * on, dz * on
        return zs, dzs, read

    t, found = 0.0, []
    _, _, codes = pre_activations(start, None)
    while True:
        zs, dzs, _ = pre_activations(start + t * direction, codes)
        exit_s = math.inf
        for z, dz, on in zip(zs, dzs, codes, strict=True):
            leaving = torch.where(on, dz < 0, dz > 0)  # moving towards its switching point
            if leaving.any():
                s = (-z[leaving] / dz[leaving]).clamp(min=0.0)
                exit_s = min(exit_s, float(s.min()))
        if t + exit_s >= 1.0:
            break
        t = t + max(exit_s, tol)
        _, _, new_codes = pre_activations(start + t * direction, None)
        if any(bool((a != b_).any()) for a, b_ in zip(new_codes, codes, strict=True)):
            found.append(t)
        codes = new_codes
    return torch.tensor(found, dtype=torch.float64)


# ----------------------------------------------------------------------------- smooth nets


@torch.no_grad()
def sign_codes(pre_activations: Float[Tensor, "... n"]) -> Bool[Tensor, "... n"]:
    """Codes for a smooth activation (GELU, SiLU): the sign of the pre-activation.

    An APPROXIMATION chosen by this course: GELU is not piecewise linear, so its network has no
    exact polytopes; this treats GELU as ReLU. How Black et al. handled GPT-2's GELU is not
    verified in our reference notes.
    """
    return pre_activations > 0


# ----------------------------------------------------------------------------- data, training


def moons(n: int = 600, noise: float = 0.1, seed: int = 0) -> tuple[Tensor, Tensor]:
    """scikit-learn's two moons (offline): float32 points [n, 2] and int64 labels [n]."""
    from sklearn.datasets import make_moons

    X, y = make_moons(n, noise=noise, random_state=seed)
    return torch.tensor(X, dtype=torch.float32), torch.tensor(y, dtype=torch.int64)


def digits(seed: int = 0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """scikit-learn's bundled 8x8 digits (ships in the wheel, no download), pixels / 16, split
    75/25 stratified: X_train [1347, 64], X_test [450, 64], y_train, y_test."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    X_train, X_test, y_train, y_test = train_test_split(
        data.data / 16.0, data.target, test_size=0.25, random_state=seed, stratify=data.target
    )
    f = lambda a: torch.tensor(a, dtype=torch.float32)  # noqa: E731
    i = lambda a: torch.tensor(a, dtype=torch.int64)  # noqa: E731
    return f(X_train), f(X_test), i(y_train), i(y_test)


def train_classifier(
    model: nn.Sequential,
    X: Float[Tensor, "n d_in"],
    y: Int[Tensor, " n"],
    epochs: int,
    lr: float = 3e-3,
    batch_size: int = 64,
    seed: int = 0,
    checkpoints: Sequence[int] = (),
) -> dict:
    """Adam on cross-entropy, shuffled mini-batches. Returns ``{"loss": [...per epoch],
    "accuracy": final train accuracy, "states": {epoch: state_dict}}`` for every epoch in
    ``checkpoints`` (0 = before training)."""
    linear_layers(model)
    _check_input(linear_layers(model), X, "X")
    generator = torch.Generator().manual_seed(seed)
    optimiser = torch.optim.Adam(model.parameters(), lr=lr)
    states = {}
    if 0 in checkpoints:
        states[0] = {k: v.clone() for k, v in model.state_dict().items()}
    losses = []
    for epoch in range(1, epochs + 1):
        order = torch.randperm(X.shape[0], generator=generator)
        total = 0.0
        for start in range(0, X.shape[0], batch_size):
            idx = order[start : start + batch_size]
            loss = nn.functional.cross_entropy(model(X[idx]), y[idx])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            total = total + loss.detach() * len(idx)
        losses.append(float(total) / X.shape[0])
        if epoch in checkpoints:
            states[epoch] = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        accuracy = (model(X).argmax(-1) == y).float().mean().item()
    return {"loss": losses, "accuracy": accuracy, "states": states}


# ----------------------------------------------------------------------------- clustering


def cluster_purity(labels: Int[Tensor, " n"], clusters: Int[Tensor, " n"]) -> float:
    """Purity: give every cluster its majority label; the fraction of points that get their own.

    (1/n) sum over clusters of max over labels of |cluster ∩ label|. 1.0 when every cluster holds
    one label; a single cluster scores the share of the most common label.
    """
    if labels.shape != clusters.shape or labels.ndim != 1:
        raise ValueError(
            f"labels and clusters must be 1-D and the same length, got {tuple(labels.shape)} "
            f"and {tuple(clusters.shape)}."
        )
    _, label_idx = torch.unique(labels, return_inverse=True)
    _, cluster_idx = torch.unique(clusters, return_inverse=True)
    table = torch.zeros(int(cluster_idx.max()) + 1, int(label_idx.max()) + 1, dtype=torch.int64)
    table.index_put_((cluster_idx, label_idx), torch.ones_like(label_idx), accumulate=True)
    return table.max(dim=1).values.sum().item() / labels.shape[0]
