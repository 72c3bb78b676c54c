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
