"""Context lookup: a chain of candidate tokens copied from the text already committed ("prompt lookup").

Code and worked answers repeat their context: a function's signature and docstring come back in its body, a
formula's terms in the next line. Where the last n committed tokens occurred before, the tokens that followed that
occurrence are a candidate continuation that costs no draft pass. A tree can carry it as one extra branch from the
root beside the draft head's best-first nodes; verification decides as for any node, so the output is unchanged.

The host keeps a ContextIndex per sequence and extends it with each round's tokens, so a round's lookup is a few
dictionary reads whatever the context's length (a scan of the context per round would grow with it, in every
sequence of a batch). The CUDA graphs run the same rule as tensor ops (tree/tree_tensors.lookup_chain_tensors).
"""

from __future__ import annotations

from typing import Iterable

MAX_NGRAM = 3  # the longest suffix looked up


class ContextIndex:
    """The committed text, its last token being the anchor, and where each n-gram (1..max_ngram tokens) last
    ended before the anchor."""

    def __init__(self, ids: Iterable[int] = (), max_ngram: int = MAX_NGRAM):
        self.ids: list[int] = []
        self.max_ngram = max_ngram
        self._last_end: dict[tuple[int, ...], int] = {}
        self.extend(ids)

    def extend(self, tokens: Iterable[int]) -> None:
        """Append tokens; the last one becomes the anchor."""
        for token in tokens:
            end = len(self.ids) - 1  # the anchor so far: its n-grams now lie before the new anchor
            for n in range(1, min(self.max_ngram, end + 1) + 1):
                self._last_end[tuple(self.ids[end - n + 1 : end + 1])] = end
            self.ids.append(token)

    def lookup(self, length: int) -> list[int]:
        """Up to `length` tokens that followed the latest earlier occurrence of the longest suffix (max_ngram
        tokens, then fewer) ending at the anchor; only tokens up to the anchor are read. [] where none recurs."""
        anchor = len(self.ids) - 1
        if length < 1:
            return []
        for n in range(min(self.max_ngram, anchor + 1), 0, -1):
            end = self._last_end.get(tuple(self.ids[anchor - n + 1 :]))
            if end is not None:
                return self.ids[end + 1 : min(end + 1 + length, anchor + 1)]
        return []


def context_lookup(ids: list[int], anchor: int, length: int, max_ngram: int = MAX_NGRAM) -> list[int]:
    """ContextIndex's lookup with ids[anchor] as the anchor (only ids[: anchor + 1] are read)."""
    return ContextIndex(ids[: anchor + 1], max_ngram).lookup(length)


def lookup_chains(ids: list[int], first_anchor: int, length: int) -> list[list[int]]:
    """The chain of every anchor from first_anchor to the second-last token, in order: one index, extended."""
    index = ContextIndex(ids[:first_anchor])
    chains = []
    for token in ids[first_anchor : len(ids) - 1]:
        index.extend([token])
        chains.append(index.lookup(length))
    return chains
