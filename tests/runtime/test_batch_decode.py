"""BatchDecoder (run eagerly here) emits exactly each prompt's own greedy decode, with rows refilled as they finish."""

from collections import Counter

import pytest
import torch
import transformers

from jetspec_trt.models.checkpoint import load_target
from jetspec_trt.models.presets import random_models
from jetspec_trt.plugins.tree_attention import causal_mask
from jetspec_trt.runtime.batch_decode import BatchDecodeConfig, BatchDecoder

MAX_SEQ_LEN = 40


def qwen2_target(directory):
    """A tiny Qwen2 (q/k/v bias, no q/k norm) with weights large enough that its greedy text varies."""
    config = transformers.Qwen2Config(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    torch.manual_seed(0)
    model = transformers.Qwen2ForCausalLM(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if not name.endswith("norm.weight"):
                param.normal_(0.0, 0.15)  # transformers initialises biases to zero, which would not test them
    model.save_pretrained(directory)
    return load_target(directory)


@pytest.fixture(scope="module", params=["qwen3", "qwen2"])
def target(request, tmp_path_factory):
    torch.set_num_threads(1)
    if request.param == "qwen3":
        return random_models("tiny", "cpu", torch.float32, seed=1)[0]  # q/k norm, GQA 4:2
    return qwen2_target(tmp_path_factory.mktemp("qwen2"))


@torch.no_grad()
def greedy(target, prompt, max_new_tokens, eos):
    """One prompt alone: prefill, then single-token forwards over the paged cache (the engine's AR path)."""
    cache = target.new_cache(MAX_SEQ_LEN + 1, page_size=16)
    token = int(target.prefill(prompt, cache, logits="last").logits[0].argmax())
    response = [token]
    while token not in eos and len(response) < max_new_tokens and len(prompt) + len(response) < MAX_SEQ_LEN:
        out = target(torch.tensor([token]), torch.tensor([cache.length]), cache, causal_mask(1))
        cache.commit(torch.tensor([0]))
        token = int(out.logits[0].argmax())
        response.append(token)
    return response


def prompts_for(target, count=10):
    g = torch.Generator().manual_seed(7)
    vocab = min(target.config.vocab_size, 256)
    lengths = [1, 3, 38, 39, 30, 12, 5, 20, 8, 25][:count]  # 39 = MAX_SEQ_LEN - 1: room for one token only
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


def run(target, prompts, max_new_tokens, eos, **config):
    decoder = BatchDecoder(target, BatchDecodeConfig(max_seq_len=MAX_SEQ_LEN, use_graphs=False, **config))
    results = list(decoder.generate(prompts, max_new_tokens, eos))
    assert sorted(r.index for r in results) == list(range(len(prompts)))  # each prompt exactly once
    return {r.index: (r.response_ids, r.finish) for r in results}, decoder


@pytest.mark.parametrize("max_batch, refill_every", [(3, 4), (4, 1), (16, 5)])
def test_batched_greedy_equals_per_prompt_greedy(target, max_batch, refill_every):
    prompts = prompts_for(target)
    # An EOS that the model really emits: the most common token past the first position of the responses.
    free = [greedy(target, p, 16, set()) for p in prompts]
    eos = Counter(t for r in free for t in r[1:]).most_common(1)[0][0]
    expected = [greedy(target, p, 16, {eos}) for p in prompts]
    got, decoder = run(target, prompts, 16, [eos], max_batch=max_batch, refill_every=refill_every,
                       prefill_tokens=32)  # several prefill packs per admission, and a prompt longer than a pack
    assert [got[i][0] for i in range(len(prompts))] == expected
    finishes = [got[i][1] for i in range(len(prompts))]
    assert finishes == ["stop" if r[-1] == eos else "length" for r in expected]
    assert "stop" in finishes and "length" in finishes  # both ways of finishing are exercised
    assert any(len(r) == 16 for r in expected)  # max_new_tokens reached
    assert len(got[3][0]) == 1 and len(got[2][0]) <= 2  # row capacity reached (prompts of 39 and 38 tokens)
    if max_batch < len(prompts):
        assert decoder.steps > 16  # rows were refilled: one wave of 16 steps would not have done it


def test_no_eos_runs_to_max_new_tokens_and_deadline_admits_nothing(target):
    prompts = prompts_for(target, 4)
    got, _ = run(target, prompts, 5, [], max_batch=2)
    assert all(len(got[i][0]) == min(5, MAX_SEQ_LEN - len(p)) and got[i][1] == "length" for i, p in enumerate(prompts))
    assert got[0][0] == greedy(target, prompts[0], 5, set())
    decoder = BatchDecoder(target, BatchDecodeConfig(max_batch=2, max_seq_len=MAX_SEQ_LEN, use_graphs=False))
    assert list(decoder.generate(prompts, 5, [], deadline_s=0.0)) == []


def test_prompts_that_do_not_fit_are_refused(target):
    decoder = BatchDecoder(target, BatchDecodeConfig(max_batch=2, max_seq_len=MAX_SEQ_LEN, use_graphs=False))
    with pytest.raises(ValueError, match="rows take 1 .. 39"):
        next(decoder.generate([[1, 2], [3] * MAX_SEQ_LEN], 4, []))
    with pytest.raises(ValueError, match="rows take"):
        next(decoder.generate([[]], 4, []))


def test_attention_choice_is_checked(target):
    with pytest.raises(ValueError, match="auto, triton or sdpa, not 'flash'"):
        BatchDecoder(target, BatchDecodeConfig(max_batch=2, max_seq_len=40, attention="flash"))
    with pytest.raises(ValueError, match="needs CUDA and Triton"):
        BatchDecoder(target, BatchDecodeConfig(max_batch=2, max_seq_len=40, attention="triton"))
    assert not BatchDecoder(target, BatchDecodeConfig(max_batch=2, max_seq_len=40)).triton_attention  # CPU: sdpa


def test_cpu_prefill_packs_stay_small(target):
    """On the CPU the reference attention scores a pack densely, so packs are capped at CPU_PACK_TOKENS whatever
    the configured size (a 16 K-token pack of a 0.5B target needed 15 GB there)."""
    from jetspec_trt.runtime.batch_decode import CPU_PACK_TOKENS

    decoder = BatchDecoder(target, BatchDecodeConfig(max_batch=2, max_seq_len=MAX_SEQ_LEN, use_graphs=False,
                                                     prefill_tokens=16384))
    assert decoder.pack_tokens == CPU_PACK_TOKENS and decoder._prefill_cache.capacity < 16384


@torch.no_grad()
def next_token_probs(target, ids, temperature):
    """softmax(logits / T) of the token after `ids`, decoded alone (the distribution a sampled row draws from)."""
    return torch.softmax(target.prefill(ids, logits="last").logits[0].float() / temperature, -1)


def test_sampled_rows_draw_from_the_target_distribution(target):
    """One prompt in 768 rows at T = 1.5: the first token (drawn after the packed prefill) and the second (drawn
    in the step) follow softmax(logits / T) of the prompt decoded alone; a greedy decoder would put every row on one
    token. Each frequency is within 5 standard errors of its probability (plus a float tolerance)."""
    temperature, rows = 1.5, 768
    prompt = prompts_for(target, 3)[2][:12]
    got, _ = run(target, [prompt] * rows, 2, [], max_batch=256, temperature=temperature, seed=3)
    firsts = Counter(got[i][0][0] for i in range(rows))
    want = next_token_probs(target, prompt, temperature)
    assert want.max() < 0.6 and len(firsts) > 3  # a spread distribution: the check below can tell a draw from argmax

    def close(counts, probs, n):
        freq = torch.zeros_like(probs)
        for token, count in counts.items():
            freq[token] = count / n
        bound = 5 * (probs * (1 - probs) / n).sqrt() + 1e-3
        assert bool(((freq - probs).abs() <= bound).all()), float((freq - probs).abs().max())

    close(firsts, want, rows)
    top, n = firsts.most_common(1)[0]  # the second token of the rows whose first was the commonest
    seconds = Counter(got[i][0][1] for i in range(rows) if got[i][0][0] == top)
    close(seconds, next_token_probs(target, prompt + [top], temperature), n)


def test_sampling_follows_the_seed(target):
    prompts = prompts_for(target, 6)
    one, _ = run(target, prompts, 8, [], max_batch=4, temperature=1.0, seed=11)
    again, _ = run(target, prompts, 8, [], max_batch=4, temperature=1.0, seed=11)
    other, _ = run(target, prompts, 8, [], max_batch=4, temperature=1.0, seed=12)
    assert one == again and one != other
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        BatchDecoder(target, BatchDecodeConfig(max_batch=2, max_seq_len=40, temperature=-1.0))
