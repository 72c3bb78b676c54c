"""The kernel table of the engine bench's --profile: per-replay records summed by name (CPU: the table's arithmetic;
the profiler itself runs in tests/bench/test_engine_bench_gpu.py)."""

import pytest

from jetspec_trt.bench.kernel_profile import NAME_CHARS, summarize


def test_summarize_sums_kernels_by_name_per_replay():
    replays = [[("gemv", 10.0), ("norm", 2.0), ("gemv", 12.0)],
               [("gemv", 11.0), ("norm", 3.0), ("gemv", 11.0)],
               [("gemv", 30.0), ("norm", 2.0), ("gemv", 10.0), ("extra", 1.0)]]
    table = summarize(replays, device_ms=0.05, top=2)
    assert table["kernels"] == 3  # the median replay's count
    assert table["kernel_ms"] == pytest.approx(0.025)  # the median of 24, 25 and 43 us
    assert table["gaps_ms"] == pytest.approx(0.05 - 0.025)
    assert table["top"] == [{"name": "gemv", "calls": 2.0, "us": pytest.approx(84 / 3)},
                            {"name": "norm", "calls": 1.0, "us": pytest.approx(7 / 3)}]


def test_summarize_merges_names_cut_to_the_same_prefix_and_refuses_an_empty_profile():
    long = "k" * (NAME_CHARS + 5)
    table = summarize([[(long, 1.0), (long + "x", 2.0)]], device_ms=0.01)
    assert table["top"] == [{"name": "k" * NAME_CHARS, "calls": 2.0, "us": 3.0}]
    with pytest.raises(ValueError, match="no kernels"):
        summarize([[], []], device_ms=0.01)
