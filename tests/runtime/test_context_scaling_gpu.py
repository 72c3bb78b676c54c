"""On CUDA: the graphed AR step costs what the context in use costs, whatever context the engine allows.

Issue 16: at context 512 the Qwen3-8B step took 5.20 ms in an engine sized for 512 tokens and 6.32 ms in one sized
for 8192 (the layers' non-GEMM time 1.35 -> 2.76 ms): the compiled layers wrote each new K/V into a clone of the
whole per-layer cache (docs/engine.md, "Per-step cost and the allocated context"). Here two engines of the same
random 0.5B-shape model, one allowing 1 K tokens and one 32 K, time the same step at context 512.
"""

import statistics

import pytest
import torch

from jetspec_trt.bench.engine_bench import _events_ms
from jetspec_trt.models.presets import random_models
from jetspec_trt.runtime.config import RuntimeConfig, TreeConfig
from jetspec_trt.runtime.graph_decoder import GraphDecoder

pytestmark = pytest.mark.gpu

CONTEXT, REPLAYS, ROUNDS = 512, 200, 7
TOLERANCE = 0.03


@pytest.mark.parametrize("compile_layers", [True, False], ids=["compiled", "eager-layers"])
@torch.inference_mode()  # as the bench and the engine capture and replay
def test_ar_step_follows_the_context_in_use_not_the_allocation(compile_layers):
    # Small but not tiny: 24 layers whose per-layer cache at 32 K tokens (8 MB of K, 8 of V) costs several us to
    # copy, beside a step of ~1 ms: a pass over the allocation shows far above the tolerance.
    target, draft, _ = random_models("qwen2.5-0.5b", "cuda", torch.bfloat16)
    target.fuse_weights()
    draft.fuse_weights()
    spec = draft.spec
    decoders, steps = {}, {}
    for allowed in (1024, 32768):
        runtime = RuntimeConfig(TreeConfig(16, 4, 7), "bfloat16", allowed, spec.block_size, spec.mask_token_id,
                                spec.target_layer_ids, prefill_graphs=False)  # no 32 K prefill graph to capture
        decoder = GraphDecoder(target, draft, runtime, compile_layers=compile_layers)
        decoder.fill_caches(torch.Generator(device="cuda").manual_seed(1))
        token, step = decoder.ar_step()
        token.fill_(11)
        decoders[allowed], steps[allowed] = decoder, step

    def replays(step):
        def run() -> None:
            for _ in range(REPLAYS):
                step()  # context 512 .. 711: the same span for both engines
        return run

    times = {allowed: [] for allowed in decoders}
    for _ in range(ROUNDS):  # interleaved, so that clock or thermal drift hits both engines alike
        for allowed, decoder in decoders.items():
            ms = _events_ms(replays(steps[allowed]), 3, lambda d=decoder: d.reset(CONTEXT))
            times[allowed].append(ms / REPLAYS)
    small, large = (statistics.median(times[a]) for a in (1024, 32768))
    print(f"AR step at context {CONTEXT}: {small:.4f} ms (1 K engine), {large:.4f} ms (32 K engine)")
    assert abs(large - small) <= TOLERANCE * small, (small, large, times)
