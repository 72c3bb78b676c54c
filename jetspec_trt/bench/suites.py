"""Suite benchmark on a real engine: tau and wall-clock speed on MT-Bench / MATH-500 / HumanEval prompts.

For every prompt (chat template): our AR greedy decode, our speculative decode at every tree budget and
temperature (seeded), and Hugging Face transformers `generate` (greedy) on the same device and dtype, all in one
process. Writes bench/results/suites-<device>-<tag>.json and a PNG (<device>: "cpu" or the GPU's name).

Greedy (T=0) speculative output is compared with the AR output of the same prompt. Where they differ, the flip is
diagnosed with one extra teacher-forced prefill of the engine's target over prompt + common prefix (same device and
dtype): the top-2 logit gap at the first differing position, the two tokens and their logit difference, and
optionally (`diagnose_fp32`) the same on a float32 copy of the target. A flip at a gap of a few units in the last
place of the engine dtype is rounding (the tree verify's M=N GEMMs and attention reduction round differently than
the 1-token AR step); a flip at a wide gap would be a bug.
"""

from __future__ import annotations

import copy
import datetime as _dt
import json
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path
from statistics import mean, median

import torch

from jetspec_trt.devices import device_name, sync
from jetspec_trt.dtypes import dtype_name
from jetspec_trt.errors import JetSpecError
from jetspec_trt.versions import library_versions


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
    hf_prompts: int | None = None  # HF generate on the first N prompts of each suite only (it is ~20x slower)
    output_dir: Path = Path("bench/results")
    tag: str = ""
    prompts_file: Path | None = None  # jsonl of {"suite", "id", "messages"} (export_prompts writes one)
    seed: int = 0
    topk: int | None = None
    max_depth: int | None = None
    # TreeConfig.lookup of every speculative run (capped at budget - 1 and the depth); None: the engine's chain,
    # fitted to each budget as `run --budget` fits it (TreeConfig.fitted)
    lookup: int | None = None
    diagnose_fp32: bool = False  # also diagnose divergences on a float32 copy of the target (fits for ~0.5B on GPU)


# A greedy flip counts as a near-tie when both tokens' logits are within NEAR_TIE_ULPS units in the last place
# (ulp) of the engine dtype of the target's top logit (at its magnitude). bf16 has an 8-bit
# significand (7 stored bits): ulp(x) = 2^(floor(log2|x|) - 7), so for bf16 the threshold is 2^(floor(log2|top1|) - 5),
# between |top1|/64 and |top1|/32 (0.5 for logits in [16, 32)). Why a few ulps: the logits leave the lm_head GEMM
# rounded to bf16 (half an ulp of error each, so one ulp between two logits from final rounding alone), and the
# hidden state feeding it carries the rounding of every residual add and of GEMMs/attention that the tree verify
# (M = tree-size rows, a different reduction split) and the 1-token AR step compute in different orders. A gap of
# dozens of ulps is beyond that and would point to a real bug. Scaled by torch.finfo(dtype).eps, the same rule
# gives fp16 / fp32 engines a correspondingly tighter threshold.
NEAR_TIE_ULPS = 4


def ulp(x: float, dtype: torch.dtype) -> float:
    """Spacing of `dtype` numbers at |x| (torch.finfo(dtype).eps is the spacing at 1.0)."""
    eps = torch.finfo(dtype).eps
    if x == 0.0 or not math.isfinite(x):
        return eps
    return eps * 2.0 ** math.floor(math.log2(abs(x)))


def near_tie_threshold(top1_logit: float, dtype: torch.dtype) -> float:
    return NEAR_TIE_ULPS * ulp(top1_logit, dtype)


def export_prompts(path: Path, suites: tuple[str, ...], num_prompts: int) -> int:
    """Write load_prompts(suite, num_prompts) of every suite to a jsonl usable without the dataset packages."""
    from jetspec_trt.datasets import load_prompts

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with open(path, "w", encoding="utf-8") as f:
        for suite in suites:
            for p in load_prompts(suite, num_prompts):
                f.write(json.dumps({"suite": p.suite, "id": p.id, "messages": p.messages}) + "\n")
                n += 1
    return n


def load_suite_prompts(suites: tuple[str, ...], num_prompts: int,
                       prompts_file: Path | None = None) -> dict[str, list[tuple[str, list[dict]]]]:
    """Up to num_prompts (id, messages) per suite, from prompts_file (export_prompts' jsonl) or the packages."""
    out: dict[str, list[tuple[str, list[dict]]]] = {s: [] for s in suites}
    if prompts_file is not None:
        with open(prompts_file, encoding="utf-8") as f:
            for line in f:
                if not line.strip():
                    continue
                row = json.loads(line)
                suite = row.get("suite")
                if suite in out and len(out[suite]) < num_prompts:
                    out[suite].append((str(row.get("id", len(out[suite]))), row["messages"]))
    else:
        from jetspec_trt.datasets import load_prompts

        for suite in suites:
            out[suite] = [(p.id, p.messages) for p in load_prompts(suite, num_prompts)]
    for suite, rows in out.items():
        if not rows:
            raise JetSpecError(f"no prompts for suite {suite!r}")
    return out


def mixed_suite_prompts(suites: tuple[str, ...], count: int,
                        prompts_file: Path | None = None) -> list[tuple[str, str, list[dict]]]:
    """Up to `count` (suite, id, messages), one suite after another in turn (mtbench 0, math500 0, humaneval 0,
    mtbench 1, ...): the benches that run many requests at once take every suite's prompts alike."""
    per_suite = -(-count // len(suites))
    by_suite = load_suite_prompts(suites, per_suite, prompts_file)
    mixed = [(suite, *rows[i]) for i in range(per_suite) for suite, rows in by_suite.items() if i < len(rows)]
    return mixed[:count]


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()


def _generate(engine, ids, cfg, sampling, speculative, tree):
    sync(cfg.device)
    t0 = time.perf_counter()
    out: list[int] = []
    for tokens in engine.stream_tokens(ids, cfg.max_new_tokens, sampling, speculative, tree):
        out.extend(tokens)
    sync(cfg.device)
    wall = time.perf_counter() - t0
    stats = engine.last_stats
    return out, {"tokens": len(out), "wall_s": wall, "tok_s": len(out) / max(wall, 1e-9), "tau": stats.tau,
                 "rounds": stats.rounds, "prefill_s": stats.prefill_s}


def _hf_generate(model, ids, cfg) -> dict:
    input_ids = torch.tensor([ids], device=cfg.device)
    sync(cfg.device)
    t0 = time.perf_counter()
    with torch.no_grad():
        out = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False,
                             max_new_tokens=cfg.max_new_tokens, temperature=None, top_p=None, top_k=None,
                             repetition_penalty=None)
    sync(cfg.device)
    wall = time.perf_counter() - t0
    n = int(out.shape[1] - input_ids.shape[1])
    return {"tokens": n, "wall_s": wall, "tok_s": n / max(wall, 1e-9)}


@torch.inference_mode()
def teacher_forced_logits(target, ids: list[int], page_size: int = 64) -> torch.Tensor:
    """The target's next-token logits [vocab] (float32) after one causal prefill over `ids`, on a cache of its own
    (the decoders' caches and CUDA graphs are left alone); the lm_head runs on the last position only."""
    return target.prefill(ids, page_size=page_size, logits="last").logits[0]


def _flip_stats(logits: torch.Tensor, ar_token: int | None, spec_token: int | None, dtype: torch.dtype) -> dict:
    top = torch.topk(logits, 2)
    (v1, v2), (t1, t2) = top.values.tolist(), top.indices.tolist()
    gap = v1 - v2
    unit = ulp(v1, dtype)
    res = {"top1_token": t1, "top2_token": t2, "top1_logit": v1, "top2_gap": gap, "top2_gap_ulps": gap / unit,
           "threshold": near_tie_threshold(v1, dtype)}
    ranks = {}
    for name, tok in (("ar", ar_token), ("spec", spec_token)):
        if tok is None:
            res[f"{name}_logit"], ranks[name] = None, None
        else:
            value = logits[tok]
            res[f"{name}_logit"] = float(value)
            ranks[name] = int((logits > value).sum())
        res[f"{name}_rank"] = ranks[name]
    both = ar_token is not None and spec_token is not None
    res["ar_minus_spec"] = res["ar_logit"] - res["spec_logit"] if both else None
    # Both tokens are closer to the target's best than rounding can reach: a tie of two tokens, or of three or
    # more (2026-12-04: a flip between the teacher-forced top 1 and rank 2, all three within 2 bf16 ulp).
    res["near_tie"] = bool(both and max(v1 - res["ar_logit"], v1 - res["spec_logit"]) < res["threshold"])
    return res


def diagnose_flip(target, prompt_ids: list[int], ar_tokens: list[int], spec_tokens: list[int], first_diff: int,
                  page_size: int = 64, target_fp32=None, tokenizer=None) -> dict:
    """Why greedy AR and greedy speculative output parted at `first_diff`: one teacher-forced prefill over prompt +
    common prefix on the engine's target (its device and dtype), and optionally on a float32 copy."""
    ids = list(prompt_ids) + list(ar_tokens[:first_diff])
    ar_tok = ar_tokens[first_diff] if first_diff < len(ar_tokens) else None
    spec_tok = spec_tokens[first_diff] if first_diff < len(spec_tokens) else None
    dtype = target.embed_tokens.weight.dtype
    res = {"position": first_diff, "ar_token": ar_tok, "spec_token": spec_tok, "dtype": dtype_name(dtype)}
    if tokenizer is not None:
        res["ar_text"] = tokenizer.decode([ar_tok]) if ar_tok is not None else None
        res["spec_text"] = tokenizer.decode([spec_tok]) if spec_tok is not None else None
    res.update(_flip_stats(teacher_forced_logits(target, ids, page_size), ar_tok, spec_tok, dtype))
    if target_fp32 is not None:
        f = _flip_stats(teacher_forced_logits(target_fp32, ids, page_size), ar_tok, spec_tok, torch.float32)
        winner = f["top1_token"]
        f["prefers"] = "ar" if winner == ar_tok else "spec" if winner == spec_tok else "other"
        res["fp32"] = {k: f[k] for k in ("top1_token", "top2_token", "top1_logit", "top2_gap", "ar_logit",
                                         "spec_logit", "ar_minus_spec", "ar_rank", "spec_rank", "prefers")}
    return res


def _fp32_target(target, device: str):
    """A float32 copy of the target for --diagnose-fp32, or a reason why not (the engine already runs in float32,
    or the copy would not fit in free GPU memory)."""
    if target.embed_tokens.weight.dtype == torch.float32:
        return None, "engine already runs in float32"
    if any(p.dtype == torch.float8_e4m3fn for p in target.parameters()):
        # .to(float32) would turn FP8 codes into numbers without their scales
        return None, "FP8 target (compare it with its bf16 engine: bench --quantize-compare)"
    # float32 parameters and buffers (fused GEMM weights are buffers) plus the transient deepcopy in engine dtype
    elements = sum(p.numel() for p in target.parameters()) + sum(b.numel() for b in target.buffers())
    need = (4 + target.embed_tokens.weight.element_size()) * elements
    if torch.device(device).type == "cuda":
        free, _ = torch.cuda.mem_get_info(torch.device(device))
        if need > 0.8 * free:
            return None, f"float32 copy needs {need / 2**30:.1f} GiB, {free / 2**30:.1f} GiB free"
    return copy.deepcopy(target).to(torch.float32), None


def _divergence_summary(runs: list[dict]) -> dict:
    """runs: the greedy speculative runs' records ({"identical", "first_diff", "diagnosis"?})."""
    diverged = [r for r in runs if not r["identical"]]
    diags = [r["diagnosis"] for r in diverged if "diagnosis" in r]
    out = {"runs": len(runs), "identical": len(runs) - len(diverged), "diverged": len(diverged),
           "diverged_near_tie": sum(1 for d in diags if d["near_tie"]),
           "max_top2_gap": max((d["top2_gap"] for d in diags), default=None),
           "max_top2_gap_ulps": max((d["top2_gap_ulps"] for d in diags), default=None),
           "max_abs_ar_minus_spec": max((abs(d["ar_minus_spec"]) for d in diags if d["ar_minus_spec"] is not None),
                                        default=None)}
    fp32 = [d["fp32"] for d in diags if "fp32" in d]
    if fp32:
        out["fp32"] = {"checked": len(fp32), "prefers_ar": sum(1 for f in fp32 if f["prefers"] == "ar"),
                       "prefers_spec": sum(1 for f in fp32 if f["prefers"] == "spec"),
                       "max_top2_gap": max(f["top2_gap"] for f in fp32)}
    return out


def _agg(rows: list[dict]) -> dict:
    tokens = sum(r["tokens"] for r in rows)
    wall = sum(r["wall_s"] for r in rows)
    res = {"tokens": tokens, "wall_s": wall, "tok_s": tokens / max(wall, 1e-9)}
    if rows and "tau" in rows[0]:
        # tau over all rounds of the suite (tokens per verify round), and the per-prompt mean
        res["tau"] = tokens / max(1, sum(r["rounds"] for r in rows))
        res["tau_mean_per_prompt"] = mean(r["tau"] for r in rows)
    return res


def nearest_rank(values: list[float], q: float) -> float:
    """The q-quantile (0 < q <= 1) by nearest rank: a value that was measured, never an interpolation."""
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered), math.ceil(q * len(ordered))) - 1)]


def _per_mode(suites_out: dict, field: str) -> dict[str, list[float]]:
    """Every request's `field` over all suites, per mode (AR, HF, each spec run), where the request records it."""
    modes: dict[str, list[float]] = {}
    for suite in suites_out.values():
        for entry in suite["prompts"]:
            runs = [("ar", entry["ar"]), *([("hf", entry["hf"])] if "hf" in entry else []), *entry["spec"].items()]
            for mode, run in runs:
                if field in run:
                    modes.setdefault(mode, []).append(run[field])
    return modes


def request_percentiles(suites_out: dict) -> dict:
    """Per-request tok/s over every suite's requests, per mode (AR, HF, each spec run): count, p50, p99, min.
    A slow request (host jitter, a recompile) shows in p99/min, where suite means hide it."""
    # p99 "slowest": the rate that 99% of requests reach, i.e. the low tail
    return {mode: {"requests": len(v), "p50": nearest_rank(v, 0.5), "p99_slow": nearest_rank(v, 0.01),
                   "min": min(v), "max": max(v)} for mode, v in _per_mode(suites_out, "tok_s").items()}


def request_prefill_ms(suites_out: dict) -> dict:
    """Per-request prefill time (DecodeStats.prefill_s: the prompt through the models up to the first token), per
    mode (AR, each spec run; HF records none), in ms: count, mean, p50, max. Part of every request's wall time,
    the whole of a short answer's fixed cost."""
    modes = {mode: [1e3 * s for s in v] for mode, v in _per_mode(suites_out, "prefill_s").items()}
    return {mode: {"requests": len(v), "mean": mean(v), "p50": nearest_rank(v, 0.5), "max": max(v)}
            for mode, v in modes.items()}


def run_suite_bench(cfg: SuiteBenchConfig, command: list[str] | None = None) -> Path:
    from jetspec_trt.runtime.config import DEFAULT_TREE, TreeConfig
    from jetspec_trt.runtime.decoder import first_difference
    from jetspec_trt.runtime.engine import Engine
    from jetspec_trt.tree.accept import SamplingConfig

    prompts = load_suite_prompts(cfg.suites, cfg.num_prompts, cfg.prompts_file)
    engine = Engine.load(cfg.engine_dir, device=cfg.device)
    rt = engine.runtime
    base = getattr(rt, "tree", None)
    topk = cfg.topk or getattr(base, "topk", DEFAULT_TREE.topk)
    block = getattr(rt, "block_size", 16)
    depth = min(cfg.max_depth or getattr(base, "max_depth", block - 1), block - 1)
    built = TreeConfig(getattr(base, "budget", max(cfg.budgets)), topk, depth, getattr(base, "lookup", 0))
    trees = {b: built.fitted(b, depth) if cfg.lookup is None
             else TreeConfig(budget=b, topk=topk, max_depth=depth, lookup=min(cfg.lookup, b - 1, depth))
             for b in cfg.budgets}

    hf_model = None
    if cfg.hf_generate:
        from jetspec_trt.models.checkpoint import load_hf_model

        # The engine stores q/k/v and gate/up fused; load_hf_model hands transformers its own layout.
        hf_model = load_hf_model(Path(cfg.engine_dir) / "target", engine.dtype).to(cfg.device)
        hf_model.generation_config.pad_token_id = engine.tokenizer.pad_token_id or engine.tokenizer.eos_token_id

    # warm-up (CUDA graph capture, kernels) on a short request, not timed: each budget at each temperature, since
    # the graph decoder captures a bucket once per sampling mode (greedy, sample)
    warm_ids = engine.encode(prompts[cfg.suites[0]][0][1])
    for b in cfg.budgets:
        for t in cfg.temperatures:
            for _ in engine.stream_tokens(warm_ids, 8, SamplingConfig(temperature=t, seed=cfg.seed), True, trees[b]):
                pass
    for _ in engine.stream_tokens(warm_ids, 8, SamplingConfig(), False, None):
        pass
    if hf_model is not None:
        _hf_generate(hf_model, warm_ids, SuiteBenchConfig(**{**cfg.__dict__, "max_new_tokens": 8}))

    target = engine.target
    page_size = getattr(rt, "page_size", 64)
    fp32_target, fp32_note = None, None
    greedy_temps = [t for t in cfg.temperatures if t <= 0.0]

    suites_out: dict[str, dict] = {}
    for suite, rows in prompts.items():
        ar_rows, hf_rows, per_prompt = [], [], []
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
                        first = first_difference(tokens, ar_tokens)
                        r["identical"], r["first_diff"] = first is None, first
                        if first is not None:  # one extra prefill per divergent run, outside the timed region
                            if cfg.diagnose_fp32 and fp32_target is None and fp32_note is None:
                                fp32_target, fp32_note = _fp32_target(target, cfg.device)
                            r["diagnosis"] = diagnose_flip(target, ids, ar_tokens, tokens, first, page_size,
                                                           fp32_target, engine.tokenizer)
            if hf_model is not None and (cfg.hf_prompts is None or len(hf_rows) < cfg.hf_prompts):
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
            # per prompt, against the same prompt's AR run: one slow run (host jitter) moves it little
            a["speedup_vs_ar_median"] = median(r["tok_s"] / max(ar["tok_s"], 1e-9) for r, ar in zip(rs, ar_rows))
            if hf_agg:  # over the prompts HF ran on, side by side
                a["speedup_vs_hf"] = _agg(rs[: len(hf_rows)])["tok_s"] / hf_agg["tok_s"]
            if "identical" in rs[0]:
                a["lossless"] = _divergence_summary(rs)
            spec_agg[key] = a
        greedy = [(e["id"], b, e["spec"][f"b{b}_t{t:g}"]) for e in per_prompt for b in cfg.budgets
                  for t in greedy_temps]
        lossless = _divergence_summary([r for _, _, r in greedy])
        lossless["greedy_runs"] = lossless["runs"]  # (older readers)
        lossless["mismatches"] = [{"id": pid, "budget": b, "first_diff": r["first_diff"],
                                   **({"diagnosis": r["diagnosis"]} if "diagnosis" in r else {})}
                                  for pid, b, r in greedy if not r["identical"]]
        suites_out[suite] = {"num_prompts": len(rows), "ar": ar_agg, "hf": hf_agg, "spec": spec_agg,
                             "lossless": lossless, "prompts": per_prompt}

    # "decoder": what ran every request, greedy and sampled (GraphDecoder on CUDA; before it sampled, T > 0 ran
    # eager)
    result = {
        **engine_report_header("suite-bench", engine, cfg.device, type(engine.backend).__name__, command),
        "config": {"suites": list(cfg.suites), "num_prompts": cfg.num_prompts, "max_new_tokens": cfg.max_new_tokens,
                   "budgets": list(cfg.budgets), "temperatures": list(cfg.temperatures), "topk": topk,
                   "lookup": {b: tree.lookup for b, tree in trees.items()},
                   "max_depth": depth, "seed": cfg.seed, "batch_size": 1, "hf_generate": cfg.hf_generate,
                   "hf_prompts": cfg.hf_prompts,
                   "diagnose_fp32": cfg.diagnose_fp32},
        "divergence": {"near_tie_rule": f"the teacher-forced logits of the AR and the speculative token are both within "
                                        f"{NEAR_TIE_ULPS} ulp (engine dtype) of the top logit",
                       "near_tie_ulps": NEAR_TIE_ULPS, "fp32_note": fp32_note,
                       "total": _divergence_summary([r for s_ in suites_out.values() for e in s_["prompts"]
                                                     for r in e["spec"].values() if "identical" in r])},
        "request_tok_s": request_percentiles(suites_out),
        "request_prefill_ms": request_prefill_ms(suites_out),
        "suites": suites_out,
    }
    return write_report(result, "suites", cfg.output_dir, cfg.tag, plot_suites)


def engine_report_header(kind: str, engine, device: str, decoder: str, command: list[str] | None) -> dict:
    """The fields every real-engine bench report starts with: what ran, where, with which libraries, when, and
    the draft's vocabulary size (0: the whole vocabulary; build --draft-vocab)."""
    return report_header(kind, engine.engine_dir, device, dtype_name(engine.dtype), decoder, command) | {
        "draft_vocab": engine.decoder.runtime.draft_vocab}


def report_header(kind: str, engine_dir: Path, device: str, dtype: str, decoder: str,
                  command: list[str] | None) -> dict:
    """engine_report_header's fields for an engine this process did not load (the serving bench's server ran it)."""
    return {
        "kind": kind,
        "engine": str(engine_dir),
        "device": device,
        "device_name": device_name(device),
        "dtype": dtype,
        "decoder": decoder,
        "versions": library_versions("jetspec_trt", "torch", "transformers", "python", "cuda"),
        "command": " ".join(command or []),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def write_report(result: dict, prefix: str, output_dir: Path, tag: str, plot) -> Path:
    """OUTPUT_DIR/PREFIX-<cpu or the GPU's name>[-TAG].json and its PNG (plot(result, png_path))."""
    out_dir = Path(output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    where = "cpu" if torch.device(result["device"]).type == "cpu" else slug(result["device_name"])
    path = out_dir / ("-".join(x for x in (prefix, where, slug(tag)) if x) + ".json")
    path.write_text(json.dumps(result, indent=1, default=str))
    plot(result, path.with_suffix(".png"))
    return path


def format_summary(result: dict) -> str:
    """Console table: per suite AR / HF / every spec run (tau, tok/s, speedups) and, for greedy runs, how many
    matched AR, how many diverged at a near-tie, and the widest top-2 gap seen at a divergence."""
    head = (f"{'suite':<10} {'run':<10} {'tau':>5} {'tok/s':>8} {'xAR':>5} {'med':>5} {'xHF':>5}  "
            f"{'identical':>9} {'near-tie':>8} {'max gap':>8} {'(ulp)':>6}")
    lines = [f"{result['device_name']} ({result['dtype']}), {result['config']['max_new_tokens']} new tokens", head,
             "-" * len(head)]

    def num(x, fmt):
        return format(x, fmt) if x is not None else "-"

    for suite, s in result["suites"].items():
        lines.append(f"{suite:<10} {'AR':<10} {'':>5} {s['ar']['tok_s']:>8.1f}")
        if s.get("hf"):
            lines.append(f"{suite:<10} {'HF':<10} {'':>5} {s['hf']['tok_s']:>8.1f}")
        for key, a in s["spec"].items():
            line = (f"{suite:<10} {key:<10} {a['tau']:>5.2f} {a['tok_s']:>8.1f} {a['speedup_vs_ar']:>5.2f} "
                    f"{num(a.get('speedup_vs_ar_median'), '.2f'):>5} {num(a.get('speedup_vs_hf'), '.2f'):>5}")
            d = a.get("lossless")
            if d:
                line += (f"  {str(d['identical']) + '/' + str(d['runs']):>9} "
                         f"{str(d['diverged_near_tie']) + '/' + str(d['diverged']):>8} "
                         f"{num(d['max_top2_gap'], '.4g'):>8} {num(d['max_top2_gap_ulps'], '.1f'):>6}")
            lines.append(line)
    for mode, q in result.get("request_tok_s", {}).items():
        lines.append(f"per-request tok/s {mode:<8} n={q['requests']:<3} p50 {q['p50']:.1f}  p99-slow {q['p99_slow']:.1f}"
                     f"  min {q['min']:.1f}")
    for mode, q in result.get("request_prefill_ms", {}).items():
        lines.append(f"prefill ms        {mode:<8} n={q['requests']:<3} mean {q['mean']:.2f}  p50 {q['p50']:.2f}"
                     f"  max {q['max']:.2f}")
    tot = result.get("divergence", {}).get("total")
    if tot:
        lines.append(f"greedy speculative vs AR: {tot['identical']}/{tot['runs']} identical, "
                     f"{tot['diverged']} diverged, "
                     f"{tot['diverged_near_tie']} of them at a near-tie (< {result['divergence']['near_tie_ulps']} ulp "
                     f"of {result['dtype']}); widest gap at a divergence {num(tot['max_top2_gap'], '.4g')} "
                     f"({num(tot['max_top2_gap_ulps'], '.1f')} ulp)")
        if "fp32" in tot:
            f = tot["fp32"]
            lines.append(f"  float32 target at those positions: prefers AR's token {f['prefers_ar']}, spec's "
                         f"{f['prefers_spec']}, of {f['checked']}; widest fp32 top-2 gap {f['max_top2_gap']:.4g}")
        elif result["divergence"].get("fp32_note"):
            lines.append(f"  float32 check skipped: {result['divergence']['fp32_note']}")
    return "\n".join(lines)


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
    t_bar = min(cfg["temperatures"])
    for i, suite in enumerate(suites):
        s = result["suites"][suite]["spec"]
        for j, b in enumerate(cfg["budgets"]):
            a = s[f"b{b}_t{t_bar:g}"]
            ax2.bar(i + (2 * j) * width, a["speedup_vs_ar"], width, color=f"C{j}", label=f"vs AR b={b}" if i == 0 else None)
            if "speedup_vs_hf" in a:
                ax2.bar(i + (2 * j + 1) * width, a["speedup_vs_hf"], width, color=f"C{j}", alpha=0.45,
                        label=f"vs HF b={b}" if i == 0 else None)
    ax2.axhline(1.0, color="k", lw=0.7)
    labels = []
    for suite in suites:
        d = result["suites"][suite].get("lossless") or {}
        runs = d.get("runs", d.get("greedy_runs"))
        labels.append(suite if not runs else
                      f"{suite}\n{d['identical']}/{runs} = AR" +
                      (f", {d['diverged_near_tie']}/{d['diverged']} near-tie" if "diverged_near_tie" in d else ""))
    ax2.set_xticks([i + 0.4 - width / 2 for i in range(len(suites))], labels, fontsize=8)
    ax2.set_ylabel("wall-clock speedup")
    ax2.set_title(f"speedup (T={t_bar:g})")
    ax2.legend(fontsize=7)
    fig.suptitle(f"{Path(result['engine']).name} on {result['device_name']} ({result['dtype']}, batch 1, "
                 f"{cfg['max_new_tokens']} new tokens)")
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
