"""The one round loop (runtime/round_loop.py) over a scripted backend: EOS and the token limit inside a round,
statistics, streaming, AR as one token a round, and what the backend is asked to do and when."""

from __future__ import annotations

import pytest

from jetspec_trt.errors import JetSpecError
from jetspec_trt.runtime.backend import DecodeRequest, RoundResult
from jetspec_trt.runtime.config import RuntimeConfig, TreeConfig
from jetspec_trt.runtime.round_loop import DecodeStats, run_rounds
from jetspec_trt.tree.accept import SamplingConfig

EOS = 99


class ScriptedBackend:
    """Emits `first` at prefill, then the scripted rounds in order (each (tokens, drafted) or a token list);
    records the calls the loop makes."""

    def __init__(self, first: int, rounds: list, eos: tuple[int, ...] = (EOS,), max_seq_len: int = 1000,
                 tree: TreeConfig = TreeConfig(16, 4, 7)):
        self.runtime = RuntimeConfig(tree, "float32", max_seq_len, 8, 0, (0,), eos)
        self.first, self.rounds = first, list(rounds)
        self.stats: DecodeStats | None = None
        self.calls: list[str] = []
        self.request: DecodeRequest | None = None
        self.seen_stats: list[DecodeStats | None] = []

    @property
    def vocab_size(self) -> int:
        return 100

    def prepare(self, request: DecodeRequest) -> None:
        self.calls.append("prepare")
        self.request = request

    def prefill(self, request: DecodeRequest) -> int:
        self.calls.append("prefill")
        assert request is self.request
        self.logprobs = [-float(self.first)]  # a token's "log prob" is minus the token: easy to check
        return self.first

    def decode_round(self) -> RoundResult:
        self.calls.append("round")
        self.seen_stats.append(self.stats)
        tokens, drafted = self.rounds.pop(0)
        self.logprobs = [-float(t) for t in tokens]
        return RoundResult(tokens, drafted, min(drafted, len(tokens) - 1))

    def finish(self) -> None:
        self.calls.append("finish")


def spec_rounds(*rounds: list[int], drafted: int = 15) -> list[tuple[list[int], int]]:
    return [(r, drafted) for r in rounds]


def test_streaming_chunks_are_the_rounds_tokens():
    rounds = [[1, 2, 3], [4], [5, 6], [7, 8, 9, 10]]
    backend = ScriptedBackend(0, spec_rounds(*rounds))
    chunks = list(run_rounds(backend, [3, 4], 11))
    assert chunks == [[0], *rounds]
    assert backend.calls == ["prepare", "prefill"] + ["round"] * 4 + ["finish"]
    assert backend.stats.finish_reason == "length" and backend.stats.new_tokens == 11


def test_stats_count_rounds_drafts_and_acceptances():
    rounds = spec_rounds([1, 2, 3], [4], [5, 6, 7, 8], drafted=15)
    backend = ScriptedBackend(0, rounds + spec_rounds([9, 10], drafted=3))
    chunks = list(run_rounds(backend, [3, 4, 5], 11))  # the limit falls on the last round's last token
    stats = backend.stats
    assert backend.seen_stats and all(s is stats for s in backend.seen_stats)  # published before the rounds
    assert stats.prompt_tokens == 3
    assert stats.rounds == 4 == len(chunks) - 1
    assert stats.drafted_tokens == 15 * 3 + 3
    assert stats.accepted_drafts == 2 + 0 + 3 + 1
    assert stats.emitted_per_round == [3, 1, 4, 2]
    assert stats.tau == pytest.approx(10 / 4)
    assert stats.histogram() == {1: 1, 2: 1, 3: 1, 4: 1}
    assert stats.new_tokens == 11
    assert stats.prefill_s >= 0 and stats.decode_s > 0
    assert stats.tokens_per_s > 0


def test_eos_in_the_middle_of_a_round_cuts_the_round_and_stops():
    backend = ScriptedBackend(0, spec_rounds([1, 2], [3, EOS, 4, 5], [6, 7]))
    chunks = list(run_rounds(backend, [3], 50))
    assert chunks == [[0], [1, 2], [3, EOS]]
    stats = backend.stats
    assert stats.finish_reason == "stop" and stats.new_tokens == 5
    assert stats.rounds == 2 and stats.emitted_per_round == [2, 4]  # a round counts all it emitted
    assert backend.rounds == spec_rounds([6, 7])  # no round after the stop
    assert backend.calls[-1] == "finish"


def test_token_limit_in_the_middle_of_a_round():
    backend = ScriptedBackend(0, spec_rounds([1, 2, 3], [4, 5, 6, 7], [8]))
    chunks = list(run_rounds(backend, [3], 6))
    assert chunks == [[0], [1, 2, 3], [4, 5]]
    assert backend.stats.finish_reason == "length" and backend.stats.new_tokens == 6
    assert backend.rounds == spec_rounds([8])


def test_limit_and_eos_at_the_same_token_is_a_stop():
    backend = ScriptedBackend(0, spec_rounds([1, EOS, 3]))
    assert list(run_rounds(backend, [3], 3)) == [[0], [1, EOS]]
    assert backend.stats.finish_reason == "stop"


def test_first_token_ends_the_request_without_a_round():
    for first, max_new, reason in ((EOS, 10, "stop"), (5, 1, "length")):
        backend = ScriptedBackend(first, [])
        assert list(run_rounds(backend, [3], max_new)) == [[first]]
        assert backend.calls == ["prepare", "prefill", "finish"]
        assert backend.stats.finish_reason == reason and backend.stats.rounds == 0 and backend.stats.tau == 0


def test_one_token_a_round_is_ar():
    backend = ScriptedBackend(0, [([t], 0) for t in range(1, 30)], eos=())
    chunks = list(run_rounds(backend, [3], 20, speculative=False))
    assert chunks == [[t] for t in range(20)]
    stats = backend.stats
    assert stats.rounds == 19 and stats.emitted_per_round == [1] * 19 and stats.tau == 1
    assert stats.drafted_tokens == stats.accepted_drafts == 0
    assert backend.request.speculative is False


def test_logprobs_follow_the_tokens_the_loop_keeps():
    backend = ScriptedBackend(7, spec_rounds([1, 2], [3, EOS, 4, 5], [6]))
    chunks = list(run_rounds(backend, [3], 50, logprobs=True))
    assert backend.request.logprobs is True
    assert backend.stats.token_logprobs == [-float(t) for c in chunks for t in c] == [-7, -1, -2, -3, -EOS]
    limited = ScriptedBackend(7, spec_rounds([1, 2, 3, 4]))
    list(run_rounds(limited, [3], 3, logprobs=True))  # cut at the limit, mid-round
    assert limited.stats.token_logprobs == [-7, -1, -2]
    plain = ScriptedBackend(7, spec_rounds([1, 2, 3, 4]))
    list(run_rounds(plain, [3], 3))
    assert plain.request.logprobs is False and plain.stats.token_logprobs == []


def test_the_request_the_backend_sees():
    backend = ScriptedBackend(0, [], tree=TreeConfig(16, 4, 7))
    sampling = SamplingConfig(temperature=0.7, top_p=0.9, seed=3)
    list(run_rounds(backend, (1, 2), 1, sampling))
    assert backend.request == DecodeRequest([1, 2], sampling, True, TreeConfig(16, 4, 7))  # the runtime's tree
    tree = TreeConfig(4, 2, 3)
    list(run_rounds(backend, [1], 1, tree=tree))
    assert backend.request.tree == tree and backend.request.speculative and backend.request.sampling.greedy
    list(run_rounds(backend, [1], 1, tree=TreeConfig(1, 4, 7)))  # budget 1: nothing to draft, AR steps
    assert backend.request.speculative is False


def test_max_seq_len_caps_the_new_tokens():
    backend = ScriptedBackend(0, spec_rounds([1, 2, 3, 4], [5, 6, 7, 8]), max_seq_len=10)
    chunks = list(run_rounds(backend, [1, 2, 3, 4, 5, 6], 50))
    assert [t for c in chunks for t in c] == [0, 1, 2, 3]
    assert backend.stats.finish_reason == "length"


@pytest.mark.parametrize("prompt,max_new,message", [
    ([], 5, "empty prompt"), ([1], 0, "max_new_tokens"), ([1, 100], 5, "token ids"), ([1] * 1000, 5, "max_seq_len"),
])
def test_bad_requests_fail_before_the_backend_runs(prompt, max_new, message):
    backend = ScriptedBackend(0, [])
    with pytest.raises(JetSpecError, match=message):
        next(run_rounds(backend, prompt, max_new))
    assert backend.calls == [] and backend.stats is None


def test_every_decoder_is_a_backend():
    from jetspec_trt.export.onnx_runner import OnnxRunner
    from jetspec_trt.runtime.decoder import Decoder
    from jetspec_trt.runtime.graph_decoder import GraphDecoder

    for cls in (Decoder, GraphDecoder, OnnxRunner):
        for name in ("prepare", "prefill", "decode_round", "finish"):
            assert callable(getattr(cls, name)), (cls, name)
        assert isinstance(cls.vocab_size, property), cls
