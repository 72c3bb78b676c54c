"""Weight-streaming GEMV for the batch-1 decode step: y [1, N] = x [1, K] @ W[N, K]^T (+ b).

Why a kernel of our own: an autoregressive step of an 8B model reads 16 GB of weights to make one token, so the
step is as fast as its GEMMs stream W from HBM. Each program here owns BLOCK_N output rows and walks their K-long
rows in BLOCK_K chunks (contiguous, coalesced loads), multiply-accumulating into float32 registers, and reduces
once at the end. No split-K: the smallest decode GEMM (N = 896 for a 0.5B model) still gives hundreds of programs,
and without it there is no atomic or second pass. Configs are autotuned per (N, K) on first use, which happens in
the CUDA-graph warm-up, never inside a capture.

Op contract: ``torch.ops.jetspec_trt.gemv(x, weight, bias)`` with x [1, K], weight [N, K] contiguous, bias [N] or
None, all one dtype (bf16/fp16/fp32); returns [1, N] in that dtype. CPU (and any non-Triton device) falls back to
F.linear, so models can call the op unconditionally; the CUDA kernel must match F.linear to rounding (tests).

The gated variant ``torch.ops.jetspec_trt.gemv_gated(gate_up, weight, bias)`` is the MLP's down projection with
its activation inside: x = silu(gate) * up from gate_up [1, 2K] (gate first), rounded to the dtype where F.silu and
the product round, then x @ W^T (+ b). It saves the AR step one kernel a layer (the activation's) and its [1, K]
round trip through memory; each program recomputes its chunks of x from gate_up (L2-resident, K values), as it
would read them from x. Models run it under TargetModel.set_decode_gemv(gated=True).

PDL (`pdl_prefetch` > 0; off unless TargetModel.set_decode_gemv asks for it): the kernel is launched as a
programmatic dependent of the kernel before it (Hopper's programmatic dependent launch; Triton's launch_pdl), so
its programs can start while that kernel still runs: they prefetch the first PREFETCH_K columns of their W rows
into L2 (the weights do not depend on it), then wait (griddepcontrol.wait) before reading x, and write only after
it. It pays only after a kernel that signals its dependents early (griddepcontrol.launch_dependents: the fused
norms and the tree attention's kernels do on Hopper). `scripts/device_lease/pdl_probe.py` measured it on an H100
(bench/results/pdl-probe-h100.json): after one-program norm kernels of 5.6 us, 36 layers of the Qwen3-8B step's
GEMVs went 5.77 -> 5.41 ms with a 1024-column prefetch (0.36 of the norms' 0.81 ms hidden), every output equal.

The FP8 variant ``torch.ops.jetspec_trt.gemv_fp8(x, weight, x_scale, weight_scale, bias, out_dtype)`` streams an
e4m3 weight (half the bytes of bf16, so the AR step's GEMMs take about half the time) and dequantizes in registers:
y = (x @ W^T) * x_scale * weight_scale[row] (+ bias), accumulated in float32, scaled and biased in float32 in that
order and rounded once to out_dtype. x is [1, K] in any float dtype: the FP8 linear passes the input already rounded
to e4m3 with its input scale, so that the step computes what torch._scaled_mm computes for prefill and verify
(plugins/fp8_gemm.py). x_scale is one float32 element (the static input scale [] or the token's dynamic one [1, 1]);
weight_scale is float32, one element (per-tensor) or [N] (per-channel: one per output row). The scales stay on the
device and the kernel reads them, so the op needs no host sync inside a CUDA graph, and a per-channel projection is
one kernel writing its output dtype directly (no float32 [1, N] pass for the row scales). The same Triton kernel
serves both ops.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from jetspec_trt.plugins.tree_attention import LIBRARY, triton_kernel_once

OP_NAME = "gemv"


@torch.library.custom_op(f"{LIBRARY}::{OP_NAME}", mutates_args=())
def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, pdl_prefetch: int = 0) -> torch.Tensor:
    if x.is_cuda and _kernel() is not None and x.shape[0] == 1:
        return _triton_gemv(x, weight, bias, pdl_prefetch=pdl_prefetch)
    return F.linear(x, weight, bias)


@gemv.register_fake
def _gemv_fake(x, weight, bias, pdl_prefetch=0):
    return x.new_empty(x.shape[0], weight.shape[0])


@torch.library.custom_op(f"{LIBRARY}::{OP_NAME}_gated", mutates_args=())
def gemv_gated(gate_up: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    if gate_up.is_cuda and _kernel() is not None and gate_up.shape[0] == 1:
        return _triton_gemv(gate_up, weight, bias, gated=True)
    gate, up = gate_up.chunk(2, dim=-1)
    return F.linear(F.silu(gate) * up, weight, bias)


@gemv_gated.register_fake
def _gemv_gated_fake(gate_up, weight, bias):
    return gate_up.new_empty(gate_up.shape[0], weight.shape[0])


@torch.library.custom_op(f"{LIBRARY}::{OP_NAME}_fp8", mutates_args=())
def gemv_fp8(x: torch.Tensor, weight: torch.Tensor, x_scale: torch.Tensor, weight_scale: torch.Tensor,
             bias: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    if x.is_cuda and _kernel() is not None and x.shape[0] == 1:
        return _triton_gemv(x, weight, bias, (x_scale, weight_scale), out_dtype)
    # the kernel's arithmetic: float32 products and sum, then * x_scale * weight_scale (+ bias), one rounding
    y = F.linear(x.float(), weight.float()) * x_scale.float() * weight_scale.float()
    return (y if bias is None else y + bias.float()).to(out_dtype)


@gemv_fp8.register_fake
def _gemv_fp8_fake(x, weight, x_scale, weight_scale, bias, out_dtype):
    return x.new_empty(x.shape[0], weight.shape[0], dtype=out_dtype)


@triton_kernel_once
def _kernel():
    """The autotuned Triton kernel's launcher."""
    import triton
    import triton.language as tl
    from triton.language.extra.cuda import gdc_wait

    configs = [
        triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
        for bn in (4, 8, 16) for bk in (256, 512, 1024) for w in (4, 8) for s in (3,)
        if bn * bk <= 8192
    ]

    @triton.jit
    def gemv_kernel(x_ptr, w_ptr, b_ptr, xs_ptr, ws_ptr, y_ptr, N, K, HAS_BIAS: tl.constexpr,
                    HAS_SCALE: tl.constexpr, SCALE_PER_ROW: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_K: tl.constexpr, PDL: tl.constexpr = False, PREFETCH_K: tl.constexpr = 0,
                    GATED: tl.constexpr = False):
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < N
        if PDL:  # launched as a programmatic dependent of the kernel before it (module docstring, PDL)
            if PREFETCH_K > 0:  # W does not depend on that kernel: pull the first PREFETCH_K columns into L2
                LINE: tl.constexpr = 1024 // w_ptr.dtype.element_ty.primitive_bitwidth  # elements a 128-byte line
                # Clamped into W (the last row and column): a prefetch past the tensor's end could fault
                lines = tl.minimum(tl.arange(0, PREFETCH_K // LINE) * LINE, K - 1)
                tl.inline_asm_elementwise("prefetch.global.L2 [$1]; // $0", "=r,l",
                                          [w_ptr + tl.minimum(rows, N - 1)[:, None].to(tl.int64) * K + lines[None, :]],
                                          dtype=tl.int32, is_pure=False, pack=1)
            gdc_wait()  # x is the kernel before's output: read only once it has finished and flushed
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            col_ok = cols < K
            w = tl.load(w_ptr + rows[:, None].to(tl.int64) * K + cols[None, :],
                        mask=row_ok[:, None] & col_ok[None, :], other=0.0)
            if GATED:  # x = silu(gate) * up, each rounded to the dtype where F.silu and the product round
                gate = tl.load(x_ptr + cols, mask=col_ok, other=0.0)
                up = tl.load(x_ptr + K + cols, mask=col_ok, other=0.0).to(tl.float32)
                g = gate.to(tl.float32)
                act = (g * tl.sigmoid(g)).to(gate.dtype).to(tl.float32)
                x = (act * up).to(gate.dtype)
            else:
                x = tl.load(x_ptr + cols, mask=col_ok, other=0.0)
            acc += w.to(tl.float32) * x.to(tl.float32)[None, :]
        y = tl.sum(acc, axis=1)
        if HAS_SCALE:  # FP8 weights, after the reduction: * x's scale, then * the weight's (its row's, per channel)
            # Two pointers rather than one product x_scale * w_scale made before the launch: that product would be
            # one more kernel per projection in the AR step (what fusing the scales here removes), and this order
            # is the one every FP8 path applies (plugins/fp8_gemm.py), so the step and a verify round alike.
            y = y * tl.load(xs_ptr).to(tl.float32)
            if SCALE_PER_ROW:
                y = y * tl.load(ws_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
            else:
                y = y * tl.load(ws_ptr).to(tl.float32)
        if HAS_BIAS:
            y += tl.load(b_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
        tl.store(y_ptr + rows, y.to(y_ptr.dtype.element_ty), mask=row_ok)

    tuned_kernel = triton.autotune(configs=configs, key=["N", "K"])(gemv_kernel)

    def launch(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
               scales: tuple[torch.Tensor, torch.Tensor] | None, out_dtype: torch.dtype,
               block: tuple[int, int] | None = None, pdl_prefetch: int | None = None,
               gated: bool = False) -> torch.Tensor:
        n, k = weight.shape
        y = torch.empty(1, n, dtype=out_dtype, device=x.device)
        x_scale, w_scale = scales if scales is not None else (y, y)
        args = (x, weight, bias if bias is not None else y, x_scale, w_scale, y, n, k)
        flags = dict(HAS_BIAS=bias is not None, HAS_SCALE=scales is not None,
                     SCALE_PER_ROW=scales is not None and w_scale.numel() != 1, GATED=gated)
        if pdl_prefetch is not None:  # a programmatic dependent launch (module docstring, PDL), prefetching that
            # many columns (0: none) before it waits
            flags.update(PDL=True, PREFETCH_K=pdl_prefetch, launch_pdl=True)
        if block is None:
            grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]),)  # noqa: E731
            tuned_kernel[grid](*args, **flags)
        else:  # one (BLOCK_N, BLOCK_K), untuned: tests check each (Triton's interpreter cannot time configs)
            gemv_kernel[(triton.cdiv(n, block[0]),)](*args, **flags, BLOCK_N=block[0], BLOCK_K=block[1])
        return y

    launch.kernel = gemv_kernel  # the jit function itself: tests compile it ahead of time for sm_90
    return launch


def _triton_gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                 scales: tuple[torch.Tensor, torch.Tensor] | None = None, out_dtype: torch.dtype | None = None,
                 block: tuple[int, int] | None = None, gated: bool = False, pdl_prefetch: int = 0) -> torch.Tensor:
    """The Triton kernel on x's device, autotuned, or at one (BLOCK_N, BLOCK_K) `block` (tests); `scales`
    (x_scale, weight_scale) for an FP8 weight (gemv_fp8's contract); `gated`: x is gate_up [1, 2K] (gemv_gated's
    contract); `pdl_prefetch` > 0: a programmatic dependent launch prefetching that many columns (0: ordinary)."""
    if weight.stride(-1) != 1 or weight.stride(0) != weight.shape[1]:
        weight = weight.contiguous()
    bias = bias.contiguous() if bias is not None else None  # read at b_ptr + row; the models' biases already are
    if scales is not None:  # a per-row weight scale is read at ws_ptr + row; the loader's [N] scales already are
        scales = (scales[0], scales[1].contiguous())
    return _kernel()(x.contiguous(), weight, bias, scales, out_dtype or x.dtype, block, pdl_prefetch or None, gated)
