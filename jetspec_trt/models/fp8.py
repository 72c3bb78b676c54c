"""FP8 checkpoints: e4m3 weights with per-tensor or per-channel scales, in the Hugging Face layout that
nvidia-modelopt writes and TensorRT-LLM and vLLM read.

Per quantized Linear, under its Hugging Face name:

    <name>.weight        float8_e4m3fn [N, K]   round_e4m3(W / weight_scale)
    <name>.weight_scale  float32 scalar, or     so that W ~= weight.float() * weight_scale; per-channel: one scale
                         [N] / [N, 1]           per output row (amax of the row / 448)
    <name>.input_scale   float32 scalar         static activation scale: x is fed as round_e4m3(x / input_scale);
                                                absent in "dynamic" checkpoints (then each token's
                                                activations are scaled by their own amax / 448)

and in config.json either modelopt's block (what `jetspec-trt build --quantize fp8` writes; modelopt also writes
hf_quant_config.json with the same facts, which older modelopt exports carry alone)

    "quantization_config": {"quant_method": "modelopt", "quant_algo": "FP8", "ignore": ["lm_head", ...], ...}

with quant_algo "FP8" (per-tensor weights, static input scales) or "FP8_PER_CHANNEL_PER_TOKEN" (per-channel
weight scales, no input_scale: dynamic per-token activations; TensorRT-LLM's QuantAlgo of that name),

or the AutoFP8 / vLLM "fp8" block: {"quant_method": "fp8", "activation_scheme": "static" | "dynamic",
"ignored_layers": [...]} (per-tensor scales). Which Linears are FP8 is read off the tensors (a `weight_scale`
beside the weight), so the ignore lists' spellings do not matter: a recipe may leave any Linear in the unquantized
dtype. Block-scaled FP8 (`weight_block_size`, `weight_scale_inv`) and other quantization methods are refused with an
error rather than loaded wrong.

Where the weights run: on CUDA they stay FP8 and the projections run FP8 GEMMs (plugins/fp8_gemm.py), which needs
compute capability 8.9 or newer. On the CPU the reference holds the same e4m3 values in the reference dtype
(float32, exactly) with the same scales, and rounds each projection's input to e4m3 as the FP8 GEMMs do (static
input_scale or per token): float matmuls over the FP8 GEMMs' operands, so CPU quality measurements predict the
GPU's (bench/quantize_compare.py).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import torch
from torch import nn

from jetspec_trt.errors import JetSpecError
from jetspec_trt.plugins.fp8_gemm import FP8_DTYPE, dequantize, quantize

WEIGHT_SCALE = "weight_scale"
INPUT_SCALE = "input_scale"
SCALE_NAMES = (WEIGHT_SCALE, INPUT_SCALE)
HF_QUANT_CONFIG = "hf_quant_config.json"  # modelopt's side file
MIN_CAPABILITY = (8, 9)  # Ada / Hopper: the first GPUs with FP8 tensor cores
PER_TENSOR, PER_CHANNEL = "per-tensor", "per-channel"  # weight scale granularities
# modelopt's quant_algo values this engine runs -> their weight scale granularity
MODELOPT_ALGOS = {"FP8": PER_TENSOR, "FP8_PER_CHANNEL_PER_TOKEN": PER_CHANNEL}


@dataclass(frozen=True)
class Fp8Format:
    """What a checkpoint's config says about its FP8 quantization."""

    method: str  # "modelopt" or "fp8" (the quantization_config's quant_method)
    activation_scheme: str  # "static" (input_scale stored) or "dynamic" (per token)
    excluded: tuple[str, ...] = ()  # modules the producer left unquantized (informational)
    weight_scales: str = PER_TENSOR  # or PER_CHANNEL: one scale per output row

    def describe(self) -> str:
        return f"fp8 e4m3 {self.weight_scales} ({self.method}, {self.activation_scheme} activation scales)"


def read_fp8_format(model_dir: Path) -> Fp8Format | None:
    """The checkpoint's FP8 format, None for an unquantized checkpoint; JetSpecError for a quantization this
    engine does not run."""
    model_dir = Path(model_dir)
    raw = json.loads((model_dir / "config.json").read_text())
    quant = raw.get("quantization_config")
    side = model_dir / HF_QUANT_CONFIG
    if quant is None and side.is_file():  # older modelopt exports: the facts only in hf_quant_config.json
        quant = {"quant_method": "modelopt", **json.loads(side.read_text()).get("quantization", {})}
    if quant is None:
        return None
    method = quant.get("quant_method")
    where = f"{model_dir / 'config.json'}: quantization_config"
    if method == "modelopt":
        algo = quant.get("quant_algo")
        if algo not in MODELOPT_ALGOS:
            raise JetSpecError(f"{where} has quant_algo {algo!r}; supported: {', '.join(MODELOPT_ALGOS)}")
        if quant.get("kv_cache_quant_algo"):
            raise JetSpecError(f"{where} quantizes the KV cache ({quant['kv_cache_quant_algo']}); not supported")
        granularity = MODELOPT_ALGOS[algo]
        activations = (quant.get("config_groups", {}).get("group_0", {}).get("input_activations") or {})
        # per-token activations are dynamic whatever config_groups says (modelopt's converter writes
        # "dynamic": false for FP8_PER_CHANNEL_PER_TOKEN too)
        scheme = "dynamic" if activations.get("dynamic") or granularity == PER_CHANNEL else "static"
        excluded = quant.get("ignore", quant.get("exclude_modules", []))
    elif method == "fp8":
        if quant.get("weight_block_size"):
            raise JetSpecError(f"{where} is block-scaled FP8 (weight_block_size {quant['weight_block_size']}); "
                               "only per-tensor scales are supported")
        scheme = quant.get("activation_scheme", "dynamic")
        if scheme not in ("static", "dynamic"):
            raise JetSpecError(f"{where} has activation_scheme {scheme!r}; expected static or dynamic")
        excluded = quant.get("ignored_layers", [])
        granularity = PER_TENSOR
    else:
        raise JetSpecError(f"{where} has quant_method {method!r}; supported: modelopt (FP8, "
                           "FP8_PER_CHANNEL_PER_TOKEN) and fp8 (per-tensor)")
    return Fp8Format(method, scheme, tuple(excluded or ()), granularity)


def is_scale(name: str) -> bool:
    return name.rsplit(".", 1)[-1] in SCALE_NAMES


def keeps_dtype(name: str, dtype: torch.dtype) -> bool:
    """Tensors an engine dtype cast must leave alone: FP8 weights and their float32 scales."""
    return dtype == FP8_DTYPE or is_scale(name)


def fp8_weight_names(names) -> list[str]:
    """The modules (Hugging Face names without the `.weight`) whose weights a checkpoint stores as FP8."""
    return [n.removesuffix(f".{WEIGHT_SCALE}") for n in names if n.endswith(f".{WEIGHT_SCALE}")]


def scale_shape_error(name: str, shape: tuple[int, ...], weight_rows: int, fmt: Fp8Format) -> str | None:
    """Why the scale `name` of shape `shape` (beside a weight of `weight_rows` rows) does not fit `fmt`, or None:
    per-tensor formats take one value ([] or [1]); per-channel ones a weight_scale of [N] or [N, 1] and no
    input_scale (their activations are scaled per token)."""
    if fmt.weight_scales == PER_TENSOR:
        if math.prod(shape) == 1:
            return None
        return (f"tensor {name} has shape {shape}; {fmt.describe()} takes only per-tensor (scalar) FP8 scales "
                "(per-channel weight scales need quant_algo FP8_PER_CHANNEL_PER_TOKEN)")
    if name.endswith(f".{INPUT_SCALE}"):
        return f"tensor {name}: {fmt.describe()} has no input scales (activations are scaled per token)"
    if shape in ((weight_rows,), (weight_rows, 1)):
        return None
    return f"tensor {name} has shape {shape}; per-channel weight scales are [N] or [N, 1] with N = {weight_rows}"


def normalized_scales(state: Mapping[str, torch.Tensor], fmt: Fp8Format) -> dict[str, torch.Tensor]:
    """Scales as float32: per-tensor ones as scalars (writers store them as [] or [1]), per-channel ones as [N].
    A scale that does not fit the format (scale_shape_error) is refused."""
    out = dict(state)
    for name, tensor in state.items():
        if is_scale(name):
            weight = state.get(name.rsplit(".", 1)[0] + ".weight")
            error = scale_shape_error(name, tuple(tensor.shape), -1 if weight is None else weight.shape[0], fmt)
            if error:
                raise JetSpecError(error)
            out[name] = tensor.reshape(() if fmt.weight_scales == PER_TENSOR else (-1,)).float()
    return out


def dequantized_state(state: Mapping[str, torch.Tensor], fmt: Fp8Format,
                      dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """An FP8 state dict as a plain one: each FP8 weight times its scale in `dtype`, scales dropped. Readers that
    only know unquantized checkpoints (transformers) get this: weights-only rounding, no activation rounding."""
    state = normalized_scales(state, fmt)
    out = {name: t for name, t in state.items() if not is_scale(name)}
    for module in fp8_weight_names(state):
        out[f"{module}.weight"] = dequantize(state[f"{module}.weight"], state[f"{module}.{WEIGHT_SCALE}"], dtype)
    return out


def reference_state(state: Mapping[str, torch.Tensor], fmt: Fp8Format,
                    dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The CPU reference's state dict: each FP8 weight's e4m3 values in `dtype` (exact in float32 and bf16), its
    scales kept, so the layers round their inputs to e4m3 and scale the products as the FP8 GEMMs do
    (plugins/fp8_gemm.fp8_linear's float-weight path)."""
    state = normalized_scales(state, fmt)
    return {name: t.to(dtype) if t.dtype == FP8_DTYPE else t for name, t in state.items()}


def prepare_fp8_modules(model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Make the Linears whose weights `state` stores as FP8 (a `weight_scale` beside them) ready to load them:
    a weight parameter of the state's dtype (FP8, or the reference's float) and scale buffers of its shapes, so
    load_state_dict matches names, shapes and dtypes. Run on the meta-device model before loading. Only the decoder
    layers' projections (layers.Linear) can be FP8."""
    from jetspec_trt.models.layers import Linear

    modules = dict(model.named_modules())
    for name in fp8_weight_names(state):
        module = modules.get(name)
        if not isinstance(module, Linear):
            raise JetSpecError(f"tensor {name}.{WEIGHT_SCALE}: {name} cannot hold FP8 weights here (only the "
                               "decoder layers' q/k/v/o and gate/up/down projections can; lm_head stays unquantized)")
        device = module.weight.device
        module.weight = nn.Parameter(torch.empty(module.weight.shape, dtype=state[f"{name}.weight"].dtype,
                                                 device=device), requires_grad=False)
        module.weight_scale = torch.empty(state[f"{name}.{WEIGHT_SCALE}"].shape, device=device)
        input_scale = state.get(f"{name}.{INPUT_SCALE}")
        module.input_scale = None if input_scale is None else torch.empty(input_scale.shape, device=device)


def fuse_fp8(weights: list[torch.Tensor], weight_scales: list[torch.Tensor],
             input_scales: list[torch.Tensor | None]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Row-concatenate FP8 weights (or the reference's e4m3 values in float) into one GEMM's weight. Per-channel
    scales concatenate with the rows. Per-tensor: ONE scale, each part requantized to the largest of the parts'
    scales (as vLLM does for its fused q/k/v and gate/up), which only drops low bits of the parts with smaller
    scales. The parts see the same input, so one input scale serves them: the largest (modelopt already writes
    equal ones). Returns (weight, weight_scale, input_scale or None for dynamic)."""
    if any(s is None for s in weight_scales):  # one GEMM cannot take FP8 and unquantized rows
        raise JetSpecError("fused projections (q/k/v or gate/up of one layer) mix FP8 and unquantized weights; "
                           "a checkpoint must quantize each group whole or leave it whole")
    if any(s is None for s in input_scales) != all(s is None for s in input_scales):
        raise JetSpecError("fused projections mix static and dynamic activation scales")
    input_scale = None if input_scales[0] is None else torch.stack([s.reshape(()) for s in input_scales]).max()
    if weight_scales[0].dim() == 1:
        return torch.cat(weights), torch.cat(weight_scales), input_scale
    scale = torch.stack([s.float().reshape(()) for s in weight_scales]).max()
    parts = [w if torch.equal(s.float().reshape(()), scale) else
             quantize(dequantize(w, s, torch.float32), scale).to(w.dtype) for w, s in zip(weights, weight_scales)]
    return torch.cat(parts), scale, input_scale


def split_weight_scale(weight_scale: torch.Tensor | None, rows: list[int]) -> list[torch.Tensor | None]:
    """The scale of each part of a fused weight whose parts have `rows` rows: the one per-tensor scale for every
    part, or a per-channel scale's rows."""
    if weight_scale is None or weight_scale.dim() == 0:
        return [weight_scale] * len(rows)
    return list(weight_scale.split(rows))


def require_fp8_device(device: torch.device | str) -> None:
    """JetSpecError unless `device` can run FP8 GEMMs: any CPU (torch's reference kernels), or a CUDA GPU of
    compute capability 8.9 or newer."""
    device = torch.device(device)
    if device.type != "cuda":
        return
    capability = torch.cuda.get_device_capability(device)
    if capability < MIN_CAPABILITY:
        name = torch.cuda.get_device_name(device)
        raise JetSpecError(
            f"this engine's target has FP8 weights, and {name} (compute capability {capability[0]}.{capability[1]}) "
            f"has no FP8 tensor cores (needs {MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]}+: Ada, Hopper or newer); "
            "build a bfloat16 engine for this GPU, or run this one on the CPU (dequantized)")
