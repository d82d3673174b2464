"""Environment helpers and hook-name validation."""

from __future__ import annotations

import os
import time

import pytest

from course_utils.machinery import env
from course_utils.science.hooks import UnknownHookError, ablation_loss_change, check_hook_name
from course_utils.science.models import random_tokens, tiny_random_model


def test_network_is_not_touched_when_offline_is_forced(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    assert env.network_available() is False
    assert time.perf_counter() - start < 0.1


def test_set_seed_is_repeatable_and_rejects_bad_seeds():
    import torch

    env.set_seed(3)
    a = torch.randn(4)
    env.set_seed(3)
    assert torch.equal(a, torch.randn(4))
    with pytest.raises(ValueError, match="non-negative int"):
        env.set_seed(-1)


def test_headless_follows_the_environment(monkeypatch):
    monkeypatch.setenv("COURSE_HEADLESS", "1")
    assert env.headless()


def test_env_report_is_one_line_with_versions():
    report = env.env_report()
    assert "\n" not in report and "torch 2.13.0" in report and "transformer_lens" in report


def test_unknown_hook_name_suggests_and_lists_valid_names():
    model = tiny_random_model()
    with pytest.raises(UnknownHookError) as info:
        check_hook_name(model, "blocks.0.hook_resid_psot")
    message = str(info.value)
    assert "'blocks.0.hook_resid_post'" in message and "Valid hook names" in message
    assert check_hook_name(model, "blocks.1.hook_mlp_out") == "blocks.1.hook_mlp_out"


def test_reference_ablation_rejects_unknown_hook():
    model = tiny_random_model()
    with pytest.raises(UnknownHookError):
        ablation_loss_change(model, random_tokens(model), "blocks.7.hook_mlp_out")


def test_blocked_network_refuses_internet_but_allows_loopback():
    import subprocess
    import sys

    code = (
        "import socket, course_utils\n"
        "try:\n"
        "    socket.create_connection(('example.org', 443), timeout=1)\n"
        "    print('REACHED')\n"
        "except OSError as e:\n"
        "    print('BLOCKED' if 'COURSE_BLOCK_NETWORK' in str(e) else 'OTHER', e)\n"
        "s = socket.socket(); s.bind(('127.0.0.1', 0)); s.listen(1)\n"
        "c = socket.create_connection(s.getsockname(), timeout=1); print('LOOPBACK OK')\n"
        "print(course_utils.machinery.env.network_available())\n"
    )
    env = {**__import__("os").environ, "COURSE_BLOCK_NETWORK": "1"}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env
    ).stdout
    assert "BLOCKED" in out and "LOOPBACK OK" in out and out.strip().endswith("False")


def test_headless_runs_save_text_progress_bars():
    """A widget bar is saved as its first frame ("0/400"); headless runs must use text bars."""
    import subprocess
    import sys

    code = (
        "import course_utils, tqdm.auto, tqdm.std; "
        "from course_utils.science import activations; "
        "assert tqdm.auto.tqdm is tqdm.std.tqdm and activations.tqdm is tqdm.std.tqdm"
    )
    headless_env = {**os.environ, "COURSE_HEADLESS": "1"}
    result = subprocess.run(
        [sys.executable, "-c", code], env=headless_env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
