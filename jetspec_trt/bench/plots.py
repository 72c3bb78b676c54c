"""PNG plots of benchmark reports (matplotlib, no display needed)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

STAGE_COLORS = {"draft": "#4c72b0", "tree": "#dd8452", "verify": "#55a868", "accept": "#c44e52"}


def plot_engine_bench(report: dict, path: Path) -> None:
    contexts = sorted({r["context"] for r in report["rounds"]})
    budgets = sorted({r["budget"] for r in report["rounds"]})
    steps = {a["context"]: a["step_ms"] for a in report["ar_step"]}
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
        ax.set(title=f"context {context}", xlabel="tree budget (nodes)", ylabel="ms")
        ax.legend(fontsize=7)
    ax = axes[-1]
    taus = sorted({t for r in report["rounds"] for t in r["projected_tok_s"]}, key=float)
    context = 2048 if 2048 in contexts else contexts[0]
    for tau in taus:
        ax.plot(budgets, [next(r for r in report["rounds"] if r["budget"] == b and r["context"] == context)
                          ["projected_tok_s"][tau] for b in budgets], "o-", label=f"projected, tau {tau}")
    ax.axhline(1000 / steps[context], color="gray", ls="--", label="AR")
    gemv = {a["context"]: a["step_ms"] for a in report.get("ar_step_gemv", [])}
    if context in gemv:
        ax.axhline(1000 / gemv[context], color="teal", ls="--", label="AR, GEMV kernel")
    if "hf_generate" in report:
        ax.axhline(report["hf_generate"]["tok_s"], color="purple", ls=":", label="HF generate")
    ax.set(title=f"tokens/s at context {context}", xlabel="tree budget (nodes)", ylabel="tok/s", xscale="log")
    ax.minorticks_off()
    ax.set_xticks(budgets, [str(b) for b in budgets])
    ax.legend(fontsize=7)
    fig.suptitle(f"{report['model']} on {report['device']} ({report['date']})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
