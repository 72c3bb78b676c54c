"""The decode GEMV op: CPU fallback is F.linear exactly; on CUDA the Triton kernel matches a float64 reference
over the decode shapes of the 0.5B and 8B models (and odd ones), with and without bias; models switched to it give
the same logits on CPU and rounding-close ones on CUDA. The kernel at fixed blocks also runs in Triton's interpreter on
the CPU (tests/plugins/interpreter.py; the interpreter cannot time the autotuner's configs)."""

import itertools

import pytest
import torch
import torch.nn.functional as F

from jetspec_trt.plugins.gemv import _triton_gemv, gemv, gemv_gated
from jetspec_trt.plugins.linear import gated_linear, linear
from jetspec_trt.plugins.tree_attention import causal_mask
from tests.plugins.interpreter import compile_for_hopper, needs_triton, run_in_interpreter


def test_cpu_fallback_is_f_linear():
    g = torch.Generator().manual_seed(0)
    x, w, b = torch.randn(1, 64, generator=g), torch.randn(96, 64, generator=g), torch.randn(96, generator=g)
    assert torch.equal(gemv(x, w, b), F.linear(x, w, b))
    assert torch.equal(gemv(x, w, None), F.linear(x, w))
    # linear() only takes the op for one row with the switch on
    x3 = torch.randn(3, 64, generator=g)
    assert torch.equal(linear(x3, w, b, True), F.linear(x3, w, b))
    assert torch.equal(linear(x, w, None, False), F.linear(x, w))


def test_gated_cpu_fallback_is_the_activation_then_f_linear():
    g = torch.Generator().manual_seed(1)
    gate_up, w = torch.randn(1, 2 * 48, generator=g), torch.randn(40, 48, generator=g)
    gate, up = gate_up.chunk(2, dim=-1)
    want = F.linear(F.silu(gate) * up, w)
    assert torch.equal(gemv_gated(gate_up, w, None), want)
    # gated_linear takes the gated op for one row with the switch on, else the activation then linear()
    assert torch.equal(gated_linear(gate_up, w, None, True, True), want)
    rows = torch.randn(3, 2 * 48, generator=g)
    assert torch.equal(gated_linear(rows, w, None, True, True), F.linear(F.silu(rows[:, :48]) * rows[:, 48:], w))


def test_model_switch_keeps_cpu_logits():
    from jetspec_trt.models.presets import random_models  # here: 1 s of imports the interpreter test need not pay

    target, _, _ = random_models("tiny", "cpu", torch.float32)
    target.fuse_weights()
    ids = torch.tensor([5, 9, 200])

    def logits():
        outs = []
        for t in range(3):  # prefill of 1 token, then single-token steps: the GEMV path's case
            cache = target.new_cache(16, 8)
            outs.append(target(ids[t : t + 1], torch.tensor([t]), cache, causal_mask(1)).logits)
        return torch.cat(outs)

    plain = logits()
    target.set_decode_gemv(True)
    assert all(layer.mlp.decode_gemv and layer.self_attn.decode_gemv for layer in target.layers)
    assert torch.equal(logits(), plain)
    # the gated down projection: the same CPU ops (the op's fallback); PDL only where the device has it (not here)
    target.set_decode_gemv(True, gated=True, pdl_prefetch=1024)
    assert all(layer.mlp.gated_gemv and layer.self_attn.gemv_pdl == 0 for layer in target.layers)
    assert torch.equal(logits(), plain)
    target.set_decode_gemv(False, gated=True, pdl_prefetch=1024)  # both ride on the GEMV switch
    assert not any(layer.mlp.gated_gemv or layer.mlp.gemv_pdl for layer in target.layers) and target.gemv_pdl == 0


SHAPES = [(896, 896), (1152, 896), (9728, 896), (896, 4864), (6144, 4096), (4096, 12288), (151936, 896),
          (1000, 1000), (7, 300), (33, 4097)]


# The interpreter's shapes (N below, at and past a multiple of BLOCK_N; K past a multiple of BLOCK_K) and
# (BLOCK_N, BLOCK_K) blocks: every BLOCK_N and BLOCK_K of the autotuner's configs.
SMALL_SHAPES = [(7, 300), (33, 1025), (100, 1000)]
BLOCKS = [(4, 256), (8, 1024), (16, 512)]


def check_gemv(device, n, k, dtype, block=None):
    """The op (autotuned) or, with `block`, the kernel at that (BLOCK_N, BLOCK_K) against float64 F.linear."""
    g = torch.Generator(device=device).manual_seed(n * 31 + k)
    x = torch.randn(1, k, device=device, generator=g).to(dtype)
    w = (torch.randn(n, k, device=device, generator=g) / k**0.5).to(dtype)
    b = torch.randn(n, device=device, generator=g).to(dtype)
    for bias in (None, b):
        got = gemv(x, w, bias) if block is None else _triton_gemv(x, w, bias, block=block)
        ref = F.linear(x.double(), w.double(), None if bias is None else bias.double())
        assert got.dtype == dtype and got.shape == (1, n)
        err = (got.double() - ref).norm() / ref.norm()
        # float32 accumulation; the output rounding of the dtype dominates
        assert err < {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype], (n, k, block, float(err))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("n, k", SHAPES)
def test_triton_gemv_matches_reference(n, k, dtype):
    check_gemv("cuda", n, k, dtype)


def check_blocks(device):
    """Each block at each shape, the dtypes in turn (bf16 too: the kernel only casts its loads to float32, which the
    interpreter does right, unlike bf16 arithmetic)."""
    dtypes = (torch.bfloat16, torch.float16, torch.float32)
    for i, (block, (n, k)) in enumerate(itertools.product(BLOCKS, SMALL_SHAPES)):
        check_gemv(device, n, k, dtypes[i % 3 - i // 3 % 3], block)
    check_strided_operands(device, BLOCKS[0] if device == "cpu" else None)


def check_strided_operands(device, block=None):
    """Views with other strides (x, weight and bias every other element) give F.linear's result: the op takes
    any tensors, like F.linear on the CPU, and the kernel reads them contiguous."""
    g = torch.Generator(device=device).manual_seed(3)
    x = torch.randn(1, 2 * 300, device=device, generator=g)[:, ::2]
    w = torch.randn(2 * 7, 2 * 300, device=device, generator=g)[::2, ::2]
    b = torch.randn(2 * 7, device=device, generator=g)[::2]
    got = gemv(x, w, b) if block is None else _triton_gemv(x, w, b, block=block)
    torch.testing.assert_close(got, F.linear(x, w, b), rtol=1e-5, atol=1e-5)


def check_gated(device):
    """The gated kernel (gemv_gated) at each block against float64 F.linear of the activation rounded where F.silu
    and the product round; K past a multiple of BLOCK_K, N past one of BLOCK_N. bf16 on CUDA only: the kernel
    rounds its activation to the dtype, and the interpreter's float32 -> bf16 cast is off by up to two ulps
    (interpreter.py), where fp16's rounds right."""
    dtypes = (torch.float16, torch.float32) + ((torch.bfloat16,) if device == "cuda" else ())
    for i, (block, (n, k)) in enumerate(itertools.product(BLOCKS, [(7, 300), (33, 1025)])):
        dtype = dtypes[i % len(dtypes)]
        g = torch.Generator(device=device).manual_seed(i)
        gate_up = (2 * torch.randn(1, 2 * k, device=device, generator=g)).to(dtype)
        w = (torch.randn(n, k, device=device, generator=g) / k**0.5).to(dtype)
        b = torch.randn(n, device=device, generator=g).to(dtype)
        gate, up = gate_up.float().chunk(2, dim=-1)
        act = (F.silu(gate).to(dtype).float() * up).to(dtype).double()
        for bias in (None, b):
            got = _triton_gemv(gate_up, w, bias, block=block, gated=True)
            ref = F.linear(act, w.double(), None if bias is None else bias.double())
            assert got.dtype == dtype and got.shape == (1, n)
            err = (got.double() - ref).norm() / ref.norm()
            assert err < {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype], (n, k, block, err)


@needs_triton
def test_kernel_in_the_triton_interpreter():
    run_in_interpreter(check_blocks)


@needs_triton
def test_gated_kernel_in_the_triton_interpreter():
    run_in_interpreter(check_gated)


@pytest.mark.gpu
def test_gated_blocks_on_cuda():
    check_gated("cuda")


@pytest.mark.gpu
def test_blocks_on_cuda():
    check_blocks("cuda")


@needs_triton
@pytest.mark.parametrize("variant", ["bf16", "fp8-per-tensor", "fp8-per-row"])
def test_kernel_compiles_for_hopper_without_a_gpu(variant):
    """The interpreter runs Python, not Triton's compiler: compile the kernel ahead of time for sm_90 at each
    (BLOCK_N, BLOCK_K) of the tests, as the bf16 GEMV and as the FP8 one with a per-tensor or per-row weight scale
    (e4m3 x and weight, float32 scales, bf16 bias and output), so what only the compiler checks (the scale
    branches' types, the masked per-row load) fails here rather than in a GPU lease's warm-up."""
    from jetspec_trt.plugins.gemv import _kernel

    kernel = _kernel().kernel
    fp8 = variant != "bf16"
    pointers = dict(x_ptr="*fp8e4nv" if fp8 else "*bf16", w_ptr="*fp8e4nv" if fp8 else "*bf16", b_ptr="*bf16",
                    xs_ptr="*fp32", ws_ptr="*fp32", y_ptr="*bf16")
    for block_n, block_k in BLOCKS:
        constants = dict(HAS_BIAS=True, HAS_SCALE=fp8, SCALE_PER_ROW=variant == "fp8-per-row", BLOCK_N=block_n,
                         BLOCK_K=block_k)
        compiled = compile_for_hopper(kernel, constants, pointers, num_warps=4, num_stages=3)
        assert compiled.asm["cubin"], (variant, block_n, block_k)


@needs_triton
@pytest.mark.parametrize("prefetch_k", [0, 512, 1024])
def test_pdl_variant_compiles_for_hopper_without_a_gpu(prefetch_k):
    """The programmatic-dependent-launch variant (L2 prefetch of W's first columns, then griddepcontrol.wait)
    compiles for sm_90 with launch_pdl, bf16 and e4m3 weights; its PTX holds the wait and, with a prefetch, the
    prefetches before it."""
    from jetspec_trt.plugins.gemv import _kernel

    kernel = _kernel().kernel
    for w_type in ("*bf16", "*fp8e4nv"):
        pointers = dict(x_ptr=w_type, w_ptr=w_type, b_ptr="*bf16", xs_ptr="*fp32", ws_ptr="*fp32", y_ptr="*bf16")
        constants = dict(HAS_BIAS=False, HAS_SCALE=w_type != "*bf16", SCALE_PER_ROW=True, BLOCK_N=8,
                         BLOCK_K=512, PDL=True, PREFETCH_K=prefetch_k, GATED=w_type == "*bf16")
        compiled = compile_for_hopper(kernel, constants, pointers, num_warps=4, num_stages=3, launch_pdl=True)
        ptx = compiled.asm["ptx"]
        assert compiled.asm["cubin"] and "griddepcontrol.wait" in ptx
        prefetches = ptx.count("prefetch.global.L2")
        assert (prefetches > 0) == (prefetch_k > 0)
        assert ptx.find("prefetch.global.L2") < ptx.find("griddepcontrol.wait")


@pytest.mark.gpu
def test_decode_gemv_model_logits_close_on_cuda():
    from jetspec_trt.models.presets import random_models

    target, _, _ = random_models("tiny", "cuda", torch.bfloat16)
    target.fuse_weights()
    cache = target.new_cache(16, 8)

    def step():
        cache.set_length(0)
        return target(torch.tensor([7], device="cuda"), torch.tensor([0], device="cuda"), cache,
                      causal_mask(1, "cuda")).logits

    plain = step()
    target.set_decode_gemv(True)
    fast = step()
    target.set_decode_gemv(False)
    err = (fast - plain).norm() / plain.norm()
    assert err < 2e-2, float(err)


@pytest.mark.gpu
def test_decode_gemv_variants_on_cuda():
    """The gated down projection gives the AR step's logits up to bf16 rounding; PDL launches (Hopper), replayed
    from a CUDA graph as engines run them, give exactly the ordinary launches' logits: the same kernels and sums,
    only the GEMVs' start moves (a GEMV that read its input before the kernel before it finished would differ)."""
    from jetspec_trt.models.presets import random_models
    from jetspec_trt.plugins.tree_attention import signals_dependents
    from tests.plugins.test_triton_tree_attention import capture

    target, _, _ = random_models("tiny", "cuda", torch.bfloat16)
    target.fuse_weights()
    target.set_fused_layer_kernels(True)  # the norms that signal their dependents
    cache = target.new_cache(64, 16)
    target.prefill(torch.arange(3, 40, device="cuda"), cache, logits="none")  # 37 tokens of context (cuBLAS)

    token, position, mask = torch.tensor([7], device="cuda"), torch.tensor([37], device="cuda"), causal_mask(1, "cuda")

    def step():  # the AR step's shape: token 37 (rewrites its own K/V slot at every call)
        return target(token, position, cache, mask).logits

    def graphed():
        graph, out = capture(step)
        graph.replay()
        torch.cuda.synchronize()
        return out.clone()

    target.set_decode_gemv(True)
    plain = graphed()
    target.set_decode_gemv(True, gated=True)
    gated = graphed()
    assert (gated - plain).norm() / plain.norm() < 2e-2
    if signals_dependents(torch.device("cuda")):
        target.set_decode_gemv(True, pdl_prefetch=1024)
        assert torch.equal(graphed(), plain)
        target.set_decode_gemv(True, gated=True, pdl_prefetch=1024)
        assert torch.equal(graphed(), gated)
    target.set_decode_gemv(False)
