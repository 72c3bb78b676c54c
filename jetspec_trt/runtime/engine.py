"""The Python API over an engine directory: load once, then stream or generate text.

    from jetspec_trt import Engine, SamplingConfig
    engine = Engine.load("engines/tiny")
    for piece in engine.stream("def fib(n):", max_new_tokens=64):
        print(piece, end="")
    print(engine.last_stats.tau)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from transformers import AutoTokenizer

from jetspec_trt.errors import JetSpecError
from jetspec_trt.models.checkpoint import load_draft, load_target, parse_dtype
from jetspec_trt.runtime.config import RuntimeConfig, TreeConfig
from jetspec_trt.runtime.decoder import DecodeStats, Decoder
from jetspec_trt.runtime.graph_decoder import GraphDecoder
from jetspec_trt.spec.accept import SamplingConfig

Prompt = str | list[dict]  # plain text, or chat messages [{"role": ..., "content": ...}]


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    stats: DecodeStats


class Engine:
    def __init__(self, decoder: Decoder, tokenizer, engine_dir: Path, fast: GraphDecoder | None = None):
        self.decoder = decoder
        self.fast = fast  # CUDA: graphed greedy rounds; sampling stays on the reference decoder
        self.tokenizer = tokenizer
        self.engine_dir = engine_dir
        self.last_stats: DecodeStats | None = None

    @property
    def runtime(self) -> RuntimeConfig:
        return self.decoder.runtime

    @classmethod
    def load(cls, engine_dir: Path | str, device: str = "cpu", dtype: str | None = None) -> "Engine":
        engine_dir = Path(engine_dir)
        if not engine_dir.is_dir():
            raise JetSpecError(f"engine directory {engine_dir} does not exist")
        runtime = RuntimeConfig.load(engine_dir)
        torch_dtype = parse_dtype(dtype or runtime.dtype)
        if device == "cpu" and torch_dtype != torch.float32 and dtype is None:
            # bf16 matmuls are slow and inexact on most CPUs; an engine built for the GPU still runs here.
            torch_dtype = torch.float32
        target = load_target(engine_dir / "target", torch_dtype, device)
        draft = load_draft(engine_dir / "draft", torch_dtype, device)
        tokenizer = AutoTokenizer.from_pretrained(str(engine_dir / "target"), local_files_only=True)
        fast = None
        if torch.device(device).type == "cuda":
            target.fuse_weights()
            draft.fuse_weights()
            fast = GraphDecoder(target, draft, runtime)
        return cls(Decoder(target, draft, runtime), tokenizer, engine_dir, fast)

    def encode(self, prompt: Prompt, chat: bool = False) -> list[int]:
        if isinstance(prompt, list) or chat:
            messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
            if not getattr(self.tokenizer, "chat_template", None):
                raise JetSpecError("this engine's tokenizer has no chat template; drop --chat")
            return list(self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                           return_dict=False))
        return self.tokenizer.encode(prompt, add_special_tokens=False)

    def stream_tokens(
        self,
        prompt_ids: list[int],
        max_new_tokens: int = 128,
        sampling: SamplingConfig = SamplingConfig(),
        speculative: bool = True,
        tree: TreeConfig | None = None,
    ) -> Iterator[list[int]]:
        self._active = self.fast if self.fast is not None and sampling.greedy else self.decoder
        if self._active is self.fast:
            yield from self.fast.generate(prompt_ids, max_new_tokens, speculative, tree)
        else:
            yield from self.decoder.generate(prompt_ids, max_new_tokens, sampling, speculative, tree)
        self.last_stats = self._active.stats

    @property
    def current_stats(self) -> DecodeStats | None:
        """Statistics of the request in flight, updated every round (streaming servers report them live)."""
        active = getattr(self, "_active", None)
        return getattr(active, "stats", None)

    def stream(self, prompt: Prompt, max_new_tokens: int = 128, sampling: SamplingConfig = SamplingConfig(),
               speculative: bool = True, chat: bool = False, tree: TreeConfig | None = None) -> Iterator[str]:
        """Yield text pieces as rounds finish. Bytes of an unfinished UTF-8 character are held back."""
        ids: list[int] = []
        shown = ""
        for tokens in self.stream_tokens(self.encode(prompt, chat), max_new_tokens, sampling, speculative, tree):
            ids.extend(tokens)
            text = self.tokenizer.decode(ids, skip_special_tokens=True)
            if text.endswith("\ufffd"):
                continue
            if len(text) > len(shown):
                yield text[len(shown):]
            shown = text
        self.last_token_ids = ids

    def generate(self, prompt: Prompt, max_new_tokens: int = 128, sampling: SamplingConfig = SamplingConfig(),
                 speculative: bool = True, chat: bool = False, tree: TreeConfig | None = None) -> GenerationResult:
        pieces = list(self.stream(prompt, max_new_tokens, sampling, speculative, chat, tree))
        full = self.tokenizer.decode(self.last_token_ids, skip_special_tokens=True)
        assert full.startswith("".join(pieces))
        return GenerationResult(full, self.last_token_ids, self.last_stats)
