"""The decode GEMV op: CPU fallback is F.linear exactly; on CUDA the Triton kernel matches a float64 reference
over the decode shapes of the 0.5B and 8B models (and odd ones), with and without bias; models switched to it give
the same logits on CPU and rounding-close ones on CUDA."""

import pytest
import torch
import torch.nn.functional as F

from jetspec_trt.models.presets import random_models
from jetspec_trt.plugins.gemv import gemv
from jetspec_trt.plugins.linear import linear
from jetspec_trt.plugins.tree_attention import causal_mask


def test_cpu_fallback_is_f_linear():
    g = torch.Generator().manual_seed(0)
    x, w, b = torch.randn(1, 64, generator=g), torch.randn(96, 64, generator=g), torch.randn(96, generator=g)
    assert torch.equal(gemv(x, w, b), F.linear(x, w, b))
    assert torch.equal(gemv(x, w, None), F.linear(x, w))
    # linear() only takes the op for one row with the switch on
    x3 = torch.randn(3, 64, generator=g)
    assert torch.equal(linear(x3, w, b, True), F.linear(x3, w, b))
    assert torch.equal(linear(x, w, None, False), F.linear(x, w))


def test_model_switch_keeps_cpu_logits():
    target, _, _ = random_models("tiny", "cpu", torch.float32)
    target.fuse_weights()
    ids = torch.tensor([5, 9, 200])

    def logits():
        outs = []
        for t in range(3):  # prefill of 1 token, then single-token steps: the GEMV path's case
            cache = target.new_cache(16, 8)
            outs.append(target(ids[t : t + 1], torch.tensor([t]), cache, causal_mask(1)).logits)
        return torch.cat(outs)

    plain = logits()
    target.set_decode_gemv(True)
    assert all(layer.mlp.decode_gemv and layer.self_attn.decode_gemv for layer in target.layers)
    assert torch.equal(logits(), plain)


SHAPES = [(896, 896), (1152, 896), (9728, 896), (896, 4864), (6144, 4096), (4096, 12288), (151936, 896),
          (1000, 1000), (7, 300), (33, 4097)]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("n, k", SHAPES)
def test_triton_gemv_matches_reference(n, k, dtype):
    g = torch.Generator(device="cuda").manual_seed(n * 31 + k)
    x = torch.randn(1, k, device="cuda", generator=g).to(dtype)
    w = (torch.randn(n, k, device="cuda", generator=g) / k**0.5).to(dtype)
    b = torch.randn(n, device="cuda", generator=g).to(dtype)
    for bias in (None, b):
        got = gemv(x, w, bias)
        ref = F.linear(x.double(), w.double(), None if bias is None else bias.double())
        assert got.dtype == dtype and got.shape == (1, n)
        err = (got.double() - ref).norm() / ref.norm()
        # float32 accumulation; the output rounding of the dtype dominates
        assert err < {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype], float(err)


@pytest.mark.gpu
def test_decode_gemv_model_logits_close_on_cuda():
    target, _, _ = random_models("tiny", "cuda", torch.bfloat16)
    target.fuse_weights()
    cache = target.new_cache(16, 8)

    def step():
        cache.set_length(0)
        return target(torch.tensor([7], device="cuda"), torch.tensor([0], device="cuda"), cache,
                      causal_mask(1, "cuda")).logits

    plain = step()
    target.set_decode_gemv(True)
    fast = step()
    target.set_decode_gemv(False)
    err = (fast - plain).norm() / plain.norm()
    assert err < 2e-2, float(err)
