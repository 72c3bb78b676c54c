"""Fused kernels for a decoder layer's small ops: RMSNorm (with the residual add before it), and q/k RMSNorm +
RoPE + the paged KV write (RuntimeConfig.fused_layer_kernels).

Why: at batch 1 a layer's GEMVs stream its weights, and everything between them (norms, RoPE, the KV write,
residual adds) is a chain of tiny kernels whose cost is launches and round trips through memory, not bytes: issue
16 measured 40-75 us of it per layer on an H200 at the Qwen3-8B shape (36 layers). Here each row of a norm is one
program, and each (token, head) of q and k one program that normalises, rotates and stores (q to a new tensor,
k and v straight into the cache slots): the layer's non-GEMM work drops to a few launches.

The functions below without a kernel are the reference and the models' own math (models/layers.py calls
rms_norm and apply_rotary; the unfused layer writes with write_kv): the kernels round where they round, so in
bf16 a fused layer computes the eager layer's values (products and sums rounded to the dtype step by step),
up to the order of the norm's sum of squares.

Op contracts (CPU and other devices: the reference; CUDA: Triton):

    add_rms_norm(x [T, H], delta [T, H], weight [H], eps) -> (x + delta, rms_norm(x + delta))
    rms_norm_op(x [T, H], weight [H], eps) -> rms_norm(x)
    qk_norm_rope_write(q [T, Hq, D], k [T, Hkv, D], v [T, Hkv, D], q_weight [D] | None, k_weight [D] | None,
                       cos [T, D], sin [T, D], k_cache [P, S, Hkv, D], v_cache, slots int64 [T], eps) -> q'
        q' = rope(norm(q)); rope(norm(k)) and v are written at flat `slots` of the caches (mutated in place).
        q, k, v may be strided views (the fused QKV GEMM's split); no weight means no norm (Qwen2, Llama).
    kv_norm_rope_write(k, v, k_weight, cos, sin, k_cache, v_cache, slots, eps) -> None
        the same without q: the draft head's context rows, whose K/V come from the target's features.
"""

from __future__ import annotations

import torch

from jetspec_trt.plugins.tree_attention import LIBRARY, signals_dependents

try:  # Guarded: a CPU machine without (or with a broken) Triton still imports this module.
    import triton
    import triton.language as tl
    from triton.language.extra.cuda import gdc_launch_dependents
except Exception:  # noqa: BLE001 - ImportError, or a Triton that fails to initialise
    triton = None


# ---- the reference (and the unfused models' math) ------------------------------------------------------------

def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Qwen/Llama RMSNorm: normalise in float32, cast back, then scale (the order matters for bf16 parity)."""
    dtype = x.dtype
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE, NeoX (rotate-half) layout: x [T, H, D]; cos/sin [T, D]."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos.unsqueeze(1) + rotated * sin.unsqueeze(1)


def write_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor, k: torch.Tensor,
             v: torch.Tensor) -> None:
    """Store K/V [T, Hkv, D] at flat slots of one layer's paged cache [P, S, Hkv, D]."""
    k_cache.view(-1, *k.shape[1:]).index_copy_(0, slots, k.to(k_cache.dtype))
    v_cache.view(-1, *v.shape[1:]).index_copy_(0, slots, v.to(v_cache.dtype))


def norm_rope(x: torch.Tensor, weight: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor,
              eps: float) -> torch.Tensor:
    """q or k [T, H, D] -> RoPE(RMSNorm(x)) (no weight: no norm), as the unfused layer computes it."""
    return apply_rotary(x if weight is None else rms_norm(x, weight, eps), cos, sin)


# ---- ops -----------------------------------------------------------------------------------------------------

@torch.library.custom_op(f"{LIBRARY}::add_rms_norm", mutates_args=())
def add_rms_norm(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    if _rows_fit(x, delta, weight):
        return add_rms_norm_triton(x, delta, weight, eps)
    total = x + delta
    return total, rms_norm(total, weight, eps)


@add_rms_norm.register_fake
def _add_rms_norm_fake(x, delta, weight, eps):
    return torch.empty_like(x), x.new_empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype))


@torch.library.custom_op(f"{LIBRARY}::rms_norm", mutates_args=())
def rms_norm_op(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if _rows_fit(x, None, weight):
        return add_rms_norm_triton(x, None, weight, eps)[1]
    return rms_norm(x, weight, eps)


@rms_norm_op.register_fake
def _rms_norm_fake(x, weight, eps):
    return x.new_empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype))


@torch.library.custom_op(f"{LIBRARY}::qk_norm_rope_write", mutates_args=("k_cache", "v_cache"))
def qk_norm_rope_write(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_weight: torch.Tensor | None,
                       k_weight: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor,
                       v_cache: torch.Tensor, slots: torch.Tensor, eps: float) -> torch.Tensor:
    if q.is_cuda and triton is not None and _fits(q, k, v, k_cache, v_cache):
        return qk_norm_rope_write_triton(q, k, v, q_weight, k_weight, cos, sin, k_cache, v_cache, slots, eps)
    write_kv(k_cache, v_cache, slots, norm_rope(k, k_weight, cos, sin, eps), v)
    return norm_rope(q, q_weight, cos, sin, eps)


@qk_norm_rope_write.register_fake
def _qk_norm_rope_write_fake(q, k, v, q_weight, k_weight, cos, sin, k_cache, v_cache, slots, eps):
    return torch.empty(q.shape, dtype=q.dtype, device=q.device)


@torch.library.custom_op(f"{LIBRARY}::kv_norm_rope_write", mutates_args=("k_cache", "v_cache"))
def kv_norm_rope_write(k: torch.Tensor, v: torch.Tensor, k_weight: torch.Tensor | None, cos: torch.Tensor,
                       sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor,
                       eps: float) -> None:
    if k.is_cuda and triton is not None and _fits(k, k, v, k_cache, v_cache):
        kv_norm_rope_write_triton(k, v, k_weight, cos, sin, k_cache, v_cache, slots, eps)
    else:
        write_kv(k_cache, v_cache, slots, norm_rope(k, k_weight, cos, sin, eps), v)


def _rows_fit(x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor) -> bool:
    """Where the norm kernel runs: CUDA rows [T, H] with unit stride along H (the layer's always are)."""
    return (x.is_cuda and triton is not None and x.dim() == 2 and x.stride(-1) == 1 and weight.is_contiguous()
            and (delta is None or (delta.shape == x.shape and delta.dtype == x.dtype and delta.stride(-1) == 1)))


def _fits(q, k, v, k_cache, v_cache) -> bool:
    """What the kernel assumes: unit stride along D (q/k/v rows may be strided), a power-of-two head_dim, and
    caches whose flat slot s sits at s * stride(1) (the caches' per-layer views are contiguous)."""
    d = q.shape[-1]
    return (d >= 2 and d & (d - 1) == 0 and all(t.stride(-1) == 1 for t in (q, k, v))
            and q.dtype == k.dtype == v.dtype and k_cache.is_contiguous() and v_cache.is_contiguous())


# ---- Triton -------------------------------------------------------------------------------------------------

if triton is not None:

    @triton.jit
    def _round(x, DTYPE: tl.constexpr):
        """x rounded to DTYPE and back to float32: what an op in DTYPE rounds (a no-op for float32)."""
        return x.to(DTYPE).to(tl.float32)

    @triton.jit
    def _add_rms_norm_kernel(x_ptr, d_ptr, w_ptr, sum_ptr, out_ptr, n_cols, stride_x, stride_d, eps,
                             HAS_DELTA: tl.constexpr, BLOCK: tl.constexpr, TRIGGER: tl.constexpr = False):
        """One row: sum = x + delta (in x's dtype), out = weight * (sum * rsqrt(mean(sum^2) + eps)) like rms_norm."""
        if TRIGGER:  # the decode GEMV after a norm may be launched as its programmatic dependent (plugins/gemv.py)
            gdc_launch_dependents()
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        ok = cols < n_cols
        x = tl.load(x_ptr + row * stride_x + cols, mask=ok, other=0.0).to(tl.float32)
        if HAS_DELTA:
            d = tl.load(d_ptr + row * stride_d + cols, mask=ok, other=0.0).to(tl.float32)
            x = _round(x + d, sum_ptr.dtype.element_ty)
            tl.store(sum_ptr + row * n_cols + cols, x.to(sum_ptr.dtype.element_ty), mask=ok)
        inv = tl.rsqrt(tl.sum(x * x, 0) / n_cols + eps)
        normed = _round(x * inv, x_ptr.dtype.element_ty)
        w = tl.load(w_ptr + cols, mask=ok, other=0.0).to(tl.float32)
        tl.store(out_ptr + row * n_cols + cols, (w * normed).to(out_ptr.dtype.element_ty), mask=ok)

    @triton.jit
    def _norm_rope_row(src, w_ptr, cos_row, sin_row, eps, HAS_NORM: tl.constexpr, HEAD_DIM: tl.constexpr,
                       DTYPE: tl.constexpr):
        """One head row of q or k -> its two rotated halves (float32, rounded as the reference rounds in DTYPE)."""
        half = tl.arange(0, HEAD_DIM // 2)
        x1 = tl.load(src + half).to(tl.float32)
        x2 = tl.load(src + HEAD_DIM // 2 + half).to(tl.float32)
        if HAS_NORM:
            inv = tl.rsqrt((tl.sum(x1 * x1, 0) + tl.sum(x2 * x2, 0)) / HEAD_DIM + eps)
            w1 = tl.load(w_ptr + half).to(tl.float32)
            w2 = tl.load(w_ptr + HEAD_DIM // 2 + half).to(tl.float32)
            x1 = _round(w1 * _round(x1 * inv, DTYPE), DTYPE)
            x2 = _round(w2 * _round(x2 * inv, DTYPE), DTYPE)
        cos1 = tl.load(cos_row + half).to(tl.float32)
        cos2 = tl.load(cos_row + HEAD_DIM // 2 + half).to(tl.float32)
        sin1 = tl.load(sin_row + half).to(tl.float32)
        sin2 = tl.load(sin_row + HEAD_DIM // 2 + half).to(tl.float32)
        # x * cos + cat(-x2, x1) * sin, each product and the sum rounded to DTYPE as torch computes them.
        out1 = _round(_round(x1 * cos1, DTYPE) + _round(-x2 * sin1, DTYPE), DTYPE)
        out2 = _round(_round(x2 * cos2, DTYPE) + _round(x1 * sin2, DTYPE), DTYPE)
        return out1, out2

    @triton.jit
    def _qk_norm_rope_write_kernel(q_ptr, k_ptr, v_ptr, qw_ptr, kw_ptr, cos_ptr, sin_ptr, kc_ptr, vc_ptr, slot_ptr,
                                   qo_ptr, eps, stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
                                   stride_cos, stride_sin, stride_slot, stride_ch,
                                   NUM_Q: tl.constexpr, NUM_KV: tl.constexpr, HEAD_DIM: tl.constexpr,
                                   HAS_NORM: tl.constexpr):
        """Program (token, head): heads < NUM_Q are q heads (normed, rotated, stored to q'), the others KV heads
        (k normed and rotated, v as it is, both stored at the token's cache slot)."""
        token = tl.program_id(0).to(tl.int64)
        head = tl.program_id(1)
        half = tl.arange(0, HEAD_DIM // 2)
        cos_row = cos_ptr + token * stride_cos
        sin_row = sin_ptr + token * stride_sin
        dtype = q_ptr.dtype.element_ty
        if head < NUM_Q:
            out1, out2 = _norm_rope_row(q_ptr + token * stride_qt + head * stride_qh, qw_ptr, cos_row, sin_row, eps,
                                        HAS_NORM, HEAD_DIM, dtype)
            q_dst = qo_ptr + (token * NUM_Q + head) * HEAD_DIM  # (a name of its own: a pointer, the other an offset)
            tl.store(q_dst + half, out1.to(qo_ptr.dtype.element_ty))
            tl.store(q_dst + HEAD_DIM // 2 + half, out2.to(qo_ptr.dtype.element_ty))
        else:
            kv = head - NUM_Q
            out1, out2 = _norm_rope_row(k_ptr + token * stride_kt + kv * stride_kh, kw_ptr, cos_row, sin_row, eps,
                                        HAS_NORM, HEAD_DIM, dtype)
            slot = tl.load(slot_ptr + token).to(tl.int64)
            row = slot * stride_slot + kv * stride_ch
            tl.store(kc_ptr + row + half, out1.to(kc_ptr.dtype.element_ty))
            tl.store(kc_ptr + row + HEAD_DIM // 2 + half, out2.to(kc_ptr.dtype.element_ty))
            dims = tl.arange(0, HEAD_DIM)
            value = tl.load(v_ptr + token * stride_vt + kv * stride_vh + dims)
            tl.store(vc_ptr + row + dims, value.to(vc_ptr.dtype.element_ty))


def add_rms_norm_triton(x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor,
                        eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The norm kernel on x's device: (x + delta, its norm), or (x, norm(x)) without a delta. x [T, H] with unit
    stride along H (rows may be strided)."""
    rows, cols = x.shape
    out = torch.empty(rows, cols, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    total = torch.empty_like(x, memory_format=torch.contiguous_format) if delta is not None else x
    if rows:
        block = triton.next_power_of_2(cols)
        _add_rms_norm_kernel[(rows,)](x, delta if delta is not None else x, weight, total, out, cols, x.stride(0),
                                      delta.stride(0) if delta is not None else 0, eps, HAS_DELTA=delta is not None,
                                      BLOCK=block, TRIGGER=signals_dependents(x.device),
                                      num_warps=min(16, max(1, block // 256)))
    return total, out


def qk_norm_rope_write_triton(q, k, v, q_weight, k_weight, cos, sin, k_cache, v_cache, slots, eps) -> torch.Tensor:
    """The q/k kernel on q's device (the op's contract; `_fits` must hold)."""
    tokens, num_q, head_dim = q.shape
    out = torch.empty(tokens, num_q, head_dim, dtype=q.dtype, device=q.device)
    has_norm = q_weight is not None
    assert (k_weight is not None) == has_norm, "q and k are normed together (Qwen3) or not at all"
    _launch_qk_kernel(q, out, num_q, k, v, q_weight, k_weight, cos, sin, k_cache, v_cache, slots, eps)
    return out


def kv_norm_rope_write_triton(k, v, k_weight, cos, sin, k_cache, v_cache, slots, eps) -> None:
    """The same kernel with no q heads (every program a KV head): k's tensor stands in for q's unused pointers."""
    _launch_qk_kernel(k, k, 0, k, v, k_weight, k_weight, cos, sin, k_cache, v_cache, slots, eps)


def _launch_qk_kernel(q, out, num_q, k, v, q_weight, k_weight, cos, sin, k_cache, v_cache, slots, eps) -> None:
    tokens, num_kv, head_dim = k.shape
    if not tokens:
        return
    has_norm = k_weight is not None
    assert cos.stride(-1) == 1 and sin.stride(-1) == 1 and k_cache.stride() == v_cache.stride()
    _qk_norm_rope_write_kernel[(tokens, num_q + num_kv)](
        q, k, v, q_weight if has_norm else q, k_weight if has_norm else k, cos, sin, k_cache, v_cache,
        slots.contiguous(), out, eps, q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        cos.stride(0), sin.stride(0), k_cache.stride(1), k_cache.stride(2),
        NUM_Q=num_q, NUM_KV=num_kv, HEAD_DIM=head_dim, HAS_NORM=has_norm, num_warps=1)
