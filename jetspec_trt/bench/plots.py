"""PNG plots of benchmark reports (matplotlib, no display needed)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

STAGE_COLORS = {"draft": "#4c72b0", "tree": "#dd8452", "verify": "#55a868", "accept": "#c44e52"}
FP8_COLOR = "#8c564b"  # the FP8 target's series (engine bench --fp8), beside the bf16 ones
DEFAULTS_COLOR = "#e377c2"  # the engines' default switches and tree (engine bench "*_defaults" rows)


def _by_context(rows: list[dict]) -> dict[int, float]:
    return {r["context"]: r["step_ms"] for r in rows}


def plot_engine_bench(report: dict, path: Path) -> None:
    contexts = sorted({r["context"] for r in report["rounds"]})
    budgets = sorted({r["budget"] for r in report["rounds"]})
    steps, default_steps = _by_context(report["ar_step"]), _by_context(report.get("ar_step_defaults", []))
    fp8_rounds = report.get("rounds_fp8", [])
    fp8_steps, fp8_gemv = _by_context(report.get("ar_step_fp8", [])), _by_context(report.get("ar_step_gemv_fp8", []))
    fig, axes = plt.subplots(1, len(contexts) + 1, figsize=(5 * (len(contexts) + 1), 4.5))
    for ax, context in zip(axes, contexts):
        rows = {r["budget"]: r for r in report["rounds"] if r["context"] == context}
        bottom = [0.0] * len(budgets)
        for stage, color in STAGE_COLORS.items():
            values = [rows[b][f"{stage}_ms"] for b in budgets]
            ax.bar([str(b) for b in budgets], values, bottom=bottom, color=color, label=stage)
            bottom = [x + y for x, y in zip(bottom, values)]
        ax.plot([str(b) for b in budgets], [rows[b]["round_ms"] for b in budgets], "k.-", label="round (graphed)")
        ax.axhline(steps[context], color="gray", ls="--", label="AR step")
        ax.axhline(1.5 * steps[context], color="gray", ls=":", label="1.5 x AR step")
        defaults = {r["budget"]: r["round_ms"] for r in report.get("rounds_defaults", []) if r["context"] == context}
        if defaults:  # what a built engine runs: its default switches and tree
            ax.plot([str(b) for b in budgets], [defaults[b] for b in budgets], "^-", color=DEFAULTS_COLOR,
                    label="round, engine defaults")
        if context in default_steps:
            ax.axhline(default_steps[context], color=DEFAULTS_COLOR, ls="--", label="AR step, engine defaults")
        fp8 = {r["budget"]: r["round_ms"] for r in fp8_rounds if r["context"] == context}
        if fp8:
            ax.plot([str(b) for b in budgets], [fp8[b] for b in budgets], "s--", color=FP8_COLOR,
                    label="round, FP8 target (graphed)")
        if context in fp8_steps:
            ax.axhline(fp8_steps[context], color=FP8_COLOR, ls="--", label="AR step, FP8")
        ax.set(title=f"context {context}", xlabel="tree budget (nodes)", ylabel="ms")
        ax.legend(fontsize=7)
    ax = axes[-1]
    taus = sorted({t for r in report["rounds"] for t in r["projected_tok_s"]}, key=float)
    context = 2048 if 2048 in contexts else contexts[0]
    fp8 = {r["budget"]: r for r in fp8_rounds if r["context"] == context}
    for tau in taus:
        (line,) = ax.plot(budgets, [next(r for r in report["rounds"] if r["budget"] == b and r["context"] == context)
                                    ["projected_tok_s"][tau] for b in budgets], "o-", label=f"projected, tau {tau}")
        if fp8:  # the same tau's FP8 projection in its color, dashed
            ax.plot(budgets, [fp8[b]["projected_tok_s"][tau] for b in budgets], "s--", color=line.get_color(),
                    label=f"projected FP8, tau {tau}")
    ax.axhline(1000 / steps[context], color="gray", ls="--", label="AR")
    defaults = {r["budget"]: r for r in report.get("rounds_defaults", []) if r["context"] == context}
    for tau in taus if defaults else ():
        ax.plot(budgets, [defaults[b]["projected_tok_s"][tau] for b in budgets], "^-", color=DEFAULTS_COLOR,
                alpha=0.6, label=f"projected, engine defaults, tau {tau}")
    gemv = _by_context(report.get("ar_step_gemv", []))
    for rows, color, ls, label in ((gemv, "teal", "--", "AR, GEMV kernel"),
                                   (default_steps, DEFAULTS_COLOR, "-", "AR, engine defaults"),
                                   (fp8_steps, FP8_COLOR, "--", "AR, FP8"),
                                   (fp8_gemv, FP8_COLOR, "-.", "AR, FP8 GEMV")):
        if context in rows:
            ax.axhline(1000 / rows[context], color=color, ls=ls, label=label)
    if "hf_generate" in report:
        ax.axhline(report["hf_generate"]["tok_s"], color="purple", ls=":", label="HF generate")
    ax.set(title=f"tokens/s at context {context}", xlabel="tree budget (nodes)", ylabel="tok/s", xscale="log")
    ax.minorticks_off()
    ax.set_xticks(budgets, [str(b) for b in budgets])
    ax.legend(fontsize=7)
    fp8_note = "; FP8 target beside bf16 (brown, dashed)" if fp8_rounds else ""
    fig.suptitle(f"{report['model']} on {report['device']} ({report['date']}){fp8_note}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_acceptance_bench(report: dict, path: Path) -> None:
    """One panel per suite: simulated greedy tau against the tree budget, a line per tree width."""
    suites = report["suites"]
    fig, axes = plt.subplots(1, len(suites), figsize=(5 * len(suites), 4.2), squeeze=False)
    for ax, (suite, row) in zip(axes[0], suites.items()):
        for width, taus in row["tau"].items():
            budgets = [int(b) for b in taus]
            ax.plot(budgets, list(taus.values()), "s--" if "lookup" in width else "o-", label=f"width {width}")
        ax.set(title=f"{suite} ({row['prompts']} prompts, {row['response_tokens']} tokens)",
               xlabel="tree budget (nodes)", ylabel="tau (simulated, greedy)", xscale="log")
        ax.minorticks_off()
        ax.set_xticks(budgets, [str(b) for b in budgets])
        ax.legend(fontsize=8)
    fig.suptitle(f"{report['engine']} on {report['device_name']} ({report['date']})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
