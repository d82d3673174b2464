"""The learner's screen: JupyterLab, started as the README says, driven in headless Chromium.

One JupyterLab (``make lab-no-browser`` in a throwaway copy of the repository) and one Chromium
serve every test in this file; the tests run in file order and each leaves Lab with no notebook
open. Screenshots of each step go to ``.browser-shots/`` (or $COURSE_SHOTS_DIR): look at them.

Covers: a newcomer's first steps (README -> chapter 00's first passing check -> chapter 01's
first live figure), chapter 00 end to end (every exercise, check colours, every figure, the
slider, reopening the saved notebook twice), the sliders of chapters 03, 06, 08 and 09 run live
and moved, every chapter's stored figures from saved outputs (drawn, inside the output area),
that opening and saving any notebook changes no byte, and the offline Colab link. Needs
/usr/bin/chromium and playwright; skips with one sentence otherwise.
"""

from __future__ import annotations

import difflib
import json
import os
import time
from pathlib import Path

import pytest

from tests.browser_lab import (
    CHROMIUM,
    CHROMIUM_ARGS,
    TOKEN,
    VIEWPORT,
    LabPage,
    LabServer,
    copy_repository,
    skip_reason,
)
from tests.conftest import ROOT

REASON = skip_reason()
pytestmark = [pytest.mark.browser, pytest.mark.skipif(REASON is not None, reason=REASON or "")]

AMBER, RED, GREEN = "rgb(154, 103, 0)", "rgb(207, 34, 46)", "rgb(26, 127, 55)"
PLOTLY_MIME = "application/vnd.plotly.v1+json"
CHAPTER_00 = "notebooks/00_setup_and_tools.ipynb"
CHAPTER_01 = "notebooks/01_toy_models_of_superposition.ipynb"


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    from playwright.sync_api import sync_playwright

    shots = Path(os.environ.get("COURSE_SHOTS_DIR", ROOT / ".browser-shots"))
    shots.mkdir(parents=True, exist_ok=True)
    repo = tmp_path_factory.mktemp("repo")
    copy_repository(repo)
    state = tmp_path_factory.mktemp("jupyter")
    server = LabServer(repo, state)
    try:
        with sync_playwright() as playwright:
            # Playwright gives every launch a fresh, temporary --user-data-dir.
            browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
            page = browser.new_page(viewport=VIEWPORT)
            page.set_default_timeout(60_000)
            lab = LabPage(page, server, shots)
            lab.goto()
            yield lab
            browser.close()
    finally:
        server.stop()


def _solution_cells(path: str) -> dict[str, str]:
    """Solution source of every exercise cell, by cell id, without the solution markers."""
    nb = json.loads((ROOT / path.replace("notebooks/", "solutions/")).read_text())
    return {
        c["id"]: "".join(
            x for x in c["source"] if "# BEGIN SOLUTION" not in x and "# END SOLUTION" not in x
        )
        for c in nb["cells"]
        if c["cell_type"] == "code" and any("# BEGIN SOLUTION" in x for x in c["source"])
    }


def _check_line(lab: LabPage, index: int):
    return lab.cell(index).locator(".jp-OutputArea-output div[style*='monospace']").first


def _colour(locator) -> str:
    return locator.evaluate("e => getComputedStyle(e).color")


def _assert_clean(lab: LabPage) -> None:
    assert not lab.screen_problems(), lab.screen_problems()
    assert not lab.errors, lab.errors
    lab.errors.clear()


def _diff(before: bytes, after: bytes) -> str:
    lines = difflib.unified_diff(
        before.decode().splitlines(), after.decode().splitlines(), lineterm="", n=2
    )
    return "\n".join(line[:160] for line in list(lines)[:40])


def _figures_fit(lab: LabPage, index: int) -> None:
    """Every plot of cell ``index`` lies inside its output area (nothing cut off on the right)."""
    for k in range(lab.plots_in(index).count()):
        plot = lab.plots_in(index).nth(k).bounding_box()
        area = lab.cell(index).locator(".jp-OutputArea").bounding_box()
        assert plot["x"] + plot["width"] <= area["x"] + area["width"] + 1, (index, plot, area)


# -------------------------------------------------------------------------- a newcomer's first hour
def test_newcomer_follows_the_readme_to_a_first_passing_check_and_a_first_figure(lab):
    """README: `make lab` -> chapter 00 opens; Run All; the first check; then chapter 01."""
    start = time.time()
    lab.page.goto(f"{lab.server.url}/?token={TOKEN}")  # what `make lab` opens in the browser
    lab.wait_for_notebook(CHAPTER_00)
    # snag 1: Jupyter serves the repository root, so solutions/ is one click away
    lab.page.locator(".jp-BreadCrumbs-home").click()
    listing = lab.page.locator(".jp-DirListing-content")
    listing.get_by_text("solutions", exact=True).wait_for()
    assert listing.get_by_text("notebooks", exact=True).is_visible()
    lab.screenshot("01_make_lab_opens_chapter_00_at_the_repository_root")
    assert not lab.dirty(), "opening chapter 00 marked it modified (snag 5)"

    # snag 2: Run All on the untouched notebook stops at the first check, with one line + why
    lab.run_all()
    first = lab.find_cell("check.cosine_similarity_matrix(cosine_similarity_matrix)")
    lab.scroll_to(first)
    text = lab.output_text(first)
    assert text.startswith("… Exercise 0.1 cosine_similarity_matrix — not attempted yet")
    assert "Run All stops at an unfinished exercise, on purpose" in text
    assert "Traceback" not in text and "core.py" not in text and "NotAttempted" not in text
    assert _colour(_check_line(lab, first)) == AMBER
    assert (
        lab.js(
            "() => window.jupyterapp.shell.currentWidget.content.widgets.at(-1).model.executionCount"
        )
        is None
    )
    lab.screenshot("02_run_all_stops_at_the_first_unfinished_exercise")

    # the learner writes the answer and runs the cell
    source = _solution_cells(CHAPTER_00)
    cell_id = lab.js(
        f"() => window.jupyterapp.shell.currentWidget.content.widgets[{first}].model.id"
    )
    lab.set_source(first, source[cell_id])
    lab.run_cell(first)
    assert lab.output_text(first).startswith("✓ Exercise 0.1 cosine_similarity_matrix — matches")
    assert _colour(_check_line(lab, first)) == GREEN
    lab.screenshot("03_first_passing_check")
    _assert_clean(lab)

    # chapter 01, opened from the file browser: its first figure is there before any code runs
    lab.page.locator(".jp-BreadCrumbs-home").click()
    listing.locator(".jp-DirListing-item", has_text="notebooks").locator(
        ".jp-DirListing-itemIcon"
    ).dblclick()
    item = listing.locator(".jp-DirListing-item", has_text="01_toy_models_of_superposition.ipynb")
    item.locator(".jp-DirListing-itemIcon").dblclick()
    lab.wait_for_notebook(CHAPTER_01)
    expected = lab.find_cell("row = [settings_5.index((0.9, p)) for p in densities_5]")
    lab.scroll_to(expected)
    assert lab.plots_in(expected).count() == 1
    _figures_fit(lab, expected)
    lab.screenshot("04_chapter_01_first_figure_from_saved_output")

    # ... and its first exercise, written and checked
    solutions = _solution_cells(CHAPTER_01)
    first = lab.find_cell("check.generate_batch(")
    for index in range(first + 1):
        cell_id = lab.js(
            f"() => window.jupyterapp.shell.currentWidget.content.widgets[{index}].model.id"
        )
        if cell_id in solutions:
            lab.set_source(index, solutions[cell_id])
        if (
            lab.js(
                f"() => window.jupyterapp.shell.currentWidget.content.widgets[{index}].model.type"
            )
            == "code"
        ):
            lab.run_cell(index)
    lab.scroll_to(first)
    assert lab.output_text(first).startswith("✓ Exercise 1.1 generate_batch"), lab.output_text(
        first
    )
    assert _colour(_check_line(lab, first)) == GREEN
    lab.screenshot("05_chapter_01_first_passing_check")
    _assert_clean(lab)
    print(f"newcomer path: {time.time() - start:.0f} s")
    lab.close_all()
    lab.shutdown_kernels()


# ------------------------------------------------------------------------------- chapter 00, fully
WRONG_0_2 = "    store[hook.name] = activation.detach().norm(dim=-1) ** 2\n"


def _plotly_outputs(lab: LabPage) -> dict[int, int]:
    """Cell index -> number of plotly outputs, from the notebook model (what should be drawn)."""
    return {
        int(k): v
        for k, v in lab.js(
            f"""() => Object.fromEntries(window.jupyterapp.shell.currentWidget.content.widgets
                 .map((c, i) => [i, c.model.type === 'code' ? [...Array(c.model.outputs.length).keys()]
                   .filter(j => '{PLOTLY_MIME}' in c.model.outputs.get(j).data).length : 0])
                 .filter(([i, n]) => n > 0))"""
        ).items()
    }


def _wait_for_plots(lab: LabPage, expected: dict[int, int]) -> None:
    lab.page.wait_for_function(
        """(want) => { const cells = window.jupyterapp.shell.currentWidget.content.widgets;
             return Object.entries(want).every(([i, n]) =>
               cells[i].node.querySelectorAll('.js-plotly-plot .main-svg').length >= n); }""",
        arg={str(k): v for k, v in expected.items()},
        timeout=90_000,
    )


def test_chapter_00_end_to_end_with_every_check_colour_figure_and_the_slider(lab):
    start = time.time()
    lab.open(CHAPTER_00)
    solutions = _solution_cells(CHAPTER_00)
    hook_cell = None
    for index in range(lab.n_cells()):
        cell_id = lab.js(
            f"() => window.jupyterapp.shell.currentWidget.content.widgets[{index}].model.id"
        )
        if cell_id in solutions:
            source = solutions[cell_id]
            if "def record_norm_hook" in source:  # a plausible mistake first: squared norms
                hook_cell = index
                body = [x for x in source.splitlines(True) if x.strip().startswith("store[")]
                source = source.replace(body[0], WRONG_0_2)
            lab.set_source(index, source)
    lab.run_all()
    lab.scroll_to(hook_cell)
    text = lab.output_text(hook_cell)
    assert text.startswith("✗ Exercise 0.2 record_norm_hook"), text
    assert "Hint: these are squared norms" in text
    assert "Run All stops at a failing check, on purpose" in text and "Traceback" not in text
    assert _colour(_check_line(lab, hook_cell)) == RED
    lab.screenshot("10_chapter_00_failed_check_with_its_hint")

    lab.set_source(
        hook_cell,
        solutions[
            lab.js(
                f"() => window.jupyterapp.shell.currentWidget.content.widgets[{hook_cell}].model.id"
            )
        ],
    )
    lab.js(
        f"() => {{ window.jupyterapp.shell.currentWidget.content.activeCellIndex = {hook_cell}; }}"
    )
    lab.command("notebook:run-all-below")
    lab.wait_idle(300)
    lines = lab.page.locator(".jp-OutputArea-output div[style*='monospace']")
    texts = [lines.nth(i).inner_text() for i in range(lines.count())]
    assert [t[:14] for t in texts] == ["✓ Exercise 0.1", "✓ Exercise 0.2", "✓ Exercise 0.3"], texts
    assert all(_colour(lines.nth(i)) == GREEN for i in range(3))
    last = lab.n_cells() - 1
    assert (
        lab.js(
            f"() => window.jupyterapp.shell.currentWidget.content.widgets[{last}].model.executionCount"
        )
        or lab.js(f"() => window.jupyterapp.shell.currentWidget.content.widgets[{last}].model.type")
        != "code"
    )
    errors = lab.js(
        "() => window.jupyterapp.shell.currentWidget.node.querySelectorAll('.jp-RenderedText[data-mime-type=\"application/vnd.jupyter.stderr\"]').length"
    )
    figures = _plotly_outputs(lab)
    assert len(figures) == 3, figures  # the slider figure and the two figures after 0.2 and 0.3
    _wait_for_plots(lab, figures)
    for index in figures:
        _figures_fit(lab, index)
    assert errors == 0, "an error output is on screen"
    _assert_clean(lab)

    # the slider: move it with the keyboard, the figure above redraws in place
    slider_cell = lab.find_cell("interactive_figure(")
    lab.scroll_to(slider_cell)
    lab.screenshot("11_chapter_00_slider_at_64")
    lab.cell(slider_cell).locator(".noUi-handle").first.focus()
    for _ in range(10):
        lab.page.keyboard.press("ArrowRight")
    lab.page.wait_for_function(
        f"""() => [...window.jupyterapp.shell.currentWidget.content.widgets[{slider_cell}].node
             .querySelectorAll('.gtitle')].some(t => t.textContent.startsWith('In 84 dimensions'))""",
        timeout=60_000,
    )
    assert lab.plots_in(slider_cell).count() == 1
    lab.screenshot("12_chapter_00_slider_moved_to_84")
    _assert_clean(lab)

    print(f"chapter 00: {time.time() - start:.0f} s")
    lab.close_all()
    lab.shutdown_kernels()


def _save_close_and_reopen_slider(lab: LabPage, slider_cell: int):
    """Save chapter 00, close it, shut its kernel down, reopen it: the slider cell, once drawn."""
    lab.save()
    lab.close_all()
    lab.shutdown_kernels()
    lab.open(CHAPTER_00)
    lab.scroll_to(slider_cell)
    cell = lab.cell(slider_cell)
    cell.locator(".js-plotly-plot .main-svg").first.wait_for()
    cell.locator(".jupyter-widgets input, .jupyter-widgets .noUi-handle").first.wait_for()
    lab.page.wait_for_timeout(2000)
    return cell


def test_saved_slider_reopens_as_a_slider_and_a_figure(lab):
    """Snag 3: save, close, new kernel, reopen: the slider and its figure come back, no error."""
    lab.open(CHAPTER_00)
    slider_cell = lab.find_cell("interactive_figure(")
    solutions = _solution_cells(CHAPTER_00)
    first = lab.find_cell("check.cosine_similarity_matrix(cosine_similarity_matrix)")
    cell_id = lab.js(
        f"() => window.jupyterapp.shell.currentWidget.content.widgets[{first}].model.id"
    )
    lab.set_source(first, solutions[cell_id])
    for index in range(slider_cell + 1):
        if (
            lab.js(
                f"() => window.jupyterapp.shell.currentWidget.content.widgets[{index}].model.type"
            )
            == "code"
        ):
            lab.run_cell(index)
    cell = _save_close_and_reopen_slider(lab, slider_cell)
    assert "dimensions" in lab.plot_title(slider_cell)
    lab.screenshot("13_chapter_00_reopened_slider_and_figure")
    _assert_clean(lab)
    # The next session: save without re-running (no widget is alive), close, reopen.
    cell = _save_close_and_reopen_slider(lab, slider_cell)
    assert "model not found" not in cell.inner_text()
    lab.screenshot("14_chapter_00_slider_after_a_second_save")
    _assert_clean(lab)
    lab.close_all()
    lab.shutdown_kernels()


# ------------------------------------------------- live sliders of later chapters, run in Lab
#: The slider figures of later chapters, run live in Lab. Chapter 01's is not here: it draws the
#: best of a sweep of trained toy models (about four minutes of CPU before the slider); its
#: stored figures are checked below and its slider code by tests/test_widgets.py.
LIVE_SLIDERS = [
    "solutions/03_saes_on_a_language_model.ipynb",
    "solutions/06_intervening_on_features.ipynb",
    "solutions/08_bilinear_layers.ipynb",
    "solutions/09_polytope_lens.ipynb",
]
FIGURE_STATE = """(i) => { const g = window.jupyterapp.shell.currentWidget.content.widgets[i].node
    .querySelector('.js-plotly-plot'); return g ? JSON.stringify([g.data, g.layout.title]) : ''; }"""


@pytest.mark.parametrize("path", LIVE_SLIDERS)
def test_a_later_chapters_slider_runs_in_lab_and_redraws_its_figure(lab, path):
    start = time.time()
    (lab.server.repo / path).write_bytes((ROOT / path).read_bytes())
    lab.open(path)
    slider_cell = lab.find_cell("interactive_figure(")
    lab.js(
        f"() => {{ window.jupyterapp.shell.currentWidget.content.activeCellIndex = {slider_cell}; }}"
    )
    lab.command("notebook:run-all-above")
    lab.wait_idle(600)
    lab.run_cell(slider_cell)
    lab.scroll_to(slider_cell)
    cell = lab.cell(slider_cell)
    cell.locator(".js-plotly-plot .main-svg").first.wait_for()
    handle = cell.locator(".noUi-handle").first
    handle.wait_for()
    before = lab.js(FIGURE_STATE, slider_cell)
    lab.screenshot(f"15_{Path(path).stem}_live_slider")
    handle.focus()
    for _ in range(3):  # left: a slider may start at its last value (chapter 09's epoch does)
        lab.page.keyboard.press("ArrowLeft")
    # Three key presses are three redraws: wait until the figure has changed and then stayed the
    # same (and drawn) for two seconds, so that the count below does not catch one mid-redraw.
    deadline, seen, steady = time.time() + 180, before, 0
    while steady < 4:
        assert time.time() < deadline, "moving the slider did not redraw the figure"
        lab.page.wait_for_timeout(500)
        state = lab.js(FIGURE_STATE, slider_cell)
        drawn = lab.plots_in(slider_cell).count() > 0
        steady = steady + 1 if (state == seen and state not in ("", before) and drawn) else 0
        seen = state
    assert lab.plots_in(slider_cell).count() == 1  # redrawn in place, not appended
    _figures_fit(lab, slider_cell)
    lab.screenshot(f"16_{Path(path).stem}_live_slider_moved")
    _assert_clean(lab)
    print(f"{path}: {time.time() - start:.0f} s")
    lab.close_all()
    lab.shutdown_kernels()


# ------------------------------------------- every notebook: opening is a no-op, figures render
ALL_NOTEBOOKS = sorted(
    str(p.relative_to(ROOT))
    for folder in ("notebooks", "solutions")
    for p in (ROOT / folder).glob("*.ipynb")
)


@pytest.mark.parametrize("path", ALL_NOTEBOOKS)
def test_opening_and_saving_changes_no_byte_and_every_stored_figure_renders_and_fits(lab, path):
    on_disk = lab.server.repo / path
    before = (
        ROOT / path
    ).read_bytes()  # as shipped: earlier tests saved chapter 00 with work in it
    on_disk.write_bytes(before)
    lab.open(path)
    lab.page.wait_for_timeout(1500)
    stored = sum(
        1
        for c in json.loads(before)["cells"]
        for o in c.get("outputs", [])
        if PLOTLY_MIME in o.get("data", {})
    )
    if not stored:
        # With figures, JupyterLab's plotly renderer writes a PNG snapshot into each one it draws
        # (the tab shows modified); the server hook strips it on save: checked below.
        assert not lab.dirty(), f"opening {path} marked it modified"
    figures = _plotly_outputs(lab)
    assert sum(figures.values()) == stored
    if figures:
        _wait_for_plots(lab, figures)
        for index in figures:
            _figures_fit(lab, index)
        first = min(figures)
        lab.scroll_to(first)
        lab.screenshot(f"20_{Path(path).stem}_{path.split('/')[0]}_first_figure")
    _assert_clean(lab)
    lab.save()
    assert on_disk.read_bytes() == before, f"saving {path} unmodified changed its bytes:\n" + (
        _diff(before, on_disk.read_bytes())
    )
    lab.close_all()
    lab.shutdown_kernels()


# ------------------------------------------------------------------------------------------ snag 6
def test_offline_the_colab_badge_is_a_text_link_not_a_broken_image(lab):
    lab.open(CHAPTER_00)
    link = lab.cell(0).locator("a[href*='colab.research.google.com']").first
    text = link.inner_text()  # read before closing: a locator is looked up when it is used
    images = link.locator("img").count()
    lab.screenshot("30_offline_colab_badge")
    lab.close_all()
    lab.shutdown_kernels()
    assert text.strip() == "Open in Colab"
    assert images == 0, "offline the badge image shows as a broken-image icon reading 'Image'"
