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
    fp8_target: Path  # the target quantized by nvidia-modelopt (builders.quantize)
    calib: Path  # the calibration prompts (.jsonl)
    recipe: dict


def write_fp8_pair(root: Path) -> Fp8Pair:
    """A tiny target + draft, and the target quantized to FP8 with modelopt on the CPU (calibration prompts above;
    the CPU on GPU machines too, so the fixture is the same everywhere)."""
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
    recipe = quantize_target(root / "target", root / "fp8-target",
                             QuantizeConfig(calib_source=str(calib), calib_samples=len(CALIBRATION_PROMPTS),
                                            calib_device="cpu"),
                             torch.bfloat16)
    return Fp8Pair(root, root / "target", root / "draft", root / "fp8-target", calib, recipe)
