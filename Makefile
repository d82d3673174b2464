# The commands a learner and a contributor need. `make help` lists them.
SHELL := bash
.SHELLFLAGS := -eu -o pipefail -c
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
KERNEL := mi-course
FIRST_NOTEBOOK := notebooks/00_setup_and_tools.ipynb
# Jupyter refuses to run as root unless told to (containers, CI, some cloud machines).
ROOT_FLAG := $(if $(filter 0,$(shell id -u)),--allow-root)
# pip's find-links / extra-index warnings on some machines are noise; keep real errors.
# (grep exits 1 when it filters everything; pip's own exit status still fails the pipeline.)
QUIET_PIP := { grep -v -e '^WARNING: Location' -e '^$$' || true; }

LOCK := requirements-lock.txt
# What `make test` runs, stage by stage, and which stages share the two cores: scripts/test_stages.py
STAGES := $(BIN)/python scripts/test_stages.py

.PHONY: help install kernel lab lab-no-browser test test-browser test-other-cpu test-colab check build lint lock clean

help:
	@echo "make lab             install (first time), register the kernel, open JupyterLab"
	@echo "make lab-no-browser  the same, printing the URL instead of opening a browser"
	@echo "make test            install, then lint, unit/check/browser tests, every solution notebook"
	@echo "                     (nbval), the training chapters on a simulated other CPU; stage times"
	@echo "make test-browser    only the JupyterLab-in-Chromium tests (screenshots in .browser-shots/)"
	@echo "make test-other-cpu  the training chapters' notebooks again on a simulated other CPU"
	@echo "make test-colab      (downloads ~3 GB) every notebook in a Colab-like Python 3.13 env"
	@echo "make check CH=01     grade your exercise notebook for chapter 01"
	@echo "make build           regenerate notebooks/ from solutions/"
	@echo "make lint            ruff"

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# Reinstall only when the requirements or the lock change. The lock holds every version exactly.
$(STAMP): pyproject.toml $(LOCK) | $(BIN)/python
	$(BIN)/python -m pip install -q --upgrade pip 2>&1 | $(QUIET_PIP)
	$(BIN)/python -m pip install -q -e ".[dev]" -c $(LOCK) 2>&1 | $(QUIET_PIP)
	@touch $(STAMP)

install: $(STAMP)

# JupyterLab defaults for the course (this venv only). Offline: no news, no update checks.
# Save widget state with the notebook, so that a saved slider reopens as a slider instead of
# "Error displaying widget: model not found" (notebooks are stored with the empty state that
# this writes, so opening and saving one still changes no byte).
LAB_OVERRIDES := $(VENV)/share/jupyter/lab/settings/overrides.json
define LAB_SETTINGS
{"@jupyterlab/apputils-extension:notification": {"fetchNews": "false", "checkForUpdates": false},
 "@jupyter-widgets/jupyterlab-manager:plugin": {"saveState": true}}
endef
export LAB_SETTINGS

$(LAB_OVERRIDES): Makefile | $(STAMP)
	@mkdir -p $(dir $@)
	@echo "$$LAB_SETTINGS" > $@

# The server side: strip the PNG snapshot that the plotly renderer writes into every figure it
# draws, so that opening (and autosaving) a notebook leaves its file unchanged. See
# course_utils/machinery/jupyter_hooks.py.
SERVER_CONFIG := $(VENV)/etc/jupyter/jupyter_server_config.json
$(SERVER_CONFIG): Makefile course_utils/machinery/jupyter_hooks.py | $(STAMP)
	@mkdir -p $(dir $@)
	@$(BIN)/python -c "import json; from course_utils.machinery.jupyter_hooks import SERVER_CONFIG as c; print(json.dumps(c, indent=1))" > $@

kernel: $(STAMP) $(LAB_OVERRIDES) $(SERVER_CONFIG)
	$(BIN)/python -m ipykernel install --user --name $(KERNEL) --display-name "MI course (.venv)" >/dev/null

# Serve the repository root, so that the file browser shows solutions/ next to notebooks/, and
# open chapter 00. (`jupyter lab FILE` would serve FILE's folder and hide solutions/.)
LAB_ARGS := --ServerApp.root_dir="$(CURDIR)" --LabApp.default_url=/lab/tree/$(FIRST_NOTEBOOK)

lab: kernel
	$(BIN)/jupyter lab $(LAB_ARGS) $(ROOT_FLAG) $(ARGS)

lab-no-browser: kernel
	$(BIN)/jupyter lab $(LAB_ARGS) --no-browser $(ROOT_FLAG) $(ARGS)

# Everything CI checks, offline and headless, with a table of stage times at the end: lint; unit,
# exercise-check, sync and browser tests (two pytest-xdist workers); every solution notebook under
# nbval (lax: assertion cells carry the science) while, at the same time, the chapters that train
# run again on a simulated laptop-class CPU (AVX2 kernels in torch and MKL instead of AVX-512), so
# that no assertion depends on one machine's float rounding. Each notebook's kernel uses one
# thread, so the two notebook runs share the two cores. ONLY="tests" (or "notebooks other-cpu")
# runs some stages.
# The server config and Lab settings first: tests/test_learner_screen.py reads the config, and
# with two workers it may run before the browser tests' `make lab` would have written it.
test: $(STAMP) $(SERVER_CONFIG) $(LAB_OVERRIDES)
	$(STAGES) $(if $(ONLY),--only $(ONLY))

# Only the training chapters on the simulated other CPU (part of `make test`).
test-other-cpu: $(STAMP)
	$(STAGES) --only other-cpu

# Opt-in, needs a network: Colab's Python, torch, kernel and widget versions, the course installed
# the way the notebooks' setup cell does it, then every solution notebook under nbval.
test-colab:
	bash scripts/colab_like.sh

# What a learner sees: JupyterLab driven in headless Chromium (/usr/bin/chromium; the tests skip
# without it). `make test` runs these too, as part of tests/.
test-browser: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest tests/test_browser.py -q

build: $(STAMP)
	$(BIN)/course build

# After changing a requirement in pyproject.toml: install it (keeping what still fits), then write
# the .venv's exact versions to the lock.
lock: | $(BIN)/python
	$(BIN)/python -m pip install -q -e ".[dev]" 2>&1 | $(QUIET_PIP)
	$(BIN)/python scripts/write_lock.py $(LOCK)
	@touch $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check course_utils tests

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info

# Grade your own notebook: make check CH=01
check: $(STAMP)
	$(BIN)/course check $(CH)
