"""What the Engine exposes to servers and benches, so that nothing outside runtime/ reaches into its decoders."""

import torch

from jetspec_trt.quickstart import make_tiny_engine
from jetspec_trt.runtime.engine import Engine


def test_engine_exposes_target_config_dtype_and_stats(tmp_path):
    engine = Engine.load(make_tiny_engine(tmp_path).engine, device="cpu")
    assert engine.target_config == engine.target.config
    assert engine.target_config.vocab_size == engine.target.lm_head.weight.shape[0]
    assert engine.dtype == torch.float32  # CPU: float32 whatever the engine was built in
    assert engine.last_stats is None
    tokens = [t for chunk in engine.stream_tokens(engine.encode("def f(x):"), 6) for t in chunk]
    assert engine.last_stats.new_tokens == len(tokens) >= 1


def test_sampled_requests_run_on_the_graph_decoder_when_there_is_one(tmp_path):
    """On CUDA the engine's `fast` backend is a GraphDecoder; every request, sampled too, goes to it. (A CPU
    GraphDecoder, running its stages eagerly, stands in for the CUDA one here.)"""
    from jetspec_trt.runtime.graph_decoder import GraphDecoder
    from jetspec_trt.tree.accept import SamplingConfig

    loaded = Engine.load(make_tiny_engine(tmp_path).engine, device="cpu")
    decoder = loaded.decoder
    fast = GraphDecoder(decoder.target, decoder.draft, decoder.runtime)
    engine = Engine(decoder, loaded.tokenizer, loaded.engine_dir, fast)
    ids = engine.encode("def f(x):")
    for sampling in (SamplingConfig(), SamplingConfig(1.0, seed=4), SamplingConfig(0.7, 0.9, seed=4)):
        tokens = [t for chunk in engine.stream_tokens(ids, 8, sampling) for t in chunk]
        assert engine.last_stats is fast.stats and fast.stats.new_tokens == len(tokens)
        assert tokens == [t for chunk in fast.generate(ids, 8, sampling) for t in chunk]
