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
FP8_PER_CHANNEL_PER_TOKEN, whose activations are dynamic per token). fp8_linear picks one of five paths, in order:

1. a weight held in a float dtype (the CPU reference, below): float matmul, then the scales;
2. one row with the decode-GEMV switch on (the AR step): gemv_fp8, scales and bias in the kernel's epilogue;
   2b. 2..64 rows with the small-M switch on, on CUDA: the skinny GEMM's FP8 kernel (plugins/skinny_gemm.py),
   scales and bias in its epilogue, float32 sums like the GEMV's;
3. a static input scale and a per-tensor weight scale: tensorwise torch._scaled_mm (bias fused for 16-bit outputs);
4. dynamic per-token input scales, a bf16/fp16 output and rowwise scaling at hand (CUDA compute capability 9.0+;
   the CPU where torch's kernel has it, as 2.13's does): rowwise torch._scaled_mm, scale_a = s_x [M, 1], scale_b =
   s_w as [1, N] (a per-tensor s_w expanded), bias fused, the output written in x's dtype by the GEMM itself;
5. anything else (a float32 output, Ada's 8.9, a static input scale with per-channel weight scales, an older CPU
   kernel): unit-scale torch._scaled_mm to float32, then the scales and bias, an extra float32 [M, N] pass.

Every path scales the float32 sum the same way, acc * s_x * s_w (+ bias) in float32, rounded once to the output
dtype: the GEMV and paths 1 (in float32, the reference's dtype) and 5 in that order, the tensorwise and rowwise
GEMMs in their epilogue (cuBLAS / CUTLASS, whose order of the two multiplies may differ by a float32 ulp). So an AR
step through the GEMV and a tree verify through path 4 compute the same products and scale them alike; they differ
in the accumulation (the tensor cores' shorter accumulator against the GEMV's float32 FMAs:
tests/plugins/test_fp8_gemm.py) and that ulp.

The weight may also be held in a float dtype: the e4m3 values as float numbers (exact in bf16 and float32), the
CPU reference (models/fp8.py). Its input is rounded to e4m3 with the same scale, so the reference computes the FP8
GEMM's products, only in float matmuls: without the activations' rounding it would measure another model than the
GPU runs (on Qwen2.5-Coder-0.5B its top-1 agreement with bf16 came out about the same either way: docs/engine.md).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from jetspec_trt.plugins.gemv import gemv_fp8
from jetspec_trt.plugins.skinny_gemm import serves as skinny_serves
from jetspec_trt.plugins.skinny_gemm import skinny_gemm_fp8

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448

# torch._scaled_mm fuses the bias only into 16-bit outputs (a float32 output adds it after the GEMM), and its rowwise
# scales take only 16-bit outputs (cuBLAS before 12.9, CUTLASS).
_FUSED_DTYPES = (torch.bfloat16, torch.float16)


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


def rowwise_scaled_mm(device: torch.device) -> bool:
    """Whether torch._scaled_mm takes rowwise scales (scale_a [M, 1], scale_b [1, N]) with a 16-bit output on
    `device`: CUDA from compute capability 9.0 (Ada's rowwise kernel is not in every build), the CPU where this
    torch's reference kernel has them."""
    if device.type == "cuda":  # get_device_properties (not get_device_capability): torch.compile folds it
        return torch.cuda.get_device_properties(device).major >= 9
    return device.type == "cpu" and _cpu_rowwise_scaled_mm()


@functools.cache
def _cpu_rowwise_scaled_mm() -> bool:
    """Tried once: torch's CPU _scaled_mm took per-tensor scales only before its rowwise support (2.13 has it)."""
    a = torch.zeros(16, 16, dtype=FP8_DTYPE)
    try:
        torch._scaled_mm(a, a.t(), scale_a=torch.ones(16, 1), scale_b=torch.ones(1, 16), out_dtype=torch.bfloat16)
    except (RuntimeError, ValueError):
        return False
    return True


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, weight_scale: torch.Tensor,
               input_scale: torch.Tensor | None, use_gemv: bool, use_small_m: bool = False) -> torch.Tensor:
    """x [..., K] (bf16/fp16/fp32) times an FP8 weight [N, K] with its scales (weight_scale [] or [N]); returns
    [..., N] in x's dtype: x quantized (input_scale_of, quantize), then fp8_matmul."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    x_scale = input_scale_of(x2, input_scale)
    y = fp8_matmul(quantize(x2, x_scale), x_scale, weight, bias, weight_scale, input_scale is not None, use_gemv,
                   x.dtype, use_small_m)
    return y.reshape(*shape[:-1], weight.shape[0])


def fp8_matmul(xq: torch.Tensor, x_scale: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
               weight_scale: torch.Tensor, static: bool, use_gemv: bool, dtype: torch.dtype,
               use_small_m: bool = False) -> torch.Tensor:
    """The GEMM of fp8_linear on an input already quantized: xq [M, K] e4m3 with its scale x_scale ([] when
    `static`, the checkpoint's input scale; else [M, 1] per token) times weight [N, K]; [M, N] in `dtype`. The
    paths, in the order tried, are the module docstring's 1-5 (2b: 2..64 rows on the skinny GEMM's FP8 kernel
    with the small-M switch on, CUDA). Apart so the engine bench can time the GEMMs alone, without the
    activations' quantization that the compiled layers fuse into the ops before them."""
    n = weight.shape[0]
    per_tensor = weight_scale.dim() == 0
    if weight.dtype != FP8_DTYPE:  # 1. the reference: e4m3 values in float, float matmul
        return _scale(F.linear(xq.to(weight.dtype), weight), x_scale, weight_scale, bias, dtype)
    if use_gemv and xq.shape[0] == 1:  # 2. the AR step: one kernel, scales and bias included
        return gemv_fp8(xq, weight, x_scale, weight_scale, bias, dtype)
    if use_small_m and skinny_serves(xq):  # 2b. a verify's few rows: weight streaming, float32 sums
        return skinny_gemm_fp8(xq, weight, x_scale, weight_scale, bias, dtype)
    if static and per_tensor:  # 3. per-tensor scales on both sides
        fused_bias = bias if dtype in _FUSED_DTYPES else None
        y = torch._scaled_mm(xq, weight.t(), scale_a=x_scale, scale_b=weight_scale, bias=fused_bias, out_dtype=dtype)
        return y if bias is None or fused_bias is not None else y + bias
    if not static and dtype in _FUSED_DTYPES and rowwise_scaled_mm(xq.device):  # 4. rowwise
        scale_b = weight_scale.reshape(1, 1).expand(1, n).contiguous() if per_tensor else weight_scale.reshape(1, n)
        return torch._scaled_mm(xq, weight.t(), scale_a=x_scale, scale_b=scale_b, bias=bias, out_dtype=dtype)
    # 5. unit scales to float32, then the scales
    one = weight_scale.new_ones(())
    return _scale(torch._scaled_mm(xq, weight.t(), scale_a=one, scale_b=one, out_dtype=torch.float32), x_scale,
                  weight_scale, bias, dtype)


def _scale(acc: torch.Tensor, x_scale: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None,
           dtype: torch.dtype) -> torch.Tensor:
    """acc [M, N] * x_scale ([] or [M, 1]) * weight_scale ([] or [N]) (+ bias) in float32, rounded once to dtype:
    the order gemv_fp8's kernel applies them in."""
    y = acc.float() * x_scale * weight_scale
    return (y if bias is None else y + bias.float()).to(dtype)
