"""Greedy speculative decoding is token-identical to plain greedy decoding of the same target."""

import dataclasses
import itertools

import pytest
import torch

from jetspec_trt.runtime.config import TreeConfig
from jetspec_trt.runtime.decoder import Decoder
from tests.helpers import OracleDecoder, tiny_pair, tiny_runtime

BUDGETS = (1, 4, 16, 64)
DEPTHS = (1, 3, 7)
NUM_PROMPTS = 200


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    torch.set_num_threads(1)  # tiny matmuls: threads only add overhead
    return tiny_pair(tmp_path_factory.mktemp("tiny"))


def prompts(count: int, seed: int = 0):
    rng = torch.Generator().manual_seed(seed)
    for _ in range(count):
        length = int(torch.randint(1, 40, (1,), generator=rng))
        yield torch.randint(0, 256, (length,), generator=rng).tolist()


def decode(decoder, prompt, max_new, **kwargs):
    return [t for chunk in decoder.generate(prompt, max_new, **kwargs) for t in chunk]


def test_oracle_draft_lossless_many_prompts_budgets_depths(pair):
    """>= 200 prompts x budgets {1,4,16,64} x depths {1,3,7}, with EOS inside trees and the token limit hit
    in the middle of an accepted path."""
    target, draft = pair
    base = tiny_runtime(draft, TreeConfig(64, 4, 7))
    decoder = OracleDecoder(target, draft, base)
    checked = eos_cut = limit_cut = deep = 0
    for i, prompt in enumerate(prompts(NUM_PROMPTS)):
        max_new = 12 + i % 13
        reference = decode(decoder, prompt, max_new, speculative=False)
        eos = (reference[i % len(reference)],) if i % 3 == 0 else base.eos_token_ids
        decoder.runtime = dataclasses.replace(base, eos_token_ids=eos)
        reference = decode(decoder, prompt, max_new, speculative=False)
        decoder.future = prompt + reference + [0] * 64
        for budget, depth in itertools.product(BUDGETS, DEPTHS):
            out = decode(decoder, prompt, max_new, tree=TreeConfig(budget, 4, depth))
            assert out == reference, f"prompt {i} budget {budget} depth {depth}"
            checked += 1
            stats = decoder.stats
            deep += max(stats.emitted_per_round, default=0) > 2
            if stats.finish_reason == "stop" and stats.rounds and stats.emitted_per_round[-1] > 1:
                eos_cut += 1
            if stats.finish_reason == "length" and sum(stats.emitted_per_round) + 1 > stats.new_tokens:
                limit_cut += 1
    assert checked == NUM_PROMPTS * len(BUDGETS) * len(DEPTHS)
    # The cases the test exists for actually happened, many times.
    assert eos_cut > 50 and limit_cut > 50 and deep > 500


def test_real_draft_head_lossless(pair):
    """The real (random) draft head path: its trees rarely hit, but every round must still be exact."""
    target, draft = pair
    decoder = Decoder(target, draft, tiny_runtime(draft, TreeConfig(64, 4, 7)))
    for prompt in prompts(20, seed=1):
        reference = decode(decoder, prompt, 24, speculative=False)
        for budget in BUDGETS:
            assert decode(decoder, prompt, 24, tree=TreeConfig(budget, 4, 7)) == reference


def test_stream_yields_per_round_and_stats(pair):
    target, draft = pair
    decoder = OracleDecoder(target, draft, tiny_runtime(draft), hit=1.0)
    prompt = [1, 2, 3]
    reference = decode(decoder, prompt, 40, speculative=False)
    decoder.future = prompt + reference + [0] * 64
    chunks = list(decoder.generate(prompt, 40))
    assert [t for c in chunks for t in c] == reference
    stats = decoder.stats
    assert len(chunks) == stats.rounds + 1  # prefill's token, then one chunk per round
    assert stats.tau > 4  # a perfect draft with depth 7 emits up to 8 tokens per round
    assert sum(stats.histogram().values()) == stats.rounds


def test_context_lookup_trees_are_lossless_and_their_chains_get_accepted(pair):
    """Trees with a context-lookup branch (TreeConfig.lookup): greedy output equals AR's on 60 prompts x budgets,
    and on these looping random-model outputs the chains carry accepted tokens the draft alone does not."""
    target, draft = pair
    decoder = Decoder(target, draft, tiny_runtime(draft, TreeConfig(64, 4, 7)))
    gained = 0
    for i, prompt in enumerate(prompts(60, seed=5)):
        reference = decode(decoder, prompt, 24, speculative=False)
        for budget, lookup in ((4, 2), (16, 6), (64, 7)):
            plain = decode(decoder, prompt, 24, tree=TreeConfig(budget, 4, 7))
            plain_accepted = decoder.stats.accepted_drafts
            out = decode(decoder, prompt, 24, tree=TreeConfig(budget, 4, 7, lookup))
            assert out == plain == reference, f"prompt {i} budget {budget} lookup {lookup}"
            gained += decoder.stats.accepted_drafts > plain_accepted
    assert gained >= 20
