"""Tree build and acceptance walk as fixed-shape tensor programs: no host sync, so CUDA graphs can hold them.

They compute exactly what `tree.tree.build_tree` and `tree.accept.walk` compute, node for node, and are tested
against them. Shapes depend only on (budget, topk, max_depth), which fix a graph bucket.

Tree build. The best-first tree is the set of the `budget - 1` highest-scoring rank sequences (scores only drop
along a path, so the set is prefix-closed). Level by level, only the best `budget - 1` nodes of a level can
belong to it (any other has that many better nodes at its own level), and their children are the next level's
candidates. So: expand level by level keeping the top `budget - 1`, then take the global top `budget - 1`.
Scores run in float64 with a tiny per-depth penalty so a child never ties its parent (logp can round to 0).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

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
                       max_depth: int) -> TreeTensors:
    """anchor: int64 [1] on the device; depth_logits [>= max_depth, V]. Returns node_count(...) nodes."""
    device = depth_logits.device
    keep = node_count(budget, topk, max_depth) - 1
    # Non-finite logits (e.g. a graph warm-up reading a buffer nothing wrote yet) would break the
    # "children score below parents" order the construction relies on; finite values keep the tree valid.
    finite = torch.nan_to_num(depth_logits[:max_depth].float(), nan=-1e4, posinf=1e4, neginf=-1e4)
    logp = torch.log_softmax(finite, dim=-1)
    top_logp, top_ids = logp.topk(topk, dim=-1)
    top_logp = top_logp.double()

    scores, parents, tokens, depths = [], [], [], []
    prev_scores = torch.zeros(1, dtype=torch.float64, device=device)
    offset_prev, offset = -1, 0  # candidate-list offsets of the previous and the current level
    for depth in range(1, max_depth + 1):
        if keep == 0:
            break
        cand = (prev_scores[:, None] + top_logp[depth - 1][None, :] - DEPTH_PENALTY).flatten()
        count = min(keep, cand.numel())
        level_scores, index = cand.topk(count)  # sorted, best first
        parent_local, rank = index // topk, index % topk
        scores.append(level_scores)
        parents.append(parent_local + offset_prev if depth > 1 else torch.full_like(parent_local, -1))
        tokens.append(top_ids[depth - 1][rank])
        depths.append(torch.full_like(rank, depth))
        prev_scores = level_scores
        offset_prev, offset = offset, offset + count
    if keep == 0:
        return _assemble(anchor, *(torch.zeros(0, dtype=torch.long, device=device),) * 3, max_depth)

    all_scores, all_parents = torch.cat(scores), torch.cat(parents)
    all_tokens, all_depths = torch.cat(tokens), torch.cat(depths)
    chosen = all_scores.topk(keep).indices.sort().values  # candidate order = level order: parents first
    node_of = torch.full((all_scores.numel() + 1,), 0, dtype=torch.long, device=device)  # last slot: root
    node_of[chosen] = torch.arange(1, keep + 1, device=device)
    parent_cand = all_parents[chosen]
    parent_nodes = node_of[torch.where(parent_cand < 0, all_scores.numel(), parent_cand)]
    return _assemble(anchor, all_tokens[chosen], parent_nodes, all_depths[chosen], max_depth)


def _assemble(anchor, tokens, parents, depths, max_depth: int) -> TreeTensors:
    device = anchor.device
    zero = torch.zeros(1, dtype=torch.long, device=device)
    tokens = torch.cat([anchor.long().reshape(1), tokens])
    parents = torch.cat([zero, parents])
    depths = torch.cat([zero, depths])
    eye = torch.eye(tokens.shape[0], dtype=torch.bool, device=device)
    ancestors = eye
    # Each pass adds one more generation of ancestors; max_depth passes reach the root from every node.
    for _ in range(max_depth if tokens.shape[0] > 1 else 0):
        ancestors = eye | ancestors[parents]
    return TreeTensors(tokens, parents, depths, ancestors)


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
    accepted = ~(tree.ancestors & ~correct[None, :]).any(-1)
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
