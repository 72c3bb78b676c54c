"""The round's tree stage in three Triton kernels: per-depth top-k and log-normaliser over the vocabulary, then
the best-first tree, its packed ancestor mask and its ancestor matrix, built by one program.

Why. At the 0.5B shape the tree stage is pure overhead between the draft and the verify: the compiled torch
build (tree.tree_tensors: aten top-k, a sort per level, gathers) took 0.47 / 0.64 / 1.18 ms at budgets
16 / 64 / 256 against a 1.36 ms AR step (H200, bench/results/engine-qwen2.5-0.5b-h200-compiled-tree.json).
Three launches do the same work with the data read once.

    1. _vocab_topk_kernel    grid (levels, splits): a split's chunk of one depth's logits -> its k best
                             (value, id) and its (max, sum exp) for the log-normaliser
    2. _merge_topk_kernel    grid (levels,): the splits' candidates -> the depth's k best log-probabilities
    3. _best_first_kernel    grid (1,), one warp: tree.tree.build_tree_from_top's heap as register arrays

The tree is build_tree_from_top's node for node, ties included: the frontier keeps each entry's push counter and
a pop takes the best score, then the lowest counter, exactly as the heap orders (score, counter); scores are
summed in float64 from the same float32 log-probabilities, as the host does in Python floats. The top-k itself
breaks exact ties towards the lower token id (aten's top-k leaves the order unspecified), and its log-normaliser
is summed in another order than torch.logsumexp (a few float32 ulp apart): the tree can differ from the
torch build's only where two candidates score within those ulp. Either tree is a valid tree: acceptance is
decided by the target, so the output is lossless either way.

Nodes come in pop order (parents before children), not in tree_tensors' level order; nothing downstream
depends on the order (accept_tensors walks by depth and ancestry). The root is its own parent (TreeTensors'
convention). tree/tree_tensors.py (`build_tree_kernels`) wraps them in its TreeTensors.
"""

from __future__ import annotations

import torch

try:  # Guarded: a machine without (or with a broken) Triton still imports this module.
    import triton
    import triton.language as tl
except Exception:  # noqa: BLE001 - ImportError, or a Triton that fails to initialise
    triton = None

VOCAB_BLOCK = 4096  # logits per program of the top-k pass (a split's chunk, rounded up to a power of two)
MAX_NODES = 512  # the tree program keeps every array in registers (a [512, 16] mask tile over 4 warps: 64 each)
MAX_FIELD = 64  # depth and rank are packed in 6 bits each (frontier entries)


def supports(nodes: int, topk: int, max_depth: int) -> bool:
    """Whether the kernels build a tree of this many nodes (root included), width and depth."""
    return triton is not None and topk <= MAX_FIELD and max_depth < MAX_FIELD and nodes <= MAX_NODES


if triton is not None:

    @triton.jit
    def _vocab_topk_kernel(logits_ptr, stride_row, vocab, chunk, val_ptr, idx_ptr, stat_ptr,
                           SPLITS: tl.constexpr, K: tl.constexpr, KP: tl.constexpr, BLOCK: tl.constexpr):
        row, split = tl.program_id(0), tl.program_id(1)
        lane = tl.arange(0, BLOCK)
        ids = split * chunk + lane
        ok = (lane < chunk) & (ids < vocab)
        x = tl.load(logits_ptr + row * stride_row + ids, mask=ok, other=float("-inf")).to(tl.float32)
        x = tl.where(x == x, x, float("-inf"))  # NaN (a warm-up reading an unwritten buffer) ranks last
        top = tl.max(x, 0)
        total = tl.sum(tl.where(x > float("-inf"), tl.exp(x - top), 0.0), 0)
        out = (row * SPLITS + split) * KP
        for j in tl.static_range(KP):  # slots K .. KP-1 (padding to a power of two) hold -inf
            if j < K:
                best = tl.max(x, 0)
                at = tl.argmax(x, 0, tie_break_left=True)  # the lowest id among equal logits
                tl.store(val_ptr + out + j, best)
                tl.store(idx_ptr + out + j, split * chunk + at)
                x = tl.where(lane == at, float("-inf"), x)
            else:
                tl.store(val_ptr + out + j, float("-inf"))
                tl.store(idx_ptr + out + j, 0)
        tl.store(stat_ptr + (row * SPLITS + split) * 2, top)
        tl.store(stat_ptr + (row * SPLITS + split) * 2 + 1, total)

    @triton.jit
    def _merge_topk_kernel(val_ptr, idx_ptr, stat_ptr, vocab, logp_ptr, ids_ptr,
                           SPLITS: tl.constexpr, K: tl.constexpr, KP: tl.constexpr):
        row = tl.program_id(0)
        cand = tl.arange(0, SPLITS * KP)
        x = tl.load(val_ptr + row * SPLITS * KP + cand)
        token = tl.load(idx_ptr + row * SPLITS * KP + cand)
        splits = tl.arange(0, SPLITS)
        tops = tl.load(stat_ptr + (row * SPLITS + splits) * 2)
        sums = tl.load(stat_ptr + (row * SPLITS + splits) * 2 + 1)
        top = tl.max(tops, 0)
        log_norm = top + tl.log(tl.sum(tl.where(tops > float("-inf"), sums * tl.exp(tops - top), 0.0), 0))
        for j in tl.static_range(K):
            best = tl.max(x, 0)
            # Candidates are split-major and each split's best first, so among equal values the lowest id is the
            # lowest candidate index: argmax's left tie-break keeps "lowest token id first".
            at = tl.argmax(x, 0, tie_break_left=True)
            logp = best - log_norm
            # Non-finite log-probabilities would break "children score no higher than parents"; finite
            # values <= 0 keep the tree valid (the torch build does the same).
            logp = tl.where((logp == logp) & (logp > float("-inf")) & (logp < float("inf")), logp, -1e4)
            tl.store(logp_ptr + row * KP + j, logp)
            tl.store(ids_ptr + row * KP + j, tl.minimum(tl.sum(tl.where(cand == at, token, 0), 0), vocab - 1))
            x = tl.where(cand == at, float("-inf"), x)
        # Columns K..KP-1 (K not a power of two) hold token 0 at -1e4: defined values, because the draft
        # vocabulary's lookup maps every column (garbage ids there were an out-of-bounds gather: lease 14, topk 7).
        for j in tl.static_range(K, KP):
            tl.store(logp_ptr + row * KP + j, -1e4)
            tl.store(ids_ptr + row * KP + j, 0)

    @triton.jit
    def _lookup(table, rows, cols, row, col):
        """table[row, col] of a register tile (one element selected, the rest summed as zeros)."""
        return tl.sum(tl.sum(tl.where((rows[:, None] == row) & (cols[None, :] == col), table, 0), 1), 0)

    @triton.jit
    def _best_first_kernel(logp_ptr, ids_ptr, anchor_ptr, tokens_ptr, parents_ptr, depths_ptr, mask_ptr,
                           ancestors_ptr, levels, topk, stride, n_nodes, words,
                           LP: tl.constexpr, KP: tl.constexpr, NP: tl.constexpr, WP: tl.constexpr):
        rows, cols = tl.arange(0, LP), tl.arange(0, KP)
        in_top = (rows[:, None] < levels) & (cols[None, :] < topk)
        top_logp = tl.load(logp_ptr + rows[:, None] * stride + cols[None, :], mask=in_top, other=0.0)
        top_ids = tl.load(ids_ptr + rows[:, None] * stride + cols[None, :], mask=in_top, other=0)
        slot = tl.arange(0, NP)  # frontier slots and node ids alike
        word = tl.arange(0, WP)
        anchor = tl.load(anchor_ptr)

        # Frontier: score (float64), push counter, and (parent, depth, rank) packed as parent << 12 | depth << 6
        # | rank. Slot 0 starts with the root's first child; each pop rewrites its slot with the popped entry's
        # next sibling (or -inf) and appends its first child at the next free slot.
        f_score = tl.where(slot == 0, _lookup(top_logp, rows, cols, 0, 0).to(tl.float64), float("-inf"))
        f_count = tl.where(slot == 0, 0, 2**30)
        f_entry = tl.where(slot == 0, 1 << 6, 0)
        n_token = tl.where(slot == 0, anchor.to(tl.int32), 0)  # int32 while building: fewer registers
        n_parent = tl.zeros([NP], tl.int32)
        n_depth = tl.zeros([NP], tl.int32)
        n_score = tl.zeros([NP], tl.float64)
        mask = tl.where((slot[:, None] == 0) & (word[None, :] == 0), 1, 0)  # packed ancestor rows; root sees itself
        # Pop `node` pushes its sibling then its child: counters 2 * node - 1 and 2 * node (the heap's order).
        for node in range(1, n_nodes):
            best = tl.max(f_score, 0)
            first = tl.min(tl.where(f_score == best, f_count, 2**30), 0)
            popped = f_count == first
            entry = tl.sum(tl.where(popped, f_entry, 0), 0)
            parent, depth, rank = entry >> 12, (entry >> 6) & 63, entry & 63
            n_token = tl.where(slot == node, _lookup(top_ids, rows, cols, depth - 1, rank).to(tl.int32), n_token)
            n_parent = tl.where(slot == node, parent, n_parent)
            n_depth = tl.where(slot == node, depth, n_depth)
            n_score = tl.where(slot == node, best, n_score)
            parent_row = tl.sum(tl.where(slot[:, None] == parent, mask, 0), 0)
            own_bit = tl.where(word == node // 32, 1 << (node % 32), 0)
            mask = tl.where(slot[:, None] == node, (parent_row | own_bit)[None, :], mask)
            # Next sibling into the popped slot; first child at slot `node` (one append per pop).
            parent_score = tl.sum(tl.where(slot == parent, n_score, 0.0), 0)
            sibling = parent_score + _lookup(top_logp, rows, cols, depth - 1, rank + 1).to(tl.float64)
            sibling = tl.where(rank + 1 < topk, sibling, float("-inf"))
            child = best + _lookup(top_logp, rows, cols, depth, 0).to(tl.float64)
            child = tl.where(depth < levels, child, float("-inf"))
            f_score = tl.where(popped, sibling, tl.where(slot == node, child, f_score))
            f_count = tl.where(popped, 2 * node - 1, tl.where(slot == node, 2 * node, f_count))
            f_entry = tl.where(popped, entry + 1, tl.where(slot == node, (node << 12) | ((depth + 1) << 6), f_entry))

        live = slot < n_nodes
        tl.store(tokens_ptr + slot, n_token.to(tl.int64), mask=live)
        tl.store(parents_ptr + slot, n_parent.to(tl.int64), mask=live)
        tl.store(depths_ptr + slot, n_depth.to(tl.int64), mask=live)
        tl.store(mask_ptr + slot[:, None] * words + word[None, :], mask,
                 mask=live[:, None] & (word[None, :] < words))
        bit = tl.arange(0, 32)
        for w in tl.static_range(WP):
            packed = tl.sum(tl.where(word[None, :] == w, mask, 0), 1)
            column = w * 32 + bit
            tl.store(ancestors_ptr + slot[:, None] * n_nodes + column[None, :],
                     ((packed[:, None] >> bit[None, :]) & 1).to(tl.int8),
                     mask=live[:, None] & (column[None, :] < n_nodes))


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def vocab_top_logp(depth_logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """tree.tree.depth_top_logp on the kernels: [L, V] logits -> the k best float32 log-probabilities of each row
    and their int64 token ids, best first, as [L, KP] (KP = k rounded up to a power of two; columns k.. hold
    token 0 at log-probability -1e4, below any real candidate)."""
    levels, vocab = depth_logits.shape
    splits = _pow2(triton.cdiv(vocab, VOCAB_BLOCK))
    chunk = triton.cdiv(vocab, splits)
    device, kp = depth_logits.device, _pow2(k)
    vals = torch.empty(levels, splits, kp, dtype=torch.float32, device=device)
    idx = torch.empty(levels, splits, kp, dtype=torch.int32, device=device)
    stats = torch.empty(levels, splits, 2, dtype=torch.float32, device=device)
    logp = torch.empty(levels, kp, dtype=torch.float32, device=device)
    ids = torch.empty(levels, kp, dtype=torch.int64, device=device)
    _vocab_topk_kernel[(levels, splits)](depth_logits, depth_logits.stride(0), vocab, chunk, vals, idx, stats,
                                         SPLITS=splits, K=k, KP=kp, BLOCK=_pow2(chunk),
                                         num_warps=8)
    _merge_topk_kernel[(levels,)](vals, idx, stats, vocab, logp, ids, SPLITS=splits, K=k, KP=kp, num_warps=4)
    return logp, ids


def best_first_tree(anchor: torch.Tensor, top_logp: torch.Tensor, top_ids: torch.Tensor, nodes: int, topk: int,
                    levels: int) -> tuple[torch.Tensor, ...]:
    """The best-first tree of `nodes` nodes over `levels` depths of (top_logp, top_ids) [>= levels, >= topk]
    (contiguous rows): its tokens, parents, depths (int64 [nodes]), ancestors (bool [nodes, nodes]) and packed
    ancestor mask (int32 [nodes, ceil(nodes / 32)])."""
    assert top_logp.shape == top_ids.shape and top_logp.is_contiguous() and top_ids.is_contiguous()
    device = top_logp.device
    words = triton.cdiv(nodes, 32)
    tokens, parents, depths = (torch.empty(nodes, dtype=torch.long, device=device) for _ in range(3))
    mask = torch.empty(nodes, words, dtype=torch.int32, device=device)
    ancestors = torch.empty(nodes, nodes, dtype=torch.bool, device=device)
    np_ = _pow2(nodes)
    _best_first_kernel[(1,)](top_logp, top_ids, anchor, tokens, parents, depths, mask, ancestors.view(torch.int8),
                             levels, topk, top_logp.stride(0), nodes, words, LP=_pow2(max(levels, 1)),
                             KP=_pow2(top_logp.shape[1]), NP=np_, WP=_pow2(triton.cdiv(np_, 32)),
                             num_warps=1 if np_ <= 256 else 4)
    return tokens, parents, depths, ancestors, mask
