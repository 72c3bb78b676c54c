"""Suite benchmark on a real engine: tau and wall-clock speed on MT-Bench / MATH-500 / HumanEval prompts.

For every prompt (chat template): our AR greedy decode, our speculative decode at every tree budget and
temperature (seeded), and Hugging Face transformers `generate` (greedy) on the same device and dtype, all in one
process. Writes bench/results/suites-<tag>-<device>.json and a PNG.
"""

from __future__ import annotations

import datetime as _dt
import json
import platform
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from statistics import mean

import torch

from jetspec_trt.errors import JetSpecError


@dataclass(frozen=True)
class SuiteBenchConfig:
    engine_dir: Path
    suites: tuple[str, ...] = ("mtbench", "math500", "humaneval")
    num_prompts: int = 10
    max_new_tokens: int = 256
    budgets: tuple[int, ...] = (16, 64, 256)
    temperatures: tuple[float, ...] = (0.0, 1.0)
    device: str = "cuda"
    hf_generate: bool = True
    output_dir: Path = Path("bench/results")
    tag: str = ""
    prompts_file: Path | None = None  # jsonl of {"suite", "id", "messages"} (export_prompts writes one)
    seed: int = 0
    topk: int | None = None
    max_depth: int | None = None


def export_prompts(path: Path, suites: tuple[str, ...], num_prompts: int) -> int:
    """Write load_prompts(suite, num_prompts) of every suite to a jsonl usable without the dataset packages."""
    from jetspec_trt.bench.datasets import load_prompts

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with open(path, "w", encoding="utf-8") as f:
        for suite in suites:
            for p in load_prompts(suite, num_prompts):
                f.write(json.dumps({"suite": p.suite, "id": p.id, "messages": p.messages}) + "\n")
                n += 1
    return n


def _load_prompts(cfg: SuiteBenchConfig) -> dict[str, list[tuple[str, list[dict]]]]:
    out: dict[str, list[tuple[str, list[dict]]]] = {s: [] for s in cfg.suites}
    if cfg.prompts_file is not None:
        with open(cfg.prompts_file, encoding="utf-8") as f:
            for line in f:
                if not line.strip():
                    continue
                row = json.loads(line)
                suite = row.get("suite")
                if suite in out and len(out[suite]) < cfg.num_prompts:
                    out[suite].append((str(row.get("id", len(out[suite]))), row["messages"]))
    else:
        from jetspec_trt.bench.datasets import load_prompts

        for suite in cfg.suites:
            out[suite] = [(p.id, p.messages) for p in load_prompts(suite, cfg.num_prompts)]
    for suite, rows in out.items():
        if not rows:
            raise JetSpecError(f"no prompts for suite {suite!r}")
    return out


def _sync(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _device_name(device: str) -> str:
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name(torch.device(device))
    return platform.processor() or platform.machine() or "cpu"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()


def _generate(engine, ids, cfg, sampling, speculative, tree):
    _sync(cfg.device)
    t0 = time.perf_counter()
    out: list[int] = []
    for tokens in engine.stream_tokens(ids, cfg.max_new_tokens, sampling, speculative, tree):
        out.extend(tokens)
    _sync(cfg.device)
    wall = time.perf_counter() - t0
    stats = engine.last_stats
    return out, {"tokens": len(out), "wall_s": wall, "tok_s": len(out) / max(wall, 1e-9), "tau": stats.tau,
                 "rounds": stats.rounds}


def _hf_generate(model, ids, cfg) -> dict:
    input_ids = torch.tensor([ids], device=cfg.device)
    _sync(cfg.device)
    t0 = time.perf_counter()
    with torch.no_grad():
        out = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False,
                             max_new_tokens=cfg.max_new_tokens, temperature=None, top_p=None, top_k=None,
                             repetition_penalty=None)
    _sync(cfg.device)
    wall = time.perf_counter() - t0
    n = int(out.shape[1] - input_ids.shape[1])
    return {"tokens": n, "wall_s": wall, "tok_s": n / max(wall, 1e-9)}


def _agg(rows: list[dict]) -> dict:
    tokens = sum(r["tokens"] for r in rows)
    wall = sum(r["wall_s"] for r in rows)
    res = {"tokens": tokens, "wall_s": wall, "tok_s": tokens / max(wall, 1e-9)}
    if rows and "tau" in rows[0]:
        # tau over all rounds of the suite (tokens per verify round), and the per-prompt mean
        res["tau"] = tokens / max(1, sum(r["rounds"] for r in rows))
        res["tau_mean_per_prompt"] = mean(r["tau"] for r in rows)
    return res


def run_suite_bench(cfg: SuiteBenchConfig, command: list[str] | None = None) -> Path:
    import transformers

    from jetspec_trt.runtime.config import TreeConfig
    from jetspec_trt.runtime.engine import Engine
    from jetspec_trt.spec.accept import SamplingConfig

    prompts = _load_prompts(cfg)
    engine = Engine.load(cfg.engine_dir, device=cfg.device)
    rt = engine.runtime
    base = getattr(rt, "tree", None)
    topk = cfg.topk or getattr(base, "topk", 7)
    block = getattr(rt, "block_size", 16)
    depth = min(cfg.max_depth or getattr(base, "max_depth", block - 1), block - 1)
    trees = {b: TreeConfig(budget=b, topk=topk, max_depth=depth) for b in cfg.budgets}

    hf_model = None
    if cfg.hf_generate:
        from transformers import AutoModelForCausalLM

        dtype = next(engine.decoder.target.parameters()).dtype
        hf_model = AutoModelForCausalLM.from_pretrained(str(Path(cfg.engine_dir) / "target"), dtype=dtype,
                                                        local_files_only=True).to(cfg.device).eval()
        hf_model.generation_config.pad_token_id = engine.tokenizer.pad_token_id or engine.tokenizer.eos_token_id

    # warm-up (CUDA graph capture, kernels) on a short request, not timed
    warm_ids = engine.encode(prompts[cfg.suites[0]][0][1])
    for b in cfg.budgets:
        for _ in engine.stream_tokens(warm_ids, 8, SamplingConfig(), True, trees[b]):
            pass
    for _ in engine.stream_tokens(warm_ids, 8, SamplingConfig(), False, None):
        pass
    if hf_model is not None:
        _hf_generate(hf_model, warm_ids, SuiteBenchConfig(**{**cfg.__dict__, "max_new_tokens": 8}))

    suites_out: dict[str, dict] = {}
    for suite, rows in prompts.items():
        ar_rows, hf_rows, mismatches, per_prompt = [], [], [], []
        spec_rows: dict[str, list[dict]] = {}
        for pid, messages in rows:
            ids = engine.encode(messages)
            ar_tokens, ar = _generate(engine, ids, cfg, SamplingConfig(), False, None)
            ar_rows.append(ar)
            entry = {"id": pid, "prompt_tokens": len(ids), "ar": ar, "spec": {}}
            for b in cfg.budgets:
                for t in cfg.temperatures:
                    sampling = SamplingConfig(temperature=t, seed=cfg.seed)
                    tokens, r = _generate(engine, ids, cfg, sampling, True, trees[b])
                    key = f"b{b}_t{t:g}"
                    spec_rows.setdefault(key, []).append(r)
                    entry["spec"][key] = r
                    if t <= 0.0:
                        same = tokens == ar_tokens
                        r["identical_to_ar"] = same
                        if not same:
                            first = next((i for i, (x, y) in enumerate(zip(tokens, ar_tokens)) if x != y),
                                         min(len(tokens), len(ar_tokens)))
                            mismatches.append({"id": pid, "budget": b, "first_diff": first})
            if hf_model is not None:
                hf = _hf_generate(hf_model, ids, cfg)
                hf_rows.append(hf)
                entry["hf"] = hf
            per_prompt.append(entry)
        ar_agg = _agg(ar_rows)
        hf_agg = _agg(hf_rows) if hf_rows else None
        spec_agg = {}
        for key, rs in spec_rows.items():
            a = _agg(rs)
            a["speedup_vs_ar"] = a["tok_s"] / ar_agg["tok_s"]
            if hf_agg:
                a["speedup_vs_hf"] = a["tok_s"] / hf_agg["tok_s"]
            spec_agg[key] = a
        greedy_runs = len(rows) * sum(1 for t in cfg.temperatures if t <= 0.0) * len(cfg.budgets)
        suites_out[suite] = {"num_prompts": len(rows), "ar": ar_agg, "hf": hf_agg, "spec": spec_agg,
                             "lossless": {"greedy_runs": greedy_runs, "identical": greedy_runs - len(mismatches),
                                          "mismatches": mismatches},
                             "prompts": per_prompt}

    device_name = _device_name(cfg.device)
    result = {
        "kind": "suite-bench",
        "engine": str(cfg.engine_dir),
        "device": cfg.device,
        "device_name": device_name,
        "dtype": str(next(engine.decoder.target.parameters()).dtype).replace("torch.", ""),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "python": platform.python_version(),
                     "cuda": torch.version.cuda if torch.cuda.is_available() else None},
        "command": " ".join(command or []),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "config": {"suites": list(cfg.suites), "num_prompts": cfg.num_prompts, "max_new_tokens": cfg.max_new_tokens,
                   "budgets": list(cfg.budgets), "temperatures": list(cfg.temperatures), "topk": topk,
                   "max_depth": depth, "seed": cfg.seed, "batch_size": 1, "hf_generate": cfg.hf_generate},
        "suites": suites_out,
    }
    out_dir = Path(cfg.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    name = "-".join(x for x in ("suites", _slug(cfg.tag), _slug(device_name if cfg.device != "cpu" else "cpu")) if x)
    path = out_dir / f"{name}.json"
    path.write_text(json.dumps(result, indent=1))
    plot_suites(result, path.with_suffix(".png"))
    return path


def plot_suites(result: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg = result["config"]
    suites = list(result["suites"])
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for suite in suites:
        s = result["suites"][suite]["spec"]
        for t, style in zip(cfg["temperatures"], ("-o", "--s", ":^")):
            ys = [s[f"b{b}_t{t:g}"]["tau"] for b in cfg["budgets"]]
            ax1.plot(cfg["budgets"], ys, style, label=f"{suite} T={t:g}")
    ax1.set_xscale("log", base=2)
    ax1.set_xlabel("tree budget")
    ax1.set_ylabel("tau (tokens per verify round)")
    ax1.set_title("acceptance")
    ax1.legend(fontsize=7)
    width = 0.8 / max(1, len(cfg["budgets"]) * 2)
    for i, suite in enumerate(suites):
        s = result["suites"][suite]["spec"]
        for j, b in enumerate(cfg["budgets"]):
            a = s[f"b{b}_t0"]
            ax2.bar(i + (2 * j) * width, a["speedup_vs_ar"], width, color=f"C{j}", label=f"vs AR b={b}" if i == 0 else None)
            if "speedup_vs_hf" in a:
                ax2.bar(i + (2 * j + 1) * width, a["speedup_vs_hf"], width, color=f"C{j}", alpha=0.45,
                        label=f"vs HF b={b}" if i == 0 else None)
    ax2.axhline(1.0, color="k", lw=0.7)
    ax2.set_xticks([i + 0.4 - width / 2 for i in range(len(suites))], suites)
    ax2.set_ylabel("greedy wall-clock speedup")
    ax2.set_title("speedup (T=0)")
    ax2.legend(fontsize=7)
    fig.suptitle(f"{Path(result['engine']).name} on {result['device_name']} ({result['dtype']}, batch 1, "
                 f"{cfg['max_new_tokens']} new tokens)")
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
