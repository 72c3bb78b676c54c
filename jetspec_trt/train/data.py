"""Training data: prompts answered by the target itself (the paper's recipe), cached as token ids.

Why regenerate: the head must predict what THIS target would say next, so the responses it learns from are
the target's own (greedy by default, which is what greedy speculative decoding then has to match). Generation
is batched with transformers' `generate` (left padding); every finished batch is appended to a jsonl cache
in the output directory, so an interrupted run resumes where it stopped and a re-run with the same settings
skips generation entirely. The cache file name is a hash of everything that changes its content.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from jetspec_trt.errors import JetSpecError

DATA_DIR = "data"
PROMPT_SUITES = ("sharegpt", "mtbench", "math500", "aime", "humaneval")


@dataclass(frozen=True)
class DataConfig:
    source: str = "sharegpt"  # a prompt suite of jetspec_trt.bench.datasets, or a .jsonl file of prompts
    num_prompts: int = 1000
    max_new_tokens: int = 512
    gen_temperature: float = 0.0  # 0 = greedy responses
    gen_batch_size: int = 32
    max_seq_len: int = 2048  # prompt + response; longer sequences are cut (prompts longer than this dropped)
    # Stop generating after this many seconds (checked after each batch) and use what is cached; a later run
    # with the same settings generates the rest. For fixed-size GPU leases. Not part of the cache key.
    gen_time_budget_s: float | None = None


@dataclass(frozen=True)
class TrainSequence:
    """One training sequence: chat-templated prompt ids followed by the target's response ids."""

    prompt_ids: list[int]
    response_ids: list[int]

    @property
    def ids(self) -> list[int]:
        return self.prompt_ids + self.response_ids

    def __len__(self) -> int:
        return len(self.prompt_ids) + len(self.response_ids)


# --------------------------------------------------------------------------------------------------- prompts


def load_prompt_messages(source: str, limit: int) -> list[list[dict]]:
    """Chat messages of up to `limit` prompts from a suite name or a jsonl file.

    A jsonl line is {"messages": [{"role": ..., "content": ...}, ...]} or {"prompt": "..."}.
    """
    if limit < 1:
        raise JetSpecError(f"--num-prompts must be >= 1, got {limit}")
    path = Path(source)
    if source.endswith(".jsonl") or path.is_file():
        return _prompts_from_jsonl(path, limit)
    if source not in PROMPT_SUITES:
        raise JetSpecError(f"--data must be one of {', '.join(PROMPT_SUITES)} or a .jsonl file, got {source!r}")
    try:
        from jetspec_trt.bench.datasets import load_prompts
    except ImportError as err:  # the dataset module is optional for file-based training
        raise JetSpecError(f"prompt suite {source!r} needs jetspec_trt.bench.datasets ({err})") from err
    return [p.messages for p in load_prompts(source, limit)]


def _prompts_from_jsonl(path: Path, limit: int) -> list[list[dict]]:
    if not path.is_file():
        raise JetSpecError(f"prompt file {path} does not exist")
    prompts = []
    with open(path, encoding="utf-8") as handle:
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


def encode_prompt(tokenizer, messages: list[dict]) -> list[int]:
    if not getattr(tokenizer, "chat_template", None):
        raise JetSpecError("the target's tokenizer has no chat template; training prompts need one")
    # enable_thinking=False: Qwen3 heads are trained on non-thinking responses (the paper's setting); other
    # templates ignore the variable.
    return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                              return_dict=False, enable_thinking=False))


# ------------------------------------------------------------------------------------------------ generation


def cache_key(target_dir: Path, cfg: DataConfig, seed: int) -> str:
    """Hash of what determines the responses: the target (config + weight file sizes), prompts, settings."""
    target_dir = Path(target_dir)
    digest = hashlib.sha256()
    digest.update((target_dir / "config.json").read_bytes())
    for f in sorted(target_dir.glob("*.safetensors")):
        digest.update(f"{f.name}:{f.stat().st_size}".encode())
    source = cfg.source
    if Path(source).is_file():
        digest.update(Path(source).read_bytes())
        source = Path(source).name
    settings = asdict(cfg) | {"source": source, "seed": seed}
    settings.pop("gen_batch_size")  # batching does not change greedy output (up to numerics)
    settings.pop("gen_time_budget_s")  # how long one run may generate, not what it generates
    digest.update(json.dumps(settings, sort_keys=True).encode())
    return digest.hexdigest()[:12]


def _read_cache(path: Path) -> dict[int, dict]:
    done: dict[int, dict] = {}
    if not path.is_file():
        return done
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                break  # a line cut by an interrupted write: regenerate from there
            done[int(record["index"])] = record
    return done


def _eos_ids(target_dir: Path, tokenizer) -> list[int]:
    from jetspec_trt.builders.validate import eos_ids

    ids = list(eos_ids(target_dir, tokenizer.eos_token_id))
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    if not ids:
        raise JetSpecError(f"{target_dir}: no EOS token id in generation_config.json, config.json or tokenizer")
    return ids


def _cut_at_eos(tokens: list[int], eos: set[int]) -> tuple[list[int], str]:
    for i, t in enumerate(tokens):
        if t in eos:
            return tokens[: i + 1], "stop"
    return tokens, "length"


def generate_responses(target_dir: Path, cfg: DataConfig, out_dir: Path, device: str, dtype: torch.dtype,
                       seed: int, progress: bool = True) -> tuple[list[TrainSequence], Path]:
    """Sequences for training: cached ones are read back, missing ones generated by the target (batched)."""
    from transformers import AutoTokenizer, GenerationConfig

    from jetspec_trt.models.checkpoint import load_hf_model

    target_dir = Path(target_dir)
    data_dir = Path(out_dir) / DATA_DIR
    data_dir.mkdir(parents=True, exist_ok=True)
    key = cache_key(target_dir, cfg, seed)
    cache_path = data_dir / f"responses-{key}.jsonl"
    (data_dir / f"responses-{key}.json").write_text(
        json.dumps(asdict(cfg) | {"seed": seed, "target": str(target_dir.resolve())}, indent=2) + "\n")

    tokenizer = AutoTokenizer.from_pretrained(str(target_dir), local_files_only=True)
    messages = load_prompt_messages(cfg.source, cfg.num_prompts)
    prompts = [encode_prompt(tokenizer, m) for m in messages]
    done = _read_cache(cache_path)
    todo = [i for i in range(len(prompts)) if i not in done and len(prompts[i]) < cfg.max_seq_len - 1]
    if todo:
        # Rewrite the cache without a torn last line before appending to it.
        with open(cache_path, "w", encoding="utf-8") as handle:
            for i in sorted(done):
                handle.write(json.dumps(done[i]) + "\n")
        model = load_hf_model(target_dir, dtype)  # either layout: a plain checkpoint or an engine's fused target/
        model = model.to(device).eval()
        eos = _eos_ids(target_dir, tokenizer)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
        # A fresh GenerationConfig, not the checkpoint's: instruct checkpoints ship sampling defaults and a
        # repetition penalty that our engine's decoding does not apply, and the data must match the engine.
        sampling = {"do_sample": True, "temperature": cfg.gen_temperature, "top_p": 1.0, "top_k": 0}
        model.generation_config = GenerationConfig(
            max_new_tokens=cfg.max_new_tokens, repetition_penalty=1.0, eos_token_id=eos, pad_token_id=pad,
            **(sampling if cfg.gen_temperature > 0 else {"do_sample": False}),
        )
        torch.manual_seed(seed)
        # Longest first, so that batches hold prompts of similar length (less padding) and a memory problem
        # shows in the first batch rather than the last.
        todo.sort(key=lambda i: -len(prompts[i]))
        bar = tqdm(total=len(todo), desc="generating responses", unit="prompt", disable=not progress)
        deadline = None if cfg.gen_time_budget_s is None else time.perf_counter() + cfg.gen_time_budget_s
        with open(cache_path, "a", encoding="utf-8") as handle:
            for start in range(0, len(todo), cfg.gen_batch_size):
                if deadline is not None and time.perf_counter() >= deadline:
                    tqdm.write(f"--gen-time-budget {cfg.gen_time_budget_s:g} s reached: {len(todo) - start} "
                               f"prompts left ungenerated; training on the {len(done)} cached responses")
                    break
                batch = todo[start : start + cfg.gen_batch_size]
                for i, response in zip(batch, _generate_batch(model, [prompts[i] for i in batch], pad, device)):
                    response, finish = _cut_at_eos(response, set(eos))
                    done[i] = {"index": i, "prompt_ids": prompts[i], "response_ids": response, "finish": finish}
                    handle.write(json.dumps(done[i]) + "\n")
                handle.flush()
                bar.update(len(batch))
        bar.close()
        del model
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    sequences = [TrainSequence(done[i]["prompt_ids"], done[i]["response_ids"])
                 for i in sorted(done) if i < len(prompts)]
    return [s for s in (truncate(s, cfg.max_seq_len) for s in sequences) if s is not None], cache_path


@torch.no_grad()
def _generate_batch(model, prompts: list[list[int]], pad: int, device: str) -> list[list[int]]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, p in enumerate(prompts):  # left padding: every prompt ends where generation starts
        ids[row, width - len(p):] = torch.tensor(p)
        mask[row, width - len(p):] = 1
    out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device))
    return [row.tolist() for row in out[:, width:].cpu()]


def truncate(seq: TrainSequence, max_len: int) -> TrainSequence | None:
    """Cut to max_len tokens; None when fewer than two response tokens remain (no anchor has a target)."""
    room = max_len - len(seq.prompt_ids)
    if room < 2 or len(seq.response_ids) < 2:
        return None
    return TrainSequence(seq.prompt_ids, seq.response_ids[:room])


def split_heldout(sequences: list[TrainSequence], heldout: int) -> tuple[list[TrainSequence], list[TrainSequence]]:
    """The last `heldout` sequences (prompt order) are kept out of training for the acceptance proxy."""
    if len(sequences) < 2:
        raise JetSpecError(f"need at least 2 usable sequences (1 to train, 1 held out), got {len(sequences)}")
    heldout = min(max(1, heldout), len(sequences) - 1)
    return sequences[:-heldout], sequences[-heldout:]
