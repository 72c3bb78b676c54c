"""`--profile-steps N`: where a training step's time goes, for the next GPU lease to act on.

The run's first WARMUP_STEPS training steps go untraced (they carry one-off costs: allocator growth, kernel
caches, lazy inits), the next N run under torch.profiler; all of them are ordinary training steps. Every step of
the window is timed with the device synchronised before and after, and each phase of Trainer.train_step (its
`record_function` ranges) is timed too: with CUDA events on a GPU (they time the device's timeline without
making the host wait, and see the backward pass, which autograd runs on its own thread, outside the range's
profiler tree), with the host clock on the CPU, where every op is synchronous. OUTPUT/profile_steps.json gets:

    step_s, mean_step_s       the profiled steps, synchronised (profiler overhead included; serialised, so the host's
                              preparation of a step, which unprofiled training overlaps with the previous step's
                              device work, counts in full)
    warmup_step_s             the untraced steps before them, synchronised (the first includes one-off costs)
    phases                    per train_step range: seconds per step (device timeline on a GPU), host seconds
                              per step, and share of the step
    top_ops                   the TOP_OPS ops/kernels with the most self device time (self CPU time on the CPU)
"""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path

import torch
from tqdm import tqdm

PROFILE_FILE = "profile_steps.json"
WARMUP_STEPS = 2
TOP_OPS = 25
# Trainer.train_step's ranges, in order.
PHASES = ("rows", "head_forward", "loss", "backward", "optimizer", "loss_item")


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


class PhaseTimer:
    """Times named phases of the current step on the host clock and, on a GPU, on the device's timeline (CUDA
    events). A phase whose device time is about its host time kept the device waiting for the host (launch- or
    host-bound); one with more device than host time queued work the device was still running after it."""

    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")
        self.marks: list[tuple[str, float, object, object]] = []  # (phase, host s, start, end) of the current step
        self.totals: dict[str, float] = {}  # device seconds over the profiled steps (host seconds on the CPU)
        self.host_totals: dict[str, float] = {}  # host seconds over the profiled steps

    @contextlib.contextmanager
    def time(self, name: str):
        events = [torch.cuda.Event(enable_timing=True) for _ in range(2)] if self.cuda else [None, None]
        started = time.perf_counter()
        if self.cuda:
            events[0].record()
        yield
        if self.cuda:
            events[1].record()
        self.marks.append((name, time.perf_counter() - started, *events))

    def close_step(self, keep: bool) -> None:
        """Add the step's phases to the totals (the device is synchronised: the events have completed)."""
        for name, host_s, start, end in self.marks if keep else []:
            seconds = start.elapsed_time(end) / 1e3 if self.cuda else host_s
            self.totals[name] = self.totals.get(name, 0.0) + seconds
            self.host_totals[name] = self.host_totals.get(name, 0.0) + host_s
        self.marks.clear()


class StepProfiler:
    """Wraps the run's first WARMUP_STEPS + `steps` training steps (begin/end around each); writes the report
    once the window is over, or at finish() when the run ends inside it."""

    def __init__(self, steps: int, device: str, path: Path, first_step: int):
        self.steps, self.device, self.path, self.first_step = steps, device, Path(path), first_step
        self.timer = PhaseTimer(device)
        self.seen = 0  # steps begun
        self.step_s: list[float] = []
        self.warmup_step_s: list[float] = []
        self.profiler: torch.profiler.profile | None = None
        self.done = False
        self._started = 0.0

    @property
    def profiling(self) -> bool:
        return WARMUP_STEPS <= self.seen < WARMUP_STEPS + self.steps

    def begin(self) -> None:
        if self.profiling and self.profiler is None:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if self.device.startswith("cuda"):
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self.profiler = torch.profiler.profile(activities=activities)
            self.profiler.__enter__()
        synchronize(self.device)
        self._started = time.perf_counter()

    def end(self) -> None:
        synchronize(self.device)
        seconds = time.perf_counter() - self._started
        self.timer.close_step(keep=self.profiling)
        (self.step_s if self.profiling else self.warmup_step_s).append(seconds)
        self.seen += 1
        if self.seen == WARMUP_STEPS + self.steps:
            self.finish()

    def finish(self) -> None:
        """Stop tracing and write the report (of the steps profiled so far); idempotent."""
        if self.done:
            return
        self.done = True
        if self.profiler is not None:
            self.profiler.__exit__(None, None, None)
        report = self.report()
        self.path.write_text(json.dumps(report, indent=2) + "\n")
        tqdm.write(format_report(report, self.path))

    def report(self) -> dict:
        profiled = max(1, len(self.step_s))
        mean = sum(self.step_s) / profiled
        on_device = self.device.startswith("cuda")
        phases = [{"name": name, "s_per_step": round(self.timer.totals[name] / profiled, 6),
                   "host_s_per_step": round(self.timer.host_totals[name] / profiled, 6),
                   "share": round(self.timer.totals[name] / profiled / max(mean, 1e-12), 4)}
                  for name in PHASES if name in self.timer.totals]
        top = []
        if self.profiler is not None:
            events = self.profiler.key_averages()
            key = "self_device_time_total" if on_device else "self_cpu_time_total"
            for event in sorted(events, key=lambda e: getattr(e, key), reverse=True)[:TOP_OPS]:
                top.append({"name": event.key, "calls_per_step": round(event.count / profiled, 2),
                            "self_device_ms_per_step": round(event.self_device_time_total / 1e3 / profiled, 4),
                            "self_cpu_ms_per_step": round(event.self_cpu_time_total / 1e3 / profiled, 4)})
        return {
            "device": self.device,
            "first_step": self.first_step + WARMUP_STEPS + 1,  # 1-based training step of the first profiled one
            "steps_profiled": len(self.step_s),
            "step_s": [round(s, 6) for s in self.step_s],
            "mean_step_s": round(mean, 6),
            "warmup_step_s": [round(s, 6) for s in self.warmup_step_s],
            "phase_timing": ("s_per_step: cuda events (device timeline); host_s_per_step: host clock" if on_device
                             else "host clock"),
            "phases": phases,
            "top_ops_by": "self device time" if on_device else "self CPU time",
            "top_ops": top,
        }


def format_report(report: dict, path: Path) -> str:
    lines = [f"profiled {report['steps_profiled']} training steps from step {report['first_step']}: "
             f"{report['mean_step_s'] * 1e3:.2f} ms a step (synchronised, profiler on); written to {path}",
             f"{'phase':<14}{'ms/step':>10}{'host ms':>10}{'share':>8}"]
    lines += [f"{p['name']:<14}{p['s_per_step'] * 1e3:>10.3f}{p['host_s_per_step'] * 1e3:>10.3f}{p['share']:>8.1%}"
              for p in report["phases"]]
    device_sorted = report["top_ops_by"] == "self device time"
    lines.append(f"{'op / kernel (by ' + report['top_ops_by'] + ')':<72}{'ms/step':>10}{'calls':>8}")
    for op in report["top_ops"]:
        ms = op["self_device_ms_per_step"] if device_sorted else op["self_cpu_ms_per_step"]
        lines.append(f"{op['name'][:71]:<72}{ms:>10.3f}{op['calls_per_step']:>8g}")
    return "\n".join(lines)
