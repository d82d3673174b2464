"""lm_saes: splicing, CE recovered, training loop; the shipped reference SAEs load and fit."""

from __future__ import annotations

import pytest
import torch

from course_utils import lm_saes as L
from course_utils import saes as S
from course_utils.models import (
    load_model,
    load_sae,
    random_tokens,
    shipped_dictionaries,
    tiny_random_model,
)


class _Identity(torch.nn.Module):
    """A perfect 'SAE': encode = identity, decode = identity."""

    d_in = 32

    def encode(self, x):
        return x

    def decode(self, acts):
        return acts


def test_perfect_sae_recovers_everything():
    model = tiny_random_model()
    tokens = random_tokens(model, batch=2, seq=8)
    r = L.evaluate_splice(model, _Identity(), tokens, "blocks.0.hook_resid_post")
    assert abs(r["ce_sae"] - r["ce_clean"]) < 1e-5
    assert abs(r["ce_recovered_zero"] - 1) < 1e-4 and abs(r["kl"]) < 1e-5


def test_width_mismatch_is_clear():
    model = tiny_random_model()
    sae = L.single(S.ReLUSAE(16, 8, 1))
    with pytest.raises(ValueError, match="d_in=16.*width 32"):
        L.ce_loss_with_sae(model, sae, random_tokens(model), "blocks.0.hook_resid_post")


def test_training_lowers_the_loss():
    torch.manual_seed(0)
    data = torch.randn(4096, 8) @ torch.randn(8, 8)
    sae = S.ReLUSAE(8, 16, 2, l1_coeff=[0.01, 0.1])
    batches = iter(data.split(256))
    history = L.train_lm_sae(sae, lambda: next(batches), steps=16, lr=1e-2, progress=False,
                             log_every=5)
    assert (history["loss"][-1] < history["loss"][0]).all()
    assert torch.allclose(sae.l1_coeff, torch.tensor([0.01, 0.1]))  # restored after warm-up
    assert torch.allclose(sae.W_dec.norm(dim=-1), torch.ones(2, 16), atol=1e-5)


@pytest.mark.skipif(not set(L.REFERENCE_NAMES) <= set(shipped_dictionaries()),
                    reason="reference SAEs not built")
def test_shipped_reference_saes_fit_the_course_model():
    model = load_model("course-2l")
    for name in L.REFERENCE_NAMES:
        sae = load_sae(name)
        assert sae.cfg.metadata.hook_name == L.REFERENCE["hook_name"]
        assert sae.cfg.d_in == model.cfg.d_model and sae.cfg.d_sae == L.REFERENCE["d_sae"]
        evaluation = sae.cfg.metadata.course_evaluation
        assert evaluation["ce_recovered_zero"] >= 0.9 and evaluation["dead_fraction"] < 0.1


def test_missing_or_corrupt_shipped_sae_names_file_and_command(tmp_path, monkeypatch):
    import shutil

    from course_utils import assets

    root = tmp_path / "assets"
    (root / "saes").mkdir(parents=True)
    monkeypatch.setattr(assets, "ASSETS_DIR", root)
    name = L.REFERENCE_NAMES[0]
    with pytest.raises(FileNotFoundError, match=r"cfg\.json.*build-saes"):
        load_sae(name)
    source = assets.Path(__file__).resolve().parents[1] / "course_utils/assets/saes" / name
    shutil.copytree(source, root / "saes" / name)
    (root / "saes" / name / "sae_weights.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match=r"sae_weights\.safetensors.*unreadable.*build-saes"):
        load_sae(name)
