"""The built-in default: a tiny Qwen3-architecture pair made on the spot, built, and run. No download."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

from jetspec_trt.builders.engine_builder import BuildConfig, build_engine
from jetspec_trt.models.presets import write_random_pair
from jetspec_trt.runtime.config import TreeConfig

QUICKSTART_PROMPT = "def fibonacci(n):"


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
