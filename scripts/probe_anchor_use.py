"""How much of a draft head's agreement comes from the anchor token (the token the block starts from).

The target answers held-out prompts greedily; then, at random response anchors, the head drafts with the true
anchor, a random token, the MASK token, or the previous token in the anchor's place, and the top-1 agreement
with the target's own tokens is printed per depth. A head that uses the anchor well loses much of its depth-1
agreement without it; run 6's heads kept 0.17-0.19 of 0.28-0.32 (docs/training.md).

    python scripts/probe_anchor_use.py --target T --head H [--data prompts.jsonl.gz --prompt-offset 50000]
"""

from __future__ import annotations

from pathlib import Path

import click
import torch

from jetspec_trt.models.checkpoint import load_draft, load_target
from jetspec_trt.train.data import DataConfig, generate_responses
from jetspec_trt.train.features import FeatureStore
from jetspec_trt.train.objective import BlockBatch, depth_logits

VARIANTS = ("true anchor", "random token", "mask token", "previous token")
DEPTHS = (1, 2, 4, 8)


@click.command()
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
def main(target_dir, head_dir, data, prompt_offset, num_prompts, max_new_tokens, max_seq_len, anchors, work, device):
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    cfg = DataConfig(data, num_prompts, max_new_tokens, 0.0, 32, max_seq_len, prompt_offset=prompt_offset)
    sequences, _ = generate_responses(target_dir, cfg, work, device, dtype, seed=0, progress=False)
    target = load_target(target_dir, dtype, device)
    head = load_draft(head_dir, dtype, device)
    store = FeatureStore.build(target, sequences, head.spec.target_layer_ids, progress=False, keep_hidden=False)
    depths = head.spec.block_size - 1
    hits = {name: torch.zeros(depths) for name in VARIANTS}
    counts = torch.zeros(depths)
    g = torch.Generator().manual_seed(1)
    for row, seq in enumerate(sequences):
        ids = torch.tensor(seq.ids)
        length, prompt = len(ids), len(seq.prompt_ids)
        if length - prompt < 4:
            continue
        candidates = torch.arange(prompt, length - 1)
        picks = candidates[torch.randperm(len(candidates), generator=g)[:anchors]].sort().values
        features = store.padded_features([row])
        positions = picks[:, None] + torch.arange(1, depths + 1)
        seen = positions < length
        labels = ids[positions.clamp(max=length - 1)]
        counts += seen.sum(0)
        for name in VARIANTS:
            first = {"true anchor": ids[picks], "previous token": ids[picks - 1],
                     "random token": torch.randint(0, head.spec.mask_token_id, picks.shape, generator=g),
                     "mask token": torch.full_like(picks, head.spec.mask_token_id)}[name]
            batch = BlockBatch(features, torch.tensor([length], device=features.device), picks[None].to(device),
                               first[None].to(device), torch.ones(1, len(picks), dtype=torch.bool, device=device))
            with torch.no_grad():
                predicted = depth_logits(head, target, batch)[0].argmax(-1).cpu()
            hits[name] += ((predicted == labels) & seen).sum(0)
    click.echo(f"{len(sequences)} sequences, {int(counts[0])} anchors; top-1 agreement at depths {DEPTHS}:")
    for name in VARIANTS:
        rate = hits[name] / counts.clamp(min=1)
        click.echo(f"  {name:15s} " + "  ".join(f"{float(rate[d - 1]):.3f}" for d in DEPTHS if d <= depths))


if __name__ == "__main__":
    main()
