"""The fixed-shape GPU round (run eagerly here) emits exactly the reference decoder's tokens."""

import dataclasses

import pytest
import torch

from jetspec_trt.errors import JetSpecError
from jetspec_trt.runtime.config import TreeConfig
from jetspec_trt.runtime.decoder import Decoder
from jetspec_trt.runtime.graph_decoder import GraphDecoder, prefill_buckets
from jetspec_trt.tree.tree_tensors import node_count
from jetspec_trt.tree.accept import SamplingConfig
from tests.helpers import check_bucketed_prefill, tiny_pair, tiny_runtime

# Prompt lengths around every prefill bucket edge of tiny_runtime's max_seq_len 256 (buckets 32, 64, 128, 256),
# up to the longest prompt it takes.
EDGE_LENGTHS = (1, 2, 31, 32, 33, 63, 64, 65, 127, 128, 129, 200, 255)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    torch.set_num_threads(1)
    return tiny_pair(tmp_path_factory.mktemp("tiny"))


@pytest.mark.parametrize("fuse", [False, True])
def test_graph_round_matches_reference(pair, fuse):
    target, draft = pair
    if fuse:
        target.fuse_weights()
        draft.fuse_weights()
    runtime = tiny_runtime(draft, TreeConfig(64, 4, 7))
    reference, fast = Decoder(target, draft, runtime), GraphDecoder(target, draft, runtime)
    g = torch.Generator().manual_seed(5)
    for i in range(12):
        prompt = torch.randint(0, 256, (int(torch.randint(1, 30, (1,), generator=g)),), generator=g).tolist()
        tree = TreeConfig((1, 4, 16, 64)[i % 4], 4, (1, 3, 7)[i % 3])
        expected = [t for c in reference.generate(prompt, 30, speculative=False) for t in c]
        got = [t for c in fast.generate(prompt, 30, tree=tree) for t in c]
        assert got == expected
        assert [t for c in fast.generate(prompt, 30, speculative=False) for t in c] == expected


def test_fixed_shape_causal_mask_equals_dense():
    from jetspec_trt.plugins.tree_attention import pack_mask
    for n in (1, 5, 31, 32, 33, 100):
        assert torch.equal(__import__("jetspec_trt.plugins.tree_attention", fromlist=["x"]).causal_mask(n),
                           pack_mask(torch.ones(n, n, dtype=torch.bool).tril()))


def test_round_pipeline_reads_rounds_in_order_and_holds_two():
    from jetspec_trt.runtime.graph_decoder import RoundPipeline

    value = torch.zeros(2, dtype=torch.long)
    pipeline = RoundPipeline((value,))

    def bump() -> None:
        value.add_(1)

    pipeline.launch(bump)
    pipeline.launch(bump)
    with pytest.raises(RuntimeError, match="two rounds"):
        pipeline.launch(bump)
    assert pipeline.read() == ([1, 1],)
    pipeline.launch(bump)
    assert pipeline.read() == ([2, 2],)
    assert pipeline.read() == ([3, 3],)


@pytest.mark.parametrize("speculative", [False, True])
def test_cache_length_after_generate_ignores_the_round_run_past_the_end(pair, speculative):
    """The host queues one round past the last one it reads; the committed length is the last read round's."""
    target, draft = pair
    runtime = tiny_runtime(draft, TreeConfig(16, 4, 7))
    fast = GraphDecoder(target, draft, runtime)
    prompt = list(range(3, 20))
    chunks = list(fast.generate(prompt, 25, speculative=speculative))
    emitted = sum(len(c) for c in chunks)
    assert fast.target_cache.length == int(fast.target_cache.ctx_len)
    if not speculative:  # every emitted token but the last went through the target
        assert fast.target_cache.length == len(prompt) + emitted - 1
    else:  # a round commits its accepted path, of which the limit may cut the tail
        assert len(prompt) + emitted - 1 <= fast.target_cache.length < len(prompt) + emitted + 7


def test_reset_and_fill_caches(pair):
    """What the engine bench uses to time steps at contexts nobody prefilled."""
    target, draft = pair
    fast = GraphDecoder(target, draft, tiny_runtime(draft, TreeConfig(16, 4, 7)))
    fast.fill_caches(torch.Generator().manual_seed(1))
    for cache in (fast.target_cache, fast.draft_cache):
        assert cache.k_all.abs().sum() > 0 and cache.v_all.abs().sum() > 0
    fast.reset(40)
    for cache in (fast.target_cache, fast.draft_cache):
        assert cache.length == int(cache.ctx_len) == 40
    fast.reset()
    assert fast.target_cache.length == fast.draft_cache.length == 0


def test_graph_rounds_count_as_the_reference_rounds(pair):
    """Through the one round loop both backends report the same rounds; the graph one drafts its full bucket."""
    from jetspec_trt.tree.tree_tensors import node_count

    target, draft = pair
    tree = TreeConfig(16, 4, 3)
    runtime = tiny_runtime(draft, tree)
    reference, fast = Decoder(target, draft, runtime), GraphDecoder(target, draft, runtime)
    prompt = list(range(5, 25))
    assert list(fast.generate(prompt, 20)) == list(reference.generate(prompt, 20))
    assert fast.stats.rounds == reference.stats.rounds > 0
    assert fast.stats.emitted_per_round == reference.stats.emitted_per_round
    assert fast.stats.accepted_drafts == reference.stats.accepted_drafts
    assert fast.stats.drafted_tokens == fast.stats.rounds * (node_count(16, 4, 3) - 1)


def test_graph_sampling_is_seeded_and_keeps_greedy_unchanged(pair):
    """Sampling on the fixed-shape path (eager here; tests/runtime/test_graph_sampling_gpu.py replays the graphs):
    a seed fixes the tokens, different seeds differ, each sampling mode gets its own stages, and greedy requests
    around sampled ones still equal the reference decoder."""
    from jetspec_trt.tree.accept import SamplingConfig

    target, draft = pair
    tree = TreeConfig(16, 4, 3)
    runtime = tiny_runtime(draft, tree)
    reference, fast = Decoder(target, draft, runtime), GraphDecoder(target, draft, runtime)
    prompt = list(range(5, 25))
    greedy = [t for c in reference.generate(prompt, 20) for t in c]
    assert [t for c in fast.generate(prompt, 20) for t in c] == greedy
    vocab = target.config.vocab_size
    for speculative in (True, False):
        for sampling in (SamplingConfig(1.0, seed=1), SamplingConfig(0.8, 0.9, seed=1)):
            seeded = [dataclasses.replace(sampling, seed=s) for s in (1, 1, 2, 3)]
            runs = [[t for c in fast.generate(prompt, 20, one, speculative) for t in c] for one in seeded]
            assert runs[0] == runs[1]  # same seed, same tokens
            assert len({tuple(r) for r in runs[1:]}) == 3  # other seeds, other tokens
            assert all(0 <= t < vocab for r in runs for t in r) and all(len(r) == 20 for r in runs)
            assert fast.stats.new_tokens == 20
    assert {mode for _, mode in fast._stages} == {"greedy", "sample", "nucleus"}
    assert set(fast._ar_steps) == {"sample", "nucleus"}
    assert [t for c in fast.generate(prompt, 20) for t in c] == greedy
    assert [t for c in fast.generate(prompt, 20, speculative=False) for t in c] == greedy


def test_tree_stage_mask_packs_the_tree_ancestors():
    from jetspec_trt.plugins.tree_attention import unpack_mask
    from jetspec_trt.runtime.graph_decoder import build_tree_and_mask

    logits = torch.randn(15, 100, generator=torch.Generator().manual_seed(2))
    for budget in (1, 16, 64):
        built, mask = build_tree_and_mask(torch.tensor([3]), logits, budget, 7, 15)
        assert torch.equal(unpack_mask(mask, built.tokens.shape[0]), built.ancestors)


def test_prefill_buckets():
    assert prefill_buckets(256) == (32, 64, 128, 256)
    assert prefill_buckets(300) == (32, 64, 128, 256, 300)
    assert prefill_buckets(32) == (32,) and prefill_buckets(20) == (20,)


@pytest.mark.parametrize("speculative", [False, True])
def test_bucketed_prefill_equals_the_eager_prefill(pair, speculative):
    """A prompt padded to its bucket: the unpadded eager prefill's next token and, for every real slot, its target
    and draft K/V (to fp32 GEMM rounding: CPU GEMMs of another M round differently, by ~1e-5; exactly when the
    prompt fills its bucket), with the caches committed at the prompt's length."""
    target, draft = pair
    fast = GraphDecoder(target, draft, tiny_runtime(draft, TreeConfig(16, 4, 3)))
    for n in EDGE_LENGTHS:
        prompt = torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(n)).tolist()
        got, want = check_bucketed_prefill(fast, prompt, speculative, atol=0.0 if n in fast.prefill_buckets else 1e-4)
        assert torch.allclose(got, want, atol=1e-4, rtol=0) and int(got.argmax()) == int(want.argmax())
    assert set(fast._prefills) == {(size, speculative) for size in fast.prefill_buckets}
    with pytest.raises(JetSpecError, match="prefills 1 to 256"):
        fast.prefill_stage(257, speculative)


def test_bucketed_prefill_generates_the_reference_tokens(pair):
    """Whole generations from prompts around every bucket edge, greedy: speculative and AR equal the eager Decoder."""
    target, draft = pair
    runtime = tiny_runtime(draft, TreeConfig(16, 4, 3))
    reference, fast = Decoder(target, draft, runtime), GraphDecoder(target, draft, runtime)
    for n in EDGE_LENGTHS:
        prompt = torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(100 + n)).tolist()
        expected = [t for c in reference.generate(prompt, 12, speculative=False) for t in c]
        assert [t for c in fast.generate(prompt, 12) for t in c] == expected, n
        assert [t for c in fast.generate(prompt, 12, speculative=False) for t in c] == expected, n


def test_bucketed_prefill_samples_as_the_unpadded_one(pair):
    """Seeded sampling, speculative and AR: the same tokens with buckets as with every length its own bucket (no
    padding: today's prefill shapes), the first token drawn first from the request's generator either way."""
    target, draft = pair
    runtime = tiny_runtime(draft, TreeConfig(16, 4, 3))
    padded, unpadded = GraphDecoder(target, draft, runtime), GraphDecoder(target, draft, runtime)
    unpadded.prefill_buckets = tuple(range(1, runtime.max_seq_len + 1))
    for n in (1, 33, 100):
        prompt = torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(200 + n)).tolist()
        for sampling in (SamplingConfig(1.0, seed=n), SamplingConfig(0.8, 0.9, seed=n)):
            for speculative in (True, False):
                runs = [[t for c in d.generate(prompt, 12, sampling, speculative) for t in c]
                        for d in (padded, unpadded)]
                assert runs[0] == runs[1], (n, sampling, speculative)
    assert {size for size, _ in unpadded._prefills} == {1, 33, 100}


def test_context_lookup_rounds_equal_the_reference_rounds(pair):
    """Trees with a context-lookup chain, built on the device (the history the accept stage writes, the lookup and
    the merge as tensor ops): the same tokens and the same rounds as the eager Decoder's host trees, on prompts
    whose random-model continuations repeat (the chains get accepted)."""
    target, draft = pair
    tree = TreeConfig(16, 4, 5, lookup=4)
    runtime = tiny_runtime(draft, tree)
    reference, fast = Decoder(target, draft, runtime), GraphDecoder(target, draft, runtime)
    plain = Decoder(target, draft, tiny_runtime(draft, TreeConfig(16, 4, 5)))
    gained = 0
    for seed in range(8):
        prompt = torch.randint(0, 256, (3 + 4 * seed,), generator=torch.Generator().manual_seed(seed)).tolist()
        out = list(fast.generate(prompt, 40))
        assert out == list(reference.generate(prompt, 40)), seed
        assert fast.stats.emitted_per_round == reference.stats.emitted_per_round, seed
        assert fast.stats.drafted_tokens == fast.stats.rounds * (node_count(12, 4, 5) - 1 + 4)
        assert [t for c in out for t in c] == [t for c in plain.generate(prompt, 40) for t in c]  # lossless
        gained += fast.stats.accepted_drafts > plain.stats.accepted_drafts
    assert gained >= 3


def test_lookup_tree_stage_compiles_whole_and_equals_eager():
    """The lookup bucket's tree-stage step, compiled as the CUDA engines compile it (fullgraph: no host read of
    a data-dependent index), gives the eager result."""
    from jetspec_trt.runtime.graph_decoder import with_lookup_chain
    from jetspec_trt.tree.tree_tensors import build_tree_tensors

    gen = torch.Generator().manual_seed(0)
    tree = build_tree_tensors(torch.tensor([3]), torch.randn(5, 8, generator=gen), 12, 3, 5)
    history = torch.randint(0, 4, (64,), generator=gen)
    compiled = torch.compile(with_lookup_chain, dynamic=False, fullgraph=True)
    for anchor in (20, 41):
        position = torch.tensor([anchor], dtype=torch.int32)
        (want, want_mask), (got, got_mask) = (with_lookup_chain(tree, history, position, 4, 5),
                                              compiled(tree, history, position, 4, 5))
        assert torch.equal(want.tokens, got.tokens) and torch.equal(want.parents, got.parents)
        assert torch.equal(want.ancestors, got.ancestors) and torch.equal(want_mask, got_mask)
        assert (want.tokens[-4:] >= 0).any()  # a chain was found and merged


def test_draft_vocabulary_rounds_equal_the_reference_rounds(pair):
    """A draft proposing from a subset of the vocabulary (DraftHead.set_vocab): the graph rounds draft the host's
    trees (the same rounds), both emit the AR tokens, and no drafted token lies outside the subset."""
    target, draft = pair
    tree = TreeConfig(16, 4, 5, lookup=4)
    runtime = tiny_runtime(draft, tree)
    reference, fast = Decoder(target, draft, runtime), GraphDecoder(target, draft, runtime)
    vocab = torch.arange(0, 256, 3)
    draft.set_vocab(vocab, target.lm_head.weight)
    try:
        for seed in range(4):
            prompt = torch.randint(0, 256, (5 + 3 * seed,), generator=torch.Generator().manual_seed(seed)).tolist()
            expected = [t for c in reference.generate(prompt, 30, speculative=False) for t in c]
            out = list(fast.generate(prompt, 30))
            assert [t for c in out for t in c] == expected, seed
            assert out == list(reference.generate(prompt, 30)), seed
            assert fast.stats.emitted_per_round == reference.stats.emitted_per_round, seed
        built, _ = reference.draft_parts(reference.draft_depth_logits(expected[-1], len(prompt), 5))
        drafted = set(built.tokens[1:].tolist())  # the draft's own part of the tree (the chain is context)
        assert drafted and drafted <= set(vocab.tolist())
    finally:
        draft.set_vocab(None)
