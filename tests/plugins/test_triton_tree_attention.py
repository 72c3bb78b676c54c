"""The Triton kernel against the CPU reference: random trees, contexts, shuffled page tables, GQA, dtypes.

Every check draws fresh random inputs, computes the reference in float64 on the CPU, poisons the CUDA caching
allocator with NaN first (the op returns a fresh tensor, so an unwritten element would show up as NaN), and
compares by relative error ||out - ref|| / ||ref||.

The checks take a device: on CUDA they call the registered op, on the CPU (Triton's interpreter, a subprocess:
tests/plugins/interpreter.py) the kernels' launcher, at small shapes in float16 and float32.
"""

import pytest
import torch

from jetspec_trt.plugins.tree_attention import causal_mask, pack_mask, tree_attention, tree_attention_reference
from tests.plugins.interpreter import needs_triton, run_in_interpreter


@pytest.fixture(scope="module")
def kernel():
    from jetspec_trt.plugins.triton_tree_attention import ensure_registered

    assert ensure_registered()
    assert ensure_registered()  # idempotent
    return True


def test_ensure_registered_is_a_noop_without_cuda():
    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    from jetspec_trt.plugins.triton_tree_attention import ensure_registered

    assert ensure_registered() is False


def random_tree(n, g):
    """Ancestor mask (token itself included) of a random tree whose parents precede their children."""
    parents = [-1] + [int(torch.randint(0, i, (1,), generator=g)) for i in range(1, n)]
    dense = torch.zeros(n, n, dtype=torch.bool)
    for i in range(n):
        if parents[i] >= 0:
            dense[i] = dense[parents[i]]
        dense[i, i] = True
    return dense


def poison_allocator():
    """Fill what the caching allocator will hand out next with NaN, so unwritten outputs are caught."""
    junk = torch.full((64 << 20,), float("nan"), dtype=torch.float32, device="cuda")
    del junk


# The interpreter runs a grid's programs one by one: launch for a GPU of 8 SMs, whose splits (still more than one
# for decode) are not mostly empty programs as a 132-SM GPU's are for small shapes.
INTERPRETER_SM_COUNT = 8


def run_case(t, ctx, hq, hkv, d, dtype, g, page=64, dense=None, device="cuda", strided_table=False,
             launch_change=None):
    pages = (ctx + t + page - 1) // page + 3
    k = torch.randn(pages, page, hkv, d, generator=g).to(dtype)
    v = torch.randn(pages, page, hkv, d, generator=g).to(dtype)
    table = torch.randperm(pages, generator=g).to(torch.int32)  # non-identity: pages shuffled
    if strided_table:  # every other entry of a wider tensor (out-of-range page ids in between)
        table = torch.stack([table, torch.full_like(table, 10**6)], 1)[:, 0]
    q = torch.randn(t, hq, d, generator=g).to(dtype)
    mask = pack_mask(random_tree(t, g) if dense is None else dense)
    ctx_len = torch.tensor([ctx], dtype=torch.int32)
    ref = tree_attention_reference(q.double(), k.double(), v.double(), table, ctx_len, mask, d**-0.5)
    if device == "cuda" and launch_change is None:
        poison_allocator()
        out = tree_attention(*[x.cuda() for x in (q, k, v, table, ctx_len, mask)], d**-0.5)
    else:  # the op's CPU implementation is the reference itself: call the kernels' launcher (on the CPU, or on
        # CUDA at a launch changed from the default one)
        import dataclasses

        from jetspec_trt.plugins.triton_tree_attention import launch_for, tree_attention_triton

        launch = launch_for(t, hq, hkv, d, page, dtype, INTERPRETER_SM_COUNT if device == "cpu" else None)
        launch = dataclasses.replace(launch, **(launch_change or {}))
        if device == "cuda":
            poison_allocator()
        inputs = [x.to(device) for x in (q, k, v, table, ctx_len, mask)]
        out = tree_attention_triton(*inputs, d**-0.5, launch)
    return relative_error(out, ref, q)


def relative_error(out, ref, q):
    """||out - ref|| / ||ref|| of an output that must have q's dtype and shape and no NaN (unwritten) element."""
    assert out.dtype == q.dtype and out.shape == q.shape
    out = out.double().cpu()
    assert not torch.isnan(out).any(), "unwritten or NaN outputs"
    return ((out - ref).norm() / ref.norm()).item()


# T x GQA ratio (1, 4, 8) x head_dim x dtype, every combination once, each with its own random context:
# 0, short and not a page multiple, or long (up to 8192+).
GQA = ((8, 8), (32, 8), (32, 4))
CASES = [(t, hq, hkv, d, dtype) for t in (1, 7, 64, 256) for hq, hkv in GQA for d in (64, 128)
         for dtype in (torch.bfloat16, torch.float16)]


@pytest.mark.gpu
@pytest.mark.parametrize("index", range(len(CASES)))
def test_matches_reference(kernel, index):
    t, hq, hkv, d, dtype = CASES[index]
    g = torch.Generator().manual_seed(1000 + index)
    kind = (index + index // 4) % 4  # not aligned with the (d, dtype) cycle of CASES
    ctx = [0, int(torch.randint(1, 300, (1,), generator=g)), int(torch.randint(300, 3000, (1,), generator=g)),
           int(torch.randint(7000, 8400, (1,), generator=g))][kind]
    page = [16, 64][int(torch.randint(0, 2, (1,), generator=g))]
    err = run_case(t, ctx, hq, hkv, d, dtype, g, page=page)
    assert err < 1e-2, (t, ctx, hq, hkv, d, dtype, page, err)


@pytest.mark.gpu
@pytest.mark.parametrize("t,ctx", [(1, 8191), (1, 8193), (256, 8200), (64, 5)])
def test_long_contexts_qwen3_8b_shape(kernel, t, ctx):
    g = torch.Generator().manual_seed(t + ctx)
    assert run_case(t, ctx, 32, 8, 128, torch.bfloat16, g) < 1e-2


def check_unordered_tree(device, t, ctx, hq, hkv, d, dtype):
    """A tree whose tokens are not in topological order: the kernel must not assume parents come first."""
    g = torch.Generator().manual_seed(5)
    perm = torch.randperm(t, generator=g)
    dense = random_tree(t, g)[perm][:, perm]
    assert run_case(t, ctx, hq, hkv, d, dtype, g, dense=dense, device=device) < 1e-2


@pytest.mark.gpu
def test_unordered_tree(kernel):
    check_unordered_tree("cuda", 100, 333, 32, 8, 128, torch.bfloat16)


def check_packed_prefill(device, lengths, ctx, shapes, dtype):
    """A packed prefill's mask: each sequence causal over itself only. Programs skip the tiles left of their
    sequence (no row sees them), so every sequence must still get exactly its own attention."""
    g = torch.Generator().manual_seed(ctx)
    segment = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    index = torch.arange(segment.numel())
    dense = (segment[:, None] == segment[None, :]) & (index[None, :] <= index[:, None])
    for hq, hkv, d in shapes:
        assert run_case(segment.numel(), ctx, hq, hkv, d, dtype, g, dense=dense, device=device) < 1e-2


@pytest.mark.gpu
@pytest.mark.parametrize("ctx", [0, 50])
def test_packed_block_diagonal_prefill(kernel, ctx):
    check_packed_prefill("cuda", [37, 300, 5, 700, 64, 1, 129], ctx, ((14, 2, 64), (32, 8, 128)), torch.bfloat16)


def check_causal_prefill(device, t, ctx, hq, hkv, d, dtype):
    g = torch.Generator().manual_seed(t)
    dense = torch.ones(t, t, dtype=torch.bool).tril()
    assert torch.equal(pack_mask(dense), causal_mask(t))
    assert run_case(t, ctx, hq, hkv, d, dtype, g, dense=dense, device=device) < 1e-2


@pytest.mark.gpu
@pytest.mark.parametrize("t,ctx,hq,hkv,d", [(1000, 0, 32, 8, 128), (300, 77, 16, 2, 64)])
def test_causal_prefill(kernel, t, ctx, hq, hkv, d):
    check_causal_prefill("cuda", t, ctx, hq, hkv, d, torch.bfloat16)


def check_fp32_is_exact(device, t):
    g = torch.Generator().manual_seed(t)
    assert run_case(t, 150, 8, 2, 64, torch.float32, g, page=16, device=device) < 1e-5


@pytest.mark.gpu
@pytest.mark.parametrize("t", [1, 40])
def test_fp32_is_exact(kernel, t):
    check_fp32_is_exact("cuda", t)


# Small cases for the interpreter, float16 (see tests/plugins/interpreter.py on bf16): (t, ctx, hq, hkv, d, page).
# Decode with splits and the merge kernel, contexts with and without a partial tile, GQA ratios 1, 4 and 8.
SMALL_CASES = [(1, 0, 8, 2, 64, 16), (1, 100, 8, 2, 64, 16), (1, 128, 4, 4, 32, 64), (7, 300, 8, 1, 64, 64),
               (64, 70, 4, 2, 32, 16)]


def check_small(device):
    """Every path of both kernels at shapes the interpreter runs in seconds."""
    for index, (t, ctx, hq, hkv, d, page) in enumerate(SMALL_CASES):
        g = torch.Generator().manual_seed(index)
        err = run_case(t, ctx, hq, hkv, d, torch.float16, g, page=page, device=device)
        assert err < 1e-2, (t, ctx, hq, hkv, d, page, err)
    err = run_case(5, 70, 4, 2, 32, torch.float16, torch.Generator().manual_seed(99), page=16, device=device,
                   strided_table=True)
    assert err < 1e-2, ("strided block table", err)
    check_unordered_tree(device, 40, 33, 4, 2, 32, torch.float16)
    check_packed_prefill(device, [37, 70, 5, 1, 20], 10, ((4, 1, 32),), torch.float16)  # skips tiles left of 96
    check_causal_prefill(device, 130, 77, 4, 1, 64, torch.float16)  # unmasked new-token tiles left of the band
    for t in (1, 40):
        check_fp32_is_exact(device, t)


@pytest.mark.slow
@needs_triton
def test_kernels_in_the_triton_interpreter():
    run_in_interpreter(check_small)


def check_fused_merge(device):
    """The merge in the attention kernel's last split programs (LaunchConfig.fused_merge) against the reference:
    decode and a small tree, 4 and 8 splits (some of them empty at these contexts), and an empty context; the
    arrival counters are all back at 0 after every launch."""
    from jetspec_trt.plugins.triton_tree_attention import _COUNTERS

    for index, (t, ctx, hq, hkv, d, page, splits) in enumerate([(1, 300, 8, 2, 64, 16, 4), (1, 70, 4, 4, 32, 64, 8),
                                                               (7, 300, 8, 1, 64, 64, 4), (1, 0, 8, 2, 64, 16, 4)]):
        g = torch.Generator().manual_seed(50 + index)
        err = run_case(t, ctx, hq, hkv, d, torch.float16, g, page=page, device=device,
                       launch_change=dict(splits=splits, fused_merge=True))
        assert err < 1e-2, (t, ctx, hq, hkv, d, page, splits, err)
        assert not any(bool(c.any()) for c in _COUNTERS.values())


@needs_triton
def test_fused_merge_in_the_triton_interpreter():
    run_in_interpreter(check_fused_merge)


@pytest.mark.gpu
def test_fused_merge_on_cuda(kernel):
    check_fused_merge("cuda")


@pytest.mark.gpu
def test_small_cases_on_cuda(kernel):
    check_small("cuda")


def capture(run):
    """A CUDA graph of run() and its output, warmed up (compiled) on a side stream first."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        run()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = run()
    return graph, out


@pytest.mark.gpu
@pytest.mark.parametrize("t", [1, 64])
def test_graph_replay_follows_ctx_len(kernel, t):
    """Captured once, replayed with other ctx_len values written into the same device tensor."""
    g = torch.Generator().manual_seed(7 + t)
    hq, hkv, d, page, pages = 32, 8, 128, 64, 80
    k = torch.randn(pages, page, hkv, d, generator=g).to(torch.bfloat16).cuda()
    v = torch.randn(pages, page, hkv, d, generator=g).to(torch.bfloat16).cuda()
    table = torch.randperm(pages, generator=g).to(torch.int32).cuda()
    q = torch.randn(t, hq, d, generator=g).to(torch.bfloat16).cuda()
    mask = pack_mask(random_tree(t, g)).cuda()
    ctx_len = torch.tensor([10], dtype=torch.int32, device="cuda")
    graph, out = capture(lambda: tree_attention(q, k, v, table, ctx_len, mask, d**-0.5))
    for length in (0, 3, 100, 1000, 5000 - t):
        ctx_len.fill_(length)
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        ref = tree_attention_reference(q.cpu().double(), k.cpu().double(), v.cpu().double(), table.cpu(),
                                       ctx_len.cpu(), mask.cpu(), d**-0.5)
        got = out.cpu().double()
        assert not torch.isnan(got).any()
        assert ((got - ref).norm() / ref.norm()) < 1e-2, length


# ------------------------------------------------------------------------------------- compiled variants of prefill


def test_prefill_lengths_cover_every_prompt_length():
    """One warm-up length per (launch shape, mask scan width): every length up to the maximum launches what some
    warmed length launched, so no request compiles. The 0.5B shape needs 14 (52 before the unspecialised
    bounds); a tuned launch for some token count adds that count."""
    from jetspec_trt.plugins.triton_tree_attention import (clear_tuned_launches, install_tuned_launches,
                                                           LaunchConfig, LaunchKey, launch_for, mask_scan_width,
                                                           prefill_lengths)

    def variant(n):
        return launch_for(n, 14, 2, 64, 64, torch.bfloat16, 132), mask_scan_width(-(-n // 32))

    lengths = prefill_lengths(4096, 14, 2, 64, 64, torch.bfloat16, 132)
    assert lengths[0] == 1 and lengths == sorted(lengths) and len(lengths) == 14
    warmed = {variant(n) for n in lengths}
    assert len(warmed) == len(lengths)
    assert all(variant(n) in warmed for n in range(1, 4097))
    try:
        install_tuned_launches({LaunchKey(100, 14, 2, 64, 64, "bfloat16"): LaunchConfig(32, 32, 4, 2, 1)})
        assert 100 in prefill_lengths(4096, 14, 2, 64, 64, torch.bfloat16, 132)
    finally:
        clear_tuned_launches()


@pytest.mark.gpu
def test_warm_prefill_leaves_nothing_to_compile(kernel):
    """After warm_causal_prefill, causal prefills of 40 random lengths add no compiled variant of the kernel."""
    from jetspec_trt.plugins.triton_tree_attention import _tree_attention_kernel, warm_causal_prefill

    def compiled() -> int:
        caches = getattr(_tree_attention_kernel, "device_caches", None)
        if caches is None:
            pytest.skip("this Triton version keeps no device_caches to count")
        return sum(len(entry[0]) for entry in caches.values())

    k = torch.randn(40, 64, 2, 64, dtype=torch.bfloat16, device="cuda")
    v = torch.randn_like(k)
    table = torch.arange(40, dtype=torch.int32, device="cuda")
    ctx = torch.zeros(1, dtype=torch.int32, device="cuda")
    lengths = warm_causal_prefill(k, v, table, ctx, 14, 2048)
    before = compiled()
    g = torch.Generator().manual_seed(0)
    for n in torch.randint(1, 2049, (40,), generator=g).tolist():
        q = torch.randn(n, 14, 64, dtype=torch.bfloat16, device="cuda")
        tree_attention(q, k, v, table, ctx, causal_mask(n, "cuda"), 0.125)
    torch.cuda.synchronize()
    assert compiled() == before, f"warmed {lengths}; a prefill compiled a new variant"
