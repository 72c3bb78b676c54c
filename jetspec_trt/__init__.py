"""jetspec-trt: JetSpec causal parallel tree speculative decoding for Qwen3, built into a deployable engine."""

from jetspec_trt.errors import JetSpecError
from jetspec_trt.runtime.config import RuntimeConfig, TreeConfig
from jetspec_trt.tree.accept import SamplingConfig
from jetspec_trt.versions import __version__  # noqa: F401  (jetspec_trt.__version__)


def __getattr__(name: str):
    # Heavy imports (transformers) only when the API is used, so `import jetspec_trt` stays cheap.
    if name == "Engine":
        from jetspec_trt.runtime.engine import Engine

        return Engine
    if name in ("build_engine", "BuildConfig"):
        from jetspec_trt.builders import engine_builder

        return getattr(engine_builder, name)
    raise AttributeError(name)


__all__ = ["Engine", "BuildConfig", "build_engine", "JetSpecError", "RuntimeConfig", "SamplingConfig", "TreeConfig"]
