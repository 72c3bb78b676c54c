"""Greedy AR vs speculative divergence diagnosis of the suite bench (CPU, tiny random engine).

fp32 on CPU never diverges by itself, so a divergence is forced by rewriting one token of one speculative run to
the teacher-forced target's second-best token; the diagnosis must then point at that flip exactly."""

import copy
import json

import pytest
import torch

from jetspec_trt.bench import suites
from jetspec_trt.bench.suites import (SuiteBenchConfig, diagnose_flip, format_summary, near_tie_threshold,
                                      run_suite_bench, teacher_forced_logits)
from jetspec_trt.quickstart import make_tiny_engine
from jetspec_trt.runtime.decoder import first_difference
from jetspec_trt.runtime.engine import Engine
from tests.helpers import invoke_cli

FLIP = 3  # index of the rewritten token
FLIP_BUDGET = 8


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("div")
    paths = make_tiny_engine(root)
    prompts = root / "prompts.jsonl"
    prompts.write_text(json.dumps({"suite": "mtbench", "id": "p0",
                                   "messages": [{"role": "user", "content": "Explain recursion."}]}) + "\n")
    return paths, prompts


def _cfg(tiny, out, **kw):
    paths, prompts = tiny
    base = dict(engine_dir=paths.engine, suites=("mtbench",), num_prompts=1, max_new_tokens=8,
                budgets=(FLIP_BUDGET, 32), temperatures=(0.0,), device="cpu", hf_generate=False, output_dir=out,
                tag="t", prompts_file=prompts)
    return SuiteBenchConfig(**{**base, **kw})


def test_first_difference():
    assert first_difference([1, 2, 3], [1, 2, 3]) is None
    assert first_difference([1, 2, 3], [1, 5, 3]) == 1
    assert first_difference([1, 2], [1, 2, 3]) == 2


def test_near_tie_threshold_is_a_few_bf16_ulps():
    # bf16: 8-bit significand, ulp at [16, 32) is 2^-3; 4 ulps = 0.5
    assert near_tie_threshold(20.0, torch.bfloat16) == 0.5
    assert near_tie_threshold(-40.0, torch.bfloat16) == 1.0
    assert near_tie_threshold(20.0, torch.float32) == 4 * 2.0**-23 * 16
    logits = torch.full((10,), -5.0)
    logits[3], logits[7] = 20.0, 19.875  # one bf16 ulp apart
    s = suites._flip_stats(logits, 3, 7, torch.bfloat16)
    assert s["near_tie"] and s["top2_gap"] == 0.125 and s["top2_gap_ulps"] == 1.0 and s["ar_minus_spec"] == 0.125
    logits[7] = 18.0
    assert not suites._flip_stats(logits, 3, 7, torch.bfloat16)["near_tie"]  # 16 ulps: not rounding
    logits[7], logits[5] = 19.875, 19.9
    s = suites._flip_stats(logits, 3, 7, torch.bfloat16)
    assert s["spec_rank"] == 2 and s["near_tie"]  # a three-way tie within 1 ulp: rounding reorders any of them
    logits[7], logits[5] = 19.0, 19.9
    s = suites._flip_stats(logits, 3, 7, torch.bfloat16)
    assert s["spec_rank"] == 2 and not s["near_tie"]  # 8 ulps below the top, whatever lies between


def test_forced_divergence_is_diagnosed_and_counted(tiny, tmp_path, monkeypatch):
    real = suites._generate
    flipped = {}

    def generate(engine, ids, cfg, sampling, speculative, tree):
        tokens, r = real(engine, ids, cfg, sampling, speculative, tree)
        if speculative and sampling.greedy and tree.budget == FLIP_BUDGET and cfg.max_new_tokens > FLIP + 1:
            assert len(tokens) > FLIP
            logits = teacher_forced_logits(engine.decoder.target, ids + tokens[:FLIP])
            second = int(torch.topk(logits, 2).indices[1])
            flipped.update(ar=tokens[FLIP], spec=second, gap=float(torch.topk(logits, 2).values.diff().neg()))
            tokens = tokens[:FLIP] + [second] + tokens[FLIP + 1:]
        return tokens, r

    monkeypatch.setattr(suites, "_generate", generate)
    path = run_suite_bench(_cfg(tiny, tmp_path, diagnose_fp32=True), command=["test"])
    assert path.name == "suites-cpu-t.json" and path.with_suffix(".png").exists()
    res = json.loads(path.read_text())
    assert res["device"] == "cpu" and res["dtype"] == "float32" and res["command"] == "test" and res["date"]
    assert {"torch", "transformers", "python"} <= set(res["versions"])
    s = res["suites"]["mtbench"]
    run = s["prompts"][0]["spec"][f"b{FLIP_BUDGET}_t0"]
    assert run["identical"] is False and run["first_diff"] == FLIP
    d = run["diagnosis"]
    assert d["position"] == FLIP and d["ar_token"] == flipped["ar"] and d["spec_token"] == flipped["spec"]
    assert d["top1_token"] == flipped["ar"] and d["top2_token"] == flipped["spec"]
    assert d["ar_rank"] == 0 and d["spec_rank"] == 1 and d["dtype"] == "float32"
    assert d["top2_gap"] == pytest.approx(flipped["gap"]) and d["ar_minus_spec"] == pytest.approx(d["top2_gap"])
    assert d["top2_gap_ulps"] > suites.NEAR_TIE_ULPS and d["near_tie"] is False  # fp32: far beyond rounding
    assert "fp32" not in d and res["divergence"]["fp32_note"] == "engine already runs in float32"
    other = s["prompts"][0]["spec"]["b32_t0"]
    assert other["identical"] is True and other["first_diff"] is None and "diagnosis" not in other
    # summaries: per budget, per suite, in total
    assert s["spec"][f"b{FLIP_BUDGET}_t0"]["lossless"] == {
        "runs": 1, "identical": 0, "diverged": 1, "diverged_near_tie": 0, "max_top2_gap": d["top2_gap"],
        "max_top2_gap_ulps": d["top2_gap_ulps"], "max_abs_ar_minus_spec": abs(d["ar_minus_spec"])}
    assert s["spec"]["b32_t0"]["lossless"]["identical"] == 1 and s["spec"]["b32_t0"]["lossless"]["diverged"] == 0
    lo = s["lossless"]
    assert (lo["runs"], lo["greedy_runs"], lo["identical"], lo["diverged"], lo["diverged_near_tie"]) == (2, 2, 1, 1, 0)
    assert lo["max_top2_gap"] == d["top2_gap"]
    assert lo["mismatches"] == [{"id": "p0", "budget": FLIP_BUDGET, "first_diff": FLIP, "diagnosis": d}]
    assert res["divergence"]["total"]["diverged"] == 1
    table = format_summary(res)
    assert "1/2 identical, 1 diverged, 0 of them at a near-tie" in table and "float32 check skipped" in table


def test_identical_runs_have_no_diagnosis(tiny, tmp_path, capsys):
    """Through the CLI on CPU: fp32 greedy speculative output equals AR, so nothing is diagnosed."""
    paths, prompts = tiny
    argv = ["bench", "--engine", str(paths.engine), "--suite", "mtbench", "--prompts-file", str(prompts),
            "--num-prompts", "1", "--max-new-tokens", "6", "--budgets", str(FLIP_BUDGET), "--temperatures", "0",
            "--device", "cpu", "--no-hf", "--diagnose-fp32", "--tag", "t", "--output-dir", str(tmp_path)]
    code, out, _ = invoke_cli(argv, capsys)
    assert code == 0, out
    path = tmp_path / "suites-cpu-t.json"
    assert f"wrote {path}" in out and "1/1 identical, 0 diverged" in out and f"b{FLIP_BUDGET}_t0" in out
    res = json.loads(path.read_text())
    assert res["device"] == "cpu" and res["command"] and res["config"]["diagnose_fp32"] is True
    s = res["suites"]["mtbench"]
    run = s["prompts"][0]["spec"][f"b{FLIP_BUDGET}_t0"]
    assert run["identical"] is True and run["first_diff"] is None and "diagnosis" not in run
    assert s["spec"][f"b{FLIP_BUDGET}_t0"]["lossless"]["diverged"] == 0
    lo = s["lossless"]
    assert (lo["runs"], lo["identical"], lo["diverged"], lo["mismatches"], lo["max_top2_gap"]) == (1, 1, 0, [], None)
    assert res["divergence"]["fp32_note"] is None  # nothing diverged: no float32 copy made or needed


def test_bf16_diagnosis_with_fp32_copy(tiny):
    """On a bf16 target (as on the GPU) the fp32 copy says which of the two tokens the exact model prefers."""
    engine = Engine.load(tiny[0].engine, device="cpu")
    plain = copy.deepcopy(engine.decoder.target).to(torch.bfloat16)
    target = copy.deepcopy(plain)
    target.fuse_weights()  # as on the GPU: fused q/k/v and gate/up weights are buffers, the copy must convert them
    fp32, note = suites._fp32_target(target, "cpu")
    assert note is None and fp32.embed_tokens.weight.dtype == torch.float32
    ids = engine.encode([{"role": "user", "content": "Explain recursion."}])
    torch.testing.assert_close(teacher_forced_logits(fp32, ids), teacher_forced_logits(plain.float(), ids))
    ar = [int(teacher_forced_logits(target, ids).argmax())]
    logits = teacher_forced_logits(target, ids + ar)
    top2 = torch.topk(logits, 2).indices.tolist()
    d = diagnose_flip(target, ids, ar + [top2[0]], ar + [top2[1]], 1, target_fp32=fp32, tokenizer=engine.tokenizer)
    assert d["dtype"] == "bfloat16" and (d["ar_token"], d["spec_token"]) == tuple(top2)
    assert d["top2_gap"] >= 0 and d["threshold"] == near_tie_threshold(d["top1_logit"], torch.bfloat16)
    assert isinstance(d["ar_text"], str) and isinstance(d["spec_text"], str)
    f = d["fp32"]
    assert f["prefers"] in ("ar", "spec", "other") and f["top2_gap"] >= 0
    assert f["prefers"] == ("ar" if f["top1_token"] == top2[0] else "spec" if f["top1_token"] == top2[1] else "other")
