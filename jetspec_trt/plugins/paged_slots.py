"""Flat slot ids of the positions after a paged cache's context, in one kernel on CUDA.

Every pass over a paged cache (the AR step, a tree verify, the draft head's context rows and its block) asks for
the slots of its new tokens: logical positions first .. first + count - 1 through the block table. As torch ops
(models.kv_cache.flat_slots) that is an arange, two casts, a floor-divide, a gather, a multiply, a remainder and
an add: eight launches of almost no work, once an AR step and three times a round under the CUDA graphs (in the
draft stage's kernel profile on an H100, lease 13, casts and integer elementwise kernels were 15 of its 46). One
program per SLOT_BLOCK positions does the same here, with `first` read on the device as before.
"""

from __future__ import annotations

import torch

try:  # Guarded: a machine without (or with a broken) Triton still imports this module.
    import triton
    import triton.language as tl
except Exception:  # noqa: BLE001 - ImportError, or a Triton that fails to initialise
    triton = None

SLOT_BLOCK = 1024


def available() -> bool:
    return triton is not None


if triton is not None:

    @triton.jit
    def flat_slot(table_ptr, logical, ok, PAGE: tl.constexpr):
        """Flat slot ids (int64) of int64 logical positions through the block table (entries where `ok`):
        models.kv_cache.flat_slots in a kernel; other kernels that move cache rows call it too."""
        return tl.load(table_ptr + logical // PAGE, mask=ok, other=0).to(tl.int64) * PAGE + logical % PAGE

    @triton.jit
    def _slots_kernel(table_ptr, first_ptr, out_ptr, count, PAGE: tl.constexpr, BLOCK: tl.constexpr):
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        ok = i < count
        tl.store(out_ptr + i, flat_slot(table_ptr, tl.load(first_ptr).to(tl.int64) + i, ok, PAGE), mask=ok)


def contiguous_slots(block_table: torch.Tensor, first: torch.Tensor, count: int, page_size: int) -> torch.Tensor:
    """int64 [count]: flat slot ids of logical positions first .. first + count - 1 (first: a [1] integer tensor
    on the table's device) through block_table [pages] (int32, contiguous): models.kv_cache.flat_slots' values."""
    assert block_table.is_contiguous() and first.numel() == 1
    out = torch.empty(count, dtype=torch.long, device=block_table.device)
    if count:
        _slots_kernel[(triton.cdiv(count, SLOT_BLOCK),)](block_table, first, out, count, PAGE=page_size,
                                                          BLOCK=SLOT_BLOCK)
    return out
