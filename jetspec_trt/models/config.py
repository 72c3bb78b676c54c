"""Typed model configs, read from a Hugging Face config.json through transformers' own config classes."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoConfig, PretrainedConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from jetspec_trt.errors import JetSpecError

SUPPORTED_TARGETS = ("qwen3", "qwen2", "llama")


@dataclass(frozen=True)
class DecoderConfig:
    """The shape of a Llama-family decoder: Qwen3 (q/k norm), Qwen2 (q/k/v bias) or Llama."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    qk_norm: bool
    rope_parameters: dict = field(default_factory=dict)

    @classmethod
    def from_hf(cls, hf: PretrainedConfig) -> "DecoderConfig":
        model_type = hf.model_type
        if model_type not in SUPPORTED_TARGETS:
            raise JetSpecError(
                f"unsupported model_type {model_type!r}; supported: {', '.join(SUPPORTED_TARGETS)}"
            )
        head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
        return cls(
            model_type=model_type,
            vocab_size=hf.vocab_size,
            hidden_size=hf.hidden_size,
            intermediate_size=hf.intermediate_size,
            num_layers=hf.num_hidden_layers,
            num_heads=hf.num_attention_heads,
            num_kv_heads=getattr(hf, "num_key_value_heads", None) or hf.num_attention_heads,
            head_dim=head_dim,
            rms_norm_eps=hf.rms_norm_eps,
            max_position_embeddings=hf.max_position_embeddings,
            tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
            # Qwen2 always has q/k/v bias; Qwen3 and Llama carry it as `attention_bias`.
            qkv_bias=model_type == "qwen2" or bool(getattr(hf, "attention_bias", False)),
            qk_norm=model_type == "qwen3",
            rope_parameters=dict(rope_parameters(hf)),
        )


def rope_parameters(hf: PretrainedConfig) -> dict:
    params = getattr(hf, "rope_parameters", None)
    if params:
        return params
    # transformers 4.x layout
    scaling = dict(getattr(hf, "rope_scaling", None) or {})
    scaling.setdefault("rope_type", scaling.get("type", "default"))
    scaling["rope_theta"] = getattr(hf, "rope_theta", 10000.0)
    return scaling


def rope_inverse_frequencies(hf: PretrainedConfig, head_dim: int) -> tuple[torch.Tensor, float]:
    """Inverse frequencies and attention scaling, using transformers' RoPE initialisers for scaled variants."""
    params = rope_parameters(hf)
    rope_type = params.get("rope_type", "default")
    if rope_type == "default":
        theta = float(params.get("rope_theta", 10000.0))
        exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
        return 1.0 / (theta**exponents), 1.0
    if rope_type not in ROPE_INIT_FUNCTIONS:
        raise JetSpecError(f"unsupported rope_type {rope_type!r}")
    inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](hf, torch.device("cpu"))
    return inv_freq.float(), float(scaling)


def load_hf_config(model_dir: Path) -> PretrainedConfig:
    config_path = Path(model_dir) / "config.json"
    if not config_path.is_file():
        raise JetSpecError(f"{model_dir}: no config.json (expected a Hugging Face model directory)")
    try:
        return AutoConfig.from_pretrained(str(model_dir), local_files_only=True)
    except (ValueError, KeyError, OSError) as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise JetSpecError(f"{config_path}: cannot read config ({first_line})") from err
