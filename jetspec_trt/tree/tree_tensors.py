"""Tree build and acceptance walk as fixed-shape tensor programs: no host sync, so CUDA graphs can hold them.

They compute exactly what `tree.tree.build_tree` and `tree.accept.walk` compute, node for node, and are tested
against them. Shapes depend only on (budget, topk, max_depth), which fix a graph bucket.

Tree build. The best-first tree is the set of the `budget - 1` highest-scoring rank sequences (scores only drop
along a path, so the set is prefix-closed). Level by level, only the best `budget - 1` nodes of a level can
belong to it (any other has that many better nodes at its own level), and their children are the next level's
candidates. So: expand level by level keeping the top `budget - 1`, then take the global top `budget - 1`.
Scores run in float64 with a tiny per-depth penalty so a child never ties its parent (logp can round to 0).
Exact ties between different nodes (common with bf16 logits) may be resolved differently from the heap's
push order: the tree is then another of the equally scored best-first trees (tests check the node scores).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from jetspec_trt.plugins import triton_tree_build
from jetspec_trt.tree.tree import depth_top_logp

# Breaks child/parent ties (a child whose logp rounds to 0): far below float32 score differences.
DEPTH_PENALTY = 1e-9


def full_tree_size(topk: int, max_depth: int) -> int:
    return sum(topk**d for d in range(max_depth + 1))


def node_count(budget: int, topk: int, max_depth: int) -> int:
    """Tree nodes, root included, that a round verifies."""
    return min(budget, full_tree_size(topk, max_depth))


@dataclass
class TreeTensors:
    tokens: torch.Tensor  # [N] int64
    parents: torch.Tensor  # [N] int64; the root points at itself (0) so gathers stay in range
    depths: torch.Tensor  # [N] int64
    ancestors: torch.Tensor  # [N, N] bool


def build_tree_tensors(anchor: torch.Tensor, depth_logits: torch.Tensor, budget: int, topk: int,
                       max_depth: int, vocab_ids: torch.Tensor | None = None) -> TreeTensors:
    """anchor: int64 [1] on the device; depth_logits [>= max_depth, V] (column j: token vocab_ids[j], or j).
    Returns node_count(...) nodes."""
    device = depth_logits.device
    keep = node_count(budget, topk, max_depth) - 1
    levels = min(max_depth, keep)  # a node at depth d has d - 1 ancestors below the root: deeper ones never fit
    if levels == 0:
        return _assemble(anchor, *(torch.zeros(0, dtype=torch.long, device=device),) * 3, 0)
    top_logp, top_ids = depth_top_logp(depth_logits[:levels], topk, vocab_ids)
    # Non-finite logits (e.g. a graph warm-up reading a buffer nothing wrote yet) would break the "children
    # score below parents" order the construction relies on; finite values <= 0 keep the tree valid. (Only the
    # k values per depth are cleaned: the top-k itself is safe on NaN, it ranks NaN first.)
    top_logp = torch.where(top_logp.isfinite(), top_logp, -1e4).double()

    # Every level is `keep` slots, best first; slots past the level's real nodes (7^d of them at shallow depths)
    # score -inf, so a level is one fixed-shape sort whatever its fill, and a sort of <= 512 entries (budgets
    # <= 64 at top-k 7) is one Triton kernel under torch.compile with the candidate sums fused in (top-k is not:
    # it always falls back to the aten kernels). Stable sorts make ties go to the earlier slot, deterministically.
    slot = torch.arange(keep, device=device)
    prev_scores = torch.where(slot == 0, 0.0, -torch.inf).to(torch.float64)  # the root, then empty slots
    level_scores, level_index = [], []
    for depth in range(levels):
        cand = (prev_scores[:, None] + top_logp[depth][None, :] - DEPTH_PENALTY).flatten()  # parent-major
        ranked, index = cand.sort(descending=True, stable=True)
        prev_scores = ranked[:keep]
        level_scores.append(prev_scores)
        level_index.append(index[:keep])
    scores, index = torch.stack(level_scores), torch.stack(level_index)  # [levels, keep]

    # The tree is the global best `keep`. Children score strictly below parents and a level is sorted, so within
    # a level the chosen slots are a prefix and every chosen slot's parent slot is chosen: a level's nodes are
    # numbered in slot order after the earlier levels' ones (level order, parents first).
    # In the stable descending order a slot is among the first `keep` exactly when it is not behind the
    # keep-th one: a comparison with that one slot's (score, flat index), no scatter of the chosen set.
    flat = scores.flatten()
    ranked, order = flat.sort(descending=True, stable=True)
    last_score, last_slot = ranked[keep - 1], order[keep - 1]
    slots = torch.arange(flat.numel(), device=device)
    chosen = (flat > last_score) | ((flat == last_score) & (slots <= last_slot))
    counts = chosen.view(levels, keep).sum(1)
    # One past each level's last node id (node 0 is the root). A masked sum, not cumsum: Inductor makes a scan
    # a kernel of its own, while this sum of <= 15 x 15 fuses.
    level_ids = torch.arange(levels, device=device)
    ends = (counts[None, :] * (level_ids[None, :] <= level_ids[:, None])).sum(1) + 1
    starts = ends - counts
    node = torch.arange(1, keep + 1, device=device)
    level = (node[None, :] >= ends[:, None]).sum(0)  # [keep]: the level of node id 1..keep
    picked = index[level, node - starts[level]]  # the node's candidate: parent slot * topk + rank
    parent_slot, rank = picked // topk, picked % topk
    parents = torch.where(level == 0, 0, starts[(level - 1).clamp(min=0)] + parent_slot)
    return _assemble(anchor, top_ids[level, rank], parents, level + 1, levels)


def tree_kernels_support(budget: int, topk: int, max_depth: int) -> bool:
    """Whether `build_tree_kernels` serves this tree bucket (Triton present, the tree within its limits)."""
    return triton_tree_build.supports(node_count(budget, topk, max_depth), topk, max_depth)


def build_tree_kernels(anchor: torch.Tensor, depth_logits: torch.Tensor, budget: int, topk: int,
                       max_depth: int, vocab_ids: torch.Tensor | None = None) -> tuple[TreeTensors, torch.Tensor]:
    """`build_tree_tensors` and its packed mask on the Triton tree kernels (plugins/triton_tree_build.py): the same
    node count and contract, the nodes in the host build_tree's pop order (tree.tree.build_tree_from_top's tree
    over the kernels' top-k, node for node)."""
    nodes = node_count(budget, topk, max_depth)
    levels = min(max_depth, depth_logits.shape[0], nodes - 1)
    k = min(topk, depth_logits.shape[-1])
    if levels == 0:
        top_logp = torch.zeros(1, k, dtype=torch.float32, device=depth_logits.device)
        top_ids = torch.zeros(1, k, dtype=torch.long, device=depth_logits.device)
    else:
        top_logp, top_ids = triton_tree_build.vocab_top_logp(depth_logits[:levels], k)
        if vocab_ids is not None:
            top_ids = vocab_ids[top_ids]
    *tree, mask = triton_tree_build.best_first_tree(anchor, top_logp, top_ids, nodes, k, levels)
    return TreeTensors(*tree), mask


def _assemble(anchor, tokens, parents, depths, max_depth: int) -> TreeTensors:
    """max_depth: the deepest any node can be (ancestor chains are followed that far)."""
    device = anchor.device
    zero = torch.zeros(1, dtype=torch.long, device=device)
    tokens = torch.cat([anchor.long().reshape(1), tokens])
    parents = torch.cat([zero, parents])
    depths = torch.cat([zero, depths])
    ids = torch.arange(tokens.shape[0], device=device)
    # chain[h, i]: node i's ancestor h generations up, by gathers on [N] vectors (the root is its own parent).
    chain = [ids]
    for _ in range(max_depth):
        chain.append(parents[chain[-1]])
    chain = torch.stack(chain)
    # Node j (at depth d_j) is i or an ancestor of i exactly when it is i's ancestor d_i - d_j generations up:
    # one [N, N] pass instead of max_depth [N, N] gathers.
    up = depths[:, None] - depths[None, :]
    ancestors = (up >= 0) & (chain[up.clamp(min=0), ids[:, None]] == ids[None, :])
    return TreeTensors(tokens, parents, depths, ancestors)


def held_to_root(tree: TreeTensors, holds: torch.Tensor) -> torch.Tensor:
    """[N] bool: the nodes that, with every ancestor up to the root, satisfy `holds` ([N] bool): one [N, N] pass
    over the ancestor matrix instead of a walk down the tree."""
    return ~(tree.ancestors & ~holds[None, :]).any(-1)


@dataclass
class AcceptedPath:
    path: torch.Tensor  # [max_depth + 1] node ids, root first; entries past `length` repeat the last node
    length: torch.Tensor  # [1] int64: path nodes kept (root included) = tokens emitted this round
    emitted: torch.Tensor  # [max_depth + 1] tokens: accepted drafts then the bonus token; valid up to `length`


def accept_tensors(tree: TreeTensors, choice: torch.Tensor, max_depth: int) -> AcceptedPath:
    """The walk of `tree.accept.walk` as tensor ops. choice [N]: the token the target emits after each node
    (`tree.accept.choose_tokens`: the argmax, or one draw per node). From the root the walk moves to the child
    holding the node's choice, so a node is on the path when it and all its ancestors hold their parent's choice;
    the last path node's choice is the bonus token."""
    is_root = torch.arange(tree.tokens.shape[0], device=choice.device) == 0
    correct = (tree.tokens == choice[tree.parents]) | is_root  # (no host scalar writes: graph capture)
    accepted = held_to_root(tree, correct)
    slot = torch.where(accepted, tree.depths, max_depth + 1)
    path = torch.zeros(max_depth + 2, dtype=torch.long, device=choice.device)
    path.scatter_(0, slot, torch.arange(tree.tokens.shape[0], device=choice.device))
    length = accepted.sum().reshape(1)
    positions = torch.arange(max_depth + 1, device=choice.device)
    last = path.gather(0, length - 1)
    path = torch.where(positions < length, path[: max_depth + 1], last)
    # Emitted j = token of path node j+1 for accepted drafts; the bonus (the last node's choice) at length-1.
    next_tokens = tree.tokens[path.roll(-1)]
    emitted = torch.where(positions < length - 1, next_tokens, choice[last])
    return AcceptedPath(path, length, emitted)


def lookup_chain_tensors(history: torch.Tensor, anchor_pos: torch.Tensor, length: int,
                         max_ngram: int = 3) -> torch.Tensor:
    """`tree.lookup.context_lookup` as fixed-shape tensor ops (CUDA graphs): history [S] int64, the committed
    tokens then the anchor at anchor_pos ([1] int64, on the device); entries past it are ignored. Returns [length]
    int64: the chain, -1 where it has no token."""
    device = history.device
    size = history.shape[0]
    ends = torch.arange(size, device=device)  # candidate end of an earlier occurrence
    anchor = anchor_pos.reshape(()).long()
    best = torch.full((), -1, dtype=torch.long, device=device)  # the chosen occurrence's end (-1: none yet)
    for n in range(1, max_ngram + 1):  # shortest first: a longer suffix's match overrides
        match = (ends >= n - 1) & (ends < anchor) & (anchor >= n - 1)
        for i in range(n):
            back = (ends - i).clamp(min=0)
            match &= history[back] == history[(anchor - i).clamp(min=0).reshape(1)]  # ([1]: no host read, compiled)
        latest = torch.where(match, ends, -1).max()
        best = torch.where(latest >= 0, latest, best)
    index = best + 1 + torch.arange(length, device=device)
    return torch.where((best >= 0) & (index <= anchor), history[index.clamp(max=size - 1)], -1)


def with_chain_tensors(tree: TreeTensors, chain: torch.Tensor, max_depth: int) -> TreeTensors:
    """`tree.tree.with_chain` at fixed shapes: the chain's m >= 1 tokens ([m] int64, -1 = none) become m more nodes
    after the tree's N. Chain token i sits at depth i + 1 under the previous one. Where the tree already holds
    the chain's first p tokens as a path from the root, the chain follows that path and its first p slots are
    dead: token -1, which no choice ever equals, so the acceptance walk never takes it (the verify embeds it as
    token 0), under the root so its mask row stays valid. A -1 in the chain kills its slot and the rest.

    No loop over the chain (a CUDA graph would hold a chain of dependent kernels per token): a tree node is on
    the chain's path when it and all its ancestors hold the chain's token at their depth, as in accept_tensors'
    walk; siblings never repeat a token, so that path is one node per depth, p nodes deep."""
    device = chain.device
    count, length = tree.tokens.shape[0], chain.shape[0]
    steps = torch.arange(length, device=device)
    first_dead = torch.where(chain < 0, steps, length).min()
    valid = steps < first_dead
    # node n (depth d >= 1) holds the chain's token d - 1; the root is on every path
    at = (tree.depths - 1).clamp(min=0, max=length - 1)
    holds = (tree.depths == 0) | ((tree.depths <= length) & (tree.tokens == chain[at]) & valid[at])
    on_path = held_to_root(tree, holds)
    shared = torch.where(on_path, tree.depths, 0).max()  # p: the chain's tokens the tree already holds
    ids = torch.arange(count, device=device)
    last = torch.where(on_path & (tree.depths == shared), ids, 0).max()  # where the chain's own nodes hang
    new = valid & (steps >= shared)
    tokens = torch.where(new, chain, -1)
    parents = torch.where(new, torch.where(steps == shared, last, count + steps - 1), 0)
    depths = torch.where(new, steps + 1, 1)
    return _assemble(tree.tokens[:1], torch.cat([tree.tokens[1:], tokens]), torch.cat([tree.parents[1:], parents]),
                     torch.cat([tree.depths[1:], depths]), max_depth)
