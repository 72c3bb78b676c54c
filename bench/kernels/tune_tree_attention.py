"""Times tree-attention launch configs at Qwen3-8B shapes (Hq 32, Hkv 8, D 128, bf16) on the GPU.

Prints one row per (case, config): median ms over CUDA events (triton.testing.do_bench), and the
bandwidth floor (K/V bytes read once / 3.0 TB/s). Run through the device tool.
"""

import itertools

import torch
import triton.testing

from jetspec_trt.plugins.tree_attention import causal_mask, pack_mask
from jetspec_trt.plugins.triton_tree_attention import LaunchConfig, default_launch, tree_attention_triton

HQ, HKV, D, PAGE = 32, 8, 128, 64
CASES = [("decode", 1, 2048), ("decode", 1, 8192), ("draft", 16, 2048), ("verify", 256, 2048), ("verify", 256, 8192),
         ("verify", 64, 8192)]


def tree_mask(n):
    parents = [-1] + [max(0, i - 1 - (i % 7)) for i in range(1, n)]
    dense = torch.zeros(n, n, dtype=torch.bool)
    for i in range(n):
        if parents[i] >= 0:
            dense[i] = dense[parents[i]]
        dense[i, i] = True
    return pack_mask(dense).cuda()


def main():
    for name, t, ctx in CASES:
        pages = (ctx + t) // PAGE + 2
        k = torch.randn(pages, PAGE, HKV, D, device="cuda", dtype=torch.bfloat16)
        v = torch.randn_like(k)
        table = torch.arange(pages, dtype=torch.int32, device="cuda")
        q = torch.randn(t, HQ, D, device="cuda", dtype=torch.bfloat16)
        ctx_len = torch.tensor([ctx], dtype=torch.int32, device="cuda")
        mask = tree_mask(t) if name == "verify" else causal_mask(t, "cuda")
        floor_ms = 2 * (ctx + t) * HKV * D * 2 / 3.0e12 * 1e3
        base = default_launch(t, HQ, HKV, D)
        configs = {base}
        for bm, bn, w, st, sp in itertools.product((16, 64, 128), (32, 64), (4, 8), (2, 3), (1, 2, 4, 8, 16)):
            if (bm == 16) == (t * HQ // HKV <= 16):
                configs.add(LaunchConfig(bm, bn, w, st, sp))
        results = []
        for cfg in configs:
            try:
                ms = triton.testing.do_bench(
                    lambda: tree_attention_triton(q, k, v, table, ctx_len, mask, D**-0.5, cfg), warmup=5, rep=20,
                    return_mode="median")
            except Exception as err:  # a config the compiler rejects (shared memory, registers)
                ms = float("nan")
            results.append((ms, cfg))
        results.sort(key=lambda r: (r[0] != r[0], r[0]))
        default_ms = next(ms for ms, cfg in results if cfg == base)
        print(f"{name:7s} T={t:4d} ctx={ctx:5d} floor {floor_ms:.3f} ms | default {default_ms:.3f} ms {base} | "
              f"best {results[0][0]:.3f} ms {results[0][1]}", flush=True)


if __name__ == "__main__":
    main()
