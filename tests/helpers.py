"""Shared test fixtures: the tiny random pair, loaded once per session."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from jetspec_trt.models.checkpoint import load_draft, load_target
from jetspec_trt.models.presets import preset, write_random_pair
from jetspec_trt.runtime.config import RuntimeConfig, TreeConfig
from jetspec_trt.runtime.decoder import Decoder


def tiny_pair(directory: Path):
    write_random_pair("tiny", directory / "target", directory / "draft", seed=0)
    return load_target(directory / "target"), load_draft(directory / "draft")


SMALL_VOCAB = 5  # sampling tests: few enough tokens that the law of a short continuation is enumerable


def small_vocab_pair(directory: Path, device: str = "cpu"):
    """A random pair with a SMALL_VOCAB-token vocabulary (written once into `directory`) and its runtime."""
    shape = dataclasses.replace(preset("tiny"), vocab_size=SMALL_VOCAB, mask_token_id=SMALL_VOCAB - 1,
                                eos_token_id=SMALL_VOCAB - 1, init_std=0.3, tie_word_embeddings=False)
    if not (directory / "draft").exists():
        write_random_pair(shape, directory / "target", directory / "draft", seed=3)
    target, draft = load_target(directory / "target", device=device), load_draft(directory / "draft", device=device)
    runtime = RuntimeConfig(TreeConfig(16, 2, 3), "float32", 64, shape.block_size, shape.mask_token_id,
                            draft.spec.target_layer_ids, eos_token_ids=(), page_size=16)
    return target, draft, runtime


def sequence_law(target, prompt: list[int], new_tokens: int, sampling) -> dict[tuple[int, ...], float]:
    """P(t1..tn | prompt) under plain sampling (tree.accept.target_probs at every step), by enumerating every
    continuation through the target."""
    import itertools

    from jetspec_trt.plugins.tree_attention import causal_mask
    from jetspec_trt.tree.accept import target_probs

    device = target.embed_tokens.weight.device
    vocab = target.config.vocab_size
    law = {}
    with torch.no_grad():
        for seq in itertools.product(range(vocab), repeat=new_tokens - 1):
            tokens = torch.tensor(prompt + list(seq), device=device)
            cache = target.new_cache(len(tokens) + 16, 16)
            logits = target(tokens, torch.arange(len(tokens), device=device), cache,
                            causal_mask(len(tokens), device)).logits
            probs = [target_probs(logits[len(prompt) - 1 + i], sampling).cpu() for i in range(new_tokens)]
            for last in range(vocab):
                p = probs[-1][last]
                for i, token in enumerate(seq):
                    p = p * probs[i][token]
                law[seq + (last,)] = float(p)
    return law


def chi_square_p(samples: list[tuple[int, ...]], law: dict[tuple[int, ...], float]) -> float:
    """Chi-square p-value of observed outcomes against their exact law. Cells expecting fewer than 5 are pooled so
    the chi-square approximation holds; an outcome of law 0 (cut by top-p) must never occur."""
    from scipy.stats import chisquare

    runs = len(samples)
    counts = dict.fromkeys(law, 0)
    for sample in samples:
        assert sample in counts, sample
        counts[sample] += 1
    assert not any(counts[cell] for cell in law if law[cell] == 0.0)  # (exact zeros: cut by top-p)
    cells = sorted(law, key=law.get, reverse=True)
    observed, expected, pool_o, pool_e = [], [], 0, 0.0
    for cell in cells:
        if law[cell] * runs >= 5:
            observed.append(counts[cell])
            expected.append(law[cell] * runs)
        else:
            pool_o, pool_e = pool_o + counts[cell], pool_e + law[cell] * runs
    if pool_e > 0:
        observed.append(pool_o)
        expected.append(pool_e)
    else:  # top-p removed these outcomes: none may ever be drawn
        assert pool_o == 0
    total = sum(observed)
    expected = [e * total / sum(expected) for e in expected]
    return chisquare(observed, expected).pvalue


def tiny_runtime(draft, tree: TreeConfig = TreeConfig(64, 4, 7), max_seq_len: int = 256, **changes) -> RuntimeConfig:
    shape = preset("tiny")
    runtime = RuntimeConfig(tree, "float32", max_seq_len, shape.block_size, shape.mask_token_id,
                            draft.spec.target_layer_ids, (shape.eos_token_id,), page_size=16)
    return dataclasses.replace(runtime, **changes)


class OracleDecoder(Decoder):
    """A decoder whose 'draft' peeks at the known greedy continuation and is right only part of the time.

    A random draft head is almost never right, so it cannot exercise deep acceptance; this one puts the true
    next token at rank 0 with probability `hit`, at a lower rank or nowhere otherwise, so trees hold long
    correct paths, wrong siblings and dead ends. The verify/accept/compaction code under test is unchanged.
    """

    def __init__(self, *args, hit: float = 0.7, seed: int = 0, **kwargs):
        super().__init__(*args, **kwargs)
        self.hit = hit
        self.rng = torch.Generator().manual_seed(seed)
        self.future: list[int] = []

    def draft_depth_logits(self, anchor: int, position: int, max_depth: int) -> torch.Tensor:
        vocab = self.target.config.vocab_size
        logits = torch.randn(max_depth, vocab, generator=self.rng)
        for d in range(max_depth):
            index = position + 1 + d
            if index >= len(self.future):
                break
            roll = float(torch.rand(1, generator=self.rng))
            if roll < self.hit:
                logits[d, self.future[index]] = 20.0  # rank 0
            elif roll < self.hit + (1 - self.hit) / 2:
                logits[d, self.future[index]] = logits[d].topk(3).values[-1] - 1e-3  # rank 3
        return logits


def invoke_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    """Run `jetspec-trt ARGV` in-process: (exit code, stdout, stderr)."""
    import pytest

    from jetspec_trt.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(argv)
        raise SystemExit(0)
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err


# A tiny pair with small weights (std 0.05 instead of the preset's 0.15): the preset's large weights make a chaotic
# random model in which any rounding grows layer by layer, so FP8-vs-unquantized closeness could not be tested.
FP8_TEST_SHAPE_STD = 0.05
CALIBRATION_PROMPTS = ("Write a short poem about the sea.", "def fib(n):\n    return", "Solve 2x + 3 = 7.",
                       "Explain how a hash map works.", "List three prime numbers.", "What is the capital of France?")


@dataclasses.dataclass(frozen=True)
class Fp8Pair:
    root: Path
    target: Path  # the unquantized (bf16) target
    draft: Path
    calib: Path  # the calibration prompts (.jsonl)
    fp8_targets: dict[str, Path]  # --fp8-recipe name -> the target quantized by nvidia-modelopt with it
    recipes: dict[str, dict]  # --fp8-recipe name -> quantize_target's manifest entry

    @property
    def fp8_target(self) -> Path:  # per-tensor weight scales, static activation scales
        return self.fp8_targets["per-tensor"]

    @property
    def recipe(self) -> dict:
        return self.recipes["per-tensor"]

    @property
    def per_channel_target(self) -> Path:  # per-channel weight scales, per-token activation scales
        return self.fp8_targets["per-channel"]

    @property
    def per_channel_recipe(self) -> dict:
        return self.recipes["per-channel"]


def write_fp8_pair(root: Path) -> Fp8Pair:
    """A tiny target + draft, and the target quantized to FP8 with modelopt on the CPU with each recipe
    (calibration prompts above; the CPU on GPU machines too, so the fixture is the same everywhere)."""
    import json

    from jetspec_trt.builders.quantize import QuantizeConfig, quantize_target
    from jetspec_trt.models.presets import TINY_SPECIALS, tiny_tokenizer

    shape = dataclasses.replace(preset("tiny"), init_std=FP8_TEST_SHAPE_STD)
    write_random_pair(shape, root / "target", root / "draft", seed=0)
    tiny_tokenizer().save_pretrained(str(root / "target"))
    (root / "target" / "generation_config.json").write_text(json.dumps({"eos_token_id": shape.eos_token_id}))
    assert shape.vocab_size == 256 + len(TINY_SPECIALS)
    calib = root / "calib.jsonl"
    calib.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in CALIBRATION_PROMPTS))
    from jetspec_trt.builders.quantize import FP8_RECIPES

    targets = {name: root / f"fp8-{name}" for name in FP8_RECIPES}
    recipes = {name: quantize_target(root / "target", path,
                                     QuantizeConfig(recipe=name, calib_source=str(calib),
                                                    calib_samples=len(CALIBRATION_PROMPTS), calib_device="cpu"),
                                     torch.bfloat16)
               for name, path in targets.items()}
    return Fp8Pair(root, root / "target", root / "draft", calib, targets, recipes)


def check_bucketed_prefill(fast, prompt: list[int], speculative: bool,
                           atol: float) -> tuple[torch.Tensor, torch.Tensor]:
    """GraphDecoder.prefill_logits (the prompt padded to its bucket) against the eager prefill of the n prompt tokens
    alone: the K/V of every real slot of the target's cache and, speculative, of the draft's, within `atol`
    (padding changes every GEMM's M, which may round differently), and both caches committed at n, not at the
    bucket. Returns (got, want): the next-token logits [vocab] of each."""
    from jetspec_trt.plugins.tree_attention import causal_mask

    target, draft, device, n = fast.target, fast.draft, fast.device, len(prompt)
    page_size = fast.runtime.page_size
    with torch.inference_mode(), torch.compiler.set_stance("force_eager"):
        cache, draft_cache = target.new_cache(n, page_size), draft.new_cache(n, page_size)
        positions = torch.arange(n, device=device)
        want = target(torch.tensor(prompt, device=device), positions, cache, causal_mask(n, device),
                      fast.capture_layers if speculative else ())
        if speculative:
            draft.extend_context(want.features, positions, draft_cache)
        got = fast.prefill_logits(prompt, speculative)
    pairs = [(fast.target_cache, cache)] + ([(fast.draft_cache, draft_cache)] if speculative else [])
    for ours, reference in pairs:
        assert ours.length == int(ours.ctx_len) == n
        for name in ("k_all", "v_all"):
            a, b = (getattr(c, name).flatten(1, 2)[:, :n] for c in (ours, reference))
            assert torch.allclose(a.float(), b.float(), atol=atol, rtol=0), (n, speculative, name)
    return got, want.logits[-1]
