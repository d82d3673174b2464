#!/usr/bin/env bash
# `make test-colab`: every solution notebook in a Colab-like environment — Colab's Python (3.13),
# torch 2.11 and Colab's versions of every package the course touches (tests/data/colab/), with the
# course installed exactly the way the notebooks' setup cell does it. Needs a network (about 3 GB:
# PyPI's torch 2.11 for Python 3.13 is a CUDA build, which runs on the CPU). Reuses the venv.
#   COLAB_VENV=dir      the environment (default .venv-colab)
#   COLAB_PYTHON=path   a Python 3.13 (default: the first that runs of python3.13 on PATH,
#                       pyenv's 3.13.x, /usr/bin/python3.13; see scripts/find_python.sh)
#   NOTEBOOKS="..."     which solution notebooks (default: all)
set -euo pipefail
cd "$(dirname "$0")/.."
venv=$(realpath -m "${COLAB_VENV:-.venv-colab}")
python=$(FIND_PYTHON=${COLAB_PYTHON:-} bash scripts/find_python.sh 3.13)  # a shim that does not run is skipped
freeze=tests/data/colab/pip-freeze.txt
colab_python=$(grep -oP '^Python \K[0-9.]+' tests/data/colab/os-info.txt)
quiet() { grep -v -e '^WARNING: Location' -e '^$' || true; }

[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
echo "== $("$venv/bin/python" --version) in $venv (Colab runs $colab_python)"

echo "== 1. Colab's own packages, at Colab's versions"
.venv/bin/python -m course_utils.machinery.colab base "$freeze" "$colab_python" >"$venv/colab-base.txt"
"$venv/bin/python" -m pip install -q -r "$venv/colab-base.txt" 2>&1 | quiet

echo "== 2. the course, the way the setup cell installs it (timed; downloads counted)"
export PIP_CACHE_DIR="$venv/pip-cache-course"
rm -rf "$PIP_CACHE_DIR"
start=$(date +%s)
"$venv/bin/python" -m pip install -q --no-deps . 2>&1 | quiet
(cd /tmp && "$venv/bin/python" -c "from course_utils.machinery.colab import install_missing; install_missing()") 2>&1 | quiet
echo "course install: $(($(date +%s) - start)) s, downloaded $(du -sh "$PIP_CACHE_DIR" | cut -f1)"
unset PIP_CACHE_DIR

echo "== 3. the test runner, holding Colab's packages where they are"
"$venv/bin/python" -c "from course_utils.machinery.colab import protected_constraints as p; print(*p(), sep='\n')" >"$venv/protected.txt"
"$venv/bin/python" -m pip install -q -c "$venv/protected.txt" nbval pytest 2>&1 | quiet
"$venv/bin/python" -m pip check | grep -v -e 'google-colab' -e '^$' || true
"$venv/bin/python" -c "import torch, ipykernel, ipywidgets, plotly, transformers; print('versions:', 'torch', torch.__version__, '· ipykernel', ipykernel.__version__, '· ipywidgets', ipywidgets.__version__, '· plotly', plotly.__version__, '· transformers', transformers.__version__)"

echo "== 4. every solution notebook under nbval, offline, on the CPU"
HF_HUB_OFFLINE=1 COURSE_HEADLESS=1 COURSE_BLOCK_NETWORK=1 "$venv/bin/python" -m pytest -q \
  -p no:cacheprovider --nbval-lax --nbval-sanitize-with nbval_sanitize.cfg --nbval-current-env \
  --nbval-cell-timeout=900 --nbval-kernel-startup-timeout=120 ${NOTEBOOKS:-solutions}
