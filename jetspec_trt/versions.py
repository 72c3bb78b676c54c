"""Version strings: this package's own, and those of the libraries that manifests and reports record.

A leaf module (nothing but the standard library at import), so every layer can import it; the package's
`jetspec_trt.__version__` is the one defined here.
"""

from __future__ import annotations

import importlib
import platform

__version__ = "0.1.0"


def library_versions(*names: str) -> dict[str, str | None]:
    """{name: version} for `names`, in that order. A name is "jetspec_trt" (this package), "python", "cuda" (the
    CUDA torch was built with, None where no GPU is available), or an importable module with a `__version__`
    (torch, transformers, triton, onnx, ...), which is imported here."""
    versions: dict[str, str | None] = {}
    for name in names:
        if name == "jetspec_trt":
            versions[name] = __version__
        elif name == "python":
            versions[name] = platform.python_version()
        elif name == "cuda":
            import torch

            versions[name] = torch.version.cuda if torch.cuda.is_available() else None
        else:
            versions[name] = importlib.import_module(name).__version__
    return versions
