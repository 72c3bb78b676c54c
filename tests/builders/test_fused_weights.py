"""Build-time weight fusion: an engine stores one qkv_proj and one gate_up_proj tensor per layer, loads them as they
are (the q/k/v and gate/up weights are views, one copy in memory), and reproduces the unfused checkpoint's logits
bit for bit on the CPU reference path (fp32), for Qwen3 (q/k norm, no bias) and Qwen2 (q/k/v bias) targets."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from jetspec_trt.builders.engine_builder import BuildConfig, build_engine
from jetspec_trt.builders.validate import check_pair
from jetspec_trt.errors import JetSpecError
from jetspec_trt.models.checkpoint import load_draft, load_hf_model, load_target, stored_names
from jetspec_trt.models.fused_layout import fuse_plan
from jetspec_trt.models.presets import preset, write_random_pair
from jetspec_trt.models.weights import write_weights
from jetspec_trt.plugins.tree_attention import causal_mask
from jetspec_trt.runtime.config import TreeConfig
from jetspec_trt.runtime.engine import Engine

TREE = TreeConfig(16, 3, 7)


def qwen2_target(directory: Path, tokenizer_from: Path) -> None:
    """A tiny Qwen2 (q/k/v bias) of the tiny preset's shape, so the preset's draft head fits it."""
    shape = preset("tiny")
    config = transformers.Qwen2Config(
        vocab_size=shape.vocab_size, hidden_size=shape.hidden_size, intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_layers, num_attention_heads=shape.num_heads, num_key_value_heads=shape.num_kv_heads,
        max_position_embeddings=shape.max_position_embeddings, tie_word_embeddings=True, eos_token_id=shape.eos_token_id)
    torch.manual_seed(0)
    model = transformers.Qwen2ForCausalLM(config).eval()
    with torch.no_grad():  # transformers initialises biases to zero, which would not test their fusion
        for name, param in model.named_parameters():
            param.normal_(0.0, 0.1 if name.endswith("bias") else shape.init_std)
    model.save_pretrained(directory)
    for item in tokenizer_from.iterdir():
        if item.name not in ("config.json", "model.safetensors"):
            shutil.copy2(item, directory / item.name)


@pytest.fixture(scope="module", params=["qwen3", "qwen2"])
def built(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    write_random_pair("tiny", root / "target", root / "draft")
    if request.param == "qwen2":
        shutil.move(root / "target", root / "qwen3-target")
        qwen2_target(root / "target", root / "qwen3-target")
    engine = build_engine(BuildConfig(root / "target", root / "draft", root / "engine", TREE, "float32",
                                      max_seq_len=256, progress=False, tune=False))
    return request.param, root, engine


def forward(target, draft, capture):
    """Target logits and features over a prompt, then the draft head's block hidden states (fp32, CPU)."""
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, target.config.vocab_size, (40,), generator=g)
    with torch.no_grad():
        out = target(tokens, torch.arange(40), target.new_cache(64, 16), causal_mask(40), capture)
        cache = draft.new_cache(64, 16)
        draft.extend_context(out.features, torch.arange(40), cache)
        block = target.embed_tokens(torch.randint(0, target.config.vocab_size, (8,), generator=g))
        hidden = draft.propose(block, torch.arange(40, 48), cache, causal_mask(8))
    return out.logits, out.features, hidden


def test_engine_stores_fused_tensors(built):
    kind, root, engine = built
    manifest = json.loads((engine / "manifest.json").read_text())
    assert manifest["format_version"] == 2
    assert manifest["weights"] == {"layout": "fused", "fused": {
        "self_attn.qkv_proj": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
        "mlp.gate_up_proj": ["mlp.gate_proj", "mlp.up_proj"]}}
    for role in ("target", "draft"):
        names = set(stored_names(engine / role))
        assert not any(re.search(r"\.(q|k|v|gate|up)_proj\.", n) for n in names)
        assert sum(n.endswith("self_attn.qkv_proj.weight") for n in names) == json.loads(
            (engine / role / "config.json").read_text())["num_hidden_layers"]
    target_names = set(stored_names(engine / "target"))
    assert ("model.layers.0.self_attn.qkv_proj.bias" in target_names) == (kind == "qwen2")
    fused = load_file(str(engine / "target" / "model.safetensors"))
    prefix = "model." if kind == "qwen2" else ""
    source = load_file(str(root / "target" / "model.safetensors"))
    parts = [source[f"{prefix}layers.1.self_attn.{p}_proj.weight"].float() for p in "qkv"]
    assert torch.equal(fused[f"{prefix}layers.1.self_attn.qkv_proj.weight"], torch.cat(parts))


def test_fused_engine_reproduces_unfused_checkpoint_exactly(built):
    _, root, engine_dir = built
    engine = Engine.load(engine_dir)
    ids = engine.runtime.target_layer_ids
    expected = forward(load_target(root / "target"), load_draft(root / "draft"), ids)
    got = forward(engine.decoder.target, engine.decoder.draft, ids)
    for e, g in zip(expected, got):
        assert torch.equal(e, g)
    assert engine.summary["weights"].startswith("fused at build")


def test_fused_tensors_are_the_only_copy(built):
    _, _, engine_dir = built
    engine = Engine.load(engine_dir)
    for model in (engine.decoder.target, engine.decoder.draft):
        for layer in model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            assert not attn.fused_gemm and not mlp.fused_gemm  # the CPU reference path: separate GEMMs
            storage = attn.qkv_weight.untyped_storage().data_ptr()
            assert all(p.weight.untyped_storage().data_ptr() == storage for p in (attn.q_proj, attn.k_proj,
                                                                                   attn.v_proj))
            if attn.q_proj.bias is not None:
                assert attn.v_proj.bias.untyped_storage().data_ptr() == attn.qkv_bias.untyped_storage().data_ptr()
            storage = mlp.gate_up_weight.untyped_storage().data_ptr()
            assert mlp.gate_proj.weight.untyped_storage().data_ptr() == storage
            assert mlp.up_proj.weight.untyped_storage().data_ptr() == storage
        # state_dict keeps the Hugging Face names (the fused tensors are non-persistent buffers)
        assert not any("qkv" in n or "gate_up" in n for n in model.state_dict())


def test_fused_gemms_match(built):
    """The GPU engine's one-GEMM path (run here on the CPU) agrees with the separate GEMMs to rounding."""
    _, root, engine_dir = built
    fused = load_target(engine_dir / "target", fused_gemm=True), load_draft(engine_dir / "draft", fused_gemm=True)
    assert fused[0].layers[0].self_attn.fused_gemm and fused[1].layers[0].mlp.fused_gemm
    plain = load_target(root / "target"), load_draft(root / "draft")
    ids = tuple(fused[1].spec.target_layer_ids)
    for e, g in zip(forward(*plain, ids), forward(*fused, ids)):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)


def test_hugging_face_model_from_a_fused_engine(built):
    kind, root, engine_dir = built
    tokens = torch.arange(30)[None]
    with torch.no_grad():
        expected = transformers.AutoModelForCausalLM.from_pretrained(root / "target", dtype=torch.float32)(tokens)
        got = load_hf_model(engine_dir / "target")(tokens)
    assert torch.equal(expected.logits, got.logits)


def test_engine_target_is_a_valid_build_input(built, tmp_path):
    """A fused checkpoint passes the pair checks (split on the meta device) and rebuilds to the same engine."""
    _, _, engine_dir = built
    check_pair(engine_dir / "target", engine_dir / "draft")
    again = build_engine(BuildConfig(engine_dir / "target", engine_dir / "draft", tmp_path / "again", TREE,
                                     "float32", max_seq_len=256, progress=False, tune=False))
    for role in ("target", "draft"):
        assert load_file(str(again / role / "model.safetensors")).keys() == \
            load_file(str(engine_dir / role / "model.safetensors")).keys()


def test_no_fuse_keeps_the_hugging_face_layout(built, tmp_path):
    kind, root, engine_dir = built
    if kind == "qwen2":
        pytest.skip("one model is enough")
    out = build_engine(BuildConfig(root / "target", root / "draft", tmp_path / "plain", TREE, "float32",
                                   max_seq_len=256, progress=False, fuse=False, tune=False))
    assert json.loads((out / "manifest.json").read_text())["weights"] == {"layout": "hugging-face"}
    assert set(stored_names(out / "target")) == set(stored_names(root / "target"))
    engine = Engine.load(out)
    assert engine.decoder.target.layers[0].self_attn.qkv_weight is None
    assert engine.summary["weights"] == "Hugging Face layout"
    fused = Engine.load(engine_dir)
    ids = engine.runtime.target_layer_ids
    for e, g in zip(forward(engine.decoder.target, engine.decoder.draft, ids),
                    forward(fused.decoder.target, fused.decoder.draft, ids)):
        assert torch.equal(e, g)


def test_groups_split_across_source_shards(built, tmp_path):
    """A layer's q_proj and k/v_proj in different source shards still become one fused tensor; output shards
    past the size limit get a Hugging Face index."""
    _, root, engine_dir = built
    state = load_file(str(root / "target" / "model.safetensors"))
    names = sorted(state)
    first = [n for n in names if "q_proj" in n or "gate_proj" in n or "embed" in n]
    files = {"model-00001-of-00002.safetensors": first,
             "model-00002-of-00002.safetensors": [n for n in names if n not in first]}
    src = tmp_path / "sharded"
    shutil.copytree(root / "target", src, ignore=shutil.ignore_patterns("*.safetensors"))
    for file, members in files.items():
        save_file({n: state[n] for n in members}, str(src / file))
    (src / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {n: f for f, members in files.items() for n in members}}))
    dst = tmp_path / "fused"
    dst.mkdir()
    shutil.copy2(src / "config.json", dst / "config.json")
    written = write_weights(src, dst, fuse_plan, torch.float32, max_shard_bytes=64 << 10)
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1 and set(index["weight_map"]) == set(written)
    assert not (dst / "model.safetensors").exists()
    ids = (1, 3)
    plain = forward(load_target(root / "target"), load_draft(root / "draft"), ids)
    got = forward(load_target(dst), load_draft(root / "draft"), ids)
    for e, g in zip(plain, got):
        assert torch.equal(e, g)


def test_fused_tensor_with_wrong_rows_is_a_one_line_error(built, tmp_path):
    kind, _, engine_dir = built
    if kind == "qwen2":
        pytest.skip("one model is enough")
    shutil.copytree(engine_dir / "target", tmp_path / "target")
    path = tmp_path / "target" / "model.safetensors"
    state = load_file(str(path))
    state["layers.2.self_attn.qkv_proj.weight"] = state["layers.2.self_attn.qkv_proj.weight"][:-32].contiguous()
    save_file(state, str(path))
    for load in (lambda: load_target(tmp_path / "target"), lambda: check_pair(tmp_path / "target", engine_dir / "draft")):
        with pytest.raises(JetSpecError, match="layers.2.self_attn.qkv_proj.weight") as info:
            load()
        assert "\n" not in str(info.value)
