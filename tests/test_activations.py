"""Context windows, batches and the activation store."""

from __future__ import annotations

import pytest
import torch

from course_utils.science.activations import (
    ActivationStore,
    corpus_windows,
    iterate_batches,
    make_windows,
)
from course_utils.science.hooks import UnknownHookError
from course_utils.science.models import tiny_random_model


@pytest.fixture(scope="module")
def tiny():
    return tiny_random_model(seed=0)


@pytest.fixture(scope="module")
def tiny_windows(tiny):
    stream = torch.randint(1, tiny.cfg.d_vocab, (2000,), generator=torch.Generator().manual_seed(0))
    return make_windows(stream, tiny.cfg.n_ctx, bos_token_id=0)


def test_make_windows_prepends_bos_and_drops_the_tail():
    stream = torch.arange(1, 21)
    windows = make_windows(stream, n_ctx=5, bos_token_id=0)
    assert windows.shape == (5, 5)
    assert windows[:, 0].eq(0).all()
    assert windows[0].tolist() == [0, 1, 2, 3, 4]
    assert windows[1].tolist() == [0, 5, 6, 7, 8]
    shifted = make_windows(stream, n_ctx=5, bos_token_id=0, offset=2)
    assert shifted[0].tolist() == [0, 3, 4, 5, 6] and len(shifted) == 4


@pytest.mark.parametrize(
    "stream, n_ctx, offset, message",
    [
        (torch.zeros(3, 4, dtype=torch.long), 4, 0, "1-D token tensor"),
        (torch.arange(10), 1, 0, "n_ctx must be at least 2"),
        (torch.arange(3), 8, 0, "too short"),
        (torch.arange(30), 8, -1, "offset"),
    ],
)
def test_make_windows_rejects_bad_input(stream, n_ctx, offset, message):
    with pytest.raises(ValueError, match=message):
        make_windows(stream, n_ctx, 0, offset)


def test_iterate_batches_is_seeded_and_complete():
    windows = torch.arange(50).reshape(10, 5)
    first = torch.cat(list(iterate_batches(windows, 3, seed=1)))
    again = torch.cat(list(iterate_batches(windows, 3, seed=1)))
    other = torch.cat(list(iterate_batches(windows, 3, seed=2)))
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert sorted(first[:, 0].tolist()) == windows[:, 0].tolist()
    assert len(list(iterate_batches(windows, 3, drop_last=True))) == 3
    ordered = torch.cat(list(iterate_batches(windows, 4, shuffle=False)))
    assert torch.equal(ordered, windows)
    with pytest.raises(ValueError, match="batch_size"):
        next(iterate_batches(windows, 0))


def test_store_batches_have_the_right_shape_and_memory_stays_bounded(tiny, tiny_windows):
    store = ActivationStore(
        tiny,
        "blocks.0.hook_resid_post",
        tiny_windows,
        batch_size=64,
        buffer_tokens=512,
        model_batch_size=4,
        progress=False,
    )
    for _ in range(30):
        batch = store.next_batch()
        assert batch.shape == (64, tiny.cfg.d_model)
        assert len(store._buffer) <= 512
    assert store.tokens_seen >= 30 * 64
    assert store.epochs >= 1  # 2000 tokens / 15 per window: it wrapped around


def test_store_matches_run_with_cache(tiny, tiny_windows):
    store = ActivationStore(
        tiny, "blocks.1.mlp.hook_post", tiny_windows, progress=False, batch_size=8, buffer_tokens=64
    )
    acts = store.get_activations(tiny_windows[:2])
    _, cache = tiny.run_with_cache(tiny_windows[:2])
    torch.testing.assert_close(acts, cache["blocks.1.mlp.hook_post"])


def test_store_is_deterministic_and_shuffles_positions(tiny, tiny_windows):
    def batches(seed):
        store = ActivationStore(
            tiny,
            "blocks.0.hook_resid_post",
            tiny_windows,
            batch_size=32,
            buffer_tokens=256,
            seed=seed,
            progress=False,
        )
        return torch.cat([store.next_batch() for _ in range(5)])

    assert torch.equal(batches(0), batches(0))
    assert not torch.equal(batches(0), batches(1))


def test_store_flattens_heads(tiny, tiny_windows):
    store = ActivationStore(
        tiny, "blocks.0.attn.hook_z", tiny_windows, batch_size=16, buffer_tokens=64, progress=False
    )
    assert store.next_batch().shape == (16, tiny.cfg.n_heads * tiny.cfg.d_head)


def test_store_validates_the_hook_name_and_sizes(tiny, tiny_windows):
    with pytest.raises(UnknownHookError, match="Did you mean"):
        ActivationStore(tiny, "blocks.0.hook_resid_pots", tiny_windows)
    with pytest.raises(ValueError, match="buffer_tokens"):
        ActivationStore(
            tiny, "blocks.0.hook_resid_post", tiny_windows, batch_size=64, buffer_tokens=100
        )
    with pytest.raises(ValueError, match="n_ctx"):
        ActivationStore(tiny, "blocks.0.hook_resid_post", torch.zeros(4, 99, dtype=torch.long))


def test_corpus_windows_on_the_course_model():
    from course_utils.science.models import load_model

    model = load_model("course-2l")
    windows = corpus_windows(model, "validation")
    assert windows.shape[1] == model.cfg.n_ctx and len(windows) > 500
    assert windows[:, 0].eq(model.tokenizer.bos_token_id).all()
    store = ActivationStore(
        model,
        "blocks.0.hook_resid_post",
        windows,
        batch_size=256,
        buffer_tokens=2048,
        progress=False,
    )
    assert store.next_batch().shape == (256, 128)


def test_corpus_windows_ignore_the_truncation_to_tokens_switches_on():
    """model.to_tokens turns on truncation (to n_ctx) in the shared backend tokenizer; the corpus
    used to be re-tokenised with it, every file cut to 128 tokens (1153 -> 33 windows)."""
    from course_utils.science.models import load_model

    model = load_model("course-2l")
    before = corpus_windows(model, "validation")
    model.to_tokens("def foo(a, b")
    assert model.tokenizer.backend_tokenizer.truncation is not None  # the trap is still there
    after = corpus_windows(model, "validation")
    assert torch.equal(before, after)
