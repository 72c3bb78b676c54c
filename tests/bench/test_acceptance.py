"""The acceptance bench (bench/acceptance.py): simulated greedy tau per suite, width and budget."""

import json

import pytest

from jetspec_trt.bench.acceptance import AcceptanceBenchConfig, format_summary, run_acceptance_bench
from jetspec_trt.errors import JetSpecError
from jetspec_trt.quickstart import make_tiny_engine
from jetspec_trt.runtime.config import TreeConfig
from jetspec_trt.runtime.engine import Engine
from tests.helpers import invoke_cli

TEXTS = ["def add(a, b):", "Explain recursion.", "What is 7 * 6?"]


@pytest.fixture(scope="module")
def engine_and_prompts(tmp_path_factory):
    root = tmp_path_factory.mktemp("acceptance")
    paths = make_tiny_engine(root)
    prompts = root / "prompts.jsonl"
    with open(prompts, "w") as f:
        for i, text in enumerate(TEXTS):
            f.write(json.dumps({"suite": "mtbench", "id": str(i), "messages": [{"role": "user", "content": text}]})
                    + "\n")
    return paths.engine, prompts


def test_simulated_tau_is_the_decode_loops(engine_and_prompts, tmp_path):
    """At the engine's width, each budget's simulated tau is what greedy speculative decoding of the same prompts
    measures (fp32 CPU), counting each last round as far as the response goes."""
    engine_dir, prompts = engine_and_prompts
    cfg = AcceptanceBenchConfig(engine_dir=engine_dir, suites=("mtbench",), num_prompts=3, max_new_tokens=20,
                                budgets=(1, 4, 32), widths=(2, 4), lookups=(0, 3), device="cpu", output_dir=tmp_path, tag="t",
                                prompts_file=prompts)
    path = run_acceptance_bench(cfg, command=["test"])
    assert path.name == "acceptance-cpu-t.json" and path.with_suffix(".png").exists()
    result = json.loads(path.read_text())
    row = result["suites"]["mtbench"]
    assert row["prompts"] == 3 and set(row["tau"]) == {"2", "4", "2+lookup3", "4+lookup3"}
    assert set(row["tau"]["2"]) == {"1", "4", "32"}
    assert row["tau"]["4"]["1"] == row["tau"]["4+lookup3"]["1"] == 1.0  # budget 1: AR, one token a round
    assert all(row["tau"]["2+lookup3"][b] >= row["tau"]["2"][b] - 0.2 for b in ("4", "32"))
    engine = Engine.load(engine_dir, device="cpu")
    depth = result["config"]["max_depth"]
    for budget in (4, 32):
        tokens = rounds = 0
        for text in TEXTS:
            out = [t for chunk in engine.stream_tokens(engine.encode([{"role": "user", "content": text}]), 20,
                                                       tree=TreeConfig(budget, 2, depth)) for t in chunk]
            tokens, rounds = tokens + len(out) - 1, rounds + engine.last_stats.rounds
        assert row["tau"]["2"][str(budget)] == pytest.approx(tokens / rounds, abs=1e-4), budget
    assert " ".join(format_summary(result).split()).count("width 2+lookup3: 1.000") == 1


def test_cli_runs_it_and_refuses_it_without_an_engine(engine_and_prompts, tmp_path, capsys):
    engine_dir, prompts = engine_and_prompts
    code, out, err = invoke_cli(["bench", "--engine", str(engine_dir), "--simulate-widths", "3", "--budgets", "8",
                                 "--suite", "mtbench", "--num-prompts", "1", "--max-new-tokens", "6", "--device",
                                 "cpu", "--prompts-file", str(prompts), "--output-dir", str(tmp_path),
                                 "--simulate-lookups", "0,4"], capsys)
    assert code == 0, err
    assert (tmp_path / "acceptance-cpu.json").exists() and "simulated greedy tau" in out and "3+lookup4" in out
    code, _, err = invoke_cli(["bench", "--simulate-widths", "3"], capsys)
    assert code != 0 and "--simulate-widths needs --engine" in err
    with pytest.raises(JetSpecError, match="widths and budgets must be >= 1"):
        AcceptanceBenchConfig(engine_dir=engine_dir, widths=(0,)).validate()
    with pytest.raises(JetSpecError, match="lookup chains >= 0"):
        AcceptanceBenchConfig(engine_dir=engine_dir, lookups=(-1,)).validate()
