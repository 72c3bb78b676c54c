"""Times the Triton tree-attention kernel against the reference op and torch SDPA at Qwen3-8B attention shapes.

Shapes: Hq 32, Hkv 8, head_dim 128, bf16, page 64, a shuffled block table. Cases: decode T=1 and tree verify
T=256 at contexts 512 / 2048 / 8192, causal prefill T=2048 (context 0).

For every case it prints the method's two numbers (fewest bytes / 3.0 TB/s, useful FLOPs / 790 TFLOP/s, both
measured on the H100 of this workplace) and medians from triton.testing.do_bench (CUDA events; do_bench flushes
L2 before each repetition, so nothing is served from cache):
  kernel      the Triton op, its default launch, called eagerly (host launch gaps can show at decode)
  kernel_g    the same replayed from a CUDA graph (how the engine runs it)
  reference   the sync-free reference op on the GPU (gathers the whole cache, dense fp32 softmax), graphed
  sdpa        torch SDPA with a dense bool mask on K/V already gathered and expanded to Hq heads (the gather is
              not timed, so this favours SDPA), graphed
  flash       (prefill only) SDPA is_causal=True, the flash backend, same favourable inputs
With --sweep it also times a few launch configs per case and prints the best.

Run through the device tool: python bench/kernels/tree_attention_bench.py [--sweep]; writes bench.json to $OUT
(or the current directory).
"""

from __future__ import annotations

import itertools
import json
import os
import sys

import torch
import torch.nn.functional as F
import triton.testing

from jetspec_trt.plugins.tree_attention import causal_mask, pack_mask, tree_attention_reference, unpack_mask
from jetspec_trt.plugins.tree_attention_tuner import capture_graph
from jetspec_trt.plugins.triton_tree_attention import LaunchConfig, default_launch, tree_attention_triton

HQ, HKV, D, PAGE, DTYPE = 32, 8, 128, 64, torch.bfloat16
BANDWIDTH = 3.0e12  # B/s, device-to-device copy measured on this H100 (KINDS.md)
MATMUL = 790e12  # FLOP/s, bf16 8192^3 product measured on this H100 (KINDS.md: 798)
CASES = [("decode", 1, 512), ("decode", 1, 2048), ("decode", 1, 8192),
         ("verify", 256, 512), ("verify", 256, 2048), ("verify", 256, 8192), ("prefill", 2048, 0)]


def random_tree(n: int, g: torch.Generator) -> torch.Tensor:
    parents = [-1] + [int(torch.randint(max(0, i - 16), i, (1,), generator=g)) for i in range(1, n)]
    dense = torch.zeros(n, n, dtype=torch.bool)
    for i in range(n):
        if parents[i] >= 0:
            dense[i] = dense[parents[i]]
        dense[i, i] = True
    return dense


def graphed(fn):
    """Capture fn in a CUDA graph and return its replay (None if it cannot be captured)."""
    try:
        return capture_graph(fn).replay
    except Exception as err:  # noqa: BLE001 - report, don't stop the table
        print(f"  (capture failed: {type(err).__name__}: {err})", file=sys.stderr)
        return None


def bench(fn, rep=60):
    if fn is None:
        return float("nan")
    return triton.testing.do_bench(fn, warmup=20, rep=rep, return_mode="median")


def sweep_configs(name: str):
    """A few launch shapes around the default (each compiles once; ctx_len is a device value)."""
    if name == "decode":
        return ([LaunchConfig(16, 64, 4, st, sp) for st, sp in itertools.product((3, 4, 5, 6), (16, 32, 64))]
                + [LaunchConfig(16, 128, 4, st, sp) for st, sp in itertools.product((4, 5), (16, 32))]
                + [LaunchConfig(16, 32, 4, 5, sp) for sp in (32, 64)])
    if name == "verify":
        return ([LaunchConfig(64, 64, 4, st, sp) for st, sp in itertools.product((3, 4, 5), (1, 2, 4))]
                + [LaunchConfig(128, 64, 8, st, sp) for st, sp in itertools.product((3, 4), (2, 4))])
    return ([LaunchConfig(64, 64, 4, st, 1) for st in (2, 3, 4, 5)] + [LaunchConfig(128, 64, 8, st, 1) for st in (2, 3, 4)]
            + [LaunchConfig(128, 64, 4, 3, 1), LaunchConfig(64, 128, 4, 3, 1)])


def main():
    sweep = "--sweep" in sys.argv
    g = torch.Generator().manual_seed(0)
    rows = []
    tiny = torch.zeros(1, device="cuda")
    empty_us = bench(graphed(lambda: tiny.add_(1))) * 1e3
    print(f"measurement floor: a one-element kernel replayed from a graph takes {empty_us:.1f} us", flush=True)
    for name, t, ctx in CASES:
        total = ctx + t
        pages = (total + PAGE - 1) // PAGE + 1
        k = torch.randn(pages, PAGE, HKV, D, generator=g).to(DTYPE).cuda()
        v = torch.randn(pages, PAGE, HKV, D, generator=g).to(DTYPE).cuda()
        table = torch.randperm(pages, generator=g).to(torch.int32).cuda()
        q = torch.randn(t, HQ, D, generator=g).to(DTYPE).cuda()
        ctx_len = torch.tensor([ctx], dtype=torch.int32, device="cuda")
        dense_new = torch.ones(t, t, dtype=torch.bool).tril() if name == "prefill" else random_tree(t, g)
        mask = (causal_mask(t) if name == "prefill" else pack_mask(dense_new)).cuda()
        assert torch.equal(unpack_mask(mask.cpu(), t), dense_new)
        scale = D**-0.5

        # The two numbers.
        pairs = t * ctx + int(dense_new.sum())  # visible (query token, key) pairs, per query head
        flops = 4 * D * HQ * pairs
        nbytes = 2 * total * HKV * D * 2 + 2 * t * HQ * D * 2 + mask.numel() * 4
        floor_bw, floor_fl = nbytes / BANDWIDTH * 1e3, flops / MATMUL * 1e3

        out = tree_attention_triton(q, k, v, table, ctx_len, mask, scale)
        ref = tree_attention_reference(q, k, v, table, ctx_len, mask, scale)
        err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()

        kernel = lambda: tree_attention_triton(q, k, v, table, ctx_len, mask, scale)  # noqa: E731
        t_kernel = bench(kernel)
        t_graph = bench(graphed(kernel))
        t_ref = bench(graphed(lambda: tree_attention_reference(q, k, v, table, ctx_len, mask, scale)), rep=30)

        # SDPA on contiguous, head-expanded K/V of the live prefix (built outside the timed region).
        slots = (table.long()[torch.arange(total, device="cuda") // PAGE] * PAGE
                 + torch.arange(total, device="cuda") % PAGE)
        kd = k.flatten(0, 1)[slots].repeat_interleave(HQ // HKV, 1).transpose(0, 1)[None]  # [1, Hq, S, D]
        vd = v.flatten(0, 1)[slots].repeat_interleave(HQ // HKV, 1).transpose(0, 1)[None]
        qd = q.transpose(0, 1)[None]
        visible = torch.ones(t, total, dtype=torch.bool)
        visible[:, ctx:] = dense_new
        visible = visible.cuda()[None, None]
        t_sdpa = bench(graphed(lambda: F.scaled_dot_product_attention(qd, kd, vd, attn_mask=visible, scale=scale)))
        t_flash = float("nan")
        if name == "prefill":
            t_flash = bench(graphed(lambda: F.scaled_dot_product_attention(qd, kd, vd, is_causal=True, scale=scale)))

        best = None
        if sweep:
            results = []
            for cfg in sweep_configs(name):
                try:
                    fn = lambda cfg=cfg: tree_attention_triton(q, k, v, table, ctx_len, mask, scale, cfg)  # noqa: E731
                    o = fn()
                    e = ((o.float() - ref.float()).norm() / ref.float().norm()).item()
                    ms = bench(graphed(fn), rep=25) if e < 1e-2 else float("inf")
                except Exception as exc:  # noqa: BLE001 - a config the compiler rejects (shared memory)
                    print(f"  {cfg}: {type(exc).__name__}", file=sys.stderr)
                    ms = float("nan")
                results.append((ms, cfg))
            results = [r for r in results if r[0] == r[0]]
            results.sort(key=lambda r: r[0])
            best = results[0] if results else None
            for ms, cfg in results[:5]:
                print(f"  {name} T={t} ctx={ctx}: {ms * 1e3:8.1f} us {cfg}", flush=True)

        row = dict(case=name, T=t, ctx=ctx, bytes=nbytes, flops=flops, floor_bw_us=floor_bw * 1e3,
                   floor_flop_us=floor_fl * 1e3, kernel_us=t_kernel * 1e3, kernel_graph_us=t_graph * 1e3,
                   reference_us=t_ref * 1e3, sdpa_us=t_sdpa * 1e3, flash_causal_us=t_flash * 1e3, rel_err=err,
                   default=str(default_launch(t, HQ, HKV, D)),
                   best=None if best is None else dict(us=best[0] * 1e3, cfg=str(best[1])))
        rows.append(row)
        print(json.dumps(row), flush=True)
        del k, v, kd, vd, ref, out
        torch.cuda.empty_cache()

    print()
    print(f"{'case':8s} {'T':>5s} {'ctx':>5s} | {'MB':>6s} {'bw floor':>8s} {'GFLOP':>6s} {'fl floor':>8s} | "
          f"{'kernel':>7s} {'graph':>7s} {'ref':>8s} {'sdpa':>8s} {'flash':>7s} | {'% floor':>7s} {'best':>7s}")
    for r in rows:
        floor = max(r["floor_bw_us"], r["floor_flop_us"])
        best = r["best"]["us"] if r["best"] else float("nan")
        print(f"{r['case']:8s} {r['T']:5d} {r['ctx']:5d} | {r['bytes'] / 1e6:6.1f} {r['floor_bw_us']:7.1f}u "
              f"{r['flops'] / 1e9:6.1f} {r['floor_flop_us']:7.1f}u | {r['kernel_us']:6.1f}u {r['kernel_graph_us']:6.1f}u "
              f"{r['reference_us']:7.1f}u {r['sdpa_us']:7.1f}u {r['flash_causal_us']:6.1f}u | "
              f"{100 * floor / r['kernel_graph_us']:6.0f}% {best:6.1f}u")
    print(f"(measurement floor {empty_us:.1f} us: one tiny kernel from a graph under do_bench)")
    out_dir = os.environ.get("OUT", ".")
    with open(os.path.join(out_dir, "bench.json"), "w") as f:
        json.dump(dict(empty_graph_us=empty_us, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
