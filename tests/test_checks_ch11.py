"""Chapter 11 (capstone): the four function checks meet the contract (they reuse the check bodies
of chapters 03 and 06, so the correct and wrong answers of those chapters' tests apply); the
hand-in checks accept a correct hand-in and reject each usual mistake with a message that names
it; the science helpers fail clearly on bad input; the online variant's loader works on local
files and stops with one clear error offline."""

from __future__ import annotations

import json
import re
import types

import pytest
import torch

from course_utils.checks import ch11 as check
from course_utils.checks.core import FAILED, NOT_ATTEMPTED, PASSED, exercises_of, outcome
from course_utils.science import feature_analysis as FA
from course_utils.science import interventions as I
from course_utils.science import lm_saes as L
from course_utils.science.hooks import UnknownHookError
from tests import test_checks_ch03 as t3
from tests import test_checks_ch06 as t6
from tests.check_contract import contract_tests

pytestmark = pytest.mark.usefixtures("one_thread")


def _rows(module, checks, names):
    """The rows of an earlier chapter's CHECKS for ``names``, re-pointed at chapter 11's checks."""
    rows = {row[0].exercise.name: row for row in checks}
    return [(getattr(module, n), *rows[n][1:]) for n in names]


FUNCTION_CHECKS = [
    *_rows(check, t3.CHECKS, ["specificity_sensitivity"]),
    *_rows(check, t6.CHECKS, ["ablation_effect"]),
    *_rows(check, t3.CHECKS, ["logit_weights", "max_neuron_correlation"]),
]


def _by_name(table: dict) -> dict:
    return {c.exercise.name: v for c, v in table.items()}


_correct = {**_by_name(t3.CORRECT), **_by_name(t6.CORRECT)}
_wrong = {**_by_name(t3.WRONG), **_by_name(t6.WRONG)}
CORRECT = {row[0]: _correct[row[0].exercise.name] for row in FUNCTION_CHECKS}
WRONG = {
    row[0]: _wrong[row[0].exercise.name]
    for row in FUNCTION_CHECKS
    if row[0].exercise.name in _wrong
}
# The contract's "every exercise has a test" runs over the function checks; the hand-in checks
# (2.x, called with a namespace, not a function) are tested below, one mistake at a time.
_function_module = types.SimpleNamespace(**{row[0].__name__: row[0] for row in FUNCTION_CHECKS})
contract_tests(_function_module, FUNCTION_CHECKS, globals(), correct=CORRECT, wrong=WRONG)


def test_every_chapter_10_exercise_is_tested_here():
    from course_utils.checks.core import exercises_of

    hand_in_checks = {"hand_in", "held_out", "neuron_layer", "consistent"}
    functions = {row[0].exercise.name for row in FUNCTION_CHECKS}
    assert {e.name for e in exercises_of(check)} == functions | hand_in_checks


# ----------------------------------------------------------------------------- a hand-in

CONCEPTS = ("full stop", "for", "open string")


@pytest.fixture(scope="module")
def hand_in_ns():
    """A correct hand-in built with the reference functions: 3 concepts on 80 held-out windows.

    It uses the residual variant (``course-2l-res0-seed0``/``seed1``), which the brief allows; the
    notebook's default is the MLP SAE ``course-2l-mlp0-seed0``.
    """
    torch.set_num_threads(1)
    model = check._model()
    vocab = FA.vocab_strings(model.tokenizer)
    val = FA_windows(model, "validation")
    tokens = val[torch.randperm(len(val), generator=torch.Generator().manual_seed(1))[:80]]
    hook, other_hook = "blocks.0.hook_resid_post", "blocks.0.hook_resid_post"
    sae = FA.load_analysis_sae(model, "course-2l-res0-seed0", hook)
    other = FA.load_analysis_sae(model, "course-2l-res0-seed1", other_hook)
    proxies = {c: _proxy_fn(vocab, c) for c in CONCEPTS}
    # the worked solution's residual-variant choices (Step 2b's rule on course-2l-res0-seed0)
    features = {"full stop": 729, "for": 165, "open string": 375}
    ns = {
        "SAE_NAME": "course-2l-res0-seed0", "HOOK_NAME": hook, "eval_tokens": tokens,
        "proxies": proxies, "features": features, "NEURON_HOOK": "blocks.0.mlp.hook_post",
        "OTHER_SAE_NAME": "course-2l-res0-seed1", "OTHER_HOOK_NAME": other_hook,
        "specificity_sensitivity": L.specificity_sensitivity, "ablation_effect": I.ablation_effect,
        "logit_weights": L.logit_weights, "max_neuron_correlation": L.max_neuron_correlation,
    }  # fmt: skip
    ns["results"] = _results(model, sae, other, ns, vocab)
    return ns


def FA_windows(model, split):
    from course_utils.science.activations import corpus_windows

    return corpus_windows(model, split)


def _proxy_fn(vocab, concept):
    return lambda tokens: FA.concept_proxy(tokens, vocab, concept)


def _results(model, sae, other, ns, vocab, subset=None):
    """Every result, as the brief defines it (``subset``: windows to restrict to, a mistake)."""
    tokens = ns["eval_tokens"]
    acts = L.feature_acts_on(model, sae, tokens, ns["HOOK_NAME"])
    other_acts = L.feature_acts_on(model, other, tokens, ns["OTHER_HOOK_NAME"])[:, 1:]
    other_acts = other_acts.reshape(-1, other_acts.shape[-1])
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=ns["NEURON_HOOK"])
    neurons = cache[ns["NEURON_HOOK"]][:, 1:].reshape(-1, model.cfg.d_mlp)
    weights = L.logit_weights(sae.W_dec.detach(), model.W_U.detach())
    results = {}
    for c, f in ns["features"].items():
        a = acts[:, 1:, f]
        mask = ns["proxies"][c](tokens)[:, 1:]
        if subset is not None:
            keep = subset(acts[..., f])
            spec, sens = L.specificity_sensitivity(a[keep], mask[keep])
        else:
            spec, sens = L.specificity_sensitivity(a.flatten(), mask.flatten())
        corr, n = L.max_neuron_correlation(a.flatten(), neurons)
        m_corr, m = L.max_neuron_correlation(a.flatten(), other_acts)
        results[c] = {
            "specificity": spec, "sensitivity": sens,
            "ablation": check._ablation_mean(
                I.ablation_effect, model, sae, tokens, ns["HOOK_NAME"], f, acts[..., f]
            ),
            "top_logit_tokens": weights[f].topk(10).indices.tolist(),
            "neuron": n, "neuron_corr": corr,
            "neuron_specificity": L.specificity_sensitivity(neurons[:, n], mask.flatten())[0],
            "match": m, "match_corr": m_corr,
            "verdict": f"Feature {f} for {c}: specificity {spec:.3f}, sensitivity {sens:.3f}.",
        }  # fmt: skip
    return results


HAND_IN = (check.hand_in, check.held_out, check.neuron_layer, check.consistent)


def test_a_correct_hand_in_passes_every_check(hand_in_ns):
    for fn in HAND_IN:
        assert outcome(fn, dict(hand_in_ns)) == (PASSED, ""), fn.__name__


def test_nothing_handed_in_yet_is_not_attempted():
    for fn in HAND_IN:
        status, message = outcome(fn, {"model": None})
        assert status == NOT_ATTEMPTED and "none of the required results exists" in message


@pytest.mark.parametrize(
    "drop, words",
    [
        ("results", ["`results`", "Steps 3-7"]),
        ("eval_tokens", ["`eval_tokens`", "Step 1"]),
        ("NEURON_HOOK", ["`NEURON_HOOK`", "Step 5"]),
    ],
)
def test_a_missing_result_is_named_with_its_step(hand_in_ns, drop, words):
    ns = {k: v for k, v in hand_in_ns.items() if k != drop}
    status, message = outcome(check.hand_in, ns)
    assert status == FAILED and all(w in message for w in words), message


def test_a_missing_key_of_results_is_named_with_its_step(hand_in_ns):
    ns = dict(hand_in_ns)
    ns["results"] = {c: dict(r) for c, r in ns["results"].items()}
    del ns["results"]["for"]["neuron_corr"]
    status, message = outcome(check.hand_in, ns)
    assert status == FAILED and "results['for'].neuron_corr" in message and "Step 5" in message


def test_a_proxy_that_matches_no_token_gets_one_clear_error(hand_in_ns):
    ns = dict(hand_in_ns, proxies=dict(hand_in_ns["proxies"]))
    ns["proxies"]["for"] = lambda tokens: tokens == -1
    status, message = outcome(check.hand_in, ns)
    assert status == FAILED and "the proxy for 'for' matches none of the" in message
    with pytest.raises(FA.EmptyProxyError, match="matches none of the"):
        FA.check_proxy(ns["eval_tokens"] == -1, ns["eval_tokens"], "for")


def test_an_sae_at_a_hook_that_does_not_exist_gets_one_clear_error(hand_in_ns):
    ns = dict(hand_in_ns, HOOK_NAME="blocks.0.hook_resid_pots")
    status, message = outcome(check.hand_in, ns)
    assert status == FAILED and "no hook named 'blocks.0.hook_resid_pots'" in message
    assert "Did you mean 'blocks.0.hook_resid_post'" in message
    with pytest.raises(UnknownHookError, match="no hook named"):
        FA.load_analysis_sae(check._model(), "course-2l-res0-seed0", "blocks.0.hook_resid_pots")


def test_an_sae_at_the_wrong_existing_hook_gets_one_clear_error():
    with pytest.raises(ValueError, match="trained on 'blocks.0.hook_resid_post'"):
        FA.load_analysis_sae(check._model(), "course-2l-res0-seed0", "blocks.1.hook_resid_post")


# ----------------------------------------------------------------------------- the usual mistakes


def test_proxy_given_as_a_mask_is_rejected(hand_in_ns):
    ns = dict(hand_in_ns, proxies=dict(hand_in_ns["proxies"]))
    ns["proxies"]["for"] = ns["proxies"]["for"](ns["eval_tokens"])
    status, message = outcome(check.hand_in, ns)
    assert status == FAILED and "must be a function of the tokens" in message


def test_numbers_on_the_activating_examples_only_are_caught(hand_in_ns):
    """The proxy evaluated (and specificity/sensitivity computed) only where the feature fires."""
    model = check._model()
    sae = FA.load_analysis_sae(
        model, hook_name=hand_in_ns["HOOK_NAME"], name="course-2l-res0-seed0"
    )
    other = FA.load_analysis_sae(model, "course-2l-res0-seed1", hand_in_ns["OTHER_HOOK_NAME"])
    flawed = _results(model, sae, other, hand_in_ns, None, subset=lambda acts: acts[:, 1:] > 0)
    ns = dict(hand_in_ns, results=flawed)
    assert outcome(check.hand_in, ns) == (PASSED, "")
    status, message = outcome(check.consistent, ns)
    assert status == FAILED and "sensitivity: stored 1" in message
    assert "activating examples" in message


def test_specificity_on_training_data_is_caught(hand_in_ns):
    train = FA_windows(check._model(), "train")
    ns = dict(hand_in_ns, eval_tokens=train[:80])
    status, message = outcome(check.held_out, ns)
    # a training window's first 16 tokens can occur in validation too (a licence header): 79 of 80
    found = re.search(r"(\d+) of 80 windows of `eval_tokens` are not from the validation", message)
    assert status == FAILED and found and int(found.group(1)) >= 70, message


def test_too_few_held_out_tokens_are_caught(hand_in_ns):
    ns = dict(hand_in_ns, eval_tokens=hand_in_ns["eval_tokens"][:40])
    status, message = outcome(check.held_out, ns)
    assert status == FAILED and "at least 10,000" in message


def test_neurons_at_the_wrong_layer_are_caught(hand_in_ns):
    ns = dict(hand_in_ns, NEURON_HOOK="blocks.1.mlp.hook_post")
    status, message = outcome(check.neuron_layer, ns)
    assert status == FAILED and "'blocks.0.mlp.hook_post'" in message


def test_a_stored_number_that_the_functions_do_not_reproduce_is_named(hand_in_ns):
    ns = dict(hand_in_ns, results={c: dict(r) for c, r in hand_in_ns["results"].items()})
    ns["results"]["open string"]["match_corr"] += 0.05
    status, message = outcome(check.consistent, ns)
    assert status == FAILED and "'open string' match_corr" in message


def test_neuron_hook_for_each_kind_of_hook():
    model = check._model()
    assert FA.neuron_hook_for(model, "blocks.0.hook_resid_post") == "blocks.0.mlp.hook_post"
    assert FA.neuron_hook_for(model, "blocks.1.hook_resid_pre") == "blocks.0.mlp.hook_post"
    assert FA.neuron_hook_for(model, "blocks.1.hook_mlp_out") == "blocks.1.mlp.hook_post"
    with pytest.raises(ValueError, match="no MLP has run"):
        FA.neuron_hook_for(model, "blocks.0.hook_resid_pre")


# ----------------------------------------------------------------------------- proxies


def _tokens(model, text):
    ids = model.tokenizer.encode(text, add_special_tokens=False)
    return torch.tensor([[model.tokenizer.bos_token_id, *ids]])


def _matches(concept, text):
    model = check._model()
    vocab = FA.vocab_strings(model.tokenizer)
    tokens = _tokens(model, text)
    return [vocab[i] for i in tokens[0][FA.concept_proxy(tokens, vocab, concept)[0]].tolist()]


def test_proxies_on_hand_made_text():
    code = 'from . import x\nimport os\n__import__("y")\n@property\ndef f(self):\n'
    code += (
        '    """Return it. Done."""\n    for a in b:\n        pass\n    else:\n        x = "s"\n'
    )
    assert _matches("import", code) == [" import", "import"]  # not __import__
    assert [t.strip() for t in _matches("full stop", code)] == ["."]  # "it." only
    assert _matches("for", code) == [" for"] and _matches("else", code) == [" else"]
    assert _matches("decorator", code) == ["@"]
    inside = "".join(_matches("open string", code))
    assert "Return it" in inside and "s" in inside and "import" not in inside


def test_a_window_that_starts_inside_a_docstring_is_read_as_a_string():
    text = '    continues the sentence.\n    """\n    return 1\n'
    inside = "".join(_matches("open string", text))
    assert "continues the sentence" in inside and "return" not in inside
    assert FA._starts_in_docstring('def f():\n    """Doc."""\n') == ""
    assert FA._starts_in_docstring('x = """\nabc"""') == ""


def test_the_for_proxy_needs_loop_syntax():
    # a window wholly inside a docstring is read as code by the scanner: the loop syntax test
    # keeps the English preposition out, and keeps loops, comprehensions and multi-line headers
    assert _matches("for", "\ntext-based utility class for running the tests\n") == []
    assert _matches("for", "See PEP 484 for more details. By default\n") == []
    assert _matches("for", "    for each item in the list.\n    Then\n") == []
    assert _matches("for", "x = 1\n    for a, b in pairs:\n        pass\n") == [" for"]
    assert _matches("for", "y = [f(p) for p in ps]\n") == [" for"]
    assert _matches("for", "d = {\n    k: v\n    for k, v in items\n}\n") == [" for"]
    assert _matches("for", "    for name in ('a',\n                 'b'):\n") == [" for"]
    assert _matches("for", "x = 1\n    for") == [" for"]  # the window ends: nothing to read


def test_residual_decoder_goes_through_w_out_for_an_mlp_sae():
    model = check._model()
    mlp = FA.load_analysis_sae(model, "course-2l-mlp0-seed0", "blocks.0.mlp.hook_post")
    res = FA.load_analysis_sae(model, "course-2l-res0-seed0", "blocks.0.hook_resid_post")
    got = FA.residual_decoder(model, mlp, "blocks.0.mlp.hook_post")
    torch.testing.assert_close(got, mlp.W_dec.detach() @ model.W_out[0].detach())
    assert got.shape == (mlp.cfg.d_sae, model.cfg.d_model)
    torch.testing.assert_close(FA.residual_decoder(model, res, "blocks.0.hook_resid_post"),
                               res.W_dec.detach())  # fmt: skip
    with pytest.raises(ValueError, match="direct path to the logits"):
        FA.residual_decoder(model, mlp, "blocks.0.hook_resid_post")
    assert mlp.W_enc.dtype == torch.float32  # stored in float16, loaded as float32
    assert FA.neuron_hook_for(model, "blocks.0.mlp.hook_post") == "blocks.0.mlp.hook_post"


def test_unknown_concept_and_bad_shapes_are_clear():
    model = check._model()
    vocab = FA.vocab_strings(model.tokenizer)
    with pytest.raises(ValueError, match="unknown concept 'while'"):
        FA.concept_proxy(_tokens(model, "while x:"), vocab, "while")
    with pytest.raises(ValueError, match="shaped like the tokens"):
        FA.check_proxy(torch.ones(3, dtype=torch.bool), torch.zeros(1, 3), "for")


# ----------------------------------------------------------------------------- the rubric


def test_rubric_totals_and_marking_summary():
    from course_utils.machinery.grading import ExerciseResult

    assert sum(r[2] for r in check.RUBRIC) == 100
    autos = {r[3] for r in check.RUBRIC if r[3]}
    assert autos == {e.name for e in exercises_of(check)}
    results = [ExerciseResult("2.2", name, PASSED if name == "held_out" else FAILED, "")
               for name in autos]  # fmt: skip
    text = check.marking_summary(results)
    assert "marked by the program: 6/40" in text and "for a person to mark" in text
    assert "total: 6 + __ (person) of 100" in text
    assert "| **total** | | **100** |" in check.rubric_markdown()


# ----------------------------------------------------------------------------- online variant


@pytest.fixture
def gelu_1l_files(tmp_path):
    """Files shaped like the public run: a JSON config and a torch state dict."""
    g = torch.Generator().manual_seed(0)
    state = {
        "W_enc": torch.randn(16, 64, generator=g), "b_enc": torch.randn(64, generator=g),
        "W_dec": torch.randn(64, 16, generator=g), "b_dec": torch.randn(16, generator=g),
    }  # fmt: skip
    torch.save(state, tmp_path / "25.pt")
    (tmp_path / "25_cfg.json").write_text(json.dumps({"l1_coeff": 3e-4, "seed": 49, "d_mlp": 16}))
    return tmp_path, state


def test_gelu_1l_sae_offline_gives_one_clear_error(monkeypatch):
    from course_utils.science.models import NetworkRequiredError

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(NetworkRequiredError, match="needs a network.*shipped dictionary"):
        FA.load_gelu_1l_sae("run1")
    with pytest.raises(ValueError, match="run must be one of"):
        FA.load_gelu_1l_sae("run3")


def test_gelu_1l_sae_online_path_reads_the_public_format(monkeypatch, gelu_1l_files):
    import huggingface_hub

    from course_utils.machinery import env

    folder, state = gelu_1l_files
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("COURSE_OFFLINE", raising=False)
    monkeypatch.setattr(env, "network_available", lambda *a, **k: True)
    calls = []

    def fake_download(repo, filename, **kwargs):
        calls.append((repo, filename))
        return str(folder / filename)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    sae = FA.load_gelu_1l_sae("run1")
    assert calls == [(FA.GELU_1L_REPO, "25_cfg.json"), (FA.GELU_1L_REPO, "25.pt")]
    x = torch.randn(5, 16)
    expected = torch.relu((x - state["b_dec"]) @ state["W_enc"] + state["b_enc"])
    torch.testing.assert_close(sae.encode(x), expected)
    torch.testing.assert_close(sae.decode(expected), expected @ state["W_dec"] + state["b_dec"])
    assert sae.cfg.metadata.hook_name == "blocks.0.mlp.hook_post"
