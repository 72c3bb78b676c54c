"""On CUDA: the graphed round equals the eager reference decoder, and speculation equals AR greedy."""

import pytest
import torch

from jetspec_trt.models.presets import random_models
from jetspec_trt.runtime.config import RuntimeConfig, TreeConfig
from jetspec_trt.runtime.decoder import Decoder, first_difference
from jetspec_trt.runtime.graph_decoder import GraphDecoder, GraphReplay, prefill_buckets
from tests.helpers import check_bucketed_prefill

pytestmark = pytest.mark.gpu


def runtime_for(draft, tree, tree_kernel=False, fused_accept=False):
    spec = draft.spec
    return RuntimeConfig(tree, "float32", 512, spec.block_size, spec.mask_token_id, spec.target_layer_ids, (),
                         tree_kernel=tree_kernel, fused_accept=fused_accept)


@pytest.mark.parametrize(("tree_kernel", "fused_accept"), [(False, False), (True, False), (True, True)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_graphed_rounds_match_eager_and_ar(dtype, tree_kernel, fused_accept):
    """With the torch tree build and with the Triton tree kernels (plugins/triton_tree_build.py), and the accept
    stage as torch ops or as plugins/triton_accept.py's kernels."""
    target, draft, _ = random_models("tiny", "cuda", dtype)
    target.fuse_weights()
    draft.fuse_weights()
    runtime = runtime_for(draft, TreeConfig(64, 4, 7), tree_kernel, fused_accept)
    graphed, eager = GraphDecoder(target, draft, runtime), Decoder(target, draft, runtime)
    g = torch.Generator().manual_seed(0)
    mismatches = 0
    for i in range(16):
        prompt = torch.randint(0, 256, (int(torch.randint(2, 60, (1,), generator=g)),), generator=g).tolist()
        tree = TreeConfig((4, 16, 64)[i % 3], 4, (3, 7)[i % 2])
        spec = [t for c in graphed.generate(prompt, 48, tree=tree) for t in c]
        ar = [t for c in graphed.generate(prompt, 48, speculative=False) for t in c]
        reference = [t for c in eager.generate(prompt, 48, tree=tree) for t in c]
        if dtype == torch.float32:
            assert spec == reference == ar
        elif spec != ar:
            # bf16: the tree's GEMMs (M = tree size) and the AR step's (M = 1) round differently, which can
            # flip a near tie. Every divergence must be one: the two tokens' logits nearly equal.
            mismatches += 1
            first = first_difference(ar, spec)
            logits = graphed.prefill_logits(prompt + ar[:first], speculative=False)
            assert abs(float(logits[ar[first]] - logits[spec[first]])) < 0.25
    print(f"{dtype}: {mismatches}/16 prompts diverged from AR greedy")


@pytest.mark.parametrize("budget", [16, 64, 256])
def test_compiled_tree_stage_equals_eager_and_the_reference(budget):
    """Compiled on CUDA, Inductor makes the tree build's sorts of <= 512 entries Triton kernels (budgets <= 64 at
    top-k 7; larger ones stay aten sorts): the same tree and mask as eager, and the reference's tree."""
    from jetspec_trt.plugins.tree_attention import unpack_mask
    from jetspec_trt.runtime.graph_decoder import build_tree_and_mask
    from jetspec_trt.tree.tree import build_tree

    build = torch.compile(build_tree_and_mask, dynamic=False, fullgraph=True)
    g = torch.Generator(device="cuda").manual_seed(budget)
    anchor = torch.tensor([5], device="cuda")
    for dtype in (torch.float32, torch.bfloat16):
        logits = (torch.randn(15, 151936, device="cuda", generator=g) * 3).to(dtype)
        want, want_mask = build_tree_and_mask(anchor, logits, budget, 7, 15)
        got, got_mask = build(anchor, logits, budget, 7, 15)
        for name in ("tokens", "parents", "depths", "ancestors"):
            assert torch.equal(getattr(got, name), getattr(want, name)), (dtype, name)
        assert torch.equal(got_mask, want_mask)
        assert torch.equal(unpack_mask(got_mask, budget), got.ancestors)
        # The heap reference (CPU): the same node scores (bf16 logits tie, so the same nodes up to tied swaps).
        reference = build_tree(5, logits.cpu(), budget, 7, 15)
        logp = torch.log_softmax(logits.float().cpu(), -1).double()

        def scores(tokens, parents):
            tokens, parents, out = tokens.tolist(), parents.tolist(), []
            for i in range(len(tokens)):
                j, depth = i, []
                while j != 0:
                    depth.append(tokens[j])
                    j = parents[j]
                out.append(sum(float(logp[d, t]) for d, t in enumerate(reversed(depth))))
            return sorted(out)

        ref_parents = reference.parents.clone()
        ref_parents[0] = 0
        assert scores(got.tokens.cpu(), got.parents.cpu()) == pytest.approx(
            scores(reference.tokens, ref_parents), abs=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_graphed_bucket_prefill_equals_the_eager_prefill(dtype):
    """Every bucket is captured at load (AR and speculative) and replays at any length within it: the eager unpadded
    prefill's next token (bf16: unless a near tie, since padding changes the GEMMs' M) and, for the real slots, its
    target and draft K/V; no capture after load."""
    target, draft, _ = random_models("tiny", "cuda", dtype)
    target.fuse_weights()
    draft.fuse_weights()
    fast = GraphDecoder(target, draft, runtime_for(draft, TreeConfig(16, 4, 3)))  # max_seq_len 512
    captured = dict(fast._prefills)
    assert set(captured) == {(size, s) for size in prefill_buckets(512) for s in (False, True)}
    assert all(isinstance(stage.run, GraphReplay) for stage in captured.values())
    # bf16: K/V up to ~8 (ulp 1/32) and logits up to ~6 on this pair; a slot at the wrong position is off by O(1).
    atol, logits_atol = (1e-3, 1e-2) if dtype == torch.float32 else (0.25, 0.5)
    g = torch.Generator().manual_seed(0)
    # Several lengths in bucket 64 (33..64), its neighbours' edges, and the longest prompt.
    for n in (1, 2, 31, 32, 33, 40, 47, 58, 63, 64, 65, 300, 511):
        prompt = torch.randint(0, 256, (n,), generator=g).tolist()
        for speculative in (False, True):
            got, want = check_bucketed_prefill(fast, prompt, speculative, atol)
            top2 = want.topk(2).values
            if dtype == torch.float32 or float(top2[0] - top2[1]) > 0.25:
                assert int(got.argmax()) == int(want.argmax()), (n, speculative)
            assert torch.allclose(got, want, atol=logits_atol, rtol=0), (n, speculative)
    assert fast._prefills.keys() == captured.keys() and all(fast._prefills[k] is v for k, v in captured.items())


@pytest.mark.parametrize(("tree_kernel", "fused_accept"), [(False, False), (True, False), (True, True)])
def test_graphed_lookup_rounds_match_eager_rounds(tree_kernel, fused_accept):
    """Lookup buckets captured and compiled (chain found and merged on the device, one round ahead of the host):
    fp32, the same tokens and rounds as the eager Decoder's host trees, and AR's tokens."""
    target, draft, _ = random_models("tiny", "cuda", torch.float32)
    target.fuse_weights()
    draft.fuse_weights()
    tree = TreeConfig(32, 4, 7, lookup=6)
    runtime = runtime_for(draft, tree, tree_kernel, fused_accept)
    graphed = GraphDecoder(target, draft, runtime, compile_layers=True)
    eager = Decoder(target, draft, runtime)
    g = torch.Generator().manual_seed(1)
    for _ in range(8):
        prompt = torch.randint(0, 256, (int(torch.randint(2, 60, (1,), generator=g)),), generator=g).tolist()
        spec = [t for c in graphed.generate(prompt, 48) for t in c]
        rounds = graphed.stats.emitted_per_round
        assert spec == [t for c in eager.generate(prompt, 48) for t in c]
        assert rounds == eager.stats.emitted_per_round
        assert spec == [t for c in graphed.generate(prompt, 48, speculative=False) for t in c]
