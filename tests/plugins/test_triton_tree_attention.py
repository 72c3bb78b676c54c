"""The Triton kernel against the CPU reference on random trees, contexts, page tables, GQA ratios, dtypes."""

import pytest
import torch

from jetspec_trt.plugins.tree_attention import causal_mask, pack_mask, tree_attention, tree_attention_reference

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module", autouse=True)
def kernel():
    from jetspec_trt.plugins.triton_tree_attention import ensure_registered

    assert ensure_registered()


def random_tree_mask(n, g):
    parents = [-1] + [int(torch.randint(0, i, (1,), generator=g)) for i in range(1, n)]
    dense = torch.zeros(n, n, dtype=torch.bool)
    for i in range(n):
        if parents[i] >= 0:
            dense[i] = dense[parents[i]]
        dense[i, i] = True
    return pack_mask(dense)


CASES = [(t, ctx, hq, hkv, d, dtype) for t in (1, 7, 64, 256) for ctx in (0, 37, 1000, 5000)
         for (hq, hkv) in ((8, 8), (16, 4), (32, 4)) for d in (64, 128) for dtype in (torch.bfloat16, torch.float16)
         if not (t == 256 and ctx == 5000 and hq == 8)]


@pytest.mark.parametrize("t,ctx,hq,hkv,d,dtype", CASES[::3] + [(1, 8191, 32, 8, 128, torch.bfloat16)])
def test_matches_reference(t, ctx, hq, hkv, d, dtype):
    g = torch.Generator().manual_seed(t * 7919 + ctx + hq + d)
    page = 64
    pages = (ctx + t + page - 1) // page + 3
    k = torch.randn(pages, page, hkv, d, generator=g).to(dtype)
    v = torch.randn(pages, page, hkv, d, generator=g).to(dtype)
    table = torch.randperm(pages, generator=g).to(torch.int32)
    q = torch.randn(t, hq, d, generator=g).to(dtype)
    mask = random_tree_mask(t, g)
    ctx_len = torch.tensor([ctx], dtype=torch.int32)
    ref = tree_attention_reference(q.double(), k.double(), v.double(), table, ctx_len, mask, d**-0.5)
    cuda = [x.cuda() for x in (q, k, v, table, ctx_len, mask)]
    out = tree_attention(*cuda, d**-0.5).double().cpu()
    assert not torch.isnan(out).any()
    assert ((out - ref).norm() / ref.norm()) < 1e-2


def test_causal_prefill_and_fp32():
    g = torch.Generator().manual_seed(0)
    t, hq, hkv, d = 300, 8, 2, 64
    k = torch.randn(6, 64, hkv, d, generator=g)
    v = torch.randn(6, 64, hkv, d, generator=g)
    table = torch.arange(6, dtype=torch.int32)
    q = torch.randn(t, hq, d, generator=g)
    ctx_len = torch.tensor([20], dtype=torch.int32)
    ref = tree_attention_reference(q, k, v, table, ctx_len, causal_mask(t), 0.125)
    out = tree_attention(*(x.cuda() for x in (q, k, v, table, ctx_len, causal_mask(t))), 0.125).cpu()
    assert (out - ref).abs().max() < 1e-4


def test_graph_replay_follows_ctx_len():
    g = torch.Generator().manual_seed(1)
    k = torch.randn(8, 64, 2, 64, generator=g).cuda().half()
    v = torch.randn(8, 64, 2, 64, generator=g).cuda().half()
    table = torch.arange(8, dtype=torch.int32).cuda()
    q = torch.randn(5, 8, 64, generator=g).cuda().half()
    mask = causal_mask(5, "cuda")
    ctx_len = torch.tensor([10], dtype=torch.int32, device="cuda")
    tree_attention(q, k, v, table, ctx_len, mask, 0.125)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = tree_attention(q, k, v, table, ctx_len, mask, 0.125)
    for length in (3, 100, 400):
        ctx_len.fill_(length)
        graph.replay()
        ref = tree_attention_reference(q.cpu().float(), k.cpu().float(), v.cpu().float(), table.cpu(),
                                       ctx_len.cpu(), mask.cpu(), 0.125)
        assert (out.cpu().float() - ref).abs().max() < 1e-2
