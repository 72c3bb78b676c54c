"""A draft vocabulary: the tokens a draft head proposes from (DraftHead.set_vocab), the most frequent in the
target's own responses.

Why: the draft's per-depth logits are its lm_head over the target's whole vocabulary, 15 rows x 151936 tokens at
Qwen's: 0.10 ms of a 0.27 ms draft stage on an H100 at the 0.5B shape (bench/results/
engine-qwen2.5-0.5b-h100-defaults-profile.json), and the tree's top-k then reads all of them. EAGLE-3 drafts from
the 32 K most frequent tokens for the same reason. The target still verifies over its whole vocabulary, so the
output is the same; only a token outside the draft's vocabulary can no longer be drafted (the training card's
`response_vocab_coverage` measures how often the target writes one).

Files:
    token_counts.json   in a head directory (written by `jetspec-trt train`, added up over its runs):
                        {"response_tokens": n, "counts": {"token id": count, ...}}
    draft_vocab.json    in an engine (`jetspec-trt build`: DEFAULT_DRAFT_VOCAB tokens where counts exist, or
                        --draft-vocab N): {"size": N, "token_ids": [ascending], "coverage": the share of the
                        counted tokens they cover, "source": the counts file}
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from jetspec_trt.errors import JetSpecError

TOKEN_COUNTS = "token_counts.json"
DRAFT_VOCAB = "draft_vocab.json"
# What `build` uses where the head has token counts: on an H100 (lease 13, the default pair, default tree, budget 64)
# it took the round 1.76 -> 1.67 ms (draft 0.25 -> 0.19, tree 0.10 -> 0.07) and ran faster than the whole vocabulary
# on the same 12 prompts a suite (bench/results/suites-nvidia-h100-head-v9-topk16-lookup15-dv32768.json).
DEFAULT_DRAFT_VOCAB = 32768


def read_token_counts(path: Path) -> Counter:
    """Token id -> count from a token_counts.json; a one-line JetSpecError if it is missing or malformed."""
    path = Path(path)
    if not path.is_file():
        raise JetSpecError(f"{path}: no token counts (a head trained by `jetspec-trt train` has {TOKEN_COUNTS})")
    try:
        return Counter({int(token): int(count) for token, count in json.loads(path.read_text())["counts"].items()})
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise JetSpecError(f"{path}: not a token counts file ({type(err).__name__}: {err})") from None


def write_token_counts(path: Path, counts: Counter) -> None:
    """Write counts (most frequent first) as token_counts.json."""
    ordered = {str(token): count for token, count in counts.most_common()}
    Path(path).write_text(json.dumps({"response_tokens": sum(counts.values()), "counts": ordered}) + "\n")


def most_frequent(counts: Counter, size: int, vocab_size: int) -> tuple[list[int], float]:
    """The `size` most frequent token ids (ties: the lower id; tokens never counted fill up from id 0), ascending,
    and the share of the counted tokens they cover."""
    if not 1 <= size <= vocab_size:
        raise JetSpecError(f"a draft vocabulary of {size} tokens: it must be 1..{vocab_size} (the target's vocabulary)")
    if any(not 0 <= token < vocab_size for token in counts):
        raise JetSpecError(f"token counts hold ids outside the target's vocabulary 0..{vocab_size - 1}")
    ranked = sorted(counts, key=lambda token: (-counts[token], token))[:size]
    chosen = set(ranked)
    fill = (token for token in range(vocab_size) if token not in chosen)
    while len(ranked) < size:
        ranked.append(next(fill))
    total = sum(counts.values())
    return sorted(ranked), sum(counts[t] for t in ranked) / total if total else 0.0


def write_draft_vocab(engine_dir: Path, token_ids: list[int], coverage: float, source: Path) -> None:
    (Path(engine_dir) / DRAFT_VOCAB).write_text(json.dumps(
        {"size": len(token_ids), "coverage": round(coverage, 6), "source": str(source), "token_ids": token_ids}) + "\n")


def read_draft_vocab(engine_dir: Path, size: int) -> list[int]:
    """The token ids of an engine's draft vocabulary, checked against the size its runtime config names."""
    path = Path(engine_dir) / DRAFT_VOCAB
    if not path.is_file():
        raise JetSpecError(f"{engine_dir}: runtime_config.json names a draft vocabulary of {size} tokens but "
                           f"{DRAFT_VOCAB} is missing (rebuild the engine)")
    try:
        ids = [int(token) for token in json.loads(path.read_text())["token_ids"]]
    except (ValueError, KeyError, TypeError) as err:
        raise JetSpecError(f"{path}: not a draft vocabulary file ({type(err).__name__}: {err}; rebuild the engine)") \
            from None
    if len(ids) != size:
        raise JetSpecError(f"{path}: {len(ids)} token ids, runtime_config.json says {size} (rebuild the engine)")
    return ids
