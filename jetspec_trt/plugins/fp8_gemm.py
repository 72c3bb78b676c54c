"""FP8 GEMMs: y = (round_e4m3(x / s_x) @ W_fp8^T) * s_x * s_w (+ bias), s_w per tensor or per output channel.

The target's projections run this where their checkpoint is FP8 (models/fp8.py): prefill, tree verify and the
target passes that produce the draft head's context features as torch._scaled_mm (FP8 tensor cores on CUDA,
compute capability 8.9+; torch's reference kernel on the CPU), the batch-1 AR step through the FP8 weight-streaming
GEMV (plugins/gemv.py) when the decode-GEMV switch is on. Both quantize the input the same way first, so an AR step
and a verify of the same token compute the same products (only the accumulation order differs).

The input scale is the checkpoint's static `input_scale` where it has one (modelopt's calibrated amax / 448), else
dynamic and per token: amax(|x_row|) / 448 for each row, computed on the device (no host sync; safe inside a CUDA
graph). Per token rather than per call so that a token's activations round the same way whatever else is in the
forward: the tree verify then computes each node as the AR step would, which keeps speculative decoding's output
equal to AR decoding's (a per-call amax would let the other tree nodes change every node's rounding).

The weight scale s_w is a scalar (per-tensor) or one value per output row, shape [N] (per-channel: modelopt's
FP8_PER_CHANNEL_PER_TOKEN, whose activations are dynamic per token). Per-channel products are taken unscaled in
float32 and scaled after, [M, 1] * [N] (torch._scaled_mm's rowwise scales need sm90 and a bf16 output).

The weight may also be held in a float dtype: the e4m3 values as float numbers (exact in bf16 and float32), the
CPU reference (models/fp8.py). Its input is rounded to e4m3 with the same scale, so the reference computes the FP8
GEMM's products, only in float matmuls: without the activations' rounding it would measure another model than the
GPU runs (on Qwen2.5-Coder-0.5B its top-1 agreement with bf16 came out about the same either way: docs/engine.md).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from jetspec_trt.plugins.gemv import gemv_fp8

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448

# torch._scaled_mm fuses the bias only into 16-bit outputs; a float32 output adds it after the GEMM.
_FUSED_BIAS_DTYPES = (torch.bfloat16, torch.float16)


def quantize(tensor: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """round_e4m3(tensor / scale), saturated to +-448 (e4m3fn has no infinity: an overflow would become NaN)."""
    return (tensor.float() / scale.float()).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def dequantize(weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """weight [N, ...] times its scale: a scalar, or one per row ([N])."""
    scale = scale.float() if scale.dim() == 0 else scale.float().reshape(-1, *[1] * (weight.dim() - 1))
    return (weight.float() * scale).to(dtype)


def input_scale_of(x: torch.Tensor, input_scale: torch.Tensor | None) -> torch.Tensor:
    """The scale x [M, K] is quantized with: the static scalar, or per row amax(|x_row|) / 448 as [M, 1] (at least
    a tiny positive value, so an all-zero row does not divide by zero)."""
    if input_scale is not None:
        return input_scale
    return (x.abs().amax(dim=-1, keepdim=True).float() / FP8_MAX).clamp(min=torch.finfo(torch.float32).tiny)


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, weight_scale: torch.Tensor,
               input_scale: torch.Tensor | None, use_gemv: bool) -> torch.Tensor:
    """x [..., K] (bf16/fp16/fp32) times an FP8 weight [N, K] with its scales (weight_scale [] or [N]); returns
    [..., N] in x's dtype. A weight in a float dtype holds e4m3 values (the reference): the same products."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    x_scale = input_scale_of(x2, input_scale)
    xq = quantize(x2, x_scale)
    per_tensor = weight_scale.dim() == 0
    if weight.dtype != FP8_DTYPE:  # the reference: e4m3 values in float, float matmul
        y = F.linear(xq.to(weight.dtype), weight).float() * (x_scale * weight_scale)
        y = (y if bias is None else y + bias.float()).to(x.dtype)
    elif use_gemv and xq.shape[0] == 1:
        # the GEMV applies one scale; a per-channel weight's row scales multiply its float32 output after
        scale = (x_scale * weight_scale).reshape(1) if per_tensor else x_scale.reshape(1)
        y = gemv_fp8(xq, weight, scale, bias if per_tensor else None, x.dtype if per_tensor else torch.float32)
        if not per_tensor:
            y = (y * weight_scale if bias is None else y * weight_scale + bias.float()).to(x.dtype)
    elif input_scale is not None and per_tensor:  # per-tensor scales on both sides: _scaled_mm applies them
        fused_bias = bias if x.dtype in _FUSED_BIAS_DTYPES else None
        y = torch._scaled_mm(xq, weight.t(), scale_a=x_scale, scale_b=weight_scale, bias=fused_bias,
                             out_dtype=x.dtype)
        if bias is not None and fused_bias is None:
            y = y + bias
    else:  # per-token input or per-channel weight scales: applied to the float32 product (rowwise _scaled_mm
        # needs sm90 + bf16)
        one = weight_scale.new_ones(())
        y = torch._scaled_mm(xq, weight.t(), scale_a=one, scale_b=weight_scale if per_tensor else one,
                             out_dtype=torch.float32)
        y = y * (x_scale if per_tensor else x_scale * weight_scale)
        y = (y if bias is None else y + bias.float()).to(x.dtype)
    return y.reshape(*shape[:-1], weight.shape[0])
