"""TensorRT-LLM's `stop_words` and `bad_words` request inputs: reading them, the stop-word check, banned tokens.

TensorRT-LLM's preprocessing model reads each element of a prompt's STRING row as one word (any string,
"lorem ipsum" included) and skips words that tokenize to nothing, so its own clients' [[""]] means none.

Stop words are matched on the decoded generated text (not on token ids, so a word matches however the output
happens to be tokenized); the output keeps the token that completed the word, and nothing after it, as
TensorRT-LLM keeps the stop sequence in its output. Bad words must be single tokens: they are banned in the one
sampler (tree.accept), which keeps speculative decoding exact. A longer bad word would ban its last token only
after the others, a per-tree-node condition the sampler does not implement, so it is refused, not ignored.
"""

from __future__ import annotations

from typing import Callable, Iterable

from jetspec_trt.errors import JetSpecError


def read_words(row: Iterable) -> tuple[str, ...]:
    """One prompt's row of a STRING word-list tensor (bytes or str elements) -> its non-empty words."""
    words = []
    for value in row:
        try:
            word = value.decode("utf-8") if isinstance(value, bytes) else str(value)
        except UnicodeDecodeError as err:
            raise JetSpecError("a stop or bad word is not valid UTF-8") from err
        if word:
            words.append(word)
    return tuple(words)


def banned_token_ids(words: tuple[str, ...], encode: Callable[[str], list[int]]) -> tuple[int, ...]:
    """The token ids of single-token bad words; JetSpecError for a word of several tokens."""
    banned = []
    for word in words:
        ids = encode(word)
        if len(ids) > 1:
            raise JetSpecError(f"bad word {word!r} is {len(ids)} tokens {ids}; this model bans single-token bad "
                               "words only (banning a sequence is not implemented)")
        banned.extend(ids)
    return tuple(sorted(set(banned)))


class StopWords:
    def __init__(self, words: tuple[str, ...]):
        self.words = words

    def __bool__(self) -> bool:
        return bool(self.words)

    def keep(self, decode: Callable[[list[int]], str], ids: list[int], new: int) -> int | None:
        """`ids`: the generated tokens, the last `new` of them just added. Of those, how many to keep when a
        stop word's text ends inside one of them (the first such token and all before it), else None."""
        if not self.words:
            return None
        old = len(ids) - new
        previous = decode(ids[:old])
        for k in range(1, new + 1):
            text = decode(ids[: old + k])
            for word in self.words:
                # Only a match that ends in this token's text: earlier ones would have stopped earlier.
                if text.find(word, max(0, len(previous) - len(word) + 1)) >= 0:
                    return k
            previous = text
        return None
