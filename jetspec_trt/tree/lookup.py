"""Context lookup: a chain of candidate tokens copied from the text already committed ("prompt lookup").

Code and worked answers repeat their context: a function's signature and docstring come back in its body, a
formula's terms in the next line. Where the last n committed tokens occurred before, the tokens that followed that
occurrence are a candidate continuation that costs no draft pass. A tree can carry it as one extra branch from the
root beside the draft head's best-first nodes; verification decides as for any node, so the output is unchanged.
"""

from __future__ import annotations


def context_lookup(ids: list[int], anchor: int, length: int, max_ngram: int = 3) -> list[int]:
    """Up to `length` tokens that followed the latest earlier occurrence of the longest suffix (max_ngram tokens,
    then fewer) of ids[: anchor + 1]; only tokens up to the anchor are read. [] where no suffix recurs."""
    if length < 1:
        return []
    for n in range(min(max_ngram, anchor + 1), 0, -1):
        suffix = ids[anchor - n + 1 : anchor + 1]
        for end in range(anchor - 1, n - 2, -1):  # end: the last token of an earlier occurrence
            if ids[end - n + 1 : end + 1] == suffix:
                return ids[end + 1 : min(end + 1 + length, anchor + 1)]
    return []
