"""Torch dtypes and their names ("bfloat16", ...), the way engines, configs, caches and reports store them."""

from __future__ import annotations

import torch

from jetspec_trt.errors import JetSpecError

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def parse_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise JetSpecError(f"unknown dtype {name!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    """torch.bfloat16 -> "bfloat16" (any torch dtype)."""
    return str(dtype).removeprefix("torch.")
