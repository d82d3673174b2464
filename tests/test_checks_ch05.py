"""Every chapter-05 check passes the reference, flags the stub, and rejects known wrong answers."""

from __future__ import annotations

import pytest
import torch

from course_utils import circuits as C
from course_utils import transcoders as T
from course_utils.checks import ch05 as check
from tests.check_contract import contract_tests

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest.py


def _forward_leaky(x, W_enc, b_enc, W_dec, b_dec):
    z = torch.nn.functional.leaky_relu(x @ W_enc + b_enc, 0.1)
    return z, z @ W_dec + b_dec


def _pair_resid_pre(model, tokens, layer):
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens)
    return cache[f"blocks.{layer}.hook_resid_pre"], cache[f"blocks.{layer}.hook_mlp_out"]


# (check, reference, mistakes, an extra wrong answer not in the mistakes list)
CHECKS = [
    (check.transcoder_forward, T.transcoder_forward, check.FORWARD_MISTAKES, _forward_leaky),
    (
        check.transcoder_loss,
        T.transcoder_loss,
        check.LOSS_MISTAKES,
        lambda x, y, W_enc, b_enc, W_dec, b_dec, l1_coeff: T.transcoder_loss(
            x, y, W_enc, b_enc, W_dec, b_dec, 2 * l1_coeff + 0.1
        ),
    ),
    (
        check.skip_transcoder_forward,
        T.skip_transcoder_forward,
        check.SKIP_MISTAKES,
        lambda x, W_enc, b_enc, W_dec, b_dec, W_skip: T.transcoder_forward(
            x + x @ W_skip.T, W_enc, b_enc, W_dec, b_dec
        ),
    ),
    (check.transcoder_pair, T.transcoder_pair, check.PAIR_MISTAKES, _pair_resid_pre),
    (
        check.input_invariant_connections,
        lambda tc0, tc1: C.input_invariant_connections(tc0, tc1),
        check.CONNECTION_MISTAKES,
        lambda tc0, tc1: tc0.W_dec @ C.centre(tc1.W_enc, dim=0) / 2,
    ),
    (
        check.feature_attributions,
        C.feature_attributions,
        check.ATTRIBUTION_MISTAKES,
        lambda z0, tc0, tc1, feature, scale: C.feature_attributions(
            (z0 > 0).float(), tc0, tc1, feature, scale
        ),
    ),
    (
        check.head_attribution,
        C.head_attribution,
        check.HEAD_MISTAKES,
        lambda pattern, x_pre, W_V, W_O, f, dest: pattern[dest] * (x_pre @ f),
    ),
    (
        check.de_embedding,
        C.de_embedding,
        check.DE_EMBEDDING_MISTAKES,
        lambda model, tc, feature: -C.de_embedding(model, tc, feature),
    ),
    (
        check.keep_top,
        C.keep_top,
        check.KEEP_MISTAKES,
        lambda terms, top_k: (terms[:top_k], float(sum(t["value"] for t in terms[top_k:]))),
    ),
]

contract_tests(check, CHECKS, globals())


def test_keep_top_rejects_the_reviewers_input_order_answer():
    """Review P1.1: kept terms returned in input order, not largest first, used to pass."""
    from course_utils.checks.core import outcome

    def keep_in_input_order(terms, top_k):
        r = sorted(terms, key=lambda t: -abs(t["value"]))
        keep = [t for t in terms if t in r[:top_k]]
        return keep, float(sum(t["value"] for t in r[top_k:]))

    status, msg = outcome(check.keep_top, keep_in_input_order)
    assert status == "failed" and "largest |value| first" in msg
