"""The engine bench's FP8 comparison on the CPU: the random target written as an FP8 checkpoint is what the engine's
FP8 loader reads (and close to the unquantized model), the --fp8 flag's device check, and the FP8 rows of the report
and plot (a synthetic report: no GPU)."""

import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file

from jetspec_trt.bench.engine_bench import (FP8_INPUT_AMAX, BenchConfig, fp8_sections, write_fp8_target,
                                            write_report)
from jetspec_trt.models.checkpoint import load_target
from jetspec_trt.models.config import load_hf_config
from jetspec_trt.models.fp8 import FP8_DTYPE, read_fp8_format
from jetspec_trt.models.presets import preset, write_random_pair
from jetspec_trt.plugins.fp8_gemm import FP8_MAX
from tests.helpers import FP8_TEST_SHAPE_STD, invoke_cli

TEXT = list(b"The quick brown fox jumps over the lazy dog. def add(a, b): return a + b")


def rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module")
def tiny_target(tmp_path_factory):
    """The tiny preset's target (bf16 checkpoint) at the small weight std the FP8 tests use (tests.helpers)."""
    root = tmp_path_factory.mktemp("tiny")
    write_random_pair(dataclasses.replace(preset("tiny"), init_std=FP8_TEST_SHAPE_STD), root / "target",
                      root / "draft")
    return root / "target"


@pytest.mark.parametrize("recipe", [None, "per-tensor"], ids=["default", "per-tensor"])
def test_fp8_target_is_what_the_fp8_loader_reads(tiny_target, tmp_path, recipe):
    """By default the build's default recipe, per-channel-tail-bf16 (what `bench --fp8` times): one weight scale
    per row, dynamic per-token inputs, the last 3 layers' MLPs unquantized; or per-tensor scales, one amax per fused
    group, with static input scales."""
    # As the bench holds it: bf16, q/k/v and gate/up fused (the projections' weights are views of the fused ones)
    target = load_target(tiny_target, torch.bfloat16, fused_gemm=True)
    out = write_fp8_target(target, load_hf_config(tiny_target), tmp_path / "fp8", torch.bfloat16,
                           **({} if recipe is None else {"recipe": recipe}))
    per_channel = recipe is None
    fmt = read_fp8_format(out)
    kept = {"model.layers.3.mlp*", "model.layers.4.mlp*", "model.layers.5.mlp*"} if per_channel else set()
    assert (fmt.method, set(fmt.excluded)) == ("modelopt", {"lm_head"} | kept)
    assert (fmt.weight_scales, fmt.activation_scheme) == (("per-channel", "dynamic") if per_channel else
                                                          ("per-tensor", "static"))
    tensors = load_file(str(out / "model.safetensors"))
    assert tensors["model.embed_tokens.weight"].dtype == torch.bfloat16 and "lm_head.weight" not in tensors  # tied
    assert tensors["model.norm.weight"].dtype == torch.bfloat16
    for layer in range(6):
        prefix = f"model.layers.{layer}"
        for group in (("q_proj", "k_proj", "v_proj"), ("o_proj",), ("gate_proj", "up_proj"), ("down_proj",)):
            module = "mlp" if group[0] in ("gate_proj", "up_proj", "down_proj") else "self_attn"
            weights = [getattr(getattr(target.layers[layer], module), p).weight.detach().float() for p in group]
            amax = max(float(w.abs().max()) for w in weights)
            for p, w in zip(group, weights):
                name = f"{prefix}.{module}.{p}"
                if per_channel and module == "mlp" and layer >= 3:  # the tail MLPs: as the bf16 model has them
                    assert torch.equal(tensors[f"{name}.weight"], w.bfloat16())
                    assert f"{name}.weight_scale" not in tensors
                    continue
                assert tensors[f"{name}.weight"].dtype == FP8_DTYPE
                if per_channel:  # one scale per row, each row's own amax; no input scale (per token)
                    assert torch.allclose(tensors[f"{name}.weight_scale"], w.abs().amax(dim=1) / FP8_MAX)
                    assert f"{name}.input_scale" not in tensors
                else:  # one weight amax per fused group, as build --quantize fp8 shares it
                    assert float(tensors[f"{name}.weight_scale"]) == pytest.approx(amax / FP8_MAX)
                    assert float(tensors[f"{name}.input_scale"]) == pytest.approx(FP8_INPUT_AMAX / FP8_MAX)

    # The CPU runs an FP8 checkpoint dequantized (the reference): within FP8's error of the unquantized model
    reference = load_target(tiny_target).prefill(TEXT).logits
    dequantized = load_target(out)
    assert dequantized.layers[0].self_attn.q_proj.weight.dtype == torch.float32
    logits = dequantized.prefill(TEXT).logits
    assert 1e-4 < rel(logits, reference) < 0.15
    # per-token activations flip more of the tiny random model's near ties (0.74 here, as a hand-written
    # per-channel checkpoint of it gives: tests/models/test_fp8.py holds modelopt's to 0.7; per-tensor 0.89)
    assert float((logits.argmax(-1) == reference.argmax(-1)).float().mean()) >= (0.7 if per_channel else 0.8)
    # As the GPU engine loads it: FP8 weights and GEMMs (torch's CPU kernel here), the static input scales in use
    # where there are any; fusing takes the scales as they are (per tensor: shared; per channel: concatenated), so
    # the fused weights are the stored ones, not requantized
    fp8 = load_target(out, keep_fp8=True, fused_gemm=True)
    attn = fp8.layers[0].self_attn
    assert attn.qkv_weight.dtype == FP8_DTYPE and (attn.qkv_input_scale is None) == per_channel
    stored = torch.cat([tensors[f"model.layers.0.self_attn.{p}.weight"] for p in ("q_proj", "k_proj", "v_proj")])
    assert torch.equal(attn.qkv_weight.view(torch.uint8), stored.view(torch.uint8))
    assert attn.qkv_weight_scale.shape == ((stored.shape[0],) if per_channel else ())
    assert fp8.layers[5].mlp.gate_up_weight.dtype == (torch.float32 if per_channel else FP8_DTYPE)
    assert fp8.lm_head.weight.dtype == torch.float32
    assert rel(fp8.prefill(TEXT).logits, reference) < 0.2


@pytest.mark.parametrize("gpu", [None, ("NVIDIA A100-SXM4-80GB", (8, 0))])
def test_fp8_flag_needs_an_fp8_gpu(monkeypatch, tmp_path, capsys, gpu):
    """One line and exit code 2, before any model is made: on a machine without CUDA and on a GPU without FP8."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpu is not None)
    if gpu is not None:
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: gpu[0])
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: gpu[1])
    code, out, err = invoke_cli(["bench", "--random-target", "tiny", "--fp8", "--output-dir", str(tmp_path)], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "--fp8" in err and "compute capability 8.9+" in err
    assert ("no CUDA GPU" in err) if gpu is None else ("A100-SXM4-80GB is 8.0" in err)
    assert not list(tmp_path.iterdir())


def test_fp8_flag_reaches_the_bench_config(monkeypatch, tmp_path):
    from click.testing import CliRunner

    import jetspec_trt.bench.engine_bench as engine_bench
    from jetspec_trt.bench_command import bench_command

    seen = []
    monkeypatch.setattr(engine_bench, "run_bench", lambda cfg, command=None: seen.append(cfg) or tmp_path / "e.json")
    for args, wanted in ((["--fp8"], True), (["--no-fp8"], False), ([], False)):
        result = CliRunner().invoke(bench_command, args + ["--output-dir", str(tmp_path)])
        assert result.exit_code == 0, result.output
        assert seen[-1].compare_fp8 is wanted


CONTEXTS, BUDGETS = (512, 2048), (16, 64)


def _rounds(scale: float) -> list[dict]:
    rows = []
    for c in CONTEXTS:
        for b in BUDGETS:
            split = {f"{s}_ms": scale * (0.1 + b / 500) for s in ("draft", "tree", "verify", "accept")}
            ms = sum(split.values())
            rows.append(dict(split, budget=b, context=c, round_ms=ms, vs_ar_step=ms / scale,
                             projected_tok_s={"5.94": 5940 / ms, "10.76": 10760 / ms}))
    return rows


def _steps(ms: float) -> list[dict]:
    return [{"context": c, "step_ms": ms * (1 + c / 8192), "tok_s": 1000 / (ms * (1 + c / 8192))} for c in CONTEXTS]


def _breakdown(weight_bytes: float, step_ms: float) -> dict:
    return {"context": 2048, "weight_bytes": weight_bytes, "floor_ms": weight_bytes / 4.4e9, "step_ms": step_ms,
            "gemms_cublas_ms": 0.8 * step_ms, "gemms_gemv_ms": 0.7 * step_ms, "rest_of_step_ms": 0.2 * step_ms}


class FakeFp8Bench:
    """What fp8_sections calls on the FP8 engine's EngineBench, with fixed times (FP8 = 0.6 x the bf16 ones)."""

    def __init__(self):
        self.cfg = BenchConfig(contexts=CONTEXTS, budgets=BUDGETS)
        self.decoder = self
        self.gemv = self.tree_kernel = self.small_m = False

    def set_decode_gemv(self, enabled):
        self.gemv = enabled

    def set_tree_kernel(self, enabled):
        self.tree_kernel = enabled

    def round_splits(self, tree_at=None):
        if tree_at is None:  # the tree kernel's rounds
            assert self.tree_kernel and not self.small_m
            scale = 0.5
        else:  # the defaults' rounds with the small-M switch, each at the default tree
            assert self.small_m and all(tree_at(b) == b for b in BUDGETS)
            scale = 0.3
        return [{k: v for k, v in r.items() if k not in ("vs_ar_step", "projected_tok_s")} for r in _rounds(scale)]

    def ar_breakdown(self, context):
        return _breakdown(8.2e9, 3.6)

    def ar_steps_and_rounds(self, breakdown, progress):
        return _steps(3.6), _rounds(0.6)

    def ar_step_row(self, context, breakdown, gemms="gemms_cublas_ms"):
        assert self.gemv and gemms == "gemms_gemv_ms"
        return next(r for r in _steps(3.0) if r["context"] == context)

    def ar_generate_tok_s(self):
        assert self.gemv
        return {"prompt_tokens": 128, "new_tokens": 128, "decode_s": 0.4, "decode_tok_s": 127 / 0.4}

    def engine_default_rows(self, breakdown, progress):
        return _steps(2.8), _rounds(0.4)

    def set_small_m_gemm(self, enabled):
        self.small_m = enabled

    def default_tree(self, budget):
        return budget

    def agreement(self):
        return {"prompts": 2, "tokens": 16, "identical": 2, "first_divergence_at": []}


def synthetic_report() -> dict:
    report = {"device": "NVIDIA H200", "model": "qwen3-8b (random weights)", "date": "2026-01-01T00:00:00+00:00",
              "ar_breakdown": _breakdown(16.4e9, 6.0), "ar_step": _steps(6.0), "rounds": _rounds(1.0),
              "ar_step_gemv": _steps(5.0), "ar_generate_gemv": {"decode_tok_s": 180.0},
              "rounds_tree_kernel": _rounds(0.8), "ar_step_defaults": _steps(4.0), "rounds_defaults": _rounds(0.7),
              "fp8": {"format": "fp8 e4m3 per-channel (modelopt, dynamic activation scales)",
                      "recipe": "per-channel-tail-bf16"}}
    report.update(fp8_sections(FakeFp8Bench(), report, progress=None))
    return report


def test_fp8_rows_stand_beside_the_bf16_ones():
    report = synthetic_report()
    breakdown = report["ar_breakdown_fp8"]
    assert breakdown["floor_ms"] == pytest.approx(8.2e9 / 4.4e9)  # the FP8 floor: its own bytes over the read rate
    assert breakdown["vs_bf16"]["weight_bytes"] == pytest.approx(0.5)
    assert breakdown["vs_bf16"]["step_ms"] == pytest.approx(0.6)
    assert [(r["context"], r["budget"]) for r in report["rounds_fp8"]] == [(c, b) for c in CONTEXTS for b in BUDGETS]
    assert all(r["vs_bf16"] == pytest.approx(0.6) for r in report["rounds_fp8"])
    assert all(r["vs_bf16"] == pytest.approx(0.5 / 0.8) for r in report["rounds_tree_kernel_fp8"])
    assert all(r["vs_bf16"] == pytest.approx(0.6) for r in report["ar_step_fp8"])
    assert all(r["vs_bf16"] == pytest.approx(0.6) for r in report["ar_step_gemv_fp8"])
    assert report["ar_generate_gemv_fp8"]["vs_bf16_tok_s"] == pytest.approx(127 / 0.4 / 180)
    # the engines' defaults, FP8 beside bf16
    assert all(r["vs_bf16"] == pytest.approx(2.8 / 4.0) for r in report["ar_step_defaults_fp8"])
    assert all(r["vs_bf16"] == pytest.approx(0.4 / 0.7) for r in report["rounds_defaults_fp8"])
    assert report["agreement_defaults_fp8"]["identical"] == 2
    # the defaults' rounds with the small-M switch (verify's FP8 GEMMs on the skinny kernel), beside the defaults'
    rows = report["rounds_defaults_small_m_fp8"]
    assert [(r["context"], r["budget"]) for r in rows] == [(c, b) for c in CONTEXTS for b in BUDGETS]
    assert all(r["vs_defaults"] == pytest.approx(0.3 / 0.4) for r in rows)
    assert report["agreement_defaults_small_m_fp8"]["prompts"] == 2


def test_report_and_plot_with_the_fp8_sections(tmp_path):
    report = synthetic_report()
    path = write_report(report, BenchConfig(random_target="qwen3-8b", output_dir=tmp_path, tag="fp8"))
    assert path.name == "engine-qwen3-8b-h200-fp8.json"
    assert json.loads(path.read_text())["rounds_fp8"] == report["rounds_fp8"]
    png = path.with_suffix(".png")
    assert png.is_file() and png.stat().st_size > 10_000
    # a report without the FP8 sections still plots (files written before --fp8, or runs without it)
    bf16_only = {k: v for k, v in report.items() if "fp8" not in k}
    write_report(bf16_only, BenchConfig(random_target="qwen3-8b", output_dir=tmp_path, tag="bf16"))
    assert (tmp_path / "engine-qwen3-8b-h200-bf16.png").is_file()
