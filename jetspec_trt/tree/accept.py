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

Both rules are one walk over a per-node choice (`choose_tokens`: the argmax, or one draw): greedy is the T = 0
case. The walk may draw at every node up front (the CUDA-graph path, `tree.tree_tensors.accept_tensors`, has no
host branch) or only at the nodes it visits (this module's host walk): draws at nodes off the path are never
used, so both give the same law.
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

    @property
    def mode(self) -> str:
        """How a node's token is chosen: "greedy" (argmax), "sample" (a draw at the temperature) or "nucleus" (a
        draw inside the top-p nucleus). The mode fixes a captured CUDA graph; the temperature and top_p values do
        not (the graph reads them from device scalars). top_p = 1 skips the nucleus's vocabulary sort."""
        if self.greedy:
            return "greedy"
        return "nucleus" if self.top_p < 1.0 else "sample"


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


Scalar = float | torch.Tensor  # a Python number, or a 0-d tensor on the logits' device (graph-captured reads)


def tempered_logits(logits: torch.Tensor, temperature: Scalar, top_p: Scalar | None, top_k: int = 0) -> torch.Tensor:
    """logits / T in float32, restricted to the top-k tokens (0: no limit), then with every token outside the
    top-p nucleus of what is left at -inf (top_p None: no nucleus; TensorRT-LLM's order). Its softmax is the
    distribution plain sampling draws from."""
    scaled = logits.float() / temperature
    if 0 < top_k < scaled.shape[-1]:
        # Exactly k tokens (ties broken by topk's order), as TensorRT-LLM's top-k keeps k.
        keep = torch.zeros_like(scaled, dtype=torch.bool).scatter(-1, scaled.topk(top_k).indices, True)
        scaled = scaled.masked_fill(~keep, float("-inf"))
    if top_p is None:
        return scaled
    sorted_logits, order = scaled.sort(dim=-1, descending=True)
    sorted_probs = sorted_logits.softmax(-1)
    # Keep the smallest prefix whose mass reaches top_p (the first token is always kept).
    outside = sorted_probs.cumsum(-1) - sorted_probs >= top_p
    return scaled.scatter(-1, order, sorted_logits.masked_fill(outside, float("-inf")))


def target_probs(logits: torch.Tensor, sampling: SamplingConfig) -> torch.Tensor:
    """The distribution plain sampling draws from: softmax(logits / T) without the banned tokens, restricted to
    the top-k tokens, then to the top-p nucleus of what is left."""
    top_p = sampling.top_p if sampling.mode == "nucleus" else None
    return torch.softmax(tempered_logits(allowed_logits(logits, sampling), sampling.temperature, top_p,
                                         sampling.top_k), dim=-1)


def choose_tokens(logits: torch.Tensor, mode: str, temperature: Scalar = 0.0, top_p: Scalar = 1.0,
                  generator: torch.Generator | None = None, top_k: int = 0) -> torch.Tensor:
    """The token each row of logits [..., V] emits: its argmax ("greedy"), or one independent draw per row from
    softmax(tempered_logits) ("sample", "nucleus"; SamplingConfig.mode). int64 [...], on the logits' device.
    Banned tokens are the caller's to mask first (allowed_logits).

    The draw is the exponential race: with E_i ~ Exp(1) i.i.d., argmax_i p_i / E_i is i with probability p_i
    (torch.multinomial's own one-sample path, whose input checks sync with the host and so cannot be captured).
    In log space, argmax(log p_i - log E_i) = argmax(tempered logit_i - log E_i): no softmax is needed.
    """
    if mode == "greedy":
        return logits.argmax(-1)
    scaled = tempered_logits(logits, temperature, top_p if mode == "nucleus" else None, top_k)
    race = torch.empty_like(scaled).exponential_(generator=generator)
    # An exact 0 from exponential_ would make -log E infinite (argmax then ignores p); tiny keeps it finite and
    # is below any non-zero float32 draw, so no other outcome changes.
    return (scaled - race.clamp_min_(torch.finfo(race.dtype).tiny).log_()).argmax(-1)


def next_token(logits: torch.Tensor, sampling: SamplingConfig, generator: torch.Generator | None) -> int:
    """One token the way plain decoding picks it (argmax, or a draw from target_probs), banned tokens never.
    The generator, when given, lives on the logits' device."""
    return int(choose_tokens(allowed_logits(logits, sampling), sampling.mode, sampling.temperature, sampling.top_p,
                             generator, sampling.top_k))


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
        choices = choose_tokens(allowed_logits(logits, sampling), "greedy").tolist()  # one host transfer
        return walk(tree, lambda node: choices[node])
    # Draws only at the nodes the walk visits: on the host a vocabulary-wide draw costs, and unused ones don't count.
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
