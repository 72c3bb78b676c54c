"""`jetspec-trt bench --engine DIR --batch 1,4,16`: in-flight batching of a real engine, speculative against AR.

The same N = max(batch sizes) prompts (taken from the suites in turn) are submitted at once to the engine's
scheduler (runtime/scheduler.py) with max_batch = B, for each B, in three modes in the same process: "spec" (one
tree per sequence at --budgets' first value every round), "spec-auto" (the per-step budget, at most that one,
chosen by the engine's cost model: runtime/cost_model.py) and "ar" (budget 1). Reported per (B, mode): aggregate
tok/s (all tokens over the wall time of the whole run), per-stream tok/s (a request's tokens over the time from
the end of the step that prefilled it to its end), mean tau, and how many outputs equal the same prompt's output
at B = 1 (the single-stream outputs: greedy batching is exact in fp32; in bf16 the batched GEMMs round
differently and near-ties may flip).

On CUDA the scheduler's two model passes replay CUDA graphs per batch and token bucket (SchedulerConfig.
graph_passes; --no-batch-graphs: eager, for comparison), captured before each timed run; its trees and
acceptance stay on the host, so B = 1 is still slower than the engine's single stream, whose whole round is
graphed. The JSON says which path ran.

`jetspec-trt bench --random-target qwen3-8b --batch 1,4,16,64` (no --engine): the same runs, "spec" and "ar", on a
preset's shape with random weights made on the device (run_random_batch_bench), prompts of random token ids.
Speed does not depend on the values, acceptance does: a random head's drafts are almost never accepted, so each
speculative row also gives its aggregate tok/s projected at given taus (--taus, the paper's by default): the
measured tok/s x tau / measured tau, the step's time being the same whatever it accepts (the trees have a fixed
budget), as the single-stream engine bench projects from its round time.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from tqdm import tqdm

from jetspec_trt.bench.suites import engine_report_header, mixed_suite_prompts, report_header, write_report
from jetspec_trt.devices import sync
from jetspec_trt.errors import JetSpecError


# mode -> (speculative, the scheduler's budget policy)
MODES = {"spec": (True, "fixed"), "spec-auto": (True, "cost_model"), "ar": (False, "fixed")}


@dataclass(frozen=True)
class BatchBenchConfig:
    engine_dir: Path
    batches: tuple[int, ...] = (1, 4, 16)
    budget: int = 16
    suites: tuple[str, ...] = ("mtbench", "math500", "humaneval")
    prompts_file: Path | None = None
    max_new_tokens: int = 128
    modes: tuple[str, ...] = ("spec", "spec-auto", "ar")  # of MODES; "ar" is the baseline of every ratio
    device: str = "cuda"
    # The scheduler's passes replayed from CUDA graphs where it can (SchedulerConfig.graph_passes left to the
    # device); False: eager passes, to measure what the graphs save.
    graph_passes: bool = True
    output_dir: Path = Path("bench/results")
    tag: str = ""

    def __post_init__(self):
        check_batches(self.batches)
        if "ar" not in self.modes or not set(self.modes) <= set(MODES):
            raise JetSpecError(f"--batch-modes must include ar and be among {','.join(MODES)}, got "
                               f"{','.join(self.modes)}")


def _prompt_ids(engine, cfg: BatchBenchConfig) -> list[list[int]]:
    """N = max(batches) prompts, the suites in turn."""
    return [engine.encode(messages) for _, _, messages in
            mixed_suite_prompts(cfg.suites, max(cfg.batches), cfg.prompts_file)]


def run_batched(engine, device: str, prompts: list[list[int]], max_batch: int, max_new_tokens: int,
                mode: str, tree, graph_passes: bool = True) -> dict:
    """All prompts submitted at once to a scheduler of max_batch sequences; stepped until idle (synchronised).
    The passes' graphs are captured before the clock starts."""
    from jetspec_trt.runtime.scheduler import SchedulerConfig

    speculative, policy = MODES[mode]
    config = SchedulerConfig.full_batch(engine.runtime, max_batch, policy, None if graph_passes else False)
    scheduler = engine.new_scheduler(config)
    scheduler.prepare_passes(tree.budget)
    ids = [scheduler.add_request(p, max_new_tokens, speculative=speculative, tree=tree) for p in prompts]
    tokens = {i: [] for i in ids}
    admitted, ended, stats = {}, {}, {}
    sync(device)
    start = time.perf_counter()
    while not scheduler.idle:
        outputs = scheduler.step()
        sync(device)
        now = time.perf_counter() - start
        for out in outputs:
            admitted.setdefault(out.request_id, now)  # admission and its prefill happen in the step that ends here
            tokens[out.request_id].extend(out.tokens)
            if out.finished:
                ended[out.request_id], stats[out.request_id] = now, out.stats
    wall = time.perf_counter() - start
    total = sum(len(t) for t in tokens.values())
    per_stream = [len(tokens[i]) / max(ended[i] - admitted[i], 1e-9) for i in ids]
    return {"outputs": [tokens[i] for i in ids], "wall_s": wall, "tokens": total, "aggregate_tok_s": total / wall,
            "per_stream_tok_s_median": statistics.median(per_stream),
            "tau_mean": statistics.fmean(stats[i].tau for i in ids),
            **({"steps_per_budget": dict(sorted(scheduler.budget_steps.items()))} if policy == "cost_model" else {})}


def check_batches(batches: tuple[int, ...]) -> None:
    if not batches or min(batches) < 1:
        raise JetSpecError(f"--batch sizes must be >= 1, got {','.join(map(str, batches))}")


def passes_label(graph_passes: bool, device: str) -> str:
    return "batched passes from CUDA graphs" if graph_passes and device.startswith("cuda") else "eager batched passes"


def run_modes(engine, device: str, prompts: list[list[int]], batches: tuple[int, ...], max_new_tokens: int,
              trees: dict, graph_passes: bool) -> tuple[list[dict], dict]:
    """run_batched for every batch size (ascending) and mode (trees: mode -> its tree; "ar" among them) after an
    untimed warm-up of each mode (kernels, allocator). Returns the rows, each with identical_to_smallest_batch
    (outputs equal to the mode's at the smallest batch: B = 1 when asked for) and, speculative, speedup_vs_batched_ar
    (against the same batch's "ar" row); and the outputs by (batch, mode)."""
    for mode, tree in trees.items():
        run_batched(engine, device, prompts[:2], 2, 4, mode, tree, graph_passes)
    rows, outputs = [], {}
    # One line a run on stderr: a lease polls a detached bench's log, and the 8B shape's runs take minutes each
    progress = tqdm([(b, m) for b in sorted(set(batches)) for m in trees], desc="batch bench", mininterval=0)
    for batch, mode in progress:
        progress.set_postfix(batch=batch, mode=mode)
        run = run_batched(engine, device, prompts, batch, max_new_tokens, mode, trees[mode], graph_passes)
        outputs[batch, mode] = run.pop("outputs")
        smallest = outputs[min(batches), mode]
        run["identical_to_smallest_batch"] = sum(a == b for a, b in zip(outputs[batch, mode], smallest))
        rows.append({"batch": batch, "mode": mode, **run})
        progress.write(f"batch {batch} {mode}: {run['aggregate_tok_s']:.1f} tok/s aggregate")
    ar = {r["batch"]: r["aggregate_tok_s"] for r in rows if r["mode"] == "ar"}
    for row in rows:
        if row["mode"] != "ar":
            row["speedup_vs_batched_ar"] = row["aggregate_tok_s"] / ar[row["batch"]]
    return rows, outputs


def run_batch_bench(cfg: BatchBenchConfig, command: list[str] | None = None) -> Path:
    from jetspec_trt.runtime.config import TreeConfig
    from jetspec_trt.runtime.engine import Engine

    engine = Engine.load(cfg.engine_dir, device=cfg.device)
    base = engine.runtime.tree
    spec = TreeConfig(cfg.budget, base.topk, base.max_depth)
    trees = {mode: spec if MODES[mode][0] else TreeConfig(1, 1, 1) for mode in MODES if mode in cfg.modes}
    if "spec-auto" in trees:  # the cost model for this device: stored at build, or measured now up to this run's passes
        engine.cost_model(max(cfg.batches), max(cfg.batches) * cfg.budget)
    prompts = _prompt_ids(engine, cfg)
    rows, _ = run_modes(engine, cfg.device, prompts, cfg.batches, cfg.max_new_tokens, trees, cfg.graph_passes)
    passes = passes_label(cfg.graph_passes, cfg.device)
    result = {
        **engine_report_header("batch", engine, cfg.device, f"scheduler ({passes})", command),
        "config": {**{k: v for k, v in asdict(cfg).items() if k != "engine_dir"}, "requests": len(prompts),
                   "topk": base.topk, "max_depth": base.max_depth,
                   "cost_model": engine.summary.get("cost_model")},
        "results": rows,
    }
    return write_report(result, "batch", cfg.output_dir, cfg.tag, plot_batch)


@dataclass(frozen=True)
class RandomBatchConfig:
    random_target: str = "qwen3-8b"
    batches: tuple[int, ...] = (1, 4, 16, 64)
    budget: int = 16
    topk: int = 7
    max_depth: int = 7
    taus: tuple[float, ...] = (10.76, 5.94)  # the paper's Qwen3-8B tau on MATH-500 and MT-Bench (budget 256)
    prompt_tokens: int = 128
    max_new_tokens: int = 64
    dtype: str = "bfloat16"
    device: str = "cuda"
    graph_passes: bool = True
    output_dir: Path = Path("bench/results")
    tag: str = ""


@dataclass
class RandomPair:
    """A random-weight target and draft head with a runtime: what run_batched asks of an engine."""

    target: object
    draft: object
    runtime: object

    def new_scheduler(self, config):
        from jetspec_trt.runtime.scheduler import Scheduler

        return Scheduler(self.target, self.draft, self.runtime, config)


def run_random_batch_bench(cfg: RandomBatchConfig, command: list[str] | None = None) -> Path:
    """run_batch_bench's spec and ar runs on a preset's shape with random weights (module docstring)."""
    import torch

    from jetspec_trt.dtypes import parse_dtype
    from jetspec_trt.models.presets import random_models
    from jetspec_trt.runtime.config import RuntimeConfig, TreeConfig

    check_batches(cfg.batches)
    if torch.device(cfg.device).type == "cuda" and not torch.cuda.is_available():
        raise JetSpecError(f"--device {cfg.device}: there is no CUDA GPU here (--device cpu runs the same bench, or "
                           "--engine for a built engine's)")
    target, draft, _ = random_models(cfg.random_target, cfg.device, parse_dtype(cfg.dtype))
    target.fuse_weights()
    draft.fuse_weights()
    spec = draft.spec
    tree = TreeConfig(cfg.budget, cfg.topk, min(cfg.max_depth, spec.max_depth))
    runtime = RuntimeConfig(tree, cfg.dtype, cfg.prompt_tokens + cfg.max_new_tokens + 64, spec.block_size,
                            spec.mask_token_id, spec.target_layer_ids, eos_token_ids=())
    generator = torch.Generator().manual_seed(0)
    vocab = target.config.vocab_size
    prompts = [torch.randint(vocab, (cfg.prompt_tokens,), generator=generator).tolist() for _ in range(max(cfg.batches))]
    rows, outputs = run_modes(RandomPair(target, draft, runtime), cfg.device, prompts, cfg.batches,
                              cfg.max_new_tokens, {"spec": tree, "ar": TreeConfig(1, 1, 1)}, cfg.graph_passes)
    for row in rows:
        if row["mode"] == "spec":  # lossless at every batch: the same tokens as batched AR (exact in float32)
            batch, scale = row["batch"], {str(t): t / row["tau_mean"] for t in cfg.taus}
            row["identical_to_ar"] = sum(a == b for a, b in zip(outputs[batch, "spec"], outputs[batch, "ar"]))
            row["projected_aggregate_tok_s"] = {t: row["aggregate_tok_s"] * k for t, k in scale.items()}
            row["projected_speedup_vs_batched_ar"] = {t: row["speedup_vs_batched_ar"] * k for t, k in scale.items()}
    passes = passes_label(cfg.graph_passes, cfg.device)
    result = {
        **report_header("batch", Path(f"random:{cfg.random_target}"), cfg.device, cfg.dtype,
                        f"scheduler ({passes})", command),
        "model": f"{cfg.random_target} (random weights)",
        "config": {**asdict(cfg), "requests": len(prompts)},
        "results": rows,
    }
    return write_report(result, "batch", cfg.output_dir, cfg.tag or f"{cfg.random_target}-projected", plot_batch)


def format_summary(result: dict) -> str:
    lines = [f"{result['device_name']} ({result['dtype']}), {result['config']['requests']} requests x "
             f"{result['config']['max_new_tokens']} new tokens, {result['decoder']}",
             "batch       mode  aggregate tok/s  per-stream tok/s  tau   same as smallest batch"]
    for r in result["results"]:
        lines.append(f"{r['batch']:>5}  {r['mode']:>9}  {r['aggregate_tok_s']:>15.1f}  "
                     f"{r['per_stream_tok_s_median']:>16.1f}  {r['tau_mean']:.2f}  "
                     f"{r['identical_to_smallest_batch']}/{result['config']['requests']}"
                     + (f"   /AR {r['speedup_vs_batched_ar']:.2f}x" if "speedup_vs_batched_ar" in r else "")
                     + (f"   steps per budget {r['steps_per_budget']}" if "steps_per_budget" in r else "")
                     + "".join(f"   at tau {t}: {v:.0f} tok/s, /AR {r['projected_speedup_vs_batched_ar'][t]:.2f}x"
                               for t, v in r.get("projected_aggregate_tok_s", {}).items()))
    return "\n".join(lines)


def plot_batch(result: dict, path: Path) -> None:
    from jetspec_trt.bench.plots import plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    budget = result["config"]["budget"]
    labels = {"spec": f"speculative (budget {budget})", "spec-auto": f"speculative, cost-model budget (<= {budget})",
              "ar": "AR"}
    for (mode, label), color in zip(labels.items(), ("C0", "C2", "C1")):
        rows = [r for r in result["results"] if r["mode"] == mode]
        if not rows:
            continue
        batches = [r["batch"] for r in rows]
        axes[0].plot(batches, [r["aggregate_tok_s"] for r in rows], "o-", color=color, label=label)
        axes[1].plot(batches, [r["per_stream_tok_s_median"] for r in rows], "o-", color=color, label=label)
        for tau, style in zip(sorted({t for r in rows for t in r.get("projected_aggregate_tok_s", {})}), ("--", ":")):
            axes[0].plot(batches, [r["projected_aggregate_tok_s"][tau] for r in rows], style, color=color,
                         label=f"{label}, projected at tau {tau}")
    for ax, title in zip(axes, ("aggregate tok/s", "per-stream tok/s (median)")):
        ax.set(title=title, xlabel="max batch (sequences)", ylabel="tok/s", xscale="log")
        ax.set_xticks(sorted({r["batch"] for r in result["results"]}),
                      [str(b) for b in sorted({r["batch"] for r in result["results"]})])
        ax.minorticks_off()
        ax.legend(fontsize=8)
    fig.suptitle(f"{Path(result['engine']).name} on {result['device_name']} ({result['dtype']}, "
                 f"{result['decoder']})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
