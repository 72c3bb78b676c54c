"""On CUDA: `jetspec-trt build` tunes the tree-attention launches for the engine's shapes, caches them in
kernels/tuning.json under this GPU's name, and Engine.load installs them (or falls back to default_launch)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import transformers

from jetspec_trt.builders.engine_builder import BuildConfig, build_engine
from jetspec_trt.builders.kernel_tuning import engine_shapes
from jetspec_trt.models.config import DecoderConfig
from jetspec_trt.models.presets import preset, write_random_pair
from jetspec_trt.plugins.tree_attention_tuner import TIME_BUDGET_S, candidates, tune_launches
from jetspec_trt.plugins.triton_tree_attention import clear_tuned_launches, default_launch, launch_for
from jetspec_trt.plugins.tuning_cache import TUNING_FILE, TuningCache
from jetspec_trt.runtime.config import RuntimeConfig, TreeConfig
from jetspec_trt.runtime.engine import Engine

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def no_leftover_launches():
    clear_tuned_launches()
    yield
    clear_tuned_launches()


@pytest.fixture(scope="module")
def engine_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("tuned")
    write_random_pair("tiny", root / "target", root / "draft")
    return build_engine(BuildConfig(root / "target", root / "draft", root / "engine", TreeConfig(64, 4, 7),
                                    "bfloat16", max_seq_len=1024, progress=False))


def chosen(key):
    return launch_for(key.tokens, key.num_heads, key.num_kv_heads, key.head_dim, key.page_size,
                      getattr(torch, key.dtype))


def test_build_writes_tuning_for_this_gpu(engine_dir):
    gpu = torch.cuda.get_device_name()
    summary = json.loads((engine_dir / "manifest.json").read_text())["kernel_tuning"]
    assert summary["gpu"] == gpu and summary["file"] == str(TUNING_FILE)
    tuning = TuningCache.load(engine_dir).for_gpu(gpu)
    assert {e.role for e in tuning.entries} == {"decode", "verify", "draft"}
    assert {e.role: e.key.tokens for e in tuning.entries} == {"decode": 1, "verify": 64, "draft": 8}
    for e in tuning.entries:
        assert e.contexts == (512, 1024) and len(e.us) == len(e.default_us) == 2
        assert all(t > 0 for t in e.us + e.default_us)
        assert e.launch in candidates(e.key) and sum(e.us) <= sum(e.default_us)
    assert tuning.seconds < 2 * TIME_BUDGET_S


def test_engine_load_installs_this_gpus_entry(engine_dir):
    gpu = torch.cuda.get_device_name()
    engine = Engine.load(engine_dir, device="cuda")
    assert engine.summary["kernel_tuning"].startswith(f"tuned launches for {gpu}")
    for e in TuningCache.load(engine_dir).for_gpu(gpu).entries:
        assert chosen(e.key) == e.launch
    # The build's fused tensors are used as stored: one GEMM each, the separate weights are views of them.
    attn, mlp = engine.decoder.target.layers[0].self_attn, engine.decoder.draft.layers[0].mlp
    assert attn.fused_gemm and mlp.fused_gemm
    assert attn.k_proj.weight.untyped_storage().data_ptr() == attn.qkv_weight.untyped_storage().data_ptr()
    assert engine.summary["weights"].startswith("fused at build")
    assert engine.generate("def fibonacci(n):", max_new_tokens=32).token_ids


def test_other_gpu_or_no_cache_falls_back_to_default_launch(engine_dir, tmp_path):
    gpu = torch.cuda.get_device_name()
    other = tmp_path / "other"
    shutil.copytree(engine_dir, other)
    path = other / TUNING_FILE
    raw = json.loads(path.read_text())
    raw["gpus"] = {"Some Other GPU": raw["gpus"][gpu]}
    path.write_text(json.dumps(raw))
    engine = Engine.load(other, device="cuda")
    assert engine.summary["kernel_tuning"].startswith("default_launch") and f"no entry for {gpu}" in \
        engine.summary["kernel_tuning"]
    for e in TuningCache.load(engine_dir).for_gpu(gpu).entries:
        k = e.key
        assert chosen(k) == default_launch(k.tokens, k.num_heads, k.num_kv_heads, k.head_dim, getattr(torch, k.dtype))
    shutil.rmtree(other / "kernels")
    assert "has no kernels/tuning.json" in Engine.load(other, device="cuda").summary["kernel_tuning"]


@pytest.mark.slow
def test_tuning_qwen3_8b_shapes_is_short():
    """The real shapes (Qwen3-8B + its head, budget 256, bf16) tune within the budget (Triton compiles included)."""
    shape = preset("qwen3-8b")
    target = DecoderConfig.from_hf(transformers.Qwen3Config(**shape.target_config()))
    runtime = RuntimeConfig(TreeConfig(256, 7, 15), "bfloat16", 4096, shape.block_size, shape.mask_token_id,
                            (1, 9, 17, 25, 33))
    tuning = tune_launches(engine_shapes(runtime, target, target), (512, 2048, 4096))
    print(json.dumps(tuning.to_dict(), indent=1))
    assert len(tuning.entries) == 3 and tuning.seconds < 30
