"""plugins/triton_accept.py against the torch accept stage (tree_tensors.accept_tensors + graph_decoder.commit_round):
the same path, emitted tokens, features, K/V compaction, history and context length, value for value.

The kernels run in Triton's CPU interpreter here (tests/plugins/interpreter.py) and on CUDA in the gpu test. Trees
come from the torch build over random logits, with and without a lookup chain (dead slots included); choices
follow a random branch for a random number of steps, so paths of every length occur, through the lookup chain too.
The block table is a permutation and the context crosses pages, so every slot goes through the table.
"""

from __future__ import annotations

import pytest
import torch

from tests.plugins.interpreter import needs_triton, run_in_interpreter

CASES = [  # (seed, budget, topk, max_depth, lookup, dtype)
    (0, 16, 4, 5, 0, "float32"),
    (1, 24, 3, 7, 4, "bfloat16"),
    (2, 64, 7, 15, 15, "bfloat16"),
    (3, 40, 16, 15, 0, "float16"),
]


def check(device: str, seed: int, budget: int, topk: int, max_depth: int, lookup: int, dtype_name: str) -> None:
    from jetspec_trt.models.kv_cache import KVCacheSpec, PagedKVCache
    from jetspec_trt.plugins.triton_accept import accept_and_commit
    from jetspec_trt.runtime.graph_decoder import RoundState, commit_round
    from jetspec_trt.tree.tree_tensors import accept_tensors, build_tree_tensors, with_chain_tensors

    dtype = getattr(torch, dtype_name)
    gen = torch.Generator().manual_seed(seed)
    vocab, layers, heads, dim, page, width = 50, 3, 2, 8, 4, 300
    for trial in range(8):
        anchor = torch.randint(vocab, (1,), generator=gen)
        tree = build_tree_tensors(anchor, torch.randn(max_depth, vocab, generator=gen) * 3, budget - lookup, topk,
                                  max_depth)
        if lookup:  # a chain that shares a prefix with the tree on odd trials, then maybe dies (-1) early
            chain = torch.randint(vocab, (lookup,), generator=gen)
            if trial % 2:
                chain[0] = tree.tokens[1]
            if trial % 3 == 2:
                chain[lookup // 2:] = -1
            tree = with_chain_tensors(tree, chain, max_depth)
        nodes = tree.tokens.shape[0]
        # Choices: random, then along a random node's ancestry for a random number of steps.
        choice = torch.randint(vocab, (nodes,), generator=gen)
        # (even trials: the deepest node, the lookup chain's last on lookup trees, for paths to max_depth)
        node = int(tree.depths.argmax()) if trial % 2 == 0 else int(torch.randint(nodes, (1,), generator=gen))
        line = [node]
        while line[-1] != 0:
            line.append(int(tree.parents[line[-1]]))
        line.reverse()
        steps = int(torch.randint(len(line), (1,), generator=gen)) if trial % 4 else len(line) - 1
        for parent, child in zip(line[:steps], line[1 : steps + 1]):
            if int(tree.tokens[child]) >= 0:
                choice[parent] = tree.tokens[child]
        features = torch.randn(nodes, width, generator=gen).to(dtype)
        context = int(torch.randint(3 * page, (1,), generator=gen))
        spec = KVCacheSpec(layers, heads, dim, context + nodes + max_depth + 8, page, dtype)
        caches = [PagedKVCache(spec) for _ in range(2)]
        pages = torch.randperm(spec.num_pages, generator=gen).to(torch.int32)
        k_values = torch.randn(caches[0].k_all.shape, generator=gen).to(dtype)
        v_values = torch.randn(caches[0].v_all.shape, generator=gen).to(dtype)
        history = torch.randint(vocab, (spec.max_tokens + max_depth + 2,), generator=gen)
        states = []
        for cache in caches:
            cache.k_all.copy_(k_values)
            cache.v_all.copy_(v_values)
            cache.block_table.copy_(pages)
            cache.set_length(context)
            states.append(RoundState(anchor=torch.zeros(1, dtype=torch.long), count=torch.zeros(1, dtype=torch.long),
                                     features=torch.zeros(max_depth + 1, width, dtype=dtype),
                                     result=torch.zeros(max_depth + 2, dtype=torch.long),
                                     history=history.clone() if lookup else None))
        commit_round(accept_tensors(tree, choice, max_depth), features, caches[0], states[0],
                     torch.arange(max_depth + 1))
        on = {name: t.to(device) for name, t in (("tokens", tree.tokens), ("parents", tree.parents),
                                                 ("depths", tree.depths), ("choice", choice), ("features", features))}
        state, cache = states[1], caches[1]
        moved = {name: getattr(t, "to")(device) for name, t in vars(state).items() if t is not None}
        k_all, v_all, table, ctx_len = (t.to(device) for t in (cache.k_all, cache.v_all, cache.block_table,
                                                                 cache.ctx_len))
        accept_and_commit(on["tokens"], on["parents"], on["depths"], on["choice"], max_depth, on["features"], k_all,
                          v_all, table, ctx_len, moved["features"], moved["count"], moved["anchor"], moved["result"],
                          moved.get("history"))
        want = states[0]
        length = int(want.count)
        assert int(moved["result"][0].cpu()) == length, (trial, steps)
        for name in ("anchor", "count", "result", "features") + (("history",) if lookup else ()):
            assert torch.equal(moved[name].cpu(), getattr(want, name)), (trial, name)
        assert int(ctx_len.cpu()) == int(caches[0].ctx_len) == context + length, trial
        assert torch.equal(k_all.cpu(), caches[0].k_all) and torch.equal(v_all.cpu(), caches[0].v_all), trial
        if steps:  # the branch the choices followed was walked at least as far as its drafted tokens allow
            assert length >= 2 or int(tree.tokens[line[1]]) < 0, (trial, steps, length)


ARGMAX_CASES = [(0, 64, 151936, "bfloat16"), (1, 1, 151936, "bfloat16"), (2, 17, 5000, "float32"), (3, 3, 7, "float16")]


def check_argmax(device: str, seed: int, rows: int, vocab: int, dtype_name: str) -> None:
    """argmax_rows against torch.argmax: few distinct values (ties everywhere), rows of NaN, -inf and +inf."""
    from jetspec_trt.plugins.triton_accept import argmax_rows

    gen = torch.Generator().manual_seed(seed)
    logits = torch.randint(-3, 3, (rows, vocab), generator=gen).float()
    if rows > 2:
        logits[1, torch.randint(vocab, (3,), generator=gen)] = float("nan")
        logits[2] = float("-inf")
        logits[0, vocab - 1] = float("inf")
    logits = logits.to(getattr(torch, dtype_name))
    want = logits.float().argmax(-1)  # the reference on the CPU, in float32 (the same order: casts are exact)
    got = argmax_rows(logits.to(device)).cpu()
    assert torch.equal(got, want), (got, want)
    if device == "cuda":  # and torch's own CUDA argmax, on NaN-free logits
        logits = torch.randn(rows, vocab, device="cuda").to(getattr(torch, dtype_name))
        assert torch.equal(argmax_rows(logits), logits.argmax(-1))


# Each check with each of its cases: (check, case, test id).
CHECKS = ([(check, c, f"accept-b{c[1]}-k{c[2]}-d{c[3]}-lookup{c[4]}-{c[5]}") for c in CASES]
          + [(check_argmax, c, f"argmax-{c[1]}x{c[2]}-{c[3]}") for c in ARGMAX_CASES])


@needs_triton
@pytest.mark.parametrize(("fn", "case"), [c[:2] for c in CHECKS], ids=[c[2] for c in CHECKS])
def test_kernels_match_torch_in_interpreter(fn, case):
    run_in_interpreter(fn, *case)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize(("fn", "case"), [c[:2] for c in CHECKS], ids=[c[2] for c in CHECKS])
def test_kernels_match_torch_on_cuda(fn, case):
    fn("cuda", *case)
