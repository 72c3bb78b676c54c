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
