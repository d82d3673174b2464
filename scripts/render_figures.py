"""Render every plotly figure stored in a notebook to PNG, to look at them outside Jupyter.

    python scripts/render_figures.py solutions/00_setup_and_tools.ipynb /tmp/figs [WIDTH]

Offline: draws each figure with the plotly.js that ships inside the plotly package, in Debian's
Chromium driven by Playwright (the browser tests' set-up), at WIDTH px (default 900, the width of
a notebook's output area on a laptop).
"""

import json
import sys
from pathlib import Path

import nbformat
import plotly

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.browser_lab import CHROMIUM, CHROMIUM_ARGS  # noqa: E402

PLOTLY_JS = Path(plotly.__file__).parent / "package_data" / "plotly.min.js"


def figures(notebook: str) -> list[tuple[int, dict]]:
    nb = nbformat.read(notebook, as_version=4)
    return [
        (index, output["data"]["application/vnd.plotly.v1+json"])
        for index, cell in enumerate(nb.cells)
        for output in cell.get("outputs", [])
        if "application/vnd.plotly.v1+json" in output.get("data", {})
    ]


def main(notebook: str, out_dir: str, width: str = "900") -> None:
    from playwright.sync_api import sync_playwright

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": int(width) + 40, "height": 800})
        page.set_content(f"<div id='figure' style='width:{int(width)}px'></div>")
        page.add_script_tag(path=str(PLOTLY_JS))
        for count, (index, spec) in enumerate(figures(notebook), start=1):
            page.evaluate(
                "s => { Plotly.purge('figure');"
                " return Plotly.newPlot('figure', s.data, s.layout || {}, {staticPlot: true}); }",
                json.loads(json.dumps(spec)),
            )
            path = out / f"cell{index:03d}_{count:02d}.png"
            page.locator("#figure .svg-container").screenshot(path=str(path))
            print(path)
        browser.close()
    print(f"{len(figures(notebook))} figure(s)")


if __name__ == "__main__":
    main(*sys.argv[1:4])
