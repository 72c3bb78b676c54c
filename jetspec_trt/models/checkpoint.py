"""Load and save Hugging Face checkpoint directories (config.json + safetensors, single file or sharded)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from jetspec_trt.errors import JetSpecError
from jetspec_trt.models.config import DecoderConfig, load_hf_config, rope_inverse_frequencies
from jetspec_trt.models.draft import DraftHead, DraftSpec, draft_config_dict, read_draft_config
from jetspec_trt.models.target import TargetModel

SINGLE_FILE = "model.safetensors"
SHARD_INDEX = "model.safetensors.index.json"

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def parse_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise JetSpecError(f"unknown dtype {name!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[name]


def weight_files(model_dir: Path) -> list[Path]:
    model_dir = Path(model_dir)
    index = model_dir / SHARD_INDEX
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError) as err:
            raise JetSpecError(f"{index}: unreadable shard index ({err})") from err
        files = [model_dir / s for s in shards]
    else:
        files = [model_dir / SINGLE_FILE]
    for f in files:
        if not f.is_file():
            raise JetSpecError(f"{model_dir}: missing weights file {f.name}")
    return files


def read_state_dict(model_dir: Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint, with Hugging Face's `model.` prefix removed."""
    state: dict[str, torch.Tensor] = {}
    for f in weight_files(model_dir):
        try:
            shard = load_file(str(f))
        except (SafetensorError, OSError, ValueError) as err:
            raise JetSpecError(f"{f}: corrupt or unreadable safetensors ({err})") from err
        for name, tensor in shard.items():
            state[name.removeprefix("model.")] = tensor
    return state


def _load_into(model: nn.Module, state: dict[str, torch.Tensor], source: Path, dtype: torch.dtype) -> None:
    expected = {k: v for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {missing[:3]}{' ...' if len(missing) > 3 else ''}")
        if unexpected:
            parts.append(f"unexpected {unexpected[:3]}{' ...' if len(unexpected) > 3 else ''}")
        raise JetSpecError(f"{source}: tensors do not match the config: {'; '.join(parts)}")
    for name, tensor in state.items():
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise JetSpecError(
                f"{source}: tensor {name} has shape {tuple(tensor.shape)}, config implies {tuple(expected[name].shape)}"
            )
    model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, assign=True)


def _materialise_rotary(model: nn.Module, inv_freq: torch.Tensor, device: torch.device | str) -> None:
    model.rotary.inv_freq = inv_freq.float().to(device)


def load_target(model_dir: Path, dtype: torch.dtype = torch.float32, device: str = "cpu") -> TargetModel:
    model_dir = Path(model_dir)
    hf = load_hf_config(model_dir)
    cfg = DecoderConfig.from_hf(hf)
    inv_freq, scaling = rope_inverse_frequencies(hf, cfg.head_dim)
    state = read_state_dict(model_dir)
    if cfg.tie_word_embeddings:
        # Tied checkpoints may store only the embedding; the tie is re-made after the load.
        state["lm_head.weight"] = state.get("embed_tokens.weight", state.get("lm_head.weight"))
    with torch.device("meta"):
        model = TargetModel(cfg, inv_freq, scaling)
    _load_into(model, state, model_dir, dtype)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    _materialise_rotary(model, inv_freq, "cpu")
    return model.to(device).eval()


def load_draft(model_dir: Path, dtype: torch.dtype = torch.float32, device: str = "cpu") -> DraftHead:
    model_dir = Path(model_dir)
    _, spec = read_draft_config(model_dir)
    hf = load_hf_config(model_dir)
    cfg = DecoderConfig.from_hf(hf)
    inv_freq, scaling = rope_inverse_frequencies(hf, cfg.head_dim)
    state = read_state_dict(model_dir)
    with torch.device("meta"):
        head = DraftHead(cfg, spec, inv_freq, scaling)
    _load_into(head, state, model_dir, dtype)
    _materialise_rotary(head, inv_freq, "cpu")
    return head.to(device).eval()


def save_draft(head: DraftHead, out_dir: Path, rope_theta: float) -> None:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = draft_config_dict(head.config, head.spec, rope_theta)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    state = {k: v.detach().contiguous().cpu() for k, v in head.state_dict().items()}
    save_file(state, str(out_dir / SINGLE_FILE), metadata={"format": "pt"})


def draft_spec_of(model_dir: Path) -> DraftSpec:
    return read_draft_config(model_dir)[1]


def meta_shapes(model_dir: Path) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes the config in `model_dir` implies (target or draft), without allocating weights."""
    model_dir = Path(model_dir)
    hf = load_hf_config(model_dir)
    cfg = DecoderConfig.from_hf(hf)
    raw = json.loads((model_dir / "config.json").read_text())
    with torch.device("meta"):
        if any(k in raw for k in ("dflash_config", "jetspec_config")):
            _, spec = read_draft_config(model_dir)
            model: nn.Module = DraftHead(cfg, spec, torch.ones(cfg.head_dim // 2))
        else:
            model = TargetModel(cfg, torch.ones(cfg.head_dim // 2))
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}
