"""Candidate tree from ONE draft pass: per-depth top-k, best-first by cumulative log-probability ("accum_logp").

Node 0 is the root: the anchor (last committed token, not yet in the target's KV). A node at depth d holds a
candidate for the token d places after the anchor. In this baseline every node at depth d has the same children
(the top-k tokens of depth d+1), so the tree is a prefix-closed set of rank sequences, grown best-first: pop the
best frontier entry, add it as a node, then push its first child and its next sibling (both score no higher
than it, and every other candidate ranks behind one of those two). `budget` counts all nodes, root included,
so budget 1 is plain autoregressive decoding.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import Iterator

import torch

from jetspec_trt.plugins.tree_attention import pack_mask


@dataclass
class DraftTree:
    tokens: torch.Tensor  # [N] int64, tokens[0] = anchor
    parents: torch.Tensor  # [N] int64, parents[0] = -1, parents[i] < i
    depths: torch.Tensor  # [N] int64, depths[0] = 0
    ancestors: torch.Tensor  # [N, N] bool, [i, j] = j is i or an ancestor of i
    children: list[dict[int, int]]  # per node: token -> child node index
    scores: torch.Tensor  # [N] float32: cumulative draft log-probability of each node's path (root 0)

    @property
    def size(self) -> int:
        return self.tokens.shape[0]

    def prefix(self, n: int) -> "DraftTree":
        """Its first n nodes: build_tree's tree of budget n from the same logits (nodes are added best first, and
        a smaller budget only stops the same sequence of pops earlier)."""
        return DraftTree(self.tokens[:n], self.parents[:n], self.depths[:n], self.ancestors[:n, :n],
                         [{t: c for t, c in kids.items() if c < n} for kids in self.children[:n]], self.scores[:n])

    def expected_accepted(self) -> torch.Tensor:
        """[N]: entry j-1 is the expected number of accepted drafts of the tree's first j nodes if the target
        followed the draft's own probabilities: a node is accepted iff its whole path is, so each node adds the
        product of the probabilities along its path, exp(score)."""
        return torch.cumsum(self.scores.exp(), 0) - 1.0  # minus the root's exp(0)

    def packed_mask(self) -> torch.Tensor:
        return pack_mask(self.ancestors)


def depth_top_logp(depth_logits: torch.Tensor, k: int,
                   vocab_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """depth_logits [D, V] (any float dtype) -> the k best tokens of each row, best first, and their float32
    log-probabilities. Both tree builds take their scores from here, so they rank the same values. `vocab_ids`
    [V]: the token id of each column, where the draft scores a subset of the vocabulary (DraftHead.set_vocab);
    None: column j is token j.

    log_softmax is a per-row shift, so the top-k of the raw logits is the top-k of the log-probabilities; only
    those k values get the normaliser subtracted (the [D, V] log-probabilities are never written, and the top-k
    reads the logits in their own dtype: exact, bf16 -> fp32 is)."""
    top, ids = depth_logits.topk(k, dim=-1)
    log_norm = torch.logsumexp(depth_logits.float(), dim=-1, keepdim=True)
    return top.float() - log_norm, ids if vocab_ids is None else vocab_ids[ids]


def build_tree(anchor: int, depth_logits: torch.Tensor, budget: int, topk: int, max_depth: int,
               vocab_ids: torch.Tensor | None = None) -> DraftTree:
    """depth_logits [D, V]: row d scores the token at depth d+1 (column j: token vocab_ids[j], or j). Returns at
    most `budget` nodes."""
    max_depth = min(max_depth, depth_logits.shape[0])
    k = min(topk, depth_logits.shape[-1])
    top_logp, top_ids = depth_top_logp(depth_logits[:max_depth], k, vocab_ids)
    return build_tree_from_top(anchor, top_logp, top_ids, budget, k, max_depth)


def best_first(top_logp: list[list[float]], k: int, max_depth: int, budget: int
               ) -> Iterator[tuple[int, int, int, float]]:
    """The best-first tree's nodes after the root, in pop order: (parent node, depth, rank, score) for up to
    budget - 1 nodes; node i+1 is the i-th yielded. top_logp: row d the k best log-probabilities of depth d+1,
    best first (lists: scores add in Python floats, float64). The one heap of build_tree_from_top and of the
    offline acceptance simulation (tree/simulate.py)."""
    # Frontier entries: (-score, tie-break counter, parent node, depth, rank among the parent's children).
    frontier: list[tuple[float, int, int, int, int]] = []
    counter = 0
    if max_depth > 0 and budget > 1:
        frontier.append((-top_logp[0][0], counter, 0, 1, 0))
    scores = [0.0]
    while frontier and len(scores) < budget:
        neg, _, parent, depth, rank = heapq.heappop(frontier)
        node = len(scores)
        scores.append(-neg)
        yield parent, depth, rank, -neg
        if rank + 1 < k:  # next sibling under the same parent
            counter += 1
            heapq.heappush(frontier, (-(scores[parent] + top_logp[depth - 1][rank + 1]), counter, parent, depth, rank + 1))
        if depth < max_depth:  # first child
            counter += 1
            heapq.heappush(frontier, (-(scores[node] + top_logp[depth][0]), counter, node, depth + 1, 0))


def build_tree_from_top(anchor: int, top_logp: torch.Tensor, top_ids: torch.Tensor, budget: int, k: int,
                        max_depth: int) -> DraftTree:
    """The best-first tree over per-depth candidates: top_logp / top_ids [>= max_depth, >= k], row d holding the
    k best tokens for depth d+1 and their log-probabilities, best first. Scores add in Python floats (float64)."""
    top_logp, top_ids = top_logp[:max_depth, :k].tolist(), top_ids[:max_depth, :k].tolist()
    tokens, parents, depths, scores = [anchor], [-1], [0], [0.0]
    children: list[dict[int, int]] = [{}]
    for parent, depth, rank, score in best_first(top_logp, k, max_depth, budget):
        token = top_ids[depth - 1][rank]
        children[parent][token] = len(tokens)
        tokens.append(token)
        parents.append(parent)
        depths.append(depth)
        children.append({})
        scores.append(score)
    return _tree(tokens, parents, depths, children, scores)


def with_chain(tree: DraftTree, chain: list[int]) -> DraftTree:
    """`tree` with `chain` (e.g. a context lookup, tree/lookup.py) as a path from the root: the chain follows the
    tree's nodes while they hold its tokens (siblings never repeat a token: the acceptance walk moves by token), and
    the rest of it becomes new nodes after the tree's own, so parents still come before children. The new nodes
    score -inf: the draft gave them no probability, so DraftTree.expected_accepted counts nothing for them."""
    tokens, parents, depths = tree.tokens.tolist(), tree.parents.tolist(), tree.depths.tolist()
    scores = tree.scores.tolist()
    children = [dict(kids) for kids in tree.children]
    node = 0
    for token in chain:
        child = children[node].get(token)
        if child is None:
            child = len(tokens)
            children[node][token] = child
            tokens.append(token)
            parents.append(node)
            depths.append(depths[node] + 1)
            children.append({})
            scores.append(float("-inf"))
        node = child
    return tree if len(tokens) == tree.size else _tree(tokens, parents, depths, children, scores)


def _tree(tokens: list[int], parents: list[int], depths: list[int], children: list[dict[int, int]],
          scores: list[float]) -> DraftTree:
    """The DraftTree of these per-node lists (parents before children), its ancestor matrix built here."""
    n = len(tokens)
    ancestors = torch.zeros(n, n, dtype=torch.bool)
    for i in range(n):
        if parents[i] >= 0:
            ancestors[i] = ancestors[parents[i]]
        ancestors[i, i] = True
    return DraftTree(
        tokens=torch.tensor(tokens, dtype=torch.long),
        parents=torch.tensor(parents, dtype=torch.long),
        depths=torch.tensor(depths, dtype=torch.long),
        ancestors=ancestors,
        children=children,
        scores=torch.tensor(scores, dtype=torch.float32),
    )
