"""What a learner sees, without a browser: the fast half of each snag's test (tests/test_browser.py
checks the same things on screen in JupyterLab).

1. `make lab` serves the repository root (solutions/ visible) and opens chapter 00.
2. A check that stops a cell shows its one line and one sentence, not a traceback wall.
4. No figure is wider than the 900 px output area.
5. Every notebook is stored exactly as JupyterLab saves it (opening and saving is a no-op).
6. The Colab badge degrades to a text link when its image cannot load (offline).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import nbformat
import pytest
import torch

from course_utils.checks.core import STOP_NOTE
from course_utils.machinery.build import NOTEBOOK_METADATA, notebook_text
from course_utils.machinery.chapters import available_chapters, exercise_path, solution_path
from course_utils.science import plots_superposition as plots
from tests.conftest import ROOT

CHAPTERS = available_chapters(ROOT)
NOTEBOOKS = [p for c in CHAPTERS for p in (solution_path(c, ROOT), exercise_path(c, ROOT))]
IDS = [str(p.relative_to(ROOT)) for p in NOTEBOOKS]
MAX_WIDTH = 900


# ------------------------------------------------------------------------------------------ snag 1
def test_make_lab_serves_the_repository_root_and_opens_chapter_00():
    if shutil.which("make") is None:
        pytest.skip("needs make")
    for target in ("lab", "lab-no-browser"):
        recipe = subprocess.run(
            ["make", "-n", "-W", "pyproject.toml", target, "STAMP=/dev/null"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        line = next(x for x in recipe.splitlines() if "jupyter lab" in x)
        assert f'--ServerApp.root_dir="{ROOT}"' in line, line
        assert "--LabApp.default_url=/lab/tree/notebooks/00_setup_and_tools.ipynb" in line, line
        # a positional notebook path would make Jupyter serve notebooks/ and hide solutions/
        assert not re.search(r"jupyter lab\s+\S+\.ipynb", line), line


# ------------------------------------------------------------------------------------------ snag 2
def _kernel_outputs(code: str) -> list[dict]:
    from ipykernel.inprocess.manager import InProcessKernelManager

    manager = InProcessKernelManager()
    manager.start_kernel()
    client = manager.client()
    client.start_channels()
    try:
        client.execute(code)
        return [
            {"type": m["msg_type"], **m["content"]}
            for m in client.iopub_channel.get_msgs()
            if m["msg_type"] in ("display_data", "stream", "error")
        ]
    finally:
        client.stop_channels()
        manager.shutdown_kernel()


@pytest.mark.parametrize(
    ("body", "status", "colour"),
    [
        ("raise NotImplementedError()", "not attempted", "#9a6700"),
        ("return vectors @ vectors.T", "failed", "#cf222e"),
    ],
)
def test_a_stopped_check_shows_one_line_and_why_run_all_stopped(body, status, colour):
    outputs = _kernel_outputs(
        "from course_utils.checks import ch00 as check\n"
        f"def cosine_similarity_matrix(vectors, eps=1e-8):\n    {body}\n"
        "check.cosine_similarity_matrix(cosine_similarity_matrix)\n"
    )
    kinds = [o["type"] for o in outputs]
    assert kinds == ["display_data", "error"], kinds
    line = outputs[0]["data"]
    assert f"color:{colour}" in line["text/html"] and line["text/plain"].count("\n") == 0
    error = outputs[1]
    # the error output is what Run All stops on; it must be one sentence, not a traceback
    assert error["traceback"] == [STOP_NOTE[status]]
    assert "Run All stops" in error["traceback"][0] and "on purpose" in error["traceback"][0]


def test_a_passing_check_shows_one_green_line_and_no_error():
    outputs = _kernel_outputs(
        "import torch\nfrom course_utils.checks import ch00 as check\n"
        "def cosine_similarity_matrix(vectors, eps=1e-8):\n"
        "    unit = vectors / vectors.norm(dim=-1, keepdim=True).clamp_min(eps)\n"
        "    return unit @ unit.T\n"
        "check.cosine_similarity_matrix(cosine_similarity_matrix)\n"
    )
    assert [o["type"] for o in outputs] == ["display_data"]
    assert "color:#1a7f37" in outputs[0]["data"]["text/html"]


def test_chapter_00_says_what_run_all_does_on_an_unfinished_notebook():
    nb = nbformat.read(solution_path(CHAPTERS[0], ROOT), as_version=4)
    text = "\n".join(c.source for c in nb.cells if c.cell_type == "markdown")
    assert "Run All" in text and "stops" in text


# ------------------------------------------------------------------------------------------ snag 4
def _helper_figures():
    torch.manual_seed(0)
    n_inst, n_feat = 8, 20
    W = torch.randn(n_inst, 5, n_feat)
    b = torch.randn(n_inst, n_feat)
    W2 = torch.randn(n_inst, 2, 5)
    titles = [f"instance {i}" for i in range(n_inst)]
    yield "plot_WtW_and_bias", plots.plot_WtW_and_bias(W, b, titles)
    yield "plot_feature_norms", plots.plot_feature_norms(W, titles)
    yield "plot_features_in_2d", plots.plot_features_in_2d(W2, titles)
    yield "plot_neuron_weights", plots.plot_neuron_weights(W, titles)


@pytest.mark.parametrize(
    "name",
    ["plot_WtW_and_bias", "plot_feature_norms", "plot_features_in_2d", "plot_neuron_weights"],
)
def test_plot_helpers_never_ask_for_more_than_the_output_area(name):
    fig = dict(_helper_figures())[name]
    width = fig.layout.width
    assert width is None or width <= MAX_WIDTH, f"{name}: width {width} > {MAX_WIDTH}"


def _stored_figures(path):
    nb = json.loads(path.read_text())
    for index, cell in enumerate(nb["cells"]):
        for output in cell.get("outputs", []):
            spec = output.get("data", {}).get("application/vnd.plotly.v1+json")
            if spec is not None:
                yield index, spec


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_no_stored_figure_and_no_figure_code_is_wider_than_900_px(path):
    wide = [
        (i, spec["layout"]["width"])
        for i, spec in _stored_figures(path)
        if (spec["layout"].get("width") or 0) > MAX_WIDTH
    ]
    assert not wide, f"cells (index, width) wider than {MAX_WIDTH} px: {wide}"
    nb = nbformat.read(path, as_version=4)
    for index, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            for width in re.findall(r"\bwidth\s*=\s*(\d+)", cell.source):
                assert int(width) <= MAX_WIDTH, f"cell {index} sets width={width}"


# ------------------------------------------------------------------------------------------ snag 5
@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_notebook_is_stored_as_jupyterlab_saves_it(path):
    text = path.read_text(encoding="utf-8")
    nb = json.loads(text)
    assert nb["metadata"] == NOTEBOOK_METADATA
    assert text == notebook_text(nb), (
        f"{path.name} is not stored as JupyterLab saves it (opening it would modify it): "
        "run `python scripts/normalise_notebooks.py` (or `course build` for notebooks/)."
    )


def test_whole_floats_are_what_javascript_would_save():
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("1")]
    nb.cells[0].outputs = [
        nbformat.v4.new_output(
            "display_data",
            {"application/vnd.plotly.v1+json": {"x": [0.0, -0.0, 1.5, 2.0, 1e-05, 1e300, 3e21]}},
        )
    ]
    out = json.loads(notebook_text(nb))["cells"][0]["outputs"][0]["data"]
    assert out["application/vnd.plotly.v1+json"]["x"] == [0, 0, 1.5, 2, 1e-05, 1e300, 3e21]
    assert '"x": [\n' in notebook_text(nb) and "2.0" not in notebook_text(nb)


# ------------------------------------------------------------------------------------------ snag 6
def test_colab_badge_degrades_to_a_text_link_when_its_image_cannot_load():
    from course_utils.machinery import colab

    badge = colab.badge("notebooks/00_setup_and_tools.ipynb")
    alts = re.findall(r"!\[([^\]]*)\]\(" + re.escape(colab.BADGE_IMAGE), badge)
    assert alts == [""], f"the badge image's alt text shows next to a broken-image icon: {alts}"
    text = re.sub(r"!\[[^\]]*\]\([^)]*\)", "", badge)
    assert "Open in Colab" in text, "without its image the badge must still read as a link"


# ------------------------------------------------------------------- snag 5: opening is a no-op
def test_the_save_hook_strips_only_the_plotly_renderers_png_snapshot():
    from course_utils.machinery.jupyter_hooks import PLOTLY_MIME, before_save

    figure = {"data": {PLOTLY_MIME: {"data": []}, "image/png": "AAAA", "text/plain": "Figure"}}
    picture = {"data": {"image/png": "BBBB"}}  # a matplotlib-style image is the learner's output
    model = {
        "type": "notebook",
        "content": {"cells": [{"cell_type": "code", "outputs": [figure, picture]}]},
    }
    before_save(model=model, path="x.ipynb", contents_manager=None)
    assert figure["data"] == {PLOTLY_MIME: {"data": []}, "text/plain": "Figure"}
    assert picture["data"] == {"image/png": "BBBB"}
    text_file = {"type": "file", "content": "image/png"}
    before_save(model=text_file, path="x.txt", contents_manager=None)
    assert text_file == {"type": "file", "content": "image/png"}


def test_make_lab_registers_the_hook_with_the_jupyter_server_of_the_venv():
    """`make lab` writes .venv/etc/jupyter/jupyter_server_config.json; the server loads it."""
    makefile = (ROOT / "Makefile").read_text()
    assert "kernel: $(STAMP) $(LAB_OVERRIDES) $(SERVER_CONFIG)" in makefile
    config = ROOT / ".venv" / "etc" / "jupyter" / "jupyter_server_config.json"
    if not config.exists():
        pytest.skip("run `make kernel` (or `make lab`) first: it writes the server config")
    code = (
        "from jupyter_server.serverapp import ServerApp; a = ServerApp(); "
        "a.initialize(argv=['--port=0', '--allow-root'], find_extensions=False); "
        "print(a.contents_manager.pre_save_hook.__qualname__)"
    )
    out = subprocess.run(
        [str(ROOT / ".venv" / "bin" / "python"), "-c", code],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert out.stdout.strip().endswith("before_save"), out.stderr[-2000:]


def test_the_save_hook_keeps_the_saved_state_of_a_slider_that_no_kernel_runs(tmp_path):
    """Snag 3, second session: reopen without re-running, save: the slider's state stays."""
    from course_utils.machinery.jupyter_hooks import WIDGET_STATE, WIDGET_VIEW, before_save

    slider = {"model_name": "IntSliderModel", "state": {"layout": "IPY_MODEL_bb", "value": 64}}
    layout = {"model_name": "LayoutModel", "state": {}}
    other = {"model_name": "ButtonModel", "state": {}}  # no output shows it any more
    on_disk = {
        "cells": [],
        "metadata": {
            "widgets": {
                WIDGET_STATE: {
                    "state": {"aa": slider, "bb": layout, "cc": other},
                    "version_major": 2,
                    "version_minor": 0,
                }
            }
        },
    }
    (tmp_path / "n.ipynb").write_text(json.dumps(on_disk))
    saved_now = {"state": {}, "version_major": 2, "version_minor": 0}  # nothing alive
    content = {
        "cells": [{"cell_type": "code", "outputs": [{"data": {WIDGET_VIEW: {"model_id": "aa"}}}]}],
        "metadata": {"widgets": {WIDGET_STATE: saved_now}},
    }

    class Manager:
        root_dir = str(tmp_path)

    before_save(
        model={"type": "notebook", "content": content}, path="n.ipynb", contents_manager=Manager()
    )
    assert content["metadata"]["widgets"][WIDGET_STATE]["state"] == {"aa": slider, "bb": layout}
    # a new notebook (nothing on disk yet) saves as it is
    fresh = {"cells": content["cells"], "metadata": {"widgets": {WIDGET_STATE: dict(saved_now)}}}
    before_save(
        model={"type": "notebook", "content": fresh}, path="new.ipynb", contents_manager=Manager()
    )
    assert fresh["metadata"]["widgets"][WIDGET_STATE]["state"] == {}


def test_progress_bars_and_split_streams_are_stored_as_jupyterlab_holds_them():
    """JupyterLab merges consecutive stream outputs and applies \\r: store them that way."""
    from course_utils.machinery.build import as_jupyterlab_streams

    bar = [
        {"output_type": "stream", "name": "stderr", "text": "\rtraining:   8%|▊ | 254/3000"},
        {"output_type": "stream", "name": "stderr", "text": "\rtraining: 100%|█| 3000/3000\n"},
        {"output_type": "stream", "name": "stdout", "text": ["loss 0.1\n", "done\n"]},
        {"output_type": "display_data", "data": {"text/plain": "figure"}, "metadata": {}},
        {"output_type": "stream", "name": "stdout", "text": "after\n"},
        {"output_type": "stream", "name": "stdout", "text": "ab\b\bc\n"},
    ]
    assert as_jupyterlab_streams(bar) == [
        {"output_type": "stream", "name": "stderr", "text": "training: 100%|█| 3000/3000\n"},
        {"output_type": "stream", "name": "stdout", "text": "loss 0.1\ndone\n"},
        bar[3],
        {"output_type": "stream", "name": "stdout", "text": "after\nc\n"},
    ]
