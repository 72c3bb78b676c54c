"""Triton python-backend model that serves a jetspec-trt engine (decoupled: streams one response per round).

`jetspec-trt export triton` copies this file to `<repo>/<model>/1/model.py`; it runs inside Triton's python stub
and imports `jetspec_trt` from the Python environment the stub runs in (`jetspec-trt serve` arranges that). It
cannot be imported outside Triton (`triton_python_backend_utils` exists only there).

Each model instance loads one engine; `execute` checks every request at once (bad input gets an error response
right away) and hands it on, one of two ways (the model parameter `inflight_batch`):

    1 (default)  one worker thread decodes queued requests one at a time (Engine.stream_tokens, the graphed
                 decoder on CUDA), so the engine is never used by two requests at once. It checks for client
                 cancellation and unloading before it starts a prompt (a request cancelled while it waited costs
                 no prefill) and between rounds.
    N > 1        in-flight batching: every prompt joins one scheduler over the engine's weights
                 (Engine.new_scheduler), driven by one thread (runtime/scheduler_thread.py) that runs a batched
                 round of up to N sequences per step and polls each request's cancellation before every step
                 (a cancelled request leaves the scheduler at once; one still waiting never pays its prefill).
                 The scheduler runs every request the eager Decoder runs (greedy, sampling, top_k, top_p, bad
                 words, log probs); end_id and stop words cut the token stream here, as on the other path, and
                 end the request in the scheduler.

Both paths build their responses from the same per-prompt `Output`. Every request ends with a response carrying
TRITONSERVER_RESPONSE_COMPLETE_FINAL. Custom metrics on Triton's metrics endpoint (METRICS below) count prefills,
cancellations, the queue and the batched steps.
Tensor names and meanings: `jetspec_trt/export/triton.py` (INPUTS, OUTPUTS, TensorRT-LLM's request contract)
and docs/triton.md. Like TensorRT-LLM's model, a request of several prompts gets one response per prompt, each
carrying its `batch_index`.
"""

from __future__ import annotations

import json
import math
import queue
import threading
import traceback
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
REQUIRED = object()
# Inputs of TensorRT-LLM's contract this model takes only at the value that leaves decoding as it is (a penalty or
# a minimum length would change the distribution, which the sampler does not implement): name -> (default, the
# values allowed, what the error says).
NEUTRAL_ONLY = {
    "beam_width": (1, lambda v: v == 1, "must be 1 (no beam search)"),
    "num_return_sequences": (1, lambda v: v == 1, "must be 1"),
    "repetition_penalty": (1.0, lambda v: v == 1.0, "must be 1 (penalties are not implemented)"),
    "presence_penalty": (0.0, lambda v: v == 0.0, "must be 0 (penalties are not implemented)"),
    "frequency_penalty": (0.0, lambda v: v == 0.0, "must be 0 (penalties are not implemented)"),
    "min_tokens": (0, lambda v: v <= 1, "must be 0 or 1 (a minimum length is not implemented)"),
    "min_length": (0, lambda v: v <= 1, "must be 0 or 1 (a minimum length is not implemented)"),
    "return_context_logits": (False, lambda v: not v, "must be false (context logits are not returned)"),
    "return_generation_logits": (False, lambda v: not v, "must be false (generation logits are not returned)"),
    "return_perf_metrics": (False, lambda v: not v, "must be false (perf metrics are not returned)"),
}
# Custom metrics (Triton's /metrics, labelled model, version, instance): name -> (kind, description).
METRICS = {
    "jetspec_prefills_total": ("COUNTER", "Prompts whose decoding started: one target prefill each"),
    "jetspec_cancelled_total": ("COUNTER", "Requests cancelled by the client; stage queued: seen before any "
                                           "decoding (no prefill), stage decoding: seen between rounds"),
    "jetspec_queued_requests": ("GAUGE", "Requests accepted and waiting for this instance's engine"),
    "jetspec_steps_total": ("COUNTER", "In-flight batching: scheduler steps, one batched round each"),
    "jetspec_step_sequences_total": ("COUNTER", "In-flight batching: sequences the steps ran, summed (divided by "
                                                "jetspec_steps_total: the mean batch)"),
}


class RequestError(Exception):
    """Bad input in one request: answered with an error response, the server carries on."""


class Stop(Exception):
    """Generation ended early: the client cancelled, or the model is being unloaded."""

    def __init__(self, message: str, code):
        super().__init__(message)
        self.code = code


class Metrics:
    """The METRICS of one model instance; no-ops (with a warning) where Triton's metrics are off.

    Updates are serialized: the stub (python backend 2.51) keeps a metric's pending operation in the Metric object
    and sends it with the GIL released, so two threads updating one metric at once can crash tritonserver."""

    def __init__(self, labels: dict):
        self.families, self.metrics = {}, {}
        self.lock = threading.Lock()
        try:
            for name, (kind, description) in METRICS.items():
                self.families[name] = pb_utils.MetricFamily(name=name, description=description,
                                                            kind=getattr(pb_utils.MetricFamily, kind))
            self.metrics["prefills"] = self.families["jetspec_prefills_total"].Metric(labels=labels)
            for stage in ("queued", "decoding"):
                self.metrics[f"cancelled_{stage}"] = self.families["jetspec_cancelled_total"].Metric(
                    labels={**labels, "stage": stage})
            self.metrics["queued"] = self.families["jetspec_queued_requests"].Metric(labels=labels)
            self.metrics["steps"] = self.families["jetspec_steps_total"].Metric(labels=labels)
            self.metrics["step_sequences"] = self.families["jetspec_step_sequences_total"].Metric(labels=labels)
        except Exception as err:  # noqa: BLE001 - metrics are optional (tritonserver --allow-metrics=false)
            pb_utils.Logger.log_warn(f"jetspec: custom metrics unavailable: {one_line(err)}")
            self.close()

    def add(self, key: str, value: float = 1) -> None:
        metric = self.metrics.get(key)
        if metric is None:
            return
        try:
            with self.lock:
                metric.increment(value)
        except Exception as err:  # noqa: BLE001 - a metric never fails a request
            pb_utils.Logger.log_warn(f"jetspec: metric {key}: {one_line(err)}")

    def close(self) -> None:
        with self.lock:
            self.metrics.clear()  # each Metric before its MetricFamily
            self.families.clear()


def one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


@dataclass
class Item:
    text: str
    prompt_ids: list
    max_new_tokens: int
    sampling: object  # jetspec_trt.tree.accept.SamplingConfig
    end_id: int | None
    exclude_input: bool
    stop_words: object  # jetspec_trt.export.word_lists.StopWords
    logprobs: bool


@dataclass
class Job:
    request: object
    sender: object
    items: list
    stream: bool


@dataclass
class Result:
    text: str
    tail: str  # text not yet streamed
    num_output_tokens: int
    stats: object  # DecodeStats
    finish_reason: str
    logprobs: list  # with return_log_probs: of the tokens this response adds
    cum_logprob: float  # of every token so far


class Output:
    """One prompt's generated tokens and text as its rounds arrive, on either path: end_id and stop words cut
    them, streamed pieces hold back an unfinished UTF-8 character, and each Result carries the log probs that no
    response carried yet. `stats`: the request's DecodeStats, updated every round."""

    def __init__(self, item: Item, decode):
        self.item, self.decode = item, decode
        self.ids: list = []
        self.shown, self.sent, self.finish = "", 0, ""  # sent: tokens whose log probs a response carried

    def add(self, tokens: list) -> bool:
        """Add a round's tokens; True when end_id or a stop word ended the output (finish "stop")."""
        item = self.item
        if item.end_id is not None and item.end_id in tokens:
            tokens, self.finish = tokens[: tokens.index(item.end_id) + 1], "stop"
        self.ids.extend(tokens)
        keep = item.stop_words.keep(self.decode, self.ids, len(tokens))
        if keep is not None:
            del self.ids[len(self.ids) - len(tokens) + keep:]
            self.finish = "stop"
        return bool(self.finish)

    def piece(self, stats) -> tuple[str, Result] | None:
        """The text added since the last piece and the state for its streaming response, or None (no new text,
        or a UTF-8 character still open)."""
        text = self.decode(self.ids)
        if len(text) <= len(self.shown) or text.endswith("\ufffd"):
            return None
        piece, result = text[len(self.shown):], self._result(text, "", stats, None)
        self.shown, self.sent = text, len(self.ids)
        return piece, result

    def final(self, stats) -> Result:
        text = self.decode(self.ids)
        return self._result(text, text[len(self.shown):], stats, self.finish or stats.finish_reason)

    def _result(self, text: str, tail: str, stats, finish: str | None) -> Result:
        """The prompt's state for a response; `finish` None while it is still decoding."""
        # The loop's log probs cover the tokens it yielded; end_id and stop words may have cut some since.
        logprobs = stats.token_logprobs[: len(self.ids)] if self.item.logprobs else []
        return Result(text, tail, len(self.ids), stats, finish or "", logprobs[self.sent:], float(sum(logprobs)))


@dataclass
class BatchedJob:
    """A Job on the in-flight batching path: the state its prompts' callbacks share (driver thread only)."""

    job: Job
    outputs: list  # Output per prompt
    results: list  # final Result per prompt, None until it finishes
    prefilled: set  # prompts whose first output came (their prefill ran)
    answered: int = 0  # prompts whose response went out (non-streaming: in order)
    started: bool = False  # left the queue: a prompt's prefill ran, or the job ended before
    over: bool = False  # the job's final response went out: its other prompts leave the scheduler


class TritonPythonModel:
    def initialize(self, args):
        import torch

        from jetspec_trt.export.triton import REQUEST_PARAMETERS
        from jetspec_trt.runtime.engine import Engine

        config = json.loads(args["model_config"])
        params = {key: value["string_value"] for key, value in config.get("parameters", {}).items()}
        engine_dir = Path(params["engine_dir"])
        if not engine_dir.is_absolute():
            engine_dir = Path(args["model_repository"]) / engine_dir
        threads = int(params.get("cpu_threads", "0"))
        if threads > 0:
            torch.set_num_threads(threads)
        self.engine = Engine.load(engine_dir, device=params.get("device", "cpu"))
        self.decode = lambda ids: self.engine.tokenizer.decode(ids, skip_special_tokens=True)
        self.vocab_size = self.engine.target_config.vocab_size
        self.max_seq_len = self.engine.runtime.max_seq_len
        self.max_batch_size = int(config.get("max_batch_size", 0))
        self.allowed_parameters = set(REQUEST_PARAMETERS)
        self.queue: queue.Queue = queue.Queue(maxsize=int(params.get("max_queue_size", "1024")))
        self.metrics = Metrics({"model": args["model_name"], "version": args["model_version"],
                                "instance": args["model_instance_name"]})
        self.stopping = threading.Event()
        self.inflight_batch = int(params.get("inflight_batch", "1"))
        if self.inflight_batch > 1:
            from jetspec_trt.runtime.scheduler import SchedulerConfig
            from jetspec_trt.runtime.scheduler_thread import SchedulerThread

            config = SchedulerConfig.full_batch(self.engine.runtime, self.inflight_batch)
            self.waiting_jobs, self.waiting_lock = 0, threading.Lock()  # the queue bound: jobs not started yet
            self.driver = SchedulerThread(lambda: self.engine.new_scheduler(config), on_step=self._count_step)
        else:
            self.driver = None
            self.worker = threading.Thread(target=self._work, name="jetspec-engine", daemon=True)
            self.worker.start()
        pb_utils.Logger.log_info(f"jetspec: loaded {engine_dir} on {params.get('device', 'cpu')} "
                                 f"(max_seq_len {self.max_seq_len}, tree {self.engine.runtime.tree}, "
                                 f"inflight_batch {self.inflight_batch})")

    # ---- request intake (Triton's thread) ----

    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            if request.is_cancelled():  # before any work, tokenizing included
                self.metrics.add("cancelled_queued")
                self._fail(sender, "request cancelled by the client before it was queued",
                           pb_utils.TritonError.CANCELLED)
                continue
            try:
                job = self._parse(request, sender)
            except Exception as err:  # noqa: BLE001 - every bad request gets an answer, never a crash
                self._fail(sender, one_line(err))
                continue
            if not self._enqueue(job):
                self._fail(sender, f"server busy: {self.queue.maxsize} requests already queued on this instance")
        return None

    def _enqueue(self, job: Job) -> bool:
        """Hand the job to the worker or the scheduler's driver, counted as queued; False (and nothing counted)
        when max_queue_size jobs already wait."""
        if self.driver is None:
            try:
                self.queue.put_nowait(job)
            except queue.Full:
                return False
            self.metrics.add("queued")
            return True
        with self.waiting_lock:
            if self.waiting_jobs >= self.queue.maxsize:
                return False
            self.waiting_jobs += 1
        self.metrics.add("queued")  # before the driver thread can see the job start
        self._submit(job)
        return True

    def _parse(self, request, sender) -> Job:
        from jetspec_trt.export.word_lists import StopWords, banned_token_ids, read_words
        from jetspec_trt.runtime.round_loop import check_prompt
        from jetspec_trt.tree.accept import SamplingConfig

        unknown = sorted(set(json.loads(request.parameters() or "{}")) - self.allowed_parameters)
        if unknown:
            raise RequestError(f"unknown request parameter(s) {', '.join(unknown)}; "
                               "this model takes its settings as input tensors")
        texts = self._column(request, "text_input")
        batch = len(texts)
        column = lambda name, default=REQUIRED: self._column(request, name, default, batch)  # noqa: E731
        stream = column("stream", False)
        if any(stream) and batch != 1:
            raise RequestError(f"a streaming request carries one prompt, got {batch}")
        for name, (default, allowed, what) in NEUTRAL_ONLY.items():
            for value in column(name, default):
                if not allowed(value):
                    raise RequestError(f"{name} {what}, got {value}")
        stop_rows, bad_rows = self._words(request, "stop_words", batch), self._words(request, "bad_words", batch)
        items = []
        for i, (raw, max_tokens, temperature, top_k, top_p, seed, random_seed, end_id, exclude, logprobs) in enumerate(
                zip(texts, column("max_tokens"), column("temperature", 0.0), column("top_k", 0), column("top_p", 1.0),
                    column("seed", None), column("random_seed", None), column("end_id", None),
                    column("exclude_input_in_output", False), column("return_log_probs", False))):
            try:
                text = raw.decode("utf-8") if isinstance(raw, bytes) else str(raw)
            except UnicodeDecodeError as err:
                raise RequestError("text_input is not valid UTF-8") from err
            if not text:
                raise RequestError("text_input is empty")
            max_tokens = int(max_tokens)
            if not 1 <= max_tokens <= self.max_seq_len:
                raise RequestError(f"max_tokens must be in 1..{self.max_seq_len} (the engine's max_seq_len), "
                                   f"got {max_tokens}")
            temperature, top_p, top_k = float(temperature), float(top_p), int(top_k)
            if not (math.isfinite(temperature) and temperature >= 0):
                raise RequestError(f"temperature must be >= 0, got {temperature}")
            if not 0.0 < top_p <= 1.0:
                raise RequestError(f"top_p must be in (0, 1], got {top_p}")
            if top_k < 0:
                raise RequestError(f"top_k must be >= 0 (0 = no limit), got {top_k}")
            if seed is not None and random_seed is not None and int(seed) != int(random_seed):
                raise RequestError(f"seed ({int(seed)}) and random_seed ({int(random_seed)}) differ; send one")
            seed = seed if seed is not None else random_seed
            if end_id is not None and not 0 <= int(end_id) < self.vocab_size:
                raise RequestError(f"end_id must be in [0, {self.vocab_size}), got {int(end_id)}")
            banned = banned_token_ids(read_words(bad_rows[i]), self.engine.encode)
            if any(t >= self.vocab_size for t in banned):
                raise RequestError(f"a bad word's token is outside the model's vocabulary ({self.vocab_size})")
            prompt_ids = self.engine.encode(text)
            new_tokens = check_prompt(prompt_ids, max_tokens, self.vocab_size, self.max_seq_len)
            sampling = SamplingConfig(temperature, top_p, None if seed is None else int(seed), top_k, banned)
            items.append(Item(text, prompt_ids, new_tokens, sampling, None if end_id is None else int(end_id),
                              bool(exclude), StopWords(read_words(stop_rows[i])), bool(logprobs)))
        return Job(request, sender, items, bool(stream[0]))

    def _words(self, request, name: str, batch: int) -> list:
        """A word-list input (STRING [-1] per prompt): one row of elements per prompt, empty where absent."""
        tensor = pb_utils.get_input_tensor_by_name(request, name)
        if tensor is None:
            return [()] * batch
        values = tensor.as_numpy()
        values = values.reshape(values.shape[0] if self.max_batch_size > 0 else 1, -1)
        if values.shape[0] != batch:
            raise RequestError(f"input {name} has batch size {values.shape[0]}, text_input has {batch}")
        return list(values)

    def _column(self, request, name, default=REQUIRED, batch=None) -> list:
        """One value per prompt of the request's batch; `default` for each prompt where the input is absent."""
        tensor = pb_utils.get_input_tensor_by_name(request, name)
        if tensor is None:
            if default is REQUIRED:
                raise RequestError(f"input {name} is missing")
            return [default] * batch
        values = tensor.as_numpy()
        rows = values.shape[0] if self.max_batch_size > 0 else 1  # else no batch dimension
        values = values.reshape(rows, -1)
        if values.shape[1] != 1:
            raise RequestError(f"input {name} must hold one value per prompt, got shape {list(tensor.shape())}")
        if batch is not None and rows != batch:
            raise RequestError(f"input {name} has batch size {rows}, text_input has {batch}")
        return [value.item() if isinstance(value, np.generic) else value for value in values[:, 0]]

    # ---- decoding (the worker thread) ----

    def _work(self):
        while True:
            job = self.queue.get()
            if job is None:
                return
            self.metrics.add("queued", -1)
            try:
                self._run(job)
            except Stop as stop:
                pb_utils.Logger.log_info(f"jetspec: {stop}")
                self._fail(job.sender, str(stop), stop.code)
            except Exception as err:  # noqa: BLE001 - report, keep serving
                pb_utils.Logger.log_error(f"jetspec: request failed: {traceback.format_exc()}")
                self._fail(job.sender, f"internal error: {one_line(err)}")

    def _run(self, job: Job) -> None:
        self._check(job.request, None)  # cancelled while it waited in the queue: stop before any work
        if job.stream:
            item = job.items[0]
            send = lambda piece, result: job.sender.send(self._response(item, 0, piece, result))  # noqa: E731
            result = self._generate(item, job.request, send)
            job.sender.send(self._response(item, 0, result.tail, result), flags=FINAL)
            return
        # One response per prompt, as TensorRT-LLM answers a batched request; each is sent once decoded.
        for index, item in enumerate(job.items):
            result = self._generate(item, job.request, None)
            text = result.text if item.exclude_input else item.text + result.text
            last = index == len(job.items) - 1
            job.sender.send(self._response(item, index, text, result), flags=FINAL if last else 0)

    def _check(self, request, done: int | None) -> None:
        """Raise Stop where the client cancelled or the model is unloading; `done`: tokens so far, None before the
        prompt's prefill."""
        if request.is_cancelled():
            raise self._cancelled(done)
        if self.stopping.is_set():
            raise Stop("the model is being unloaded", pb_utils.TritonError.UNAVAILABLE)

    def _cancelled(self, done: int | None) -> Stop:
        """Count a client's cancellation; the Stop that answers it. `done`: as in _check."""
        self.metrics.add("cancelled_queued" if done is None else "cancelled_decoding")
        return Stop("request cancelled by the client " + ("before decoding (no prefill ran)" if done is None
                                                          else f"after {done} tokens"),
                    pb_utils.TritonError.CANCELLED)

    def _generate(self, item: Item, request, on_piece) -> Result:
        """Decode one prompt; with `on_piece`, call it with each round's new text (held while a UTF-8 char is open)."""
        self._check(request, 0)  # (a batch's later prompts) before this prompt's prefill
        self.metrics.add("prefills")
        rounds = self.engine.stream_tokens(item.prompt_ids, item.max_new_tokens, item.sampling,
                                           logprobs=item.logprobs)
        output = Output(item, self.decode)
        try:
            for tokens in rounds:
                self._check(request, len(output.ids))
                if output.add(tokens):
                    break
                piece = output.piece(self.engine.current_stats) if on_piece is not None else None
                if piece is not None:
                    on_piece(*piece)
        finally:
            rounds.close()
        return output.final(self.engine.current_stats)

    # ---- in-flight batching (submission on Triton's thread, callbacks on the scheduler's driver thread) ----

    def _submit(self, job: Job) -> None:
        from jetspec_trt.runtime.scheduler_thread import Submission

        batched = BatchedJob(job, [Output(item, self.decode) for item in job.items], [None] * len(job.items), set())
        # A prompt leaves the scheduler when the client cancels, or when its job is over (a sibling failed).
        cancelled = lambda: batched.over or job.request.is_cancelled()  # noqa: E731
        for index, item in enumerate(job.items):
            self.driver.submit(Submission(
                item.prompt_ids, item.max_new_tokens, item.sampling, item.logprobs,
                on_output=lambda out, index=index: self._on_output(batched, index, out),
                on_abort=lambda reason, started, error, index=index: self._on_abort(batched, index, reason, started,
                                                                                   error),
                is_cancelled=cancelled))

    def _on_output(self, batched: BatchedJob, index: int, out) -> bool:
        """A step's tokens of one prompt: stream the new text, answer finished prompts. True: end_id or a stop word
        ended the prompt (the scheduler drops it)."""
        if index not in batched.prefilled:
            batched.prefilled.add(index)
            self.metrics.add("prefills")
            self._leave_queue(batched)
        job, output = batched.job, batched.outputs[index]
        ended = output.add(out.tokens)
        if job.stream and not ended:
            piece = output.piece(out.stats)
            if piece is not None:
                job.sender.send(self._response(output.item, 0, *piece))
        if ended or out.finished:
            batched.results[index] = output.final(out.stats)
            self._answer(batched)
        return ended

    def _answer(self, batched: BatchedJob) -> None:
        """Send the responses of the finished prompts, in order (as the one-at-a-time path sends them); the last
        carries the final flag."""
        job = batched.job
        while batched.answered < len(job.items) and batched.results[batched.answered] is not None:
            index, result = batched.answered, batched.results[batched.answered]
            item, last = job.items[index], index == len(job.items) - 1
            if job.stream:
                text = result.tail
            else:
                text = result.text if item.exclude_input else item.text + result.text
            batched.answered += 1
            batched.over = last
            job.sender.send(self._response(item, index, text, result), flags=FINAL if last else 0)

    def _on_abort(self, batched: BatchedJob, index: int, reason: str, started: bool, error) -> None:
        """A prompt ended without finishing: the job's error response (once)."""
        if batched.over:
            return  # a sibling's end already answered the job
        batched.over = True
        self._leave_queue(batched)
        if reason == "cancelled":
            stop = self._cancelled(len(batched.outputs[index].ids) if started else None)
            pb_utils.Logger.log_info(f"jetspec: {stop}")
            self._fail(batched.job.sender, str(stop), stop.code)
        elif reason == "unloading":
            self._fail(batched.job.sender, "the model is being unloaded", pb_utils.TritonError.UNAVAILABLE)
        else:
            pb_utils.Logger.log_error(f"jetspec: request failed: {one_line(error)}")
            self._fail(batched.job.sender, f"internal error: {one_line(error)}")

    def _leave_queue(self, batched: BatchedJob) -> None:
        if not batched.started:
            batched.started = True
            self.metrics.add("queued", -1)
            with self.waiting_lock:
                self.waiting_jobs -= 1

    def _count_step(self, sequences: int) -> None:
        self.metrics.add("steps")
        self.metrics.add("step_sequences", sequences)

    def _response(self, item: Item, index: int, text: str, result: Result):
        """One prompt's response: every tensor has batch size 1; `index` is the prompt's row in the request."""
        def row(value, dtype):
            return np.array([[value]], dtype=dtype)

        stats = result.stats
        tensors = {
            "text_output": row(text.encode("utf-8"), np.object_),
            "batch_index": row(index, np.int32),
            "sequence_index": row(0, np.int32),
            "finish_reason": row(result.finish_reason.encode(), np.object_),
            "num_input_tokens": row(len(item.prompt_ids), np.int32),
            "num_output_tokens": row(result.num_output_tokens, np.int32),
            "decoding_iter": row(stats.rounds, np.int32),
            "avg_decoded_tokens_per_iter": row(stats.tau, np.float32),
            "total_draft_tokens": row(stats.drafted_tokens, np.int32),
            "total_accepted_draft_tokens": row(stats.accepted_drafts, np.int32),
            "acceptance_rate": row(stats.accepted_drafts / max(1, stats.drafted_tokens), np.float32),
        }
        if item.logprobs:  # TensorRT-LLM's shapes: [batch, beam] and [batch, beam, tokens], one beam
            tensors["cum_log_probs"] = row(result.cum_logprob, np.float32)
            tensors["output_log_probs"] = np.array(result.logprobs, dtype=np.float32).reshape(1, 1, -1)
        return pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(k, v) for k, v in tensors.items()])

    @staticmethod
    def _fail(sender, message: str, code=None) -> None:
        error = pb_utils.TritonError(message) if code is None else pb_utils.TritonError(message, code)
        try:
            sender.send(pb_utils.InferenceResponse(output_tensors=[], error=error), flags=FINAL)
        except Exception as err:  # noqa: BLE001 - the client may be gone
            pb_utils.Logger.log_warn(f"jetspec: could not send an error response: {one_line(err)}")

    def finalize(self):
        self.stopping.set()
        if self.driver is not None:
            self.driver.close(timeout=60)  # every live request gets its UNAVAILABLE answer
            self.metrics.close()
            return
        while True:
            try:
                job = self.queue.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                self._fail(job.sender, "the model is being unloaded", pb_utils.TritonError.UNAVAILABLE)
        self.queue.put(None)
        self.worker.join(timeout=60)
        self.metrics.close()
