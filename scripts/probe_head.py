"""Probes of a draft head on held-out greedy responses of the target, on the CPU in minutes (fp32).

The target answers held-out prompts greedily (cached in --work); at random response anchors the head drafts its
per-depth logits from the true context, exactly what greedy decoding gives it at that anchor (greedy decoding is
lossless, so its context is the same tokens). Two commands:

- `anchor-use`: how much of the head's agreement comes from the anchor token (the token the block starts from):
  top-1 agreement per depth with the true anchor, a random token, the MASK token or the previous token in its
  place. Run 6's heads kept 0.17-0.19 of 0.28-0.32 without it (docs/training.md).
- `tree-tau`: the tau its trees would reach, with no target verify: a greedy round accepts the longest tree path
  that spells the target's own next tokens, so tau = 1 + that path's length. Compares ways of scoring the tree:
  `draft` (jetspec_trt.tree.tree.build_tree as the engine runs it), `T=x` (the draft logits divided by x) and
  `static` (every anchor the same tree, grown from the (depth, rank) hit rates measured on the other half of the
  anchors, as Medusa-style calibrated trees are). Version 6: 1.78 / 1.91 at budgets 16 / 64, where the H200
  suite bench measured 1.75-1.85 / 1.86-2.00.

    python scripts/probe_head.py anchor-use --target T --head H [--data prompts.jsonl.gz --prompt-offset 50000]
    python scripts/probe_head.py tree-tau --target T --head H [--budgets 16,64 --temperatures 0.7,1.5]
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import click
import torch

from jetspec_trt.models.checkpoint import load_draft, load_target
from jetspec_trt.models.draft import DraftHead
from jetspec_trt.models.target import TargetModel
from jetspec_trt.train.data import DataConfig, generate_responses
from jetspec_trt.train.features import FeatureStore
from jetspec_trt.train.objective import BlockBatch, depth_logits
from jetspec_trt.tree.tree import DraftTree, build_tree

VARIANTS = ("true anchor", "random token", "mask token", "previous token")
DEPTHS = (1, 2, 4, 8)


@dataclass
class Anchors:
    """One held-out sequence's random response anchors and what a draft pass needs at them."""

    ids: torch.Tensor  # [L] the sequence's tokens
    picks: torch.Tensor  # [K] anchor positions, ascending
    features: torch.Tensor  # [1, L, F] the target's context features
    device: str

    def batch(self, first: torch.Tensor) -> BlockBatch:
        """The blocks [first[k], MASK ...] at the anchors (first: the anchor tokens, or what replaces them)."""
        n = len(self.picks)
        return BlockBatch(self.features, torch.tensor([len(self.ids)], device=self.device),
                          self.picks[None].to(self.device), first[None].to(self.device),
                          torch.ones(1, n, dtype=torch.bool, device=self.device))


@dataclass
class Probe:
    target: TargetModel
    head: DraftHead
    sequences: list
    store: FeatureStore
    anchors: int
    device: str

    @property
    def depths(self) -> int:
        return self.head.spec.block_size - 1

    def held_out(self, generator: torch.Generator) -> Iterator[Anchors]:
        """Every sequence with at least 4 response tokens, up to `anchors` random response anchors each."""
        for row, seq in enumerate(self.sequences):
            ids = torch.tensor(seq.ids)
            length, prompt = len(ids), len(seq.prompt_ids)
            if length - prompt < 4:
                continue
            candidates = torch.arange(prompt, length - 1)
            picks = candidates[torch.randperm(len(candidates), generator=generator)[: self.anchors]].sort().values
            yield Anchors(ids, picks, self.store.padded_features([row]), self.device)

    @torch.no_grad()
    def depth_logits(self, batch: BlockBatch) -> torch.Tensor:
        """[K, D, V] float32 on the CPU."""
        return depth_logits(self.head, self.target, batch)[0].cpu()


def probe_command(fn):
    """The held-out data and models every probe reads; the command gets a Probe."""

    @click.option("--target", "target_dir", required=True, type=click.Path(path_type=Path))
    @click.option("--head", "head_dir", required=True, type=click.Path(path_type=Path))
    @click.option("--data", default=".carry/prompts-mix.jsonl.gz", show_default=True)
    @click.option("--prompt-offset", default=50000, show_default=True, help="Past every training run's prompts.")
    @click.option("--num-prompts", default=64, show_default=True)
    @click.option("--max-new-tokens", default=128, show_default=True)
    @click.option("--max-seq-len", default=1024, show_default=True)
    @click.option("--anchors", default=16, show_default=True, help="Per sequence.")
    @click.option("--work", default=Path("/tmp/probe-anchor"), type=click.Path(path_type=Path), show_default=True,
                  help="Where the responses are cached.")
    @click.option("--device", default="cpu", show_default=True)
    @functools.wraps(fn)
    def command(target_dir, head_dir, data, prompt_offset, num_prompts, max_new_tokens, max_seq_len, anchors, work,
                device, **options):
        dtype = torch.float32 if device == "cpu" else torch.bfloat16
        cfg = DataConfig(data, num_prompts, max_new_tokens, 0.0, 32, max_seq_len, prompt_offset=prompt_offset)
        sequences, _ = generate_responses(target_dir, cfg, work, device, dtype, seed=0, progress=False)
        target = load_target(target_dir, dtype, device)
        head = load_draft(head_dir, dtype, device)
        store = FeatureStore.build(target, sequences, head.spec.target_layer_ids, progress=False, keep_hidden=False)
        return fn(Probe(target, head, sequences, store, anchors, device), **options)

    return command


@click.group()
def main():
    """Probes of a draft head on held-out greedy responses (see the module docstring)."""


@main.command("anchor-use")
@probe_command
def anchor_use(probe: Probe):
    """Top-1 agreement per depth with the true anchor, a random token, MASK or the previous token in its place."""
    depths, mask_id = probe.depths, probe.head.spec.mask_token_id
    hits = {name: torch.zeros(depths) for name in VARIANTS}
    counts = torch.zeros(depths)
    g = torch.Generator().manual_seed(1)
    for a in probe.held_out(g):
        length = len(a.ids)
        positions = a.picks[:, None] + torch.arange(1, depths + 1)
        seen = positions < length
        labels = a.ids[positions.clamp(max=length - 1)]
        counts += seen.sum(0)
        for name in VARIANTS:
            first = {"true anchor": a.ids[a.picks], "previous token": a.ids[a.picks - 1],
                     "random token": torch.randint(0, mask_id, a.picks.shape, generator=g),
                     "mask token": torch.full_like(a.picks, mask_id)}[name]
            predicted = probe.depth_logits(a.batch(first)).argmax(-1)
            hits[name] += ((predicted == labels) & seen).sum(0)
    click.echo(f"{len(probe.sequences)} sequences, {int(counts[0])} anchors; top-1 agreement at depths {DEPTHS}:")
    for name in VARIANTS:
        rate = hits[name] / counts.clamp(min=1)
        click.echo(f"  {name:15s} " + "  ".join(f"{float(rate[d - 1]):.3f}" for d in DEPTHS if d <= depths))


def accepted_length(tree: DraftTree, labels: list[int]) -> int:
    """Nodes of the longest tree path from the root that spells labels[0], labels[1], ..."""
    node, length = 0, 0
    for token in labels:
        node = tree.children[node].get(token)
        if node is None:
            break
        length += 1
    return length


def topk_rows(rank_ids: torch.Tensor, rank_logp: torch.Tensor, vocab: int) -> torch.Tensor:
    """[D, V] logits whose normalised top-k are `rank_logp` [D, k] at token ids `rank_ids` [D, k]: the rest of each
    row's mass is spread over the other tokens, too thinly to enter any top-k."""
    depth, k = rank_ids.shape
    rest = (1 - rank_logp.exp().sum(-1)).clamp(min=1e-9) / (vocab - k)
    out = rest.log()[:, None].expand(depth, vocab).clone()
    out.scatter_(1, rank_ids, rank_logp)
    return out


@dataclass
class Draft:
    """What the tree scorers need of one anchor's draft pass (a [D, V] float32 row set is 9 MB at Qwen's
    vocabulary): the top-k ids and logits per depth, log-normalisers per temperature, the target's next tokens."""

    anchor: int
    top_ids: torch.Tensor  # [D, k]
    top: torch.Tensor  # [D, k]
    log_norm: dict[float, torch.Tensor]  # temperature -> [D]
    labels: list[int]


@main.command("tree-tau")
@probe_command
@click.option("--budgets", default="16,64", show_default=True)
@click.option("--topk", default=7, show_default=True)
@click.option("--temperatures", default="0.5,0.7,1.5,2", show_default=True)
def tree_tau(probe: Probe, budgets: str, topk: int, temperatures: str):
    """Offline tau of the head's trees per budget and tree scoring."""
    depths, vocab = probe.depths, probe.target.config.vocab_size
    temps = [1.0] + [float(v) for v in temperatures.split(",") if v]
    drafts: list[Draft] = []
    for a in probe.held_out(torch.Generator().manual_seed(1)):
        logits = probe.depth_logits(a.batch(a.ids[a.picks]))
        top, top_ids = logits.topk(topk, dim=-1)
        log_norm = {t: torch.logsumexp(logits / t, dim=-1) for t in temps}
        if not drafts:  # the rebuilt rows give the trees the full rows give
            for i, p in enumerate(a.picks.tolist()):
                rebuilt = topk_rows(top_ids[i], top[i] - log_norm[1.0][i][:, None], vocab)
                assert torch.equal(build_tree(int(a.ids[p]), rebuilt, 64, topk, depths).tokens,
                                   build_tree(int(a.ids[p]), logits[i], 64, topk, depths).tokens)
        for i, p in enumerate(a.picks.tolist()):
            drafts.append(Draft(int(a.ids[p]), top_ids[i], top[i], {t: v[i] for t, v in log_norm.items()},
                                a.ids[p + 1 : p + 1 + depths].tolist()))
    half = len(drafts) // 2
    calibrate, held = drafts[:half], drafts[half:]

    # (depth, rank) hit rates on the calibration half: how often the draft's rank-r token at depth d is the
    # target's token there, counted while every shallower target token was in the draft's top-k (a path could
    # have reached depth d).
    hits, reach = torch.zeros(depths, topk), torch.zeros(depths)
    for draft in calibrate:
        for d, token in enumerate(draft.labels):
            reach[d] += 1
            ranks = (draft.top_ids[d] == token).nonzero()
            if len(ranks) == 0:
                break
            hits[d, int(ranks[0])] += 1
    rates = (hits / reach.clamp(min=1)[:, None]).clamp(min=1e-6)

    # Each scorer gives the top-k log-probabilities [D, k] the tree ranks; topk_rows rebuilds full rows.
    scorers = {"draft": lambda d: d.top - d.log_norm[1.0][:, None]}
    for t in temps[1:]:
        scorers[f"T={t:g}"] = lambda d, t=t: d.top / t - d.log_norm[t][:, None]
    scorers["static"] = lambda d: rates.log()

    def tau(scorer, budget: int) -> float:
        total = 0
        for d in held:
            tree = build_tree(d.anchor, topk_rows(d.top_ids, scorer(d), vocab), budget, topk, depths)
            total += 1 + accepted_length(tree, d.labels)
        return total / len(held)

    click.echo(f"{len(probe.sequences)} sequences, {len(drafts)} anchors ({len(held)} scored, {len(calibrate)} "
               "calibrate the static tree); (depth, rank) hit rates at depths 1/2/4: "
               + " | ".join(" ".join(f"{float(r):.3f}" for r in rates[d][:4]) for d in (0, 1, 3)))
    for budget in (int(b) for b in budgets.split(",")):
        click.echo(f"budget {budget:4d}: " + "  ".join(f"{name} {tau(fn, budget):.3f}" for name, fn in scorers.items()))


if __name__ == "__main__":
    main()
