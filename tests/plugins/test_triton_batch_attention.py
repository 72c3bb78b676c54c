"""The batched generator's Triton decode attention against SDPA over each row's visible slots.

The checks take a device: on CUDA they call batch_decode_attention, on the CPU (Triton's interpreter, a subprocess:
tests/plugins/interpreter.py) its kernel launcher, at fewer rows and in float16 and float32."""

import pytest
import torch
import torch.nn.functional as F

from jetspec_trt.plugins.triton_batch_attention import _launch, batch_decode_attention
from tests.plugins.interpreter import needs_triton, run_in_interpreter


def reference(q, k, v, pos, scale):
    """Row by row: the row's GROUP query heads of each KV head over slots 0..pos[b], in float32."""
    rows, num_heads, head_dim = q.shape
    group = num_heads // k.shape[1]
    out = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    for b in range(rows):
        n = int(pos[b]) + 1
        keys = k[b, :, :n].float().repeat_interleave(group, dim=0)  # [Hq, n, D]
        values = v[b, :, :n].float().repeat_interleave(group, dim=0)
        out[b] = F.scaled_dot_product_attention(q[b].float()[:, None], keys, values, scale=scale)[:, 0]
    return out


def attend(q, k, v, pos, scale):
    """The op on CUDA; elsewhere the launcher (the op itself refuses non-CUDA tensors)."""
    return (batch_decode_attention if q.is_cuda else _launch)(q, k, v, pos, scale)


def check_matches_reference(device, dtype, tol, num_heads, num_kv_heads, head_dim, rows=37):
    g = torch.Generator(device=device).manual_seed(0)
    slots = 200  # not a multiple of the 64-key tile
    q = torch.randn(rows, num_heads, head_dim, device=device, generator=g).to(dtype)
    k = torch.randn(rows, num_kv_heads, slots, head_dim, device=device, generator=g).to(dtype)
    v = torch.randn(rows, num_kv_heads, slots, head_dim, device=device, generator=g).to(dtype)
    pos = torch.randint(0, slots, (rows,), device=device, generator=g)
    pos[:4] = torch.tensor([0, 63, 64, slots - 1], device=device)  # one key, a full tile, one past it, all slots
    # Slots past pos hold garbage the kernel must never read into a row's result.
    k_garbage, v_garbage = k.clone(), v.clone()
    past = torch.arange(slots, device=device)[None, :] > pos[:, None]
    k_garbage.transpose(1, 2)[past] = 1e4
    v_garbage.transpose(1, 2)[past] = float("nan")
    scale = head_dim**-0.5
    out = attend(q, k_garbage, v_garbage, pos, scale)
    assert out.shape == q.shape and out.dtype == dtype
    torch.testing.assert_close(out.float(), reference(q, k, v, pos, scale), atol=tol, rtol=tol)


HEADS = [(14, 2, 64), (8, 2, 128), (4, 4, 64)]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("num_heads, num_kv_heads, head_dim", HEADS)
def test_matches_reference(dtype, tol, num_heads, num_kv_heads, head_dim):
    check_matches_reference("cuda", dtype, tol, num_heads, num_kv_heads, head_dim)


def check_layer_slice_of_the_batch_cache(device):
    """The decoder passes self.k[i], a slice of the [L, B, Hkv, S, D] cache: non-zero offset, same strides."""
    g = torch.Generator(device=device).manual_seed(1)
    cache_k = torch.randn(3, 5, 2, 96, 64, device=device, generator=g)
    cache_v = torch.randn(3, 5, 2, 96, 64, device=device, generator=g)
    q = torch.randn(5, 14, 64, device=device, generator=g)
    pos = torch.tensor([0, 10, 50, 95, 64], device=device)
    out = attend(q, cache_k[2], cache_v[2], pos, 0.125)
    torch.testing.assert_close(out, reference(q, cache_k[2], cache_v[2], pos, 0.125), atol=1e-5, rtol=1e-5)


@pytest.mark.gpu
def test_layer_slice_of_the_batch_cache():
    check_layer_slice_of_the_batch_cache("cuda")


def check_small(device):
    """Every head shape at 6 rows, float16 and float32 (the interpreter computes bf16 dots wrongly: interpreter.py)."""
    for heads in HEADS:
        check_matches_reference(device, torch.float16, 5e-3, *heads, rows=6)  # 6e-4 measured
        check_matches_reference(device, torch.float32, 1e-5, *heads, rows=6)
    check_layer_slice_of_the_batch_cache(device)


@needs_triton
def test_kernel_in_the_triton_interpreter():
    run_in_interpreter(check_small)


@pytest.mark.gpu
def test_small_cases_on_cuda():
    check_small("cuda")
