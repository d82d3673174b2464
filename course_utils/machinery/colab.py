"""Colab support: the badge at the top of every notebook, and the setup cell that installs us.

On Colab the setup cell installs this package from a fixed release tag, then ``install_missing``
adds only what Colab lacks (TransformerLens, SAELens, jaxtyping, ...) while holding every package
Colab itself relies on (torch, the Jupyter kernel and widget packages, numpy, huggingface_hub) at
the version the runtime already has. Nothing is downloaded twice and no restart is needed; if pip
ever does replace a package the running session has imported, it says so in one sentence.

The repository location is ONE constant. ``course build`` writes badges from it and a test checks
that every notebook's badge and setup cell match what this module generates.
"""

from __future__ import annotations

import importlib
import importlib.metadata as metadata
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

#: Where the course lives on GitHub (owner/name). Change it here and run ``course build``.
GITHUB_REPO = "mi-course/mech-interp-course"
#: Badges open the notebooks on the main branch; the setup cell installs a fixed release tag.
BRANCH = "main"

#: Packages Colab's runtime relies on: never replaced by the course's install. torch's
#: companions are pinned to it; google-colab pins ipykernel and ipython exactly; notebook 6.5
#: needs jupyter_client < 8; gradio and diffusers need huggingface_hub < 2.
PROTECTED = (
    "torch",
    "torchvision",
    "torchaudio",
    "ipykernel",
    "ipython",
    "jupyter_client",
    "jupyter_core",
    "notebook",
    "ipywidgets",
    "widgetsnbextension",
    "plotly",
    "numpy",
    "huggingface_hub",
    "google-colab",
)


def release_tag() -> str:
    """The git tag of this version of the course: what the setup cell installs."""
    from course_utils import __version__

    return f"v{__version__}"


def badge(notebook_path: str) -> str:
    """Markdown for an "Open in Colab" link to ``notebook_path`` (repo-relative).

    A text link, not the usual badge image: offline the image cannot load, and JupyterLab gives
    every image without alt text the alt "Image", so the badge showed as a broken-image icon
    reading "Image". A text link reads the same online, offline, on GitHub and in Colab.
    """
    url = f"https://colab.research.google.com/github/{GITHUB_REPO}/blob/{BRANCH}/{notebook_path}"
    return f"[Open in Colab]({url})"


def install_spec() -> str:
    return f"course-utils @ git+https://github.com/{GITHUB_REPO}@{release_tag()}"


def setup_cell_source() -> str:
    """The first code cell of every notebook: installs the course in Colab only."""
    return (
        "# Setup. In Colab: installs the course (a fixed release) and only what Colab lacks, keeping\n"
        "# Colab's own torch, Jupyter and widget packages; the course runs on the CPU. About a\n"
        "# minute, no restart. On your own machine this cell does nothing (`make lab` installed it).\n"
        "import subprocess\n"
        "import sys\n"
        "\n"
        'if "google.colab" in sys.modules:\n'
        f'    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-deps"]\n'
        f'    subprocess.run([*pip, "{install_spec()}"], check=True)\n'
        "    from course_utils.machinery.colab import install_missing\n"
        "\n"
        "    install_missing()"
    )


# -- installing what the runtime lacks ----------------------------------------------------------
def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def installed_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def protected_constraints() -> list[str]:
    """``name==version`` for every protected package this runtime has (pip may not move them)."""
    pins = []
    for name in PROTECTED:
        version = installed_version(name)
        if version is not None:
            pins.append(f"{name}=={version}")
    return pins


def course_requirements() -> list[str]:
    """This package's own runtime requirements (no extras), as pip understands them."""
    requires = metadata.requires("course-utils") or []
    return [r for r in requires if "extra ==" not in r and "extra==" not in r]


def _imported_distributions() -> set[str]:
    """Distributions that own a module this process has already imported."""
    owners = metadata.packages_distributions()
    top_level = {name.split(".")[0] for name in list(sys.modules)}
    return {_normalise(d) for module in top_level for d in owners.get(module, [])}


def install_missing(dry_run: bool = False) -> list[str]:
    """Install the course's requirements that the runtime lacks; return what pip installed.

    Protected packages are held at their installed versions with a constraints file, so pip either
    keeps them or stops with a conflict; it never silently swaps Colab's torch or kernel.
    """
    with tempfile.TemporaryDirectory() as folder:
        constraints = Path(folder) / "colab-constraints.txt"
        constraints.write_text("\n".join(protected_constraints()) + "\n")
        report = Path(folder) / "report.json"
        command = [sys.executable, "-m", "pip", "install", "-q", "-c", str(constraints)]
        command += ["--report", str(report), *course_requirements()]
        if dry_run:
            command.insert(4, "--dry-run")
        subprocess.run(command, check=True)
        installed = json.loads(report.read_text()).get("install", [])
    names = [f"{i['metadata']['name']}=={i['metadata']['version']}" for i in installed]
    importlib.invalidate_caches()
    stale = sorted({n.split("==")[0] for n in names} & _imported_distributions())
    if stale and not dry_run:
        print(
            "Restart the runtime (Runtime > Restart session) and run this notebook from the top: "
            f"pip updated {', '.join(stale)}, which this session had already imported."
        )
    else:
        print(f"course installed ({len(names)} packages added); Colab's torch and kernel kept.")
    return names


# -- planning against Colab's published package lists (tests, `make test-colab`) ---------------
def read_pip_freeze(path: Path) -> dict[str, str]:
    """{normalised name: version} from a ``pip freeze`` listing (``name @ url`` lines included)."""
    packages = {}
    for line in Path(path).read_text().splitlines():
        if line.startswith("#") or not line.strip():
            continue
        if "==" in line:
            name, version = line.split("==", 1)
        elif " @ " in line:  # torch @ https://.../torch-2.11.0%2Bcpu-cp313-...whl
            name, url = line.split(" @ ", 1)
            filename = url.replace("%2B", "+").rsplit("/", 1)[-1]
            stem = re.sub(r"\.(whl|tar\.gz|zip)$", "", filename)
            version = stem.split("-")[1] if filename.endswith(".whl") else stem.rsplit("-", 1)[-1]
        else:
            continue
        packages[_normalise(name)] = version.strip()
    return packages


def plan_install(
    runtime: dict[str, str], python: str, requirements: list[str]
) -> tuple[dict[str, str], list[str]]:
    """What pip would do to ``runtime``: ({package: kept|installed|upgraded}, protected moves).

    A requirement that the runtime's version satisfies is kept and not descended into; one the
    runtime lacks is installed at this environment's version and its own requirements are walked.
    """
    from packaging.markers import default_environment
    from packaging.requirements import Requirement
    from packaging.version import InvalidVersion, Version

    env = default_environment()
    env.update(
        python_version=".".join(python.split(".")[:2]),
        python_full_version=python,
        sys_platform="linux",
        platform_system="Linux",
        platform_machine="x86_64",
        implementation_name="cpython",
        extra="",
    )
    protected = {_normalise(p) for p in PROTECTED}
    actions: dict[str, str] = {}
    moves: list[str] = []
    queue = [Requirement(r) for r in requirements]
    while queue:
        req = queue.pop()
        if req.marker is not None and not req.marker.evaluate(env):
            continue
        name = _normalise(req.name)
        try:
            have = Version(runtime[name]) if name in runtime else None
        except InvalidVersion:
            have = None  # a local build with no version in its name: treat as absent
        if have is not None and req.specifier.contains(have, prereleases=True):
            actions.setdefault(name, "kept")
            continue
        if have is not None and name in protected:
            moves.append(f"{req} (the runtime has {name} {have})")
            continue
        if actions.get(name) in ("installed", "upgraded"):
            continue
        actions[name] = "upgraded" if have is not None else "installed"
        try:
            queue.extend(Requirement(r) for r in metadata.requires(req.name) or [])
        except metadata.PackageNotFoundError:
            pass  # not in this environment: its own requirements cannot be walked here
    return actions, moves


def colab_base(runtime: dict[str, str], python: str, requirements: list[str]) -> list[str]:
    """``name==version`` of the runtime's packages that the course's install touches or keeps."""
    actions, _ = plan_install(runtime, python, requirements)
    touched = {n for n, action in actions.items() if action == "kept"}
    touched |= {_normalise(p) for p in PROTECTED} - {"google-colab", "torchvision", "torchaudio"}
    touched |= {"jupyter-client", "ipython", "nbformat", "nbclient", "traitlets", "pyzmq"}
    # A local tag (+cpu, +cu128) names Colab's own wheel; PyPI serves the same release without it.
    versions = {n: runtime[n].split("+")[0] for n in touched if n in runtime}
    return sorted(f"{n}=={v}" for n, v in versions.items() if v[:1].isdigit())


def main(argv: list[str]) -> None:
    """``python -m course_utils.machinery.colab [--dry-run]``: install what this runtime lacks;
    ``python -m course_utils.machinery.colab base FREEZE PYTHON``: print Colab's versions the course touches."""
    if argv[:1] == ["base"]:
        print("\n".join(colab_base(read_pip_freeze(Path(argv[1])), argv[2], course_requirements())))
    else:
        install_missing(dry_run="--dry-run" in argv)


if __name__ == "__main__":
    main(sys.argv[1:])
