"""Which device timings belong to, and where they end: shared by the benches, the cost model and training cards."""

from __future__ import annotations

import platform

import torch


def sync(device: str | torch.device) -> None:
    """Wait for the device's queued work (timings end here)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def device_name(device: str | torch.device) -> str:
    """The device that times belong to: the GPU's name, or the CPU's model and torch's thread count."""
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name(torch.device(device))
    name = ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        pass
    name = name or platform.processor() or platform.machine() or "cpu"
    return f"{name} ({torch.get_num_threads()} threads)"
