"""The batched tree-attention op: several sequences in one pool, each with its own pages, context and tree.

The reference is the single-sequence reference looped over the sequences, in float64. On CUDA the registered op
runs; on the CPU Triton's interpreter runs the kernels' launcher (a subprocess: tests/plugins/interpreter.py).
"""

import pytest
import torch

from jetspec_trt.plugins.tree_attention import (BatchedAttention, pack_mask, tree_attention_batched,
                                                tree_attention_batched_reference, tree_attention_reference)
from tests.plugins.interpreter import compile_for_hopper, needs_triton, run_in_interpreter
from tests.plugins.test_triton_tree_attention import (INTERPRETER_SM_COUNT, capture, poison_allocator, random_tree,
                                                     relative_error)


@pytest.fixture(scope="module")
def kernel():
    from jetspec_trt.plugins.triton_tree_attention import ensure_registered

    assert ensure_registered()
    return True


def random_batch(lengths, hq, hkv, d, dtype, g, page):
    """One shared pool and, per (ctx, new tokens) in `lengths`, its own shuffled pages, queries and tree."""
    needs = [(ctx + t + page - 1) // page + 1 for ctx, t in lengths]
    pool = sum(needs) + 2
    k = torch.randn(pool, page, hkv, d, generator=g).to(dtype)
    v = torch.randn(pool, page, hkv, d, generator=g).to(dtype)
    order = torch.randperm(pool, generator=g).to(torch.int32)  # every sequence's pages out of order
    tables = list(order[: sum(needs)].split(needs))
    ctx_lens = [torch.tensor([ctx], dtype=torch.int32) for ctx, _ in lengths]
    masks = [pack_mask(random_tree(t, g)) for _, t in lengths]
    q = torch.randn(sum(t for _, t in lengths), hq, d, generator=g).to(dtype)
    return q, k, v, tables, ctx_lens, masks


def check_batched(device, lengths, hq, hkv, d, dtype, page=16, seed=0, launch=None):
    """Relative error of the batched op against the per-sequence reference, for sequences (ctx, new tokens)."""
    g = torch.Generator().manual_seed(seed)
    q, k, v, tables, ctx_lens, masks = random_batch(lengths, hq, hkv, d, dtype, g, page)
    batch = BatchedAttention.build(tables, ctx_lens, masks)
    scale = d**-0.5
    counts = [t for _, t in lengths]
    ref = torch.cat([tree_attention_reference(q_s.double(), k.double(), v.double(), table, ctx, mask, scale)
                     for q_s, table, ctx, mask in zip(q.split(counts), tables, ctx_lens, masks)])
    if device == "cuda":
        poison_allocator()
        cuda = BatchedAttention(*[getattr(batch, f).cuda() for f in BatchedAttention.__dataclass_fields__])
        out = tree_attention_batched(q.cuda(), k.cuda(), v.cuda(), cuda, scale)
    else:  # the op's CPU implementation is the reference itself: call the kernels' launcher
        from jetspec_trt.plugins.triton_tree_attention import batched_launch, tree_attention_batched_triton

        launch = launch or batched_launch(q.shape[0], len(lengths), hq, hkv, d, page, dtype, INTERPRETER_SM_COUNT)
        out = tree_attention_batched_triton(q, k, v, batch.block_tables, batch.ctx_lens, batch.cu_seqlens,
                                            batch.tree_masks, scale, launch)
    return relative_error(out, ref, q)


def test_reference_is_the_single_sequence_reference_per_sequence():
    g = torch.Generator().manual_seed(3)
    lengths = [(0, 5), (37, 1), (100, 40), (3, 16)]
    q, k, v, tables, ctx_lens, masks = random_batch(lengths, 8, 2, 16, torch.float32, g, 16)
    batch = BatchedAttention.build(tables, ctx_lens, masks)
    assert batch.tree_masks.shape == (62, 2) and batch.block_tables.shape == (4, 10)
    out = tree_attention_batched(q, k, v, batch, 0.25)
    singles = [tree_attention_reference(q_s, k, v, table, ctx, mask, 0.25)
               for q_s, table, ctx, mask in zip(q.split([5, 1, 40, 16]), tables, ctx_lens, masks)]
    assert torch.equal(out, torch.cat(singles))
    args = (q, k, v, batch.block_tables, batch.ctx_lens, batch.cu_seqlens, batch.tree_masks, 0.25)
    assert torch.equal(tree_attention_batched_reference(*args), out)
    # Schema, fake (meta) implementation and dispatch registration, as torch.compile and export rely on them.
    torch.library.opcheck(torch.ops.jetspec_trt.tree_attention_batched.default, args)


# (ctx, new tokens) per sequence: contexts 0, partial tiles and several pages; 1, 5, 16 and 40 new tokens (40
# spans two mask words); a sequence with no new tokens (its row blocks are none).
BATCHES = [[(0, 5), (37, 1), (100, 40), (3, 16)], [(70, 1), (0, 1), (129, 1)], [(20, 40), (0, 0), (5, 16)]]


def check_small(device):
    """The batched kernel at shapes the interpreter runs in seconds: GQA ratios 1, 2 and 4, fp16 and fp32,
    default launches (splits and the merge for the decode batch) and a forced one of small row blocks."""
    from jetspec_trt.plugins.triton_tree_attention import LaunchConfig

    for seed, (lengths, (hq, hkv)) in enumerate(zip(BATCHES, ((4, 2), (4, 1), (2, 2)))):
        err = check_batched(device, lengths, hq, hkv, 32, torch.float16, seed=seed)
        assert err < 1e-2, (lengths, hq, hkv, err)
    err = check_batched(device, BATCHES[0], 4, 1, 32, torch.float32, seed=9)
    assert err < 1e-5, ("fp32", err)
    if device == "cpu":  # an explicit launch: 16-row blocks, 4 splits, 4 sequences of several row blocks each
        err = check_batched(device, BATCHES[0], 8, 2, 32, torch.float16, seed=11,
                            launch=LaunchConfig(16, 32, 4, 2, 4))
        assert err < 1e-2, ("forced launch", err)


@pytest.mark.slow
@needs_triton
def test_batched_kernel_in_the_triton_interpreter():
    run_in_interpreter(check_small)


@pytest.mark.gpu
def test_small_cases_on_cuda(kernel):
    check_small("cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("index", range(4))
def test_matches_reference_on_cuda(kernel, index):
    """Engine shapes in bf16: decode batches, trees and a mixed batch, contexts up to a few thousand tokens."""
    g = torch.Generator().manual_seed(index)
    sizes = [[1] * 16, [64] * 8, [1, 5, 16, 40, 256, 1, 0, 7], [100] * 3]
    lengths = [(int(torch.randint(0, 3000, (1,), generator=g)), t) for t in sizes[index]]
    err = check_batched("cuda", lengths, 14, 2, 64, torch.bfloat16, page=64, seed=index)
    assert err < 1e-2, (lengths, err)


@pytest.mark.gpu
def test_graph_replay_follows_lengths(kernel):
    """Captured once, replayed with other context lengths AND another split of the same tokens between the
    sequences, written into the same device tensors: the launch depends on shapes only."""
    g = torch.Generator().manual_seed(21)
    hq, hkv, d, page = 14, 2, 64, 64
    q, k, v, tables, ctx_lens, masks = random_batch([(500, 16), (3000, 1), (0, 40), (64, 7)], hq, hkv, d,
                                                    torch.bfloat16, g, page)
    batch = BatchedAttention.build(tables, ctx_lens, masks)
    q, k, v = q.cuda(), k.cuda(), v.cuda()
    live = BatchedAttention(*[getattr(batch, f).cuda() for f in BatchedAttention.__dataclass_fields__])
    graph, out = capture(lambda: tree_attention_batched(q, k, v, live, d**-0.5))
    # The same 64 tokens split otherwise (causal masks of each new length); each context and its new tokens fit
    # the pages random_batch gave that sequence (640, 3072, 128 and 192 slots).
    for counts, ctxs in (([16, 1, 40, 7], [500, 3000, 0, 64]), ([1, 1, 1, 61], [600, 3000, 80, 100]),
                         ([32, 0, 32, 0], [100, 0, 3, 0])):
        other = BatchedAttention.build(tables, [torch.tensor([c], dtype=torch.int32) for c in ctxs],
                                       [pack_mask(torch.ones(n, n, dtype=torch.bool).tril()) for n in counts])
        for name in ("ctx_lens", "cu_seqlens"):
            getattr(live, name).copy_(getattr(other, name))
        live.tree_masks.zero_()
        live.tree_masks[:, : other.tree_masks.shape[1]].copy_(other.tree_masks)
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        ref = tree_attention_batched_reference(q.cpu().double(), k.cpu().double(), v.cpu().double(),
                                               other.block_tables, other.ctx_lens, other.cu_seqlens,
                                               other.tree_masks, d**-0.5)
        got = out.cpu().double()
        assert not torch.isnan(got).any()
        assert ((got - ref).norm() / ref.norm()) < 1e-2, counts


@needs_triton
@pytest.mark.parametrize("batched", [False, True], ids=["one-sequence", "batched"])
def test_kernel_compiles_for_hopper_without_a_gpu(batched):
    """The interpreter runs Python, not Triton's compiler: compile the kernel ahead of time for sm_90 (bf16, the
    engine's 0.5B shape) so that what only the compiler checks (the early return of spare programs, tl.cumsum,
    types across the BATCHED branches) is caught without a GPU."""
    from jetspec_trt.plugins.triton_tree_attention import _tree_attention_kernel

    kernel = _tree_attention_kernel
    pointers = {"table_ptr": "*i32", "ctx_ptr": "*i32", "mask_ptr": "*i32", "cu_ptr": "*i32", "part_ptr": "*fp32",
                "lse_ptr": "*fp32", "count_ptr": "*i32"}
    # one sequence: with the fused merge (the last split program merges; LaunchConfig.fused_merge)
    constants = dict(GROUP=7, HEAD_DIM=64, PAGE=64, BLOCK_M=64, BLOCK_N=64, SPLITS=2, SCAN_W=1, IEEE=False,
                     BATCHED=batched, SEQ_P2=16 if batched else 1, TRIGGER=not batched, FUSED_MERGE=not batched)
    compiled = compile_for_hopper(kernel, constants, {"qk_scale": "fp32", **pointers}, num_warps=4, num_stages=3)
    ptx = compiled.asm["ptx"]
    assert compiled.asm["cubin"]
    # On Hopper the kernel and its merge signal a PDL-launched GEMV after them at their start (plugins/gemv.py)
    assert ("griddepcontrol.launch_dependents" in ptx) == (not batched)
    assert ("atom.global.gpu.acq_rel.add" in ptx) == (not batched)  # one predicated thread a program


@needs_triton
def test_merge_kernel_compiles_for_hopper_with_its_signal():
    from jetspec_trt.plugins.triton_tree_attention import _merge_kernel

    compiled = compile_for_hopper(_merge_kernel, dict(HEAD_DIM=128, SPLITS=64, TRIGGER=True),
                                  {"part_ptr": "*fp32", "lse_ptr": "*fp32"}, num_warps=4)
    assert compiled.asm["cubin"] and "griddepcontrol.launch_dependents" in compiled.asm["ptx"]


def test_only_cuda_devices_of_sm90_and_up_signal_dependents():
    from jetspec_trt.plugins.tree_attention import signals_dependents

    assert not signals_dependents(torch.device("cpu"))
