"""In-flight batching: requests join and leave between rounds, and every step runs ONE batched round for all
running sequences, each with its own tree (or none), its own sampling and limits.

How a step relates to the single-request path. A running sequence is the eager `Decoder` (runtime/decoder.py)
decoding in caches over pages of two shared pools: its prefill, its tree, its acceptance and its commit are the
Decoder's own (HostRounds.prefill, round_inputs, round_result). What the batch shares are the two model passes
that HostRounds.decode_round makes for one sequence between those halves:

    1. admission   waiting requests whose pages fit are given them and prefilled (HostRounds.prefill, one
                   forward each); they take part in this step's round
    2. draft       ONE draft pass over every speculative sequence's block [anchor, MASK ...]
    3. trees       per sequence, HostRounds.round_inputs: its best-first tree (tree.tree.build_tree), or its
                   anchor alone for an AR step (a sequence of budget 1 or not speculative)
    4. verify      ONE target pass over all sequences' nodes concatenated
    5. accept      per sequence, HostRounds.round_result: the one acceptance rule (tree.accept.accept) with the
                   sequence's own generator, and the commit of its path in its own pages
    6. bookkeeping the round loop's TokenLimit and DecodeStats per sequence (EOS, token limit, tau); finished
                   sequences leave and their pages go back to the pools at once

Budget policy (SchedulerConfig.budget_policy). "fixed": every round verifies each request's own tree.
"cost_model": each step one per-sequence budget, at most each request's own, for the most expected tokens per
second under the engine's measured pass times (runtime/cost_model.py); the trees are cut to it (cost_model.cut_tree:
the draft's best-first nodes, plus a lookup chain's first tokens in at most half of a smaller budget), budget 1
an AR step. Where the sequences' last trees already predict budget 1, the draft
pass is skipped (each sequence's new context waits in its pending features for the next one), and it runs again
to refresh them once the steps since have cost the draft pass over REFRESH_SHARE. The acceptance rule is the
same, so greedy tokens, and a seeded request's sampled tokens (one target draw per emitted token, tree.accept),
are those of the fixed policy.

In both passes the GEMMs see every sequence's tokens at once, and so do the KV write and the batched attention op
(plugins/tree_attention.py), which gives each sequence what the batch-1 op gives it with its own block table,
ctx_len and tree mask (`batched_layer_call`). A sequence's tokens are therefore its single-request tokens: the
same tree, the same draws from the same per-request generator in the same order, on logits equal up to GEMM
rounding.

Graph passes (SchedulerConfig.graph_passes, on by default on CUDA). The two passes run at bucketed fixed shapes
over static buffers (runtime/batch_passes.py), each bucket a CUDA graph captured on first use (or up front:
`prepare_passes`): the target pass per (batch bucket, token bucket), the sequences padded to 1, 2, 4, ...
max_batch and their nodes to the next power of two; the draft's blocks per batch bucket, its context extension
per token bucket. Padding rows write their K/V to a scratch page of each pool that no sequence owns, see only
themselves, and their outputs are dropped. The per-sequence host work (trees, acceptance, commits) is unchanged.

The round loop (`run_rounds`) is a generator per request that calls decode_round whole, so it cannot interleave
requests; the scheduler does its few lines of per-round bookkeeping itself, through the same TokenLimit and
DecodeStats.count_round.

Pages are reserved at admission for the request's whole life (prompt + max_new_tokens + one tree or draft
block): a running sequence never waits for memory, so nothing is ever preempted; a request that does not fit
now waits in the queue (first come, first served), and one that could never fit is refused when added.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import time
from collections import Counter, deque
from dataclasses import dataclass

import torch

from jetspec_trt.devices import sync
from jetspec_trt.errors import JetSpecError
from jetspec_trt.models.draft import DraftHead
from jetspec_trt.models.kv_cache import PagedKVCache, PagePool, batch_slots
from jetspec_trt.models.target import TargetModel
from jetspec_trt.plugins.tree_attention import causal_mask, load_gpu_kernels
from jetspec_trt.runtime.backend import DecodeRequest, RoundResult
from jetspec_trt.runtime.batch_passes import PaddedPasses, batched_layer_call
from jetspec_trt.runtime.config import RuntimeConfig, TreeConfig
from jetspec_trt.runtime.cost_model import BudgetChooser, CostModel, cut_tree, doubling_up_to, round_curves
from jetspec_trt.runtime.decoder import Decoder
from jetspec_trt.runtime.host_rounds import RoundInputs
from jetspec_trt.runtime.round_loop import DecodeStats, TokenLimit, new_request
from jetspec_trt.tree.accept import SamplingConfig
from jetspec_trt.tree.tree import DraftTree

BUDGET_POLICIES = ("fixed", "cost_model")
# cost_model policy: while the model says AR, the draft pass is skipped on the sequences' last predictions. It
# runs again to refresh them (a sequence may turn easy) once the steps since the last draft cost what a draft
# pass costs over this share: at most this share of the time goes to drafts that the model expected not to pay.
# (On the CPU a draft pass costs about a target pass per sequence: refreshing every few steps would cost more
# than any tree could win back there.)
REFRESH_SHARE = 0.05


@dataclass(frozen=True)
class SchedulerConfig:
    num_pages: int = 64  # pages in each pool (target K/V; draft K/V with a draft head), runtime.page_size slots each
    max_batch: int = 8  # sequences decoding together; further requests wait in the queue
    # "fixed": every round verifies each request's own tree. "cost_model": each step one per-sequence budget
    # (at most the request's own) chosen for the most expected tokens per second (cost_model.BudgetChooser).
    budget_policy: str = "fixed"
    # The two batched passes at bucketed fixed shapes (runtime/batch_passes.py), replayed from CUDA graphs on
    # CUDA: eager, each pass launches hundreds of small kernels (24 layers at the 0.5B shape). None: on CUDA
    # only (on the CPU the padding costs and no launch is saved; True there runs the padded passes eagerly).
    graph_passes: bool | None = None

    @classmethod
    def full_batch(cls, runtime: RuntimeConfig, max_batch: int, budget_policy: str = "fixed",
                   graph_passes: bool | None = None) -> "SchedulerConfig":
        """Pages for `max_batch` requests of the engine's longest (max_seq_len and one tree beyond): any
        admissible request fits, and a full batch never waits for pages."""
        return cls(max_batch * math.ceil(runtime.cache_tokens() / runtime.page_size), max_batch, budget_policy,
                   graph_passes)

    def validate(self) -> None:
        if self.num_pages < 1 or self.max_batch < 1:
            raise JetSpecError(f"SchedulerConfig needs num_pages >= 1 and max_batch >= 1, got {self}")
        if self.budget_policy not in BUDGET_POLICIES:
            raise JetSpecError(f"budget_policy must be one of {', '.join(BUDGET_POLICIES)}, got {self.budget_policy!r}")


@dataclass
class StepOutput:
    """What one request did in one step (streaming)."""

    request_id: int
    tokens: list[int]  # emitted this step, cut at EOS / the limit (on admission the prefill's token comes first)
    finished: bool
    stats: DecodeStats  # the request so far; finish_reason "stop", "length" or "cancelled" once it is over


class SequenceDecoder(Decoder):
    """The eager Decoder of one sequence, with the model calls of its rounds left to the scheduler's batched
    passes: it hands out what the draft pass needs and takes the features the target pass captured for it."""

    _pending: tuple[torch.Tensor, torch.Tensor] | None = None  # (an AR request's prefill sets none)

    @property
    def anchor(self) -> int:
        return self._anchor

    @property
    def length(self) -> int:
        return self._length  # committed tokens: the anchor's position

    def take_pending(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The captured features (and positions) of tokens committed since the last draft pass."""
        pending, self._pending = self._pending, None
        return pending

    def _commit(self, path: list[int], position: int) -> None:
        """Decoder._commit, keeping the features of earlier rounds whose draft pass was skipped (AR steps
        of a speculative sequence): the next draft pass needs the context of every committed token."""
        earlier = self._pending
        super()._commit(path, position)
        if earlier is not None and self._capture:
            self._pending = tuple(torch.cat(parts) for parts in zip(earlier, self._pending))

    def set_verified(self, features: torch.Tensor | None) -> None:
        """The target pass's captured features of this sequence's nodes (what Decoder._verify keeps for _commit)."""
        self._features = features


@dataclass
class Sequence:
    request_id: int
    request: DecodeRequest
    limit: TokenLimit
    stats: DecodeStats
    slots: int  # KV slots reserved in each pool it uses
    decoder: SequenceDecoder | None = None  # set on admission
    # cost_model policy: its last draft's curves per budget (cost_model.round_curves), and that step
    curve: list[float] | None = None
    chain_curve: list[int] | None = None
    drafted_at: int = 0


class Scheduler:
    """Requests in, tokens out, a batched round per step:

        scheduler = Scheduler(target, draft, runtime, SchedulerConfig(num_pages=256, max_batch=16))
        rid = scheduler.add_request(prompt_ids, 64, SamplingConfig(0.7, seed=1))   # at any time
        while not scheduler.idle:
            for out in scheduler.step():   # out.tokens: this step's tokens of request out.request_id
                ...
    """

    def __init__(self, target: TargetModel, draft: DraftHead | None, runtime: RuntimeConfig,
                 config: SchedulerConfig = SchedulerConfig(), cost_model: CostModel | None = None):
        config.validate()
        if config.budget_policy == "cost_model" and cost_model is None:
            raise JetSpecError("budget_policy 'cost_model' needs a cost model (Engine.new_scheduler passes the "
                               "engine's)")
        self.chooser = BudgetChooser(cost_model) if config.budget_policy == "cost_model" else None
        self.budget_steps: Counter[int] = Counter()  # cost_model policy: steps with speculative sequences, per budget
        self._steps = 0
        self.target, self.draft, self.runtime, self.config = target, draft, runtime, config
        self.device = target.embed_tokens.weight.device
        fixed_shapes = config.graph_passes if config.graph_passes is not None else self.device.type == "cuda"
        # The padded passes take a scratch page of each pool for their padding rows: one page more than asked.
        pool_tokens = (config.num_pages + fixed_shapes) * runtime.page_size
        self.target_pool = PagePool(target.new_cache(pool_tokens, runtime.page_size))
        self.draft_pool = PagePool(draft.new_cache(pool_tokens, runtime.page_size)) if draft is not None else None
        # Graphs only where the batched op has its Triton kernel: the reference reads cu_seqlens on the host.
        graphs = fixed_shapes and self.device.type == "cuda" and load_gpu_kernels()
        self.padded = (PaddedPasses(target, draft, runtime, self.target_pool, self.draft_pool, config.max_batch,
                                    graphs) if fixed_shapes else None)  # None: the eager passes
        self._block_mask = causal_mask(runtime.block_size, self.device)
        self.waiting: deque[Sequence] = deque()
        self.running: dict[int, Sequence] = {}  # admission order
        self._next_id = 0

    @property
    def idle(self) -> bool:
        return not self.waiting and not self.running

    @torch.inference_mode()
    def prepare_passes(self, budget: int) -> None:
        """Capture now (build, off CUDA) every bucket of the padded passes that trees of up to `budget` nodes can
        use, so that a timed step captures none (unless a request brings a larger tree); nothing to do on the
        eager passes."""
        if self.padded is not None:
            self.padded.capture(budget)

    def add_request(self, prompt_ids: list[int], max_new_tokens: int, sampling: SamplingConfig = SamplingConfig(),
                    speculative: bool = True, tree: TreeConfig | None = None, logprobs: bool = False) -> int:
        """Queue a request; returns its id. A bad request raises JetSpecError here, before anything runs."""
        request, max_new_tokens = new_request(self.runtime, self.target.config.vocab_size, prompt_ids,
                                              max_new_tokens, sampling, speculative, tree, logprobs)
        if request.speculative:
            if self.draft is None:
                raise JetSpecError("speculative decoding needs a draft head")
            request.tree.validate(self.runtime.block_size)
        # The committed context reaches prompt + max_new - 1 tokens at most before the last round, which writes
        # one tree (or, in the draft cache, one block) after it.
        beyond = max(request.tree.budget, self.runtime.block_size) if request.speculative else 1
        slots = len(prompt_ids) + max_new_tokens + beyond
        if self.target_pool.pages_for(slots) > self.config.num_pages:
            raise JetSpecError(f"request needs {self.target_pool.pages_for(slots)} KV pages; the pool has "
                               f"{self.config.num_pages}")
        stats = DecodeStats(prompt_tokens=len(prompt_ids))
        sequence = Sequence(self._next_id, request, TokenLimit(max_new_tokens, self.runtime.eos_token_ids, stats),
                            stats, slots)
        self._next_id += 1
        self.waiting.append(sequence)
        return sequence.request_id

    def cancel(self, request_id: int) -> bool:
        """Drop a waiting or running request (its pages return at once); False if it is not here."""
        for sequence in self.waiting:
            if sequence.request_id == request_id:
                self.waiting.remove(sequence)
                sequence.stats.finish_reason = "cancelled"
                return True
        sequence = self.running.get(request_id)
        if sequence is None:
            return False
        sequence.stats.finish_reason = "cancelled"
        self._leave(sequence)
        return True

    @torch.inference_mode()
    def step(self) -> list[StepOutput]:
        """Admit what fits, then one batched round of every running sequence. Returns, per request that ran,
        its tokens of this step and whether it finished (finished requests are gone from the scheduler)."""
        outputs: dict[int, StepOutput] = {}
        self._admit(outputs)
        sequences = list(self.running.values())
        if sequences:
            start = time.perf_counter()
            results = self._round(sequences)
            elapsed = time.perf_counter() - start
            for sequence, result in zip(sequences, results):
                sequence.stats.decode_s += elapsed  # the batch's round: each request waited for all of it
                sequence.stats.count_round(result)
                self._take(sequence, result.emitted, outputs)
        return list(outputs.values())

    # -- admission and leaving -----------------------------------------------------------------------------------

    def _admit(self, outputs: dict[int, StepOutput]) -> None:
        """Prefill waiting requests, first come first served, while the batch and the pools have room."""
        while self.waiting and len(self.running) < self.config.max_batch:
            sequence = self.waiting[0]
            caches = self._allocate(sequence)
            if caches is None:
                break  # the head waits for pages; later requests wait behind it (no overtaking)
            self.waiting.popleft()
            sequence.decoder = decoder = SequenceDecoder(self.target, self.draft, self.runtime, caches)
            decoder.stats = sequence.stats
            self.running[sequence.request_id] = sequence
            start = time.perf_counter()
            first = decoder.prefill(sequence.request)
            sequence.stats.prefill_s = time.perf_counter() - start
            self._take(sequence, [first], outputs)  # its first token may end it: its pages are free again now

    def _allocate(self, sequence: Sequence) -> tuple[PagedKVCache, PagedKVCache | None] | None:
        target = self.target_pool.allocate(sequence.slots)
        if target is None or not sequence.request.speculative:
            return None if target is None else (target, None)
        draft = self.draft_pool.allocate(sequence.slots)
        if draft is None:
            self.target_pool.release(target)
            return None
        return target, draft

    def _leave(self, sequence: Sequence) -> None:
        del self.running[sequence.request_id]
        decoder = sequence.decoder
        self.target_pool.release(decoder.target_cache)
        if decoder.draft_cache is not None:
            self.draft_pool.release(decoder.draft_cache)

    def _take(self, sequence: Sequence, tokens: list[int], outputs: dict[int, StepOutput]) -> None:
        """Add `tokens`, cut at EOS / the limit, to the request's output of this step; a finished sequence
        leaves (its pages return now)."""
        tokens, done = sequence.limit.take(tokens)
        if sequence.request.logprobs:
            sequence.stats.token_logprobs.extend(sequence.decoder.logprobs[: len(tokens)])
        out = outputs.setdefault(sequence.request_id, StepOutput(sequence.request_id, [], False, sequence.stats))
        out.tokens.extend(tokens)
        if done:
            out.finished = True
            self._leave(sequence)

    # -- the batched round ---------------------------------------------------------------------------------------

    def _round(self, sequences: list[Sequence]) -> list:
        self._steps += 1
        speculative = [s for s in sequences if s.request.speculative]
        drafting = speculative if self._worth_drafting(speculative, len(sequences) - len(speculative)) else []
        parts = {s.request_id: s.decoder.draft_parts(logits) for s, logits in zip(drafting, self._draft_pass(drafting))}
        budget = self._choose_budget(drafting, parts, len(sequences) - len(drafting))
        if budget is not None and speculative:
            self.budget_steps[budget] += 1
        # each sequence's tree at this budget and how many of its nodes are the draft's (None, 0: an AR step)
        cuts = [cut_tree(*parts[s.request_id], s.request.tree, budget) if s.request_id in parts else (None, 0)
                for s in sequences]
        inputs = [s.decoder.tree_inputs(tree) for s, (tree, _) in zip(sequences, cuts)]
        logits, features = self._verify_pass(sequences, inputs, capture=bool(speculative))
        counts = [i.tokens.numel() for i in inputs]
        features_of = features.split(counts) if features is not None else [None] * len(sequences)
        results = []
        for sequence, step_inputs, (tree, draft_nodes), seq_logits, seq_features in zip(
                sequences, inputs, cuts, logits.split(counts), features_of):
            sequence.decoder.set_verified(seq_features)
            results.append(result := sequence.decoder.round_result(step_inputs, seq_logits))
            if self.chooser is not None and tree is not None:
                self._observe(sequence, tree, draft_nodes, budget, result)
        return results

    def _observe(self, sequence: Sequence, tree: DraftTree, draft_nodes: int, budget: int | None,
                 result: RoundResult) -> None:
        """Calibrate the chooser on a verified tree: its draft nodes' prediction against the accepted ones, and
        its lookup chain's own nodes (index >= draft_nodes: with_chain puts them after the draft's) offered and
        accepted."""
        point = len(sequence.curve) if budget is None else min(budget, len(sequence.curve))
        node, from_chain = 0, 0
        for token in result.emitted[: result.accepted]:  # the accepted path, walked by token as accept walks it
            node = tree.children[node][token]
            from_chain += node >= draft_nodes
        offered = sequence.chain_curve[point - 1] if sequence.chain_curve else 0
        self.chooser.observe(sequence.curve[point - 1], result.accepted - from_chain, offered, from_chain)

    # -- the cost_model budget policy ----------------------------------------------------------------------------

    def _worth_drafting(self, speculative: list[Sequence], others: int) -> bool:
        """Whether this step's draft pass runs: always under the fixed policy; under the cost model unless the
        sequences' last predictions say budget 1 even before paying for the draft (a sequence without a recent
        prediction drafts: it has to be measured)."""
        if self.chooser is None or not speculative:
            return bool(speculative)
        if any(s.curve is None for s in speculative):
            return True
        costs, since = self.chooser.costs, self._steps - min(s.drafted_at for s in speculative)
        if since * REFRESH_SHARE * costs.verify_cost(len(speculative) + others) >= costs.draft_cost(len(speculative)):
            return True
        return self.chooser.choose([s.curve for s in speculative], others, drafted=False,
                                   chains=[s.chain_curve for s in speculative]) > 1

    def _choose_budget(self, drafting: list[Sequence], parts: dict[int, tuple[DraftTree, list[int]]],
                       others: int) -> int | None:
        """The per-sequence budget of this step (None: each request's own tree, the fixed policy)."""
        if self.chooser is None:
            return None
        budget = 1
        if drafting:
            for sequence in drafting:
                sequence.curve, sequence.chain_curve = round_curves(*parts[sequence.request_id], sequence.request.tree)
                sequence.drafted_at = self._steps
            budget = self.chooser.choose([s.curve for s in drafting], others, drafted=True,
                                         chains=[s.chain_curve for s in drafting])
        return budget

    # -- the two batched passes ----------------------------------------------------------------------------------

    def _verify_pass(self, sequences: list[Sequence], inputs: list[RoundInputs],
                     capture: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """ONE target pass over every sequence's nodes: logits [T, V] and (with `capture`) the draft's features."""
        caches = [s.decoder.target_cache for s in sequences]
        tokens, positions = torch.cat([i.tokens for i in inputs]), torch.cat([i.positions for i in inputs])
        if self.padded is not None:
            return self.padded.verify(caches, tokens, positions, [i.mask for i in inputs], capture)
        segments = [(cache, i.mask.to(self.device)) for cache, i in zip(caches, inputs)]
        hidden, features = self.target.run_layers(tokens.to(self.device), positions.to(self.device),
                                                  batched_layer_call(segments),
                                                  tuple(self.runtime.target_layer_ids) if capture else ())
        return self.target.logits(hidden), features

    def _draft_pass(self, sequences: list[Sequence]) -> list[torch.Tensor]:
        """Per speculative sequence, the draft's per-depth logits [tree.draft_depth, vocab] at its anchor
        (Decoder._draft_logits for all of them in one pass)."""
        if not sequences:
            return []
        self._extend_draft_contexts([s.decoder for s in sequences])
        return self._draft_blocks(sequences)

    def _extend_draft_contexts(self, decoders: list[SequenceDecoder]) -> None:
        """The features each sequence committed since its last pass, projected to K/V in one pass."""
        caches = [d.draft_cache for d in decoders]
        pending = [d.take_pending() for d in decoders]
        counts = [f.shape[0] for f, _ in pending]
        if self.padded is None or not self.padded.extend_context(caches, [f for f, _ in pending]):
            slots = batch_slots(caches, counts)
            kv = self.draft.context_key_values(torch.cat([f for f, _ in pending]), torch.cat([p for _, p in pending]))
            for layer, (k, v) in enumerate(kv):
                caches[0].write(layer, slots, k, v)  # every sequence's rows: the caches share the draft pool's tensors
        for cache, n in zip(caches, counts):
            cache.set_length(cache.length + n)

    def _draft_blocks(self, sequences: list[Sequence]) -> list[torch.Tensor]:
        """The blocks [anchor, MASK x (block_size - 1)] at each anchor's position, back to back, through the
        draft, and the per-depth logits of each."""
        decoders = [s.decoder for s in sequences]
        caches, block_size = [d.draft_cache for d in decoders], self.runtime.block_size
        blocks = torch.full((len(decoders), block_size), self.runtime.mask_token_id)
        blocks[:, 0] = torch.tensor([d.anchor for d in decoders])
        positions = torch.cat([d.length + torch.arange(block_size) for d in decoders])
        if self.padded is not None:
            logits = self.padded.draft_blocks(caches, blocks.flatten(), positions)
            return [logits[j, : s.request.tree.draft_depth] for j, s in enumerate(sequences)]
        hidden = self.draft.run_layers(self.target.embed(blocks.flatten().to(self.device)),
                                       positions.to(self.device),
                                       batched_layer_call([(cache, self._block_mask) for cache in caches]))
        hidden = hidden.view(len(decoders), block_size, -1)
        return [self.draft.depth_logits(hidden[j, 1 : 1 + s.request.tree.draft_depth], self.target)
                for j, s in enumerate(sequences)]


@torch.inference_mode()
def measure_cost_model(target: TargetModel, draft: DraftHead, runtime: RuntimeConfig, max_batch: int = 8,
                       max_tokens: int = 512, context: int = 64, reps: int = 3) -> CostModel:
    """Time the scheduler's own two passes where the models are: the target pass over 1, 2, 4, ... max_tokens
    new tokens (at most max_batch trees of the runtime's budget), spread over up to max_batch sequences of
    `context` committed tokens, and the draft pass for 1, 2, 4, ... max_batch sequences; the median of `reps`
    after a warm-up each. (The draft's context projection of newly committed tokens is left out: a few tokens
    per sequence, paid whatever the budget.)"""
    tree = dataclasses.replace(runtime.tree, budget=max(2, runtime.tree.budget))  # one that drafts
    runtime = dataclasses.replace(runtime, tree=tree, eos_token_ids=())  # no timed sequence may end early
    context = max(1, min(context, runtime.max_seq_len - 2))
    pages = math.ceil((context + 2 + max(tree.budget, runtime.block_size)) / runtime.page_size)
    scheduler = Scheduler(target, draft, runtime, SchedulerConfig(max_batch * pages, max_batch))
    for _ in range(max_batch):
        scheduler.add_request([i % target.config.vocab_size for i in range(context)], 2)
    scheduler._admit({})
    sequences = list(scheduler.running.values())
    scheduler._extend_draft_contexts([s.decoder for s in sequences])

    def seconds(run) -> float:
        times = []
        for _ in range(reps + 1):
            sync(scheduler.device)
            start = time.perf_counter()
            run()
            sync(scheduler.device)
            times.append(time.perf_counter() - start)
        return statistics.median(times[1:])

    def verify_pass(tokens: int):
        n = min(tokens, max_batch)
        counts = [tokens // n + (i < tokens % n) for i in range(n)]
        inputs = [RoundInputs(None, torch.full((c,), s.decoder.anchor), s.decoder.length + torch.arange(c),
                              causal_mask(c)) for s, c in zip(sequences, counts)]
        return lambda: scheduler._verify_pass(sequences[:n], inputs, capture=True)

    verify = {t: seconds(verify_pass(t)) for t in doubling_up_to(min(max_tokens, max_batch * tree.budget))}
    draft_s = {n: seconds(lambda: scheduler._draft_blocks(sequences[:n])) for n in doubling_up_to(max_batch)}
    return CostModel.measured(scheduler.device, target.embed_tokens.weight.dtype, context, verify, draft_s)
