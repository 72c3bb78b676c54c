import json

import pytest
import torch

from jetspec_trt.errors import JetSpecError
from jetspec_trt.models.checkpoint import load_draft, save_draft
from jetspec_trt.models.presets import write_random_pair


@pytest.fixture()
def draft_dir(tmp_path):
    write_random_pair("tiny", tmp_path / "target", tmp_path / "draft")
    return tmp_path / "draft"


def test_round_trip_keeps_every_tensor_and_field(draft_dir, tmp_path):
    head = load_draft(draft_dir)
    save_draft(head, tmp_path / "copy", rope_theta=10000.0)
    again = load_draft(tmp_path / "copy")
    assert again.spec == head.spec
    for (name, a), (name_b, b) in zip(head.state_dict().items(), again.state_dict().items()):
        assert name == name_b and torch.equal(a, b)
    config = json.loads((tmp_path / "copy" / "config.json").read_text())
    assert config["dflash_config"]["causal_head"] is True
    assert config["block_size"] == head.spec.block_size
    names = set(again.state_dict())
    assert {"fc.weight", "hidden_norm.weight", "norm.weight", "layers.0.self_attn.q_norm.weight",
            "layers.1.mlp.down_proj.weight"} <= names
    assert not any("embed" in n or "lm_head" in n for n in names)  # the head reuses the target's


def test_jetspec_config_key_is_accepted(draft_dir):
    path = draft_dir / "config.json"
    config = json.loads(path.read_text())
    config["jetspec_config"] = config.pop("dflash_config")
    path.write_text(json.dumps(config))
    assert load_draft(draft_dir).spec.config_key == "jetspec_config"


def test_bidirectional_head_is_rejected(draft_dir):
    path = draft_dir / "config.json"
    config = json.loads(path.read_text())
    config["dflash_config"]["causal_head"] = False
    path.write_text(json.dumps(config))
    with pytest.raises(JetSpecError, match="causal_head"):
        load_draft(draft_dir)
