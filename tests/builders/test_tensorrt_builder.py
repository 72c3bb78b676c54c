"""`build --backend tensorrt`.

Without TensorRT (CPU CI): the command fails at once with one line, exit 2, nothing written; the optimisation
profiles cover every graph input; and the builder's orchestration (checks, ONNX export, plugin registration,
parser and builder calls, files, atomic output) runs against a recording stand-in for the `tensorrt` module.
That stand-in checks OUR calls, not TensorRT: the tests that build and run real plans need TensorRT and CUDA
and are skipped here with that reason.
"""

from __future__ import annotations

import json
import subprocess
import sys
import types

import numpy as np
import onnx
import pytest
import torch

from jetspec_trt.builders.tensorrt_builder import (PLUGIN_MISSING, TENSORRT_MISSING, optimization_profiles,
                                                   require_tensorrt)
from jetspec_trt.errors import JetSpecError
from jetspec_trt.export.onnx import graph_description
from jetspec_trt.export.onnx_graphs import draft_spec, target_spec
from jetspec_trt.models.checkpoint import load_draft, load_target
from jetspec_trt.models.presets import write_random_pair
from jetspec_trt.plugins import tensorrt_plugin
from jetspec_trt.runtime.config import RuntimeConfig, TreeConfig
from tests.helpers import invoke_cli

try:
    import tensorrt  # noqa: F401

    HAVE_TENSORRT = True
except (ImportError, OSError):
    HAVE_TENSORRT = False
NEEDS_TENSORRT = "TensorRT is not installed (pip install 'tensorrt>=10.6'; needs an NVIDIA GPU)"


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("trt-pair")
    write_random_pair("tiny", root / "target", root / "draft", seed=0)
    return root


def invoke(argv, capsys):
    return invoke_cli(argv, capsys)


def build_argv(pair, out, *extra, target=None):
    return ["build", "--target", str(target or pair / "target"), "--draft", str(pair / "draft"), "--output", str(out),
            "--dtype", "float32", "--budget", "16", "--topk", "3", "--max-seq-len", "256", "--backend", "tensorrt",
            *extra]


def test_missing_tensorrt_fails_at_once_with_one_line(pair, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # `import tensorrt` raises ImportError
    # A target that does not exist: the TensorRT message comes first, before any check of the pair.
    for target in (pair / "target", tmp_path / "no-such-target"):
        code, out, err = invoke(build_argv(pair, tmp_path / "engine", target=target), capsys)
        assert code == 2 and out == ""
        assert err.splitlines() == [f"error: {TENSORRT_MISSING}"]
    assert list(tmp_path.iterdir()) == []  # no output, staging or scratch directory


@pytest.mark.skipif(HAVE_TENSORRT, reason="TensorRT is installed here; the in-process test covers the message")
def test_missing_tensorrt_subprocess(pair, tmp_path):
    result = subprocess.run([sys.executable, "-m", "jetspec_trt.cli", *build_argv(pair, tmp_path / "engine")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines() == [f"error: {TENSORRT_MISSING}"] and result.stdout == ""
    assert list(tmp_path.iterdir()) == []


def test_plugin_needs_tensorrt_plugin_module(monkeypatch):
    old = types.ModuleType("tensorrt")
    old.__version__ = "10.3.0"
    monkeypatch.setitem(sys.modules, "tensorrt", old)
    monkeypatch.setitem(sys.modules, "tensorrt.plugin", None)
    with pytest.raises(JetSpecError) as info:
        require_tensorrt("plugin")
    assert str(info.value) == PLUGIN_MISSING.format(version="10.3.0") and "\n" not in str(info.value)
    assert require_tensorrt("standard") is old


def test_optimization_profiles_cover_every_input(pair):
    target, draft = load_target(pair / "target"), load_draft(pair / "draft")
    runtime = RuntimeConfig(TreeConfig(64, 4, 7), "float32", 1024, draft.spec.block_size, draft.spec.mask_token_id,
                            draft.spec.target_layer_ids)
    t_desc = graph_description(target_spec(target, len(runtime.target_layer_ids), "float32"), "target.onnx", "float32")
    d_desc = graph_description(draft_spec(draft, target.config.vocab_size, "float32"), "draft.onnx", "float32")
    verify, prefill = optimization_profiles("target", t_desc, runtime)
    (draft_profile,) = optimization_profiles("draft", d_desc, runtime)
    assert (verify["name"], prefill["name"]) == ("verify", "prefill")
    for profile, desc in ((verify, t_desc), (prefill, t_desc), (draft_profile, d_desc)):
        assert set(profile["shapes"]) == set(desc["inputs"])
        for name, (low, opt, high) in profile["shapes"].items():
            assert len(low) == len(desc["inputs"][name]["shape"])
            assert all(a <= b <= c for a, b, c in zip(low, opt, high)), name
    kv = target.config.num_kv_heads, target.config.head_dim
    assert verify["shapes"]["input_ids"] == [[1], [64], [64]]
    assert verify["shapes"]["tree_mask"] == [[1, 1], [64, 2], [64, 2]]
    assert verify["shapes"]["past_key_0"] == [[1, kv[0], 0, kv[1]], [1, kv[0], 512, kv[1]], [1, kv[0], 1024, kv[1]]]
    assert prefill["shapes"]["input_ids"] == [[1], [512], [1024]]
    assert prefill["shapes"]["tree_mask"] == [[1, 1], [512, 16], [1024, 32]]
    block = draft.spec.block_size
    assert draft_profile["shapes"]["input_ids"] == [[block]] * 3
    assert draft_profile["shapes"]["hidden_states"][2][0] == 1024


class FakeTensorRT:
    """Records the TensorRT calls the builder makes; parses nothing itself beyond loading the ONNX file."""

    def __init__(self, fail_build: bool = False):
        self.calls: list[tuple] = []
        self.fail_build = fail_build
        module = types.ModuleType("tensorrt")
        module.__version__ = "10.99.0-recording-stand-in"
        fake = self

        class Logger:
            WARNING = 2

            def __init__(self, level):
                fake.calls.append(("Logger", level))

        class Profile:
            def __init__(self):
                self.shapes = {}

            def set_shape(self, name, low, opt, high):
                self.shapes[name] = (low, opt, high)

        class Config:
            def __init__(self):
                self.profiles = []

            def add_optimization_profile(self, profile):
                self.profiles.append(profile)

            def set_memory_pool_limit(self, pool, size):
                fake.calls.append(("workspace", size))

        class Network:
            def __init__(self, flags):
                self.flags, self.inputs = flags, []

        class Builder:
            def __init__(self, logger):
                pass

            def create_network(self, flags):
                return Network(flags)

            def create_builder_config(self):
                return Config()

            def create_optimization_profile(self):
                return Profile()

            def build_serialized_network(self, network, config):
                fake.calls.append(("build", network.name, network.flags, network.inputs,
                                   [p.shapes for p in config.profiles]))
                return None if fake.fail_build else f"plan of {network.name}".encode()

        class OnnxParser:
            num_errors = 0

            def __init__(self, network, logger):
                self.network = network

            def parse_from_file(self, path):
                model = onnx.load(path)
                self.network.name = path.rsplit("/", 1)[-1]
                self.network.inputs = [i.name for i in model.graph.input]
                fake.calls.append(("parse", self.network.name, sorted({n.op_type for n in model.graph.node
                                                                        if n.domain == "jetspec_trt"})))
                return True

        module.Logger, module.Builder, module.OnnxParser = Logger, Builder, OnnxParser
        module.NetworkDefinitionCreationFlag = types.SimpleNamespace(STRONGLY_TYPED=3)
        module.MemoryPoolType = types.SimpleNamespace(WORKSPACE=0)
        self.module = module

        plugin = types.ModuleType("tensorrt.plugin")
        self.registered: dict[str, dict] = {}

        def decorator(kind):
            def named(plugin_id):
                def wrap(fn):
                    self.registered.setdefault(plugin_id, {})[kind] = fn
                    return fn
                return wrap
            return named

        plugin.register, plugin.autotune, plugin.impl = decorator("register"), decorator("autotune"), decorator("impl")
        plugin.TensorDesc = plugin.Tensor = object
        plugin.AutoTuneCombination = lambda types_, layout="LINEAR": ("combination", types_, layout)
        self.plugin = plugin

    def install(self, monkeypatch):
        monkeypatch.setitem(sys.modules, "tensorrt", self.module)
        monkeypatch.setitem(sys.modules, "tensorrt.plugin", self.plugin)
        monkeypatch.setattr(self.module, "plugin", self.plugin, raising=False)
        monkeypatch.setattr(tensorrt_plugin, "_registered", False)


def test_build_orchestration_against_a_recording_stand_in(pair, tmp_path, capsys, monkeypatch):
    # A failing TensorRT build leaves nothing behind.
    failing = FakeTensorRT(fail_build=True)
    failing.install(monkeypatch)
    code, _, err = invoke(build_argv(pair, tmp_path / "engine"), capsys)
    # stderr: the PyTorch conversion's progress bars, then the error on one line.
    assert code == 2 and [line for line in err.splitlines() if line.startswith("error:")] == [
        "error: TensorRT could not build an engine from target.onnx (see its log above)"]
    assert list(tmp_path.iterdir()) == []

    fake = FakeTensorRT()
    fake.install(monkeypatch)
    code, out, err = invoke(build_argv(pair, tmp_path / "engine"), capsys)
    assert code == 0, err
    engine = tmp_path / "engine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["engine"]  # no scratch or staging leftovers
    assert (engine / "target.plan").read_bytes() == b"plan of target.onnx"
    assert (engine / "draft.plan").read_bytes() == b"plan of draft.onnx"
    assert (engine / "tokenizer" / "tokenizer.json").is_file()
    runtime = RuntimeConfig.load(engine)
    # the build's default lookup chain, cut to the tiny head's depth
    assert runtime.tree == TreeConfig(16, 3, 7, lookup=7) and runtime.max_seq_len == 256
    extras = runtime.extras
    assert extras["backend"] == "tensorrt" and extras["attention"] == "plugin"
    assert extras["plans"] == {"target": "target.plan", "draft": "draft.plan"}
    assert extras["jetspec_config"] == {"target_layer_ids": list(runtime.target_layer_ids),
                                        "block_size": runtime.block_size, "mask_token_id": runtime.mask_token_id,
                                        "causal_head": True}
    manifest = json.loads((engine / "manifest.json").read_text())
    assert manifest["backend"] == "tensorrt" and manifest["versions"]["tensorrt"] == "10.99.0-recording-stand-in"
    assert len(manifest["plans"]["target"]["sha256"]) == 64

    # The plugin was registered under the ONNX op's name, with the op's inputs and attribute.
    functions = fake.registered["jetspec_trt::TreeAttention"]
    assert set(functions) == {"register", "autotune", "impl"}
    import inspect

    params = list(inspect.signature(functions["register"]).parameters)
    assert params == ["query", "key", "value", "ctx_len", "tree_mask", "scale"]
    assert list(inspect.signature(functions["impl"]).parameters) == params + ["outputs", "stream"]

    parses = [c for c in fake.calls if c[0] == "parse"]
    assert parses == [("parse", "target.onnx", ["TreeAttention"]), ("parse", "draft.onnx", ["TreeAttention"])]
    builds = [c for c in fake.calls if c[0] == "build"]
    assert [b[1] for b in builds] == ["target.onnx", "draft.onnx"]
    for _, name, flags, inputs, profiles in builds:
        assert flags == 1 << 3  # strongly typed
        assert profiles and all(set(p) == set(inputs) for p in profiles), name
    assert len(builds[0][4]) == 2 and len(builds[1][4]) == 1


# -- real TensorRT (skipped without it) -----------------------------------------------------------------------------


@pytest.mark.skipif(not HAVE_TENSORRT, reason=NEEDS_TENSORRT)
@pytest.mark.gpu
@pytest.mark.parametrize("attention", ["standard", "plugin"])
def test_tensorrt_target_plan_matches_pytorch(attention, pair, tmp_path):
    import tensorrt as trt

    from jetspec_trt.builders.engine_builder import BuildConfig
    from jetspec_trt.builders.tensorrt_builder import build_tensorrt_engine
    from jetspec_trt.plugins.tree_attention import causal_mask

    out = build_tensorrt_engine(BuildConfig(pair / "target", pair / "draft", tmp_path / "trt", TreeConfig(16, 3, 7),
                                            "float32", 256, progress=False), attention)
    if attention == "plugin":
        tensorrt_plugin.register()
    logger = trt.Logger(trt.Logger.WARNING)
    engine = trt.Runtime(logger).deserialize_cuda_engine((out / "target.plan").read_bytes())
    context = engine.create_execution_context()
    stream = torch.cuda.current_stream()
    context.set_optimization_profile_async(1, stream.cuda_stream)  # prefill
    target = load_target(pair / "target")
    n = 20
    tokens = torch.arange(n) * 7 % target.config.vocab_size
    kv = (1, target.config.num_kv_heads, 1, target.config.head_dim)
    # One committed token first (no zero-size buffers): its K/V from the PyTorch model's own prefill.
    cache = target.new_cache(64, 16)
    with torch.no_grad():
        target(tokens[:1], torch.arange(1), cache, causal_mask(1))
        cache.commit(torch.arange(1))
        ref = target(tokens[1:], torch.arange(1, n), cache, causal_mask(n - 1), tuple(RuntimeConfig.load(out)
                                                                                     .target_layer_ids))
    feeds = {"input_ids": tokens[1:], "position_ids": torch.arange(1, n), "tree_mask": causal_mask(n - 1)}
    for i in range(target.config.num_layers):
        feeds[f"past_key_{i}"] = cache.k[i].flatten(0, 1)[:1].transpose(0, 1).reshape(kv)
        feeds[f"past_value_{i}"] = cache.v[i].flatten(0, 1)[:1].transpose(0, 1).reshape(kv)
    feeds = {k: v.contiguous().cuda() for k, v in feeds.items()}
    outputs = {}
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT:
            context.set_input_shape(name, tuple(feeds[name].shape))
            context.set_tensor_address(name, feeds[name].data_ptr())
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        if engine.get_tensor_mode(name) == trt.TensorIOMode.OUTPUT:
            outputs[name] = torch.empty(tuple(context.get_tensor_shape(name)), dtype=torch.float32, device="cuda")
            context.set_tensor_address(name, outputs[name].data_ptr())
    assert context.execute_async_v3(stream.cuda_stream)
    stream.synchronize()
    assert np.abs(outputs["logits"].cpu().numpy() - ref.logits.numpy()).max() < 1e-3
    assert np.abs(outputs["hidden_states"].cpu().numpy() - ref.features.numpy()).max() < 1e-3


@pytest.mark.gpu
def test_plugin_callback_matches_the_reference_on_cuda():
    """The plugin's compute path (TensorRT buffers -> the op -> output), fed torch CUDA tensors: no TensorRT."""
    from jetspec_trt.plugins.onnx_op import contiguous_tree_attention
    from jetspec_trt.plugins.tree_attention import pack_mask

    g = torch.Generator().manual_seed(0)
    ctx, new = 50, 24
    q = torch.randn(new, 8, 64, generator=g)
    key, value = torch.randn(2, 1, 2, ctx + new, 64, generator=g)
    mask = pack_mask((torch.rand(new, new, generator=g) > 0.5) | torch.eye(new, dtype=torch.bool))
    ctx_len = torch.tensor([ctx], dtype=torch.int32)
    expected = contiguous_tree_attention(q, key, value, ctx_len, mask, 0.125)
    out = torch.empty(new, 8, 64, device="cuda")
    tensorrt_plugin.run_on_stream(q.cuda(), key.cuda(), value.cuda(), ctx_len.cuda(), mask.cuda(), 0.125, out,
                                  torch.cuda.current_stream().cuda_stream)
    torch.cuda.synchronize()
    assert torch.allclose(out.cpu(), expected, atol=1e-4)
