"""The speculative runtime config stored in an engine directory (runtime_config.json)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from jetspec_trt.errors import JetSpecError

RUNTIME_CONFIG = "runtime_config.json"


@dataclass(frozen=True)
class TreeConfig:
    budget: int = 256  # tree nodes verified per round, root included (1 = autoregressive)
    topk: int = 7  # children per node (tree width); the paper's runs use 7
    max_depth: int = 15  # drafted tokens on the longest branch, <= block_size - 1
    # This many of the budget's nodes are kept for a context-lookup chain (tree/lookup.py: what followed the last
    # 1-3 committed tokens where they occurred before) beside the draft's best-first nodes, which get the rest;
    # 0: none. Every decoder builds such trees (the CUDA graphs find and merge the chain on the device). 0 here, so
    # that TreeConfig(budget, topk, depth) is a plain tree at any depth; DEFAULT_TREE below turns it on.
    lookup: int = 0

    def validate(self, block_size: int) -> None:
        if self.budget < 1:
            raise JetSpecError(f"budget must be >= 1, got {self.budget}")
        if self.topk < 1:
            raise JetSpecError(f"topk must be >= 1, got {self.topk}")
        if not 1 <= self.max_depth <= block_size - 1:
            raise JetSpecError(f"max_depth must be in 1..{block_size - 1} (block_size - 1), got {self.max_depth}")
        if not 0 <= self.lookup <= min(self.max_depth, self.budget - 1):
            raise JetSpecError(f"lookup must be in 0..{min(self.max_depth, self.budget - 1)} (at most max_depth and "
                               f"budget - 1 nodes), got {self.lookup}")

    @property
    def draft_depth(self) -> int:
        """The depths whose draft logits a tree of this budget can use: a node at depth d has d - 1 ancestors
        besides the root, so a tree of b nodes is at most b - 1 deep (the draft's LM head over deeper rows, the
        bulk of a draft pass on the CPU, would be thrown away)."""
        return min(self.max_depth, self.budget - 1)

    def fitted(self, budget: int, max_depth: int) -> "TreeConfig":
        """This tree at `budget` nodes and `max_depth` deep, its lookup chain fitted to them: at most the depth
        and, at another budget than its own, at most half of that budget, so the draft keeps the rest (budget 1:
        none). Why half: at budget 16 a 15-node chain leaves the draft one node and lost to an 8-node chain in the
        CPU simulation; 8 ran 1.45-2.11x our AR on the H200 (head v7; docs/benchmarks.md, "Acceptance bench")."""
        return TreeConfig(budget, self.topk, max_depth, min(self.lookup_at(budget), max_depth))

    def lookup_at(self, budget: int) -> int:
        """The lookup nodes this tree keeps when cut to `budget` nodes (fitted, and the scheduler's cost-model
        budgets): all at its own budget, else at most half of `budget`."""
        return self.lookup if budget == self.budget else min(self.lookup, budget // 2)


# The tree an engine is built with, and so what `run` and the Engine API use, unless told otherwise: the CLI's
# build flags, BuildConfig, the benches and the quickstart (on CUDA) read it here. Measured on an H200 (bf16,
# greedy, head v7, 10 prompts a suite, 256 tokens; bench/results/suites-nvidia-h200-head-v7-topk16-lookup15.json):
# budget 64, width 16 and a 15-node lookup chain ran 1.71 / 1.57 / 2.51x our AR on MT-Bench / MATH-500 /
# HumanEval, against 1.12 / 1.22 / 1.06x at budget 64, width 7 without lookup; every divergence from AR was a
# bf16 near-tie. (The field defaults above stay a plain tree: the training card's simulated tau uses them.)
DEFAULT_TREE = TreeConfig(budget=64, topk=16, max_depth=15, lookup=15)


@dataclass(frozen=True)
class RuntimeConfig:
    tree: TreeConfig
    dtype: str
    max_seq_len: int  # prompt + generated tokens
    block_size: int
    mask_token_id: int
    target_layer_ids: tuple[int, ...]
    eos_token_ids: tuple[int, ...] = ()
    page_size: int = 64
    # CUDA: the target's single-token GEMMs (AR step) through plugins.gemv instead of cuBLAS. On the H200 at
    # the Qwen3-8B shape the step's GEMMs streamed 3.99 TB/s vs 3.65 (AR step 6.36 vs 6.79 ms at context 2048).
    decode_gemv: bool = True
    # CUDA, with decode_gemv: the MLP's activation (silu(gate) * up) inside the down projection's GEMV
    # (plugins.gemv's gemv_gated), one kernel less a layer in the AR step. Off until the engine bench
    # ("ar_step_defaults_gated_gemv") has timed it on a GPU.
    gated_gemv: bool = False
    # CUDA (compute capability 9.0+), with decode_gemv: > 0 launches the GEMVs that follow our norm and attention
    # kernels as their programmatic dependents, each prefetching this many columns of its W rows into L2 while those
    # kernels run (plugins/gemv.py, PDL; an H100 probe hid 0.36 of 0.81 ms of norms at the 8B shape with 1024,
    # bench/results/pdl-probe-h100.json). 0: ordinary launches. Off until the engine bench
    # ("ar_step_defaults_gemv_pdl") has timed it in the step.
    gemv_pdl_prefetch: int = 0
    # CUDA: torch.compile the decoder layers and the tree / accept stages inside the captured graphs. At batch 1
    # they are hundreds of tiny kernels that Inductor fuses (H200, Qwen2.5-0.5B shape: AR step 2.94 -> 1.38 ms,
    # budget-16 verify 3.41 -> 1.43 ms). Costs a compile on the first use of each tree bucket.
    compile_graphs: bool = True
    # CUDA: the round's tree stage as three Triton kernels (plugins/triton_tree_build.py) instead of the compiled
    # torch build (aten top-k, a sort per level). Timed side by side on an H200 at the 0.5B shape, context 512
    # (bench/results/engine-qwen2.5-0.5b-h200-tree-kernel.json): tree stage 0.20 / 0.73 / 0.70 ms -> 0.04 / 0.07 /
    # 0.38 ms, round 2.02 / 2.65 / 3.11 -> 1.86 / 1.99 / 2.81 ms at budgets 16 / 64 / 256, same outputs. Trees the
    # kernels cannot hold (over 512 nodes) keep the torch build.
    tree_kernel: bool = True
    # CUDA: the 2..64-row GEMMs (tree verify at budgets <= 64, the draft head's block and context rows, the draft's
    # depth logits) through the weight-streaming skinny GEMM (plugins/skinny_gemm.py) instead of cuBLAS: at those
    # rows they are weight-bound, and cuBLAS streamed ~1.5 TB/s on the H200 at the 0.5B shape where the GEMV does
    # 2.0. Off until the engine bench ("rounds_small_m_gemm") has timed both side by side on a GPU.
    small_m_gemm: bool = False
    # CUDA: each prompt-length bucket's prefill replayed from a CUDA graph captured at load (False: the same
    # bucketed pass run eagerly, one launch per kernel).
    prefill_graphs: bool = True
    # The layers' norms, q/k norm + RoPE + KV write and post-attention residual add (target and draft head, and
    # the head's context K/V) as the fused Triton kernels of plugins/layer_kernels.py (CUDA; elsewhere the ops run
    # the same torch math). Kernel by kernel on an H100 at the 0.5B shape (bench/results/
    # engine-qwen2.5-0.5b-h100-profile.json, `bench --profile`): AR step 1.34 -> 1.18 ms, budget-64 verify
    # 1.59 -> 1.35 ms (unfused, the KV write alone was 48 index_copy kernels, 0.13 ms of a verify). With the
    # draft's fused path, RoPE tables and bf16 greedy argmax, the default pair's AR went 853-857 -> 966-971 tok/s
    # and its default-tree speculative decode 10-21 % faster (suites-nvidia-h100-80gb-hbm3-ab-{old,new}.json).
    fused_layer_kernels: bool = True
    # CUDA: the accept stage (the greedy argmax, the walk, the path's features, the KV compaction, the history and
    # the host's result) as plugins/triton_accept.py's four kernels instead of ~44 torch ops (0.11 ms of a 1.67 ms
    # budget-64 round at the 0.5B shape on an H100). The same values. Measured on an H100 (lease 14): the budget-64
    # accept stage 0.096 -> 0.034 ms (36 -> 4 kernels; engine-qwen2.5-0.5b-h100-accept-profile.json), and
    # the default pair's suite bench 2.07 / 2.32 / 3.09x -> 2.13 / 2.38 / 3.18x our AR at budget 64, equal tau
    # (suites-nvidia-h100-head-v10-topk16-lookup15.json against -fused-accept.json).
    fused_accept: bool = True
    # The draft proposes from this many tokens, the most frequent in the target's responses (models/draft_vocab.py;
    # the ids in the engine's draft_vocab.json); 0: from the whole vocabulary. The output is the same either way.
    draft_vocab: int = 0
    extras: dict = field(default_factory=dict)  # backend-specific (e.g. tuned kernel configs)

    def cache_tokens(self) -> int:
        """KV slots per cache: the sequence plus one tree (or draft block) beyond it."""
        return self.max_seq_len + max(self.tree.budget, self.block_size) + 1

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2) + "\n"

    @classmethod
    def from_dict(cls, raw: dict) -> "RuntimeConfig":
        raw = dict(raw)
        raw["tree"] = TreeConfig(**raw["tree"])
        raw["target_layer_ids"] = tuple(raw["target_layer_ids"])
        raw["eos_token_ids"] = tuple(raw.get("eos_token_ids", ()))
        return cls(**raw)

    @classmethod
    def load(cls, engine_dir: Path) -> "RuntimeConfig":
        path = Path(engine_dir) / RUNTIME_CONFIG
        if not path.is_file():
            raise JetSpecError(f"{engine_dir}: no {RUNTIME_CONFIG} (not an engine directory; run `jetspec-trt build`)")
        try:
            return cls.from_dict(json.loads(path.read_text()))
        except (json.JSONDecodeError, TypeError, KeyError) as err:
            raise JetSpecError(f"{path}: malformed runtime config ({err})") from err
