"""Acceptance walks over a verified tree: greedy, and sampling that keeps the target's distribution exactly.

Both walks start at the root and only ever consult the TARGET's logits at the current node:

Greedy: take the target's argmax y at the node; if a child holds y, move to it, else stop. Emitted tokens are
the accepted children plus y at the last node (the bonus token), so the output is the target's own greedy
decoding, token for token.

Sampling ("draw from the target, then match"): at the node, draw y from the target's tempered, top-k and top-p
filtered distribution p(. | prefix). If a child holds y, move to it; otherwise emit y and stop. Why this is exact: every
emitted token is a fresh draw from p(. | the tokens emitted before it), the same law as plain sampling; the
tree only decides whether the next draw can reuse an already-computed forward. Because our children are the
deterministic top-k of the draft (not samples from it), this rule also accepts as often as any exact rule can:
the chance to advance is p(children), the mass the target puts on the drafted set. (SpecInfer-style
multi-draft rejection sampling needs sampled drafts to be exact; with a deterministic draft set it reduces to
this.)

Banned tokens (single-token bad words) are removed from the target's logits before either rule picks, at every
node and at prefill, so the walk stays exact for the banned-token distribution: the filter is part of p.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from jetspec_trt.tree.tree import DraftTree


@dataclass(frozen=True)
class SamplingConfig:
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    seed: int | None = None
    top_k: int = 0  # sample among the k most likely tokens (before top-p); 0 = no limit
    banned_token_ids: tuple[int, ...] = ()  # never emitted, greedy or sampled (single-token bad words)

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0


@dataclass
class Acceptance:
    path: list[int]  # tree node indices kept: root first, then each accepted child
    emitted: list[int]  # accepted children's tokens + the bonus token

    @property
    def accepted_drafts(self) -> int:
        return len(self.path) - 1


def allowed_logits(logits: torch.Tensor, sampling: SamplingConfig) -> torch.Tensor:
    """The logits greedy and sampling both choose from: the banned tokens at -inf."""
    if not sampling.banned_token_ids:
        return logits
    banned = torch.tensor(sampling.banned_token_ids, device=logits.device)
    return logits.index_fill(-1, banned, float("-inf"))


def target_probs(logits: torch.Tensor, sampling: SamplingConfig) -> torch.Tensor:
    """The distribution plain sampling draws from: softmax(logits / T) without the banned tokens, restricted to
    the top-k tokens, then to the top-p nucleus of what is left (TensorRT-LLM's order)."""
    logits = allowed_logits(logits.float(), sampling) / sampling.temperature
    if 0 < sampling.top_k < logits.shape[-1]:
        # Exactly k tokens (ties broken by topk's order), as TensorRT-LLM's top-k keeps k.
        keep = torch.zeros_like(logits, dtype=torch.bool).scatter(-1, logits.topk(sampling.top_k).indices, True)
        logits = logits.masked_fill(~keep, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if sampling.top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # Keep the smallest prefix whose mass reaches top_p (the first token is always kept).
        before = sorted_probs.cumsum(-1) - sorted_probs
        sorted_probs = sorted_probs.masked_fill(before >= sampling.top_p, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def next_token(logits: torch.Tensor, sampling: SamplingConfig, generator: torch.Generator | None) -> int:
    """One token the way plain decoding picks it (argmax, or a draw from target_probs)."""
    if sampling.greedy:
        return int(allowed_logits(logits, sampling).argmax(-1))
    probs = target_probs(logits, sampling)
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))


def token_logprobs(logits: torch.Tensor, tokens: list[int], sampling: SamplingConfig) -> list[float]:
    """log p(tokens[i]) under the distribution row i of logits [n, V] chose it from: target_probs when sampling;
    greedy, the target's softmax at temperature 1 without the banned tokens (argmax has no distribution)."""
    rows = logits.float()
    logp = (torch.log_softmax(allowed_logits(rows, sampling), dim=-1) if sampling.greedy
            else target_probs(rows, sampling).log())
    index = torch.tensor(tokens, device=logits.device).reshape(-1, 1)
    return logp.gather(-1, index).reshape(-1).tolist()


def accept(
    tree: DraftTree, logits: torch.Tensor, sampling: SamplingConfig, generator: torch.Generator | None = None
) -> Acceptance:
    """logits [N, V]: the target's logits at each tree node (row i predicts the token after node i)."""
    if sampling.greedy:
        choices = allowed_logits(logits, sampling).argmax(-1).tolist()  # one host transfer for the whole tree
        return walk(tree, lambda node: choices[node])
    return walk(tree, lambda node: next_token(logits[node], sampling, generator))


def walk(tree: DraftTree, pick: Callable[[int], int]) -> Acceptance:
    """From the root: emit pick(node); move to the child holding that token, or stop. `pick` is the rule."""
    node, path, emitted = 0, [0], []
    while True:
        token = pick(node)
        emitted.append(token)
        child = tree.children[node].get(token)
        if child is None:
            return Acceptance(path, emitted)
        node = child
        path.append(node)
