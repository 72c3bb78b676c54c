"""The fixed-shape (CUDA-graph) tree build and acceptance walk equal the reference heap build and walk."""

import pytest
import torch

from jetspec_trt.tree.accept import SamplingConfig, accept, choose_tokens, walk
from jetspec_trt.tree.tree import build_tree, depth_top_logp
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


def _check_tree_shape(t, n):
    """Parents before children, depths one below the parent's, ancestors = the parent's plus the node itself."""
    assert t.tokens.shape[0] == n and t.ancestors.shape == (n, n)
    assert int(t.parents[0]) == 0 and int(t.depths[0]) == 0
    for i in range(1, n):
        p = int(t.parents[i])
        assert p < i and t.depths[i] == t.depths[p] + 1
        assert torch.equal(t.ancestors[i], t.ancestors[p] | (torch.arange(n) == i))


def _node_scores(t, depth_logits):
    logp = torch.log_softmax(depth_logits.float(), -1).double()
    return sorted(sum(float(logp[d, tok]) for d, tok in enumerate(path[1:])) for path in _node_paths(t.tokens, t.parents))


@pytest.mark.parametrize("budget,topk,depth", [(16, 7, 15), (64, 7, 15), (64, 2, 15), (256, 7, 15), (64, 7, 3)])
def test_bf16_logits_with_ties_give_a_best_first_tree(budget, topk, depth):
    """bf16 logits tie often (equal top values, equal path sums). Ties may pick a different one of the tied nodes
    than the heap does, but the tree must still be a best-first tree: the same node scores as the reference."""
    g = torch.Generator().manual_seed(budget + depth)
    depth_logits = (torch.randn(15, 3000, generator=g) * 3).bfloat16()
    tied = depth_logits.float().topk(7, -1).values
    assert (tied[:, 1:] == tied[:, :-1]).any(), "the data must contain tied top logits"
    reference = build_tree(7, depth_logits, budget, topk, depth)
    tensors = build_tree_tensors(torch.tensor([7]), depth_logits, budget, topk, depth)
    _check_tree_shape(tensors, reference.size)
    assert _node_scores(tensors, depth_logits) == pytest.approx(_node_scores(reference, depth_logits), abs=1e-9)
    again = build_tree_tensors(torch.tensor([7]), depth_logits, budget, topk, depth)
    assert torch.equal(again.tokens, tensors.tokens) and torch.equal(again.parents, tensors.parents)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_logits_still_give_a_valid_tree(bad):
    """A graph warm-up can read logits nothing wrote: the tree may be garbage but its indices must be valid."""
    g = torch.Generator().manual_seed(1)
    depth_logits = torch.randn(15, 50, generator=g)
    depth_logits[0, 3] = bad
    depth_logits[2] = bad
    depth_logits[5, ::2] = bad
    for budget in (16, 64):
        t = build_tree_tensors(torch.tensor([7]), depth_logits, budget, 7, 15)
        _check_tree_shape(t, budget)
        assert ((t.tokens >= 0) & (t.tokens < 50)).all()


def test_depth_top_logp_is_the_top_of_log_softmax():
    g = torch.Generator().manual_seed(0)
    depth_logits = torch.randn(15, 1000, generator=g) * 4
    logp = torch.log_softmax(depth_logits, -1)
    want_values, want_ids = logp.topk(7, -1)
    values, ids = depth_top_logp(depth_logits, 7)
    assert torch.equal(ids, want_ids)
    torch.testing.assert_close(values, want_values, rtol=0, atol=1e-5)
    # bf16 logits: the top-k reads them as they are, the same ids and values as their exact fp32 copy
    half = depth_logits.bfloat16()
    v16, i16 = depth_top_logp(half, 7)
    v32, i32 = depth_top_logp(half.float(), 7)
    assert v16.dtype == torch.float32
    torch.testing.assert_close(v16, v32, rtol=0, atol=1e-6)
    assert torch.equal(half.float().gather(1, i16), half.float().gather(1, i32))  # ids may differ only by ties


def _paths(tokens, parents) -> set[tuple[int, ...]]:
    """Every live node's token path from the root (a dead lookup slot, token -1, left out)."""
    out = set()
    for i in range(len(tokens)):
        if tokens[i] < 0:
            continue
        path, j = [], i
        while j > 0:
            path.append(tokens[j])
            j = parents[j]
        out.add(tuple(reversed(path)))
    return out


def test_lookup_chain_tensors_equal_the_host_lookup():
    import random

    from jetspec_trt.tree.lookup import context_lookup
    from jetspec_trt.tree.tree_tensors import lookup_chain_tensors

    rng = random.Random(0)
    found = 0
    for _ in range(300):
        ids = [rng.randrange(4) for _ in range(rng.randrange(1, 30))]
        anchor = rng.randrange(len(ids))
        history = torch.tensor(ids + [7] * 5)  # past the anchor: never read
        for length in (1, 3, 6):
            want = context_lookup(ids, anchor, length)
            assert lookup_chain_tensors(history, torch.tensor([anchor], dtype=torch.int32), length).tolist() == \
                want + [-1] * (length - len(want)), (ids, anchor, length)
            found += bool(want)
    assert found > 300


@pytest.mark.parametrize("seed", range(40))
def test_with_chain_tensors_hold_the_host_merge(seed):
    """The merged tensor tree holds exactly the host with_chain tree's token paths (its dead slots aside), in
    draft + chain-length nodes, and its ancestor matrix follows its parents."""
    from jetspec_trt.tree.tree import with_chain
    from jetspec_trt.tree.tree_tensors import with_chain_tensors

    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(5, 6, generator=gen) * 2
    host, device_tree = build_tree(3, logits, 12, 3, 5), build_tree_tensors(torch.tensor([3]), logits, 12, 3, 5)
    chain = torch.randint(0, 6, (4,), generator=gen)
    if seed % 3 == 0:
        chain[2:] = -1
    elif seed % 3 == 1:  # the chain starts along the tree's own nodes (1-4 of them, fewer where a path ends)
        node = 0
        for i in range(seed % 4 + 1):
            kids = [j for j in range(host.size) if host.parents[j] == node and j > 0]
            if not kids:
                break
            node = kids[(seed // 3) % len(kids)]
            chain[i] = host.tokens[node]
    listed = chain.tolist()
    listed = listed[: listed.index(-1)] if -1 in listed else listed
    merged, reference = with_chain_tensors(device_tree, chain, 5), with_chain(host, listed)
    assert merged.tokens.shape[0] == device_tree.tokens.shape[0] + 4
    assert _paths(merged.tokens.tolist(), merged.parents.tolist()) == \
        _paths(reference.tokens.tolist(), reference.parents.tolist())
    for i in range(merged.tokens.shape[0]):
        chain_set, j = {i}, i
        while j > 0:
            j = int(merged.parents[j])
            chain_set.add(j)
        assert set(torch.nonzero(merged.ancestors[i]).flatten().tolist()) == chain_set


def test_a_draft_vocabulary_builds_the_tree_of_its_columns():
    """Logits over a subset of the vocabulary (columns: vocab_ids) give the tree the whole vocabulary's logits give
    with every other token at -inf: the same tokens, parents and depths, in both device builds and on the host."""
    g = torch.Generator().manual_seed(5)
    vocab_ids = torch.tensor([2, 5, 11, 12, 30, 31, 47])
    sub = torch.randn(4, len(vocab_ids), generator=g)
    full = torch.full((4, 50), -torch.inf)
    full[:, vocab_ids] = sub
    anchor = torch.tensor([9])
    for budget, topk in ((8, 3), (16, 4)):
        ours, reference = (build_tree_tensors(anchor, sub, budget, topk, 4, vocab_ids),
                           build_tree_tensors(anchor, full, budget, topk, 4))
        for a, b in zip((ours.tokens, ours.parents, ours.depths), (reference.tokens, reference.parents,
                                                                   reference.depths)):
            assert torch.equal(a, b)
        host, host_reference = build_tree(9, sub, budget, topk, 4, vocab_ids), build_tree(9, full, budget, topk, 4)
        assert torch.equal(host.tokens, host_reference.tokens)
        assert set(host.tokens[1:].tolist()) <= set(vocab_ids.tolist())
