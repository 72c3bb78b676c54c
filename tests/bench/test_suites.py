import json

import pytest

from jetspec_trt.bench.suites import SuiteBenchConfig, run_suite_bench
from jetspec_trt.quickstart import make_tiny_engine
from jetspec_trt.runtime.config import TreeConfig


def test_suite_bench_tiny(tmp_path):
    paths = make_tiny_engine(tmp_path)
    prompts = tmp_path / "prompts.jsonl"
    with open(prompts, "w") as f:
        for i, text in enumerate(["def add(a, b):", "Explain recursion."]):
            f.write(json.dumps({"suite": "mtbench", "id": str(i), "messages": [{"role": "user", "content": text}]}) + "\n")
    cfg = SuiteBenchConfig(engine_dir=paths.engine, suites=("mtbench",), num_prompts=2, max_new_tokens=6,
                           budgets=(8, 32), temperatures=(0.0, 1.0), device="cpu", hf_generate=True, hf_prompts=1,
                           output_dir=tmp_path / "out", tag="test", prompts_file=prompts)
    path = run_suite_bench(cfg, command=["test"])
    assert path.exists() and path.with_suffix(".png").exists()
    res = json.loads(path.read_text())
    s = res["suites"]["mtbench"]
    assert s["num_prompts"] == 2
    assert set(s["spec"]) == {"b8_t0", "b8_t1", "b32_t0", "b32_t1"}
    assert s["hf"]["tok_s"] > 0 and s["ar"]["tok_s"] > 0
    assert s["spec"]["b8_t0"]["tau"] >= 1.0 and "speedup_vs_hf" in s["spec"]["b8_t0"]
    # fp32 on CPU: greedy speculative output equals AR output
    assert s["lossless"]["identical"] == s["lossless"]["greedy_runs"] == 4 and s["lossless"]["diverged"] == 0
    for entry in s["prompts"]:
        assert entry["spec"]["b8_t0"]["identical"] is True and "diagnosis" not in entry["spec"]["b8_t0"]
        assert "identical" not in entry["spec"]["b8_t1"]  # sampled runs are not compared with AR
    assert "lossless" in s["spec"]["b32_t0"] and "lossless" not in s["spec"]["b32_t1"]
    # HF ran on the first prompt only, and its ratio compares the same prompt
    assert "hf" in s["prompts"][0] and "hf" not in s["prompts"][1] and s["hf"]["tokens"] == s["prompts"][0]["hf"]["tokens"]
    first = s["prompts"][0]["spec"]["b8_t0"]
    assert s["spec"]["b8_t0"]["speedup_vs_hf"] == first["tokens"] / first["wall_s"] / s["hf"]["tok_s"]
    q = res["request_tok_s"]
    assert q["ar"]["requests"] == 2 and q["hf"]["requests"] == 1 and q["b8_t0"]["requests"] == 2
    assert q["ar"]["min"] <= q["ar"]["p99_slow"] <= q["ar"]["p50"] <= q["ar"]["max"]
    prefill = res["request_prefill_ms"]
    assert set(prefill) == {"ar", "b8_t0", "b8_t1", "b32_t0", "b32_t1"}  # (HF: no prefill of ours to time)
    assert prefill["ar"]["requests"] == 2 and 0 < prefill["ar"]["p50"] <= prefill["ar"]["max"]
    assert prefill["ar"]["mean"] == pytest.approx(1e3 * sum(e["ar"]["prefill_s"] for e in s["prompts"]) / 2)
    assert path.name == "suites-cpu-test.json" and res["device"] == "cpu" and res["dtype"] == "float32"
    assert res["decoder"] == "Decoder"  # the CPU's (CUDA: GraphDecoder, for sampled runs too)


def test_suite_bench_with_lookup_trees_stays_lossless(tmp_path):
    paths = make_tiny_engine(tmp_path)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"suite": "mtbench", "id": "0", "messages": [{"role": "user", "content": "a b a b"}]})
                       + "\n")
    cfg = SuiteBenchConfig(engine_dir=paths.engine, suites=("mtbench",), num_prompts=1, max_new_tokens=24,
                           budgets=(8,), temperatures=(0.0,), device="cpu", hf_generate=False, lookup=3,
                           output_dir=tmp_path / "out", prompts_file=prompts)
    res = json.loads(run_suite_bench(cfg, command=["test"]).read_text())
    assert res["config"]["lookup"] == {"8": 3}
    assert res["suites"]["mtbench"]["lossless"]["identical"] == 1


def test_suite_bench_defaults_to_the_engines_lookup_fitted_to_each_budget(tmp_path):
    paths = make_tiny_engine(tmp_path, tree=TreeConfig(budget=32, topk=4, max_depth=7, lookup=6))
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"suite": "mtbench", "id": "0", "messages": [{"role": "user", "content": "a b a b"}]})
                       + "\n")
    cfg = SuiteBenchConfig(engine_dir=paths.engine, suites=("mtbench",), num_prompts=1, max_new_tokens=12,
                           budgets=(8, 32), temperatures=(0.0,), device="cpu", hf_generate=False,
                           output_dir=tmp_path / "out", prompts_file=prompts)
    res = json.loads(run_suite_bench(cfg, command=["test"]).read_text())
    # the built budget keeps its chain, a smaller one at most half of it (TreeConfig.fitted, as `run --budget`)
    assert res["config"]["lookup"] == {"8": 4, "32": 6}
    assert res["suites"]["mtbench"]["lossless"]["identical"] == 2
