"""Load and save checkpoint directories (config.json + safetensors, single file or sharded), in the Hugging Face
layout or the engine's fused one (models/fused_layout.py)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from jetspec_trt.errors import JetSpecError
from jetspec_trt.models.config import DecoderConfig, load_hf_config, rope_inverse_frequencies
from jetspec_trt.models.draft import DraftHead, DraftSpec, draft_config_dict, read_draft_config
from jetspec_trt.models.fp8 import (dequantized_state, keeps_dtype, normalized_scales, prepare_fp8_modules,
                                    read_fp8_format, reference_state, require_fp8_device)
from jetspec_trt.models.fused_layout import fused_tensors, split_fused
from jetspec_trt.models.target import TargetModel

SINGLE_FILE = "model.safetensors"
SHARD_INDEX = "model.safetensors.index.json"

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


def stored_names(model_dir: Path) -> list[str]:
    """Tensor names of a checkpoint, from the safetensors headers only."""
    names = []
    for f in weight_files(model_dir):
        try:
            with safe_open(str(f), framework="pt") as handle:
                names.extend(handle.keys())
        except (SafetensorError, OSError, ValueError) as err:
            raise JetSpecError(f"{f}: corrupt or unreadable safetensors ({err})") from err
    return names


def read_raw_state_dict(model_dir: Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint under their stored names, in either layout (see fused_layout)."""
    state: dict[str, torch.Tensor] = {}
    for f in weight_files(model_dir):
        try:
            state.update(load_file(str(f)))
        except (SafetensorError, OSError, ValueError) as err:
            raise JetSpecError(f"{f}: corrupt or unreadable safetensors ({err})") from err
    return state


def read_state_dict(model_dir: Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint, with Hugging Face's `model.` prefix removed (fused tensors stay fused)."""
    return {name.removeprefix("model."): t for name, t in read_raw_state_dict(model_dir).items()}


def hf_state_dict(model_dir: Path) -> dict[str, torch.Tensor]:
    """The checkpoint under Hugging Face names and prefixes, whatever its layout: a fused engine checkpoint's
    q/k/v and gate/up tensors come back as row views of the fused ones (no copy). For consumers that only know
    the Hugging Face layout, e.g. load_hf_model below."""
    cfg = DecoderConfig.from_hf(load_hf_config(model_dir))
    return split_fused(read_raw_state_dict(model_dir), cfg)


def load_hf_model(model_dir: Path, dtype: torch.dtype = torch.float32):
    """transformers' own model (AutoModelForCausalLM) of a target checkpoint in either layout. An FP8 checkpoint
    comes dequantized into `dtype` (its weights times their scales; transformers' own FP8 loaders need a GPU)."""
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING

    config = load_hf_config(model_dir)
    state = hf_state_dict(model_dir)
    fmt = read_fp8_format(model_dir)
    if fmt is not None:
        state = dequantized_state(state, fmt, dtype)
        if hasattr(config, "quantization_config"):
            del config.quantization_config
    model_class = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    return model_class.from_pretrained(None, config=config, state_dict=state, dtype=dtype).eval()


def _converted(state: dict[str, torch.Tensor], dtype: torch.dtype, device: str) -> dict[str, torch.Tensor]:
    """Cast and move each tensor once: a tensor stored under two names (a tied embedding) stays one tensor. FP8
    weights and their float32 scales only move."""
    done: dict[int, torch.Tensor] = {}
    out = {}
    for name, tensor in state.items():
        if id(tensor) not in done:
            keep = keeps_dtype(name, tensor.dtype)
            done[id(tensor)] = tensor.to(device=device, dtype=None if keep else dtype)
        out[name] = done[id(tensor)]
    return out


def load_checked(model: nn.Module, state: dict[str, torch.Tensor], source: Path) -> None:
    """Load `state` into `model` (assign), after checking that names and shapes match; JetSpecError naming
    `source` otherwise."""
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
    model.load_state_dict(state, assign=True)


def _load_weights(model: TargetModel | DraftHead, state: dict[str, torch.Tensor], cfg: DecoderConfig,
                  source: Path, dtype: torch.dtype, device: str) -> None:
    """Load a checkpoint in either layout onto `device`. Fused tensors are moved as they are and the layers'
    q/k/v and gate/up weights become views of them: one copy in memory, nothing concatenated here."""
    state = _converted(state, dtype, device)
    try:
        by_hf_name = split_fused(state, cfg)
    except JetSpecError as err:
        raise JetSpecError(f"{source}: {err}") from None
    load_checked(model, by_hf_name, source)
    for fused in fused_tensors(state):
        getattr(model.layers[fused.layer], fused.group.module).set_fused(fused.weight, fused.bias)


def load_target(model_dir: Path, dtype: torch.dtype = torch.float32, device: str = "cpu",
                fused_gemm: bool = False, keep_fp8: bool | None = None) -> TargetModel:
    """The target on `device`. fused_gemm: compute q/k/v and gate/up with one GEMM each (the GPU engine); the
    tensors are concatenated here only if the checkpoint is not fused already (engines built with --no-fuse).

    An FP8 checkpoint (models/fp8.py): keep_fp8 keeps its weights FP8 and runs FP8 GEMMs (JetSpecError on a GPU
    without FP8); False holds their e4m3 values in `dtype` and rounds the projections' inputs to e4m3 as the FP8
    GEMMs do, in float matmuls (the reference). None: keep on CUDA, the reference elsewhere."""
    model_dir = Path(model_dir)
    hf = load_hf_config(model_dir)
    cfg = DecoderConfig.from_hf(hf)
    inv_freq, scaling = rope_inverse_frequencies(hf, cfg.head_dim)
    state = read_state_dict(model_dir)
    fmt = read_fp8_format(model_dir)
    if fmt is not None:
        keep_fp8 = torch.device(device).type == "cuda" if keep_fp8 is None else keep_fp8
        if keep_fp8:
            require_fp8_device(device)
        state = normalized_scales(state, fmt) if keep_fp8 else reference_state(state, fmt, dtype)
    if cfg.tie_word_embeddings:
        # Tied checkpoints may store only the embedding; the tie is re-made after the load.
        state["lm_head.weight"] = state.get("embed_tokens.weight", state.get("lm_head.weight"))
    with torch.device("meta"):
        model = TargetModel(cfg, inv_freq, scaling)
    if fmt is not None:
        prepare_fp8_modules(model, state)
    _load_weights(model, state, cfg, model_dir, dtype, device)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    model.rotary.inv_freq = inv_freq.float().to(device)
    if fused_gemm:
        model.fuse_weights()
    return model.eval()


def load_draft(model_dir: Path, dtype: torch.dtype = torch.float32, device: str = "cpu",
               fused_gemm: bool = False) -> DraftHead:
    """The draft head on `device` (fused_gemm as for load_target)."""
    model_dir = Path(model_dir)
    _, spec = read_draft_config(model_dir)
    hf = load_hf_config(model_dir)
    cfg = DecoderConfig.from_hf(hf)
    inv_freq, scaling = rope_inverse_frequencies(hf, cfg.head_dim)
    with torch.device("meta"):
        head = DraftHead(cfg, spec, inv_freq, scaling)
    _load_weights(head, read_state_dict(model_dir), cfg, model_dir, dtype, device)
    head.rotary.inv_freq = inv_freq.float().to(device)
    if fused_gemm:
        head.fuse_weights()
    return head.eval()


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
