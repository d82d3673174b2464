"""Render every plotly figure stored in a notebook to PNG, to look at them outside Jupyter.

    python scripts/render_figures.py solutions/00_setup_and_tools.ipynb /tmp/figs

Needs kaleido and a Chromium (`pip install kaleido`; Debian: `apt-get install chromium`).
"""

import sys
from pathlib import Path

import nbformat
import plotly.io as pio


def main(notebook: str, out_dir: str) -> None:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    nb = nbformat.read(notebook, as_version=4)
    count = 0
    for index, cell in enumerate(nb.cells):
        for output in cell.get("outputs", []):
            spec = output.get("data", {}).get("application/vnd.plotly.v1+json")
            if spec is None:
                continue
            count += 1
            path = out / f"cell{index:03d}_{count:02d}.png"
            pio.from_json(__import__("json").dumps(spec)).write_image(path, width=900, scale=1)
            print(path)
    print(f"{count} figure(s)")


if __name__ == "__main__":
    main(*sys.argv[1:3])
