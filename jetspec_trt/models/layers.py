"""Building blocks shared by the target decoder and the draft head. Parameter names follow Hugging Face's."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """Qwen/Llama RMSNorm: normalise in float32, cast back, then scale (the order matters for bf16 parity)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


class Rotary(nn.Module):
    """RoPE in the NeoX (rotate-half) layout that Qwen and Llama use."""

    def __init__(self, inv_freq: torch.Tensor, attention_scaling: float = 1.0):
        super().__init__()
        self.register_buffer("inv_freq", inv_freq.float(), persistent=False)
        self.attention_scaling = attention_scaling

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions.float().unsqueeze(-1) * self.inv_freq
        emb = torch.cat([freqs, freqs], dim=-1)
        return (emb.cos() * self.attention_scaling).to(dtype), (emb.sin() * self.attention_scaling).to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, H, D]; cos/sin [T, D]."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos.unsqueeze(1) + rotated * sin.unsqueeze(1)


class MLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up_weight is not None:
            gate, up = F.linear(x, self.gate_up_weight).chunk(2, dim=-1)
            return self.down_proj(F.silu(gate) * up)
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))

    gate_up_weight: torch.Tensor | None = None

    def fuse(self) -> None:
        """One GEMM for gate and up. The separate weights become views of the fused one (no extra memory)."""
        fused = torch.cat([self.gate_proj.weight.data, self.up_proj.weight.data])
        rows = self.gate_proj.weight.shape[0]
        self.gate_proj.weight.data, self.up_proj.weight.data = fused[:rows], fused[rows:]
        self.gate_up_weight = fused


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
        self.q_proj = nn.Linear(hidden_size, num_heads * head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(num_heads * head_dim, hidden_size, bias=False)
        if qk_norm:
            self.q_norm = RMSNorm(head_dim, eps)
            self.k_norm = RMSNorm(head_dim, eps)
        else:
            self.q_norm = self.k_norm = None

    # Set by fuse(): q/k/v weights (and biases) concatenated, so one GEMM serves all three.
    qkv_weight: torch.Tensor | None = None
    qkv_bias: torch.Tensor | None = None

    def fuse(self) -> None:
        """Concatenate q/k/v into one weight; the separate Linear weights become views of it (no extra memory)."""
        projections = (self.q_proj, self.k_proj, self.v_proj)
        self.qkv_weight = torch.cat([p.weight.data for p in projections])
        self.qkv_bias = torch.cat([p.bias.data for p in projections]) if self.q_proj.bias is not None else None
        start = 0
        for p in projections:
            rows = p.weight.shape[0]
            p.weight.data = self.qkv_weight[start : start + rows]
            if p.bias is not None:
                p.bias.data = self.qkv_bias[start : start + rows]
            start += rows

    def _finish_query(self, q: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        q = q.view(q.shape[0], self.num_heads, self.head_dim)
        if self.q_norm is not None:
            q = self.q_norm(q)
        return apply_rotary(q, cos, sin)

    def _finish_key_value(self, k, v, cos, sin) -> tuple[torch.Tensor, torch.Tensor]:
        k = k.view(k.shape[0], self.num_kv_heads, self.head_dim)
        v = v.view(v.shape[0], self.num_kv_heads, self.head_dim)
        if self.k_norm is not None:
            k = self.k_norm(k)
        return apply_rotary(k, cos, sin), v

    def query(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        return self._finish_query(self.q_proj(x), cos, sin)

    def key_value(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self._finish_key_value(self.k_proj(x), self.v_proj(x), cos, sin)

    def query_key_value(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.qkv_weight is None:
            return self.query(x, cos, sin), *self.key_value(x, cos, sin)
        q_rows, kv_rows = self.q_proj.weight.shape[0], self.k_proj.weight.shape[0]
        q, k, v = F.linear(x, self.qkv_weight, self.qkv_bias).split([q_rows, kv_rows, kv_rows], dim=-1)
        return self._finish_query(q, cos, sin), *self._finish_key_value(k, v, cos, sin)
