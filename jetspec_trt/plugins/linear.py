"""The one linear layer every projection of the target and the draft head goes through."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from jetspec_trt.plugins.fp8_gemm import fp8_linear
from jetspec_trt.plugins.gemv import gemv, gemv_gated
from jetspec_trt.plugins.skinny_gemm import MAX_M, MIN_M, skinny_gemm


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, use_gemv: bool,
           weight_scale: torch.Tensor | None = None, input_scale: torch.Tensor | None = None,
           use_small_m: bool = False, pdl_prefetch: int = 0) -> torch.Tensor:
    """F.linear, or the GEMV op for a single row when `use_gemv` (the model's decode-GEMV switch) is on, or the
    skinny GEMM op for MIN_M..MAX_M rows when `use_small_m` (the model's small-M switch) is on. An FP8 weight (its
    `weight_scale` given) runs the FP8 variants of the same choice (plugins/fp8_gemm.py). `pdl_prefetch` > 0: the
    bf16 GEMV is launched as a programmatic dependent of the kernel before it (plugins/gemv.py, PDL); callers pass
    it where that kernel is one of ours that signals its dependents (a fused norm, the attention)."""
    if weight_scale is not None:
        return fp8_linear(x, weight, bias, weight_scale, input_scale, use_gemv, use_small_m)
    if use_gemv and x.dim() == 2 and x.shape[0] == 1:
        return gemv(x, weight, bias, pdl_prefetch)
    if use_small_m and x.dim() == 2 and MIN_M <= x.shape[0] <= MAX_M:
        return skinny_gemm(x, weight, bias)
    return F.linear(x, weight, bias)


def gated_linear(gate_up: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, use_gated_gemv: bool,
                 use_gemv: bool, weight_scale: torch.Tensor | None = None, input_scale: torch.Tensor | None = None,
                 use_small_m: bool = False) -> torch.Tensor:
    """The MLP's down projection of silu(gate) * up, from gate_up [..., 2K] (gate first): a single row with
    `use_gated_gemv` (the model's switch) and an unquantized weight runs plugins.gemv's gated kernel, the activation
    inside the GEMV; anything else the activation, then linear()."""
    if use_gated_gemv and weight_scale is None and gate_up.dim() == 2 and gate_up.shape[0] == 1:
        return gemv_gated(gate_up, weight, bias)
    gate, up = gate_up.chunk(2, dim=-1)
    return linear(F.silu(gate) * up, weight, bias, use_gemv, weight_scale, input_scale, use_small_m)
