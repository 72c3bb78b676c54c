"""The scheduler's driver thread (runtime/scheduler_thread.py) over one Engine's weights (Engine.new_scheduler):
requests submitted at once from several threads decode together in one scheduler, each token for token as it
does alone through the eager Decoder (greedy, and seeded sampling with log probs); cancelled requests, waiting
ones included, leave at once without a prefill; a request its callback ends early leaves too; close() ends what
is live."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import pytest
import torch

from jetspec_trt.runtime.config import TreeConfig
from jetspec_trt.runtime.decoder import Decoder
from jetspec_trt.runtime.engine import Engine
from jetspec_trt.runtime.scheduler import SchedulerConfig
from jetspec_trt.runtime.scheduler_thread import SchedulerThread, Submission
from jetspec_trt.tree.accept import SamplingConfig
from tests.helpers import tiny_pair, tiny_runtime

TIMEOUT_S = 120


@pytest.fixture(scope="module")
def engine(tmp_path_factory) -> Engine:
    torch.set_num_threads(1)  # tiny matmuls: threads only add overhead
    target, draft = tiny_pair(tmp_path_factory.mktemp("tiny"))
    runtime = tiny_runtime(draft, TreeConfig(16, 4, 5))
    return Engine(Decoder(target, draft, runtime), None, tmp_path_factory.mktemp("engine"))


@dataclass
class Client:
    """One request's view: the tokens and stats it was streamed, how it ended."""

    prompt: list[int]
    max_new: int
    sampling: SamplingConfig = SamplingConfig()
    logprobs: bool = False
    stop_after: int | None = None  # end the request from its callback once it has this many tokens
    tokens: list[int] = field(default_factory=list)
    outputs: int = 0
    stats: object = None
    aborted: tuple | None = None
    cancelled: threading.Event = field(default_factory=threading.Event)
    done: threading.Event = field(default_factory=threading.Event)

    def submission(self) -> Submission:
        return Submission(self.prompt, self.max_new, self.sampling, self.logprobs, self.on_output, self.on_abort,
                          self.cancelled.is_set)

    def on_output(self, out) -> bool:
        self.tokens.extend(out.tokens)
        self.outputs += 1
        self.stats = out.stats
        ended = self.stop_after is not None and len(self.tokens) >= self.stop_after
        if out.finished or ended:
            self.done.set()
        return ended

    def on_abort(self, reason, started, error) -> None:
        self.aborted = (reason, started, error)
        self.done.set()


def driver_for(engine: Engine, max_batch: int) -> SchedulerThread:
    return SchedulerThread(lambda: engine.new_scheduler(SchedulerConfig.full_batch(engine.runtime, max_batch)))


def alone(engine: Engine, client: Client) -> tuple[list[int], object]:
    chunks = engine.decoder.generate(client.prompt, client.max_new, client.sampling, logprobs=client.logprobs)
    return [t for chunk in chunks for t in chunk], engine.decoder.stats


def test_new_scheduler_shares_the_engines_weights(engine):
    scheduler = engine.new_scheduler(SchedulerConfig(num_pages=8, max_batch=2))
    assert scheduler.target is engine.decoder.target and scheduler.draft is engine.decoder.draft
    assert scheduler.runtime is engine.runtime


def test_concurrent_submissions_interleave_in_one_scheduler(engine):
    """Four threads submit three requests each at once; the driver runs them four at a time (the rest wait in
    the scheduler's queue), and every request's tokens, log probs and round statistics are its own alone."""
    clients = [[Client([5 + c, 9, 200 - r, 31, 7][: 2 + (c + r) % 4], 6 + 3 * ((c * 3 + r) % 5),
                       SamplingConfig(0.8, 0.9, seed=100 * c + r) if (c + r) % 2 else SamplingConfig(),
                       logprobs=r == 1)
                for r in range(3)] for c in range(4)]
    driver = driver_for(engine, max_batch=4)
    start = threading.Barrier(len(clients))

    def submit_all(own: list[Client]) -> None:
        start.wait(timeout=TIMEOUT_S)
        for client in own:
            driver.submit(client.submission())

    threads = [threading.Thread(target=submit_all, args=(own,)) for own in clients]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(TIMEOUT_S)
        for client in (c for own in clients for c in own):
            assert client.done.wait(TIMEOUT_S), "a request never finished"
    finally:
        driver.close(TIMEOUT_S)
    assert driver.peak_batch == 4  # requests ran together (and the batch was full)
    for client in (c for own in clients for c in own):
        tokens, stats = alone(engine, client)
        assert client.aborted is None and client.tokens == tokens, client.sampling
        assert client.stats.finish_reason == stats.finish_reason and client.stats.rounds == stats.rounds
        assert client.stats.token_logprobs == pytest.approx(stats.token_logprobs, abs=1e-5)
    assert len({tuple(c.tokens) for own in clients for c in own}) > 6  # distinct outputs: a mix-up would show


def test_cancelled_requests_leave_at_once_and_waiting_ones_pay_no_prefill(engine):
    driver = driver_for(engine, max_batch=1)
    running = Client([5, 9, 200], 200)
    waiting = [Client([42, i], 8) for i in range(3)]
    try:
        driver.submit(running.submission())
        for client in waiting:
            driver.submit(client.submission())
        while running.outputs < 3:  # the waiting ones sat in the scheduler's queue through these steps
            assert not running.done.wait(0.01)
        for client in waiting:
            client.cancelled.set()
        for client in waiting:
            assert client.done.wait(TIMEOUT_S)
            assert client.aborted == ("cancelled", False, None) and client.outputs == 0
        assert not running.done.is_set()  # still decoding: it is the only one running
        running.cancelled.set()
        assert running.done.wait(TIMEOUT_S) and running.aborted == ("cancelled", True, None)
        assert running.stats.new_tokens < 200
        after = Client([7, 7], 5)  # the driver serves on; all pages went back to the pools
        driver.submit(after.submission())
        assert after.done.wait(TIMEOUT_S) and after.tokens == alone(engine, after)[0]
        scheduler = driver.scheduler
        assert scheduler.idle and scheduler.target_pool.free_pages == scheduler.target_pool.num_pages
        assert scheduler.draft_pool.free_pages == scheduler.draft_pool.num_pages
    finally:
        driver.close(TIMEOUT_S)


def test_a_request_its_callback_ends_leaves_and_close_ends_the_rest(engine):
    driver = driver_for(engine, max_batch=2)
    stopped, long = Client([3, 4, 5], 40, stop_after=5), Client([6, 7], 200)
    try:
        driver.submit(stopped.submission())
        driver.submit(long.submission())
        assert stopped.done.wait(TIMEOUT_S) and stopped.aborted is None
        calls = stopped.outputs
        while long.outputs < calls + 3:  # steps went on without it
            assert not long.done.wait(0.01)
        assert stopped.outputs == calls and len(stopped.tokens) >= 5
        assert stopped.tokens == alone(engine, stopped)[0][: len(stopped.tokens)]
    finally:
        driver.close(TIMEOUT_S)
    assert long.aborted == ("unloading", True, None)
    bad = Client([engine.target_config.vocab_size], 4)  # refused by add_request: fails alone
    driver = driver_for(engine, max_batch=2)
    try:
        driver.submit(bad.submission())
        assert bad.done.wait(TIMEOUT_S) and bad.aborted[:2] == ("error", False)
        assert "prompt token ids" in str(bad.aborted[2])
    finally:
        driver.close(TIMEOUT_S)
