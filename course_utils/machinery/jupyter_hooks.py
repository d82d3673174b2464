"""A Jupyter server hook that keeps saved notebooks as the course stores them.

JupyterLab's plotly renderer (the ``jupyterlab-plotly`` extension) draws a figure, then writes a
PNG snapshot of it into the output (``image/png`` beside ``application/vnd.plotly.v1+json``).
That marks a notebook modified the moment it is opened, and autosave then rewrites every
``solutions/*.ipynb`` the learner merely looked at: ``git status`` shows the references as
changed and a later ``git pull`` refuses. The snapshot is a screenshot of this browser's window
size, so it differs on every machine; the figure itself is the JSON, which stays.

The same hook keeps saved sliders alive across sessions. With widget-state saving on (``make
lab`` turns it on, so that a saved slider reopens as a slider), JupyterLab saves the state of the
widgets that are alive. Reopen a notebook without re-running it and save it again, and nothing is
alive: the saved state would be written away, and the next reopening would show "Error displaying
widget: model not found". So a widget that an output still shows keeps the state the file on disk
has for it.

``make lab`` registers :func:`before_save` for the course's virtual environment
(``.venv/etc/jupyter/jupyter_server_config.json``); on another Jupyter server,
pass ``--ContentsManager.pre_save_hook=course_utils.machinery.jupyter_hooks.before_save``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

PLOTLY_MIME = "application/vnd.plotly.v1+json"
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
WIDGET_STATE = "application/vnd.jupyter.widget-state+json"
MODEL_REFERENCE = re.compile(r"IPY_MODEL_([0-9a-f]+)")
SERVER_CONFIG = {
    "ContentsManager": {
        "pre_save_hook": "course_utils.machinery.jupyter_hooks.before_save"
    }
}


def before_save(
    model: dict[str, Any], path: str = "", contents_manager: Any = None, **_: Any
) -> None:
    """Before a notebook is saved: drop plotly's PNG snapshots, keep shown widgets' state."""
    if model.get("type") != "notebook" or not isinstance(model.get("content"), dict):
        return
    shown: set[str] = set()
    for cell in model["content"].get("cells", []):
        for output in cell.get("outputs", []) or []:
            data = output.get("data") or {}
            if PLOTLY_MIME in data:
                data.pop("image/png", None)
            if isinstance(data.get(WIDGET_VIEW), dict) and data[WIDGET_VIEW].get("model_id"):
                shown.add(data[WIDGET_VIEW]["model_id"])
    if shown and contents_manager is not None and path:
        _keep_widget_state(model["content"], shown, _state_on_disk(contents_manager, path))


def _widget_state(notebook: dict[str, Any]) -> dict[str, Any]:
    return ((notebook.get("metadata") or {}).get("widgets") or {}).get(WIDGET_STATE) or {}


def _state_on_disk(contents_manager: Any, path: str) -> dict[str, Any]:
    """The widget models the file on disk holds (empty if it cannot be read)."""
    # Read the file itself: the server's contents manager may be async, and a hook is not.
    try:
        on_disk = json.loads(Path(contents_manager.root_dir, path).read_text(encoding="utf-8"))
    except (OSError, ValueError, AttributeError, TypeError):  # new, unreadable or not JSON
        return {}
    return dict(_widget_state(on_disk).get("state") or {})


def _keep_widget_state(notebook: dict[str, Any], shown: set[str], old: dict[str, Any]) -> None:
    """Copy into ``notebook`` the old state of every shown widget the save would drop."""
    saved = _widget_state(notebook)
    state = dict(saved.get("state") or {})
    wanted = [model_id for model_id in shown if model_id not in state and model_id in old]
    while wanted:  # a slider refers to its layout and style models: keep those too
        model_id = wanted.pop()
        if model_id in state or model_id not in old:
            continue
        state[model_id] = old[model_id]
        wanted.extend(MODEL_REFERENCE.findall(repr(old[model_id])))
    if state != (saved.get("state") or {}):
        widgets = notebook.setdefault("metadata", {}).setdefault("widgets", {})
        widgets[WIDGET_STATE] = {
            "state": state,
            "version_major": saved.get("version_major", 2),
            "version_minor": saved.get("version_minor", 0),
        }
