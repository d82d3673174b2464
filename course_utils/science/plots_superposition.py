"""plotly figures for toy models of superposition (chapter 01; chapter 02 reuses some).

Every function takes weights in the course's layout, ``W [inst, d_hidden, feats]``, checks the
shapes it needs and raises a ValueError that names them, instead of drawing a wrong picture.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import plotly.colors
import plotly.graph_objects as go
import torch
from jaxtyping import Float
from plotly.subplots import make_subplots
from torch import Tensor

from course_utils.science.toy_models import feature_dimensionality, superposition_interference

#: One value per instance / per feature (named aliases keep single-axis shapes lint-clean).
PerInstance = Float[Tensor, "inst"]  # noqa: F821
PerFeature = Float[Tensor, "feats"]  # noqa: F821

#: Named dimensionalities of the paper's geometry (D_i of each feature in the configuration).
NAMED_FRACTIONS = {
    "1 (own dimension)": 1.0,
    "3/4 (tetrahedron)": 0.75,
    "2/3 (triangle)": 2 / 3,
    "1/2 (digon)": 0.5,
    "2/5 (pentagon)": 0.4,
    "3/8 (square antiprism)": 0.375,
}


#: JupyterLab's output area with the file browser open is about 900 px wide at a 1400 px window.
MAX_FIGURE_WIDTH = 900


def fit_width(natural: int) -> int | None:
    """``natural`` when it fits the output area, else None: plotly then fills the area's width.

    A fixed width wider than the output area is cut off on the right (colour-bar titles, the last
    panels, legends) with no scrollbar; a responsive figure is only narrower.
    """
    return natural if natural <= MAX_FIGURE_WIDTH else None


def _check_W(W: Tensor, who: str, d_hidden: int | None = None) -> Tensor:
    if not isinstance(W, Tensor) or W.ndim != 3:
        shape = tuple(W.shape) if isinstance(W, Tensor) else type(W).__name__
        raise ValueError(f"{who} expects W of shape [inst, d_hidden, feats], got {shape}.")
    if d_hidden is not None and W.shape[1] != d_hidden:
        raise ValueError(
            f"{who} draws features as arrows in {d_hidden} dimensions, but W has d_hidden = "
            f"{W.shape[1]} (shape {tuple(W.shape)} = [inst, d_hidden, feats])."
        )
    return W.detach().float().cpu()


def _check_titles(titles: Sequence[str] | None, n: int, who: str) -> list[str]:
    if titles is None:
        return [f"instance {i}" for i in range(n)]
    titles = list(titles)
    if len(titles) != n:
        raise ValueError(f"{who}: got {len(titles)} titles for {n} instances.")
    return titles


def plot_WtW_and_bias(
    W: Float[Tensor, "inst hid feats"],
    b: Float[Tensor, "inst feats"],
    titles: Sequence[str] | None = None,
    title: str = "W^T W and b",
) -> go.Figure:
    """One column per instance: W^T W (top; red = positive, blue = negative), the bias b below."""
    W = _check_W(W, "plot_WtW_and_bias")
    b = b.detach().float().cpu()
    if b.shape != (W.shape[0], W.shape[2]):
        raise ValueError(
            f"b must be [inst, feats] = [{W.shape[0]}, {W.shape[2]}], got {tuple(b.shape)}."
        )
    n_inst, _, n_feat = W.shape
    titles = _check_titles(titles, n_inst, "plot_WtW_and_bias")
    WtW = torch.einsum("ihf,ihg->ifg", W, W)
    vmax = max(WtW.abs().max().item(), b.abs().max().item(), 1e-6)
    fig = make_subplots(
        rows=2,
        cols=n_inst,
        row_heights=[0.88, 0.12],
        vertical_spacing=0.04,
        horizontal_spacing=0.015,
        subplot_titles=titles,
    )
    for i in range(n_inst):
        common = dict(zmin=-vmax, zmax=vmax, colorscale="RdBu", reversescale=True, showscale=i == 0)
        fig.add_trace(
            go.Heatmap(
                z=WtW[i].numpy(),
                colorbar=dict(
                    title="W<sup>T</sup>W and b<br>(one shared<br>colour scale)", len=0.8
                ),
                **common,
                hovertemplate="feature %{y} · feature %{x}: %{z:.2f}<extra>W^T W</extra>",
            ),
            row=1,
            col=i + 1,
        )
        fig.add_trace(
            go.Heatmap(
                z=b[i : i + 1].numpy(),
                **{**common, "showscale": False},
                hovertemplate="b[%{x}] = %{z:.2f}<extra>bias</extra>",
            ),
            row=2,
            col=i + 1,
        )
    step = 5 if n_feat > 10 else 1
    fig.update_yaxes(autorange="reversed", showticklabels=False)
    fig.update_yaxes(showticklabels=True, dtick=step, tickfont=dict(size=9), row=1, col=1)
    fig.update_xaxes(showticklabels=False, row=1)
    fig.update_xaxes(dtick=step, tickfont=dict(size=9), title_text="feature", row=2)
    fig.update_yaxes(title_text="feature", row=1, col=1)
    fig.update_yaxes(title_text="b", row=2, col=1)
    fig.update_layout(
        title=title, height=360, width=fit_width(max(600, 150 * n_inst)), margin=dict(t=80)
    )
    return fig


def plot_feature_norms(
    W: Float[Tensor, "inst hid feats"], titles: Sequence[str] | None = None, title: str = ""
) -> go.Figure:
    """Bar length = ||W_i||; colour = how much other features share its direction,
    ``sum_{j != i} (W_hat_i . W_j)^2`` (dark = own dimension, yellow = in superposition). The
    colour is clipped at 1 (a pentagon feature has about 1.5)."""
    W = _check_W(W, "plot_feature_norms")
    n_inst, _, n_feat = W.shape
    titles = _check_titles(titles, n_inst, "plot_feature_norms")
    norms = W.norm(dim=1)
    interference = superposition_interference(W).clamp(0, 1)
    fig = make_subplots(
        rows=1, cols=n_inst, subplot_titles=titles, shared_yaxes=True, horizontal_spacing=0.01
    )
    for i in range(n_inst):
        fig.add_trace(
            go.Bar(
                x=norms[i].numpy(),
                y=list(range(n_feat)),
                orientation="h",
                marker=dict(
                    color=interference[i].numpy(),
                    colorscale="Viridis",
                    cmin=0,
                    cmax=1,
                    colorbar=dict(title="shared with<br>other features<br>(clipped at 1)")
                    if i == 0
                    else None,
                    showscale=i == 0,
                ),
                hovertemplate="feature %{y}: ||W_i|| = %{x:.2f}<extra></extra>",
            ),
            row=1,
            col=i + 1,
        )
        fig.update_xaxes(
            range=[0, max(1.2, norms.max().item() * 1.05)], title_text="||W_i||", row=1, col=i + 1
        )
    fig.update_yaxes(
        autorange="reversed", title_text="feature (most important at top)", row=1, col=1
    )
    fig.update_layout(
        title=title, showlegend=False, height=360, width=fit_width(max(650, 170 * n_inst))
    )
    return fig


def plot_features_in_2d(
    W: Float[Tensor, "inst 2 feats"],
    titles: Sequence[str] | None = None,
    title: str = "",
    importance: PerFeature | None = None,
    cols: int = 5,
) -> go.Figure:
    """Each feature's column W_i as an arrow in the 2-D hidden space, one square panel per
    instance, ``cols`` panels per row. Colour = feature index (0 = most important)."""
    W = _check_W(W, "plot_features_in_2d", d_hidden=2)
    n_inst, _, n_feat = W.shape
    titles = _check_titles(titles, n_inst, "plot_features_in_2d")
    if importance is not None and tuple(importance.shape) != (n_feat,):
        raise ValueError(f"importance must be [feats] = [{n_feat}], got {tuple(importance.shape)}.")
    lim = max(1.2, W.abs().max().item() * 1.1)
    colours = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2"]
    cols = min(cols, n_inst)
    rows = math.ceil(n_inst / cols)
    fig = make_subplots(
        rows=rows, cols=cols, subplot_titles=titles, horizontal_spacing=0.03, vertical_spacing=0.1
    )
    for i in range(n_inst):
        row, col = i // cols + 1, i % cols + 1
        for f in range(n_feat):
            x, y = W[i, 0, f].item(), W[i, 1, f].item()
            label = f"feature {f}"
            if importance is not None:
                label += f" (I = {importance[f]:.2f})"
            fig.add_trace(
                go.Scatter(
                    x=[0, x],
                    y=[0, y],
                    mode="lines+markers",
                    name=label,
                    legendgroup=str(f),
                    showlegend=i == 0,
                    line=dict(color=colours[f % len(colours)], width=3),
                    marker=dict(size=[0, 9]),
                    hovertemplate=f"{label}: (%{{x:.2f}}, %{{y:.2f}})<extra></extra>",
                ),
                row=row,
                col=col,
            )
        anchor = "x" if i == 0 else f"x{i + 1}"
        circle = torch.linspace(0, 2 * math.pi, 121)
        fig.add_trace(
            go.Scatter(
                x=circle.cos().numpy(),
                y=circle.sin().numpy(),
                mode="lines",
                line=dict(color="grey", width=1, dash="dot"),
                name="unit circle (length 1)",
                legendgroup="circle",
                showlegend=i == 0,
                hoverinfo="skip",
            ),
            row=row,
            col=col,
        )
        ticks = dict(tickvals=[-1, 0, 1], tickfont=dict(size=9), zeroline=True)
        fig.update_xaxes(range=[-lim, lim], constrain="domain", row=row, col=col, **ticks)
        fig.update_yaxes(
            range=[-lim, lim],
            scaleanchor=anchor,
            **ticks,
            constrain="domain",
            row=row,
            col=col,
        )
    panel = 190 if cols > 2 else 280
    fig.update_layout(
        title=title,
        height=panel * rows + 120,
        width=fit_width(panel * cols + 220),
        legend=dict(font=dict(size=10)),
        margin=dict(l=20, r=20),
    )
    return fig


def plot_phase_diagram(
    phase: Tensor,
    relative_importance: Tensor,
    density: Tensor,
    labels: Sequence[str] = ("not represented", "dedicated dimension", "superposition"),
    title: str = "",
) -> go.Figure:
    """A heatmap of integer phases ``[importances, densities]`` with one named colour each."""
    if phase.shape != (len(relative_importance), len(density)):
        raise ValueError(
            f"phase must be [importances, densities] = "
            f"[{len(relative_importance)}, {len(density)}], "
            f"got {tuple(phase.shape)}."
        )
    colours = ["#d9d9d9", "#4c78a8", "#f58518", "#000000"]
    n = len(labels)
    scale = []
    for k in range(n):
        scale += [(k / n, colours[k]), ((k + 1) / n, colours[k])]
    # Plot on index axes (the grids are log-spaced, so equal steps are equal log steps): every
    # cell is drawn full size and the ticks sit exactly on the grid values.
    xs, ys = list(range(len(density))), list(range(len(relative_importance)))
    fig = go.Figure(
        go.Heatmap(
            z=phase.numpy(),
            x=xs,
            y=ys,
            customdata=[
                [
                    f"density {d:.3g}, importance {r:.3g}: {labels[int(v)]}"
                    for d, v in zip(density.tolist(), row, strict=True)
                ]
                for r, row in zip(relative_importance.tolist(), phase.tolist(), strict=True)
            ],
            zmin=-0.5,
            zmax=n - 0.5,
            colorscale=scale,
            colorbar=dict(tickvals=list(range(n)), ticktext=list(labels), title="extra feature"),
            hovertemplate="%{customdata}<extra></extra>",
        )
    )
    fig.update_xaxes(
        tickvals=xs,
        ticktext=[f"{d:.2g}" for d in density.tolist()],
        title_text="feature density 1 - S (log-spaced; sparser to the right)",
    )
    fig.update_yaxes(
        tickvals=ys,
        ticktext=[f"{r:.2g}" for r in relative_importance.tolist()],
        title_text="importance of the extra feature (log-spaced; feature 0 has 1)",
    )
    fig.update_layout(title=title, width=700, height=450)
    return fig


def plot_dimensionality(
    W: Float[Tensor, "inst hid feats"],
    density: PerInstance,
    title: str = "",
    max_points: int = 4000,
) -> go.Figure:
    """Left: D* = m / ||W||_F^2 against 1/(1 - S), with the sticky values 1 and 1/2 marked.
    Right: every feature's D_i against 1/(1 - S), with the named fractions marked."""
    W = _check_W(W, "plot_dimensionality")
    n_inst, d_hidden, n_feat = W.shape
    if n_feat <= d_hidden:
        raise ValueError(
            f"plot_dimensionality is about packing more features than dimensions; W has "
            f"{n_feat} features in {d_hidden} hidden dimensions (shape {tuple(W.shape)} = "
            "[inst, d_hidden, feats]). Did you pass W transposed?"
        )
    if tuple(density.shape) != (n_inst,):
        raise ValueError(f"density must be [inst] = [{n_inst}], got {tuple(density.shape)}.")
    inv = (1 / density).float()
    dstar = d_hidden / W.pow(2).sum((1, 2))
    D = feature_dimensionality(W)
    fig = make_subplots(
        rows=1,
        cols=2,
        horizontal_spacing=0.1,
        subplot_titles=[
            "dimensions per feature D* = m / ||W||_F^2",
            "dimensionality D_i of every feature",
        ],
    )
    fig.add_trace(
        go.Scatter(
            x=inv.numpy(),
            y=dstar.numpy(),
            mode="lines+markers",
            name="D*",
            hovertemplate="1/(1-S) = %{x:.2f}: D* = %{y:.3f}<extra></extra>",
        ),
        row=1,
        col=1,
    )
    for value, name in [(1.0, "1"), (0.5, "1/2")]:
        fig.add_hline(
            y=value, line=dict(dash="dot", color="grey"), annotation_text=name, row=1, col=1
        )
    x = inv[:, None].expand(-1, n_feat).flatten()
    y = D.flatten()
    keep = y > 0.05  # unlearned features sit at 0 and would hide the structure
    x, y = x[keep], y[keep]
    if x.numel() > max_points:
        idx = torch.randperm(x.numel(), generator=torch.Generator().manual_seed(0))[:max_points]
        x, y = x[idx], y[idx]
    jitter = 1 + 0.02 * (torch.rand(x.shape, generator=torch.Generator().manual_seed(1)) - 0.5)
    fig.add_trace(
        go.Scatter(
            x=(x * jitter).numpy(),
            y=y.numpy(),
            mode="markers",
            name="D_i",
            marker=dict(size=4, opacity=0.5),
            hovertemplate="D_i = %{y:.3f}<extra></extra>",
        ),
        row=1,
        col=2,
    )
    for name, value in NAMED_FRACTIONS.items():
        fig.add_hline(
            y=value,
            line=dict(dash="dot", color="grey", width=1),
            annotation_text=name,
            annotation_font_size=9,
            # 2/5 and 3/8 are close: put one label below its line
            annotation_position="bottom right" if value == 0.375 else "top right",
            row=1,
            col=2,
        )
    for col in (1, 2):
        fig.update_xaxes(
            type="log",
            tickvals=[1, 2, 3, 5, 10, 20, 50, 100],
            title_text="1 / (1 - S)  (log)",
            row=1,
            col=col,
        )
    fig.update_yaxes(range=[0, 1.1], title_text="dimensions per feature", row=1, col=1)
    fig.update_yaxes(range=[0, 1.1], title_text="D_i", row=1, col=2)
    fig.update_layout(title=title, showlegend=False, height=420)
    return fig


def plot_neuron_weights(
    W: Float[Tensor, "inst hid feats"],
    titles: Sequence[str] | None = None,
    title: str = "",
    top_k: int | None = None,
) -> go.Figure:
    """Which features each neuron reads: per neuron (x) a stacked bar of W[neuron, feature], one
    colour per feature, positive weights up and negative weights down."""
    W = _check_W(W, "plot_neuron_weights")
    n_inst, d_hidden, n_feat = W.shape
    titles = _check_titles(titles, n_inst, "plot_neuron_weights")
    features = range(n_feat) if top_k is None else range(min(top_k, n_feat))
    # one distinct colour per drawn feature (10 qualitative colours, 24 beyond that)
    palette = (
        plotly.colors.qualitative.Plotly
        if len(features) <= 10
        else plotly.colors.qualitative.Dark24
    )
    # own y range per panel: one large weight in one instance must not squash the others
    fig = make_subplots(
        rows=1, cols=n_inst, subplot_titles=titles, shared_yaxes=False, horizontal_spacing=0.035
    )
    for i in range(n_inst):
        for f in features:
            fig.add_trace(
                go.Bar(
                    x=list(range(d_hidden)),
                    y=W[i, :, f].numpy(),
                    name=f"feature {f}",
                    legendgroup=str(f),
                    showlegend=i == 0,
                    marker_color=palette[f % len(palette)],
                    hovertemplate=f"neuron %{{x}}, feature {f}: weight %{{y:.2f}}<extra></extra>",
                ),
                row=1,
                col=i + 1,
            )
        fig.update_xaxes(title_text="neuron", dtick=1, row=1, col=i + 1)
    fig.update_yaxes(title_text="weight from each feature", row=1, col=1)
    # a horizontal legend below the panels lists every feature (a vertical one was cut off)
    rows_of_legend = math.ceil(len(features) / 10)
    fig.update_layout(
        title=title,
        barmode="relative",
        height=400 + 22 * rows_of_legend,
        width=fit_width(max(600, 170 * n_inst + 80)),
        legend=dict(orientation="h", y=-0.22, x=0, font=dict(size=10)),
        margin=dict(b=60 + 22 * rows_of_legend),
    )
    return fig


def plot_loss_curves(
    loss: Float[Tensor, "steps inst"], names: Sequence[str] | None = None, title: str = ""
) -> go.Figure:
    """Training loss per instance (log y), subsampled to at most 300 points per curve."""
    if loss.ndim != 2:
        raise ValueError(f"loss must be [steps, inst], got {tuple(loss.shape)}.")
    names = _check_titles(names, loss.shape[1], "plot_loss_curves")
    stride = max(1, loss.shape[0] // 300)
    steps = torch.arange(0, loss.shape[0], stride)
    fig = go.Figure()
    for i, name in enumerate(names):
        fig.add_trace(
            go.Scatter(x=steps.numpy(), y=loss[::stride, i].numpy(), mode="lines", name=name)
        )
    fig.update_yaxes(type="log", title_text="loss")
    fig.update_xaxes(title_text="training step")
    fig.update_layout(title=title, height=350, width=700)
    return fig


__all__ = [
    "NAMED_FRACTIONS",
    "feature_dimensionality",
    "plot_WtW_and_bias",
    "plot_dimensionality",
    "plot_feature_norms",
    "plot_features_in_2d",
    "plot_loss_curves",
    "plot_neuron_weights",
    "plot_phase_diagram",
]
