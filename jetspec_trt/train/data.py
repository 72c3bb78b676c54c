"""Training data: prompts answered by the target itself (the paper's recipe), cached as token ids.

Why regenerate: the head must predict what THIS target would say next, so the responses it learns from are
the target's own (greedy, which is what greedy speculative decoding then has to match). Generation runs on
runtime.batch_decode's BatchDecoder (many rows, continuous batching, the step as one CUDA graph); every
finished response is appended to a jsonl cache in the output directory, so an interrupted run resumes where it
stopped and a re-run with the same settings skips generation entirely. The cache file name is a hash of
everything that changes its content.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from jetspec_trt.datasets import encode_prompts, load_prompt_messages
from jetspec_trt.errors import JetSpecError

DATA_DIR = "data"


@dataclass(frozen=True)
class DataConfig:
    # A prompt suite of jetspec_trt.datasets, a .jsonl file of prompts, or several of either separated by
    # commas (taken in turns, so that any prefix, e.g. what a generation time budget reaches, is a mix).
    source: str = "sharegpt"
    num_prompts: int = 1000
    max_new_tokens: int = 512
    # 0: greedy responses (what greedy verification accepts, token for token). > 0: sampled ones, new text for
    # prompts a greedy run already answered (another --seed, another cache); the labels are then draws from the
    # target's distribution, whose expectation is that distribution (the cross-entropy is forward KL to it).
    gen_temperature: float = 0.0
    gen_batch_size: int = 32  # rows decoded together (BatchDecoder's max_batch)
    max_seq_len: int = 2048  # prompt + response; longer sequences are cut (prompts longer than this dropped)
    # Stop admitting prompts after this many seconds (rows in flight finish) and use what is cached; a later run
    # with the same settings generates the rest. For fixed-size GPU leases. Not part of the cache key.
    gen_time_budget_s: float | None = None
    # Skip the source's first N prompts (after mixing): a head continued run after run then answers prompts no
    # earlier run used, instead of the same first few thousand each time.
    prompt_offset: int = 0
    # Prompt tokens per packed prefill forward while generating (BatchDecoder's prefill_tokens). Run 4 on the
    # H200 packed 4096 and prefilled at ~53 K tokens/s, half of its generation time; bigger packs mean fewer,
    # fuller forwards. Not part of the cache key (packing does not change greedy output, up to numerics).
    gen_prefill_tokens: int = 16384
    gen_attention: str = "auto"  # BatchDecoder's decode attention: auto, triton or sdpa (not in the cache key)


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


# ------------------------------------------------------------------------------------------------ generation


def cache_key(target_dir: Path, cfg: DataConfig, seed: int) -> str:
    """Hash of what determines the responses: the target (config + weight file sizes), prompts, settings."""
    target_dir = Path(target_dir)
    digest = hashlib.sha256()
    digest.update((target_dir / "config.json").read_bytes())
    for f in sorted(target_dir.glob("*.safetensors")):
        digest.update(f"{f.name}:{f.stat().st_size}".encode())
    parts = []
    for part in cfg.source.split(","):
        if Path(part.strip()).is_file():  # a prompt file counts by its content, not its path
            digest.update(Path(part.strip()).read_bytes())
            part = Path(part.strip()).name
        parts.append(part.strip())
    settings = asdict(cfg) | {"source": ",".join(parts), "seed": seed}
    settings.pop("gen_batch_size")  # batching does not change greedy output (up to numerics)
    settings.pop("gen_prefill_tokens")  # nor does packing
    settings.pop("gen_attention")  # nor the attention kernel
    settings.pop("gen_time_budget_s")  # how long one run may generate, not what it generates
    if not settings["prompt_offset"]:
        settings.pop("prompt_offset")  # keys of caches made before the field existed stay valid
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


@dataclass(frozen=True)
class GenerationStats:
    """What one generate_responses call generated (0 prompts when the cache held everything)."""

    prompts: int
    new_tokens: int
    seconds: float  # decoding wall time, prefills included; model load and graph capture excluded
    prefill_tokens: int = 0  # prompt tokens prefilled
    prefill_s: float = 0.0  # of `seconds`, the packed prefills'
    prefill_packs: int = 0  # packed prefill forwards
    decode_steps: int = 0  # batched decode steps (each emits up to gen_batch_size tokens)
    batch_rows: int = 0  # rows decoded together (gen_batch_size, or fewer prompts)

    @property
    def tokens_per_s(self) -> float | None:
        return self.new_tokens / self.seconds if self.seconds > 0 else None

    def as_dict(self) -> dict:
        rate = self.tokens_per_s
        steps_s = self.seconds - self.prefill_s
        return asdict(self) | {"seconds": round(self.seconds, 3), "prefill_s": round(self.prefill_s, 3),
                               "tokens_per_s": None if rate is None else round(rate, 1),
                               # where the time goes: mean live rows per step, and one step's milliseconds
                               "tokens_per_step": round(self.new_tokens / self.decode_steps, 1)
                               if self.decode_steps else None,
                               "ms_per_step": round(1e3 * steps_s / self.decode_steps, 3) if self.decode_steps else None}


def settings_path(cache_path: Path) -> Path:
    """The settings file next to a responses cache (responses-<key>.json beside responses-<key>.jsonl)."""
    return Path(cache_path).with_suffix(".json")


def generation_stats(cache_path: Path) -> dict | None:
    """The last generate_responses call's GenerationStats.as_dict() for this cache (its settings file's
    "generation" entry), e.g. for a training card's generation_tokens_per_s; None if it has none."""
    path = settings_path(cache_path)
    return json.loads(path.read_text()).get("generation") if path.is_file() else None


def generate_responses(target_dir: Path, cfg: DataConfig, out_dir: Path, device: str, dtype: torch.dtype,
                       seed: int, progress: bool = True) -> tuple[list[TrainSequence], Path]:
    """Sequences for training: cached ones are read back, missing ones generated by the target (batched).

    The call's GenerationStats go into the settings file as "generation" (read back with generation_stats); a
    call that generates nothing keeps the stats of the call that did."""
    from transformers import AutoTokenizer

    from jetspec_trt.models.checkpoint import load_target
    from jetspec_trt.runtime.batch_decode import BatchDecodeConfig, BatchDecoder

    # The prompts first: a bad source or offset fails before anything is written.
    messages = load_prompt_messages(cfg.source, cfg.prompt_offset + cfg.num_prompts)[cfg.prompt_offset :]
    if not messages:
        raise JetSpecError(f"--prompt-offset {cfg.prompt_offset} skips every prompt of {cfg.source}")
    target_dir = Path(target_dir)
    data_dir = Path(out_dir) / DATA_DIR
    data_dir.mkdir(parents=True, exist_ok=True)
    key = cache_key(target_dir, cfg, seed)
    cache_path = data_dir / f"responses-{key}.jsonl"
    settings = asdict(cfg) | {"seed": seed, "target": str(target_dir.resolve())}
    made_it = generation_stats(cache_path)  # the stats of the call that generated the cache, if this one makes none
    settings_path(cache_path).write_text(json.dumps(settings, indent=2) + "\n")

    done = _read_cache(cache_path)
    stats = GenerationStats(0, 0, 0.0)
    todo: list[int] = []
    # --gen-time-budget 0: no generation, and no tokenizer or target load for it: train on what an earlier run
    # with the same data flags cached (e.g. a second head trained on the same responses).
    if cfg.gen_time_budget_s != 0:
        tokenizer = AutoTokenizer.from_pretrained(str(target_dir), local_files_only=True)
        prompts = encode_prompts(tokenizer, messages)
        todo = [i for i in range(len(prompts)) if i not in done and len(prompts[i]) < cfg.max_seq_len - 1]
    if todo:  # (prompts and tokenizer exist)
        # Rewrite the cache without a torn last line before appending to it.
        with open(cache_path, "w", encoding="utf-8") as handle:
            for i in sorted(done):
                handle.write(json.dumps(done[i]) + "\n")
        eos = _eos_ids(target_dir, tokenizer)
        # Prompt order, not longest first: a time budget then keeps the sources' mix instead of the longest (most
        # prefill per response) prompts; the run on the H200 that sorted longest first got 14.9 K new tokens/s
        # with 1.3 K prompt tokens per response. The static cache is sized for the longest prompt up front, so a
        # memory problem still shows at once.
        # Rows need no more slots than the longest prompt plus its response (attention reads every slot), and
        # no more than max_seq_len: responses are cut there for training anyway (truncate).
        row_len = min(cfg.max_seq_len, max(len(prompts[i]) for i in todo) + cfg.max_new_tokens)
        # Either layout (a plain checkpoint or an engine's target/); fused q/k/v and gate/up GEMMs on the GPU.
        target = load_target(target_dir, dtype, device, fused_gemm=device.startswith("cuda"))
        decoder = BatchDecoder(target, BatchDecodeConfig(max_batch=min(cfg.gen_batch_size, len(todo)),
                                                         max_seq_len=row_len,
                                                         prefill_tokens=cfg.gen_prefill_tokens,
                                                         attention=cfg.gen_attention,
                                                         temperature=cfg.gen_temperature, seed=seed))
        bar = tqdm(total=len(todo), desc="generating responses", unit="prompt", disable=not progress)
        started = time.perf_counter()
        generated = new_tokens = 0
        with open(cache_path, "a", encoding="utf-8") as handle:
            for index, response, finish in decoder.generate([prompts[i] for i in todo], cfg.max_new_tokens, eos,
                                                             deadline_s=cfg.gen_time_budget_s):
                i = todo[index]
                done[i] = {"index": i, "prompt_ids": prompts[i], "response_ids": response, "finish": finish}
                handle.write(json.dumps(done[i]) + "\n")
                handle.flush()
                generated, new_tokens = generated + 1, new_tokens + len(response)
                bar.update(1)
        stats = GenerationStats(generated, new_tokens, time.perf_counter() - started, decoder.prefill_tokens,
                                decoder.prefill_s, decoder.prefill_packs, decoder.steps, decoder.config.max_batch)
        bar.close()
        if generated < len(todo):
            tqdm.write(f"--gen-time-budget {cfg.gen_time_budget_s:g} s reached: {len(todo) - generated} prompts left "
                       f"ungenerated; training on the {len(done)} cached responses")
        del decoder, target
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    generation = stats.as_dict() if stats.prompts or made_it is None else made_it
    settings_path(cache_path).write_text(json.dumps(settings | {"generation": generation}, indent=2) + "\n")
    sequences = [TrainSequence(done[i]["prompt_ids"], done[i]["response_ids"])
                 for i in sorted(done) if i < len(messages)]
    return [s for s in (truncate(s, cfg.max_seq_len) for s in sequences) if s is not None], cache_path


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
