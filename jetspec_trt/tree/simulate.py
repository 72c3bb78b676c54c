"""Greedy acceptance of best-first trees, simulated offline from teacher-forced draft outputs.

For greedy decoding the committed text IS the target's greedy continuation, so a round anchored at position a
of a target-written sequence sees exactly the context the decode loop would: the draft's per-depth candidates at
every anchor (one teacher-forced pass of the head over the sequence, objective.block_hidden) and the sequence's
next tokens tell how many drafts the round's tree accepts, for every budget at once: nodes are popped best first
(tree.best_first) and a tree of budget n is its first n nodes, so a true-path node is in it iff its pop index is
below n. The rounds then follow each other as the loop runs them: the first anchor is the first response token
(it follows the prefill), and a round at anchor a that accepts m drafts emits m + 1 tokens, so the next anchor is
a + m + 1. tau = tokens / rounds, the suite bench's number, with no target forward and no engine: the head's
training card reports it on held-out sequences (train/trainer.py), and on the same prompts it reproduced the
GPU-measured tau of the committed head (docs/training.md).
"""

from __future__ import annotations

import torch

from jetspec_trt.tree.tree import best_first


def true_path_nodes(top_logp: list[list[float]], ranks: list[int], k: int, max_depth: int, budget: int) -> list[int]:
    """Pop indices (node numbers, root 0) of the true path's nodes, depth 1 onwards, in the best-first tree of
    `budget` nodes; ranks[d]: the rank of the true token at depth d+1 among that depth's candidates (-1: not
    among them). Stops where the path leaves the tree, so the walk costs no more pops than it needs."""
    nodes: list[int] = []
    if not ranks or not 0 <= ranks[0] < k:
        return nodes
    want = (0, 1, ranks[0])  # (parent node, depth, rank) of the next true node
    for index, (parent, depth, rank, _) in enumerate(best_first(top_logp, k, max_depth, budget), start=1):
        if (parent, depth, rank) != want:
            continue
        nodes.append(index)
        if depth >= min(max_depth, len(ranks)) or not 0 <= ranks[depth] < k:
            break
        want = (index, depth + 1, ranks[depth])
    return nodes


def accepted_drafts(top_logp: torch.Tensor, top_ids: torch.Tensor, truth: torch.Tensor, budgets: tuple[int, ...],
                    k: int, max_depth: int, chains: list[list[int]] | None = None, lookup: int = 0) -> torch.Tensor:
    """[len(budgets), A] drafts a greedy round accepts at each of A anchors, per budget.

    top_logp / top_ids [A, D, >= k]: each anchor's candidates per depth, best first (tree.depth_top_logp);
    truth [A, D] long: the token the target wrote at each depth (-1 past the sequence's end).
    chains: per anchor, a context-lookup chain (tree/lookup.py) of at most `lookup` tokens that the tree carries as
    one more branch from the root, on min(lookup, budget - 1) of each budget's nodes kept for it (TreeConfig.lookup:
    the draft's best-first part gets the rest, chain or not). The tree is then the union of two prefix-closed sets,
    so a true prefix is in it iff the draft part holds it or it is a prefix of the chain: a round accepts the
    longer of the two matches."""
    depth = min(max_depth, top_ids.shape[1])
    hits = top_ids[:, :depth, :k] == truth[:, :depth, None]  # [A, D, k]
    ranks = torch.where(hits.any(-1), hits.int().argmax(-1), -1).tolist()
    logp = top_logp[:, :depth, :k].tolist()
    true = truth[:, :depth].tolist()
    out = torch.zeros(len(budgets), len(ranks), dtype=torch.long)
    for a, (rows, path) in enumerate(zip(logp, ranks, strict=True)):
        chain = chains[a][:depth] if chains is not None else []
        match = next((i for i, (c, t) in enumerate(zip(chain, true[a])) if c != t), min(len(chain), len(true[a])))
        # per budget: the nodes kept for the chain (at most budget - 1, the root being the anchor); the draft part
        # gets the rest
        cut = [min(lookup, budget - 1) if chains is not None else 0 for budget in budgets]
        nodes = torch.tensor(true_path_nodes(rows, path, k, depth, max(b - c for b, c in zip(budgets, cut))),
                             dtype=torch.long)
        for b, budget in enumerate(budgets):
            out[b, a] = max(int((nodes < budget - cut[b]).sum()), min(match, cut[b]))
    return out


def round_lengths(accepted: torch.Tensor) -> list[int]:
    """Tokens each round of the decode loop emits over one sequence's response (the loop's
    DecodeStats.emitted_per_round): accepted[i] is what a round at the i-th anchor (the response's first token,
    then each next one) accepts. A round j tokens before the end emits at most j (what the sequence holds)."""
    emitted, i = [], 0
    values = accepted.tolist()
    while i < len(values):
        emitted.append(min(values[i], len(values) - 1 - i) + 1)
        i += emitted[-1]
    return emitted
