"""The skinny GEMM op (plugins/skinny_gemm.py): CPU fallback is F.linear exactly; the Triton kernel at fixed blocks
matches F.linear in Triton's CPU interpreter (fp32 tight, fp16 loose; the interpreter cannot dot bf16) for M across
the buckets' edges, N and K off the block multiples, with and without bias, and for a row-strided input; the CUDA
twins check the same (bf16 too) and the autotuned op. Models switched to it keep their CPU logits; on CUDA, greedy
speculative output with the switch on equals AR (tests/runtime/test_graph_decoder_gpu.py's style)."""

import itertools

import pytest
import torch
import torch.nn.functional as F

from jetspec_trt.plugins.linear import linear
from jetspec_trt.plugins.skinny_gemm import _triton_skinny_gemm, m_bucket, pipeline_stages, skinny_gemm
from tests.plugins.interpreter import compile_for_hopper, needs_triton, run_in_interpreter

ROWS = [2, 7, 16, 17, 33, 64]  # each bucket's edges (16 | 17, 32 | 33, 64) and masked rows inside one
# N below and past a BLOCK_N multiple, K past a BLOCK_K multiple
SMALL_SHAPES = [(40, 300), (17, 129)]
# (BLOCK_N, BLOCK_K) of the autotuner's configs: the smallest and largest of each
BLOCKS = [(16, 64), (32, 256), (128, 128)]


def test_cpu_fallback_is_f_linear():
    g = torch.Generator().manual_seed(0)
    x, w, b = torch.randn(5, 64, generator=g), torch.randn(96, 64, generator=g), torch.randn(96, generator=g)
    assert torch.equal(skinny_gemm(x, w, b), F.linear(x, w, b))
    assert torch.equal(skinny_gemm(x, w, None), F.linear(x, w))
    # linear() with the small-M switch: any rows on the CPU are F.linear's
    for rows in (1, 5, 100):
        xr = torch.randn(rows, 64, generator=g)
        assert torch.equal(linear(xr, w, b, False, use_small_m=True), F.linear(xr, w, b))
        assert torch.equal(linear(xr, w, b, True, use_small_m=True), F.linear(xr, w, b))


def test_buckets_and_stages():
    assert [m_bucket(m) for m in (2, 16, 17, 32, 33, 64)] == [16, 16, 32, 32, 64, 64]
    # bf16 tiles pipeline 3-4 deep within the budget; float32's twice-as-large ones fewer, never none
    assert [pipeline_stages(*b) for b in BLOCKS] == [4, 3, 3]
    assert [pipeline_stages(*b, 4) for b in BLOCKS] == [4, 1, 1]


def check_skinny(device, m, n, k, dtype, block=None, bias_too=True):
    """The op (autotuned) or, with `block`, the kernel at that (BLOCK_N, BLOCK_K), against float64 F.linear."""
    g = torch.Generator(device=device).manual_seed(m * 1009 + n * 31 + k)
    x = torch.randn(m, k, device=device, generator=g).to(dtype)
    w = (torch.randn(n, k, device=device, generator=g) / k**0.5).to(dtype)
    b = torch.randn(n, device=device, generator=g).to(dtype)
    for bias in (None, b) if bias_too else (b,):
        got = skinny_gemm(x, w, bias) if block is None else _triton_skinny_gemm(x, w, bias, block=block)
        ref = F.linear(x.double(), w.double(), None if bias is None else bias.double())
        assert got.dtype == dtype and got.shape == (m, n)
        err = (got.double() - ref).norm() / ref.norm()
        # float32 accumulation; the output rounding of the dtype dominates
        assert err < {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype], \
            (m, n, k, block, dtype, float(err))


def check_strided_input(device, block=None):
    """x rows with a row stride (a slice of a wider tensor, as verify's hidden states may be) and a weight and bias
    that are views: F.linear's result."""
    g = torch.Generator(device=device).manual_seed(3)
    x = torch.randn(2 * 9, 2 * 300, device=device, generator=g)[::2, :300]
    w = torch.randn(2 * 40, 2 * 300, device=device, generator=g)[::2, ::2]
    b = torch.randn(2 * 40, device=device, generator=g)[::2]
    got = skinny_gemm(x, w, b) if block is None else _triton_skinny_gemm(x, w, b, block=block)
    torch.testing.assert_close(got, F.linear(x, w, b), rtol=1e-5, atol=1e-5)


def check_blocks(device):
    """Each M at each shape and block (fp32 and fp16 in turn; bf16 on CUDA only: the interpreter's tl.dot computes
    bf16 on bit patterns, tests/plugins/interpreter.py)."""
    dtypes = (torch.float32, torch.float16) + ((torch.bfloat16,) if device == "cuda" else ())
    cases = list(itertools.product(ROWS, SMALL_SHAPES, BLOCKS))
    for i, (m, (n, k), block) in enumerate(cases):
        # every case in fp32 (tight); the half types take turns, so the interpreter's run stays short
        check_skinny(device, m, n, k, torch.float32, block, bias_too=i % 2 == 0)
        check_skinny(device, m, n, k, dtypes[1 + i % (len(dtypes) - 1)], block, bias_too=i % 2 == 1)
    check_strided_input(device, BLOCKS[0] if device == "cpu" else None)


@needs_triton
def test_kernel_in_the_triton_interpreter():
    run_in_interpreter(check_blocks, timeout=900)


@needs_triton
@pytest.mark.parametrize("block_m", [16, 64])
def test_kernel_compiles_for_hopper_without_a_gpu(block_m):
    """The interpreter runs Python, not Triton's compiler: compile the kernel ahead of time for sm_90 in bf16 at each
    autotuner config's tile and stages, so a tile that the compiler rejects (shared memory, tl.dot shapes) fails here
    rather than in a GPU lease's warm-up."""
    from jetspec_trt.plugins.skinny_gemm import _kernel

    kernel = _kernel().kernel
    for block_n, block_k in BLOCKS:
        constants = dict(HAS_BIAS=True, IEEE=False, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k)
        compiled = compile_for_hopper(kernel, constants, num_warps=4, num_stages=pipeline_stages(block_n, block_k))
        assert compiled.asm["cubin"], (block_m, block_n, block_k)


@pytest.mark.gpu
def test_blocks_on_cuda():
    check_blocks("cuda")


# The round's GEMMs at the 0.5B and 8B shapes (fused QKV, o_proj, gate-up, down, lm_head) and odd ones
SHAPES = [(1152, 896), (896, 896), (9728, 896), (896, 4864), (151936, 896), (6144, 4096), (4096, 12288),
          (1000, 1000), (33, 4097)]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("n, k", SHAPES)
def test_triton_skinny_gemm_matches_reference(n, k, dtype):
    for m in ROWS:
        check_skinny("cuda", m, n, k, dtype)


def test_model_switch_keeps_cpu_logits():
    """On the CPU the switch falls back to F.linear everywhere: a 5-token forward (the verify path) and the draft's
    depth logits are unchanged, and the switch reaches every layer of target and draft."""
    from jetspec_trt.models.presets import random_models
    from jetspec_trt.plugins.tree_attention import causal_mask

    target, draft, _ = random_models("tiny", "cpu", torch.float32)
    target.fuse_weights()
    ids = torch.tensor([5, 9, 200, 17, 3])

    def outputs():
        cache = target.new_cache(16, 8)
        out = target(ids, torch.arange(len(ids)), cache, causal_mask(len(ids)), draft.spec.target_layer_ids)
        return out.logits, draft.project_context(out.features), target.lm_head_rows(out.features[:, : target.config.hidden_size])

    plain = outputs()
    target.set_small_m_gemm(True)
    draft.set_small_m_gemm(True)
    assert all(layer.mlp.small_m_gemm and layer.self_attn.small_m_gemm for layer in target.layers)
    assert all(layer.mlp.small_m_gemm and layer.self_attn.small_m_gemm for layer in draft.layers)
    for got, want in zip(outputs(), plain):
        assert torch.equal(got, want)
    target.set_small_m_gemm(False)
    assert not any(layer.mlp.small_m_gemm or layer.self_attn.small_m_gemm for layer in target.layers)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_small_m_gemm_rounds_equal_ar_on_cuda(dtype):
    """Graphed speculative greedy output with the switch on equals AR greedy (fp32 exactly; bf16 up to near ties,
    as tests/runtime/test_graph_decoder_gpu.py allows: verify's and the AR step's GEMMs round differently)."""
    from jetspec_trt.models.presets import random_models
    from jetspec_trt.runtime.config import RuntimeConfig, TreeConfig
    from jetspec_trt.runtime.decoder import first_difference
    from jetspec_trt.runtime.graph_decoder import GraphDecoder

    target, draft, _ = random_models("tiny", "cuda", dtype)
    target.fuse_weights()
    draft.fuse_weights()
    spec = draft.spec
    runtime = RuntimeConfig(TreeConfig(64, 4, 7), "float32", 512, spec.block_size, spec.mask_token_id,
                            spec.target_layer_ids, (), small_m_gemm=True)
    graphed = GraphDecoder(target, draft, runtime)
    assert target.small_m_gemm and draft.small_m_gemm
    g = torch.Generator().manual_seed(0)
    for i in range(8):
        prompt = torch.randint(0, 256, (int(torch.randint(2, 60, (1,), generator=g)),), generator=g).tolist()
        tree = TreeConfig((4, 16, 64)[i % 3], 4, (3, 7)[i % 2])
        spec_out = [t for c in graphed.generate(prompt, 48, tree=tree) for t in c]
        ar = [t for c in graphed.generate(prompt, 48, speculative=False) for t in c]
        if dtype == torch.float32:
            assert spec_out == ar
        elif spec_out != ar:
            first = first_difference(ar, spec_out)
            logits = graphed.prefill_logits(prompt + ar[:first], speculative=False)
            assert abs(float(logits[ar[first]] - logits[spec_out[first]])) < 0.25


# ------------------------------------------------------------------------ FP8 (skinny_gemm_fp8: a verify's few rows)


def fp8_operands(device, m, n, k, per_channel):
    """e4m3 x [m, k] with its dynamic per-row scale [m, 1] (per_channel) or a static one [], and an e4m3 weight
    [n, k] with per-row scales [n] (rows of very different sizes) or one []; a bias."""
    from jetspec_trt.plugins.fp8_gemm import FP8_MAX, quantize

    g = torch.Generator(device=device).manual_seed(m * 1009 + n * 31 + k)
    x = torch.randn(m, k, device=device, generator=g) * 3
    w = torch.randn(n, k, device=device, generator=g) / k**0.5
    if per_channel:
        w = w * torch.logspace(-2, 0, n, device=device)[:, None]
        w_scale, x_scale = w.abs().amax(dim=1) / FP8_MAX, x.abs().amax(-1, keepdim=True) / FP8_MAX
        wq = quantize(w, w_scale[:, None])
    else:
        w_scale, x_scale = w.abs().max() / FP8_MAX, torch.tensor(0.05, device=device)
        wq = quantize(w, w_scale)
    return quantize(x, x_scale), x_scale, wq, w_scale, torch.randn(n, device=device, generator=g)


def check_skinny_fp8(device, m, n, k, out_dtype, per_channel, block=None, scale_shape=None):
    """The FP8 kernel (autotuned op, or at `block`) against the float64 product of the same e4m3 operands, scaled:
    float32 sums of exact products, one rounding to out_dtype (within an ulp of it, plus float32 noise).
    `scale_shape`: a per-tensor weight scale stored in that shape ([1] as some checkpoints hold it)."""
    from jetspec_trt.plugins.skinny_gemm import skinny_gemm_fp8
    from tests.plugins.test_fp8_gemm import ulp

    xq, x_scale, wq, w_scale, b = fp8_operands(device, m, n, k, per_channel)
    if scale_shape is not None:
        w_scale = w_scale.reshape(scale_shape)
    for bias in (None, b.to(out_dtype)):
        if block is None:
            got = skinny_gemm_fp8(xq, wq, x_scale, w_scale, bias, out_dtype)
        else:
            got = _triton_skinny_gemm(xq, wq, bias, block, (x_scale, w_scale), out_dtype)
        ref = F.linear(xq.double(), wq.double()) * x_scale.double() * w_scale.double()
        ref = ref if bias is None else ref + bias.double()
        assert got.dtype == out_dtype and got.shape == (m, n)
        bound = ulp(ref, out_dtype) + 1e-5 * ref.abs().amax(-1, keepdim=True)
        assert ((got.double() - ref).abs() <= bound).all(), (m, n, k, block, out_dtype, per_channel)


def check_fp8_blocks(device):
    """Rows across the buckets, each shape and block, per-channel and per-tensor scales, bf16 and float32 outputs."""
    cases = list(itertools.product((2, 17, 64), SMALL_SHAPES, BLOCKS))
    for i, (m, (n, k), block) in enumerate(cases):
        per_channel = i % 3 != 0
        check_skinny_fp8(device, m, n, k, (torch.bfloat16, torch.float32)[i % 2], per_channel, block,
                         None if per_channel or i % 2 else (1,))


def test_fp8_cpu_fallback_is_the_reference_arithmetic():
    """On the CPU the op is gemv_fp8's reference (float32 products and sums, scales, one rounding), and an FP8
    linear with the small-M switch computes what it computes without it."""
    from jetspec_trt.plugins.fp8_gemm import fp8_linear
    from jetspec_trt.plugins.gemv import gemv_fp8
    from jetspec_trt.plugins.skinny_gemm import skinny_gemm_fp8

    xq, x_scale, wq, w_scale, b = fp8_operands("cpu", 5, 48, 64, True)
    assert torch.equal(skinny_gemm_fp8(xq, wq, x_scale, w_scale, b, torch.bfloat16),
                       gemv_fp8(xq, wq, x_scale, w_scale, b, torch.bfloat16))
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(1))
    assert torch.equal(fp8_linear(x, wq, b, w_scale, None, False, use_small_m=True),
                       fp8_linear(x, wq, b, w_scale, None, False))


@needs_triton
def test_fp8_kernel_in_the_triton_interpreter():
    run_in_interpreter(check_fp8_blocks, timeout=900)


@needs_triton
def test_fp8_kernel_compiles_for_hopper_without_a_gpu():
    """The FP8 variant (e4m3 tiles widened to fp16 before tl.dot, the scales' epilogue) compiles for sm_90 at each
    checked tile, both buckets' ends."""
    from jetspec_trt.plugins.skinny_gemm import _kernel

    kernel = _kernel().kernel
    types = {"x_ptr": "*fp8e4nv", "w_ptr": "*fp8e4nv", "xs_ptr": "*fp32", "ws_ptr": "*fp32"}
    for block_m, (block_n, block_k) in itertools.product((16, 64), BLOCKS):
        constants = dict(HAS_BIAS=True, IEEE=False, HAS_SCALE=True, X_SCALE_PER_ROW=True, W_SCALE_PER_COL=True,
                         BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k)
        compiled = compile_for_hopper(kernel, constants, types, num_warps=4,
                                      num_stages=pipeline_stages(block_n, block_k, 1))
        assert compiled.asm["cubin"], (block_m, block_n, block_k)


@pytest.mark.gpu
def test_fp8_blocks_on_cuda():
    check_fp8_blocks("cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("per_channel", [True, False], ids=["per-channel", "per-tensor"])
@pytest.mark.parametrize("n, k", SHAPES)
def test_triton_skinny_gemm_fp8_matches_reference(n, k, per_channel):
    for m in ROWS:
        check_skinny_fp8("cuda", m, n, k, torch.bfloat16, per_channel)
