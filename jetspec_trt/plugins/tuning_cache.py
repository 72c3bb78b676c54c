"""Tuned tree-attention launch configs, cached per GPU model in an engine directory (`kernels/tuning.json`).

The best launch shape depends on the GPU (SM count, shared memory, bandwidth) and on the problem's shapes, never on
the context length (CUDA graphs replay one launch at every length). `jetspec-trt build` times a few configs for the
shapes the engine runs (jetspec_trt/builders/kernel_tuning.py) and writes them here, keyed by
`torch.cuda.get_device_name()`, so an engine copied to another GPU model finds no entry and uses `default_launch`,
rather than a config tuned for different hardware. The file is plain JSON:

    {"format_version": 1,
     "gpus": {"NVIDIA H100 80GB HBM3": {"torch": ..., "triton": ..., "tuned_at": ..., "seconds": 12.3,
                                         "entries": [{"role": "verify", "key": {tokens, num_heads, num_kv_heads,
                                                      head_dim, page_size, dtype}, "launch": {...},
                                                      "default": {...}, "contexts": [512, 2048, 4096],
                                                      "us": [...], "default_us": [...]}, ...]}}}
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from jetspec_trt.errors import JetSpecError
from jetspec_trt.plugins.triton_tree_attention import LaunchConfig, LaunchKey

TUNING_FILE = Path("kernels") / "tuning.json"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class TunedLaunch:
    role: str  # which call of the engine: verify (target over the tree), decode (target, T=1), draft (head block)
    key: LaunchKey
    launch: LaunchConfig  # the chosen config (the default when nothing beat it)
    default: LaunchConfig  # default_launch for the same shapes on this GPU, for comparison
    contexts: tuple[int, ...]  # committed context lengths timed
    us: tuple[float, ...]  # median microseconds of `launch` at each context
    default_us: tuple[float, ...]  # the same for `default`

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict) -> "TunedLaunch":
        return cls(raw["role"], LaunchKey(**raw["key"]), LaunchConfig(**raw["launch"]), LaunchConfig(**raw["default"]),
                   tuple(raw["contexts"]), tuple(raw["us"]), tuple(raw["default_us"]))


@dataclass(frozen=True)
class GpuTuning:
    gpu: str  # torch.cuda.get_device_name()
    entries: tuple[TunedLaunch, ...]
    versions: dict = field(default_factory=dict)  # torch / triton the timings were taken with
    tuned_at: str = ""
    seconds: float = 0.0  # wall time the tuning took

    def launches(self) -> dict[LaunchKey, LaunchConfig]:
        return {entry.key: entry.launch for entry in self.entries}

    def to_dict(self) -> dict:
        return {"versions": self.versions, "tuned_at": self.tuned_at, "seconds": round(self.seconds, 2),
                "entries": [e.to_dict() for e in self.entries]}

    @classmethod
    def from_dict(cls, gpu: str, raw: dict) -> "GpuTuning":
        return cls(gpu, tuple(TunedLaunch.from_dict(e) for e in raw.get("entries", [])), dict(raw.get("versions", {})),
                   raw.get("tuned_at", ""), float(raw.get("seconds", 0.0)))


@dataclass(frozen=True)
class TuningCache:
    gpus: dict[str, GpuTuning] = field(default_factory=dict)

    def for_gpu(self, name: str) -> GpuTuning | None:
        return self.gpus.get(name)

    def with_gpu(self, tuning: GpuTuning) -> "TuningCache":
        """A copy with `tuning` added (replacing an older entry for the same GPU model)."""
        return TuningCache({**self.gpus, tuning.gpu: tuning})

    def save(self, engine_dir: Path) -> Path:
        path = Path(engine_dir) / TUNING_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        raw = {"format_version": FORMAT_VERSION, "gpus": {name: t.to_dict() for name, t in sorted(self.gpus.items())}}
        path.write_text(json.dumps(raw, indent=2) + "\n")
        return path

    @classmethod
    def load(cls, engine_dir: Path) -> "TuningCache":
        """The engine's cache; empty if it has none (built without CUDA, or with --no-tune)."""
        path = Path(engine_dir) / TUNING_FILE
        if not path.is_file():
            return cls()
        try:
            raw = json.loads(path.read_text())
            if raw.get("format_version") != FORMAT_VERSION:
                raise ValueError(f"format_version {raw.get('format_version')!r}, expected {FORMAT_VERSION}")
            return cls({name: GpuTuning.from_dict(name, entry) for name, entry in raw["gpus"].items()})
        except (ValueError, KeyError, TypeError) as err:
            raise JetSpecError(f"{path}: unreadable kernel tuning cache ({err}); rebuild the engine or delete it")\
                from None


@dataclass(frozen=True)
class LaunchChoice:
    """What an engine uses on this GPU: tuned launches (possibly none) and a line that says which and why."""

    launches: dict[LaunchKey, LaunchConfig]
    summary: str


def choose_launches(engine_dir: Path, gpu: str) -> LaunchChoice:
    """The tuned launches of `engine_dir` for `gpu`, or none (default_launch) with the reason. A damaged cache
    only costs speed, so it falls back too instead of refusing to load the engine."""
    try:
        cache = TuningCache.load(engine_dir)
    except JetSpecError as err:
        return LaunchChoice({}, f"default_launch: {err}")
    tuning = cache.for_gpu(gpu)
    if tuning is not None:
        return LaunchChoice(tuning.launches(), f"tuned launches for {gpu} ({len(tuning.entries)} shapes, {TUNING_FILE})")
    if not cache.gpus:
        return LaunchChoice({}, f"default_launch: the engine has no {TUNING_FILE} (built without CUDA or with "
                                "--no-tune)")
    return LaunchChoice({}, f"default_launch: {TUNING_FILE} has no entry for {gpu} (tuned on: "
                            f"{', '.join(sorted(cache.gpus))}); rebuild the engine on this GPU to tune it")
