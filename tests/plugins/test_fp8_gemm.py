"""The FP8 GEMM and GEMV (plugins/fp8_gemm.py, plugins/gemv.py): they compute exactly (x rounded to e4m3 with
its scale) @ (the FP8 weight) * scales, on the CPU with torch's kernels and on CUDA with _scaled_mm (tensorwise or
rowwise scales) and the Triton FP8 GEMV (per-tensor or per-row weight scales; the former to the tensor cores'
accumulation); an FP8 model on CUDA gives the CPU's logits up to rounding, and an FP8 engine's graphed speculative
decoding matches its AR greedy decoding up to a few near-tie flips."""

import itertools

import pytest
import torch
import torch.nn.functional as F

from jetspec_trt.plugins.fp8_gemm import (FP8_DTYPE, FP8_MAX, dequantize, fp8_linear, input_scale_of, quantize,
                                          rowwise_scaled_mm)
from jetspec_trt.plugins.gemv import _triton_gemv, gemv_fp8
from jetspec_trt.plugins.linear import linear
from tests.plugins.interpreter import needs_triton, run_in_interpreter
from tests.plugins.test_gemv import BLOCKS, SHAPES, SMALL_SHAPES


def operands(n, k, device="cpu", seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(5, k, device=device, generator=g) * 3
    w = torch.randn(n, k, device=device, generator=g) / k**0.5
    w_scale = w.abs().max() / FP8_MAX
    bias = torch.randn(n, device=device, generator=g)
    return x, quantize(w, w_scale), w_scale, bias


def emulated(x, weight, weight_scale, input_scale, bias):
    """What the FP8 GEMM computes, in float64: both operands rounded to e4m3, products summed, scaled (a weight
    scale per tensor or per row)."""
    x_scale = input_scale if input_scale is not None else x.abs().amax(-1, keepdim=True).float() / FP8_MAX
    xq = quantize(x, x_scale).double() * x_scale.double()
    w_scale = weight_scale.double() if weight_scale.dim() == 0 else weight_scale.double()[:, None]
    y = F.linear(xq, weight.double() * w_scale)
    return y if bias is None else y + bias.double()


def per_channel_operands(n, k):
    """operands() with one weight scale per row: rows of very different sizes, as real projections have."""
    x, _, _, bias = operands(n, k)
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(1)) / k**0.5 * torch.logspace(-2, 0, n)[:, None]
    w_scale = w.abs().amax(dim=1) / FP8_MAX
    return x, quantize(w, w_scale[:, None]), w_scale, bias


@pytest.mark.parametrize("static", [True, False])
@pytest.mark.parametrize("per_channel", [True, False])
def test_reference_rounds_activations_like_the_fp8_gemm(static, per_channel):
    """The CPU reference (the weight's e4m3 values held in float32) rounds x as the FP8 GEMM does:
    x -> (x / s_x).clamp(-448, 448).to(e4m3).float() * s_x, s_x static or amax(|x_row|) / 448, then an fp32
    matmul; the same products as torch._scaled_mm. Without the activations' rounding it would be far off."""
    x, w, w_scale, bias = per_channel_operands(96, 64) if per_channel else operands(96, 64)
    input_scale = None if per_channel or not static else torch.tensor(x.abs().max().item() * 1.2 / FP8_MAX)
    x_scale = input_scale if input_scale is not None else x.abs().amax(-1, keepdim=True) / FP8_MAX
    x_fake = (x / x_scale).clamp(-448, 448).to(torch.float8_e4m3fn).float() * x_scale
    want = F.linear(x_fake, dequantize(w, w_scale, torch.float32), bias)
    got = fp8_linear(x, w.float(), bias, w_scale, input_scale, use_gemv=False)
    assert got.dtype == torch.float32 and torch.allclose(got, want, rtol=1e-5, atol=1e-5)
    assert torch.allclose(got, fp8_linear(x, w, bias, w_scale, input_scale, False), rtol=1e-5, atol=1e-5)
    weights_only = F.linear(x, dequantize(w, w_scale, torch.float32), bias)
    assert (weights_only - want).abs().max() > 100 * (got - want).abs().max()


def test_per_channel_weight_scales():
    """One scale per weight row: the GEMM (torch._scaled_mm, unit scales, float32 product scaled after) and the
    batch-1 GEMV (its CPU fallback here) compute the emulated product."""
    x, w, w_scale, bias = per_channel_operands(96, 64)
    assert fp8_linear(x, w, bias, w_scale, None, False).dtype == torch.float32
    for with_bias in (bias, None):
        want = emulated(x, w, w_scale, None, with_bias)
        got = fp8_linear(x, w, with_bias, w_scale, None, False)
        assert torch.allclose(got.double(), want, rtol=1e-5, atol=1e-5)
        one = fp8_linear(x[:1], w, with_bias, w_scale, None, use_gemv=True)
        assert torch.allclose(one.double(), want[:1], rtol=1e-5, atol=1e-5)
    # per-tensor scales would lose the small rows: their e4m3 values underflow to few levels
    flat = w_scale.max()
    coarse = fp8_linear(x, quantize(dequantize(w, w_scale, torch.float32), flat), bias, flat, None, False)
    assert rel_err(coarse, emulated(x, w, w_scale, None, bias).float()) > 10 * rel_err(
        fp8_linear(x, w, bias, w_scale, None, False), emulated(x, w, w_scale, None, bias).float())


@pytest.mark.parametrize("static", [True, False])
@pytest.mark.parametrize("with_bias", [True, False])
def test_fp8_linear_on_cpu_is_the_emulated_product(static, with_bias):
    x, w, w_scale, bias = operands(96, 64)
    bias = bias if with_bias else None
    input_scale = torch.tensor(x.abs().max().item() * 1.2 / FP8_MAX) if static else None
    want = emulated(x, w, w_scale, input_scale, bias)
    got = fp8_linear(x, w, bias, w_scale, input_scale, use_gemv=False)  # torch._scaled_mm
    assert got.dtype == torch.float32 and got.shape == (5, 96)
    assert torch.allclose(got.double(), want, rtol=1e-5, atol=1e-5)
    # One row through the GEMV op (its CPU fallback; the Triton kernel is held to the same emulation on CUDA): the
    # same product, so fp8_linear hands the GEMV the e4m3-rounded input (unrounded would be ~2.5e-2 away).
    for row in range(2):
        one = fp8_linear(x[row : row + 1], w, bias, w_scale, input_scale, use_gemv=True)
        assert torch.allclose(one.double(), emulated(x[row : row + 1], w, w_scale, input_scale, bias), rtol=1e-5,
                              atol=1e-5)
    # the one linear dispatches on the scale; a 3-D input keeps its leading shape
    assert torch.equal(linear(x, w, bias, False, w_scale, input_scale), got)
    assert fp8_linear(x.view(5, 1, 64), w, bias, w_scale, input_scale, False).shape == (5, 1, 96)


def scaled_mm_calls(monkeypatch) -> list[tuple]:
    """From here on, each torch._scaled_mm call as (scale_a's shape, scale_b's shape, out_dtype, bias given)."""
    calls, real = [], torch._scaled_mm

    def spy(a, b, scale_a, scale_b, bias=None, out_dtype=None, **kwargs):
        calls.append((tuple(scale_a.shape), tuple(scale_b.shape), out_dtype, bias is not None))
        return real(a, b, scale_a=scale_a, scale_b=scale_b, bias=bias, out_dtype=out_dtype, **kwargs)

    monkeypatch.setattr(torch, "_scaled_mm", spy)
    return calls


def unfused(x, weight, bias, weight_scale):
    """The dynamic-input FP8 GEMM as fp8_linear ran it before the rowwise path: unit-scale torch._scaled_mm to
    float32, then * (s_x * s_w) and the bias in float32, rounded once to x's dtype."""
    x_scale = input_scale_of(x, None)
    one = torch.ones((), device=x.device)
    y = torch._scaled_mm(quantize(x, x_scale), weight.t(), scale_a=one, scale_b=one, out_dtype=torch.float32)
    y = y * (x_scale * weight_scale)
    return (y if bias is None else y + bias.float()).to(x.dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("per_channel", [True, False], ids=["per-channel", "per-tensor"])
def test_rowwise_path_matches_the_unfused_one_on_cpu(monkeypatch, per_channel, dtype):
    """Dynamic per-token inputs and a 16-bit output: one rowwise torch._scaled_mm (scale_a = s_x [M, 1], scale_b =
    s_w as [1, N], bias fused, written in x's dtype) where torch's CPU kernel has rowwise scales (2.13's does),
    within an ulp of x's dtype (and float32 noise: torch's CPU kernel scales the operands before summing) of the
    unfused computation. Float32 outputs and static input scales keep their paths."""
    cpu_rowwise = rowwise_scaled_mm(torch.device("cpu"))
    assert cpu_rowwise or torch.__version__ < "2.13"
    x, w, w_scale, bias = per_channel_operands(96, 64) if per_channel else operands(96, 64)
    x = x.to(dtype)
    for b in (bias.to(dtype), None):
        want = unfused(x, w, b, w_scale)
        calls = scaled_mm_calls(monkeypatch)
        got = fp8_linear(x, w, b, w_scale, None, use_gemv=False)
        assert calls == ([((5, 1), (1, 96), dtype, b is not None)] if cpu_rowwise else [((), (), torch.float32, False)])
        assert got.dtype == dtype
        assert ((got.double() - want.double()).abs() <= ulp(want, dtype) + 1e-5 * want.abs().max()).all()
        monkeypatch.undo()
    calls = scaled_mm_calls(monkeypatch)
    fp8_linear(x.float(), w, bias, w_scale, None, False)  # float32 output: unit scales, scaled after
    assert calls == [((), (), torch.float32, False)]
    if not per_channel:  # a static input scale with a per-tensor weight scale: tensorwise
        fp8_linear(x, w, bias.to(dtype), w_scale, torch.tensor(x.abs().max().item() / FP8_MAX), False)
        assert calls[1] == ((), (), dtype, True)


@pytest.mark.gpu
@pytest.mark.parametrize("per_channel", [True, False], ids=["per-channel", "per-tensor"])
def test_rowwise_path_on_cuda(monkeypatch, per_channel):
    """Compute capability 9.0+: bf16 outputs of dynamic-input FP8 GEMMs take the rowwise torch._scaled_mm (cuBLAS
    12.9+ or CUTLASS), within a bf16 ulp of the unfused path (the same products to float32, scaled after) up to
    the two kernels' accumulation (SCALED_MM_RTOL)."""
    if torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("rowwise torch._scaled_mm needs compute capability 9.0+")
    x, w, w_scale, bias = per_channel_operands(1152, 896) if per_channel else operands(1152, 896)
    x, w, w_scale, bias = x.cuda().bfloat16(), w.cuda(), w_scale.cuda(), bias.cuda().bfloat16()
    want = unfused(x, w, bias, w_scale)
    calls = scaled_mm_calls(monkeypatch)
    got = fp8_linear(x, w, bias, w_scale, None, False)
    assert calls == [((5, 1), (1, 1152), torch.bfloat16, True)]
    assert got.dtype == torch.bfloat16
    assert rel_err(got, want) < 2**-8 + SCALED_MM_RTOL, rel_err(got, want)


def test_rounding_saturates_instead_of_overflowing():
    scale = torch.tensor(1.0)
    q = quantize(torch.tensor([1000.0, -1e6, 3.0]), scale)
    assert q.dtype == FP8_DTYPE and q.float().tolist() == [448.0, -448.0, 3.0]
    assert dequantize(q, torch.tensor(0.5), torch.float32).tolist() == [224.0, -224.0, 1.5]


def test_dynamic_scales_are_per_token():
    """Without a static input scale each row is scaled by its own amax: a row's result does not depend on the
    other rows of the forward (a tree verify computes each node as the AR step does), and an all-zero row is 0."""
    x, w, w_scale, bias = operands(32, 64)
    x[1] *= 100  # a large row must not coarsen the others' rounding
    x[3] = 0
    together = fp8_linear(x, w, bias, w_scale, None, False)
    for row in range(5):
        alone = fp8_linear(x[row : row + 1], w, bias, w_scale, None, False)
        assert torch.allclose(together[row : row + 1], alone, rtol=1e-5, atol=1e-3)  # summation order only
    assert torch.allclose(together[3], bias)


# ------------------------------------------------------------------------------- the Triton FP8 GEMV; CUDA


def check_gemv_fp8(device, n, k, out_dtype, block=None, per_row=False):
    """The op (autotuned) or, with `block`, the kernel at that (BLOCK_N, BLOCK_K) against the float64 product:
    a per-tensor weight scale with a static input scale [], or (per_row) one weight scale per row, rows of very
    different sizes, with the token's dynamic input scale [1, 1] (the per-channel recipe's AR step)."""
    x, w, w_scale, b = operands(n, k, device, seed=n * 31 + k)
    if per_row:
        w = dequantize(w, w_scale, torch.float32) * torch.logspace(-2, 0, n, device=device)[:, None]
        w_scale = w.abs().amax(dim=1) / FP8_MAX
        w = quantize(w, w_scale[:, None])
        x_scale = x[:1].abs().amax(-1, keepdim=True) / FP8_MAX
    else:
        x_scale = torch.tensor(0.01, device=device)
    xq = quantize(x[:1], x_scale)
    for bias in (None, b.to(out_dtype)):
        if block is None:
            got = gemv_fp8(xq, w, x_scale, w_scale, bias, out_dtype)
        else:
            got = _triton_gemv(xq, w, bias, (x_scale, w_scale), out_dtype, block)
        ref = F.linear(xq.double(), w.double()) * x_scale.double() * w_scale.double()
        ref = ref if bias is None else ref + bias.double()
        assert got.dtype == out_dtype and got.shape == (1, n)
        # float32 accumulation, then one rounding to out_dtype: within an ulp of it (and float32 noise) per element
        assert ((got.double() - ref).abs() <= ulp(ref, out_dtype) + 1e-5 * ref.abs().max()).all(), (n, k, block)
        err = (got.double() - ref).norm() / ref.norm()
        assert err < {torch.float32: 1e-5, torch.bfloat16: 1e-2}[out_dtype], (n, k, block, float(err))


def ulp(t, dtype):
    """The spacing of dtype's numbers at |t| (elementwise; t in any float dtype)."""
    _, exponent = torch.frexp(t.double())  # |t| = m * 2**exponent, m in [0.5, 1)
    return torch.ldexp(torch.full_like(t, torch.finfo(dtype).eps, dtype=torch.float64), exponent - 1)


@pytest.mark.gpu
@pytest.mark.parametrize("per_row", [False, True], ids=["per-tensor", "per-row"])
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("n, k", SHAPES)
def test_triton_gemv_fp8_matches_reference(n, k, out_dtype, per_row):
    check_gemv_fp8("cuda", n, k, out_dtype, per_row=per_row)


def check_blocks(device):
    """Each block at each shape, per-tensor and per-row weight scales, bf16 and float32 outputs in turn (with and
    without bias: check_gemv_fp8). The interpreter (Triton 3.6) holds e4m3 as uint8 and converts every finite value
    exactly (checked: all 254; the NaN encodings read as +-480, and quantize never makes them)."""
    for i, (block, (n, k)) in enumerate(itertools.product(BLOCKS, SMALL_SHAPES)):
        for per_row in (False, True):
            check_gemv_fp8(device, n, k, (torch.bfloat16, torch.float32)[(i + per_row) % 2], block, per_row)


@needs_triton
def test_kernel_in_the_triton_interpreter():
    run_in_interpreter(check_blocks)


@pytest.mark.gpu
def test_blocks_on_cuda():
    check_blocks("cuda")


# FP8 tensor-core GEMMs do not accumulate in full float32: Hopper's FP8 WGMMA keeps about 14 mantissa bits in its
# accumulator (DeepSeek-V3 technical report, section 3.3.2, measured on H800), and torch._scaled_mm's cuBLAS kernel
# shows it even with use_fast_accum=False: 1.25e-4 relative error for the (1152, 896) operands below on an H200
# (torch 2.11, CUDA 13), against 3e-7 for float32 accumulation (the CPU kernel). The bound sits 8x above that
# measurement and still 25x below what a different function costs: the same product without rounding the input
# to e4m3 is 2.5e-2 away (asserted below, so the bound keeps telling the two apart).
SCALED_MM_RTOL = 1e-3


def rel_err(got, want):
    return float((got.double().cpu() - want.double().cpu()).norm() / want.double().cpu().norm())


@pytest.mark.gpu
@pytest.mark.parametrize("scales", ["static", "dynamic", "per-channel"])
def test_scaled_mm_on_cuda_matches_cpu(scales):
    """Static (per-tensor _scaled_mm) and dynamic (per-token) input scales, and per-channel weight scales with
    per-token inputs, against the float64 emulation: the GEMV (float32 FMAs on exact e4m3 products) to float32
    rounding, _scaled_mm to its tensor cores' accumulation."""
    x, w, w_scale, bias = per_channel_operands(1152, 896) if scales == "per-channel" else operands(1152, 896)
    input_scale = torch.tensor(x.abs().max().item() / FP8_MAX) if scales == "static" else None
    want = emulated(x, w, w_scale, input_scale, bias)
    unrounded = F.linear(x.double(), w.double() * w_scale.double()) + bias.double()
    assert rel_err(unrounded, want) > 10 * SCALED_MM_RTOL
    assert rel_err(fp8_linear(x, w, bias, w_scale, input_scale, False), want) < 1e-5  # the CPU kernel
    xc, wc, bc, sc, ic = [t.cuda() if t is not None else None for t in (x, w, bias, w_scale, input_scale)]
    for dtype in (torch.bfloat16, torch.float32):
        got = fp8_linear(xc.to(dtype), wc, bc.to(dtype), sc, ic, False)
        assert got.dtype == dtype
        gemv = fp8_linear(xc[:1].to(dtype), wc, bc.to(dtype), sc, ic, True)  # the AR step's path
        gemm = fp8_linear(xc[:1].to(dtype), wc, bc.to(dtype), sc, ic, False)
        if dtype == torch.float32:
            assert rel_err(got, want) < SCALED_MM_RTOL, rel_err(got, want)
            assert rel_err(gemv, want[:1]) < 1e-5, rel_err(gemv, want[:1])
            assert rel_err(gemm, gemv) < SCALED_MM_RTOL, rel_err(gemm, gemv)
        else:  # x rounds to bf16 before e4m3 (a few e4m3 roundings flip), and the output rounds to bf16
            assert rel_err(got, want) < 2e-2 and rel_err(gemm, gemv) < 2e-2


# How far two runs of the tiny random FP8 model's logits drift apart when their GEMMs differ only in rounding: its
# e4m3 activation rounding turns any tiny change into flipped roundings, which it then amplifies. Measured on the
# CPU: Gaussian noise of 1.25e-4 (the tensor cores' accumulation error above) on every FP8 GEMM's output moves the
# logits by 0.054 in float32 and 0.060-0.067 in bf16; the same FP8 model in bf16 against float32 is 0.083 away
# (unquantized: 0.0097). The bound is about twice that; a wrong weight, scale or layout lands near another model,
# ~1.4 away. Finer differences (e.g. an input not rounded to e4m3) are not visible at this level: the GEMM tests
# above pin those.
MODEL_RTOL = 0.12


@pytest.mark.gpu
@pytest.mark.parametrize("recipe", ["per-tensor", "per-channel", "per-channel-tail-bf16"])
def test_fp8_model_on_cuda(fp8_pair, recipe):
    """Like with like: the CUDA model against the CPU's FP8 model (keep_fp8: the same e4m3 weights, activations
    rounded with the same scales, torch's _scaled_mm) in the same dtype, so only GEMM and attention rounding differ.
    Each --fp8-recipe's checkpoint (per-channel: row scales and per-token inputs; tail: bf16 MLPs in the mix)."""
    from jetspec_trt.models.checkpoint import load_target
    from jetspec_trt.plugins.tree_attention import causal_mask
    from tests.models.test_fp8 import TEXT, rel

    path = fp8_pair.fp8_targets[recipe]
    for dtype in (torch.float32, torch.bfloat16):
        cpu = load_target(path, dtype, fused_gemm=True, keep_fp8=True).prefill(TEXT).logits.float()
        reference = load_target(path, dtype).prefill(TEXT).logits.float()  # the CPU reference: float GEMMs
        model = load_target(path, dtype, "cuda", fused_gemm=True)
        attn = model.layers[0].self_attn
        assert attn.qkv_weight.dtype == FP8_DTYPE and attn.qkv_weight.is_cuda
        assert (attn.qkv_input_scale is not None) == (recipe == "per-tensor")
        assert rel(reference, cpu) < MODEL_RTOL
        assert model.lm_head.weight.dtype == dtype
        assert rel(model.prefill(TEXT).logits.float().cpu(), cpu) < MODEL_RTOL

    cache = model.new_cache(64, 16)  # the bf16 model, as engines run it

    def step():  # the AR step's shape: one token after a short context
        model.prefill(TEXT[:8], cache, logits="none")
        return model(torch.tensor([TEXT[8]], device="cuda"), torch.tensor([8], device="cuda"), cache,
                     causal_mask(1, "cuda")).logits.float()

    gemm = step()
    model.set_decode_gemv(True)
    gemv = step()
    model.set_decode_gemv(False)
    # the GEMV accumulates in float32, _scaled_mm with the tensor cores' shorter accumulator: see MODEL_RTOL
    assert rel(gemv, gemm) < MODEL_RTOL
    assert rel(gemm.cpu(), cpu[8:9]) < MODEL_RTOL


# The known gap of issue 15, kept visible rather than loosened: an H200 measured 5/8 (modelopt, 2026-12-04 twice)
# and 7/8 (autofp8) diverged prompts on the GEMV variant, every one a flip under 0.25 logits.
GEMV_GAP = pytest.mark.xfail(strict=True, reason="the FP8 GEMV accumulates in float32, verify's _scaled_mm with the "
                                                 "tensor cores' ~14-bit accumulator: more near-tie flips than bf16")


# The skinny GEMM's FP8 kernel sums exact products in float32 as the GEMV does, which was expected to close the gap:
# an H100 measured 4/8 diverged prompts (2026-12-06, lease 16; the GEMV variant 3/8 there, _scaled_mm 0/8). So the
# gap is not _scaled_mm's accumulator alone: any difference between the M = 1 kernel and the tree's kernel (here
# their order of sums) flips e4m3 roundings downstream. Only one kernel for both (the _scaled_mm variant) passes.
SKINNY_GAP = pytest.mark.xfail(strict=True, reason="the GEMV and the skinny GEMM sum in different orders: measured "
                                                   "4/8 diverged on an H100")


@pytest.mark.gpu
@pytest.mark.parametrize("ar_step", [pytest.param("gemv", marks=GEMV_GAP), "scaled_mm",
                                     pytest.param("gemv-skinny", marks=SKINNY_GAP)])
@pytest.mark.parametrize("layout", ["modelopt", "autofp8", "per-channel"])
def test_fp8_engine_speculative_matches_ar_on_cuda(fp8_pair, tmp_path, layout, ar_step, capsys):
    """Ours (static input scales) and an AutoFP8 checkpoint (dynamic, per-token scales; q/k/v requantized at
    fusion): graphed speculative greedy decoding equals AR greedy up to a few near-tie flips, as in bf16 (every
    divergence a near tie: tests/runtime/test_graph_decoder_gpu.py), with the AR step's GEMMs through the FP8
    GEMV (the default) or through the same torch._scaled_mm as tree verify.

    Both paths round the input to e4m3 alike (test_scaled_mm_on_cuda_matches_cpu), but the GEMV accumulates in
    float32 and _scaled_mm with the tensor cores' ~14-bit accumulator, a 1.25e-4 relative difference per GEMM
    where bf16 GEMMs differ by float32 summation order (~1e-7). Emulated on the CPU (tiny FP8 model in bf16, these
    8 prompts, 48 greedy tokens, Gaussian noise on every FP8 GEMM's output): noise 1e-7 diverges 0/8
    prompts, 1e-6 1/8, 1.25e-4 6/8 (an H200 run of the GEMV variant: 5/8 and 7/8). So the GEMV variant fails
    this bound until verify and the AR step accumulate alike; the _scaled_mm variant passes only if cuBLAS
    computes a row the same way for M = 1 and M = the tree size. "gemv-skinny": the GEMV step beside a verify on
    the skinny GEMM's FP8 kernel (the small-M switch: tree budget 32 is within its 2..64 rows), which sums exact
    products in float32 as the GEMV does, so the two differ by summation order alone, as bf16 GEMMs do; measured
    on an H100 it fails the bound as the GEMV variant does (SKINNY_GAP)."""
    from jetspec_trt.builders.engine_builder import BuildConfig, build_engine
    from jetspec_trt.runtime.config import TreeConfig
    from jetspec_trt.runtime.decoder import first_difference
    from jetspec_trt.runtime.engine import Engine
    from tests.models.test_fp8 import autofp8_checkpoint

    source = {"modelopt": fp8_pair.fp8_target, "per-channel": fp8_pair.per_channel_target}.get(layout) or \
        autofp8_checkpoint(fp8_pair.target, tmp_path / "src")
    engine_dir = build_engine(BuildConfig(source, fp8_pair.draft, tmp_path / "engine", TreeConfig(32, 4, 7),
                                          progress=False, tune=False, decode_gemv=ar_step != "scaled_mm",
                                          small_m_gemm=ar_step == "gemv-skinny"))
    engine = Engine.load(engine_dir, device="cuda")
    want_summary = {"scaled_mm": "FP8 GEMMs"}.get(ar_step, "FP8 GEMMs and FP8 GEMV")
    assert engine.summary["quantization"].endswith(want_summary)
    assert engine.target.layers[0].mlp.gate_up_weight.dtype == FP8_DTYPE
    g = torch.Generator().manual_seed(0)
    mismatches = 0
    for _ in range(8):
        prompt = torch.randint(0, 256, (int(torch.randint(4, 40, (1,), generator=g)),), generator=g).tolist()
        spec = [t for c in engine.fast.generate(prompt, 48) for t in c]
        ar = [t for c in engine.fast.generate(prompt, 48, speculative=False) for t in c]
        if spec != ar:
            mismatches += 1
            first = first_difference(ar, spec)
            logits = engine.fast.prefill_logits(prompt + ar[:first], speculative=False)
            assert abs(float(logits[ar[first]] - logits[spec[first]])) < 0.25
    with capsys.disabled():
        print(f"\nFP8 {layout}, AR step {ar_step}: {mismatches}/8 prompts diverged from AR greedy")
    assert mismatches <= 2
