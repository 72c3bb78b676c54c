"""Our decoder reproduces transformers' own Qwen3 / Qwen2 / Llama logits (fp32, tiny random configs)."""

import pytest
import torch
import transformers

from jetspec_trt.models.checkpoint import load_target
from jetspec_trt.plugins.tree_attention import causal_mask

TINY = dict(
    vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=256,
)

CASES = {
    "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM, dict(head_dim=32, tie_word_embeddings=False)),
    "qwen3-tied": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM, dict(head_dim=16, tie_word_embeddings=True)),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, dict(tie_word_embeddings=True)),
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM, dict(tie_word_embeddings=False)),
    "llama3-rope": (
        transformers.LlamaConfig, transformers.LlamaForCausalLM,
        dict(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                           "original_max_position_embeddings": 64}),
    ),
}


@pytest.fixture(params=sorted(CASES))
def hf_pair(request, tmp_path):
    config_cls, model_cls, extra = CASES[request.param]
    torch.manual_seed(0)
    hf = model_cls(config_cls(**TINY, **extra)).eval()
    hf.save_pretrained(tmp_path)
    return hf, load_target(tmp_path)


def test_logits_match_transformers(hf_pair):
    hf, ours = hf_pair
    tokens = torch.randint(0, TINY["vocab_size"], (40,), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(tokens[None], output_hidden_states=True)
        cache = ours.new_cache(64, page_size=16)
        out = ours(tokens, torch.arange(40), cache, causal_mask(40), capture_layers=(0, 2))
    assert (out.logits - ref.logits[0]).abs().max() <= 1e-4
    expected_features = torch.cat([ref.hidden_states[1][0], ref.hidden_states[3][0]], dim=-1)
    assert (out.features - expected_features).abs().max() <= 1e-4


def test_incremental_decode_matches_full_forward(hf_pair):
    """Prefill then single-token steps over the paged cache give the full-sequence logits."""
    hf, ours = hf_pair
    tokens = torch.randint(0, TINY["vocab_size"], (24,), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = hf(tokens[None]).logits[0]
        cache = ours.new_cache(32, page_size=8)
        out = ours(tokens[:10], torch.arange(10), cache, causal_mask(10))
        cache.commit(torch.arange(10))
        steps = [out.logits]
        for i in range(10, 24):
            steps.append(ours(tokens[i : i + 1], torch.tensor([i]), cache, causal_mask(1)).logits)
            cache.commit(torch.tensor([0]))
    assert (torch.cat(steps) - ref).abs().max() <= 1e-4


def test_logits_in_the_model_dtype_pick_the_same_greedy_tokens(hf_pair):
    """forward(float_logits=False) gives the lm_head's own dtype; its argmax is the float32 logits' argmax."""
    _, ours = hf_pair
    ours = ours.to(torch.bfloat16)
    tokens = torch.randint(0, TINY["vocab_size"], (12,), generator=torch.Generator().manual_seed(4))
    outs = []
    for float_logits in (True, False):
        cache = ours.new_cache(16)
        with torch.no_grad():
            outs.append(ours(tokens, torch.arange(12), cache, causal_mask(12, "cpu"), float_logits=float_logits))
    assert outs[0].logits.dtype == torch.float32 and outs[1].logits.dtype == torch.bfloat16
    assert torch.equal(outs[1].logits.float(), outs[0].logits)
    assert torch.equal(outs[1].logits.argmax(-1), outs[0].logits.argmax(-1))
