"""The draft head's engine switches: the fused path writes the context K/V the plain path writes."""

import torch

from jetspec_trt.models.presets import random_models


def test_fused_context_write_matches_the_plain_one():
    """One GEMM over the fused weight's k/v rows, then k norm + RoPE + the write in one op (here its torch
    reference), against each layer's k_proj/v_proj, k norm, RoPE and write_kv."""
    _, draft, _ = random_models("tiny", "cpu", torch.float32)
    draft.fuse_weights()
    features = torch.randn(5, draft.fc.weight.shape[1], generator=torch.Generator().manual_seed(2))
    positions = torch.arange(7, 12)
    caches = []
    for fused in (False, True):
        draft.set_fused_layer_kernels(fused)
        cache = draft.new_cache(64, page_size=16)
        cache.set_length(7)
        draft.write_context(features, positions, cache)
        caches.append(cache)
    plain, fused = caches
    for layer in range(len(draft.layers)):
        for a, b in ((plain.k[layer], fused.k[layer]), (plain.v[layer], fused.v[layer])):
            assert torch.allclose(a, b, atol=1e-5, rtol=1e-5)
            assert a.abs().sum() > 0  # the rows were written
