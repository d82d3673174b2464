"""Write requirements-lock.txt: the exact versions installed in this environment (`make lock`)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

HEADER = """\
# The exact environment of `make lab`, `make test`, CI and environment.yml (Python 3.11, Linux
# x86_64): every package at the version the solution notebooks were executed with. Used as pip
# constraints (`pip install -e ".[dev]" -c requirements-lock.txt`), so it never adds a package the
# project does not need. pyproject.toml holds the ranges the course needs (Colab installs those).
# torch==2.13.0 takes the CPU build where it lies on disk; elsewhere pip picks PyPI's build.
# Regenerate after changing a requirement: make lock
"""


def main(path: str) -> None:
    frozen = subprocess.run(
        [sys.executable, "-m", "pip", "freeze", "--exclude-editable"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.splitlines()
    # A local build tag (+cpu) names a file only this machine has; the version alone is portable.
    lines = [re.sub(r"^(torch[a-z]*==[^+]+)\+\w+$", r"\1", line) for line in frozen]
    lines = [line for line in lines if "==" in line and not line.startswith("course-utils==")]
    Path(path).write_text(HEADER + "\n".join(sorted(lines, key=str.lower)) + "\n")
    print(f"wrote {path}: {len(lines)} packages")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "requirements-lock.txt")
