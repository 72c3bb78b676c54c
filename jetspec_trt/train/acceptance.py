"""The head's greedy tau per tree budget on held-out sequences, without an engine (tree/simulate.py).

The held-out sequences are the target's own greedy responses, so every response position is an anchor the
decode loop could round at: one teacher-forced pass of the head over all of them (objective.block_hidden, the
training forward) gives each anchor's per-depth candidates (tree.depth_top_logp, the trees' own scores), and the
simulation replays the rounds. The card then tracks what the suite bench measures (tau at budgets 16/64/256 on
the engine's tree width) rather than only per-depth agreement, at every evaluation of a run, for a few seconds of
lm_head work instead of a build and a bench.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from jetspec_trt.models.draft import DraftHead
from jetspec_trt.models.target import TargetModel
from jetspec_trt.train.data import TrainSequence
from jetspec_trt.train.features import FeatureStore, to_device
from jetspec_trt.train.objective import BlockBatch, block_hidden
from jetspec_trt.tree.lookup import lookup_chains
from jetspec_trt.tree.simulate import accepted_drafts, round_lengths
from jetspec_trt.tree.tree import depth_top_logp

ANCHOR_CHUNK = 64  # anchors per head pass: 64 x 15 depth rows of logits at a time (~0.6 GB at Qwen's vocabulary)


@torch.no_grad()
def anchor_candidates(head: DraftHead, target: TargetModel, store: FeatureStore, row: int, sequence: TrainSequence,
                      topk: int, depth: int, autocast=contextlib.nullcontext) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k log-probabilities and tokens [A, depth, topk] (host) at each anchor of store row `row`'s response:
    the anchors are the response's tokens but its last (each drafts the tokens after it)."""
    device = store.tokens.device
    first, length = len(sequence.prompt_ids), len(sequence)
    features = store.padded_features([row])
    lengths = to_device(torch.tensor([length]), device)
    tokens = torch.tensor(sequence.ids)
    logps, ids = [], []
    for start in range(first, length - 1, ANCHOR_CHUNK):
        anchors = torch.arange(start, min(start + ANCHOR_CHUNK, length - 1))[None]
        batch = BlockBatch(features, lengths, to_device(anchors, device), to_device(tokens[anchors], device),
                           to_device(torch.ones_like(anchors, dtype=torch.bool), device))
        with autocast():
            hidden = block_hidden(head, target, batch)[0, :, 1 : depth + 1]  # [A, depth, H]
            rows = hidden.reshape(-1, hidden.shape[-1]).to(target.lm_head.weight.dtype)
            logits = (F.linear(rows, target.lm_head.weight) if head.vocab_weight is None  # (the training path's op)
                      else head.depth_logits(rows, target))
        logp, top = depth_top_logp(logits, topk, head.vocab_ids)
        logps.append(logp.view(*hidden.shape[:2], topk).cpu())
        ids.append(top.view(*hidden.shape[:2], topk).cpu())
    return torch.cat(logps), torch.cat(ids)


def truth_tokens(sequence: TrainSequence, depth: int) -> torch.Tensor:
    """[A, depth] the token the target wrote at each depth of each anchor (-1 past the sequence's end)."""
    ids = torch.tensor(sequence.ids)
    anchors = torch.arange(len(sequence.prompt_ids), len(sequence) - 1)
    positions = anchors[:, None] + torch.arange(1, depth + 1)
    return torch.where(positions < len(ids), ids[positions.clamp(max=len(ids) - 1)], -1)


def simulated_tau(head: DraftHead, target: TargetModel, store: FeatureStore, rows: list[int],
                  sequences: list[TrainSequence], budgets: tuple[int, ...], max_depth: int,
                  trees: tuple[tuple[int, int], ...], autocast=contextlib.nullcontext) -> list[dict[str, float]]:
    """Per tree (width, lookup nodes: TreeConfig.topk and .lookup), {str(budget): tau} of greedy rounds over the
    response of every store row in `rows` (sequences[i] is rows[i]'s sequence), depth <= max_depth. One head pass
    and one lookup walk per sequence serve every tree: a width's candidates are the first `width` of the widest,
    a shorter chain the start of the longest."""
    depth = min(max_depth, head.spec.block_size - 1)
    widest, longest = max(w for w, _ in trees), max(m for _, m in trees)
    totals = torch.zeros(len(trees), len(budgets), 2, dtype=torch.long)  # (tokens, rounds) per tree and budget
    for row, sequence in zip(rows, sequences, strict=True):
        if len(sequence) - 1 <= len(sequence.prompt_ids):
            continue
        logp, ids = anchor_candidates(head, target, store, row, sequence, widest, depth, autocast)
        truth = truth_tokens(sequence, depth)
        chains = lookup_chains(sequence.ids, len(sequence.prompt_ids), longest) if longest else []
        for t, (width, lookup) in enumerate(trees):
            cut = [chain[:lookup] for chain in chains] if lookup else None
            accepted = accepted_drafts(logp, ids, truth, budgets, width, depth, cut, lookup)
            for b in range(len(budgets)):
                emitted = round_lengths(accepted[b])
                totals[t, b] += torch.tensor([sum(emitted), len(emitted)])
    return [{str(budget): round(float(tot[0]) / max(1, int(tot[1])), 4) for budget, tot in zip(budgets, per_tree)}
            for per_tree in totals]
