"""`jetspec-trt export onnx`: an engine directory -> ONNX graphs of the target's verify step and the draft head.

    DIR/
      target.onnx           TargetVerifyGraph: prefill, decode step and tree verify (jetspec_trt/export/onnx_graphs.py)
      draft.onnx            DraftGraph: append the committed tokens' features to the head's context, draft a block
      *.onnx.data           the weights, beside their graph, when a graph's weights pass 1 GiB (external data)
      onnx_config.json      every input and output (names, symbolic shapes, dtypes), the attention variant, opset,
                            the custom op's contract, `jetspec_config` (TensorRT Edge-LLM's keys), the source engine
      runtime_config.json   the engine's runtime config (tree budget/top-k/depth, block size, mask token, EOS ...)
      tokenizer/            the engine target's tokenizer and configs (no weights)

KV is contiguous, one past/present pair per layer ([1, Hkv, past, D]), not paged: the caller keeps the present
rows it commits. `standard` graphs use ONNX ops only and run on onnxruntime; `plugin` graphs hold one
`jetspec_trt.TreeAttention` node per layer (jetspec_trt/plugins/onnx_op.py), for TensorRT. Exported with
torch.onnx's dynamo exporter; written into a temp dir beside DIR and renamed into place.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import shutil
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import click

from jetspec_trt.errors import JetSpecError
from jetspec_trt.versions import library_versions

ONNX_CONFIG = "onnx_config.json"
TOKENIZER_DIR = "tokenizer"
FORMAT_VERSION = 1
DEFAULT_OPSET = 18
OPSETS = range(18, 24)  # the dynamo exporter emits opset >= 18; onnxruntime 1.2x and TensorRT 10 parse these
EXTERNAL_DATA_BYTES = 1 << 30
DTYPE_CHOICES = ("engine", "float32", "float16", "bfloat16")


@dataclass(frozen=True)
class OnnxExportConfig:
    engine_dir: Path
    output: Path
    attention: str = "standard"  # standard | plugin
    opset: int = DEFAULT_OPSET
    dtype: str = "engine"  # engine: the engine's dtype
    overwrite: bool = False


def require_onnx() -> None:
    for module in ("onnx", "onnxscript"):
        try:
            __import__(module)
        except ImportError:
            raise JetSpecError(f"{module} is not installed: pip install 'jetspec-trt[onnx]' "
                               "(onnx, onnxscript, onnxruntime)") from None


def jetspec_config(runtime) -> dict:
    """The speculative block of TensorRT Edge-LLM's runtime config for `--spec-type jetspec`."""
    return {"target_layer_ids": list(runtime.target_layer_ids), "block_size": runtime.block_size,
            "mask_token_id": runtime.mask_token_id, "causal_head": True}


def graph_description(spec, file: str, dtype: str) -> dict:
    """A graph's inputs and outputs as onnx_config.json lists them: {name: {shape, dtype}}."""
    inputs = {name: {"shape": list(dims), "dtype": spec.input_dtypes[name]} for name, dims in spec.inputs.items()}
    outputs = {name: {"shape": list(dims), "dtype": "float32" if name == "logits" else dtype}
               for name, dims in spec.outputs.items()}
    return {"file": file, "inputs": inputs, "outputs": outputs}


@contextlib.contextmanager
def _quiet(logger_name: str):
    logger = logging.getLogger(logger_name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _export_graph(module, args, names, outputs, dynamic_shapes, path: Path, opset: int, attention: str) -> None:
    import torch

    table = None
    if attention == "plugin":
        from jetspec_trt.plugins.onnx_op import onnx_translation

        table = onnx_translation()
    weight_bytes = sum(p.numel() * p.element_size() for p in module.parameters())
    try:
        # The exporter prints progress lines and warns about optional packages; keep the command's output clean.
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings(), _quiet("torch.onnx"):
            warnings.simplefilter("ignore")
            program = torch.onnx.export(module, args, dynamo=True, input_names=names, output_names=outputs,
                                        dynamic_shapes=dynamic_shapes, opset_version=opset,
                                        custom_translation_table=table, optimize=True, verbose=False)
    except Exception as err:  # the exporter's errors are pages long; the first line names the failing node
        first = next((line for line in str(err).splitlines() if line.strip()), type(err).__name__)
        raise JetSpecError(f"ONNX export of the {path.stem} graph failed: {first}") from err
    program.save(str(path), external_data=weight_bytes >= EXTERNAL_DATA_BYTES)


def _sample_kv(num_layers: int, num_kv_heads: int, head_dim: int, past: int, dtype):
    import torch

    return tuple(torch.zeros(1, num_kv_heads, past, head_dim, dtype=dtype) for _ in range(2 * num_layers))


def export_graphs(target, draft, runtime, output: Path, attention: str, opset: int, dtype_name: str) -> dict:
    """Export both graphs of a loaded pair into `output`; returns their descriptions (onnx_config's `graphs`)."""
    import torch

    from jetspec_trt.export.onnx_graphs import DraftGraph, TargetVerifyGraph, draft_spec, target_spec
    from jetspec_trt.plugins.tree_attention import causal_mask

    dim = torch.export.Dim
    dtype = target.embed_tokens.weight.dtype
    cfg, dcfg = target.config, draft.config
    big = 1 << 20
    # Sample sizes >= 2 everywhere: torch.export specialises dimensions of size 0 and 1.
    tokens, past, words = dim("tokens", min=1, max=big), dim("past", min=0, max=big), dim("mask_words", min=1, max=big)
    t_spec = target_spec(target, len(runtime.target_layer_ids), dtype_name)
    t_args = (torch.arange(5) % cfg.vocab_size, torch.arange(7, 12), causal_mask(5),
              *_sample_kv(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, 7, dtype))
    t_shapes = ({0: tokens}, {0: tokens}, {0: tokens, 1: words}, tuple({2: past} for _ in range(2 * cfg.num_layers)))
    t_graph = TargetVerifyGraph(target, tuple(runtime.target_layer_ids), attention).eval()
    _export_graph(t_graph, t_args, list(t_spec.inputs), list(t_spec.outputs), t_shapes, output / "target.onnx",
                  opset, attention)

    context, block = dim("context", min=1, max=big), dim("block", min=2, max=big)
    d_spec = draft_spec(draft, cfg.vocab_size, dtype_name)
    features = d_spec.inputs["hidden_states"][1]
    block_size = max(runtime.block_size, 3)
    d_args = (torch.zeros(3, features, dtype=dtype), torch.arange(7, 10),
              torch.full((block_size,), runtime.mask_token_id), torch.arange(10, 10 + block_size),
              causal_mask(block_size), *_sample_kv(dcfg.num_layers, dcfg.num_kv_heads, dcfg.head_dim, 7, dtype))
    d_shapes = ({0: context}, {0: context}, {0: block}, {0: block}, {0: block, 1: words},
                tuple({2: past} for _ in range(2 * dcfg.num_layers)))
    d_graph = DraftGraph(draft, target.embed_tokens, target.lm_head, attention).eval()
    _export_graph(d_graph, d_args, list(d_spec.inputs), list(d_spec.outputs), d_shapes, output / "draft.onnx",
                  opset, attention)
    return {"target": graph_description(t_spec, "target.onnx", dtype_name),
            "draft": graph_description(d_spec, "draft.onnx", dtype_name)}


def _check_graphs(output: Path) -> None:
    import onnx

    from jetspec_trt.plugins.onnx_op import register_schema

    register_schema()
    for name in ("target.onnx", "draft.onnx"):
        try:
            onnx.checker.check_model(str(output / name))  # by path: works past 2 GiB
        except onnx.checker.ValidationError as err:
            raise JetSpecError(f"{name}: onnx.checker rejects the exported graph: {str(err).splitlines()[0]}") from err


def export_onnx(cfg: OnnxExportConfig, command: list[str] | None = None) -> Path:
    """Write the ONNX export of an engine; returns its path. Raises JetSpecError on bad input."""
    from jetspec_trt.export.triton import check_engine_dir
    from jetspec_trt.staging import staged_directory

    runtime = check_engine_dir(cfg.engine_dir)
    from jetspec_trt.models.fp8 import read_fp8_format

    if read_fp8_format(Path(cfg.engine_dir) / "target") is not None:
        # the graphs would hold the dequantized weights: an unquantized model under an FP8 engine's name
        raise JetSpecError(f"{cfg.engine_dir} has an FP8 target; ONNX export supports unquantized engines only")
    if cfg.attention not in ("standard", "plugin"):
        raise JetSpecError(f"--attention must be standard or plugin, got {cfg.attention!r}")
    if cfg.opset not in OPSETS:
        raise JetSpecError(f"--opset must be in {OPSETS.start}..{OPSETS.stop - 1}, got {cfg.opset}")
    if cfg.dtype not in DTYPE_CHOICES:
        raise JetSpecError(f"--dtype must be one of {', '.join(DTYPE_CHOICES)}, got {cfg.dtype!r}")
    if Path(cfg.output).exists() and not cfg.overwrite:
        raise JetSpecError(f"{cfg.output} already exists (pass --overwrite to replace it)")
    require_onnx()
    import torch

    from jetspec_trt.dtypes import parse_dtype
    from jetspec_trt.models.checkpoint import load_draft, load_target

    engine_dir = Path(cfg.engine_dir)
    dtype_name = runtime.dtype if cfg.dtype == "engine" else cfg.dtype
    dtype = parse_dtype(dtype_name)
    target = load_target(engine_dir / "target", dtype)
    draft = load_draft(engine_dir / "draft", dtype)
    with staged_directory(cfg.output, cfg.overwrite) as staging, torch.no_grad():
        graphs = export_graphs(target, draft, runtime, staging, cfg.attention, cfg.opset, dtype_name)
        _check_graphs(staging)
        shutil.copyfile(engine_dir / "runtime_config.json", staging / "runtime_config.json")
        (staging / TOKENIZER_DIR).mkdir()
        for item in sorted((engine_dir / "target").iterdir()):
            if item.is_file() and item.suffix != ".safetensors" and not item.name.endswith(".index.json"):
                shutil.copy2(item, staging / TOKENIZER_DIR / item.name)
        tcfg, dcfg = target.config, draft.config
        config = {
            "format": "jetspec-trt-onnx",
            "format_version": FORMAT_VERSION,
            "attention": cfg.attention,
            "opset": cfg.opset,
            "dtype": dtype_name,
            "kv_layout": "contiguous: per layer past_key_{i}/past_value_{i} [1, num_kv_heads, past, head_dim] in, "
                         "present_key_{i}/present_value_{i} [1, num_kv_heads, past + new, head_dim] out",
            "graphs": graphs,
            "target": {"num_layers": tcfg.num_layers, "num_kv_heads": tcfg.num_kv_heads, "head_dim": tcfg.head_dim,
                       "hidden_size": tcfg.hidden_size, "vocab_size": tcfg.vocab_size},
            "draft": {"num_layers": dcfg.num_layers, "num_kv_heads": dcfg.num_kv_heads, "head_dim": dcfg.head_dim,
                      "hidden_size": dcfg.hidden_size},
            "jetspec_config": jetspec_config(runtime),
            "source_engine": str(engine_dir.resolve()),
            "versions": library_versions("jetspec_trt", "torch", "onnx", "onnxscript"),
            "command": command or [],
        }
        if cfg.attention == "plugin":
            from jetspec_trt.plugins import onnx_op

            config["custom_op"] = {"domain": onnx_op.DOMAIN, "op_type": onnx_op.OP_TYPE, "version": onnx_op.VERSION,
                                   "tensorrt_plugin": onnx_op.PLUGIN_ID,
                                   "inputs": ["query", "key", "value", "ctx_len", "tree_mask"],
                                   "attributes": {"scale": "float", "plugin_namespace": "string",
                                                  "plugin_version": "string"},
                                   "contract": "jetspec_trt/plugins/onnx_op.py"}
        (staging / ONNX_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return Path(cfg.output)


def read_onnx_config(onnx_dir: Path) -> dict:
    path = Path(onnx_dir) / ONNX_CONFIG
    if not path.is_file():
        raise JetSpecError(f"{onnx_dir}: no {ONNX_CONFIG} (not an ONNX export; run `jetspec-trt export onnx`)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise JetSpecError(f"{path}: not valid JSON ({err.msg} at line {err.lineno})") from err


@click.command("onnx")
@click.argument("engine_dir", type=click.Path(path_type=Path))
@click.option("--output", required=True, type=click.Path(path_type=Path), help="Output directory.")
@click.option("--opset", type=int, default=DEFAULT_OPSET, show_default=True, help="ONNX opset (18..23).")
@click.option("--attention", type=click.Choice(["standard", "plugin"]), default="standard", show_default=True,
              help="standard: ONNX ops only (onnxruntime); plugin: one jetspec_trt.TreeAttention node per layer.")
@click.option("--dtype", type=click.Choice(DTYPE_CHOICES), default="engine", show_default=True,
              help="Weights and activations (engine: the engine's dtype).")
@click.option("--overwrite", is_flag=True, help="Replace an existing output directory.")
def onnx_command(engine_dir, output, opset, attention, dtype, overwrite):
    """Export the target's verify graph and the draft head's graph of ENGINE_DIR to ONNX."""
    out = export_onnx(OnnxExportConfig(engine_dir, output, attention, opset, dtype, overwrite), command=sys.argv)
    click.echo(f"ONNX graphs written to {out} (target.onnx, draft.onnx; attention {attention}, opset {opset})")
