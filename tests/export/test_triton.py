"""`export triton` + `serve`: a real tritonserver (nvidia-pytriton's, CPU, loopback only) serving the quickstart
engine, driven over gRPC (tritonclient streaming) and HTTP (Triton's generate / generate_stream endpoints; HTTP
`infer` does not take decoupled models). The server starts once for the module through `jetspec-trt serve` in a
subprocess and is always killed at teardown; every wait is bounded. A client built the way TensorRT-LLM's own
end_to_end_grpc_client builds its requests checks the TensorRT-LLM request contract.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient

from jetspec_trt.bench.serving import Request, StreamingClient
from jetspec_trt.cli import main
from jetspec_trt.errors import JetSpecError
from jetspec_trt.export.triton import INPUTS, OUTPUTS, TritonExportConfig, export_triton
from jetspec_trt.export.triton_client import grpc_inputs, infer_inputs, read_metric
from jetspec_trt.export.word_lists import StopWords
from jetspec_trt.quickstart import make_tiny_engine
from jetspec_trt.runtime.engine import Engine
from jetspec_trt.tree.accept import SamplingConfig
from tests.helpers import invoke_cli

pytestmark = pytest.mark.slow
MODEL = "jetspec"
READY_TIMEOUT_S = 120
REQUEST_TIMEOUT_S = 60


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


@contextlib.contextmanager
def torch_threads(n: int):
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def http_ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/v2/health/ready", timeout=2) as reply:
            return reply.status == 200
    except (urllib.error.URLError, OSError):
        return False


def processes_mentioning(text: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            with contextlib.suppress(OSError):
                if text.encode() in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
    return found


def instance_stubs(repo: Path) -> list[int]:
    """Running python-backend stubs of the model instances served from `repo` (not zombies)."""
    found = []
    for pid in processes_mentioning(str(repo)):
        with contextlib.suppress(OSError):
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            if argv[0].endswith(b"triton_python_backend_stub") and argv[8] != MODEL.encode() and state != "Z":
                found.append(pid)
    return found


def wait_until(condition, timeout: float, what: str, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:g} s waiting for {what}"
                        + (f":\n{log.read_text()[-4000:]}" if log is not None else ""))
        time.sleep(0.2)


class Served:
    def __init__(self, engine_dir: Path, repo: Path, process: subprocess.Popen, log: Path, ports: list[int]):
        self.engine_dir, self.repo, self.process, self.log = engine_dir, repo, process, log
        self.http_port, self.grpc_port, self.metrics_port = ports
        self.http = f"http://127.0.0.1:{self.http_port}"
        self.grpc = f"127.0.0.1:{self.grpc_port}"
        self.metrics = f"http://127.0.0.1:{self.metrics_port}/metrics"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("triton")


@pytest.fixture(scope="module")
def engine_dir(workdir) -> Path:
    return make_tiny_engine(workdir).engine


@pytest.fixture(scope="module")
def runner(engine_dir) -> Engine:
    return Engine.load(engine_dir)


def reference(runner: Engine, prompt: str, max_tokens: int):
    with torch_threads(1):
        return runner.generate(prompt, max_tokens)


@contextlib.contextmanager
def serving(repo: Path, log: Path, engine_dir: Path, *extra: str):
    """`jetspec-trt serve repo [extra]` in a subprocess, once ready; killed, with whatever it started, at exit."""
    ports = free_ports(3)
    command = [sys.executable, "-m", "jetspec_trt.cli", "serve", str(repo), "--address", "127.0.0.1",
               "--http-port", str(ports[0]), "--grpc-port", str(ports[1]), "--metrics-port", str(ports[2]),
               "--ready-timeout", str(READY_TIMEOUT_S), *extra]
    with open(log, "w") as handle:
        process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   start_new_session=True)
    server = Served(engine_dir, repo, process, log, ports)
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S + 30
        while not ("serving " in log.read_text() and http_ready(server.http)):
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"jetspec-trt serve did not become ready:\n{log.read_text()[-4000:]}")
            time.sleep(0.25)
        yield server
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=45)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=10)
        for pid in processes_mentioning(str(repo)):  # tritonserver and its stubs, should any be left
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def served(workdir, engine_dir):
    repo = export_triton(TritonExportConfig(engine_dir, workdir / "repo", max_batch_size=4, cpu_threads=1,
                                            copy_engine=True))  # the engine path relative to the model
    with serving(repo, workdir / "serve.log", engine_dir) as server:
        yield server


# ---- clients ----

class GrpcStream:
    """One gRPC bidirectional stream; responses collected per request id until each one's final response."""

    def __init__(self, url: str):
        self.client = grpcclient.InferenceServerClient(url)
        self.responses: queue.Queue = queue.Queue()
        self.client.start_stream(callback=lambda result, error: self.responses.put((result, error)))

    def send(self, request_id: str, inputs: list, parameters: dict | None = None, outputs: list | None = None) -> None:
        self.client.async_stream_infer(MODEL, inputs, request_id=request_id, parameters=parameters, outputs=outputs)

    def collect(self, count: int, timeout: float = REQUEST_TIMEOUT_S) -> dict[str, dict]:
        """{request id: {"pieces": [...], "last": result or None, "error": str or None, "finals": n,
        "results": [every result]}}."""
        got: dict[str, dict] = {}
        deadline = time.monotonic() + timeout
        while sum(entry["finals"] for entry in got.values()) < count:
            result, error = self.responses.get(timeout=max(0.01, deadline - time.monotonic()))
            if error is not None:  # an error response is final; its request id is not reported, so keep order
                key = f"error-{len(got)}"
                got[key] = {"pieces": [], "last": None, "error": error.message(), "finals": 1}
                continue
            response = result.get_response()
            entry = got.setdefault(response.id, {"pieces": [], "last": None, "error": None, "finals": 0,
                                                 "results": []})
            entry["pieces"].append(result.as_numpy("text_output")[0, 0].decode())
            entry["last"] = result
            entry["results"].append(result)
            entry["finals"] += int(response.parameters["triton_final_response"].bool_param)
        return got

    def close(self, cancel: bool = False) -> None:
        self.client.stop_stream(cancel_requests=cancel)
        self.client.close()


def stream_one(url: str, prompt: str, max_tokens: int, **extra):
    stream = GrpcStream(url)
    try:
        stream.send("r0", grpc_inputs([prompt], max_tokens, **extra))
        return next(iter(stream.collect(1).values()))
    finally:
        stream.close()


def http_post(url: str, body: dict, timeout: float = REQUEST_TIMEOUT_S):
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    return urllib.request.urlopen(request, timeout=timeout)


def sse_events(reply) -> list[dict]:
    return [json.loads(line[len(b"data: "):]) for line in reply if line.startswith(b"data: ")]


def scalar(result, name):
    return result.as_numpy(name)[0, 0]


# TensorRT-LLM's ensemble inputs as it last declared them (triton_backend/all_models/inflight_batcher_llm/
# ensemble/config.pbtxt), with the names it used before (random_seed, min_length); the ones this model serves.
TRTLLM_INPUTS = {
    "text_input": "STRING", "max_tokens": "INT32", "num_return_sequences": "INT32", "bad_words": "STRING",
    "stop_words": "STRING", "exclude_input_in_output": "BOOL", "end_id": "INT32", "pad_id": "INT32",
    "top_k": "INT32", "top_p": "FP32", "temperature": "FP32", "length_penalty": "FP32",
    "repetition_penalty": "FP32", "min_tokens": "INT32", "presence_penalty": "FP32", "frequency_penalty": "FP32",
    "seed": "UINT64", "return_log_probs": "BOOL", "return_context_logits": "BOOL",
    "return_generation_logits": "BOOL", "return_perf_metrics": "BOOL", "return_num_input_tokens": "BOOL",
    "return_num_output_tokens": "BOOL", "beam_width": "INT32", "stream": "BOOL",
    "random_seed": "UINT64", "min_length": "INT32",
}
TRTLLM_OUTPUTS = {"text_output": "STRING", "cum_log_probs": "FP32", "output_log_probs": "FP32",
                  "context_logits": "FP32", "generation_logits": "FP32", "batch_index": "INT32",
                  "sequence_index": "INT32", "acceptance_rate": "FP32", "total_accepted_draft_tokens": "INT32",
                  "total_draft_tokens": "INT32", "num_input_tokens": "INT32", "num_output_tokens": "INT32"}


# ---- export (no server) ----

def test_export_repository_layout(workdir, engine_dir):
    repo = export_triton(TritonExportConfig(engine_dir, workdir / "layout", model_name="spec-1", max_batch_size=2,
                                            instances=3, copy_engine=True))
    config = (repo / "spec-1" / "config.pbtxt").read_text()
    assert 'name: "spec-1"' in config and 'backend: "python"' in config and "max_batch_size: 2" in config
    assert "decoupled: true" in config and "count: 3" in config and "kind: KIND_CPU" in config
    for spec in INPUTS + OUTPUTS:
        block = config.split(f'name: "{spec.name}"', 1)[1].split("}", 1)[0]
        assert f"data_type: TYPE_{spec.data_type}" in block
        assert ("optional: true" in block) == spec.optional
    assert {s.name: s.data_type for s in INPUTS} == TRTLLM_INPUTS
    assert {s.name: s.data_type for s in OUTPUTS}.items() >= TRTLLM_OUTPUTS.items()
    assert [s.name for s in INPUTS if not s.optional] == ["text_input", "max_tokens"]
    assert {s.name: s.dims for s in INPUTS if s.dims != (1,)} == {"stop_words": (-1,), "bad_words": (-1,)}
    assert 'key: "engine_dir"' in config and 'string_value: "engine"' in config
    assert 'key: "inflight_batch"\n  value: { string_value: "1" }' in config  # one request at a time by default
    assert (repo / "spec-1" / "engine" / "runtime_config.json").is_file()
    model = (repo / "spec-1" / "1" / "model.py").read_text()
    assert "class TritonPythonModel" in model and "TRITONSERVER_RESPONSE_COMPLETE_FINAL" in model
    assert [p.name for p in workdir.iterdir() if p.name.startswith(".layout")] == []


@pytest.mark.parametrize("args, message", [
    (["missing-engine"], "does not exist"),
    (["{engine}", "--max-batch-size", "0"], "--max-batch-size must be >= 1"),
    (["{engine}", "--instances", "0"], "--instances must be >= 1"),
    (["{engine}", "--inflight-batch", "0"], "--inflight-batch must be >= 1"),
    (["{engine}", "--model-name", "a b"], "model name"),
    (["{engine}", "--device", "tpu"], "--device"),
])
def test_export_bad_input(workdir, engine_dir, capsys, args, message):
    out = workdir / "bad-export"
    with pytest.raises(SystemExit) as exit_info:
        main(["export", "triton", *[a.format(engine=engine_dir) for a in args], "--output", str(out)])
    assert exit_info.value.code == JetSpecError.exit_code
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not out.exists() and not [p for p in workdir.iterdir() if p.name.startswith(".bad-export")]


def test_export_refuses_existing_output(workdir, engine_dir):
    out = workdir / "existing"
    out.mkdir()
    with pytest.raises(JetSpecError, match="already exists"):
        export_triton(TritonExportConfig(engine_dir, out))
    export_triton(TritonExportConfig(engine_dir, out, overwrite=True))
    assert (out / MODEL / "config.pbtxt").is_file()


def test_serve_bad_repository(workdir, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["serve", str(workdir / "no-such-repo")])
    assert exit_info.value.code == JetSpecError.exit_code
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["--max-restarts", "-1"], "--max-restarts must be >= 0"),
    (["--restart-window", "0"], "--restart-window must be > 0"),
    (["--stop-timeout", "0"], "--stop-timeout must be >= 1"),
])
def test_serve_bad_options(workdir, engine_dir, capsys, args, message):
    repo = export_triton(TritonExportConfig(engine_dir, workdir / "options-repo", overwrite=True))
    with pytest.raises(SystemExit) as exit_info:
        main(["serve", str(repo), *args])
    assert exit_info.value.code == JetSpecError.exit_code
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_serve_explains_tritonserver_exit_code_1_while_stopping(workdir, capsys, monkeypatch):
    """tritonserver exits 1 when its exit timeout runs out with a model still loaded; serve's error line says so
    (no server: the supervisor is stubbed, SIGTERM came at once and tritonserver "exited 1")."""
    from jetspec_trt.export import server as server_module

    def terminated(self):
        raise server_module._Terminated()

    monkeypatch.setattr(server_module.Supervisor, "start", lambda self: None)
    monkeypatch.setattr(server_module.Supervisor, "run", terminated)
    monkeypatch.setattr(server_module.TritonServer, "stop", lambda self, grace=None: 1)
    with pytest.raises(SystemExit) as exit_info:
        main(["serve", str(workdir), "--stop-timeout", "7"])
    assert exit_info.value.code == JetSpecError.exit_code
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "error: tritonserver exited with code 1 while stopping; --stop-timeout (7 s) ran out with a model still "
        "loaded (e.g. one that tritonserver 2.51 keeps loaded after a gRPC stream was cancelled just as its first "
        "request finished: docs/triton.md, Clients)")


def test_serve_help_documents_restarts_and_exit_status(capsys):
    main(["serve", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "Triton does not restart a python model's stub process that dies" in text
    assert "restarts tritonserver" in text and "--max-restarts" in text and "--restart-window" in text
    assert "Exit status: 0 after Ctrl-C / SIGTERM once tritonserver has exited 0." in text


def test_serve_reports_a_model_that_fails_to_load(workdir, engine_dir, capfd):
    repo = export_triton(TritonExportConfig(engine_dir, workdir / "broken-repo"))
    config = repo / MODEL / "config.pbtxt"
    config.write_text(config.read_text().replace(str(engine_dir.resolve()), str(workdir / "gone")))
    ports = free_ports(3)
    with pytest.raises(SystemExit) as exit_info:
        main(["serve", str(repo), "--address", "127.0.0.1", "--http-port", str(ports[0]), "--grpc-port",
              str(ports[1]), "--metrics-port", str(ports[2]), "--ready-timeout", str(READY_TIMEOUT_S)])
    assert exit_info.value.code == JetSpecError.exit_code
    captured = capfd.readouterr()
    assert "tritonserver exited with code 1 before it was ready" in captured.err
    assert "does not exist" in captured.out + captured.err  # the model's own error, in Triton's log
    assert processes_mentioning(str(repo)) == []


# ---- the served engine ----

PROMPTS = ["def fibonacci(n):", "The capital of France is", "x = [i * i for i in range(10)]"]


def test_health_and_metadata(served):
    client = httpclient.InferenceServerClient(served.http.removeprefix("http://"))
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready(MODEL)
    metadata = client.get_model_metadata(MODEL)
    triton_type = {"STRING": "BYTES"}  # Triton's metadata spells TYPE_STRING as BYTES
    assert {i["name"]: i["datatype"] for i in metadata["inputs"]} == {
        name: triton_type.get(kind, kind) for name, kind in TRTLLM_INPUTS.items()}
    assert {o["name"] for o in metadata["outputs"]} == {s.name for s in OUTPUTS}
    with urllib.request.urlopen(served.metrics, timeout=10) as reply:
        assert b"nv_inference_request_success" in reply.read()


@pytest.mark.parametrize("prompt", PROMPTS)
def test_grpc_stream_equals_direct_runner(served, runner, prompt):
    expected = reference(runner, prompt, 24)
    got = stream_one(served.grpc, prompt, 24)
    assert got["error"] is None and got["finals"] == 1
    assert "".join(got["pieces"]) == expected.text
    assert len(got["pieces"]) > 1  # streamed, not one lump
    last, stats = got["last"], expected.stats
    assert scalar(last, "finish_reason").decode() == stats.finish_reason
    assert scalar(last, "num_output_tokens") == len(expected.token_ids)
    assert scalar(last, "num_input_tokens") == len(runner.encode(prompt))
    assert scalar(last, "decoding_iter") == stats.rounds
    assert scalar(last, "total_draft_tokens") == stats.drafted_tokens > 0
    assert scalar(last, "total_accepted_draft_tokens") == stats.accepted_drafts
    assert scalar(last, "avg_decoded_tokens_per_iter") == pytest.approx(stats.tau)
    assert scalar(last, "acceptance_rate") == pytest.approx(stats.accepted_drafts / stats.drafted_tokens)


def test_sampled_stream_equals_direct_runner_with_the_same_seed(served, runner):
    prompt, sampling = PROMPTS[2], SamplingConfig(temperature=0.8, top_p=0.9, seed=1234)
    with torch_threads(1):
        expected = runner.generate(prompt, 16, sampling)
    got = stream_one(served.grpc, prompt, 16, temperature=np.array([[0.8]], dtype=np.float32),
                     top_p=np.array([[0.9]], dtype=np.float32), seed=np.array([[1234]], dtype=np.uint64))
    assert got["error"] is None and "".join(got["pieces"]) == expected.text


def test_http_generate_stream_equals_direct_runner(served, runner):
    prompt = PROMPTS[0]
    expected = reference(runner, prompt, 24)
    with http_post(f"{served.http}/v2/models/{MODEL}/generate_stream",
                   {"text_input": prompt, "max_tokens": 24, "stream": True}) as reply:
        events = sse_events(reply)
    assert len(events) > 1 and all("error" not in e for e in events)
    assert "".join(e["text_output"] for e in events) == expected.text
    assert events[-1]["finish_reason"] == expected.stats.finish_reason
    assert events[-1]["total_draft_tokens"] == expected.stats.drafted_tokens

    with http_post(f"{served.http}/v2/models/{MODEL}/generate", {"text_input": prompt, "max_tokens": 24}) as reply:
        whole = json.loads(reply.read())
    assert whole["text_output"] == prompt + expected.text  # TensorRT-LLM's default: the prompt comes first
    with http_post(f"{served.http}/v2/models/{MODEL}/generate",
                   {"text_input": prompt, "max_tokens": 24, "exclude_input_in_output": True}) as reply:
        assert json.loads(reply.read())["text_output"] == expected.text


def test_grpc_batch_and_end_id(served, runner):
    """A request of several prompts gets one response per prompt (batch_index says which), as TensorRT-LLM's."""
    prompts = PROMPTS[:2]
    expected = [reference(runner, p, 12) for p in prompts]
    stream = GrpcStream(served.grpc)
    try:
        stream.send("batch", grpc_inputs(prompts, 12, stream=False,
                                         exclude_input_in_output=np.array([[True], [True]])))
        end_id = expected[0].token_ids[3]
        stream.send("end", grpc_inputs(prompts[:1], 12, end_id=np.array([[end_id]], dtype=np.int32)))
        got = stream.collect(2)
    finally:
        stream.close()
    batch = got["batch"]
    assert batch["error"] is None and batch["finals"] == 1
    assert batch["pieces"] == [e.text for e in expected]
    assert [scalar(r, "batch_index") for r in batch["results"]] == [0, 1]
    assert [scalar(r, "num_output_tokens") for r in batch["results"]] == [len(e.token_ids) for e in expected]
    cut = expected[0].token_ids[: expected[0].token_ids.index(end_id) + 1]
    assert "".join(got["end"]["pieces"]) == runner.tokenizer.decode(cut, skip_special_tokens=True)
    assert scalar(got["end"]["last"], "finish_reason") == b"stop"
    assert scalar(got["end"]["last"], "num_output_tokens") == len(cut)


BAD_REQUESTS = {
    "empty prompt": (dict(prompts=[""]), "text_input is empty"),
    "max_tokens 0": (dict(max_tokens=0), "max_tokens must be in 1..1024"),
    "max_tokens negative": (dict(max_tokens=-5), "max_tokens must be in 1..1024"),
    "max_tokens absurd": (dict(max_tokens=2_000_000_000), "max_tokens must be in 1..1024"),
    "wrong dtype": (dict(max_tokens=np.array([[8.0]], dtype=np.float32)), "expects 'INT32'"),
    "prompt too long": (dict(prompts=["y" * 1500]), "the engine's max_seq_len is 1024"),
    "unknown input": (dict(extra={"top_q": np.array([[0.5]], dtype=np.float32)}), "unexpected inference input"),
    "unknown parameter": (dict(parameters={"max_length": 5}), "unknown request parameter(s) max_length"),
    "negative temperature": (dict(extra={"temperature": np.array([[-1.0]], dtype=np.float32)}), "temperature"),
    "top_p zero": (dict(extra={"top_p": np.array([[0.0]], dtype=np.float32)}), "top_p must be in (0, 1]"),
    "end_id out of vocab": (dict(extra={"end_id": np.array([[99999]], dtype=np.int32)}), "end_id must be in"),
    "streaming batch": (dict(prompts=["a", "b"]), "a streaming request carries one prompt"),
    # TensorRT-LLM's contract: the ensemble's types (a v0.5 client's UINT32 is Triton's dtype error) ...
    "max_tokens UINT32": (dict(max_tokens=np.array([[8]], dtype=np.uint32)), "expects 'INT32'"),
    "seed INT64": (dict(extra={"seed": np.array([[1]], dtype=np.int64)}), "expects 'UINT64'"),
    # ... and its knobs this model has no implementation of, refused rather than ignored
    "beam search": (dict(extra={"beam_width": np.array([[2]], dtype=np.int32)}), "beam_width must be 1"),
    "repetition penalty": (dict(extra={"repetition_penalty": np.array([[1.2]], dtype=np.float32)}),
                           "repetition_penalty must be 1 (penalties are not implemented)"),
    "min_length": (dict(extra={"min_length": np.array([[4]], dtype=np.int32)}), "min_length must be 0 or 1"),
    "context logits": (dict(extra={"return_context_logits": np.array([[True]])}),
                       "return_context_logits must be false"),
    "two sequences": (dict(extra={"num_return_sequences": np.array([[2]], dtype=np.int32)}),
                      "num_return_sequences must be 1"),
    "top_k negative": (dict(extra={"top_k": np.array([[-1]], dtype=np.int32)}), "top_k must be >= 0"),
    "seeds differ": (dict(extra={"seed": np.array([[1]], dtype=np.uint64),
                                 "random_seed": np.array([[2]], dtype=np.uint64)}),
                     "seed (1) and random_seed (2) differ"),
    "multi-token bad word": (dict(extra={"bad_words": np.array([[b"The capital of France"]], dtype=object)}),
                             "single-token bad words only"),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_grpc_bad_request_gets_error(served, case):
    spec, message = BAD_REQUESTS[case]
    stream = GrpcStream(served.grpc)
    try:
        stream.send("bad", grpc_inputs(spec.get("prompts", ["hello"]), spec.get("max_tokens", 8),
                                       **spec.get("extra", {})), parameters=spec.get("parameters"))
        got = list(stream.collect(1).values())
    finally:
        stream.close()
    assert len(got) == 1 and got[0]["error"] is not None, got
    assert message in got[0]["error"] and "\n" not in got[0]["error"]
    assert http_ready(served.http)


@pytest.mark.parametrize("body, status, message", [
    ({"text_input": "", "max_tokens": 8}, 400, "text_input is empty"),
    ({"text_input": "hi", "max_tokens": 0}, 400, "max_tokens must be in 1..1024"),
    ({"text_input": "hi", "max_tokens": 8, "max_length": 5}, 400, "unknown request parameter(s) max_length"),
    ({"text_input": "hi", "max_tokens": "eight"}, None, "Unable to parse 'data'"),  # Triton's own check
    ({"text_input": "hi"}, 400, "missing required input(s) ['max_tokens']"),
])
def test_http_bad_request_gets_error(served, body, status, message):
    with pytest.raises(urllib.error.HTTPError) as error:
        http_post(f"{served.http}/v2/models/{MODEL}/generate", body)
    if status is not None:
        assert error.value.code == status
    text = json.loads(error.value.read())["error"]
    assert message in text and "\n" not in text
    assert http_ready(served.http)


def trtllm_client_inputs(prompt: str, max_tokens: int, **optional) -> list:
    """Inputs built as TensorRT-LLM's end_to_end_grpc_client.prepare_inputs builds them: [[value]] arrays of the
    ensemble's types, word lists as [[words]] of object dtype."""
    arrays = {"text_input": np.array([[prompt]]).astype(object),
              "max_tokens": np.ones((1, 1), dtype=np.int32) * max_tokens,
              "stream": np.array([[True]], dtype=bool), "beam_width": np.array([[1]], dtype=np.int32),
              "temperature": np.array([[optional.pop("temperature", 0.0)]], dtype=np.float32),
              "num_return_sequences": np.array([[1]], dtype=np.int32)}
    kinds = {"top_k": np.int32, "top_p": np.float32, "random_seed": np.uint64, "seed": np.uint64,
             "end_id": np.int32, "pad_id": np.int32, "repetition_penalty": np.float32, "presence_penalty": np.float32,
             "frequency_penalty": np.float32, "return_log_probs": bool, "exclude_input_in_output": bool}
    for name, value in optional.items():
        arrays[name] = np.array([value], dtype=object) if name.endswith("_words") else np.array([[value]],
                                                                                                dtype=kinds[name])
    return infer_inputs(arrays)


def trtllm_stream(served, inputs: list, *extra_outputs: str) -> dict:
    """One streaming request asking, as TensorRT-LLM's client does, for text_output (and `extra_outputs`) by name."""
    outputs = [grpcclient.InferRequestedOutput(name) for name in ("text_output", *extra_outputs)]
    stream = GrpcStream(served.grpc)
    try:
        stream.send("trtllm", inputs, outputs=outputs)
        return next(iter(stream.collect(1).values()))
    finally:
        stream.close()


def test_tensorrt_llm_client_sampled_stream_with_random_seed_top_k_and_log_probs(served, runner):
    """The ensemble's tensors as TensorRT-LLM's client sends them; random_seed and seed seed alike; the streamed
    log probs are the target's, read off the verify logits."""
    prompt = PROMPTS[2]
    sampling = SamplingConfig(temperature=0.9, top_p=0.95, seed=77, top_k=8)
    with torch_threads(1):
        ids = runner.encode(prompt)
        tokens = [t for chunk in runner.stream_tokens(ids, 16, sampling, logprobs=True) for t in chunk]
        logprobs = runner.last_stats.token_logprobs
    expected = runner.tokenizer.decode(tokens, skip_special_tokens=True)
    for seed_name in ("random_seed", "seed"):
        got = trtllm_stream(served, trtllm_client_inputs(
            prompt, 16, temperature=0.9, top_p=0.95, top_k=8, **{seed_name: 77}, stop_words=[""], bad_words=[""],
            end_id=runner.runtime.eos_token_ids[0], pad_id=0, return_log_probs=True, repetition_penalty=1.0,
            presence_penalty=0.0, frequency_penalty=0.0, exclude_input_in_output=True),
            "cum_log_probs", "output_log_probs")
        assert got["error"] is None and got["finals"] == 1, got["error"]
        assert "".join(got["pieces"]) == expected and len(got["pieces"]) > 1
        streamed = np.concatenate([r.as_numpy("output_log_probs").reshape(-1) for r in got["results"]])
        assert streamed.shape == (len(tokens),) and streamed == pytest.approx(logprobs, abs=1e-5)
        assert all(r.as_numpy("output_log_probs").shape[:2] == (1, 1) for r in got["results"])
        assert scalar(got["last"], "cum_log_probs") == pytest.approx(sum(logprobs), abs=1e-4)
        assert got["last"].as_numpy("batch_index") is None  # not asked for: TensorRT-LLM's client asks by name
    without = SamplingConfig(temperature=0.9, top_p=0.95, seed=77)  # top_k changes the draws
    with torch_threads(1):
        assert runner.generate(prompt, 16, without).text != expected


def test_tensorrt_llm_client_stop_words_end_the_stream(served, runner):
    prompt = PROMPTS[0]
    full = reference(runner, prompt, 24)
    decode = lambda ids: runner.tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
    word = decode(full.token_ids[:8])[-3:]  # three characters the greedy output reaches at its 8th token
    keep = StopWords((word,)).keep(decode, full.token_ids, len(full.token_ids))
    assert keep is not None and keep <= 8
    got = trtllm_stream(served, trtllm_client_inputs(prompt, 24, stop_words=["never appears here", word]),
                        "finish_reason", "num_output_tokens")
    assert got["error"] is None, got["error"]
    assert "".join(got["pieces"]) == decode(full.token_ids[:keep])
    assert word in decode(full.token_ids[:keep]) and word not in decode(full.token_ids[: keep - 1])
    assert scalar(got["last"], "finish_reason") == b"stop" and scalar(got["last"], "num_output_tokens") == keep


def test_tensorrt_llm_client_bad_words_are_never_generated(served, runner):
    """A single-token bad word is banned in the one sampler: greedy output is the target's greedy decoding
    without that token (the direct runner with the same banned id), so the speculative output stays exact."""
    prompt = PROMPTS[1]
    full = reference(runner, prompt, 16)
    text_of = {t: runner.tokenizer.decode([t]) for t in set(full.token_ids)}
    banned = next(t for t in full.token_ids if text_of[t].strip() and runner.encode(text_of[t]) == [t])
    with torch_threads(1):
        expected = runner.generate(prompt, 16, SamplingConfig(banned_token_ids=(banned,)))
    assert banned not in expected.token_ids and expected.text != full.text
    got = trtllm_stream(served, trtllm_client_inputs(prompt, 16, bad_words=[text_of[banned]]))
    assert got["error"] is None, got["error"]
    assert "".join(got["pieces"]) == expected.text


def test_tensorrt_llm_http_generate_example(served, runner):
    """TensorRT-LLM's README request, unchanged: empty bad_words / stop_words strings mean none."""
    expected = reference(runner, PROMPTS[1], 20)
    with http_post(f"{served.http}/v2/models/{MODEL}/generate",
                   {"text_input": PROMPTS[1], "max_tokens": 20, "bad_words": "", "stop_words": ""}) as reply:
        whole = json.loads(reply.read())
    assert whole["text_output"] == PROMPTS[1] + expected.text and whole["batch_index"] == 0
    with http_post(f"{served.http}/v2/models/{MODEL}/generate",
                   {"text_input": PROMPTS[1], "max_tokens": 20, "temperature": 0.8, "top_k": 5,
                    "random_seed": 3, "return_log_probs": True, "exclude_input_in_output": True}) as reply:
        sampled = json.loads(reply.read())
    with torch_threads(1):
        direct = runner.generate(PROMPTS[1], 20, SamplingConfig(0.8, 1.0, 3, top_k=5))
    assert sampled["text_output"] == direct.text
    assert len(sampled["output_log_probs"]) == len(direct.token_ids)
    decode = lambda ids: runner.tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
    word = decode(expected.token_ids[:5])[-2:]
    keep = StopWords((word,)).keep(decode, expected.token_ids, len(expected.token_ids))
    with http_post(f"{served.http}/v2/models/{MODEL}/generate",  # a JSON list is the word list
                   {"text_input": PROMPTS[1], "max_tokens": 20, "stop_words": ["never appears here", word],
                    "exclude_input_in_output": True}) as reply:
        assert json.loads(reply.read())["text_output"] == decode(expected.token_ids[:keep])


def test_cancelled_stream_stops_generation(served, runner):
    stream = GrpcStream(served.grpc)
    try:
        stream.send("long", grpc_inputs(["count forever:"], 1000))
        stream.responses.get(timeout=REQUEST_TIMEOUT_S)  # generation is under way
    finally:
        stream.close(cancel=True)
    deadline = time.monotonic() + 30
    while "request cancelled by the client" not in served.log.read_text():
        assert time.monotonic() < deadline, "the model never noticed the cancellation"
        time.sleep(0.2)
    got = stream_one(served.grpc, PROMPTS[1], 8)  # the engine is free again
    assert got["error"] is None and "".join(got["pieces"]) == reference(runner, PROMPTS[1], 8).text


def metric(served, name: str, **labels) -> float:
    return read_metric(served.metrics, name, **labels)


QUEUED = 5


def test_cancelled_queued_requests_cost_no_prefill(served, runner):
    """Requests cancelled while they wait behind a running one are dropped before their prefill."""
    before = {key: metric(served, name, **labels) for key, (name, labels) in {
        "prefills": ("jetspec_prefills_total", {}),
        "queued": ("jetspec_cancelled_total", {"stage": "queued"}),
        "decoding": ("jetspec_cancelled_total", {"stage": "decoding"})}.items()}
    busy, waiting = GrpcStream(served.grpc), GrpcStream(served.grpc)
    try:
        busy.send("busy", grpc_inputs(["count forever:"], 1000))
        busy.responses.get(timeout=REQUEST_TIMEOUT_S)  # the engine is decoding it (about 15 s of work)
        for i in range(QUEUED):
            waiting.send(f"q{i}", grpc_inputs([f"queued prompt number {i}"], 8))
        wait_until(lambda: metric(served, "jetspec_queued_requests") == QUEUED, 30, "the requests to be queued")
        waiting.close(cancel=True)
        time.sleep(1.0)  # the cancellations reach Triton before the engine is freed
    finally:
        busy.close(cancel=True)
    wait_until(lambda: metric(served, "jetspec_cancelled_total", stage="queued") - before["queued"] == QUEUED,
               REQUEST_TIMEOUT_S, "the queued cancellations", served.log)
    assert metric(served, "jetspec_prefills_total") - before["prefills"] == 1  # the busy request's only
    assert metric(served, "jetspec_cancelled_total", stage="decoding") - before["decoding"] == 1  # the busy one
    assert metric(served, "jetspec_queued_requests") == 0
    assert "request cancelled by the client before decoding (no prefill ran)" in served.log.read_text()
    got = stream_one(served.grpc, PROMPTS[1], 8)  # the engine is free again
    assert got["error"] is None and "".join(got["pieces"]) == reference(runner, PROMPTS[1], 8).text


CLIENTS, REQUESTS_PER_CLIENT, CONCURRENT_MAX_TOKENS = 64, 4, 12


def test_concurrent_streaming_clients(served, runner):
    concurrent_streaming_clients(served, runner)


def concurrent_streaming_clients(served, runner):
    """CLIENTS gRPC streams send REQUESTS_PER_CLIENT requests each at once: nothing is lost or mixed up, and every
    output is the direct runner's."""
    prompts = {f"c{c}-r{r}": f"client {c} asks question {r}: what is {c} * {r}?"
               for c in range(CLIENTS) for r in range(REQUESTS_PER_CLIENT)}
    expected = {key: reference(runner, prompt, CONCURRENT_MAX_TOKENS).text for key, prompt in prompts.items()}
    results: dict[str, dict] = {}
    failures: list[str] = []
    lock = threading.Lock()
    start = threading.Barrier(CLIENTS + 1)

    def client(c: int) -> None:
        keys = [f"c{c}-r{r}" for r in range(REQUESTS_PER_CLIENT)]
        try:
            stream = GrpcStream(served.grpc)
            start.wait(timeout=60)
            try:
                for key in keys:
                    stream.send(key, grpc_inputs([prompts[key]], CONCURRENT_MAX_TOKENS))
                got = stream.collect(len(keys), timeout=240)
            finally:
                stream.close()
            with lock:
                results.update(got)
        except Exception as err:  # noqa: BLE001 - counted as failures below
            with lock:
                failures.append(f"client {c}: {type(err).__name__}: {err}")

    threads = [threading.Thread(target=client, args=(c,), daemon=True) for c in range(CLIENTS)]
    for t in threads:
        t.start()
    start.wait(timeout=60)
    began = time.perf_counter()
    for t in threads:
        t.join(timeout=300)
    wall = time.perf_counter() - began
    assert not any(t.is_alive() for t in threads), "a client thread hung"

    lost = [key for key in prompts if key not in results]
    errors = [f"{key}: {r['error']}" for key, r in results.items() if r["error"] is not None]
    mixed = [key for key in prompts if key in results and "".join(results[key]["pieces"]) != expected[key]]
    extra_finals = [key for key, r in results.items() if r["finals"] != 1]
    total = CLIENTS * REQUESTS_PER_CLIENT
    tokens = sum(int(scalar(r["last"], "num_output_tokens")) for r in results.values() if r["last"] is not None)
    print(f"\nconcurrency: {CLIENTS} gRPC streaming clients x {REQUESTS_PER_CLIENT} requests = {total} requests "
          f"({CONCURRENT_MAX_TOKENS} max tokens, {tokens} tokens streamed) in {wall:.1f} s "
          f"({total / wall:.1f} req/s); lost {len(lost)}, errors {len(errors)}, mixed-up {len(mixed)}, "
          f"client failures {len(failures)}")
    assert not failures, failures[:5]
    assert not lost and not errors and not mixed and not extra_finals, (lost[:5], errors[:5], mixed[:5])
    assert len(set(expected.values())) > total // 2  # distinct answers, so a mix-up would show
    assert http_ready(served.http)


def test_sigterm_stops_server_cleanly(served):
    """Last: `jetspec-trt serve` exits 0 on SIGTERM and leaves no tritonserver or stub behind."""
    served.process.send_signal(signal.SIGTERM)
    assert served.process.wait(timeout=60) == 0
    assert "tritonserver stopped (exit code 0)" in served.log.read_text()
    assert processes_mentioning(str(served.repo)) == []
    assert not http_ready(served.http)


# ---- in-flight batching: every request of the instance in one engine's scheduler (a server of its own) ----

INFLIGHT_BATCH = 8


@pytest.fixture(scope="module")
def served_batched(workdir, engine_dir):
    repo = export_triton(TritonExportConfig(engine_dir, workdir / "batched-repo", max_batch_size=4, cpu_threads=1,
                                            copy_engine=True, inflight_batch=INFLIGHT_BATCH))
    assert 'key: "inflight_batch"' in (repo / MODEL / "config.pbtxt").read_text()
    with serving(repo, workdir / "serve-batched.log", engine_dir) as server:
        yield server


def step_counts(server) -> tuple[float, float]:
    return metric(server, "jetspec_steps_total"), metric(server, "jetspec_step_sequences_total")


def test_batched_concurrent_streaming_clients_share_one_engine(served_batched, runner):
    """The 64 x 4 clients against one instance batching up to INFLIGHT_BATCH sequences: every output is the direct
    runner's, and the scheduler's steps ran several sequences at once (the instance's one engine interleaved
    them: more sequence-rounds than steps)."""
    steps, sequences = step_counts(served_batched)
    concurrent_streaming_clients(served_batched, runner)
    steps, sequences = (now - before for now, before in zip(step_counts(served_batched), (steps, sequences)))
    print(f"in-flight batching: {sequences:g} sequence-rounds in {steps:g} steps (mean batch {sequences / steps:.2f})")
    assert steps > 0 and sequences / steps > 2
    assert metric(served_batched, "jetspec_queued_requests") == 0


def test_batched_requests_with_every_setting_equal_the_direct_runner(served_batched, runner):
    """Concurrent requests of different settings in one batch, each as the direct runner decodes it alone:
    seeded sampling with top_k and log probs, a stop word, end_id, a bad word, and a non-streaming batch of
    prompts (answered in order)."""
    decode = lambda ids: runner.tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
    greedy = [reference(runner, p, 20) for p in PROMPTS]
    sampling = SamplingConfig(temperature=0.9, top_p=0.95, seed=77, top_k=8)
    with torch_threads(1):
        tokens = [t for chunk in runner.stream_tokens(runner.encode(PROMPTS[2]), 16, sampling, logprobs=True)
                  for t in chunk]
        logprobs = runner.last_stats.token_logprobs
    word = decode(greedy[0].token_ids[:8])[-3:]
    keep = StopWords((word,)).keep(decode, greedy[0].token_ids, len(greedy[0].token_ids))
    end_id = greedy[1].token_ids[3]
    cases = {
        "sampled": (trtllm_client_inputs(PROMPTS[2], 16, temperature=0.9, top_p=0.95, top_k=8, seed=77,
                                         return_log_probs=True), decode(tokens)),
        "stop": (trtllm_client_inputs(PROMPTS[0], 20, stop_words=[word]), decode(greedy[0].token_ids[:keep])),
        "end": (trtllm_client_inputs(PROMPTS[1], 20, end_id=end_id),
                decode(greedy[1].token_ids[: greedy[1].token_ids.index(end_id) + 1])),
        "greedy": (trtllm_client_inputs(PROMPTS[2], 20), greedy[2].text),
    }
    outputs = [grpcclient.InferRequestedOutput(n) for n in ("text_output", "output_log_probs", "finish_reason")]
    stream = GrpcStream(served_batched.grpc)
    try:
        for key, (inputs, _) in cases.items():
            stream.send(key, inputs, outputs=outputs)
        stream.send("batch", grpc_inputs(PROMPTS, 20, stream=False,
                                         exclude_input_in_output=np.array([[True]] * len(PROMPTS))))
        got = stream.collect(len(cases) + 1, timeout=120)
    finally:
        stream.close()
    for key, (_, expected) in cases.items():
        assert got[key]["error"] is None and got[key]["finals"] == 1, (key, got[key]["error"])
        assert "".join(got[key]["pieces"]) == expected, key
    assert scalar(got["stop"]["last"], "finish_reason") == scalar(got["end"]["last"], "finish_reason") == b"stop"
    streamed = np.concatenate([r.as_numpy("output_log_probs").reshape(-1) for r in got["sampled"]["results"]])
    assert streamed == pytest.approx(logprobs, abs=1e-5)
    assert got["batch"]["pieces"] == [g.text for g in greedy] and got["batch"]["finals"] == 1
    assert [scalar(r, "batch_index") for r in got["batch"]["results"]] == [0, 1, 2]
    assert [scalar(r, "decoding_iter") for r in got["batch"]["results"]] == [g.stats.rounds for g in greedy]


def test_batched_cancellation_drops_waiting_requests_without_prefill(served_batched, runner):
    """INFLIGHT_BATCH long requests fill the batch; requests waiting behind them in the scheduler, then cancelled,
    leave it at once and never prefill; the long ones, cancelled, free the engine."""
    before = (metric(served_batched, "jetspec_prefills_total"),
              metric(served_batched, "jetspec_cancelled_total", stage="queued"))
    busy, waiting = GrpcStream(served_batched.grpc), GrpcStream(served_batched.grpc)
    try:
        for i in range(INFLIGHT_BATCH):
            busy.send(f"busy{i}", grpc_inputs([f"count forever {i}:"], 1000))
        wait_until(lambda: metric(served_batched, "jetspec_prefills_total") - before[0] == INFLIGHT_BATCH, 60,
                   "the batch to fill", served_batched.log)
        for i in range(QUEUED):
            waiting.send(f"q{i}", grpc_inputs([f"queued prompt number {i}"], 8))
        wait_until(lambda: metric(served_batched, "jetspec_queued_requests") == QUEUED, 30, "the requests to wait")
        waiting.close(cancel=True)
        wait_until(lambda: metric(served_batched, "jetspec_cancelled_total", stage="queued") - before[1] == QUEUED,
                   30, "the waiting requests' cancellations", served_batched.log)
        assert metric(served_batched, "jetspec_prefills_total") - before[0] == INFLIGHT_BATCH
    finally:
        busy.close(cancel=True)
    wait_until(lambda: metric(served_batched, "jetspec_queued_requests") == 0, 30, "an empty queue")
    got = stream_one(served_batched.grpc, PROMPTS[1], 8)  # the engine is free again
    assert got["error"] is None and "".join(got["pieces"]) == reference(runner, PROMPTS[1], 8).text
    assert metric(served_batched, "jetspec_prefills_total") - before[0] == INFLIGHT_BATCH + 1


def test_batched_serving_bench_at_1_and_4_clients(served_batched, engine_dir, workdir, capsys):
    """`jetspec-trt bench --serve-url` (bench/serving.py) against the in-flight batching server: every request of
    each pass completes, every stream equals its single-request (1 client) output in fp32, 4 clients batch, and the JSON and PNG are written."""
    prompts = workdir / "serving-prompts.jsonl"
    prompts.write_text("".join(json.dumps({"suite": "mtbench", "id": str(i), "messages": [
        {"role": "user", "content": f"question {i}: what is {i} squared?"}]}) + "\n" for i in range(6)))
    out = workdir / "serving-results"
    code, stdout, stderr = invoke_cli(
        ["bench", "--engine", str(engine_dir), "--serve-url", served_batched.grpc, "--clients", "1,4",
         "--metrics-url", served_batched.metrics, "--suite", "mtbench", "--prompts-file", str(prompts),
         "--num-prompts", "8", "--max-new-tokens", "12", "--output-dir", str(out), "--tag", "tiny"], capsys)
    assert code == 0, stderr
    path = out / "serving-cpu-tiny.json"
    assert f"wrote {path}" in stdout and path.with_suffix(".png").stat().st_size > 0
    result = json.loads(path.read_text())
    assert result["kind"] == "serving" and result["dtype"] == "float32" and result["failures"] == []
    assert result["server"]["parameters"]["inflight_batch"] == str(INFLIGHT_BATCH)
    assert result["versions"]["tritonclient"] and result["server"]["triton_version"].startswith("2.51")
    assert [r["clients"] for r in result["results"]] == [1, 4]
    for row in result["results"]:
        assert row["sent"] == row["completed"] == row["identical"] == 8 and row["failed"] == row["lost"] == 0
        assert row["mismatches"] == [] and row["tokens"] > 0 and row["per_stream_tok_s"]["p50"] > 0
    assert result["results"][1]["mean_batch"] > 1  # the 4 streams shared the engine's steps
    assert result["config"]["prompt_ids"] == [f"mtbench/{i}" for i in range(6)]  # 8 requests: 6 prompts in turn


ONE_REQUEST_STREAMS = 200


def test_batched_server_stops_cleanly_after_streams_closed_once_their_requests_finished(served_batched):
    """Last on this server: ONE_REQUEST_STREAMS streams of the serving bench's client, one request each, each closed
    as soon as its final response came (as the bench closes them: no cancellation with nothing in flight); then
    SIGTERM stops `serve` within seconds with exit code 0, the model unloaded (finalize ran). Cancelling each of
    those streams instead left the model loaded in every run tried (4 of 4, 2026-12-05): tritonserver 2.51's gRPC
    frontend loses a stream's first request when the cancellation comes just as it finishes
    (scripts/triton_stream_cancel_repro.py), so it waited out the 30 s stop timeout and exited 1."""
    for i in range(ONE_REQUEST_STREAMS):
        work: queue.Queue = queue.Queue()
        record = Request(i, 0)
        work.put(record)
        stream = StreamingClient(served_batched.grpc, MODEL)
        try:
            stream.run(work, [f"stream {i}:"], 4, time.perf_counter() + REQUEST_TIMEOUT_S)
        finally:
            stream.close()
        assert record.completed, record.error
    start = time.monotonic()
    served_batched.process.send_signal(signal.SIGTERM)
    code = served_batched.process.wait(timeout=60)
    took = time.monotonic() - start
    log = served_batched.log.read_text()
    assert code == 0 and took < 15, (code, took, log[-3000:])
    assert "tritonserver stopped (exit code 0)" in log and f"successfully unloaded '{MODEL}'" in log
    assert processes_mentioning(str(served_batched.repo)) == []


# ---- faults: a dead model, a server that dies or will not stop (each on a server of its own) ----

def last_line(log: Path) -> str:
    return log.read_text().strip().splitlines()[-1]


def test_serve_restarts_tritonserver_when_a_model_stub_dies(workdir, engine_dir, runner):
    """Triton 2.51 keeps a model whose python stub was killed 'ready' while every request fails. serve restarts
    tritonserver once; a second death within --restart-window ends serve with exit code 2 and one line."""
    repo = export_triton(TritonExportConfig(engine_dir, workdir / "restart-repo", cpu_threads=1, copy_engine=True))
    log = workdir / "serve-restart.log"
    with serving(repo, log, engine_dir, "--max-restarts", "1", "--restart-window", "600") as server:
        expected = reference(runner, PROMPTS[0], 8).text
        first = stream_one(server.grpc, PROMPTS[0], 8)
        assert first["error"] is None and "".join(first["pieces"]) == expected, first
        [stub] = instance_stubs(repo)
        os.kill(stub, signal.SIGKILL)
        wait_until(lambda: log.read_text().count("serving ") == 2 and http_ready(server.http), READY_TIMEOUT_S,
                   "serve to restart tritonserver", log)
        text = log.read_text()
        assert (f"model '{MODEL}' instance {MODEL}_0_0 died (python stub pid {stub} killed by SIGKILL)" in text
                and "restarting tritonserver (restart 1 of 1 allowed within 600 s)" in text)
        assert server.process.poll() is None
        got = stream_one(server.grpc, PROMPTS[0], 8)
        assert got["error"] is None and "".join(got["pieces"]) == expected  # the model serves again
        [second] = instance_stubs(repo)
        assert second != stub
        os.kill(second, signal.SIGKILL)  # again, within the window: serve gives up
        assert server.process.wait(timeout=60) == JetSpecError.exit_code
        error = last_line(log)
        assert error.startswith("error: ") and f"python stub pid {second} killed by SIGKILL" in error
        assert "already restarted 1 time(s) in the last 600 s (--max-restarts 1), so serve stops" in error
        assert processes_mentioning(str(repo)) == []


@pytest.mark.parametrize("fault", ["tritonserver killed", "tritonserver will not stop"])
def test_serve_exits_nonzero_when_tritonserver_dies_or_is_killed(workdir, engine_dir, fault):
    repo = export_triton(TritonExportConfig(engine_dir, workdir / f"{fault.split()[-1]}-repo", cpu_threads=1,
                                            copy_engine=True))
    log = workdir / f"serve-{fault.split()[-1]}.log"
    with serving(repo, log, engine_dir, "--stop-timeout", "1") as server:
        [tritonserver] = [pid for pid in processes_mentioning(str(repo))
                          if Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].endswith(b"/tritonserver")]
        if fault == "tritonserver killed":
            os.kill(tritonserver, signal.SIGKILL)
            message = "error: tritonserver exited on its own with code -9"
        else:  # stopped: SIGTERM cannot end it, so serve has to kill it after --stop-timeout + 10 s
            os.kill(tritonserver, signal.SIGSTOP)
            server.process.send_signal(signal.SIGTERM)
            message = "error: tritonserver did not stop within 11 s of SIGTERM and was killed"
        assert server.process.wait(timeout=60) == JetSpecError.exit_code
        assert last_line(log) == message
        assert processes_mentioning(str(repo)) == []
