"""The build step that tunes the tree-attention kernel for an engine's shapes and caches the result in it.

The engine's graphed calls are the ones worth tuning (their launch is fixed at capture): the target's decode step
(T=1), the target's tree verify (T = the tree's node count) and the draft head's block (T = block_size), each with
its own head counts, head_dim, page size and the engine dtype. Prefill (any T) keeps default_launch.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from jetspec_trt.models.config import DecoderConfig
from jetspec_trt.plugins.triton_tree_attention import LaunchKey
from jetspec_trt.plugins.tuning_cache import TUNING_FILE, TuningCache
from jetspec_trt.runtime.config import RuntimeConfig
from jetspec_trt.tree.tree_tensors import node_count

CONTEXTS = (512, 2048, 8192)  # clipped to the engine's max_seq_len


def engine_shapes(runtime: RuntimeConfig, target: DecoderConfig, draft: DecoderConfig) -> list[tuple[str, LaunchKey]]:
    """(role, shape) of every graphed tree-attention call the engine makes."""

    def key(tokens: int, cfg: DecoderConfig) -> LaunchKey:
        return LaunchKey(tokens, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, runtime.page_size, runtime.dtype)

    tree = runtime.tree
    shapes = [("decode", key(1, target))]
    if tree.budget > 1:  # budget 1 is autoregressive: no tree, no draft
        shapes += [("verify", key(node_count(tree.budget, tree.topk, tree.max_depth), target)),
                   ("draft", key(runtime.block_size, draft))]
    unique: dict[LaunchKey, str] = {}
    for role, k in shapes:
        unique.setdefault(k, role)
    return [(role, k) for k, role in unique.items()]


def tuning_contexts(runtime: RuntimeConfig) -> tuple[int, ...]:
    return tuple(sorted({min(c, runtime.max_seq_len) for c in CONTEXTS}))


def tune_engine_kernels(engine_dir: Path, runtime: RuntimeConfig, target: DecoderConfig, draft: DecoderConfig,
                        enabled: bool = True, progress: bool = False) -> str | dict:
    """Tune on this machine's GPU and write `kernels/tuning.json` into engine_dir (merged with entries for other GPU
    models already there). Returns what the manifest records: a summary, or why tuning was skipped. A failure
    does not fail the build (tuning only changes speed): the engine then runs default_launch, and says so."""
    if not enabled:
        return "skipped: --no-tune"
    if not torch.cuda.is_available():
        return "skipped: no CUDA"
    from jetspec_trt.plugins.triton_tree_attention import triton

    if triton is None:
        return "skipped: no Triton"
    from jetspec_trt.plugins.tree_attention_tuner import tune_launches

    try:
        tuning = tune_launches(engine_shapes(runtime, target, draft), tuning_contexts(runtime), progress=progress)
    except Exception as err:  # noqa: BLE001 - see the docstring
        warnings.warn(f"kernel tuning failed, the engine will use default launches: {type(err).__name__}: {err}")
        return f"skipped: tuning failed ({type(err).__name__}: {err})"
    TuningCache.load(engine_dir).with_gpu(tuning).save(engine_dir)
    return {"gpu": tuning.gpu, "file": str(TUNING_FILE), "seconds": round(tuning.seconds, 1),
            "beats_default": {e.role: e.launch != e.default for e in tuning.entries}}
