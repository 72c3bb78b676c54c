"""plugins/paged_slots.py against models.kv_cache.flat_slots: the same slot ids through permuted block tables, for
firsts inside and at the edges of pages and counts past one program's block (interpreter here, CUDA in gpu runs)."""

from __future__ import annotations

import pytest
import torch

from tests.plugins.interpreter import needs_triton, run_in_interpreter


def check(device: str, seed: int) -> None:
    from jetspec_trt.models.kv_cache import flat_slots
    from jetspec_trt.plugins.paged_slots import contiguous_slots

    gen = torch.Generator().manual_seed(seed)
    for page_size, pages in ((4, 700), (64, 40), (16, 9)):
        table = torch.randperm(pages, generator=gen).to(torch.int32)
        for first, count in ((0, 1), (page_size - 1, 2), (page_size, 16), (3, 2000), (5, 0), (1, 1025)):
            if first + count > pages * page_size:
                continue
            first_t = torch.tensor([first], dtype=torch.int32)
            want = flat_slots(table, first + torch.arange(count), page_size)
            got = contiguous_slots(table.to(device), first_t.to(device), count, page_size).cpu()
            assert got.dtype == torch.long and torch.equal(got, want), (page_size, first, count)


@needs_triton
def test_contiguous_slots_match_flat_slots_in_interpreter():
    run_in_interpreter(check, 0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_contiguous_slots_match_flat_slots_on_cuda():
    check("cuda", 0)
