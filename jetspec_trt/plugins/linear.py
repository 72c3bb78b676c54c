"""The one linear layer every projection of the target and the draft head goes through."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from jetspec_trt.plugins.fp8_gemm import fp8_linear
from jetspec_trt.plugins.gemv import gemv
from jetspec_trt.plugins.skinny_gemm import MAX_M, MIN_M, skinny_gemm


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, use_gemv: bool,
           weight_scale: torch.Tensor | None = None, input_scale: torch.Tensor | None = None,
           use_small_m: bool = False) -> torch.Tensor:
    """F.linear, or the GEMV op for a single row when `use_gemv` (the model's decode-GEMV switch) is on, or the
    skinny GEMM op for MIN_M..MAX_M rows when `use_small_m` (the model's small-M switch) is on. An FP8 weight (its
    `weight_scale` given) runs the FP8 variants of the same choice (plugins/fp8_gemm.py)."""
    if weight_scale is not None:
        return fp8_linear(x, weight, bias, weight_scale, input_scale, use_gemv, use_small_m)
    if use_gemv and x.dim() == 2 and x.shape[0] == 1:
        return gemv(x, weight, bias)
    if use_small_m and x.dim() == 2 and MIN_M <= x.shape[0] <= MAX_M:
        return skinny_gemm(x, weight, bias)
    return F.linear(x, weight, bias)
