"""Cross-layer transcoders and attribution graphs (chapter 07) on a tiny random model."""

from __future__ import annotations

import pytest
import torch

from course_utils.science import attribution_graphs as AG
from course_utils.science import clt as CLT
from course_utils.science import transcoders as T
from course_utils.science.models import tiny_random_model

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    return tiny_random_model(seed=3)


def _clt(model, seed=0, d_sae=24) -> CLT.CrossLayerTranscoder:
    clt = CLT.CrossLayerTranscoder(model.cfg.n_layers, model.cfg.d_model, d_sae, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        clt.b_enc.copy_(0.1 * torch.randn(clt.b_enc.shape, generator=g))
        clt.threshold.copy_(0.2 * torch.rand(clt.threshold.shape, generator=g))
        for w in clt.W_dec:
            w.mul_(3.0)
        clt.b_dec.copy_(0.05 * torch.randn(clt.b_dec.shape, generator=g))
    return clt


@pytest.fixture(scope="module")
def tokens(model):
    return torch.randint(0, model.cfg.d_vocab, (12,), generator=torch.Generator().manual_seed(0))


def test_module_matches_functional_reference(model):
    clt = _clt(model)
    x = torch.randn(5, 2, model.cfg.d_model)
    acts, y = clt(x)
    ref = CLT.clt_forward(x, clt.W_enc, clt.b_enc, clt.threshold, list(clt.W_dec), clt.b_dec)
    assert torch.allclose(acts, ref[0]) and torch.allclose(y, ref[1], atol=1e-6)
    loss = clt.loss(x, y.detach() + 0.1)
    assert loss["loss"].shape == (1,)


def test_jumprelu_threshold_gets_a_gradient():
    pre = torch.tensor([0.05, 0.5, -1.0])
    theta = torch.tensor([0.06, 0.06, 0.06], requires_grad=True)
    out = CLT.jumprelu(pre, theta, bandwidth=0.1)
    assert torch.equal(out.detach(), torch.tensor([0.0, 0.5, 0.0]))
    out.sum().backward()
    # only the token within bandwidth/2 of the threshold pushes it
    assert theta.grad[0] < 0 and theta.grad[1] == 0 and theta.grad[2] == 0


def test_from_transcoders_reproduces_per_layer_transcoders(model):
    tcs = {layer: T.single(T.Transcoder(model.cfg.d_model, 10, seed=layer)) for layer in range(2)}
    clt = CLT.CrossLayerTranscoder.from_transcoders(tcs)
    x = torch.randn(4, 2, model.cfg.d_model)
    _, y = clt(x)
    for layer, tc in tcs.items():
        assert torch.allclose(y[:, layer], tc(x[:, layer]), atol=1e-6)


def test_training_reduces_the_loss(model):
    torch.manual_seed(0)
    clt = CLT.CrossLayerTranscoder(2, model.cfg.d_model, 32, l1_coeff=1e-3, seed=0)
    tokens = torch.randint(
        0, model.cfg.d_vocab, (8, 16), generator=torch.Generator().manual_seed(1)
    )
    x, y = CLT.clt_pairs(model, tokens)
    x, y = x.flatten(0, 1), y.flatten(0, 1)
    first = clt.loss(x, y)["loss"].item()
    CLT.train_clt(
        clt, lambda: [x[:, 0], y[:, 0], x[:, 1], y[:, 1]], steps=60, lr=3e-3, log=lambda s: None
    )
    assert clt.loss(x, y)["loss"].item() < 0.5 * first
    assert (clt.threshold >= 0).all()


def test_save_load_round_trip(tmp_path, model):
    clt = _clt(model)
    CLT.save_clt(clt, tmp_path / "c", {"note": "test"})
    back = CLT.load_clt(tmp_path / "c")
    x = torch.randn(3, 2, model.cfg.d_model)
    assert torch.equal(clt(x)[1], back(x)[1])
    with pytest.raises(FileNotFoundError, match="not a CLT folder"):
        CLT.load_clt(tmp_path)


def test_bad_inputs_have_clear_errors(model, tokens):
    clt = _clt(model)
    with pytest.raises(ValueError, match="n_layers, d_model"):
        clt(torch.randn(3, 128))
    wide = CLT.CrossLayerTranscoder(2, 64, 8)
    with pytest.raises(ValueError, match="d_model=64"):
        AG.attribute(model, wide, tokens)
    with pytest.raises(ValueError, match="n_ctx"):
        AG.attribute(model, clt, torch.zeros(model.cfg.n_ctx + 1, dtype=torch.long))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        AG.attribute(model, clt, tokens, target_tokens=[model.cfg.d_vocab])
    with pytest.raises(TypeError, match="from_transcoders"):
        AG.attribute(model, object(), tokens)


def test_local_replacement_model_is_exact(model, tokens):
    clt = _clt(model)
    logits, errors = AG.local_replacement_logits(model, clt, tokens)
    clean = model(tokens[None])[0]
    assert (logits - clean).abs().max() < 1e-5
    assert errors.abs().max() > 1e-3  # the CLT is not perfect: the errors do real work
    assert not model.hook_dict["blocks.0.hook_mlp_out"].fwd_hooks  # no hook left behind


@pytest.fixture(scope="module")
def graph(model, tokens):
    return AG.attribute(model, _clt(model), tokens, batch_size=7)


def test_edges_and_bias_sum_to_every_node_value(graph):
    assert graph.n_features > 10
    assert AG.completeness_residual(graph) < 1e-4


def test_adjacency_column_predicts_a_constrained_doubling(model, tokens, graph):
    """circuit-tracer's exactness test: double one feature with everything frozen."""
    clt = _clt(model)
    s = graph.slices()
    for k in (0, graph.n_features // 2):
        layer, p, i = graph.active[k].tolist()
        out = AG.intervene(model, clt, tokens, [(layer, p, i)], multiplier=2.0,
                           freeze_attention=True, freeze_layernorm=True)  # fmt: skip
        run = AG.clean_run(model, tokens)
        clean_pre = clt.pre_acts(run["x"]).detach()
        act = graph.active
        delta = (out["pre_acts"] - clean_pre)[act[:, 1], act[:, 0], act[:, 2]]
        assert torch.allclose(delta, graph.adjacency[: graph.n_features, k], atol=5e-5)
        new = AG.demeaned(out["logits"][-1], graph.logit_tokens)
        old = AG.demeaned(run["logits"][-1], graph.logit_tokens)
        assert torch.allclose(new - old, graph.adjacency[s["logits"], k], atol=5e-5)


def test_influence_pruning_and_scores(graph):
    A_norm = AG.normalise_adjacency(graph.adjacency)
    w = graph.logit_weights()
    small = AG.indirect_influence(A_norm)
    assert torch.allclose(w @ small, AG.node_influence(A_norm, w), atol=1e-5)
    masks = [AG.prune_graph(graph, t)[0] for t in (0.5, 0.8, 0.95)]
    sizes = [int(m[graph.slices()["features"]].sum()) for m in masks]
    assert sizes == sorted(sizes) and sizes[0] < sizes[-1]
    full = AG.graph_scores(graph)
    pruned = AG.graph_scores(graph, masks[0])
    assert 0 < full["replacement"] <= 1 and 0 < full["completeness"] <= 1
    assert pruned["completeness"] <= full["completeness"] + 1e-6


def test_graph_json_and_plot(model, graph):
    nm, em = AG.prune_graph(graph, 0.8)
    js = AG.to_json(graph, nm, em, lambda t: f"t{t}")
    ids = {n["node_id"] for n in js["nodes"]}
    assert all(e["source"] in ids and e["target"] in ids for e in js["links"])
    assert {n["feature_type"] for n in js["nodes"]} >= {"embedding", "logit"}
    fig = AG.plot_graph(js, 2, "a graph")
    assert fig.layout.xaxis.title.text.startswith("token position")


def test_graph_figure_reading_threshold_sign_and_supernodes(graph):
    """Issue 25: a figure a person can read. The reading threshold keeps the most influential
    features and says so in the title; a feature's colour is the sign of its effect; a supernode
    is one marker; a supernode naming a node that is not in the file is refused."""
    n = graph.adjacency.shape[0]
    js = AG.to_json(graph, torch.ones(n, dtype=torch.bool), graph.adjacency != 0, lambda t: f"t{t}")
    feats = [x for x in js["nodes"] if x["feature_type"] == "cross layer transcoder"]
    assert len(feats) > 5 and all("signed_effect" in x for x in feats)
    fig = AG.plot_graph(js, 2, "g", max_features=5, max_edges=10)
    drawn = [t for t in fig.data if t.mode and "markers" in t.mode and t.name.startswith("feature")]
    assert sum(len(t.x) for t in drawn) == 5
    assert f"5 most influential of {len(feats)} features" in fig.layout.title.text
    assert "10 strongest" in fig.layout.title.text
    top = sorted(feats, key=lambda x: -x["influence"])[:5]
    colours = {"#1f77b4" if x["signed_effect"] >= 0 else "#d62728" for x in top}
    assert set(drawn[0].marker.color) == colours
    full = AG.plot_graph(js, 2, "g", max_features=None, max_edges=10**6)
    assert "features" not in full.layout.title.text and "edges" not in full.layout.title.text
    members = [x["node_id"] for x in top[:3]]
    merged = AG.plot_graph(js, 2, "g", max_features=None, supernodes={"group A": members})
    hexes = [t for t in merged.data if t.name == "supernode"]
    assert len(hexes) == 1 and len(hexes[0].x) == 1 and list(hexes[0].text) == ["group A"]
    with pytest.raises(KeyError, match="no node"):
        AG.plot_graph(js, 2, "g", supernodes={"bad": ["9_9_99"]})
    with pytest.raises(ValueError, match="two supernodes"):
        AG.plot_graph(js, 2, "g", supernodes={"a": members[:2], "b": members[1:]})


def test_graph_json_ids_are_unique_with_every_node_kept(graph):
    """Issue 25: an error node's id was 0_{layer}_{pos}, the id of layer-0 feature `layer` at the
    same position, so one of the two vanished from the file and the figure."""
    n = graph.adjacency.shape[0]
    js = AG.to_json(graph, torch.ones(n, dtype=torch.bool), torch.zeros(n, n, dtype=torch.bool),
                    lambda t: f"t{t}")  # fmt: skip
    ids = [node["node_id"] for node in js["nodes"]]
    assert len(ids) == len(set(ids)) == n
    errors = [node["node_id"] for node in js["nodes"] if node["feature_type"].endswith("error")]
    assert errors and all(e.split("_")[1] == "-1" for e in errors)


@pytest.mark.skipif(
    not (CLT.asset_dir() / CLT.SHIPPED_NAME / CLT.CFG_FILE).is_file(),
    reason="no shipped CLT: python -m course_utils.assets build-clt",
)
def test_shipped_clt_matches_its_record_and_fits_the_asset_budget():
    from course_utils.science.activations import corpus_windows
    from course_utils.science.models import load_model

    clt = CLT.load_clt()
    record = clt.cfg_dict["metadata"]
    course_model = load_model("course-2l")
    tokens = corpus_windows(course_model, "validation")[: record["course_recipe"]["eval_windows"]]
    ev = CLT.evaluate_replacement(course_model, tokens, clt)
    for key in ("ce_replaced", "kl", "fvu_0", "fvu_1"):
        assert abs(ev[key] - record["course_evaluation"][key]) < 2e-3, key
    for key in ("l0_0", "l0_1"):
        assert abs(ev[key] - record["course_evaluation"][key]) < 0.05, key
    size = sum(p.stat().st_size for p in CLT.asset_dir().rglob("*") if p.is_file())
    assert size < 1.5 * 2**20, f"the CLT assets are {size / 2**20:.2f} MB"
    rows = CLT.read_sweep_table()
    assert {r["family"] for r in rows} == {"clt", "plt", "plt-shipped-1024"}


def test_attribution_row_is_the_adjacency_row(model, graph):
    """Exercise 3.2's reference: one backward pass per target gives the batched graph's row."""
    clt = _clt(model)
    s = graph.slices()
    targets = [0, graph.n_features - 1, s["logits"].start, graph.n_nodes - 1]
    for t in targets:
        row = AG.attribution_row(model, clt, graph, t)
        assert not row.requires_grad
        assert torch.allclose(row, graph.adjacency[t], atol=1e-5, rtol=1e-4), t
    with pytest.raises(ValueError, match="only features and logits"):
        AG.attribution_row(model, clt, graph, s["errors"].start)
    nodes_only = AG.attribute(model, clt, graph.tokens, edges=False)
    assert not nodes_only.adjacency.any()
    assert torch.equal(nodes_only.active, graph.active)


def test_edge_pruning_recomputes_influence_on_the_pruned_graph(graph):
    """circuit-tracer's compute_edge_influence: normalise the node-pruned adjacency again and
    recompute influence on it; edge score = normalised weight x (influence + logit weight)."""
    node_mask, edge_mask = AG.prune_graph(graph, 0.8, 0.9)
    pruned = graph.adjacency.clone()
    pruned[~node_mask] = 0
    pruned[:, ~node_mask] = 0
    w = graph.logit_weights()
    norm = AG.normalise_adjacency(pruned)
    scores = norm * (AG.node_influence(norm, w) + w)[:, None]
    expected = (scores >= AG.cumulative_threshold(scores, 0.9)) & (pruned != 0)
    assert torch.equal(edge_mask, expected)
    _, full_mask = AG.prune_graph(graph, 0.8, 0.9, edge_influence="full")
    assert full_mask.any() and not (full_mask & (pruned == 0)).any()
    with pytest.raises(ValueError, match="edge_influence"):
        AG.prune_graph(graph, 0.8, 0.9, edge_influence="sometimes")
