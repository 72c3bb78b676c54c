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

import datetime as dt
import itertools
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from jetspec_trt.devices import device_name
from jetspec_trt.dtypes import dtype_name
from jetspec_trt.errors import JetSpecError

COST_MODEL = "cost_model.json"

# Calibration prior: this many predicted accepted drafts, accepted at the draft's own word (scale 1), so the
# first few rounds move the scale but cannot throw it to 0 or to a huge value.
CALIBRATION_PRIOR = 4.0


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
    sequence that turns easy or hard; the draft's probabilities do, round by round."""

    costs: CostModel
    accepted: float = CALIBRATION_PRIOR
    predicted: float = CALIBRATION_PRIOR

    @property
    def scale(self) -> float:
        return self.accepted / self.predicted

    def observe(self, predicted: float, accepted: int) -> None:
        """A verified tree: its predicted accepted drafts (unscaled) and how many the target accepted."""
        self.predicted += predicted
        self.accepted += accepted

    def choose(self, curves: list[list[float]], others: int, drafted: bool) -> int:
        """The budget b maximising expected tokens per second of the step. curves[i][j]: expected accepted
        drafts of speculative sequence i's tree of j + 1 nodes (its length is that tree's size); `others`:
        sequences taking an AR step anyway; `drafted`: the draft pass has run (its time is spent whatever b is;
        otherwise b = 1 saves it)."""
        best, best_rate = 1, 0.0
        for b in doubling_up_to(max(len(c) for c in curves)):
            tokens = others + sum(1 + self.scale * c[min(b, len(c)) - 1] for c in curves)
            nodes = others + sum(min(b, len(c)) for c in curves)
            seconds = self.costs.verify_cost(nodes) + (self.costs.draft_cost(len(curves)) if drafted or b > 1 else 0)
            if tokens / seconds > best_rate:
                best, best_rate = b, tokens / seconds
        return best
