"""Circuits: weight-based connections, exact decomposition of a feature's pre-activation, paths."""

from __future__ import annotations

from collections import defaultdict

import pytest
import torch

from course_utils.science import circuits as C
from course_utils.science import transcoders as T
from course_utils.science.activations import corpus_windows
from course_utils.science.models import load_model

POS = 13


@pytest.fixture(scope="module")
def setup():
    torch.set_num_threads(2)
    model = load_model("course-2l")
    tcs = {}
    for layer, cls in ((0, T.SkipTranscoder), (1, T.Transcoder)):
        tc = cls(128, 96, 128, 1, seed=layer)
        g = torch.Generator().manual_seed(10 + layer)
        with torch.no_grad():
            tc.b_enc.normal_(0.2, 0.5, generator=g)
            tc.b_dec.normal_(0, 0.1, generator=g)
            if tc.has_skip:
                tc.W_skip.normal_(0, 0.02, generator=g)
        tcs[layer] = T.single(tc)
    tokens = corpus_windows(model, "validation")[3, :16]
    return model, tcs, C.Circuit(model, tokens, tcs)


def _active(circuit, layer, pos=POS):
    acts = circuit.feature_acts(layer)[pos]
    return int(acts.argmax())


@pytest.mark.parametrize("layer", [0, 1])
def test_terms_sum_to_actual_pre_activation(setup, layer):
    model, tcs, circuit = setup
    for feature in (_active(circuit, layer), 5):
        terms = circuit.decompose_feature(layer, feature, POS)
        actual = circuit.pre_activation(layer, feature, POS)
        # independent ground truth: the transcoder on the cached model activation
        _, cache = model.run_with_cache(circuit.tokens)
        x = cache[f"blocks.{layer}.ln2.hook_normalized"][0, POS]
        assert actual == pytest.approx(
            (x @ tcs[layer].W_enc + tcs[layer].b_enc)[feature].item(), abs=1e-5
        )
        assert sum(t["value"] for t in terms) == pytest.approx(actual, abs=1e-4)
    kinds = {t["kind"] for t in circuit.decompose_feature(1, 0, POS)}
    assert {
        "embed",
        "pos_embed",
        "head",
        "attn_bias",
        "feature",
        "tc_error",
        "tc_bias",
        "tc_skip",
        "enc_bias",
    } <= kinds


def test_head_terms_decompose_further(setup):
    _, _, circuit = setup
    heads = [
        t for t in circuit.decompose_feature(1, _active(circuit, 1), POS) if t["kind"] == "head"
    ]
    for term in sorted(heads, key=lambda t: -abs(t["value"]))[:3]:
        sub = circuit.decompose_head_term(term)
        assert sum(t["value"] for t in sub) == pytest.approx(term["value"], abs=1e-5)


def test_attention_terms_sum_to_attn_out(setup):
    model, _, circuit = setup
    d = torch.randn(128, generator=torch.Generator().manual_seed(0))
    for layer in (0, 1):
        attn = [
            t
            for t in circuit.residual_terms(d, layer, "mid", POS)
            if t.get("layer") == layer and t["kind"] in ("head", "attn_bias")
        ]
        want = circuit.cache[f"blocks.{layer}.hook_attn_out"][POS] @ d
        assert sum(t["value"] for t in attn) == pytest.approx(want.item(), abs=1e-4)


def test_feature_attributions_match_the_decomposition(setup):
    _, tcs, circuit = setup
    j = _active(circuit, 1)
    scale = circuit.cache["blocks.1.ln2.hook_scale"][POS]
    z0 = circuit.feature_acts(0)[POS]
    attributions = C.feature_attributions(z0, tcs[0], tcs[1], j, scale)
    from_terms = {
        t["index"]: t["value"]
        for t in circuit.decompose_feature(1, j, POS)
        if t["kind"] == "feature" and t["layer"] == 0 and t["pos"] == POS
    }
    assert set(from_terms) == set(torch.nonzero(z0).flatten().tolist())
    for i, v in from_terms.items():
        assert attributions[i].item() == pytest.approx(v, abs=1e-5)
    conn = C.input_invariant_connections(tcs[0], tcs[1])
    assert conn.shape == (96, 96)
    assert torch.allclose(conn[2, j], tcs[0].W_dec[2] @ C.centre(tcs[1].W_enc[:, j]), atol=1e-6)


def test_de_embeddings_and_head_attribution(setup):
    model, tcs, circuit = setup
    de = C.de_embedding(model, tcs[0], 4)
    assert de.shape == (model.cfg.d_vocab,)
    assert torch.allclose(de, model.W_E @ C.centre(tcs[0].W_enc[:, 4]), atol=1e-5)
    through = C.de_embedding_through_head(model, tcs[1], 4, 0, 2)
    assert through.shape == (model.cfg.d_vocab,)
    pattern = torch.tensor([[1.0, 0.0], [0.25, 0.75]])
    x_pre = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    eye = torch.eye(2)
    out = C.head_attribution(pattern, x_pre, eye, eye, torch.tensor([1.0, 1.0]), dest=1)
    assert torch.allclose(out, torch.tensor([0.25, 1.5]))


def test_greedy_paths_is_a_small_consistent_graph(setup):
    _, _, circuit = setup
    j = _active(circuit, 1)
    graph = circuit.greedy_paths(1, j, POS, top_k=4, depth=3)
    nodes, edges = graph["nodes"], graph["edges"]
    assert graph["root"] in nodes and all(e["src"] in nodes and e["dst"] in nodes for e in edges)
    incoming = defaultdict(float)
    for e in edges:
        incoming[e["dst"]] += e["weight"]
    # kept terms + pruned node = the node's value (pre-activation of a feature, a head's term)
    for nid, total in incoming.items():
        assert total == pytest.approx(nodes[nid]["value"], abs=1e-4)
    assert len(edges) <= 5 * (1 + 4 + 16)
    assert any(n["kind"] == "pruned" for n in nodes.values())


def test_bad_inputs(setup):
    model, tcs, circuit = setup
    with pytest.raises(ValueError, match=r"\[1, pos\]"):
        C.Circuit(model, torch.zeros(2, 5, dtype=torch.long), tcs)
    with pytest.raises(ValueError, match="out of range"):
        circuit.decompose_feature(1, 96, POS)
    with pytest.raises(ValueError, match="pos 16 out of range"):
        circuit.decompose_feature(1, 0, 16)
    with pytest.raises(ValueError, match="no transcoder for layer 1"):
        C.Circuit(model, circuit.tokens, {0: tcs[0]}).decompose_feature(1, 0, 2)
    with pytest.raises(ValueError, match="d_out=128.*d_in=64"):
        C.input_invariant_connections(tcs[0], T.Transcoder(64, 8, 64))
    with pytest.raises(ValueError, match="width 128"):
        C.Circuit(model, circuit.tokens, {0: T.Transcoder(64, 8, 128)})
    with pytest.raises(ValueError, match="top_k"):
        circuit.greedy_paths(1, 0, POS, top_k=0)


def test_keep_top_keeps_largest_magnitudes_and_sums():
    terms = [{"kind": "feature", "value": v} for v in (0.5, -2.0, 1.25, 0.1)]
    kept, pruned = C.keep_top(terms, 2)
    assert [t["value"] for t in kept] == [-2.0, 1.25]
    assert pruned == pytest.approx(0.6)
    with pytest.raises(ValueError, match="top_k"):
        C.keep_top(terms, 0)


@pytest.mark.parametrize("baseline", ["mean", None, 7])
def test_logit_terms_sum_to_the_logit(setup, baseline):
    model, _, circuit = setup
    token = int(circuit.tokens[0, POS + 1])
    terms = circuit.decompose_logit(token, POS, baseline)
    assert sum(t["value"] for t in terms) == pytest.approx(
        circuit.logit(token, POS, baseline), abs=1e-3
    )
    logits = model(circuit.tokens)[0, POS]
    raw = circuit.logit(token, POS, None)
    assert raw == pytest.approx(logits[token].item(), abs=1e-4)
    with pytest.raises(ValueError, match="baseline"):
        circuit.decompose_logit(token, POS, "median")
    with pytest.raises(ValueError, match="out of range"):
        circuit.decompose_logit(model.cfg.d_vocab, POS)


def test_logit_graph_adds_up_and_draws(setup):
    _, _, circuit = setup
    token = int(circuit.tokens[0, POS + 1])
    graph = circuit.greedy_logit_paths(token, POS, top_k=3, depth=2)
    incoming = defaultdict(float)
    for e in graph["edges"]:
        incoming[e["dst"]] += e["weight"]
    for nid, total in incoming.items():
        assert total == pytest.approx(graph["nodes"][nid]["value"], abs=1e-3)
    fig = C.plot_graph(graph, token_str=str)
    assert len(fig.data) == len(graph["edges"]) + len(
        {n["kind"] in C.ERROR_KINDS for n in graph["nodes"].values()}
    )
    assert {tr.name for tr in fig.data if tr.mode == "markers+text"} <= {
        "error / bias / pruned",
        "feature / head / embedding",
    }


def test_reversed_shipped_transcoders_and_an_sae_give_clear_errors():
    """Review P3: layers swapped in input_invariant_connections; an SAE passed as a transcoder."""
    from course_utils.science.models import load_sae

    tc0, tc1 = load_sae(T.REFERENCE_NAMES["tc0"]), load_sae(T.REFERENCE_NAMES["tc1"])
    assert C.input_invariant_connections(tc0, tc1).shape == (tc0.cfg.d_sae, tc1.cfg.d_sae)
    with pytest.raises(ValueError, match="EARLIER transcoder: got layer 1 then layer 0"):
        C.input_invariant_connections(tc1, tc0)
    model = load_model("course-2l")
    with pytest.raises(ValueError, match="is an SAE on 'blocks.0.hook_mlp_out'.*not a transcoder"):
        T.check_fits(model, load_sae(T.REFERENCE_NAMES["sae0"]), 0)
