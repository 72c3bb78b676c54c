"""Where a speculative round's device time goes, kernel by kernel (a development script, not package API).

For each tree budget: the per-kernel device time of ONE eager (not graphed) run of each round stage (draft,
tree, verify, accept: the functions the graphs are captured from, compiled parts compiled, after warm-up), then
the graphed stage times beside the AR step (the engine bench's own timings). The random target/draft pair and
the GraphDecoder come from the engine bench (jetspec_trt.bench.engine_bench), so the shapes and settings are
the bench's.

  GPU (0.5B shape, ~1 min):  python -m scripts.profile_round_stages
  CPU smoke run:             python -m scripts.profile_round_stages --device cpu --model tiny --dtype float32 \
                                 --max-depth 7 --context 64 --no-compile
(Run with -m from the repository root so that its jetspec_trt is the one imported.) On CPU the tables list aten ops by CPU time (no device kernels) and the graphed times are skipped.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from jetspec_trt.bench.engine_bench import BenchConfig, EngineBench
from jetspec_trt.dtypes import parse_dtype
from jetspec_trt.models.presets import random_models
from jetspec_trt.runtime.config import DEFAULT_TREE, TreeConfig
from jetspec_trt.runtime.graph_decoder import STAGES


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="qwen2.5-0.5b", help="random_models preset (tiny for a CPU run)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--budgets", type=int, nargs="+", default=[16, 64, 256])
    parser.add_argument("--topk", type=int, default=DEFAULT_TREE.topk)
    parser.add_argument("--max-depth", type=int, default=DEFAULT_TREE.max_depth)
    parser.add_argument("--context", type=int, default=2048, help="committed tokens the stages run at")
    parser.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES)
    parser.add_argument("--rows", type=int, default=25, help="kernels listed per stage (by time)")
    parser.add_argument("--reps", type=int, default=20, help="graph replays per stage timing (median)")
    parser.add_argument("--no-compile", dest="compile", action="store_false",
                        help="eager layers and tree build (the bench compiles them)")
    parser.add_argument("--output", type=Path, help="also write the report to this file")
    return parser.parse_args(argv)


def kernel_table(prof, cuda: bool, rows: int) -> tuple[list[str], int, float]:
    """Rows 'time_us count name' by time, the number of kernels (ops on CPU) and their total time in us.
    On CUDA only device events count (kernels, memcpy, memset); on CPU the aten ops' self time."""
    if cuda:
        events = [e for e in prof.key_averages() if e.device_type == DeviceType.CUDA]
        time_of = lambda e: e.self_device_time_total  # noqa: E731
    else:
        events = [e for e in prof.key_averages() if e.key.startswith("aten::") and e.self_cpu_time_total > 0]
        time_of = lambda e: e.self_cpu_time_total  # noqa: E731
    events.sort(key=time_of, reverse=True)
    lines = [f"  {time_of(e):8.1f} {e.count:4d}  {e.key[:64]}" for e in events[:rows]]
    return lines, sum(e.count for e in events), sum(time_of(e) for e in events)


def profile_stages(bench: EngineBench, tree: TreeConfig, context: int, stages: list[str], rows: int,
                   out: list[str]) -> None:
    decoder, cuda = bench.decoder, bench.cfg.device.startswith("cuda")
    decoder.stages(tree, "greedy")  # capture (and compile) first, as the bench does
    # A fresh eager stage set with its own scratch buffers: running the captured functions themselves would
    # rebind the scratch tensors whose addresses the graphs baked in.
    state = decoder._new_state(tree.max_depth)
    eager = decoder._make_stages(tree, state, "greedy")  # the greedy round, as the bench times it
    state.anchor.fill_(11)
    reset = bench._at_context(context, state)
    for _ in range(2):  # warm-up: allocator, autotune, lazy init
        reset()
        for name in STAGES:
            eager[name]()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    for name in stages:
        reset()
        for prior in STAGES[: STAGES.index(name)]:
            eager[prior]()
        if cuda:
            torch.cuda.synchronize()
        with profile(activities=activities) as prof:
            eager[name]()
            if cuda:
                torch.cuda.synchronize()
        lines, count, total = kernel_table(prof, cuda, rows)
        unit = "kernels" if cuda else "aten ops"
        out.append(f"-- budget {tree.budget} {name}: {count} {unit}, {total / 1000:.3f} ms summed (eager, not graphed)")
        out.extend(lines)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    cuda = args.device.startswith("cuda")
    cfg = BenchConfig(random_target=args.model, device=args.device, dtype=args.dtype, budgets=tuple(args.budgets),
                      contexts=(args.context,), topk=args.topk, max_depth=args.max_depth, reps=args.reps,
                      compile_layers=args.compile)
    target, draft, hf_config = random_models(cfg.random_target, cfg.device, parse_dtype(cfg.dtype))
    target.fuse_weights()
    draft.fuse_weights()
    out: list[str] = []
    with torch.inference_mode():
        bench = EngineBench(cfg, target, draft, hf_config)
        trees = [TreeConfig(b, args.topk, args.max_depth) for b in args.budgets]
        for tree in trees:
            profile_stages(bench, tree, args.context, args.stages, args.rows, out)
        out.append(f"== graphed stage times (ms, median of {args.reps}), context {args.context}, "
                   f"{args.model} {args.dtype}{' compiled' if args.compile else ''}")
        if cuda:
            ar = bench.ar_step_ms(args.context)
            out.append(f"AR step {ar:.3f}")
            for tree in trees:
                split = bench.round_split_ms(tree.budget, args.context)
                parts = " ".join(f"{name} {split[f'{name}_ms']:.3f}" for name in STAGES)
                out.append(f"budget {tree.budget:4d}: {parts} round {split['round_ms']:.3f} "
                           f"= {split['round_ms'] / ar:.2f}x AR")
        else:
            out.append("(skipped: graphs and CUDA events need a GPU)")
    text = "\n".join(out)
    print(text)
    if args.output is not None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(text + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
