"""Building blocks shared by the target decoder and the draft head. Parameter names follow Hugging Face's."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from jetspec_trt.models.fp8 import fuse_fp8, split_weight_scale
from jetspec_trt.plugins.layer_kernels import apply_rotary, rms_norm, rms_norm_op
from jetspec_trt.plugins.linear import gated_linear, linear


class RMSNorm(nn.Module):
    """Qwen/Llama RMSNorm: normalise in float32, cast back, then scale (the order matters for bf16 parity)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self.fused_kernel = False  # one kernel (plugins.layer_kernels.rms_norm_op) instead of torch's ~7

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (rms_norm_op if self.fused_kernel else rms_norm)(x, self.weight, self.eps)


class Rotary(nn.Module):
    """RoPE in the NeoX (rotate-half) layout that Qwen and Llama use."""

    def __init__(self, inv_freq: torch.Tensor, attention_scaling: float = 1.0):
        super().__init__()
        self.register_buffer("inv_freq", inv_freq.float(), persistent=False)
        self.attention_scaling = attention_scaling
        self.table: torch.Tensor | None = None  # [positions, 2, D]: cos and sin per position (build_table)

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        if self.table is not None and self.table.dtype == dtype:
            # One gather instead of ~8 small kernels a pass; indexing, not index_select, whose CUDA kernel for
            # <= 16 ids loops over them (~9 us for a 16-row draft block on an H100, ~2 us indexed: TargetModel.embed)
            rows = self.table[positions]
            return rows[:, 0], rows[:, 1]
        freqs = positions.float().unsqueeze(-1) * self.inv_freq
        emb = torch.cat([freqs, freqs], dim=-1)
        return (emb.cos() * self.attention_scaling).to(dtype), (emb.sin() * self.attention_scaling).to(dtype)

    def build_table(self, positions: int, dtype: torch.dtype) -> None:
        """Compute cos/sin of positions 0 .. positions-1 once; cos_sin in `dtype` then gathers rows of it (the
        same values: the math is elementwise). The caller guarantees every position it asks for is below
        `positions` (GraphDecoder: a position is only asked for a token with a cache slot); None drops it."""
        self.table = None
        cos, sin = self.cos_sin(torch.arange(positions, device=self.inv_freq.device), dtype)
        self.table = torch.stack([cos, sin], dim=1)


class Linear(nn.Linear):
    """nn.Linear whose weight may be FP8 (e4m3, models/fp8.py): then `weight_scale` (and `input_scale`, for
    static activation scales) hold its scales, under the names FP8 checkpoints give them, so a
    checkpoint's state dict loads as it is. Unquantized, both are None and the layer is a plain nn.Linear.
    Every projection of the decoder layers is one; all run through plugins.linear."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        super().__init__(in_features, out_features, bias=bias)
        self.register_buffer("weight_scale", None)
        self.register_buffer("input_scale", None)

    def forward(self, x: torch.Tensor, use_gemv: bool = False, use_small_m: bool = False,
                pdl_prefetch: int = 0) -> torch.Tensor:
        return linear(x, self.weight, self.bias, use_gemv, self.weight_scale, self.input_scale, use_small_m,
                      pdl_prefetch)


class MLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = Linear(intermediate_size, hidden_size, bias=False)
        # gate and up weights concatenated by rows (set by set_fused/fuse). A buffer, so .to() moves it too, but
        # not persistent: state_dict() keeps the Hugging Face names, whose weights are views of this tensor.
        # FP8 weights: the fused tensor's one weight scale and input scale (None otherwise).
        self.register_buffer("gate_up_weight", None, persistent=False)
        self.register_buffer("gate_up_weight_scale", None, persistent=False)
        self.register_buffer("gate_up_input_scale", None, persistent=False)
        self.fused_gemm = False  # one GEMM over gate_up_weight instead of two (GPU engines)
        self.decode_gemv = False  # single-token GEMMs through plugins.gemv (see TargetModel.set_decode_gemv)
        self.gated_gemv = False  # with it, the single-token down projection takes the activation inside its GEMV
        self.gemv_pdl = 0  # > 0: the gate-up GEMV launched as a programmatic dependent of the norm (plugins.gemv)
        self.small_m_gemm = False  # 2..64-row GEMMs through plugins.skinny_gemm (see TargetModel.set_small_m_gemm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        route = (self.decode_gemv, self.small_m_gemm)
        if self.fused_gemm:
            gate_up = linear(x, self.gate_up_weight, None, self.decode_gemv, self.gate_up_weight_scale,
                             self.gate_up_input_scale, self.small_m_gemm, self.gemv_pdl)
            down = self.down_proj
            return gated_linear(gate_up, down.weight, down.bias, self.gated_gemv, self.decode_gemv, down.weight_scale,
                                down.input_scale, self.small_m_gemm)
        gate, up = self.gate_proj(x, *route), self.up_proj(x, *route)
        return self.down_proj(F.silu(gate) * up, *route)

    def set_fused(self, weight: torch.Tensor, bias: torch.Tensor | None = None, weight_scale: torch.Tensor | None = None,
                  input_scale: torch.Tensor | None = None) -> None:
        """Take gate/up from one row-concatenated weight (built at engine build time): the two Linear weights
        become views of it, so the model holds one copy. FP8: the fused weight's scales, which both parts take."""
        assert bias is None, "the MLP has no bias"
        _share_rows(weight, None, (self.gate_proj, self.up_proj), weight_scale, input_scale)
        self.gate_up_weight, self.gate_up_weight_scale, self.gate_up_input_scale = weight, weight_scale, input_scale

    def fuse(self) -> None:
        """Compute gate and up with one GEMM; concatenates the weights only if they are not fused already."""
        if self.gate_up_weight is None:
            weight, weight_scale, input_scale = _concatenated((self.gate_proj, self.up_proj))
            self.set_fused(weight, None, weight_scale, input_scale)
        self.fused_gemm = True


def _concatenated(projections: tuple[Linear, ...]) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """The projections' weights as one row-concatenated tensor, with its scales where they are FP8 (each part
    requantized to one shared scale: models.fp8.fuse_fp8)."""
    if all(p.weight_scale is None for p in projections):
        return torch.cat([p.weight.data for p in projections]), None, None
    return fuse_fp8([p.weight.data for p in projections], [p.weight_scale for p in projections],
                    [p.input_scale for p in projections])


def _share_rows(weight: torch.Tensor, bias: torch.Tensor | None, projections: tuple[Linear, ...],
                weight_scale: torch.Tensor | None = None, input_scale: torch.Tensor | None = None) -> None:
    """Point each Linear's weight (and bias) at its rows of the concatenated tensors; FP8 parts take the fused
    tensor's scales (its rows were quantized with them)."""
    rows = [p.out_features for p in projections]
    if weight.shape[0] != sum(rows):
        raise ValueError(f"fused weight has {weight.shape[0]} rows, the projections need {sum(rows)}")
    biases = bias.split(rows) if bias is not None else [None] * len(rows)
    scales = split_weight_scale(weight_scale, rows)
    for p, w, b, s in zip(projections, weight.split(rows), biases, scales):
        p.weight = nn.Parameter(w, requires_grad=p.weight.requires_grad and weight_scale is None)
        if b is not None:
            p.bias = nn.Parameter(b, requires_grad=p.bias.requires_grad)
        if s is not None:
            p.weight_scale, p.input_scale = s, input_scale


class AttentionProjections(nn.Module):
    """q/k/v/o projections with optional q/k RMSNorm (Qwen3) and q/k/v bias (Qwen2)."""

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        qkv_bias: bool,
        qk_norm: bool,
        eps: float,
    ):
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = head_dim**-0.5
        self.q_proj = Linear(hidden_size, num_heads * head_dim, bias=qkv_bias)
        self.k_proj = Linear(hidden_size, num_kv_heads * head_dim, bias=qkv_bias)
        self.v_proj = Linear(hidden_size, num_kv_heads * head_dim, bias=qkv_bias)
        self.o_proj = Linear(num_heads * head_dim, hidden_size, bias=False)
        if qk_norm:
            self.q_norm = RMSNorm(head_dim, eps)
            self.k_norm = RMSNorm(head_dim, eps)
        else:
            self.q_norm = self.k_norm = None
        # q/k/v weights (and biases, and FP8 scales) concatenated by rows; see MLP for why these are
        # non-persistent buffers.
        self.register_buffer("qkv_weight", None, persistent=False)
        self.register_buffer("qkv_bias", None, persistent=False)
        self.register_buffer("qkv_weight_scale", None, persistent=False)
        self.register_buffer("qkv_input_scale", None, persistent=False)
        self.fused_gemm = False  # one GEMM over qkv_weight instead of three (GPU engines)
        self.decode_gemv = False  # single-token GEMMs through plugins.gemv (see TargetModel.set_decode_gemv)
        self.gemv_pdl = 0  # > 0: the QKV and o_proj GEMVs launched as programmatic dependents (plugins.gemv)
        self.small_m_gemm = False  # 2..64-row GEMMs through plugins.skinny_gemm (see TargetModel.set_small_m_gemm)

    def set_fused(self, weight: torch.Tensor, bias: torch.Tensor | None = None, weight_scale: torch.Tensor | None = None,
                  input_scale: torch.Tensor | None = None) -> None:
        """Take q/k/v from one row-concatenated weight (and bias), as the engine stores them: the three Linear
        weights become views of it, so the model holds one copy. FP8: the fused weight's scales."""
        _share_rows(weight, bias, (self.q_proj, self.k_proj, self.v_proj), weight_scale, input_scale)
        self.qkv_weight, self.qkv_bias = weight, bias
        self.qkv_weight_scale, self.qkv_input_scale = weight_scale, input_scale

    def fuse(self) -> None:
        """Compute q/k/v with one GEMM; concatenates the weights only if they are not fused already."""
        projections = (self.q_proj, self.k_proj, self.v_proj)
        if self.qkv_weight is None:
            weight, weight_scale, input_scale = _concatenated(projections)
            bias = torch.cat([p.bias.data for p in projections]) if self.q_proj.bias is not None else None
            self.set_fused(weight, bias, weight_scale, input_scale)
        self.fused_gemm = True

    def _heads(self, x: torch.Tensor, heads: int) -> torch.Tensor:
        return x.view(x.shape[0], heads, self.head_dim)

    def _finish_query(self, q: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        q = self._heads(q, self.num_heads)
        if self.q_norm is not None:
            q = self.q_norm(q)
        return apply_rotary(q, cos, sin)

    def _finish_key_value(self, k, v, cos, sin) -> tuple[torch.Tensor, torch.Tensor]:
        k, v = self._heads(k, self.num_kv_heads), self._heads(v, self.num_kv_heads)
        if self.k_norm is not None:
            k = self.k_norm(k)
        return apply_rotary(k, cos, sin), v

    def output(self, o: torch.Tensor) -> torch.Tensor:
        """o_proj over the attention output [T, Hq*D]."""
        return self.o_proj(o, self.decode_gemv, self.small_m_gemm, self.gemv_pdl)

    def query(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        return self._finish_query(self.q_proj(x, self.decode_gemv, self.small_m_gemm), cos, sin)

    def key_value(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        route = (self.decode_gemv, self.small_m_gemm)
        return self._finish_key_value(self.k_proj(x, *route), self.v_proj(x, *route), cos, sin)

    def raw_key_value(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, H] -> k and v [T, Hkv, D] as the projections give them (no norm, no RoPE); with the fused weight,
        one GEMM over its k/v rows (bf16 weights: FP8 ones take the two projections, each with its scales)."""
        if self.fused_gemm and self.qkv_weight_scale is None:
            q_rows, kv_rows = self.q_proj.weight.shape[0], self.k_proj.weight.shape[0]
            bias = self.qkv_bias[q_rows:] if self.qkv_bias is not None else None
            k, v = linear(x, self.qkv_weight[q_rows:], bias, self.decode_gemv,
                          use_small_m=self.small_m_gemm).split([kv_rows, kv_rows], dim=-1)
        else:
            k, v = (p(x, self.decode_gemv, self.small_m_gemm) for p in (self.k_proj, self.v_proj))
        return self._heads(k, self.num_kv_heads), self._heads(v, self.num_kv_heads)

    def projections(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [T, H] -> q [T, Hq, D], k and v [T, Hkv, D] as the projections give them (no norm, no RoPE); with
        the fused GEMM, views of its one output."""
        if self.fused_gemm:
            q_rows, kv_rows = self.q_proj.weight.shape[0], self.k_proj.weight.shape[0]
            q, k, v = linear(x, self.qkv_weight, self.qkv_bias, self.decode_gemv, self.qkv_weight_scale,
                             self.qkv_input_scale, self.small_m_gemm,
                             self.gemv_pdl).split([q_rows, kv_rows, kv_rows], dim=-1)
        else:
            q, k, v = (p(x, self.decode_gemv, self.small_m_gemm) for p in (self.q_proj, self.k_proj, self.v_proj))
        return self._heads(q, self.num_heads), self._heads(k, self.num_kv_heads), self._heads(v, self.num_kv_heads)

    def query_key_value(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q, k, v = self.projections(x)
        return self._finish_query(q, cos, sin), *self._finish_key_value(k, v, cos, sin)
