"""What a scheduler step costs on this device, and the per-step tree budget chosen from it.

A step of the in-flight scheduler (runtime/scheduler.py) is one draft pass over the speculative sequences and
one target pass over every sequence's nodes. The cost model holds both as measured seconds: the target pass
against the total new tokens in it (every sequence's tree, or anchor for an AR step) and the draft pass against
the number of sequences it drafts for, each timed on the scheduler's own passes over its paged caches
(`scheduler.measure_cost_model`), and read between points by piecewise-linear interpolation. It is measured at
build time on the build device and stored as cost_model.json in the engine directory. Times belong to a device:
a model measured on the CPU says nothing about a GPU, so the engine uses the stored file only where the device
name and dtype match, and measures anew otherwise (runtime/engine.py, Engine.cost_model).

`BudgetChooser` uses it: each step it picks one per-sequence budget b (1, or a power of two up to the largest
tree budget) that maximises the batch's expected emitted tokens per second. On a GPU a target pass over a few
hundred tokens costs about what one token costs, so trees are free at small batch; on the CPU (or at a large
batch on a GPU) a pass costs about its tokens and batched AR wins. Batched AR is the same round with b = 1.
"""

from __future__ import annotations

import bisect
import datetime as dt
import itertools
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from jetspec_trt.devices import device_name
from jetspec_trt.dtypes import dtype_name
from jetspec_trt.errors import JetSpecError
from jetspec_trt.runtime.config import TreeConfig
from jetspec_trt.tree.tree import DraftTree, with_chain

COST_MODEL = "cost_model.json"

# Calibration prior: this many predicted accepted drafts, accepted at the draft's own word (scale 1), so the
# first few rounds move the scale but cannot throw it to 0 or to a huge value.
CALIBRATION_PRIOR = 4.0
# A context-lookup chain's own nodes (those the draft's tree does not hold) have no draft probability: they are
# worth their measured acceptance, accepted over offered, from this prior (one in eight; lease 10's default tree
# gained tau 1-3 from chains of up to 15 nodes) until rounds have measured it.
CHAIN_PRIOR_ACCEPTED, CHAIN_PRIOR_OFFERED = 1.0, 8.0


def _interpolate(xs: tuple[int, ...], ys: tuple[float, ...], x: float) -> float:
    """Piecewise linear through the points; flat below the first, the last segment's slope beyond the last.
    A time below an earlier point's is timing noise (more tokens never cost less): it counts as that one."""
    ys = list(itertools.accumulate(ys, max))
    if x <= xs[0] or len(xs) == 1:
        return ys[0]
    i = next((i for i in range(1, len(xs)) if x <= xs[i]), len(xs) - 1)
    return ys[i - 1] + (ys[i] - ys[i - 1]) / (xs[i] - xs[i - 1]) * (x - xs[i - 1])


@dataclass(frozen=True)
class CostModel:
    device_name: str  # device_name() above: where the times were taken
    dtype: str  # the dtype the passes ran in
    created: str
    context: int  # committed tokens of each sequence while timed
    verify_tokens: tuple[int, ...]  # target pass: total new tokens of all sequences in it, ascending
    verify_s: tuple[float, ...]  # its median seconds
    draft_sequences: tuple[int, ...]  # draft pass: sequences drafted for, ascending
    draft_s: tuple[float, ...]

    def verify_cost(self, tokens: int) -> float:
        return _interpolate(self.verify_tokens, self.verify_s, tokens)

    def draft_cost(self, sequences: int) -> float:
        return _interpolate(self.draft_sequences, self.draft_s, sequences) if sequences else 0.0

    def matches(self, device: str | torch.device, dtype: torch.dtype) -> bool:
        return self.device_name == device_name(device) and self.dtype == dtype_name(dtype)

    def describe(self) -> str:
        return (f"measured on {self.device_name} ({self.dtype}) {self.created}: target pass "
                f"{self.verify_s[0] * 1e3:.1f} ms at {self.verify_tokens[0]} token(s), {self.verify_s[-1] * 1e3:.1f} "
                f"ms at {self.verify_tokens[-1]}; draft pass {self.draft_s[0] * 1e3:.1f} ms for "
                f"{self.draft_sequences[0]} sequence(s)")

    @classmethod
    def measured(cls, device: str | torch.device, dtype: torch.dtype, context: int,
                 verify: dict[int, float], draft: dict[int, float]) -> "CostModel":
        return cls(device_name(device), dtype_name(dtype),
                   dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), context,
                   tuple(sorted(verify)), tuple(verify[k] for k in sorted(verify)),
                   tuple(sorted(draft)), tuple(draft[k] for k in sorted(draft)))

    def save(self, engine_dir: Path) -> Path:
        path = Path(engine_dir) / COST_MODEL
        path.write_text(json.dumps(asdict(self), indent=1) + "\n")
        return path

    @classmethod
    def load(cls, engine_dir: Path) -> "CostModel | None":
        """The engine's stored model; None if it has none (built with --no-cost-model, or before cost models).
        A file that is there but unreadable is an error: delete it, or rebuild, rather than guess."""
        path = Path(engine_dir) / COST_MODEL
        if not path.is_file():
            return None
        try:
            raw = json.loads(path.read_text())
            model = cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()})
            ok = (len(model.verify_tokens) == len(model.verify_s) >= 1
                  and len(model.draft_sequences) == len(model.draft_s) >= 1
                  and list(model.verify_tokens) == sorted(set(model.verify_tokens))
                  and list(model.draft_sequences) == sorted(set(model.draft_sequences))
                  and min(model.verify_s + model.draft_s) > 0)
        except (json.JSONDecodeError, TypeError) as err:
            raise JetSpecError(f"{path}: malformed cost model ({err}); delete it to measure anew") from err
        if not ok:
            raise JetSpecError(f"{path}: malformed cost model (points must be ascending with positive times); "
                               "delete it to measure anew")
        return model


def doubling_up_to(largest: int) -> list[int]:
    """1, the powers of two below `largest`, and `largest`: the budgets scored each step, the points measured."""
    out, b = [1], 2
    while b < largest:
        out.append(b)
        b *= 2
    return out + ([largest] if largest > 1 else [])


@dataclass
class BudgetChooser:
    """Each step's per-sequence tree budget under a cost model.

    Expected tokens of a sequence's round at budget b: 1 (the target's own token) plus the expected accepted
    drafts of its tree's first b nodes. A best-first tree's smaller budgets are its prefixes, and under the
    draft's own probabilities a node is accepted iff its path is, so that expectation is the sum of exp(score)
    over those nodes (DraftTree.expected_accepted), known from the draft pass alone for every b at once. A head's
    probabilities are not the target's acceptance (over-confident heads, temperature), so they are scaled by one
    measured factor: accepted drafts over predicted ones, summed over this scheduler's rounds. That beats a
    measured tau per budget, which would only be known for the budgets that ran and could not follow a
    sequence that turns easy or hard; the draft's probabilities do, round by round. A context-lookup chain's own
    nodes count at their measured acceptance instead (`chain_rate`), see round_curves."""

    costs: CostModel
    accepted: float = CALIBRATION_PRIOR
    predicted: float = CALIBRATION_PRIOR
    chain_accepted: float = CHAIN_PRIOR_ACCEPTED
    chain_offered: float = CHAIN_PRIOR_OFFERED

    @property
    def scale(self) -> float:
        return self.accepted / self.predicted

    @property
    def chain_rate(self) -> float:
        return self.chain_accepted / self.chain_offered

    def observe(self, predicted: float, accepted: int, chain_offered: int = 0, chain_accepted: int = 0) -> None:
        """A verified tree: its draft nodes' predicted accepted drafts (unscaled) and how many of them the target
        accepted; its lookup chain's own nodes, offered and accepted."""
        self.predicted += predicted
        self.accepted += accepted
        self.chain_offered += chain_offered
        self.chain_accepted += chain_accepted

    def choose(self, curves: list[list[float]], others: int, drafted: bool,
               chains: list[list[int] | None] | None = None) -> int:
        """The budget b maximising expected tokens per second of the step. curves[i][j]: expected accepted
        drafts of speculative sequence i's draft nodes in its round at budget j + 1 (its length is its largest
        budget); chains[i][j] (None: no chain): its lookup chain's own nodes at that budget; `others`: sequences
        taking an AR step anyway; `drafted`: the draft pass has run (its time is spent whatever b is; otherwise
        b = 1 saves it)."""
        chains = chains or [None] * len(curves)
        best, best_rate = 1, 0.0
        for b in doubling_up_to(max(len(c) for c in curves)):
            tokens = others + sum(1 + self.scale * c[min(b, len(c)) - 1]
                                  + (self.chain_rate * ch[min(b, len(ch)) - 1] if ch else 0.0)
                                  for c, ch in zip(curves, chains))
            nodes = others + sum(min(b, len(c)) for c in curves)
            seconds = self.costs.verify_cost(nodes) + (self.costs.draft_cost(len(curves)) if drafted or b > 1 else 0)
            if tokens / seconds > best_rate:
                best, best_rate = b, tokens / seconds
        return best


def _split(draft: DraftTree, chain: list[int], tree: TreeConfig, budget: int) -> tuple[int, int]:
    """At `budget` (at most the request's own): the chain tokens kept (TreeConfig.lookup_at: all at its own budget,
    at most half of a smaller one) and the draft's best nodes kept beside them."""
    kept = min(len(chain), tree.lookup_at(budget))
    return kept, min(budget - kept, draft.size)


def cut_tree(draft: DraftTree, chain: list[int], tree: TreeConfig, budget: int | None) -> tuple[DraftTree | None, int]:
    """The tree a sequence verifies at a step's budget, and how many of its nodes are the draft's (the rest are
    its lookup chain's own): an AR step at 1 (no tree), else the draft's best nodes with the chain's first tokens
    merged in (_split; None or a budget above the request's own: its whole tree), as TreeConfig.fitted cuts the
    default tree for `run --budget`."""
    if budget == 1:
        return None, 0
    kept, drafted = _split(draft, chain, tree, tree.budget if budget is None else min(budget, tree.budget))
    return with_chain(draft.prefix(drafted) if drafted < draft.size else draft, chain[:kept]), drafted


def round_curves(draft: DraftTree, chain: list[int], tree: TreeConfig) -> tuple[list[float], list[int] | None]:
    """BudgetChooser.choose's curves of one sequence: per budget b = j + 1 (up to its own), the expected accepted
    drafts of the draft nodes cut_tree keeps, and (None without a chain) the chain's own nodes there: the chain
    tokens the kept draft nodes do not hold (siblings never repeat a token, so the chain follows the draft's
    nodes while they hold it, and a prefix of the draft keeps a path's nodes in order)."""
    expected = draft.expected_accepted().tolist()
    if not chain:
        return expected, None
    held, node = [], 0  # draft node of chain[: k + 1], while the draft holds the chain
    for token in chain:
        node = draft.children[node].get(token)
        if node is None:
            break
        held.append(node)
    curve, own = [], []
    for budget in range(1, tree.budget + 1):
        kept, drafted = _split(draft, chain, tree, budget)
        curve.append(expected[drafted - 1])
        own.append(kept - bisect.bisect_left(held, drafted, hi=min(kept, len(held))))  # held ascends
    return curve, own
