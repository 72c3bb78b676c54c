"""The step cost model (runtime/cost_model.py): interpolation, its JSON file, and the budget it chooses."""

import dataclasses
import json

import pytest
import torch

from jetspec_trt.errors import JetSpecError
from jetspec_trt.runtime.config import TreeConfig
from jetspec_trt.runtime.cost_model import (COST_MODEL, BudgetChooser, CostModel, cut_tree, doubling_up_to,
                                            round_curves)
from jetspec_trt.tree.tree import build_tree


def synthetic(verify: dict[int, float], draft: dict[int, float]) -> CostModel:
    """A cost model of made-up times (seconds), as if measured."""
    return CostModel("test device", "float32", "2026-01-01T00:00:00+00:00", 16, tuple(verify),
                     tuple(verify.values()), tuple(draft), tuple(draft.values()))


# Per token, a pass costs what a token costs (the CPU): trees never pay.
STEEP = synthetic({1: 1.0, 64: 64.0}, {1: 0.5, 8: 4.0})
# A pass costs the same for 1 or 512 tokens, and drafting is free: the biggest tree always pays.
FLAT = synthetic({1: 1.0, 512: 1.0}, {1: 0.0, 8: 0.0})


def test_interpolation():
    model = synthetic({1: 1.0, 4: 2.5, 16: 4.0}, {1: 0.2, 2: 0.3, 8: 0.6})
    assert [model.verify_cost(t) for t in (1, 4, 16)] == [1.0, 2.5, 4.0]  # the measured points
    assert model.verify_cost(2) == pytest.approx(1.5) and model.verify_cost(10) == pytest.approx(3.25)
    assert model.verify_cost(0) == 1.0  # flat below the first point
    assert model.verify_cost(32) == pytest.approx(6.0)  # the last segment's slope beyond the last point
    assert model.draft_cost(0) == 0.0 and model.draft_cost(5) == pytest.approx(0.45)
    noisy = synthetic({1: 1.0, 2: 0.9, 4: 2.0}, {1: 0.1})  # a timing dip: costs never fall
    assert noisy.verify_cost(2) == 1.0 and noisy.verify_cost(3) == pytest.approx(1.5)
    assert noisy.draft_cost(8) == 0.1  # a single point: flat
    assert doubling_up_to(1) == [1] and doubling_up_to(8) == [1, 2, 4, 8] and doubling_up_to(12) == [1, 2, 4, 8, 12]


def test_json_round_trip_missing_and_malformed_files(tmp_path):
    assert CostModel.load(tmp_path) is None  # no file: the engine measures one where it needs it
    model = synthetic({1: 0.01, 8: 0.02, 64: 0.1}, {1: 0.003, 4: 0.005})
    model.save(tmp_path)
    assert CostModel.load(tmp_path) == model
    raw = json.loads((tmp_path / COST_MODEL).read_text())
    for broken in ("{not json", json.dumps({**raw, "verify_s": [0.01, 0.02]}),  # fewer times than points
                   json.dumps({**raw, "verify_tokens": [8, 1, 64]}), json.dumps({k: raw[k] for k in list(raw)[1:]}),
                   json.dumps({**raw, "draft_s": [0.0, 0.005]})):
        (tmp_path / COST_MODEL).write_text(broken)
        with pytest.raises(JetSpecError, match=f"{COST_MODEL}: malformed cost model .*delete it to measure anew"):
            CostModel.load(tmp_path)


def test_matches_only_the_device_and_dtype_it_was_measured_on():
    from jetspec_trt.devices import device_name

    here = dataclasses.replace(STEEP, device_name=device_name("cpu"))
    assert here.matches("cpu", torch.float32)
    assert not here.matches("cpu", torch.bfloat16)
    assert not STEEP.matches("cpu", torch.float32)  # "test device"


# Expected accepted drafts per tree size (1..8 nodes) of a sequence whose draft is sure of two tokens and then
# unsure: the curve of DraftTree.expected_accepted.
CURVE = [0.0, 0.95, 1.85, 1.95, 2.0, 2.04, 2.07, 2.09]


def test_choice_follows_the_costs():
    assert BudgetChooser(STEEP).choose([CURVE] * 4, 0, drafted=False) == 1
    # Once the draft pass is paid (2 s of the step here), the draft's sure first token pays even at these costs.
    assert BudgetChooser(STEEP).choose([CURVE] * 4, 0, drafted=True) == 2
    assert BudgetChooser(STEEP).choose([[0.0, 0.5, 0.8]] * 4, 0, drafted=True) == 1
    assert BudgetChooser(FLAT).choose([CURVE] * 4, 0, drafted=True) == 8
    # A pass that costs 1 + 0.05 per token: 4 nodes each (3 tokens for 1.8) beats 2 (2.9 for 1.4) and 8.
    linear = synthetic({1: 1.0, 101: 6.0}, {1: 0.0, 8: 0.0})
    assert BudgetChooser(linear).choose([CURVE] * 4, 0, drafted=True) == 4
    # The draft's cost counts only while it is not yet spent: before the pass, a dear draft means AR.
    dear_draft = dataclasses.replace(linear, draft_s=(5.0, 5.0))
    assert BudgetChooser(dear_draft).choose([CURVE] * 4, 0, drafted=False) == 1
    assert BudgetChooser(dear_draft).choose([CURVE] * 4, 0, drafted=True) == 4
    # 60 sequences stepping AR anyway raise the step's rate: a node must now bring 0.05 s worth of it (0.76
    # tokens), and only the sure second node does.
    assert BudgetChooser(linear).choose([CURVE], 60, drafted=True) == 2


def test_calibration_scales_the_drafts_word():
    linear = synthetic({1: 1.0, 101: 6.0}, {1: 0.0, 8: 0.0})
    chooser = BudgetChooser(linear)
    assert chooser.scale == 1.0
    chooser.observe(predicted=96.0, accepted=0)  # the draft promised much and the target took nothing
    assert chooser.scale == pytest.approx(4 / 100)
    assert chooser.choose([CURVE] * 4, 0, drafted=True) == 1


def test_cut_tree_and_round_curves_agree_at_every_budget():
    """The chooser's curves of a lookup tree (cost_model.round_curves) describe the trees cut_tree verifies: at
    budget b the draft's best nodes it keeps, the chain's first tokens (all at the tree's own budget, at most
    half of a smaller one) merged in, and the chain nodes the draft does not hold."""
    torch.manual_seed(0)
    tree = TreeConfig(budget=24, topk=3, max_depth=6, lookup=6)
    logits = torch.randn(6, 12) * 3
    draft = build_tree(5, logits, tree.budget - tree.lookup, tree.topk, tree.max_depth)
    best = [int(logits[d].argmax()) for d in range(6)]
    for chain in ([], best[:2] + [11, 11], best[:6], [11, 10, 9]):  # none, shared then not, all shared, none shared
        curve, own = round_curves(draft, chain, tree)
        expected = draft.expected_accepted().tolist()
        assert (own is None) == (not chain) and len(curve) == (tree.budget if chain else draft.size)
        assert cut_tree(draft, chain, tree, 1) == (None, 0)
        for budget in range(2, len(curve) + 1):
            cut, draft_nodes = cut_tree(draft, chain, tree, budget)
            kept = len(chain) if budget == tree.budget else min(len(chain), budget // 2)
            assert draft_nodes == min(budget - kept, draft.size) and cut.size <= budget
            assert curve[budget - 1] == pytest.approx(expected[draft_nodes - 1])
            assert cut.size - draft_nodes == (own[budget - 1] if chain else 0)
            assert torch.equal(cut.tokens[:draft_nodes], draft.tokens[:draft_nodes])
            node = 0  # the chain's first `kept` tokens are a path from the root
            for token in chain[:kept]:
                node = cut.children[node][token]
        whole, draft_nodes = cut_tree(draft, chain, tree, None)
        assert draft_nodes == draft.size and whole.size == draft.size + (own[-1] if chain else 0)


def test_lookup_chain_nodes_count_at_their_measured_rate():
    """A chain's own nodes carry no draft probability: the chooser values them at accepted / offered, measured."""
    chooser = BudgetChooser(FLAT)
    assert chooser.chain_rate == pytest.approx(1 / 8)
    linear = synthetic({1: 1.0, 101: 6.0}, {1: 0.0, 8: 0.0})
    flat_draft = [[0.0] * 8] * 4  # the draft is never right
    chain = [[0, 0, 0, 1, 2, 3, 4, 4]] * 4
    assert BudgetChooser(linear).choose(flat_draft, 0, drafted=True, chains=chain) == 1
    sure_chain = BudgetChooser(linear)
    sure_chain.observe(predicted=0.0, accepted=0, chain_offered=100, chain_accepted=99)
    assert sure_chain.chain_rate == pytest.approx(100 / 108)
    assert sure_chain.choose(flat_draft, 0, drafted=True, chains=chain) == 8
