"""TargetModel.prefill: one causal pass over a sequence gives exactly what `forward` gives, logits only where asked."""

import pytest
import torch

from jetspec_trt.models.presets import random_models
from jetspec_trt.plugins.tree_attention import causal_mask

CAPTURE = (0, 2, 5)  # the tiny preset has 6 layers: 5 is the last one (taken after the final norm)


@pytest.fixture(scope="module", params=[torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def target(request):
    return random_models("tiny", "cpu", request.param, seed=3)[0]


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 256, (37,), generator=torch.Generator().manual_seed(4))


def reference(target, ids, capture=CAPTURE):
    n = ids.shape[0]
    with torch.no_grad():
        return target(ids, torch.arange(n), target.new_cache(n, 16), causal_mask(n), capture)


def test_all_logits_and_features_equal_forward(target, ids):
    ref = reference(target, ids)
    out = target.prefill(ids, capture_layers=CAPTURE, logits="all", page_size=16)
    assert out.logits.dtype == torch.float32 and out.logits.shape == (37, target.config.vocab_size)
    assert torch.equal(out.logits, ref.logits)
    assert torch.equal(out.features, ref.features)
    hidden = target.config.hidden_size
    assert torch.equal(out.hidden, ref.features[:, -hidden:])  # the last layer's entry is the final normed hidden


def test_last_logits_equal_forwards_last_row(target, ids):
    ref = reference(target, ids)
    out = target.prefill(ids.tolist(), logits="last")  # a list works as well as a tensor
    assert out.logits.dtype == torch.float32 and out.logits.shape == (1, target.config.vocab_size)
    assert out.features is None
    # The pass up to the lm_head is bit-identical; the lm_head then runs as a 1-row GEMM, which BLAS may round
    # differently from the same row of the n-row GEMM (CPU fp32 does, by ~1e-6): equal up to that rounding.
    last_hidden = ref.features[-1:, -target.config.hidden_size:]
    assert torch.equal(out.hidden, ref.features[:, -target.config.hidden_size:])
    assert torch.equal(out.logits, target.lm_head(last_hidden).float())
    torch.testing.assert_close(out.logits, ref.logits[-1:])


def test_none_skips_the_lm_head_and_keeps_features(target, ids):
    ref = reference(target, ids)
    out = target.prefill(ids, capture_layers=CAPTURE[:2], logits="none")
    assert out.logits is None
    assert torch.equal(out.features, ref.features[:, : 2 * target.config.hidden_size])
    assert torch.equal(target.lm_head(out.hidden).float(), ref.logits)


def test_a_given_cache_is_reset_then_holds_the_sequence(target, ids):
    n = ids.shape[0]
    ref_cache = target.new_cache(n, 16)
    with torch.no_grad():
        ref = target(ids, torch.arange(n), ref_cache, causal_mask(n))
    cache = target.new_cache(100, 16)
    target.prefill(ids.flip(0)[:20], cache, logits="none")  # something else there first
    assert cache.length == 20
    out = target.prefill(ids, cache)
    assert torch.equal(out.logits, ref.logits)
    assert cache.length == n and int(cache.ctx_len) == n
    assert torch.equal(cache.k_all.flatten(1, 2)[:, :n], ref_cache.k_all.flatten(1, 2)[:, :n])
    with pytest.raises(ValueError, match="does not fit"):
        target.prefill(torch.zeros(cache.capacity + 1, dtype=torch.long), cache)


def test_bad_arguments(target):
    with pytest.raises(ValueError, match="logits"):
        target.prefill([1, 2], logits="first")
    with pytest.raises(ValueError, match="1-D"):
        target.prefill([])
