"""The engine bench's GEMMs-alone sequence (gemm_sequence) on the CPU: the products the model's linear layers
compute, an FP8 weight's input quantized once beforehand (so its timing holds the GEMMs alone)."""

import pytest
import torch

from jetspec_trt.bench.engine_bench import gemm_sequence
from jetspec_trt.plugins import fp8_gemm
from jetspec_trt.plugins.fp8_gemm import FP8_DTYPE, FP8_MAX, fp8_linear, quantize
from jetspec_trt.plugins.linear import linear


def _fp8_weight(n: int, k: int, per_channel: bool, generator: torch.Generator):
    weight = torch.randn(n, k, generator=generator)
    amax = weight.abs().amax(dim=1) if per_channel else weight.abs().amax()
    scale = amax / FP8_MAX
    return quantize(weight, scale if not per_channel else scale[:, None]), scale


@pytest.mark.parametrize("float_weights", [True, False], ids=["reference", "e4m3"])
def test_sequence_computes_what_the_linear_layers_do(float_weights, monkeypatch):
    generator = torch.Generator().manual_seed(0)
    bf16 = torch.randn(24, 32, generator=generator)
    gemms = [(bf16, None, None)]
    for per_channel, static in ((True, False), (False, True), (False, False)):
        weight, scale = _fp8_weight(16, 24 if static else 32, per_channel, generator)
        if float_weights:  # the CPU reference: e4m3 values held in float32
            weight = weight.float()
        input_scale = torch.tensor(4.0 / FP8_MAX) if static else None
        gemms.append((weight, scale, input_scale))
    inputs = {k: torch.randn(3, k, generator=generator) for k in (24, 32)}
    sequence = gemm_sequence(gemms, inputs, use_gemv=False)

    def no_quantizing(*args):
        raise AssertionError("the timed sequence quantized an input")

    with monkeypatch.context() as patch:  # the inputs were quantized when the sequence was made, not in it
        patch.setattr(fp8_gemm, "quantize", no_quantizing)
        patch.setattr(fp8_gemm, "input_scale_of", no_quantizing)
        try:
            got = sequence()
        except (RuntimeError, NotImplementedError) as err:  # an FP8 GEMM this torch's CPU kernel lacks
            assert not float_weights, err
            pytest.skip(f"torch's CPU _scaled_mm: {err}")
    wanted = [linear(inputs[w.shape[1]], w, None, False) if ws is None
              else fp8_linear(inputs[w.shape[1]], w, None, ws, xs, False) for w, ws, xs in gemms]
    assert len(got) == len(gemms) == 4
    for g, w in zip(got, wanted):
        torch.testing.assert_close(g, w, rtol=0, atol=0)
    assert gemms[1][0].dtype == (torch.float32 if float_weights else FP8_DTYPE)
