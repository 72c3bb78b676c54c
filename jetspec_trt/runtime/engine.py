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

from jetspec_trt.dtypes import parse_dtype
from jetspec_trt.errors import JetSpecError
from jetspec_trt.models.checkpoint import load_draft, load_target, stored_names
from jetspec_trt.models.config import DecoderConfig
from jetspec_trt.models.draft_vocab import read_draft_vocab
from jetspec_trt.models.fp8 import read_fp8_format
from jetspec_trt.models.fused_layout import is_fused
from jetspec_trt.models.target import TargetModel
from jetspec_trt.runtime.config import RuntimeConfig, TreeConfig
from jetspec_trt.runtime.cost_model import CostModel
from jetspec_trt.runtime.decoder import Decoder
from jetspec_trt.runtime.graph_decoder import GraphDecoder
from jetspec_trt.runtime.round_loop import DecodeStats
from jetspec_trt.runtime.scheduler import Scheduler, SchedulerConfig, measure_cost_model
from jetspec_trt.tree.accept import SamplingConfig

Prompt = str | list[dict]  # plain text, or chat messages [{"role": ..., "content": ...}]


def run_dtype(runtime: RuntimeConfig, device: str, dtype: str | None = None) -> torch.dtype:
    """The dtype Engine.load runs an engine in on `device`: `dtype`, else the build's, except float32 on the CPU."""
    torch_dtype = parse_dtype(dtype or runtime.dtype)
    if torch.device(device).type == "cpu" and torch_dtype != torch.float32 and dtype is None:
        # bf16 matmuls are slow and inexact on most CPUs; an engine built for the GPU still runs here.
        torch_dtype = torch.float32
    return torch_dtype


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    stats: DecodeStats


class Engine:
    def __init__(self, decoder: Decoder, tokenizer, engine_dir: Path, fast: GraphDecoder | None = None,
                 summary: dict[str, str] | None = None):
        self.decoder = decoder
        self.fast = fast  # CUDA: graphed rounds, greedy and sampling; the reference decoder serves the CPU
        self.tokenizer = tokenizer
        self.engine_dir = engine_dir
        # How this engine runs here, one line per aspect: "weights" (fused at build, or at load),
        # "quantization" (FP8 GEMMs, the CPU's FP8 reference, or none) and "kernel_tuning" (tuned launches for this
        # GPU, or default_launch and why).
        self.summary = summary or {}
        self.last_stats: DecodeStats | None = None
        self._cost_model: CostModel | None = None

    @property
    def runtime(self) -> RuntimeConfig:
        return self.decoder.runtime

    @property
    def backend(self) -> Decoder | GraphDecoder:
        """What serves greedy and sampled requests here: the GraphDecoder on CUDA, else the reference Decoder. (Top-k,
        banned tokens and log probabilities always run on the reference Decoder: GraphDecoder.handles.)"""
        return self.fast if self.fast is not None else self.decoder

    @property
    def target(self) -> TargetModel:
        """The loaded target model, shared by both decoders: for passes beside decoding (a teacher-forced prefill
        with a cache of its own, as the suite bench's divergence diagnosis runs). Decoding goes through the engine."""
        return self.decoder.target

    @property
    def target_config(self) -> DecoderConfig:
        """The target's shape (vocab_size, num_layers, ...)."""
        return self.decoder.target.config

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the engine runs in here (float32 on the CPU for an engine built in bfloat16)."""
        return self.decoder.target.embed_tokens.weight.dtype

    @classmethod
    def load(cls, engine_dir: Path | str, device: str = "cpu", dtype: str | None = None) -> "Engine":
        engine_dir = Path(engine_dir)
        if not engine_dir.is_dir():
            raise JetSpecError(f"engine directory {engine_dir} does not exist")
        runtime = RuntimeConfig.load(engine_dir)
        torch_dtype = run_dtype(runtime, device, dtype)
        cuda = torch.device(device).type == "cuda"
        # On the GPU q/k/v and gate/up run as one GEMM each, over the fused tensors the build stored. The CPU
        # keeps the separate GEMMs (the reference path: bit-identical to the Hugging Face checkpoint's logits);
        # their weights are views of the same fused tensors, so either way there is one copy in memory.
        # An FP8 target keeps its FP8 weights on CUDA (an error on a GPU without FP8); the CPU runs the reference
        # (models/fp8.py: e4m3 values in float32, activations rounded to e4m3 as the FP8 GEMMs do).
        target = load_target(engine_dir / "target", torch_dtype, device, fused_gemm=cuda)
        draft = load_draft(engine_dir / "draft", torch_dtype, device, fused_gemm=cuda)
        if runtime.draft_vocab:
            draft.set_vocab(torch.tensor(read_draft_vocab(engine_dir, runtime.draft_vocab)), target.lm_head.weight)
        tokenizer = AutoTokenizer.from_pretrained(str(engine_dir / "target"), local_files_only=True)
        summary = {"weights": _weights_summary(engine_dir, cuda),
                   "quantization": _quantization_summary(engine_dir, cuda, runtime.decode_gemv),
                   "kernel_tuning": _use_kernel_tuning(engine_dir, device)}
        fast = GraphDecoder(target, draft, runtime, compile_layers=runtime.compile_graphs) if cuda else None
        return cls(Decoder(target, draft, runtime), tokenizer, engine_dir, fast, summary)

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
        logprobs: bool = False,
    ) -> Iterator[list[int]]:
        """Yield each round's new tokens; with `logprobs`, current_stats.token_logprobs holds their log
        probabilities under the target (tree.accept.token_logprobs)."""
        use_graphs = self.fast is not None and GraphDecoder.handles(sampling, logprobs)
        self._active = self.fast if use_graphs else self.decoder
        if use_graphs:
            yield from self.fast.generate(prompt_ids, max_new_tokens, sampling, speculative, tree)
        else:
            yield from self.decoder.generate(prompt_ids, max_new_tokens, sampling, speculative, tree, logprobs)
        self.last_stats = self._active.stats

    def new_scheduler(self, config: SchedulerConfig) -> Scheduler:
        """An in-flight batching scheduler (runtime/scheduler.py) over this engine's own target, draft and runtime:
        the same weights, no copy; its KV pages are its own. Its model passes replay CUDA graphs on CUDA
        (SchedulerConfig.graph_passes), captured per bucket on first use (Scheduler.prepare_passes: up front).
        Not thread-safe: one thread makes every call (runtime/scheduler_thread.py does that for servers)."""
        decoder = self.decoder
        costs = self.cost_model() if config.budget_policy == "cost_model" else None
        return Scheduler(decoder.target, decoder.draft, decoder.runtime, config, costs)

    def cost_model(self, max_batch: int = 8, max_tokens: int | None = None) -> CostModel:
        """The step cost model for this device and dtype (runtime/cost_model.py): the engine's cost_model.json
        where it was measured on this device in this dtype; else (none stored, or another device's) measured
        now, up to `max_batch` sequences and `max_tokens` tokens per pass, and kept for this Engine.
        summary["cost_model"] says which. A malformed file raises JetSpecError."""
        if self._cost_model is None:
            stored = CostModel.load(self.engine_dir)
            if stored is not None and stored.matches(self.decoder.device, self.dtype):
                self._cost_model, how = stored, "stored"
            else:
                self.measure_cost_model(max_batch, max_tokens)
                how = "measured at load: " + ("none stored" if stored is None else
                                              f"the stored one is for {stored.device_name} ({stored.dtype})")
            self.summary["cost_model"] = f"{how}; {self._cost_model.describe()}"
        return self._cost_model

    def measure_cost_model(self, max_batch: int = 8, max_tokens: int | None = None, save: bool = False) -> CostModel:
        """Measure the step cost model here (and with `save`, write it into the engine directory, replacing
        the stored one): for an engine built on another device. max_tokens None: 512 on a GPU, where a pass
        costs about the same up to hundreds of tokens and the bend matters; 64 on the CPU, where a pass costs
        about its tokens already, so the line extends, and more points would cost minutes."""
        decoder = self.decoder
        max_tokens = max_tokens or (512 if decoder.device.type == "cuda" else 64)
        self._cost_model = measure_cost_model(decoder.target, decoder.draft, decoder.runtime, max_batch, max_tokens)
        if save:
            self._cost_model.save(self.engine_dir)
        return self._cost_model

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


def _weights_summary(engine_dir: Path, cuda: bool) -> str:
    if is_fused(stored_names(engine_dir / "target")):
        return "fused at build (qkv_proj, gate_up_proj)" + (": one GEMM each" if cuda else "; separate GEMMs on cpu")
    return "Hugging Face layout" + ("; fused at load" if cuda else "")


def _quantization_summary(engine_dir: Path, cuda: bool, decode_gemv: bool) -> str:
    fmt = read_fp8_format(engine_dir / "target")
    if fmt is None:
        return "none"
    if not cuda:
        return fmt.describe() + ": e4m3 weights and activations dequantized into float GEMMs here (the reference)"
    return fmt.describe() + (": FP8 GEMMs and FP8 GEMV" if decode_gemv else ": FP8 GEMMs")


def _use_kernel_tuning(engine_dir: Path, device: str) -> str:
    """Install the engine's tuned tree-attention launches for this GPU; returns what is used and why."""
    if torch.device(device).type != "cuda":
        return f"not used on {device} (reference attention)"
    from jetspec_trt.plugins.tree_attention import load_gpu_kernels

    if not load_gpu_kernels():
        return "not used: no Triton kernel (reference attention on CUDA)"
    from jetspec_trt.plugins.triton_tree_attention import install_tuned_launches
    from jetspec_trt.plugins.tuning_cache import choose_launches

    choice = choose_launches(engine_dir, torch.cuda.get_device_name(torch.device(device)))
    install_tuned_launches(choice.launches)
    return choice.summary
