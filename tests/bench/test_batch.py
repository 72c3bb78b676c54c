import json

import pytest
import torch

from jetspec_trt.bench.batch import BatchBenchConfig, run_batch_bench
from jetspec_trt.quickstart import make_tiny_engine
from tests.helpers import invoke_cli


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    work = tmp_path_factory.mktemp("batch")
    paths = make_tiny_engine(work)
    prompts = work / "prompts.jsonl"
    texts = ["def add(a, b):", "Explain recursion.", "x = [1, 2", "Sum 1 to 10.", "class A:"]
    with open(prompts, "w") as f:
        for i, text in enumerate(texts):
            suite = ("mtbench", "math500")[i % 2]
            f.write(json.dumps({"suite": suite, "id": str(i), "messages": [{"role": "user", "content": text}]}) + "\n")
    return paths.engine, prompts


def test_batch_bench_tiny(tiny, tmp_path):
    engine_dir, prompts = tiny
    cfg = BatchBenchConfig(engine_dir=engine_dir, batches=(1, 2, 4), budget=8, suites=("mtbench", "math500"),
                           prompts_file=prompts, max_new_tokens=10, device="cpu", output_dir=tmp_path, tag="t")
    path = run_batch_bench(cfg, command=["test"])
    assert path.name == "batch-cpu-t.json" and path.with_suffix(".png").exists()
    res = json.loads(path.read_text())
    assert res["config"]["requests"] == 4 and res["device"] == "cpu" and res["dtype"] == "float32"
    rows = {(r["batch"], r["mode"]): r for r in res["results"]}
    assert set(rows) == {(b, m) for b in (1, 2, 4) for m in ("spec", "spec-auto", "ar")}
    assert res["config"]["cost_model"].startswith("stored; measured on")  # the tiny engine's build measured it
    for (batch, mode), r in rows.items():
        assert r["tokens"] == 4 * 10 and r["aggregate_tok_s"] > 0 and r["per_stream_tok_s_median"] > 0
        assert r["identical_to_smallest_batch"] == 4  # fp32 on the CPU: batching changes no token
        assert (r["tau_mean"] > 1.0) if mode == "spec" else (r["tau_mean"] >= 1.0)
        assert ("speedup_vs_batched_ar" in r) == (mode != "ar")
        assert ("steps_per_budget" in r) == (mode == "spec-auto")
    for batch in (1, 2, 4):  # every mode emits the same greedy tokens
        assert rows[batch, "spec-auto"]["identical_to_smallest_batch"] == 4
        assert all(1 <= int(b) <= 8 for b in rows[batch, "spec-auto"]["steps_per_budget"])  # (JSON keys)


def test_random_target_batch_bench_projects_spec_at_taus(tmp_path, capsys):
    """Without --engine: a preset's shape with random weights through the same scheduler runs, spec beside AR (the
    same tokens: fp32), each spec row's tok/s projected at the taus from its own step time."""
    code, out, err = invoke_cli(["bench", "--random-target", "tiny", "--batch", "1,2", "--budgets", "4",
                                 "--max-new-tokens", "6", "--taus", "5.94,10.76", "--device", "cpu",
                                 "--output-dir", str(tmp_path)], capsys)
    assert code == 0, err
    path = tmp_path / "batch-cpu-tiny-projected.json"
    res = json.loads(path.read_text())
    assert path.with_suffix(".png").exists() and "at tau 5.94" in out
    assert res["model"] == "tiny (random weights)" and res["dtype"] == "float32" and res["config"]["requests"] == 2
    rows = {(r["batch"], r["mode"]): r for r in res["results"]}
    assert set(rows) == {(b, m) for b in (1, 2) for m in ("spec", "ar")}
    for batch in (1, 2):
        spec, ar = rows[batch, "spec"], rows[batch, "ar"]
        assert spec["identical_to_ar"] == 2 and spec["identical_to_smallest_batch"] == 2
        assert spec["tokens"] == ar["tokens"] == 2 * 6
        assert spec["speedup_vs_batched_ar"] == pytest.approx(spec["aggregate_tok_s"] / ar["aggregate_tok_s"])
        for tau in ("5.94", "10.76"):
            projected = spec["aggregate_tok_s"] * float(tau) / spec["tau_mean"]
            assert spec["projected_aggregate_tok_s"][tau] == pytest.approx(projected)
            assert spec["projected_speedup_vs_batched_ar"][tau] == pytest.approx(projected / ar["aggregate_tok_s"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is here")
def test_random_target_batch_bench_without_a_gpu_is_one_line(capsys):
    code, _, err = invoke_cli(["bench", "--batch", "1,4", "--device", "cuda:0"], capsys)
    assert code == 2 and "there is no CUDA GPU here" in err and len(err.strip().splitlines()) == 1, err


def test_bad_batch_sizes_get_one_line(tiny, capsys):
    engine_dir, _ = tiny
    for value, message in (("0,4", "--batch sizes must be >= 1, got 0,4"), ("1,x", "expected comma-separated ints")):
        code, _, err = invoke_cli(["bench", "--engine", str(engine_dir), "--batch", value, "--device", "cpu"], capsys)
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    for modes in ("spec,spec-auto", "ar,auto"):
        code, _, err = invoke_cli(["bench", "--engine", str(engine_dir), "--batch", "1", "--batch-modes", modes,
                                   "--device", "cpu"], capsys)
        assert code == 2 and f"--batch-modes must include ar and be among spec,spec-auto,ar, got {modes}" in err


def test_batch_modes_spec_auto_and_ar_only(tiny, tmp_path):
    engine_dir, prompts = tiny
    cfg = BatchBenchConfig(engine_dir=engine_dir, batches=(2,), budget=4, suites=("mtbench", "math500"),
                           prompts_file=prompts, max_new_tokens=6, modes=("spec-auto", "ar"), device="cpu",
                           output_dir=tmp_path)
    res = json.loads(run_batch_bench(cfg).read_text())
    assert [r["mode"] for r in res["results"]] == ["spec-auto", "ar"]
