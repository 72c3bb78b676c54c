"""The fixed-shape (CUDA-graph) tree build and acceptance walk equal the reference heap build and walk."""

import pytest
import torch

from jetspec_trt.tree.accept import SamplingConfig, accept, choose_tokens, walk
from jetspec_trt.tree.tree import build_tree
from jetspec_trt.tree.tree_tensors import accept_tensors, build_tree_tensors, node_count


def paths(tokens, parents):
    """Each node as its token path from the root: an order-free identity of a tree."""
    return sorted(_node_paths(tokens, parents))


CASES = [(b, k, d, s) for b in (1, 2, 5, 16, 64, 256) for k in (1, 2, 7) for d in (1, 3, 15) for s in range(2)]


@pytest.mark.parametrize("budget,topk,depth,seed", CASES)
def test_same_tree_and_same_acceptance(budget, topk, depth, seed):
    g = torch.Generator().manual_seed(seed)
    vocab = 40
    depth_logits = torch.randn(15, vocab, generator=g) * 2
    reference = build_tree(7, depth_logits, budget, topk, depth)
    tensors = build_tree_tensors(torch.tensor([7]), depth_logits, budget, topk, depth)
    n = node_count(budget, topk, depth)
    assert reference.size == tensors.tokens.shape[0] == n
    assert paths(reference.tokens, reference.parents) == paths(tensors.tokens, tensors.parents)
    # parents first, depths consistent, ancestors closed
    for i in range(1, n):
        p = int(tensors.parents[i])
        assert p < i and tensors.depths[i] == tensors.depths[p] + 1
        assert torch.equal(tensors.ancestors[i], tensors.ancestors[p] | (torch.arange(n) == i))
    # Target logits that follow part of the tree: the walk must match the reference walk token for token, with
    # the argmax as each node's choice (greedy) and with one draw per node (sampling).
    reference_paths = _node_paths(reference.tokens, reference.parents)
    tensor_paths = _node_paths(tensors.tokens, tensors.parents)
    ref_index = {p: i for i, p in enumerate(reference_paths)}
    for trial in range(4):
        logits = torch.randn(n, vocab, generator=g)
        if trial:  # make the target agree with the tree's first child at many nodes
            for i in range(1, n):
                if torch.rand(1, generator=g) < 0.8:
                    logits[int(tensors.parents[i]), int(tensors.tokens[i])] += 10
        ref_logits = torch.empty(n, vocab)
        # Re-index the logits to the reference tree's node order through the node paths.
        for i, p in enumerate(tensor_paths):
            ref_logits[ref_index[p]] = logits[i]
        greedy = accept(reference, ref_logits, SamplingConfig())
        drawn = choose_tokens(logits, "sample", 1.0, 1.0, g)  # one draw per node, in the tensor tree's order
        ref_drawn = {ref_index[p]: int(drawn[i]) for i, p in enumerate(tensor_paths)}
        for choice, expected in ((choose_tokens(logits, "greedy"), greedy),
                                 (drawn, walk(reference, ref_drawn.__getitem__))):
            got = accept_tensors(tensors, choice, depth)
            length = int(got.length)
            assert got.emitted[:length].tolist() == expected.emitted
            assert [tensor_paths[int(i)] for i in got.path[:length]] == [reference_paths[i] for i in expected.path]
            assert int(got.path[-1]) == int(got.path[length - 1])  # padding repeats the last node


def _node_paths(tokens, parents):
    out = []
    for i in range(len(tokens)):
        path, j = [], i
        while True:
            path.append(int(tokens[j]))
            if j == 0:
                break
            j = int(parents[j])
        out.append(tuple(reversed(path)))
    return out


@pytest.mark.slow
def test_compiled_tree_build_and_walk_equal_eager():
    """GraphDecoder compiles these two functions (torch.compile, fixed shapes); compiled must equal eager."""
    build = torch.compile(build_tree_tensors, dynamic=False, fullgraph=True)
    compiled_walk = torch.compile(accept_tensors, dynamic=False, fullgraph=True)
    g = torch.Generator().manual_seed(3)
    for _ in range(3):
        anchor = torch.randint(0, 50, (1,), generator=g)
        logits = torch.randn(7, 50, generator=g) * 3
        want, got = build_tree_tensors(anchor, logits, 24, 4, 7), build(anchor, logits, 24, 4, 7)
        for name in ("tokens", "parents", "depths", "ancestors"):
            assert torch.equal(getattr(got, name), getattr(want, name)), name
        target_logits = torch.randn(want.tokens.shape[0], 50, generator=g)
        target_logits[:, want.tokens] += 4  # make some drafts the target's argmax, so walks get long
        choice = target_logits.argmax(-1)
        a, b = accept_tensors(want, choice, 7), compiled_walk(want, choice, 7)
        for name in ("path", "length", "emitted"):
            assert torch.equal(getattr(a, name), getattr(b, name)), name
