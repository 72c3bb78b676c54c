"""`jetspec-trt build --backend tensorrt`: target + draft checkpoints -> TensorRT engines (serialized plans).

    OUTPUT/
      target.plan            the target verify graph (prefill, decode step, tree verify), 2 optimisation profiles
      draft.plan             the draft head's graph (context append + block draft), 1 optimisation profile
      onnx_config.json       the plans' inputs and outputs (names, symbolic shapes, dtypes): the ONNX graphs'
      runtime_config.json    the engine's runtime config; `extras` adds backend, attention, plan files, the
                             optimisation profiles and `jetspec_config` (TensorRT Edge-LLM's keys)
      manifest.json          versions (TensorRT included), sources, dtype, plan sha256s, the command
      tokenizer/             the target's tokenizer and configs

The pair goes through the same checks as the PyTorch build, then the PyTorch engine directory and the ONNX
export are made in a scratch directory beside OUTPUT (removed afterwards), and TensorRT builds each plan from
its ONNX graph (trt.OnnxParser, strongly typed network: the ONNX dtypes are the engine's). With
`attention="plugin"` the tree attention of every layer is the `jetspec_trt::TreeAttention` plugin
(jetspec_trt/plugins/tensorrt_plugin.py, `tensorrt.plugin`, TensorRT >= 10.6), so running the plans needs that
module registered first (`tensorrt_plugin.register()`); with "standard" the attention is plain ONNX ops that
TensorRT fuses itself, and the plans need nothing of ours. `tensorrt` is imported lazily: without it the build
fails at once, before any check or write.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import math
import shutil
import tempfile
from pathlib import Path

from jetspec_trt.builders.engine_builder import (MANIFEST, MANIFEST_VERSIONS, BuildConfig, build_engine,
                                                runtime_config_for, sha256_of)
from jetspec_trt.builders.validate import check_pair
from jetspec_trt.errors import JetSpecError
from jetspec_trt.runtime.config import RUNTIME_CONFIG, RuntimeConfig
from jetspec_trt.versions import library_versions

TENSORRT_MISSING = ("TensorRT is not installed: pip install 'tensorrt>=10.6' (needs an NVIDIA GPU and CUDA 12 "
                    "driver), or build with --backend pytorch")
PLUGIN_MISSING = ("TensorRT {version} has no tensorrt.plugin (it needs TensorRT >= 10.6): "
                  "pip install -U 'tensorrt>=10.6', or build with --attention standard")
FORMAT_VERSION = 1
PLANS = ("target", "draft")
PREFILL_OPT_TOKENS = 512  # prefill profile's tuning point (clipped to max_seq_len)


def require_tensorrt(attention: str = "plugin"):
    """Import TensorRT (and tensorrt.plugin for the plugin build); a one-line JetSpecError where it is missing."""
    try:
        import tensorrt as trt
    except (ImportError, OSError):  # OSError: a wheel whose CUDA libraries cannot be loaded
        raise JetSpecError(TENSORRT_MISSING) from None
    if attention == "plugin":
        try:
            import tensorrt.plugin  # noqa: F401
        except (ImportError, OSError):
            raise JetSpecError(PLUGIN_MISSING.format(version=getattr(trt, "__version__", "?"))) from None
    return trt


def _ranges_for(graph: str, runtime: RuntimeConfig) -> list[tuple[str, dict[str, tuple[int, int, int]]]]:
    """(profile name, {axis: (min, opt, max)}) per optimisation profile of a graph."""
    seq, tree, block = runtime.max_seq_len, runtime.tree, runtime.block_size
    past = (0, seq // 2, seq)
    if graph == "target":
        verify = max(1, tree.budget)
        return [("verify", {"tokens": (1, verify, verify), "past": past}),
                ("prefill", {"tokens": (1, min(seq, PREFILL_OPT_TOKENS), seq), "past": (0, 0, seq)})]
    # A round appends the accepted path (<= max_depth + 1 tokens); the first round, the whole prompt.
    return [("draft", {"context": (1, min(seq, tree.max_depth + 1), seq), "block": (block, block, block),
                       "past": past})]


def optimization_profiles(graph: str, description: dict, runtime: RuntimeConfig) -> list[dict]:
    """The TensorRT optimisation profiles of one graph, from its onnx_config.json description:
    [{"name": ..., "shapes": {input: [min, opt, max]}}] with every shape a list of ints."""
    profiles = []
    for name, axes in _ranges_for(graph, runtime):
        shapes = {}
        for tensor, info in description["inputs"].items():
            dims = info["shape"]
            # The mask's word count follows the rows it packs: ceil(rows / 32).
            rows = axes.get(dims[0]) if tensor == "tree_mask" else None
            words = tuple(max(1, math.ceil(v / 32)) for v in rows) if rows else None
            triple = []
            for dim in dims:
                if isinstance(dim, int):
                    triple.append((dim, dim, dim))
                elif dim == "mask_words" and words:
                    triple.append(words)
                elif dim in axes:
                    triple.append(axes[dim])
                else:
                    raise JetSpecError(f"{graph} input {tensor}: no range for axis {dim!r}")
            shapes[tensor] = [[t[i] for t in triple] for i in range(3)]
        profiles.append({"name": name, "shapes": shapes})
    return profiles


def build_plan(trt, logger, onnx_path: Path, profiles: list[dict], workspace_bytes: int | None = None) -> bytes:
    """Parse one ONNX graph into a strongly typed network and build its serialized engine."""
    builder = trt.Builder(logger)
    strongly_typed = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    network = builder.create_network(1 << int(strongly_typed) if strongly_typed is not None else 0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):  # external weight files are read beside the graph
        errors = [parser.get_error(i) for i in range(parser.num_errors)]
        first = errors[0].desc() if errors else "unknown error"
        raise JetSpecError(f"TensorRT cannot parse {onnx_path.name}: {first}")
    config = builder.create_builder_config()
    if workspace_bytes:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_bytes))
    for spec in profiles:
        profile = builder.create_optimization_profile()
        for tensor, (low, opt, high) in spec["shapes"].items():
            profile.set_shape(tensor, tuple(low), tuple(opt), tuple(high))
        config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise JetSpecError(f"TensorRT could not build an engine from {onnx_path.name} (see its log above)")
    return bytes(serialized)


def build_tensorrt_engine(cfg: BuildConfig, attention: str = "plugin", command: list[str] | None = None,
                          workspace_bytes: int | None = None) -> Path:
    """Check the pair, export ONNX, build the plans and write OUTPUT atomically. Raises JetSpecError."""
    trt = require_tensorrt(attention)  # first: without TensorRT nothing is checked, converted or written
    from jetspec_trt.export.onnx import OnnxExportConfig, export_onnx, read_onnx_config, require_onnx
    from jetspec_trt.staging import check_output, staged_directory

    output = Path(cfg.output_dir)
    check_output(output, cfg.overwrite)
    if attention not in ("plugin", "standard"):
        raise JetSpecError(f"--attention must be plugin or standard, got {attention!r}")
    pair = check_pair(cfg.target_dir, cfg.draft_dir)  # the PyTorch build's checks, before any work
    if cfg.quantize is not None or pair.target_fp8 is not None:
        raise JetSpecError("TensorRT engines are built unquantized; FP8 targets run on the PyTorch backend")
    runtime_config_for(pair, cfg)
    require_onnx()

    output.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{output.name}.scratch-", dir=output.parent))
    try:
        with staged_directory(output, cfg.overwrite) as staging:
            # No kernel tuning (the plans run TensorRT's attention or our plugin, not the Triton kernel) and no
            # cost model (the plans do not run the scheduler).
            engine_dir = build_engine(dataclasses.replace(cfg, output_dir=scratch / "engine", overwrite=False,
                                                          tune=False, cost_model_device=None), command)
            onnx_dir = export_onnx(OnnxExportConfig(engine_dir, scratch / "onnx", attention))
            onnx_config = read_onnx_config(onnx_dir)
            runtime = RuntimeConfig.load(engine_dir)
            if attention == "plugin":
                from jetspec_trt.plugins.tensorrt_plugin import register

                register()
            logger = trt.Logger(trt.Logger.WARNING)
            profiles, plans = {}, {}
            for graph in PLANS:
                description = onnx_config["graphs"][graph]
                profiles[graph] = optimization_profiles(graph, description, runtime)
                plan = build_plan(trt, logger, onnx_dir / description["file"], profiles[graph], workspace_bytes)
                (staging / f"{graph}.plan").write_bytes(plan)
                plans[graph] = f"{graph}.plan"
            shutil.copytree(onnx_dir / "tokenizer", staging / "tokenizer")
            shutil.copyfile(onnx_dir / "onnx_config.json", staging / "onnx_config.json")
            extras = dict(runtime.extras) | {
                "backend": "tensorrt",
                "attention": attention,
                "plans": plans,
                "profiles": {g: [p["name"] for p in ps] for g, ps in profiles.items()},
                "jetspec_config": onnx_config["jetspec_config"],
            }
            (staging / RUNTIME_CONFIG).write_text(dataclasses.replace(runtime, extras=extras).to_json())
            source_manifest = json.loads((engine_dir / MANIFEST).read_text())
            manifest = {
                "format_version": FORMAT_VERSION,
                "backend": "tensorrt",
                "attention": attention,
                "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                "dtype": cfg.dtype,
                "versions": library_versions(*MANIFEST_VERSIONS) | {"tensorrt": trt.__version__},
                "command": command or [],
                "target": source_manifest["target"],
                "draft": source_manifest["draft"],
                "sources": source_manifest["sources"],
                "plans": {g: {"file": f, "sha256": sha256_of(staging / f)} for g, f in plans.items()},
                "profiles": profiles,
                "plugin": ({"name": "jetspec_trt::TreeAttention", "implementation": "tensorrt.plugin @trtp.impl "
                            "(Python; register jetspec_trt.plugins.tensorrt_plugin before deserialising)"}
                           if attention == "plugin" else None),
            }
            (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return output
