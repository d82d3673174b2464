"""Every chapter-04 check passes the reference, flags the stub, and rejects known wrong answers."""

from __future__ import annotations

import pytest

from course_utils import e2e_saes as E
from course_utils.checks import ch04 as check
from tests.check_contract import contract_tests

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest.py


def _splice_at_resid_post(model, sae, tokens, hook_name, downstream_hooks=()):
    return E.splice_sae(
        model, sae, tokens, hook_name.replace("resid_pre", "resid_mid"), downstream_hooks
    )


def _train_without_clipping_and_half_lr(model, sae, cfg, batches):
    from dataclasses import replace

    return E.train_sae(model, sae, replace(cfg, lr=cfg.lr / 2), batches, progress=False)


# (check, reference, mistakes, an extra wrong answer not in the mistakes list)
CHECKS = [
    (check.splice_sae, E.splice_sae, check.SPLICE_MISTAKES, _splice_at_resid_post),
    (
        check.kl_spliced_vs_original,
        E.kl_spliced_vs_original,
        check.KL_MISTAKES,
        lambda new_logits, orig_logits: (new_logits - orig_logits).pow(2).mean(),
    ),
    (
        check.loss_local,
        E.loss_local,
        check.LOCAL_MISTAKES,
        lambda x, x_hat, c, lam: (x_hat - x).pow(2).mean() + lam * c.abs().mean(),
    ),
    (
        check.loss_e2e,
        E.loss_e2e,
        check.E2E_MISTAKES,
        lambda new_logits, orig_logits, c, lam, d_in: (
            E.loss_e2e(new_logits, orig_logits, c, lam, d_in) * 0.5
        ),
    ),
    (
        check.loss_e2e_ds,
        E.loss_e2e_ds,
        check.DS_MISTAKES,
        lambda new_logits, orig_logits, c, lam, d_in, new_downstream, orig_downstream, beta, kl_coeff=0.5: (
            E.loss_e2e(new_logits, orig_logits, c, lam, d_in)
        ),
    ),
    (
        check.train_sae,
        check._reference_train,
        check.TRAIN_MISTAKES,
        _train_without_clipping_and_half_lr,
    ),
    (
        check.max_cosine_within,
        E.max_cosine_within,
        check.COS_MISTAKES,
        lambda W_dec: (W_dec @ W_dec.T).mean(-1),
    ),
]

contract_tests(check, CHECKS, globals())
