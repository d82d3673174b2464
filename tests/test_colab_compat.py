"""The course installs on Colab as it is: read Colab's published package lists (tests/data/colab/,
copied from googlecolab/backend-info) and prove that our requirements admit Colab's Python and
keep every package Colab relies on at Colab's own version.

The check walks the install the way pip would: a requirement that Colab's installed version
satisfies is kept (and not descended into); one Colab lacks is installed at our locked version and
its own requirements are walked in turn. A protected package that would have to move fails.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

from course_utils.machinery import colab
from tests.conftest import ROOT

COLAB = ROOT / "tests" / "data" / "colab"
RUNTIMES = {
    "default CPU runtime": "pip-freeze.txt",
    "default GPU runtime": "pip-freeze.gpu.txt",
    "previous runtime (2026.07, Python 3.12)": "pip-freeze.gpu.2026-07-runtime.txt",
}


def colab_packages(filename: str) -> dict[str, str]:
    return colab.read_pip_freeze(COLAB / filename)


def colab_python(filename: str) -> str:
    if "2026-07" in filename:
        return "3.12.13"  # the previous runtime, as the reference notes give it
    match = re.search(r"^Python (\d+\.\d+\.\d+)", (COLAB / "os-info.txt").read_text(), re.M)
    assert match, "os-info.txt names no Python version"
    return match.group(1)


def project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def walk_install(runtime: dict[str, str], python: str) -> tuple[dict[str, str], list[str]]:
    return colab.plan_install(runtime, python, project()["dependencies"])


@pytest.mark.parametrize("runtime", list(RUNTIMES), ids=list(RUNTIMES.values()))
def test_requires_python_admits_colabs_python(runtime):
    python = colab_python(RUNTIMES[runtime])
    assert SpecifierSet(project()["requires-python"]).contains(python), (
        f"requires-python {project()['requires-python']!r} refuses Colab's Python {python}"
    )


@pytest.mark.parametrize("runtime", list(RUNTIMES), ids=list(RUNTIMES.values()))
def test_install_keeps_every_package_colab_relies_on(runtime):
    filename = RUNTIMES[runtime]
    actions, moves = walk_install(colab_packages(filename), colab_python(filename))
    assert not moves, f"on Colab's {runtime} the install would replace: " + "; ".join(moves)
    for name in ("transformer-lens", "sae-lens", "jaxtyping"):
        assert actions.get(name) == "installed", f"{name}: {actions.get(name)}"
    for name in ("torch", "ipykernel", "ipywidgets", "plotly", "numpy"):
        assert actions.get(name, "kept") == "kept", f"{name} would be {actions[name]}"


def test_every_dependency_is_a_range_or_a_reasoned_exact_pin():
    """Exact pins only where results must match; everything Colab ships is a range."""
    exact = {
        colab._normalise(Requirement(r).name)
        for r in project()["dependencies"]
        if any(s.operator == "==" for s in Requirement(r).specifier)
    }
    assert exact == {"transformer-lens", "sae-lens"}
    assert all(Requirement(r).specifier for r in project()["dependencies"]), "unbounded dependency"


def test_the_walk_catches_a_requirement_that_would_replace_colabs_torch(monkeypatch):
    """The test above can fail: a pin like torch==2.13.0 (what we had) is reported."""
    deps = [
        r for r in project()["dependencies"] if colab._normalise(Requirement(r).name) != "torch"
    ]
    monkeypatch.setattr(
        sys.modules[__name__], "project", lambda: {"dependencies": [*deps, "torch==2.13.0"]}
    )
    _, moves = walk_install(colab_packages("pip-freeze.txt"), "3.13.15")
    assert any(m.startswith("torch==2.13.0") for m in moves)


def test_the_colab_lists_parse():
    packages = colab_packages("pip-freeze.txt")
    assert packages["torch"] == "2.11.0+cpu"
    assert packages["ipywidgets"] == "7.7.1" and packages["plotly"] == "5.24.1"
    assert colab_python("pip-freeze.txt").startswith("3.13.")


def test_setup_cell_installs_a_fixed_release_without_dependencies():
    source = colab.setup_cell_source()
    from course_utils import __version__

    assert f"@v{__version__}" in source and "@main" not in source
    assert '"--no-deps"' in source and "install_missing()" in source
    assert project()["version"] == __version__
    assert Path(COLAB / "pip-freeze.txt").is_file()


def _find_python(tmp_path: Path, **env: str) -> subprocess.CompletedProcess:

    return subprocess.run(
        ["bash", str(ROOT / "scripts" / "find_python.sh"), "3.13"],
        capture_output=True,
        text=True,
        env={"PATH": f"{tmp_path / 'bin'}:/usr/bin:/bin", "HOME": str(tmp_path), **env},
        timeout=60,
    )


def _fake_pythons(tmp_path: Path, version: str) -> Path:
    """A pyenv shim that is not active (prints 'command not found', exits 127) on PATH, and a
    'pyenv' install of the given version that really runs (this interpreter, wrapped)."""
    shim = tmp_path / "bin" / "python3.13"
    shim.parent.mkdir(parents=True)
    shim.write_text("#!/bin/sh\necho 'pyenv: python3.13: command not found' >&2\nexit 127\n")
    shim.chmod(0o755)
    real = tmp_path / ".pyenv" / "versions" / f"{version}" / "bin" / "python"
    real.parent.mkdir(parents=True)
    # Pretend to be 3.13 only where the test asks for it: the version check runs through this.
    fake = "(3, 13)" if version.startswith("3.13") else "(3, 12)"
    real.write_text(
        f"#!/bin/sh\nexec {sys.executable} -c "
        f'"import sys; sys.exit(0 if {fake} == (3, 13) else 1)"\n'
    )
    real.chmod(0o755)
    return real


def test_find_python_skips_a_shim_that_does_not_run(tmp_path):
    """`make test-colab` once stopped at an inactive pyenv shim; the finder runs each candidate."""
    real = _fake_pythons(tmp_path, "3.13.5")
    found = _find_python(tmp_path)
    assert found.returncode == 0, found.stderr
    assert found.stdout.strip() == str(real)


def test_find_python_says_what_to_do_when_none_runs(tmp_path):
    _fake_pythons(tmp_path, "3.12.9")  # only a shim and a wrong version
    found = _find_python(tmp_path)
    assert found.returncode == 2 and found.stdout == ""
    assert "no working Python 3.13" in found.stderr and "COLAB_PYTHON=" in found.stderr
    chosen = _find_python(tmp_path, FIND_PYTHON=str(tmp_path / "bin" / "python3.13"))
    assert chosen.returncode == 2 and "is not a working Python 3.13" in chosen.stderr
