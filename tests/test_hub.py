"""A shared hub: binder/ agrees with the lock, the course installs into a fresh environment from a
read-only checkout as a non-root user, and a learner's `course check` writes nothing into the
shared install (progress goes to the learner's checkout, or $COURSE_HOME, or ~/.local/state).

The non-root runs use uid 65534 (nobody) through ``setpriv``, with only the capability to READ
any file (the course's interpreter lives under /root here): writes are refused exactly as they are
for a learner on a hub. Where that is impossible they skip with the reason.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from course_utils.machinery import grading
from course_utils.machinery.cli import KERNEL_NAME
from course_utils.machinery.hub import binder_link, nbgitpuller_link, repo_folder
from tests.conftest import ROOT

BINDER = ROOT / "binder"
LOCK = ROOT / "requirements-lock.txt"
#: What the hub image adds to the lock, and why: nbgitpuller hands out the learners' copies.
HUB_EXTRAS = {"nbgitpuller"}
NOBODY = 65534


def _pins(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        match = re.match(r"^([A-Za-z0-9_.\-]+)==([^\s;#]+)", line.strip())
        if match:
            pins[match.group(1).lower().replace("_", "-")] = match.group(2)
    return pins


# ----------------------------------------------------------------------------- configuration


def test_binder_requirements_are_the_lock_plus_the_hub_extras():
    lines = [
        line.strip()
        for line in (BINDER / "requirements.txt").read_text().splitlines()
        if line.strip() and not line.strip().startswith("#")
    ]
    includes = [line.split(maxsplit=1)[1] for line in lines if line.startswith("-r ")]
    assert [(BINDER / i).resolve() for i in includes] == [LOCK.resolve()]
    options = [line for line in lines if line.startswith("--")]
    assert options == ["--extra-index-url https://download.pytorch.org/whl/cpu"]
    own = _pins(BINDER / "requirements.txt")
    assert set(own) == HUB_EXTRAS, "binder/requirements.txt may only add the hub's extras"
    assert not set(own) & set(_pins(LOCK)), "a package pinned in both places can disagree"
    unpinned = [line for line in lines if not line.startswith(("-", "--")) and "==" not in line]
    assert not unpinned, unpinned


def test_binder_python_is_the_locks_python():
    runtime = (BINDER / "runtime.txt").read_text().strip()
    conda = re.search(r"python=(3\.\d+)", (ROOT / "environment.yml").read_text()).group(1)
    lock_header = re.search(r"\(Python (3\.\d+)", LOCK.read_text()).group(1)
    assert runtime == f"python-{conda}" == f"python-{lock_header}"


def test_postbuild_installs_once_without_moving_the_lock_and_sets_up_lab_like_make():
    script = (BINDER / "postBuild").read_text()
    assert os.access(BINDER / "postBuild", os.X_OK), "repo2docker runs postBuild only if executable"
    install = next(line for line in script.splitlines() if "pip install" in line)
    assert "--no-deps" in install and " -e " not in install and install.rstrip().endswith(" .")
    assert f"--name {KERNEL_NAME}" in script
    makefile = (ROOT / "Makefile").read_text()
    make_settings = re.search(r"define LAB_SETTINGS\n(.*?)\nendef", makefile, re.DOTALL).group(1)
    hub_settings = re.search(r"<<'JSON'\n(.*?)\nJSON", script, re.DOTALL).group(1)
    assert json.loads(hub_settings) == json.loads(make_settings)
    # the save hook make lab registers, registered the same way
    register = "from course_utils.machinery.jupyter_hooks import SERVER_CONFIG"
    assert register in makefile and register in script


def test_nbgitpuller_link_opens_the_learners_own_copy():
    link = nbgitpuller_link("https://hub.example.org/", branch="v0.2.0")
    assert link.startswith("https://hub.example.org/hub/user-redirect/git-pull?repo=https%3A%2F%2F")
    assert "branch=v0.2.0" in link
    assert "urlpath=lab%2Ftree%2Fmech-interp-course%2Fnotebooks%2F00_setup_and_tools.ipynb" in link
    own = nbgitpuller_link(
        "https://x.org/jupyter",
        "https://git.example.org/me/course.git",
        open_path="notebooks/",
        interface="tree",
    )
    assert own.startswith("https://x.org/jupyter/hub/user-redirect/git-pull?")
    assert "urlpath=tree%2Fcourse%2Fnotebooks%2F" in own
    assert repo_folder("https://git.example.org/me/course.git/") == "course"
    assert binder_link().startswith("https://mybinder.org/v2/gh/mi-course/mech-interp-course/main?")
    with pytest.raises(ValueError, match="not a hub address"):
        nbgitpuller_link("hub.example.org")


def test_hub_link_command_prints_the_link_or_one_line_error():
    run = lambda *a: subprocess.run(  # noqa: E731
        [sys.executable, "-m", "course_utils.machinery.cli", "hub-link", *a],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    ok = run("--hub", "https://hub.example.org")
    assert ok.returncode == 0 and ok.stdout.strip() == nbgitpuller_link("https://hub.example.org")
    bad = run("--hub", "hub.example.org")
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1


# ----------------------------------------------------------------------------- where state goes


def test_progress_goes_to_course_home_then_the_writable_checkout_then_the_state_dir(
    tmp_path, monkeypatch
):
    checkout = tmp_path / "copy"
    (checkout / "solutions").mkdir(parents=True)
    (checkout / "notebooks").mkdir()
    monkeypatch.chdir(checkout / "notebooks")
    monkeypatch.delenv("COURSE_HOME", raising=False)
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    assert grading.progress_path() == checkout / ".course-progress.json"
    monkeypatch.chdir(tmp_path)  # not in a checkout: never the package's own folder
    assert grading.progress_path() == tmp_path / "state" / "mi-course" / ".course-progress.json"
    monkeypatch.setenv("COURSE_HOME", str(tmp_path / "mine"))
    assert grading.progress_path() == tmp_path / "mine" / ".course-progress.json"


def _learner_prefix() -> list[str]:
    """Run as a non-root learner who can read every file but write only where allowed."""
    if os.geteuid() != 0:
        return []
    if shutil.which("setpriv") is None:
        pytest.skip("running as root without setpriv: cannot become a non-root learner here.")
    probe = subprocess.run(
        [*_SETPRIV, sys.executable, "-c", "import os; print(os.geteuid())"],
        capture_output=True,
        text=True,
    )
    if probe.returncode != 0 or probe.stdout.strip() != str(NOBODY):
        pytest.skip(f"setpriv cannot grant a read-only learner here: {probe.stderr.strip()[:200]}")
    return _SETPRIV


_SETPRIV = [
    "setpriv",
    f"--reuid={NOBODY}",
    f"--regid={NOBODY}",
    "--clear-groups",
    "--inh-caps=+dac_read_search",
    "--ambient-caps=+dac_read_search",
]


def _copy_tracked(paths: list[str], target: Path) -> Path:
    files = subprocess.run(
        ["git", "ls-files", "-z", *paths], cwd=ROOT, capture_output=True, check=True
    ).stdout.split(b"\0")
    for name in filter(None, (f.decode() for f in files)):
        (target / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, target / name)
    return target


def _read_only(tree: Path) -> None:
    for path in [tree, *tree.rglob("*")]:
        mode = path.stat().st_mode
        path.chmod(
            mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH)
            | stat.S_IROTH
            | (stat.S_IXOTH if path.is_dir() else 0)
        )


def _snapshot(tree: Path) -> dict[str, str]:
    """Every file and folder under ``tree`` with its content hash and mtime."""
    return {
        str(p.relative_to(tree)): (
            hashlib.sha256(p.read_bytes()).hexdigest() + f"@{p.stat().st_mtime_ns}"
            if p.is_file()
            else "dir"
        )
        for p in sorted(tree.rglob("*"))
    }


def _learner_home(tmp_path: Path) -> Path:
    home = tmp_path / "home"
    home.mkdir()
    if os.geteuid() == 0:
        os.chown(home, NOBODY, NOBODY)
    return home


def _learner_env(home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("COURSE_HOME", "XDG_STATE_HOME")}
    return {**env, "HOME": str(home), "HF_HUB_OFFLINE": "1", "COURSE_HEADLESS": "1", **extra}


def test_a_non_root_user_installs_the_course_from_a_read_only_checkout(tmp_path):
    prefix = _learner_prefix()
    checkout = _copy_tracked(["course_utils", "pyproject.toml", "README.md"], tmp_path / "ro")
    (checkout / "course_utils" / "assets").exists() or pytest.skip("assets not tracked here")
    _read_only(checkout)
    before = _snapshot(checkout)
    home = _learner_home(tmp_path)
    venv = home / "venv"
    env = _learner_env(home)
    run = lambda *cmd: subprocess.run(  # noqa: E731
        [*prefix, *cmd], capture_output=True, text=True, env=env, cwd=home, timeout=600
    )
    made = run(sys.executable, "-m", "venv", "--without-pip", str(venv))
    assert made.returncode == 0, made.stderr
    # The dependencies come from the course's environment (a hub installs them once, from the
    # lock); the new environment sees them through a .pth line, as a layered environment would.
    site = next(venv.glob("lib/python3*/site-packages"))
    import torch

    (site / "shared-deps.pth").write_text(f"{Path(torch.__file__).parents[1]}\n")
    # setuptools builds inside the source folder (build/, *.egg-info), which a read-only checkout
    # refuses; docs/teaching.md's recipe points both at the installer's own folder instead.
    config = home / "out-of-tree.cfg"
    config.write_text(f"[build]\nbuild_base = {home / 'build'}\n[egg_info]\negg_base = {home}\n")
    env["DIST_EXTRA_CONFIG"] = str(config)
    pip = run(
        str(venv / "bin" / "python"),
        "-m",
        "pip",
        "install",
        "--no-deps",
        "--no-build-isolation",
        "--no-index",
        "--no-cache-dir",
        str(checkout),
    )
    assert pip.returncode == 0, pip.stdout[-1500:] + pip.stderr[-1500:]
    assert _snapshot(checkout) == before, "installing wrote into the read-only checkout"
    where = run(
        str(venv / "bin" / "python"),
        "-c",
        "import course_utils, course_utils.science.corpus as c; c.list_files(); "
        "print(course_utils.__file__)",
    )
    assert where.returncode == 0, where.stderr[-1500:]
    assert where.stdout.strip().startswith(str(site)), where.stdout
    assert (venv / "bin" / "course").exists()


def test_course_check_writes_nothing_into_a_read_only_shared_install(tmp_path):
    """The worst case: the shared install is a checkout (notebooks/ and solutions/ beside the
    package), and the learner checks their own copy of a notebook from their home folder."""
    prefix = _learner_prefix()
    shared = _copy_tracked(
        [
            "course_utils",
            "notebooks/00_setup_and_tools.ipynb",
            "solutions/00_setup_and_tools.ipynb",
        ],
        tmp_path / "shared",
    )
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(shared)], check=True)  # as pip
    _read_only(shared)
    before = _snapshot(shared)
    home = _learner_home(tmp_path)
    notebook = home / "00_setup_and_tools.ipynb"
    shutil.copy(shared / "notebooks" / notebook.name, notebook)
    if os.geteuid() == 0:
        os.chown(notebook, NOBODY, NOBODY)
    env = _learner_env(home, PYTHONPATH=str(shared))
    run = lambda *args: subprocess.run(  # noqa: E731
        [*prefix, sys.executable, "-m", "course_utils.machinery.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=home,
        timeout=600,
    )
    which = subprocess.run(
        [*prefix, sys.executable, "-c", "import course_utils; print(course_utils.__file__)"],
        capture_output=True,
        text=True,
        env=env,
        cwd=home,
    )
    assert which.stdout.strip() == str(shared / "course_utils" / "__init__.py"), which
    check = run("check", str(notebook))
    assert check.returncode == 1, check.stdout + check.stderr  # untouched: nothing attempted
    assert "3 not attempted" in check.stdout
    state = home / ".local" / "state" / "mi-course" / ".course-progress.json"
    assert f"progress saved to {state}" in check.stdout, check.stdout
    assert "00" in json.loads(state.read_text())
    listing = run("list")
    assert "0/3 exercises passed" in listing.stdout, listing.stdout
    assert _snapshot(shared) == before, "course check wrote into the shared install"


def test_postbuild_writes_the_lab_settings_and_save_hook_into_the_environment(tmp_path):
    """Runs postBuild's set-up steps (everything after the installs) into a scratch prefix."""
    script = (BINDER / "postBuild").read_text()
    setup = script[script.index("settings=") :]
    env = {
        **os.environ,
        "NB_PYTHON_PREFIX": str(tmp_path),
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
    }
    done = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", setup],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    from course_utils.machinery.jupyter_hooks import SERVER_CONFIG

    server = json.loads((tmp_path / "etc/jupyter/jupyter_server_config.json").read_text())
    assert server == SERVER_CONFIG
    lab = json.loads((tmp_path / "share/jupyter/lab/settings/overrides.json").read_text())
    assert lab["@jupyter-widgets/jupyterlab-manager:plugin"] == {"saveState": True}
