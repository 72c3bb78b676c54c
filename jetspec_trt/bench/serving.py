"""`jetspec-trt bench --engine E --serve-url HOST:PORT --clients 1,4,16,64`: a running `jetspec-trt serve` under N
concurrent gRPC streaming clients, greedy (JSON + PNG under bench/results/).

The bench drives a server it did not start (the lease's serve_run.sh, a test fixture, a deployment) and never owns
its lifetime, so what it measures is the server as it runs. `--engine` names the engine that server serves: its
tokenizer renders the suites' chat prompts into the text the model takes (text_input is used as is), and its
target diagnoses a stream that differs from the single-request output. The served model's own configuration
(Triton's model config over gRPC) says on which device the engine runs, and so in which dtype.

For each N of --clients (N = 1 always runs, first: it is the reference), K requests (--num-prompts, default the
largest N; the suites' prompts in turn, repeated when the suites have fewer) go through N client threads, each
with its own gRPC stream and one request in flight (closed loop: a client sends its next request when the last
one's final response has come). An untimed warm-up of N short requests comes before each timed pass, so that
the server's graphs for that batch are captured outside it. Per N:

  - aggregate tok/s: every output token (the final response's num_output_tokens) over the wall time from the
    start of the pass to the last final response;
  - per-stream tok/s: a request's tokens over the time from its first response to its final one (as the batch
    bench counts: the queue and the prefill belong to the time to first token), p50 and p99 (the slow tail);
  - time to first token: from the send to the first streamed response, p50 and p99;
  - requests sent / completed (a final response, no error) / failed (an error response, or the send raised) /
    lost (sent, with no final response before the pass's deadline), and the server's mean batch over the pass
    (its metrics, --metrics-url).

Every completed stream's text is compared with the same prompt's at N = 1 from the same server. The server
returns text, not token ids, so a mismatch is located by its first differing character and, in tokens, on the
engine tokenizer's re-encoding of both texts; then diagnosed as the suite bench diagnoses a greedy divergence
(suites.diagnose_flip: a teacher-forced prefill of the engine's target, in the served dtype and device, over
prompt + common prefix; its ar_* fields are the N = 1 stream's, spec_* this stream's). In bf16 batched GEMMs
round otherwise than single ones, so a near tie may flip: such mismatches are listed as near-tie flips. Any
other mismatch, and any mismatch in float32, fails the run, as does a request that failed or was lost.
"""

from __future__ import annotations

import importlib.metadata
import queue
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from jetspec_trt.bench.suites import (NEAR_TIE_ULPS, diagnose_flip, mixed_suite_prompts, nearest_rank,
                                      report_header, write_report)
from jetspec_trt.errors import JetSpecError


@dataclass(frozen=True)
class ServingBenchConfig:
    engine_dir: Path  # the engine the server serves (tokenizer, chat template, the target for diagnoses)
    url: str = "localhost:8001"  # the server's gRPC endpoint
    model: str = "jetspec"
    clients: tuple[int, ...] = (1, 4, 16, 64)
    num_prompts: int | None = None  # requests per pass; None: the largest client count
    suites: tuple[str, ...] = ("mtbench", "math500", "humaneval")
    prompts_file: Path | None = None
    max_new_tokens: int = 128
    warmup_tokens: int = 8  # each pass's untimed warm-up: N requests of this many tokens (0: none)
    pass_timeout_s: float = 600.0  # a request without a final response this long after its pass began is lost
    metrics_url: str | None = None  # the server's metrics endpoint (http://HOST:8002/metrics): the mean batch
    output_dir: Path = Path("bench/results")
    tag: str = ""

    def __post_init__(self):
        if not self.clients or min(self.clients) < 1:
            raise JetSpecError(f"--clients must be >= 1, got {','.join(map(str, self.clients))}")
        if self.requests < max(self.clients):
            raise JetSpecError(f"--num-prompts ({self.requests}) must be >= the largest --clients "
                               f"({max(self.clients)}): every client needs a request")
        if self.max_new_tokens < 1 or self.warmup_tokens < 0 or not self.pass_timeout_s > 0:
            raise JetSpecError("--max-new-tokens must be >= 1 and --pass-timeout > 0")

    @property
    def requests(self) -> int:
        return self.num_prompts if self.num_prompts is not None else max(self.clients)

    @property
    def passes(self) -> list[int]:
        """The client counts in the order they run: 1 first (the reference), then the others, ascending."""
        return sorted(set(self.clients) | {1})


@dataclass
class Request:
    """One request of a pass, as its client saw it (perf_counter times)."""

    index: int
    prompt: int  # index into the pass's prompts
    sent: float | None = None
    first: float | None = None  # the first streamed response
    done: float | None = None  # the final response (or the error)
    pieces: list[str] = field(default_factory=list)
    tokens: int = 0  # num_output_tokens of the final response
    error: str | None = None

    @property
    def completed(self) -> bool:
        return self.done is not None and self.error is None

    @property
    def text(self) -> str:
        return "".join(self.pieces)


class StreamingClient:
    """One client: its own gRPC stream, one request in flight at a time."""

    def __init__(self, url: str, model: str):
        import tritonclient.grpc as grpcclient

        self.model = model
        self.in_flight = False  # a request was sent and its final response has not come
        self.responses: queue.Queue = queue.Queue()
        self.client = grpcclient.InferenceServerClient(url)
        # The arrival time is taken in the callback (gRPC's thread), not when this client's thread reads it.
        self.client.start_stream(callback=lambda result, error: self.responses.put((time.perf_counter(), result,
                                                                                    error)))

    def run(self, work: queue.Queue, texts: list[str], max_new_tokens: int, deadline: float) -> None:
        """Take requests from `work` until it is empty or the deadline passes (the request in flight then stays
        without `done`: lost)."""
        from jetspec_trt.export.triton_client import grpc_inputs

        while time.perf_counter() < deadline:
            try:
                request: Request = work.get_nowait()
            except queue.Empty:
                return
            request.sent = time.perf_counter()
            try:
                self.client.async_stream_infer(self.model, grpc_inputs([texts[request.prompt]], max_new_tokens),
                                               request_id=str(request.index))
            except Exception as err:  # noqa: BLE001 - the server refused or is gone: a failed request
                request.done, request.error = time.perf_counter(), f"send: {type(err).__name__}: {err}"
                continue
            self.in_flight = True
            if not self._receive(request, deadline):
                return
            self.in_flight = False

    def _receive(self, request: Request, deadline: float) -> bool:
        """Collect `request`'s responses up to its final one; False if the deadline came first."""
        while True:
            try:
                now, result, error = self.responses.get(timeout=max(0.0, deadline - time.perf_counter()))
            except queue.Empty:
                return False
            if error is not None:  # an error response is final (its request id is not reported: ours in flight)
                request.done, request.error = now, error.message()
                return True
            request.first = request.first or now
            request.pieces.append(result.as_numpy("text_output")[0, 0].decode(errors="replace"))
            if result.get_response().parameters["triton_final_response"].bool_param:
                request.done, request.tokens = now, int(result.as_numpy("num_output_tokens")[0, 0])
                return True

    def close(self) -> None:
        # Cancel only while a request is in flight (a lost one: its generation ends with its stream). tritonserver
        # 2.51's gRPC frontend leaks a stream's first request when the cancellation comes just after its final
        # response: the model then never unloads, and at shutdown tritonserver waits its whole exit timeout and
        # exits 1. Triton's bug, not the model's (a minimal model does it too): scripts/triton_stream_cancel_repro.py.
        # 200 one-request streams of this class, each cancelled right after its final response: the server needed
        # its whole exit timeout in 3 runs of 3; closed as here: in 0 of 2 (2026-12-05).
        self.client.stop_stream(cancel_requests=self.in_flight)
        self.client.close()


def run_pass(cfg: ServingBenchConfig, texts: list[str], clients: int, requests: int,
             max_new_tokens: int) -> tuple[list[Request], float]:
    """`requests` requests (prompts in turn) through `clients` streaming clients at once: (records, wall s)."""
    records = [Request(i, i % len(texts)) for i in range(requests)]
    work: queue.Queue = queue.Queue()
    for record in records:
        work.put(record)
    streams = [StreamingClient(cfg.url, cfg.model) for _ in range(clients)]  # connected before the clock starts
    start = time.perf_counter()
    deadline = start + cfg.pass_timeout_s
    threads = [threading.Thread(target=s.run, args=(work, texts, max_new_tokens, deadline), daemon=True)
               for s in streams]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=max(1.0, deadline - time.perf_counter()) + 30)
    finally:
        for stream in streams:
            stream.close()
    ends = [r.done for r in records if r.done is not None]
    return records, (max(ends) if ends else time.perf_counter()) - start


class Checker:
    """Compares streams with the N = 1 pass's output of the same prompt; diagnoses mismatches on the engine's
    target, loaded (once) at the first mismatch."""

    def __init__(self, engine_dir: Path, device: str, tokenizer, prompt_texts: list[str]):
        self.engine_dir, self.device, self.tokenizer = engine_dir, device, tokenizer
        self.prompt_texts = prompt_texts
        self.reference: dict[int, str] = {}
        self._engine = None

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)  # as the model encodes text_input

    def mismatch(self, prompt: int, text: str) -> dict | None:
        """None where `text` equals the reference of `prompt` (the first N = 1 output of it becomes that)."""
        expected = self.reference.setdefault(prompt, text)
        if text == expected:
            return None
        from jetspec_trt.runtime.decoder import first_difference
        from jetspec_trt.runtime.engine import Engine

        expected_ids, got_ids = self.encode(expected), self.encode(text)
        first = first_difference(expected_ids, got_ids)
        found = {"first_diff_char": first_difference(list(expected), list(text)), "first_diff_token": first,
                 "tokens_reencoded": [len(expected_ids), len(got_ids)]}
        if first is not None:
            if self._engine is None:
                self._engine = Engine.load(self.engine_dir, device=self.device)
            engine = self._engine
            found["diagnosis"] = diagnose_flip(engine.target, self.encode(self.prompt_texts[prompt]), expected_ids,
                                               got_ids, first, engine.runtime.page_size, None, engine.tokenizer)
        return found


def summarize(records: list[Request], wall: float, checker: Checker, ids: list[str]) -> dict:
    """One pass's row (without its client count)."""
    done = [r for r in records if r.completed]
    tokens = sum(r.tokens for r in done)
    rates = [r.tokens / (r.done - r.first) for r in done if r.done > r.first]  # one response only: no rate
    ttft = [1e3 * (r.first - r.sent) for r in done if r.first is not None]
    sent = [r for r in records if r.sent is not None]
    failed = [r for r in sent if r.error is not None]
    mismatches = []
    for r in done:
        found = checker.mismatch(r.prompt, r.text)
        if found is not None:
            mismatches.append({"request": r.index, "prompt": ids[r.prompt], **found})
    near = [m for m in mismatches if m.get("diagnosis", {}).get("near_tie")]
    return {
        "requests": len(records), "sent": len(sent), "completed": len(done), "failed": len(failed),
        "lost": len(sent) - len(done) - len(failed), "errors": sorted({r.error for r in failed})[:5],
        "wall_s": wall, "tokens": tokens, "aggregate_tok_s": tokens / max(wall, 1e-9),
        "per_stream_tok_s": ({"p50": nearest_rank(rates, 0.5), "p99_slow": nearest_rank(rates, 0.01),
                              "min": min(rates), "max": max(rates)} if rates else None),
        "ttft_ms": ({"p50": nearest_rank(ttft, 0.5), "p99": nearest_rank(ttft, 0.99), "max": max(ttft)}
                    if ttft else None),
        "identical": len(done) - len(mismatches), "near_tie_flips": len(near),
        "other_mismatches": len(mismatches) - len(near), "mismatches": mismatches,
    }


def _served_model(cfg: ServingBenchConfig) -> dict:
    """What the server says about itself and the model: Triton's version, the model's parameters (device,
    inflight_batch, ...), its instances and max_batch_size."""
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(cfg.url)
    try:
        if not client.is_model_ready(cfg.model):
            raise JetSpecError(f"model {cfg.model!r} is not ready at {cfg.url}")
        config = client.get_model_config(cfg.model, as_json=True)["config"]
        server = client.get_server_metadata(as_json=True)
    finally:
        client.close()
    return {"url": cfg.url, "model": cfg.model, "triton_version": server.get("version"),
            "max_batch_size": config.get("max_batch_size"),
            "instances": sum(int(group.get("count", 1)) for group in config.get("instance_group", [])),
            "parameters": {k: v.get("string_value") for k, v in config.get("parameters", {}).items()}}


def _mean_batch(cfg: ServingBenchConfig) -> tuple[float, float] | None:
    from jetspec_trt.export.triton_client import read_metric

    if cfg.metrics_url is None:
        return None
    return (read_metric(cfg.metrics_url, "jetspec_steps_total"),
            read_metric(cfg.metrics_url, "jetspec_step_sequences_total"))


def run_serving_bench(cfg: ServingBenchConfig, command: list[str] | None = None) -> Path:
    """Every pass; the report is rewritten after each, so a run cut short keeps the passes it finished."""
    from transformers import AutoTokenizer

    from jetspec_trt.dtypes import dtype_name
    from jetspec_trt.runtime.config import RuntimeConfig
    from jetspec_trt.runtime.engine import run_dtype

    server = _served_model(cfg)
    device = server["parameters"].get("device") or "cpu"
    dtype = dtype_name(run_dtype(RuntimeConfig.load(cfg.engine_dir), device))
    tokenizer = AutoTokenizer.from_pretrained(str(Path(cfg.engine_dir) / "target"), local_files_only=True)
    prompts = mixed_suite_prompts(cfg.suites, cfg.requests, cfg.prompts_file)
    texts = [tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
             for _, _, messages in prompts]
    checker = Checker(cfg.engine_dir, device, tokenizer, texts)
    inflight = server["parameters"].get("inflight_batch", "1")
    result = {
        **report_header("serving", cfg.engine_dir, device, dtype,
                        f"tritonserver {server['triton_version']}, python backend, inflight_batch {inflight}",
                        command),
        "server": server,
        "config": {**{k: v for k, v in asdict(cfg).items() if k != "engine_dir"}, "requests": cfg.requests,
                   "prompts": len(texts), "prompt_ids": [f"{suite}/{pid}" for suite, pid, _ in prompts]},
        "check": {"reference": "each prompt's first output in the clients=1 pass, from the same server",
                  "near_tie_rule": f"both tokens' teacher-forced logits within {NEAR_TIE_ULPS} ulp ({dtype}) of the "
                                   f"top logit; in float32 every mismatch fails the run",
                  "tokens": "positions on the engine tokenizer's re-encoding of the streamed text"},
        "results": [],
    }
    result["versions"]["tritonclient"] = importlib.metadata.version("tritonclient")
    path = None
    for clients in cfg.passes:
        if cfg.warmup_tokens:
            run_pass(cfg, texts, clients, clients, cfg.warmup_tokens)
        before = _mean_batch(cfg)
        records, wall = run_pass(cfg, texts, clients, cfg.requests, cfg.max_new_tokens)
        row = {"clients": clients, **summarize(records, wall, checker, [f"{s}/{p}" for s, p, _ in prompts])}
        if before is not None:
            steps, sequences = (now - then for now, then in zip(_mean_batch(cfg), before))
            row["server_steps"], row["mean_batch"] = steps, sequences / steps if steps else None
        result["results"].append(row)
        result["failures"] = failures(result)
        path = write_report(result, "serving", cfg.output_dir, cfg.tag, plot_serving)
    return path


def failures(result: dict) -> list[str]:
    """What makes the run fail: lost or failed requests, and mismatches other than bf16 near-tie flips."""
    exact = result["dtype"] == "float32"
    found = []
    for row in result["results"]:
        bad = row["other_mismatches"] + (row["near_tie_flips"] if exact else 0)
        for count, what in ((row["requests"] - row["sent"], "never sent"), (row["failed"], "failed"),
                            (row["lost"], "lost"), (bad, "differ from the single-request output")):
            if count:
                found.append(f"{row['clients']} clients: {count} of {row['requests']} requests {what}")
    return found


def format_summary(result: dict) -> str:
    lines = [f"{result['device_name']} ({result['dtype']}), {result['decoder']}, {result['config']['requests']} "
             f"requests x {result['config']['max_new_tokens']} new tokens a pass",
             "clients  aggregate tok/s  per-stream p50 / p99-slow  TTFT ms p50 / p99  sent/done/failed/lost  "
             "identical  near-tie  mean batch"]
    for r in result["results"]:
        stream, ttft = r["per_stream_tok_s"] or {}, r["ttft_ms"] or {}
        lines.append(f"{r['clients']:>7}  {r['aggregate_tok_s']:>15.1f}  {stream.get('p50', 0):>10.1f} / "
                     f"{stream.get('p99_slow', 0):<12.1f}  {ttft.get('p50', 0):>7.1f} / {ttft.get('p99', 0):<7.1f}  "
                     f"{r['sent']:>4}/{r['completed']}/{r['failed']}/{r['lost']:<10}  "
                     f"{r['identical']:>4}/{r['completed']:<4}  {r['near_tie_flips']:>8}  "
                     + (f"{r['mean_batch']:.2f}" if r.get("mean_batch") else "-"))
    lines += [f"FAIL: {line}" for line in result["failures"]] or ["every request completed; every stream equals "
                                                                  "its single-request output (near ties aside)"]
    return "\n".join(lines)


def plot_serving(result: dict, path: Path) -> None:
    from jetspec_trt.bench.plots import plt

    rows = result["results"]
    clients = [r["clients"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    axes[0].plot(clients, [r["aggregate_tok_s"] for r in rows], "o-", color="C0")
    for key, style, label in (("p50", "o-", "p50"), ("p99_slow", "s--", "p99 (slow tail)")):
        axes[1].plot(clients, [(r["per_stream_tok_s"] or {}).get(key) for r in rows], style, color="C1", label=label)
        axes[2].plot(clients, [(r["ttft_ms"] or {}).get("p99" if key == "p99_slow" else key) for r in rows], style,
                     color="C2", label=label.replace(" (slow tail)", ""))
    for ax, title, unit in zip(axes, ("aggregate tok/s", "per-stream tok/s", "time to first token"),
                               ("tok/s", "tok/s", "ms")):
        ax.set(title=title, xlabel="concurrent streaming clients", ylabel=unit, xscale="log")
        ax.set_xticks(clients, [str(c) for c in clients])
        ax.minorticks_off()
        if ax is not axes[0]:
            ax.legend(fontsize=8)
    same = ", ".join(f"{r['clients']}: {r['identical']}/{r['completed']}" for r in rows)
    fig.suptitle(f"{Path(result['engine']).name} served on {result['device_name']} ({result['dtype']}, "
                 f"{result['decoder']}); same as 1 client: {same}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
