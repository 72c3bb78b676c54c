"""The quantization quality bench: teacher-forced top-1 agreement, perplexities and KL of a quantized target
against its reference, through `jetspec-trt bench --quantize-compare` (CPU here: the FP8 reference, e4m3 weights
and activations in float32 GEMMs)."""

import json

import pytest
import torch

from jetspec_trt.bench.quantize_compare import QuantizeCompareConfig, compare_logits, run_quantize_compare
from tests.helpers import invoke_cli


def test_compare_logits_counts():
    ids = [1, 2, 0]
    ref = torch.tensor([[0.0, 0.0, 5.0], [5.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    quant = torch.tensor([[0.0, 0.0, 5.0], [0.0, 5.0, 0.0], [9.0, 9.0, 9.0]])  # agrees at 0, not at 1; row 2 unused
    row = compare_logits(ref, quant, ids)
    assert row["tokens"] == 2 and row["agree"] == 1
    log_p = torch.log_softmax(ref, -1)
    assert row["reference_nll"] == pytest.approx(float(-(log_p[0, 2] + log_p[1, 0])))
    assert row["kl"] > 0 and compare_logits(ref, ref, ids)["kl"] == pytest.approx(0.0, abs=1e-6)


def test_fp8_against_bf16_and_against_itself(fp8_pair, tmp_path, capsys):
    text = tmp_path / "held-out.txt"
    text.write_text("A held-out paragraph about rivers, mountains and the weather in spring. " * 6)
    code, out, err = invoke_cli(["bench", "--engine", str(fp8_pair.fp8_target), "--quantize-compare",
                                 str(fp8_pair.target), "--prompts-file", str(text), "--num-prompts", "3",
                                 "--compare-max-tokens", "64", "--device", "cpu", "--output-dir", str(tmp_path),
                                 "--tag", "tiny"], capsys)
    assert code == 0, err
    result = json.loads((tmp_path / "quantize-compare-cpu-tiny.json").read_text())
    assert result["texts"] == 3 and result["tokens"] == 3 * 63
    assert result["quantization"].startswith("fp8") and result["fp8_gemms"] is False
    # FP8 moves the tiny random model's predictions a little, not a lot
    assert 0.7 <= result["top1_agreement"] < 1.0 and result["mean_kl"] > 0
    assert 0.8 < result["ppl_ratio"] < 1.25
    assert "top-1 agreement" in out

    same = run_quantize_compare(QuantizeCompareConfig(fp8_pair.target, fp8_pair.target, str(text), 2, 64, "cpu",
                                                      "float32", tmp_path, "same"))
    same = json.loads(same.read_text())
    assert same["top1_agreement"] == 1.0 and same["ppl_ratio"] == pytest.approx(1.0) and same["quantization"] is None
