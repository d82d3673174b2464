"""Chapter 10's science module: ground-truth data and metrics, BatchTopK / Matryoshka, absorption,
sparse probing, the shipped Pareto table; one clear error for each kind of bad input."""

from __future__ import annotations

import pytest
import torch

from course_utils.science import sae_eval as E

pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------- ground truth


def test_children_fire_only_inside_their_parent_and_siblings_exclude_each_other():
    data = E.HierarchicalFeatureData()
    x, f = data.sample(20000)
    active = f > 0
    assert torch.allclose(x, f @ data.directions)
    for parent, child in data.parent_child_pairs:
        assert not (active[:, child] & ~active[:, parent]).any()
        rate = active[active[:, parent], child].float().mean().item()
        assert abs(rate - data.child_probability) < 0.05, (parent, child, rate)
    c = data.children_per_parent
    for p in range(data.n_parents):
        kids = active[:, data.n_parents + p * c : data.n_parents + (p + 1) * c]
        assert (kids.sum(-1) <= 1).all()
    assert 2.5 < active.float().sum(-1).mean() < 5


def test_bad_generator_settings_fail_clearly():
    with pytest.raises(ValueError, match="need"):
        E.HierarchicalFeatureData(n_features=10, n_parents=8)
    with pytest.raises(ValueError, match="exclusive"):
        E.HierarchicalFeatureData(child_probability=0.6)


def test_matching_is_one_to_one_and_mcc_is_1_for_the_truth_up_to_sign_and_order():
    F = E.HierarchicalFeatureData().directions
    perm = torch.randperm(len(F), generator=torch.Generator().manual_seed(0))
    W = F[perm] * torch.where(torch.arange(len(F)) % 2 == 0, -2.0, 0.5)[:, None]
    latents, feats, cos = E.match_latents(W, F)
    assert torch.equal(perm[latents], feats) and torch.allclose(cos, torch.ones_like(cos))
    assert E.mcc(W, F) == pytest.approx(1.0)
    assert len(E.match_latents(W[:10], F)[0]) == 10  # fewer latents than features


def test_metric_inputs_of_the_wrong_width_fail_clearly():
    F = torch.randn(5, 4)
    with pytest.raises(ValueError, match="same d"):
        E.match_latents(torch.randn(6, 3), F)
    with pytest.raises(ValueError, match="instance"):
        E.mcc(torch.randn(2, 6, 4), F)
    with pytest.raises(ValueError, match="same samples"):
        E.latent_f1(torch.rand(10, 6), torch.rand(9, 5), torch.randn(6, 4), F)


def test_f1_of_a_perfect_encoder_is_one_and_dead_latents_score_zero():
    data = E.HierarchicalFeatureData()
    _, f = data.sample(4000)
    W = torch.cat([data.directions, data.directions[:1]])
    acts = torch.cat([f, torch.zeros(len(f), 1)], dim=1)  # latent 64: a dead copy of feature 0
    precision, recall, f1 = E.latent_f1(acts, f, W, data.directions)
    assert torch.allclose(f1[:64], torch.ones(64)) and f1[64] == 0 and precision[64] == 0
    assert recall[64] == 0


# ----------------------------------------------------------------------------- architectures


@pytest.mark.parametrize("k", [0, -1, 9])
def test_k_outside_the_dictionary_fails_clearly(k):
    with pytest.raises(ValueError, match=r"k must be in \(0, d_sae=8\]"):
        E.batchtopk(torch.randn(4, 1, 8), k)
    with pytest.raises(ValueError, match="k must be"):
        E.BatchTopKSAE(3, 8, 1, k=k)


def test_batchtopk_keeps_k_per_token_on_average_and_varies_per_token():
    pre = torch.randn(32, 2, 16, generator=torch.Generator().manual_seed(0))
    acts = E.batchtopk(pre, torch.tensor([3.0, 2.5]))
    l0 = (acts > 0).float().sum(-1)
    assert l0[:, 0].mean() == 3 and l0[:, 1].mean() == 2.5  # int(k * 32) / 32
    assert l0[:, 0].min() < 3 < l0[:, 0].max()
    assert torch.equal(E.batchtopk(pre[:1], 16.0), torch.relu(pre[:1]))  # a batch of one, k = d


def test_the_threshold_moves_towards_the_smallest_kept_activation_and_is_used_in_eval():
    sae = E.BatchTopKSAE(6, 12, 2, k=2, seed=0, threshold_lr=0.5)
    x = torch.randn(64, 6)
    out = sae.loss(x)
    smallest = out["acts"].masked_fill(out["acts"] <= 0, float("inf")).amin(dim=(0, 2))
    assert torch.allclose(sae.threshold, 0.5 * smallest.double())
    sae.eval()
    pre = sae.pre_acts(sae._as_batch(x))
    assert torch.equal(sae.encode(x), pre * (pre > sae.threshold.float()[:, None]))
    sae.train()
    before = sae.threshold.clone()
    sae.eval()
    sae.loss(x)
    assert torch.equal(sae.threshold, before)  # no update outside training


@pytest.mark.parametrize(
    "prefixes, match",
    [([8, 4, 16], "strictly increasing"), ([4, 4, 16], "strictly increasing"),
     ([0, 16], "positive"), ([4, 8], "full width d_sae=16"), ([], "positive")],
)  # fmt: skip
def test_bad_matryoshka_prefixes_fail_clearly(prefixes, match):
    with pytest.raises(ValueError, match=match):
        E.check_prefixes(prefixes, 16)
    with pytest.raises(ValueError, match=match):
        E.MatryoshkaSAE(4, 16, prefixes)


def test_matryoshka_with_one_prefix_is_batchtopk_and_adds_the_inner_levels():
    x = torch.randn(50, 5)
    plain = E.BatchTopKSAE(5, 10, 1, k=2, seed=3)
    one = E.MatryoshkaSAE(5, 10, [10], 1, k=2, seed=3)
    nested = E.MatryoshkaSAE(5, 10, [2, 5, 10], 1, k=2, seed=3)
    assert torch.allclose(plain.loss(x)["loss"], one.loss(x)["loss"])
    out = nested.loss(x)
    inner = E.matryoshka_loss(
        nested._as_batch(x), out["acts"], nested.W_dec, nested.b_dec, [2, 5, 10]
    )
    assert torch.allclose(out["loss"], inner) and (inner > out["reconstruction"]).all()


def test_training_on_fixed_batches_repeats_exactly_and_learns():
    data = E.HierarchicalFeatureData()
    batches = [data.sample(256)[0] for _ in range(150)]
    runs = []
    for _ in range(2):
        sae = E.MatryoshkaSAE(32, 64, [8, 64], 2, k=4, seed=1)
        E.train_dictionary(sae, batches, lr=3e-3)
        runs.append(sae.W_dec.detach().clone())
    assert torch.equal(runs[0], runs[1]) and not sae.training
    assert E.mcc(runs[0][0], data.directions) > 0.5


def test_saelens_batchtopk_on_the_same_batches_comes_back_as_a_jumprelu_sae():
    data = E.HierarchicalFeatureData()
    batches = [data.sample(128)[0] for _ in range(30)]
    theirs = E.train_saelens("batchtopk", batches, 16, 2.0, init_from=E.BatchTopKSAE(32, 16, k=2))
    assert theirs.cfg.architecture() == "jumprelu" and float(theirs.threshold[0].detach()) > 0
    with pytest.raises(ValueError, match="topk, batchtopk or matryoshka"):
        E.train_saelens("gated", batches, 16, 2.0)
    with pytest.raises(ValueError, match="full width"):
        E.train_saelens("matryoshka", batches, 16, 2.0, prefixes=[4, 8])


def test_an_sae_of_the_wrong_width_for_the_hook_fails_clearly():
    from course_utils.science.lm_saes import evaluate_splice, single
    from course_utils.science.models import load_model

    model = load_model("course-2l")
    tokens = torch.zeros(1, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="d_in=512 but the activation"):
        evaluate_splice(
            model, single(E.BatchTopKSAE(512, 64, k=4)), tokens, "blocks.0.hook_resid_post"
        )


# ----------------------------------------------------------------------------- absorption


def test_absorption_rate_is_one_for_an_absorbed_parent_and_zero_for_the_truth():
    data = E.HierarchicalFeatureData()
    _, f = data.sample(6000)
    F = data.directions
    parent, child = data.parent_child_pairs[0]
    perfect = E.absorption_rate(f, f, F, F, [(parent, child)])
    assert perfect == {
        "absorption_rate": 0.0,
        "miss_rate_without_child": 0.0,
        "matched_excess": 0.0,
    }
    acts, W = f.clone(), F.clone()
    acts[f[:, child] > 0, parent] = 0.0  # the parent latent has a hole where the child fires
    W[child] = F[parent] + F[child]  # and the child latent's decoder carries the parent
    absorbed = E.absorption_rate(acts, f, W, F, [(parent, child)])
    assert absorbed["absorption_rate"] == 1.0 and absorbed["miss_rate_without_child"] == 0.0
    # Negative control: the same hole with no absorber (no other latent carries the parent's
    # direction above chance) is a miss, not absorption; the matched excess still sees the miss.
    missed = E.absorption_rate(acts, f, F, F, [(parent, child)])
    assert missed["absorption_rate"] < 0.1 and missed["matched_excess"] > 0.9


def test_parent_latent_is_chosen_by_firing_not_by_decoder_direction():
    data = E.HierarchicalFeatureData()
    _, f = data.sample(4000)
    parent, child = data.parent_child_pairs[0]
    acts = torch.zeros(len(f), 3)
    acts[:, 2] = f[:, parent]  # fires exactly with the parent
    acts[:, 0] = f[:, child]  # fires only with the child
    assert E.parent_latents(acts, f, [parent]) == [2]


def test_batchtopk_rounds_k_times_batch_down_in_float64_as_saelens():
    pre = torch.rand(10, 1, 5) + 0.1  # all positive
    assert (E.batchtopk(pre, 0.7) > 0).sum().item() == int(0.7 * 10) == 7


# ----------------------------------------------------------------------------- sparse probing


def test_probe_selection_and_bad_labels():
    acts = torch.randn(200, 6)
    labels = acts[:, 4] > 0.5
    assert E.top_k_by_mean_difference(acts, labels, 1).tolist() == [4]
    with pytest.raises(ValueError, match="one label per row"):
        E.top_k_by_mean_difference(acts, labels[:-1], 2)
    for k in (0, 7):
        with pytest.raises(ValueError, match=r"k must be in \[1, 6\]"):
            E.top_k_by_mean_difference(acts, labels, k)
    with pytest.raises(ValueError, match="both classes"):
        E.top_k_by_mean_difference(acts, torch.ones(200, dtype=torch.bool), 2)
    with pytest.raises(ValueError, match="test labels"):
        E.sparse_probe_accuracy(acts, labels, acts, labels[:-3], 1)
    accuracy = E.sparse_probe_accuracy(acts[:100], labels[:100], acts[100:], labels[100:], 1)
    assert accuracy > 0.85  # the one informative dimension, chosen on the training half


def test_the_shipped_pareto_table_has_every_architecture_at_three_sparsities():
    table = E.read_pareto_table()
    archs = [r["architecture"] for r in table]
    assert sorted(set(archs)) == ["BatchTopK", "JumpReLU", "Matryoshka", "ReLU-L1", "TopK"]
    assert all(archs.count(a) == 3 for a in set(archs))
    assert all(0 < r["fvu"] < 1.5 and r["l0"] > 0 for r in table)


# ----------------------------------------------------------------------------- the online bonus


def test_dictionary_report_on_a_local_saelens_folder_matches_the_sweep_numbers():
    """The bonus's function, on local files: the shipped SAE read from its folder."""
    from course_utils.assets import ASSETS_DIR
    from course_utils.science.activations import corpus_windows
    from course_utils.science.models import load_model, load_sae_folder

    model = load_model("course-2l")
    sae = load_sae_folder(ASSETS_DIR / "saes" / "course-2l-res0-seed0")
    tokens = corpus_windows(model, "validation")[:4]
    report = E.dictionary_report(model, sae, tokens, "blocks.0.hook_resid_post")
    assert report["delta_ce"] == pytest.approx(report["ce_sae"] - report["ce_clean"])
    assert 0 <= report["dense_fraction"] <= 1 and 0 < report["fvu"] < 1 and report["l0"] > 1
    with pytest.raises(ValueError, match="d_in=128 but the activation"):
        E.dictionary_report(model, sae, tokens, "blocks.0.mlp.hook_post")


def test_the_public_sae_of_the_bonus_is_one_clear_error_offline(monkeypatch):
    from course_utils.science.feature_analysis import load_gelu_1l_sae
    from course_utils.science.models import NetworkRequiredError

    monkeypatch.setenv("COURSE_OFFLINE", "1")
    with pytest.raises(NetworkRequiredError, match="needs a network connection"):
        load_gelu_1l_sae("run1")


# ------------------------------------------------------------ probe-based absorption (section 7)
def _absorption_setup():
    probe = torch.tensor([1.0, 0.0, 0.0])
    W_dec = torch.tensor(
        [
            [1.0, 0.0, 0.0],  # 0: the main latent, along the probe
            [0.6, 0.8, 0.0],  # 1: an absorber (cos 0.6)
            [0.05, 0.0, 1.0],
        ]
    )  # 2: barely aligned (cos < 0.1): never an absorber
    return probe, W_dec


def test_absorption_fraction_cases():
    probe, W_dec = _absorption_setup()
    x = torch.tensor([[2.0, 0, 0]] * 5)
    acts = torch.tensor(
        [
            [2.0, 0.0, 0.0],  # the main latent carries all of x.p: 0
            [0.0, 2.0, 0.0],  # main silent, absorber carries 1.2 >= 0.4 * 2: 1
            [1.0, 2.0, 0.0],  # partial: min(1.2, 2 - 1) / (1 + 1) = 0.5
            [0.0, 1.0, 0.0],  # absorber carries 0.6 < 0.8: 0
            [0.0, 0.0, 9.0],  # only an unaligned latent fires: 0
        ]
    )
    got = E.absorption_fraction(x, acts, W_dec, probe, [0])
    assert torch.allclose(got, torch.tensor([0.0, 1.0, 0.5, 0.0, 0.0]))
    # the probe's norm does not matter; x.p <= 0 is never absorption
    assert torch.allclose(E.absorption_fraction(x, acts, W_dec, 3 * probe, [0]), got)
    assert E.absorption_fraction(-x[:1], acts[1:2], W_dec, probe, [0]).item() == 0.0
    with pytest.raises(ValueError, match="rows"):
        E.absorption_fraction(x, acts[:, :2], W_dec, probe, [0])


def test_main_latents_grows_k_only_on_an_f1_jump():
    g = torch.Generator().manual_seed(0)
    labels = torch.rand(2000, generator=g) < 0.3
    half = torch.rand(2000, generator=g) < 0.5
    acts = torch.rand(2000, 6, generator=g) * 0.1
    acts[:, 0] += (labels & half).float() * 3  # the concept split over two latents
    acts[:, 1] += (labels & ~half).float() * 2.5
    chosen, scores = E.main_latents(acts[:1500], labels[:1500], acts[1500:], labels[1500:])
    assert sorted(chosen) == [0, 1], (chosen, scores)
    assert scores[1] > scores[0] + 0.03 and len(scores) == 3


def test_linear_probe_finds_the_labelled_direction():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1000, 4, generator=g)
    labels = x[:, 2] > 0.5
    direction, _ = E.linear_probe(x, labels)
    assert direction.norm().item() == pytest.approx(1.0, abs=1e-5)
    assert direction[2].item() > 0.95
    with pytest.raises(ValueError, match="one label per row"):
        E.linear_probe(x, labels[:10])


def test_coactivation_cosine_links_a_child_to_its_parent_and_rejects_bad_shapes():
    g = torch.Generator().manual_seed(2)
    parent = torch.relu(torch.randn(500, generator=g))
    child = parent * (torch.rand(500, generator=g) < 0.3)
    other = torch.relu(torch.randn(500, generator=g))
    link = E.coactivation_cosine(parent[:, None], torch.stack([child, other, torch.zeros(500)], -1))
    assert (
        link[0, 0] > 0.99 > 0.9 > link[0, 1]
    )  # through the child's tokens; an unrelated latent is lower
    assert link[0, 2] == 0.0  # a dead latent links to nothing
    with pytest.raises(ValueError, match="same n tokens"):
        E.coactivation_cosine(parent[:, None], child[:10, None])
