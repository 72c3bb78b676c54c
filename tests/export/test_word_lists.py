"""TensorRT-LLM's stop_words / bad_words inputs (export/word_lists.py): reading a row, single-token bad words,
and where a stop word cuts the generated tokens, over a toy tokenizer whose tokens are strings."""

from __future__ import annotations

import numpy as np
import pytest

from jetspec_trt.errors import JetSpecError
from jetspec_trt.export.word_lists import StopWords, banned_token_ids, read_words

VOCAB = ["Hello", " world", "\n", "\n\n", "END", "E", "ND", "ab", "c", "!"]


def decode(ids: list[int]) -> str:
    return "".join(VOCAB[i] for i in ids)


def encode(text: str) -> list[int]:
    """Greedy longest-match over VOCAB (enough for the words these tests use)."""
    ids, rest = [], text
    while rest:
        token = max((t for t in VOCAB if rest.startswith(t)), key=len)
        ids.append(VOCAB.index(token))
        rest = rest[len(token):]
    return ids


def ids(*tokens: str) -> list[int]:
    return [VOCAB.index(t) for t in tokens]


def test_read_words_skips_empty_elements_as_tensorrt_llm_clients_send_them():
    assert read_words(np.array([b"", b"END", "lorem ipsum", b""], dtype=object)) == ("END", "lorem ipsum")
    assert read_words(np.array([b""], dtype=object)) == ()
    with pytest.raises(JetSpecError, match="not valid UTF-8"):
        read_words([b"\xff"])


def test_bad_words_must_be_single_tokens():
    assert banned_token_ids(("END", "!", "END"), encode) == tuple(sorted(ids("END", "!")))
    assert banned_token_ids((), encode) == ()
    with pytest.raises(JetSpecError, match=r"bad word 'Hello world' is 2 tokens .*single-token bad words only"):
        banned_token_ids(("!", "Hello world"), encode)


@pytest.mark.parametrize("done, new, words, keep", [
    (ids("Hello"), ids(" world", "!", "c"), ("world",), 1),  # completed by the first new token
    (ids("Hello"), ids(" world", "!", "c"), ("!",), 2),
    (ids("Hello", " world"), ids("E", "ND", "!"), ("END",), 2),  # a word spread over two tokens
    (ids("Hello"), ids("\n\n", "c"), ("\n",), 1),  # a word inside a longer token: that token is kept whole
    (ids("ab"), ids("c", "!"), ("bc", "!"), 1),  # a word straddling old and new text; the first match wins
    (ids("Hello"), ids(" world", "!"), ("xyz",), None),
    (ids("Hello", "!"), ids("c"), ("Hello",), None),  # matched before these tokens: not theirs to stop
    (ids("Hello"), ids(" world"), (), None),
])
def test_stop_word_keeps_the_token_that_completes_it(done, new, words, keep):
    stop = StopWords(words)
    assert bool(stop) == bool(words)
    assert stop.keep(decode, done + new, len(new)) == keep
