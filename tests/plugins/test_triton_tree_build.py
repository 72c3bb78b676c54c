"""The tree-stage kernels (plugins/triton_tree_build.py) build the host heap's tree node for node.

They run on CUDA where there is one, and on the CPU in Triton's interpreter (a subprocess: Triton reads
TRITON_INTERPRET when it is imported), so CI checks the kernels' logic without a GPU.
"""

import pytest
import torch

from jetspec_trt.tree.accept import SamplingConfig, accept
from jetspec_trt.tree.tree import build_tree_from_top, depth_top_logp
from jetspec_trt.tree.tree_tensors import accept_tensors, build_tree_kernels, tree_kernels_support, node_count
from tests.plugins.interpreter import needs_triton, run_in_interpreter

# (vocab, budget, topk, max_depth, logits): vocabularies that take 1, 2 and 8 splits of the top-k pass;
# "ties" logits are small integers, so most candidates tie exactly with others (the counter order decides).
CASES = [
    (40, 1, 7, 15, "normal"), (40, 2, 1, 1, "normal"), (40, 5, 2, 3, "normal"), (40, 16, 7, 15, "normal"),
    (5000, 16, 7, 15, "bf16"), (5000, 64, 7, 15, "ties"), (5000, 64, 2, 3, "normal"), (20000, 256, 7, 15, "bf16"),
    (300, 256, 1, 15, "ties"), (300, 100, 3, 4, "ties"), (300, 40, 2, 15, "normal"),
]


def _logits(vocab: int, kind: str, generator: torch.Generator) -> torch.Tensor:
    if kind == "ties":
        return torch.randint(0, 4, (15, vocab), generator=generator).float()
    logits = torch.randn(15, vocab, generator=generator) * 3
    return logits.to(torch.bfloat16) if kind == "bf16" else logits


def check_case(device: str, vocab: int, budget: int, topk: int, max_depth: int, kind: str) -> None:
    from jetspec_trt.plugins import triton_tree_build

    generator = torch.Generator().manual_seed(vocab + budget + topk)
    logits = _logits(vocab, kind, generator)
    tree, mask = build_tree_kernels(torch.tensor([9], device=device), logits.to(device), budget, topk, max_depth)
    n = node_count(budget, topk, max_depth)
    levels = min(max_depth, n - 1)
    assert tree.tokens.shape == (n,) and mask.shape == (n, (n + 31) // 32)

    if levels:
        # The top-k: the reference's values in order (log-normaliser within float32 rounding), and ids that hold
        # exactly those logits (ties may pick other ids than aten's top-k).
        logp, ids = triton_tree_build.vocab_top_logp(logits[:levels].to(device), topk)
        # Columns past topk (a power-of-two padding) are defined: a draft vocabulary maps every column.
        assert torch.equal(ids[:, topk:].cpu(), torch.zeros_like(ids[:, topk:].cpu()))
        assert bool((logp[:, topk:] == -1e4).all())
        logp, ids = logp[:, :topk].cpu(), ids[:, :topk].cpu()
        ref_logp, _ = depth_top_logp(logits[:levels], topk)
        torch.testing.assert_close(logp, ref_logp, rtol=0, atol=1e-5)
        ref_top = logits[:levels].float().topk(topk, dim=-1).values
        assert torch.equal(logits[:levels].float().gather(1, ids), ref_top)
        assert all(len(set(row)) == topk for row in ids.tolist())  # no token twice in a depth
    else:
        logp, ids = torch.zeros(0, topk), torch.zeros(0, topk, dtype=torch.long)

    # The tree: the host heap's over the same candidates, node for node (ties included).
    host = build_tree_from_top(9, logp, ids, budget, topk, levels)
    parents = host.parents.clone()
    parents[0] = 0  # TreeTensors: the root is its own parent
    assert tree.tokens.cpu().tolist() == host.tokens.tolist()
    assert tree.parents.cpu().tolist() == parents.tolist()
    assert tree.depths.cpu().tolist() == host.depths.tolist()
    assert torch.equal(tree.ancestors.cpu(), host.ancestors)
    assert torch.equal(mask.cpu(), host.packed_mask())

    # The walk over the kernel's (pop-ordered) tree is the host walk: target logits that follow the tree often.
    target_logits = torch.randn(n, vocab, generator=generator)
    for i in range(1, n):
        if torch.rand(1, generator=generator) < 0.8:
            target_logits[int(host.parents[i]), int(host.tokens[i])] += 10
    expected = accept(host, target_logits, SamplingConfig())
    host_tree = type(tree)(*(t.cpu() for t in (tree.tokens, tree.parents, tree.depths, tree.ancestors)))
    got = accept_tensors(host_tree, target_logits.argmax(-1), max_depth)
    length = int(got.length)
    assert got.emitted[:length].tolist() == expected.emitted
    assert got.path[:length].tolist() == expected.path


def check_exact_ties(device: str) -> None:
    """Integer score tables (depth d, rank r: -(r + 1)): a node's next sibling ties exactly with its first child
    and with many older frontier entries, so only the heap's push order (sibling before child, older first)
    decides the tree."""
    from jetspec_trt.plugins import triton_tree_build

    for budget, topk, levels in ((40, 3, 6), (100, 4, 15), (256, 7, 15)):
        logp = -torch.arange(1, topk + 1, dtype=torch.float32).repeat(levels, 1)
        ids = torch.arange(levels * topk).view(levels, topk)
        tokens, parents, *_ = triton_tree_build.best_first_tree(
            torch.tensor([0], device=device), logp.to(device), ids.to(device), node_count(budget, topk, levels),
            topk, levels)
        host = build_tree_from_top(0, logp, ids, budget, topk, levels)
        assert tokens.cpu().tolist() == host.tokens.tolist(), (budget, topk, levels)
        assert parents.cpu().tolist()[1:] == host.parents.tolist()[1:]


def check_all(device: str) -> None:
    for case in CASES:
        check_case(device, *case)
    check_exact_ties(device)
    # NaN logits (a graph warm-up reading an unwritten buffer): still a valid tree, parents first.
    logits = torch.full((15, 300), float("nan"), device=device)
    tree, _ = build_tree_kernels(torch.tensor([1], device=device), logits, 64, 7, 15)
    parents, depths = tree.parents.cpu(), tree.depths.cpu()
    assert all(parents[i] < i and depths[i] == depths[parents[i]] + 1 for i in range(1, 64))
    assert int(tree.tokens.max()) < 300
    # A draft vocabulary (columns: token ids): the tree of the same logits over the column ids, mapped.
    logits = _logits(40, "float", torch.Generator().manual_seed(2))
    # topk 7 pads its columns to 8 (lease 14's engines: an out-of-bounds gather when the padding was unset).
    vocab_ids = torch.arange(40) * 3 + 1
    for topk in (4, 7):
        plain, _ = build_tree_kernels(torch.tensor([9], device=device), logits.to(device), 32, topk, 15)
        mapped, _ = build_tree_kernels(torch.tensor([9], device=device), logits.to(device), 32, topk, 15,
                                       vocab_ids.to(device))
        assert mapped.tokens.cpu()[0] == 9
        assert torch.equal(mapped.tokens.cpu()[1:], vocab_ids[plain.tokens.cpu()[1:]])
        assert torch.equal(mapped.parents.cpu(), plain.parents.cpu())


def test_supports_bounds():
    from jetspec_trt.plugins import triton_tree_build

    if triton_tree_build.triton is None:
        assert not tree_kernels_support(16, 7, 15)
        return
    assert tree_kernels_support(256, 7, 15) and tree_kernels_support(512, 7, 15)
    assert not tree_kernels_support(513, 7, 15)  # register arrays: 512 nodes at most
    assert not tree_kernels_support(16, 65, 15) and not tree_kernels_support(16, 7, 64)


@pytest.mark.slow
@needs_triton
def test_kernels_in_the_triton_interpreter():
    run_in_interpreter(check_all)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_kernels_on_cuda():
    check_all("cuda")
