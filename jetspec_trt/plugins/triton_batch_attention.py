"""Triton decode attention for the batched generator (runtime/batch_decode.py): B rows, one new token each.

The batch cache is contiguous, [B, Hkv, S, D] per layer, and row b's visible keys are its slots 0..pos[b].
SDPA with an additive [B, 1, 1, S] mask reads all S slots of every row, live or not, and at batch 1024 its
memory-efficient kernel gets one query row per (row, query head) pair. Here a program owns ONE row and ONE KV
head: its GROUP query heads share every K/V tile it loads (the tree-attention kernel's GQA trick), and it walks
only the row's own pos[b] + 1 keys, so a row costs what it holds. pos stays on the device (no host sync): the
launch depends on shapes alone and a CUDA graph replays it for any lengths.
"""

from __future__ import annotations

import torch

from jetspec_trt.plugins.triton_tree_attention import LOG2E, triton

if triton is not None:
    import triton.language as tl

    from jetspec_trt.plugins.triton_tree_attention import _softmax_step

    @triton.jit
    def _batch_decode_kernel(q_ptr, k_ptr, v_ptr, pos_ptr, out_ptr, qk_scale,
                             stride_qb, stride_qh, stride_kb, stride_kh, stride_ks, stride_ob, stride_oh,
                             GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
                             BLOCK_N: tl.constexpr, IEEE: tl.constexpr):
        b = tl.program_id(0).to(tl.int64)
        kv_head = tl.program_id(1)
        rows = tl.arange(0, BLOCK_M)
        row_ok = rows < GROUP
        head = kv_head * GROUP + rows
        dims = tl.arange(0, HEAD_DIM)
        q = tl.load(q_ptr + b * stride_qb + head[:, None] * stride_qh + dims[None, :], mask=row_ok[:, None],
                    other=0.0)
        num_keys = tl.load(pos_ptr + b) + 1
        kv = b * stride_kb + kv_head * stride_kh
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
        offs = tl.arange(0, BLOCK_N)
        full_tiles = num_keys // BLOCK_N
        for tile in range(0, full_tiles):  # full tiles: no bounds, no mask
            ptrs = kv + (tile * BLOCK_N + offs)[:, None] * stride_ks + dims[None, :]
            k = tl.load(k_ptr + ptrs)
            v = tl.load(v_ptr + ptrs)
            acc, m_i, l_i = _softmax_step(acc, m_i, l_i, q, k, v, row_ok, qk_scale, False, IEEE)
        if full_tiles * BLOCK_N < num_keys:  # the partial last tile
            keys = full_tiles * BLOCK_N + offs
            key_ok = keys < num_keys
            ptrs = kv + keys[:, None] * stride_ks + dims[None, :]
            k = tl.load(k_ptr + ptrs, mask=key_ok[:, None], other=0.0)
            v = tl.load(v_ptr + ptrs, mask=key_ok[:, None], other=0.0)
            acc, m_i, l_i = _softmax_step(acc, m_i, l_i, q, k, v, key_ok[None, :], qk_scale, True, IEEE)
        out = acc / l_i[:, None]
        tl.store(out_ptr + b * stride_ob + head[:, None] * stride_oh + dims[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])


def batch_decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor,
                           scale: float) -> torch.Tensor:
    """q [B, Hq, D]; k, v [B, Hkv, S, D] (row b's keys at slots 0..pos[b]); pos [B] int64 -> out [B, Hq, D]."""
    if triton is None or not q.is_cuda:
        raise RuntimeError("batch_decode_attention needs Triton and CUDA tensors")
    return _launch(q, k, v, pos, scale)


def _launch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor, scale: float) -> torch.Tensor:
    """The kernel on q's device (tests call it on CPU tensors in Triton's interpreter)."""
    rows, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    group = num_heads // num_kv_heads
    if k.stride(3) != 1 or v.stride() != k.stride() or q.stride(2) != 1:
        raise ValueError("batch_decode_attention wants K/V [B, Hkv, S, D] with equal strides and unit-stride heads")
    out = torch.empty_like(q)
    pos = pos.contiguous()  # read as pos_ptr + b (a no-op for the decoder's own positions)
    block_m = max(16, triton.next_power_of_2(group))  # tl.dot wants M >= 16
    _batch_decode_kernel[(rows, num_kv_heads)](
        q, k, v, pos, out, scale * LOG2E,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), k.stride(2), out.stride(0), out.stride(1),
        GROUP=group, HEAD_DIM=head_dim, BLOCK_M=block_m, BLOCK_N=64, IEEE=q.dtype == torch.float32,
        num_warps=4, num_stages=2,
    )
    return out
