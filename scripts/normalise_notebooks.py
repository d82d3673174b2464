"""Store solution notebooks exactly as JupyterLab saves them, so that opening one changes no byte.

    python scripts/normalise_notebooks.py            # every solutions/*.ipynb, then `course build`
    python scripts/normalise_notebooks.py --check    # list the ones that would change; exit 1

`course execute` already writes this form; this script is for notebooks written by other tools.
It changes no cell and no output value: only the notebook metadata (the kernel's, see
``course_utils.machinery.build.NOTEBOOK_METADATA``) and whole floats stored as ``0.0`` (JavaScript saves
them as ``0``).

``--fit-widths`` (one-off, for figures stored before the plot helpers became responsive): drop a
stored figure's ``layout.width`` when it is over 900 px, which is what re-executing the notebook
with the current helpers and sources stores.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from course_utils.machinery.build import build_all, notebook_text  # noqa: E402
from course_utils.science.plots_superposition import MAX_FIGURE_WIDTH  # noqa: E402


def fit_widths(notebook: dict) -> int:
    dropped = 0
    for cell in notebook["cells"]:
        for output in cell.get("outputs", []):
            spec = output.get("data", {}).get("application/vnd.plotly.v1+json")
            if spec and (spec.get("layout", {}).get("width") or 0) > MAX_FIGURE_WIDTH:
                del spec["layout"]["width"]
                dropped += 1
    return dropped


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true")
    parser.add_argument("--fit-widths", action="store_true")
    args = parser.parse_args(argv)
    changed = []
    for path in sorted((ROOT / "solutions").glob("*.ipynb")):
        before = path.read_text(encoding="utf-8")
        notebook = json.loads(before)
        dropped = fit_widths(notebook) if args.fit_widths else 0
        after = notebook_text(notebook)
        if after != before:
            changed.append(path)
            note = (
                f" ({dropped} figure width(s) over {MAX_FIGURE_WIDTH} px dropped)"
                if dropped
                else ""
            )
            print(
                f"{'would change' if args.check else 'normalised'}: {path.relative_to(ROOT)}{note}"
            )
            if not args.check:
                path.write_text(after, encoding="utf-8")
    if args.check:
        return 1 if changed else 0
    for path in build_all(ROOT):
        print(f"rebuilt: {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
