"""The fused layer kernels (plugins/layer_kernels.py) against the torch reference, and the layer with them on.

The checks take a device: on CUDA they call the kernels' launchers on the GPU, on the CPU the same launchers in
Triton's interpreter (a subprocess: tests/plugins/interpreter.py). The kernels convert every load to float32 and
round with casts only, so bf16 runs in the interpreter too (its bf16 gap is arithmetic on bf16 values), but
the interpreter's float32 -> bf16 cast truncates where the GPU's rounds to nearest: each of the RoPE's rounding
steps then loses up to a step of bf16, hence its looser bound there. The kernels round as the reference rounds,
step by step: fp16 (and bf16 on the GPU) differ from it only through the order of the norm's sum of squares.
"""

import pytest
import torch

from jetspec_trt.plugins.layer_kernels import add_rms_norm, norm_rope, qk_norm_rope_write, rms_norm, write_kv
from tests.plugins.interpreter import compile_for_hopper, needs_triton, run_in_interpreter

TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 8e-3}
INTERPRETER_BF16 = 3e-2  # truncating casts (above)


def tolerance(dtype: torch.dtype, device: str) -> float:
    return INTERPRETER_BF16 if dtype == torch.bfloat16 and device == "cpu" else TOLERANCE[dtype]


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    got, expected = got.double().cpu(), expected.double().cpu()
    assert not torch.isnan(got).any()
    return ((got - expected).norm() / expected.norm().clamp_min(1e-30)).item()


def check_norms(device, dtype_name, rows=3, hidden=96):
    """x + delta and its RMSNorm, and RMSNorm alone; rows of x strided (a view), hidden not a power of two."""
    from jetspec_trt.plugins.layer_kernels import add_rms_norm_triton

    dtype = getattr(torch, dtype_name)
    tol = tolerance(dtype, device)
    g = torch.Generator().manual_seed(hidden)
    wide = torch.randn(rows, hidden + 7, generator=g).to(dtype)
    x = wide[:, :hidden]  # row stride hidden + 7
    delta = torch.randn(rows, hidden, generator=g).to(dtype)
    weight = (1 + 0.1 * torch.randn(hidden, generator=g)).to(dtype)
    total, normed = add_rms_norm_triton(x.to(device), delta.to(device), weight.to(device), 1e-6)
    expected_total = x + delta
    assert total.dtype == dtype and relative_error(total, expected_total) < tol
    assert relative_error(normed, rms_norm(expected_total, weight, 1e-6)) < tol
    alone, normed = add_rms_norm_triton(x.to(device), None, weight.to(device), 1e-6)
    assert relative_error(normed, rms_norm(x, weight, 1e-6)) < tol


def qk_case(dtype, tokens, num_q, num_kv, head_dim, qk_norm, seed=0, page=16):
    """Raw q/k/v as the fused QKV GEMM's split gives them (strided views), RoPE tables, one shuffled cache slot per
    token among at least twice as many (a tree verify's 256 tokens too: each token reads its own slot)."""
    pages = max(6, -(-2 * tokens // page))
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(tokens, (num_q + 2 * num_kv) * head_dim, generator=g).to(dtype)
    q, k, v = qkv.split([num_q * head_dim, num_kv * head_dim, num_kv * head_dim], dim=-1)
    q, k, v = (t.view(tokens, -1, head_dim) for t in (q, k, v))
    weights = [(1 + 0.1 * torch.randn(head_dim, generator=g)).to(dtype) for _ in range(2)] if qk_norm else [None] * 2
    angles = torch.rand(tokens, head_dim // 2, generator=g) * 100
    cos, sin = (torch.cat([f(angles)] * 2, dim=-1).to(dtype) for f in (torch.cos, torch.sin))
    k_cache = torch.randn(pages, page, num_kv, head_dim, generator=g).to(dtype)
    v_cache = torch.randn(pages, page, num_kv, head_dim, generator=g).to(dtype)
    slots = torch.randperm(pages * page, generator=g)[:tokens]
    assert slots.shape == (tokens,)
    return q, k, v, weights, cos, sin, k_cache, v_cache, slots


def check_qk_norm_rope_write(device, dtype_name, qk_norm, tokens=5, num_q=4, num_kv=2, head_dim=32):
    from jetspec_trt.plugins.layer_kernels import qk_norm_rope_write_triton

    dtype = getattr(torch, dtype_name)
    tol = tolerance(dtype, device)
    q, k, v, (qw, kw), cos, sin, k_cache, v_cache, slots = qk_case(dtype, tokens, num_q, num_kv, head_dim, qk_norm)
    expected_k, expected_v = k_cache.clone(), v_cache.clone()
    write_kv(expected_k, expected_v, slots, norm_rope(k, kw, cos, sin, 1e-6), v)
    expected_q = norm_rope(q, qw, cos, sin, 1e-6)
    moved = [t.to(device) if t is not None else None for t in (q, k, v, qw, kw, cos, sin, k_cache, v_cache, slots)]
    got_q = qk_norm_rope_write_triton(*moved, 1e-6)
    assert got_q.shape == q.shape and got_q.dtype == dtype
    assert relative_error(got_q, expected_q) < tol
    # Only the tokens' slots change: every other cache row is left as it was, bit for bit.
    flat_k, flat_v = moved[7].cpu().view(-1, num_kv, head_dim), moved[8].cpu().view(-1, num_kv, head_dim)
    untouched = torch.ones(flat_k.shape[0], dtype=torch.bool)
    untouched[slots] = False
    assert torch.equal(flat_k[untouched], expected_k.view(-1, num_kv, head_dim)[untouched])
    assert torch.equal(flat_v, expected_v.view(-1, num_kv, head_dim))  # v is copied, not computed
    assert relative_error(flat_k[slots], expected_k.view(-1, num_kv, head_dim)[slots]) < tol


def check_kv_norm_rope_write(device, dtype_name, tokens=5, num_kv=2, head_dim=32):
    """The K/V-only launch (the draft head's context rows: no q heads) writes what the q/k op writes."""
    from jetspec_trt.plugins.layer_kernels import kv_norm_rope_write_triton

    dtype = getattr(torch, dtype_name)
    _, k, v, (_, kw), cos, sin, k_cache, v_cache, slots = qk_case(dtype, tokens, 1, num_kv, head_dim, True, seed=3)
    expected_k, expected_v = k_cache.clone(), v_cache.clone()
    write_kv(expected_k, expected_v, slots, norm_rope(k, kw, cos, sin, 1e-6), v)
    moved = [t.to(device) for t in (k, v, kw, cos, sin, k_cache, v_cache, slots)]
    kv_norm_rope_write_triton(*moved, 1e-6)
    assert torch.equal(moved[6].cpu(), expected_v)
    assert relative_error(moved[5].cpu(), expected_k) < tolerance(dtype, device)


def check_all(device):
    for dtype in ("float32", "float16", "bfloat16"):
        check_norms(device, dtype)
        check_kv_norm_rope_write(device, dtype)
        for qk_norm in (True, False):
            check_qk_norm_rope_write(device, dtype, qk_norm)


def test_ops_on_the_cpu_are_the_reference():
    """Off CUDA the ops run the unfused math: the same values as the layer's own modules, bit for bit."""
    q, k, v, (qw, kw), cos, sin, k_cache, v_cache, slots = qk_case(torch.float32, 3, 4, 2, 16, True)
    expected_k, expected_v = k_cache.clone(), v_cache.clone()
    write_kv(expected_k, expected_v, slots, norm_rope(k, kw, cos, sin, 1e-6), v)
    got = qk_norm_rope_write(q, k, v, qw, kw, cos, sin, k_cache, v_cache, slots, 1e-6)
    assert torch.equal(got, norm_rope(q, qw, cos, sin, 1e-6))
    assert torch.equal(k_cache, expected_k) and torch.equal(v_cache, expected_v)
    x, delta, weight = torch.randn(2, 8), torch.randn(2, 8), torch.rand(8)
    total, normed = add_rms_norm(x, delta, weight, 1e-6)
    assert torch.equal(total, x + delta) and torch.equal(normed, rms_norm(x + delta, weight, 1e-6))


@pytest.mark.slow
@needs_triton
def test_kernels_in_the_triton_interpreter():
    run_in_interpreter(check_all)


@needs_triton
def test_a_verify_of_more_tokens_than_a_page_set_in_the_triton_interpreter():
    """100 tokens, each its own slot (the 256-token CUDA check once ran out of slots: the kernel read past them)."""
    run_in_interpreter(check_qk_norm_rope_write, "float32", True, 100, 2, 1, 16)


@pytest.mark.gpu
def test_kernels_on_cuda():
    check_all("cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("qk_norm", [True, False], ids=["qwen3", "qwen2"])
@pytest.mark.parametrize("tokens", [1, 256])
def test_engine_shapes_on_cuda(qk_norm, tokens):
    """Qwen3-8B's shapes in bf16: the AR step (1 token) and a tree verify; H = 4096 for the norms."""
    check_norms("cuda", "bfloat16", rows=tokens, hidden=4096)
    check_qk_norm_rope_write("cuda", "bfloat16", qk_norm, tokens=tokens, num_q=32, num_kv=8, head_dim=128)
    check_kv_norm_rope_write("cuda", "bfloat16", tokens=tokens, num_kv=8, head_dim=128)


@needs_triton
@pytest.mark.parametrize("kernel_name,num_q", [("_add_rms_norm_kernel", None), ("_qk_norm_rope_write_kernel", 32),
                                              ("_qk_norm_rope_write_kernel", 0)])
def test_kernels_compile_for_hopper_without_a_gpu(kernel_name, num_q):
    """The interpreter runs Python, not Triton's compiler: compile each kernel ahead of time for sm_90 in bf16 at
    the Qwen3-8B shape, so what only the compiler checks (types across the q/kv branches, constexpr dtypes) is
    caught without a GPU."""
    from jetspec_trt.plugins import layer_kernels

    kernel = getattr(layer_kernels, kernel_name)
    if kernel_name == "_add_rms_norm_kernel":  # with the early signal a PDL-launched GEMV after it waits on
        constants = dict(HAS_DELTA=True, BLOCK=4096, TRIGGER=True)
        pointers = {}
    else:
        constants = dict(NUM_Q=num_q, NUM_KV=8, HEAD_DIM=128, HAS_NORM=True)  # 0: the K/V-only launch
        pointers = {"slot_ptr": "*i64"}
    compiled = compile_for_hopper(kernel, constants, {"eps": "fp32", **pointers}, num_warps=4)
    assert compiled.asm["cubin"]
    assert ("griddepcontrol.launch_dependents" in compiled.asm["ptx"]) == constants.get("TRIGGER", False)


def check_greedy_tokens_unchanged(device):
    """The tiny random pair in float32 through the graph decoder's passes (prefill, AR steps, tree verify): greedy
    tokens with the fused layer kernels equal those without. In the interpreter (device "cpu") the kernels'
    launchers serve the ops' CPU dispatch, which is otherwise the torch reference."""
    from jetspec_trt.models.presets import random_models
    from jetspec_trt.plugins.layer_kernels import (add_rms_norm_triton, kv_norm_rope_write,
                                                   kv_norm_rope_write_triton, qk_norm_rope_write_triton, rms_norm_op)
    from jetspec_trt.runtime.config import RuntimeConfig, TreeConfig
    from jetspec_trt.runtime.graph_decoder import GraphDecoder

    if device == "cpu":
        add_rms_norm.register_kernel("cpu")(add_rms_norm_triton)
        rms_norm_op.register_kernel("cpu")(lambda x, weight, eps: add_rms_norm_triton(x, None, weight, eps)[1])
        qk_norm_rope_write.register_kernel("cpu")(qk_norm_rope_write_triton)
        kv_norm_rope_write.register_kernel("cpu")(kv_norm_rope_write_triton)
    target, draft, _ = random_models("tiny", "cpu" if device == "reference" else device, torch.float32)
    target.fuse_weights()
    draft.fuse_weights()
    spec = draft.spec
    runtime = RuntimeConfig(TreeConfig(8, 2, 3), "float32", 64, spec.block_size, spec.mask_token_id,
                            spec.target_layer_ids, page_size=16)
    decoder = GraphDecoder(target, draft, runtime)
    tokens = {}
    for fused in (False, True):
        decoder.set_fused_layer_kernels(fused)
        tokens[fused] = [[t for c in decoder.generate(list(range(40, 52)), 10, speculative=speculative) for t in c]
                         for speculative in (False, True)]
    assert tokens[True] == tokens[False]
    assert len(set(tokens[False][0])) > 1  # a continuation that varies, not one repeated token


@pytest.mark.slow
@needs_triton
def test_greedy_tokens_with_fused_kernels_in_the_interpreter():
    run_in_interpreter(check_greedy_tokens_unchanged)


def test_greedy_tokens_with_fused_ops_on_the_cpu():
    """The same through the ops' CPU dispatch (the reference): the layer's fused path routes every value right."""
    check_greedy_tokens_unchanged("reference")


@pytest.mark.gpu
def test_greedy_tokens_with_fused_kernels_on_cuda():
    check_greedy_tokens_unchanged("cuda")
