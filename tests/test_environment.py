"""One exact environment (requirements-lock.txt) behind pyproject.toml's ranges.

- pyproject.toml: what the course needs (ranges; Colab installs these, see test_colab_compat.py);
- requirements-lock.txt: today's exact versions, installed by `make lab`, `make test`, CI;
- environment.yml: the conda route to the same lock.
"""

from __future__ import annotations

import importlib.metadata
import re
import tomllib

import yaml
from packaging.requirements import Requirement

from tests.conftest import ROOT


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def lock_pins() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "requirements-lock.txt").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        match = re.fullmatch(r"([A-Za-z0-9_.\-]+)==([^\s;]+)", line)
        assert match, f"requirements-lock.txt: {line!r} is not an exact pin (name==version)"
        pins[norm(match.group(1))] = match.group(2)
    return pins


def project_requirements() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = project["dependencies"] + project["optional-dependencies"]["dev"]
    return [Requirement(r) for r in reqs]


def environment_yml() -> tuple[list[str], dict]:
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip_section = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    return pip_section, env


def test_lock_satisfies_every_range_in_pyproject():
    pins = lock_pins()
    for req in project_requirements():
        assert norm(req.name) in pins, f"{req.name} is missing from requirements-lock.txt"
        assert req.specifier.contains(pins[norm(req.name)], prereleases=True), (
            f"requirements-lock.txt has {req.name}=={pins[norm(req.name)]}, outside {req}"
        )


def test_environment_yml_installs_the_lock():
    pip_section, env = environment_yml()
    assert "-c requirements-lock.txt" in pip_section and "-e ." in pip_section
    pins = lock_pins()
    named = set()
    for line in pip_section:
        if line.startswith("-"):
            continue
        name, version = line.split("==")
        named.add(norm(name))
        assert pins[norm(name)] == version, f"environment.yml {line} vs lock {pins[norm(name)]}"
    assert named == {norm(r.name) for r in project_requirements()}
    assert "python=3.11" in env["dependencies"]


def test_makefile_installs_with_the_lock():
    makefile = (ROOT / "Makefile").read_text()
    assert "LOCK := requirements-lock.txt" in makefile and "-c $(LOCK)" in makefile
    assert re.search(r"^\$\(STAMP\):.*\$\(LOCK\)", makefile, re.M)


def test_the_lock_keeps_the_course_versions():
    pins = lock_pins()
    # torch exactly 2.13.0: pip then takes the local CPU build; a range may pull CUDA packages.
    assert pins["torch"] == "2.13.0"
    assert pins["transformer-lens"].startswith("3.9.")
    assert pins["sae-lens"].startswith("6.54.")
    assert pins["ipywidgets"].startswith("8.")


def test_installed_versions_match_the_lock():
    """Every locked package that this Python installs is at its locked version (a few, such as
    `overrides`, are only needed below Python 3.12), and every direct requirement is installed."""
    mismatched = []
    for name, version in lock_pins().items():
        try:
            installed = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
        if installed.split("+")[0] != version:
            mismatched.append(f"{name}: installed {installed}, lock {version}")
    for req in project_requirements():
        try:
            importlib.metadata.version(req.name)
        except importlib.metadata.PackageNotFoundError:
            mismatched.append(f"{req.name}: not installed")
    assert not mismatched, "run `make install`: " + "; ".join(mismatched)


def test_torch_is_a_cpu_or_matching_build():
    import torch

    assert torch.__version__.split("+")[0] == lock_pins()["torch"]
