"""interactive_figure in a real (in-process) IPython kernel: what it publishes, and on a slider move.

The figure must be an ordinary display output updated in place (stored in the saved notebook, so
it reopens as a figure), never drawn inside an ipywidgets ``Output`` (Colab's "Plotly is not
defined" bug). This file needs only ipykernel, ipywidgets, plotly and ``course_utils.machinery.widgets``,
so it also runs against Colab's versions (ipywidgets 7.7, plotly 5.24) in a throwaway venv.
"""

from __future__ import annotations

import json

import pytest

pytest.importorskip("ipykernel")
pytest.importorskip("ipywidgets")

SETUP = """
import plotly.io as pio
pio.renderers.default = {renderer!r}
import ipywidgets as widgets
import plotly.graph_objects as go
import course_utils.machinery.widgets as W
W.headless = lambda: False  # an in-process kernel has no front end; act as if Lab were there

def make(d):
    print(f"side text for d={{d}}")
    return go.Figure(go.Bar(y=[d, 1.0]), layout_title_text=f"d = {{d}}")

slider = widgets.IntSlider(value=3, min=1, max=9, description="d")
W.interactive_figure(make, d=slider)
"""


def _run(renderer: str, *moves: str) -> list[list[dict]]:
    """Execute SETUP, then each move, in a fresh in-process kernel; iopub messages per step."""
    from ipykernel.inprocess.manager import InProcessKernelManager

    manager = InProcessKernelManager()
    manager.start_kernel()
    client = manager.client()
    client.start_channels()
    steps = []
    try:
        for code in (SETUP.format(renderer=renderer), *moves):
            client.execute(code)
            messages = client.iopub_channel.get_msgs()
            errors = [m["content"] for m in messages if m["msg_type"] == "error"]
            assert not errors, "\n".join(e["ename"] + ": " + e["evalue"] for e in errors)
            steps.append(messages)
    finally:
        client.stop_channels()
        manager.shutdown_kernel()
    return steps


def _displays(messages: list[dict], kind: str = "display_data") -> list[dict]:
    return [m["content"] for m in messages if m["msg_type"] == kind]


def _title(content: dict) -> str:
    data = content["data"]
    if "application/vnd.plotly.v1+json" in data:
        return data["application/vnd.plotly.v1+json"]["layout"]["title"]["text"]
    return data["text/html"]


@pytest.mark.parametrize("renderer", ["plotly_mimetype", "colab"])
def test_slider_redraws_the_figure_in_place_without_an_output_widget(renderer):
    first, moved = _run(renderer, "slider.value = 5")
    shown = _displays(first)
    widget_views = [c for c in shown if "application/vnd.jupyter.widget-view+json" in c["data"]]
    figures = [
        c
        for c in shown
        if c.get("transient", {}).get("display_id")
        and "text/plain" in c["data"]
        and "side text" not in c["data"]["text/plain"]
    ]
    sides = [c for c in shown if "side text for d=3" in c["data"].get("text/plain", "")]
    assert len(widget_views) == 1, "the controls are one widget box"
    assert len(figures) == 1 and len(sides) == 1, shown
    assert "d = 3" in _title(figures[0])
    if renderer == "plotly_mimetype":
        assert "application/vnd.plotly.v1+json" in figures[0]["data"]
    else:  # Colab: a complete page that loads plotly.js itself
        assert "plotly" in figures[0]["data"]["text/html"].lower()
        assert "<script" in figures[0]["data"]["text/html"]
    opened = [m["content"] for m in first if m["msg_type"] == "comm_open"]
    models = [c["data"]["state"].get("_model_name") for c in opened]
    assert "OutputModel" not in models, "nothing may be drawn inside an ipywidgets Output"

    updates = _displays(moved, "update_display_data")
    figure_id = figures[0]["transient"]["display_id"]
    figure_updates = [u for u in updates if u["transient"]["display_id"] == figure_id]
    assert "d = 5" in _title(figure_updates[-1])
    if renderer == "plotly_mimetype":
        # first a blank of the same height (JupyterLab's plotly renderer ignores same-type
        # updates), then the figure
        assert len(figure_updates) == 2
        assert figure_updates[0]["data"]["text/html"] == '<div style="height:360px"></div>'
    else:
        assert len(figure_updates) == 1
    side_id = sides[0]["transient"]["display_id"]
    side_updates = [u for u in updates if u["transient"]["display_id"] == side_id]
    assert len(side_updates) == 1 and "d=5" in side_updates[0]["data"]["text/plain"]
    assert not _displays(moved), "a slider move must update in place, not append outputs"


def test_stored_figure_uses_javascript_numbers_only_where_plotly_put_them():
    # the stored figure is plain plotly JSON: it reopens as a figure without a kernel
    first = _run("plotly_mimetype")[0]
    figure = next(c for c in _displays(first) if "application/vnd.plotly.v1+json" in c["data"])
    json.dumps(figure["data"])  # serialisable as the notebook stores it


def test_an_error_while_redrawing_is_shown_where_the_figure_was():
    _, _, broken = _run(
        "plotly_mimetype",
        "other = widgets.IntSlider(value=1)\n"
        "def bad(d):\n    if d > 1:\n        raise ValueError('d must be 1')\n"
        "    return go.Figure()\n"
        "W.interactive_figure(bad, d=other)",
        "other.value = 2",
    )
    updates = _displays(broken, "update_display_data")
    assert len(updates) == 1
    assert "raised ValueError: d must be 1" in updates[0]["data"]["text/plain"]


def test_bad_controls_and_bad_figures_are_refused_with_what_to_do():
    import course_utils.machinery.widgets as W

    with pytest.raises(TypeError, match="at least one control"):
        W.interactive_figure(lambda: None)
    with pytest.raises(TypeError, match="not an ipywidget"):
        W.interactive_figure(lambda d: None, d=3)
    with pytest.raises(TypeError, match="return fig"):
        W.figure_bundle("not a figure")
