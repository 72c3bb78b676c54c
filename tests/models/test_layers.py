"""The shared layers' engine switches compute what the plain modules compute (CPU: the ops' torch reference)."""

import torch

from jetspec_trt.models.layers import RMSNorm, Rotary


def test_rope_table_gathers_the_values_cos_sin_computes():
    rotary = Rotary(1.0 / (10000 ** (torch.arange(0, 16, 2).float() / 16)), attention_scaling=0.9)
    positions = torch.tensor([0, 5, 63, 17, 17, 2])
    expected = [rotary.cos_sin(positions, dtype) for dtype in (torch.float32, torch.bfloat16)]
    rotary.build_table(64, torch.bfloat16)
    assert rotary.table.shape == (64, 2, 16)
    for (cos, sin), dtype in zip(expected, (torch.float32, torch.bfloat16)):
        got_cos, got_sin = rotary.cos_sin(positions, dtype)  # float32 is not the table's dtype: computed
        assert got_cos.dtype == dtype and torch.equal(got_cos, cos) and torch.equal(got_sin, sin)


def test_fused_norm_switch_keeps_the_values():
    norm = RMSNorm(24, 1e-6)
    norm.weight.data.uniform_(0.5, 1.5)
    x = torch.randn(3, 24)
    plain = norm(x)
    norm.fused_kernel = True
    assert torch.equal(norm(x), plain)
