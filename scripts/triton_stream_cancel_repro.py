"""Repro of a tritonserver 2.51 (pytriton wheel) bug, with a minimal model and none of jetspec's model code.

A gRPC stream whose only request has just got its final response, closed with stop_stream(cancel_requests=True),
sometimes leaves the model loaded for good: at SIGTERM tritonserver then waits its whole exit timeout ("Found 1
live models"), never calls the model's finalize, and exits 1 ("Exit timeout expired"). The model here answers
from execute(), so the python backend and the model hold nothing: the leak is in Triton's gRPC frontend. Its
verbose log shows it: the cancellation notification comes while the stream's first request (the state gRPC's
AsyncNotifyWhenDone watches, kept among the in-flight states after its final response) still waits for its last
write to complete; "Issuing cancellation" moves it to CANCELLATION_ISSUED, it then waits for a response callback
that already came ("Waiting for the callback to retrieve cancellation"), is never released, and its inference
request keeps the model alive. A stream whose first request finished well before the cancel (a second request
came after it), or one closed without cancelling, leaves nothing behind.

    python scripts/triton_stream_cancel_repro.py                 # 200 streams cancelled after their final response
    python scripts/triton_stream_cancel_repro.py --no-cancel     # the same streams closed without cancelling

2026-12-05 on the CPU: cancelled, 17 and 21 of 200 streams left a state behind (two runs), stop took 30.3 and
30.7 s, exit code 1, finalize never ran; not cancelled, or two requests per stream and cancelled: none left, stop
2.1-2.7 s, exit code 0. The jetspec model (either path) shows the same log lines and the same stop.
"""

from __future__ import annotations

import argparse
import queue
import socket
import tempfile
import time
from pathlib import Path

import numpy as np
import tritonclient.grpc as grpcclient

from jetspec_trt.export.server import TritonServer  # process management only: the wheel's tritonserver

CONFIG = """name: "echo"
backend: "python"
max_batch_size: 0
model_transaction_policy { decoupled: true }
input [ { name: "IN", data_type: TYPE_INT32, dims: [ 1 ] } ]
output [ { name: "OUT", data_type: TYPE_INT32, dims: [ 1 ] } ]
instance_group [ { count: 1, kind: KIND_CPU } ]
"""
MODEL = '''import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):  # IN = n: n responses, the last one final
        for request in requests:
            sender = request.get_response_sender()
            n = int(pb_utils.get_input_tensor_by_name(request, "IN").as_numpy()[0])
            for i in range(n):
                out = pb_utils.Tensor("OUT", np.array([i], dtype=np.int32))
                sender.send(pb_utils.InferenceResponse(output_tensors=[out]),
                            flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL if i == n - 1 else 0)
        return None

    def finalize(self):
        pb_utils.Logger.log_info("echo: finalize")
'''


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def one_stream(url: str, index: int, requests: int, cancel: bool) -> None:
    """`requests` requests one after another on one stream; closed as soon as the last final response came."""
    client = grpcclient.InferenceServerClient(url)
    responses: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: responses.put((result, error)))
    for r in range(requests):
        tensor = grpcclient.InferInput("IN", [1], "INT32")
        tensor.set_data_from_numpy(np.array([3], dtype=np.int32))
        client.async_stream_infer("echo", [tensor], request_id=f"s{index}r{r}")
        while True:
            result, error = responses.get(timeout=60)
            if error is not None:
                raise RuntimeError(error)
            if result.get_response().parameters["triton_final_response"].bool_param:
                break
    client.stop_stream(cancel_requests=cancel)
    client.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", type=int, default=200)
    parser.add_argument("--requests", type=int, default=1, help="per stream, one after another")
    parser.add_argument("--no-cancel", dest="cancel", action="store_false")
    parser.add_argument("--stop-timeout", type=int, default=30, help="tritonserver's --exit-timeout-secs")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="triton-cancel-repro-"))
    (work / "repo" / "echo" / "1").mkdir(parents=True)
    (work / "repo" / "echo" / "config.pbtxt").write_text(CONFIG)
    (work / "repo" / "echo" / "1" / "model.py").write_text(MODEL)
    log_path = work / "tritonserver.log"
    ports = free_ports(3)
    with open(log_path, "w") as log:
        server = TritonServer(work / "repo", *ports, address="127.0.0.1", log=log, log_verbose=1,
                              exit_timeout=args.stop_timeout).start()
        try:
            server.wait_ready(120)
            for index in range(args.streams):
                one_stream(f"127.0.0.1:{ports[1]}", index, args.requests, args.cancel)
        finally:
            start = time.monotonic()
            code = server.stop()
            took = time.monotonic() - start
    text = log_path.read_text()
    print(f"{args.streams} streams x {args.requests} request(s), "
          f"{'cancelled' if args.cancel else 'not cancelled'} after the final response: "
          f"{text.count('Waiting for the callback to retrieve cancellation')} stream state(s) left waiting for a "
          f"callback; stop took {took:.1f} s, exit code {code}, finalize "
          f"{'ran' if 'echo: finalize' in text else 'never ran'} (log: {log_path})")


if __name__ == "__main__":
    main()
