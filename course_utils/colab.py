"""Colab support: the badge at the top of every notebook and the setup cell that installs us.

The repository location is ONE constant. ``course build`` writes badges from it and a test checks
that every notebook's badge and setup cell match what this module generates.
"""

from __future__ import annotations

#: Where the course lives on GitHub (owner/name). Change it here and run ``course build``.
GITHUB_REPO = "mi-course/mech-interp-course"
BRANCH = "main"
BADGE_IMAGE = "https://colab.research.google.com/assets/colab-badge.svg"


def badge(notebook_path: str) -> str:
    """Markdown for an "Open in Colab" badge pointing at ``notebook_path`` (repo-relative)."""
    url = f"https://colab.research.google.com/github/{GITHUB_REPO}/blob/{BRANCH}/{notebook_path}"
    return f"[![Open In Colab]({BADGE_IMAGE})]({url})"


def install_spec() -> str:
    return f"course-utils @ git+https://github.com/{GITHUB_REPO}@{BRANCH}"


def setup_cell_source() -> str:
    """The first code cell of every notebook: installs the pinned course package in Colab only."""
    return (
        "# Setup: in Colab this installs the pinned course package; on your own machine it does\n"
        "# nothing (`make lab` has installed it already).\n"
        "import subprocess\n"
        "import sys\n"
        "\n"
        'if "google.colab" in sys.modules:\n'
        f'    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "{install_spec()}"], check=True)'
    )
