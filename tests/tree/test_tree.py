"""Tree construction invariants, and best-first optimality against brute-force enumeration."""

import itertools

import pytest
import torch

from jetspec_trt.plugins.tree_attention import unpack_mask
from jetspec_trt.tree.tree import build_tree


def random_logits(depth, vocab=50, seed=0):
    return torch.randn(depth, vocab, generator=torch.Generator().manual_seed(seed)) * 3


@pytest.mark.parametrize("budget,topk,depth,seed", [(b, k, d, s) for b in (1, 2, 7, 16, 64, 256)
                                                    for k in (1, 3, 7) for d in (1, 4, 15) for s in range(2)])
def test_invariants(budget, topk, depth, seed):
    logits = random_logits(15, seed=seed)
    tree = build_tree(99, logits, budget, topk, depth)
    n = tree.size
    assert 1 <= n <= budget
    assert tree.tokens[0] == 99 and tree.parents[0] == -1 and tree.depths[0] == 0
    for i in range(1, n):
        parent = int(tree.parents[i])
        assert 0 <= parent < i  # parent before child
        assert tree.depths[i] == tree.depths[parent] + 1 <= depth
        assert tree.children[parent][int(tree.tokens[i])] == i
    # mask = ancestors (and self), and the packed form decodes to it
    for i in range(n):
        chain, j = set(), i
        while j >= 0:
            chain.add(j)
            j = int(tree.parents[j])
        assert set(torch.nonzero(tree.ancestors[i]).flatten().tolist()) == chain
    assert torch.equal(unpack_mask(tree.packed_mask(), n), tree.ancestors)
    # Full when the budget allows it
    full = sum(topk**d for d in range(depth + 1))
    assert n == min(budget, full)


@pytest.mark.parametrize("seed", range(5))
def test_best_first_matches_brute_force(seed):
    """The tree is the `budget` highest-scoring rank sequences (a prefix-closed set because scores only drop)."""
    topk, depth, budget = 3, 4, 30
    logits = random_logits(depth, vocab=10, seed=seed)
    logp = torch.log_softmax(logits, -1)
    top = logp.topk(topk, -1)
    scores = {(): 0.0}
    for d in range(1, depth + 1):
        for ranks in itertools.product(range(topk), repeat=d):
            scores[ranks] = scores[ranks[:-1]] + float(top.values[d - 1, ranks[-1]])
    best = sorted(scores.values(), reverse=True)[:budget]
    tree = build_tree(0, logits, budget, topk, depth)
    node_scores = [0.0]
    for i in range(1, tree.size):
        d = int(tree.depths[i])
        node_scores.append(node_scores[int(tree.parents[i])] + float(logp[d - 1, tree.tokens[i]]))
    assert sorted(node_scores, reverse=True) == pytest.approx(best, abs=1e-5)


@pytest.mark.parametrize("seed", range(3))
def test_prefix_is_the_smaller_budget_tree_and_expected_accepted(seed):
    """A best-first tree's first n nodes are the tree of budget n (the cost-model policy cuts trees so), and its
    expected accepted drafts are the sums of path probabilities under the draft (brute force over the tree)."""
    logits = random_logits(6, vocab=12, seed=seed)
    full = build_tree(5, logits, 60, 3, 6)
    for n in (1, 2, 9, 31, 60):
        small, cut = build_tree(5, logits, n, 3, 6), full.prefix(n)
        for field in ("tokens", "parents", "depths", "ancestors", "scores"):
            assert torch.equal(getattr(cut, field), getattr(small, field)), (n, field)
        assert cut.children == small.children
    probs = torch.softmax(logits, -1)
    path_prob = [1.0]
    for i in range(1, full.size):
        path_prob.append(path_prob[int(full.parents[i])] * float(probs[int(full.depths[i]) - 1, full.tokens[i]]))
    expected = [sum(path_prob[1 : j + 1]) for j in range(full.size)]
    assert full.expected_accepted().tolist() == pytest.approx(expected, rel=1e-4, abs=1e-6)
    assert sorted(path_prob, reverse=True) == path_prob  # best first: each added node adds less than the last


@pytest.mark.parametrize("budget", [2, 5, 8, 16, 64])
def test_a_budget_b_tree_reads_b_minus_1_depths(budget):
    """TreeConfig.draft_depth: the draft logits beyond depth budget - 1 never change the tree (the runtime's
    draft passes skip their LM head rows)."""
    from jetspec_trt.runtime.config import TreeConfig

    logits = random_logits(15, seed=budget)
    depth = TreeConfig(budget, 3, 15).draft_depth
    assert depth == min(15, budget - 1)
    cut, full = build_tree(1, logits[:depth], budget, 3, 15), build_tree(1, logits, budget, 3, 15)
    assert torch.equal(cut.tokens, full.tokens) and torch.equal(cut.parents, full.parents)


def test_with_chain_follows_the_tree_then_appends_and_never_repeats_a_sibling():
    from jetspec_trt.tree.tree import with_chain

    tree = build_tree(99, random_logits(4, seed=1), 12, 3, 4)
    first, second = int(tree.tokens[1]), next(iter(tree.children[1]))  # a depth-1 node and one of its children
    chain = [first, second, 7777, 8888]
    merged = with_chain(tree, chain)
    assert merged.size == tree.size + 2  # the first two chain tokens were nodes already
    assert torch.equal(merged.tokens[: tree.size], tree.tokens) and merged.tokens[-2:].tolist() == [7777, 8888]
    node = 0
    for token in chain:  # the chain is a path from the root
        node = merged.children[node][token]
    assert merged.depths[node] == 4 and int(merged.parents[node]) == tree.size
    assert set(torch.nonzero(merged.ancestors[node]).flatten().tolist()) == {0, 1, tree.children[1][second],
                                                                              tree.size, tree.size + 1}
    assert torch.equal(unpack_mask(merged.packed_mask(), merged.size), merged.ancestors)
    assert torch.isinf(merged.scores[-2:]).all() and merged.expected_accepted()[-1] == tree.expected_accepted()[-1]
    for i in range(merged.size):  # siblings hold distinct tokens
        kids = [j for j in range(merged.size) if int(merged.parents[j]) == i]
        assert len({int(merged.tokens[j]) for j in kids}) == len(kids)
    assert with_chain(tree, []) is tree and with_chain(tree, [first]) is tree
