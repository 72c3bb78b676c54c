"""Kernel by kernel: where a graphed step's device time goes (the engine bench's `--profile`).

The engine bench times the AR step and each round stage as a whole (CUDA events). At the 0.5B shape those are
launch-bound chains of hundreds of small kernels, so the question for a faster round is which kernels, how many,
and how much of the stage is no kernel at all (the gaps between back-to-back kernels of a graph). torch.profiler
(CUPTI) records the kernels a CUDA graph replay runs; each replay is profiled alone, after its untimed `before()`
(the earlier stages, which set its inputs), and the kernels are summed by name per replay.
"""

from __future__ import annotations

import statistics
from typing import Callable, Iterable

import torch

NAME_CHARS = 96  # kernel names (templated CUTLASS, Inductor's fused names) cut to this many characters


def summarize(replays: list[list[tuple[str, float]]], device_ms: float, top: int = 12) -> dict:
    """Per-replay kernel records [(name, microseconds)] -> one table: the median replay's kernel count and
    summed kernel time, the gaps (device_ms, the stage's event-timed median, less the kernel time; negative only
    through timing noise) and the `top` kernel names by time per replay (calls and microseconds per replay)."""
    if not replays or not any(replays):
        raise ValueError("the profiler recorded no kernels (a build of torch without CUPTI?)")
    kernel_ms = statistics.median(sum(us for _, us in kernels) for kernels in replays) / 1000
    by_name: dict[str, list[float]] = {}
    for kernels in replays:
        for name, us in kernels:
            by_name.setdefault(name[:NAME_CHARS], []).append(us)
    n = len(replays)
    rows = sorted(({"name": name, "calls": len(times) / n, "us": sum(times) / n} for name, times in by_name.items()),
                  key=lambda row: -row["us"])
    return {"device_ms": device_ms, "kernel_ms": kernel_ms, "gaps_ms": device_ms - kernel_ms,
            "kernels": statistics.median(len(kernels) for kernels in replays), "top": rows[:top]}


def profile_kernels(fn: Callable[[], None], before: Callable[[], None] | None = None,
                    reps: int = 5) -> list[list[tuple[str, float]]]:
    """The CUDA kernels of `reps` calls of fn (a graph replay or eager code), one profiler session each so that
    `before()` stays out of the records: [(kernel name, microseconds)] per call, in launch order."""
    from torch.profiler import ProfilerActivity, profile

    replays = []
    for _ in range(reps):
        if before is not None:
            before()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
        replays.append(list(_kernels(prof.events())))
    return replays


def _kernels(events: Iterable) -> Iterable[tuple[str, float]]:
    """The device-side kernel events (not memcpy/memset runtime calls on the host) of a profiler session, in order."""
    device = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
    for event in sorted(device, key=lambda e: e.time_range.start):
        yield event.name, event.time_range.elapsed_us()
