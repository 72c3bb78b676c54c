"""`jetspec-trt export trtllm`: an engine directory -> what TensorRT-LLM's LLM API, trtllm-serve and its Triton
LLM-API model take (TensorRT-LLM >= 1.3, PyTorch backend, `DFlash` speculative decoding).

    DIR/
      target/                          the target, Hugging Face layout (config, weights, tokenizer)
      draft/                           the head in the published DFlash layout (config.json `dflash_config`)
      extra_llm_api_options.yaml       for `trtllm-serve serve DIR/target --config ...` and the LLM API
      triton_model_repo/tensorrt_llm/config.pbtxt     TensorRT-LLM's LLM-API Triton model (python backend)
      triton_model_repo/tensorrt_llm/1/model.yaml     `model:` + the same LLM arguments + `triton_config`
      jetspec_export.json              what was exported, for which TensorRT-LLM, and what differs from JetSpec

TensorRT-LLM reads Hugging Face tensor names, so the engine's fused q/k/v and gate/up tensors are written out split
(models/weights.py `copy_as_hugging_face`); every other file, and the weights of an engine built with --no-fuse,
is hard-linked from the engine when they share a filesystem (else copied). The engine keeps each source
checkpoint's config.json as it was, whose `torch_dtype` names the source's dtype, not the dtype the build wrote;
the exported config.json files declare the dtype of the tensors beside them (what `dtype: auto` loads them as).
Paths inside the YAML files are absolute: the output's own location, or `path_prefix` when the directory will be
mounted elsewhere.
TensorRT-LLM's DFlash drafts ONE chain of `max_draft_len` tokens with non-causal attention inside the block and
verifies it as a chain; JetSpec drafts a causal tree. The target's output is the same (verification is
lossless); the accepted length is not.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import click

from jetspec_trt.errors import JetSpecError
from jetspec_trt.export.triton import TensorSpec, check_engine_dir, link_or_copy, tensor_block
from jetspec_trt.staging import staged_directory

TENSORRT_LLM_VERSION = ">=1.3.0rc27"  # DFlashDecodingConfig as in the 1.3.0rc27 / 1.4.0rc1 API reference
EXTRA_OPTIONS = "extra_llm_api_options.yaml"
TRITON_MODEL = "tensorrt_llm"
MANIFEST = "jetspec_export.json"

# TensorRT-LLM's LLM-API Triton model (triton_backend/all_models/llmapi/tensorrt_llm/config.pbtxt): its model.py
# reads these names; max_batch_size and decoupled come from model.yaml's triton_config.
LLMAPI_INPUTS = (
    TensorSpec("text_input", "STRING", (-1,)),
    TensorSpec("streaming", "BOOL", optional=True),
    *(TensorSpec(f"sampling_param_{name}", dtype, optional=True) for name, dtype in (
        ("best_of", "INT32"), ("temperature", "FP32"), ("top_k", "INT32"), ("top_p", "FP32"),
        ("frequency_penalty", "FP32"), ("presence_penalty", "FP32"), ("max_tokens", "INT32"))),
    TensorSpec("sampling_param_stop", "STRING", (-1,), optional=True),
    TensorSpec("sampling_param_seed", "UINT64", optional=True),
    TensorSpec("sampling_param_exclude_input_from_output", "BOOL", optional=True),
    TensorSpec("sampling_param_return_perf_metrics", "BOOL", optional=True),
    TensorSpec("return_finish_reason", "BOOL", optional=True),
    TensorSpec("return_stop_reason", "BOOL", optional=True),
    TensorSpec("return_cumulative_logprob", "BOOL", optional=True),
    TensorSpec("stop", "BOOL", optional=True),
)
LLMAPI_OUTPUTS = (
    TensorSpec("text_output", "STRING", (-1,)),
    TensorSpec("finish_reason", "STRING", (-1,)),
    TensorSpec("stop_reason", "STRING", (-1,)),
    TensorSpec("cumulative_logprob", "FP32", (-1,)),
    TensorSpec("kv_cache_reused_block", "INT32", (-1,)),
    TensorSpec("kv_cache_missed_block", "INT32", (-1,)),
    TensorSpec("kv_cache_alloc_new_blocks", "INT32", (-1,)),
    TensorSpec("kv_cache_alloc_total_blocks", "INT32", (-1,)),
    TensorSpec("kv_cache_hit_rate", "FP32", (-1,)),
    *(TensorSpec(f"{name}_time_ns", "INT64") for name in ("arrival", "first_scheduled", "first_token", "last_token")),
    TensorSpec("acceptance_rate", "FP32"),
    TensorSpec("total_accepted_draft_tokens", "INT32"),
    TensorSpec("total_draft_tokens", "INT32"),
)

DIFFERENCES = [
    "TensorRT-LLM's DFlash mode drafts one chain of max_draft_len tokens (the head's top-1 per depth) and verifies "
    "that chain plus a bonus token; JetSpec builds a best-first tree (budget, top-k) from the same per-depth "
    "logits and verifies the whole tree with a tree-attention mask.",
    "TensorRT-LLM's generic DFlash runs the head's block attention non-causally; a JetSpec head is trained causal "
    "(dflash_config.causal_head: true), so its drafts there differ from the ones it was trained to make.",
    "Output is unchanged (the target verifies every token; greedy stays the target's greedy decoding), but expect "
    "fewer accepted tokens per step than JetSpec's tree gets from the same head.",
]


@dataclass(frozen=True)
class TrtllmExportConfig:
    engine_dir: Path
    output: Path
    max_draft_len: int | None = None  # None: the engine's tree max_depth
    max_batch_size: int = 8
    free_gpu_memory_fraction: float = 0.85
    path_prefix: Path | None = None  # where `output` will live when served; None: its absolute path now
    overwrite: bool = False


def _yaml(data: dict, header: str) -> str:
    import yaml

    return header + yaml.safe_dump(data, sort_keys=False, default_flow_style=False)


def llm_api_options(cfg: TrtllmExportConfig, runtime, spec, draft_dir: str) -> dict:
    """The LLM arguments (TorchLlmArgs fields) for the exported pair."""
    draft_len = cfg.max_draft_len if cfg.max_draft_len is not None else runtime.tree.max_depth
    batch_sizes = sorted({min(2 ** i, cfg.max_batch_size) for i in range(cfg.max_batch_size.bit_length() + 1)})
    return {
        "max_batch_size": cfg.max_batch_size,
        "max_seq_len": runtime.max_seq_len,
        "dtype": runtime.dtype,
        "return_perf_metrics": True,
        "speculative_config": {
            "decoding_type": "DFlash",
            "max_draft_len": draft_len,
            "speculative_model": draft_dir,
            "mask_token_id": spec.mask_token_id,
            "target_layer_ids": list(spec.target_layer_ids),
            "attention_backend": "VANILLA",
        },
        "cuda_graph_config": {"enable_padding": True, "batch_sizes": batch_sizes},
        # Block reuse off: a prefix served from the cache skips the target forward whose layer features the
        # draft head's context is built from.
        "kv_cache_config": {"free_gpu_memory_fraction": cfg.free_gpu_memory_fraction, "enable_block_reuse": False},
    }


SAFETENSORS_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64",
                      "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}
CONFIG_DTYPE_KEYS = ("torch_dtype", "dtype")  # transformers < 4.56 writes torch_dtype, later ones dtype


def written_dtype(model_dir: Path) -> str:
    """The dtype of the floating-point tensors in `model_dir`'s safetensors files (one, or JetSpecError)."""
    from safetensors import safe_open

    from jetspec_trt.models.checkpoint import weight_files

    found = set()
    for path in weight_files(model_dir):
        with safe_open(str(path), "pt") as handle:
            for name in handle.keys():
                dtype = handle.get_slice(name).get_dtype()
                if dtype.startswith(("F", "BF")):
                    found.add(SAFETENSORS_DTYPES.get(dtype, dtype))
    if len(found) != 1:
        raise JetSpecError(f"{model_dir}: expected one floating-point dtype in the weights, found "
                           f"{sorted(found) or 'none'}")
    return found.pop()


def declare_dtype(model_dir: Path, dtype: str) -> None:
    """Set config.json's dtype fields (top level and nested configs) to `dtype`. The file may be a hard link to
    the engine's own, so it is replaced, never written in place."""
    path = model_dir / "config.json"
    config = json.loads(path.read_text())

    def fix(block: dict) -> None:
        for key in CONFIG_DTYPE_KEYS:
            if key in block or (key == "torch_dtype" and block is config):
                block[key] = dtype
        for value in block.values():
            if isinstance(value, dict) and any(key in value for key in CONFIG_DTYPE_KEYS):
                fix(value)

    fix(config)
    path.unlink()
    path.write_text(json.dumps(config, indent=2) + "\n")


def export_trtllm(cfg: TrtllmExportConfig) -> Path:
    """Write the TensorRT-LLM export; returns its path. Raises JetSpecError on bad input."""
    from jetspec_trt.models.draft import read_draft_config
    from jetspec_trt.models.weights import copy_as_hugging_face

    engine_dir = Path(cfg.engine_dir)
    runtime = check_engine_dir(engine_dir)
    raw_draft, spec = read_draft_config(engine_dir / "draft")
    if cfg.max_draft_len is not None and not 1 <= cfg.max_draft_len <= spec.block_size - 1:
        raise JetSpecError(f"--max-draft-len must be in 1..{spec.block_size - 1} (the head's block_size - 1), "
                           f"got {cfg.max_draft_len}")
    if cfg.max_batch_size < 1:
        raise JetSpecError(f"--max-batch-size must be >= 1, got {cfg.max_batch_size}")
    if not 0.0 < cfg.free_gpu_memory_fraction <= 1.0:
        raise JetSpecError(f"--free-gpu-memory-fraction must be in (0, 1], got {cfg.free_gpu_memory_fraction}")
    if cfg.path_prefix is not None and not Path(cfg.path_prefix).is_absolute():
        raise JetSpecError(f"--path-prefix must be an absolute path, got {cfg.path_prefix}")
    prefix = Path(cfg.path_prefix) if cfg.path_prefix is not None else Path(cfg.output).resolve()
    options = llm_api_options(cfg, runtime, spec, str(prefix / "draft"))
    manifest_path = engine_dir / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}

    with staged_directory(cfg.output, cfg.overwrite) as staging:
        copy_as_hugging_face(engine_dir / "target", staging / "target", copy_function=link_or_copy)
        copy_as_hugging_face(engine_dir / "draft", staging / "draft", copy_function=link_or_copy)
        if spec.config_key != "dflash_config":  # TensorRT-LLM reads the block under this name only
            raw_draft["dflash_config"] = raw_draft.pop(spec.config_key)
            (staging / "draft" / "config.json").unlink()
            (staging / "draft" / "config.json").write_text(json.dumps(raw_draft, indent=2) + "\n")
        for role in ("target", "draft"):  # config.json says what the tensors are (TensorRT-LLM's dtype: auto)
            written = written_dtype(staging / role)
            if written != runtime.dtype:
                raise JetSpecError(f"{engine_dir / role}: weights are {written}, the engine says {runtime.dtype}")
            declare_dtype(staging / role, written)
        usage = (f"# TensorRT-LLM {TENSORRT_LLM_VERSION} (PyTorch backend), DFlash speculative decoding.\n"
                 f"#   trtllm-serve serve {prefix / 'target'} --config {prefix / EXTRA_OPTIONS}\n")
        (staging / EXTRA_OPTIONS).write_text(_yaml(options, usage))
        model_dir = staging / "triton_model_repo" / TRITON_MODEL
        (model_dir / "1").mkdir(parents=True)
        (model_dir / "config.pbtxt").write_text(
            f'name: "{TRITON_MODEL}"\nbackend: "python"\n'
            "instance_group [\n  {\n    count: 1\n    kind: KIND_CPU\n  }\n]\n"
            + tensor_block("input", LLMAPI_INPUTS) + tensor_block("output", LLMAPI_OUTPUTS))
        model_yaml = {"model": str(prefix / "target"), "backend": "pytorch", "tensor_parallel_size": 1,
                      "pipeline_parallel_size": 1, **options,
                      "triton_config": {"max_batch_size": 0, "decoupled": True}}
        (model_dir / "1" / "model.yaml").write_text(_yaml(model_yaml, (
            "# TensorRT-LLM's LLM-API Triton model: every key but triton_config goes to LLM(...).\n"
            "# Add model.py and helpers.py from TensorRT-LLM's triton_backend/all_models/llmapi/tensorrt_llm/1/\n"
            "# (the tag of the TensorRT-LLM you serve with) next to this file.\n")))
        (staging / MANIFEST).write_text(json.dumps({
            "format_version": 1,
            "consumer": {"tensorrt_llm": TENSORRT_LLM_VERSION, "backend": "pytorch", "decoding_type": "DFlash",
                         "triton_model": f"triton_model_repo/{TRITON_MODEL} (TensorRT-LLM's llmapi model)"},
            "engine": {"path": str(engine_dir.resolve()), "versions": manifest.get("versions", {}),
                       "dtype": runtime.dtype, "tree": asdict(runtime.tree)},
            "draft": {"block_size": spec.block_size, "max_draft_len": options["speculative_config"]["max_draft_len"],
                      "mask_token_id": spec.mask_token_id, "target_layer_ids": list(spec.target_layer_ids),
                      "causal_head": spec.causal_head},
            "paths_prefix": str(prefix),
            "differences_from_jetspec": DIFFERENCES,
        }, indent=2) + "\n")
    return Path(cfg.output)


@click.command("trtllm")
@click.argument("engine_dir", type=click.Path(path_type=Path))
@click.option("--output", required=True, type=click.Path(path_type=Path), help="Output directory.")
@click.option("--max-draft-len", type=int, default=None,
              help="Draft chain length [default: the engine's tree max_depth].")
@click.option("--max-batch-size", type=int, default=8, show_default=True)
@click.option("--free-gpu-memory-fraction", type=float, default=0.85, show_default=True,
              help="KV cache share of free GPU memory.")
@click.option("--path-prefix", type=click.Path(path_type=Path), default=None,
              help="Absolute path the output will have where it is served [default: where it is written].")
@click.option("--overwrite", is_flag=True, help="Replace an existing output directory.")
def trtllm_command(engine_dir, output, max_draft_len, max_batch_size, free_gpu_memory_fraction, path_prefix,
                   overwrite):
    """Export ENGINE_DIR for TensorRT-LLM's LLM API / trtllm-serve / Triton (DFlash mode: a chain, not a tree)."""
    cfg = TrtllmExportConfig(engine_dir, output, max_draft_len, max_batch_size, free_gpu_memory_fraction,
                             path_prefix, overwrite)
    out = export_trtllm(cfg)
    prefix = path_prefix or out.resolve()
    click.echo(f"TensorRT-LLM export written to {out}; serve it with: "
               f"trtllm-serve serve {prefix / 'target'} --config {prefix / EXTRA_OPTIONS}")
