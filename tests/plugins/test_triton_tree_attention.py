"""The Triton kernel against the CPU reference: random trees, contexts, shuffled page tables, GQA, dtypes.

Every check draws fresh random inputs, computes the reference in float64 on the CPU, poisons the CUDA caching
allocator with NaN first (the op returns a fresh tensor, so an unwritten element would show up as NaN), and
compares by relative error ||out - ref|| / ||ref||.
"""

import pytest
import torch

from jetspec_trt.plugins.tree_attention import causal_mask, pack_mask, tree_attention, tree_attention_reference


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


def run_case(t, ctx, hq, hkv, d, dtype, g, page=64, dense=None):
    pages = (ctx + t + page - 1) // page + 3
    k = torch.randn(pages, page, hkv, d, generator=g).to(dtype)
    v = torch.randn(pages, page, hkv, d, generator=g).to(dtype)
    table = torch.randperm(pages, generator=g).to(torch.int32)  # non-identity: pages shuffled
    q = torch.randn(t, hq, d, generator=g).to(dtype)
    mask = pack_mask(random_tree(t, g) if dense is None else dense)
    ctx_len = torch.tensor([ctx], dtype=torch.int32)
    ref = tree_attention_reference(q.double(), k.double(), v.double(), table, ctx_len, mask, d**-0.5)
    cuda = [x.cuda() for x in (q, k, v, table, ctx_len, mask)]
    poison_allocator()
    out = tree_attention(*cuda, d**-0.5)
    assert out.dtype == dtype and out.shape == q.shape
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


@pytest.mark.gpu
def test_unordered_tree(kernel):
    """A tree whose tokens are not in topological order: the kernel must not assume parents come first."""
    g = torch.Generator().manual_seed(5)
    t = 100
    perm = torch.randperm(t, generator=g)
    dense = random_tree(t, g)[perm][:, perm]
    assert run_case(t, 333, 32, 8, 128, torch.bfloat16, g, dense=dense) < 1e-2


@pytest.mark.gpu
@pytest.mark.parametrize("ctx", [0, 50])
def test_packed_block_diagonal_prefill(kernel, ctx):
    """A packed prefill's mask: each sequence causal over itself only. Programs skip the tiles left of their
    sequence (no row sees them), so every sequence must still get exactly its own attention."""
    g = torch.Generator().manual_seed(ctx)
    lengths = [37, 300, 5, 700, 64, 1, 129]
    segment = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    index = torch.arange(segment.numel())
    dense = (segment[:, None] == segment[None, :]) & (index[None, :] <= index[:, None])
    for hq, hkv, d in ((14, 2, 64), (32, 8, 128)):
        assert run_case(segment.numel(), ctx, hq, hkv, d, torch.bfloat16, g, dense=dense) < 1e-2


@pytest.mark.gpu
@pytest.mark.parametrize("t,ctx,hq,hkv,d", [(1000, 0, 32, 8, 128), (300, 77, 16, 2, 64)])
def test_causal_prefill(kernel, t, ctx, hq, hkv, d):
    g = torch.Generator().manual_seed(t)
    dense = torch.ones(t, t, dtype=torch.bool).tril()
    assert torch.equal(pack_mask(dense), causal_mask(t))
    assert run_case(t, ctx, hq, hkv, d, torch.bfloat16, g, dense=dense) < 1e-2


@pytest.mark.gpu
@pytest.mark.parametrize("t", [1, 40])
def test_fp32_is_exact(kernel, t):
    g = torch.Generator().manual_seed(t)
    assert run_case(t, 150, 8, 2, 64, torch.float32, g, page=16) < 1e-5


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
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm up (compiles) off the capture
        tree_attention(q, k, v, table, ctx_len, mask, d**-0.5)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = tree_attention(q, k, v, table, ctx_len, mask, d**-0.5)
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
