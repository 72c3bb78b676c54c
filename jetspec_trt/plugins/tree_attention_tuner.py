"""Times a few Triton tree-attention launch configs on this GPU and keeps the fastest per shape (CUDA only).

For each shape (plugins/tuning_cache.py's LaunchKey) it times default_launch and a handful of neighbours (split
count, pipeline depth, tile sizes) at a few committed context lengths, each call replayed from a CUDA graph, as the
engine runs it: an eager call at these sizes mostly measures the host launch path. A candidate replaces the default
only if its summed time over the contexts is at least MIN_GAIN lower (smaller differences are timing noise) and its
output matches the default's. One config must serve every context length (a graph replays one launch), hence the
sum. Timings are medians of triton.testing.do_bench (CUDA events, L2 flushed between repetitions).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import time

import torch
from tqdm import tqdm

from jetspec_trt.plugins.tree_attention import causal_mask, pack_mask
from jetspec_trt.plugins.triton_tree_attention import (LaunchConfig, LaunchKey, default_launch, tree_attention_triton,
                                                       triton)
from jetspec_trt.plugins.tuning_cache import GpuTuning, TunedLaunch
from jetspec_trt.versions import library_versions

MIN_GAIN = 0.03
TIME_BUDGET_S = 20.0  # no new candidate is tried past this (each costs a Triton compile, ~0.5-1 s): builds stay short
WARMUP_MS, REP_MS = 5, 20  # do_bench's budgets per (config, context): enough for a stable median of a ~10-100 us call


def candidates(key: LaunchKey) -> list[LaunchConfig]:
    """default_launch first, then neighbours that change one knob each (deduplicated, valid ones only)."""
    dtype = getattr(torch, key.dtype)
    base = default_launch(key.tokens, key.num_heads, key.num_kv_heads, key.head_dim, dtype)
    rows = key.tokens * (key.num_heads // key.num_kv_heads)
    options = [dict(splits=base.splits * 2), dict(splits=base.splits // 2), dict(stages=base.stages + 1),
               dict(stages=base.stages - 1), dict(block_n=128 if base.block_n == 64 else 64)]
    if rows > 16:  # tiles of more query rows only help when there are rows to fill them
        options.append(dict(block_m=32 if base.block_m == 64 else 64))

    out = [base]
    for change in options:
        cfg = dataclasses.replace(base, **change)
        valid = 1 <= cfg.splits <= 64 and cfg.stages >= 1 and cfg.block_n % 32 == 0
        if valid and cfg not in out:
            out.append(cfg)
    return out


@dataclasses.dataclass
class _Problem:
    """Random inputs of one shape, sized for the longest context; ctx_len is changed in place between timings."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    table: torch.Tensor
    ctx_len: torch.Tensor
    mask: torch.Tensor
    scale: float

    def run(self, launch: LaunchConfig) -> torch.Tensor:
        return tree_attention_triton(self.q, self.k, self.v, self.table, self.ctx_len, self.mask, self.scale, launch)


def _problem(key: LaunchKey, role: str, max_context: int, seed: int = 0) -> _Problem:
    g = torch.Generator().manual_seed(seed)
    dtype = getattr(torch, key.dtype)
    pages = -(-(max_context + key.tokens) // key.page_size) + 1
    shape = (pages, key.page_size, key.num_kv_heads, key.head_dim)
    k = torch.randn(shape, generator=g).to(dtype).cuda()
    v = torch.randn(shape, generator=g).to(dtype).cuda()
    table = torch.randperm(pages, generator=g).to(torch.int32).cuda()  # scattered pages, as after reuse
    q = torch.randn(key.tokens, key.num_heads, key.head_dim, generator=g).to(dtype).cuda()
    if role == "verify":  # a random tree whose parents precede their children
        dense = torch.zeros(key.tokens, key.tokens, dtype=torch.bool)
        for i in range(key.tokens):
            if i:
                dense[i] = dense[int(torch.randint(0, i, (1,), generator=g))]
            dense[i, i] = True
        mask = pack_mask(dense).cuda()
    else:
        mask = causal_mask(key.tokens, "cuda")
    ctx_len = torch.zeros(1, dtype=torch.int32, device="cuda")
    return _Problem(q, k, v, table, ctx_len, mask, key.head_dim**-0.5)


def capture_graph(fn) -> torch.cuda.CUDAGraph:
    """fn captured in a CUDA graph (compiled and warmed up on a side stream first); returns the replay."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph


def _time_us(problem: _Problem, launch: LaunchConfig, contexts: tuple[int, ...]) -> tuple[float, ...]:
    import triton.testing

    graph = capture_graph(lambda: problem.run(launch))
    times = []
    for ctx in contexts:
        problem.ctx_len.fill_(ctx)
        ms = triton.testing.do_bench(graph.replay, warmup=WARMUP_MS, rep=REP_MS, return_mode="median")
        times.append(round(ms * 1e3, 2))
    return tuple(times)


def _matches(problem: _Problem, launch: LaunchConfig, reference: torch.Tensor) -> bool:
    out = problem.run(launch).float()
    return bool(((out - reference).norm() / reference.norm().clamp_min(1e-12)) < 1e-2)


def tune_shape(role: str, key: LaunchKey, contexts: tuple[int, ...], deadline: float) -> TunedLaunch:
    problem = _problem(key, role, max(contexts))
    configs = candidates(key)
    base = configs[0]
    base_us = _time_us(problem, base, contexts)
    problem.ctx_len.fill_(contexts[-1])
    reference = problem.run(base).float()
    best, best_us = base, base_us
    for cfg in configs[1:]:
        if time.monotonic() > deadline:
            break
        try:
            if not _matches(problem, cfg, reference):
                continue
            us = _time_us(problem, cfg, contexts)
        except Exception:  # noqa: BLE001 - a config this GPU cannot compile (shared memory, registers): skip it
            continue
        if sum(us) < sum(best_us) and sum(us) < (1 - MIN_GAIN) * sum(base_us):
            best, best_us = cfg, us
    return TunedLaunch(role, key, best, base, contexts, best_us, base_us)


def tune_launches(shapes: list[tuple[str, LaunchKey]], contexts: tuple[int, ...],
                  budget_s: float = TIME_BUDGET_S, progress: bool = False) -> GpuTuning:
    """Tune each (role, shape) on the current GPU; returns the GPU's cache entry."""
    if triton is None or not torch.cuda.is_available():
        raise RuntimeError("kernel tuning needs CUDA and Triton")
    start = time.monotonic()
    entries = tuple(tune_shape(role, key, contexts, start + budget_s)
                    for role, key in tqdm(shapes, desc="tuning tree attention", unit="shape", disable=not progress))
    torch.cuda.synchronize()
    return GpuTuning(
        gpu=torch.cuda.get_device_name(),
        entries=entries,
        versions={**library_versions("torch", "triton"),
                  "capability": ".".join(map(str, torch.cuda.get_device_capability()))},
        tuned_at=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        seconds=time.monotonic() - start,
    )
