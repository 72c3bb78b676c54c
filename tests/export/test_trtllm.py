"""`export trtllm`: the files TensorRT-LLM's LLM API / trtllm-serve / Triton LLM-API model take, checked against
the fields TensorRT-LLM documents (API reference of 1.3.0rc27: DFlashDecodingConfig, KvCacheConfig,
DecodeCudaGraphConfig, TorchLlmArgs; triton_backend/all_models/llmapi/tensorrt_llm/config.pbtxt and model.yaml).
The field lists below are copied from those documents, independently of the exporter's code.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from jetspec_trt.builders.engine_builder import BuildConfig, build_engine
from jetspec_trt.cli import main
from jetspec_trt.errors import JetSpecError
from jetspec_trt.export.trtllm import TrtllmExportConfig, export_trtllm
from jetspec_trt.models.checkpoint import hf_state_dict
from jetspec_trt.quickstart import make_tiny_engine
from jetspec_trt.runtime.config import RuntimeConfig, TreeConfig

DFLASH_FIELDS = {
    "max_draft_len", "max_total_draft_tokens", "speculative_model", "max_concurrency", "draft_len_schedule",
    "load_format", "acceptance_rate_window_size", "acceptance_rate_threshold", "use_rejection_sampling",
    "allow_advanced_sampling", "advanced_sampling_mode", "enable_penalty", "mask_token_id", "target_layer_ids",
    "decoding_type", "attention_backend",
}
KV_CACHE_FIELDS = {"enable_block_reuse", "max_tokens", "free_gpu_memory_fraction", "host_cache_size", "dtype",
                   "tokens_per_block", "enable_partial_reuse", "max_attention_window"}
CUDA_GRAPH_FIELDS = {"batch_sizes", "max_batch_size", "enable_padding", "mode"}
LLM_ARGS = {"model", "backend", "tensor_parallel_size", "pipeline_parallel_size", "max_batch_size", "max_seq_len",
            "max_num_tokens", "dtype", "return_perf_metrics", "speculative_config", "cuda_graph_config",
            "kv_cache_config", "trust_remote_code"}
TRITON_CONFIG_FIELDS = {"max_batch_size", "decoupled", "cancellation_check_period_ms"}
LLMAPI_INPUTS = {
    "text_input": "STRING", "streaming": "BOOL", "sampling_param_best_of": "INT32",
    "sampling_param_temperature": "FP32", "sampling_param_top_k": "INT32", "sampling_param_top_p": "FP32",
    "sampling_param_frequency_penalty": "FP32", "sampling_param_presence_penalty": "FP32",
    "sampling_param_max_tokens": "INT32", "sampling_param_stop": "STRING", "sampling_param_seed": "UINT64",
    "sampling_param_exclude_input_from_output": "BOOL", "sampling_param_return_perf_metrics": "BOOL",
    "return_finish_reason": "BOOL", "return_stop_reason": "BOOL", "return_cumulative_logprob": "BOOL",
    "stop": "BOOL",
}
LLMAPI_OUTPUTS = {
    "text_output": "STRING", "finish_reason": "STRING", "stop_reason": "STRING", "cumulative_logprob": "FP32",
    "kv_cache_reused_block": "INT32", "kv_cache_missed_block": "INT32", "kv_cache_alloc_new_blocks": "INT32",
    "kv_cache_alloc_total_blocks": "INT32", "kv_cache_hit_rate": "FP32", "arrival_time_ns": "INT64",
    "first_scheduled_time_ns": "INT64", "first_token_time_ns": "INT64", "last_token_time_ns": "INT64",
    "acceptance_rate": "FP32", "total_accepted_draft_tokens": "INT32", "total_draft_tokens": "INT32",
}


@pytest.fixture(scope="module")
def engine_dir(tmp_path_factory) -> Path:
    return make_tiny_engine(tmp_path_factory.mktemp("trtllm")).engine


@pytest.fixture(scope="module")
def exported(engine_dir, tmp_path_factory) -> Path:
    return export_trtllm(TrtllmExportConfig(engine_dir, tmp_path_factory.mktemp("out") / "export"))


def pbtxt_tensors(text: str, kind: str) -> dict[str, str]:
    block = text.split(f"{kind} [", 1)[1].split("\n]", 1)[0]
    tensors = {}
    for entry in block.split("}")[:-1]:
        fields = dict(line.strip().split(": ", 1) for line in entry.splitlines() if ": " in line)
        tensors[fields["name"].strip('"')] = fields["data_type"].removeprefix("TYPE_")
    return tensors


def test_layout(exported):
    for path in ("target/config.json", "target/model.safetensors", "target/tokenizer.json", "draft/config.json",
                 "draft/model.safetensors", "extra_llm_api_options.yaml", "jetspec_export.json",
                 "triton_model_repo/tensorrt_llm/config.pbtxt", "triton_model_repo/tensorrt_llm/1/model.yaml"):
        assert (exported / path).is_file(), path
    assert not [p for p in exported.parent.iterdir() if p.name.startswith(".export")]


def test_extra_llm_api_options_fields(exported, engine_dir):
    options = yaml.safe_load((exported / "extra_llm_api_options.yaml").read_text())
    runtime = RuntimeConfig.load(engine_dir)
    assert set(options) <= LLM_ARGS and "model" not in options  # trtllm-serve takes the model as its argument
    spec = options["speculative_config"]
    assert set(spec) <= DFLASH_FIELDS
    assert spec["decoding_type"] == "DFlash" and spec["attention_backend"] in ("VANILLA", "TRTLLM")
    assert spec["max_draft_len"] == runtime.tree.max_depth
    assert Path(spec["speculative_model"]) == (exported / "draft").resolve()
    dflash = json.loads((exported / "draft" / "config.json").read_text())["dflash_config"]
    assert spec["mask_token_id"] == dflash["mask_token_id"] == runtime.mask_token_id
    assert spec["target_layer_ids"] == dflash["target_layer_ids"] == list(runtime.target_layer_ids)
    assert set(options["cuda_graph_config"]) <= CUDA_GRAPH_FIELDS
    assert max(options["cuda_graph_config"]["batch_sizes"]) == options["max_batch_size"]
    assert set(options["kv_cache_config"]) <= KV_CACHE_FIELDS
    assert 0 < options["kv_cache_config"]["free_gpu_memory_fraction"] <= 1
    assert options["max_seq_len"] == runtime.max_seq_len and options["dtype"] == runtime.dtype


def test_triton_llmapi_repository(exported):
    model_dir = exported / "triton_model_repo" / "tensorrt_llm"
    config = (model_dir / "config.pbtxt").read_text()
    assert 'name: "tensorrt_llm"' in config and 'backend: "python"' in config
    assert "max_batch_size" not in config and "decoupled" not in config  # model.yaml's triton_config sets them
    assert pbtxt_tensors(config, "input") == LLMAPI_INPUTS
    assert pbtxt_tensors(config, "output") == LLMAPI_OUTPUTS
    model_yaml = yaml.safe_load((model_dir / "1" / "model.yaml").read_text())
    options = yaml.safe_load((exported / "extra_llm_api_options.yaml").read_text())
    assert set(model_yaml) <= LLM_ARGS | {"triton_config"}
    assert Path(model_yaml["model"]) == (exported / "target").resolve()
    assert {k: v for k, v in model_yaml.items() if k in options} == options
    assert set(model_yaml["triton_config"]) <= TRITON_CONFIG_FIELDS
    assert model_yaml["triton_config"] == {"max_batch_size": 0, "decoupled": True}


def test_target_is_a_hugging_face_directory(exported, engine_dir):
    config = AutoConfig.from_pretrained(exported / "target", local_files_only=True)
    assert config.model_type == "qwen3"
    tokenizer = AutoTokenizer.from_pretrained(str(exported / "target"), local_files_only=True)
    assert tokenizer.encode("hello", add_special_tokens=False)
    # The engine stores q/k/v and gate/up fused; TensorRT-LLM gets them split under the Hugging Face names.
    exported_state = load_file(str(exported / "target" / "model.safetensors"))
    expected = hf_state_dict(engine_dir / "target")
    assert exported_state.keys() == expected.keys()
    assert any(n.endswith("layers.0.self_attn.q_proj.weight") for n in exported_state)
    assert not any("qkv_proj" in n or "gate_up_proj" in n for n in exported_state)
    assert all(torch.equal(exported_state[n], expected[n]) for n in expected)
    model, info = AutoModelForCausalLM.from_pretrained(exported / "target", local_files_only=True,
                                                       output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]


def test_draft_is_in_the_published_dflash_format(exported, engine_dir):
    config = json.loads((exported / "draft" / "config.json").read_text())
    assert config["architectures"] == ["DFlashDraftModel"] and config["model_type"] == "qwen3"
    assert config["block_size"] >= 2 and config["dflash_config"]["causal_head"] is True
    with safe_open(str(exported / "draft" / "model.safetensors"), "pt") as handle:
        names = set(handle.keys())
    assert {"fc.weight", "hidden_norm.weight", "norm.weight"} <= names
    assert not any(n.startswith("model.") or "embed_tokens" in n or "lm_head" in n for n in names)
    assert {"layers.0.self_attn.q_proj.weight", "layers.0.mlp.gate_proj.weight"} <= names
    assert not any("qkv_proj" in n or "gate_up_proj" in n for n in names)


def test_manifest(exported):
    manifest = json.loads((exported / "jetspec_export.json").read_text())
    assert manifest["consumer"]["decoding_type"] == "DFlash"
    assert manifest["consumer"]["tensorrt_llm"].startswith(">=1.3")
    assert any("chain" in d for d in manifest["differences_from_jetspec"])
    assert any("non-causal" in d for d in manifest["differences_from_jetspec"])


def test_path_prefix_and_options(engine_dir, tmp_path):
    out = export_trtllm(TrtllmExportConfig(engine_dir, tmp_path / "x", max_draft_len=3, max_batch_size=6,
                                           path_prefix=Path("/models/qwen3")))
    options = yaml.safe_load((out / "extra_llm_api_options.yaml").read_text())
    assert options["speculative_config"]["speculative_model"] == "/models/qwen3/draft"
    assert options["speculative_config"]["max_draft_len"] == 3
    assert options["cuda_graph_config"]["batch_sizes"] == [1, 2, 4, 6]
    model_yaml = yaml.safe_load((out / "triton_model_repo/tensorrt_llm/1/model.yaml").read_text())
    assert model_yaml["model"] == "/models/qwen3/target"


def test_jetspec_config_key_becomes_dflash_config(engine_dir, tmp_path):
    engine = tmp_path / "engine"
    shutil.copytree(engine_dir, engine)
    path = engine / "draft" / "config.json"
    raw = json.loads(path.read_text())
    raw["jetspec_config"] = raw.pop("dflash_config")
    path.write_text(json.dumps(raw))
    out = export_trtllm(TrtllmExportConfig(engine, tmp_path / "x"))
    exported = json.loads((out / "draft" / "config.json").read_text())
    assert "dflash_config" in exported and "jetspec_config" not in exported
    assert "jetspec_config" in json.loads(path.read_text())  # the engine's own file is untouched


SAFETENSORS_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}


def declared_dtypes(config: dict) -> list[str]:
    """Every torch_dtype / dtype value in a config.json, nested configs included."""
    found = [config[key] for key in ("torch_dtype", "dtype") if key in config]
    return found + [d for value in config.values() if isinstance(value, dict) for d in declared_dtypes(value)]


def stored_dtypes(model_dir: Path) -> set[str]:
    found = set()
    for path in model_dir.glob("*.safetensors"):
        with safe_open(str(path), "pt") as handle:
            found |= {SAFETENSORS_DTYPES[handle.get_slice(name).get_dtype()] for name in handle.keys()}
    return found


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_config_dtype_is_the_dtype_written(engine_dir, tmp_path, dtype):
    """config.json's dtype is what `dtype: auto` loads the weights as: it must name the tensors written beside it.
    The engine keeps its sources' config.json (the tiny pair says bfloat16); the quickstart engine is float32, and
    the bfloat16 engine here is built from sources that say float32."""
    if dtype == "float32":
        engine = engine_dir
    else:
        sources = {}
        for role in ("tiny-target", "tiny-draft"):
            sources[role] = shutil.copytree(engine_dir.parent / role, tmp_path / role)
            config = json.loads((sources[role] / "config.json").read_text())
            config["torch_dtype"] = "float32"
            (sources[role] / "config.json").write_text(json.dumps(config))
        engine = build_engine(BuildConfig(sources["tiny-target"], sources["tiny-draft"], tmp_path / "engine",
                                          tree=TreeConfig(budget=8, topk=2, max_depth=3), dtype="bfloat16",
                                          max_seq_len=1024))
    engine_configs = {role: (engine / role / "config.json").read_text() for role in ("target", "draft")}
    out = export_trtllm(TrtllmExportConfig(engine, tmp_path / "export"))
    for role in ("target", "draft"):
        declared = declared_dtypes(json.loads((out / role / "config.json").read_text()))
        assert declared and set(declared) == stored_dtypes(out / role) == {dtype}, role
        assert (engine / role / "config.json").read_text() == engine_configs[role]  # the engine's own: untouched
    assert yaml.safe_load((out / "extra_llm_api_options.yaml").read_text())["dtype"] == dtype
    assert AutoConfig.from_pretrained(out / "target", local_files_only=True).torch_dtype == getattr(torch, dtype)


@pytest.mark.parametrize("args, message", [
    (["missing-engine"], "does not exist"),
    (["{engine}", "--max-draft-len", "0"], "--max-draft-len must be in 1..7"),
    (["{engine}", "--max-draft-len", "8"], "--max-draft-len must be in 1..7"),
    (["{engine}", "--max-batch-size", "0"], "--max-batch-size must be >= 1"),
    (["{engine}", "--free-gpu-memory-fraction", "1.5"], "--free-gpu-memory-fraction"),
    (["{engine}", "--path-prefix", "relative/dir"], "--path-prefix must be an absolute path"),
])
def test_bad_input(engine_dir, tmp_path, capsys, args, message):
    out = tmp_path / "bad"
    with pytest.raises(SystemExit) as exit_info:
        main(["export", "trtllm", *[a.format(engine=engine_dir) for a in args], "--output", str(out)])
    assert exit_info.value.code == JetSpecError.exit_code
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


def test_refuses_existing_output(engine_dir, tmp_path):
    (tmp_path / "x").mkdir()
    with pytest.raises(JetSpecError, match="already exists"):
        export_trtllm(TrtllmExportConfig(engine_dir, tmp_path / "x"))
