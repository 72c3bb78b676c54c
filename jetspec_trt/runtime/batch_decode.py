"""Batched generation (greedy, or sampled at a temperature) with continuous batching: many prompts decoded
together, one CUDA graph per step.

The speculative decoder serves one stream; making training data (the target's own responses to thousands of
prompts) needs throughput instead. Here B rows decode side by side over a contiguous static KV cache
[num_layers, B, Hkv, S, D]. A step feeds each row's last token at its own position and emits each row's next
token; all of it reads and writes static device buffers (the row's token history, its length, its stop limit,
a done flag), so on CUDA the whole step is captured once and replayed. The layer body is the target's own
(`DecoderLayer.attention_inputs` / `finish`); only the KV write and the attention are batched here.

Every `refill_every` steps the host syncs once: rows that finished (EOS, their token limit, or the row's
capacity S) are read back and refilled with the next prompts, whose K/V come from one packed prefill
(`TargetModel.prefill_packed`) copied into their rows. Finished rows idle until the next sync.

With a temperature > 0 every token (the prefill's first one and each step's) is one draw from softmax(logits / T),
the runtime's one sampler (`tree.accept.choose_tokens`), from the decoder's own generator (seeded by the config;
registered with the step's graph, so every replay draws anew): the same prompts answered again with another seed
are new training text, where greedy answers repeat.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass
from typing import Callable, Iterator, NamedTuple

import torch
import torch.nn.functional as F

from jetspec_trt.models.target import TargetModel
from jetspec_trt.plugins.triton_batch_attention import batch_decode_attention, triton
from jetspec_trt.runtime.graph_decoder import capture_graphs
from jetspec_trt.tree.accept import choose_tokens

# SDPA's memory-efficient kernel wants the mask's last dimension aligned to 16 and pads a misaligned mask on
# every call; rounding the row's slot count up once avoids that copy inside the step.
SLOT_ALIGN = 16


CPU_PACK_TOKENS = 1024  # prefill pack cap on the CPU: dense fp32 scores of 14 heads take 59 MB


@dataclass(frozen=True)
class BatchDecodeConfig:
    max_batch: int = 64  # B: rows decoded together
    max_seq_len: int = 2048  # tokens a row holds, prompt + response; a row that fills up finishes ("length")
    refill_every: int = 16  # steps between host syncs (finished rows are read back and refilled there)
    # Tokens per packed prefill forward (a longer prompt goes alone); on the CPU at most CPU_PACK_TOKENS.
    prefill_tokens: int = 4096
    use_graphs: bool = True  # capture the step as one CUDA graph (CUDA only; eager elsewhere, same code)
    # Decode attention: "triton" walks each row's own keys (plugins/triton_batch_attention.py), "sdpa" reads all
    # S slots of every row under a mask; "auto" is triton on CUDA with Triton, sdpa elsewhere.
    attention: str = "auto"
    temperature: float = 0.0  # 0: greedy; > 0: every token drawn from softmax(logits / temperature)
    seed: int = 0  # the sampling generator's seed (unused when greedy)


class Finished(NamedTuple):
    index: int  # the prompt's index in the list given to generate
    response_ids: list[int]  # generated tokens, ending with the EOS that stopped the row, if one did
    finish: str  # "stop" (EOS) or "length" (max_new_tokens or the row's capacity)


class BatchDecoder:
    def __init__(self, target: TargetModel, config: BatchDecodeConfig):
        if config.max_batch < 1 or config.max_seq_len < 2 or config.refill_every < 1:
            raise ValueError(f"BatchDecodeConfig needs max_batch >= 1, max_seq_len >= 2, refill_every >= 1: {config}")
        if config.attention not in ("auto", "triton", "sdpa"):
            raise ValueError(f"BatchDecodeConfig.attention is auto, triton or sdpa, not {config.attention!r}")
        if not config.temperature >= 0:
            raise ValueError(f"BatchDecodeConfig.temperature must be >= 0, got {config.temperature}")
        self.target, self.config = target, config
        cfg = target.config
        param = target.embed_tokens.weight
        self.device = param.device
        triton_ok = self.device.type == "cuda" and triton is not None
        if config.attention == "triton" and not triton_ok:
            raise ValueError("BatchDecodeConfig.attention='triton' needs CUDA and Triton")
        self.triton_attention = triton_ok and config.attention != "sdpa"
        self.generator = torch.Generator(device=self.device).manual_seed(config.seed)
        rows, slots = config.max_batch, -(-config.max_seq_len // SLOT_ALIGN) * SLOT_ALIGN
        shape = (cfg.num_layers, rows, cfg.num_kv_heads, slots, cfg.head_dim)
        self.k = torch.zeros(shape, dtype=param.dtype, device=self.device)
        self.v = torch.zeros(shape, dtype=param.dtype, device=self.device)
        # Per-row state, all on the device so the graphed step reads it. history[r, :length[r]] is the row's
        # prompt + response; its last token is the next step's input, at position length - 1 (the cache holds
        # the K/V of the positions before it). A row stops at `limit` tokens or after an EOS (`done`).
        self.history = torch.zeros(rows, slots, dtype=torch.long, device=self.device)
        self.length = torch.ones(rows, dtype=torch.long, device=self.device)
        self.limit = torch.ones(rows, dtype=torch.long, device=self.device)
        self.done = torch.ones(rows, dtype=torch.bool, device=self.device)  # idle rows count as done
        self.is_eos = torch.zeros(cfg.vocab_size, dtype=torch.bool, device=self.device)  # any number of EOS ids
        self._rows = torch.arange(rows, device=self.device)
        self._slots = torch.arange(slots, device=self.device)
        # Packing prompts pays where a prefill forward is launch-bound (CUDA). On the CPU the reference attention
        # scores a pack densely, [heads, T, T] in fp32: a 16 K-token pack is 15 GB at 14 heads, which killed a
        # 24 GB machine; packs stay small there.
        self.pack_tokens = config.prefill_tokens if self.device.type == "cuda" else min(config.prefill_tokens,
                                                                                        CPU_PACK_TOKENS)
        self._prefill_cache = target.new_cache(max(self.pack_tokens, config.max_seq_len))
        # For throughput reports: decode steps run (each emits up to B tokens), prompt tokens prefilled and the
        # wall time of those prefills (synchronised, so it is theirs and not the steps queued before them).
        self.steps = 0
        self.prefill_tokens = 0
        self.prefill_s = 0.0
        self.prefill_packs = 0  # packed prefill forwards (at most pack_tokens tokens each)
        self._step = self._make_step()

    # ---- the step (fixed shapes, no host sync) ------------------------------------------------------------
    def _step_eager(self) -> None:
        target, attn = self.target, self.target.layers[0].self_attn
        rows, group = self._rows.numel(), attn.num_heads // attn.num_kv_heads
        with torch.no_grad():
            pos = self.length - 1
            x = target.embed(self.history[self._rows, pos])
            cos, sin = target.rotary.cos_sin(pos, x.dtype)
            if not self.triton_attention:
                # One additive mask for all layers: slot s of row r is visible iff s <= pos[r].
                visible = self._slots[None, :] <= pos[:, None]
                bias = torch.zeros(visible.shape, dtype=x.dtype, device=x.device).masked_fill_(~visible,
                                                                                               float("-inf"))
                bias = bias[:, None, None, :]  # [B, 1, 1, S]
            for i, layer in enumerate(target.layers):
                q, k, v = layer.attention_inputs(x, cos, sin)
                # index_put on the [B, S, Hkv, D] view: row r's K/V land at slot pos[r] (capturable, no sync).
                self.k[i].transpose(1, 2).index_put_((self._rows, pos), k.to(self.k.dtype))
                self.v[i].transpose(1, 2).index_put_((self._rows, pos), v.to(self.v.dtype))
                if self.triton_attention:
                    o = batch_decode_attention(q.contiguous(), self.k[i], self.v[i], pos, attn.scale)
                else:
                    # GQA without copying K/V: the query heads of one KV head are that head's `group` query rows.
                    o = F.scaled_dot_product_attention(q.view(rows, attn.num_kv_heads, group, attn.head_dim),
                                                       self.k[i], self.v[i], attn_mask=bias, scale=attn.scale)
                x = layer.finish(x, o.reshape(rows, attn.num_heads, attn.head_dim))
            token = self._choose(target.lm_head(target.norm(x)))
            active = ~self.done
            # Done rows keep their history: they rewrite the token already there (the index stays in bounds).
            at = self.length.clamp(max=self._slots.numel() - 1)
            self.history.index_put_((self._rows, at), torch.where(active, token, self.history[self._rows, at]))
            self.length += active.long()
            self.done |= self.is_eos[token] | (self.length >= self.limit)

    def _make_step(self) -> Callable[[], None]:
        if not (self.config.use_graphs and self.device.type == "cuda"):
            return self._step_eager
        # Captured while every row is idle (done); the warm-up then only writes dead rows' K/V, and the restore
        # puts back the per-row state anyway.
        saved = [t.clone() for t in (self.history, self.length, self.done)]

        def restore() -> None:
            for live, copy in zip((self.history, self.length, self.done), saved):
                live.copy_(copy)

        # The generator's state is the graph's to advance (a replay would otherwise repeat the capture's draws);
        # the warm-up's draws are not undone, which only moves the seed's stream along.
        return capture_graphs({"step": self._step_eager}, restore,
                              self.generator if self.config.temperature > 0 else None)["step"]

    def _choose(self, logits: torch.Tensor) -> torch.Tensor:
        """Each row's next token: its argmax, or a draw at the config's temperature."""
        if self.config.temperature == 0:
            return logits.argmax(-1)
        return choose_tokens(logits, "sample", self.config.temperature, generator=self.generator)

    def step(self) -> None:
        """One decode step of every row (graphed on CUDA)."""
        self._step()
        self.steps += 1

    # ---- admission ----------------------------------------------------------------------------------------
    def _admit(self, admitted: list[tuple[int, list[int]]], max_new_tokens: int) -> None:
        """Prefill prompts into free rows, (row, prompt) pairs, in packs of up to prefill_tokens tokens."""
        self._sync()
        began = time.perf_counter()
        start = 0
        while start < len(admitted):
            end, used = start, 0
            while end < len(admitted) and (end == start or used + len(admitted[end][1]) <= self.pack_tokens):
                used += len(admitted[end][1])
                end += 1
            self._prefill(admitted[start:end], max_new_tokens)
            self.prefill_packs += 1
            start = end
        self._sync()
        self.prefill_s += time.perf_counter() - began
        self.prefill_tokens += sum(len(p) for _, p in admitted)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @torch.no_grad()
    def _prefill(self, pack: list[tuple[int, list[int]]], max_new_tokens: int) -> None:
        target, cache, device = self.target, self._prefill_cache, self.device
        prompts = [p for _, p in pack]
        hidden, _ = target.prefill_packed(prompts, cache)
        lengths = torch.tensor([len(p) for p in prompts], device=device)
        first = self._choose(target.lm_head(hidden[torch.cumsum(lengths, 0) - 1]))  # each prompt's first token
        # The packed K/V stay in the scratch cache's tensors (prefill_packed only resets its length): token j of
        # the pack sits at flat slot j. Scatter them to (row, position) of the batch cache in one index_put.
        rows = torch.tensor([r for r, _ in pack], device=device)
        token_rows = torch.repeat_interleave(rows, lengths)
        positions = torch.cat([torch.arange(len(p), device=device) for p in prompts])
        total = int(positions.numel())
        for packed, batched in ((cache.k_all, self.k), (cache.v_all, self.v)):
            src = packed.view(packed.shape[0], -1, *packed.shape[3:])[:, :total]  # [L, T, Hkv, D]
            batched.permute(1, 3, 0, 2, 4).index_put_((token_rows, positions), src.transpose(0, 1))
        self.history.index_put_((token_rows, positions), torch.tensor([t for p in prompts for t in p], device=device))
        self.history.index_put_((rows, lengths), first)
        self.length[rows] = lengths + 1
        self.limit[rows] = (lengths + max_new_tokens).clamp(max=self.config.max_seq_len)
        self.done[rows] = self.is_eos[first] | (self.length[rows] >= self.limit[rows])

    # ---- continuous batching ------------------------------------------------------------------------------
    def generate(self, prompts: list[list[int]], max_new_tokens: int, eos_ids: list[int] | tuple[int, ...],
                 deadline_s: float | None = None) -> Iterator[Finished]:
        """Responses to `prompts` (greedy, or sampled: BatchDecodeConfig.temperature), yielded as rows finish (not
        in prompt order).

        Every prompt needs 1 <= len < max_seq_len. `deadline_s`: seconds after which no more prompts are admitted;
        rows already decoding still finish, and prompts never admitted are not yielded.
        """
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        bad = [i for i, p in enumerate(prompts) if not 1 <= len(p) < self.config.max_seq_len]
        if bad:
            raise ValueError(f"prompt {bad[0]} has {len(prompts[bad[0]])} tokens; rows take 1 .. "
                             f"{self.config.max_seq_len - 1}")
        eos = set(int(e) for e in eos_ids)
        self.is_eos.zero_()
        if eos:
            self.is_eos[torch.tensor(sorted(eos), device=self.device)] = True
        self.done.fill_(True)
        stop_at = None if deadline_s is None else time.perf_counter() + deadline_s
        queue = deque(range(len(prompts)))
        owner: list[int | None] = [None] * self.config.max_batch  # prompt index of each row
        while True:
            busy = [r for r, i in enumerate(owner) if i is not None]
            if busy:  # the one host sync per refill_every steps
                done, length = self.done.cpu(), self.length.cpu()
                finished = [r for r in busy if done[r]]
                if finished:
                    history = self.history[torch.tensor(finished, device=self.device)].cpu()
                    for row, tokens in zip(finished, history):
                        index = owner[row]
                        response = tokens[len(prompts[index]) : int(length[row])].tolist()
                        owner[row] = None
                        yield Finished(index, response, "stop" if response and response[-1] in eos else "length")
            free = [r for r, i in enumerate(owner) if i is None]
            if queue and free and (stop_at is None or time.perf_counter() < stop_at):
                admitted = []
                for row in free[: len(queue)]:
                    owner[row] = queue.popleft()
                    admitted.append((row, prompts[owner[row]]))
                self._admit(admitted, max_new_tokens)
            if all(i is None for i in owner):
                return
            for _ in range(self.config.refill_every):
                self.step()
