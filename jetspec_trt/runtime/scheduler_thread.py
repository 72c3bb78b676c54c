"""One thread that owns a Scheduler (runtime/scheduler.py) and feeds it requests from any thread: what a server
needs to batch every concurrent request into one engine.

The scheduler is not thread-safe, so every call into it happens here, on the driver thread: other threads hand
requests over through a queue (`submit`), and each request's tokens come back through its own callbacks, which
run on the driver thread. Between steps the driver polls each request's `is_cancelled` and cancels it in the
scheduler at once, waiting ones included (they never pay their prefill).

    driver = SchedulerThread(lambda: engine.new_scheduler(SchedulerConfig.full_batch(engine.runtime, max_batch)))
    driver.submit(Submission(prompt_ids, 64, SamplingConfig(), False, on_output=..., on_abort=...))
    ...
    driver.close()   # live requests end with on_abort("unloading")
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass
from typing import Callable

from jetspec_trt.runtime.scheduler import Scheduler, StepOutput
from jetspec_trt.tree.accept import SamplingConfig


@dataclass
class Submission:
    """A request for the driver thread: what Scheduler.add_request takes, and where its results go. The callbacks
    run on the driver thread (keep them short: every running request waits for them)."""

    prompt_ids: list[int]
    max_new_tokens: int
    sampling: SamplingConfig
    logprobs: bool
    # Each step's tokens of the request (the first call: its prefill ran). Return True to end it before the
    # scheduler would (a stop word): it is cancelled there and its pages return at once.
    on_output: Callable[[StepOutput], bool]
    # It ended without finishing: reason "cancelled" (is_cancelled said so), "unloading" (the driver closed) or
    # "error" (`error` says why); `started`: whether its prefill had run. Must not raise (it would end the driver).
    on_abort: Callable[[str, bool, BaseException | None], None]
    is_cancelled: Callable[[], bool] = lambda: False  # polled before every step
    started: bool = False  # set by the driver at the first output


class SchedulerThread:
    def __init__(self, new_scheduler: Callable[[], Scheduler], on_step: Callable[[int], None] = lambda n: None):
        """`new_scheduler` makes the scheduler (again after a step fails: its state is unknown then);
        `on_step(n)` runs after each step that ran `n` sequences (metrics)."""
        self._new_scheduler = new_scheduler
        self._on_step = on_step
        self.scheduler = new_scheduler()
        self._inbox: queue.Queue[Submission | None] = queue.Queue()
        self._live: dict[int, Submission] = {}  # scheduler request id -> submission, driver thread only
        self.peak_batch = 0  # most sequences one step ran (evidence of interleaving, for tests and logs)
        self._thread = threading.Thread(target=self._run, name="jetspec-scheduler", daemon=True)
        self._thread.start()

    def submit(self, submission: Submission) -> None:
        """Any thread: the request joins the scheduler before its next step."""
        self._inbox.put(submission)

    def close(self, timeout: float | None = None) -> None:
        """Any thread but the driver's: stop after the current step; every live request gets on_abort("unloading")."""
        self._inbox.put(None)
        self._thread.join(timeout)

    # ---- the driver thread ----

    def _run(self) -> None:
        while True:
            if not self._take_inbox(block=self.scheduler.idle):
                self._abort_all("unloading")
                return
            for request_id, submission in list(self._live.items()):
                if submission.is_cancelled():
                    self._end(request_id, "cancelled")
            if self.scheduler.idle:
                continue
            try:
                outputs = self.scheduler.step()
            except Exception as err:  # noqa: BLE001 - fail what ran, keep serving on a fresh scheduler
                self._abort_all("error", err)
                self.scheduler = self._new_scheduler()
                continue
            self.peak_batch = max(self.peak_batch, len(outputs))
            self._on_step(len(outputs))
            for out in outputs:
                self._deliver(out)

    def _take_inbox(self, block: bool) -> bool:
        """Add the submissions handed over so far (waiting for one when `block`); False once close() was called."""
        while True:
            try:
                submission = self._inbox.get(block=block)
            except queue.Empty:
                return True
            if submission is None:
                return False
            block = False
            try:
                request_id = self.scheduler.add_request(submission.prompt_ids, submission.max_new_tokens,
                                                        submission.sampling, logprobs=submission.logprobs)
            except Exception as err:  # noqa: BLE001 - a bad request fails alone
                submission.on_abort("error", False, err)
                continue
            self._live[request_id] = submission

    def _deliver(self, out: StepOutput) -> None:
        submission = self._live[out.request_id]
        submission.started = True
        try:
            ended = submission.on_output(out)
        except Exception as err:  # noqa: BLE001 - a failing callback ends its own request only
            self._end(out.request_id, "error", err, cancel=not out.finished)
            return
        if out.finished or ended:
            if not out.finished:
                self.scheduler.cancel(out.request_id)
            del self._live[out.request_id]

    def _end(self, request_id: int, reason: str, error: BaseException | None = None, cancel: bool = True) -> None:
        submission = self._live.pop(request_id)
        if cancel:
            self.scheduler.cancel(request_id)
        submission.on_abort(reason, submission.started, error)

    def _abort_all(self, reason: str, error: BaseException | None = None) -> None:
        """End every live request; the scheduler is being dropped (closing, or a step failed), so no cancel."""
        for request_id in list(self._live):
            self._end(request_id, reason, error, cancel=False)
