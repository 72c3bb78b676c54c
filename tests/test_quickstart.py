import os
import subprocess
import sys
from pathlib import Path

import pytest

from jetspec_trt.builders.engine_builder import BuildConfig
from jetspec_trt.models.pypi_weights import MODELS, is_complete
from jetspec_trt.models.presets import write_random_pair
from jetspec_trt.quickstart import DEFAULTS, REAL_TARGET, cached_engine, repo_head_dir, run_tree
from jetspec_trt.runtime.config import DEFAULT_TREE, TreeConfig
from tests.helpers import invoke_cli

REPO = Path(__file__).resolve().parents[1]
CONVERTED = REPO / ".cache" / "models" / REAL_TARGET  # where `quickstart` run from the repo root caches it


def test_quickstart_tiny_runs_and_is_lossless(tmp_path):
    done = subprocess.run([sys.executable, "-m", "jetspec_trt.cli", "quickstart", "--tiny", "--workdir", str(tmp_path),
                           "--max-new-tokens", "32"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "lossless check: IDENTICAL" in done.stderr
    assert "tau" in done.stderr


def test_quickstart_missing_head_is_one_line_error(tmp_path, capsys):
    code, out, err = invoke_cli(["quickstart", "--head", str(tmp_path / "no-head")], capsys)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("error: draft head not found") and "--head" in err
    assert out == ""


def test_quickstart_tiny_refuses_target_and_head(tmp_path, capsys):
    code, _, err = invoke_cli(["quickstart", "--tiny", "--head", str(tmp_path)], capsys)
    assert code == 2 and "--tiny" in err


def test_cuda_defaults_are_the_measured_lookup_tree():
    """On CUDA the quickstart, and `run` / the Engine API through the engine `build` writes by default, use budget
    64, width 16 and a 15-node context-lookup chain (the H200's best, runtime/config.py); the CPU its small
    tree with a 4-token chain (its best on the CPU, quickstart.py; the README's CPU quickstart output)."""
    assert DEFAULT_TREE == TreeConfig(budget=64, topk=16, max_depth=15, lookup=15)
    assert DEFAULTS["cuda"].tree == DEFAULT_TREE and DEFAULTS["cuda"].max_new_tokens == 256
    assert DEFAULTS["cpu"].tree == TreeConfig(12, 7, 4, lookup=4) and DEFAULTS["cpu"].max_new_tokens == 64
    assert BuildConfig(Path("t"), Path("d"), Path("e")).tree == DEFAULT_TREE


def test_run_tree_defaults_and_budget_bounds():
    built = TreeConfig(256, 7, 15)
    assert run_tree("cpu", None, built) == TreeConfig(12, 7, 4, lookup=4)
    assert run_tree("cuda", None, built) == TreeConfig(64, 16, 15, lookup=15)
    assert run_tree("cuda", 16, built) == TreeConfig(16, 16, 15, lookup=8)  # the chain: at most half a smaller budget
    assert run_tree("cuda", None, TreeConfig(64, 16, 7)) == TreeConfig(64, 16, 7, lookup=7)  # and the engine's depth
    assert run_tree("cuda", 1, built) == TreeConfig(1, 16, 1)  # autoregressive: no chain
    assert run_tree("cpu", 1, built) == TreeConfig(1, 7, 1)  # autoregressive
    assert run_tree("cpu", 3, built) == TreeConfig(3, 7, 2, lookup=1)  # no deeper than the budget can reach
    with pytest.raises(Exception, match="--budget must be in 1..256"):
        run_tree("cpu", 257, built)


def test_repo_head_is_committed():
    assert (repo_head_dir() / "config.json").is_file()


@pytest.mark.slow
@pytest.mark.skipif(not is_complete(MODELS[REAL_TARGET], CONVERTED), reason=f"no converted {REAL_TARGET} in .cache")
def test_quickstart_real_pair_streams_text_and_is_lossless():
    """The default path with the cached conversion (no download); builds the engine once into .cache/engines."""
    done = subprocess.run([sys.executable, "-m", "jetspec_trt.cli", "quickstart", "--max-new-tokens", "24",
                           "--device", "cpu"], capture_output=True, text=True, timeout=900, cwd=REPO)
    assert done.returncode == 0, done.stderr
    assert "def " in done.stdout  # readable code from the real model
    assert "lossless check: IDENTICAL" in done.stderr
    assert "tau" in done.stderr and "autoregressive:" in done.stderr


def test_cached_engine_is_reused_and_rebuilt_when_the_head_changes(tmp_path):
    write_random_pair("tiny", tmp_path / "target", tmp_path / "head", seed=0)
    cache = tmp_path / "engines"
    first, built = cached_engine(tmp_path / "target", tmp_path / "head", cache, progress=False)
    assert built and (first / "manifest.json").is_file()
    assert cached_engine(tmp_path / "target", tmp_path / "head", cache, progress=False) == (first, False)
    weights = tmp_path / "head" / "model.safetensors"
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))  # a retrained head
    second, built = cached_engine(tmp_path / "target", tmp_path / "head", cache, progress=False)
    assert built and second != first
    assert sorted(p.name for p in cache.iterdir()) == [second.name]  # the stale engine is gone
