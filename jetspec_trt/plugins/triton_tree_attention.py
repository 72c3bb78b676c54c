"""Triton kernels for `jetspec_trt::tree_attention` on CUDA (the op's contract is in tree_attention.py).

One kernel serves prefill, decode, tree verify and the draft block; only the launch shape changes.

Rows. A program owns BLOCK_M query rows of ONE KV head, a row being a (new token, query head of that KV
group) pair: row r is token r // GROUP, head kv_head * GROUP + r % GROUP. GQA heads then share every K/V tile
the program loads, and a decode step (T=1) still puts GROUP rows into the tile's M dimension.

Keys. A program walks a tile space of BLOCK_N keys per tile:
  * committed tiles: logical slots 0 .. ctx_len-1, visible to every row, no mask bits to read. All but the
    last are full, so they run with no bounds checks at all;
  * new-token tiles: new tokens j = 0 .. new_hi-1 at slots ctx_len + j, visibility from the packed mask.
    Tiles are aligned on j (not on the slot), so a tile covers exactly BLOCK_N / 32 mask words per row.
Before the loop each program scans its rows' mask words once, for three bounds: new_hi, past which no row of the
program sees a new token (it skips the key blocks above the diagonal of a causal mask, and the tail of a tree
whose parents precede their children), new_free, before which every row sees every new token (the blocks
left of a causal mask's diagonal band): those tiles run unmasked like the committed ones, and new_lo, before
which no row sees any new token (a packed prefill's earlier sequences: with it, a block-diagonal causal mask
costs each sequence its own triangle, not the pack's). All come from the mask bits themselves, so any mask is
handled exactly, ordered or not; a skipped tile is one whose every score would be masked to -inf.
Each key's page comes from the block table, so non-identity tables work.

Splits (flash-decoding). With few rows (decode, short trees) a launch has few programs, so the tile space is
split into SPLITS ranges, one program each; each writes a normalised partial output and its log-sum-exp and a
second kernel merges them. SPLITS depends on shapes only; the ranges are computed from ctx_len on the device.
With FUSED_MERGE (LaunchConfig.fused_merge; in no default or tuned launch until a GPU has tested it) there is no
second kernel: each split program counts itself in an arrival counter of its (row block, KV head) after its
stores (a CTA barrier, then one acq_rel atomic at GPU scope: the release publishes the CTA's stores, the last
arrival's acquire sees everyone's), and the last to arrive merges every split's rows and puts the counter back to
0 for the next launch. One launch a layer less in every decode step and small verify, at the price of the merge
running in KV-heads x row-blocks programs instead of one per (token, head).

Batches (`jetspec_trt::tree_attention_batched`). The same kernel with BATCHED set: S sequences' tokens back to
back, one launch. Row blocks never span two sequences (a block reads one block table and one ctx_len): sequence s
owns cdiv(T_s * GROUP, BLOCK_M) blocks of a flattened grid axis, found by each program from cu_seqlens on the
device. The axis has cdiv(T * GROUP, BLOCK_M) + S - 1 programs, the most the blocks can need (each sequence's last
block may be partial); the spare ones return at once. One sequence is the unbatched case, with no cu_seqlens.

ctx_len is only ever read inside the kernels (no .item(), no host sync): launches depend on shapes alone, so a
CUDA graph captured once replays at any context length.
Softmax runs in base 2 (exp2) with the scale folded into one multiply; accumulation is fp32.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from jetspec_trt.dtypes import dtype_name
from jetspec_trt.plugins.tree_attention import signals_dependents

try:  # Guarded: a CPU machine without (or with a broken) Triton still imports this module.
    import triton
    import triton.language as tl
    from triton.language.extra.cuda import gdc_launch_dependents
except Exception:  # noqa: BLE001 - ImportError, or a Triton that fails to initialise
    triton = None

LOG2E = 1.4426950408889634
_REGISTERED = False


if triton is not None:

    @triton.jit
    def _load_kv(k_ptr, v_ptr, table_ptr, keys, key_ok, kv_off, stride_kp, stride_ks, dims,
                 PAGE: tl.constexpr, BOUNDED: tl.constexpr):
        """K and V tiles [BLOCK_N, D] of logical slots `keys`, through the block table (key_ok only if BOUNDED)."""
        if BOUNDED:
            page = tl.load(table_ptr + keys // PAGE, mask=key_ok, other=0)
        else:
            page = tl.load(table_ptr + keys // PAGE)
        # int64: page * stride_kp overflows int32 for caches over 2^31 elements (long contexts, many layers).
        row = page.to(tl.int64) * stride_kp + (keys % PAGE) * stride_ks + kv_off
        ptrs = row[:, None] + dims[None, :]
        if BOUNDED:
            k = tl.load(k_ptr + ptrs, mask=key_ok[:, None], other=0.0)
            v = tl.load(v_ptr + ptrs, mask=key_ok[:, None], other=0.0)
        else:
            k = tl.load(k_ptr + ptrs)
            v = tl.load(v_ptr + ptrs)
        return k, v

    @triton.jit
    def _softmax_step(acc, m_i, l_i, q, k, v, visible, qk_scale, MASKED: tl.constexpr, IEEE: tl.constexpr):
        """One online-softmax update with a K/V tile; `visible` [BLOCK_M, BLOCK_N] is used only if MASKED."""
        if IEEE:  # fp32 inputs: exact fp32 products (Triton's default for fp32 is tf32)
            s = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        s = s * qk_scale
        if MASKED:
            s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        if MASKED:
            # A row that has seen nothing yet keeps m = -inf; subtract 0 instead, so exp2 gives 0 and not NaN.
            m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            m_ref = m_new  # every score of an unmasked tile is finite, so m_new is too
        p = tl.exp2(s - m_ref[:, None])
        alpha = tl.exp2(m_i - m_ref)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        if IEEE:
            acc = tl.dot(p.to(v.dtype), v, acc, input_precision="ieee")
        else:
            acc = tl.dot(p.to(v.dtype), v, acc)
        return acc, m_new, l_i

    # Triton compiles a kernel per value class of its int arguments (== 1, divisible by 16) besides the
    # constexprs. The arguments below follow the request's prompt length in an eager prefill, which made 52
    # variants of this kernel for prompts up to 1168 tokens at the 0.5B shape: every prompt in a new class paid a
    # compile (one AR request in a dozen at 83-160 tok/s instead of ~720 on an H200, first process of a lease
    # only). Unspecialised, the variants are the launch shapes (14 at that shape), which warm_causal_prefill
    # compiles at engine load. They are bounds, loop counts and the mask's row stride (mask words are
    # loaded one per row, never as vectors), so no load's vector width depends on their specialisation.
    @triton.jit(do_not_specialize=["num_tokens", "num_seqs", "mask_words", "num_row_blocks", "stride_mt",
                                   "stride_bt"])
    def _tree_attention_kernel(
        q_ptr, k_ptr, v_ptr, table_ptr, ctx_ptr, mask_ptr, out_ptr, part_ptr, lse_ptr, cu_ptr,
        qk_scale, num_tokens, num_seqs, num_heads, mask_words, num_row_blocks,
        stride_qt, stride_qh, stride_kp, stride_ks, stride_kh, stride_mt, stride_bt,
        GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, PAGE: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SPLITS: tl.constexpr, SCAN_W: tl.constexpr,
        IEEE: tl.constexpr, BATCHED: tl.constexpr, SEQ_P2: tl.constexpr, TRIGGER: tl.constexpr = False,
        count_ptr=None, FUSED_MERGE: tl.constexpr = False,
    ):
        if TRIGGER:  # a decode GEMV launched as our programmatic dependent may start (plugins/gemv.py, PDL)
            gdc_launch_dependents()
        # Later tokens see more keys under a causal mask: launch their row blocks first (less tail imbalance).
        flat_block = num_row_blocks - 1 - tl.program_id(0)
        kv_head = tl.program_id(1)
        split = tl.program_id(2)

        if BATCHED:
            # Sequence s owns row blocks [ends[s] - blocks[s], ends[s]) of the flattened axis, from its token
            # range cu[s] .. cu[s+1] read here on the device (the launch depends on shapes only). The grid is an
            # upper bound on the blocks; a program past the last sequence's blocks has nothing to do.
            seqs = tl.arange(0, SEQ_P2)
            seq_ok = seqs < num_seqs
            lo = tl.load(cu_ptr + seqs, mask=seq_ok, other=0)
            hi = tl.load(cu_ptr + seqs + 1, mask=seq_ok, other=0)
            blocks = tl.cdiv((hi - lo) * GROUP, BLOCK_M)
            ends = tl.cumsum(blocks, 0)
            seq = tl.sum((ends <= flat_block).to(tl.int32), 0)
            if seq >= num_seqs:
                return
            row_block = flat_block - tl.sum(tl.where(seqs < seq, blocks, 0), 0)
            first_token = tl.load(cu_ptr + seq)
            num_new = tl.load(cu_ptr + seq + 1) - first_token
            table_ptr += seq.to(tl.int64) * stride_bt
            ctx_ptr += seq
        else:  # one sequence: no cu_seqlens tensor (a graph-captured decoder makes none)
            row_block = flat_block
            first_token = 0
            num_new = num_tokens

        rows = row_block * BLOCK_M + tl.arange(0, BLOCK_M)
        token = rows // GROUP  # within the sequence
        head = kv_head * GROUP + rows % GROUP
        row_ok = token < num_new
        token += first_token  # in q, the mask and the output
        dims = tl.arange(0, HEAD_DIM)
        q = tl.load(q_ptr + token[:, None] * stride_qt + head[:, None] * stride_qh + dims[None, :],
                    mask=row_ok[:, None], other=0.0)
        ctx = tl.load(ctx_ptr)  # on the device: never read on the host
        mask_rows = mask_ptr + token * stride_mt

        # Scan this program's mask rows once. `last`: the last word any row has a bit in (new tokens past it
        # are invisible to all rows). `first`: the first word that is not all ones in some row (new tokens
        # before it are visible to all rows, e.g. everything left of the diagonal band of a causal mask).
        last = tl.full([BLOCK_M], -1, tl.int32)
        first = tl.full([BLOCK_M], mask_words, tl.int32)
        lowest = tl.full([BLOCK_M], mask_words, tl.int32)
        for w0 in range(0, mask_words, SCAN_W):
            cols = w0 + tl.arange(0, SCAN_W)
            in_row = cols[None, :] < mask_words
            words = tl.load(mask_rows[:, None] + cols[None, :], mask=row_ok[:, None] & in_row, other=0)
            last = tl.maximum(last, tl.max(tl.where(words != 0, cols[None, :], -1), 1))
            lowest = tl.minimum(lowest, tl.min(tl.where(words != 0, cols[None, :], mask_words), 1))
            partial = ((words != -1) & row_ok[:, None]) | (~in_row)  # padding rows don't constrain `first`
            first = tl.minimum(first, tl.min(tl.where(partial, cols[None, :], mask_words), 1))
        new_hi = tl.minimum((tl.max(last, 0) + 1) * 32, num_new)
        new_free = tl.minimum(tl.min(first, 0) * 32, new_hi)
        new_lo = tl.minimum(tl.min(lowest, 0) * 32, new_hi)

        # Tile space, in order: full committed tiles [0, n_full), the partial committed tile [n_full, n_ctx),
        # new-token tiles every row sees whole [n_ctx, n_free), new-token tiles that need mask bits.
        n_full = ctx // BLOCK_N
        n_ctx = tl.cdiv(ctx, BLOCK_N)
        n_free = n_ctx + new_free // BLOCK_N
        n_lo = n_ctx + new_lo // BLOCK_N  # masked tiles before it are empty for every row: skipped
        n_tiles = n_ctx + tl.cdiv(new_hi, BLOCK_N)
        per_split = tl.cdiv(n_tiles, SPLITS)
        start = split * per_split
        stop = tl.minimum(start + per_split, n_tiles)

        kv_off = kv_head * stride_kh
        cols = tl.arange(0, BLOCK_N)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)

        # 1. Full committed tiles: no bounds, no mask (the bulk of decode and verify work).
        for t in range(start, tl.minimum(stop, n_full)):
            keys = t * BLOCK_N + cols
            k, v = _load_kv(k_ptr, v_ptr, table_ptr, keys, keys, kv_off, stride_kp, stride_ks, dims, PAGE, False)
            acc, m_i, l_i = _softmax_step(acc, m_i, l_i, q, k, v, row_ok, qk_scale, False, IEEE)

        # 2. The partial committed tile, if ctx_len is not a multiple of BLOCK_N (0 or 1 iteration).
        for t in tl.range(tl.maximum(start, n_full), tl.minimum(stop, n_ctx), num_stages=1):
            keys = t * BLOCK_N + cols
            key_ok = keys < ctx
            k, v = _load_kv(k_ptr, v_ptr, table_ptr, keys, key_ok, kv_off, stride_kp, stride_ks, dims, PAGE, True)
            acc, m_i, l_i = _softmax_step(acc, m_i, l_i, q, k, v, key_ok[None, :], qk_scale, True, IEEE)

        # New-token tiles are aligned on the new-token index j (slot ctx_len + j), so a tile spans
        # BLOCK_N // 32 whole mask words. 3. Tiles that every row of the program sees entirely: no mask.
        for t in range(tl.maximum(start, n_ctx), tl.minimum(stop, n_free)):
            keys = ctx + (t - n_ctx) * BLOCK_N + cols
            k, v = _load_kv(k_ptr, v_ptr, table_ptr, keys, keys, kv_off, stride_kp, stride_ks, dims, PAGE, False)
            acc, m_i, l_i = _softmax_step(acc, m_i, l_i, q, k, v, row_ok, qk_scale, False, IEEE)

        # 4. The remaining new-token tiles, masked by the tree bits.
        for t in range(tl.maximum(tl.maximum(start, n_free), n_lo), stop):
            j0 = (t - n_ctx) * BLOCK_N
            j = j0 + cols
            key_ok = j < new_hi
            k, v = _load_kv(k_ptr, v_ptr, table_ptr, ctx + j, key_ok, kv_off, stride_kp, stride_ks, dims, PAGE,
                            True)
            # Spread each row's words over their 32 columns: one [BLOCK_M] load per word, no per-element gather.
            word = tl.zeros([BLOCK_M, BLOCK_N], tl.int32)
            for w in tl.static_range(BLOCK_N // 32):
                wi = j0 // 32 + w
                wv = tl.load(mask_rows + wi, mask=row_ok & (wi < mask_words), other=0)
                word = tl.where((cols // 32 == w)[None, :], wv[:, None], word)
            visible = (((word >> (cols % 32)[None, :]) & 1) != 0) & key_ok[None, :]
            acc, m_i, l_i = _softmax_step(acc, m_i, l_i, q, k, v, visible, qk_scale, True, IEEE)

        # A row that saw no key (only possible for an empty split, or a mask row with no bits at ctx_len 0)
        # writes 0 and, for the merge, log-sum-exp -inf.
        l_safe = tl.where(l_i == 0.0, 1.0, l_i)
        result = acc / l_safe[:, None]
        out_off = token[:, None] * (num_heads * HEAD_DIM) + head[:, None] * HEAD_DIM + dims[None, :]
        if SPLITS == 1:
            tl.store(out_ptr + out_off, result.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])
        else:
            lse = tl.where(l_i == 0.0, float("-inf"), m_i + tl.log2(l_safe))
            tl.store(part_ptr + split * (num_tokens * num_heads * HEAD_DIM) + out_off, result, mask=row_ok[:, None])
            tl.store(lse_ptr + split * (num_tokens * num_heads) + token * num_heads + head, lse, mask=row_ok)
            if FUSED_MERGE:  # the last split program of this (row block, KV head) merges (module docstring)
                tl.debug_barrier()  # every thread's stores done before the CTA's one release below
                counter = count_ptr + flat_block * tl.num_programs(1) + kv_head
                if tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu") == SPLITS - 1:
                    tl.debug_barrier()  # the acquire (one thread's) ordered before every thread's loads
                    _merge_rows(part_ptr, lse_ptr, out_ptr, out_off, token * num_heads + head, row_ok,
                                num_tokens * num_heads, SPLITS, HEAD_DIM, BLOCK_M)
                    tl.atomic_xchg(counter, 0, sem="relaxed", scope="gpu")  # ready for the next launch

    @triton.jit
    def _merge_rows(part_ptr, lse_ptr, out_ptr, out_off, lse_off, row_ok, num_rows, SPLITS: tl.constexpr,
                    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr):
        """_merge_kernel's sum for a program's BLOCK_M rows, one split at a time (their partials are other
        programs' stores: read past L1, .cg)."""
        top = tl.full([BLOCK_M], float("-inf"), tl.float32)
        for s in range(SPLITS):
            lse = tl.load(lse_ptr + s * num_rows + lse_off, mask=row_ok, other=float("-inf"), cache_modifier=".cg")
            top = tl.maximum(top, lse)
        top = tl.where(top == float("-inf"), 0.0, top)
        total = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
        for s in range(SPLITS):
            weight = tl.exp2(tl.load(lse_ptr + s * num_rows + lse_off, mask=row_ok, other=float("-inf"),
                                     cache_modifier=".cg") - top)  # 0 for empty splits
            part = tl.load(part_ptr + s * (num_rows * HEAD_DIM) + out_off, mask=row_ok[:, None], other=0.0,
                           cache_modifier=".cg")
            total += weight
            acc += part * weight[:, None]
        out = acc / tl.where(total == 0.0, 1.0, total)[:, None]
        tl.store(out_ptr + out_off, out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])

    @triton.jit(do_not_specialize=["num_rows"])
    def _merge_kernel(part_ptr, lse_ptr, out_ptr, num_rows, HEAD_DIM: tl.constexpr, SPLITS: tl.constexpr,
                      TRIGGER: tl.constexpr = False):
        """out[row] = sum_s w_s * part_s[row] / sum_s w_s with w_s = 2^(lse_s - max lse): one (token, head)."""
        if TRIGGER:  # as in _tree_attention_kernel
            gdc_launch_dependents()
        row = tl.program_id(0)
        dims = tl.arange(0, HEAD_DIM)
        splits = tl.arange(0, SPLITS)
        lse = tl.load(lse_ptr + splits * num_rows + row)
        top = tl.max(lse, 0)
        top = tl.where(top == float("-inf"), 0.0, top)
        weight = tl.exp2(lse - top)  # 0 for empty splits
        parts = tl.load(part_ptr + splits[:, None] * (num_rows * HEAD_DIM) + row * HEAD_DIM + dims[None, :])
        total = tl.sum(weight, 0)
        out = tl.sum(parts * weight[:, None], 0) / tl.where(total == 0.0, 1.0, total)
        tl.store(out_ptr + row * HEAD_DIM + dims, out.to(out_ptr.dtype.element_ty))


@dataclass(frozen=True)
class LaunchConfig:
    block_m: int  # query rows (token x head-of-group pairs) per program
    block_n: int  # keys per tile; a multiple of 32 (whole mask words)
    warps: int
    stages: int  # software-pipelining depth of the key loops
    splits: int  # key-range splits (flash-decoding); a power of two
    fused_merge: bool = False  # splits > 1: the last split program of each row block merges (no merge kernel)


@dataclass(frozen=True)
class LaunchKey:
    """The shapes a launch config is chosen for. ctx_len is not one: it lives on the device, and a CUDA graph
    replays one launch at every context length."""

    tokens: int  # new tokens T (1 for a decode step, the tree size for verify, block_size for the draft)
    num_heads: int
    num_kv_heads: int
    head_dim: int
    page_size: int
    dtype: str  # "bfloat16", "float16" or "float32"


# Launch configs tuned on this GPU for an engine's shapes (plugins/tuning_cache.py); other shapes use
# default_launch. Process-wide like the op registration, and read when a call launches: graphed calls bake in
# whatever was installed when they were captured.
_TUNED: dict[LaunchKey, LaunchConfig] = {}


def install_tuned_launches(launches: dict[LaunchKey, LaunchConfig]) -> None:
    _TUNED.update(launches)


def clear_tuned_launches() -> None:
    _TUNED.clear()


_SM_COUNT: dict[int, int] = {}


def _sm_count(device: torch.device | None = None) -> int:
    if not torch.cuda.is_available():
        return 132
    index = torch.cuda.current_device() if device is None or device.index is None else device.index
    if index not in _SM_COUNT:
        _SM_COUNT[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SM_COUNT[index]


def _pow2_floor(n: int) -> int:
    return 1 << (max(1, n).bit_length() - 1)


def default_launch(num_new: int, num_heads: int, num_kv_heads: int, head_dim: int,
                   dtype: torch.dtype = torch.bfloat16, sm_count: int | None = None) -> LaunchConfig:
    """Launch shape from the problem's shapes alone (never ctx_len: it lives on the device)."""
    rows = num_new * (num_heads // num_kv_heads)
    if dtype == torch.float32:  # tests only: fp32 tiles are twice the bytes and use slow IEEE dots
        block_m, block_n, warps, stages = (16 if rows <= 16 else 32), 32, 4, 2
    elif rows <= 16:  # decode: every row in one tile; split the keys instead. (5 stages, two K/V tiles in
        # flight, measured no faster on H100: 256 resident programs already keep enough loads in flight.)
        block_m, block_n, warps, stages = 16, 64, 4, 3
    elif rows <= 64:  # the draft block, small trees
        block_m, block_n, warps, stages = (32 if rows <= 32 else 64), 64, 4, 3
    else:  # tree verify and prefill (measured on H100: 64 x 64 with one warpgroup beat 128-row tiles)
        block_m, block_n, warps, stages = 64, 64, 4, 3
    row_blocks = -(-rows // block_m)
    # About two programs per SM; a long prefill already has enough row blocks (splits 1, no merge).
    target = 2 * (sm_count or _sm_count())
    splits = min(64, _pow2_floor(target // (row_blocks * num_kv_heads)))
    return LaunchConfig(block_m, block_n, warps, stages, splits)


def launch_for(num_new: int, num_heads: int, num_kv_heads: int, head_dim: int, page_size: int,
               dtype: torch.dtype = torch.bfloat16, sm_count: int | None = None) -> LaunchConfig:
    """The tuned launch for these shapes if one is installed, else default_launch."""
    if _TUNED:
        tuned = _TUNED.get(LaunchKey(num_new, num_heads, num_kv_heads, head_dim, page_size, dtype_name(dtype)))
        if tuned is not None:
            return tuned
    return default_launch(num_new, num_heads, num_kv_heads, head_dim, dtype, sm_count)


def mask_scan_width(words: int) -> int:
    """Mask words a program scans at once (a constexpr: one compiled variant per value)."""
    return min(32, 1 << (max(1, words) - 1).bit_length())


def prefill_lengths(max_tokens: int, num_heads: int, num_kv_heads: int, head_dim: int, page_size: int,
                    dtype: torch.dtype, sm_count: int | None = None) -> list[int]:
    """One causal-prefill length per compiled variant of the kernel among lengths 1..max_tokens: the first
    length of each distinct (launch shape, mask scan width), the constexprs a prefill's length decides."""
    first: dict[tuple, int] = {}
    for n in range(1, max_tokens + 1):
        launch = launch_for(n, num_heads, num_kv_heads, head_dim, page_size, dtype, sm_count)
        first.setdefault((launch, mask_scan_width(-(-n // 32))), n)
    return sorted(first.values())


def warm_causal_prefill(k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor,
                        ctx_len: torch.Tensor, num_heads: int, max_tokens: int) -> list[int]:
    """Compile, before any request, every variant a causal prefill of up to `max_tokens` tokens can launch, on
    one layer's cache tensors (their K/V rows are overwritten by the next prefill anyway). Triton keeps the
    binaries on disk, so a later process only loads them. Returns the lengths run."""
    from jetspec_trt.plugins.tree_attention import causal_mask, tree_attention

    page, num_kv_heads, head_dim = k_cache.shape[1], k_cache.shape[2], k_cache.shape[3]
    max_tokens = min(max_tokens, k_cache.shape[0] * page)
    lengths = prefill_lengths(max_tokens, num_heads, num_kv_heads, head_dim, page, k_cache.dtype,
                              _sm_count(k_cache.device))
    saved = ctx_len.clone()
    ctx_len.zero_()
    for n in lengths:
        q = torch.zeros(n, num_heads, head_dim, dtype=k_cache.dtype, device=k_cache.device)
        tree_attention(q, k_cache, v_cache, block_table, ctx_len, causal_mask(n, k_cache.device), 1.0)
    ctx_len.copy_(saved)
    return lengths


def _supported(q, k_cache, tree_mask) -> bool:
    d = q.shape[-1]
    return (
        q.dim() == 3 and k_cache.dim() == 4 and q.shape[1] % k_cache.shape[2] == 0
        and d >= 16 and d & (d - 1) == 0 and d == k_cache.shape[3]
        and k_cache.stride(-1) == 1 and tree_mask.dtype == torch.int32 and tree_mask.stride(-1) == 1
        and q.dtype in (torch.bfloat16, torch.float16, torch.float32)
    )


def tree_attention_triton(q, k_cache, v_cache, block_table, ctx_len, tree_mask, scale, launch=None):
    """The op on CUDA tensors (same arguments as the contract; `launch` overrides the launch shape)."""
    if not _supported(q, k_cache, tree_mask) or v_cache.stride() != k_cache.stride():
        from jetspec_trt.plugins.tree_attention import tree_attention_reference

        return tree_attention_reference(q, k_cache, v_cache, block_table, ctx_len, tree_mask, scale)
    num_heads, head_dim = q.shape[1], q.shape[2]
    launch = launch or launch_for(q.shape[0], num_heads, k_cache.shape[2], head_dim, k_cache.shape[1], k_cache.dtype,
                                  _sm_count(q.device))
    return _launch(q, k_cache, v_cache, block_table, ctx_len, tree_mask, None, scale, launch)


def batched_launch(num_tokens: int, num_seqs: int, num_heads: int, num_kv_heads: int, head_dim: int,
                   page_size: int, dtype: torch.dtype = torch.bfloat16, sm_count: int | None = None) -> LaunchConfig:
    """Launch shape of a batched call from its shapes alone: the tile of the mean sequence (the lengths live on
    the device), with its splits shared out between the sequences, whose row blocks already fill the GPU."""
    launch = launch_for(-(-num_tokens // num_seqs), num_heads, num_kv_heads, head_dim, page_size, dtype, sm_count)
    return dataclasses.replace(launch, splits=max(1, _pow2_floor(launch.splits // num_seqs)))


def tree_attention_batched_triton(q, k_cache, v_cache, block_tables, ctx_lens, cu_seqlens, tree_masks, scale,
                                  launch=None):
    """The batched op on CUDA tensors (contract in tree_attention.py; `launch` overrides the launch shape)."""
    if not _supported(q, k_cache, tree_masks) or v_cache.stride() != k_cache.stride():
        from jetspec_trt.plugins.tree_attention import tree_attention_batched_reference

        return tree_attention_batched_reference(q, k_cache, v_cache, block_tables, ctx_lens, cu_seqlens,
                                                tree_masks, scale)
    launch = launch or batched_launch(q.shape[0], block_tables.shape[0], q.shape[1], k_cache.shape[2], q.shape[2],
                                      k_cache.shape[1], k_cache.dtype, _sm_count(q.device))
    return _launch(q, k_cache, v_cache, block_tables, ctx_lens, tree_masks, cu_seqlens.to(torch.int32), scale,
                   launch)


def _launch(q, k_cache, v_cache, block_table, ctx_len, tree_mask, cu_seqlens, scale, launch):
    """One launch of the kernel (and the merge) for one sequence (cu_seqlens None, block_table [M]) or a batch
    (cu_seqlens [S+1], block_table [S, M]). The grid comes from shapes only."""
    out_dtype = q.dtype
    q = q.to(k_cache.dtype).contiguous()  # tl.dot wants one operand dtype; a no-op in the engine
    block_table = block_table.contiguous()  # read as table_ptr + page (a no-op for the caches' own tables)
    num_tokens, num_heads, head_dim = q.shape
    page, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = num_heads // num_kv_heads
    out = torch.empty_like(q)
    if num_tokens == 0:
        return out.to(out_dtype)
    assert launch.block_n % 32 == 0 and launch.splits & (launch.splits - 1) == 0, launch
    row_blocks = -(-num_tokens * group // launch.block_m)
    num_seqs = 1 if cu_seqlens is None else block_table.shape[0]
    # Each sequence's last row block may be partial: S - 1 more blocks at most than the tokens fill. Programs
    # past the blocks the sequences need return at once.
    row_blocks += num_seqs - 1
    fused_merge = launch.splits > 1 and launch.fused_merge
    if launch.splits > 1:
        part = torch.empty(launch.splits, num_tokens * num_heads * head_dim, dtype=torch.float32, device=q.device)
        lse = torch.empty(launch.splits, num_tokens * num_heads, dtype=torch.float32, device=q.device)
    else:
        part = lse = out  # not touched
    words = tree_mask.shape[1]
    trigger = signals_dependents(q.device)
    _tree_attention_kernel[(row_blocks, num_kv_heads, launch.splits)](
        q, k_cache, v_cache, block_table, ctx_len, tree_mask, out, part, lse,
        ctx_len if cu_seqlens is None else cu_seqlens,  # (not read for one sequence)
        scale * LOG2E, num_tokens, num_seqs, num_heads, words, row_blocks,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), tree_mask.stride(0),
        block_table.stride(0) if cu_seqlens is not None else 0,
        GROUP=group, HEAD_DIM=head_dim, PAGE=page, BLOCK_M=launch.block_m, BLOCK_N=launch.block_n,
        SPLITS=launch.splits, SCAN_W=mask_scan_width(words), IEEE=q.dtype == torch.float32,
        BATCHED=cu_seqlens is not None, SEQ_P2=triton.next_power_of_2(num_seqs), TRIGGER=trigger,
        count_ptr=merge_counters(q.device, row_blocks * num_kv_heads) if fused_merge else None,
        FUSED_MERGE=fused_merge, num_warps=launch.warps, num_stages=launch.stages,
    )
    if launch.splits > 1 and not fused_merge:
        _merge_kernel[(num_tokens * num_heads,)](part, lse, out, num_tokens * num_heads, HEAD_DIM=head_dim,
                                                 SPLITS=launch.splits, TRIGGER=trigger, num_warps=4)
    return out if out.dtype == out_dtype else out.to(out_dtype)


# Arrival counters of the fused merge, per device: zeros that every launch leaves at zero. Made on a launch outside
# a CUDA graph capture (the graphs' warm-up runs each launch eagerly first), never inside one. Fused-merge launches
# on one device share them, so they must not run at the same time on two streams (every decoder and scheduler here
# runs its passes on one stream).
_COUNTERS: dict[torch.device, torch.Tensor] = {}
MIN_COUNTERS = 1 << 16


def merge_counters(device: torch.device, needed: int) -> torch.Tensor:
    counters = _COUNTERS.get(device)
    if counters is None or counters.numel() < needed:
        if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(f"the fused merge needs {needed} counters on {device}, first asked for inside a CUDA "
                               "graph capture: launch once outside it first")
        counters = _COUNTERS[device] = torch.zeros(max(needed, MIN_COUNTERS), dtype=torch.int32, device=device)
    return counters


def ensure_registered() -> bool:
    """Register the Triton kernel as the op's CUDA implementation. Idempotent; False (and a no-op) without
    CUDA or Triton, in which case the reference keeps serving CUDA tensors."""
    global _REGISTERED
    if _REGISTERED:
        return True
    if triton is None or not torch.cuda.is_available():
        return False
    import jetspec_trt.plugins.tree_attention  # noqa: F401 - defines the op

    torch.library.impl("jetspec_trt::tree_attention", "CUDA")(tree_attention_triton)
    torch.library.impl("jetspec_trt::tree_attention_batched", "CUDA")(tree_attention_batched_triton)
    _REGISTERED = True
    return True
