"""FP8 quantization of a target checkpoint with nvidia-modelopt: calibrate on a few prompts, export the Hugging
Face FP8 layout (models/fp8.py) that TensorRT-LLM, vLLM and our engine read.

modelopt works on transformers' own model of the checkpoint (models.checkpoint.load_hf_model: the same weights and
numerics as ours), so its export writes the tensor names, scales and quantization_config those readers expect.
Two recipes (Fp8Recipe, `build --fp8-recipe`), each one modelopt config:

- "per-tensor", FP8_DEFAULT_CFG: `mtq.quantize` puts e4m3 per-tensor quantizers on every Linear except lm_head
  (embeddings too are left alone), runs the calibration prompts through the model to record each input's amax
  ("max" algorithm), and `export_hf_checkpoint` writes weight (e4m3), weight_scale = amax(|W|)/448 and
  input_scale = calibrated amax(|x|)/448 per Linear (quant_algo "FP8").
- "per-channel", FP8_PER_CHANNEL_PER_TOKEN_CFG: weight_scale = amax(|W_row|)/448 per output row ([N]) and no
  input_scale: each token's activations are scaled by their own amax at run time (quant_algo
  "FP8_PER_CHANNEL_PER_TOKEN", which TensorRT-LLM reads as its QuantAlgo of that name).

- "per-channel-tail-bf16" (the default): "per-channel", but the MLPs of the last 3 decoder layers stay in the
  engine dtype (Fp8Recipe.unquantized_tail_mlps).

Measured on the CPU against bf16 (bench/results/quantize-compare-cpu-qwen2.5-coder-0.5b-*.json, docs/engine.md),
teacher-forced top-1 agreement on 9963 held-out tokens: per-tensor 96.5 %, per-channel 96.3 %, per-channel-tail-bf16
97.6 %, the only one to reach issue 15's 97 %.

The draft head is never quantized. Before the export, each layer's q/k/v and gate/up quantizers get one shared
weight amax where the scales are per tensor (modelopt's own preprocess_linear_fusion, what its TensorRT-LLM export
does): the engine runs each group as one GEMM with one scale, and a shared amax lets the export round every weight
once, with that scale, instead of the loader requantizing parts rounded with another. Per-channel scales
concatenate with the rows and need nothing shared.

Calibration runs on CUDA in the engine dtype where a GPU is there, else on the CPU in float32 (modelopt's fake
quantization runs on both; the CPU is fine for small models and the tests, slow for 8B).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from jetspec_trt.dtypes import dtype_name
from jetspec_trt.errors import JetSpecError
from jetspec_trt.models.checkpoint import SHARD_INDEX, load_hf_model
from jetspec_trt.models.fp8 import PER_CHANNEL, PER_TENSOR, read_fp8_format
from jetspec_trt.models.weights import keep_plan, write_weights
from jetspec_trt.versions import library_versions

METHODS = ("fp8",)


@dataclass(frozen=True)
class Fp8Recipe:
    modelopt_config: str  # a config of modelopt.torch.quantization; "max" calibration in all
    weight_scales: str  # models.fp8.PER_TENSOR / PER_CHANNEL: what the export's format must say
    activations: str  # for the manifest
    # The MLPs (gate/up/down) of the last n decoder layers stay in the engine dtype: on Qwen2.5-Coder-0.5B most of
    # FP8's top-1 flips come from there (the last layers' errors reach the logits unaveraged); unquantized
    # attention projections or earlier layers bought far less per weight (docs/engine.md has the ablation).
    unquantized_tail_mlps: int = 0

    def modelopt_quant_config(self, mtq, num_layers: int) -> dict:
        """modelopt's config, with the quantizers of the kept MLPs disabled (its export then writes them
        unquantized and lists them under `ignore`)."""
        config = getattr(mtq, self.modelopt_config)
        kept = range(max(0, num_layers - self.unquantized_tail_mlps), num_layers)
        off = [{"quantizer_name": f"*layers.{i}.mlp.*", "enable": False} for i in kept]
        return {**config, "quant_cfg": list(config["quant_cfg"]) + off} if off else config


PER_TOKEN_ACTIVATIONS = "dynamic, per token (amax of the row / 448)"
FP8_RECIPES = {
    PER_TENSOR: Fp8Recipe("FP8_DEFAULT_CFG", PER_TENSOR, "static per-tensor input_scale (calibrated amax / 448)"),
    PER_CHANNEL: Fp8Recipe("FP8_PER_CHANNEL_PER_TOKEN_CFG", PER_CHANNEL, PER_TOKEN_ACTIVATIONS),
    "per-channel-tail-bf16": Fp8Recipe("FP8_PER_CHANNEL_PER_TOKEN_CFG", PER_CHANNEL, PER_TOKEN_ACTIVATIONS,
                                       unquantized_tail_mlps=3),
}
DEFAULT_FP8_RECIPE = "per-channel-tail-bf16"  # the best measured (CPU, docs/engine.md), and >= 97 %


@dataclass(frozen=True)
class QuantizeConfig:
    method: str = "fp8"
    recipe: str = DEFAULT_FP8_RECIPE  # a key of FP8_RECIPES
    # Calibration prompts: a prompt suite of jetspec_trt.datasets or a .jsonl file of {"messages"} / {"prompt"}
    # lines (datasets.load_prompt_messages), sent through the tokenizer's chat template as the engine sees them.
    calib_source: str = "sharegpt"
    calib_samples: int = 32
    calib_max_tokens: int = 512  # longer prompts are cut
    calib_device: str | None = None  # None: cuda where available, else cpu

    def validate(self) -> None:
        if self.method not in METHODS:
            raise JetSpecError(f"unknown quantization {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.recipe not in FP8_RECIPES:
            raise JetSpecError(f"unknown FP8 recipe {self.recipe!r}; choose one of {', '.join(FP8_RECIPES)}")
        if self.calib_samples < 1 or self.calib_max_tokens < 2:
            raise JetSpecError(f"calibration needs >= 1 sample of >= 2 tokens, got {self.calib_samples} samples "
                               f"of up to {self.calib_max_tokens} tokens")


def calibration_sequences(target_dir: Path, cfg: QuantizeConfig) -> list[list[int]]:
    """Token ids of the calibration prompts, chat-templated with the target's tokenizer, cut to calib_max_tokens."""
    from transformers import AutoTokenizer

    from jetspec_trt.datasets import encode_prompts, load_prompt_messages

    tokenizer = AutoTokenizer.from_pretrained(str(target_dir), local_files_only=True)
    ids = encode_prompts(tokenizer, load_prompt_messages(cfg.calib_source, cfg.calib_samples))
    return [seq[: cfg.calib_max_tokens] for seq in ids if seq]


def _modelopt():
    try:
        import modelopt.torch.quantization as mtq
        from modelopt.torch.export import export_hf_checkpoint
        from modelopt.torch.export.quant_utils import preprocess_linear_fusion
    except ImportError as err:
        raise JetSpecError(f"--quantize needs nvidia-modelopt (pip install nvidia-modelopt): {err}") from err
    return mtq, export_hf_checkpoint, preprocess_linear_fusion


# The projections the engine fuses into one GEMM (models/fused_layout.py), as transformers' layers name them.
FUSED_GROUPS = (("self_attn", ("q_proj", "k_proj", "v_proj")), ("mlp", ("gate_proj", "up_proj")))


def _share_fused_scales(model, preprocess_linear_fusion) -> None:
    for layer in model.model.layers:
        for parent, names in FUSED_GROUPS:
            block = getattr(layer, parent)
            preprocess_linear_fusion([getattr(block, name) for name in names])


def quantize_target(target_dir: Path, out_dir: Path, cfg: QuantizeConfig, dtype: torch.dtype) -> dict:
    """Write an FP8 copy of the target checkpoint at `target_dir` into `out_dir` (config, tokenizer and
    generation files beside the weights; unquantized tensors in `dtype`). Returns the recipe for the manifest."""
    cfg.validate()
    target_dir, out_dir = Path(target_dir), Path(out_dir)
    if read_fp8_format(target_dir) is not None:
        raise JetSpecError(f"{target_dir} is already quantized; build from it without --quantize")
    mtq, export_hf_checkpoint, preprocess_linear_fusion = _modelopt()
    recipe = FP8_RECIPES[cfg.recipe]
    sequences = calibration_sequences(target_dir, cfg)
    device = cfg.calib_device or ("cuda" if torch.cuda.is_available() else "cpu")
    calib_dtype = dtype if torch.device(device).type == "cuda" else torch.float32
    model = load_hf_model(target_dir, calib_dtype).to(device)

    @torch.no_grad()
    def forward_loop(m) -> None:
        for seq in sequences:
            m(torch.tensor([seq], device=device))

    mtq.quantize(model, recipe.modelopt_quant_config(mtq, len(model.model.layers)), forward_loop)
    _share_fused_scales(model, preprocess_linear_fusion)
    out_dir.mkdir(parents=True)
    export_dir = out_dir / ".modelopt-export"
    with torch.inference_mode():
        export_hf_checkpoint(model, dtype=dtype, export_dir=export_dir)
    del model
    _finish_export(target_dir, export_dir, out_dir, dtype)
    fmt = read_fp8_format(out_dir)
    if fmt is None or fmt.weight_scales != recipe.weight_scales:
        raise JetSpecError(f"modelopt wrote no {recipe.weight_scales} FP8 quantization_config into "
                           f"{out_dir / 'config.json'} ({fmt.describe() if fmt else 'none'})")
    return {
        "method": cfg.method,
        "recipe": cfg.recipe,
        "format": fmt.describe() + "; Hugging Face layout with weight_scale / input_scale per Linear",
        "activations": recipe.activations,
        "tool": f"nvidia-modelopt {library_versions('modelopt')['modelopt']}",
        "modelopt_config": recipe.modelopt_config,
        "algorithm": "max",
        "unquantized": list(fmt.excluded) + ["norms", "the draft head"],
        "calibration": {"source": cfg.calib_source, "samples": len(sequences),
                        "tokens": sum(len(s) for s in sequences), "max_tokens": cfg.calib_max_tokens,
                        "device": device, "dtype": dtype_name(calib_dtype)},
    }


def _finish_export(target_dir: Path, export_dir: Path, out_dir: Path, dtype: torch.dtype) -> None:
    """The export, moved into `out_dir` with what it leaves out or states otherwise: unquantized tensors in
    `dtype` (modelopt keeps a CPU calibration's float32 for them), the source's tokenizer and other side files,
    and config's dtype."""
    write_weights(export_dir, out_dir, keep_plan, dtype)
    for directory in (export_dir, target_dir):  # the export's own config files first, then the source's others
        for item in sorted(directory.iterdir()):
            if (item.is_file() and not (out_dir / item.name).exists() and item.suffix != ".safetensors"
                    and item.name != SHARD_INDEX):
                shutil.copy2(item, out_dir / item.name)
    shutil.rmtree(export_dir)
    config_path = out_dir / "config.json"
    config = json.loads(config_path.read_text())
    for key in ("dtype", "torch_dtype"):
        if key in config:
            config[key] = dtype_name(dtype)
    config_path.write_text(json.dumps(config, indent=2) + "\n")
