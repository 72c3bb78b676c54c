"""The tree-attention op: one contract for prefill, decode, tree verify and the draft block.

Contract of ``torch.ops.jetspec_trt.tree_attention`` (batch 1, the single-stream case JetSpec targets):

    out = tree_attention(q, k_cache, v_cache, block_table, ctx_len, tree_mask, scale)

    q            [T, Hq, D]      queries of the T new tokens (RoPE already applied)
    k_cache      [P, S, Hkv, D]  paged keys: P pages of S slots; Hq % Hkv == 0 (GQA)
    v_cache      [P, S, Hkv, D]  paged values
    block_table  int32 [M]       logical page i of the sequence lives in physical page block_table[i]
    ctx_len      int32 [1]       committed tokens; they sit at logical slots 0..ctx_len-1 and every query sees them
    tree_mask    int32 [T, W]    W = ceil(T/32); bit (j % 32) of word j // 32 in row i (LSB first) is set when
                                 query i may see new token j. New token j sits at logical slot ctx_len + j.
                                 Rows hold the token itself and its ancestors (a causal mask for prefill and the
                                 draft block, [[1]] for a decode step). TensorRT-LLM's spec_decoding_packed_mask
                                 uses the same bit layout.
    scale        float           softmax scale (head_dim ** -0.5 for Qwen)
    returns      [T, Hq, D]      in q's dtype; accumulation in float32

Contract of ``torch.ops.jetspec_trt.tree_attention_batched`` (S sequences whose caches share one pool's K/V):

    out = tree_attention_batched(q, k_cache, v_cache, block_tables, ctx_lens, cu_seqlens, tree_masks, scale)

    q            [T, Hq, D]      the sequences' new tokens back to back (T = their sum)
    block_tables int32 [S, M]    row s: sequence s's block table, padded past its pages (padding never read)
    ctx_lens     int32 [S]       committed tokens of each sequence
    cu_seqlens   int32 [S+1]     sequence s's new tokens are q[cu_seqlens[s] : cu_seqlens[s+1]]
    tree_masks   int32 [T, W]    row r: its sequence's mask row as the op above takes it (bits relative to the
                                 sequence's first new token), zero-padded to the common width W
    returns      [T, Hq, D]      row r as tree_attention gives it for r's sequence alone

Every length lives on the device: a CUDA launch depends on shapes only (T, S, M, W), so graphs can capture it.
`BatchedAttention.build` makes the last four from the sequences' own tables, lengths and masks.

The caller has already written the new tokens' K/V into their slots. ``ctx_len`` is a tensor, not an int,
so a CUDA graph captured once replays at any context length. The CPU reference below is the specification;
GPU kernels registered for the same op must match it (tests compare them).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Callable

import torch

LIBRARY = "jetspec_trt"


def triton_kernel_once(build: Callable[[], Callable]) -> Callable[[], Callable | None]:
    """Decorator for an op's kernel builder: `build` (which imports Triton and returns the kernel's launcher) runs
    on the first call only, and the launcher is None where Triton is missing."""

    @functools.cache
    def kernel() -> Callable | None:
        try:
            return build()
        except ImportError:
            return None

    return kernel


def signals_dependents(device: torch.device) -> bool:
    """Whether our kernels on `device` signal their programmatic dependents at their start
    (griddepcontrol.launch_dependents): CUDA devices of compute capability 9.0 and up, where the decode GEMV can be
    launched as one (plugins/gemv.py, PDL). Where no dependent is launched that way, the signal does nothing."""
    return device.type == "cuda" and _capability(torch.cuda.current_device() if device.index is None
                                                 else device.index) >= (9, 0)


@functools.cache
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


OP_NAME = "tree_attention"

torch.library.define(
    f"{LIBRARY}::{OP_NAME}",
    "(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_table, Tensor ctx_len, Tensor tree_mask, "
    "float scale) -> Tensor",
)


torch.library.define(
    f"{LIBRARY}::{OP_NAME}_batched",
    "(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, Tensor ctx_lens, Tensor cu_seqlens, "
    "Tensor tree_masks, float scale) -> Tensor",
)


def mask_words(num_tokens: int) -> int:
    """Number of int32 words per packed mask row."""
    return (num_tokens + 31) // 32


def pack_mask(dense: torch.Tensor) -> torch.Tensor:
    """Bool [T, T] (row i may see column j) -> packed int32 [T, ceil(T/32)], LSB first."""
    t = dense.shape[-1]
    words = mask_words(t)
    padded = torch.zeros(*dense.shape[:-1], words * 32, dtype=torch.int64, device=dense.device)
    padded[..., :t] = dense.to(torch.int64)
    bits = padded.view(*dense.shape[:-1], words, 32) << torch.arange(32, device=dense.device)
    packed = bits.sum(-1)
    # Fold into the signed int32 range (bit 31 set -> negative), as the kernels read raw 32-bit words.
    packed = torch.where(packed >= 2**31, packed - 2**32, packed)
    return packed.to(torch.int32)


def unpack_mask(packed: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """Packed int32 [T, W] -> bool [T, num_tokens]."""
    shifts = torch.arange(32, device=packed.device, dtype=torch.int64)
    bits = (packed.to(torch.int64).unsqueeze(-1) >> shifts) & 1
    return bits.flatten(-2)[..., :num_tokens].bool()


def causal_mask(num_tokens: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Packed lower-triangular mask (prefill, the draft block), built word by word: O(T * T/32) memory."""
    rows = torch.arange(num_tokens, device=device)
    return _band_mask(rows, torch.zeros_like(rows))


def packed_causal_mask(lengths: torch.Tensor) -> torch.Tensor:
    """Packed block-diagonal causal mask of sequences packed back to back (`lengths` [S] long): a token sees its
    own sequence's tokens up to itself. Word by word, like causal_mask: a 16 K-token pack is 33 MB, where packing
    a dense bool mask went through a 2 GB int64 intermediate."""
    starts = torch.cumsum(lengths, 0) - lengths
    rows = torch.arange(int(lengths.sum()), device=lengths.device)
    return _band_mask(rows, torch.repeat_interleave(starts, lengths))


def _band_mask(rows: torch.Tensor, first: torch.Tensor) -> torch.Tensor:
    """Packed int32 [T, ceil(T/32)]: row i sees columns first[i] .. i."""
    words = torch.arange(mask_words(rows.numel()), device=rows.device)[None, :] * 32
    lo = (first[:, None] - words).clamp(0, 32)  # bits below lo are before the row's first column
    hi = (rows[:, None] + 1 - words).clamp(0, 32)  # bits from hi on are after the row itself
    packed = ((1 << hi) - 1) & ~((1 << lo) - 1)
    return torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)


def gather_pages(cache: torch.Tensor, block_table: torch.Tensor, length: int) -> torch.Tensor:
    """Paged [P, S, H, D] -> contiguous [length, H, D] of the sequence's first `length` slots."""
    page_size = cache.shape[1]
    pages = math.ceil(length / page_size)
    flat = cache[block_table[:pages].long()].flatten(0, 1)
    return flat[:length]


def tree_attention_reference(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    ctx_len: torch.Tensor,
    tree_mask: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Reference implementation (any device): gathers the pages and runs masked softmax attention in fp32.

    On CPU it reads ctx_len on the host and gathers only the live prefix. On other devices it attends over the
    whole cache with a device-side mask, which is slow but has no host sync, so CUDA graphs can capture it
    where no faster kernel is registered.
    """
    num_new = q.shape[0]
    if q.device.type == "cpu":
        committed = int(ctx_len.reshape(-1)[0])
        total = committed + num_new
        keys, values = gather_pages(k_cache, block_table, total), gather_pages(v_cache, block_table, total)
        visible = torch.ones(num_new, total, dtype=torch.bool, device=q.device)
        visible[:, committed:] = unpack_mask(tree_mask, num_new)
    else:
        keys, values, visible = _whole_cache(k_cache, v_cache, block_table, ctx_len, tree_mask, num_new)
    return _masked_attention(q, keys, values, visible, scale)


# Registered for every device; faster kernels (Triton on CUDA) register for their own dispatch key on top.
torch.library.impl(f"{LIBRARY}::{OP_NAME}", "CompositeExplicitAutograd")(tree_attention_reference)


def _whole_cache(k_cache, v_cache, block_table, ctx_len, tree_mask, num_new):
    capacity = block_table.numel() * k_cache.shape[1]
    keys = gather_pages(k_cache, block_table, capacity)
    values = gather_pages(v_cache, block_table, capacity)
    slot = torch.arange(capacity, device=keys.device)
    committed = ctx_len.reshape(1).long()
    relative = (slot - committed).clamp(0, num_new - 1)  # new-token index of each slot (clamped)
    tree_bits = unpack_mask(tree_mask, num_new)[:, relative]  # [T, capacity]
    in_tree = (slot >= committed) & (slot < committed + num_new)
    visible = (slot < committed)[None, :] | (in_tree[None, :] & tree_bits)
    return keys, values, visible


def _masked_attention(q, keys, values, visible, scale):
    num_heads, num_kv_heads = q.shape[1], keys.shape[1]
    group = num_heads // num_kv_heads
    keys = keys.float().repeat_interleave(group, dim=1)  # [S, Hq, D]
    values = values.float().repeat_interleave(group, dim=1)
    scores = torch.einsum("thd,shd->hts", q.float(), keys) * scale
    scores = scores.masked_fill(~visible, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return torch.einsum("hts,shd->thd", probs, values).to(q.dtype)


@torch.library.register_fake(f"{LIBRARY}::{OP_NAME}")
def _tree_attention_fake(q, k_cache, v_cache, block_table, ctx_len, tree_mask, scale):
    return torch.empty_like(q)


def tree_attention_batched_reference(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    ctx_lens: torch.Tensor,
    cu_seqlens: torch.Tensor,
    tree_masks: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Reference of the batched op: the single-sequence reference per sequence. It reads cu_seqlens on the
    host (a sync on a GPU, where the Triton kernel serves the op instead)."""
    bounds = cu_seqlens.tolist()
    outs = [
        tree_attention_reference(q[a:b], k_cache, v_cache, block_tables[s], ctx_lens[s : s + 1],
                                 tree_masks[a:b, : mask_words(b - a)], scale)
        for s, (a, b) in enumerate(zip(bounds, bounds[1:]))
    ]
    return torch.cat(outs) if outs else torch.empty_like(q)


torch.library.impl(f"{LIBRARY}::{OP_NAME}_batched", "CompositeExplicitAutograd")(tree_attention_batched_reference)


@torch.library.register_fake(f"{LIBRARY}::{OP_NAME}_batched")
def _tree_attention_batched_fake(q, k_cache, v_cache, block_tables, ctx_lens, cu_seqlens, tree_masks, scale):
    return torch.empty_like(q)


@dataclass(frozen=True)
class BatchedAttention:
    """The per-step inputs of the batched op for S sequences, built once a step and shared by every layer."""

    block_tables: torch.Tensor  # int32 [S, max pages], zero-padded
    ctx_lens: torch.Tensor  # int32 [S]
    cu_seqlens: torch.Tensor  # int32 [S+1]
    tree_masks: torch.Tensor  # int32 [T, max words], zero-padded

    @classmethod
    def build(cls, block_tables: list[torch.Tensor], ctx_lens: list[torch.Tensor],
              masks: list[torch.Tensor]) -> "BatchedAttention":
        """From each sequence's block table [M_s], ctx_len [1] and packed mask [T_s, W_s] (on one device)."""
        counts = [m.shape[0] for m in masks]
        tables = torch.nn.utils.rnn.pad_sequence(list(block_tables), batch_first=True)
        words = max(m.shape[1] for m in masks)
        tree_masks = torch.cat([torch.nn.functional.pad(m, (0, words - m.shape[1])) for m in masks])
        cu = torch.tensor([0] + counts, device=masks[0].device).cumsum(0).to(torch.int32)
        return cls(tables.to(torch.int32), torch.cat(ctx_lens).to(torch.int32), cu, tree_masks)


def tree_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    ctx_len: torch.Tensor,
    tree_mask: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Dispatch to the registered implementation for q's device (the Triton kernel on CUDA once loaded)."""
    return torch.ops.jetspec_trt.tree_attention(q, k_cache, v_cache, block_table, ctx_len, tree_mask, scale)


def tree_attention_batched(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, batch: BatchedAttention,
                           scale: float) -> torch.Tensor:
    """The batched op over `batch`'s sequences (the Triton kernel on CUDA once loaded)."""
    return torch.ops.jetspec_trt.tree_attention_batched(q, k_cache, v_cache, batch.block_tables, batch.ctx_lens,
                                                        batch.cu_seqlens, batch.tree_masks, scale)


def load_gpu_kernels() -> bool:
    """Register the Triton kernels for CUDA if they can be loaded; False means the reference serves CUDA."""
    try:
        from jetspec_trt.plugins.triton_tree_attention import ensure_registered
    except ImportError:
        return False
    return ensure_registered() is not False
