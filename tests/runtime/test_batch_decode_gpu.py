"""On CUDA: the graphed batch step emits exactly the eager step's tokens, and the bf16 rate on a Qwen2.5-0.5B shape."""

import time

import pytest
import torch
import transformers

from jetspec_trt.models.config import DecoderConfig, rope_inverse_frequencies
from jetspec_trt.models.presets import random_models
from jetspec_trt.models.target import TargetModel
from jetspec_trt.runtime.batch_decode import BatchDecodeConfig, BatchDecoder

pytestmark = pytest.mark.gpu


def random_prompts(count, low, high, vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(low, high, (count,), generator=g).tolist()
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


def test_graphed_step_matches_eager_fp32():
    """Graphed and eager steps, and the Triton and SDPA decode attentions, emit the same tokens in fp32."""
    target = random_models("tiny", "cuda", torch.float32, seed=2)[0]
    target.fuse_weights()
    prompts = random_prompts(40, 1, 120, 256)
    eos = [258, 42]  # 42: a byte the random model emits now and then, so some rows stop early
    outputs = {}
    for graphs, attention in ((False, "sdpa"), (True, "sdpa"), (True, "triton")):
        config = BatchDecodeConfig(max_batch=16, max_seq_len=192, refill_every=8, prefill_tokens=512,
                                   use_graphs=graphs, attention=attention)
        decoder = BatchDecoder(target, config)
        assert decoder.triton_attention == (attention == "triton")
        outputs[graphs, attention] = {r.index: (r.response_ids, r.finish)
                                      for r in decoder.generate(prompts, 64, eos)}
    assert sorted(outputs[True, "sdpa"]) == list(range(len(prompts)))
    assert outputs[True, "sdpa"] == outputs[False, "sdpa"]
    assert outputs[True, "triton"] == outputs[False, "sdpa"]
    finishes = [finish for _, finish in outputs[True, "sdpa"].values()]
    print(f"fp32 graphed == eager, triton == sdpa on {len(prompts)} prompts ({finishes.count('stop')} stopped at EOS)")


def qwen25_05b_shape(dtype):
    """A random-weight target of Qwen2.5-0.5B's shape (24 layers, 896 hidden, 14/2 heads, 151936 vocab)."""
    hf = transformers.Qwen2Config(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                                  num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
                                  rope_theta=1000000.0, tie_word_embeddings=True)
    cfg = DecoderConfig.from_hf(hf)
    inv_freq, scaling = rope_inverse_frequencies(hf, cfg.head_dim)
    with torch.device("meta"):
        target = TargetModel(cfg, inv_freq, scaling)
    target.to_empty(device="cuda")
    generator = torch.Generator(device="cuda").manual_seed(0)
    with torch.no_grad():
        for name, param in target.named_parameters():
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            else:
                param.normal_(0.0, 0.02, generator=generator)
    target.lm_head.weight = target.embed_tokens.weight
    target.rotary.inv_freq = inv_freq.float().cuda()
    target = target.to(dtype).eval()
    target.fuse_weights()
    return target


@pytest.mark.parametrize("attention", ["sdpa", "triton"])
@pytest.mark.parametrize("max_batch", [256, 1024])
def test_bf16_rate_on_qwen25_05b_shape(max_batch, attention):
    target = qwen25_05b_shape(torch.bfloat16)
    max_new = 256
    prompts = random_prompts(2 * max_batch, 32, 512, 151936, seed=1)
    start = time.perf_counter()
    decoder = BatchDecoder(target, BatchDecodeConfig(max_batch=max_batch, max_seq_len=512 + max_new,
                                                     prefill_tokens=16384, attention=attention))
    torch.cuda.synchronize()
    capture_s = time.perf_counter() - start
    start = time.perf_counter()
    results = list(decoder.generate(prompts, max_new, eos_ids=[151645]))
    seconds = time.perf_counter() - start
    tokens = sum(len(r.response_ids) for r in results)
    assert len(results) == len(prompts)
    print(f"bf16 Qwen2.5-0.5B shape, B={max_batch}, {attention} attention: {tokens} tokens in {seconds:.2f} s = "
          f"{tokens / seconds:,.0f} tokens/s ({decoder.steps} steps, {1e3 * (seconds - decoder.prefill_s) / decoder.steps:.2f} ms/step, "
          f"prefill {decoder.prefill_tokens / decoder.prefill_s:,.0f} tok/s in {decoder.prefill_packs} packs; "
          f"setup + capture {capture_s:.1f} s)")


def test_graphed_sampling_draws_anew_every_replay():
    """Sampling in the graphed step: at a huge temperature every token is ~uniform noise, so a replay that
    repeated the capture's draws (a generator not registered with the graph) would give each row one token over
    and over. Rows differ, steps differ, and the same seed gives the same responses."""
    target = random_models("tiny", "cuda", torch.float32, seed=2)[0]
    target.fuse_weights()
    prompts = random_prompts(1, 5, 6, 256) * 32

    def sample(seed):
        config = BatchDecodeConfig(max_batch=32, max_seq_len=64, refill_every=4, temperature=1e4, seed=seed)
        return {r.index: r.response_ids for r in BatchDecoder(target, config).generate(prompts, 12, [])}

    first = sample(1)
    assert len(first) == 32 and all(len(r) == 12 for r in first.values())
    assert len({tuple(r) for r in first.values()}) == 32  # rows draw independently
    assert sum(len(set(r[1:])) == 1 for r in first.values()) == 0  # and each step (replay) draws anew
    assert sample(1) == first and sample(2) != first
