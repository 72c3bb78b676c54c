"""Speculative sampling draws from the target's distribution: chi-square tests over whole sequences, and of the
parts: the per-node choice (temperature, top-p, the draw) and the tensor walk over sampled choices.

A tiny-vocabulary target makes the exact law of the first three generated tokens computable by enumeration;
thousands of seeded speculative runs must fit it (top-k and banned tokens included), and a deliberately wrong
acceptance rule must not. The filters and the reported log probabilities are checked on their own too.
"""

import dataclasses

import pytest
import torch

import jetspec_trt.runtime.host_rounds as host_rounds_module
from jetspec_trt.plugins.tree_attention import causal_mask
from jetspec_trt.runtime.config import TreeConfig
from jetspec_trt.runtime.decoder import Decoder
from jetspec_trt.runtime.graph_decoder import GraphDecoder
from jetspec_trt.tree.accept import (SamplingConfig, choose_tokens, next_token, target_probs, tempered_logits,
                                     token_logprobs, walk)
from jetspec_trt.tree.tree_tensors import accept_tensors, build_tree_tensors
from tests.helpers import chi_square_p, sequence_law, small_vocab_pair

NEW_TOKENS = 3
RUNS = 2500
PROMPT = [0, 1, 2]


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    torch.set_num_threads(1)
    return small_vocab_pair(tmp_path_factory.mktemp("small-vocab"))


@pytest.fixture(scope="module")
def decoder(pair):
    return Decoder(*pair)


def speculative_p_value(decoder, sampling):
    law = sequence_law(decoder.target, PROMPT, NEW_TOKENS, sampling)
    samples = []
    for seed in range(RUNS):
        out = [t for c in decoder.generate(PROMPT, NEW_TOKENS, dataclasses.replace(sampling, seed=seed)) for t in c]
        samples.append(tuple(out[:NEW_TOKENS]))
    return chi_square_p(samples, law), decoder.stats


@pytest.mark.parametrize("sampling", [SamplingConfig(1.0, 1.0), SamplingConfig(0.7, 0.9),
                                      SamplingConfig(1.0, 1.0, top_k=3, banned_token_ids=(2,))],
                         ids=["T1", "T0.7-p0.9", "T1-k3-ban2"])
def test_speculative_sampling_matches_target(decoder, sampling):
    p_value, _ = speculative_p_value(decoder, sampling)
    assert p_value > 1e-3


def test_fixed_shape_rounds_sample_from_the_target(pair):
    """The CUDA-graph round (GraphDecoder: a draw at every node, the tensor walk, device-scalar temperature and
    top_p), its stages run eagerly on the CPU; tests/runtime/test_graph_sampling_gpu.py replays the graphs."""
    p_value, stats = speculative_p_value(GraphDecoder(*pair), SamplingConfig(0.7, 0.9))
    assert p_value > 1e-3


def wrong_accept(tree, logits, sampling, generator=None):
    """A plausible but wrong rule: accept the first child outright when the target gives it >= 30%."""

    def pick(node):
        probs = target_probs(logits[node], sampling)
        first = next(iter(tree.children[node]), None)
        if first is not None and probs[first] >= 0.3:
            return first
        return next_draw(logits[node], sampling, generator)

    return walk(tree, pick)


def next_draw(logits, sampling, generator):
    return int(choose_tokens(logits, sampling.mode, sampling.temperature, sampling.top_p, generator))


def test_chi_square_catches_a_wrong_rule(decoder, monkeypatch):
    monkeypatch.setattr(host_rounds_module, "accept", wrong_accept)  # the rule the Decoder's rounds use
    p_value, stats = speculative_p_value(decoder, SamplingConfig(1.0, 1.0))
    assert stats.accepted_drafts > 0
    assert p_value < 1e-3


LOGITS = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, 3.0])


def test_top_k_keeps_the_k_most_likely_then_top_p():
    probs = target_probs(LOGITS, SamplingConfig(1.0, 1.0, top_k=3))
    assert probs.nonzero().flatten().tolist() == [0, 1, 5]
    assert torch.allclose(probs[[0, 1, 5]], torch.softmax(LOGITS[[0, 1, 5]], -1))
    # top-p applies to what top-k left: 5 alone holds 0.67 of it, 5 and 0 hold 0.91.
    assert target_probs(LOGITS, SamplingConfig(1.0, 0.8, top_k=3)).nonzero().flatten().tolist() == [0, 5]
    assert torch.equal(target_probs(LOGITS, SamplingConfig(1.0, 1.0, top_k=0)),
                       target_probs(LOGITS, SamplingConfig(1.0, 1.0, top_k=len(LOGITS))))
    one = target_probs(LOGITS, SamplingConfig(0.5, 1.0, top_k=1))
    assert one.tolist() == [0, 0, 0, 0, 0, 1.0]


def test_banned_tokens_are_never_chosen_greedy_or_sampled():
    banned = SamplingConfig(banned_token_ids=(5, 0))
    assert next_token(LOGITS, SamplingConfig(), None) == 5
    assert next_token(LOGITS, banned, None) == 1  # the best allowed token
    sampled = SamplingConfig(1.0, 1.0, banned_token_ids=(5, 0), top_k=2)
    probs = target_probs(LOGITS, sampled)
    assert probs.nonzero().flatten().tolist() == [1, 2]  # top-k among the allowed tokens
    generator = torch.Generator().manual_seed(0)
    assert {next_token(LOGITS, sampled, generator) for _ in range(200)} == {1, 2}


def test_token_logprobs_are_of_the_distribution_the_token_came_from():
    rows = torch.stack([LOGITS, LOGITS.flip(0)])
    greedy = token_logprobs(rows, [5, 3], SamplingConfig(banned_token_ids=(0,)))
    allowed = torch.log_softmax(LOGITS.masked_fill(torch.arange(6) == 0, float("-inf")), -1)
    flipped = torch.log_softmax(LOGITS.flip(0).masked_fill(torch.arange(6) == 0, float("-inf")), -1)
    assert greedy == pytest.approx([float(allowed[5]), float(flipped[3])])
    sampling = SamplingConfig(0.7, 0.9, top_k=4)
    assert token_logprobs(rows, [1, 2], sampling) == pytest.approx(
        [float(target_probs(rows[0], sampling)[1].log()), float(target_probs(rows[1], sampling)[2].log())])


@pytest.mark.parametrize("sampling", [SamplingConfig(), SamplingConfig(0.8, 0.9, seed=5, top_k=3)],
                         ids=["greedy", "sampled"])
def test_decoder_reports_each_tokens_logprob_under_the_target(decoder, sampling):
    """The log probs a speculative run reports (read off the tree's verify logits) equal a teacher-forced pass
    over the same tokens."""
    out = [t for chunk in decoder.generate(PROMPT, 8, sampling, logprobs=True) for t in chunk]
    reported = decoder.stats.token_logprobs
    assert decoder.stats.drafted_tokens > 0 and len(reported) == len(out) == 8
    tokens = torch.tensor(PROMPT + out)
    with torch.no_grad():
        logits = decoder.target(tokens, torch.arange(len(tokens)), decoder.target.new_cache(32, 16),
                                causal_mask(len(tokens))).logits
    expected = token_logprobs(logits[len(PROMPT) - 1: -1], out, sampling)
    assert reported == pytest.approx(expected, abs=1e-4)
    assert [t for chunk in decoder.generate(PROMPT, 8, sampling) for t in chunk] == out  # same tokens without
    assert decoder.stats.token_logprobs == []


# ---- the per-node choice ---------------------------------------------------------------------------------------


def test_tempered_logits_temperature_and_nucleus():
    logits = torch.log(torch.tensor([0.05, 0.5, 0.15, 0.3]))  # sorted: 1 (0.5), 3 (0.3), 2 (0.15), 0 (0.05)
    assert torch.allclose(tempered_logits(logits, 0.5, None), logits / 0.5)
    assert torch.allclose(tempered_logits(logits, torch.tensor(2.0), None), logits / 2)  # a device scalar
    # The nucleus is the smallest prefix (by probability) whose mass reaches top_p.
    for top_p, kept in ((0.3, [1]), (0.5, [1]), (0.7, [1, 3]), (0.8, [1, 3]), (0.81, [1, 3, 2]), (0.99, [0, 1, 2, 3])):
        out = tempered_logits(logits, 1.0, top_p)
        assert torch.isfinite(out).nonzero().flatten().sort().values.tolist() == sorted(kept), top_p
        assert torch.equal(out, tempered_logits(logits, 1.0, torch.tensor(top_p)))
        probs = target_probs(logits, SamplingConfig(1.0, top_p))
        want = torch.zeros(4)
        want[kept] = torch.tensor([0.05, 0.5, 0.15, 0.3])[kept]
        assert torch.allclose(probs, want / want.sum())
    # Temperature first, then the nucleus of the tempered distribution: at T=0.5 token 1 alone holds 0.69.
    assert torch.isfinite(tempered_logits(logits, 0.5, 0.65)).nonzero().flatten().tolist() == [1]
    # Rows are independent.
    rows = torch.stack([logits, logits.flip(0)])
    assert torch.equal(tempered_logits(rows, 1.0, 0.7)[1], tempered_logits(logits.flip(0), 1.0, 0.7))
    assert SamplingConfig().mode == "greedy" and SamplingConfig(1.0).mode == "sample"
    assert SamplingConfig(1.0, 0.9).mode == "nucleus" and SamplingConfig(0.0, 0.9).mode == "greedy"


@pytest.mark.parametrize("sampling", [SamplingConfig(1.0, 1.0), SamplingConfig(0.6, 1.0), SamplingConfig(1.3, 0.8)],
                         ids=["T1", "T0.6", "T1.3-p0.8"])
def test_choose_tokens_draws_each_row_from_target_probs(sampling):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(8, generator=g) * 1.5
    rows = logits.expand(40000, 8)  # one independent draw per row
    law = target_probs(logits, sampling)
    for temperature, top_p in ((sampling.temperature, sampling.top_p),
                               (torch.tensor(sampling.temperature), torch.tensor(sampling.top_p))):
        drawn = choose_tokens(rows, sampling.mode, temperature, top_p, g)
        assert drawn.shape == (40000,) and drawn.dtype == torch.long
        p_value = chi_square_p([(int(t),) for t in drawn], {(i,): float(law[i]) for i in range(8)})
        assert p_value > 1e-3
    # The wrong temperature fails the same test (so it can fail).
    drawn = choose_tokens(rows, sampling.mode, sampling.temperature * 1.5, sampling.top_p, g)
    assert chi_square_p([(int(t),) for t in drawn], {(i,): float(law[i]) for i in range(8)}) < 1e-3


def test_choose_tokens_greedy_and_seeded():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(6, 30, generator=g)
    assert torch.equal(choose_tokens(logits, "greedy"), logits.argmax(-1))
    a = choose_tokens(logits, "nucleus", 0.9, 0.95, torch.Generator().manual_seed(5))
    b = choose_tokens(logits, "nucleus", 0.9, 0.95, torch.Generator().manual_seed(5))
    c = torch.stack([choose_tokens(logits, "sample", 1.0, 1.0, torch.Generator().manual_seed(s)) for s in range(8)])
    assert torch.equal(a, b) and len({tuple(row.tolist()) for row in c}) > 1


# ---- the tensor walk (the CUDA-graph path's rule) over sampled choices -------------------------------------------


def first_child_tokens(tree):
    """For each node, the token of its first (highest-scored) child, or -1."""
    first = torch.full_like(tree.tokens, -1)
    for i in reversed(range(1, tree.tokens.shape[0])):
        first[tree.parents[i]] = tree.tokens[i]
    return first


def tensor_walk_samples(right: bool, sampling: SamplingConfig, runs: int):
    """(first, second) emitted tokens of `runs` tensor walks (second = -1 when the walk stops after one) over a
    fixed small tree, and their exact law: the first token is a draw at the root; when it is a child, the second
    is a draw at that child. right=False: the wrong rule of wrong_accept, in tensor form."""
    g = torch.Generator().manual_seed(2)
    vocab, depth = 5, 2
    tree = build_tree_tensors(torch.tensor([0]), torch.randn(depth, vocab, generator=g), 7, 2, depth)
    n = tree.tokens.shape[0]
    logits = torch.randn(n, vocab, generator=g)
    logits[tree.parents[1:], tree.tokens[1:]] += 1.0  # the target likes the drafts, but not always
    logits[0, tree.tokens[1]] += 1.0  # the root's first child: over 30% (where the wrong rule acts), under 100%
    probs = target_probs(logits, sampling)
    children = {int(tree.tokens[i]): i for i in range(1, n) if int(tree.parents[i]) == 0}
    law = {}
    for first in range(vocab):
        if first in children:
            for second in range(vocab):
                law[(first, second)] = float(probs[0, first] * probs[children[first], second])
        else:
            law[(first, -1)] = float(probs[0, first])
    first_child = first_child_tokens(tree)
    wrong = (first_child >= 0) & (probs.gather(1, first_child.clamp_min(0)[:, None])[:, 0] >= 0.3)
    samples = []
    for _ in range(runs):
        choice = choose_tokens(logits, sampling.mode, sampling.temperature, sampling.top_p, g)
        if not right:
            choice = torch.where(wrong, first_child, choice)
        walked = accept_tensors(tree, choice, depth)
        emitted = walked.emitted[: int(walked.length)].tolist()
        samples.append((emitted[0], emitted[1] if len(emitted) > 1 else -1))
    return samples, law


@pytest.mark.parametrize("sampling", [SamplingConfig(1.0, 1.0), SamplingConfig(0.7, 0.9)], ids=["T1", "T0.7-p0.9"])
def test_tensor_walk_over_sampled_choices_matches_target(sampling):
    samples, law = tensor_walk_samples(True, sampling, 4000)
    assert sum(s[1] >= 0 for s in samples) > 500  # drafts were accepted: the second token was tested too
    assert chi_square_p(samples, law) > 1e-3
    samples, law = tensor_walk_samples(False, sampling, 4000)
    assert chi_square_p(samples, law) < 1e-3


@pytest.mark.parametrize("backend,sampling", [(Decoder, SamplingConfig(1.0, 1.0)),
                                              (GraphDecoder, SamplingConfig(0.7, 0.9))], ids=["eager", "graph"])
def test_sampling_with_a_context_lookup_chain_matches_target(pair, backend, sampling):
    """Trees carrying a context-lookup branch (TreeConfig.lookup) still sample exactly from the target: the host
    trees, and GraphDecoder's lookup buckets (chain found and merged on the device; stages eager on the CPU)."""
    target, draft, runtime = pair
    tree = TreeConfig(16, 2, 3, lookup=2)
    p_value, _ = speculative_p_value(backend(target, draft, dataclasses.replace(runtime, tree=tree)), sampling)
    assert p_value > 1e-3
