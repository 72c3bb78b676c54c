"""Speculative sampling draws from the target's distribution: a chi-square test over whole sequences.

A tiny-vocabulary target makes the exact law of the first three generated tokens computable by enumeration;
thousands of seeded speculative runs must fit it (top-k and banned tokens included), and a deliberately wrong
acceptance rule must not. The filters and the reported log probabilities are checked on their own too.
"""

import dataclasses
import itertools

import pytest
import torch
from scipy.stats import chisquare

import jetspec_trt.runtime.host_rounds as host_rounds_module
from jetspec_trt.models.checkpoint import load_draft, load_target
from jetspec_trt.models.presets import preset, write_random_pair
from jetspec_trt.plugins.tree_attention import causal_mask
from jetspec_trt.runtime.config import RuntimeConfig, TreeConfig
from jetspec_trt.runtime.decoder import Decoder
from jetspec_trt.tree.accept import SamplingConfig, next_token, target_probs, token_logprobs, walk

VOCAB = 5
NEW_TOKENS = 3
RUNS = 2500
PROMPT = [0, 1, 2]


@pytest.fixture(scope="module")
def decoder(tmp_path_factory):
    torch.set_num_threads(1)
    shape = dataclasses.replace(preset("tiny"), vocab_size=VOCAB, mask_token_id=VOCAB - 1, eos_token_id=VOCAB - 1,
                                init_std=0.3, tie_word_embeddings=False)
    root = tmp_path_factory.mktemp("small-vocab")
    write_random_pair(shape, root / "target", root / "draft", seed=3)
    target, draft = load_target(root / "target"), load_draft(root / "draft")
    runtime = RuntimeConfig(TreeConfig(16, 2, 3), "float32", 64, shape.block_size, shape.mask_token_id,
                            draft.spec.target_layer_ids, eos_token_ids=(), page_size=16)
    return Decoder(target, draft, runtime)


def exact_law(decoder, sampling):
    """P(t1, t2, t3 | prompt) by enumerating every continuation through the target."""
    target = decoder.target
    law = {}
    with torch.no_grad():
        for seq in itertools.product(range(VOCAB), repeat=NEW_TOKENS - 1):
            tokens = torch.tensor(PROMPT + list(seq))
            cache = target.new_cache(32, 16)
            logits = target(tokens, torch.arange(len(tokens)), cache, causal_mask(len(tokens))).logits
            probs = [target_probs(logits[len(PROMPT) - 1 + i], sampling) for i in range(NEW_TOKENS)]
            for last in range(VOCAB):
                p = probs[0][seq[0]] * probs[1][seq[1]] * probs[2][last]
                law[seq + (last,)] = float(p)
    return law


def chi_square_p(decoder, sampling):
    law = exact_law(decoder, sampling)
    counts = dict.fromkeys(law, 0)
    for seed in range(RUNS):
        out = [t for c in decoder.generate(PROMPT, NEW_TOKENS, dataclasses.replace(sampling, seed=seed)) for t in c]
        counts[tuple(out[:NEW_TOKENS])] += 1
    # Pool cells with small expected counts so the chi-square approximation holds.
    cells = sorted(law, key=law.get, reverse=True)
    observed, expected, pool_o, pool_e = [], [], 0, 0.0
    for cell in cells:
        if law[cell] * RUNS >= 5:
            observed.append(counts[cell])
            expected.append(law[cell] * RUNS)
        else:
            pool_o, pool_e = pool_o + counts[cell], pool_e + law[cell] * RUNS
    if pool_e > 0:
        observed.append(pool_o)
        expected.append(pool_e)
    else:  # top-p removed these sequences: none may ever be drawn
        assert pool_o == 0
    total = sum(observed)
    expected = [e * total / sum(expected) for e in expected]
    return chisquare(observed, expected).pvalue, decoder.stats


@pytest.mark.parametrize("sampling", [SamplingConfig(1.0, 1.0), SamplingConfig(0.7, 0.9),
                                      SamplingConfig(1.0, 1.0, top_k=3, banned_token_ids=(2,))],
                         ids=["T1", "T0.7-p0.9", "T1-k3-ban2"])
def test_speculative_sampling_matches_target(decoder, sampling):
    p_value, _ = chi_square_p(decoder, sampling)
    assert p_value > 1e-3


def wrong_accept(tree, logits, sampling, generator=None):
    """A plausible but wrong rule: accept the first child outright when the target gives it >= 30%."""

    def pick(node):
        probs = target_probs(logits[node], sampling)
        first = next(iter(tree.children[node]), None)
        if first is not None and probs[first] >= 0.3:
            return first
        return int(torch.multinomial(probs, 1, generator=generator))

    return walk(tree, pick)


def test_chi_square_catches_a_wrong_rule(decoder, monkeypatch):
    monkeypatch.setattr(host_rounds_module, "accept", wrong_accept)  # the rule the Decoder's rounds use
    p_value, stats = chi_square_p(decoder, SamplingConfig(1.0, 1.0))
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
