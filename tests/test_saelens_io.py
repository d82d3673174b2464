"""Our SAEs round-trip through SAELens: same encode/decode, same logits when spliced."""

from __future__ import annotations

import pytest
import torch

from course_utils.science import lm_saes as L
from course_utils.science import saelens_io as IO
from course_utils.science import saes as S
from course_utils.science.hooks import UnknownHookError
from course_utils.science.models import load_model, load_sae

HOOK = "blocks.0.hook_resid_post"


@pytest.fixture(scope="module")
def model():
    return load_model("course-2l")


def _random_sae(cls=S.ReLUSAE, **kwargs):
    sae = cls(128, 48, 2, seed=3, **kwargs)
    with torch.no_grad():
        sae.b_enc.normal_(generator=torch.Generator().manual_seed(1))
        sae.b_dec.normal_(generator=torch.Generator().manual_seed(2))
    return sae


@pytest.mark.parametrize("cls,kwargs", [(S.ReLUSAE, {}), (S.TopKSAE, {"k": 5})])
def test_round_trip_identical_encode_decode(tmp_path, model, cls, kwargs):
    sae = _random_sae(cls, **kwargs)
    IO.export_sae(sae, tmp_path / "sae", instance=1, hook_name=HOOK, model=model)
    assert {p.name for p in (tmp_path / "sae").iterdir()} >= {"cfg.json", "sae_weights.safetensors"}
    lens = load_sae(tmp_path / "sae")
    assert lens.cfg.metadata.hook_name == HOOK and lens.cfg.metadata.model_name == "course-2l"
    x = torch.randn(20, 128, generator=torch.Generator().manual_seed(0)) * 5
    ours = L.single(sae, 1)
    with torch.no_grad():
        assert torch.equal(lens.encode(x), ours.encode(x))
        assert torch.allclose(lens.decode(lens.encode(x)), ours(x), atol=1e-6)


def test_run_with_saes_matches_our_splice(tmp_path, model):
    sae = _random_sae()
    IO.export_sae(sae, tmp_path / "sae", instance=0, hook_name=HOOK)
    lens = load_sae(tmp_path / "sae")
    tokens = torch.randint(
        0, model.cfg.d_vocab, (2, 16), generator=torch.Generator().manual_seed(0)
    )
    hooked = IO.hooked_sae_transformer(model)
    with torch.no_grad():
        assert torch.equal(hooked(tokens), model(tokens))
        theirs = hooked.run_with_saes(tokens, saes=[lens])
        ours = model.run_with_hooks(tokens, fwd_hooks=[(HOOK, L.sae_hook(L.single(sae, 0)))])
    assert torch.allclose(theirs, ours, atol=1e-5)
    assert not torch.allclose(ours, model(tokens), atol=1e-3)  # the splice did something


def test_width_mismatch_names_both_numbers(model):
    sae = _random_sae()
    with pytest.raises(ValueError, match=r"d_in=128.*width 512"):
        IO.to_saelens(sae, hook_name="blocks.0.mlp.hook_post", model=model)


def test_unknown_hook_lists_valid_names(model):
    with pytest.raises(UnknownHookError, match="Valid hook names"):
        IO.to_saelens(_random_sae(), hook_name="blocks.0.hook_resid_psot", model=model)


def test_instance_out_of_range():
    with pytest.raises(ValueError, match="out of range"):
        IO.to_saelens(_random_sae(), instance=5)
