"""The engine bench's configuration on the CPU: the engine size it builds, and the CLI flags that reach it."""

import pytest

from jetspec_trt.bench.engine_bench import BenchConfig, engine_tokens
from jetspec_trt.errors import JetSpecError


def test_engine_size_defaults_to_the_largest_context_and_takes_a_larger_one():
    assert engine_tokens(BenchConfig(contexts=(512, 2048), ar_tokens=128)) == 2048 + 128 + 64
    # Every context of 512..32768 in one engine built for 32 K, or context 512 alone in that engine.
    assert engine_tokens(BenchConfig(contexts=(512, 2048, 8192, 32768), max_seq_len=32960)) == 32960
    assert engine_tokens(BenchConfig(contexts=(512,), max_seq_len=32768)) == 32768
    with pytest.raises(JetSpecError, match="cannot hold context 8192"):
        engine_tokens(BenchConfig(contexts=(512, 8192), max_seq_len=4096))


def test_cli_flags_reach_the_bench_config(monkeypatch, tmp_path):
    from click.testing import CliRunner

    import jetspec_trt.bench.engine_bench as engine_bench
    from jetspec_trt.bench_command import bench_command

    seen = []

    def fake_run(cfg, command=None):
        seen.append(cfg)
        return tmp_path / "engine.json"

    monkeypatch.setattr(engine_bench, "run_bench", fake_run)
    result = CliRunner().invoke(bench_command, ["--contexts", "512,2048,8192,32768", "--max-seq-len", "32960",
                                                "--no-fused-layer-kernels", "--output-dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert seen[0].contexts == (512, 2048, 8192, 32768) and seen[0].max_seq_len == 32960
    assert seen[0].compare_fused_layer_kernels is False
    CliRunner().invoke(bench_command, ["--output-dir", str(tmp_path)])
    assert seen[1].max_seq_len is None and seen[1].compare_fused_layer_kernels is True
    CliRunner().invoke(bench_command, ["--no-comparisons", "--output-dir", str(tmp_path)])
    switches = ("compare_gemv", "compare_tree_kernel", "compare_small_m_gemm", "compare_fused_layer_kernels",
                "compare_sampled")
    assert all(getattr(seen[1], name) for name in switches)
    assert not any(getattr(seen[2], name) for name in switches)
