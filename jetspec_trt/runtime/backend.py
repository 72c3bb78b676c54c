"""The seam between the one round loop (runtime/round_loop.py) and what runs the models.

The loop owns everything a request does that does not depend on how the models run: the prompt check, the
statistics, EOS and the token limit, timing and streaming. A backend owns the models, the caches and every
state that lives between rounds (the anchor, the features the draft has not seen yet, a sampling generator):

    backend.prepare(request)        once per request, untimed: compile or capture what the request's shape needs
    backend.prefill(request)        timed as prefill_s: the prompt through the target; returns the first token
    backend.decode_round()          one target forward after prefill: a speculative round (draft, tree, verify,
                                    accept, commit) when request.speculative, else one AR step; returns the
                                    tokens it emitted and what it drafted / accepted
    backend.finish()                after the last round the loop reads: leave the caches at the committed length

A backend that takes `request.logprobs` sets `backend.logprobs` after prefill and after each round: the log
probability of each token it returned (tree.accept.token_logprobs); one that cannot refuses it in `prepare`.

A backend may work ahead of the loop (the graph backend queues round r+1 before it returns round r): what a
round returns is what the loop counts, and `finish` undoes whatever ran past the last round the loop read.

Backends: runtime/decoder.py (eager reference, CPU or CUDA, greedy and sampling) and export/onnx_runner.py
(onnxruntime), both through runtime/host_rounds.py; runtime/graph_decoder.py (CUDA graphs, greedy and sampling).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from jetspec_trt.runtime.config import RuntimeConfig, TreeConfig
from jetspec_trt.tree.accept import SamplingConfig

if TYPE_CHECKING:
    from jetspec_trt.runtime.round_loop import DecodeStats


@dataclass(frozen=True)
class DecodeRequest:
    """One generate call as a backend sees it (the prompt already checked)."""

    prompt_ids: list[int]
    sampling: SamplingConfig
    speculative: bool  # draft a tree every round (asked for, and the tree's budget is over 1); else AR steps
    tree: TreeConfig
    logprobs: bool = False  # report each emitted token's log probability under the target (backend.logprobs)


@dataclass(frozen=True)
class RoundResult:
    """What one decode round did: the tokens it emitted (accepted drafts, then the target's bonus token; one
    token for an AR step), the tree nodes it drafted below the root and how many of them the target accepted."""

    emitted: list[int]
    drafted: int = 0
    accepted: int = 0


class DecodeBackend(Protocol):
    runtime: RuntimeConfig  # eos_token_ids, max_seq_len and the default tree
    stats: DecodeStats | None  # set by the loop at the start of each request and updated every round

    @property
    def vocab_size(self) -> int: ...

    def prepare(self, request: DecodeRequest) -> None: ...

    def prefill(self, request: DecodeRequest) -> int: ...

    def decode_round(self) -> RoundResult: ...

    def finish(self) -> None: ...
