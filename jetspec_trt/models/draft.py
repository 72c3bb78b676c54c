"""The JetSpec causal parallel draft head (published "DFlash format" with `causal_head: true`).

Context features: the target's hidden states after `target_layer_ids`, concatenated, then
`hidden_norm(fc(concat))`. Every head layer projects those features with its own k_proj/v_proj (+k_norm,
RoPE at the tokens' positions) into the head's KV cache, once per committed token. A draft pass embeds the
block [anchor, MASK x (block_size-1)] with the target's embedding and runs it through the layers; each block
position sees all context and the block positions up to itself (causal). `norm(hidden)` at block positions
1..block_size-1 through the target's lm_head gives per-depth logits. The head owns no embedding and no lm_head.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from jetspec_trt.errors import JetSpecError
from jetspec_trt.models.config import DecoderConfig
from jetspec_trt.models.layers import RMSNorm, Rotary
from jetspec_trt.models.target import (DecoderLayer, LayerCall, TargetModel, fuse_layers, paged_layer_call,
                                       set_fused_kernels)
from jetspec_trt.models.kv_cache import KVCacheSpec, PagedKVCache
from jetspec_trt.plugins.layer_kernels import kv_norm_rope_write
from jetspec_trt.plugins.linear import linear

# TensorRT Edge-LLM reads either key; the published heads use dflash_config.
SPEC_CONFIG_KEYS = ("dflash_config", "jetspec_config")


def default_target_layer_ids(num_target_layers: int, num_draft_layers: int) -> list[int]:
    """Evenly spaced from 1 to num_target_layers-3 (Qwen3-8B, 5 layers: [1, 9, 17, 25, 33])."""
    if num_draft_layers == 1:
        return [num_target_layers // 2]
    start, end = 1, num_target_layers - 3
    return [int(round(start + i * (end - start) / (num_draft_layers - 1))) for i in range(num_draft_layers)]


@dataclass(frozen=True)
class DraftSpec:
    """The speculative part of a draft head's config.json."""

    block_size: int
    num_target_layers: int
    target_layer_ids: tuple[int, ...]
    mask_token_id: int
    target_hidden_size: int
    causal_head: bool = True
    config_key: str = "dflash_config"

    @property
    def max_depth(self) -> int:
        return self.block_size - 1

    @classmethod
    def from_config_dict(cls, raw: dict, source: str) -> "DraftSpec":
        key = next((k for k in SPEC_CONFIG_KEYS if isinstance(raw.get(k), dict)), None)
        if key is None:
            raise JetSpecError(f"{source}: no dflash_config or jetspec_config block (not a JetSpec draft head)")
        spec = raw[key]
        if not spec.get("causal_head", False):
            raise JetSpecError(
                f"{source}: {key}.causal_head is not true; this is a bidirectional DFlash head, "
                "which JetSpec's causal tree drafting cannot use"
            )
        for name in ("block_size", "num_target_layers"):
            if not isinstance(raw.get(name), int):
                raise JetSpecError(f"{source}: missing integer field {name!r}")
        if raw["block_size"] < 2:
            raise JetSpecError(f"{source}: block_size must be >= 2, got {raw['block_size']}")
        layer_ids = spec.get("target_layer_ids") or default_target_layer_ids(
            raw["num_target_layers"], raw["num_hidden_layers"]
        )
        if "mask_token_id" not in spec or not isinstance(spec["mask_token_id"], int):
            raise JetSpecError(f"{source}: {key}.mask_token_id is missing")
        return cls(
            block_size=raw["block_size"],
            num_target_layers=raw["num_target_layers"],
            target_layer_ids=tuple(int(i) for i in layer_ids),
            mask_token_id=spec["mask_token_id"],
            target_hidden_size=int(spec.get("target_hidden_size", raw["hidden_size"])),
            causal_head=True,
            config_key=key,
        )

    def to_config_block(self) -> dict:
        return {
            "target_layer_ids": list(self.target_layer_ids),
            "mask_token_id": self.mask_token_id,
            "causal_head": True,
            "target_hidden_size": self.target_hidden_size,
        }


def draft_config_dict(decoder: DecoderConfig, spec: DraftSpec, rope_theta: float) -> dict:
    """config.json of a draft head in the published layout (a Qwen3Config plus the JetSpec fields)."""
    return {
        "architectures": ["DFlashDraftModel"],
        "model_type": "qwen3",
        "vocab_size": decoder.vocab_size,
        "hidden_size": decoder.hidden_size,
        "intermediate_size": decoder.intermediate_size,
        "num_hidden_layers": decoder.num_layers,
        "num_attention_heads": decoder.num_heads,
        "num_key_value_heads": decoder.num_kv_heads,
        "head_dim": decoder.head_dim,
        "rms_norm_eps": decoder.rms_norm_eps,
        "max_position_embeddings": decoder.max_position_embeddings,
        "rope_theta": rope_theta,
        "attention_bias": False,
        "tie_word_embeddings": False,
        "block_size": spec.block_size,
        "num_target_layers": spec.num_target_layers,
        spec.config_key: spec.to_config_block(),
    }


class DraftLayer(DecoderLayer):
    """A head layer is a Qwen3 decoder layer (q/k norm always on); only where its K/V come from differs."""

    def __init__(self, cfg: DecoderConfig):
        super().__init__(dataclasses.replace(cfg, qk_norm=True))


class DraftHead(nn.Module):
    def __init__(self, cfg: DecoderConfig, spec: DraftSpec, inv_freq: torch.Tensor, attention_scaling: float = 1.0):
        super().__init__()
        self.config = cfg
        self.spec = spec
        self.fc = nn.Linear(len(spec.target_layer_ids) * spec.target_hidden_size, cfg.hidden_size, bias=False)
        self.hidden_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.layers = nn.ModuleList(DraftLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary = Rotary(inv_freq, attention_scaling)
        self.small_m_gemm = False
        self.fused_kernels = False  # set_fused_layer_kernels
        # The draft's vocabulary (set_vocab): token ids, ascending, and those rows of the target's lm_head. None:
        # the whole vocabulary. Not in the checkpoint: an engine choice (RuntimeConfig.draft_vocab).
        self.register_buffer("vocab_ids", None, persistent=False)
        self.register_buffer("vocab_weight", None, persistent=False)

    def set_small_m_gemm(self, enabled: bool) -> None:
        """The head's 2..64-row GEMMs (the block's layers, the context rows' fc and k/v projections) through
        plugins.skinny_gemm, as TargetModel.set_small_m_gemm does for the target."""
        self.small_m_gemm = enabled
        for layer in self.layers:
            layer.self_attn.small_m_gemm = layer.mlp.small_m_gemm = enabled

    def set_fused_layer_kernels(self, enabled: bool) -> None:
        """The head's norms, its block layers' small ops and its context rows' k norm + RoPE + KV write on the fused
        kernels (plugins.layer_kernels), as TargetModel.set_fused_layer_kernels does for the target."""
        set_fused_kernels(self.layers, enabled)
        self.hidden_norm.fused_kernel = self.norm.fused_kernel = self.fused_kernels = enabled

    def set_vocab(self, token_ids: torch.Tensor | None, lm_head_weight: torch.Tensor | None = None) -> None:
        """Propose from `token_ids` only (None: from the whole vocabulary again): the per-depth logits then come from
        those rows of the target's lm_head (`lm_head_weight`, copied: [N, H]). Why: at 15 depth rows the lm_head
        over Qwen's 151936 tokens is 0.10 ms of a 0.27 ms draft stage (H100, 0.5B shape,
        bench/results/engine-qwen2.5-0.5b-h100-defaults-profile.json). The target still verifies over its whole
        vocabulary, so this changes which tokens the tree can hold, never the output. A GraphDecoder captures
        the vocabulary into its rounds: set it before, or through GraphDecoder.set_draft_vocab."""
        if token_ids is None:
            self.vocab_ids = self.vocab_weight = None
            return
        ids = torch.unique(token_ids.long()).to(lm_head_weight.device)  # ascending: ties go to the lower id
        if ids.numel() != token_ids.numel() or not 0 <= int(ids[0]) <= int(ids[-1]) < lm_head_weight.shape[0]:
            raise JetSpecError(f"a draft vocabulary must hold distinct token ids in 0..{lm_head_weight.shape[0] - 1}")
        self.vocab_ids = ids
        self.vocab_weight = lm_head_weight.detach()[ids].contiguous()

    def depth_logits(self, hidden: torch.Tensor, target: TargetModel) -> torch.Tensor:
        """Per-depth logits of normed block rows [D, H] (propose's rows 1..D): over the draft's vocabulary (column
        j is token vocab_ids[j]) or over the target's whole one (target.lm_head_rows), in the model's dtype."""
        if self.vocab_weight is None:
            return target.lm_head_rows(hidden)
        return linear(hidden, self.vocab_weight, None, False, use_small_m=target.small_m_gemm)

    def new_cache(self, max_tokens: int, page_size: int = 64, dtype: torch.dtype | None = None) -> PagedKVCache:
        cfg = self.config
        param = self.fc.weight
        spec = KVCacheSpec(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, max_tokens, page_size, dtype or param.dtype)
        return PagedKVCache(spec, param.device)

    def project_context(self, features: torch.Tensor) -> torch.Tensor:
        return self.hidden_norm(linear(features, self.fc.weight, None, False, use_small_m=self.small_m_gemm))

    def fuse_weights(self) -> None:
        fuse_layers(self.layers)

    def context_key_values(self, features: torch.Tensor,
                           positions: torch.Tensor) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Every layer's context K/V, in layer order: m tokens' fused target features [m, n_ids*H] projected once,
        then each layer's k_proj/v_proj (+k_norm, RoPE at `positions`) -> k, v [m, Hkv, D]."""
        context = self.project_context(features)
        cos, sin = self.rotary.cos_sin(positions, context.dtype)
        for layer in self.layers:
            yield layer.self_attn.key_value(context, cos, sin)

    def write_context(self, features: torch.Tensor, positions: torch.Tensor, cache: PagedKVCache) -> None:
        """Write the K/V of m tokens' fused target features ([m, n_ids*H]) after the committed context."""
        slots = cache.slots(cache.ctx_len, features.shape[0])
        if self.fused_kernels:  # per layer one GEMM for k and v, then one kernel: k norm, RoPE and the write
            context = self.project_context(features)
            cos, sin = self.rotary.cos_sin(positions, context.dtype)
            for i, layer in enumerate(self.layers):
                attn = layer.self_attn
                k, v = attn.raw_key_value(context)
                kv_norm_rope_write(k, v, attn.k_norm.weight, cos, sin, cache.k[i], cache.v[i], slots, attn.k_norm.eps)
            return
        for i, (k, v) in enumerate(self.context_key_values(features, positions)):
            cache.write(i, slots, k, v)

    def extend_context(self, features: torch.Tensor, positions: torch.Tensor, cache: PagedKVCache) -> None:
        """Append newly committed tokens' features and commit them."""
        self.write_context(features, positions, cache)
        cache.set_length(cache.length + features.shape[0])

    def propose(
        self, block_embeds: torch.Tensor, positions: torch.Tensor, cache: PagedKVCache, block_mask: torch.Tensor
    ) -> torch.Tensor:
        """Run the block [B, H] after the committed context; returns normed hidden states [B, H].

        The block's K/V go into the slots after the context without being committed: the next round's
        context overwrites them.
        """
        return self.run_layers(block_embeds, positions, paged_layer_call(cache, block_embeds.shape[0], block_mask))

    def run_layers(self, block_embeds: torch.Tensor, positions: torch.Tensor, layer_call: LayerCall) -> torch.Tensor:
        """`propose` with each layer run by `layer_call` (its cache and attention): RoPE at `positions`, the
        layers, the final norm; returns the normed hidden states [B, H]."""
        cos, sin = self.rotary.cos_sin(positions, block_embeds.dtype)
        x = block_embeds
        for i, layer in enumerate(self.layers):
            x = layer_call(i, layer, x, cos, sin)
        return self.norm(x)


def read_draft_config(model_dir: Path) -> tuple[dict, DraftSpec]:
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise JetSpecError(f"{model_dir}: no config.json (expected a JetSpec draft head directory)")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise JetSpecError(f"{path}: not valid JSON ({err.msg} at line {err.lineno})") from err
    return raw, DraftSpec.from_config_dict(raw, str(path))
