"""`jetspec-trt build`: target + draft checkpoints -> engine directory, written atomically.

Layout of an engine directory:
    manifest.json         versions, source checkpoint hashes, dtype, weight layout, kernel tuning, date, the command
    runtime_config.json   tree budget/top-k/depth, block size, mask token, target layers, EOS, max_seq_len
    target/               the target's config, tokenizer and weights in the engine dtype, in the fused layout
                          (models/fused_layout.py: one qkv_proj and one gate_up_proj tensor per layer, every other
                          tensor under its Hugging Face name); Hugging Face's own layout with --no-fuse. An FP8
                          target (--quantize fp8, or a source checkpoint already in FP8) is stored in the Hugging
                          Face FP8 layout that TensorRT-LLM and vLLM read (models/fp8.py), never fused: fusing FP8
                          parts means requantizing them to one scale, which the loader does on the GPU
    draft/                the draft head in the published JetSpec (DFlash-format) layout, converted likewise
    kernels/tuning.json   tree-attention launch configs timed on the build machine's GPU, keyed by GPU model
                          (only where the build ran with CUDA; see builders/kernel_tuning.py)
    cost_model.json       the scheduler's pass times on the build device, for its per-step tree budget
                          (runtime/cost_model.py; not with --no-cost-model)
Everything is written into a hidden temp directory beside the output and renamed into place at the end, so a
failed build leaves nothing behind.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from jetspec_trt.builders.kernel_tuning import tune_engine_kernels
from jetspec_trt.builders.quantize import QuantizeConfig, quantize_target
from jetspec_trt.builders.validate import CheckedPair, check_pair
from jetspec_trt.dtypes import parse_dtype
from jetspec_trt.errors import JetSpecError
from jetspec_trt.models.checkpoint import SHARD_INDEX, weight_files
from jetspec_trt.models.draft_vocab import (DEFAULT_DRAFT_VOCAB, TOKEN_COUNTS, most_frequent, read_token_counts,
                                            write_draft_vocab)
from jetspec_trt.models.fused_layout import LAYOUT_DESCRIPTION, fuse_plan, is_fused
from jetspec_trt.models.weights import keep_plan, write_weights
from jetspec_trt.runtime.config import DEFAULT_TREE, RUNTIME_CONFIG, RuntimeConfig, TreeConfig
from jetspec_trt.runtime.cost_model import COST_MODEL
from jetspec_trt.staging import check_output, staged_directory
from jetspec_trt.versions import library_versions

MANIFEST = "manifest.json"
FORMAT_VERSION = 2  # 2: fused weight layout (older readers would not find the q/k/v and gate/up tensors)
MANIFEST_VERSIONS = ("jetspec_trt", "torch", "transformers", "python")  # what a manifest's "versions" records


@dataclass(frozen=True)
class BuildConfig:
    target_dir: Path
    draft_dir: Path
    output_dir: Path
    tree: TreeConfig = DEFAULT_TREE
    dtype: str = "bfloat16"
    max_seq_len: int | None = None  # None: min(4096, the target's max_position_embeddings)
    page_size: int = 64
    overwrite: bool = False
    progress: bool = True
    fuse: bool = True  # store q/k/v and gate/up pre-fused (False: the Hugging Face layout, as the source has it)
    tune: bool = True  # time tree-attention launch configs on this machine's GPU (skipped without CUDA)
    decode_gemv: bool = True  # CUDA AR step: single-token GEMMs through plugins.gemv (False: cuBLAS)
    compile_graphs: bool = True  # CUDA: torch.compile layers and tree/accept stages inside the graphs
    tree_kernel: bool = True  # CUDA: the round's tree stage on the Triton tree kernels (plugins.triton_tree_build)
    small_m_gemm: bool = False  # CUDA: 2..64-row GEMMs (verify, draft block) through plugins.skinny_gemm
    gated_gemv: bool = False  # CUDA AR step: the MLP's activation inside the down projection's GEMV
    gemv_pdl_prefetch: int = 0  # CUDA (sm_90+) AR step: > 0 GEMVs as programmatic dependents, W columns prefetched
    prefill_graphs: bool = True  # CUDA: prompt-length buckets' prefills as CUDA graphs captured at load
    fused_layer_kernels: bool = True  # the layers' small ops as plugins.layer_kernels' fused kernels (CUDA)
    fused_accept: bool = True  # CUDA: the round's accept stage as plugins.triton_accept's kernels
    # The draft proposes from this many most frequent tokens (models/draft_vocab.py); 0: all; None: DEFAULT_DRAFT_VOCAB
    # where token counts exist (the head's token_counts.json or draft_vocab_counts) and the vocabulary is larger.
    draft_vocab: int | None = None
    draft_vocab_counts: Path | None = None  # their counts; None: the draft directory's token_counts.json
    quantize: QuantizeConfig | None = None  # quantize the target (FP8 through nvidia-modelopt); None: as it is
    cost_model_device: str | None = "auto"  # where to time the scheduler's passes; auto: cuda if any; None: skip


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 24), b""):
            digest.update(chunk)
    return digest.hexdigest()


def source_hashes(src: Path) -> dict[str, str]:
    """sha256 of a checkpoint's files: config/tokenizer files and weight shards."""
    hashes = {item.name: sha256_of(item) for item in sorted(src.iterdir())
              if item.is_file() and item.suffix != ".safetensors" and item.name != SHARD_INDEX}
    return hashes | {shard.name: sha256_of(shard) for shard in weight_files(src)}


def _convert_checkpoint(src: Path, dst: Path, dtype: torch.dtype, fuse: bool, progress: bool,
                        label: str) -> list[str]:
    """Copy config/tokenizer files and write the weights cast to `dtype` (FP8 weights and scales keep theirs),
    fused unless `fuse` is False. Returns the written tensor names."""
    dst.mkdir(parents=True)
    for item in sorted(src.iterdir()):
        if item.is_file() and item.suffix != ".safetensors" and item.name != SHARD_INDEX:
            shutil.copy2(item, dst / item.name)
    return write_weights(src, dst, fuse_plan if fuse else keep_plan, dtype, progress, label)


def runtime_config_for(pair: CheckedPair, cfg: BuildConfig, draft_vocab: int = 0) -> RuntimeConfig:
    cfg.tree.validate(pair.spec.block_size)
    max_positions = pair.target.max_position_embeddings
    max_seq_len = cfg.max_seq_len if cfg.max_seq_len is not None else min(4096, max_positions)
    if not 2 <= max_seq_len <= max_positions:
        raise JetSpecError(f"max_seq_len {max_seq_len} must be in 2..{max_positions} (the target's max_position_embeddings)")
    prefetch = cfg.gemv_pdl_prefetch
    if prefetch and (prefetch < 64 or prefetch & (prefetch - 1)):  # the kernel prefetches whole 64-column lines
        raise JetSpecError(f"--gemv-pdl {prefetch}: give 0 (off) or a power of two of at least 64 columns")
    return RuntimeConfig(
        tree=cfg.tree,
        dtype=cfg.dtype,
        max_seq_len=max_seq_len,
        block_size=pair.spec.block_size,
        mask_token_id=pair.spec.mask_token_id,
        target_layer_ids=pair.spec.target_layer_ids,
        eos_token_ids=pair.eos_token_ids,
        page_size=cfg.page_size,
        decode_gemv=cfg.decode_gemv,
        compile_graphs=cfg.compile_graphs,
        tree_kernel=cfg.tree_kernel,
        small_m_gemm=cfg.small_m_gemm,
        gated_gemv=cfg.gated_gemv,
        gemv_pdl_prefetch=cfg.gemv_pdl_prefetch,
        prefill_graphs=cfg.prefill_graphs,
        fused_layer_kernels=cfg.fused_layer_kernels,
        fused_accept=cfg.fused_accept,
        draft_vocab=draft_vocab,
    )


def choose_draft_vocab(pair: CheckedPair, cfg: BuildConfig) -> tuple[list[int], float, Path] | None:
    """The draft vocabulary's token ids, their coverage of the counted tokens and the counts file (None: the whole
    vocabulary); checked before any work: counts present, size within the vocabulary and no smaller than the
    tree's width. Left unset (None), it is DEFAULT_DRAFT_VOCAB where counts exist and the vocabulary is larger."""
    source = Path(cfg.draft_vocab_counts or Path(cfg.draft_dir) / TOKEN_COUNTS)
    size = cfg.draft_vocab
    if size is None:
        size = DEFAULT_DRAFT_VOCAB if source.is_file() and pair.target.vocab_size > DEFAULT_DRAFT_VOCAB else 0
    if not size:
        return None
    if size < cfg.tree.topk:
        raise JetSpecError(f"--draft-vocab {size} is below the tree width {cfg.tree.topk}")
    ids, coverage = most_frequent(read_token_counts(source), size, pair.target.vocab_size)
    return ids, coverage, source


def measure_engine_costs(engine_dir: Path, device: str | None) -> str | dict:
    """Time the staged engine's scheduler passes on `device` into cost_model.json; returns what the manifest
    records. As with kernel tuning, a failure does not fail the build (the model only steers speed): the engine
    then measures it where it first needs one (Engine.cost_model), and the manifest says why."""
    if device is None:
        return "skipped: --no-cost-model"
    from jetspec_trt.runtime.engine import Engine

    device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    try:
        model = Engine.load(engine_dir, device=device).measure_cost_model(save=True)
    except Exception as err:  # noqa: BLE001 - see the docstring
        warnings.warn(f"measuring the cost model failed: {type(err).__name__}: {err}")
        return f"skipped: measuring failed ({type(err).__name__}: {err})"
    return {"file": COST_MODEL, "device": model.device_name, "dtype": model.dtype,
            "verify_tokens": list(model.verify_tokens), "draft_sequences": list(model.draft_sequences)}


def build_engine(cfg: BuildConfig, command: list[str] | None = None) -> Path:
    """Check the pair, convert, and write the engine directory. Raises JetSpecError on bad input."""
    dtype = parse_dtype(cfg.dtype)
    output = Path(cfg.output_dir)
    check_output(output, cfg.overwrite)
    pair = check_pair(cfg.target_dir, cfg.draft_dir)
    draft_vocab = choose_draft_vocab(pair, cfg)
    runtime = runtime_config_for(pair, cfg, 0 if draft_vocab is None else len(draft_vocab[0]))
    if cfg.quantize is not None:
        cfg.quantize.validate()
        if pair.target_fp8 is not None:
            raise JetSpecError(f"{cfg.target_dir} is already quantized ({pair.target_fp8.describe()}); "
                               "build from it without --quantize")

    with staged_directory(output, cfg.overwrite) as staging:
        sources, written = {}, []
        quantization = None
        target_src = Path(cfg.target_dir)
        if cfg.quantize is not None:  # the FP8 export goes beside the engine's files, converted below, then removed
            target_src = staging / ".quantized-target"
            quantization = quantize_target(Path(cfg.target_dir), target_src, cfg.quantize, dtype)
        elif pair.target_fp8 is not None:
            quantization = {"method": "fp8", "format": pair.target_fp8.describe(), "source": "the target checkpoint"}
        for role, src, orig in (("target", target_src, Path(cfg.target_dir)),
                                ("draft", Path(cfg.draft_dir), Path(cfg.draft_dir))):
            fuse = cfg.fuse and not (role == "target" and quantization is not None)
            written += _convert_checkpoint(src, staging / role, dtype, fuse, cfg.progress, role)
            sources[role] = {"path": str(orig.resolve()), "sha256": source_hashes(orig)}
        if target_src != Path(cfg.target_dir):
            shutil.rmtree(target_src)
        (staging / RUNTIME_CONFIG).write_text(runtime.to_json())
        if draft_vocab is not None:
            write_draft_vocab(staging, *draft_vocab)
        kernel_tuning = tune_engine_kernels(staging, runtime, pair.target, pair.draft, cfg.tune, cfg.progress)
        cost_model = measure_engine_costs(staging, cfg.cost_model_device)
        manifest = {
            "format_version": FORMAT_VERSION,
            "backend": "pytorch",
            "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "dtype": cfg.dtype,
            "versions": library_versions(*MANIFEST_VERSIONS),
            "command": command or [],
            "target": {"model_type": pair.target.model_type, "num_layers": pair.target.num_layers,
                       "hidden_size": pair.target.hidden_size, "vocab_size": pair.target.vocab_size},
            "draft": {"num_layers": pair.draft.num_layers, "block_size": pair.spec.block_size,
                      "target_layer_ids": list(pair.spec.target_layer_ids)},
            # fused: each fused tensor is its parts' rows concatenated in the order listed (dim 0).
            "weights": ({"layout": "fused", "fused": LAYOUT_DESCRIPTION} if is_fused(written)
                        else {"layout": "hugging-face"}) | (
                {"target": "hugging-face (FP8: q/k/v and gate/up fused at load on the GPU)"} if quantization else {}),
            # The target's quantization and how it was made (modelopt recipe, calibration); null: unquantized.
            "quantization": quantization,
            # the draft's own vocabulary (draft_vocab.json); null: the target's whole vocabulary
            "draft_vocab": None if draft_vocab is None else {
                "size": len(draft_vocab[0]), "coverage": round(draft_vocab[1], 6), "counts": str(draft_vocab[2])},
            "kernel_tuning": kernel_tuning,
            "cost_model": cost_model,
            "sources": sources,
        }
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return output

