"""One pinned environment: pyproject.toml and environment.yml must name the same versions."""

from __future__ import annotations

import re

import tomllib
import yaml

from tests.conftest import ROOT


def _pins(requirements: list[str]) -> dict[str, str]:
    pins = {}
    for req in requirements:
        match = re.fullmatch(r"([A-Za-z0-9_.\-]+)==([^\s;]+)", req.strip())
        assert match, f"{req!r} is not pinned exactly (name==version)"
        pins[match.group(1).lower().replace("-", "_")] = match.group(2)
    return pins


def pyproject_pins() -> dict[str, str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return _pins(project["dependencies"] + project["optional-dependencies"]["dev"])


def environment_pins() -> dict[str, str]:
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip_section = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    return _pins([r for r in pip_section if not r.startswith("-e")])


def test_pyproject_and_environment_yml_pin_the_same_versions():
    assert pyproject_pins() == environment_pins()


def test_core_packages_are_pinned_to_the_course_versions():
    pins = pyproject_pins()
    # torch exactly 2.13.0: pip then takes the local CPU build; a range may pull CUDA packages.
    assert pins["torch"] == "2.13.0"
    assert pins["transformer_lens"].startswith("3.9.")
    assert pins["sae_lens"].startswith("6.54.")
    assert pins["nbval"].startswith("0.11")
    assert pins["ipywidgets"].startswith("8.")


def test_environment_yml_uses_python_311():
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    assert "python=3.11" in env["dependencies"]


def test_installed_versions_match_the_pins():
    import importlib.metadata

    for name, version in pyproject_pins().items():
        installed = importlib.metadata.version(name)
        assert installed.split("+")[0] == version, (
            f"{name}: installed {installed}, pinned {version}"
        )


def test_torch_is_a_cpu_or_matching_build():
    import torch

    assert torch.__version__.split("+")[0] == "2.13.0"
