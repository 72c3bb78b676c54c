"""Client side of the served model (`export triton` + `serve`): request tensors over gRPC (tritonclient, the serve
extra) and the metrics endpoint. The serving bench (bench/serving.py) and the tests build their requests here, so
both speak the request contract the model declares (INPUTS in export/triton.py) the same way.
"""

from __future__ import annotations

import urllib.request

import numpy as np


def infer_inputs(arrays: dict) -> list:
    """gRPC InferInputs holding each named numpy array."""
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import np_to_triton_dtype

    inputs = []
    for name, array in arrays.items():
        tensor = grpcclient.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    return inputs


def grpc_inputs(prompts: list[str], max_tokens: int | list, stream: bool = True, **extra) -> list:
    """The inputs of one request: `prompts` (one row each; a streaming request carries one), `max_tokens` (one
    for all, or an array), `stream`, and any other named arrays of the contract in `extra`."""
    batch = len(prompts)
    arrays = {"text_input": np.array([[p.encode()] for p in prompts], dtype=np.object_),
              "max_tokens": np.array([[max_tokens]] * batch, dtype=np.int32)
              if np.isscalar(max_tokens) else np.asarray(max_tokens),
              "stream": np.array([[stream]] * batch, dtype=bool)}
    arrays.update(extra)
    return infer_inputs(arrays)


def read_metric(metrics_url: str, name: str, **labels) -> float:
    """The sum of a Prometheus metric's series at `metrics_url` (Triton's /metrics) that carry `labels`."""
    with urllib.request.urlopen(metrics_url, timeout=10) as reply:
        lines = reply.read().decode().splitlines()
    total = 0.0
    for line in lines:
        if line.startswith(name + "{"):
            series, value = line.rsplit(" ", 1)
            if all(f'{key}="{val}"' in series for key, val in labels.items()):
                total += float(value)
    return total
