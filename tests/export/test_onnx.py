"""`export onnx`: the graphs pass onnx.checker, onnxruntime matches PyTorch (fp32, max |diff| <= 1e-4) for prefill,
a decode step and a tree verify (target) and for context append + block draft (draft head), for both attention
variants (the plugin graphs run with the TreeAttention op's ONNX reference function), and a speculative decode
driven by onnxruntime sessions is token-identical to the PyTorch engine."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from jetspec_trt.cli import main
from jetspec_trt.errors import JetSpecError
from jetspec_trt.export.onnx import OnnxExportConfig, export_onnx
from jetspec_trt.export.onnx_graphs import unpack_tree_mask
from jetspec_trt.export.onnx_runner import OnnxRunner
from jetspec_trt.models.checkpoint import load_draft, load_target
from jetspec_trt.plugins.onnx_op import (DOMAIN, OP_TYPE, contiguous_tree_attention, reference_function,
                                         register_schema, with_reference_function)
from jetspec_trt.plugins.tree_attention import causal_mask, pack_mask, tree_attention, unpack_mask
from jetspec_trt.quickstart import make_tiny_engine
from jetspec_trt.runtime.config import RuntimeConfig
from jetspec_trt.runtime.engine import Engine
from tests.helpers import invoke_cli

TOL = 1e-4
PROMPTS = ["def fibonacci(n):", "hello world", "The quick brown fox", "x = [i * i for i in range(10)]"]


def invoke(argv, capsys):
    return invoke_cli(argv, capsys)


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """PyTorch and onnxruntime share 2 cores here; one intra-op thread each keeps the many small batch-1 calls
    from fighting over them (with 2 torch threads a loaded machine made the engine 5-50x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def engine_dir(tmp_path_factory):
    return make_tiny_engine(tmp_path_factory.mktemp("onnx-engine")).engine


@pytest.fixture(scope="module")
def models(engine_dir):
    return load_target(engine_dir / "target"), load_draft(engine_dir / "draft"), RuntimeConfig.load(engine_dir)


@pytest.fixture(scope="module")
def exports(engine_dir, tmp_path_factory):
    """Both variants: `standard` through the CLI, `plugin` through the API."""
    root = tmp_path_factory.mktemp("onnx-out")
    with pytest.raises(SystemExit) as exit_info:
        main(["export", "onnx", str(engine_dir), "--output", str(root / "standard")])
        raise SystemExit(0)
    assert exit_info.value.code == 0
    export_onnx(OnnxExportConfig(engine_dir, root / "plugin", attention="plugin"))
    return {"standard": root / "standard", "plugin": root / "plugin"}


def session(export_dir, graph):
    model = onnx.load(str(export_dir / f"{graph}.onnx"))
    if any(n.domain == DOMAIN for n in model.graph.node):
        model = with_reference_function(model)
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def run(sess, **feeds):
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, {k: np.asarray(v) for k, v in feeds.items()})))


def close(a, b, what):
    diff = float(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)).max())
    assert diff <= TOL, f"{what}: max |diff| {diff:.3g} > {TOL}"


def paged_rows(cache_layer, start, count):
    """Rows start..start+count-1 of a paged layer cache [P, S, H, D] as [1, H, count, D] (identity table)."""
    flat = cache_layer.flatten(0, 1)[start:start + count]
    return flat.transpose(0, 1).unsqueeze(0).numpy()


def random_tree(n: int, generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random parents (parents[i] < i): depths [n] and the ancestor mask [n, n]."""
    parents = [-1] + [int(torch.randint(0, i, (1,), generator=generator)) for i in range(1, n)]
    depths = torch.zeros(n, dtype=torch.long)
    ancestors = torch.zeros(n, n, dtype=torch.bool)
    for i in range(n):
        if parents[i] >= 0:
            ancestors[i] = ancestors[parents[i]]
            depths[i] = depths[parents[i]] + 1
        ancestors[i, i] = True
    return depths, ancestors


def test_layout_and_checker(exports, models):
    target, draft, runtime = models
    register_schema()
    for kind, directory in exports.items():
        for name in ("target.onnx", "draft.onnx", "onnx_config.json", "runtime_config.json",
                     "tokenizer/tokenizer.json"):
            assert (directory / name).is_file(), (kind, name)
        assert not [p for p in directory.parent.iterdir() if p.name.startswith(".")]  # no staging leftovers
        for graph in ("target", "draft"):
            onnx.checker.check_model(onnx.load(str(directory / f"{graph}.onnx")), full_check=True)
        config = json.loads((directory / "onnx_config.json").read_text())
        assert config["attention"] == kind and config["opset"] == 18 and config["dtype"] == "float32"
        assert config["jetspec_config"] == {"target_layer_ids": list(runtime.target_layer_ids),
                                            "block_size": runtime.block_size,
                                            "mask_token_id": runtime.mask_token_id, "causal_head": True}
        inputs = config["graphs"]["target"]["inputs"]
        assert list(inputs)[:3] == ["input_ids", "position_ids", "tree_mask"]
        assert inputs["past_key_0"]["shape"] == [1, target.config.num_kv_heads, "past", target.config.head_dim]
        model = onnx.load(str(directory / "target.onnx"))
        assert [i.name for i in model.graph.input] == list(inputs)
        assert [o.name for o in model.graph.output] == list(config["graphs"]["target"]["outputs"])
        dims = [d.dim_param for d in model.graph.input[0].type.tensor_type.shape.dim]
        assert dims == ["tokens"]


def test_plugin_graph_has_one_tree_attention_node_per_layer(exports, models):
    target, draft, _ = models
    for graph, layers in (("target", target.config.num_layers), ("draft", draft.config.num_layers)):
        plugin = onnx.load(str(exports["plugin"] / f"{graph}.onnx"))
        nodes = [n for n in plugin.graph.node if n.domain == DOMAIN]
        assert len(nodes) == layers and all(n.op_type == OP_TYPE for n in nodes)
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in nodes[0].attribute}
        assert attrs["plugin_namespace"] == b"jetspec_trt" and attrs["plugin_version"] == b"1"
        assert abs(attrs["scale"] - target.config.head_dim ** -0.5) < 1e-7
        assert not [n for n in plugin.graph.node if n.op_type == "Softmax"]
        standard = onnx.load(str(exports["standard"] / f"{graph}.onnx"))
        assert {n.domain for n in standard.graph.node} <= {"", "ai.onnx"}
        assert sum(n.op_type == "Softmax" for n in standard.graph.node) == layers


@pytest.mark.parametrize("kind", ["standard", "plugin"])
def test_target_graph_matches_pytorch(kind, exports, models):
    """Prefill (past 0), one decode step, then a tree verify, each fed the previous call's present KV."""
    target, _, runtime = models
    sess = session(exports[kind], "target")
    layers, capture = target.config.num_layers, tuple(runtime.target_layer_ids)
    g = torch.Generator().manual_seed(1)
    cache = target.new_cache(256, page_size=16)
    kv = [np.zeros((1, target.config.num_kv_heads, 0, target.config.head_dim), np.float32)] * (2 * layers)
    n, tree_size = 37, 40
    prompt = torch.randint(0, target.config.vocab_size, (n,), generator=g)
    depths, ancestors = random_tree(tree_size, g)
    steps = [  # (tokens, positions, packed mask, rows kept afterwards)
        (prompt, torch.arange(n), causal_mask(n), torch.arange(n)),
        (prompt[:1], torch.tensor([n]), causal_mask(1), torch.arange(1)),
        (torch.randint(0, target.config.vocab_size, (tree_size,), generator=g), n + 1 + depths, pack_mask(ancestors),
         None),
    ]
    for step, (tokens, positions, mask, kept) in enumerate(steps):
        past = cache.length
        with torch.no_grad():
            ref = target(tokens, positions, cache, mask, capture)
        out = run(sess, input_ids=tokens.numpy(), position_ids=positions.numpy(), tree_mask=mask.numpy(),
                  **{f"past_{kind_}_{i}": kv[2 * i + j] for i in range(layers)
                     for j, kind_ in enumerate(("key", "value"))})
        close(out["logits"], ref.logits, f"step {step} logits")
        close(out["hidden_states"], ref.features, f"step {step} hidden_states")
        for i in range(layers):
            present = out[f"present_key_{i}"]
            assert present.shape[2] == past + len(tokens)
            close(present, paged_rows(cache.k[i], 0, past + len(tokens)), f"step {step} present_key_{i}")
            close(out[f"present_value_{i}"], paged_rows(cache.v[i], 0, past + len(tokens)), f"step {step} v{i}")
        kv = [out[f"present_{k}_{i}"] for i in range(layers) for k in ("key", "value")]
        if kept is not None:
            cache.commit(kept)


@pytest.mark.parametrize("kind", ["standard", "plugin"])
def test_draft_graph_matches_pytorch(kind, exports, models):
    """Two rounds: append C context tokens' features, draft the block; the present KV holds the context only."""
    target, draft, runtime = models
    sess = session(exports[kind], "draft")
    layers, block = draft.config.num_layers, runtime.block_size
    g = torch.Generator().manual_seed(2)
    tcache = target.new_cache(128, page_size=16)
    tokens = torch.randint(0, target.config.vocab_size, (30,), generator=g)
    with torch.no_grad():
        features = target(tokens, torch.arange(30), tcache, causal_mask(30), tuple(runtime.target_layer_ids)).features
    cache = draft.new_cache(128, page_size=16)
    kv = [np.zeros((1, draft.config.num_kv_heads, 0, draft.config.head_dim), np.float32)] * (2 * layers)
    for step, (first, count) in enumerate(((0, 27), (27, 3))):
        context_positions = torch.arange(first, first + count)
        anchor = int(tokens[first + count - 1])
        ids = torch.full((block,), runtime.mask_token_id)
        ids[0] = anchor
        positions = first + count + torch.arange(block)
        with torch.no_grad():
            draft.extend_context(features[first:first + count], context_positions, cache)
            hidden = draft.propose(target.embed_tokens(ids), positions, cache, causal_mask(block))
            ref_logits = target.lm_head(hidden[1:])
        out = run(sess, hidden_states=features[first:first + count].numpy(),
                  context_position_ids=context_positions.numpy(), input_ids=ids.numpy(), position_ids=positions.numpy(),
                  tree_mask=causal_mask(block).numpy(),
                  **{f"past_{k}_{i}": kv[2 * i + j] for i in range(layers) for j, k in enumerate(("key", "value"))})
        close(out["logits"], ref_logits, f"round {step} logits")
        for i in range(layers):
            assert out[f"present_key_{i}"].shape[2] == first + count
            close(out[f"present_key_{i}"], paged_rows(cache.k[i], 0, first + count), f"round {step} key {i}")
            close(out[f"present_value_{i}"], paged_rows(cache.v[i], 0, first + count), f"round {step} value {i}")
        kv = [out[f"present_{k}_{i}"] for i in range(layers) for k in ("key", "value")]


def test_onnxruntime_decode_is_token_identical_to_pytorch_engine(exports, engine_dir):
    engine = Engine.load(engine_dir)
    runner = OnnxRunner(exports["standard"], threads=1)
    for prompt in PROMPTS:
        ids = engine.encode(prompt)
        expected = [t for tokens in engine.decoder.generate(ids, 48) for t in tokens]
        assert runner.generate_ids(ids, 48) == expected, prompt
        assert runner.stats.rounds == engine.decoder.stats.rounds
        assert runner.stats.emitted_per_round == engine.decoder.stats.emitted_per_round


class OracleRunner(OnnxRunner):
    """Drafts from the known greedy continuation (right at rank 0 or 2, or absent), so trees hold long accepted
    paths, wrong siblings and dead ends; the target graph, acceptance and KV commit under test are unchanged."""

    future: list[int] = []

    def draft_depth_logits(self, anchor, position, max_depth):
        g = torch.Generator().manual_seed(position)
        logits = torch.randn(max_depth, self.target_shape["vocab_size"], generator=g)
        for d in range(max_depth):
            index = position + 1 + d
            if index >= len(self.future):
                break
            roll = float(torch.rand(1, generator=g))
            if roll < 0.7:
                logits[d, self.future[index]] = 20.0
            elif roll < 0.85:
                logits[d, self.future[index]] = logits[d].topk(3).values[-1] - 1e-3
        return logits


def test_deep_acceptance_through_onnxruntime(exports, engine_dir):
    engine = Engine.load(engine_dir)
    runner = OracleRunner(exports["standard"], threads=1)
    for prompt in PROMPTS[:2]:
        ids = engine.encode(prompt)
        plain = [t for tokens in engine.decoder.generate(ids, 64, speculative=False) for t in tokens]
        runner.future = ids + plain
        assert runner.generate_ids(ids, 64) == plain, prompt
        assert runner.stats.accepted_drafts > 20 and max(runner.stats.emitted_per_round) >= 4


def test_plugin_export_runs_with_the_reference_function(exports, engine_dir):
    with pytest.raises(JetSpecError, match="onnxruntime cannot run"):
        OnnxRunner(exports["plugin"])
    engine = Engine.load(engine_dir)
    ids = engine.encode(PROMPTS[0])
    expected = [t for tokens in engine.decoder.generate(ids, 16) for t in tokens]
    assert OnnxRunner(exports["plugin"], threads=1, reference_plugin=True).generate_ids(ids, 16) == expected


@pytest.mark.parametrize("ctx,new,heads,kv_heads", [(0, 7, 4, 2), (5, 1, 4, 4), (13, 40, 8, 2), (3, 33, 2, 1)])
def test_reference_function_matches_the_op(ctx, new, heads, kv_heads):
    g = torch.Generator().manual_seed(ctx * 100 + new)
    q = torch.randn(new, heads, 16, generator=g)
    key, value = torch.randn(2, 1, kv_heads, ctx + new, 16, generator=g)
    dense = (torch.rand(new, new, generator=g) > 0.5) | torch.eye(new, dtype=torch.bool)
    mask, ctx_len = pack_mask(dense), torch.tensor([ctx], dtype=torch.int32)
    expected = contiguous_tree_attention(q, key, value, ctx_len, mask, 0.25)
    # The paged op on a 16-slot-page copy of the same cache gives the same numbers.
    pages = (ctx + new + 15) // 16
    k_cache = torch.zeros(pages * 16, kv_heads, 16)
    v_cache = torch.zeros_like(k_cache)
    k_cache[:ctx + new], v_cache[:ctx + new] = key[0].transpose(0, 1), value[0].transpose(0, 1)
    paged = tree_attention(q, k_cache.view(pages, 16, kv_heads, 16), v_cache.view(pages, 16, kv_heads, 16),
                           torch.arange(pages, dtype=torch.int32), ctx_len, mask, 0.25)
    assert torch.allclose(paged, expected, atol=1e-6)
    node = onnx.helper.make_node(OP_TYPE, ["q", "k", "v", "c", "m"], ["o"], domain=DOMAIN, scale=0.25)
    f32, i32 = onnx.TensorProto.FLOAT, onnx.TensorProto.INT32
    vi = onnx.helper.make_tensor_value_info
    graph = onnx.helper.make_graph(
        [node], "one_op", [vi("q", f32, ["T", heads, 16]), vi("k", f32, [1, kv_heads, "S", 16]),
                           vi("v", f32, [1, kv_heads, "S", 16]), vi("c", i32, [1]), vi("m", i32, ["T", "W"])],
        [vi("o", f32, ["T", heads, 16])])
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 18),
                                                         onnx.helper.make_opsetid(DOMAIN, 1)],
                                   functions=[reference_function()])
    onnx.checker.check_model(model)
    out = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"q": q.numpy(), "k": key.numpy(), "v": value.numpy(), "c": ctx_len.numpy(), "m": mask.numpy()})[0]
    assert np.abs(out - expected.numpy()).max() <= 1e-5


@pytest.mark.parametrize("n", [1, 31, 32, 33, 70])
def test_graph_mask_unpacking_matches_the_op(n):
    dense = torch.rand(n, n, generator=torch.Generator().manual_seed(n)) > 0.5
    dense[:, 31 % n] = True  # bit 31: the sign bit of an int32 word
    packed = pack_mask(dense)
    assert torch.equal(unpack_tree_mask(packed, n), unpack_mask(packed, n))


def test_cli_errors_are_one_line(engine_dir, exports, tmp_path, capsys):
    cases = [
        (["export", "onnx", str(tmp_path / "missing"), "--output", str(tmp_path / "a")], "does not exist"),
        (["export", "onnx", str(engine_dir), "--output", str(exports["standard"])], "already exists"),
        (["export", "onnx", str(engine_dir), "--output", str(tmp_path / "b"), "--opset", "13"], "--opset must be"),
    ]
    for argv, message in cases:
        code, _, err = invoke(argv, capsys)
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
