"""lm_saes: splicing, CE recovered, training loop; the shipped reference SAEs load and fit."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from course_utils.science import lm_saes as L
from course_utils.science import saes as S
from course_utils.science.models import (
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
    history = L.train_lm_sae(
        sae, lambda: next(batches), steps=16, lr=1e-2, progress=False, log_every=5
    )
    assert (history["loss"][-1] < history["loss"][0]).all()
    assert torch.allclose(sae.l1_coeff, torch.tensor([0.01, 0.1]))  # restored after warm-up
    assert torch.allclose(sae.W_dec.norm(dim=-1), torch.ones(2, 16), atol=1e-5)


@pytest.mark.skipif(
    not set(L.REFERENCE_NAMES) <= set(shipped_dictionaries()), reason="reference SAEs not built"
)
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


def test_clip_grad_norm_per_instance_clips_each_instance_on_its_own_norm():
    sae = S.ReLUSAE(4, 6, 2)
    for p in sae.parameters():
        p.grad = torch.ones_like(p)
    sae.W_enc.grad[1] *= 100.0  # instance 1 has a much larger gradient
    before = [p.grad.clone() for p in sae.parameters()]
    norms = L.clip_grad_norm_per_instance(sae.parameters(), 1.0)
    expected = torch.stack([sum(g[i].pow(2).sum() for g in before).sqrt() for i in range(2)])
    assert torch.allclose(norms, expected)
    after = torch.stack(
        [sum(p.grad[i].pow(2).sum() for p in sae.parameters()).sqrt() for i in range(2)]
    )
    assert torch.allclose(after, torch.ones(2), atol=1e-5)
    # same formula as torch's clip_grad_norm_ for a single instance
    one = S.ReLUSAE(4, 6, 1)
    twin = S.ReLUSAE(4, 6, 1)
    for p, q in zip(one.parameters(), twin.parameters(), strict=True):
        p.grad = torch.randn_like(p) * 3
        q.grad = p.grad.clone()
    L.clip_grad_norm_per_instance(one.parameters(), 0.5)
    torch.nn.utils.clip_grad_norm_(twin.parameters(), 0.5)
    for p, q in zip(one.parameters(), twin.parameters(), strict=True):
        assert torch.allclose(p.grad, q.grad, atol=1e-6)


def test_clip_grad_norm_per_instance_leaves_small_gradients_and_explains_bad_input():
    sae = S.ReLUSAE(4, 6, 2)
    for p in sae.parameters():
        p.grad = torch.full_like(p, 1e-3)
    before = [p.grad.clone() for p in sae.parameters()]
    L.clip_grad_norm_per_instance(sae.parameters(), 1.0)
    assert all(torch.equal(p.grad, b) for p, b in zip(sae.parameters(), before, strict=True))
    with pytest.raises(ValueError, match="backward"):
        L.clip_grad_norm_per_instance(S.ReLUSAE(4, 6, 2).parameters(), 1.0)
    with pytest.raises(ValueError, match="instance dimension first"):
        a, b = torch.zeros(2, 3, requires_grad=True), torch.zeros(5, requires_grad=True)
        a.grad, b.grad = torch.ones(2, 3), torch.ones(5)
        L.clip_grad_norm_per_instance([a, b], 1.0)


def test_instances_train_independently_with_clipping():
    """Per-instance clipping: instance 0 of a 2-instance run equals a 1-instance run."""
    torch.manual_seed(0)
    data = (torch.randn(2048, 8) @ torch.randn(8, 8)) * 10
    pair = S.ReLUSAE(8, 16, 2, l1_coeff=[0.05, 5.0], seed=0)
    alone = S.ReLUSAE(8, 16, 1, l1_coeff=0.05, seed=0)
    with torch.no_grad():
        for name in ("W_enc", "W_dec", "b_enc", "b_dec"):
            getattr(alone, name).data[0] = getattr(pair, name).data[0]
    for sae in (pair, alone):
        batches = iter(data.split(256))
        L.train_lm_sae(sae, lambda b=batches: next(b), steps=8, lr=1e-2, progress=False)
    assert torch.allclose(pair.W_dec[0], alone.W_dec[0], atol=1e-5)


def test_compare_with_saelens_trainer_rows_and_bad_input():
    torch.manual_seed(0)
    acts = torch.randn(10 * 64, 8) @ torch.randn(8, 8)
    held = torch.randn(128, 8) @ torch.randn(8, 8)
    rows = L.compare_with_saelens_trainer(acts, held, d_sae=16, l1_coeff=0.1, batch_size=64)
    assert list(rows) == ["ours", "saelens (our init)", "saelens (its init)", "ours (no clipping)"]
    for row in rows.values():
        assert {"loss", "mse", "l0", "fvu", "seconds", "tokens_per_s"} <= set(row)
        assert torch.isfinite(torch.tensor(row["loss"]))
    with pytest.raises(ValueError, match="only 2 batches of 64"):
        L.compare_with_saelens_trainer(acts[:128], held, d_sae=16, batch_size=64)


def test_saelens_loss_matches_our_loss_for_a_unit_norm_decoder():
    sae = S.ReLUSAE(8, 16, 1, l1_coeff=0.3)
    x = torch.randn(64, 8)
    ours = sae.loss(x)["loss"].item()
    assert abs(L.saelens_loss(L.single(sae), x, 0.3)["loss"] - ours) < 1e-4 * max(1.0, abs(ours))


def test_mass_by_token_shares_and_base_rates():
    acts = torch.tensor([2.0, 0.0, 1.5, -5.0, 0.5, 0.0])
    tokens = torch.tensor([7, 7, 3, 3, 9, 9])
    rows = L.mass_by_token(acts, tokens, top=5)
    assert [r[0] for r in rows] == [7, 3, 9]  # the negative activation is not mass
    assert rows[0][1] == pytest.approx(0.5) and rows[1][1] == pytest.approx(0.375)
    assert rows[0][2] == pytest.approx(2 / 6)
    grouped = L.mass_by_token(acts, tokens, group_of=torch.tensor([0] * 9 + [1]))
    assert grouped[0][0] == 0 and grouped[0][1] == pytest.approx(0.875)
    assert L.mass_by_token(torch.zeros(3), torch.tensor([1, 2, 3])) == []
    with pytest.raises(ValueError, match="aligned"):
        L.mass_by_token(torch.zeros(4), torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="outside group_of"):
        L.mass_by_token(
            torch.ones(2), torch.tensor([0, 4]), group_of=torch.zeros(3, dtype=torch.long)
        )


def test_sae_folder_whose_cfg_disagrees_with_its_weights(tmp_path):
    import json
    import shutil

    from course_utils.science.models import load_sae_folder

    source = Path(__file__).resolve().parents[1] / "course_utils/assets/saes" / L.REFERENCE_NAMES[0]
    shutil.copytree(source, tmp_path / "sae")
    cfg = json.loads((tmp_path / "sae/cfg.json").read_text())
    cfg["d_in"] = 512
    (tmp_path / "sae/cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"cfg\.json says d_in=512 .*d_in=128"):
        load_sae_folder(tmp_path / "sae")


def test_missing_file_message_puts_the_rebuild_command_first(tmp_path):
    from course_utils.science.models import load_sae_folder

    with pytest.raises(FileNotFoundError) as info:
        load_sae_folder(tmp_path, rebuild="python -m course_utils.assets build-saes")
    message = str(info.value)
    assert "Rebuild it with `python -m course_utils.assets build-saes`" in message
    assert "git checkout" not in message  # tmp_path is not inside a git checkout
