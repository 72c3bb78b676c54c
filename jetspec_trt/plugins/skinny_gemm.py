"""Weight-streaming "skinny" GEMM for a few rows: y [M, N] = x [M, K] @ W[N, K]^T (+ b), 2 <= M <= MAX_M.

Why a kernel of our own: a speculative round verifies 16-64 tree tokens and the draft head runs a 16-row block,
so most of a round's GEMMs have M = 2..64 rows. At those M the arithmetic intensity (about M FLOP per weight byte
in bf16) is far below an H200's ~188 FLOP/byte: like the AR step, they are as fast as they stream W from HBM. cuBLAS
streamed them at ~1.5 TB/s on the H200 at the Qwen2.5-0.5B shape where the GEMV (plugins/gemv.py) reaches 2.0 TB/s.
Past 64 rows (128: ~128 FLOP/byte) the tensor cores' share grows and cuBLAS's tiling is the better bet; those
rows stay on F.linear.

Each program owns BLOCK_N output columns (rows of W) and walks their K-long rows in BLOCK_K chunks: every W tile is
loaded once and multiplied with all M rows of x through tl.dot (x's rows padded, by masking, to BLOCK_M = the
16/32/64 bucket of M; tl.dot needs 16 at least). float32 accumulation; the bias is added once at the end. The
grid tiles N only: no split-K, so no atomics and no second pass (N >= 896 gives 56+ programs at BLOCK_N = 16 even
for the 0.5B model's smallest GEMMs). x [M, K] is re-read by every program, but it is small and stays in L2.

Configs are autotuned per (BLOCK_M bucket, N, K, dtype) on first use, which happens in the CUDA-graph warm-up,
never inside a capture (runtime/graph_decoder.py warms every stage up before capturing it).

Op contract: ``torch.ops.jetspec_trt.skinny_gemm(x, weight, bias)`` with x [M, K] (any row stride), weight [N, K],
bias [N] or None, one dtype (bf16/fp16/fp32); returns [M, N] contiguous in that dtype. Rows outside 2..MAX_M, the
CPU and any non-Triton device fall back to F.linear, so models can call the op unconditionally; the CUDA kernel
must match F.linear to rounding (tests). float32 dots run in IEEE float32 (not TF32), as F.linear does by default.

FP8: ``torch.ops.jetspec_trt.skinny_gemm_fp8(xq, weight, x_scale, weight_scale, bias, out_dtype)``, the same kernel
on an e4m3 input (quantized by plugins/fp8_gemm.py) and an e4m3 weight: y = (xq @ W^T) * x_scale * weight_scale (+
bias), x_scale [] or [M, 1], weight_scale [] or [N], in float32, rounded once to out_dtype: the order of every FP8
path. Why: the tree verify's FP8 GEMMs at 16-64 rows ran on rowwise torch._scaled_mm at a fraction of the weight
stream (Qwen3-8B shape on an H100, 2026-12-06: a budget-16 verify 5.92 ms against a 2.80 ms FP8 weight floor, only
0.87x the bf16 verify). The tiles are widened to fp16 in registers before tl.dot (every e4m3 value is exact in fp16)
so the products are exact and sum in float32 on the tensor cores, as the AR step's FP8 GEMV sums them (the FP8 MMA
keeps a shorter accumulator); the bytes streamed stay one a weight. The fallback (CPU, rows outside 2..MAX_M) is
gemv_fp8's reference arithmetic.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from jetspec_trt.plugins.gemv import gemv_fp8
from jetspec_trt.plugins.tree_attention import LIBRARY, triton_kernel_once

OP_NAME = "skinny_gemm"
MIN_M, MAX_M = 2, 64  # M = 1 is the GEMV's (plugins/gemv.py); past 64 rows, cuBLAS (see above)
M_BUCKETS = (16, 32, 64)  # BLOCK_M: one compiled kernel (and one tuned config) per bucket


def m_bucket(m: int) -> int:
    """The BLOCK_M that serves m rows: the smallest bucket >= m."""
    return next(b for b in M_BUCKETS if m <= b)


SHARED_MEMORY_BUDGET = 160 * 1024  # bytes of pipelined tiles per program (an H200 SM has 228 KB)


def pipeline_stages(block_n: int, block_k: int, element_bytes: int = 2) -> int:
    """The most pipeline stages (4 down to 1) whose W tile [block_n, block_k] and x tile [MAX_M, block_k] fit the
    shared-memory budget at the largest bucket."""
    tile_bytes = (block_n + MAX_M) * block_k * element_bytes
    return next((s for s in (4, 3, 2) if s * tile_bytes <= SHARED_MEMORY_BUDGET), 1)


def serves(x: torch.Tensor) -> bool:
    """Whether the kernel (rather than F.linear) runs for this input."""
    return x.is_cuda and x.dim() == 2 and MIN_M <= x.shape[0] <= MAX_M and _kernel() is not None


@torch.library.custom_op(f"{LIBRARY}::{OP_NAME}", mutates_args=())
def skinny_gemm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    if serves(x):
        return _triton_skinny_gemm(x, weight, bias)
    return F.linear(x, weight, bias)


@skinny_gemm.register_fake
def _skinny_gemm_fake(x, weight, bias):
    return x.new_empty(x.shape[0], weight.shape[0])


@torch.library.custom_op(f"{LIBRARY}::{OP_NAME}_fp8", mutates_args=())
def skinny_gemm_fp8(x: torch.Tensor, weight: torch.Tensor, x_scale: torch.Tensor, weight_scale: torch.Tensor,
                    bias: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    if serves(x):
        return _triton_skinny_gemm(x, weight, bias, scales=(x_scale, weight_scale), out_dtype=out_dtype)
    return gemv_fp8(x, weight, x_scale, weight_scale, bias, out_dtype)  # its reference arithmetic for M != 1


@skinny_gemm_fp8.register_fake
def _skinny_gemm_fp8_fake(x, weight, x_scale, weight_scale, bias, out_dtype):
    return x.new_empty(x.shape[0], weight.shape[0], dtype=out_dtype)


@triton_kernel_once
def _kernel():
    """The autotuned Triton kernel's launcher."""
    import triton
    import triton.language as tl

    # Streaming wants bytes in flight: each (BLOCK_N, BLOCK_K) takes the most stages that fit (4 or 3 at bf16; tiles
    # that fit fewer are dropped: bf16 128 x 256 would need 288 KB at 3). 8 warps only for the wide tiles. 14
    # configs: tuning every (bucket, N, K) of a model in the warm-up costs 14 compiles and timings each. (float32
    # tiles take twice the bytes: the autotuner skips those that run out of shared memory.)
    configs = [
        triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=pipeline_stages(bn, bk))
        for bn in (16, 32, 64, 128) for bk in (64, 128, 256) for w in (4, 8)
        if pipeline_stages(bn, bk) >= 3 and bn * bk <= 16384 and (w == 4 or bn >= 64)
    ]

    @triton.jit
    def skinny_kernel(x_ptr, w_ptr, b_ptr, xs_ptr, ws_ptr, y_ptr, M, N, K, stride_xm, HAS_BIAS: tl.constexpr,
                      IEEE: tl.constexpr, HAS_SCALE: tl.constexpr, X_SCALE_PER_ROW: tl.constexpr,
                      W_SCALE_PER_COL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_K: tl.constexpr):
        rows = tl.arange(0, BLOCK_M)  # x's rows: all of them in every program
        cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)  # this program's outputs (W's rows)
        row_ok, col_ok = rows < M, cols < N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_ok = ks < K
            x = tl.load(x_ptr + rows[:, None] * stride_xm + ks[None, :], mask=row_ok[:, None] & k_ok[None, :],
                        other=0.0)
            w = tl.load(w_ptr + cols[:, None].to(tl.int64) * K + ks[None, :], mask=col_ok[:, None] & k_ok[None, :],
                        other=0.0)
            if IEEE:  # float32 inputs: full-precision products, like F.linear (tl.dot would round to TF32)
                acc = tl.dot(x, tl.trans(w), acc, input_precision="ieee")
            elif HAS_SCALE:  # e4m3 tiles, exact in fp16: exact products summed in float32 (module docstring)
                acc = tl.dot(x.to(tl.float16), tl.trans(w.to(tl.float16)), acc)
            else:
                acc = tl.dot(x, tl.trans(w), acc)
        if HAS_SCALE:  # * x's scale (its row's), then * the weight's (its column's), the FP8 paths' order
            if X_SCALE_PER_ROW:
                acc = acc * tl.load(xs_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)[:, None]
            else:
                acc = acc * tl.load(xs_ptr).to(tl.float32)
            if W_SCALE_PER_COL:
                acc = acc * tl.load(ws_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
            else:
                acc = acc * tl.load(ws_ptr).to(tl.float32)
        if HAS_BIAS:
            acc += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptr + rows[:, None] * N + cols[None, :], acc.to(y_ptr.dtype.element_ty),
                 mask=row_ok[:, None] & col_ok[None, :])

    # BLOCK_M is a key: each bucket tunes its own tile (dtypes are keyed by the autotuner itself).
    tuned_kernel = triton.autotune(configs=configs, key=["N", "K", "BLOCK_M"])(skinny_kernel)

    def launch(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
               block: tuple[int, int] | None = None, scales: tuple[torch.Tensor, torch.Tensor] | None = None,
               out_dtype: torch.dtype | None = None) -> torch.Tensor:
        (m, k), n = x.shape, weight.shape[0]
        y = torch.empty(m, n, dtype=out_dtype or x.dtype, device=x.device)
        x_scale, w_scale = scales if scales is not None else (y, y)  # unread without HAS_SCALE
        args = (x, weight, bias if bias is not None else y, x_scale, w_scale, y, m, n, k, x.stride(0))
        # One-element scales ([] or [1]) are per tensor, as gemv_fp8 reads them
        flags = dict(HAS_BIAS=bias is not None, IEEE=x.dtype == torch.float32, HAS_SCALE=scales is not None,
                     X_SCALE_PER_ROW=x_scale.numel() != 1, W_SCALE_PER_COL=w_scale.numel() != 1,
                     BLOCK_M=m_bucket(m))
        if block is None:
            grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]),)  # noqa: E731
            tuned_kernel[grid](*args, **flags)
        else:  # one (BLOCK_N, BLOCK_K), untuned: tests check each (Triton's interpreter cannot time configs), at
            # the stages that fit this dtype (float32 too, where the autotuner would skip what does not fit)
            skinny_kernel[(triton.cdiv(n, block[0]),)](*args, **flags, BLOCK_N=block[0], BLOCK_K=block[1],
                                                        num_stages=pipeline_stages(*block, x.element_size()))
        return y

    launch.kernel = skinny_kernel  # the jit function itself: tests compile it ahead of time for sm_90
    return launch


def _triton_skinny_gemm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                        block: tuple[int, int] | None = None, scales: tuple[torch.Tensor, torch.Tensor] | None = None,
                        out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """The Triton kernel on x's device, autotuned, or at one (BLOCK_N, BLOCK_K) `block` (tests). FP8: `scales`
    (x_scale [] or [M, 1], weight_scale [] or [N]) and the output's dtype."""
    if not MIN_M <= x.shape[0] <= MAX_M:
        raise ValueError(f"the skinny GEMM takes {MIN_M}..{MAX_M} rows, got {x.shape[0]}")
    if x.stride(-1) != 1:  # rows may be strided (the kernel takes their stride); elements within a row may not
        x = x.contiguous()
    if weight.stride(-1) != 1 or weight.stride(0) != weight.shape[1]:
        weight = weight.contiguous()
    bias = bias.contiguous() if bias is not None else None  # read at b_ptr + column; the models' biases already are
    if scales is not None:
        scales = tuple(t.contiguous().float() for t in scales)  # [M, 1] per row, [N] per column, or one value
    return _kernel()(x, weight, bias, block, scales, out_dtype)
