"""`jetspec-trt export triton`: an engine directory -> a Triton Inference Server model repository.

    REPO/
      <model>/config.pbtxt    python backend, decoupled (streaming), TensorRT-LLM's request contract
      <model>/1/model.py      jetspec_trt/export/triton_model.py: loads the engine with our Python runner
      <model>/engine/         only with copy_engine: the engine itself (else config.pbtxt names its path)

The model's python stub imports `jetspec_trt` from the Python environment Triton runs it in, so the repository
holds no code of ours beyond model.py; `jetspec-trt serve REPO` starts a tritonserver with that environment.
The repository is written into a temp dir beside REPO and renamed into place, so a failed export leaves nothing.
"""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import click

from jetspec_trt.errors import JetSpecError
from jetspec_trt.staging import staged_directory

MODEL_FILE = Path(__file__).with_name("triton_model.py")
ENGINE_SUBDIR = "engine"


@dataclass(frozen=True)
class TensorSpec:
    name: str
    data_type: str  # Triton TYPE_* without the prefix
    dims: tuple[int, ...] = (1,)
    optional: bool = False
    doc: str = ""


# TensorRT-LLM's Triton request contract: the inputs of its ensemble / tensorrt_llm_bls models as last shipped
# (TensorRT-LLM's triton_backend/all_models/inflight_batcher_llm/ensemble/config.pbtxt, which declared its integer
# inputs INT32 from tensorrtllm_backend v0.7.0 on; v0.5 and v0.6 declared them UINT32, and Triton rejects a
# tensor whose type differs from the declared one, so those old clients get Triton's dtype error). Names the
# ensemble renamed keep both spellings (random_seed -> seed, min_length -> min_tokens). Inputs for features this
# model does not have (LoRA, prompt tables, guided decoding, embedding bias, encoder-decoder) are not declared:
# Triton refuses them as unexpected. Each `doc` is what this model does with the input.
INPUTS = (
    TensorSpec("text_input", "STRING", doc="prompt text (UTF-8), used as is (no chat template)"),
    TensorSpec("max_tokens", "INT32", doc="new tokens, 1..max_seq_len; the output also stops at max_seq_len"),
    TensorSpec("stream", "BOOL", optional=True,
               doc="true: a response per decoding round that adds text, each with that text"),
    TensorSpec("temperature", "FP32", optional=True,
               doc="0 (default) = greedy; > 0 samples (distributed as the target's own sampling)"),
    TensorSpec("top_k", "INT32", optional=True, doc="sample among the k most likely tokens; 0 (default) = all"),
    TensorSpec("top_p", "FP32", optional=True, doc="nucleus mass in (0, 1] after top_k, default 1"),
    TensorSpec("seed", "UINT64", optional=True, doc="sampling seed (the ensemble's name in its last releases)"),
    TensorSpec("random_seed", "UINT64", optional=True,
               doc="sampling seed (the ensemble's name up to tensorrtllm_backend v0.19); with seed, they must agree"),
    TensorSpec("end_id", "INT32", optional=True, doc="an extra stop token id (the engine's EOS ids always stop)"),
    TensorSpec("pad_id", "INT32", optional=True, doc="accepted, no effect: outputs are text, never padded ids"),
    TensorSpec("stop_words", "STRING", (-1,), optional=True,
               doc="words (one per element) that end the output once the generated text contains one; the "
                   "output keeps the token completing it and nothing after"),
    TensorSpec("bad_words", "STRING", (-1,), optional=True,
               doc="single-token words never generated (greedy or sampled); a longer word is an error"),
    TensorSpec("return_log_probs", "BOOL", optional=True,
               doc="true: cum_log_probs and output_log_probs of the generated tokens"),
    TensorSpec("exclude_input_in_output", "BOOL", optional=True,
               doc="non-streaming only: false (default) puts the prompt before the generated text"),
    TensorSpec("beam_width", "INT32", optional=True, doc="1 only (no beam search)"),
    TensorSpec("num_return_sequences", "INT32", optional=True, doc="1 only"),
    TensorSpec("length_penalty", "FP32", optional=True, doc="accepted, no effect: it applies to beam search only"),
    TensorSpec("repetition_penalty", "FP32", optional=True, doc="1 only (a penalty would change the distribution)"),
    TensorSpec("presence_penalty", "FP32", optional=True, doc="0 only"),
    TensorSpec("frequency_penalty", "FP32", optional=True, doc="0 only"),
    TensorSpec("min_tokens", "INT32", optional=True, doc="0 or 1 only (every output has a token)"),
    TensorSpec("min_length", "INT32", optional=True, doc="min_tokens' earlier name; 0 or 1 only"),
    TensorSpec("return_context_logits", "BOOL", optional=True, doc="false only"),
    TensorSpec("return_generation_logits", "BOOL", optional=True, doc="false only"),
    TensorSpec("return_perf_metrics", "BOOL", optional=True, doc="false only"),
    TensorSpec("return_num_input_tokens", "BOOL", optional=True,
               doc="accepted; num_input_tokens is always returned"),
    TensorSpec("return_num_output_tokens", "BOOL", optional=True,
               doc="accepted; num_output_tokens is always returned"),
)
OUTPUTS = (
    TensorSpec("text_output", "STRING", (-1,), doc="streaming: the new text of the round; else the whole text"),
    TensorSpec("cum_log_probs", "FP32", (-1,),
               doc="with return_log_probs: [1] (one beam), the sum of the generated tokens' log probs so far"),
    TensorSpec("output_log_probs", "FP32", (-1, -1),
               doc="with return_log_probs: [1, n], the log probs of the tokens this response adds "
                   "(streaming: since the previous response; else all)"),
    TensorSpec("context_logits", "FP32", (-1, -1), doc="never sent (return_context_logits is refused)"),
    TensorSpec("generation_logits", "FP32", (-1, -1, -1), doc="never sent (return_generation_logits is refused)"),
    TensorSpec("batch_index", "INT32", doc="the prompt's row in the request (one response per prompt)"),
    TensorSpec("sequence_index", "INT32", doc="always 0 (one sequence per prompt)"),
    TensorSpec("finish_reason", "STRING", (-1,), doc='"" while streaming, then "stop" (EOS, end_id, a stop '
                                                     'word) or "length"'),
    TensorSpec("num_input_tokens", "INT32", doc="prompt tokens"),
    TensorSpec("num_output_tokens", "INT32", doc="tokens generated so far"),
    TensorSpec("decoding_iter", "INT32", doc="verify rounds so far (target forwards after prefill)"),
    TensorSpec("avg_decoded_tokens_per_iter", "FP32",
               doc="tokens emitted per round, accepted drafts + the bonus token (JetSpec's tau)"),
    TensorSpec("total_draft_tokens", "INT32", doc="drafted tree nodes verified so far (root excluded)"),
    TensorSpec("total_accepted_draft_tokens", "INT32", doc="drafted tokens the target accepted so far"),
    TensorSpec("acceptance_rate", "FP32", doc="total_accepted_draft_tokens / total_draft_tokens"),
)
# Request `parameters` the model accepts (none: every knob is an input tensor); others get an error response.
REQUEST_PARAMETERS: tuple[str, ...] = ()


@dataclass(frozen=True)
class TritonExportConfig:
    engine_dir: Path
    output: Path
    model_name: str = "jetspec"
    max_batch_size: int = 8  # prompts per request (non-streaming; a streaming request carries one)
    instances: int = 1  # model instances, each a python stub process with its own engine
    device: str = "cpu"
    cpu_threads: int = 0  # torch intra-op threads per instance; 0 = torch's default
    max_queue_size: int = 1024  # requests waiting per instance before new ones are refused
    copy_engine: bool = False
    overwrite: bool = False
    # Sequences decoding together in each instance's one engine (in-flight batching, runtime/scheduler.py); 1 =
    # one request at a time. Default 1: the scheduler's trees and acceptance run on the host (only its model passes
    # are graphed), so on CUDA it gives up the fully graphed decoder that serves a single stream fastest; the trade (throughput of many streams for latency of
    # one) is the operator's to make. On the CPU every stream is eager anyway, and N > 1 is the better choice.
    inflight_batch: int = 1


def _dims(dims: tuple[int, ...]) -> str:
    return "[ " + ", ".join(str(d) for d in dims) + " ]"


def tensor_block(kind: str, specs: tuple[TensorSpec, ...]) -> str:
    entries = []
    for spec in specs:
        lines = [f'    name: "{spec.name}"', f"    data_type: TYPE_{spec.data_type}", f"    dims: {_dims(spec.dims)}"]
        if spec.optional:
            lines.append("    optional: true")
        entries.append("  {\n" + "\n".join(lines) + "\n  }")
    return f"{kind} [\n" + ",\n".join(entries) + "\n]\n"


def _parameter(key: str, value: str) -> str:
    return f'parameters {{\n  key: "{key}"\n  value: {{ string_value: "{value}" }}\n}}\n'


def config_pbtxt(cfg: TritonExportConfig, engine_ref: str) -> str:
    return (
        f'name: "{cfg.model_name}"\n'
        'backend: "python"\n'
        f"max_batch_size: {cfg.max_batch_size}\n"
        "model_transaction_policy {\n  decoupled: true\n}\n"
        + tensor_block("input", INPUTS)
        + tensor_block("output", OUTPUTS)
        + f"instance_group [\n  {{\n    count: {cfg.instances}\n    kind: KIND_CPU\n  }}\n]\n"
        + _parameter("engine_dir", engine_ref)
        + _parameter("device", cfg.device)
        + _parameter("cpu_threads", str(cfg.cpu_threads))
        + _parameter("max_queue_size", str(cfg.max_queue_size))
        + _parameter("inflight_batch", str(cfg.inflight_batch))
    )


def link_or_copy(src: str, dst: str) -> None:
    """shutil copy_function: a hard link where the filesystem allows (engine files are not written in place)."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def check_engine_dir(engine_dir: Path):
    """The engine's runtime config; JetSpecError if `engine_dir` is not an engine directory."""
    from jetspec_trt.runtime.config import RuntimeConfig

    engine_dir = Path(engine_dir)
    if not engine_dir.is_dir():
        raise JetSpecError(f"engine directory {engine_dir} does not exist")
    return RuntimeConfig.load(engine_dir)


def export_triton(cfg: TritonExportConfig) -> Path:
    """Write the model repository; returns its path. Raises JetSpecError on bad input."""
    check_engine_dir(cfg.engine_dir)
    if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]*", cfg.model_name):
        raise JetSpecError(f"model name {cfg.model_name!r} must be letters, digits, '_', '.', '-'")
    if cfg.max_batch_size < 1:
        raise JetSpecError(f"--max-batch-size must be >= 1, got {cfg.max_batch_size}")
    if cfg.instances < 1:
        raise JetSpecError(f"--instances must be >= 1, got {cfg.instances}")
    if cfg.cpu_threads < 0:
        raise JetSpecError(f"--cpu-threads must be >= 0, got {cfg.cpu_threads}")
    if cfg.inflight_batch < 1:
        raise JetSpecError(f"--inflight-batch must be >= 1, got {cfg.inflight_batch}")
    if cfg.max_queue_size < 1:
        raise JetSpecError(f"--max-queue-size must be >= 1, got {cfg.max_queue_size}")
    if cfg.device.split(":")[0] not in ("cpu", "cuda"):
        raise JetSpecError(f"--device must be cpu or cuda[:N], got {cfg.device!r}")
    engine_ref = ENGINE_SUBDIR if cfg.copy_engine else str(Path(cfg.engine_dir).resolve())
    if '"' in engine_ref or "\\" in engine_ref:
        raise JetSpecError(f"engine path {engine_ref!r} holds a quote or backslash; move the engine")
    with staged_directory(cfg.output, cfg.overwrite) as staging:
        model_dir = staging / cfg.model_name
        (model_dir / "1").mkdir(parents=True)
        shutil.copyfile(MODEL_FILE, model_dir / "1" / "model.py")
        (model_dir / "config.pbtxt").write_text(config_pbtxt(cfg, engine_ref))
        if cfg.copy_engine:
            shutil.copytree(cfg.engine_dir, model_dir / ENGINE_SUBDIR, copy_function=link_or_copy)
    return Path(cfg.output)


@click.command("triton")
@click.argument("engine_dir", type=click.Path(path_type=Path))
@click.option("--output", required=True, type=click.Path(path_type=Path), help="Model repository directory.")
@click.option("--model-name", default="jetspec", show_default=True, help="Triton model name.")
@click.option("--max-batch-size", type=int, default=8, show_default=True,
              help="Prompts per request (non-streaming; a streaming request carries one).")
@click.option("--instances", type=int, default=1, show_default=True,
              help="Model instances (stub processes), each with its own engine.")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda or cuda:N.")
@click.option("--cpu-threads", type=int, default=0, show_default=True,
              help="torch threads per instance (0 = torch's default).")
@click.option("--max-queue-size", type=int, default=1024, show_default=True,
              help="Requests waiting per instance before new ones get an error.")
@click.option("--inflight-batch", type=int, default=1, show_default=True,
              help="Sequences decoding together in each instance's engine (in-flight batching on the eager path); "
                   "1 = one request at a time (on CUDA: the graphed decoder).")
@click.option("--copy-engine", is_flag=True, help="Copy the engine into the repository (else it is referenced).")
@click.option("--overwrite", is_flag=True, help="Replace an existing repository.")
def triton_command(engine_dir, output, model_name, max_batch_size, instances, device, cpu_threads, max_queue_size,
                   inflight_batch, copy_engine, overwrite):
    """Write a Triton model repository (python backend, decoupled streaming) serving ENGINE_DIR."""
    cfg = TritonExportConfig(engine_dir, output, model_name, max_batch_size, instances, device, cpu_threads,
                             max_queue_size, copy_engine, overwrite, inflight_batch)
    out = export_triton(cfg)
    click.echo(f"model repository written to {out} (model {model_name!r}); serve it with: jetspec-trt serve {out}")
