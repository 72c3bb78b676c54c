"""The CPU reference of the tree-attention op against plain dense attention, and the mask packing."""

import pytest
import torch

from jetspec_trt.plugins.tree_attention import (causal_mask, pack_mask, packed_causal_mask, tree_attention,
                                                unpack_mask)
from jetspec_trt.models.kv_cache import KVCacheSpec, PagedKVCache


@pytest.mark.parametrize("n", [1, 5, 31, 32, 33, 64, 100])
def test_pack_roundtrip(n):
    dense = torch.rand(n, n) > 0.5
    packed = pack_mask(dense)
    assert packed.dtype == torch.int32 and packed.shape == (n, (n + 31) // 32)
    assert torch.equal(unpack_mask(packed, n), dense)


def test_packed_bit_layout_is_lsb_first():
    dense = torch.zeros(1, 40, dtype=torch.bool)
    dense[0, [0, 31, 33]] = True
    packed = pack_mask(dense)
    assert packed[0, 0].item() == 1 - 2**31  # bits 0 and 31 (sign bit) of word 0
    assert packed[0, 1].item() == 2  # bit 1 of word 1 = token 33


@pytest.mark.parametrize("ctx,new,heads,kv_heads", [(0, 7, 4, 2), (13, 1, 4, 4), (37, 20, 8, 2), (64, 33, 2, 1)])
def test_reference_matches_dense_attention(ctx, new, heads, kv_heads):
    g = torch.Generator().manual_seed(ctx + new)
    d = 16
    cache = PagedKVCache(KVCacheSpec(1, kv_heads, d, 128, page_size=8))
    cache.block_table = cache.block_table[torch.randperm(cache.block_table.numel(), generator=g)].contiguous()
    k = torch.randn(ctx + new, kv_heads, d, generator=g)
    v = torch.randn(ctx + new, kv_heads, d, generator=g)
    cache.write(0, cache.slots(torch.zeros(1, dtype=torch.int32), ctx + new), k, v)
    cache.set_length(ctx)
    parents = [-1] + [int(torch.randint(0, i, (1,), generator=g)) for i in range(1, new)]
    dense = torch.zeros(new, new, dtype=torch.bool)
    for i in range(new):
        dense[i] = dense[parents[i]] if parents[i] >= 0 else dense[i]
        dense[i, i] = True
    q = torch.randn(new, heads, d, generator=g)
    out = tree_attention(q, cache.k[0], cache.v[0], cache.block_table, cache.ctx_len, pack_mask(dense), d**-0.5)
    visible = torch.cat([torch.ones(new, ctx, dtype=torch.bool), dense], dim=1)
    kk = k.repeat_interleave(heads // kv_heads, 1)
    vv = v.repeat_interleave(heads // kv_heads, 1)
    ref = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(0, 1), kk.transpose(0, 1), vv.transpose(0, 1), attn_mask=visible, scale=d**-0.5
    ).transpose(0, 1)
    assert (out - ref).abs().max() < 1e-5


def test_causal_mask():
    assert torch.equal(unpack_mask(causal_mask(40), 40), torch.ones(40, 40, dtype=torch.bool).tril())


def test_whole_cache_variant_equals_prefix_variant():
    """The sync-free variant used on GPUs without a kernel computes the same function."""
    from jetspec_trt.plugins.tree_attention import _masked_attention, _whole_cache, tree_attention_reference

    g = torch.Generator().manual_seed(3)
    cache = PagedKVCache(KVCacheSpec(1, 2, 8, 64, page_size=8))
    cache.k[0].normal_(generator=g)
    cache.v[0].normal_(generator=g)
    cache.set_length(21)
    dense = torch.rand(9, 9, generator=g) > 0.5
    q = torch.randn(9, 4, 8, generator=g)
    mask = pack_mask(dense | torch.eye(9, dtype=torch.bool))
    expected = tree_attention_reference(q, cache.k[0], cache.v[0], cache.block_table, cache.ctx_len, mask, 0.3)
    keys, values, visible = _whole_cache(cache.k[0], cache.v[0], cache.block_table, cache.ctx_len, mask, 9)
    assert (expected - _masked_attention(q, keys, values, visible, 0.3)).abs().max() < 1e-5


def test_causal_masks_built_word_by_word_equal_packing_the_dense_ones():
    """causal_mask and packed_causal_mask (block-diagonal, sequences packed back to back) equal pack_mask of the
    dense boolean masks, across word boundaries and sequences that start mid-word."""
    for n in (1, 31, 32, 33, 64, 100):
        assert torch.equal(causal_mask(n), pack_mask(torch.ones(n, n, dtype=torch.bool).tril()))
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        lengths = torch.randint(1, 80, (int(torch.randint(1, 6, (1,), generator=g)),), generator=g)
        segment = torch.repeat_interleave(torch.arange(len(lengths)), lengths)
        index = torch.arange(int(lengths.sum()))
        dense = (segment[:, None] == segment[None, :]) & (index[None, :] <= index[:, None])
        assert torch.equal(packed_causal_mask(lengths), pack_mask(dense)), lengths.tolist()
