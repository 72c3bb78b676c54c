"""The frozen target's outputs for every training sequence, computed once and kept on the device (or, when they
would crowd the GPU, in pinned host memory, gathered per step).

The target never changes during training, so running it again every step (as a naive loop does) only burns
time: one pass per sequence up front gives each token's fused context features (the head's input) and, for the
KL objective, its final normed hidden state, from which `lm_head` recomputes the teacher's logits for just the
rows a step needs. Storing logits instead would cost vocab/hidden (170x for Qwen) more memory. The
cross-entropy objective needs only the token ids (its labels), kept here too.

A step then gathers its sequences' rows into a padded batch with one index_select.

Size: 3 captured layers of a 0.5B target are 2688 bf16 values, 5.4 KB a token. Run 5 on the H200 (10.4 M
prompt + response tokens) kept 56 GB of features on the GPU; twice that data would not fit, so `auto` keeps
them on the GPU only while they take at most DEVICE_SHARE of its free memory.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from jetspec_trt.models.target import TargetModel
from jetspec_trt.train.data import TrainSequence

DEVICE_SHARE = 0.5  # of the GPU's free memory, at most, for the stored features (`auto`)
FEATURE_STORES = ("auto", "device", "host")


def store_on_host(where: str, need_bytes: int, device: torch.device) -> bool:
    """Whether the store lives in (pinned) host memory: "host", or "auto" on a GPU with too little free memory."""
    if device.type != "cuda" or where == "device":
        return False
    if where == "host":
        return True
    free, _ = torch.cuda.mem_get_info(device)
    return need_bytes > DEVICE_SHARE * free


def to_device(t: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """t on `device`. A host tensor bound for a GPU goes through pinned memory without blocking: a plain .to()
    from pageable memory makes the host wait until the device has run everything queued before it."""
    device = torch.device(device)
    if t.device.type == "cpu" and device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def gather(table: torch.Tensor, index: torch.Tensor, device: torch.device | str | None = None) -> torch.Tensor:
    """table[index] on `device` (default: index's), wherever the table and the index live (a host table is
    gathered on the host, then copied)."""
    device = index.device if device is None else torch.device(device)
    if table.device.type == "cpu":
        return table[index.cpu()].to(device, non_blocking=True)
    return table[to_device(index, table.device)]


@dataclass
class FeatureStore:
    features: torch.Tensor  # [total_tokens, n_ids * H]: the head's context features
    final_hidden: torch.Tensor | None  # [total_tokens, H]: target.norm(last layer) -> lm_head gives the teacher
    tokens: torch.Tensor  # [total_tokens] long: the sequences' token ids (labels of the cross-entropy loss)
    offsets: torch.Tensor  # [num_sequences] long, first row of each sequence (on the store's device)
    lengths: torch.Tensor  # [num_sequences] long
    # Host copies of offsets and lengths: a step builds its indices on the host, without reading the device.
    host_offsets: torch.Tensor = field(init=False)
    host_lengths: torch.Tensor = field(init=False)

    def __post_init__(self):
        self.host_offsets, self.host_lengths = self.offsets.cpu(), self.lengths.cpu()

    @classmethod
    @torch.no_grad()
    def build(cls, target: TargetModel, sequences: list[TrainSequence], capture: tuple[int, ...],
              progress: bool = True, pack_tokens: int = 0, keep_hidden: bool = True,
              where: str = "device") -> "FeatureStore":
        """One causal target pass over every sequence (no lm_head: the teacher's logits come later, per step).

        pack_tokens > 0: consecutive sequences go through the target together, up to that many tokens per
        forward (TargetModel.prefill_packed; a longer sequence runs alone). Same features up to rounding, far
        fewer forwards: at batch 1 a 0.5B target's forward over a few hundred tokens is launch-bound.
        keep_hidden=False drops the final hidden states (only the KL teacher needs them).
        where: "device", "host" or "auto" (store_on_host); ids, offsets and lengths always stay on the device.
        """
        device = target.embed_tokens.weight.device
        dtype = target.embed_tokens.weight.dtype
        hidden_size = target.config.hidden_size
        lengths = [len(s) for s in sequences]
        total = sum(lengths)
        width = len(capture) * hidden_size + (hidden_size if keep_hidden else 0)
        host = store_on_host(where, total * width * dtype.itemsize, device)
        place = dict(device="cpu", pin_memory=True) if host else dict(device=device)
        features = torch.empty(total, len(capture) * hidden_size, dtype=dtype, **place)
        final_hidden = torch.empty(total, hidden_size, dtype=dtype, **place) if keep_hidden else None
        cache = target.new_cache(max(max(lengths), pack_tokens), page_size=64)
        row = 0
        bar = tqdm(total=len(sequences), desc="target features", unit="seq", disable=not progress)
        for first, count in packs(lengths, pack_tokens):
            group = [sequences[i].ids for i in range(first, first + count)]
            hidden, captured = target.prefill_packed(group, cache, tuple(capture))  # a group of one is causal
            n = hidden.shape[0]
            if final_hidden is not None:
                final_hidden[row : row + n].copy_(hidden)
            if capture:
                features[row : row + n].copy_(captured)
            row += n
            bar.update(count)
        bar.close()
        offsets = torch.tensor([0] + lengths[:-1], device=device).cumsum(0)
        tokens = torch.tensor([t for s in sequences for t in s.ids], dtype=torch.long, device=device)
        return cls(features, final_hidden, tokens, offsets, torch.tensor(lengths, device=device))

    def padded_features(self, rows: list[int], width: int | None = None) -> torch.Tensor:
        """[len(rows), width, F]: the sequences' first `width` tokens' features (default: the longest one's
        length), zero past each one's end."""
        index, valid = self._index(rows, width)
        device = self.tokens.device
        return gather(self.features, index, device) * to_device(valid, device)[..., None].to(self.features.dtype)

    def final_hidden_rows(self, index: torch.Tensor) -> torch.Tensor:
        """The final hidden states of store rows `index` (on the host or the device), on the store's device."""
        return gather(self.final_hidden, index, self.tokens.device)

    def flat_index(self, rows: list[int], positions: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Store rows of `positions` [N, K, D] of sequences `rows`, valid entries only (boolean-mask order)."""
        return (self.offsets[rows][:, None, None] + positions)[valid]

    def _index(self, rows: list[int], width: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Store rows [len(rows), width] of the sequences' first `width` tokens (the last one repeated past a
        sequence's end) and which are real; on the host."""
        lengths = self.host_lengths[rows]
        width = int(lengths.max()) if width is None else width
        steps = torch.arange(width)
        valid = steps[None, :] < lengths[:, None]
        index = self.host_offsets[rows][:, None] + torch.minimum(steps[None, :], lengths[:, None] - 1)
        return index, valid


def packs(lengths: list[int], pack_tokens: int) -> list[tuple[int, int]]:
    """(first index, count) runs of consecutive sequences with at most pack_tokens tokens together (a longer
    sequence alone); every sequence alone when pack_tokens <= 0."""
    runs: list[tuple[int, int]] = []
    first, used = 0, 0
    for i, n in enumerate(lengths):
        if i > first and (pack_tokens <= 0 or used + n > pack_tokens):
            runs.append((first, i - first))
            first, used = i, 0
        used += n
    if lengths:
        runs.append((first, len(lengths) - first))
    return runs
