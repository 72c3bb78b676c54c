"""Triton kernel for `jetspec_trt::tree_attention` on CUDA (the op's contract is in tree_attention.py).

One kernel serves prefill, decode and tree verify. A program owns BLOCK_M query rows of one KV head, where a
row is a (new token, query head of that KV group) pair: GQA heads share every K/V tile they load, and a decode
step still fills a tensor-core tile (T=1 with 4 heads per group = 4 real rows). Keys stream page by page through
the block table with an online softmax in fp32. The committed prefix is visible to all rows; new token j is
visible to row i when bit j of the packed mask row is set.

Two facts keep the work proportional to what is visible:
  * rows of new token i never see new tokens j > i (causal prefill, and trees whose parents precede their
    children), so a program stops at ctx_len + (its last token) + 1;
  * at decode (few rows) the key range is split across programs (flash-decoding) and a second kernel merges
    the partial softmaxes; otherwise a batch-1 decode would run on 8 of 132 SMs.
ctx_len is read inside the kernels, so launches depend only on shapes and CUDA graphs replay at any context.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

_REGISTERED = False


def _kernels():
    import triton
    import triton.language as tl

    @triton.jit
    def attend(
        q_ptr, k_ptr, v_ptr, table_ptr, ctx_ptr, mask_ptr, out_ptr, part_ptr, lse_ptr,
        scale, num_new, mask_words,
        stride_qt, stride_qh, stride_kp, stride_ks, stride_kh, stride_mt,
        GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, PAGE: tl.constexpr, NUM_HEADS: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SPLITS: tl.constexpr, IEEE: tl.constexpr,
    ):
        row_block = tl.program_id(0)
        kv_head = tl.program_id(1)
        split = tl.program_id(2)
        rows = row_block * BLOCK_M + tl.arange(0, BLOCK_M)
        token = rows // GROUP
        head = kv_head * GROUP + rows % GROUP
        row_ok = token < num_new
        dims = tl.arange(0, HEAD_DIM)
        q = tl.load(q_ptr + token[:, None] * stride_qt + head[:, None] * stride_qh + dims[None, :],
                    mask=row_ok[:, None], other=0.0)
        ctx = tl.load(ctx_ptr)
        last_token = tl.minimum(row_block * BLOCK_M + BLOCK_M - 1, num_new * GROUP - 1) // GROUP
        bound = ctx + last_token + 1  # keys past this are invisible to every row of this program
        per_split = tl.cdiv(tl.cdiv(bound, SPLITS), BLOCK_N) * BLOCK_N
        start = split * per_split
        stop = tl.minimum(start + per_split, bound)

        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
        qk_scale = scale * 1.4426950408889634  # softmax in base 2
        for key0 in range(start, stop, BLOCK_N):
            keys = key0 + tl.arange(0, BLOCK_N)
            key_ok = keys < stop
            page = tl.load(table_ptr + keys // PAGE, mask=key_ok, other=0)
            slot = page.to(tl.int64) * stride_kp + (keys % PAGE) * stride_ks + kv_head * stride_kh
            k = tl.load(k_ptr + slot[:, None] + dims[None, :], mask=key_ok[:, None], other=0.0)
            v = tl.load(v_ptr + slot[:, None] + dims[None, :], mask=key_ok[:, None], other=0.0)
            if IEEE:  # fp32 inputs: exact fp32 products, so fp32 engines stay bit-comparable to the reference
                s = tl.dot(q, tl.trans(k), input_precision="ieee") * qk_scale
            else:
                s = tl.dot(q, tl.trans(k)) * qk_scale
            new = keys - ctx  # index among the new tokens (negative for the committed prefix)
            in_tree = (new >= 0) & key_ok
            word = tl.load(mask_ptr + token[:, None] * stride_mt + (new[None, :] // 32),
                           mask=row_ok[:, None] & in_tree[None, :], other=0)
            bit = (word >> (new[None, :] % 32)) & 1
            visible = ((new[None, :] < 0) & key_ok[None, :]) | (in_tree[None, :] & (bit != 0))
            s = tl.where(visible & row_ok[:, None], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.exp2(s - m_safe[:, None])
            alpha = tl.exp2(m_i - m_safe)
            l_i = l_i * alpha + tl.sum(p, 1)
            if IEEE:
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
            else:
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_new

        out_offsets = token[:, None] * (NUM_HEADS * HEAD_DIM) + head[:, None] * HEAD_DIM + dims[None, :]
        if SPLITS == 1:
            result = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
            tl.store(out_ptr + out_offsets, result.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])
        else:
            # Partial result of this split, normalised, plus its log-sum-exp (base 2) for the merge.
            part = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
            lse = tl.where(l_i == 0.0, float("-inf"), m_i + tl.log2(tl.where(l_i == 0.0, 1.0, l_i)))
            flat_row = token * NUM_HEADS + head
            tl.store(part_ptr + split * (num_new * NUM_HEADS * HEAD_DIM) + out_offsets, part, mask=row_ok[:, None])
            tl.store(lse_ptr + split * (num_new * NUM_HEADS) + flat_row, lse, mask=row_ok)

    @triton.jit
    def merge(part_ptr, lse_ptr, out_ptr, rows_total, HEAD_DIM: tl.constexpr, SPLITS: tl.constexpr):
        row = tl.program_id(0)
        dims = tl.arange(0, HEAD_DIM)
        splits = tl.arange(0, SPLITS)
        lse = tl.load(lse_ptr + splits * rows_total + row)
        top = tl.max(lse, 0)
        top = tl.where(top == float("-inf"), 0.0, top)
        weight = tl.exp2(lse - top)
        parts = tl.load(part_ptr + splits[:, None] * (rows_total * HEAD_DIM) + row * HEAD_DIM + dims[None, :])
        total = tl.sum(weight, 0)
        out = tl.sum(parts * weight[:, None], 0) / tl.where(total == 0.0, 1.0, total)
        tl.store(out_ptr + row * HEAD_DIM + dims, out.to(out_ptr.dtype.element_ty))

    return attend, merge


_KERNELS = None


# Programs wanted per launch: about two waves on an H100 (132 SMs).
TARGET_PROGRAMS = 264


def _splits_for(row_blocks: int, kv_heads: int) -> int:
    """Split the key range until the launch has about TARGET_PROGRAMS programs (decode, short trees, long
    contexts); a large prefill already has enough row blocks. Empty splits exit at once."""
    wanted = max(1, min(16, TARGET_PROGRAMS // (row_blocks * kv_heads)))
    return 1 << (wanted.bit_length() - 1)  # a power of two: the merge kernel spans splits with tl.arange


@dataclass(frozen=True)
class LaunchConfig:
    block_m: int
    block_n: int
    warps: int
    stages: int
    splits: int


def default_launch(num_new: int, num_heads: int, num_kv_heads: int, head_dim: int) -> LaunchConfig:
    rows = num_new * (num_heads // num_kv_heads)
    block_m = 16 if rows <= 16 else 64
    warps = 8 if block_m == 64 and head_dim > 64 else 4
    return LaunchConfig(block_m, 64, warps, 2, _splits_for(triton_cdiv(rows, block_m), num_kv_heads))


def tree_attention_triton(q, k_cache, v_cache, block_table, ctx_len, tree_mask, scale, launch=None):
    global _KERNELS
    if _KERNELS is None:
        _KERNELS = _kernels()
    attend, merge = _KERNELS
    num_new, num_heads, head_dim = q.shape
    num_kv_heads, page = k_cache.shape[2], k_cache.shape[1]
    group = num_heads // num_kv_heads
    rows = num_new * group
    launch = launch or default_launch(num_new, num_heads, num_kv_heads, head_dim)
    block_m, block_n, warps, splits = launch.block_m, launch.block_n, launch.warps, launch.splits
    q = q.contiguous()
    out = torch.empty_like(q)
    if splits > 1:
        part = torch.empty(splits, num_new * num_heads * head_dim, dtype=torch.float32, device=q.device)
        lse = torch.empty(splits, num_new * num_heads, dtype=torch.float32, device=q.device)
    else:
        part = lse = out  # unused
    grid = (triton_cdiv(rows, block_m), num_kv_heads, splits)
    attend[grid](
        q, k_cache, v_cache, block_table, ctx_len, tree_mask, out, part, lse,
        scale, num_new, tree_mask.shape[1],
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), tree_mask.stride(0),
        GROUP=group, HEAD_DIM=head_dim, PAGE=page, NUM_HEADS=num_heads,
        BLOCK_M=block_m, BLOCK_N=block_n, SPLITS=splits, IEEE=q.dtype == torch.float32, num_warps=warps, num_stages=launch.stages,
    )
    if splits > 1:
        merge[(num_new * num_heads,)](part, lse, out, num_new * num_heads, HEAD_DIM=head_dim, SPLITS=splits)
    return out


def triton_cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def ensure_registered() -> bool:
    """Register the kernel as the CUDA implementation of the op (idempotent). False without CUDA/Triton."""
    global _REGISTERED
    if _REGISTERED:
        return True
    if not torch.cuda.is_available():
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    torch.library.impl("jetspec_trt::tree_attention", "CUDA")(tree_attention_triton)
    _REGISTERED = True
    return True
