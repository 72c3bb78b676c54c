"""Decoding on the GPU (greedy and sampling) with the whole round on the device and replayed from CUDA graphs.

At batch 1 a round is launch-bound unless it is graphed: hundreds of small kernels for the draft head, the
tree build and the accept step. Here every stage is a fixed-shape tensor program over static buffers, with the
context length read from device tensors (the tree-attention kernel loops to it), so one capture per tree
bucket (budget, topk, max_depth) serves every context length. The host reads back one small tensor per round
(accepted count + tokens) and that is the only sync.

Sampling runs in the same graphs. A bucket is captured once per sampling mode (`SamplingConfig.mode`: greedy,
sample, nucleus); the temperature and top_p are device scalars written per request, so new values need no
capture. The draws come from the decoder's own CUDA generator, registered with every graph that draws (a
replay then advances its Philox offset like an eager call) and seeded at the start of each request: the same
seed gives the same tokens run after run.

Stages, each its own graph so the bench can time them apart (replayed back to back they are one round):
  draft   append the previous round's accepted features to the head's cache, run the block, per-depth logits
  tree    best-first tree as tensors (tree.tree_tensors)
  verify  the target over all tree nodes with the ancestor mask, capturing the draft's target-layer features
  accept  a choice per node (argmax, or one draw), the walk as tensors, KV compaction to the accepted path,
          next round's anchor and features
The eager `Decoder` stays the reference: greedy, this class must emit the same tokens; sampling, tokens with the
same law (both walk over tree.accept.choose_tokens, which draws the same way, but they draw from different RNG
streams: the eager walk draws at the visited nodes only).

Prefill runs in prompt-length buckets (`prefill_buckets`: powers of two from 32, then max_seq_len), each a
fixed-shape pass over static buffers: the prompt padded to the bucket length L, its real length n as a device
tensor, causal positions and mask over L (a real token never sees padding: it lies after every real token), the
target's layers, the logits of row n-1 only (gathered on the device, then the lm_head over one row), and for a
speculative request the draft's context K/V from the captured features (rows past n too: written beyond the
committed length, never committed, overwritten by later rounds like a tree's slack). On CUDA each bucket (AR and
speculative) is a graph captured at load: one launch instead of an eager launch per kernel (24 layers x dozens
at the 0.5B shape); runtime.prefill_graphs = False (build --no-prefill-graphs) runs the same passes eagerly. Padding changes the M of every prefill GEMM, which may round differently (bf16 on the GPU;
fp32 CPU GEMMs too, by ~1e-5): AR and speculative requests run the same target pass, so their first tokens agree
with each other, and with the unpadded eager prefill (the eager `Decoder`'s) up to that rounding.

`GraphDecoder` is a backend of the one round loop (`runtime.round_loop.run_rounds`, which owns EOS, the token
limit, statistics and streaming): `prepare` captures the request's graphs (a tree bucket's stages, or the AR
step, and its prefill bucket if not yet captured) outside the timings, `prefill` replays the prompt's bucket and
seeds the round state, and each `decode_round` replays the stages back to back and reads the round's result
(the one sync).

The host runs one round ahead: `decode_round` queues round r+1 before it reads round r's result
(RoundPipeline), so the GPU never idles while Python handles a result. (Estimated, not timed directly: the
per-round wall time of bench/results/suites-nvidia-h200-head4.json exceeds the graphed round of
engine-qwen2.5-0.5b-h200-compiled-tree.json by ~0.3-0.45 ms at the 0.5B shape; the engine bench's
`generate_rounds` now times it.) The round after the last one needed runs to no effect: its KV lies past
the committed length, which `finish` restores from round r's own copy, and the caches are sized for it.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from jetspec_trt.errors import JetSpecError
from jetspec_trt.models.draft import DraftHead
from jetspec_trt.models.kv_cache import PagedKVCache
from jetspec_trt.models.target import TargetModel
from jetspec_trt.models.target import compile_layers as compile_model_layers
from jetspec_trt.plugins.triton_accept import accept_and_commit, argmax_rows
from jetspec_trt.plugins.triton_accept import supports as accept_kernels_support
from jetspec_trt.plugins.tree_attention import causal_mask, load_gpu_kernels, pack_mask
from jetspec_trt.runtime.backend import DecodeRequest, RoundResult
from jetspec_trt.runtime.config import RuntimeConfig, TreeConfig
from jetspec_trt.runtime.round_loop import DecodeStats, run_rounds
from jetspec_trt.tree.accept import SamplingConfig, choose_tokens
from jetspec_trt.tree.tree_tensors import (AcceptedPath, TreeTensors, accept_tensors, build_tree_kernels,
                                          build_tree_tensors, lookup_chain_tensors, node_count, tree_kernels_support,
                                          with_chain_tensors)

STAGES = ("draft", "tree", "verify", "accept")


def prefill_buckets(max_seq_len: int, smallest: int = 32) -> tuple[int, ...]:
    """Prompt-length buckets: powers of two from `smallest`, then max_seq_len (prompts are shorter: check_prompt).

    Doubling keeps the padding under half of a bucket and the graph count logarithmic (8 buckets up to 4096, two
    graphs each). At the 0.5B shape a prefill of a few hundred tokens should be launch-bound (not measured: the
    H200 suite runs showed a fixed ~20-29 ms per request, which eager prefill launches would explain), so padded
    rows cost little next to the launches a graph saves; for a large target near the top of a bucket (a
    1025-token prompt in 2048) the padding may cost more than the launches: finer steps there if the bench shows
    it. 32: one mask word, and shorter prompts gain nothing from a smaller GEMM at batch 1."""
    buckets = []
    size = smallest
    while size < max_seq_len:
        buckets.append(size)
        size *= 2
    return (*buckets, max_seq_len)


def with_lookup_chain(tree: TreeTensors, history: torch.Tensor, anchor_pos: torch.Tensor, lookup: int,
                      max_depth: int) -> tuple[TreeTensors, torch.Tensor]:
    """A draft tree plus its context-lookup chain of `lookup` slots (tree.tree_tensors.lookup_chain_tensors and
    with_chain_tensors), and the merged tree's packed mask: the tree stage of a lookup bucket after the draft's
    tree (of budget - lookup nodes) is built."""
    chain = lookup_chain_tensors(history, anchor_pos, lookup)
    merged = with_chain_tensors(tree, chain, max_depth)
    return merged, pack_mask(merged.ancestors)


def round_nodes(tree: TreeConfig) -> int:
    """Nodes a round of this tree bucket verifies, root included: the draft's, then the lookup chain's slots."""
    return node_count(tree.budget - tree.lookup, tree.topk, tree.max_depth) + tree.lookup


def build_tree_and_mask(anchor: torch.Tensor, depth_logits: torch.Tensor, budget: int, topk: int,
                        max_depth: int, vocab_ids: torch.Tensor | None = None) -> tuple[TreeTensors, torch.Tensor]:
    """The tree stage's work: the tree and its packed ancestor mask, in one function so that compiled, the
    mask packing (a handful of elementwise ops over [N, N]) fuses with the ancestor build instead of running
    as its own eager kernels."""
    built = build_tree_tensors(anchor, depth_logits, budget, topk, max_depth, vocab_ids)
    return built, pack_mask(built.ancestors)


@dataclass
class RoundState:
    """Static device buffers that carry a round's results into the next one."""

    anchor: torch.Tensor  # [1] int64: last emitted token, the next tree's root
    features: torch.Tensor  # [max_depth+1, n_layers*H]: target features of the last accepted path (padded)
    count: torch.Tensor  # [1] int64: how many rows of `features` are real
    result: torch.Tensor  # [max_depth+2] int64: [accepted length, emitted tokens...] for the host
    # Trees with a context-lookup chain (TreeConfig.lookup): the committed tokens and the anchor, written by the
    # prefill and by each round's accept, for the next tree's lookup on the device (the host runs a round ahead).
    history: torch.Tensor | None = None


def commit_round(walk: AcceptedPath, features: torch.Tensor, cache: PagedKVCache, state: RoundState,
                 offsets: torch.Tensor) -> None:
    """The accept stage after the walk, as torch ops (plugins.triton_accept.accept_and_commit does the walk and
    this in two kernels): the path's target features and count for the next draft, its K/V moved after the
    context (committed), the next anchor and the host's result; offsets = arange(max_depth + 1)."""
    if state.history is not None:  # the emitted tokens follow the anchor (at ctx_len); past `length` never read
        state.history.scatter_(0, cache.ctx_len.long() + 1 + offsets, walk.emitted)
    state.features.copy_(features[walk.path])
    state.count.copy_(walk.length)
    cache.commit_path(walk.path, walk.length)
    state.anchor.copy_(walk.emitted.gather(0, walk.length - 1))
    state.result[:1].copy_(walk.length)
    state.result[1:].copy_(walk.emitted)


@dataclass
class GraphReplay:
    """A captured graph plus the function it was captured from. The function's closure owns the static
    tensors (offsets, buffers, scratch outputs) whose addresses the graph baked in: it must outlive the graph."""

    graph: torch.cuda.CUDAGraph
    fn: Callable[[], None]

    def __call__(self) -> None:
        self.graph.replay()


def capture_graphs(fns: dict[str, Callable[[], None]], restore: Callable[[], None],
                   generator: torch.Generator | None = None, pool: tuple | None = None) -> dict[str, GraphReplay]:
    """Warm up on a side stream, capture each function in order, and undo the warm-up's cache effects.

    Functions that feed each other are warmed up together, in order: a later stage warmed up alone would
    read the earlier stage's capture-time output buffer, which nothing has written yet. `generator`: a CUDA
    generator the functions draw from, registered with each graph so that every replay draws fresh numbers from
    its current state (unregistered, a replay would repeat the capture's draws). `pool`: a graph memory pool
    (torch.cuda.graph_pool_handle) shared with other captures whose replays never interleave with these.
    """
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            for fn in fns.values():
                fn()
            restore()
    torch.cuda.current_stream().wait_stream(stream)
    replays = {}
    for name, fn in fns.items():
        graph = torch.cuda.CUDAGraph()
        if generator is not None:
            graph.register_generator_state(generator)
        with torch.cuda.graph(graph, pool=pool):
            fn()
        replays[name] = GraphReplay(graph, fn)
    restore()
    return replays


class RoundPipeline:
    """Two host slots for a round's device results: `launch` queues a round and the copy of its results
    (non-blocking, into pinned memory on CUDA), `read` waits for the oldest queued round only."""

    def __init__(self, sources: tuple[torch.Tensor, ...]):
        self.sources = sources
        cuda = sources[0].is_cuda
        self.slots = [tuple(torch.empty(t.shape, dtype=t.dtype, pin_memory=cuda) for t in sources) for _ in range(2)]
        self.events = [torch.cuda.Event() if cuda else None for _ in range(2)]
        self.launched = self.read_count = 0

    def launch(self, run: Callable[[], None]) -> None:
        if self.launched - self.read_count >= 2:
            raise RuntimeError("RoundPipeline holds two rounds at most: read one first")
        run()
        slot = self.launched % 2
        for host, device in zip(self.slots[slot], self.sources):
            host.copy_(device, non_blocking=True)
        if self.events[slot] is not None:
            self.events[slot].record()
        self.launched += 1

    def read(self) -> tuple[list, ...]:
        slot = self.read_count % 2
        if self.events[slot] is not None:
            self.events[slot].synchronize()
        self.read_count += 1
        return tuple(t.tolist() for t in self.slots[slot])


@dataclass(eq=False)
class PrefillStage:
    """One prompt-length bucket's prefill: static inputs, its output, and what runs it (a graph on CUDA)."""

    size: int  # the bucket length L
    tokens: torch.Tensor  # [L] int64: the prompt, padded with token 0 (padded rows are computed, never read)
    length: torch.Tensor  # [1] int64: the prompt's real length n
    out: dict[str, torch.Tensor]  # "logits": [1, vocab] float32, row n-1's (a static buffer under graphs)
    run: Callable[[], None]


@dataclass
class _Round:
    """One request's round on the device: the bucket's state (None for AR steps), what a round replays, the
    pipeline that reads rounds back, and the committed length as of the last round read."""

    state: RoundState | None
    run: Callable[[], None]
    pipeline: RoundPipeline
    drafted: int  # tree nodes below the root
    mode: str  # SamplingConfig.mode: how the prefill's token is chosen, as the graphs choose the rounds' tokens
    token: torch.Tensor | None = None  # the AR step's token buffer
    committed: int = 0


class GraphDecoder:
    def __init__(self, target: TargetModel, draft: DraftHead, runtime: RuntimeConfig, use_graphs: bool = True,
                 compile_layers: bool = False):
        self.target, self.draft, self.runtime = target, draft, runtime
        self.device = target.embed_tokens.weight.device
        self.use_graphs = use_graphs and self.device.type == "cuda"
        self.prefill_graphs = self.use_graphs and runtime.prefill_graphs
        self.triton_kernels = self.device.type == "cuda" and load_gpu_kernels()
        if self.device.type == "cuda":
            target.set_decode_gemv(runtime.decode_gemv, runtime.gated_gemv, runtime.gemv_pdl_prefetch)
            target.set_small_m_gemm(runtime.small_m_gemm)
            draft.set_small_m_gemm(runtime.small_m_gemm)
        # (off CUDA the ops' torch reference runs: the same math as the unfused layers)
        target.set_fused_layer_kernels(runtime.fused_layer_kernels)
        draft.set_fused_layer_kernels(runtime.fused_layer_kernels)
        # The tree build (one sort per level) and the acceptance walk are ~100-200 tiny kernels a round at batch 1
        # eager (H200, 0.5B shape: tree 0.66 ms of a 2.50 ms budget-16 round); compiled, Inductor fuses what lies
        # between the top-k/sort calls (and sorts of <= 512 entries themselves). Shapes are fixed per tree
        # bucket, so each compiles once. The per-node choice (choose_tokens) stays eager: a handful of
        # vocabulary-wide kernels, and its draws use a generator.
        self.build_tree, self.accept_path = build_tree_and_mask, accept_tensors
        self.add_lookup_chain = with_lookup_chain
        self.tree_kernel = runtime.tree_kernel
        self.fused_accept = runtime.fused_accept
        if compile_layers:
            compile_model_layers(target.layers)
            compile_model_layers(draft.layers)
            self.build_tree = torch.compile(build_tree_and_mask, dynamic=False, fullgraph=True)
            self.accept_path = torch.compile(accept_tensors, dynamic=False, fullgraph=True)
            self.add_lookup_chain = torch.compile(with_lookup_chain, dynamic=False, fullgraph=True)
        # Sampling: the request's temperature and top_p as device scalars (graphs read them at replay) and the
        # generator every draw uses, seeded per request (prepare).
        self.temperature = torch.ones((), device=self.device)
        self.top_p = torch.ones((), device=self.device)
        self.generator = torch.Generator(device=self.device)
        self.capture_layers = tuple(runtime.target_layer_ids)
        # A tree or padded context + block past the limit, plus the round the pipeline runs past the last one.
        # (The largest prefill bucket, max_seq_len, writes slots below max_seq_len: it fits.)
        slack = max(runtime.tree.budget, 2 * runtime.block_size) + runtime.block_size
        tokens = runtime.max_seq_len + slack + 1
        self.target_cache = target.new_cache(tokens, runtime.page_size)
        self.draft_cache = draft.new_cache(tokens, runtime.page_size)
        if self.device.type == "cuda":
            # RoPE tables: every pass gathers its cos/sin rows (the same values) instead of computing them in ~8
            # kernels. A pass asks only for positions of tokens with a cache slot (below capacity), and any other
            # decoder of these models (the eager Decoder, the scheduler) for positions below max_seq_len, which
            # the build keeps within max_position_embeddings.
            positions = max(self.target_cache.capacity, self.draft_cache.capacity,
                            target.config.max_position_embeddings, draft.config.max_position_embeddings)
            for model in (target, draft):
                model.rotary.build_table(positions, target.embed_tokens.weight.dtype)
        # This decoder prefills at bucket lengths only, but the eager Decoder beside it (top-k, banned tokens, log
        # probabilities; the scheduler) and teacher-forced prefills run prompts of any length, and the attention
        # kernel compiles per launch shape: compile them all now, not in the first request of each shape
        # (plugins/triton_tree_attention.py, _tree_attention_kernel's comment).
        self.prefill_lengths = self._warm_prefill(runtime.max_seq_len) if self.triton_kernels else []
        self._block_mask = causal_mask(runtime.block_size, self.device)
        self._one = causal_mask(1, self.device)
        self._stages: dict[tuple[TreeConfig, str], tuple[RoundState, dict[str, Callable[[], None]]]] = {}
        self._ar_steps: dict[str, tuple[torch.Tensor, Callable[[], None]]] = {}
        self.prefill_buckets = prefill_buckets(runtime.max_seq_len)
        self._prefills: dict[tuple[int, bool], PrefillStage] = {}
        self._prefill_pool = torch.cuda.graph_pool_handle() if self.prefill_graphs else None
        if self.prefill_graphs:
            # Captured now, not in a request (about three eager prefills per graph, twice per bucket). Largest
            # first: the buckets share one memory pool, so the smaller captures reuse its blocks and the pool
            # holds about one largest prefill's activations, not the sum. Sharing is safe because a replay's
            # output (the logits row) is read before any other prefill replays.
            for size in reversed(self.prefill_buckets):
                for speculative in (True, False):
                    self.prefill_stage(size, speculative)
        self._round: _Round | None = None
        self.stats: DecodeStats | None = None

    def _warm_prefill(self, max_tokens: int) -> list[int]:
        from jetspec_trt.plugins.triton_tree_attention import warm_causal_prefill

        cache = self.target_cache
        return warm_causal_prefill(cache.k[0], cache.v[0], cache.block_table, cache.ctx_len,
                                   self.target.config.num_heads, max_tokens)

    def set_decode_gemv(self, enabled: bool, gated: bool = False, pdl_prefetch: int = 0) -> None:
        """Switch the target's single-token GEMMs between cuBLAS and plugins.gemv (TargetModel.set_decode_gemv's
        `gated` and `pdl_prefetch` with it); drops captured graphs (they baked in the other kernels) so the next
        use re-captures."""
        self.target.set_decode_gemv(enabled, gated, pdl_prefetch)
        self._drop_graphs()

    def set_small_m_gemm(self, enabled: bool) -> None:
        """Switch the 2..64-row GEMMs of target and draft (verify, the draft block, small prefill buckets) between
        cuBLAS and plugins.skinny_gemm; drops captured graphs as set_decode_gemv does."""
        self.target.set_small_m_gemm(enabled)
        self.draft.set_small_m_gemm(enabled)
        self._drop_graphs()

    def set_fused_layer_kernels(self, enabled: bool) -> None:
        """Switch target and draft between the fused layer kernels and the unfused ops; drops captured graphs."""
        self.target.set_fused_layer_kernels(enabled)
        self.draft.set_fused_layer_kernels(enabled)
        self._drop_graphs()

    def _drop_graphs(self) -> None:
        """Forget every captured graph (they baked in the kernels of the model's old switches): prepare recaptures."""
        self._ar_steps.clear()
        self._stages.clear()
        self._prefills.clear()  # (the last row's lm_head is a single-token GEMM); recaptured by prepare
        self._prefill_pool = torch.cuda.graph_pool_handle() if self.prefill_graphs else None

    def set_draft_vocab(self, token_ids: torch.Tensor | None) -> None:
        """Let the draft propose from `token_ids` only (DraftHead.set_vocab; None: the whole vocabulary); drops
        captured rounds (they baked in the old logits' shape and ids)."""
        self.draft.set_vocab(token_ids, self.target.lm_head.weight)
        self._stages.clear()

    def set_tree_kernel(self, enabled: bool) -> None:
        """Switch the tree stage between the Triton kernels and the torch build; drops captured rounds."""
        self.tree_kernel = enabled
        self._stages.clear()

    def set_fused_accept(self, enabled: bool) -> None:
        """Switch the accept stage between plugins.triton_accept's kernels and the torch ops; drops captured
        rounds."""
        self.fused_accept = enabled
        self._stages.clear()

    def _tree_builder(self, tree: TreeConfig) -> Callable:
        """The tree stage's function for a bucket: the Triton kernels where asked for and able, else the torch build."""
        if self.tree_kernel and self.triton_kernels and tree_kernels_support(tree.budget, tree.topk, tree.max_depth):
            return build_tree_kernels
        return self.build_tree

    def reset(self, context: int = 0) -> None:
        """Both caches back to `context` committed tokens (0: empty), whatever their K/V rows hold: benchmarks
        replay steps and rounds at contexts nobody prefilled."""
        self.target_cache.set_length(context)
        self.draft_cache.set_length(context)

    def fill_caches(self, generator: torch.Generator) -> None:
        """Fill every K/V row of both caches with N(0, 1) values (realistic, non-zero contents for timings)."""
        for cache in (self.target_cache, self.draft_cache):
            for tensor in (cache.k_all, cache.v_all):
                tensor.normal_(0, 1, generator=generator)

    # ---- state -------------------------------------------------------------------------------------------
    def _new_state(self, tree: TreeConfig) -> RoundState:
        depth = tree.max_depth
        width = len(self.capture_layers) * self.target.config.hidden_size
        dtype = self.target.embed_tokens.weight.dtype
        # history: every slot a cache has, plus the emitted tokens a round writes past its anchor
        history = (torch.zeros(self.target_cache.capacity + depth + 2, dtype=torch.long, device=self.device)
                   if tree.lookup else None)
        return RoundState(
            anchor=torch.zeros(1, dtype=torch.long, device=self.device),
            features=torch.zeros(depth + 1, width, dtype=dtype, device=self.device),
            count=torch.zeros(1, dtype=torch.long, device=self.device),
            result=torch.zeros(depth + 2, dtype=torch.long, device=self.device),
            history=history,
        )

    # ---- stages (fixed shapes, no host sync) -----------------------------------------------------------
    def choose(self, logits: torch.Tensor, mode: str) -> torch.Tensor:
        """The token after each row of logits, by the request's rule (tree.accept.choose_tokens)."""
        return choose_tokens(logits, mode, self.temperature, self.top_p, self.generator)

    def _make_stages(self, tree: TreeConfig, state: RoundState, mode: str) -> dict[str, Callable[[], None]]:
        target, draft, depth = self.target, self.draft, tree.max_depth
        tcache, dcache = self.target_cache, self.draft_cache
        block_size = self.runtime.block_size
        offsets_ctx = torch.arange(depth + 1, device=self.device)
        offsets_block = torch.arange(block_size, device=self.device)
        block = torch.full((block_size,), self.runtime.mask_token_id, dtype=torch.long, device=self.device)
        scratch: dict[str, object] = {}
        build_tree = self._tree_builder(tree)
        fused_accept = self.fused_accept and self.triton_kernels and accept_kernels_support(round_nodes(tree))

        def draft_stage() -> None:
            # Padded rows past `count` are written too but not committed: the block overwrites them.
            draft.write_context(state.features, dcache.ctx_len.long() + offsets_ctx, dcache)
            dcache.advance(state.count)
            block[:1] = state.anchor
            positions = dcache.ctx_len.long() + offsets_block
            hidden = draft.propose(target.embed(block), positions, dcache, self._block_mask)
            scratch["depth_logits"] = draft.depth_logits(hidden[1 : 1 + depth], target)

        def tree_stage() -> None:
            scratch["tree"], scratch["mask"] = build_tree(state.anchor, scratch["depth_logits"],
                                                          tree.budget - tree.lookup, tree.topk, depth, draft.vocab_ids)
            if tree.lookup:  # the anchor sits at history[ctx_len]
                scratch["tree"], scratch["mask"] = self.add_lookup_chain(scratch["tree"], state.history,
                                                                         tcache.ctx_len, tree.lookup, depth)

        def verify_stage() -> None:
            built = scratch["tree"]
            positions = tcache.ctx_len.long() + built.depths
            tokens = built.tokens.clamp(min=0) if tree.lookup else built.tokens  # dead lookup slots hold -1
            scratch["out"] = target(tokens, positions, tcache, scratch["mask"], self.capture_layers,
                                    float_logits=mode != "greedy")

        def accept_stage() -> None:
            out = scratch["out"]
            # (greedy, fused: the argmax split over programs; torch's took one program a row, 24 us of 64 rows)
            choice = argmax_rows(out.logits) if fused_accept and mode == "greedy" else self.choose(out.logits, mode)
            if fused_accept:
                built = scratch["tree"]
                accept_and_commit(built.tokens, built.parents, built.depths, choice, depth, out.features,
                                  tcache.k_all, tcache.v_all, tcache.block_table, tcache.ctx_len, state.features,
                                  state.count, state.anchor, state.result, state.history)
            else:
                commit_round(self.accept_path(scratch["tree"], choice, depth), out.features, tcache, state,
                             offsets_ctx)

        return {"draft": draft_stage, "tree": tree_stage, "verify": verify_stage, "accept": accept_stage}

    def _captured(self, fns: dict[str, Callable[[], None]], restore: Callable[[], None], mode: str) -> dict:
        """The functions as graphs (capture_graphs), or as they are when graphs are off."""
        if not self.use_graphs:
            return fns
        return capture_graphs(fns, restore, None if mode == "greedy" else self.generator)

    def _snapshot(self) -> Callable[[], None]:
        saved = (self.target_cache.ctx_len.clone(), self.draft_cache.ctx_len.clone())

        def restore() -> None:
            self.target_cache.ctx_len.copy_(saved[0])
            self.draft_cache.ctx_len.copy_(saved[1])

        return restore

    def stages(self, tree: TreeConfig, mode: str = "greedy") -> tuple[RoundState, dict[str, Callable[[], None]]]:
        """The (captured) stages of a tree bucket in a sampling mode; captured once, on first use."""
        key = (tree, mode)
        if key not in self._stages:
            state = self._new_state(tree)
            eager = self._make_stages(tree, state, mode)
            restore = self._snapshot()
            self._stages[key] = (state, self._captured({name: eager[name] for name in STAGES}, restore, mode))
        return self._stages[key]

    def ar_step(self, mode: str = "greedy") -> tuple[torch.Tensor, Callable[[], None]]:
        """One autoregressive step over static buffers: token in, next token out (argmax or a draw), context + 1."""
        if mode not in self._ar_steps:
            token = torch.zeros(1, dtype=torch.long, device=self.device)
            one = torch.ones(1, dtype=torch.long, device=self.device)

            def step() -> None:
                positions = self.target_cache.ctx_len.long()
                out = self.target(token, positions, self.target_cache, self._one, float_logits=mode != "greedy")
                self.target_cache.advance(one)
                token.copy_(self.choose(out.logits, mode))

            self._ar_steps[mode] = (token, self._captured({"step": step}, self._snapshot(), mode)["step"])
        return self._ar_steps[mode]

    # ---- decoding: the round loop's backend ------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.target.config.vocab_size

    @torch.inference_mode()
    def generate(self, prompt_ids: list[int], max_new_tokens: int, sampling: SamplingConfig = SamplingConfig(),
                 speculative: bool = True, tree: TreeConfig | None = None) -> Iterator[list[int]]:
        """Yield the new tokens of each round. `self.stats` describes the call once the iterator ends."""
        yield from run_rounds(self, prompt_ids, max_new_tokens, sampling, speculative, tree)

    # ---- prefill in length buckets ------------------------------------------------------------------------
    def _make_prefill(self, size: int, speculative: bool) -> PrefillStage:
        """The prefill of one bucket as a fixed-shape function over static buffers (module docstring). Its K/V go
        after the caches' committed lengths and it commits nothing: the caller empties the caches first and
        commits the prompt's n tokens after."""
        target, draft, tcache, dcache = self.target, self.draft, self.target_cache, self.draft_cache
        tokens = torch.zeros(size, dtype=torch.long, device=self.device)
        length = torch.ones(1, dtype=torch.long, device=self.device)
        out: dict[str, torch.Tensor] = {}
        positions = torch.arange(size, device=self.device)
        mask = causal_mask(size, self.device)
        capture_layers = self.capture_layers if speculative else ()

        def prefill() -> None:
            # Eager layers even where the rounds' are compiled: Inductor would compile the layer once per
            # bucket (load time, and entries of dynamo's cache limit), and inside a graph what it would save is
            # GPU time of a few unfused elementwise kernels per layer, not launches; not measured yet.
            with torch.compiler.set_stance("force_eager"):
                hidden, features = target.forward_hidden(tokens, positions, tcache, mask, capture_layers)
                out["logits"] = target.logits(hidden.index_select(0, length - 1))
                if speculative:  # rows past n are written past the committed length: never committed
                    draft.write_context(features, positions, dcache)

        return PrefillStage(size, tokens, length, out, prefill)

    @torch.inference_mode()
    def prefill_stage(self, prompt_tokens: int, speculative: bool) -> PrefillStage:
        """The prefill of the smallest bucket that holds `prompt_tokens`; built (on CUDA: captured) on first use."""
        buckets = self.prefill_buckets
        if not 0 < prompt_tokens <= buckets[-1]:
            raise JetSpecError(f"a prompt of {prompt_tokens} tokens; the engine prefills 1 to {buckets[-1]}")
        size = buckets[bisect.bisect_left(buckets, prompt_tokens)]
        key = (size, speculative)
        if key not in self._prefills:
            stage = self._make_prefill(size, speculative)
            if self.prefill_graphs:
                # Empty caches, so that the warm-up runs' K/V land within them (a prefill, which empties them
                # anyway, follows every capture).
                self.reset()
                replays = capture_graphs({"prefill": stage.run}, self._snapshot(), pool=self._prefill_pool)
                stage.run = replays["prefill"]
            self._prefills[key] = stage
        return self._prefills[key]

    @torch.inference_mode()
    def prefill_logits(self, prompt_ids: list[int], speculative: bool) -> torch.Tensor:
        """The prompt through the target from empty caches, in its bucket, and when `speculative` its features
        into the draft's cache; both caches then hold the prompt as committed context. Returns the next-token
        logits [vocab] (float32) after the prompt: on CUDA a view of the graphs' memory, valid until the next
        prefill."""
        n = len(prompt_ids)
        stage = self.prefill_stage(n, speculative)
        stage.tokens.copy_(torch.tensor(prompt_ids + [0] * (stage.size - n)))
        stage.length.fill_(n)
        self.reset()
        stage.run()
        self.target_cache.set_length(n)
        if speculative:
            self.draft_cache.set_length(n)
        return stage.out["logits"][0]

    @staticmethod
    def handles(sampling: SamplingConfig, logprobs: bool = False) -> bool:
        """Whether the graphs run this request: greedy or sampled (temperature, top-p, seed), with no banned tokens,
        no top-k and no log probabilities (those run on the eager Decoder)."""
        return not sampling.banned_token_ids and not sampling.top_k and not logprobs

    def prepare(self, request: DecodeRequest) -> None:
        """Capture the request's graphs (a tree bucket's stages, or the AR step, in its sampling mode) on first use,
        then set its sampling values and seed: all outside the timings."""
        if not self.handles(request.sampling, request.logprobs):
            raise JetSpecError("the graph decoder takes no banned tokens, top-k or log probabilities: "
                               "those requests run on the eager Decoder")
        sampling = request.sampling
        mode = sampling.mode
        self.prefill_stage(len(request.prompt_ids), request.speculative)
        if request.speculative:
            state, stages = self.stages(request.tree, mode)
            replays = [stages[name] for name in STAGES]

            def run() -> None:
                for replay in replays:
                    replay()

            self._round = _Round(state, run, RoundPipeline((state.result, self.target_cache.ctx_len)),
                                 round_nodes(request.tree) - 1, mode)
        else:
            token, step = self.ar_step(mode)
            self._round = _Round(None, step, RoundPipeline((token, self.target_cache.ctx_len)), 0, mode, token)
        if mode != "greedy":
            self.temperature.fill_(sampling.temperature)
            self.top_p.fill_(sampling.top_p)
            # After the capture (its warm-up draws too). No seed: one from torch's global RNG, as the eager
            # decoder's draws are then (torch.manual_seed makes both repeatable).
            seed = sampling.seed if sampling.seed is not None else int(torch.randint(0, 2**62, ()))
            self.generator.manual_seed(seed)

    def prefill(self, request: DecodeRequest) -> int:
        round_ = self._round
        logits = self.prefill_logits(request.prompt_ids, request.speculative)
        first = self.choose(logits, round_.mode)  # eager, from the same generator as the rounds' draws
        if round_.state is not None:
            round_.state.anchor.copy_(first)
            round_.state.count.zero_()
            if round_.state.history is not None:  # the prompt, then the anchor
                n = len(request.prompt_ids)
                round_.state.history[:n].copy_(torch.tensor(request.prompt_ids))
                round_.state.history[n : n + 1].copy_(first)
        else:
            round_.token.copy_(first)
        round_.committed = len(request.prompt_ids)
        return int(first)

    def decode_round(self) -> RoundResult:
        """Queue the next round, then read this one: round r+1 is on the GPU while the loop handles round r."""
        round_ = self._round
        pipeline = round_.pipeline
        if pipeline.launched == 0:
            pipeline.launch(round_.run)  # the first round
        pipeline.launch(round_.run)  # queued before this round is read: the GPU never waits on the host
        result, (round_.committed,) = pipeline.read()  # the round's one host sync
        if round_.state is None:
            return RoundResult(result)
        emitted = result[1 : 1 + result[0]]
        return RoundResult(emitted, round_.drafted, len(emitted) - 1)

    def finish(self) -> None:
        # The round queued past the last one read committed nothing that counts.
        self.target_cache.set_length(self._round.committed)

