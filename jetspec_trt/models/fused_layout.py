"""The engine's fused weight layout: each layer's q/k/v projections, and its gate/up projections, as one tensor.

`jetspec-trt build` stores, for every decoder layer of the target and of the draft head,

    layers.N.self_attn.qkv_proj.weight   rows of q_proj.weight, k_proj.weight, v_proj.weight, in that order
    layers.N.self_attn.qkv_proj.bias     the same for the biases (only where the model has them: Qwen2)
    layers.N.mlp.gate_up_proj.weight     rows of gate_proj.weight, then up_proj.weight

in place of the Hugging Face tensors (the names Phi-3 and vLLM use for the same concatenation); every other tensor
keeps its Hugging Face name and prefix. The GPU engine runs one GEMM per fused tensor as it lies, so nothing is
concatenated at load time. Code that wants the Hugging Face names gets row slices of the fused tensors (views, no
copy): `split_fused` in memory, `split_plan` for writing files. The row counts come from the model's config.

A plan maps each output tensor name to the pieces it is made of, concatenated by rows: (source name, row slice or
None for the whole tensor). One representation serves both directions and both the in-memory and on-disk paths.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping

import torch

from jetspec_trt.errors import JetSpecError
from jetspec_trt.models.config import DecoderConfig

Piece = tuple[str, slice | None]
Plan = dict[str, list[Piece]]


@dataclass(frozen=True)
class FusedGroup:
    module: str  # the layer's submodule: self_attn or mlp
    fused: str  # the fused projection's name
    parts: tuple[str, ...]  # the Hugging Face projections it concatenates, in row order

    def part_rows(self, cfg: DecoderConfig) -> tuple[int, ...]:
        if self.fused == "qkv_proj":
            kv = cfg.num_kv_heads * cfg.head_dim
            return cfg.num_heads * cfg.head_dim, kv, kv
        return cfg.intermediate_size, cfg.intermediate_size


QKV = FusedGroup("self_attn", "qkv_proj", ("q_proj", "k_proj", "v_proj"))
GATE_UP = FusedGroup("mlp", "gate_up_proj", ("gate_proj", "up_proj"))
GROUPS = (QKV, GATE_UP)
LAYOUT_DESCRIPTION = {f"{g.module}.{g.fused}": [f"{g.module}.{p}" for p in g.parts] for g in GROUPS}

# `prefix` keeps whatever precedes the layer index ("model." in a Hugging Face target, nothing in a draft head).
_NAME = re.compile(r"^(?P<prefix>(?:.*\.)?layers\.(?P<layer>\d+)\.)(?P<module>self_attn|mlp)\."
                   r"(?P<proj>[a-z_]+)\.(?P<kind>weight|bias)$")


@dataclass(frozen=True)
class _Parsed:
    prefix: str  # up to and including "layers.N."
    layer: int
    group: FusedGroup
    part: int  # index into group.parts, or -1 for the fused tensor itself
    kind: str  # weight or bias

    def name(self, projection: str) -> str:
        return f"{self.prefix}{self.group.module}.{projection}.{self.kind}"


def _parse(name: str) -> _Parsed | None:
    match = _NAME.match(name)
    if match is None:
        return None
    for group in GROUPS:
        if match["module"] != group.module:
            continue
        if match["proj"] == group.fused:
            return _Parsed(match["prefix"], int(match["layer"]), group, -1, match["kind"])
        if match["proj"] in group.parts:
            return _Parsed(match["prefix"], int(match["layer"]), group, group.parts.index(match["proj"]),
                           match["kind"])
    return None


def is_fused(names: Iterable[str]) -> bool:
    """Whether a checkpoint's tensor names are in the fused layout."""
    return any((p := _parse(n)) is not None and p.part < 0 for n in names)


def fuse_plan(names: Iterable[str]) -> Plan:
    """Hugging Face names -> the fused layout. Output order follows the first appearance in `names`."""
    plan: Plan = {}
    for name in names:
        parsed = _parse(name)
        if parsed is None or parsed.part < 0:
            plan[name] = [(name, None)]
            continue
        out = parsed.name(parsed.group.fused)
        if out not in plan:
            plan[out] = [(parsed.name(part), None) for part in parsed.group.parts]
    return plan


def split_plan(names: Iterable[str], cfg: DecoderConfig) -> Plan:
    """Either layout -> Hugging Face names: each fused tensor becomes row slices of itself."""
    plan: Plan = {}
    for name in names:
        parsed = _parse(name)
        if parsed is None or parsed.part >= 0:
            plan[name] = [(name, None)]
            continue
        start = 0
        for part, rows in zip(parsed.group.parts, parsed.group.part_rows(cfg)):
            plan[parsed.name(part)] = [(name, slice(start, start + rows))]
            start += rows
    return plan


def assemble(pieces: list[Piece], read: Callable[[str, slice | None], torch.Tensor]) -> torch.Tensor:
    """One output tensor of a plan. `read(name, rows)` gives a source tensor or its rows; a single piece is
    returned as read (a view, in memory), several are concatenated."""
    tensors = [read(name, rows) for name, rows in pieces]
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors)


def split_fused(state: Mapping[str, torch.Tensor], cfg: DecoderConfig) -> dict[str, torch.Tensor]:
    """A state dict in either layout under Hugging Face names; fused tensors become views (no copy)."""
    for name, tensor in state.items():
        parsed = _parse(name)
        if parsed is not None and parsed.part < 0:
            rows = sum(parsed.group.part_rows(cfg))
            if tensor.shape[0] != rows:
                raise JetSpecError(f"tensor {name} has {tensor.shape[0]} rows, the config implies {rows}")
    def read(name: str, rows: slice | None) -> torch.Tensor:
        return state[name] if rows is None else state[name][rows]

    return {out: assemble(pieces, read) for out, pieces in split_plan(state, cfg).items()}


@dataclass(frozen=True)
class FusedTensor:
    layer: int
    group: FusedGroup
    weight: torch.Tensor
    bias: torch.Tensor | None


def fused_tensors(state: Mapping[str, torch.Tensor]) -> list[FusedTensor]:
    """The fused tensors of a state dict, weight and bias paired, per layer and group."""
    found: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    groups = {}
    for name, tensor in state.items():
        parsed = _parse(name)
        if parsed is not None and parsed.part < 0:
            found.setdefault((parsed.layer, parsed.group.fused), {})[parsed.kind] = tensor
            groups[parsed.group.fused] = parsed.group
    return [FusedTensor(layer, groups[fused], kinds["weight"], kinds.get("bias"))
            for (layer, fused), kinds in sorted(found.items())]
