"""Does programmatic dependent launch (PDL) let the AR step's GEMVs stream weights while the small kernels between
them run? A probe for one GPU call (~2 minutes), before the engine uses it (plugins/gemv.py, "PDL").

The Qwen3-8B-shape AR step is its 145 GEMVs (5.15 ms alone on an H100, 95 % of the read rate) plus 0.93 ms of
norms, RoPE, attention and activations between them (2026-12-06, bench/results/engine-qwen3-8b-h100-32k-fp8.json),
during which no weights stream. Here a CUDA graph replays 36 layers of the step's four GEMVs (real weights of the
8B shapes: 15 GB), each after a one-program RMSNorm kernel whose length is set by --spin (standing in for the small
kernels), in these variants:

  gemv_only     the GEMVs back to back (their time alone)
  norm_only     the norm kernels alone (the time to hide)
  plain         norm -> GEMV, ordinary launches (today's step)
  pdl           the GEMV launched as a programmatic dependent: it waits (griddepcontrol.wait) before reading x
  pdl_trigger   and the norm signals its dependents at its start, so the GEMV's programs start while it runs
  pdl_prefetch_P  and each GEMV program prefetches its rows' first P columns into L2 before waiting

Every variant's final output must equal plain's exactly (same kernels, same order of sums): a GEMV that read x
before the norm finished would not. Writes $OUT/pdl-probe-<gpu>.json (or --out).

    python3 scripts/device_lease/pdl_probe.py --spin 0,64,256
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from jetspec_trt.plugins.gemv import _kernel as gemv_launcher  # noqa: E402

SHAPES = [(6144, 4096), (4096, 4096), (24576, 4096), (4096, 12288)]  # Qwen3-8B: qkv, o, gate-up, down (N, K)
BLOCK = (8, 512)  # (BLOCK_N, BLOCK_K): the GEMV autotuner's usual pick at these shapes


@triton.jit
def norm_kernel(y_ptr, x_ptr, N_IN, K_OUT, SPIN, TRIGGER: tl.constexpr, BLOCK: tl.constexpr):
    """x[:K_OUT] = rms-normalised y[i % N_IN], then SPIN rounds of dependent arithmetic (the small kernels' time)."""
    if TRIGGER:
        gdc_launch_dependents()
    offs = tl.arange(0, BLOCK)
    ok = offs < K_OUT
    y = tl.load(y_ptr + offs % N_IN, mask=ok, other=0.0).to(tl.float32)
    x = y / tl.sqrt(tl.sum(y * y, 0) / K_OUT + 1e-6)
    for _ in range(SPIN):
        x = x * 0.9990234375 + 0.0009765625 * x  # x unchanged in value; a dependent chain in time
    tl.store(x_ptr + offs, x.to(x_ptr.dtype.element_ty), mask=ok)


def events_ms(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=36)
    parser.add_argument("--spin", default="0,64,256")
    parser.add_argument("--prefetch", default="256,512,1024")
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    launch = gemv_launcher()
    gen = torch.Generator(device="cuda").manual_seed(0)
    weights = [torch.randn(n, k, device="cuda", generator=gen, dtype=torch.bfloat16) / k**0.5
               for _ in range(args.layers) for n, k in SHAPES]
    x0 = torch.randn(1, 4096, device="cuda", generator=gen, dtype=torch.bfloat16)
    inputs = {k: torch.empty(1, k, device="cuda", dtype=torch.bfloat16) for k in {k for _, k in SHAPES}}

    def chain(spin: int, norm: bool, gemv: bool, pdl: bool, trigger: bool, prefetch: int):
        def run():
            y = x0
            for w in weights:
                n, k = w.shape
                x = inputs[k]
                if norm:
                    norm_kernel[(1,)](y, x, y.shape[1], k, spin, TRIGGER=trigger,
                                      BLOCK=triton.next_power_of_2(k), num_warps=8)
                if gemv:
                    y = launch(x, w, None, None, x.dtype, BLOCK, pdl_prefetch=prefetch if pdl else None)
                else:
                    y = x
            return y
        return run

    variants = {"gemv_only": dict(norm=False, gemv=True, pdl=False, trigger=False, prefetch=0),
                "norm_only": dict(norm=True, gemv=False, pdl=False, trigger=False, prefetch=0),
                "plain": dict(norm=True, gemv=True, pdl=False, trigger=False, prefetch=0),
                "pdl": dict(norm=True, gemv=True, pdl=True, trigger=False, prefetch=0),
                "pdl_trigger": dict(norm=True, gemv=True, pdl=True, trigger=True, prefetch=0)}
    for p in (int(v) for v in args.prefetch.split(",") if v):
        variants[f"pdl_prefetch_{p}"] = dict(norm=True, gemv=True, pdl=True, trigger=True, prefetch=p)
    weight_bytes = sum(w.numel() * w.element_size() for w in weights)
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
              "layers": args.layers, "shapes": SHAPES, "block": BLOCK, "weight_bytes": weight_bytes, "runs": []}
    for spin in (int(v) for v in args.spin.split(",")):
        reference = None
        for name, v in variants.items():
            run = chain(spin, **v)
            run()  # compile and warm up outside the capture
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = run()
            ms = events_ms(graph.replay, args.reps)
            row = {"spin": spin, "variant": name, "ms": ms,
                   "weight_GBps": weight_bytes / ms / 1e6 if v["gemv"] else None}
            if v["norm"] and v["gemv"]:
                final = out.clone()
                if reference is None:
                    reference = final
                row["equal_to_plain"] = bool(torch.equal(final, reference))
            result["runs"].append(row)
            print(json.dumps(row), flush=True)
            del graph
    out_dir = Path(args.out or os.environ.get("OUT", "."))
    gpu = result["device"].replace("NVIDIA ", "").split()[0].lower()
    path = out_dir / f"pdl-probe-{gpu}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
