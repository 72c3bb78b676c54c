"""Rewrite a checkpoint's safetensors under a plan (models/fused_layout.py): fuse, split, or copy, with a dtype cast.

The source is read lazily (safetensors' safe_open, only the rows a piece needs) and the output is written one shard
at a time, so memory stays around one output shard even for a model larger than RAM, and a fused group whose parts
lie in different source shards still comes out as one tensor. Output: `model.safetensors`, or Hugging Face style
`model-0000i-of-0000n.safetensors` files plus `model.safetensors.index.json` past `max_shard_bytes`.
"""

from __future__ import annotations

import json
import math
import shutil
from contextlib import ExitStack
from pathlib import Path
from typing import Callable

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from jetspec_trt.errors import JetSpecError
from jetspec_trt.models.checkpoint import SHARD_INDEX, SINGLE_FILE, stored_names, weight_files
from jetspec_trt.models.config import DecoderConfig, load_hf_config
from jetspec_trt.models.fp8 import is_scale, keeps_dtype
from jetspec_trt.models.fused_layout import Plan, assemble, is_fused, split_plan

MAX_SHARD_BYTES = 4 << 30
_ITEM_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
               "F8_E4M3": 1, "F8_E5M2": 1}


def keep_plan(names: list[str]) -> Plan:
    return {name: [(name, None)] for name in names}


def write_weights(src: Path, dst: Path, make_plan: Callable[[list[str]], Plan], dtype: torch.dtype | None = None,
                  progress: bool = False, label: str = "weights", max_shard_bytes: int = MAX_SHARD_BYTES) -> list[str]:
    """Write the tensors `make_plan(source names)` describes into `dst`, cast to `dtype` (None keeps each
    tensor's own; FP8 weights and their scales always keep theirs). Returns the written tensor names."""
    src, dst = Path(src), Path(dst)
    with ExitStack() as stack:
        handles = {}
        for f in weight_files(src):
            try:
                handle = stack.enter_context(safe_open(str(f), framework="pt"))
            except (SafetensorError, OSError, ValueError) as err:
                raise JetSpecError(f"{f}: corrupt or unreadable safetensors ({err})") from err
            handles.update(dict.fromkeys(handle.keys(), handle))
        plan = make_plan(list(handles))

        def read(name: str, rows: slice | None) -> torch.Tensor:
            return handles[name].get_tensor(name) if rows is None else handles[name].get_slice(name)[rows]

        def size(pieces) -> int:  # bytes of an output tensor, from the headers (for packing the shards)
            total = 0
            for name, rows in pieces:
                view = handles[name].get_slice(name)
                shape = view.get_shape()
                count = (rows.stop - rows.start) if rows is not None else shape[0] if shape else 1
                stored = _ITEM_BYTES.get(view.get_dtype(), 4)
                keep = dtype is None or view.get_dtype().startswith("F8") or is_scale(name)
                item = stored if keep else dtype.itemsize
                total += count * math.prod(shape[1:]) * item
            return total

        shards: list[list[str]] = [[]]
        filled = 0
        for out, pieces in plan.items():
            nbytes = size(pieces)
            if shards[-1] and filled + nbytes > max_shard_bytes:
                shards.append([])
                filled = 0
            shards[-1].append(out)
            filled += nbytes
        files = [SINGLE_FILE] if len(shards) == 1 else [
            f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
        weight_map = {}
        for file, outs in tqdm(list(zip(files, shards)), desc=f"writing {label}", unit="shard", disable=not progress):
            tensors = {}
            for out in outs:
                tensor = assemble(plan[out], read)
                cast = dtype is not None and not keeps_dtype(out, tensor.dtype)
                tensors[out] = (tensor.to(dtype) if cast else tensor).contiguous()
                weight_map[out] = file
            save_file(tensors, str(dst / file), metadata={"format": "pt"})
            del tensors
    if len(files) > 1:
        total = sum((dst / f).stat().st_size for f in files)
        (dst / SHARD_INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                  indent=2) + "\n")
    return list(plan)


def copy_as_hugging_face(src: Path, dst: Path, copy_function: Callable[[str, str], object] = shutil.copy2) -> None:
    """Copy a checkpoint directory for readers that only know Hugging Face names (TensorRT-LLM, transformers).
    Files are copied with `copy_function` (e.g. hard links) where the layout already is Hugging Face's; a fused
    engine checkpoint's weights are written split instead (the fused tensors' rows, under their HF names)."""
    src, dst = Path(src), Path(dst)
    if not is_fused(stored_names(src)):
        shutil.copytree(src, dst, copy_function=copy_function)
        return
    shutil.copytree(src, dst, copy_function=copy_function,
                    ignore=shutil.ignore_patterns("*.safetensors", SHARD_INDEX))
    cfg = DecoderConfig.from_hf(load_hf_config(src))
    write_weights(src, dst, lambda names: split_plan(names, cfg))
