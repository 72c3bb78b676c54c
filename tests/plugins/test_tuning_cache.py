"""The kernel tuning cache (kernels/tuning.json) without a GPU: file format, lookup by GPU name, the fallback to
default_launch, the shapes an engine tunes, and what a CPU build records."""

from __future__ import annotations

import json

import pytest
import torch

from jetspec_trt.builders.engine_builder import BuildConfig, build_engine
from jetspec_trt.builders.kernel_tuning import engine_shapes, tuning_contexts
from jetspec_trt.errors import JetSpecError
from jetspec_trt.models.config import DecoderConfig, load_hf_config
from jetspec_trt.models.presets import write_random_pair
from jetspec_trt.plugins.tree_attention_tuner import candidates
from jetspec_trt.plugins.triton_tree_attention import (LaunchConfig, LaunchKey, clear_tuned_launches, default_launch,
                                                       install_tuned_launches, launch_for)
from jetspec_trt.plugins.tuning_cache import (TUNING_FILE, GpuTuning, TunedLaunch, TuningCache, choose_launches)
from jetspec_trt.runtime.config import RuntimeConfig, TreeConfig
from jetspec_trt.runtime.engine import Engine

GPU = "NVIDIA Fake 80GB HBM3"
KEY = LaunchKey(tokens=1, num_heads=4, num_kv_heads=2, head_dim=32, page_size=64, dtype="bfloat16")
TUNED = LaunchConfig(block_m=16, block_n=128, warps=4, stages=4, splits=16)


def fake_tuning(gpu: str = GPU) -> GpuTuning:
    default = default_launch(1, 4, 2, 32, torch.bfloat16)
    entry = TunedLaunch("decode", KEY, TUNED, default, (512, 2048), (9.5, 12.0), (10.5, 14.0))
    return GpuTuning(gpu, (entry,), {"torch": "2.11", "triton": "3.6"}, "2026-01-01T00:00:00+00:00", 3.25)


@pytest.fixture
def tuned_launches():
    clear_tuned_launches()
    yield
    clear_tuned_launches()


def test_cache_round_trips(tmp_path):
    cache = TuningCache().with_gpu(fake_tuning()).with_gpu(fake_tuning("Other GPU"))
    path = cache.save(tmp_path)
    assert path == tmp_path / TUNING_FILE
    raw = json.loads(path.read_text())
    assert raw["format_version"] == 1 and set(raw["gpus"]) == {GPU, "Other GPU"}
    entry = raw["gpus"][GPU]["entries"][0]
    assert entry["key"]["tokens"] == 1 and entry["launch"]["block_n"] == 128 and entry["us"] == [9.5, 12.0]
    assert TuningCache.load(tmp_path) == cache


def test_lookup_by_gpu_name(tmp_path):
    TuningCache().with_gpu(fake_tuning()).save(tmp_path)
    choice = choose_launches(tmp_path, GPU)
    assert choice.launches == {KEY: TUNED}
    assert choice.summary.startswith(f"tuned launches for {GPU}")


def test_other_gpu_falls_back_to_default_launch(tmp_path):
    TuningCache().with_gpu(fake_tuning()).save(tmp_path)
    choice = choose_launches(tmp_path, "NVIDIA H200")
    assert choice.launches == {}
    assert choice.summary.startswith("default_launch") and "no entry for NVIDIA H200" in choice.summary
    assert GPU in choice.summary  # names the GPU it was tuned on


def test_engine_without_cache_falls_back(tmp_path):
    choice = choose_launches(tmp_path, GPU)
    assert choice.launches == {} and "has no kernels/tuning.json" in choice.summary


@pytest.mark.parametrize("content", ["{not json", '{"format_version": 99, "gpus": {}}', '{"format_version": 1}'])
def test_unreadable_cache_is_a_one_line_error(tmp_path, content):
    (tmp_path / "kernels").mkdir()
    (tmp_path / TUNING_FILE).write_text(content)
    with pytest.raises(JetSpecError, match="unreadable kernel tuning cache") as info:
        TuningCache.load(tmp_path)
    assert "\n" not in str(info.value)
    choice = choose_launches(tmp_path, GPU)  # an engine still loads, with default launches
    assert choice.launches == {} and choice.summary.startswith("default_launch: ") and "unreadable" in choice.summary


def test_installed_launch_is_used_for_its_shape_only(tuned_launches):
    assert launch_for(1, 4, 2, 32, 64, torch.bfloat16) == default_launch(1, 4, 2, 32, torch.bfloat16)
    install_tuned_launches({KEY: TUNED})
    assert launch_for(1, 4, 2, 32, 64, torch.bfloat16) == TUNED
    assert launch_for(1, 4, 2, 32, 64, torch.float16) == default_launch(1, 4, 2, 32, torch.float16)  # other dtype
    assert launch_for(1, 4, 2, 32, 16, torch.bfloat16) == default_launch(1, 4, 2, 32, torch.bfloat16)  # other page
    assert launch_for(8, 4, 2, 32, 64, torch.bfloat16) == default_launch(8, 4, 2, 32, torch.bfloat16)  # other T


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("pair")
    write_random_pair("tiny", root / "target", root / "draft")
    return root


def test_engine_shapes(pair):
    target = DecoderConfig.from_hf(load_hf_config(pair / "target"))
    draft = DecoderConfig.from_hf(load_hf_config(pair / "draft"))
    runtime = RuntimeConfig(TreeConfig(64, 4, 7), "bfloat16", 1024, 8, 259, (1, 3), page_size=16)
    shapes = dict(engine_shapes(runtime, target, draft))
    assert shapes == {
        "decode": LaunchKey(1, 4, 2, 32, 16, "bfloat16"),
        "verify": LaunchKey(64, 4, 2, 32, 16, "bfloat16"),  # min(budget, full tree size) nodes
        "draft": LaunchKey(8, 4, 2, 32, 16, "bfloat16"),  # the block
    }
    ar = RuntimeConfig(TreeConfig(1, 4, 7), "bfloat16", 1024, 8, 259, (1, 3), page_size=16)
    assert [role for role, _ in engine_shapes(ar, target, draft)] == ["decode"]
    assert tuning_contexts(runtime) == (512, 1024)


@pytest.mark.parametrize("key", [KEY, LaunchKey(256, 32, 8, 128, 64, "bfloat16"), LaunchKey(16, 32, 8, 128, 64,
                                                                                               "float32")])
def test_candidates_start_with_the_default_and_are_valid(key):
    configs = candidates(key)
    assert configs[0] == default_launch(key.tokens, key.num_heads, key.num_kv_heads, key.head_dim,
                                        getattr(torch, key.dtype))
    assert len(set(configs)) == len(configs) and 3 <= len(configs) <= 7
    # not the fused merge: its memory ordering across programs has not run on a GPU yet (docs/engine.md)
    assert not any(cfg.fused_merge for cfg in configs)
    for cfg in configs:
        assert cfg.block_n % 32 == 0 and cfg.splits & (cfg.splits - 1) == 0 and 1 <= cfg.splits <= 64


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU build")
def test_cpu_build_skips_tuning_and_says_why(pair, tmp_path):
    engine = build_engine(BuildConfig(pair / "target", pair / "draft", tmp_path / "e", TreeConfig(16, 3, 7),
                                      "float32", max_seq_len=256, progress=False))
    assert json.loads((engine / "manifest.json").read_text())["kernel_tuning"] == "skipped: no CUDA"
    assert not (engine / "kernels").exists()
    assert json.loads((engine / "runtime_config.json").read_text())["decode_gemv"] is True  # the default
    assert Engine.load(engine).summary["kernel_tuning"] == "not used on cpu (reference attention)"
    engine = build_engine(BuildConfig(pair / "target", pair / "draft", tmp_path / "e", TreeConfig(16, 3, 7),
                                      "float32", max_seq_len=256, progress=False, overwrite=True, tune=False))
    assert json.loads((engine / "manifest.json").read_text())["kernel_tuning"] == "skipped: --no-tune"


def test_no_tune_no_fuse_no_decode_gemv_flags(pair, tmp_path, capsys):
    from tests.helpers import invoke_cli

    code, _, err = invoke_cli(["build", "--target", str(pair / "target"), "--draft", str(pair / "draft"),
                               "--output", str(tmp_path / "e"), "--dtype", "float32", "--budget", "16",
                               "--no-tune", "--no-fuse", "--no-decode-gemv"], capsys)
    assert code == 0, err
    manifest = json.loads((tmp_path / "e" / "manifest.json").read_text())
    assert manifest["kernel_tuning"] == "skipped: --no-tune" and manifest["weights"]["layout"] == "hugging-face"
    assert json.loads((tmp_path / "e" / "runtime_config.json").read_text())["decode_gemv"] is False


class FakeProblem:
    ctx_len = torch.zeros(1, dtype=torch.int32)

    def run(self, launch):
        return torch.ones(4)


@pytest.mark.parametrize("speeds, expected", [
    ({1: 0.90, 2: 0.80}, 2),  # the fastest candidate wins
    ({1: 0.99}, 0),  # under MIN_GAIN (3%) faster is noise: the default stays
    ({1: 0.50, 3: 0.40}, 1),  # candidate 3 is faster but its output does not match the default's
    ({2: 0.50, 4: 0.30}, 2),  # candidate 4 fails to compile
])
def test_tuner_selection(monkeypatch, speeds, expected):
    """The tuner's choice, with the GPU parts faked: times are the default's times scaled per candidate."""
    import jetspec_trt.plugins.tree_attention_tuner as tuner

    configs = candidates(KEY)
    base_us = (10.0, 20.0)

    def time_us(problem, launch, contexts):
        index = configs.index(launch)
        if index == 4:
            raise RuntimeError("out of shared memory")
        return tuple(t * speeds.get(index, 1.0 if index == 0 else 1.1) for t in base_us)

    monkeypatch.setattr(tuner, "_problem", lambda key, role, max_context: FakeProblem())
    monkeypatch.setattr(tuner, "_time_us", time_us)
    monkeypatch.setattr(tuner, "_matches", lambda problem, launch, reference: configs.index(launch) != 3)
    entry = tuner.tune_shape("decode", KEY, (512, 2048), deadline=float("inf"))
    assert entry.launch == configs[expected] and entry.default == configs[0]
    assert entry.default_us == base_us and entry.us == time_us(None, configs[expected], None)
    assert tuner.tune_shape("decode", KEY, (512, 2048), deadline=0.0).launch == configs[0]  # out of time
