"""A compiled decoder layer's cost must follow the context in use, not the cache's allocation.

Inductor used to write the new K/V into a clone of the whole per-layer cache (its reinplacing pass gave up on the
fused-QKV layer) and copy it back: every AR step paid a pass over every allocated slot of every layer
(docs/engine.md, "Per-step cost and the allocated context"). The layer now writes and attends outside the
compiled graphs (models.target.paged_attention), so no compiled graph sees a cache-shaped tensor at all.
"""

import pytest
import torch

from jetspec_trt.models.config import DecoderConfig
from jetspec_trt.models.kv_cache import KVCacheSpec, PagedKVCache
from jetspec_trt.models.layers import Rotary
from jetspec_trt.models.target import DecoderLayer
from jetspec_trt.plugins.tree_attention import causal_mask

PAGES, PAGE, KV_HEADS, HEAD_DIM = 37, 16, 2, 16  # 37: a page count no other shape of the layer has


@pytest.mark.parametrize("fused_gemm,fused_kernels", [(False, False), (True, False), (True, True)],
                         ids=["separate-qkv", "fused-qkv", "fused-layer-kernels"])
def test_compiled_layer_never_sees_the_cache(fused_gemm, fused_kernels):
    from torch._inductor.utils import run_and_get_code

    torch.manual_seed(0)
    cfg = DecoderConfig("qwen3", 100, 64, 128, 2, 4, KV_HEADS, HEAD_DIM, 1e-6, 4096, False, False, True)
    layer = DecoderLayer(cfg).eval()
    if fused_gemm:  # the layout GPU engines run, where Inductor cloned the caches
        layer.self_attn.fuse()
        layer.mlp.fuse()
    layer.fused_kernels = fused_kernels  # the plugins.layer_kernels ops (their torch reference on the CPU)
    rotary = Rotary(1.0 / (10000 ** (torch.arange(0, HEAD_DIM, 2).float() / HEAD_DIM)))
    caches = [PagedKVCache(KVCacheSpec(2, KV_HEADS, HEAD_DIM, PAGES * PAGE, PAGE)) for _ in range(2)]
    for cache in caches:
        cache.set_length(21)
    x = torch.randn(3, 64)
    cos, sin = rotary.cos_sin(caches[0].ctx_len.long() + torch.arange(3), x.dtype)

    def run(fn, cache):  # layer 1: a view into the middle of the caches' all-layer tensors
        return fn(x, cos, sin, cache.k[1], cache.v[1], cache.block_table, cache.ctx_len,
                  cache.slots(cache.ctx_len, 3), causal_mask(3))

    with torch.inference_mode():
        expected = run(layer, caches[0])
        got, codes = run_and_get_code(lambda *a: run(torch.compile(layer, dynamic=False), caches[1]))
    assert torch.allclose(got, expected, atol=1e-5)
    for name in ("k_all", "v_all"):  # written in place, where the eager layer writes (up to Inductor's rounding)
        assert torch.allclose(getattr(caches[1], name), getattr(caches[0], name), atol=1e-5)
    assert codes, "nothing was compiled"
    cache_shape = f"({PAGES}, {PAGE}, {KV_HEADS}, {HEAD_DIM})"
    assert not any(cache_shape in code for code in codes), "a compiled graph takes (or copies) the KV cache"
