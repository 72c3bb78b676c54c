"""On CUDA: sampling (temperature > 0, top-p, seed) in the captured graphs of GraphDecoder.

The draws come from the decoder's CUDA generator, registered with the graphs and seeded per request; these
tests replay real graphs (GraphDecoder.use_graphs) and check the law of the output, not only that it runs.
"""

import dataclasses

import pytest
import torch

from jetspec_trt.models.presets import random_models
from jetspec_trt.runtime.config import RuntimeConfig, TreeConfig
from jetspec_trt.runtime.decoder import Decoder
from jetspec_trt.runtime.graph_decoder import GraphDecoder
from jetspec_trt.tree.accept import SamplingConfig
from jetspec_trt.tree.tree_tensors import accept_tensors
from tests.helpers import chi_square_p, sequence_law, small_vocab_pair

pytestmark = pytest.mark.gpu

NEW_TOKENS = 3
RUNS = 2500
PROMPT = [0, 1, 2]
SAMPLINGS = [SamplingConfig(1.0, 1.0), SamplingConfig(0.7, 0.9)]


def runtime_for(draft, tree):
    spec = draft.spec
    return RuntimeConfig(tree, "float32", 512, spec.block_size, spec.mask_token_id, spec.target_layer_ids, ())


def tokens_of(decoder, prompt, new_tokens, sampling, speculative=True, tree=None):
    return [t for c in decoder.generate(prompt, new_tokens, sampling, speculative, tree) for t in c]


@pytest.fixture(scope="module")
def tiny_fp32():
    target, draft, _ = random_models("tiny", "cuda", torch.float32)
    target.fuse_weights()
    draft.fuse_weights()
    return target, draft


# (a) seeds, and (d) greedy unchanged around sampled requests ---------------------------------------------------


def test_same_seed_same_tokens_other_seeds_other_tokens(tiny_fp32):
    target, draft = tiny_fp32
    runtime = runtime_for(draft, TreeConfig(64, 4, 7))
    graphed, eager = GraphDecoder(target, draft, runtime), Decoder(target, draft, runtime)
    assert graphed.use_graphs
    prompt = list(range(10, 40))
    greedy = tokens_of(eager, prompt, 48, SamplingConfig(), False)
    assert tokens_of(graphed, prompt, 48, SamplingConfig(), True, TreeConfig(16, 4, 7)) == greedy
    for speculative in (True, False):
        for budget in (16, 64):
            for sampling in SAMPLINGS:
                tree = TreeConfig(budget, 4, 7)
                run = [tokens_of(graphed, prompt, 48, dataclasses.replace(sampling, seed=s), speculative, tree)
                       for s in (1, 2, 1, 3)]
                assert run[0] == run[2], (speculative, budget, sampling)  # a request between: the seed still rules
                assert len({tuple(r) for r in run}) == 3, (speculative, budget, sampling)
    # Greedy requests after sampled ones (other captures of the same buckets): still the eager reference's tokens.
    for budget in (16, 64):
        assert tokens_of(graphed, prompt, 48, SamplingConfig(), True, TreeConfig(budget, 4, 7)) == greedy
    assert tokens_of(graphed, prompt, 48, SamplingConfig(), False) == greedy


def test_rounds_draw_fresh_numbers_on_every_replay(tiny_fp32):
    """Replays must not repeat the capture's random numbers: at T = 50 the AR step's distribution is nearly
    uniform over ~260 tokens, so 200 steps with fresh draws give ~140 distinct tokens; frozen noise, a handful."""
    target, draft = tiny_fp32
    graphed = GraphDecoder(target, draft, runtime_for(draft, TreeConfig(16, 4, 7)))
    tokens = tokens_of(graphed, [5, 6, 7], 200, SamplingConfig(50.0, seed=0), False)  # T = 50: nearly uniform
    assert len(tokens) == 200 and len(set(tokens)) > 100


# (b) chi-square on the graph path, and a wrong rule that it must catch -----------------------------------------


@pytest.fixture(scope="module")
def small_vocab(tmp_path_factory):
    target, draft, runtime = small_vocab_pair(tmp_path_factory.mktemp("small-vocab"), device="cuda")
    target.fuse_weights()  # as GPU engines run
    draft.fuse_weights()
    return target, draft, runtime


def graphed_p_value(decoder, sampling, speculative=True):
    """The chi-square p-value of RUNS seeded requests against the exact law, and the drafts they accepted."""
    law = sequence_law(decoder.target, PROMPT, NEW_TOKENS, sampling)
    samples, accepted = [], 0
    for seed in range(RUNS):
        samples.append(tuple(tokens_of(decoder, PROMPT, NEW_TOKENS, dataclasses.replace(sampling, seed=seed),
                                       speculative)))
        accepted += decoder.stats.accepted_drafts
    return chi_square_p(samples, law), accepted


@pytest.mark.parametrize("sampling", SAMPLINGS, ids=["T1", "T0.7-p0.9"])
@pytest.mark.parametrize("speculative", [True, False], ids=["spec", "ar"])
def test_graphed_sampling_matches_target(small_vocab, sampling, speculative):
    decoder = GraphDecoder(*small_vocab)
    assert decoder.use_graphs
    p_value, accepted = graphed_p_value(decoder, sampling, speculative)
    assert p_value > 1e-3
    assert (accepted > 0) == speculative  # the tree walk was exercised past the root


def wrong_accept_path(tree, choice, max_depth):
    """A plausible but wrong rule, graph-capturable: when the target's draw is any drafted child of a node, move
    to the node's first (best) child, as if accepting "a drafted token" were enough."""
    n = tree.tokens.shape[0]
    index = torch.arange(n, device=choice.device)
    is_child = (tree.parents[None, :] == index[:, None]) & (index[None, :] > 0)  # [node, j]: j is node's child
    drew_a_child = (is_child & (tree.tokens[None, :] == choice[:, None])).any(-1)
    first_child = torch.where(is_child, index[None, :], n).min(-1).values.clamp(max=n - 1)
    return accept_tensors(tree, torch.where(drew_a_child, tree.tokens[first_child], choice), max_depth)


def test_chi_square_catches_a_wrong_rule_on_the_graph_path(small_vocab):
    decoder = GraphDecoder(*small_vocab)
    decoder.accept_path = wrong_accept_path  # before the first capture: the graphs hold the wrong rule
    p_value, accepted = graphed_p_value(decoder, SAMPLINGS[0])
    assert accepted > 0 and p_value < 1e-3


# (c) the real buckets run, in bf16 and compiled -----------------------------------------------------------------


@pytest.mark.parametrize("dtype,compile_layers", [(torch.float32, False), (torch.bfloat16, False),
                                                  (torch.bfloat16, True)], ids=["fp32", "bf16", "bf16-compiled"])
def test_sampling_at_budgets_16_and_64(dtype, compile_layers):
    target, draft, _ = random_models("tiny", "cuda", dtype)
    target.fuse_weights()
    draft.fuse_weights()
    graphed = GraphDecoder(target, draft, runtime_for(draft, TreeConfig(64, 4, 7)), compile_layers=compile_layers)
    vocab = target.config.vocab_size
    g = torch.Generator().manual_seed(0)
    for i, budget in enumerate((16, 64, 16, 64)):
        prompt = torch.randint(0, 256, (int(torch.randint(2, 60, (1,), generator=g)),), generator=g).tolist()
        sampling = SamplingConfig(1.0, (1.0, 0.9)[i // 2], seed=i)
        tokens = tokens_of(graphed, prompt, 64, sampling, True, TreeConfig(budget, 4, 7))
        stats = graphed.stats
        assert all(0 <= t < vocab for t in tokens) and stats.new_tokens == len(tokens) >= 1
        assert stats.rounds >= 1 or stats.finish_reason == "stop"
        assert tokens == tokens_of(graphed, prompt, 64, sampling, True, TreeConfig(budget, 4, 7))


def test_engine_runs_sampled_requests_on_the_graph_decoder(tmp_path):
    from jetspec_trt.quickstart import make_tiny_engine
    from jetspec_trt.runtime.engine import Engine

    engine = Engine.load(make_tiny_engine(tmp_path).engine, device="cuda")
    ids = engine.encode("def f(x):")
    tokens = [t for c in engine.stream_tokens(ids, 16, SamplingConfig(1.0, 0.9, seed=7)) for t in c]
    assert engine.last_stats is engine.fast.stats and len(tokens) == engine.last_stats.new_tokens
    assert tokens == [t for c in engine.stream_tokens(ids, 16, SamplingConfig(1.0, 0.9, seed=7)) for t in c]
