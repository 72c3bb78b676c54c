"""Paged KV cache for one sequence (batch 1), shared by prefill, decode, tree verify and the draft head; and
`PagePool`, which hands one cache's pages out to many sequences.

Every layer owns K and V tensors of shape [num_pages, page_size, num_kv_heads, head_dim]. The block table maps
the sequence's logical pages to physical ones. With one stream the table is the identity, but the kernels and
the compaction go through it, so a multi-sequence scheduler can hand out pages without touching them.
The cache lives with the models because their forwards write and read this layout; the runtime
gets its caches from `TargetModel.new_cache` / `DraftHead.new_cache`.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch

from jetspec_trt.plugins import paged_slots
from jetspec_trt.plugins.layer_kernels import write_kv  # noqa: F401 - the layout's write, where callers import it


@dataclass(frozen=True)
class KVCacheSpec:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    max_tokens: int
    page_size: int = 64
    dtype: torch.dtype = torch.float32

    @property
    def num_pages(self) -> int:
        return math.ceil(self.max_tokens / self.page_size)


class PagedKVCache:
    def __init__(self, spec: KVCacheSpec, device: torch.device | str = "cpu"):
        self.spec = spec
        shape = (spec.num_layers, spec.num_pages, spec.page_size, spec.num_kv_heads, spec.head_dim)
        # One tensor for all layers, so compaction moves every layer's rows in one gather and one scatter.
        self.k_all = torch.zeros(shape, dtype=spec.dtype, device=device)
        self.v_all = torch.zeros(shape, dtype=spec.dtype, device=device)
        # Per-layer views [P, S, Hkv, D] (select, not unbind: unbind's views refuse in-place writes under grad).
        self.k = [self.k_all[i] for i in range(spec.num_layers)]
        self.v = [self.v_all[i] for i in range(spec.num_layers)]
        self.block_table = torch.arange(spec.num_pages, dtype=torch.int32, device=device)
        # The block table on the host, as `length` mirrors ctx_len: the scheduler's padded passes build their
        # inputs on the host and copy them in at once (runtime/batch_passes.py).
        self.pages = torch.arange(spec.num_pages, dtype=torch.int32)
        # Committed tokens, as a device tensor so CUDA graphs can read it; `length` mirrors it on the host.
        self.ctx_len = torch.zeros(1, dtype=torch.int32, device=device)
        self.length = 0

    @property
    def capacity(self) -> int:
        return self.block_table.numel() * self.spec.page_size

    def over_pages(self, pages: list[int]) -> "PagedKVCache":
        """A cache of its own over some of this one's pages: the same K/V tensors, its own block table (logical
        page i is physical page pages[i]) and its own length, starting empty. Every read and write of the
        sequence goes through the block table, so the pages need not be contiguous or in order."""
        view = copy.copy(self)  # shares spec, k_all / v_all and the per-layer views
        view.pages = torch.tensor(pages, dtype=torch.int32)
        view.block_table = view.pages.to(self.block_table.device)
        view.ctx_len = torch.zeros_like(self.ctx_len)
        view.length = 0
        return view

    def reset(self) -> None:
        self.set_length(0)

    def set_length(self, length: int) -> None:
        self.length = length
        self.ctx_len.fill_(length)

    def slots(self, first: torch.Tensor, count: int) -> torch.Tensor:
        """Flat physical slot ids of logical positions first .. first+count-1 (first: int32 [1] tensor). On CUDA
        one kernel (plugins.paged_slots) instead of flat_slots' eight small ones: every pass asks for these."""
        if first.is_cuda and paged_slots.available():
            return paged_slots.contiguous_slots(self.block_table, first, count, self.spec.page_size)
        return self.slots_at(first, torch.arange(count, device=first.device))

    def slots_at(self, first: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """Flat physical slot ids of logical positions first + offsets."""
        return flat_slots(self.block_table, first.long() + offsets.long(), self.spec.page_size)

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store K/V [T, Hkv, D] of new tokens into flat slots."""
        write_kv(self.k[layer], self.v[layer], slots, k, v)

    def advance(self, count: torch.Tensor) -> None:
        """Commit `count` (a device tensor) more tokens without a host sync; `length` is then stale until
        the caller, who reads the count back anyway, calls set_length."""
        self.ctx_len += count.to(self.ctx_len.dtype)

    def commit_path(self, path: torch.Tensor, count: torch.Tensor) -> None:
        """Fixed-shape commit for CUDA graphs: move the new tokens at indices path[:count] to contiguous slots.

        `path` has a fixed length (entries past `count` are padding); padded rows land beyond the new context
        where nothing reads them. All sources are read before any destination is written.
        """
        src = self.slots_at(self.ctx_len, path)
        dst = self.slots(self.ctx_len, path.numel())
        self._move(src, dst)
        self.advance(count)

    def _move(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        """Copy slot rows src -> dst in every layer (all sources read before any destination is written)."""
        for cache in (self.k_all, self.v_all):
            flat = cache.view(cache.shape[0], -1, *cache.shape[3:])
            flat.index_copy_(1, dst, flat.index_select(1, src))

    def commit(self, kept: torch.Tensor) -> None:
        """Keep the new tokens at indices `kept` (ascending, relative to ctx_len) and append them to the context.

        Tree verify wrote all N tree tokens after the context; only the accepted path survives. Moving its
        rows to contiguous slots keeps every later read a plain prefix of the sequence.
        """
        count = kept.numel()
        src = self.slots_at(self.ctx_len, kept)
        dst = self.slots(self.ctx_len, count)
        if not torch.equal(src, dst):
            self._move(src, dst)
        self.set_length(self.length + count)


def flat_slots(block_table: torch.Tensor, logical: torch.Tensor, page_size: int) -> torch.Tensor:
    """Flat physical slot ids (int64) of logical positions through a block table, on the device or the host."""
    # Index, then widen: widening the whole table first cost a pass over every allocated page per call.
    return block_table[logical // page_size].long() * page_size + logical % page_size


def batch_slots(caches: list[PagedKVCache], counts: list[int]) -> torch.Tensor:
    """Flat slot ids of `counts[s]` new tokens after each cache's context, back to back: views of ONE pool
    (they share its K/V tensors), so a single write_kv per layer stores every sequence's new K/V. Computed once
    a step and reused by every layer."""
    store = caches[0]
    assert all(c.k_all is store.k_all and c.v_all is store.v_all for c in caches), "caches of different pools"
    return torch.cat([c.slots(c.ctx_len, n) for c, n in zip(caches, counts)])


class PagePool:
    """The pages of one cache handed out to many sequences (runtime/scheduler.py): each sequence decodes in a
    `PagedKVCache.over_pages` view of its own pages, and its pages come back when it ends."""

    def __init__(self, store: PagedKVCache):
        self.store = store
        self._free = list(range(store.spec.num_pages))

    @property
    def page_size(self) -> int:
        return self.store.spec.page_size

    @property
    def num_pages(self) -> int:
        return self.store.spec.num_pages

    @property
    def free_pages(self) -> int:
        return len(self._free)

    def pages_for(self, tokens: int) -> int:
        return math.ceil(tokens / self.page_size)

    def allocate(self, tokens: int) -> PagedKVCache | None:
        """A cache of room for `tokens` slots from free pages, or None when too few are free."""
        need = self.pages_for(tokens)
        if need > len(self._free):
            return None
        pages, self._free = self._free[:need], self._free[need:]
        return self.store.over_pages(pages)

    def release(self, cache: PagedKVCache) -> None:
        """Give a view's pages back (their contents are garbage to the next owner, who writes before reading)."""
        self._free.extend(cache.pages.tolist())
        cache.block_table = cache.block_table[:0]  # a released view holds no pages: releasing it again is a no-op
        cache.pages = cache.pages[:0]
