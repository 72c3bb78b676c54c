"""The draft head's loss at LM-head scale, without ever holding a [rows x vocab] float32 logits tensor.

A step supervises every (sequence, anchor, depth) row: tens of thousands of rows against Qwen's 151,936-way
vocabulary, where full float32 logits cost 0.6 MB a row. The loss is therefore computed over row chunks whose
logits live only inside the chunk:
  * backend "liger" (CUDA, hard labels): liger-kernel's fused linear cross entropy, once per depth with
    reduction "sum". It computes the input gradient during the forward (two matmuls per chunk; the frozen
    lm_head needs no weight gradient).
  * backend "torch" (any device, either loss): a chunk at a time under torch.utils.checkpoint, so backward
    recomputes the chunk's logits instead of keeping them (three matmuls per chunk). It is the reference the
    liger path is tested against on the GPU.

Depth weights: acceptance is prefix-based (depth k only counts when depths 1..k-1 were accepted), so early
depths matter most; w_k = exp(-(k-1)/gamma) as in the DFlash/SpecForge trainers (gamma 7 for block 16).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from jetspec_trt.errors import JetSpecError

LossKind = Literal["ce", "kl"]
LossBackend = Literal["auto", "torch", "liger"]


@dataclass(frozen=True)
class LossConfig:
    # "ce": cross-entropy to the next token of the target's own response (for greedy responses that token is
    # the target's argmax, which is what greedy verification accepts); "kl": forward KL from the target's
    # temperature-scaled distribution (needs the target's final hidden states: 2x the lm_head work).
    kind: LossKind = "ce"
    temperature: float = 1.0  # of the target's distribution, "kl" only
    decay_gamma: float | None = 7.0  # None: uniform weights over depths
    chunk_rows: int = 8192
    backend: LossBackend = "auto"

    def validate(self) -> None:
        if self.kind not in ("ce", "kl"):
            raise JetSpecError(f"--loss must be ce or kl, got {self.kind!r}")
        if self.temperature <= 0:
            raise JetSpecError(f"--temperature must be > 0, got {self.temperature}")
        if self.decay_gamma is not None and self.decay_gamma <= 0:
            raise JetSpecError(f"--loss-gamma must be > 0 (or 0 for uniform weights), got {self.decay_gamma}")
        if self.chunk_rows < 1:
            raise JetSpecError(f"loss chunk_rows must be >= 1, got {self.chunk_rows}")
        if self.backend not in ("auto", "torch", "liger"):
            raise JetSpecError(f"loss backend must be auto, torch or liger, got {self.backend!r}")
        if self.backend == "liger" and self.kind != "ce":
            raise JetSpecError("the liger loss backend computes hard-label cross-entropy only (--loss ce)")


def depth_weights(num_depths: int, gamma: float | None) -> torch.Tensor:
    """[num_depths] float32: w_k = exp(-(k-1)/gamma) for depth k = 1..num_depths (all 1 when gamma is None)."""
    k = torch.arange(num_depths, dtype=torch.float32)
    return torch.ones(num_depths) if gamma is None else torch.exp(-k / gamma)


def liger_available() -> bool:
    try:
        from liger_kernel.ops.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyFunction  # noqa: F401
    except Exception:  # not installed, or no Triton/GPU build: the torch path serves
        return False
    return True


def resolve_backend(cfg: LossConfig, device: torch.device | str) -> str:
    on_cuda = torch.device(device).type == "cuda"
    if cfg.backend == "liger":
        if not (on_cuda and liger_available()):
            raise JetSpecError("loss backend liger needs CUDA and the liger-kernel package (pip install liger-kernel)")
        return "liger"
    if cfg.backend == "auto" and cfg.kind == "ce" and on_cuda and liger_available():
        return "liger"
    return "torch"


def _rows_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, teacher: torch.Tensor | None,
               temperature: float) -> torch.Tensor:
    """Per-row loss [R] in float32 of one chunk (logits are made and dropped here)."""
    logits = F.linear(hidden, weight).float()
    if teacher is None:
        return F.cross_entropy(logits, labels, reduction="none")
    target = F.log_softmax(F.linear(teacher, weight).float() / temperature, dim=-1)
    return F.kl_div(F.log_softmax(logits, dim=-1), target, log_target=True, reduction="none").sum(-1)


def head_loss(hidden: torch.Tensor, lm_weight: torch.Tensor, depth: torch.Tensor, weights: torch.Tensor,
              labels: torch.Tensor, teacher_hidden: torch.Tensor | None, cfg: LossConfig,
              backend: str = "torch", equal_weights: bool | None = None) -> torch.Tensor:
    """Weighted mean loss over rows: sum_r w[depth_r] * loss_r / sum_r w[depth_r].

    hidden [R, H] (the head's normed hidden states, rows of any depth order), lm_weight [V, H] (frozen),
    depth [R] long (0-based), weights [D] (depth_weights), labels [R] long (ce: the token to predict),
    teacher_hidden [R, H] (kl: the target's final normed hidden state at the teacher position) or None.
    equal_weights: whether all `weights` are equal, where the caller knows (None: read from `weights`, which on
    a GPU makes the host wait for the device); only the liger backend asks.
    """
    if hidden.shape[0] == 0:
        return hidden.sum() * 0.0
    weights = weights.to(hidden.device)
    row_weight = weights[depth]
    total_weight = row_weight.sum()
    kl = cfg.kind == "kl"
    if kl and teacher_hidden is None:
        raise ValueError("kl loss needs teacher_hidden")
    hidden = hidden.to(lm_weight.dtype)
    if backend == "liger" and not kl:
        return _liger_ce(hidden, lm_weight, depth, weights, labels, equal_weights) / total_weight
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden.shape[0], cfg.chunk_rows):
        rows = slice(start, start + cfg.chunk_rows)
        teacher = teacher_hidden[rows].to(lm_weight.dtype) if kl else None
        part = checkpoint(_rows_loss, hidden[rows], lm_weight, labels[rows], teacher, cfg.temperature,
                          use_reentrant=False)
        total = total + (part * row_weight[rows]).sum()
    return total / total_weight


def _liger_ce(hidden, lm_weight, depth, weights, labels, equal_weights: bool | None = None) -> torch.Tensor:
    """sum_k w_k * (sum of CE over depth-k rows), one liger call per depth (reduction "sum": the input gradient
    is made in the forward, scaled by w_k in backward)."""
    from liger_kernel.ops.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyFunction

    def summed(h, y):
        out = LigerFusedLinearCrossEntropyFunction.apply(h, lm_weight, y, None, None, -100, 0.0, 0.0, "sum")
        return (out[0] if isinstance(out, tuple) else out).float()

    if equal_weights is None:
        equal_weights = bool((weights == weights[0]).all())
    if equal_weights:  # equal weights (depth sampling, or gamma None): one call
        return weights[0] * summed(hidden, labels)
    total = hidden.new_zeros((), dtype=torch.float32)
    for k in range(weights.shape[0]):
        rows = (depth == k).nonzero().squeeze(1)
        if rows.numel() == 0:
            continue
        total = total + weights[k] * summed(hidden.index_select(0, rows), labels.index_select(0, rows))
    return total


@torch.no_grad()
def chunked_argmax(hidden: torch.Tensor, lm_weight: torch.Tensor, chunk_rows: int = 8192) -> torch.Tensor:
    """[R] argmax of hidden @ lm_weight.T, a chunk of rows at a time (evaluation)."""
    out = torch.empty(hidden.shape[0], dtype=torch.long, device=hidden.device)
    for start in range(0, hidden.shape[0], chunk_rows):
        rows = slice(start, start + chunk_rows)
        out[rows] = F.linear(hidden[rows].to(lm_weight.dtype), lm_weight).argmax(-1)
    return out

