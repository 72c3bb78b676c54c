"""The offline acceptance simulation (tree/simulate.py, train/acceptance.py) against the trees it replays and
against the decode loop itself."""

from __future__ import annotations

import pytest
import torch

from jetspec_trt.runtime.config import TreeConfig
from jetspec_trt.runtime.decoder import Decoder
from jetspec_trt.train.acceptance import anchor_candidates, truth_tokens
from jetspec_trt.train.data import TrainSequence
from jetspec_trt.tree.accept import walk as accept_walk
from jetspec_trt.train.features import FeatureStore
from jetspec_trt.tree.lookup import context_lookup, lookup_chains
from jetspec_trt.tree.simulate import accepted_drafts, round_lengths
from jetspec_trt.tree.tree import build_tree_from_top, depth_top_logp
from tests.helpers import small_vocab_pair


def walk(tree, truth: list[int]) -> int:
    """Drafts the greedy walk (tree.accept.walk) accepts when the target writes `truth` (-1: past the end)."""
    return accept_walk(tree, lambda node: truth[int(tree.depths[node])] if tree.depths[node] < len(truth) else -1
                       ).accepted_drafts


@pytest.mark.parametrize("topk,depth", [(1, 4), (3, 6), (7, 15)])
def test_accepted_drafts_equal_walking_the_built_trees(topk, depth):
    """Every budget's count is what build_tree_from_top's tree of that budget accepts along the true tokens, on
    anchors whose true path leaves the candidates, stops at the sequence's end, or goes deep."""
    gen = torch.Generator().manual_seed(topk * 100 + depth)
    anchors, vocab, budgets = 300, 12, (1, 2, 5, 16, 64, 256)
    logits = torch.randn(anchors, depth, vocab, generator=gen) * 2
    logp, ids = depth_top_logp(logits.reshape(-1, vocab), topk)
    logp, ids = logp.view(anchors, depth, topk), ids.view(anchors, depth, topk)
    # true tokens: mostly among the candidates (at a random rank), sometimes not, sometimes past the end (-1)
    pick = torch.randint(0, topk, (anchors, depth), generator=gen)
    truth = ids.gather(-1, pick[..., None])[..., 0]
    outside = torch.rand(anchors, depth, generator=gen) < 0.15
    truth = torch.where(outside, vocab + 1, truth)
    ends = torch.randint(1, depth + 3, (anchors, 1), generator=gen)
    truth = torch.where(torch.arange(depth) >= ends, -1, truth)
    got = accepted_drafts(logp, ids, truth, budgets, topk, depth)
    for a in range(anchors):
        for b, budget in enumerate(budgets):
            tree = build_tree_from_top(0, logp[a], ids[a], budget, topk, depth)
            assert got[b, a] == walk(tree, truth[a].tolist()), (a, budget)
    assert got[-1].max() >= 4 and (got[-1] == 0).any()  # deep paths and dead ends both occurred


def test_round_lengths_chain_the_anchors():
    # anchor 0 accepts 2 -> emits 3, next anchor 3 accepts 0 -> 1, anchor 4 accepts 9 but only 2 tokens remain
    assert round_lengths(torch.tensor([2, 5, 5, 0, 9, 0])) == [3, 1, 2]
    assert round_lengths(torch.tensor([0, 0])) == [1, 1]
    assert round_lengths(torch.tensor([], dtype=torch.long)) == []


@pytest.mark.parametrize("lookup", [0, 2])
def test_simulation_replays_the_decode_loop(tmp_path, lookup):
    """fp32 greedy: the rounds simulated from the head's teacher-forced candidates over the loop's own output emit
    exactly what the loop's rounds emitted, round for round (a 5-token vocabulary, so trees accept often), up to
    the token limit's cut of the last round; with context-lookup chains in the trees too."""
    target, draft, runtime = small_vocab_pair(tmp_path)
    tree = TreeConfig(16, 2, 3, lookup)
    decoder = Decoder(target, draft, runtime)
    rounds = deep = 0
    for seed in range(6):
        prompt = torch.randint(0, 4, (3 + seed,), generator=torch.Generator().manual_seed(seed)).tolist()
        out = [t for chunk in decoder.generate(prompt, 30, tree=tree) for t in chunk]
        loop = decoder.stats.emitted_per_round
        sequence = TrainSequence(prompt, out)
        store = FeatureStore.build(target, [sequence], tuple(draft.spec.target_layer_ids), progress=False,
                                   keep_hidden=False)
        logp, ids = anchor_candidates(draft, target, store, 0, sequence, tree.topk, tree.max_depth)
        chains = lookup_chains(sequence.ids, len(prompt), lookup)
        accepted = accepted_drafts(logp, ids, truth_tokens(sequence, tree.max_depth), (tree.budget,), tree.topk,
                                   tree.max_depth, chains if lookup else None, lookup)
        simulated = round_lengths(accepted[0])
        # The loop counts its last round before the token limit cut it; the replay holds only the tokens written.
        assert simulated[:-1] == loop[:-1] and simulated[-1] <= loop[-1], seed
        assert sum(simulated) == len(out) - 1  # every response token after the prefill's, once
        rounds, deep = rounds + len(loop), deep + sum(n > 2 for n in loop)
    assert rounds > 30 and deep > 3  # the comparison covered many rounds, deep ones too


def test_context_lookup_copies_what_followed_the_latest_earlier_occurrence():
    ids = [5, 1, 2, 3, 9, 9, 1, 2, 3, 7, 1, 2]
    assert context_lookup(ids, 11, 4) == [3, 7, 1, 2]  # "1 2" last seen at 6-7, followed by 3 7 1 2 (up to the anchor)
    assert context_lookup(ids, 8, 3) == [9, 9, 1]  # "1 2 3" seen at 1-3
    assert context_lookup(ids, 8, 3, max_ngram=1) == [9, 9, 1]  # "3" seen at 3
    assert context_lookup(ids, 4, 3) == []  # 9 never occurred before
    assert context_lookup(ids, 11, 0) == [] and context_lookup([4], 0, 3) == []
    # one index extended anchor by anchor gives what a fresh index at each anchor gives
    assert lookup_chains(ids, 2, 4) == [context_lookup(ids, a, 4) for a in range(2, len(ids) - 1)]


@pytest.mark.parametrize("seed", range(3))
def test_accepted_drafts_with_a_lookup_chain_equal_the_union_tree(seed):
    """With a chain, each budget's count is the longest true prefix that is a path of the union of the draft's
    tree (on the nodes the chain does not keep) and the chain's prefixes, checked by brute force."""
    gen = torch.Generator().manual_seed(seed)
    anchors, vocab, depth, topk, budgets = 200, 6, 6, 3, (1, 3, 8, 24)
    logp, ids = depth_top_logp(torch.randn(anchors * depth, vocab, generator=gen) * 2, topk)
    logp, ids = logp.view(anchors, depth, topk), ids.view(anchors, depth, topk)
    truth = torch.randint(0, vocab, (anchors, depth), generator=gen)
    chains = [torch.where(torch.rand(n, generator=gen) < 0.7, truth[a, :n], 0).tolist()
              for a, n in enumerate(torch.randint(0, 7, (anchors,), generator=gen).tolist())]
    got = accepted_drafts(logp, ids, truth, budgets, topk, depth, chains, lookup=6)
    for a in range(anchors):
        for b, budget in enumerate(budgets):
            kept = min(6, budget - 1)  # nodes kept for the chain, used or not
            chain = chains[a][:kept]
            tree = build_tree_from_top(0, logp[a], ids[a], budget - kept, topk, depth)
            paths = {tuple(chain[:i]) for i in range(len(chain) + 1)}
            stack = [(0, ())]
            while stack:
                node, path = stack.pop()
                paths.add(path)
                stack += [(child, path + (token,)) for token, child in tree.children[node].items()]
            expect = max(i for i in range(depth + 1) if tuple(truth[a, :i].tolist()) in paths)
            assert got[b, a] == expect, (a, budget)
    assert (got[-1] > accepted_drafts(logp, ids, truth, budgets, topk, depth)[-1]).any()  # the chain mattered
