"""The round's accept stage in Triton kernels (RuntimeConfig.fused_accept): the greedy choice, then the rest.

Why. At the 0.5B shape the accept stage was 44 kernels and 0.11 ms of a 1.67 ms budget-64 round on an H100
(bench/results/engine-qwen2.5-0.5b-h100-draft-vocab.json, kernel profile): the walk as compiled tensor ops, then
gathers, an index_select and an index_copy per K and V for the KV compaction, the history scatter and a handful of
small copies, each a launch of a few microseconds of almost no work. Its largest kernel was the greedy choice,
torch's argmax over the [nodes, vocab] logits with one program a row (24 us). `argmax_rows` splits each row over
programs (two kernels); a sampled choice stays tree.accept.choose_tokens' draw. From the choice on:

    1. _walk_and_move_kernel  grid (2 * layers + feature blocks,): every program walks the tree (a few register
                              reductions over <= 1024 nodes), then moves its layer's K or V rows of the accepted path
                              to the contiguous slots after the context, or gathers a column block of the path's
                              target features
    2. _commit_kernel         grid (1,): the walk again; the round's result for the host, the next anchor, the
                              feature count, the lookup history, and the context advance (a second launch: the
                              first kernel's programs read ctx_len, and nothing orders them against a writer)

The walk. From the root, step to the child whose token is the current node's choice, while one exists (siblings
never share a token, so there is at most one). It is tree.tree_tensors.accept_tensors' path, node for node: a node
is accepted there when it and all its ancestors hold their parent's choice. Every accepted draft token is its
parent's choice, so the emitted tokens are the choices along the path: emitted[j] = choice[path[j]], the bonus
included, and past the path's end the last node repeats (as accept_tensors pads it).

The move. Row j of the path (0 .. max_depth) goes from logical slot ctx + path[j] to ctx + j, one program per
(layer, K or V): it loads every row, then (after a block barrier) stores them, as PagedKVCache.commit_path reads
every source before it writes. A row's source can be another row's destination (path[j] = j' > j).
"""

from __future__ import annotations

import torch

try:  # Guarded: a machine without (or with a broken) Triton still imports this module.
    import triton
    import triton.language as tl
except Exception:  # noqa: BLE001 - ImportError, or a Triton that fails to initialise
    triton = None

if triton is not None:
    from jetspec_trt.plugins.paged_slots import flat_slot

MAX_NODES = 1024  # nodes a round may verify (budget plus lookup chain): the walk holds them in registers
FEATURE_BLOCK = 1024  # feature columns per gathering program
ARGMAX_BLOCK = 2048  # logits per tile of the argmax's first pass
ARGMAX_PROGRAMS = 1024  # the first pass's grid: about this many (row, split) programs, at most 64 splits a row


def supports(nodes: int) -> bool:
    return triton is not None and nodes <= MAX_NODES


if triton is not None:

    @triton.jit
    def _argmax_partials_kernel(logits_ptr, stride_row, vocab, chunk, val_ptr, flag_ptr, idx_ptr,
                                SPLITS: tl.constexpr, BLOCK: tl.constexpr, TILES: tl.constexpr):
        """One (row, split): the best of logits[row, split*chunk : (split+1)*chunk] as (value, NaN seen, first
        index of the best: the first NaN if any, else the first maximal value)."""
        row, split = tl.program_id(0), tl.program_id(1)
        lane = tl.arange(0, BLOCK)
        start = split * chunk
        end = tl.minimum(start + chunk, vocab)
        best = tl.full([], float("-inf"), dtype=tl.float32)
        best_idx = tl.full([], 2147483647, dtype=tl.int32)
        seen_nan = tl.zeros([], dtype=tl.int32)
        nan_idx = tl.full([], 2147483647, dtype=tl.int32)
        for tile in tl.static_range(0, TILES):
            ids = start + tile * BLOCK + lane
            ok = ids < end
            x = tl.load(logits_ptr + row.to(tl.int64) * stride_row + ids, mask=ok, other=float("-inf"))
            x = x.to(tl.float32)
            nan = ok & (x != x)
            seen_nan = tl.maximum(seen_nan, tl.max(nan.to(tl.int32), 0))
            nan_idx = tl.minimum(nan_idx, tl.min(tl.where(nan, ids, 2147483647), 0))
            x = tl.where(nan, float("-inf"), x)
            top = tl.max(x, 0)
            top_idx = tl.min(tl.where(ok & (x == top), ids, 2147483647), 0)
            better = (top > best) | ((top == best) & (top_idx < best_idx))  # ties: the lower index (an all -inf
            # row included, as torch gives its first index)
            best_idx = tl.where(better, top_idx, best_idx)
            best = tl.maximum(best, top)
        out = row * SPLITS + split
        tl.store(val_ptr + out, best)
        tl.store(flag_ptr + out, seen_nan)
        tl.store(idx_ptr + out, tl.where(seen_nan > 0, nan_idx, best_idx))

    @triton.jit
    def _argmax_merge_kernel(val_ptr, flag_ptr, idx_ptr, out_ptr, SPLITS: tl.constexpr):
        """One row: its splits' results in order -> the row's argmax (a NaN's split first, then the best value;
        ties to the lower index)."""
        row = tl.program_id(0)
        s = tl.arange(0, SPLITS)
        values = tl.load(val_ptr + row * SPLITS + s)
        flags = tl.load(flag_ptr + row * SPLITS + s)
        indices = tl.load(idx_ptr + row * SPLITS + s)
        any_nan = tl.max(flags, 0)
        wanted = tl.where(any_nan > 0, flags > 0, values == tl.max(values, 0))
        tl.store(out_ptr + row, tl.min(tl.where(wanted, indices, 2147483647), 0).to(tl.int64))

    @triton.jit
    def _walk(tokens_ptr, parents_ptr, depths_ptr, choice_ptr, nodes,
              DEPTH: tl.constexpr, NP: tl.constexpr, DP: tl.constexpr):
        """(path [DP] int64, length): the accepted path's node ids (rows past DEPTH and past the path repeat its
        last node) and its node count, root included."""
        ids = tl.arange(0, NP)
        real = ids < nodes
        tokens = tl.load(tokens_ptr + ids, mask=real, other=-1)
        parents = tl.load(parents_ptr + ids, mask=real, other=-1)
        depths = tl.load(depths_ptr + ids, mask=real, other=-1)
        choices = tl.load(choice_ptr + ids, mask=real, other=-1)
        rows = tl.arange(0, DP)
        path = tl.zeros([DP], dtype=tl.int64)
        current = tl.zeros([], dtype=tl.int64)
        length = tl.full([], 1, dtype=tl.int64)
        alive = tl.full([], 1, dtype=tl.int1)
        for depth in tl.static_range(1, DEPTH + 1):
            wanted = tl.sum(tl.where(ids == current, choices, 0), 0)  # the current node's choice, from registers
            hit = real & (ids != 0) & (parents == current) & (depths == depth) & (tokens == wanted)
            child = tl.max(tl.where(hit, ids, -1), 0).to(tl.int64)
            found = alive & (child >= 0)
            current = tl.where(found, child, current)
            length += found.to(tl.int64)
            alive = found
            path = tl.where(rows >= depth, current, path)
        return path, length

    @triton.jit
    def _move_rows(base, path, table_ptr, ctx, PAGE: tl.constexpr, ROW: tl.constexpr, ROW_P: tl.constexpr,
                   DEPTH: tl.constexpr, DP: tl.constexpr):
        """Rows j = 0 .. DEPTH of one layer's K (or V): logical slot ctx + path[j] -> ctx + j, every row read
        before any is written (one tile load, a block barrier, one tile store)."""
        rows = tl.arange(0, DP)
        lane = tl.arange(0, ROW_P)
        keep = rows <= DEPTH
        src_slot = flat_slot(table_ptr, ctx + path, keep, PAGE)
        dst_slot = flat_slot(table_ptr, ctx + rows, keep, PAGE)
        ok = keep[:, None] & (lane[None, :] < ROW)
        values = tl.load(base + src_slot[:, None] * ROW + lane[None, :], mask=ok)
        # Row j's source may be row j' > j's destination, and a tile's rows live in different threads: no store
        # may start before every thread has its values.
        tl.debug_barrier()
        tl.store(base + dst_slot[:, None] * ROW + lane[None, :], values, mask=ok)

    @triton.jit
    def _walk_and_move_kernel(tokens_ptr, parents_ptr, depths_ptr, choice_ptr, nodes,
                              k_ptr, v_ptr, layer_stride, table_ptr, ctx_ptr,
                              feat_ptr, feat_stride, out_feat_ptr, out_feat_stride, width,
                              LAYERS: tl.constexpr, PAGE: tl.constexpr, ROW: tl.constexpr, ROW_P: tl.constexpr,
                              DEPTH: tl.constexpr, NP: tl.constexpr, DP: tl.constexpr, FB: tl.constexpr):
        pid = tl.program_id(0)
        path, _length = _walk(tokens_ptr, parents_ptr, depths_ptr, choice_ptr, nodes, DEPTH, NP, DP)
        if pid < 2 * LAYERS:
            ctx = tl.load(ctx_ptr).to(tl.int64)
            offset = (pid // 2).to(tl.int64) * layer_stride
            if pid % 2 == 0:
                _move_rows(k_ptr + offset, path, table_ptr, ctx, PAGE, ROW, ROW_P, DEPTH, DP)
            else:
                _move_rows(v_ptr + offset, path, table_ptr, ctx, PAGE, ROW, ROW_P, DEPTH, DP)
        else:
            rows = tl.arange(0, DP)
            cols = (pid - 2 * LAYERS) * FB + tl.arange(0, FB)
            ok = (rows[:, None] <= DEPTH) & (cols[None, :] < width)
            values = tl.load(feat_ptr + path[:, None] * feat_stride + cols[None, :], mask=ok)
            tl.store(out_feat_ptr + rows[:, None] * out_feat_stride + cols[None, :], values, mask=ok)

    @triton.jit
    def _commit_kernel(tokens_ptr, parents_ptr, depths_ptr, choice_ptr, nodes, ctx_ptr,
                       count_ptr, anchor_ptr, result_ptr, history_ptr,
                       HISTORY: tl.constexpr, DEPTH: tl.constexpr, NP: tl.constexpr, DP: tl.constexpr):
        path, length = _walk(tokens_ptr, parents_ptr, depths_ptr, choice_ptr, nodes, DEPTH, NP, DP)
        rows = tl.arange(0, DP)
        keep = rows <= DEPTH
        emitted = tl.load(choice_ptr + path, mask=keep, other=0)
        tl.store(result_ptr, length)
        tl.store(result_ptr + 1 + rows, emitted, mask=keep)
        tl.store(anchor_ptr, tl.sum(tl.where(rows == length - 1, emitted, 0), 0))
        tl.store(count_ptr, length)
        ctx = tl.load(ctx_ptr)
        if HISTORY:  # the emitted tokens follow the anchor, which sits at history[ctx]
            tl.store(history_ptr + ctx.to(tl.int64) + 1 + rows, emitted, mask=keep)
        tl.store(ctx_ptr, ctx + length.to(ctx.dtype))


def argmax_rows(logits: torch.Tensor) -> torch.Tensor:
    """logits [N, V] (any float dtype, unit stride along V) -> int64 [N]: torch.argmax(logits, -1) on CUDA in two
    kernels, the greedy choice of a round's nodes. torch's reduction gave a 64-node verify's [64, 151936] bf16
    logits one program a row (24 us on an H100, the accept stage's largest kernel); here a row is split over
    programs, each keeping its chunk's best (value, first index), then one program a row merges them in order.
    torch's ties: the first maximal index; NaN ranks above every number (the first NaN wins)."""
    rows, vocab = logits.shape
    assert logits.stride(1) == 1, "the vocabulary dimension must be contiguous"
    # A power of two (the merge's arange): ~ARGMAX_PROGRAMS programs in all, none with less than a tile of logits.
    splits = min(64, triton.next_power_of_2(max(1, ARGMAX_PROGRAMS // max(rows, 1))),
                 1 << (triton.cdiv(vocab, ARGMAX_BLOCK).bit_length() - 1))
    chunk = triton.cdiv(vocab, splits)
    values = torch.empty(rows, splits, dtype=torch.float32, device=logits.device)
    flags = torch.empty(rows, splits, dtype=torch.int32, device=logits.device)
    indices = torch.empty(rows, splits, dtype=torch.int32, device=logits.device)
    out = torch.empty(rows, dtype=torch.int64, device=logits.device)
    if rows:
        _argmax_partials_kernel[(rows, splits)](logits, logits.stride(0), vocab, chunk, values, flags, indices,
                                                SPLITS=splits, BLOCK=ARGMAX_BLOCK, TILES=triton.cdiv(chunk, ARGMAX_BLOCK))
        _argmax_merge_kernel[(rows,)](values, flags, indices, out, SPLITS=splits)
    return out


def accept_and_commit(tokens: torch.Tensor, parents: torch.Tensor, depths: torch.Tensor, choice: torch.Tensor,
                      max_depth: int, features: torch.Tensor, k_all: torch.Tensor, v_all: torch.Tensor,
                      block_table: torch.Tensor, ctx_len: torch.Tensor, out_features: torch.Tensor,
                      out_count: torch.Tensor, out_anchor: torch.Tensor, out_result: torch.Tensor,
                      history: torch.Tensor | None = None) -> None:
    """The accept stage from the per-node choice, in place: tokens / parents / depths / choice [N] int64 (a round's
    tree, dead lookup slots holding -1), features [N, W] (the verify's captured target features), k_all / v_all
    [L, P, S, Hkv, D] (the target cache, the tree's rows after the ctx_len committed ones), block_table [P] int32,
    ctx_len [1] int32. Writes out_features[:max_depth + 1] (the path's features), out_count and out_anchor [1],
    out_result [max_depth + 2] ([length, emitted...]), history[ctx_len + 1 ...] when given, moves the path's K/V
    rows after the context and advances ctx_len by the path's length. The same values as the torch stage
    (runtime.graph_decoder, tree.tree_tensors.accept_tensors, PagedKVCache.commit_path)."""
    nodes = tokens.shape[0]
    layers, _pages, page, heads, dim = k_all.shape
    row = heads * dim
    for name, t in (("tokens", tokens), ("parents", parents), ("depths", depths), ("choice", choice)):
        assert t.dtype == torch.int64 and t.is_contiguous() and t.shape == (nodes,), name
    assert k_all.is_contiguous() and v_all.is_contiguous() and v_all.shape == k_all.shape
    assert features.stride(1) == 1 and out_features.stride(1) == 1 and out_features.shape[0] >= max_depth + 1
    assert supports(nodes), f"{nodes} nodes: the fused accept holds at most {MAX_NODES}"
    np_, dp = triton.next_power_of_2(nodes), triton.next_power_of_2(max_depth + 1)
    width = features.shape[1]
    grid = (2 * layers + triton.cdiv(width, FEATURE_BLOCK),)
    _walk_and_move_kernel[grid](
        tokens, parents, depths, choice, nodes, k_all, v_all, k_all.stride(0), block_table, ctx_len,
        features, features.stride(0), out_features, out_features.stride(0), width,
        LAYERS=layers, PAGE=page, ROW=row, ROW_P=triton.next_power_of_2(row), DEPTH=max_depth, NP=np_, DP=dp,
        FB=FEATURE_BLOCK)
    _commit_kernel[(1,)](
        tokens, parents, depths, choice, nodes, ctx_len, out_count, out_anchor, out_result,
        history if history is not None else out_result, HISTORY=history is not None, DEPTH=max_depth, NP=np_,
        DP=dp)
