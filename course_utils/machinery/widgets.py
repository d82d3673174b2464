"""Interactive figures that degrade to a static figure when no front end is attached.

The figure is an ordinary display output that each control change replaces in place
(``update_display_data``); the controls are ipywidgets displayed above it. Nothing is drawn inside
an ipywidgets ``Output``:

- a saved notebook stores the figure as plotly JSON like any other figure, so reopening it shows
  the figure for the last slider position (not "Error displaying widget: model not found");
- in Colab each update is a complete HTML page that loads plotly.js itself, which avoids Colab's
  "Plotly is not defined" bug for plotly figures drawn inside an ``Output`` widget;
- it needs nothing newer than ipywidgets 7.7 and plotly 5.24 (Colab's versions).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import plotly.graph_objects as go

from course_utils.machinery.env import headless


def figure_bundle(figure: go.Figure) -> dict[str, Any]:
    """The MIME bundle plotly's current default renderer would display for ``figure``.

    ``plotly_mimetype`` gives plotly JSON (JupyterLab, VS Code); ``colab`` gives a self-contained
    HTML page. A ``text/plain`` line is added so that a front end without a plotly renderer
    shows a sentence instead of nothing.
    """
    if not isinstance(figure, go.Figure):
        raise TypeError(
            f"make_figure must return a plotly go.Figure, got {type(figure).__name__}: "
            "end your function with `return fig`."
        )
    import plotly.io as pio

    bundle = pio.renderers._build_mime_bundle(figure.to_dict())
    if not bundle:
        raise ValueError(
            f"plotly renderer {pio.renderers.default!r} makes no notebook output; "
            "call course_utils.machinery.env.configure_plotly() (setup_notebook does) first."
        )
    title = figure.layout.title.text or "a plotly figure"
    bundle.setdefault("text/plain", f"<Figure: {title}>")
    return bundle


PLOTLY_MIME = "application/vnd.plotly.v1+json"


def _placeholder(figure: dict[str, Any]) -> dict[str, str]:
    height = figure[PLOTLY_MIME].get("layout", {}).get("height") or 360  # Lab's default height
    return {"text/html": f'<div style="height:{int(height)}px"></div>', "text/plain": ""}


def _captured_bundle(captured: Any) -> dict[str, str] | None:
    """What ``make_figure`` printed or displayed (text, HTML), as one MIME bundle; None if nothing."""
    import html

    plain: list[str] = []
    rich: list[str] = []
    for text in (captured.stdout, captured.stderr):
        if text:
            plain.append(text)
            rich.append(f"<pre>{html.escape(text)}</pre>")
    for output in captured.outputs:
        data = output.data or {}
        text = data.get("text/plain", "")
        plain.append(text)
        rich.append(data.get("text/html") or f"<pre>{html.escape(text)}</pre>")
    if not plain:
        return None
    return {"text/plain": "\n".join(plain), "text/html": "\n".join(rich)}


def interactive_figure(make_figure: Callable[..., go.Figure], **controls: Any) -> None:
    """Show ``make_figure(**values)`` and redraw it whenever a control (an ipywidget) changes.

    What ``make_figure`` prints or displays besides the figure (a feature's top contexts, say) is
    shown above the figure and replaced with it. Headless (nbval, ``course check``, a script)
    there is nobody to move a slider, so we show the figure once at the controls' starting
    values: the notebook still documents what it shows.
    """
    if not controls:
        raise TypeError(
            "interactive_figure needs at least one control, e.g. d=widgets.IntSlider(...)."
        )
    for name, control in controls.items():
        if not hasattr(control, "observe") or not hasattr(control, "value"):
            raise TypeError(
                f"control {name!r} is a {type(control).__name__}, not an ipywidget: pass "
                f"{name}=widgets.IntSlider(...) (or another widget with a .value)."
            )

    def current() -> dict[str, Any]:
        return {name: control.value for name, control in controls.items()}

    if headless():
        make_figure(**current()).show()
        return
    import ipywidgets as widgets
    from IPython.display import display
    from IPython.utils.capture import capture_output

    def draw() -> tuple[dict[str, str] | None, dict[str, Any]]:
        with capture_output() as captured:
            figure = make_figure(**current())
        return _captured_bundle(captured), figure_bundle(figure)

    # Build the first figure before displaying anything: an error in make_figure then surfaces
    # here, once, with the learner's traceback, and no orphan sliders are left on screen.
    side, figure = draw()
    display(widgets.VBox(list(controls.values())))
    side_handle = display(side, raw=True, display_id=True) if side else None
    handle = display(figure, raw=True, display_id=True)

    def redraw(_change: Any = None) -> None:
        try:
            side, figure = draw()
        except Exception as error:  # shown where the figure was, not lost in the kernel log
            values = ", ".join(f"{k}={v!r}" for k, v in current().items())
            side = None
            figure = {"text/plain": f"make_figure({values}) raised {type(error).__name__}: {error}"}
        if side_handle is not None:
            side_handle.update(side or {"text/plain": ""}, raw=True)
        if PLOTLY_MIME in figure:
            # JupyterLab hands an updated output of the same type to the renderer it already has,
            # and plotly's renderer ignores it once a graph is drawn. An update of another type
            # (a blank of the figure's height, so the page does not jump) makes Lab draw anew.
            handle.update(_placeholder(figure), raw=True)
        handle.update(figure, raw=True)

    for control in controls.values():
        control.observe(redraw, names="value")
