"""Interactive figures that degrade to a static figure when no front end is attached."""

from __future__ import annotations

from collections.abc import Callable

import plotly.graph_objects as go

from course_utils.env import headless


def interactive_figure(make_figure: Callable[..., go.Figure], **controls) -> None:
    """Show ``make_figure(**values)`` and redraw it whenever a control (an ipywidget) changes.

    Headless (nbval, ``course check``, a script) there is nobody to move a slider, so we show the
    figure once at the controls' starting values: the notebook still documents what it shows.
    """
    values = {name: control.value for name, control in controls.items()}
    if headless():
        make_figure(**values).show()
        return
    import ipywidgets as widgets
    from IPython.display import display

    output = widgets.Output()

    def redraw(_change=None) -> None:
        with output:
            output.clear_output(wait=True)
            make_figure(**{name: c.value for name, c in controls.items()}).show()

    for control in controls.values():
        control.observe(redraw, names="value")
    display(widgets.VBox([*controls.values(), output]))
    redraw()
