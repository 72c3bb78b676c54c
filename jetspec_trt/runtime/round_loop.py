"""The one decode loop: prompt check, prefill, rounds until EOS or the token limit, statistics, streaming.

Every decoder runs through `run_rounds` as a backend (runtime/backend.py): the eager reference `Decoder`, the
CUDA-graph `GraphDecoder` and the onnxruntime `OnnxRunner`. The loop yields the prefill's token, then each round's
tokens (cut at the first EOS or at the limit), and keeps `backend.stats` current while it runs.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterator

from jetspec_trt.errors import JetSpecError
from jetspec_trt.runtime.backend import DecodeBackend, DecodeRequest, RoundResult
from jetspec_trt.runtime.config import RuntimeConfig, TreeConfig
from jetspec_trt.tree.accept import SamplingConfig


@dataclass
class DecodeStats:
    prompt_tokens: int = 0
    new_tokens: int = 0
    rounds: int = 0  # target forwards after prefill (tree verifies, or AR steps)
    drafted_tokens: int = 0  # tree nodes below the root, summed over rounds
    accepted_drafts: int = 0  # drafted tokens the target accepted
    emitted_per_round: list[int] = field(default_factory=list)  # accepted drafts + bonus
    prefill_s: float = 0.0
    decode_s: float = 0.0
    finish_reason: str = ""
    token_logprobs: list[float] = field(default_factory=list)  # with logprobs: log p of each new token

    @property
    def tau(self) -> float:
        """Mean tokens emitted per verify round (accepted drafts + the bonus token)."""
        return sum(self.emitted_per_round) / max(1, len(self.emitted_per_round))

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / max(self.prefill_s + self.decode_s, 1e-9)

    def histogram(self) -> dict[int, int]:
        return dict(sorted(Counter(self.emitted_per_round).items()))

    def count_round(self, result: RoundResult) -> None:
        """Add one decode round (before the token limit cuts its tokens: tau counts what the round emitted)."""
        self.rounds += 1
        self.drafted_tokens += result.drafted
        self.accepted_drafts += result.accepted
        self.emitted_per_round.append(len(result.emitted))


class TokenLimit:
    """Cuts each round's tokens at the first EOS or at the token limit, and says when generation is over."""

    def __init__(self, max_new_tokens: int, eos_token_ids: tuple[int, ...], stats: DecodeStats):
        self.max_new_tokens = max_new_tokens
        self.eos = set(eos_token_ids)
        self.stats = stats

    def take(self, tokens: list[int]) -> tuple[list[int], bool]:
        stats = self.stats
        room = self.max_new_tokens - stats.new_tokens
        for i, t in enumerate(tokens[:room]):
            if t in self.eos:
                stats.finish_reason = "stop"
                tokens = tokens[: i + 1]
                break
        else:
            if len(tokens) >= room:
                stats.finish_reason = "length"
            tokens = tokens[:room]
        stats.new_tokens += len(tokens)
        return tokens, bool(stats.finish_reason)


def check_prompt(prompt_ids: list[int], max_new_tokens: int, vocab_size: int, max_seq_len: int) -> int:
    """Validate a request; return the number of new tokens that fit in the engine's max_seq_len."""
    if not prompt_ids:
        raise JetSpecError("empty prompt")
    if max_new_tokens < 1:
        raise JetSpecError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if min(prompt_ids) < 0 or max(prompt_ids) >= vocab_size:
        raise JetSpecError(f"prompt token ids must be in [0, {vocab_size})")
    if len(prompt_ids) >= max_seq_len:
        raise JetSpecError(f"prompt has {len(prompt_ids)} tokens; the engine's max_seq_len is {max_seq_len}")
    return min(max_new_tokens, max_seq_len - len(prompt_ids))


def new_request(runtime: RuntimeConfig, vocab_size: int, prompt_ids: list[int], max_new_tokens: int,
                sampling: SamplingConfig, speculative: bool, tree: TreeConfig | None,
                logprobs: bool) -> tuple[DecodeRequest, int]:
    """The checked request (check_prompt) and the new tokens it may make. `tree` defaults to the runtime's; a tree
    of budget 1 drafts nothing, so the request is not speculative."""
    max_new_tokens = check_prompt(prompt_ids, max_new_tokens, vocab_size, runtime.max_seq_len)
    tree = tree or runtime.tree
    return DecodeRequest(list(prompt_ids), sampling, speculative and tree.budget > 1, tree, logprobs), max_new_tokens


def run_rounds(backend: DecodeBackend, prompt_ids: list[int], max_new_tokens: int,
               sampling: SamplingConfig = SamplingConfig(), speculative: bool = True,
               tree: TreeConfig | None = None, logprobs: bool = False) -> Iterator[list[int]]:
    """Yield the prefill's token, then the new tokens of each round; `backend.stats` describes the call once the
    iterator ends (and the request so far while it runs). `tree` defaults to the backend's runtime tree; a tree
    of budget 1 drafts nothing, so its rounds are AR steps. With `logprobs`, stats.token_logprobs holds the log
    probability of every yielded token (the backend's, cut where the tokens are cut)."""
    runtime = backend.runtime
    request, max_new_tokens = new_request(runtime, backend.vocab_size, prompt_ids, max_new_tokens, sampling,
                                          speculative, tree, logprobs)
    backend.stats = stats = DecodeStats(prompt_tokens=len(prompt_ids))
    limit = TokenLimit(max_new_tokens, runtime.eos_token_ids, stats)
    backend.prepare(request)

    start = time.perf_counter()
    first = backend.prefill(request)
    stats.prefill_s = time.perf_counter() - start
    tokens, done = limit.take([first])
    if logprobs:
        stats.token_logprobs.extend(backend.logprobs[: len(tokens)])
    yield tokens
    start = time.perf_counter()
    while not done:
        result = backend.decode_round()
        stats.count_round(result)
        tokens, done = limit.take(result.emitted)
        if logprobs:
            stats.token_logprobs.extend(backend.logprobs[: len(tokens)])
        yield tokens
    backend.finish()
    stats.decode_s = time.perf_counter() - start
