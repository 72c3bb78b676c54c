"""`jetspec-trt build` / `run` on good and bad input: one-line errors, exit code 2, nothing half-written."""

import dataclasses
import json
import shutil

import pytest
from safetensors.torch import load_file, save_file

from jetspec_trt.models.presets import write_random_pair
from tests.helpers import invoke_cli


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("pair")
    write_random_pair("tiny", root / "target", root / "draft")
    return root


def invoke(argv, capsys):
    return invoke_cli(argv, capsys)


def copy_pair(pair, tmp_path):
    shutil.copytree(pair / "target", tmp_path / "target")
    shutil.copytree(pair / "draft", tmp_path / "draft")
    return tmp_path / "target", tmp_path / "draft"


def edit_json(path, change):
    config = json.loads(path.read_text())
    change(config)
    path.write_text(json.dumps(config))


def build_args(target, draft, out, *extra):
    return ["build", "--target", str(target), "--draft", str(draft), "--output", str(out), *extra]


def test_build_and_run_verify(pair, tmp_path, capsys):
    code, out, err = invoke(build_args(pair / "target", pair / "draft", tmp_path / "engine", "--dtype", "float32",
                                       "--budget", "16", "--topk", "3"), capsys)
    assert code == 0, err
    engine = tmp_path / "engine"
    manifest = json.loads((engine / "manifest.json").read_text())
    runtime = json.loads((engine / "runtime_config.json").read_text())
    assert manifest["dtype"] == "float32" and len(manifest["sources"]["target"]["sha256"]["model.safetensors"]) == 64
    # the default 15-node lookup chain, cut to the tiny head's depth (and half a budget other than the default's)
    assert runtime["tree"] == {"budget": 16, "topk": 3, "max_depth": 7, "lookup": 7}
    assert (engine / "target" / "tokenizer.json").is_file() and (engine / "draft" / "model.safetensors").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["engine"]  # no staging leftovers
    code, out, err = invoke(["run", str(engine), "--prompt", "hello", "--max-new-tokens", "20", "--verify"], capsys)
    assert code == 0, err
    assert "lossless check: IDENTICAL" in err and "tau" in err
    # another context-lookup chain, or none, asked for at run time: still lossless
    for lookup in ("4", "0"):
        code, out, err = invoke(["run", str(engine), "--prompt", "hello", "--max-new-tokens", "20", "--verify",
                                 "--lookup", lookup], capsys)
        assert code == 0 and "lossless check: IDENTICAL" in err, err
    code, out, err = invoke(["run", str(engine), "--prompt", "hello", "--lookup", "16"], capsys)
    assert code == 2 and "lookup must be in 0..7" in err and len(err.strip().splitlines()) == 1


def test_default_engines_carry_the_lookup_tree_and_run_lookup_0_turns_it_off(pair, tmp_path, capsys, monkeypatch):
    """`build` without tree flags writes the default tree (budget 64, width 16, a lookup chain of 15 nodes, here
    cut to the tiny head's depth 7), which `run` uses as it is; `run --lookup 0` drops the chain, a smaller
    `--budget` keeps at most half of it for the chain, and budget 1 drafts nothing. `build --lookup 0` builds none."""
    from jetspec_trt import cli
    from jetspec_trt.runtime.config import TreeConfig

    for name, extra in (("engine", []), ("plain", ["--lookup", "0"])):
        code, _, err = invoke(build_args(pair / "target", pair / "draft", tmp_path / name, "--dtype", "float32",
                                         "--no-cost-model", *extra), capsys)
        assert code == 0, err
    trees = {name: json.loads((tmp_path / name / "runtime_config.json").read_text())["tree"]
             for name in ("engine", "plain")}
    assert trees["engine"] == {"budget": 64, "topk": 16, "max_depth": 7, "lookup": 7}
    assert trees["plain"] == {**trees["engine"], "lookup": 0}
    used, run_prompt = [], cli.run_prompt
    monkeypatch.setattr(cli, "run_prompt", lambda *args: used.append(args[-1]) or run_prompt(*args))
    for extra in ([], ["--lookup", "0"], ["--budget", "8"], ["--budget", "1", "--lookup", "4"]):
        code, _, err = invoke(["run", str(tmp_path / "engine"), "--prompt", "hello", "--max-new-tokens", "8", *extra],
                              capsys)
        assert code == 0, err
    assert used == [None, TreeConfig(64, 16, 7, lookup=0), TreeConfig(8, 16, 7, lookup=4), TreeConfig(1, 16, 7)]


def test_runtime_flags_reach_the_runtime_config(pair, tmp_path, capsys):
    """The CUDA path's switches are stored in the engine (Engine.load and GraphDecoder read them there)."""
    code, out, err = invoke(build_args(pair / "target", pair / "draft", tmp_path / "engine", "--no-decode-gemv",
                                       "--no-compile", "--no-tree-kernel", "--no-prefill-graphs",
                                       "--no-fused-layer-kernels", "--small-m-gemm", "--gated-gemv",
                                       "--gemv-pdl", "512"), capsys)
    assert code == 0, err
    flags = ("decode_gemv", "compile_graphs", "tree_kernel", "prefill_graphs", "fused_layer_kernels", "small_m_gemm",
             "gated_gemv", "gemv_pdl_prefetch")
    runtime = json.loads((tmp_path / "engine" / "runtime_config.json").read_text())
    assert tuple(runtime[f] for f in flags) == (False, False, False, False, False, True, True, 512)
    code, out, err = invoke(build_args(pair / "target", pair / "draft", tmp_path / "default"), capsys)
    runtime = json.loads((tmp_path / "default" / "runtime_config.json").read_text())
    assert tuple(runtime[f] for f in flags) == (True, True, True, True, True, False, False, 0)


def corrupt_weights(target, draft):
    path = draft / "model.safetensors"
    path.write_bytes(path.read_bytes()[: 1000])


def mismatch_hidden(target, draft):
    edit_json(draft / "config.json", lambda c: c["dflash_config"].update(target_hidden_size=64))


def mismatch_vocab(target, draft):
    edit_json(draft / "config.json", lambda c: c.update(vocab_size=300))


def layer_out_of_range(target, draft):
    edit_json(draft / "config.json", lambda c: c["dflash_config"].update(target_layer_ids=[1, 6]))


def duplicate_layers(target, draft):
    edit_json(draft / "config.json", lambda c: c["dflash_config"].update(target_layer_ids=[2, 2]))


def missing_config(target, draft):
    (draft / "config.json").unlink()


def missing_tokenizer(target, draft):
    (target / "tokenizer.json").unlink()


def tokenizer_beyond_vocab(target, draft):
    edit_json(target / "config.json", lambda c: c.update(vocab_size=200))
    edit_json(draft / "config.json", lambda c: c.update(vocab_size=200))


def missing_weights(target, draft):
    (target / "model.safetensors").unlink()


def wrong_tensor_shape(target, draft):
    state = load_file(str(draft / "model.safetensors"))
    state["fc.weight"] = state["fc.weight"][:, :10].contiguous()
    save_file(state, str(draft / "model.safetensors"))


def bidirectional(target, draft):
    edit_json(draft / "config.json", lambda c: c["dflash_config"].update(causal_head=False))


def mask_outside_vocab(target, draft):
    edit_json(draft / "config.json", lambda c: c["dflash_config"].update(mask_token_id=10**6))


BAD_PAIRS = {
    "corrupt safetensors": (corrupt_weights, "corrupt"),
    "hidden size": (mismatch_hidden, "hidden size mismatch"),
    "vocab": (mismatch_vocab, "vocab mismatch"),
    "layer out of range": (layer_out_of_range, "target_layer_ids"),
    "duplicate layer": (duplicate_layers, "target_layer_ids"),
    "missing config": (missing_config, "no config.json"),
    "missing tokenizer": (missing_tokenizer, "no tokenizer"),
    "missing weights": (missing_weights, "missing weights file"),
    "tokenizer beyond vocab": (tokenizer_beyond_vocab, "tokenizer mismatch"),
    "tensor shape": (wrong_tensor_shape, "fc.weight"),
    "bidirectional head": (bidirectional, "causal_head"),
    "mask token": (mask_outside_vocab, "mask_token_id"),
}


@pytest.mark.parametrize("case", sorted(BAD_PAIRS))
def test_bad_pair_one_line_exit_2_nothing_written(case, pair, tmp_path, capsys):
    target, draft = copy_pair(pair, tmp_path / "in")
    damage, message = BAD_PAIRS[case]
    damage(target, draft)
    out_root = tmp_path / "out"
    out_root.mkdir()
    code, out, err = invoke(build_args(target, draft, out_root / "engine"), capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], err
    assert list(out_root.iterdir()) == []


@pytest.mark.parametrize("extra,message", [(["--max-depth", "9"], "max_depth"), (["--budget", "0"], "budget"),
                                           (["--max-seq-len", "999999"], "max_position_embeddings"),
                                           (["--lookup", "8"], "lookup must be in 0..7"),
                                           (["--gemv-pdl", "96"], "power of two of at least 64")])
def test_bad_options(extra, message, pair, tmp_path, capsys):
    code, out, err = invoke(build_args(pair / "target", pair / "draft", tmp_path / "engine", *extra), capsys)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "engine").exists()


def test_existing_output_is_kept_without_overwrite(pair, tmp_path, capsys):
    (tmp_path / "engine").mkdir()
    (tmp_path / "engine" / "keep").write_text("x")
    code, _, err = invoke(build_args(pair / "target", pair / "draft", tmp_path / "engine"), capsys)
    assert code == 2 and "already exists" in err
    assert (tmp_path / "engine" / "keep").read_text() == "x"


def test_run_rejects_prompt_over_max_length(pair, tmp_path, capsys):
    code, _, err = invoke(build_args(pair / "target", pair / "draft", tmp_path / "engine", "--max-seq-len", "32",
                                     "--budget", "8"), capsys)
    assert code == 0, err
    code, out, err = invoke(["run", str(tmp_path / "engine"), "--prompt", "x" * 40], capsys)
    assert code == 2 and "max_seq_len" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("argv,message", [
    (["run", "/nonexistent/engine", "--prompt", "hi"], "does not exist"),
    (["build", "--target", "/nonexistent/t", "--draft", "/nonexistent/d", "--output", "/tmp/x-never"], "does not exist"),
])
def test_missing_directories(argv, message, capsys):
    code, _, err = invoke(argv, capsys)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1


def test_build_measures_the_cost_model_and_no_cost_model_skips_it(pair, tmp_path, capsys):
    """The build times the scheduler's passes on the build device into cost_model.json; an engine without one,
    or with another device's, measures its own where a cost-model scheduler first needs it (and says so); an
    unreadable file is an error."""
    import torch

    from jetspec_trt.errors import JetSpecError
    from jetspec_trt.runtime.cost_model import COST_MODEL, CostModel, device_name
    from jetspec_trt.runtime.engine import Engine
    from jetspec_trt.runtime.scheduler import SchedulerConfig

    code, _, err = invoke(build_args(pair / "target", pair / "draft", tmp_path / "engine", "--dtype", "float32",
                                     "--budget", "8", "--cost-model-device", "cpu"), capsys)
    assert code == 0, err
    engine = tmp_path / "engine"
    manifest = json.loads((engine / "manifest.json").read_text())
    assert manifest["cost_model"]["device"] == device_name("cpu") and manifest["cost_model"]["file"] == COST_MODEL
    stored = CostModel.load(engine)
    # The CPU's points: up to 8 sequences of the built budget (8), 64 tokens at most.
    assert stored.verify_tokens == (1, 2, 4, 8, 16, 32, 64) and stored.draft_sequences == (1, 2, 4, 8)
    assert min(stored.verify_s + stored.draft_s) > 0 and stored.matches("cpu", torch.float32)
    loaded = Engine.load(engine)
    assert loaded.cost_model() == stored and loaded.summary["cost_model"].startswith("stored; measured on")

    code, _, err = invoke(build_args(pair / "target", pair / "draft", tmp_path / "bare", "--dtype", "float32",
                                     "--no-cost-model"), capsys)
    assert code == 0, err
    bare = tmp_path / "bare"
    assert json.loads((bare / "manifest.json").read_text())["cost_model"] == "skipped: --no-cost-model"
    assert not (bare / COST_MODEL).exists()
    loaded = Engine.load(bare)
    scheduler = loaded.new_scheduler(SchedulerConfig(64, 2, "cost_model"))
    assert scheduler.chooser.costs.matches("cpu", torch.float32) and not (bare / COST_MODEL).exists()
    assert loaded.summary["cost_model"].startswith("measured at load: none stored")

    other = dataclasses.replace(stored, device_name="NVIDIA H200")  # a GPU's times say nothing about this CPU
    other.save(bare)
    loaded = Engine.load(bare)
    assert loaded.cost_model(max_batch=2, max_tokens=4).matches("cpu", torch.float32)
    assert "measured at load: the stored one is for NVIDIA H200 (float32)" in loaded.summary["cost_model"]
    assert loaded.measure_cost_model(max_batch=2, max_tokens=4, save=True) == CostModel.load(bare)  # re-measured

    (bare / COST_MODEL).write_text("{}")
    with pytest.raises(JetSpecError, match="malformed cost model"):
        Engine.load(bare).new_scheduler(SchedulerConfig(64, 2, "cost_model"))
    assert Engine.load(bare).new_scheduler(SchedulerConfig(64, 2)).chooser is None  # the fixed policy never reads it


def test_draft_vocab_build_runs_lossless_and_bad_counts_fail_first(pair, tmp_path, capsys):
    """--draft-vocab N: the engine keeps the N most counted tokens (draft_vocab.json, the manifest says how much of
    the counts they cover) and decodes losslessly; missing counts or a size below the tree width fail in one line
    before anything is written."""
    from collections import Counter

    from jetspec_trt.models.draft_vocab import write_token_counts

    counts = tmp_path / "counts.json"
    write_token_counts(counts, Counter({t: 300 - t for t in range(0, 200, 2)}))
    engine = tmp_path / "engine"
    code, out, err = invoke(build_args(pair / "target", pair / "draft", engine, "--dtype", "float32", "--budget", "16",
                                       "--topk", "3", "--draft-vocab", "40", "--draft-vocab-counts", str(counts)),
                            capsys)
    assert code == 0, err
    vocab = json.loads((engine / "draft_vocab.json").read_text())
    assert vocab["token_ids"] == list(range(0, 80, 2)) and json.loads((engine / "runtime_config.json").read_text())[
        "draft_vocab"] == 40
    assert json.loads((engine / "manifest.json").read_text())["draft_vocab"]["size"] == 40
    code, out, err = invoke(["run", str(engine), "--prompt", "hello", "--max-new-tokens", "20", "--verify"], capsys)
    assert code == 0 and "lossless check: IDENTICAL" in err, err
    for extra, message in ((("--draft-vocab", "40"), "no token counts"),
                           (("--draft-vocab", "2", "--draft-vocab-counts", str(counts)), "below the tree width")):
        code, out, err = invoke(build_args(pair / "target", pair / "draft", tmp_path / "bad", "--topk", "3", *extra),
                                capsys)
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
        assert not (tmp_path / "bad").exists()


def test_draft_vocab_default_follows_the_heads_token_counts(pair, tmp_path, capsys, monkeypatch):
    """No --draft-vocab: DEFAULT_DRAFT_VOCAB tokens where the head has token_counts.json and the target's vocabulary
    is larger, else the whole vocabulary; --draft-vocab 0 keeps the whole vocabulary either way."""
    import shutil
    from collections import Counter

    from jetspec_trt.builders import engine_builder
    from jetspec_trt.models.draft_vocab import TOKEN_COUNTS, write_token_counts

    monkeypatch.setattr(engine_builder, "DEFAULT_DRAFT_VOCAB", 40)  # the tiny pair's vocabulary is below 32768
    head = tmp_path / "head"
    shutil.copytree(pair / "draft", head)

    def built_vocab(name: str, *extra: str):
        engine = tmp_path / name
        code, out, err = invoke(build_args(pair / "target", head, engine, "--dtype", "float32", "--budget", "16",
                                           "--topk", "3", *extra), capsys)
        assert code == 0, err
        size = json.loads((engine / "runtime_config.json").read_text())["draft_vocab"]
        assert (json.loads((engine / "manifest.json").read_text())["draft_vocab"] or {}).get("size", 0) == size
        assert (engine / "draft_vocab.json").exists() == bool(size)
        return size

    assert built_vocab("no-counts") == 0
    write_token_counts(head / TOKEN_COUNTS, Counter({t: 500 - t for t in range(100)}))
    assert built_vocab("counts") == 40
    assert built_vocab("off", "--draft-vocab", "0") == 0
    monkeypatch.setattr(engine_builder, "DEFAULT_DRAFT_VOCAB", 10 ** 6)  # not below the vocabulary: no reduction
    assert built_vocab("large") == 0
