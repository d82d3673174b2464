"""course_utils.science.interventions: exact edits, no hooks left, attribution vs ablation, circuits,
clear errors, and the online steering path run on local files."""

from __future__ import annotations

import pytest
import torch

from course_utils.checks.ch06 import tiny_sae
from course_utils.science import interventions as I
from course_utils.science.models import random_tokens, tiny_random_model

pytestmark = pytest.mark.usefixtures("one_thread")

HOOK = "blocks.0.hook_resid_post"


@pytest.fixture(scope="module")
def parts():
    model = tiny_random_model(seed=0).requires_grad_(False)
    return model, tiny_sae(), random_tokens(model, batch=3, seq=10, seed=2)


def test_identity_edit_with_error_is_the_clean_model(parts):
    model, sae, tokens = parts
    with torch.no_grad():
        clean = model(tokens)
        same = I.run_with_feature_edit(model, sae, tokens, HOOK, lambda f: f)
        dropped = I.run_with_feature_edit(model, sae, tokens, HOOK, lambda f: f, keep_error=False)
    assert (same - clean).abs().max() < 1e-5
    assert (dropped - clean).abs().max() > 1e-2
    assert I.hooks_left(model) == []


def test_ablation_equals_subtracting_the_decoder_row(parts):
    model, sae, tokens = parts
    feature = 5

    def subtract(a, hook):
        return a - sae.encode(a)[..., feature : feature + 1] * sae.W_dec[feature]

    with torch.no_grad():
        ours = I.edited_logits(model, sae, tokens, HOOK, feature, "ablate")
        direct = model.run_with_hooks(tokens, fwd_hooks=[(HOOK, subtract)])
    assert (ours - direct).abs().max() < 1e-5


def test_clamping_an_inactive_feature_equals_adding(parts):
    model, sae, tokens = parts
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=HOOK)
        acts = sae.encode(cache[HOOK])
    dead = int((acts[:, 1:] > 0).sum((0, 1)).argmin())
    if (acts[..., dead] > 0).any():
        pytest.skip("every feature fires somewhere on these tokens")
    with torch.no_grad():
        clamped = I.edited_logits(model, sae, tokens, HOOK, dead, "clamp", 2.0)
        added = I.edited_logits(model, sae, tokens, HOOK, dead, "add", 2.0)
    assert (clamped - added).abs().max() < 1e-5


def test_bad_input_gets_clear_errors(parts):
    model, sae, tokens = parts
    with pytest.raises(ValueError, match=r"valid indices are 0\.\.23"):
        I.edited_logits(model, sae, tokens, HOOK, 24)
    with pytest.raises(ValueError, match="trained on 'blocks.0.hook_resid_post'"):
        I.steered_logits(model, tokens, "blocks.1.hook_resid_pre", sae.W_dec[0], 1.0, sae=sae)
    with pytest.raises(KeyError, match="no hook named"):
        I.steered_logits(model, tokens, "blocks.0.hook_resid", sae.W_dec[0], 1.0)
    with pytest.raises(FloatingPointError, match="smaller coefficient"):
        I.steered_logits(model, tokens, HOOK, sae.W_dec[0], float("inf"))
    with pytest.raises(ValueError, match="mode must be one of"):
        I.edit_feature(torch.zeros(2, 3), 0, "zero")
    with pytest.raises(ValueError, match="both positive and negative"):
        I.mean_difference_vector(torch.zeros(4, 3), torch.ones(4, dtype=torch.bool))
    assert I.hooks_left(model) == []


def test_hooks_left_sees_add_hook(parts):
    model, _, tokens = parts
    model.add_hook(HOOK, lambda a, hook: a)
    try:
        assert I.hooks_left(model) == [HOOK]
    finally:
        model.reset_hooks()
    assert I.hooks_left(model) == []


def _metric(logits):
    return logits[:, -1, 3] - logits[:, -1, 9]


def test_attribution_is_exact_for_tiny_edits_and_ig_for_single_features(parts):
    model, sae, tokens = parts
    f, attr = I.attribution_patching(model, sae, tokens, HOOK, _metric)
    index, exact = I.exact_ablation_effects(model, sae, tokens, HOOK, _metric)
    assert len(index) == int((f[:, 1:] > 0).sum())
    est = attr[index[:, 0], index[:, 1], index[:, 2]]
    assert I.spearman(est, exact) > 0.8
    single = I.single_feature_ig(model, sae, tokens, HOOK, _metric, index, steps=20)
    assert (single - exact).abs().mean() < (est - exact).abs().mean()
    assert I.hooks_left(model) == []


def test_rank_and_spearman():
    assert I.rank(torch.tensor([3.0, 1.0, 2.0])).tolist() == [2.0, 0.0, 1.0]
    assert I.rank(torch.tensor([1.0, 1.0, 5.0])).tolist() == [0.5, 0.5, 2.0]
    assert I.spearman(torch.arange(5.0), torch.arange(5.0) ** 3) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="equal-length"):
        I.pearson(torch.zeros(3), torch.zeros(4))


def test_feature_circuit_end_points_and_node_effects(parts):
    model, sae, tokens = parts
    sae1 = tiny_sae(hook_name="blocks.1.hook_resid_pre", seed=3)
    fc = I.FeatureCircuit(model, {HOOK: sae, "blocks.1.hook_resid_pre": sae1}, tokens, _metric)
    everything = {h: torch.ones(tokens.shape[1], s.W_dec.shape[0] + 1, dtype=torch.bool)
                  for h, s in fc.saes.items()}  # fmt: skip
    assert torch.allclose(fc.run(everything), fc.clean, atol=1e-4)
    f_all, c_all = fc.faithfulness(everything)
    assert f_all == pytest.approx(1.0, abs=1e-4) and c_all == pytest.approx(0.0, abs=1e-4)
    effects = fc.node_effects("atp")
    assert set(effects) == set(fc.hooks)
    assert effects[HOOK].shape == (tokens.shape[1], sae.W_dec.shape[0] + 1)
    # with ONE dictionary, IG's node effects add up (completeness axiom) to the true effect of
    # mean-ablating every node, up to the Riemann sum's error. (With two, each upstream node
    # also gets the downstream nodes' share through the pass-through gradient: no sum rule.)
    single = I.FeatureCircuit(model, {HOOK: sae}, tokens, _metric)
    ig = single.node_effects("ig", steps=64)
    total_ig = ig[HOOK].sum().item()
    true_total = (single.run(None) - single.clean).mean().item()
    assert abs(total_ig - true_total) < 0.05 * abs(true_total) + 1e-3
    with pytest.raises(ValueError, match="method must be"):
        fc.node_effects("exact")
    assert I.hooks_left(model) == []


def test_tokens_html_escapes_and_checks_lengths():
    out = I.tokens_html(["<a>", " b"], [1.0, 0.0], [0.5, -0.5])
    assert "&lt;a&gt;" in out and "border-bottom" in out
    with pytest.raises(ValueError, match="2 tokens but 1 values"):
        I.tokens_html(["a", "b"], [1.0])


def test_generate_greedy_is_deterministic_and_sampling_is_seeded(parts):
    model, _, tokens = parts
    a = I.generate(model, tokens[:1, :4], 5)
    b = I.generate(model, tokens[:1, :4], 5)
    assert torch.equal(a, b) and a.shape == (1, 9)
    s1 = I.generate(model, tokens[:1, :4], 5, temperature=1.0, seed=3)
    s2 = I.generate(model, tokens[:1, :4], 5, temperature=1.0, seed=3)
    assert torch.equal(s1, s2)


def test_online_steering_path_runs_on_local_files(tmp_path):
    """The GPT-2 bonus's code, run on the course model and an SAE folder this test writes."""
    from course_utils.science.models import load_model, load_sae

    model = load_model("course-2l")
    sae = tiny_sae(d_in=model.cfg.d_model, d_sae=64, hook_name=HOOK, seed=4)
    sae.save_model(tmp_path / "sae")
    loaded = load_sae(str(tmp_path / "sae"))
    demo = I.steering_demo(model, loaded, "    def __init__(", "    def __init__(self",
                           multiples=(0, 50), n_new=6)  # fmt: skip
    assert demo["hook_name"] == HOOK and 0 <= demo["feature"] < 64
    assert set(demo["texts"]) == {0, 50}
    assert demo["texts"][0] != demo["texts"][50]
    assert I.hooks_left(model) == []


def test_online_bonus_is_skipped_with_one_line_offline(monkeypatch):
    from course_utils.science.models import NetworkRequiredError, load_sae

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(NetworkRequiredError):
        load_sae("gpt2-small-res-jb", "blocks.8.hook_resid_pre")


def test_single_feature_ig_grids_are_quadrature_rules(parts):
    """By completeness single-feature IG is the exact ablation up to quadrature error: the
    midpoint rule converges faster than either endpoint rule, and one left step IS attribution
    patching (Marks et al.'s grid starts at the clean point)."""
    model, sae, tokens = parts
    f, attr = I.attribution_patching(model, sae, tokens, HOOK, _metric)
    index, exact = I.exact_ablation_effects(model, sae, tokens, HOOK, _metric)
    one_left = I.single_feature_ig(model, sae, tokens, HOOK, _metric, index, steps=1, grid="left")
    assert torch.allclose(one_left, attr[index[:, 0], index[:, 1], index[:, 2]], atol=1e-5)
    err = {
        g: (I.single_feature_ig(model, sae, tokens, HOOK, _metric, index, steps=8, grid=g) - exact)
        .abs()
        .mean()
        for g in ("left", "right", "midpoint")
    }
    assert err["midpoint"] < min(err["left"], err["right"])
    with pytest.raises(ValueError, match="grid must be"):
        I.single_feature_ig(model, sae, tokens, HOOK, _metric, index, grid="trapezoid")


def test_clean_corrupt_attribution_tracks_activation_patching(parts):
    model, sae, tokens = parts
    corrupt = tokens.roll(1, dims=0)
    est = I.clean_corrupt_attribution(model, sae, tokens, corrupt, HOOK, _metric)
    assert not est.requires_grad
    index, exact = I.exact_patch_effects(model, sae, tokens, corrupt, HOOK, _metric)
    assert len(index) > 0
    assert I.spearman(est[index[:, 0], index[:, 1], index[:, 2]], exact) > 0.5
    same, none = I.exact_patch_effects(model, sae, tokens, tokens.clone(), HOOK, _metric)
    assert len(same) == 0 and len(none) == 0
    zero = I.clean_corrupt_attribution(model, sae, tokens, tokens.clone(), HOOK, _metric)
    assert zero.abs().max() == 0
    assert I.hooks_left(model) == []


def test_feature_circuit_ig_one_dictionary_at_a_time(parts):
    model, sae, tokens = parts
    one = I.FeatureCircuit(model, {HOOK: sae}, tokens, _metric)
    a, b = one.node_effects("ig", steps=4), one.node_effects("ig", steps=4, joint=True)
    assert torch.allclose(a[HOOK], b[HOOK], atol=1e-6)  # one dictionary: the same thing
    sae1 = tiny_sae(hook_name="blocks.1.hook_resid_post", seed=3)
    two = I.FeatureCircuit(model, {HOOK: sae, "blocks.1.hook_resid_post": sae1}, tokens, _metric)
    per, joint = two.node_effects("ig", steps=4), two.node_effects("ig", steps=4, joint=True)
    assert not torch.allclose(per[HOOK], joint[HOOK], atol=1e-6)
    # the later dictionary, moved alone, sees the earlier one clean: its effects add up to the
    # true effect of mean-ablating it alone, up to quadrature error
    later = I.FeatureCircuit(model, {"blocks.1.hook_resid_post": sae1}, tokens, _metric)
    fine = later.node_effects("ig", steps=64)["blocks.1.hook_resid_post"].sum().item()
    true = (later.run(None) - later.clean).mean().item()
    assert abs(fine - true) < 0.05 * abs(true) + 1e-3
    assert I.hooks_left(model) == []
