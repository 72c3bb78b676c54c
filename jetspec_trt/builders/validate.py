"""Checks that a target and a draft head belong together, before any weight is read or written."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from jetspec_trt.errors import JetSpecError
from jetspec_trt.models.checkpoint import meta_shapes, weight_files
from jetspec_trt.models.config import DecoderConfig, load_hf_config
from jetspec_trt.models.draft import DraftSpec, read_draft_config
from jetspec_trt.models.fp8 import Fp8Format, is_scale, read_fp8_format, scale_shape_error
from jetspec_trt.models.fused_layout import is_fused, split_fused

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


@dataclass(frozen=True)
class CheckedPair:
    target: DecoderConfig
    draft: DecoderConfig
    spec: DraftSpec
    eos_token_ids: tuple[int, ...]
    target_fp8: Fp8Format | None = None  # the target checkpoint is already FP8 (models/fp8.py)


def checkpoint_shapes(model_dir: Path) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes stored in a checkpoint, read from the safetensors headers only."""
    shapes = {}
    for f in weight_files(model_dir):
        try:
            with safe_open(str(f), framework="pt") as handle:
                for name in handle.keys():
                    shapes[name.removeprefix("model.")] = tuple(handle.get_slice(name).get_shape())
        except (SafetensorError, OSError, ValueError) as err:
            raise JetSpecError(f"{f}: corrupt or unreadable safetensors ({err})") from err
    return shapes


def check_tensors(model_dir: Path, tied: bool = False, fp8: Fp8Format | None = None) -> None:
    stored = _as_hugging_face(checkpoint_shapes(model_dir), model_dir)
    if fp8 is not None:
        stored = _without_fp8_scales(stored, model_dir, fp8)
    expected = meta_shapes(model_dir)
    if tied:
        stored.setdefault("lm_head.weight", stored.get("embed_tokens.weight"))
    missing = sorted(set(expected) - set(stored))
    if missing:
        raise JetSpecError(f"{model_dir}: checkpoint lacks {len(missing)} tensors the config needs, e.g. {missing[0]}")
    unexpected = sorted(set(stored) - set(expected))
    if unexpected:
        raise JetSpecError(f"{model_dir}: checkpoint has tensors the config does not know, e.g. {unexpected[0]}")
    for name, shape in expected.items():
        if stored[name] != shape:
            raise JetSpecError(f"{model_dir}: tensor {name} has shape {stored[name]}, the config implies {shape}")


def _as_hugging_face(shapes: dict[str, tuple[int, ...]], model_dir: Path) -> dict[str, tuple[int, ...]]:
    """Shapes under Hugging Face names: an engine's fused tensors (an engine's target/ given as a build input)
    are split by the config's row counts, on the meta device (no data)."""
    if not is_fused(shapes):
        return shapes
    cfg = DecoderConfig.from_hf(load_hf_config(model_dir))
    try:
        split = split_fused({n: torch.empty(s, device="meta") for n, s in shapes.items()}, cfg)
    except JetSpecError as err:
        raise JetSpecError(f"{model_dir}: {err}") from None
    return {name: tuple(t.shape) for name, t in split.items()}


def _without_fp8_scales(shapes: dict[str, tuple[int, ...]], model_dir: Path,
                        fmt: Fp8Format) -> dict[str, tuple[int, ...]]:
    """An FP8 checkpoint's shapes less its scales, after checking that each scale sits beside a weight and has the
    shape `fmt` implies (models.fp8.scale_shape_error)."""
    out = {}
    for name, shape in shapes.items():
        if not is_scale(name):
            out[name] = shape
            continue
        owner = name.rsplit(".", 1)[0] + ".weight"
        if owner not in shapes:
            raise JetSpecError(f"{model_dir}: scale {name} has no weight {owner} beside it")
        error = scale_shape_error(name, shape, shapes[owner][0], fmt)
        if error:
            raise JetSpecError(f"{model_dir}: {error}")
    return out


def eos_ids(model_dir: Path, hf_eos) -> tuple[int, ...]:
    """EOS ids from generation_config.json (what generate() stops on), else config.json."""
    gen = Path(model_dir) / "generation_config.json"
    value = json.loads(gen.read_text()).get("eos_token_id") if gen.is_file() else None
    value = hf_eos if value is None else value
    if value is None:
        return ()
    return tuple(value) if isinstance(value, list) else (int(value),)


def _tokenizer_size(model_dir: Path) -> int | None:
    """Highest token id + 1 of a tokenizer.json (fast to read; no tokenizer object is built)."""
    path = Path(model_dir) / "tokenizer.json"
    if not path.is_file():
        return None
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise JetSpecError(f"{path}: not valid JSON ({err.msg})") from err
    ids = list((raw.get("model") or {}).get("vocab", {}).values()) + [t["id"] for t in raw.get("added_tokens", [])]
    return max(ids) + 1 if ids else None


def check_pair(target_dir: Path, draft_dir: Path) -> CheckedPair:
    target_dir, draft_dir = Path(target_dir), Path(draft_dir)
    for d, what in ((target_dir, "target"), (draft_dir, "draft")):
        if not d.is_dir():
            raise JetSpecError(f"{what} directory {d} does not exist")
    target_hf = load_hf_config(target_dir)
    target = DecoderConfig.from_hf(target_hf)
    _, spec = read_draft_config(draft_dir)
    draft = DecoderConfig.from_hf(load_hf_config(draft_dir))
    if not any((target_dir / f).is_file() for f in TOKENIZER_FILES):
        raise JetSpecError(f"{target_dir}: no tokenizer ({' / '.join(TOKENIZER_FILES)}) next to the target weights")
    tokenizer_vocab = _tokenizer_size(target_dir)
    if tokenizer_vocab is not None and tokenizer_vocab > target.vocab_size:
        raise JetSpecError(
            f"tokenizer mismatch: {target_dir} tokenizer has {tokenizer_vocab} tokens, the model's vocab is "
            f"{target.vocab_size}"
        )
    if spec.target_hidden_size != target.hidden_size:
        raise JetSpecError(
            f"hidden size mismatch: draft expects target hidden size {spec.target_hidden_size}, "
            f"target has {target.hidden_size}"
        )
    if draft.hidden_size != target.hidden_size:
        raise JetSpecError(
            f"hidden size mismatch: draft hidden size {draft.hidden_size} != target {target.hidden_size} "
            "(the head reuses the target's embedding and lm_head)"
        )
    if draft.vocab_size != target.vocab_size:
        raise JetSpecError(f"vocab mismatch: draft vocab {draft.vocab_size} != target vocab {target.vocab_size}")
    if spec.num_target_layers != target.num_layers:
        raise JetSpecError(
            f"draft was trained for a {spec.num_target_layers}-layer target; this target has {target.num_layers}"
        )
    ids = spec.target_layer_ids
    if len(set(ids)) != len(ids) or not all(0 <= i < target.num_layers for i in ids):
        raise JetSpecError(
            f"target_layer_ids {list(ids)} must be unique layer indices in 0..{target.num_layers - 1}"
        )
    if not 0 <= spec.mask_token_id < target.vocab_size:
        raise JetSpecError(f"mask_token_id {spec.mask_token_id} is outside the vocab (size {target.vocab_size})")
    target_fp8 = read_fp8_format(target_dir)
    if read_fp8_format(draft_dir) is not None:
        raise JetSpecError(f"{draft_dir}: the draft head is quantized; draft heads run unquantized (bf16)")
    check_tensors(target_dir, tied=target.tie_word_embeddings, fp8=target_fp8)
    check_tensors(draft_dir)
    return CheckedPair(target, draft, spec, eos_ids(target_dir, getattr(target_hf, "eos_token_id", None)),
                       target_fp8)
