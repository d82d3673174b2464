"""Transcoders: forward/loss formulas, paired activations, training, splicing, SAELens round trip."""

from __future__ import annotations

import pytest
import torch

from course_utils.science import transcoders as T
from course_utils.science.activations import corpus_windows
from course_utils.science.hooks import UnknownHookError
from course_utils.science.models import load_model, shipped_dictionaries


@pytest.fixture(scope="module")
def model():
    torch.set_num_threads(2)
    return load_model("course-2l")


@pytest.fixture(scope="module")
def windows(model):
    return corpus_windows(model, "train")[:48, :32]


def _random(cls=T.Transcoder, n_instances=2, **kwargs):
    tc = cls(128, 64, 128, n_instances, seed=3, **kwargs)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        tc.b_enc.normal_(generator=g)
        tc.b_dec.normal_(generator=g)
        if tc.has_skip:
            tc.W_skip.normal_(0, 0.05, generator=g)
    return tc


@pytest.mark.parametrize("cls", [T.Transcoder, T.SkipTranscoder])
def test_forward_matches_formula_per_instance(cls):
    tc = _random(cls)
    x = torch.randn(5, 128, generator=torch.Generator().manual_seed(0))
    acts, y_hat = tc(x)
    assert acts.shape == (5, 2, 64) and y_hat.shape == (5, 2, 128)
    for i in range(2):
        z = torch.relu(x @ tc.W_enc[i] + tc.b_enc[i])  # no input-side bias
        want = z @ tc.W_dec[i] + tc.b_dec[i]
        if cls is T.SkipTranscoder:
            want = want + x @ tc.W_skip[i].T
        assert torch.allclose(acts[:, i], z, atol=1e-6)
        assert torch.allclose(y_hat[:, i], want, atol=1e-5)
        assert torch.allclose(T.single(tc, i)(x), want, atol=1e-5)


def test_skip_starts_at_zero_and_decoder_rows_unit_norm():
    tc = T.SkipTranscoder(16, 8, 12, 3)
    assert tc.W_skip.shape == (3, 12, 16) and not tc.W_skip.any()
    assert torch.allclose(tc.W_dec.norm(dim=-1), torch.ones(3, 8), atol=1e-6)


def test_loss_is_mse_plus_l1_per_instance():
    tc = _random(l1_coeff=[0.1, 0.5])
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(7, 128, generator=g), torch.randn(7, 128, generator=g)
    out = tc.loss(x, y)
    acts, y_hat = tc(x)
    for i, lam in enumerate((0.1, 0.5)):
        recon = (y_hat[:, i] - y).pow(2).sum(-1).mean()
        want = recon + lam * acts[:, i].abs().sum(-1).mean()
        assert torch.allclose(out["loss"][i], want, rtol=1e-5)


def test_bad_shapes_are_clear():
    tc = _random()
    with pytest.raises(ValueError, match=r"\[batch, 128\]"):
        tc.encode(torch.zeros(3, 64))
    with pytest.raises(ValueError, match="paired"):
        tc.loss(torch.zeros(3, 128), torch.zeros(4, 128))
    with pytest.raises(ValueError, match="target y"):
        tc.loss(torch.zeros(3, 128), torch.zeros(3, 512))
    with pytest.raises(ValueError, match="one per instance"):
        T.Transcoder(8, 4, 8, 2, l1_coeff=[1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="d_sae"):
        T.Transcoder(8, 0)
    with pytest.raises(ValueError, match="out of range"):
        T.single(tc, 2)


def test_hook_pair_validation(model):
    assert T.check_hook_pair(model, *T.hook_pair(1)) == 1
    for hook_in, hook_out in [
        ("blocks.0.hook_resid_mid", "blocks.0.hook_mlp_out"),
        ("blocks.0.hook_mlp_in", "blocks.0.hook_mlp_out"),
        ("blocks.0.ln2.hook_normalized", "blocks.0.mlp.hook_post"),
        ("blocks.0.ln2.hook_normalized", "blocks.0.hook_mlp_in"),
        ("blocks.0.ln2.hook_normalized", "blocks.1.hook_mlp_out"),
    ]:
        with pytest.raises(
            ValueError,
            match=r"expected the pair .*ln2\.hook_normalized.*"
            r"hook_mlp_out",
        ):
            T.check_hook_pair(model, hook_in, hook_out)
    with pytest.raises(UnknownHookError):
        T.check_hook_pair(model, "blocks.0.ln2.hook_normalised", "blocks.0.hook_mlp_out")


def test_paired_store_pairs_come_from_one_pass(model, windows):
    store = T.PairedActivationStore(
        model, *T.hook_pair(1), windows, batch_size=64, buffer_tokens=512, progress=False
    )
    x, y = store.next_pair()
    assert x.shape == y.shape == (64, 128)
    ln2 = model.blocks[1].ln2
    with torch.no_grad():  # the target really is the MLP of the input, row by row (after shuffling)
        mlp = model.blocks[1].mlp(x * ln2.w + ln2.b)
    assert torch.allclose(mlp, y, atol=1e-4)
    with pytest.raises(ValueError, match="expected the pair"):
        T.PairedActivationStore(model, "blocks.1.hook_resid_mid", "blocks.1.hook_mlp_out", windows)


def test_training_lowers_the_loss_and_keeps_unit_decoder(model, windows):
    store = T.PairedActivationStore(
        model, *T.hook_pair(0), windows, batch_size=128, buffer_tokens=1024, progress=False
    )
    tc = T.SkipTranscoder(128, 128, 128, 2, l1_coeff=[1e-3, 1e-1])
    history = T.train_transcoder(tc, store.next_pair, 40, lr=3e-3, log_every=39, progress=False)
    assert (history["loss"][-1] < history["loss"][0]).all()
    assert torch.allclose(tc.W_dec.norm(dim=-1), torch.ones(2, 128), atol=1e-5)
    assert history["l0"][-1][1] < history["l0"][-1][0]  # larger L1, sparser
    assert tc.W_skip.abs().sum() > 0


def test_splice_matches_manual_replacement_and_both_layers(model):
    tokens = corpus_windows(model, "validation")[:2, :24]
    tc0, tc1 = T.single(_random(T.SkipTranscoder), 1), T.single(_random(), 0)
    stash = {}
    manual = model.run_with_hooks(
        tokens,
        return_type="loss",
        fwd_hooks=[
            ("blocks.0.ln2.hook_normalized", lambda a, hook: stash.update(x=a)),
            ("blocks.0.hook_mlp_out", lambda a, hook: tc0(stash["x"])),
        ],
    ).item()
    assert T.ce_loss_with_transcoders(model, tokens, {0: tc0}) == pytest.approx(manual, abs=1e-5)
    numbers = T.evaluate_transcoders(model, tokens, {0: tc0, 1: tc1})
    assert numbers["ce_transcoders"] != pytest.approx(numbers["ce_clean"])
    assert {"l0_0", "l0_1", "fvu_0", "fvu_1", "kl", "ce_recovered_zero"} <= set(numbers)


def test_width_mismatch_names_hooks_and_shapes(model):
    small = T.Transcoder(64, 32, 128)
    tokens = torch.zeros(1, 4, dtype=torch.long)
    with pytest.raises(ValueError, match=r"64\].*ln2\.hook_normalized.*width 128"):
        T.ce_loss_with_transcoders(model, tokens, {0: small})
    with pytest.raises(ValueError, match="non-empty dict"):
        T.transcoder_hooks(model, [small])


@pytest.mark.parametrize("cls", [T.Transcoder, T.SkipTranscoder])
def test_saelens_round_trip(tmp_path, model, cls):
    from sae_lens import SkipTranscoder as LensSkip

    tc = _random(cls)
    T.export_transcoder(tc, tmp_path / "tc", instance=1, layer=1, model=model)
    lens = T.load_transcoder(tmp_path / "tc")
    assert isinstance(lens, LensSkip) == (cls is T.SkipTranscoder)
    meta = lens.cfg.metadata
    assert (meta.hook_name, meta.hook_name_out, meta.model_name) == (
        "blocks.1.ln2.hook_normalized",
        "blocks.1.hook_mlp_out",
        "course-2l",
    )
    x = torch.randn(9, 128, generator=torch.Generator().manual_seed(0)) * 3
    ours = T.single(tc, 1)
    with torch.no_grad():
        assert torch.equal(lens.encode(x), ours.encode(x))
        assert torch.allclose(lens(x), ours(x), atol=1e-6)
    tokens = corpus_windows(model, "validation")[:1, :16]
    assert T.ce_loss_with_transcoders(model, tokens, {1: lens}) == pytest.approx(
        T.ce_loss_with_transcoders(model, tokens, {1: ours}), abs=1e-5
    )


def test_load_transcoder_rejects_non_transcoders(tmp_path):
    from course_utils.science import saelens_io as IO
    from course_utils.science import saes as S

    IO.export_sae(S.ReLUSAE(128, 16), tmp_path / "sae")
    with pytest.raises(ValueError, match="not a transcoder"):
        T.load_transcoder(tmp_path / "sae")
    with pytest.raises(FileNotFoundError, match="cfg.json"):
        T.load_transcoder(tmp_path / "nothing")


def test_multi_hook_store_keeps_rows_aligned(model, windows):
    store = T.MultiHookStore(
        model,
        [*T.hook_pair(0), *T.hook_pair(1)],
        windows,
        batch_size=32,
        buffer_tokens=256,
        progress=False,
    )
    x0, y0, x1, y1 = store.next_split()
    assert x0.shape == y1.shape == (32, 128)
    ln2 = model.blocks[0].ln2
    with torch.no_grad():
        assert torch.allclose(model.blocks[0].mlp(x0 * ln2.w + ln2.b), y0, atol=1e-4)


@pytest.mark.skipif(
    not set(T.REFERENCE_NAMES.values()) <= set(shipped_dictionaries()),
    reason="reference transcoders not built",
)
def test_shipped_transcoders_fit_the_course_model(model):
    from course_utils.science.models import load_sae

    for layer in (0, 1):
        tc = load_sae(T.REFERENCE_NAMES[f"tc{layer}"])
        T.check_fits(model, tc, layer)
        assert tc.cfg.metadata.hook_name_out == T.hook_pair(layer)[1]
        sae = load_sae(T.REFERENCE_NAMES[f"sae{layer}"])
        assert sae.cfg.metadata.hook_name == T.hook_pair(layer)[1]
        assert sae.cfg.d_sae == tc.cfg.d_sae == T.REFERENCE["d_sae"]


@pytest.mark.slow
def test_build_transcoders_end_to_end(tmp_path):
    results = T.build_reference_transcoders(
        tmp_path, {"steps": 3, "eval_windows": 4}, log=lambda line: None
    )
    assert set(results) == set(T.REFERENCE_NAMES.values()) | {"both"}
    assert {p.name for p in tmp_path.iterdir()} == set(T.REFERENCE_NAMES.values()) | {T.SWEEP_TABLE}
    rows = T.read_sweep_table(tmp_path / T.SWEEP_TABLE)
    n = sum(len(c) for per_layer in T.REFERENCE["sweep"].values() for c in per_layer)
    assert len(rows) == n and set(rows[0]) == set(T.SWEEP_COLUMNS)
    assert all(
        r["ce_increase"] == pytest.approx(r["ce_spliced"] - r["ce_clean"], abs=1e-4) for r in rows
    )


def test_wrong_layer_is_named_from_saelens_metadata(tmp_path, model):
    lens = T.to_saelens(_random(n_instances=1), layer=0)
    tokens = torch.zeros(1, 4, dtype=torch.long)
    with pytest.raises(
        ValueError,
        match=r"trained on 'blocks\.0\.ln2\.hook_normalized'.*"
        r"MLP 1.*blocks\.1\.ln2\.hook_normalized",
    ):
        T.ce_loss_with_transcoders(model, tokens, {1: lens})
    T.ce_loss_with_transcoders(model, tokens, {0: lens})  # the right layer works


def test_transcoder_pair_reference_and_bad_layer(model, windows):
    x, y = T.transcoder_pair(model, windows[:2, :8], 1)
    _, cache = model.run_with_cache(windows[:2, :8])
    assert torch.equal(x, cache["blocks.1.ln2.hook_normalized"])
    assert torch.equal(y, cache["blocks.1.hook_mlp_out"])
    with pytest.raises(ValueError, match=r"layer must be an int in \[0, 2\)"):
        T.transcoder_pair(model, windows[:1, :4], 2)


def test_functional_references_agree_with_the_module():
    tc = _random(T.SkipTranscoder, n_instances=1)
    one = T.single(tc)
    x = torch.randn(5, 128, generator=torch.Generator().manual_seed(0))
    z, y_hat = T.skip_transcoder_forward(x, one.W_enc, one.b_enc, one.W_dec, one.b_dec, one.W_skip)
    assert torch.allclose(z, one.encode(x), atol=1e-5)
    assert torch.allclose(y_hat, one(x), atol=1e-5)
    y = torch.randn(5, 128)
    loss = T.transcoder_loss(x, y, one.W_enc, one.b_enc, one.W_dec, one.b_dec, 0.3)
    plain = T.Transcoder(128, 64, 128, 1, seed=3, l1_coeff=0.3)
    plain.load_state_dict(
        {k: v for k, v in tc.state_dict().items() if k not in ("W_skip", "l1_coeff")}, strict=False
    )
    assert loss.item() == pytest.approx(plain.loss(x, y)["loss"].item(), rel=1e-5)


def test_sweep_table_round_trip_and_missing_file(tmp_path):
    row = {
        "family": "tc",
        "layer": 1,
        "l1_coeff": 1.0,
        "l0": 20.5,
        "fvu": 0.3,
        "ce_clean": 3.5,
        "ce_spliced": 3.6,
        "ce_increase": 0.1,
        "ce_recovered_zero": 0.9,
        "kl": 0.1,
        "dead_fraction": 0.0,
    }
    path = T.write_sweep_table([row], tmp_path / "s.csv")
    assert T.read_sweep_table(path) == [row]
    with pytest.raises(FileNotFoundError, match="build-transcoders"):
        T.read_sweep_table(tmp_path / "missing.csv")


def test_pareto_table_round_trip_and_missing_file(tmp_path):
    row = {"steps": 600, "seed": 1000, "family": "skip", "layer": 0, "l1_coeff": 3.0, "l0": 20.5, "fvu": 0.3,
           "ce_clean": 3.5, "ce_spliced": 3.6, "ce_increase": 0.1, "ce_recovered_zero": 0.9,
           "kl": 0.1, "dead_fraction": 0.0}  # fmt: skip
    path = T.write_sweep_table([row], tmp_path / "p.csv", T.PARETO_COLUMNS)
    assert T.read_pareto_table(path) == [row]
    with pytest.raises(FileNotFoundError, match="build-transcoder-pareto"):
        T.read_pareto_table(tmp_path / "missing.csv")


def test_pareto_recipe_trains_every_family_alike():
    """The comparison is only fair if the families share coefficients, steps and clipping."""
    sweep = T.PARETO["sweep"]
    assert set(sweep) == {"tc", "sae", "skip"}
    assert sweep["tc"] == sweep["sae"] == sweep["skip"]
    assert T.PARETO["max_grad_norm"] is not None and len(T.PARETO["seeds"]) >= 2


def test_shared_batch_training_clips_each_instance(model, windows, monkeypatch):
    """max_grad_norm clips each instance on its own norm (a big-coefficient instance must not
    shrink its neighbour's step); None never clips; a module without instances (a cross-layer
    transcoder is one dictionary) is clipped as a whole."""
    import course_utils.science.lm_saes as LS

    store = T.MultiHookStore(model, list(T.hook_pair(0)), windows, batch_size=64,
                             buffer_tokens=512, progress=False)  # fmt: skip
    batch = store.next_split()
    calls, clip = [], LS.clip_grad_norm_per_instance

    def recording_clip(params, max_norm):
        calls.append((max_norm, clip(params, max_norm)))
        return calls[-1][1]

    monkeypatch.setattr(LS, "clip_grad_norm_per_instance", recording_clip)
    for max_grad_norm in (None, 0.5):
        tc = T.Transcoder(128, 64, 128, 2, l1_coeff=[0.1, 10.0], seed=0)
        T.train_on_shared_batches({"tc": (tc, lambda b: (b[0], b[1]))}, lambda: batch, 2, 1e-3,
                                  lambda _: None, max_grad_norm)  # fmt: skip
    assert len(calls) == 2 and all(m == 0.5 for m, _ in calls)  # two steps, only when asked
    assert calls[0][1].shape == (2,)  # one norm per instance
    from course_utils.science import clt as C

    clt_batch = C.multi_hook_store(model, windows, batch_size=64, buffer_tokens=512,
                                   progress=False).next_split()  # fmt: skip
    whole, real = [], torch.nn.utils.clip_grad_norm_

    def recording_whole(params, max_norm):
        whole.append(max_norm)
        return real(params, max_norm)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", recording_whole)
    cross = C.CrossLayerTranscoder(model.cfg.n_layers, model.cfg.d_model, 32, seed=0)
    T.train_on_shared_batches({"clt": (cross, C.clt_batch_args)}, lambda: clt_batch, 2, 1e-3,
                              lambda _: None, 0.5)  # fmt: skip
    assert whole == [0.5, 0.5] and len(calls) == 2  # the CLT as a whole, never per instance
