"""The serving bench's checks without a server (its run against the real tritonserver is in
tests/export/test_triton.py, on the in-flight batching server there): the mismatch report and its diagnosis,
what fails a run, the config."""

import pytest

from jetspec_trt.bench.serving import Checker, ServingBenchConfig, failures
from jetspec_trt.errors import JetSpecError
from jetspec_trt.quickstart import make_tiny_engine
from jetspec_trt.runtime.engine import Engine


@pytest.mark.slow  # the tiny engine's build
def test_a_differing_stream_is_located_and_diagnosed(tmp_path):
    """The tiny tokenizer is byte-level: a character is a token."""
    engine_dir = make_tiny_engine(tmp_path).engine
    tokenizer = Engine.load(engine_dir).tokenizer
    checker = Checker(engine_dir, "cpu", tokenizer, ["def add(a, b):"])
    assert checker.mismatch(0, "hello world") is None  # the first output of a prompt is its reference
    assert checker.mismatch(0, "hello world") is None
    found = checker.mismatch(0, "hello wXrld")
    assert found["first_diff_token"] == found["first_diff_char"] == 7 and found["tokens_reencoded"] == [11, 11]
    diagnosis = found["diagnosis"]
    assert (diagnosis["position"], diagnosis["ar_token"], diagnosis["spec_token"]) == (7, ord("o"), ord("X"))
    assert diagnosis["dtype"] == "float32" and not diagnosis["near_tie"]  # two arbitrary letters of a random model
    short = checker.mismatch(0, "hello")  # a stream that ended early differs where it ended
    assert (short["first_diff_token"], short["diagnosis"]["ar_token"], short["diagnosis"]["spec_token"]) == (
        5, ord(" "), None)


def row(clients=4, sent=8, completed=8, failed=0, near=0, other=0):
    return {"clients": clients, "requests": 8, "sent": sent, "completed": completed, "failed": failed,
            "lost": sent - completed - failed, "near_tie_flips": near, "other_mismatches": other}


def test_what_fails_a_run():
    assert failures({"dtype": "bfloat16", "results": [row(1), row(near=3)]}) == []  # bf16 near ties: reported only
    assert failures({"dtype": "float32", "results": [row(near=1)]}) == [
        "4 clients: 1 of 8 requests differ from the single-request output"]
    assert failures({"dtype": "bfloat16", "results": [row(sent=7, completed=5, failed=1, other=2)]}) == [
        "4 clients: 1 of 8 requests never sent", "4 clients: 1 of 8 requests failed", "4 clients: 1 of 8 requests lost",
        "4 clients: 2 of 8 requests differ from the single-request output"]


def test_config():
    cfg = ServingBenchConfig(engine_dir="e", clients=(16, 4))
    assert cfg.passes == [1, 4, 16] and cfg.requests == 16  # 1 client first: the reference
    with pytest.raises(JetSpecError, match="must be >= the largest --clients"):
        ServingBenchConfig(engine_dir="e", clients=(1, 64), num_prompts=16)
    with pytest.raises(JetSpecError, match="--clients must be >= 1"):
        ServingBenchConfig(engine_dir="e", clients=(0,))
