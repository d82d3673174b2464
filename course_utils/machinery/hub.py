"""Links that put the course in front of a cohort on a shared hub.

- :func:`nbgitpuller_link`: on a JupyterHub whose image has the course installed (``binder/``
  builds one with repo2docker), the link clones the repository into each learner's home on first
  click and merges upstream changes on later clicks, without touching the learner's edits.
- :func:`binder_link`: the same repository launched on a BinderHub (mybinder.org), which builds
  the image from ``binder/`` and gives each visitor a temporary copy.

See docs/teaching.md, "A shared hub".
"""

from __future__ import annotations

from urllib.parse import urlencode, urlsplit

from course_utils.machinery.colab import BRANCH, GITHUB_REPO

UPSTREAM = f"https://github.com/{GITHUB_REPO}"


def _clean_hub(hub: str) -> str:
    parts = urlsplit(hub)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(
            f"--hub {hub!r} is not a hub address: give the URL learners log in at, "
            "e.g. https://hub.example.org (or https://example.org/jupyter/ behind a prefix)."
        )
    return hub.rstrip("/") + "/"


def repo_folder(repo: str) -> str:
    """The folder nbgitpuller clones ``repo`` into: its last path component without ``.git``."""
    name = repo.rstrip("/").rsplit("/", 1)[-1]
    return name[:-4] if name.endswith(".git") else name


def nbgitpuller_link(
    hub: str,
    repo: str | None = None,
    branch: str = "main",
    open_path: str = "notebooks/00_setup_and_tools.ipynb",
    interface: str = "lab",
) -> str:
    """The nbgitpuller link for ``hub`` that opens ``open_path`` of the learner's own copy."""
    repo = repo or UPSTREAM
    target = f"{repo_folder(repo)}/{open_path.lstrip('/')}"
    # JupyterLab: "?autodecode" (encoded) avoids a workspace-name prompt, as nbgitpuller advises.
    urlpath = f"lab/tree/{target}?autodecode" if interface == "lab" else f"tree/{target}"
    query = urlencode({"repo": repo, "branch": branch, "urlpath": urlpath})
    return f"{_clean_hub(hub)}hub/user-redirect/git-pull?{query}"


def binder_link(
    repo: str = GITHUB_REPO,
    ref: str = BRANCH,
    open_path: str = "notebooks/00_setup_and_tools.ipynb",
    binderhub: str = "https://mybinder.org",
) -> str:
    """A BinderHub launch link for a GitHub repository ``owner/name`` at ``ref``."""
    query = urlencode({"urlpath": f"lab/tree/{open_path.lstrip('/')}"})
    return f"{_clean_hub(binderhub)}v2/gh/{repo}/{ref}?{query}"
