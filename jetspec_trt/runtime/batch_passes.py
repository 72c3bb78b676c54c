"""The in-flight scheduler's two batched model passes (runtime/scheduler.py), each one KV write and one batched
tree-attention call per layer for all sequences of a pool (`pool_layer_call`), eager or at bucketed fixed shapes.

Eager (`batched_layer_call`): the pass runs at the step's own shapes, its slots and the op's inputs built on the
device. Every pass then launches each of its kernels (24 layers x dozens at the 0.5B shape).

Padded (`PaddedPasses`, SchedulerConfig.graph_passes): the same passes at fixed shapes over static buffers, so
that on CUDA each shape is a graph captured once (runtime/graph_decoder.capture_graphs) and replayed:

    verify   (batch bucket, token bucket): the sequences padded to the batch bucket (1, 2, 4, ... max_batch:
             cost_model.doubling_up_to), their nodes to the token bucket (the next power of two)
    draft    batch bucket: [anchor, MASK ...] blocks of the bucket's sequences, the LM head over every block row
             after the anchor
    context  token bucket: the newly committed tokens' features projected to the draft's K/V (a first pass
             after admission, holding whole prompts, runs eagerly above max_batch x block_size rows)

The inputs (tokens, positions, KV slots, and the batched op's block tables, context lengths, cu_seqlens and
masks) are built on the host from the caches' host mirrors (`pages`, `length`) and copied in with one copy per
pass. Padding never touches a sequence: unused sequence slots own no rows, and the padding rows form one extra
sequence after them, of context 0, whose block table is a scratch page that no sequence owns (one reserved per
pool), where the rows' K/V writes land; each padding row sees only itself (finite values, no empty softmax),
and its outputs are dropped. A graph is captured on a batch of padding only, so its warm-up writes nothing but
the scratch page. Padding changes the M of the GEMMs, which may round differently (bf16; fp32 CPU GEMMs by ~1e-6):
greedy tokens are those of the eager passes up to that rounding, as the batch-1 prefill buckets are
(runtime/graph_decoder.py).

The graphs share one memory pool: replays never overlap and each pass's outputs (views of the graph's memory)
are read before the next pass runs.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass
from typing import Callable

import torch

from jetspec_trt.models.draft import DraftHead
from jetspec_trt.models.kv_cache import PagedKVCache, PagePool, batch_slots, flat_slots, write_kv
from jetspec_trt.models.target import LayerCall, TargetModel
from jetspec_trt.plugins.tree_attention import (BatchedAttention, causal_mask, mask_words, packed_causal_mask,
                                                tree_attention_batched)
from jetspec_trt.runtime.config import RuntimeConfig
from jetspec_trt.runtime.cost_model import doubling_up_to
from jetspec_trt.runtime.graph_decoder import capture_graphs


def pool_layer_call(pool: PagedKVCache, slots: torch.Tensor, batch: BatchedAttention) -> LayerCall:
    """A decoder layer over several sequences' new tokens back to back, all in `pool`'s K/V: the layer body
    (norms, projections, RoPE, MLP) once over all tokens, one KV write through every token's flat slot and one
    batched attention call (each sequence after its own committed context, as target.paged_layer_call does for
    one)."""

    def call(i, layer, x, cos, sin):
        q, k, v = layer.attention_inputs(x, cos, sin)
        write_kv(pool.k[i], pool.v[i], slots, k, v)
        return layer.finish(x, tree_attention_batched(q, pool.k[i], pool.v[i], batch, layer.self_attn.scale))

    return call


def batched_layer_call(segments: list[tuple[PagedKVCache, torch.Tensor]]) -> LayerCall:
    """`pool_layer_call` at the step's own shapes: `segments` are (the sequence's cache, the packed mask of its
    new tokens) in token order, the caches views of one pool. The slots and the op's inputs are built once here
    on the device, for all layers."""
    caches = [cache for cache, _ in segments]
    masks = [mask for _, mask in segments]
    slots = batch_slots(caches, [mask.shape[0] for mask in masks])
    batch = BatchedAttention.build([c.block_table for c in caches], [c.ctx_len for c in caches], masks)
    return pool_layer_call(caches[0], slots, batch)


def token_bucket(tokens: int) -> int:
    """The smallest power of two >= tokens: padding stays under half a bucket, the graph count logarithmic."""
    return 1 << max(tokens - 1, 0).bit_length()


class StaticInts:
    """Named int32 inputs of a fixed-shape pass: written into host views, then copied to the device views the
    pass reads in one copy (from pinned memory on CUDA, not waiting for the host)."""

    def __init__(self, shapes: dict[str, tuple[int, ...]], device: torch.device):
        sizes = [math.prod(shape) for shape in shapes.values()]
        cuda = device.type == "cuda"
        self._host = torch.zeros(sum(sizes), dtype=torch.int32, pin_memory=cuda)
        self._device = torch.zeros(sum(sizes), dtype=torch.int32, device=device)
        self.host = {n: t.view(s) for (n, s), t in zip(shapes.items(), self._host.split(sizes))}
        self.device = {n: t.view(s) for (n, s), t in zip(shapes.items(), self._device.split(sizes))}
        # The last copy's event: the host views are not rewritten before it has read them.
        self._copied = torch.cuda.Event() if cuda else None

    def begin(self) -> dict[str, torch.Tensor]:
        """The host views, once the previous copy from them is done."""
        if self._copied is not None:
            self._copied.synchronize()
        return self.host

    def copy(self) -> None:
        self._device.copy_(self._host, non_blocking=True)
        if self._copied is not None:
            self._copied.record()


def padded_slots(caches: list[PagedKVCache], counts: list[int], total: int, scratch: int,
                 page_size: int) -> torch.Tensor:
    """Host [total]: each cache's counts[s] flat slots after its committed context, back to back (batch_slots
    from the host mirrors), then the padding rows' slots, cycling through the scratch page."""
    parts = [flat_slots(cache.pages, cache.length + torch.arange(count), page_size)
             for cache, count in zip(caches, counts)]
    parts.append(scratch * page_size + torch.arange(total - sum(counts)) % page_size)
    return torch.cat(parts)


class PaddedBatch:
    """The static inputs of one attention-pass bucket: `seqs` sequence slots, then the padding sequence, over
    `tokens` rows (module docstring)."""

    def __init__(self, seqs: int, tokens: int, pool: PagePool, scratch: int, device: torch.device):
        self.seqs, self.tokens, self.scratch, self.page_size = seqs, tokens, scratch, pool.page_size
        self.store = pool.store
        pages = max(pool.num_pages, -(-tokens // pool.page_size))  # the padding sequence's rows fit its table too
        self.inputs = StaticInts({"tokens": (tokens,), "positions": (tokens,), "slots": (tokens,),
                                  "tables": (seqs + 1, pages), "ctx_lens": (seqs + 1,), "cu_seqlens": (seqs + 2,),
                                  "masks": (tokens, mask_words(tokens))}, device)
        dev = self.inputs.device
        self.attention = BatchedAttention(dev["tables"], dev["ctx_lens"], dev["cu_seqlens"], dev["masks"])
        # Padding row j sees new token j only: each a sequence of one token, as far as its mask goes.
        self._own = packed_causal_mask(torch.ones(tokens, dtype=torch.long))

    def token_ids(self) -> torch.Tensor:
        return self.inputs.device["tokens"].long()

    def positions(self) -> torch.Tensor:
        return self.inputs.device["positions"].long()

    def layer_call(self) -> LayerCall:
        return pool_layer_call(self.store, self.inputs.device["slots"].long(), self.attention)

    def load(self, caches: list[PagedKVCache], tokens: torch.Tensor, positions: torch.Tensor,
             masks: list[torch.Tensor]) -> None:
        """The sequences' new tokens, positions (host, back to back) and packed masks, after each cache's
        committed context; no caches: a batch of padding only."""
        real, counts = tokens.numel(), [m.shape[0] for m in masks]
        host = self.inputs.begin()
        host["tokens"][:real], host["tokens"][real:] = tokens, 0
        host["positions"][:real], host["positions"][real:] = positions, 0
        host["slots"].copy_(padded_slots(caches, counts, self.tokens, self.scratch, self.page_size))
        host["tables"].zero_()
        for s, cache in enumerate(caches):
            host["tables"][s, : cache.pages.numel()] = cache.pages
        host["tables"][self.seqs] = self.scratch
        host["ctx_lens"].zero_()
        host["ctx_lens"][: len(caches)] = torch.tensor([c.length for c in caches], dtype=torch.int32)
        rows = counts + [0] * (self.seqs - len(caches)) + [self.tokens - real]
        host["cu_seqlens"][0] = 0
        host["cu_seqlens"][1:] = torch.tensor(rows).cumsum(0)
        host["masks"].zero_()
        start = 0
        for mask in masks:
            host["masks"][start : start + mask.shape[0], : mask.shape[1]] = mask
            start += mask.shape[0]
        host["masks"][real:] = self._own[: self.tokens - real]
        self.inputs.copy()


@dataclass(eq=False)
class BucketPass:
    """One bucket's fixed-shape pass: its static inputs, its outputs (static under a graph) and what runs it."""

    inputs: object  # PaddedBatch, or the context pass's (StaticInts, features buffer)
    out: dict[str, torch.Tensor]
    run: Callable[[], None]


class PaddedPasses:
    """The scheduler's passes in buckets (module docstring): replayed from CUDA graphs when `graphs` (each
    captured on its bucket's first use, or up front by `capture`), else the same padded passes run eagerly."""

    def __init__(self, target: TargetModel, draft: DraftHead | None, runtime: RuntimeConfig, target_pool: PagePool,
                 draft_pool: PagePool | None, max_batch: int, graphs: bool):
        self.target, self.draft, self.runtime = target, draft, runtime
        self.device = target.embed_tokens.weight.device
        self.graphs = graphs
        self.batch_buckets = doubling_up_to(max_batch)
        self.target_pool, self.draft_pool = target_pool, draft_pool
        # A page of each pool that no sequence owns: the padding rows' K/V land there (the pools have one more
        # page than SchedulerConfig.num_pages for it).
        self.target_scratch = int(target_pool.allocate(1).pages[0])
        self.draft_scratch = int(draft_pool.allocate(1).pages[0]) if draft_pool is not None else None
        # The target's features are captured whenever there is a draft (a fixed shape; AR-only steps drop them).
        self.capture_layers = tuple(runtime.target_layer_ids) if draft is not None else ()
        # A first draft pass after admission extends whole prompts: past this many rows it runs eagerly (a few
        # launches per draft layer, once per admission) instead of graphs of prompt-sized buckets.
        self.max_context_rows = token_bucket(max_batch * runtime.block_size)
        self._block_mask = causal_mask(runtime.block_size)
        self._graph_pool = torch.cuda.graph_pool_handle() if graphs else None
        self._verify: dict[tuple[int, int], BucketPass] = {}
        self._blocks: dict[int, BucketPass] = {}
        self._context: dict[int, BucketPass] = {}

    def batch_bucket(self, sequences: int) -> int:
        return self.batch_buckets[bisect.bisect_left(self.batch_buckets, sequences)]

    def _replayable(self, fn: Callable[[], None], load_padding: Callable[[], None]) -> Callable[[], None]:
        """`fn` as a graph (capture_graphs, on a batch of padding only) when graphs are on, else itself."""
        if not self.graphs:
            return fn
        load_padding()
        return capture_graphs({"pass": fn}, lambda: None, pool=self._graph_pool)["pass"]

    def capture(self, budget: int) -> None:
        """Capture (build, off CUDA) every bucket that trees of up to `budget` nodes can use, so that none is
        captured in a timed step (budget 1: AR steps, which never draft)."""
        drafts = self.draft is not None and budget > 1
        smallest = 1
        for seqs in self.batch_buckets:
            tokens = token_bucket(smallest)
            while tokens <= token_bucket(seqs * budget):
                self.verify_pass(seqs, tokens)
                tokens *= 2
            if drafts:
                self.blocks_pass(seqs)
            smallest = seqs + 1
        rows = 1
        while drafts and rows <= self.max_context_rows:
            self.context_pass(rows)
            rows *= 2

    # -- the target pass -----------------------------------------------------------------------------------------

    def _attention_pass(self, passes: dict, key, seqs: int, tokens: int, pool: PagePool, scratch: int,
                        body: Callable[[PaddedBatch, dict[str, torch.Tensor]], None]) -> BucketPass:
        """The bucket `key` of `passes`, made on first use: `body(batch, out)` over a PaddedBatch of the pool."""
        if key not in passes:
            batch = PaddedBatch(seqs, tokens, pool, scratch, self.device)
            out: dict[str, torch.Tensor] = {}
            none = torch.zeros(0, dtype=torch.long)
            run = self._replayable(lambda: body(batch, out), lambda: batch.load([], none, none, []))
            passes[key] = BucketPass(batch, out, run)
        return passes[key]

    def verify_pass(self, seqs: int, tokens: int) -> BucketPass:
        def body(batch: PaddedBatch, out: dict[str, torch.Tensor]) -> None:
            hidden, out["features"] = self.target.run_layers(batch.token_ids(), batch.positions(), batch.layer_call(),
                                                             self.capture_layers)
            out["logits"] = self.target.logits(hidden)

        return self._attention_pass(self._verify, (seqs, tokens), seqs, tokens, self.target_pool, self.target_scratch,
                                    body)

    def verify(self, caches: list[PagedKVCache], tokens: torch.Tensor, positions: torch.Tensor,
               masks: list[torch.Tensor], capture: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The target over the sequences' nodes (host tokens, positions, masks back to back) after each cache's
        context: logits [T, V] and (with `capture`) features, views valid until the next pass."""
        real = tokens.numel()
        bucket = self.verify_pass(self.batch_bucket(len(caches)), token_bucket(real))
        bucket.inputs.load(caches, tokens, positions, masks)
        bucket.run()
        features = bucket.out["features"]
        return bucket.out["logits"][:real], features[:real] if capture and features is not None else None

    # -- the draft pass ------------------------------------------------------------------------------------------

    def context_pass(self, rows: int) -> BucketPass:
        if rows not in self._context:
            draft = self.draft
            inputs = StaticInts({"positions": (rows,), "slots": (rows,)}, self.device)
            features = torch.zeros(rows, draft.fc.in_features, dtype=self.target.embed_tokens.weight.dtype,
                                   device=self.device)
            store = self.draft_pool.store

            def run() -> None:
                slots = inputs.device["slots"].long()
                for layer, (k, v) in enumerate(draft.context_key_values(features,
                                                                        inputs.device["positions"].long())):
                    write_kv(store.k[layer], store.v[layer], slots, k, v)

            run = self._replayable(run, lambda: self._load_context(inputs, [], []))
            self._context[rows] = BucketPass((inputs, features), {}, run)
        return self._context[rows]

    def _load_context(self, inputs: StaticInts, caches: list[PagedKVCache], counts: list[int]) -> None:
        host = inputs.begin()
        real = sum(counts)
        host["positions"][:real] = torch.cat([c.length + torch.arange(n) for c, n in zip(caches, counts)]
                                             or [torch.zeros(0, dtype=torch.long)])
        host["positions"][real:] = 0
        host["slots"].copy_(padded_slots(caches, counts, host["slots"].numel(), self.draft_scratch,
                                         self.draft_pool.page_size))
        inputs.copy()

    def extend_context(self, caches: list[PagedKVCache], features: list[torch.Tensor]) -> bool:
        """Write the K/V of each draft cache's new rows of `features` after its context (not committed); False
        (nothing done) above max_context_rows, for the caller's eager pass."""
        counts = [f.shape[0] for f in features]
        real = sum(counts)
        if real > self.max_context_rows:
            return False
        bucket = self.context_pass(token_bucket(real))
        inputs, buffer = bucket.inputs
        self._load_context(inputs, caches, counts)
        torch.cat(features, out=buffer[:real])  # padding rows keep earlier (finite) rows: their K/V are dropped
        bucket.run()
        return True

    def blocks_pass(self, seqs: int) -> BucketPass:
        block_size = self.runtime.block_size

        def body(batch: PaddedBatch, out: dict[str, torch.Tensor]) -> None:
            hidden = self.draft.run_layers(self.target.embed(batch.token_ids()), batch.positions(),
                                           batch.layer_call())
            out["logits"] = self.draft.depth_logits(hidden.view(seqs, block_size, -1)[:, 1:], self.target)

        return self._attention_pass(self._blocks, seqs, seqs, seqs * block_size, self.draft_pool, self.draft_scratch,
                                    body)

    def draft_blocks(self, caches: list[PagedKVCache], tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """The blocks [anchor, MASK x (block_size - 1)] (host tokens and positions, back to back) after each draft
        cache's context through the draft: the per-depth logits [S, block_size - 1, vocab], sequence s's at row s
        (a view valid until the next pass)."""
        bucket = self.blocks_pass(self.batch_bucket(len(caches)))
        bucket.inputs.load(caches, tokens, positions, [self._block_mask] * len(caches))
        bucket.run()
        return bucket.out["logits"][: len(caches)]
