"""course_utils.science.e2e_saes: bad input, the loop's loss equals the exercise references, NaN stops
the run, export round-trips through SAELens, and the committed sweep table matches the shipped
checkpoints."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from course_utils.science import e2e_saes as E
from course_utils.science.hooks import UnknownHookError
from course_utils.science.models import random_tokens, tiny_random_model

HOOK = "blocks.1.hook_resid_pre"
DOWNSTREAM = ("blocks.1.hook_resid_mid", "blocks.1.hook_resid_post")


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest.py


@pytest.fixture
def tiny():
    model = tiny_random_model(seed=0).requires_grad_(False)
    return model, E.E2ESAE(model.cfg.d_model, 40, seed=0), random_tokens(model, 2, 8, seed=1)


def test_splice_unknown_hook_is_a_clear_error(tiny):
    model, sae, tokens = tiny
    with pytest.raises(UnknownHookError, match="blocks.1.hook_resid_pre"):
        E.splice_sae(model, sae, tokens, "blocks.1.hook_resid_pree")


def test_splice_wrong_width_is_a_clear_error(tiny):
    model, _, tokens = tiny
    with pytest.raises(ValueError, match=r"d_in=64 .* width 32"):
        E.splice_sae(model, E.E2ESAE(64, 40), tokens, HOOK)


def test_train_wrong_width_is_a_clear_error(tiny):
    model, _, tokens = tiny
    cfg = E.TrainConfig("local", 1.0, HOOK, DOWNSTREAM, steps=1)
    with pytest.raises(ValueError, match="d_in=64"):
        E.train_sae(model, E.E2ESAE(64, 40), cfg, lambda: tokens, progress=False)


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="variant"):
        E.TrainConfig("e2e+ds", 1.0)
    with pytest.raises(ValueError, match="downstream"):
        E.TrainConfig("e2e_ds", 1.0, downstream_hooks=())
    with pytest.raises(ValueError, match="lam"):
        E.TrainConfig("e2e", float("nan"))


def test_loss_shapes_are_checked():
    with pytest.raises(ValueError, match="same shape"):
        E.kl_spliced_vs_original(torch.zeros(1, 2, 5), torch.zeros(1, 3, 5))
    with pytest.raises(ValueError, match="differ in shape"):
        E.loss_local(torch.zeros(2, 4), torch.zeros(2, 5), torch.zeros(2, 8), 1.0)
    with pytest.raises(ValueError, match="downstream"):
        E.loss_e2e_ds(
            torch.zeros(1, 2, 5), torch.zeros(1, 2, 5), torch.zeros(1, 2, 8), 1.0, 4, [], [], 1.0
        )


@pytest.mark.parametrize("variant", E.VARIANTS)
def test_loop_loss_is_the_exercise_loss(tiny, variant):
    model, sae, tokens = tiny
    cfg = E.TrainConfig(variant, 3.0, HOOK, DOWNSTREAM, beta=1.5, kl_coeff=0.7)
    clean = E.clean_run(model, tokens, cfg)
    loss, info = E.sae_loss(model, sae, tokens, cfg, clean)
    if variant == "local":
        x_hat, c = sae(clean[HOOK])
        expected = E.loss_local(clean[HOOK], x_hat, c, 3.0)
    else:
        ds = DOWNSTREAM if variant == "e2e_ds" else ()
        logits, c, new_ds = E.splice_sae(model, sae, tokens, HOOK, ds)
        if variant == "e2e":
            expected = E.loss_e2e(logits, clean["logits"], c, 3.0, sae.d_in)
        else:
            expected = E.loss_e2e_ds(
                logits, clean["logits"], c, 3.0, sae.d_in, new_ds, [clean[h] for h in ds], 1.5, 0.7
            )
    torch.testing.assert_close(loss, expected)


def test_training_keeps_the_model_frozen_and_moves_the_sae(tiny):
    model, sae, tokens = tiny
    model.requires_grad_(True)  # as loaded: the loop must freeze it
    before = {k: v.clone() for k, v in model.state_dict().items()}
    w = sae.W_enc.detach().clone()
    E.train_sae(
        model,
        sae,
        E.TrainConfig("e2e_ds", 1.0, HOOK, DOWNSTREAM, steps=3),
        lambda: tokens,
        progress=False,
    )
    assert all(p.grad is None and not p.requires_grad for p in model.parameters())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert not torch.equal(w, sae.W_enc)


def test_nan_loss_stops_the_run_naming_the_step(tiny):
    model, sae, tokens = tiny
    with torch.no_grad():
        sae.W_enc[0, 0] = float("nan")
    with pytest.raises(E.TrainingDiverged, match="at step 0.*lower learning rate"):
        E.train_sae(
            model,
            sae,
            E.TrainConfig("e2e", 1.0, HOOK, DOWNSTREAM, steps=2),
            lambda: tokens,
            progress=False,
        )


def test_lr_schedule_warms_up_then_decays_to_ten_percent():
    assert E.lr_at(0, 100, 1.0, 10) == pytest.approx(0.1)
    assert E.lr_at(10, 100, 1.0, 10) == pytest.approx(1.0)
    assert E.lr_at(99, 100, 1.0, 10) == pytest.approx(0.1, abs=1e-3)


def test_dictionary_is_unit_norm_and_export_round_trips(tiny, tmp_path):
    from sae_lens import SAE

    model, sae, tokens = tiny
    with torch.no_grad():
        sae.W_dec.mul_(3.0)
        sae.b_dec.fill_(0.1)
    torch.testing.assert_close(sae.dictionary.norm(dim=-1), torch.ones(sae.d_sae))
    E.export_e2e_sae(sae, tmp_path / "x", HOOK)
    lens = SAE.load_from_disk(tmp_path / "x")
    x = torch.randn(5, sae.d_in)
    torch.testing.assert_close(
        lens.decode(lens.encode(x)), sae(x)[0].detach(), atol=1e-5, rtol=1e-5
    )


def test_max_cosine_within_excludes_self():
    W = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    torch.testing.assert_close(
        E.max_cosine_within(W), torch.tensor([0.7071, 0.7071, 0.7071]), atol=1e-4, rtol=0
    )


def test_committed_table_matches_the_shipped_checkpoints():
    from course_utils.science.models import load_sae

    table = E.load_sweep_table()
    assert {r["variant"] for r in table["rows"]} == set(E.VARIANTS)
    for variant, info in table["shipped"].items():
        assert info["name"] == E.SHIPPED[variant]
        sae = load_sae(info["name"])
        meta = sae.cfg.metadata
        row = next(r for r in table["rows"] if r["variant"] == variant and r["lam"] == info["lam"])
        assert meta.course_evaluation == row
        assert meta.course_recipe["lam"] == info["lam"] and meta.course_recipe["variant"] == variant
        assert meta.hook_name == table["recipe"]["hook_name"]
        assert sae.cfg.d_sae == table["recipe"]["d_sae"] and not sae.cfg.apply_b_dec_to_input
    assert dataclasses.is_dataclass(E.TrainConfig)


def test_downstream_hook_before_the_sae_is_rejected():
    with pytest.raises(ValueError, match="not after the SAE's hook"):
        E.TrainConfig("e2e_ds", 1.0, "blocks.1.hook_resid_pre", ("blocks.0.hook_resid_mid",))
    with pytest.raises(ValueError, match="not after the SAE's hook"):
        E.TrainConfig("e2e_ds", 1.0, "blocks.1.hook_resid_mid", ("blocks.1.hook_resid_mid",))
    E.TrainConfig("e2e_ds", 1.0, "blocks.0.hook_resid_post", ("blocks.1.hook_resid_mid",))


def test_max_cosine_within_bad_input():
    with pytest.raises(ValueError, match="at least two elements"):
        E.max_cosine_within(torch.ones(1, 4))
    with pytest.raises(ValueError, match="all-zero row"):
        E.max_cosine_within(torch.tensor([[1.0, 0.0], [0.0, 0.0]]))


def test_a_stopped_run_resumes_to_the_same_result(tiny, tmp_path):
    """A long CPU build (chapter 04's plateau study) is saved every few steps; a run stopped
    part-way and restarted with the same arguments ends where one uninterrupted run does."""
    model, _, _ = tiny
    windows = random_tokens(model, 12, 8, seed=3)
    cfg = E.TrainConfig("e2e", 1.0, HOOK, DOWNSTREAM, steps=6, log_every=1)

    def run(state_file=None, steps=6):
        sae = E.E2ESAE(model.cfg.d_model, 40, seed=0)
        batches = E.token_batches(windows, 4, seed=0)
        c = dataclasses.replace(cfg, steps=steps)
        hist = E.train_saes(model, [sae], [c], batches, False, state_file=state_file, save_every=2)
        return sae, hist[0]

    whole, whole_hist = run()
    state = tmp_path / "state.pt"
    batches = E.token_batches(windows, 4, seed=0)
    first = E.E2ESAE(model.cfg.d_model, 40, seed=0)

    class Stop(Exception):
        pass

    def stop_after_four():  # the fifth batch request plays the part of a killed process
        stop_after_four.n += 1
        if stop_after_four.n > 4:
            raise Stop
        return batches()

    stop_after_four.n = 0
    with pytest.raises(Stop):
        E.train_saes(model, [first], [cfg], stop_after_four, False, state_file=state, save_every=2)
    assert torch.load(state, weights_only=False)["done"] == 4
    resumed, resumed_hist = run(state)
    assert torch.equal(resumed.W_enc, whole.W_enc) and torch.equal(resumed.W_dec, whole.W_dec)
    assert resumed_hist["loss"] == whole_hist["loss"]
    with pytest.raises(ValueError, match="other settings"):
        run(state, steps=8)


def test_plateau_build_keeps_lengths_measured_with_the_same_recipe(tmp_path):
    """Adding a longer training length to chapter 04's plateau study retrains only that length;
    the rows of lengths already in the table (same recipe but for ``steps``) are kept."""
    table, state = tmp_path / "plateau.json", tmp_path / "state"
    small = {"lams": {"e2e": [8.0]}, "seeds": [0], "eval_windows": 2, "d_sae": 64}
    said: list[str] = []
    first = E.build_plateau(table, {**small, "steps": [2]}, log=said.append, state_dir=state)
    assert [r["steps"] for r in first["rows"]] == [2]
    second = E.build_plateau(table, {**small, "steps": [2, 3]}, log=said.append, state_dir=state)
    assert [r["steps"] for r in second["rows"]] == [2, 3]
    assert second["rows"][0] == first["rows"][0]
    assert any("2 steps: rows measured earlier" in s for s in said)
    assert not any("3 steps: rows measured earlier" in s for s in said)
    assert not (state / "train_3steps.pt").exists()  # a finished length leaves no state behind
