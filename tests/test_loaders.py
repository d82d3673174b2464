"""One loader for models and dictionaries: offline defaults, online names, local folders."""

from __future__ import annotations

import json
import time

import pytest
import torch
from sae_lens import SAE, StandardSAE, StandardSAEConfig
from transformer_lens import HookedTransformer

from course_utils.machinery import env
from course_utils.science import course_model as cm
from course_utils.science import models
from course_utils.science.models import NetworkRequiredError, load_model, load_sae


@pytest.fixture
def no_network(monkeypatch):
    """Network blocked: the bounded probe says no, HF_HUB_OFFLINE unset."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("COURSE_OFFLINE", raising=False)
    monkeypatch.setattr(env, "network_available", lambda *a, **k: False)


@pytest.fixture
def network(monkeypatch):
    """Pretend the Hub is reachable (downloads are replaced by local files in each test)."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("COURSE_OFFLINE", raising=False)
    monkeypatch.setattr(env, "network_available", lambda *a, **k: True)


def forbid_download(*args, **kwargs):
    raise AssertionError("a download was attempted although the machine is offline")


@pytest.mark.parametrize("name", ["gelu-1l", "gpt2-small"])
def test_online_model_with_hf_hub_offline_gives_one_clear_error(monkeypatch, name):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(HookedTransformer, "from_pretrained", forbid_download)
    start = time.perf_counter()
    with pytest.raises(NetworkRequiredError) as info:
        load_model(name)
    assert time.perf_counter() - start < 1.0
    message = str(info.value)
    assert "needs a network" in message and "HF_HUB_OFFLINE" in message
    assert "load_model('course-2l')" in message


def test_online_model_without_network_gives_one_clear_error(no_network, monkeypatch):
    monkeypatch.setattr(HookedTransformer, "from_pretrained", forbid_download)
    with pytest.raises(NetworkRequiredError, match="cannot be reached.*course-2l"):
        load_model("gelu-1l")


def test_online_model_path_goes_through_transformer_lens(network, monkeypatch):
    calls = []

    def fake_from_pretrained(name, device="cpu", **kwargs):
        calls.append((name, device))
        return models.tiny_random_model()

    monkeypatch.setattr(HookedTransformer, "from_pretrained", fake_from_pretrained)
    model = load_model("gelu-1l")
    assert calls == [("gelu-1l", "cpu")] and not model.training


def test_a_dropped_download_becomes_one_clear_error(network, monkeypatch):
    def broken(*args, **kwargs):
        raise OSError("connection reset")

    monkeypatch.setattr(HookedTransformer, "from_pretrained", broken)
    with pytest.raises(NetworkRequiredError, match="connection reset.*course-2l"):
        load_model("gpt2-small")


def test_unknown_model_name_lists_the_choices():
    with pytest.raises(ValueError, match="course-2l.*gelu-1l"):
        load_model("gpt5")


def test_default_is_the_offline_course_model(no_network):
    model = load_model()
    assert model.cfg.model_name == "course-2l"


def test_a_model_saved_in_the_course_format_loads_from_its_folder(tmp_path):
    """A tiny model with the course tokenizer, saved and loaded like the shipped one."""
    tokenizer = cm.wrap_tokenizer(cm.asset_dir() / cm.TOKENIZER_FILE)
    arch = dict(cm.ARCHITECTURE, n_layers=1, d_model=16, n_heads=2, d_head=8, d_mlp=32, n_ctx=32)
    tiny = HookedTransformer(cm.hooked_config(arch, 4096, seed=3), tokenizer=tokenizer)
    cm.save_course_model(tiny, tmp_path / "tiny")
    loaded = load_model(str(tmp_path / "tiny"))
    tokens = loaded.to_tokens("import os")
    with torch.no_grad():
        torch.testing.assert_close(loaded(tokens), tiny(tokens))
    assert json.loads((tmp_path / "tiny" / cm.CONFIG_FILE).read_text())["d_vocab"] == 4096


# -- dictionaries ---------------------------------------------------------------------------------
@pytest.fixture
def sae_folder(tmp_path):
    torch.manual_seed(0)
    sae = StandardSAE(StandardSAEConfig(d_in=128, d_sae=256))
    with torch.no_grad():
        for parameter in sae.parameters():
            parameter.normal_()
    folder = tmp_path / "sae"
    sae.save_model(folder)
    return sae, folder


def test_sae_saved_with_save_model_loads_from_its_folder(sae_folder):
    sae, folder = sae_folder
    loaded = load_sae(str(folder))
    x = torch.randn(5, 128)
    torch.testing.assert_close(loaded.encode(x), sae.encode(x))
    torch.testing.assert_close(loaded.W_dec, sae.W_dec)


def test_missing_sae_file_names_it(sae_folder):
    _, folder = sae_folder
    (folder / models.SAE_WEIGHTS_FILE).unlink()
    with pytest.raises(FileNotFoundError, match="sae_weights.safetensors is missing"):
        load_sae(folder)


@pytest.mark.parametrize("name", [models.SAE_WEIGHTS_FILE, models.SAE_CONFIG_FILE])
def test_corrupt_sae_file_names_it(sae_folder, name):
    _, folder = sae_folder
    path = folder / name
    path.write_bytes(path.read_bytes()[:20])
    with pytest.raises(ValueError, match=f"{name} is unreadable"):
        load_sae(folder)


def test_saelens_release_offline_gives_one_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(SAE, "from_pretrained", forbid_download)
    with pytest.raises(NetworkRequiredError, match="needs a network.*shipped dictionary"):
        load_sae("gpt2-small-res-jb", "blocks.8.hook_resid_pre")


def test_saelens_release_without_network(no_network, monkeypatch):
    monkeypatch.setattr(SAE, "from_pretrained", forbid_download)
    with pytest.raises(NetworkRequiredError, match="cannot be reached"):
        load_sae("gpt2-small-res-jb", "blocks.8.hook_resid_pre")


def test_saelens_release_online_path(network, monkeypatch, sae_folder):
    _, folder = sae_folder
    calls = []

    def fake_from_pretrained(release, sae_id, device="cpu", **kwargs):
        calls.append((release, sae_id))
        return SAE.load_from_disk(folder)

    monkeypatch.setattr(SAE, "from_pretrained", fake_from_pretrained)
    loaded = load_sae("gpt2-small-res-jb", "blocks.8.hook_resid_pre")
    assert calls == [("gpt2-small-res-jb", "blocks.8.hook_resid_pre")]
    assert loaded.cfg.d_sae == 256


def test_release_needs_a_valid_sae_id_and_unknown_names_are_reported():
    with pytest.raises(ValueError, match="needs sae_id=.*blocks.0.hook_resid_pre"):
        load_sae("gpt2-small-res-jb")
    with pytest.raises(ValueError, match="unknown dictionary 'no-such-sae'"):
        load_sae("no-such-sae")


def test_network_available_respects_offline_flags(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    assert env.network_available() is False
    assert time.perf_counter() - start < 0.1
