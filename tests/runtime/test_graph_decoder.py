"""The fixed-shape GPU round (run eagerly here) emits exactly the reference decoder's tokens."""

import pytest
import torch

from jetspec_trt.runtime.config import TreeConfig
from jetspec_trt.runtime.decoder import Decoder
from jetspec_trt.runtime.graph_decoder import GraphDecoder
from tests.helpers import tiny_pair, tiny_runtime


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    torch.set_num_threads(1)
    return tiny_pair(tmp_path_factory.mktemp("tiny"))


@pytest.mark.parametrize("fuse", [False, True])
def test_graph_round_matches_reference(pair, fuse):
    target, draft = pair
    if fuse:
        target.fuse_weights()
        draft.fuse_weights()
    runtime = tiny_runtime(draft, TreeConfig(64, 4, 7))
    reference, fast = Decoder(target, draft, runtime), GraphDecoder(target, draft, runtime)
    g = torch.Generator().manual_seed(5)
    for i in range(12):
        prompt = torch.randint(0, 256, (int(torch.randint(1, 30, (1,), generator=g)),), generator=g).tolist()
        tree = TreeConfig((1, 4, 16, 64)[i % 4], 4, (1, 3, 7)[i % 3])
        expected = [t for c in reference.generate(prompt, 30, speculative=False) for t in c]
        got = [t for c in fast.generate(prompt, 30, tree=tree) for t in c]
        assert got == expected
        assert [t for c in fast.generate(prompt, 30, speculative=False) for t in c] == expected


def test_fixed_shape_causal_mask_equals_dense():
    from jetspec_trt.plugins.tree_attention import pack_mask
    for n in (1, 5, 31, 32, 33, 100):
        assert torch.equal(__import__("jetspec_trt.plugins.tree_attention", fromlist=["x"]).causal_mask(n),
                           pack_mask(torch.ones(n, n, dtype=torch.bool).tril()))
