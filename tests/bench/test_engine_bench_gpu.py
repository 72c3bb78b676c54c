"""The engine bench end to end on CUDA at a tiny shape: every section it reports is there and well formed."""

import json

import pytest
import torch

from jetspec_trt.bench.engine_bench import BenchConfig, run_bench

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_engine_bench_reports_every_section(tmp_path):
    cfg = BenchConfig(random_target="tiny", budgets=(4, 16), contexts=(64,), topk=4, max_depth=7, reps=3,
                      ar_tokens=16, hf_generate=False, agreement_prompts=2, agreement_tokens=16,
                      compile_layers=False, kernel_profile=True, draft_vocab=64, output_dir=tmp_path, tag="tiny")
    report = json.loads(run_bench(cfg).with_suffix(".json").read_text())
    assert [r["budget"] for r in report["rounds"]] == [4, 16]
    for row in report["rounds"]:
        assert row["round_ms"] > 0 and all(row[f"{s}_ms"] > 0 for s in ("draft", "tree", "verify", "accept"))
    assert [(r["budget"], r["mode"]) for r in report["rounds_sampled"]] == [(4, "sample"), (16, "sample")]
    assert all(r["vs_greedy_round"] > 0 for r in report["rounds_sampled"])
    assert [r["budget"] for r in report["rounds_tree_kernel"]] == [4, 16]
    assert report["agreement_tree_kernel"]["prompts"] == 2
    assert [r["budget"] for r in report["rounds_small_m_gemm"]] == [4, 16]
    assert all(r["verify_ms"] > 0 for r in report["rounds_small_m_gemm"])
    assert report["agreement_small_m_gemm"]["prompts"] == 2
    assert [r["rows"] for r in report["small_m_gemms"]] == [16, 32, 64]
    assert all(r["cublas_GBps"] > 0 and r["skinny_GBps"] > 0 for r in report["small_m_gemms"])
    assert report["ar_step"][0]["step_ms"] > 0 and report["ar_generate"]["decode_tok_s"] > 0
    assert report["engine_max_seq_len"] == 64 + 16 + 64
    for section in ("ar_step", "ar_step_fused_layer_kernels"):
        row = report[section][0]
        assert row["context"] == 64 and row["step_ms"] > 0
        assert row["rest_per_layer_us"] == pytest.approx(1000 * row["rest_of_step_ms"] / 6)  # the tiny preset's layers
    # The engines' defaults (tiny's vocabulary is under the default draft vocabulary: the whole one), the default
    # tree's lookup chain fitted to each budget (at most half of it)
    assert [r["context"] for r in report["ar_step_defaults"]] == [64]
    assert [(r["budget"], r.get("lookup")) for r in report["rounds_defaults"]] == [(4, 2), (16, 7)]
    assert all(r["round_ms"] > 0 and r["vs_ar_step"] > 0 for r in report["rounds_defaults"])
    assert report["agreement_defaults"]["prompts"] == 2
    # The defaults' AR step with each decode-GEMV variant that is off by default, beside the defaults' step
    variants = ("gated_gemv", "gemv_pdl", "gated_gemv_pdl")
    for name in variants:
        row = report[f"ar_step_defaults_{name}"][0]
        assert row["context"] == 64 and row["step_ms"] > 0 and row["vs_defaults"] > 0
    for key in ("agreement", "agreement_defaults", "agreement_tree_kernel", "agreement_small_m_gemm",
                *(f"agreement_defaults_{name}" for name in variants)):
        row = report[key]  # each divergence diagnosed: a near tie, or one that would be a bug
        diverged = row["prompts"] - row["identical"]
        assert len(row["first_divergence_at"]) == diverged and 0 <= row["diverged_near_tie"] <= diverged
        assert (row["max_ar_minus_spec_ulps"] is None) == (diverged == 0)
    gemms = report["verify_gemms"]
    assert gemms["matrix_TFLOPs"] > 0 and [r["rows"] for r in gemms["rows"]] == [64, 128, 256]
    assert all(r["ms"] > 0 and 0 < r["matrix_share"] == pytest.approx(r["TFLOPs"] / gemms["matrix_TFLOPs"])
               for r in gemms["rows"])
    breakdown = report["ar_breakdown"]
    assert breakdown["rest_per_layer_us"] == pytest.approx(1000 * breakdown["rest_of_step_ms"] / 6)
    for switches in ("fused_layer_kernels", "unfused_layer_kernels", "draft_vocab_64", "unfused_accept"):
        profile = report["kernel_profile"][switches]
        tables = [profile["ar_step"]] + [t for r in profile["rounds"] for t in r["stages"].values()]
        assert [r["budget"] for r in profile["rounds"]] == [4, 16] and len(tables) == 1 + 2 * 4
        assert all(r["round_ms"] > 0 and r["vs_ar_step"] > 0 for r in profile["rounds"])
        for table in tables:  # the kernels of a replay run within its event-timed span
            assert table["kernels"] >= 1 and 0 < table["kernel_ms"] <= 1.2 * table["device_ms"] and table["top"]


@pytest.mark.skipif(torch.cuda.is_available() and torch.cuda.get_device_capability() < (8, 9),
                    reason="needs FP8 tensor cores (sm89+)")
def test_engine_bench_fp8_sections(tmp_path):
    """--fp8: the same random target converted to FP8 and timed in the same run, every FP8 row beside its bf16 one."""
    contexts, budgets = (64, 128), (4, 16)
    cfg = BenchConfig(random_target="tiny", budgets=budgets, contexts=contexts, topk=4, max_depth=7, reps=3,
                      ar_tokens=16, hf_generate=False, agreement_prompts=2, agreement_tokens=16, compile_layers=False,
                      compare_small_m_gemm=False, compare_fused_layer_kernels=False,
                      compare_fp8=True, output_dir=tmp_path, tag="tiny-fp8")
    path = run_bench(cfg)
    report = json.loads(path.read_text())
    assert path.with_suffix(".png").is_file()
    # the build's default recipe, as users' FP8 engines have it
    assert report["fp8"]["format"].startswith("fp8 e4m3 per-channel (modelopt, dynamic")
    assert report["fp8"]["recipe"] == "per-channel-tail-bf16" and report["fp8"]["input_amax"] is None
    assert report["fp8"]["convert_and_load_s"] > 0 and report["fp8"]["allocated_before_fp8_GB"] >= 0
    bf16, fp8 = report["ar_breakdown"], report["ar_breakdown_fp8"]
    # The projections stream one byte a weight; the tied embedding / lm_head and the last 3 of the 6 layers' MLPs
    # (gate, up, down: 3 x 128 x 256 each) stay bf16 in both.
    kept = 2 * (128 * (256 + 4) + 3 * 3 * 128 * 256)
    assert fp8["weight_bytes"] - kept == pytest.approx((bf16["weight_bytes"] - kept) / 2)
    assert fp8["floor_ms"] > 0 and fp8["floor_share"] > 0 and fp8["vs_bf16"]["floor_ms"] < 1
    assert fp8["gemms_cublas_ms"] > 0 and fp8["gemms_gemv_ms"] > 0
    for section, points in (("ar_step_fp8", [(c, None) for c in contexts]),
                            ("ar_step_gemv_fp8", [(c, None) for c in contexts]),
                            ("rounds_fp8", [(c, b) for c in contexts for b in budgets]),
                            ("rounds_tree_kernel_fp8", [(c, b) for c in contexts for b in budgets]),
                            ("ar_step_defaults_fp8", [(c, None) for c in contexts]),
                            ("rounds_defaults_fp8", [(c, b) for c in contexts for b in budgets])):
        rows = report[section]
        assert [(r["context"], r.get("budget")) for r in rows] == points, section
        assert all(r["vs_bf16"] > 0 for r in rows), section
    assert all(r["round_ms"] > 0 and r["verify_ms"] > 0 for r in report["rounds_fp8"])
    assert report["ar_generate_gemv_fp8"]["decode_tok_s"] > 0 and report["ar_generate_gemv_fp8"]["vs_bf16_tok_s"] > 0
    assert report["agreement_defaults_fp8"]["prompts"] == 2
    rows = report["rounds_defaults_small_m_fp8"]
    assert [(r["context"], r["budget"]) for r in rows] == [(c, b) for c in contexts for b in budgets]
    assert all(r["round_ms"] > 0 and r["vs_defaults"] > 0 for r in rows)
